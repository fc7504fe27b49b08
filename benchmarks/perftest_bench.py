"""The perftest row: ``/bin/true`` fork+exec'd at a fixed rate (SysmonForLinux's perftest runs 1,600/s), one
monitor at a time watching; each monitor's CPU as % of one core and µs per exec (its fork, exec and exit events
together). The pacing is the exec storm generator's (C, clock_nanosleep to a schedule), so it costs the machine
next to nothing itself."""

from __future__ import annotations

from pathlib import Path

from common import progress, target
from peers import Tool
from storm_bench import run_trial

#: SysmonForLinux's perftest rate.
PERFTEST_RATE = 1600.0
#: Below that, the rate this machine sustains unwatched times this.
SUSTAINED_FRACTION = 0.6
#: µs of the Monitor's CPU per exec (fork + exec + exit), at most.
GOAL_US_PER_EXEC = 40.0
#: A longer window for the bpf source's kernel pacer (its batch_wait; 1 ms by default): what the Monitor costs when
#: records may wait that long, since waking the reader is most of a delivery's cost at this rate.
LONGER_WINDOW = 0.005
#: The monitors the row compares: etwmon's Monitor (readinto only; also with the longer window) and ``tail --json``
#: on the bpf source, the peers.
TOOLS = ("etwmon-bpf", f"etwmon-bpf batch_wait={LONGER_WINDOW * 1000:g}ms", "etwmon-bpf tail --json", "forkstat",
         "bpftrace")


def pick_rate(max_exec_rate: float) -> tuple[float, str]:
    """The rate to run at and why: the perftest's, or 60 % of this machine's unwatched maximum when lower."""
    sustained = SUSTAINED_FRACTION * max_exec_rate
    if sustained < PERFTEST_RATE:
        return sustained, (f"{SUSTAINED_FRACTION:.0%} of the {max_exec_rate:,.0f} execs/s this machine sustains "
                           f"unwatched (lower than the perftest's {PERFTEST_RATE:,.0f}/s)")
    return PERFTEST_RATE, (f"{PERFTEST_RATE:,.0f}/s as SysmonForLinux's perftest (this machine sustains "
                           f"{max_exec_rate:,.0f}/s unwatched)")


def run(tools: list[Tool], exe: Path, max_exec_rate: float, quick: bool, skipped: dict[str, str]) -> dict:
    """Each of TOOLS that runs here watches the paced exec run once (2 s with ``quick``, else 30 s)."""
    seconds = 2.0 if quick else 30.0
    rate, why = pick_rate(max_exec_rate)
    items = max(50, int(rate * seconds))
    by_name = {tool.name: tool for tool in tools}
    rows, not_run = [], {}
    for name in TOOLS:
        tool = by_name.get(name)
        if tool is None:
            not_run[name] = skipped.get(name) or skipped.get(name.split()[0]) or "not among the tools that run here"
            continue
        progress(f"perftest: {name} watching /bin/true at {rate:,.0f}/s for {seconds:g} s")
        try:
            trial = run_trial(tool, exe, "exec", items, rate)
        except Exception as exc:
            rows.append({"tool": name, "error": f"{type(exc).__name__}: {exc}"})
            progress(f"perftest: {name} failed to run: {exc}")
            continue
        cpu = trial["cpu_s"]
        row = {"tool": name, "execs": trial["items"], "seconds": trial["seconds"],
               "execs_per_s": trial["items"] / trial["seconds"] if trial["seconds"] else None,
               "cpu_s": cpu, "rate_kept": trial["items"] >= 0.9 * rate * trial["seconds"], "cpu_pct_of_core": 100.0 * cpu / trial["seconds"] if cpu is not None else None,
               "us_per_exec": 1e6 * cpu / trial["items"] if cpu is not None and trial["items"] else None,
               # what it delivered, the rest of the machine's events included (its CPU paid for those too)
               "events_delivered": trial["delivered"], "events_made": trial["events"],
               "captured_pct": trial["captured_pct"], "cmdline_right_pct": trial.get("cmdline_right_pct"),
               "lost_reported": trial.get("lost_reported"), "error": trial.get("error")}
        rows.append(row)
        progress(f"perftest: {name:<22} {row['execs_per_s'] or 0:,.0f} execs/s, CPU {row['cpu_pct_of_core'] or 0:.1f}% "
                 f"of a core, {row['us_per_exec'] or 0:.1f} µs per exec, captured {row['captured_pct'] or 0:.2f}%")
    monitor = next((r for r in rows if r["tool"] == "etwmon-bpf"), None)
    targets = [target("perftest", "etwmon-bpf: Monitor CPU per exec (fork + exec + exit) at the perftest rate",
                      monitor.get("us_per_exec") if monitor else None, GOAL_US_PER_EXEC, "µs",
                      higher_is_better=False)] if monitor else []
    return {"status": "ok", "params": {"rate": rate, "rate_reason": why, "seconds": seconds, "execs": items,
                                       "max_exec_rate_unwatched": max_exec_rate},
            "rows": rows, "not_run": not_run, "targets": targets}
