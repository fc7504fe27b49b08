"""Turns the suite's results dict into the terminal table, RESULTS.md and the PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

MIB = 1024 * 1024


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.{max(digits, 2)}f} M"
    if abs(value) >= 1e4:
        return f"{value / 1e3:.{digits}f} k"
    return f"{value:.{digits}f}"


def stat(s: dict | None, digits: int = 1, scale: float = 1.0, spread: bool = True) -> str:
    """"median [min–max]" of a summary (just the median when all runs agree or there was one)."""
    if not s:
        return "–"
    med = _num(s["median"] * scale, digits)
    lo, hi = _num(s["min"] * scale, digits), _num(s["max"] * scale, digits)
    if not spread or s.get("n", 1) == 1 or lo == hi:
        return med
    return f"{med} [{lo}–{hi}]"


def _table(headers: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return out
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _para(text: str) -> list[str]:
    """A paragraph and the blank line after it."""
    return [text, ""]


def _header(results: dict, markdown: bool) -> list[str]:
    m = results["machine"]
    facts = [("Date", m["date"]), ("CPU", f"{m['cpu']}, {m['cores']} cores"), ("Kernel", m["kernel"]),
             ("OS", m["os"]), ("Python", m["python"]), ("numpy", m["numpy"]),
             ("etwmon", f"{m['etwmon']} (commit {m['commit']})"),
             ("Mode", f"{results['mode']}, {results['duration_s']:.0f} s, run as "
                      f"{'root' if m['root'] else 'an ordinary user'}")]
    if markdown:
        return _table(["", ""], [[k, v] for k, v in facts], True)
    return [f"  {k:<7} {v}" for k, v in facts]


def _ring(ring: dict, results: dict, markdown: bool) -> list[str]:
    p, push = ring["params"], ring["push"]
    out = _para(f"{p['records']:,} records ({p['record_mix']}, {p['mean_record_bytes']} bytes on average), "
                f"{p['volume_bytes'] / MIB:.1f} MiB per drain; median [min–max] of {p['repeats']} repeats.")
    out += _table(["push (1 record per call)", "records/s"], [
        ["EventRing.push", stat(push["ring_records_per_s"], 2)],
        ["deque port append", stat(push["deque_records_per_s"], 2)],
        ["ring / deque", stat(push["ring_vs_deque"], 2) + " x"]], markdown)
    out.append("")
    rows = [[r["buffer_name"], stat(r["ring_MBps"], 0), stat(r["naive_MBps"], 0), stat(r["ceiling_MBps"], 0),
             stat(r["ring_vs_naive"], 1) + " x", stat(r["ring_vs_ceiling"], 2) + " x"] for r in ring["readinto"]]
    out += _table(["readinto buffer", "ring MB/s", "naive MB/s", "ceiling MB/s", "ring / naive",
                   "ring / ceiling"], rows, markdown)
    return out


def _rules(rules: dict, results: dict, markdown: bool) -> list[str]:
    p = rules["params"]
    out = _para(f"{p['rules']} rules ({p['config_bytes'] / 1024:.0f} KiB of XML); {p['events']:,} ProcessExec "
                f"events carrying every field ({p['events_kept']:,} kept); a stream of {p['stream_records']:,} "
                f"records ({p['stream_mix']}); median [min–max] of {p['repeats']} repeats.")
    out += _table(["what", "µs per event"], [
        ["RuleSet.decide, ~500 rules", stat(rules["decide_us"], 2)],
        ["RuleSet.decide, 1 rule", stat(rules["decide_one_rule_us"], 2)],
        ["RulesStage.push (decoding included), mixed stream", stat(rules["stage_us"], 2)],
        ["plain sink push, same stream", stat(rules["plain_sink_us"], 3)],
        ["added by the stage per record", stat(rules["stage_added_us"], 2)],
        ["the same, with two Redact patterns", stat(rules.get("stage_redacting_added_us"), 2)]], markdown)
    return out


def _storms(storms: dict, results: dict, markdown: bool) -> list[str]:
    out: list[str] = []
    out += _skipped(storms, markdown)
    p = storms["params"]
    out += _para(f"Storms of ~{p['seconds_per_storm']} s at {', '.join(f'{x:g}' for x in p['levels']['threads'])} "
                 "of the machine's unthrottled rate (max = unthrottled; "
                 + ", ".join(f"{k} {v:,.0f}/s" for k, v in p["max_items_per_s"].items())
                 + f"); {p['repeats_at_max']} runs at full rate. CPU = the monitor process's "
                 "CPU time per 1000 events it delivered; latency = readinto time − kernel timestamp.")
    rows = []
    for r in storms["summary"]:
        rows.append([r["kind"], "max" if r["level"] == 1.0 else f"{r['level']:g} max", stat(r["events_per_s"], 1, spread=False), r["tool"],
                     stat(r["captured_pct"], 2), stat(r["cmdline_right_pct"], 1),
                     stat(r["cpu_ms_per_1000_events"], 1), stat(r["latency_p50_ms"], 2, spread=False),
                     stat(r["latency_p99_ms"], 2), stat(r["lost_reported"], 0, spread=False),
                     "; ".join(r["errors"])[:80]])
    out += _table(["storm", "level", "events/s", "tool", "captured %", "cmdline right %",
                   "CPU ms / 1k events", "p50 ms", "p99 ms", "lost (reported)", "errors"], rows, markdown)
    if storms.get("crashes"):
        out.append("")
    for c in storms.get("crashes", []):
        rate = f"{c['events_per_s'] / 1000:.1f} k events/s" if c.get("events_per_s") else "?"
        level = "max" if c["level"] == 1.0 else f"{c['level']:g} max"
        out.append(f"{'- ' if markdown else ''}{c['tool']} failed in the {c['kind']} storm from {level} "
                   f"({rate}): "
                   f"{c['error']}")
    if storms.get("paths"):
        out += [""] + _paths(storms["paths"], storms["params"].get("read_paths_in"), markdown)
    return out


def _paths(paths: list[dict], kinds: list[str] | None, markdown: bool) -> list[str]:
    """The bpf source read each way at full rate, as a ratio to the peers' CPU per event in the same rounds."""
    from storm_bench import PATH_GOALS, PEERS

    out = ["CPU per event of etwmon-bpf read each way at the storms' full rate (identity on), and its ratio to "
           "each peer's in the same round: median [min–max] over the rounds; goal in brackets where there is one."
           + (f" The paths other than readinto ran in the {', '.join(kinds)} storm(s) only." if kinds and
              len(kinds) < 3 else "")]
    out.append("")
    rows = []
    for r in paths:
        cells = [r["kind"], r["path"], stat(r["cpu_ms_per_1000_events"], 1)]
        for peer in PEERS:
            goal = PATH_GOALS.get((r["path"], peer))
            ratio = r[f"vs_{peer}"]
            cell = (stat(ratio, 2) + " x") if ratio else "–"
            if goal is not None:
                verdict = "n/a" if not ratio else ("PASS" if ratio["median"] <= goal else "MISS")
                cell += f" (≤ {goal:g}: {verdict})"
            cells.append(cell)
        cells.append("; ".join(r["errors"])[:60])
        rows.append(cells)
    heads = ["storm", "read path", "CPU ms / 1k events"] + [f"÷ {peer}" for peer in PEERS] + ["errors"]
    return out + _table(heads, rows, markdown)


