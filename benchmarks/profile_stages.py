"""Where a bpf Monitor's CPU goes, stage by stage, in µs per event: a monitor process (watch.py, readinto only)
watches /bin/true exec'd at a fixed rate while py-spy samples the thread holding the GIL; each sample is charged to
the innermost stage its stack is in, and what the samples do not cover (time without the GIL: the kernel's side of
waking the thread, system calls) is the monitor's measured CPU minus the sampled time.

    python benchmarks/profile_stages.py [--rate 528] [--seconds 15] [--identity on|off|full] [--batch-wait S]

ETWMON_NO_SPEEDUPS=1 in the environment profiles the ring walk in Python (without etwmon._speedups) for comparison.

Needs root, py-spy (pip install py-spy) and gcc. Development tool: its figures go in notes, not RESULTS.md (the
sampler slows what it samples a little). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import cpu_seconds  # noqa: E402

#: (stage, the frame that marks it). A sample is charged to the innermost frame of its stack that marks a stage
#: (time in a stage's callees that mark none is the stage's own).
STAGES = (
    ("identity stage", "IdentityStage."),
    ("rules stage", "RulesStage."),
    ("EventRing push", "EventRing.push"),
    ("move kernel records (WireMover)", "WireMover."),
    ("decode events (EventDecoder)", "EventDecoder."),
    ("ring walk in C, batch hand-off (BpfSource._walk_fast)", "BpfSource._walk_fast"),
    ("ring walk, loss counter (BpfSource._drain)", "BpfSource._drain"),
    ("readinto", ".readinto ("),
    ("wait() and its bookkeeping", ".wait ("),
    ("ring walk, loss counter (BpfSource._drain)", "BpfSource._reader_pass"),
    ("source thread loop", "BpfSource._run"),
    ("the benchmark's reader (keeps the bytes)", "reader (benchmarks/watch.py"),
)


def stage_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, mark in STAGES:
            if mark in frame:
                return name
    return "other Python"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=528.0, help="execs per second (default 528)")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--identity", choices=("on", "off", "full"), default="on")
    parser.add_argument("--batch-wait", type=float, default=None, help="the bpf source's batch_wait")
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy is needed: pip install py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        exe = work / "storm_exec"
        subprocess.run(["gcc", "-O2", "-pthread", "-o", str(exe), str(HERE / "generators" / "storm_exec.c")],
                       check=True)
        argv_ = [sys.executable, str(HERE / "watch.py"), "etwmon", "--source", "bpf", "--max-items", "100000",
                 "--identity", args.identity, "--discard", "--out", str(work / "out.json")]
        if args.batch_wait is not None:
            argv_ += ["--batch-wait", str(args.batch_wait)]
        watcher = subprocess.Popen(argv_, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert watcher.stdout is not None and watcher.stdin is not None
        if watcher.stdout.readline().strip() != "ready":
            raise SystemExit("the monitor did not start")
        raw = work / "profile.txt"
        # --gil: only the thread holding the GIL is sampled, so a thread asleep in poll/select/epoll (which
        # releases it) is never counted as running, whatever the sampler thinks of its state.
        sampler = subprocess.Popen([spy, "record", "--nonblocking", "--gil", "--threads", "-r", "1000", "-f", "raw", "-o",
                                    str(raw), "-d", str(int(args.seconds + 2)), "-p", str(watcher.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        cpu0 = cpu_seconds(watcher.pid)
        items = int(args.rate * args.seconds)
        storm = subprocess.run([str(exe), str(items), f"{args.rate:.3f}"], capture_output=True, text=True, check=True)
        time.sleep(0.2)
        cpu1 = cpu_seconds(watcher.pid)
        sampler.wait(args.seconds + 60)
        watcher.stdin.write("stop\n")
        watcher.stdin.flush()
        watcher.wait(60)
        made = int(dict(zip(*[iter(storm.stdout.split("\n")[0].split())] * 2))["items"])
        lines = raw.read_text().splitlines() if raw.exists() else []
        if os.environ.get("PROFILE_STAGES_KEEP"):
            shutil.copy(raw, os.environ["PROFILE_STAGES_KEEP"])
    samples: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, count = line.rpartition(" ")
        samples[stage_of(stack)] += int(count)
    events = 3 * made  # fork, exec and exit of each /bin/true (the machine's other events are not counted)
    cpu = (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else 0.0
    sampled = sum(samples.values()) / 1000.0
    print(f"{made:,} execs at {args.rate:,.0f}/s, identity {args.identity}, batch_wait "
          f"{args.batch_wait if args.batch_wait is not None else 'default'}: monitor CPU {cpu:.3f} s = "
          f"{1e6 * cpu / made:.1f} µs per exec, {1e6 * cpu / events:.1f} µs per event")
    print(f"{'stage':<56} {'µs/event':>9}")
    for name, n in samples.most_common():
        print(f"{name:<56} {1e6 * n / 1000.0 / events:9.2f}")
    print(f"{'without the GIL (kernel: wake-ups, system calls)':<56} {1e6 * max(cpu - sampled, 0.0) / events:9.2f}")


if __name__ == "__main__":
    main()
