"""Readers benchmark: what a reader of records pays per event, on synthetic records as the identity stage writes
them (a process's fork, exec and exit with their extension blocks, and thread records): ``parse`` (Event
objects, every attribute a formatter reads), ``parse_array`` (the columnar batch), and ``etwmon tail``'s text
and JSON output (per-event formatters, and the batch formatters tail uses)."""

from __future__ import annotations

import time
from datetime import timedelta

from common import progress

from etwmon import formats
from etwmon.records import (
    Details, encode_process_create, encode_process_exec, encode_process_exit, encode_thread_create,
    encode_thread_exit, filetime_now, parse,
)

try:  # the columnar reader (absent in versions before it)
    from etwmon.records import parse_array
except ImportError:  # pragma: no cover
    parse_array = None


def make_batch(processes: int) -> bytes:
    """``processes`` fork/exec/exit triples, each with one thread create/exit, as the identity stage writes them."""
    now = filetime_now()
    out = []
    for i in range(processes):
        pid, t = 20_000 + i, now + 1000 * i
        guid = f"{{5f1b6a3c-{i % 0xFFFF:04x}-6a3c-0000-0000{i:08x}}}"
        parent = dict(parent_process_guid="{5f1b6a3c-0000-6a3c-0000-000000000001}", parent_image="/usr/bin/bash",
                      parent_command_line="bash -c 'make -j8 all'", parent_user="build")
        common = dict(process_guid=guid, current_directory="/home/build/src", uid=1000, user="build",
                      tty="pts/3", session=4242, start_filetime=t, **parent)
        out.append(encode_process_create(t, pid, 4000, 4000, 4000, "bash -c 'make -j8 all'",
                                         Details(image="/usr/bin/bash", **common)))
        out.append(encode_process_exec(t + 10, pid, 4000, pid, pid,
                                       f"/usr/bin/cc -O2 -c -o obj/file{i}.o src/file{i}.c -Iinclude",
                                       Details(image="/usr/bin/cc", **common)))
        out.append(encode_thread_create(t + 20, pid + 1, pid, Details(process_guid=guid)))
        out.append(encode_thread_exit(t + 30, pid + 1, pid, 0, Details(process_guid=guid)))
        out.append(encode_process_exit(t + 40, pid, i % 3, Details(
            process_guid=guid, image="/usr/bin/cc", start_filetime=t, lifetime=timedelta(microseconds=4321))))
    return b"".join(out)


def _per_event(fn, data: bytes, events: int, rounds: int) -> float:
    """Best of ``rounds``: CPU µs per event of ``fn(data)`` (process time: other load on the machine counts less)."""
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        fn(data)
        best = min(best, time.process_time() - start)
    return best / events * 1e6


def _parse_all(data: bytes) -> None:
    for event in parse(data):
        event.time  # noqa: B018 - what every formatter reads
        getattr(event, "command_line", None)
        getattr(event, "image", None)


def _text_each(data: bytes) -> None:
    "".join(formats.format_event(e) + "\n" for e in parse(data)).encode()


def _json_each(data: bytes) -> None:
    "".join(formats.json_line(e) + "\n" for e in parse(data)).encode()


def run(quick: bool = False) -> dict:
    processes = 400 if quick else 2000
    data = make_batch(processes)
    events = 5 * processes
    rounds = 3 if quick else 7
    progress(f"readers: {events} events, {len(data)} bytes")
    figures = {"parse": _per_event(_parse_all, data, events, rounds),
               "text_per_event": _per_event(_text_each, data, events, rounds),
               "json_per_event": _per_event(_json_each, data, events, rounds)}
    if parse_array is not None:
        figures["parse_array"] = _per_event(parse_array, data, events, rounds)
    batch_text = getattr(formats, "format_batch", None)
    if batch_text is not None:
        figures["text_batch"] = _per_event(lambda d: batch_text(d, "text"), data, events, rounds)
        figures["json_batch"] = _per_event(lambda d: batch_text(d, "json"), data, events, rounds)
    result = {"status": "ok", "events": events, "bytes": len(data),
              "us_per_event": {k: round(v, 3) for k, v in figures.items()}}
    progress("readers: µs per event: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    try:  # per call, on the few records a storm's readinto hands a reader
        import reader_calls_bench
    except ImportError:  # pragma: no cover - an etwmon without parse_array
        pass
    else:
        result["per_call"] = reader_calls_bench.run(quick)
        progress("readers: µs per call of 1 record: " + ", ".join(
            f"{k} {v:.1f}" for k, v in result["per_call"][1].items()))
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run("--quick" in sys.argv), indent=2))
