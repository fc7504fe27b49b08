"""The processes of a recording, one entry per process life (keyed by ProcessGuid): who started it, what it ran
(its last exec), as whom, where, when it started and ended and how. The report and the Chrome trace are drawn
from this; the Parquet and JSON-lines exports stay one row per event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ..records import (
    EXIT_CODE_UNKNOWN, Event, ProcessCreate, ProcessExec, ProcessExit, RecordsLost, ThreadCreate,
)

__all__ = ["Process", "Processes", "collect"]


@dataclass
class Process:
    """One process life. Times are FILETIMEs; ``start`` is None when the recording did not see it start (it ran
    before), ``end`` None when it did not see it end; ``exit_code`` None when unknown."""

    index: int
    key: str
    pid: int
    parent_pid: int
    parent: int = -1  # index of the parent Process in the recording, -1 when it is not in it
    guid: str | None = None
    parent_guid: str | None = None
    command_line: str = ""
    image: str | None = None
    user: str | None = None
    current_directory: str | None = None
    start: int | None = None
    end: int | None = None
    exit_code: int | None = None
    execs: list[tuple[int, str]] = field(default_factory=list)  # (time, command line) of each exec
    threads: int = 0

    @property
    def failed(self) -> bool:
        return self.exit_code not in (None, 0)


@dataclass
class Processes:
    processes: list[Process]
    losses: list[tuple[int, int]]  # (time, count) of each RecordsLost
    events: int
    first: int | None
    last: int | None

    @property
    def lost(self) -> int:
        return sum(count for _, count in self.losses)


def collect(events: Iterable[Event]) -> Processes:
    """The processes the events describe, in the order they were first seen."""
    out: list[Process] = []
    by_guid: dict[str, Process] = {}
    live: dict[int, Process] = {}  # pid -> the process living under it, for records without a guid
    losses: list[tuple[int, int]] = []
    count = 0
    first = last = None

    def find(pid: int, guid: str | None) -> Process | None:
        if guid is not None:
            return by_guid.get(guid)
        return live.get(pid)

    def new(pid: int, parent_pid: int, guid: str | None, when: int | None) -> Process:
        key = guid if guid is not None else f"{pid}@{when}"
        process = Process(len(out), key, pid, parent_pid, guid=guid, start=when)
        out.append(process)
        if guid is not None:
            by_guid[guid] = process
        live[pid] = process
        return process

    for event in events:
        count += 1
        t = event.filetime
        first = t if first is None else min(first, t)
        last = t if last is None else max(last, t)
        if isinstance(event, ProcessCreate):
            is_exec = isinstance(event, ProcessExec)
            process = find(event.pid, event.process_guid) if is_exec else None
            if process is None:
                process = new(event.pid, event.parent_pid, event.process_guid, None if is_exec else t)
                process.parent_guid = event.parent_process_guid
                parent = (by_guid.get(event.parent_process_guid) if event.parent_process_guid is not None
                          else live.get(event.parent_pid))
                if parent is not None and parent is not process:
                    process.parent = parent.index
            process.command_line = event.command_line
            for name in ("image", "user", "current_directory"):
                value = getattr(event, name)
                if value is not None:
                    setattr(process, name, value)
            if process.user is None and event.uid is not None:
                process.user = str(event.uid)
            if is_exec:
                process.execs.append((t, event.command_line))
        elif isinstance(event, ProcessExit):
            process = find(event.pid, event.process_guid)
            if process is None:
                process = new(event.pid, 0, event.process_guid, None)
                if event.image is not None:
                    process.image = event.image
            process.end = t
            process.exit_code = None if event.exit_code == EXIT_CODE_UNKNOWN else event.exit_code
            if live.get(event.pid) is process:
                del live[event.pid]
        elif isinstance(event, ThreadCreate):
            process = find(event.pid, event.process_guid)
            if process is not None:
                process.threads += 1
        elif isinstance(event, RecordsLost):
            losses.append((t, event.count))
    return Processes(out, losses, count, first, last)
