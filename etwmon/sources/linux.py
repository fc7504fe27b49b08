"""The ``linux`` source: everything on Linux with exact command lines, from the proc connector (forks, threads,
exits, and every exec) joined with the audit log (each exec's exact argv), each exec reported once.

``ExecJoin`` is the join; the two inner sources are ``etwmon.sources.netlink`` and ``etwmon.sources.audit``.
See docs/linux.md and docs/audit.md.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .. import records
from .audit import DEFAULT_RCVBUF, AuditSource
from .audit.state import DEFAULT_BACKLOG_LIMIT, DEFAULT_KEY
from .base import Sink, Source
from .netlink import NetlinkSource

__all__ = ["LinuxSource"]

log = logging.getLogger(__name__)

_TYPE_PID = struct.Struct("<h14xI")  # ItemHeader.Type, then the first ULONG after the header
_TYPE_TID_PID = struct.Struct("<h14xII")
_PARENT = struct.Struct("<20xI")  # ProcessCreateInfo.ParentProcessId
_TIME_OFFSET = 8  # ItemHeader.Time
_EXEC, _PROCESS_EXIT, _THREAD_CREATE, _THREAD_EXIT = (int(records.ItemType.ProcessExec),
                                                      int(records.ItemType.ProcessExit),
                                                      int(records.ItemType.ThreadCreate),
                                                      int(records.ItemType.ThreadExit))
_PROCESS_CREATE = int(records.ItemType.ProcessCreate)


def _with_time_of(record: bytes, other: bytes) -> bytes:
    """``record`` with the Time field of ``other``: an exec as audit describes it, at the proc connector's
    nanosecond time of the same exec (audit's is the millisecond wall clock of a coarse, per-tick clock, so it
    would put execs before the fork that made their process)."""
    return record[:_TIME_OFFSET] + other[_TIME_OFFSET:_TIME_OFFSET + 8] + record[_TIME_OFFSET + 8:]


def _record_pid(record: bytes) -> tuple[int, int]:
    """(type, process id) of an encoded record; process id 0 for records that name no process."""
    item, first = _TYPE_PID.unpack_from(record)
    if item in (_THREAD_CREATE, _THREAD_EXIT):
        return item, _TYPE_TID_PID.unpack_from(record)[2]
    return item, first


@dataclass
class _Pending:
    """A proc connector exec waiting for audit's record of it, and that process's records held behind it."""

    deadline: float
    record: bytes
    held: list[bytes] = field(default_factory=list)


class ExecJoin:
    """Joins the two streams of LinuxSource so each exec is reported once, with audit's exact argv.

    The proc connector reports every exec (its losses are counted exactly); audit reports the argv. A proc
    connector exec waits for audit's record of the same pid: when it comes, only audit's is pushed, stamped with
    the proc connector's time (the better clock, and the one the process's other records carry); when it
    doesn't (a process that predates audit's first enabling has no audit context, or audit lost the event), the
    proc connector's record is pushed instead (command line read from /proc) and counted in ``fallback``. It
    waits ``hold`` seconds and until the audit reader has found its socket empty since (``caught_up()``), so a
    reader that is merely behind is waited for — but never more than ``max_wait`` seconds in all.

    Records of a process whose exec is waiting (its exit, its threads) are held behind it, so each process still
    reads create, exec, exit in that order. An audit exec that arrives first waits (``hold`` seconds at most)
    for the proc connector's exec and is pushed in its place, so it never comes before the process's create.
    """

    def __init__(self, sink: Sink, hold: float = 2.0, on_exec: Callable[[int, bytes], None] | None = None,
                 caught_up: Callable[[], float] | None = None, max_wait: float = 30.0) -> None:
        self.sink = sink
        self.hold = hold
        self.max_wait = max(max_wait, hold)
        self.caught_up = caught_up or _no_reader
        self.on_exec = on_exec
        self._lock = threading.Lock()
        self._pending: dict[int, deque[_Pending]] = {}
        self._early_audit: dict[int, deque[tuple[float, bytes]]] = {}  # audit execs ahead of the proc connector
        # Audit execs pushed without their proc connector exec: if that turns up late (its reader was behind),
        # it is the same exec, not a new one (until max_wait).
        self._audit_alone: dict[int, deque[float]] = {}
        self._behind: dict[int, int] = {}  # child pid -> the parent whose exec its records wait behind
        self.matched = 0  # execs both reported: audit's pushed
        self.fallback = 0  # proc connector execs audit never reported: pushed as they were
        self.audit_only = 0  # audit execs the proc connector never reported (its losses are counted there)
        self.held = 0  # records that waited behind an exec
        self.late = 0  # proc connector execs that came after audit's had been pushed alone: dropped

    # The proc connector's thread.
    def netlink_push(self, record: bytes) -> None:
        item, pid = _record_pid(record)
        pending = self._pending
        if item != _EXEC and pid not in pending and not self._behind and (
                item != _PROCESS_CREATE or _PARENT.unpack_from(record)[0] not in pending):
            self.sink.push(record)  # the common case: only this thread adds to pending
            return
        with self._lock:
            self._netlink_locked(bytes(record), item, pid)

    def _netlink_locked(self, record: bytes, item: int, pid: int) -> None:
        pending = self._pending
        parent = self._behind.get(pid)
        if parent is not None:  # its create waits behind its parent's exec: so does everything after it
            waiting = pending.get(parent)
            if waiting:
                waiting[-1].held.append(record)
                self.held += 1
                return
            del self._behind[pid]
        if item == _PROCESS_CREATE:
            # A child forked after its parent's exec must not reach the reader before that exec (the identity
            # stage takes the child's parent fields from what the parent runs then).
            ppid = _PARENT.unpack_from(record)[0]
            ahead = ppid if ppid in pending else self._behind.get(ppid)  # (the parent itself may wait behind one)
            waiting = pending.get(ahead) if ahead is not None and ppid != pid else None
            if waiting:
                waiting[-1].held.append(record)
                self._behind[pid] = ahead
                self.held += 1
                return
        if item == _EXEC:
            early = self._early_audit.get(pid)
            if early:
                _, exact = early.popleft()
                if not early:
                    del self._early_audit[pid]
                self.matched += 1
                self.sink.push(_with_time_of(exact, record))
                return
            alone = self._audit_alone.get(pid)
            if alone:
                alone.popleft()
                if not alone:
                    del self._audit_alone[pid]
                self.late += 1
                return
            pending.setdefault(pid, deque()).append(_Pending(time.monotonic() + self.hold, record))
            return
        waiting = pending.get(pid)
        if waiting:
            waiting[-1].held.append(record)
            self.held += 1
            return
        self.sink.push(record)

    def _release(self, parent: int, held: list[bytes]) -> None:
        """The records that waited behind ``parent``'s exec, now that it is pushed: its own go out in order; its
        children's go through the join again (a child's exec still waits for audit's record of it)."""
        for record in held:
            item, pid = _record_pid(record)
            if pid == parent:
                self.sink.push(record)
                continue
            if self._behind.get(pid) == parent:
                del self._behind[pid]
            self._netlink_locked(record, item, pid)

    # The audit thread.
    def audit_push(self, record: bytes) -> None:
        _, pid = _record_pid(record)
        with self._lock:
            waiting = self._pending.get(pid)
            if waiting:
                first = waiting.popleft()
                if not waiting:
                    del self._pending[pid]
                self.matched += 1
                self.sink.push(_with_time_of(record, first.record))
                self._release(pid, first.held)
            else:
                self._early_audit.setdefault(pid, deque()).append((time.monotonic() + self.hold, bytes(record)))
        if self.on_exec is not None:
            self.on_exec(pid, record)

    def expire(self, now: float | None = None, everything: bool = False) -> bool:
        """Push the execs whose wait is over (either side's). True if anything was pushed."""
        now = time.monotonic() if now is None else now
        caught_up = self.caught_up()
        late = self.max_wait - self.hold

        def due(entry: _Pending) -> bool:
            return everything or entry.deadline <= now and (caught_up >= entry.deadline
                                                            or now >= entry.deadline + late)

        pushed = False
        with self._lock:
            for pid in [p for p, q in self._pending.items() if due(q[0])]:
                queue = self._pending[pid]
                while queue and due(queue[0]):
                    entry = queue.popleft()
                    self.fallback += 1
                    self.sink.push(entry.record)
                    self._release(pid, entry.held)
                    pushed = True
                if not queue:
                    del self._pending[pid]
            for pid in [p for p, q in self._early_audit.items() if everything or q[0][0] <= now]:
                early = self._early_audit[pid]
                while early and (everything or early[0][0] <= now):
                    self.sink.push(early.popleft()[1])  # the proc connector lost this one, or is far behind
                    self.audit_only += 1
                    self._audit_alone.setdefault(pid, deque()).append(now + self.max_wait)
                    pushed = True
                if not early:
                    del self._early_audit[pid]
            for pid in [p for p, q in self._audit_alone.items() if q[0] <= now]:
                alone = self._audit_alone[pid]
                while alone and alone[0] <= now:
                    alone.popleft()
                if not alone:
                    del self._audit_alone[pid]
        return pushed

    def waiting(self) -> int:
        with self._lock:
            return sum(map(len, self._pending.values())) + sum(map(len, self._early_audit.values()))

    def detach(self) -> None:
        """Drop the sink and the callbacks once both streams have ended (the counters stay): they lead back to
        the source and to the ring, and a cycle through them would keep a stopped Monitor's ring alive until
        the next full garbage collection."""
        self.sink = None  # type: ignore[assignment]
        self.on_exec = None
        self.caught_up = _never_caught_up


