"""Kernel-to-readinto storms: C generators make processes or threads at set rates while one monitor at a time
watches; each monitor is scored against the pids/tids the generator says it made. Also the exec-storm cost
benchmark: how much slower the storm runs while each monitor watches it."""

from __future__ import annotations

import math
import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common import HERE, cpu_seconds, progress, summary, target
from peers import Observed, Tool

GENERATORS = HERE / "generators"
#: The kernel events each generated item makes, and the capability (``Source.delivers``) a monitor needs to
#: report each: fork+exec+exit of a process, fork+exit, clone+exit of a thread.
EXPECTED = {
    "threads": {"create": "thread_create", "exit": "thread_exit"},
    "fork": {"create": "process_create", "exit": "process_exit"},
    "exec": {"create": "process_create", "exec": "process_exec", "exit": "process_exit"},
}
EVENTS_PER_ITEM = {kind: len(events) for kind, events in EXPECTED.items()}
KINDS = ("threads", "fork", "exec")


def scored_events(kind: str, tool: Tool) -> list[str]:
    """The events of a storm kind a monitor claims to deliver (the only ones it is scored on)."""
    return [event for event, capability in EXPECTED[kind].items() if capability in tool.delivers]


def build_generators(build_dir: Path) -> dict[str, Path]:
    """Compile the storm generators with gcc into ``build_dir``."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise RuntimeError("no C compiler (gcc) to build the storm generators: apt-get install gcc")
    build_dir.mkdir(parents=True, exist_ok=True)
    exes = {}
    for kind in KINDS:
        src, exe = GENERATORS / f"storm_{kind}.c", build_dir / f"storm_{kind}"
        out = subprocess.run([gcc, "-O2", "-Wall", "-pthread", "-o", str(exe), str(src)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"gcc failed on {src.name}: {out.stderr.strip()}")
        exes[kind] = exe
    return exes


@dataclass
class Storm:
    """What a generator run made: the ground truth a monitor is scored against."""

    kind: str
    items: int
    failed: int
    seconds: float
    ids: list[int]

    @property
    def events(self) -> int:
        return self.items * EVENTS_PER_ITEM[self.kind]

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0


def run_storm(exe: Path, kind: str, items: int, rate: float, seconds: float | None = None,
              timeout: float = 300) -> Storm:
    """Run a generator: ``items`` processes/threads at ``rate`` items/s (0 = unthrottled)."""
    argv = [str(exe), str(items), f"{rate:.3f}"] + ([f"{seconds:.3f}"] if seconds else [])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{exe.name} failed ({out.returncode}): {out.stderr.strip()}")
    lines = out.stdout.splitlines()
    head = lines[0].split()
    fields = dict(zip(head[::2], head[1::2]))
    return Storm(kind=kind, items=int(fields["items"]), failed=int(fields["failed"]),
                 seconds=int(fields["elapsed_ns"]) / 1e9, ids=[int(x) for x in lines[1:]])


def score(storm: Storm, seen: Observed, events: list[str], command_lines: bool) -> dict:
    """Events a monitor caught of those the storm made (``events``: the kinds it is scored on; pids/tids
    reused within a storm count each time), and for exec storms the command lines it got exactly right for
    the right pid."""
    ids = Counter(storm.ids)
    reported = {"create": Counter(seen.create), "exit": Counter(seen.exit),
                "exec": Counter(pid for pid, _ in seen.exec)}
    result = {}
    for event in events:
        result[f"captured_{event}"] = sum(min(n, c) for n, c in _overlap(ids, reported[event]))
    result["captured"] = sum(result.values())
    result["expected"] = storm.items * len(events)
    if storm.kind == "exec" and "exec" in events and command_lines:
        # storm_exec runs child i as `/bin/true storm-<i>`; ids are in creation order.
        expected = Counter((pid, ("/bin/true", f"storm-{i}")) for i, pid in enumerate(storm.ids))
        got = Counter((pid, argv) for pid, argv in seen.exec if argv is not None)
        result["cmdline_right"] = sum(min(n, c) for n, c in _overlap(expected, got))
    return result


def _overlap(expected: Counter, seen: Counter):
    for key, n in expected.items():
        c = seen.get(key, 0)
        if c:
            yield n, c


def run_trial(tool: Tool, exe: Path, kind: str, items: int, rate: float) -> dict:
    """One monitor watching one storm: start it, storm, let it catch up, measure its CPU, stop, score."""
    tool.start()
    try:
        cpu0 = tool.cpu_start
        storm = run_storm(exe, kind, items, rate)
        caught_up = tool.caught_up()
        cpu1 = cpu_seconds(tool.pid)
        died = not tool.alive()
        seen = tool.stop()
    except BaseException:
        tool.kill()
        raise
    events = scored_events(kind, tool)
    trial = {"tool": tool.name, "kind": kind, "target_items_per_s": rate or None,
             "items": storm.items, "events": storm.events, "seconds": storm.seconds,
             "events_per_s": storm.events_per_s, "generator_failed": storm.failed, "scored_on": events}
    trial.update(score(storm, seen, events, "command_line" in tool.delivers))
    trial["captured_pct"] = 100.0 * trial["captured"] / trial["expected"] if trial["expected"] else None
    if kind == "exec" and trial.get("cmdline_right") is not None:
        trial["cmdline_right_pct"] = 100.0 * trial["cmdline_right"] / storm.items
    cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None
    trial["cpu_s"] = cpu
    # From subscribing to stopping, the monitor handled the storm and whatever else the machine did: CPU is
    # divided by all the events it delivered in that time, in ms per 1000 events (= µs per event).
    trial["delivered"] = seen.delivered
    trial["cpu_ms_per_1000_events"] = 1e6 * cpu / seen.delivered if cpu and seen.delivered else None
    trial["caught_up"] = caught_up
    trial["lost_reported"] = seen.lost_reported
    trial["latency_us"] = seen.latency_us
    trial["error"] = seen.error or ("the monitor process died during the storm" if died else None)
    trial["extra"] = seen.extra
    return trial


def _trial_line(t: dict) -> str:
    parts = [f"{t['tool']:<15} {t['kind']:<7} {t['events_per_s'] / 1000:7.1f} k ev/s",
             f"captured {t['captured_pct']:6.2f}%"]
    if t.get("cmdline_right_pct") is not None:
        parts.append(f"cmdline {t['cmdline_right_pct']:5.1f}%")
    if t.get("cpu_ms_per_1000_events") is not None:
        parts.append(f"cpu {t['cpu_ms_per_1000_events']:.1f} ms/1k ev")
    if t.get("latency_us"):
        parts.append(f"p99 {t['latency_us']['p99'] / 1000:.2f} ms")
    if t.get("error"):
        parts.append(f"ERROR {t['error']}")
    return "  ".join(parts)


def measure_max_rates(exes: dict[str, Path], seconds: float, repeats: int = 2) -> dict[str, float]:
    """Each generator unthrottled with no monitor watching: the machine's maximum items/s (best of runs)."""
    rates = {}
    for kind in KINDS:
        probe = run_storm(exes[kind], kind, 0, 0, seconds=seconds / 2)  # sizes the timed runs below
        runs = [run_storm(exes[kind], kind, max(100, int(probe.items_per_s * seconds)), 0)
                for _ in range(repeats)]
        rates[kind] = max(r.items_per_s for r in runs)
        progress(f"storms: {kind} storm unthrottled, no monitor: {rates[kind]:,.0f} items/s "
                 f"({rates[kind] * EVENTS_PER_ITEM[kind]:,.0f} events/s)")
    return rates