def _delivered(row: dict) -> str:
    """Events a monitor delivered / the events the run made (more: the rest of the machine's, which its CPU paid
    for too)."""
    if row.get("events_delivered") is None or not row.get("events_made"):
        return "–"
    return f"{row['events_delivered']:,} / {row['events_made']:,}"


def _perftest(perf: dict, results: dict, markdown: bool) -> list[str]:
    out = _skipped(perf, markdown)
    p = perf["params"]
    out += _para(f"After SysmonForLinux's perftest: /bin/true fork+exec'd at {p['rate']:,.0f}/s for {p['seconds']:g} s "
                 f"({p['execs']:,} execs), one monitor at a time. Rate: {p['rate_reason']}. CPU = the monitor's "
                 "CPU time over the run; µs per exec covers its fork, exec and exit events.")
    rows = [[r["tool"], _num(r.get("execs_per_s"), 0) + ("" if r.get("rate_kept", True) else " (behind)"),
             _num(r.get("cpu_pct_of_core"), 1),
             _num(r.get("us_per_exec"), 1), _delivered(r), _num(r.get("captured_pct"), 2),
             _num(r.get("cmdline_right_pct"), 1), (r.get("error") or "")[:60]] for r in perf["rows"]]
    rows += [[name, "", "", "", "", "", "", f"not run: {why}"[:80]] for name, why in perf.get("not_run", {}).items()]
    out += _table(["monitor", "execs/s", "CPU % of a core", "µs per exec", "events delivered / made", "captured %",
                   "cmdline right %", "errors"], rows, markdown)
    if not all(r.get("rate_kept", True) for r in perf["rows"]):
        out += ["", "behind: the generator made less than 90 % of the rate while that monitor watched (the machine "
                "was busier than the rate allows), so its CPU is for a lighter load than the others'."]
    return out


