"""How often the command line reported at exec is right in an exec storm: etwmon's netlink source vs forkstat.

A small C program forks N children (at most C alive at once), each exec'ing ``/bin/true storm-<i>``; a
watcher is right about child i when it reports exactly that command line for the child's pid. Run as root:

    python benchmarks/netlink_cmdline_probe.py [--children 3000] [--concurrency 1 8 64] [--rounds 1]
                                               [--nice -10 none] [--no-forkstat]
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cn_builders import compile_storm_tools  # noqa: E402

import etwmon  # noqa: E402
from etwmon import ItemType, parse  # noqa: E402

TRUE = shutil.which("true") or "/bin/true"


def run_storm(tools: dict, children: int, concurrency: int) -> dict[int, str]:
    """Run the storm; pid -> the command line that child really had."""
    out = subprocess.run([str(tools["forkexec"]), str(children), str(concurrency), TRUE, "storm-%d"],
                         check=True, capture_output=True, text=True).stdout.split("\n")
    truth = {}
    for line in out[1:]:
        if line:
            index, pid = line.split()
            truth[int(pid)] = f"{TRUE} storm-{index}"
    return truth


def probe_etwmon(tools: dict, children: int, concurrency: int, nice: int | None = -10) -> tuple[int, int, dict]:
    seen: dict[int, str] = {}
    with etwmon.Monitor(source="netlink", max_items=200_000, nice=nice) as mon:
        done = threading.Event()

        def drain() -> None:
            buf = bytearray(1 << 20)
            while True:
                n = mon.readinto(buf)
                if n:
                    for ev in parse(buf[:n]):
                        if ev.type == ItemType.ProcessExec:
                            seen[ev.pid] = ev.command_line
                    continue
                if done.is_set():
                    return
                mon.wait(0.2)

        reader = threading.Thread(target=drain)
        reader.start()
        truth = run_storm(tools, children, concurrency)
        time.sleep(0.5)
        done.set()
        reader.join()
        stats = mon.stats
    right = sum(seen.get(pid) == line for pid, line in truth.items())
    return right, len(truth), {"lost": stats.lost, "dropped": stats.dropped, **{
        k: v for k, v in stats.source_stats.items() if k.startswith("cmdline")}}


_FORKSTAT_LINE = re.compile(r"^\d\d:\d\d:\d\d exec\s+(\d+)\s+(.*?)\s*$")


def probe_forkstat(tools: dict, children: int, concurrency: int) -> tuple[int, int, dict]:
    with tempfile.NamedTemporaryFile("w+", suffix=".forkstat", errors="surrogateescape") as log:
        watcher = subprocess.Popen(["forkstat", "-l", "-e", "exec"], stdout=log, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # forkstat reads /proc at start
        truth = run_storm(tools, children, concurrency)
        time.sleep(1.0)
        watcher.send_signal(signal.SIGINT)
        watcher.wait(10)
        log.seek(0)
        seen = {}
        for line in log:
            m = _FORKSTAT_LINE.match(line)
            if m:
                seen[int(m.group(1))] = m.group(2)
    right = sum(seen.get(pid) == line for pid, line in truth.items())
    return right, len(truth), {"reported": sum(pid in seen for pid in truth)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--children", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--no-forkstat", action="store_true")
    ap.add_argument("--nice", nargs="+", default=["-10"],
                    help="nice values of etwmon's source thread to try ('none': leave it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tools = compile_storm_tools(tmp)
        if tools is None:
            print("needs gcc", file=sys.stderr)
            return 2
        have_forkstat = shutil.which("forkstat") is not None and not args.no_forkstat
        for conc in args.concurrency:
            for r in range(args.rounds):
                for nice in args.nice:
                    value = None if nice == "none" else int(nice)
                    right, total, extra = probe_etwmon(tools, args.children, conc, value)
                    print(f"etwmon-netlink nice={nice} concurrency={conc} round={r}: {right}/{total} = "
                          f"{100 * right / total:.1f} % right {extra}", flush=True)
                if have_forkstat:
                    right, total, extra = probe_forkstat(tools, args.children, conc)
                    print(f"forkstat       concurrency={conc} round={r}: {right}/{total} = "
                          f"{100 * right / total:.1f} % right {extra}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
