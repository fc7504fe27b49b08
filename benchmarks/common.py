"""Helpers shared by the benchmarks: progress lines on stderr, min/median/max summaries, machine facts, and
per-process CPU time and RSS read from /proc."""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_CPUCLOCK_SCHED = 2  # a process's CPU-time clock id: (~pid << 3) | CPUCLOCK_SCHED (Linux's posix-cpu-timers)
_IDLE_CPU = 0.005  # seconds of CPU in 0.4 s that still count as idle (wait_caught_up): under one 10 ms tick
_T0 = time.monotonic()


def progress(message: str) -> None:
    """One progress line on stderr, stamped with seconds since the suite started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def summary(values) -> dict | None:
    """min/median/max (and n) of the numbers in ``values``, or None when there are none."""
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def verdict(value: float | None, goal: float, higher_is_better: bool = True) -> str:
    """PASS/MISS of a measured figure against a goal (n/a when there is no figure)."""
    if value is None:
        return "n/a"
    ok = value >= goal if higher_is_better else value <= goal
    return "PASS" if ok else "MISS"


def machine_facts() -> dict:
    """What the figures were measured on: they mean little without it."""
    import numpy

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import etwmon
        version = etwmon.__version__
    except Exception as exc:  # the report must still say what it could not find
        version = f"unavailable ({exc})"
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no", "--", "etwmon"):
        commit += " (etwmon/ modified)"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "os": _os_name(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "etwmon": version,
        "commit": commit or "unknown",
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "root": hasattr(os, "geteuid") and os.geteuid() == 0,
    }


def _os_name() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def cpu_seconds(pid: int) -> float | None:
    """The CPU time of a whole process (all its threads, live and exited): its CPU-time clock, to the nanosecond
    (clock_getcpuclockid's id, which Linux makes from the pid: a short storm's few hundred ms no longer come in
    10 ms ticks), else utime + stime from /proc/<pid>/stat."""
    if sys.platform.startswith("linux"):
        try:
            return time.clock_gettime(((~pid) << 3) | _CPUCLOCK_SCHED)
        except OSError:  # gone, or not this kernel's clock ids: the ticks
            pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the ")" closing comm: state is field 3, utime field 14, stime field 15 (1-based, proc(5)).
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process from /proc/<pid>/status."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def netlink_backlog(pid: int) -> int | None:
    """Bytes waiting in the receive queues of a process's netlink sockets (``Rmem`` of /proc/net/netlink),
    or None when it has none."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        with open(f"/proc/{pid}/net/netlink") as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    mine = [int(row[4]) for row in rows if len(row) >= 10 and row[9] in inodes]
    return sum(mine) if mine else None


def wait_caught_up(pid: int, timeout: float = 15.0, step: float = 0.05) -> bool:
    """Wait until a monitor has worked through what the kernel queued for it: its netlink receive queues
    stay empty for 0.3 s, or it uses no more than _IDLE_CPU of CPU in 0.4 s (it has stopped reading: an idle
    monitor's timers still use a little). On a machine where other work keeps making events, the monitor never
    goes idle, so the queue is what tells. False on timeout."""
    deadline = time.monotonic() + timeout
    last_cpu, cpu_since = cpu_seconds(pid), time.monotonic()
    empty_since = None
    while time.monotonic() < deadline:
        time.sleep(step)
        now = time.monotonic()
        cpu = cpu_seconds(pid)
        if cpu is None:
            return True  # it is gone
        if cpu - last_cpu > _IDLE_CPU:
            last_cpu, cpu_since = cpu, now
        elif now - cpu_since >= 0.4:
            return True
        backlog = netlink_backlog(pid)
        if backlog == 0:
            empty_since = empty_since or now
            if now - empty_since >= 0.3:
                return True
        else:
            empty_since = None
    return False


def target(benchmark: str, name: str, value: float | None, goal: float, unit: str,
           higher_is_better: bool = True) -> dict:
    """One goal and how the run did against it."""
    return {"benchmark": benchmark, "name": name, "value": value, "goal": goal, "unit": unit,
            "op": ">=" if higher_is_better else "<=", "result": verdict(value, goal, higher_is_better)}


def timed(fn) -> float:
    """Seconds ``fn()`` takes, with the garbage collector kept out of the measurement (for every contender)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    finally:
        gc.enable()