def _cost(cost: dict, results: dict, markdown: bool) -> list[str]:
    out: list[str] = []
    out += _skipped(cost, markdown)
    out += _para(f"{cost['params']['items']:,} fork+exec of /bin/true per run, {cost['params']['rounds']} "
                 "rounds; each monitor's run is compared with a no-monitor run just before it.")
    rows = [[r["tool"], stat(r["items_per_s"], 0), (stat(r["ratio"], 2) + " x") if r["ratio"] else "–", stat(r["slowdown_pct"], 1),
             stat(r["cmdline_right_pct"], 1), "; ".join(r["errors"])[:80]] for r in cost["rows"]]
    out += _table(["monitor", "execs/s", "vs none", "slower %", "cmdline right %", "errors"], rows, markdown)
    versus = next((t for t in cost.get("targets", []) if "vs forkstat" in t["name"]), None)
    forkstat = next((r for r in cost["rows"] if r["tool"] == "forkstat"), None)
    if versus and forkstat:
        out += ["", f"etwmon-bpf slowed the storm {_target_value(versus['value'], '%')}, forkstat "
                f"{stat(forkstat['slowdown_pct'], 1)} % in the same rounds (goal: no more than forkstat's, "
                f"at least 0): {versus['result']}."]
    return out


def _memory(first: dict, results: dict, markdown: bool) -> list[str]:
    out: list[str] = []
    for mem in [first] + list(first.get("more", [])):
        if mem["status"] not in ("ok", "error") or "rss_start" not in mem:
            out.append(_status_line(mem))
        else:
            p, ring = mem["params"], mem["ring"]
            out.append(f"Source {p['source']}, {p['storms']}, {p['seconds']} s, RSS sampled every second; ring caps "
                       f"max_items={p['max_items']:,}, max_bytes={p['max_bytes'] / MIB:.0f} MiB; the reader stops "
                       f"reading at {p['reader_stops_at_s']:.0f} s so the ring fills to its caps."
                       + (f" Allowed growth = the ring's caps + the process table's byte cap "
                          f"({p['process_table_max_bytes'] / MIB:.0f} MiB: {p['process_table_cap_from']}) "
                          "+ 16 MiB." if p.get("process_table_max_bytes") else ""))
            out.append("")
            out += _table(["RSS start", "max while reading", "max", "end", "growth", "allowed", "pushed", "dropped (counted)"],
                          [[f"{mem['rss_start'] / MIB:.1f} MiB", f"{(mem['rss_max_while_reading'] or 0) / MIB:.1f} MiB",
                            f"{mem['rss_max'] / MIB:.1f} MiB", f"{mem['rss_end'] / MIB:.1f} MiB",
                            f"{mem['growth'] / MIB:.1f} MiB", f"{mem['growth_bound'] / MIB:.1f} MiB",
                            f"{ring['pushed'] or 0:,}", f"{ring['dropped'] or 0:,}"]], markdown)
            if mem.get("error"):
                out.append(f"error: {mem['error']}")
    return out


