"""Reader calls benchmark: what one call of a reader costs on the small buffers a storm hands it (1 to 50
records per ``readinto``) and on a full one (1,000), on records of the kinds the bpf source writes (a process's
fork, exec with its command line, thread create and exit, exit; each with its extension block). Per size: CPU µs
per call and per record of ``parse`` (reading each event's type and time, as ``benchmarks/watch.py`` does),
``parse_array``, ``etwmon tail``'s batch formatter (text and JSON), and tail's whole path for JSON (the batch
formatted, handed to its line writer and written to /dev/null), best of the rounds.

    python benchmarks/reader_calls_bench.py [--quick] [--json]
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta

from etwmon import formats, tail
from etwmon.records import (
    Details, encode_process_create, encode_process_exec, encode_process_exit, encode_thread_create,
    encode_thread_exit, filetime_now, parse, parse_array,
)

SIZES = (1, 3, 10, 50, 1000)


def bpf_records(count: int) -> list[bytes]:
    """``count`` records cycling through fork, exec, thread create, thread exit and exit of one process after
    another, with the extension blocks the bpf source and the identity stage write (every fifth exec's command
    line is hostile: escapes, bidi, bytes that are not UTF-8)."""
    now = filetime_now()
    out: list[bytes] = []
    i = 0
    while len(out) < count:
        pid, t = 20_000 + i, now + 1000 * i
        guid = f"{{5f1b6a3c-{i % 0xFFFF:04x}-6a3c-0000-0000{i:08x}}}"
        where = dict(exe_device=0x803, exe_inode=1_234_567 + i, exe_flags=0, mnt_ns=4026531841, pid_ns=4026531836,
                     ns_pid=pid, cgroup_id=8812)
        common = dict(process_guid=guid, parent_process_guid="{5f1b6a3c-0000-6a3c-0000-000000000001}",
                      current_directory="/home/build/src", uid=1000, user="build", parent_image="/usr/bin/bash",
                      parent_command_line="bash -c 'make -j8 all'", tty="pts/3", session=4242, start_filetime=t,
                      **where)
        cmd = (f"/usr/bin/cc -O2 -c -o obj/file{i}.o src/file{i}.c -Iinclude" if i % 5 else
               f"sh -c 'echo \x1b]0;title\x07 \u202egnp.exe' arg{i} \udcff\udcfe")
        out += [
            encode_process_create(t, pid, 4000, 4000, 4000, "bash -c 'make -j8 all'",
                                  Details(image="/usr/bin/bash", **common)),
            encode_process_exec(t + 10, pid, 4000, pid, pid, cmd, Details(image="/usr/bin/cc", **common)),
            encode_thread_create(t + 20, pid + 1, pid, Details(process_guid=guid)),
            encode_thread_exit(t + 30, pid + 1, pid, 0, Details(process_guid=guid)),
            encode_process_exit(t + 40, pid, i % 3, Details(process_guid=guid, image="/usr/bin/cc", uid=1000,
                                                            user="build", start_filetime=t,
                                                            lifetime=timedelta(microseconds=4321))),
        ]
        i += 1
    return out[:count]


def _parse(data) -> None:
    for event in parse(data):
        event.type, event.filetime  # noqa: B018 (what every consumer reads)


def _tail_json():
    out = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the benchmark)
    writer = tail._LineWriter(out, tail.StopSignals())
    batch = getattr(tail, "format_batch_typed", None) or formats.format_batch_typed  # (where tail takes it)

    def write(data) -> None:
        lines, kinds = batch(data, "json")
        writer.add_lines(lines, kinds)
        writer.flush()
    return write


READERS = {
    "parse": _parse,
    "parse_array": parse_array,
    "text_batch": lambda d: formats.format_batch(d, "text"),
    "json_batch": lambda d: formats.format_batch(d, "json"),
    "tail_json": _tail_json(),
}


def per_call(fn, data, budget: float, rounds: int) -> float:
    """Best of ``rounds``: CPU µs per call of ``fn(data)``, each round calling it for about ``budget`` seconds."""
    start = time.process_time()
    fn(data)
    once = max(time.process_time() - start, 1e-6)
    calls = max(1, int(budget / once))
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            fn(data)
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def run(quick: bool = False) -> dict:
    records = bpf_records(max(SIZES))
    budget, rounds = (0.05, 3) if quick else (0.2, 5)
    out: dict = {}
    for size in SIZES:
        data = bytearray(b"".join(records[:size]))  # what readinto fills
        view = memoryview(data)
        out[size] = {name: round(per_call(fn, view, budget, rounds), 2) for name, fn in READERS.items()}
    return out


def main() -> None:
    result = run("--quick" in sys.argv)
    if "--json" in sys.argv:
        import json

        print(json.dumps(result, indent=2))
        return
    names = list(READERS)
    print(f"{'records':>8} " + " ".join(f"{n + ' /call':>17} {'/rec':>7}" for n in names))
    for size, figures in result.items():
        print(f"{size:>8} " + " ".join(f"{figures[n]:>17.1f} {figures[n] / size:>7.2f}" for n in names))


if __name__ == "__main__":
    main()
