"""Recording: what ``etwmon record`` adds per event over ``etwmon tail``, what a recording weighs, and how the report
of a big recording does.

All in one process, no kernel: a stream of records shaped like the identity stage's output (fork, exec and exit of
processes with every detail: guid, parent guid, image, cwd, user, parent fields), cut into 64 KiB readinto
batches. The source's cost (kernel, identity stage) is the same under both readers and is left out; what is
compared is what each reader does with a batch (CPU time, ``time.process_time``):

- tail: ``parse`` and the text renderer (what ``etwmon tail`` does per event, the writing to stdout left out);
- record everything: ``BatchRecorder.take`` without a tree: count creates and losses with numpy, gather, zlib,
  write to a file;
- record a command's tree: the same with ``ProcessTreeFilter`` deciding each record (all of them in the tree:
  the worst case).

File size per 1,000 events is of the recording written (header and end mark included), next to the wire bytes.
The report part writes a recording of N processes, times ``etwmon report`` (generation), the page's size, and,
when headless Chromium is there, the time from navigation until the page's script has drawn the tree, and a
search over all of it.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np

from common import progress, summary, target
from etwmon.formats import format_event
from etwmon.records import (
    Details, encode_process_create, encode_process_exec, encode_process_exit, parse,
)
from etwmon.recording import RecordingWriter
from etwmon.recording.record import BatchRecorder
from etwmon.recording.tree import ProcessTreeFilter

_T0 = 134_000_000_000_000_000
_BATCH = 0x10000
_PROGRAMS = ["/usr/bin/cc", "/usr/bin/as", "/usr/bin/ld", "/usr/bin/make", "/bin/sh", "/usr/bin/python3",
             "/usr/bin/git", "/usr/bin/sed", "/usr/bin/node", "/usr/bin/npm"]


def _guid(n: int) -> str:
    return f"{{9e963500-d551-7e8b-{n >> 48 & 0xFFFF:04x}-{n & 0xFFFFFFFFFFFF:012x}}}"


def make_stream(processes: int, root_pid: int = 1000, creator: int = 999, seed: int = 7) -> list[bytes]:
    """The records of ``processes`` processes in a tree under ``root_pid`` (forked by ``creator``): fork, exec,
    exit each, with the details the identity stage writes."""
    rng = random.Random(seed)
    records: list[bytes] = []
    t = _T0
    live = [(root_pid, 0)]
    for n in range(processes):
        pid = root_pid + n
        if n == 0:
            ppid, pguid = creator, _guid(10**9)
        else:
            ppid, pn = live[rng.randrange(len(live))]
            pguid = _guid(pn)
        image = rng.choice(_PROGRAMS)
        cmd = f"{image} -O2 -c src/module_{n}.c -o build/module_{n}.o -Iinclude -DVERSION={n}"
        common = dict(process_guid=_guid(n), parent_process_guid=pguid, current_directory="/home/dev/project",
                      uid=1000, user="dev", start_filetime=t, parent_image="/usr/bin/make",
                      parent_command_line="make -j4 all", parent_user="dev")
        records.append(encode_process_create(t, pid, ppid, ppid, ppid, "make -j4 all",
                                             Details(image="/usr/bin/make", **common)))
        records.append(encode_process_exec(t + 500, pid, ppid, pid, pid, cmd, Details(image=image, **common)))
        records.append(encode_process_exit(t + 20_000, pid, 1 if n % 97 == 0 else 0,
                                           Details(process_guid=_guid(n), image=image, start_filetime=t)))
        if rng.random() < 0.3 or n == 0:
            live.append((pid, n))
        t += 1000
    return records


def batches(records: list[bytes]) -> list[tuple[bytes, np.ndarray, int]]:
    """The records cut as readinto cuts them: (bytes, ends, count) of up to 64 KiB each."""
    out, parts, ends, size = [], [], [], 0
    for record in records:
        if size + len(record) > _BATCH:
            out.append((b"".join(parts), np.array(ends, dtype=np.int64), len(parts)))
            parts, ends, size = [], [], 0
        parts.append(record)
        size += len(record)
        ends.append(size)
    if parts:
        out.append((b"".join(parts), np.array(ends, dtype=np.int64), len(parts)))
    return out


def _cpu(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def _tail(chunks) -> None:
    for data, _, _ in chunks:
        "\n".join(format_event(e) for e in parse(data))


def _record(chunks, path: Path, tree: bool) -> int:
    writer = RecordingWriter(path, {"source": "bench"}, overwrite=True)
    recorder = BatchRecorder(writer, ProcessTreeFilter(1000, 999) if tree else None)
    for data, ends, count in chunks:
        recorder.take(memoryview(data), ends, count)
    writer.close({})
    return os.path.getsize(path)


def run(quick: bool) -> dict:
    processes = 1_000 if quick else 20_000
    repeats = 3 if quick else 5
    records = make_stream(processes)
    chunks = batches(records)
    events = len(records)
    wire = sum(len(r) for r in records)
    tail_us, all_us, tree_us = [], [], []
    size = 0
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.rec"
        for k in range(repeats):
            progress(f"recording: repeat {k + 1}/{repeats} ({events:,} events)")
            tail_us.append(_cpu(lambda: _tail(chunks)) / events * 1e6)
            all_us.append(_cpu(lambda: _record(chunks, path, False)) / events * 1e6)
            size = os.path.getsize(path)
            tree_us.append(_cpu(lambda: _record(chunks, path, True)) / events * 1e6)
        report = report_figures(500 if quick else 100_000, Path(tmp))
    added_all = [a - t for a, t in zip(all_us, tail_us)]
    added_tree = [a - t for a, t in zip(tree_us, tail_us)]
    per_1000 = size / events * 1000
    return {
        "status": "ok",
        "params": {"events": events, "processes": processes, "repeats": repeats, "batch_bytes": _BATCH,
                   "wire_bytes": wire},
        "tail_us": summary(tail_us), "record_all_us": summary(all_us), "record_tree_us": summary(tree_us),
        "added_all_us": summary(added_all), "added_tree_us": summary(added_tree),
        "file_bytes_per_1000_events": per_1000, "wire_bytes_per_1000_events": wire / events * 1000,
        "compression_ratio": wire / size,
        "report": report,
        "targets": [
            target("recording", "record everything: CPU per event vs tail's", summary(all_us)["median"],
                   summary(tail_us)["median"], "µs", higher_is_better=False),
            target("recording", "file size per 1,000 events", per_1000 / 1024, 64, "KiB", higher_is_better=False),
        ],
    }


def report_figures(processes: int, tmp: Path) -> dict:
    """Generation time and size of the report of ``processes`` processes; load and search time in Chromium."""
    import shutil
    import subprocess
    import sys

    path = tmp / f"report-{processes}.rec"
    writer = RecordingWriter(path, {"source": "bench", "host": "bench", "start_filetime": _T0}, overwrite=True)
    for data, _, count in batches(make_stream(processes)):
        writer.write(data, count)
    writer.close({})
    page = tmp / "report.html"
    progress(f"recording: report of {processes:,} processes")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "etwmon", "report", str(path), "-o", str(page), "--force"], check=True,
                   capture_output=True)
    out = {"processes": processes, "recording_bytes": os.path.getsize(path),
           "generation_s": time.perf_counter() - start, "page_bytes": os.path.getsize(page)}
    if shutil.which("chromium") is None:
        out["browser"] = "skipped: chromium is not installed (apt-get install chromium)"
        return out
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.browser import Browser

    with Browser(tmp) as browser:
        start = time.perf_counter()
        browser.open(page)
        out["load_s"] = time.perf_counter() - start
        out["drawn_s"] = int(browser.evaluate("document.body.dataset.drawnMs")) / 1000
        out["rows_in_dom"] = browser.evaluate("document.querySelectorAll('#viewport .row:not([hidden])').length")
        start = time.perf_counter()
        browser.evaluate("var s = document.getElementById('search'); s.value = 'module_4242.c';"
                         "s.dispatchEvent(new Event('input'))")
        while browser.evaluate("document.getElementById('matches').textContent") == "":
            time.sleep(0.01)
        out["search_s"] = time.perf_counter() - start - 0.15  # the search box waits 150 ms for the typing to end
        out["search_result"] = browser.evaluate("document.getElementById('matches').textContent")
        start = time.perf_counter()
        browser.evaluate("var v = document.getElementById('viewport'); v.scrollTop = v.scrollHeight / 2;"
                         "document.getElementById('search').value = ''")
        out["scroll_s"] = time.perf_counter() - start
        out["requests"] = browser.requests
    return out