def _service(service: dict, results: dict, markdown: bool) -> list[str]:
    p = service["params"]
    out = _para(f"{p['records']:,} records ({p['volume_bytes'] / MIB:.1f} MiB, {p['mean_record_bytes']} bytes "
                f"on average) pushed as fast as a source can, read with {p['read_size'] // 1024} KiB "
                f"readinto; {p['repeats']} repeats. Server and clients are separate processes; the load average "
                f"was {p.get('load_average_1min', 0):.1f} on {results['machine']['cores']} cores.")
    rows = [[r["path"], stat(r["records_per_s"], 0), stat(r["MBps"], 1),
             (stat(r["vs_inprocess"], 2) + " x") if r["vs_inprocess"] else "–"] for r in service["throughput"]]
    out += _table(["path", "records/s (each client)", "MB/s", "vs in-process"], rows, markdown)
    lat = service["latency"]
    out.append("")
    out += _para(f"Latency, push to reader, {p['latency_records']} records {p['latency_spacing_ms']:g} ms "
                 "apart (µs):")
    out += _table(["path", "p50", "p99", "max"],
                  [[name, f"{lat[key]['p50']:.0f}", f"{lat[key]['p99']:.0f}", f"{lat[key]['max']:.0f}"]
                   for name, key in (("in-process", "inprocess_us"), ("socket", "socket_us"))]
                  + [["added by the socket", f"{lat['added_p50_us']:.0f}", f"{lat['added_p99_us']:.0f}", ""]],
                  markdown)
    return out


def _identity(ident: dict, results: dict, markdown: bool) -> list[str]:
    p = ident["params"]
    out = _para(f"Storms of ~{p['seconds_per_storm']} s at {p['level']:g} of the unthrottled rate, "
                f"{p['repeats']} pair(s) each, on and off alternating; CPU = the monitor process's "
                "CPU time per 1000 events it delivered.")
    rows = [[r["source"], r["kind"], stat(r["cpu_off"], 1), stat(r["cpu_on"], 1),
             (stat(r["ratio"], 2) + " x") if r["ratio"] else "–", stat(r["captured_on"], 2),
             "; ".join(r["errors"])[:80]] for r in ident["rows"]]
    out += _table(["source", "storm", "CPU ms / 1k ev, off", "on", "on / off", "captured % (on)", "errors"],
                  rows, markdown)
    alone = ident.get("stage_alone_us") or {}
    if alone:
        out.append("")
        out.append("The stage alone on synthetic records (CPU µs per record, best of 5): "
                   + ", ".join(f"{kind} {us:.1f}" for kind, us in alone.items()) + ".")
    return out


def _fleet(fleet: dict, results: dict, markdown: bool) -> list[str]:
    p = fleet["params"]
    out = _para(f"A Monitor over a paced source in a child process, shipped by etwmon.fleet.Shipper "
                f"({p['batch_bytes'] // 1024} KiB batches, {p['batch_wait_s'] * 1000:.0f} ms batch wait); "
                f"a FleetConsumer in this process; {p['seconds']:.0f} s per trial, {p['repeats']} repeats. "
                "Latency: the consumer's read() returning the record minus the record's Time.")
    out += _table(["trial", "records/s", "missing", "p50 ms", "p99 ms"], [
        [f"paced {p['paced_rate']:,}/s", stat(fleet["paced_records_per_s"], 0), stat(fleet["paced_missing"], 0),
         stat(fleet["paced_p50_ms"], 1), stat(fleet["paced_p99_ms"], 1)],
        ["unthrottled", stat(fleet["unthrottled_records_per_s"], 0), "", "", ""]], markdown)
    if isinstance(fleet.get("storm"), dict):
        out.append(f"thread storm through the fleet: {_status_line(fleet['storm'])}")
    elif fleet.get("storm"):
        out.append("")
        out += _table(["thread storm, netlink → fleet", "storm events/s", "captured %", "p99 ms"], [
            ["unthrottled", stat(fleet["storm_events_per_s"], 0), stat(fleet["storm_captured_pct"], 2),
             stat(fleet["storm_p99_ms"], 1)]], markdown)
    return out