def run_storms(tools: list[Tool], exes: dict[str, Path], max_rates: dict[str, float], quick: bool) -> dict:
    """Every tool against every storm kind at rising rates up to unthrottled, one tool at a time."""
    seconds = 0.5 if quick else 2.0
    # Fractions of the machine's maximum; 1.0 means unthrottled (rate 0 to the generator).
    levels = {kind: ([0.5, 1.0] if kind == "threads" else [1.0]) for kind in KINDS} if quick else \
        {kind: [0.1, 0.3, 0.6, 1.0] for kind in KINDS}
    repeats_at_max = 1 if quick else 3
    # The read-path variants (full_rate_only tools): every storm; the quick run only the exec storm's (CI's time).
    path_kinds = ("exec",) if quick else KINDS
    trials = []
    not_scored = {}
    for kind in KINDS:
        for tool in tools:
            if not scored_events(kind, tool):
                not_scored[f"{tool.name} in the {kind} storm"] = ("it delivers none of its events (delivers: "
                                                                  f"{', '.join(sorted(tool.delivers))})")
    for kind in KINDS:
        watchers = [tool for tool in tools if scored_events(kind, tool)]
        for level in levels[kind]:
            rate = max_rates[kind] * level
            items = max(50, math.ceil(rate * seconds))
            for rep in range(repeats_at_max if level == 1.0 else 1):
                for tool in watchers:  # interleaved, so drifting background load hits every tool alike
                    if getattr(tool, "full_rate_only", False) and (level != 1.0 or kind not in path_kinds):
                        continue
                    try:
                        trial = run_trial(tool, exes[kind], kind, items, 0 if level == 1.0 else rate)
                    except Exception as exc:
                        trial = {"tool": tool.name, "kind": kind, "target_items_per_s": rate, "error":
                                 f"{type(exc).__name__}: {exc}", "captured_pct": None, "events_per_s": None}
                        progress(f"storms: {tool.name} {kind} failed to run: {exc}")
                    else:
                        progress("storms: " + _trial_line(trial))
                    trial["level"] = level
                    trial["repeat"] = rep
                    trials.append(trial)
    return {"params": {"seconds_per_storm": seconds, "levels": levels, "repeats_at_max": repeats_at_max,
                       "max_items_per_s": max_rates, "read_paths_in": list(path_kinds)},
            "not_scored": not_scored, "crashes": first_crashes(trials), "trials": trials,
            "summary": summarize_storms(trials), "paths": path_ratios(trials)}


