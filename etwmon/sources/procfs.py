"""Polling fallback that needs no privilege: diff snapshots of /proc every ``interval`` seconds.

It reports processes and threads that appear and vanish between two looks, so it misses whatever lived and died
in between and never knows exit codes; it declares itself lossy for that reason.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import ClassVar

from ..clock import CLOCK_BOOTTIME, KernelClock, filetime_now
from ..errors import SourceUnavailable
from ..records import (
    EXIT_CODE_UNKNOWN, command_line_from_argv, encode_process_create, encode_process_exec, encode_process_exit,
    encode_thread_create, encode_thread_exit,
)
from ._proc import argv_of, clock_tick_ns, parse_stat, read_proc
from .base import Sink, Source

__all__ = ["ProcfsSource", "DEFAULT_INTERVAL"]

log = logging.getLogger(__name__)

#: Seconds between two snapshots: short enough to catch most processes that live a few tenths of a second,
#: long enough that a snapshot of a few hundred processes costs about 1-2 % of one core.
DEFAULT_INTERVAL = 0.1


def _stat(path: str) -> tuple[bytes, int, int] | None:
    """(comm, ppid, starttime in clock ticks since boot) from a /proc stat file."""
    data = read_proc(path, 1024)
    return parse_stat(data) if data else None


def _numeric_entries(path: str) -> list[int]:
    try:
        with os.scandir(path) as it:
            return [int(e.name) for e in it if e.name.isdigit()]
    except OSError:
        return []


@dataclass
class _Process:
    start: int  # clock ticks since boot: (pid, start) names one process even when the pid is reused
    comm: bytes
    threads: dict[int, int] = field(default_factory=dict)  # tid -> start ticks


class ProcfsSource(Source):
    """Process and thread events from polling /proc (any user, anywhere with /proc). Lossy.

    Options: ``interval`` (seconds between snapshots, default 0.1), ``threads`` (default True: also diff
    /proc/<pid>/task for threads).
    """

    name: ClassVar[str] = "procfs"
    lossy: ClassVar[bool] = True
    delivers: ClassVar[frozenset[str]] = frozenset({
        "process_create", "process_exit", "process_exec", "thread_create", "thread_exit", "command_line",
    })

    def __init__(self, *, interval: float = DEFAULT_INTERVAL, threads: bool = True, proc_root: str = "/proc") -> None:
        super().__init__()
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        self.interval = float(interval)
        self.threads = bool(threads)
        self._proc = proc_root
        self._stop = threading.Event()
        self._known: dict[int, _Process] | None = None
        self._tick_ns = clock_tick_ns()
        self.polls = 0

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not os.path.exists("/proc/self/stat"):
            return "needs a Linux-style /proc file system (none mounted here)"
        return None

    def open(self) -> None:
        reason = self.unavailable_reason() if self._proc == "/proc" else None
        if reason is not None:
            raise SourceUnavailable(reason)
        if not os.path.isdir(self._proc):
            raise SourceUnavailable(f"{self._proc} is not a directory")
        self._stop.clear()
        # What runs already is the baseline: only changes from here on are reported.
        self._known = self._snapshot({}, report=False)[0]

    def run(self, sink: Sink) -> None:
        if self._known is None:
            raise SourceUnavailable("ProcfsSource.run() before open()")
        while not self._stop.wait(self.interval):
            self.poll(sink)

    def poll(self, sink: Sink) -> None:
        """Take one snapshot, push the differences with the previous one, notify."""
        known = self._known if self._known is not None else {}
        current, records = self._snapshot(known, report=True)
        for record in records:
            sink.push(record)
        self._known = current
        self.polls += 1
        if records:
            sink.notify()

    def _filetime_of_start(self, start_ticks: int, boot_clock: KernelClock) -> int:
        """FILETIME of a start time from /proc (clock ticks since boot, CLOCK_BOOTTIME)."""
        return boot_clock.filetime(start_ticks * self._tick_ns)

    def _command_line(self, pid: int, comm: bytes) -> str:
        raw = read_proc(f"{self._proc}/{pid}/cmdline")
        if raw:
            return command_line_from_argv(argv_of(raw))
        return command_line_from_argv([comm])  # kernel threads and zombies have no cmdline

    def _snapshot(self, known: dict[int, _Process], report: bool) -> tuple[dict[int, _Process], list[bytes]]:
        """The processes (and threads) alive now, and (``report``) the records that tell how they differ from
        ``known``. Creations carry their start time from /proc; exits and execs the time they were noticed."""
        proc = self._proc
        now_ft = filetime_now()
        boot_clock = KernelClock(CLOCK_BOOTTIME)  # measured at each look: the wall clock may have been set
        current: dict[int, _Process] = {}
        creates: list[tuple[int, bytes]] = []  # (start ticks, record), sorted before pushing
        later: list[bytes] = []  # execs and exits, stamped with the time we noticed them
        for pid in _numeric_entries(proc):
            st = _stat(f"{proc}/{pid}/stat")
            if st is None:
                continue  # gone between listing and reading: it never existed for us
            comm, ppid, start = st
            old = known.get(pid)
            if old is not None and old.start != start:  # the pid was reused between two looks
                later.extend(self._exit_records(pid, old, now_ft))
                old = None
            entry = _Process(start, comm)
            if old is None:
                if report:
                    creates.append((start, encode_process_create(
                        self._filetime_of_start(start, boot_clock), pid, ppid, ppid, 0,
                        self._command_line(pid, comm))))
            elif report and old.comm != comm:  # an exec gives the process its new program's name
                later.append(encode_process_exec(now_ft, pid, ppid, pid, pid, self._command_line(pid, comm)))
            current[pid] = entry
            if self.threads:
                self._threads(pid, entry, old, creates, later, now_ft, boot_clock, report)
        for pid, old in known.items():
            if report and pid not in current:
                later.extend(self._exit_records(pid, old, now_ft))
        creates.sort(key=lambda c: c[0])
        return current, [r for _, r in creates] + later

    def _threads(self, pid: int, entry: _Process, old: _Process | None, creates: list, later: list,
                 now_ft: int, boot_clock: KernelClock, report: bool) -> None:
        proc = self._proc
        before = old.threads if old is not None else {}
        for tid in _numeric_entries(f"{proc}/{pid}/task"):
            if tid == pid:
                continue  # the main thread is the process itself
            start = before.get(tid)
            if start is None:
                st = _stat(f"{proc}/{pid}/task/{tid}/stat")
                if st is None:
                    continue
                start = st[2]
                if report:
                    creates.append((start, encode_thread_create(
                        self._filetime_of_start(start, boot_clock), tid, pid)))
            entry.threads[tid] = start
        for tid in before:
            if report and tid not in entry.threads:
                later.append(encode_thread_exit(now_ft, tid, pid, EXIT_CODE_UNKNOWN))

    @staticmethod
    def _exit_records(pid: int, old: _Process, now_ft: int) -> list[bytes]:
        out = [encode_thread_exit(now_ft, tid, pid, EXIT_CODE_UNKNOWN) for tid in old.threads]
        out.append(encode_process_exit(now_ft, pid, EXIT_CODE_UNKNOWN))
        return out

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self._known = None

    def stats(self) -> dict[str, int]:
        # It cannot count what it misses (lossy), so "lost" stays 0 and the class says lossy = True.
        return {"lost": 0, "parse_errors": 0, "polls": self.polls}