def _imageload(images: dict, results: dict, markdown: bool) -> list[str]:
    p = images["params"]
    out = _para(f"A dlopen/dlclose storm of {p['loads_per_storm']:,} loads of one library, {p['repeats']} "
                "round(s), image loads on and off alternating; CPU = the monitor's with them on less off, "
                "per image load it delivered (the storm's and the rest of the machine's).")
    out += _table(["figure", "median (min–max)"], [
        ["monitor CPU µs per image load", stat(images["cpu_us_per_load"], 1)],
        ["dlopen+dlclose µs, no monitor", stat(images["storm_us_per_load_none"], 1)],
        ["dlopen+dlclose µs, bpf, image loads off", stat(images["storm_us_per_load_off"], 1)],
        ["dlopen+dlclose µs, bpf, image loads on", stat(images["storm_us_per_load_on"], 1)]], markdown)
    out.append("")
    out += _table(["exec storm, watched by", "slowdown % vs no monitor"],
                  [[r["tool"], stat(r["slowdown_pct"], 1)] for r in images["exec_cost"]["rows"]
                   if r["tool"] != "none"], markdown)
    return out


def _readers(readers: dict, results: dict, markdown: bool) -> list[str]:
    us = readers["us_per_event"]
    out = [f"{readers['events']:,} synthetic events as the identity stage writes them (fork, exec, "
           "thread create/exit, exit, with their extension blocks); best of the rounds.", ""]
    out += _table(["reader", "µs per event"], [[name, f"{value:.2f}"] for name, value in us.items()], markdown)
    calls = readers.get("per_call")
    if calls:  # {records per buffer: {reader: µs per call}} (the keys are text once in JSON)
        sizes = sorted(calls, key=int)
        out += ["", "Per call on buffers of a few records (what a storm's readinto hands a reader) up to 1,000, of "
                "the kinds the bpf source writes: CPU µs per call (per record).", ""]
        out += _table(["reader"] + [f"{int(n):,} record{'' if int(n) == 1 else 's'}" for n in sizes],
                      [[name] + [f"{calls[n][name]:.1f} ({calls[n][name] / int(n):.2f})" for n in sizes]
                       for name in calls[sizes[0]]], markdown)
    return out


#: Each benchmark's section: its key in the results, its title, and what it shows when it ran.
_SECTIONS: list[tuple[str, str, Callable[[dict, dict, bool], list[str]]]] = [
    ("readers", "Readers: CPU µs per event of parse, parse_array and tail's text and JSON forms", _readers),
    ("ring", "Ring: EventRing vs the book's list (naive deque port) vs the copy ceiling", _ring),
    ("rules", "Rules: a Sysmon configuration of ~500 rules, per event", _rules),
    ("storms", "Storms: kernel to readinto, one monitor at a time", _storms),
    ("cost", "Exec-storm cost: the storm's own rate while a monitor watches", _cost),
    ("perftest", "Perftest: /bin/true exec'd at a fixed rate, each monitor's CPU", _perftest),
    ("memory", "Memory: etwmon RSS during a storm", _memory),
    ("service", "Service: one Monitor through the Unix socket vs read in-process", _service),
    ("identity", "Identity stage: CPU per event with it on vs off, per source", _identity),
    ("imageload", "Image loads (bpf, opt-in): CPU per image load, and the exec storm with them on vs off",
     _imageload),
    ("fleet", "Fleet: one host through a local nats-server (JetStream, file storage) to a consumer", _fleet),
]