def _no_reader() -> float:
    return float("inf")  # no reader to wait for: whatever it read, it read


def _never_caught_up() -> float:
    return 0.0


class _SideSink:
    """A Sink for one of LinuxSource's two inner sources: pushes go through the join."""

    def __init__(self, push: Callable[[bytes], None], push_lost: Callable[[int], None],
                 notify: Callable[[], None]) -> None:
        self.push = push
        self.push_lost = push_lost
        self.notify = notify


class LinuxSource(Source):
    """Everything on Linux: forks, threads and exits from the proc connector, execs with their exact argv from
    the audit log (root). Each exec is reported once (see ``ExecJoin``).

    Options: ``exec_wait`` (seconds a proc connector exec waits for audit's record, default 2), ``rcvbuf``
    (the proc connector socket), ``audit_rcvbuf``, ``key``, ``backlog_limit``, ``probe`` (AuditSource's).
    """

    name = "linux"
    # Loss is the proc connector's exact count: an exec audit misses still comes through as a fallback record.
    lossy = NetlinkSource.lossy
    # The details are audit's, exact; netlink's /proc reads only fill the execs audit did not report (those
    # carry EventFlags.PROCFS), so session, cgroup and container id are not declared.
    delivers = (NetlinkSource.delivers - {"details_from_proc", "session", "cgroup", "container_id"}) \
        | AuditSource.delivers

    def __init__(self, *, exec_wait: float = 2.0, rcvbuf: int = 8 << 20, audit_rcvbuf: int = DEFAULT_RCVBUF,
                 key: str = DEFAULT_KEY, backlog_limit: int = DEFAULT_BACKLOG_LIMIT, probe: bool = True) -> None:
        super().__init__()
        if not exec_wait > 0:
            raise ValueError(f"exec_wait must be > 0 seconds, not {exec_wait!r}")
        self.exec_wait = exec_wait
        # exec_events stay on: the join needs them to see every exec; cmdline stays on for the fallback.
        self.netlink = NetlinkSource(exec_events=True, cmdline=True, rcvbuf=rcvbuf)
        self.audit = AuditSource(key=key, backlog_limit=backlog_limit, rcvbuf=audit_rcvbuf, probe=probe)
        self.join: ExecJoin | None = None
        self._audit_lost = 0
        self._stop = threading.Event()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        reason = NetlinkSource.unavailable_reason()
        if reason is not None:
            return f"proc connector: {reason}"
        reason = AuditSource.unavailable_reason()
        return None if reason is None else f"audit: {reason}"

    # What a killed instance leaves is its audit part's (the proc connector's subscription ends with its socket).
    @classmethod
    def stale_state(cls) -> list[str]:
        return AuditSource.stale_state()

    @classmethod
    def cleanup(cls) -> list[str]:
        return AuditSource.cleanup()

    def open(self) -> None:
        self.netlink.details = self.audit.details = self.details
        self.netlink.open()
        try:
            self.audit.open()
        except BaseException:
            self.netlink.close()
            raise
        self._stop.clear()

    def host_and_boot_id(self) -> bytes:
        return self.netlink.host_and_boot_id()

    def process_snapshot(self) -> list:
        return self.netlink.process_snapshot()

    def _exact_line_for_children(self, pid: int, record: bytes) -> None:
        """Children forked later inherit audit's exact command line rather than one read from /proc."""
        (event,) = records.parse(record)
        self.netlink.set_command_line(pid, event.command_line)  # type: ignore[attr-defined]

    def _count_audit_lost(self, count: int) -> None:
        # Not pushed: an exec audit lost still arrives through the proc connector (ExecJoin.fallback).
        self._audit_lost += count

    def run(self, sink: Sink) -> None:
        audit = self.audit
        join = self.join = ExecJoin(sink, hold=self.exec_wait, on_exec=self._exact_line_for_children,
                                    caught_up=lambda: audit.caught_up_at)
        sides = {
            self.netlink: _SideSink(join.netlink_push, sink.push_lost, sink.notify),
            self.audit: _SideSink(join.audit_push, self._count_audit_lost, sink.notify),
        }
        errors: list[BaseException] = []

        def side(source: Source) -> None:
            try:
                source.run(sides[source])
            except BaseException as exc:  # kept and raised from run(): never die silently
                errors.append(exc)
                self._stop.set()

        threads = [threading.Thread(target=side, args=(s,), name=f"etwmon-linux-{s.name}", daemon=True)
                   for s in (self.netlink, self.audit)]
        for t in threads:
            t.start()
        try:
            while not self._stop.wait(min(0.25, self.exec_wait / 4)):
                if join.expire():
                    sink.notify()
        finally:
            self.netlink.stop()
            self.audit.stop()
            stuck = False
            for t in threads:
                t.join(5.0)
                if t.is_alive():
                    stuck = True
                    log.error("etwmon linux: %s did not stop", t.name)
            join.expire(everything=True)
            sink.notify()
            if not stuck:
                join.detach()
        if errors:
            raise errors.pop()

    def stop(self) -> None:
        self._stop.set()
        self.netlink.stop()
        self.audit.stop()

    def close(self) -> None:
        try:
            self.audit.close()
        finally:
            self.netlink.close()

    def stats(self) -> dict[str, int]:
        net = self.netlink.stats()
        aud = self.audit.stats()
        out = {"lost": net.get("lost", 0), "parse_errors": net.get("parse_errors", 0) + aud.get("parse_errors", 0)}
        out.update({f"netlink_{k}": v for k, v in net.items()})
        out.update({f"audit_{k}": v for k, v in aud.items()})
        join = self.join
        if join is not None:
            out.update(exec_matched=join.matched, exec_fallback=join.fallback, exec_audit_only=join.audit_only,
                       exec_late=join.late, exec_waiting=join.waiting(), held=join.held)
        return out