def first_crashes(trials: list[dict]) -> list[dict]:
    """For each monitor that failed while watching, the slowest storm of each kind where it did."""
    crashes: dict[tuple[str, str], dict] = {}
    for t in trials:
        if not t.get("error"):
            continue
        key = (t["tool"], t["kind"])
        if key not in crashes or t["level"] < crashes[key]["level"]:
            crashes[key] = {"tool": t["tool"], "kind": t["kind"], "level": t["level"],
                            "events_per_s": t.get("events_per_s"), "error": t["error"]}
    return sorted(crashes.values(), key=lambda c: (c["tool"], c["kind"]))


def summarize_storms(trials: list[dict]) -> list[dict]:
    """Per tool, storm kind and rate level: min/median/max of each figure over the repeats."""
    groups: dict[tuple, list[dict]] = {}
    for t in trials:
        groups.setdefault((t["kind"], t["level"], t["tool"]), []).append(t)
    rows = []
    for (kind, level, tool), ts in groups.items():
        ok = [t for t in ts if t.get("captured_pct") is not None]
        errors = sorted({t["error"] for t in ts if t.get("error")})
        if any(t.get("caught_up") is False for t in ts):
            errors.append("still busy 15 s after the storm ended")
        rows.append({
            "kind": kind, "level": level, "tool": tool, "runs": len(ts),
            "events_per_s": summary(t["events_per_s"] for t in ok),
            "captured_pct": summary(t["captured_pct"] for t in ok),
            "cmdline_right_pct": summary(t.get("cmdline_right_pct") for t in ok),
            "cpu_ms_per_1000_events": summary(t.get("cpu_ms_per_1000_events") for t in ok),
            "latency_p50_ms": summary((t["latency_us"]["p50"] / 1000) for t in ok if t.get("latency_us")),
            "latency_p99_ms": summary((t["latency_us"]["p99"] / 1000) for t in ok if t.get("latency_us")),
            "lost_reported": summary(t.get("lost_reported") for t in ok),
            "errors": errors,
        })
    return rows


#: CPU per event of a source vs forkstat's at full rate, at most. The kernel-side bpf source is held to more: its
#: CPU goals are per read path and peer (PATH_GOALS), its latency goals per rate level (BPF_LATENCY_GOALS_MS).
CPU_GOAL_VS_FORKSTAT = 2.0
LATENCY_GOAL_MS = {"etwmon-bpf": 20.0}
EXACT_COMMAND_LINES = {"etwmon-bpf"}
#: The bpf source's p99 kernel → readinto goal at rates up to this fraction of the maximum, and at the maximum.
BPF_LATENCY_GOALS_MS = ((0.6, 2.0), (1.0, 20.0))

#: The ways of reading a source that the storms compare at full rate (tool name suffix → label), and the peers.
PATHS = (("", "readinto"), (" parse", "parse"), (" parse_array", "parse_array"), (" tail --json", "tail --json"))
PEERS = ("forkstat", "bpftrace")
#: CPU per event of a read path of etwmon-bpf ÷ a peer's, at most (absent: reported without a goal).
PATH_GOALS = {("readinto", "forkstat"): 0.5, ("readinto", "bpftrace"): 1.0, ("parse", "forkstat"): 1.0,
              ("tail --json", "forkstat"): 1.0}
PATH_SOURCE = "etwmon-bpf"