def sections(results: dict, markdown: bool) -> list[str]:
    """The report body, as terminal text or as markdown."""
    h = (lambda t: f"## {t}\n") if markdown else (lambda t: f"\n== {t} ==")
    out: list[str] = []
    b = results["benchmarks"]

    for key, title, body in _SECTIONS:
        bench = b.get(key)
        if not bench:
            continue
        out += ["", h(title)]
        if bench["status"] != "ok" and key != "memory":  # memory says the status of each of its runs itself
            out.append(_status_line(bench))
        else:
            out += body(bench, results, markdown)

    out += _recording_section(b.get("recording"), h, stat, markdown)

    out += ["", h("Targets (goals to report against, not test assertions)")]
    rows = [[t["result"], t["benchmark"], t["name"], _target_value(t["value"], t["unit"]),
             ("≥ " if t["op"] == ">=" else "≤ ") + _target_value(t["goal"], t["unit"])]
            for t in results["targets"]]
    out += _table(["", "benchmark", "target", "measured", "goal"], rows, markdown) if rows else ["(none measured)"]
    if markdown and any(t["result"] == "MISS" for t in results["targets"]):
        out += ["", "What limits the figures that miss: [README.md, where it misses](README.md#where-it-misses)."]
    return out

def _target_value(value, unit):
    if value is None:
        return "–"
    if unit == "records/s":
        return f"{value / 1e6:.2f} M records/s"
    if unit == "x":
        return f"{value:.2f} x"
    return f"{value:.2f} {unit}"


def _status_line(bench: dict) -> str:
    return f"{bench['status'].upper()}: {bench.get('reason') or bench.get('error') or ''}"


def _skipped(bench: dict, markdown: bool) -> list[str]:
    bullet = "- " if markdown else ""
    lines = [f"{bullet}skipped {name}: {why}" for name, why in sorted(bench.get("skipped_tools", {}).items())]
    lines += [f"{bullet}not run: {what}: {why}" for what, why in sorted(bench.get("not_scored", {}).items())]
    return lines + ([""] if lines else [])


def _recording_section(rec: dict | None, h, stat, markdown: bool) -> list[str]:
    if not rec:
        return []
    out = ["", h("Recording: what 'etwmon record' adds per event over 'etwmon tail', and what a file weighs")]
    if rec["status"] != "ok":
        return out + [_status_line(rec)]
    p = rec["params"]
    out += _para(f"{p['events']:,} records of {p['processes']:,} processes (fork, exec, exit with every detail), in "
                 f"{p['batch_bytes'] // 1024} KiB readinto batches; CPU time per event, median [min–max] of "
                 f"{p['repeats']} repeats; the source's own cost (the same under both) left out.")
    out += _table(["reader", "µs per event", "added over tail"], [
        ["tail (parse + text)", stat(rec["tail_us"], 2), ""],
        ["record everything", stat(rec["record_all_us"], 2), stat(rec["added_all_us"], 2)],
        ["record a command's tree (all records in it)", stat(rec["record_tree_us"], 2), stat(rec["added_tree_us"], 2)],
    ], markdown)
    out.append("")
    out.append(f"File: {rec['file_bytes_per_1000_events'] / 1024:.1f} KiB per 1,000 events (wire format "
               f"{rec['wire_bytes_per_1000_events'] / 1024:.1f} KiB; zlib {rec['compression_ratio']:.1f} x).")
    r = rec.get("report") or {}
    if r:
        browser = (f"Chromium: tree drawn {r['drawn_s']:.2f} s after navigation began ({r['rows_in_dom']} rows in the "
                   f"DOM; {r['load_s']:.2f} s with the tab's set-up), "
                   f"a search over all of it {r['search_s']:.2f} s, {len(r['requests']) - 1} requests besides the page"
                   if "load_s" in r else str(r.get("browser")))
        out.append(f"Report of {r['processes']:,} processes: recording {r['recording_bytes'] / 2**20:.1f} MiB, "
                   f"generated in {r['generation_s']:.1f} s, page {r['page_bytes'] / 2**20:.1f} MiB; {browser}.")
    return out


