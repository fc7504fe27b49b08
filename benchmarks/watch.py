"""A monitor under test, run as its own process by the storm benchmarks: etwmon (a Monitor drained with
``wait()`` + ``readinto``; with ``--mode parse`` or ``parse_array`` each buffer is also decoded as a program that
reads the events would) or pyroute2's ProcEventSocket. Prints "ready" once subscribed, watches until a
"stop" line on stdin, then writes what it saw as JSON (see peers.WatcherTool).

While watching it only keeps what it received (raw record bytes for etwmon, three fields per message for
pyroute2); turning that into observations happens after "stop", outside the CPU time being measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import traceback


def _wait_for_stop(stall_after: float | None = None, on_stall=None) -> None:
    if stall_after is not None:
        timer = threading.Timer(stall_after, on_stall)
        timer.daemon = True
        timer.start()
    for line in sys.stdin:
        if line.strip() == "stop":
            return


def _write(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def watch_etwmon(args: argparse.Namespace) -> None:
    import numpy as np

    from etwmon import Monitor, ItemType, parse
    from etwmon.errors import Error
    from etwmon.records import filetime_now, record_headers

    options = {"image_loads": True} if args.image_loads else {}
    if args.batch_wait is not None:  # the bpf source's window (its kernel pacer)
        options["batch_wait"] = args.batch_wait
    monitor = Monitor(source=args.source, max_items=args.max_items, max_bytes=args.max_bytes,
                      identity={"on": True, "off": False}.get(args.identity, args.identity), **options)
    monitor.start()
    chunks: list[tuple[int, bytes]] = []  # (FILETIME when readinto returned, the bytes it gave)
    keep = not args.discard
    stop = threading.Event()
    stalled = threading.Event()
    failure: list[str] = []
    read_calls = [0]

    use = _reading(args.mode)

    def reader() -> None:
        buf = bytearray(args.buffer)
        view = memoryview(buf)
        try:
            while not stop.is_set():
                if stalled.is_set():  # the memory benchmark's "reader stopped reading" phase
                    stop.wait(0.1)
                    continue
                if not monitor.wait(0.2):
                    continue
                n = monitor.readinto(buf)
                if n:
                    now = filetime_now()
                    read_calls[0] += 1
                    if use is not None:
                        use(view[:n])
                    if keep:
                        chunks.append((now, bytes(view[:n])))
        except Error as exc:
            failure.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=reader, name="reader", daemon=True)
    thread.start()
    print("ready", flush=True)
    _wait_for_stop(args.stall_after, stalled.set)
    stop.set()
    thread.join()
    monitor.stop()
    # What was still in the ring when told to stop is read too (counted, but no latency: it was not waited for).
    tail: list[bytes] = []
    buf = bytearray(args.buffer)
    while True:
        try:
            n = monitor.readinto(buf)
        except Error as exc:
            failure.append(f"{type(exc).__name__}: {exc}")
            break
        if not n:
            break
        tail.append(bytes(buf[:n]))
    stats = monitor.stats
    monitor.close()

    create, exit_, exec_ = [], [], []
    lost = images = 0
    latencies = []
    for data in [c for _, c in chunks] + tail:
        for event in parse(data):
            kind = event.type
            if kind in (ItemType.ProcessCreate, ItemType.ThreadCreate):
                create.append(event.pid if kind == ItemType.ProcessCreate else event.tid)
            elif kind == ItemType.ProcessExec:
                try:
                    argv = shlex.split(event.command_line)
                except ValueError:
                    argv = [event.command_line]
                exec_.append((event.pid, argv))
            elif kind == ItemType.ProcessExit:
                exit_.append(event.pid)
            elif kind == ItemType.ThreadExit:
                exit_.append(event.tid)
            elif kind == ItemType.RecordsLost:
                lost += event.count
            elif kind == ItemType.ImageLoad:
                images += 1
    for now, data in chunks:
        heads = record_headers(data)
        times = heads["Time"][heads["Type"] != int(ItemType.RecordsLost)]
        latencies.append((now - times) / 10.0)  # FILETIME ticks are 100 ns
    latency = None
    if latencies:
        lat = np.concatenate(latencies)
        if len(lat):
            latency = {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                       "max": float(lat.max()), "n": int(len(lat))}
    _write(args.out, {
        "create": create, "exit": exit_, "exec": exec_, "lost_reported": lost,
        "error": failure[0] if failure else None, "latency_us": latency,
        "extra": {"ring_dropped": stats.dropped, "source_lost": stats.lost, "pushed": stats.pushed,
                  "max_items": stats.max_items, "max_bytes": stats.max_bytes, "readinto_calls": read_calls[0],
                  "source_stats": stats.source_stats, "image_loads": images,
                  # the identity stage's counters where this etwmon has them (its process table's bytes and cap)
                  "identity": dict(getattr(stats, "identity", None) or {})},
    })


def _reading(mode: str):
    """What the program does with each buffer ``readinto`` filled, beyond keeping its bytes: nothing
    (``readinto``), an Event object per record with the fields a consumer reads first (``parse``), or the columnar
    batch (``parse_array``, when this etwmon has it)."""
    if mode == "readinto":
        return None
    if mode == "parse":
        from etwmon import parse

        def use(data) -> None:
            for event in parse(data):
                event.type, event.filetime  # noqa: B018 (what every consumer reads)
        return use
    import etwmon

    if not hasattr(etwmon, "parse_array"):
        raise SystemExit("this etwmon has no parse_array")
    return etwmon.parse_array


def watch_pyroute2(args: argparse.Namespace) -> None:
    from pyroute2 import ProcEventSocket
    from pyroute2.netlink.connector.cn_proc import PROC_EVENT_EXEC, PROC_EVENT_EXIT, PROC_EVENT_FORK

    sock = ProcEventSocket()
    sock.bind()
    sock.control(listen=True)
    seen: list[tuple[int, int]] = []  # (what, pid): all that is kept while watching
    failure: list[str] = []

    def report_on_stop() -> None:
        _wait_for_stop()
        snapshot = list(seen)
        _write(args.out, {
            "create": [pid for what, pid in snapshot if what == PROC_EVENT_FORK],
            "exit": [pid for what, pid in snapshot if what == PROC_EVENT_EXIT],
            "exec": [(pid, None) for what, pid in snapshot if what == PROC_EVENT_EXEC],
            "lost_reported": None, "error": failure[0] if failure else None, "latency_us": None, "extra": {},
        })
        os._exit(0)  # the receiving loop is blocked in recv; nothing else needs cleaning up

    threading.Thread(target=report_on_stop, name="control", daemon=True).start()
    print("ready", flush=True)
    # The loop a pyroute2 user writes, in the main thread (pyroute2 0.9's socket delivers nothing to get()
    # called from another thread).
    try:
        while True:
            for msg in sock.get():
                what = msg["what"]
                if what == PROC_EVENT_FORK:
                    seen.append((what, msg["child_pid"]))
                elif what == PROC_EVENT_EXEC or what == PROC_EVENT_EXIT:
                    seen.append((what, msg["process_pid"]))
    except BaseException as exc:  # the crash a pyroute2 user would see: kept and reported at "stop"
        failure.append(f"{type(exc).__name__}: {exc}")
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        threading.Event().wait()  # the control thread writes the report and exits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="tool", required=True)
    e = sub.add_parser("etwmon")
    e.add_argument("--source", default="netlink")
    e.add_argument("--max-items", type=int, default=10_000)
    e.add_argument("--max-bytes", type=int, default=None)
    e.add_argument("--buffer", type=int, default=1 << 20, help="readinto buffer size")
    e.add_argument("--discard", action="store_true", help="keep nothing (the memory benchmark)")
    e.add_argument("--identity", choices=("on", "off", "lean", "full"), default="on",
                   help="the identity stage (ProcessGuid, details): on as shipped (creates the kernel wrote pass "
                        "whole; lean is the same), off to measure its cost, full (Monitor(identity='full'): User and "
                        "the parent's fields added to every create and exec)")
    e.add_argument("--mode", choices=("readinto", "parse", "parse_array"), default="readinto",
                   help="what the reader does with each buffer: nothing (readinto only), parse every record, or "
                        "parse_array")
    e.add_argument("--image-loads", action="store_true", help="also image loads (the bpf source's opt-in)")
    e.add_argument("--batch-wait", type=float, default=None,
                   help="the bpf source's batch_wait (seconds; its default when not given)")
    e.add_argument("--stall-after", type=float, default=None,
                   help="stop reading after this many seconds, so the ring fills to its caps")
    p = sub.add_parser("pyroute2")
    for sp in (e, p):
        sp.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.tool == "etwmon":
        watch_etwmon(args)
    else:
        watch_pyroute2(args)


if __name__ == "__main__":
    main()
