"""Polling fallback that needs no privilege: diff snapshots of /proc every ``interval`` seconds.

It reports processes and threads that appear and vanish between two looks, so it misses whatever lived and died
in between and never knows exit codes; it declares itself lossy for that reason.

An exec is seen as a new program name (comm) together with a new command line or a new executable; a comm that
changes alone is a rename (``prctl(PR_SET_NAME)``, a kernel thread such as ``kworker/1:1`` renaming itself as it
takes other work), not an exec. Kernel threads (``PF_KTHREAD`` in /proc/<pid>/stat) never exec.
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
    EXIT_CODE_UNKNOWN, Details, command_line_from_argv, encode_process_create, encode_process_exec,
    encode_process_exit, encode_thread_create, encode_thread_exit,
)
from ._proc import (
    argv_of, clock_tick_ns, details_now, host_and_boot_id, parse_stat, read_proc, snapshot, stat_details,
)
from .base import Sink, Source

__all__ = ["ProcfsSource", "DEFAULT_INTERVAL"]

log = logging.getLogger(__name__)

#: /proc/<pid>/stat's flags bit of a kernel thread (include/linux/sched.h).
PF_KTHREAD = 0x00200000

#: Seconds between two snapshots: short enough to catch most processes that live a few tenths of a second,
#: long enough that a snapshot of a few hundred processes costs about 1-2 % of one core.
DEFAULT_INTERVAL = 0.1


def _stat(path: str) -> tuple[bytes, int, int] | None:
    """(comm, ppid, starttime in clock ticks since boot) from a /proc stat file."""
    data = read_proc(path, 1024)
    return parse_stat(data) if data else None


def _is_kernel_thread(stat_data: bytes) -> bool:
    """PF_KTHREAD in the flags (the 9th field) of /proc/<pid>/stat."""
    fields = stat_data[stat_data.rfind(b")") + 2:].split()
    try:
        return bool(int(fields[6]) & PF_KTHREAD)
    except (IndexError, ValueError):
        return False


def _numeric_entries(path: str) -> list[int]:
    try:
        with os.scandir(path) as it:
            return [int(e.name) for e in it if e.name.isdigit()]
    except OSError:
        return []


@dataclass(frozen=True)
class _Program:
    """What a process runs, as far as /proc lets this user see: a digest of its command line, and its executable
    (None where /proc/<pid>/exe cannot be read: another user's process, without privilege)."""

    cmdline: int
    exe: str | None

    def differs_from(self, other: "_Program") -> bool:
        return self.cmdline != other.cmdline or (self.exe is not None and other.exe is not None
                                                 and self.exe != other.exe)


@dataclass
class _Process:
    start: int  # clock ticks since boot: (pid, start) names one process even when the pid is reused
    comm: bytes
    kernel: bool = False  # a kernel thread: it renames itself, never execs
    program: _Program | None = None  # None for kernel threads
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
        "process_snapshot", "details_from_proc", "image", "current_directory", "uid", "user", "tty", "session",
        "cgroup", "container_id",
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

    def _details(self, pid: int, stat: tuple, boot_clock: KernelClock) -> Details | None:
        """What /proc says of the process now, for the identity stage (when it is on)."""
        if not self.details:
            return None
        return details_now(self._proc, pid, stat, self._tick_ns, boot_clock)

    def host_and_boot_id(self) -> bytes:
        return host_and_boot_id(self._proc)

    def process_snapshot(self) -> list:
        return snapshot(self._proc)

    def _program(self, pid: int) -> tuple[_Program, bytes | None]:
        """What ``pid`` runs now, and its raw /proc/<pid>/cmdline (None if unreadable or empty)."""
        raw = read_proc(f"{self._proc}/{pid}/cmdline")
        try:
            exe: str | None = os.readlink(f"{self._proc}/{pid}/exe")
        except OSError:
            exe = None
        return _Program(hash(raw or b""), exe), raw

    @staticmethod
    def _command_line(raw: bytes | None, comm: bytes) -> str:
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
            data = read_proc(f"{proc}/{pid}/stat", 1024)
            full = stat_details(data) if data else None
            if full is None:
                continue  # gone between listing and reading: it never existed for us
            comm, ppid, _, _, start = full
            old = known.get(pid)
            if old is not None and old.start != start:  # the pid was reused between two looks
                later.extend(self._exit_records(pid, old, now_ft))
                old = None
            entry = _Process(start, comm, _is_kernel_thread(data))
            if old is None:
                raw = None
                if not entry.kernel:
                    entry.program, raw = self._program(pid)
                if report:
                    creates.append((start, encode_process_create(
                        self._filetime_of_start(start, boot_clock), pid, ppid, ppid, 0,
                        self._command_line(raw, comm), self._details(pid, full, boot_clock))))
            elif old.comm == comm or (entry.kernel and old.kernel):  # the same program (a kernel thread renamed)
                entry.program = old.program
            else:  # a new name: an exec, or a rename (prctl) if the command line and executable stay the same
                entry.program, raw = self._program(pid)
                if report and (old.program is None or entry.program.differs_from(old.program)):
                    later.append(encode_process_exec(now_ft, pid, ppid, pid, pid, self._command_line(raw, comm),
                                                     self._details(pid, full, boot_clock)))
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