def terminal(results: dict) -> str:
    lines = [f"etwmon benchmarks ({results['mode']})"] + _header(results, markdown=False)
    return "\n".join(lines + sections(results, markdown=False)) + "\n"


def markdown(results: dict, plots: list[str]) -> str:
    lines = ["# etwmon benchmark results", "",
             "Written by `python benchmarks/run.py --write-results` (the full run). Every ratio compares figures "
             "measured in the same run; figures are median [min–max] over repeats. Machines are noisy: this one is "
             "shared, so read the ratios, not the absolute numbers.", ""]
    lines += _header(results, markdown=True)
    lines += sections(results, markdown=True)
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    lines += ["", "## How it is measured", "", *_METHOD]
    return "\n".join(lines) + "\n"


_METHOD = [
    "- **Fleet**: a child process runs a Monitor over a source that pushes ThreadCreate records stamped with "
    "the time they are pushed (at 50 k/s, this machine's unthrottled thread storm, or as fast as it can), shipped "
    "by `etwmon.fleet.Shipper` to a nats-server on loopback (JetStream, file storage); this process reads them "
    "with a `FleetConsumer`. Missing = pushed minus received (ring drops and gaps included); records/s over the "
    "consumer's first to last read. As root, the storm trial ships the live netlink source while the thread storm "
    "runs unthrottled; captured = the ThreadCreate/ThreadExit events of the tids the generator made that reached "
    "the consumer.",
    "- **Ring**: one process, the same encoded records (ProcessCreate with ~50-character command lines "
    "alternating with ProcessExit) pushed one per call into `EventRing` and into a naive port of the book's "
    "list (a `collections.deque` under a lock, count cap dropping the oldest, and a `readinto` that pops records "
    "one by one, copies each that fits and pushes the first that does not back at the head). Each is drained "
    "with the same bytearray; the ceiling is plain slice copies of the same volume out of a large numpy array "
    "into that buffer. The garbage collector is off during every timed section.",
    "- **Service**: a synthetic source pushes the ring benchmark's records as fast as it can into a Monitor; the "
    "baseline reads that Monitor in the same process with 64 KiB `readinto`, the socket cases run `etwmon`'s "
    "Server in a process of its own and 1 or 4 client processes reading with `etwmon.connect().readinto` "
    "(64 KiB). Time runs from the first push to the last record at the (slowest) client; caps are above the "
    "volume, so nothing is dropped (a run that drops is an error). Latency: one 24-byte record every few ms "
    "stamped with CLOCK_MONOTONIC at its push, measured at the reader; the socket's addition is the difference "
    "of the percentiles.",
    "- **Storms**: generators in C (`benchmarks/generators/`, built with gcc at run time) fork+exec "
    "`/bin/true storm-<i>`, fork children that exit at once, or pthread_create+join threads that exit at "
    "once, paced to a rate (unthrottled = the machine's maximum). Each prints the pids/tids it made: the "
    "ground truth. One monitor runs at a time, as its own process: etwmon (a `Monitor` on the named source, "
    "drained by a thread calling `wait()` and `readinto` into 1 MiB, keeping the bytes), forkstat (its text "
    "output to a file) and pyroute2's `ProcEventSocket` (a thread calling `get()`, keeping three fields per "
    "message). Captured = create/exec/exit events whose pid/tid the generator made; command line right = the "
    "exec event for pid *p* carries exactly `/bin/true storm-<i>` for the *i* that made *p*.",
    "- **CPU** is the same for every monitor: the CPU time of its whole process (all its threads), read from its "
    "CPU-time clock to the nanosecond (`clock_gettime` on the clock id of its pid; `/proc/<pid>/stat`'s "
    "utime+stime, in 10 ms ticks, where that clock cannot be read) from just before the storm until it has gone "
    "idle after it (it has caught up), divided by the events it delivered. Parsing and scoring happen after that "
    "measurement.",
    "- **Latency** (etwmon only): for each record, the time `readinto` returned minus the record's Time "
    "(the kernel's timestamp as FILETIME).",
    "- **Read paths** (storms at full rate): etwmon-bpf is also run as a program that calls `parse` on every "
    "buffer `readinto` filled (reading each event's type and time), one that calls `parse_array` (when etwmon "
    "has it), and as `etwmon tail --json` writing to a file (each its own process, CPU measured as above); each "
    "ratio divides its CPU per event by forkstat's or bpftrace's in the same round (the tools run interleaved).",
    "- **Perftest**: the exec storm generator (`/bin/true storm-<i>`, one at a time) paced to a fixed rate "
    "(SysmonForLinux's perftest: 1,600/s; 60 % of the unwatched maximum when that is lower) for 30 s; CPU % of one "
    "core = the monitor's CPU time over the run's wall time; µs per exec = the same CPU / execs (the rest of "
    "the machine's events, which the monitor also delivered, are paid for in it: the table shows how many).",
    "- **Cost**: the exec storm unthrottled with no monitor, then with each monitor, per round; ratio = rate "
    "with monitor / rate without in the same round.",
    "- **Memory**: etwmon's RSS (`VmRSS`) every second while the thread and exec storms run unthrottled; the "
    "reader stops reading halfway so the ring fills to its caps; drops are counted and reported in the stream.",
]


