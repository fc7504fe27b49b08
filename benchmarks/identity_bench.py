"""What the identity stage costs: CPU per event of each etwmon source watching the same storm with the stage on
(ProcessGuid, parent fields, and the details the source reads) and off (``Monitor(identity=False)``). Runs with
and without it alternate, so drifting background load hits both alike; the goal is on/off <= 1.3 per source and
storm kind."""

from __future__ import annotations

import math
import time
from pathlib import Path

from common import progress, summary, target
from peers import EtwmonTool
from storm_bench import KINDS, run_trial, scored_events

#: The goal: CPU per event with the stage on, as a multiple of the same source with it off.
GOAL_RATIO = 1.3


class Discard:
    """A sink that throws records away: a stage's own cost, without a ring."""

    def push(self, record: bytes) -> None:
        pass

    def push_lost(self, count: int) -> None:
        pass

    def notify(self) -> None:
        pass


def _pair(tool: EtwmonTool) -> tuple[EtwmonTool, EtwmonTool]:
    """The same source twice: with the identity stage (as shipped) and without."""
    on = EtwmonTool(tool.workdir, tool.source, tool.max_items, tool.max_bytes, tool.delivers)
    off = EtwmonTool(tool.workdir, tool.source, tool.max_items, tool.max_bytes, tool.delivers)
    off.name = f"{tool.name}-noidentity"
    off.extra_args = ["--identity", "off"]
    return on, off


def stage_alone(records: int = 20_000, repeats: int = 5) -> dict[str, float]:
    """The stage's own CPU per record (µs, best of ``repeats``) on synthetic records of an exec storm: each
    process forked, exec'd with the details a /proc-reading source gives, a thread, an exit. No kernel: the
    figure the storms' on/off ratios are made of, without their noise."""
    from etwmon import records as R
    from etwmon.identity import IdentityStage

    t0 = R.filetime_now()
    made: dict[str, list[bytes]] = {"ProcessCreate": [], "ProcessExec": [], "ThreadCreate": [], "ProcessExit": []}
    for i in range(records):
        pid = 1000 + i
        made["ProcessCreate"].append(R.encode_process_create(t0 + 100 * i, pid, 1, 1, 1, "/usr/bin/storm 20000"))
        made["ProcessExec"].append(R.encode_process_exec(t0 + 100 * i + 1, pid, 1, pid, pid, f"/bin/true storm-{i}",
                                                         R.Details(image="/usr/bin/true", current_directory="/root",
                                                                   uid=0, user="root", session=5, cgroup="/user.slice",
                                                                   start_filetime=t0 + 100 * i, flags=2)))
        made["ThreadCreate"].append(R.encode_thread_create(t0 + 100 * i + 2, pid + 1, pid))
        made["ProcessExit"].append(R.encode_process_exit(t0 + 100 * i + 3, pid, 0))
    best: dict[str, float] = {}
    for _ in range(repeats):
        stage = IdentityStage(Discard(), b"host\0boot")
        stage.seed([(1, 0, "/usr/bin/storm 20000", R.Details(start_filetime=t0 - 10, image="/usr/bin/storm",
                                                              uid=0, user="root"))])
        for kind, batch in made.items():
            start = time.thread_time()
            for record in batch:
                stage.push(record)
            took = (time.thread_time() - start) / len(batch) * 1e6
            best[kind] = min(best.get(kind, took), took)
    return best


def hash_stage_alone(records: int = 5_000, repeats: int = 5) -> dict[str, float]:
    """What ``--hashes sha256`` adds per process record (µs, best of ``repeats``; etwmon.hashes): a record of a
    binary already hashed (open /proc/<pid>/exe, fstat, a cache hit: every exec but the first of each file), and
    the same once the process has ended (a stat of the record's path instead), and a first exec of a file (the
    same plus hashing it on the worker; here /bin/true's size, and per MiB)."""
    import os
    import tempfile

    from etwmon import records as R
    from etwmon.hashes import HashStage

    me = os.getpid()
    st = os.stat(f"/proc/{me}/exe")
    details = R.Details(image=os.path.realpath(f"/proc/{me}/exe"), uid=0, exe_device=st.st_dev & 0xFFFFFFFF,
                        exe_inode=st.st_ino, exe_flags=0)
    record = R.encode_process_exec(R.filetime_now() + 10**9, me, 1, me, me, "/bin/true storm", details)
    out: dict[str, float] = {}
    stage = HashStage("sha256", wait=60.0).attach(Discard())
    try:
        stage.push(record)  # the first: hashed
        for _ in range(repeats):
            start = time.thread_time()
            for _ in range(records):
                stage.push(record)
            took = (time.thread_time() - start) / records * 1e6
            out["cache_hit_us"] = min(out.get("cache_hit_us", took), took)
        gone = R.encode_process_exec(R.filetime_now() + 10**9, 2**22 + 1, 1, 1, 1, "/bin/true storm", details)
        for _ in range(repeats):  # the process has ended (a short-lived one usually has): a stat of its path
            start = time.thread_time()
            for _ in range(records):
                stage.push(gone)
            took = (time.thread_time() - start) / records * 1e6
            out["cache_hit_gone_us"] = min(out.get("cache_hit_gone_us", took), took)
        with tempfile.TemporaryDirectory() as tmp:
            for name, size in (("miss_true_us", os.path.getsize("/bin/true")), ("miss_per_mib_us", 1 << 20)):
                best = None
                for i in range(repeats):
                    path = os.path.join(tmp, f"{name}{i}")
                    with open(path, "wb") as f:
                        f.write(os.urandom(size))
                    fst = os.stat(path)
                    d = R.Details(image=path, exe_device=fst.st_dev & 0xFFFFFFFF, exe_inode=fst.st_ino, exe_flags=0)
                    rec = R.encode_process_exec(R.filetime_now() + 10**9, 2**22 + 1, 1, 1, 1, "x", d)
                    start = time.perf_counter()  # wall: the source thread waits for the worker
                    stage.push(rec)
                    took = (time.perf_counter() - start) * 1e6
                    best = took if best is None else min(best, took)
                out[name] = best
    finally:
        stage.close()
    return out