def path_ratios(trials: list[dict], source: str = PATH_SOURCE) -> list[dict]:
    """Per storm kind and read path of ``source``: CPU per 1000 events at full rate, and its ratio to each peer's,
    each ratio taken within one round (the tools run interleaved) and summarized over the rounds."""
    full = {}
    for t in trials:
        if t.get("level") == 1.0 and t.get("cpu_ms_per_1000_events"):
            full[(t["kind"], t["tool"], t["repeat"])] = t["cpu_ms_per_1000_events"]
    rows = []
    for kind in KINDS:
        for suffix, path in PATHS:
            tool = source + suffix
            rounds = sorted(r for k, name, r in full if k == kind and name == tool)
            if not rounds and not any(t.get("kind") == kind and t.get("tool") == tool for t in trials):
                continue
            row = {"kind": kind, "path": path, "tool": tool,
                   "cpu_ms_per_1000_events": summary(full[(kind, tool, r)] for r in rounds),
                   "errors": sorted({t["error"] for t in trials
                                     if t.get("kind") == kind and t.get("tool") == tool and t.get("error")})}
            for peer in PEERS:
                row[f"peer_{peer}"] = summary(full.get((kind, peer, r)) for r in rounds)
                row[f"vs_{peer}"] = summary(full[(kind, tool, r)] / full[(kind, peer, r)] for r in rounds
                                            if (kind, peer, r) in full)
            rows.append(row)
    return rows


def path_targets(paths: list[dict]) -> list[dict]:
    targets = []
    for row in paths:
        for peer in PEERS:
            goal = PATH_GOALS.get((row["path"], peer))
            if goal is None:
                continue
            ratio = row[f"vs_{peer}"]["median"] if row[f"vs_{peer}"] else None
            targets.append(target("storms", f"{row['tool']}: CPU per event vs {peer}, {row['kind']} storm at full "
                                  "rate (median of the rounds' ratios)", ratio, goal, "x", higher_is_better=False))
    return targets


def storm_targets(result: dict) -> list[dict]:
    """The storm goals: no loss in the full thread storm, CPU per event against forkstat's, p99 latency."""
    rows = {(r["kind"], r["level"], r["tool"]): r for r in result["summary"]}
    targets = []

    def med(row, key):
        return row[key]["median"] if row and row.get(key) else None

    # one per source (its read-path variants, "etwmon-bpf parse", are scored by path_targets)
    etwmon_tools = sorted({tool for _, _, tool in rows if tool.startswith("etwmon-") and " " not in tool})
    for tool in etwmon_tools:
        row = rows.get(("threads", 1.0, tool))
        if row:
            lowest = row["captured_pct"]["min"] if row.get("captured_pct") else None
            targets.append(target("storms", f"{tool}: captured, thread storm at full rate (worst run)",
                                  lowest, 100.0, "%"))
        kinds = [kind for kind in KINDS if (kind, 1.0, tool) in rows]
        for kind in kinds if tool != PATH_SOURCE else ():  # the bpf source's CPU goals: path_targets
            own = med(rows.get((kind, 1.0, tool)), "cpu_ms_per_1000_events")
            peer = med(rows.get((kind, 1.0, "forkstat")), "cpu_ms_per_1000_events")
            ratio = own / peer if own and peer else None
            targets.append(target("storms", f"{tool}: CPU per event vs forkstat, {kind} storm at full rate",
                                  ratio, CPU_GOAL_VS_FORKSTAT, "x", higher_is_better=False))
        for kind in kinds:
            row = rows.get((kind, 1.0, tool))
            p99 = row["latency_p99_ms"]["max"] if row and row.get("latency_p99_ms") else None
            targets.append(target("storms", f"{tool}: p99 latency, {kind} storm at full rate (worst run)",
                                  p99, LATENCY_GOAL_MS.get(tool, 5.0), "ms", higher_is_better=False))
        if tool == PATH_SOURCE:
            targets += _bpf_latency_below_max(rows, tool)
        row = rows.get(("exec", 1.0, tool))
        if tool in EXACT_COMMAND_LINES and row and row.get("cmdline_right_pct"):
            targets.append(target("storms", f"{tool}: exec command lines exact, exec storm at full rate (worst run)",
                                  row["cmdline_right_pct"]["min"], 100.0, "%"))
        for kind in kinds if tool in EXACT_COMMAND_LINES else ():
            if kind == "threads":
                continue  # above
            row = rows[(kind, 1.0, tool)]
            targets.append(target("storms", f"{tool}: captured, {kind} storm at full rate (worst run)",
                                  row["captured_pct"]["min"] if row.get("captured_pct") else None, 100.0, "%"))
    return targets + path_targets(result.get("paths", []))


