"""Small builders for recording tests: synthetic process trees as wire records, written as recordings."""

from __future__ import annotations

import os

from etwmon.records import (
    Details, encode_process_create, encode_process_exec, encode_process_exit, encode_records_lost,
    encode_thread_create,
)
from etwmon.recording import RecordingWriter

T0 = 134_000_000_000_000_000  # a FILETIME in 2025
GUID = "{{11111111-2222-3333-{:04x}-{:012x}}}"


def guid(pid: int, start: int = 0) -> str:
    return GUID.format(pid & 0xFFFF, start & 0xFFFFFFFFFFFF)


def life(pid: int, ppid: int, command_line: str, *, start: int, end: int | None, code: int = 0,
         parent_guid: str | None = None, image: str = "/usr/bin/prog", user: str = "alice",
         cwd: str = "/home/alice", threads: int = 0) -> list[bytes]:
    """The records of one process: its fork (running the parent's program), its exec, threads and exit."""
    g = guid(pid, start)
    pg = parent_guid if parent_guid is not None else guid(ppid)
    out = [
        encode_process_create(T0 + start, pid, ppid, ppid, ppid, "parent-program",
                              Details(process_guid=g, parent_process_guid=pg, image="/bin/sh", user=user, uid=1000,
                                      current_directory=cwd, start_filetime=T0 + start)),
        encode_process_exec(T0 + start + 10, pid, ppid, pid, pid, command_line,
                            Details(process_guid=g, parent_process_guid=pg, image=image, user=user, uid=1000,
                                    current_directory=cwd, start_filetime=T0 + start)),
    ]
    for k in range(threads):
        out.append(encode_thread_create(T0 + start + 20 + k, pid * 100 + k, pid, Details(process_guid=g)))
    if end is not None:
        out.append(encode_process_exit(T0 + end, pid, code, Details(process_guid=g, image=image)))
    return out


def tree_records(n_children: int = 5, hostile: str | None = None) -> list[bytes]:
    """A root (pid 100) with ``n_children`` children (one failing with 3), one grandchild, and a loss."""
    root = guid(100)
    records = life(100, 1, "make all", start=0, end=10_000_000, code=2, parent_guid=guid(1), image="/usr/bin/make")
    for k in range(n_children):
        cmd = hostile if (hostile is not None and k == 0) else f"cc -c file{k}.c"
        records += life(200 + k, 100, cmd, start=1000 + k * 100_000, end=2000 + k * 100_000 + 50_000,
                        code=3 if k == 1 else 0, parent_guid=root, image="/usr/bin/cc", threads=2)
    records += life(300, 200, "as -o file0.o", start=5000, end=90_000, parent_guid=guid(200, 1000),
                    image="/usr/bin/as")
    records.append(encode_records_lost(T0 + 95_000, 5))
    return records


def write_recording(path: str | os.PathLike[str], records: list[bytes], *, chunk_bytes: int = 4096,
                    header: dict | None = None, close: bool = True) -> RecordingWriter:
    writer = RecordingWriter(path, {"source": "test", "host": "testhost", "start_time": "2025-01-01T00:00:00Z",
                                    "start_filetime": T0, **(header or {})}, chunk_bytes=chunk_bytes)
    for record in records:
        writer.write(record, 1)
    if close:
        writer.close({"events": len(records)})
    else:
        writer.flush()
        writer.abandon()
    return writer
