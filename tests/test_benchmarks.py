"""The benchmark suite keeps working: ``benchmarks/run.py --quick`` runs to the end and writes a well-formed
report. Figures are checked for shape and sense only, never for speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from etwmon.sources import SOURCES

from .conftest import REQUIRE_ROOT, require

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "benchmarks" / "run.py"
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
IS_ROOT = sys.platform.startswith("linux") and os.geteuid() == 0
#: etwmon's own Linux kernel sources: each must have its row in the storm and cost benchmarks (the peers alone
#: must never make a benchmark "ok").
ETWMON_TOOLS = {f"etwmon-{name}" for name in SOURCES if name not in ("etw", "procfs")}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    before = RESULTS_MD.read_bytes() if RESULTS_MD.exists() else None
    proc = subprocess.run([sys.executable, str(RUN), "--quick", "--out", str(out)], capture_output=True,
                          text=True, timeout=420, cwd=ROOT)  # a hang guard: ~2-3 min on a quiet machine
    after = RESULTS_MD.read_bytes() if RESULTS_MD.exists() else None
    return out, proc, before, after


def _stat_ok(stat, low=0.0, high=math.inf):
    assert set(stat) == {"min", "median", "max", "n"}
    assert low <= stat["min"] <= stat["median"] <= stat["max"] <= high
    assert stat["n"] >= 1


def test_quick_run_succeeds_and_prints_the_table(quick_run):
    _, proc, _, _ = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== Ring" in proc.stdout and "== Targets" in proc.stdout
    assert "ring: repeat 1/" in proc.stderr  # progress goes to stderr


def test_quick_run_leaves_results_md_alone(quick_run):
    _, _, before, after = quick_run
    assert before == after


def test_latest_json_has_the_machine_and_every_benchmark(quick_run):
    out, _, _, _ = quick_run
    data = json.loads((out / "latest.json").read_text())
    assert data["mode"] == "quick"
    for key in ("cpu", "cores", "kernel", "python", "numpy", "etwmon", "date"):
        assert data["machine"][key], key
    assert list(data["benchmarks"]) == ["ring", "readers", "service", "rules", "storms", "cost", "perftest", "memory",
                                        "identity", "imageload", "fleet", "recording"]
    for name, bench in data["benchmarks"].items():
        assert bench["status"] in ("ok", "skipped"), (name, bench.get("error"), bench.get("traceback"))
        if bench["status"] == "skipped":
            assert bench["reason"], name  # never silently left out
            assert not (IS_ROOT and name in ("storms", "cost")), f"{name} skipped as root: {bench['reason']}"
    if REQUIRE_ROOT:  # CI: every kernel benchmark ran for real, etwmon's own sources in it without an error
        for name in ("storms", "cost", "perftest", "memory"):
            bench = data["benchmarks"][name]
            assert bench["status"] == "ok", (name, bench.get("reason") or bench.get("error"))
        cost = {row["tool"]: row for row in data["benchmarks"]["cost"]["rows"]}
        assert ETWMON_TOOLS <= set(cost), (ETWMON_TOOLS - set(cost), data["benchmarks"]["cost"]["skipped_tools"])
        assert all(not cost[tool]["errors"] and cost[tool]["ratio"] for tool in ETWMON_TOOLS), cost


def test_ring_figures_are_complete_and_sane(quick_run):
    out, _, _, _ = quick_run
    ring = json.loads((out / "latest.json").read_text())["benchmarks"]["ring"]
    sizes = [row["buffer"] for row in ring["readinto"]]
    assert sizes == sorted(sizes) and 4096 in sizes and 4 << 20 in sizes
    for row in ring["readinto"]:
        for key in ("ring_MBps", "naive_MBps", "ceiling_MBps", "ring_vs_naive", "ring_vs_ceiling"):
            _stat_ok(row[key], low=1e-9)
    for key in ("ring_records_per_s", "deque_records_per_s", "ring_vs_deque", "full_ring_records_per_s"):
        _stat_ok(ring["push"][key], low=1e-9)
    names = {t["name"] for t in ring["targets"]}
    assert names == {"readinto 64 KiB vs naive list", "readinto 1 MiB vs copy ceiling", "push rate",
                     "push vs deque append"}


def test_service_figures_are_complete_and_sane(quick_run):
    out, _, _, _ = quick_run
    service = json.loads((out / "latest.json").read_text())["benchmarks"]["service"]
    if service["status"] == "skipped":
        assert not sys.platform.startswith("linux"), service["reason"]
        pytest.skip(service["reason"])
    assert [row["clients"] for row in service["throughput"]] == [0, 1, 4]
    for row in service["throughput"]:
        _stat_ok(row["records_per_s"], low=1e-9)
        _stat_ok(row["MBps"], low=1e-9)
        if row["clients"]:
            _stat_ok(row["vs_inprocess"], low=1e-9)
    for key in ("inprocess_us", "socket_us"):
        lat = service["latency"][key]
        assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"] and lat["n"] == service["params"]["latency_records"]
    assert {t["name"] for t in service["targets"]} == {"socket to 1 client vs in-process (64 KiB reads)",
                                                     "socket to each of 4 clients vs in-process",
                                                     "latency the socket adds (p99)"}


def test_rules_figures_are_complete_and_sane(quick_run):
    out, proc, _, _ = quick_run
    rules = json.loads((out / "latest.json").read_text())["benchmarks"]["rules"]
    assert rules["status"] == "ok", rules
    assert 400 <= rules["params"]["rules"] <= 600
    assert 0 < rules["params"]["events_kept"] < rules["params"]["events"]
    for key in ("decide_us", "decide_one_rule_us", "stage_us", "plain_sink_us"):
        _stat_ok(rules[key], low=1e-9)
    assert {t["name"] for t in rules["targets"]} == {"evaluation per process event, ~500 rules",
                                                       "stage added per record (mixed stream, decoding included)"}
    assert "== Rules" in proc.stdout


def test_every_target_has_a_verdict(quick_run):
    out, _, _, _ = quick_run
    data = json.loads((out / "latest.json").read_text())
    assert data["targets"]
    for t in data["targets"]:
        assert t["result"] in ("PASS", "MISS", "n/a"), t
        assert (t["value"] is None) == (t["result"] == "n/a"), t
        assert t["op"] in (">=", "<="), t


def test_storm_trials_are_scored_against_ground_truth(quick_run):
    out, _, _, _ = quick_run
    storms = json.loads((out / "latest.json").read_text())["benchmarks"]["storms"]
    require(storms["status"] == "ok", f"storms: {storms.get('reason') or storms.get('error')}")
    tools = {t["tool"] for t in storms["trials"]}
    if REQUIRE_ROOT:  # each of etwmon's own sources ran every storm, without an error
        assert ETWMON_TOOLS <= tools, (ETWMON_TOOLS - tools, storms["skipped_tools"])
        broken = [(t["tool"], t["kind"], t.get("error")) for t in storms["trials"]
                  if t["tool"] in ETWMON_TOOLS and t.get("captured_pct") is None]
        assert not broken, broken
    for tool in ETWMON_TOOLS:
        assert tool in tools or tool in storms["skipped_tools"], tool
    assert "forkstat" in tools or "forkstat" in storms["skipped_tools"]
    assert "pyroute2" in tools or "pyroute2" in storms["skipped_tools"]
    for trial in storms["trials"]:
        if trial.get("captured_pct") is None:
            assert trial["error"], trial  # a trial without figures says why
            continue
        assert trial["items"] > 0 and trial["events"] == trial["items"] * {"exec": 3, "fork": 2, "threads": 2}[
            trial["kind"]]
        assert 0 <= trial["captured"] <= trial["expected"]
        assert 0.0 <= trial["captured_pct"] <= 100.0
        if "cmdline_right" in trial:
            assert 0 <= trial["cmdline_right"] <= trial["items"]
        if trial["tool"].startswith("etwmon-") and trial["latency_us"]:
            assert 0 <= trial["latency_us"]["p50"] <= trial["latency_us"]["p99"] <= trial["latency_us"]["max"]


def _bpf_ran(storms: dict) -> bool:
    return any(t["tool"] == "etwmon-bpf" for t in storms["trials"])


def test_storms_compare_each_read_path_of_bpf_with_both_peers(quick_run):
    out, proc, _, _ = quick_run
    data = json.loads((out / "latest.json").read_text())
    storms = data["benchmarks"]["storms"]
    require(storms["status"] == "ok" and _bpf_ran(storms), "storms: the bpf source did not run here")
    if REQUIRE_ROOT:  # CI installs both peers (run.py's setup)
        assert not {"forkstat", "bpftrace"} & set(storms["skipped_tools"]), storms["skipped_tools"]
    paths = storms["paths"]
    import etwmon

    wanted = ["readinto", "parse"] + (["parse_array"] if hasattr(etwmon, "parse_array") else []) + ["tail --json"]
    assert storms["params"]["read_paths_in"] == ["exec"]  # quick: the exec storm's only
    assert [(r["kind"], r["path"]) for r in paths] == [(k, p) for k in ("threads", "fork", "exec") for p in wanted
                                                       if k == "exec" or p == "readinto"]
    trials = {(t["kind"], t["tool"]) for t in storms["trials"] if t["level"] == 1.0}
    for row in paths:
        assert (row["kind"], row["tool"]) in trials, row  # each path ran at full rate
        assert not any(t["tool"] == row["tool"] and t["level"] != 1.0 for t in storms["trials"]) \
            or row["path"] == "readinto"  # the other paths only at full rate
        for peer in ("forkstat", "bpftrace"):
            ratio, own, theirs = row[f"vs_{peer}"], row["cpu_ms_per_1000_events"], row[f"peer_{peer}"]
            if ratio is None:
                assert own is None or theirs is None or row["errors"], row
                continue
            _stat_ok(ratio, low=1e-9)
            if ratio["n"] == 1:  # one round: the ratio is the two figures' quotient
                assert ratio["median"] == pytest.approx(own["median"] / theirs["median"], rel=1e-9)
    names = {t["name"] for t in storms["targets"]}
    goals = {("readinto", "forkstat"), ("readinto", "bpftrace"), ("parse", "forkstat"), ("tail --json", "forkstat")}
    for row in paths:
        for path, peer in goals:
            if row["path"] == path:
                assert f"{row['tool']}: CPU per event vs {peer}, {row['kind']} storm at full rate (median of the " \
                       "rounds' ratios)" in names
    assert "etwmon-bpf: p99 latency, threads storm up to 0.5 of max (worst run)" in names  # quick: 0.5 and max
    for kind in ("threads", "fork", "exec"):
        assert f"etwmon-bpf: p99 latency, {kind} storm at full rate (worst run)" in names
    assert "÷ forkstat" in proc.stdout and "tail --json" in proc.stdout


def test_perftest_row_names_its_rate_and_each_monitor(quick_run):
    out, proc, _, _ = quick_run
    data = json.loads((out / "latest.json").read_text())
    perf = data["benchmarks"]["perftest"]
    if perf["status"] == "skipped":
        assert not (IS_ROOT and REQUIRE_ROOT), perf["reason"]
        pytest.skip(f"perftest: {perf['reason']}")
    p = perf["params"]
    assert p["seconds"] == 2.0 and 0 < p["rate"] <= 1600 and p["rate_reason"]
    assert ("perftest" in p["rate_reason"]) and (p["rate"] == 1600 or "60%" in p["rate_reason"])
    ran = [r["tool"] for r in perf["rows"]]
    assert set(ran) | set(perf["not_run"]) == {"etwmon-bpf", "etwmon-bpf batch_wait=5ms", "etwmon-bpf tail --json",
                                                  "forkstat", "bpftrace"}
    assert not set(ran) & set(perf["not_run"])
    for why in perf["not_run"].values():
        assert why  # never silently left out
    for row in perf["rows"]:
        if row.get("error") and row.get("us_per_exec") is None:
            continue
        assert row["execs"] > 0 and row["cpu_pct_of_core"] >= 0
        assert row["us_per_exec"] == pytest.approx(1e6 * row["cpu_s"] / row["execs"], rel=1e-9)
        assert 0 <= row["captured_pct"] <= 100
        assert row["events_made"] == 3 * row["execs"] and row["events_delivered"] >= 0
    if "etwmon-bpf" in ran:
        assert [t["name"] for t in perf["targets"]] == [
            "etwmon-bpf: Monitor CPU per exec (fork + exec + exit) at the perftest rate"]
    assert "== Perftest" in proc.stdout


def test_cost_and_memory_name_their_bpf_goals(quick_run):
    out, _, _, _ = quick_run
    data = json.loads((out / "latest.json").read_text())
    cost, memory = data["benchmarks"]["cost"], data["benchmarks"]["memory"]
    if cost["status"] == "ok":
        tools = {r["tool"] for r in cost["rows"] if r["ratio"]}
        if {"etwmon-bpf", "forkstat"} <= tools:
            assert "etwmon-bpf: exec storm slowdown vs forkstat's (same rounds)" in {t["name"] for t in cost["targets"]}
    if memory["status"] == "ok":
        p = memory["params"]
        assert p["process_table_max_bytes"] > 0 and p["process_table_cap_from"]
        ring = p["max_bytes"] + 8 * p["max_items"]
        assert memory["growth_bound"] == ring + p["process_table_max_bytes"] + 16 * 1024 * 1024


def test_identity_cost_pairs_each_source_with_itself_without_the_stage(quick_run):
    out, _, _, _ = quick_run
    ident = json.loads((out / "latest.json").read_text())["benchmarks"]["identity"]
    if ident["status"] != "ok":
        pytest.skip(f"identity: {ident['reason']}")
    assert ident["rows"] and {t["benchmark"] for t in ident["targets"]} == {"identity"}
    for row in ident["rows"]:
        assert row["kind"] in ("threads", "fork", "exec")
        if row["ratio"] is None:
            assert row["errors"], row  # a pair without figures says why
            continue
        _stat_ok(row["ratio"], low=1e-9)
        _stat_ok(row["cpu_on"], low=1e-9)
        _stat_ok(row["cpu_off"], low=1e-9)
        assert row["ratio"]["median"] == pytest.approx(row["cpu_on"]["median"] / row["cpu_off"]["median"], rel=1e-9) \
            or ident["params"]["repeats"] > 1
    names = {t["name"] for t in ident["targets"]}
    assert any("etwmon-netlink" in n for n in names) or not IS_ROOT


def test_fleet_figures_are_complete_and_sane(quick_run):
    out, _, _, _ = quick_run
    fleet = json.loads((out / "latest.json").read_text())["benchmarks"]["fleet"]
    if fleet["status"] != "ok":
        assert not REQUIRE_ROOT, f"fleet: {fleet.get('reason') or fleet.get('error')}"  # CI has nats-server
        pytest.skip(f"fleet: {fleet['reason']}")
    for trial in fleet["paced"] + fleet["unthrottled"]:
        assert trial["pushed"] and trial["pushed"] > 0
        assert trial["received"] + trial["lost"] <= trial["pushed"]
        assert trial["missing"] == trial["pushed"] - trial["received"]
        lat = trial["latency_ms"]
        assert 0 <= lat["p50"] <= lat["p99"] <= lat["max"]
    names = {"records missing at 50 k/s", "p99 latency at 50 k/s", "unthrottled end to end"}
    if isinstance(fleet["storm"], list):  # as root: the live netlink source through the fleet
        names |= {"thread storm via netlink, captured at the consumer", "thread storm via netlink, p99 latency"}
        for trial in fleet["storm"]:
            assert 0 <= trial["captured"] <= trial["expected"] and trial["threads"] > 0
    else:
        assert fleet["storm"]["reason"] and not (IS_ROOT and REQUIRE_ROOT)
    assert {t["name"] for t in fleet["targets"]} == names


def test_plots_are_pngs(quick_run):
    out, _, _, _ = quick_run
    data = json.loads((out / "latest.json").read_text())
    # A plot that crashed or could not be made says so in place of the list; under the switch that fails.
    require(not isinstance(data["plots"], str), f"plots: {data['plots']}")
    assert data["plots"]
    assert (out / "ring_readinto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for path in data["plots"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_recording_figures_are_complete_and_sane(quick_run):
    out, _, _, _ = quick_run
    rec = json.loads((out / "latest.json").read_text())["benchmarks"]["recording"]
    assert rec["status"] == "ok", rec
    for key in ("tail_us", "record_all_us", "record_tree_us"):
        _stat_ok(rec[key], low=1e-9)
    assert rec["params"]["events"] == 3 * rec["params"]["processes"]
    assert 0 < rec["file_bytes_per_1000_events"] < rec["wire_bytes_per_1000_events"]
    assert rec["compression_ratio"] > 1
    report = rec["report"]
    assert report["page_bytes"] > report["recording_bytes"] > 0 and report["generation_s"] > 0
    if "load_s" in report:  # Chromium was there
        assert report["requests"] == [report["requests"][0]] and report["requests"][0].startswith("file://")
        assert 0 < report["rows_in_dom"] <= min(report["processes"], 200)  # virtualized: the rows in view only
        assert report["drawn_s"] > 0 and report["search_result"].endswith(("match", "matches"))
    else:
        assert report["browser"].startswith("skipped: ")
    assert {t["name"] for t in rec["targets"]} == {"record everything: CPU per event vs tail's",
                                                   "file size per 1,000 events"}