def _bpf_latency_below_max(rows: dict, tool: str) -> list[dict]:
    """The bpf source's p99 goal at rates up to 0.6 of the maximum: the worst run of every level up to it."""
    limit, goal = BPF_LATENCY_GOALS_MS[0]
    targets = []
    for kind in KINDS:
        levels = [r for (k, level, name), r in rows.items() if k == kind and name == tool and level <= limit]
        p99 = [r["latency_p99_ms"]["max"] for r in levels if r.get("latency_p99_ms")]
        if levels:
            top = max(r["level"] for r in levels)
            targets.append(target("storms", f"{tool}: p99 latency, {kind} storm up to {top:g} of max (worst run)",
                                  max(p99) if p99 else None, goal, "ms", higher_is_better=False))
    return targets


# --- exec-storm cost ---------------------------------------------------------------------------------------


def run_cost(tools: list[Tool], exe: Path, max_rate: float, quick: bool) -> dict:
    """The exec storm's own rate while each monitor watches, against a no-monitor run just before it (pairs
    next to each other in time, so background load changes between pairs cancel out)."""
    seconds = 1.0 if quick else 2.0
    rounds = 1 if quick else 5
    items = max(100, int(max_rate * seconds))
    watchers = [tool for tool in tools if scored_events("exec", tool)]
    runs = []
    for rnd in range(rounds):
        progress(f"cost: round {rnd + 1}/{rounds}")
        for tool in watchers:
            baseline = run_storm(exe, "exec", items, 0)
            runs.append({"round": rnd, "tool": "none", "items_per_s": baseline.items_per_s})
            try:
                trial = run_trial(tool, exe, "exec", items, 0)
            except Exception as exc:
                runs.append({"round": rnd, "tool": tool.name, "error": f"{type(exc).__name__}: {exc}"})
                progress(f"cost: {tool.name} failed to run: {exc}")
                continue
            rate = trial["items"] / trial["seconds"]
            ratio = rate / baseline.items_per_s
            runs.append({"round": rnd, "tool": tool.name, "items_per_s": rate, "baseline_items_per_s":
                         baseline.items_per_s, "ratio": ratio, "slowdown_pct": 100 * (1 - ratio),
                         "cmdline_right_pct": trial.get("cmdline_right_pct"), "captured_pct": trial["captured_pct"],
                         "error": trial.get("error")})
            progress(f"cost: {tool.name:<15} {rate:,.0f} execs/s vs {baseline.items_per_s:,.0f} with no monitor "
                     f"just before: {100 * ratio:5.1f}%" + (f", cmdline right {trial['cmdline_right_pct']:.1f}%"
                                                             if trial.get("cmdline_right_pct") is not None else ""))
    rows = []
    for name in ["none"] + [t.name for t in watchers]:
        mine = [r for r in runs if r["tool"] == name and "items_per_s" in r]
        rows.append({"tool": name, "items_per_s": summary(r["items_per_s"] for r in mine),
                     "ratio": summary(r.get("ratio") for r in mine),
                     "slowdown_pct": summary(r.get("slowdown_pct") for r in mine),
                     "cmdline_right_pct": summary(r.get("cmdline_right_pct") for r in mine),
                     "errors": sorted({r["error"] for r in runs if r["tool"] == name and r.get("error")})})
    targets = []
    forkstat = next((r for r in rows if r["tool"] == "forkstat"), None)
    forkstat_slowdown = forkstat["slowdown_pct"]["median"] if forkstat and forkstat["slowdown_pct"] else None
    for row in rows:
        if row["tool"].startswith("etwmon-"):
            value = row["slowdown_pct"]["median"] if row["slowdown_pct"] else None
            targets.append(target("cost", f"{row['tool']}: exec storm slowdown while watching", value, 20.0, "%",
                                  higher_is_better=False))
            if row["tool"] == "etwmon-bpf" and forkstat_slowdown is not None:
                # the bpf source's own goal: no more than forkstat's slowdown in the same rounds
                targets.append(target("cost", "etwmon-bpf: exec storm slowdown vs forkstat's (same rounds)", value,
                                      max(forkstat_slowdown, 0.0), "%", higher_is_better=False))
    return {"status": "ok", "params": {"items": items, "rounds": rounds}, "runs": runs, "rows": rows,
            "targets": targets}