def plots(results: dict, directory: Path) -> list[Path]:
    """captured % vs storm rate per tool, and readinto MB/s vs buffer size; the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    storms = results["benchmarks"].get("storms")
    if storms and storms.get("status") == "ok":
        kinds = [k for k in ("threads", "fork", "exec") if any(r["kind"] == k for r in storms["summary"])]
        fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
        order = ["etwmon-netlink", "etwmon-linux", "etwmon-audit", "forkstat", "pyroute2"]
        every = sorted({r["tool"] for r in storms["summary"]}, key=lambda t: (order.index(t) if t in order else 99, t))
        colors = {tool: f"C{i}" for i, tool in enumerate(every)}  # one colour per tool in every panel
        for ax, kind in zip(axes[0], kinds):
            tools = [t for t in every if any(r["kind"] == kind and r["tool"] == t for r in storms["summary"])]
            for tool in tools:
                rows = sorted((r for r in storms["summary"] if r["kind"] == kind and r["tool"] == tool
                               and r["events_per_s"] and r["captured_pct"]), key=lambda r: r["level"])
                if rows:
                    ax.plot([r["events_per_s"]["median"] / 1000 for r in rows],
                            [r["captured_pct"]["median"] for r in rows], marker="o", label=tool, color=colors[tool])
            ax.set_title(f"{kind} storm")
            ax.set_xlabel("storm rate (k events/s)")
            ax.set_ylabel("captured %")
            ax.set_ylim(0, 105)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / "storm_capture.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    ring = results["benchmarks"].get("ring")
    if ring and ring.get("status") == "ok":
        fig, ax = plt.subplots(figsize=(6, 4))
        sizes = [r["buffer"] / 1024 for r in ring["readinto"]]
        for key, label in (("ring_MBps", "EventRing.readinto"), ("naive_MBps", "naive list (deque port)"),
                           ("ceiling_MBps", "copy ceiling (slice copies)")):
            ax.plot(sizes, [r[key]["median"] for r in ring["readinto"]], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes)
        ax.set_xticklabels([r["buffer_name"] for r in ring["readinto"]])
        ax.set_xlabel("readinto buffer size")
        ax.set_ylabel("MB/s")
        ax.set_title("readinto throughput")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = directory / "ring_readinto.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