def run(tools: list, exes: dict[str, Path], max_rates: dict[str, float], quick: bool) -> dict:
    """Each etwmon source (quick: netlink only) against each storm kind it is scored on, at half the machine's
    unthrottled rate (the same load for both, below where either falls behind), stage on and off alternating,
    several pairs (CPU figures of half-second storms on a busy machine scatter: the median of the pairs'
    ratios is the figure); and the stage's own cost per record (``stage_alone``)."""
    seconds = 0.5 if quick else 2.0
    repeats = 3 if quick else 5
    level = 0.5
    runs = []
    watched = [t for t in tools if isinstance(t, EtwmonTool)]
    if quick and any(t.source == "netlink" for t in watched):
        watched = [t for t in watched if t.source == "netlink"]
    progress("identity: the stage alone, on synthetic records")
    alone = stage_alone(5_000 if quick else 20_000)
    progress("identity: " + ", ".join(f"{kind} {us:.1f} µs" for kind, us in alone.items()))
    hashing = hash_stage_alone(1_000 if quick else 5_000)
    progress("identity: --hashes sha256: " + ", ".join(f"{k} {us:.1f}" for k, us in hashing.items()))
    for tool in watched:
        on, off = _pair(tool)
        for kind in KINDS:
            if not scored_events(kind, tool):
                continue
            rate = max_rates[kind] * level
            items = max(50, math.ceil(rate * seconds))
            for rep in range(repeats):
                pair = {}
                for variant, which in (("on", on), ("off", off)) if rep % 2 == 0 else (("off", off), ("on", on)):
                    try:
                        trial = run_trial(which, exes[kind], kind, items, rate)
                    except Exception as exc:
                        progress(f"identity: {which.name} {kind} failed to run: {exc}")
                        pair[variant] = None
                        continue
                    pair[variant] = trial
                    progress(f"identity: {tool.source:<8} {kind:<7} stage {variant:<3} "
                             f"{trial['events_per_s'] / 1000:6.1f} k ev/s  captured {trial['captured_pct']:6.2f}%  "
                             f"cpu {_fmt(trial.get('cpu_ms_per_1000_events'))} ms/1k ev")
                cpu_on = (pair.get("on") or {}).get("cpu_ms_per_1000_events")
                cpu_off = (pair.get("off") or {}).get("cpu_ms_per_1000_events")
                runs.append({"source": tool.source, "kind": kind, "repeat": rep, "cpu_on": cpu_on, "cpu_off": cpu_off,
                             "ratio": cpu_on / cpu_off if cpu_on and cpu_off else None,
                             "captured_on": (pair.get("on") or {}).get("captured_pct"),
                             "captured_off": (pair.get("off") or {}).get("captured_pct"),
                             "errors": [t["error"] for t in pair.values() if t and t.get("error")]})
    rows, targets = [], []
    for source, kind in sorted({(r["source"], r["kind"]) for r in runs}, key=lambda k: (k[0], KINDS.index(k[1]))):
        mine = [r for r in runs if r["source"] == source and r["kind"] == kind]
        row = {"source": source, "kind": kind, "cpu_on": summary(r["cpu_on"] for r in mine),
               "cpu_off": summary(r["cpu_off"] for r in mine), "ratio": summary(r["ratio"] for r in mine),
               "captured_on": summary(r["captured_on"] for r in mine),
               "captured_off": summary(r["captured_off"] for r in mine),
               "errors": sorted({e for r in mine for e in r["errors"]})}
        rows.append(row)
        targets.append(target("identity", f"etwmon-{source}: CPU per event, identity stage on vs off, {kind} storm",
                              row["ratio"]["median"] if row["ratio"] else None, GOAL_RATIO, "x",
                              higher_is_better=False))
    return {"status": "ok", "params": {"seconds_per_storm": seconds, "level": level, "repeats": repeats},
            "stage_alone_us": alone, "hash_stage_us": hashing, "runs": runs, "rows": rows, "targets": targets}


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"
