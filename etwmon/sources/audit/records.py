"""Audit records into exec events: parsing ``audit(<sec>.<ms>:<serial>): name=value ...`` records, putting the
records of one serial together into an ``ExecEvent`` with the exact argv, and finding serials that never came.

The EXECVE record's shape (quoted or hex arguments, long ones split into ``aN[i]`` chunks) is the kernel's
``audit_log_execve_info`` in kernel/auditsc.c.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

from ... import records
from ...clock import filetime_from_unix_ns
from .._proc import user_name
from .protocol import (
    AUDIT_CONFIG_CHANGE, AUDIT_CWD, AUDIT_EOE, AUDIT_EXECVE, AUDIT_PATH, AUDIT_PROCTITLE, AUDIT_SYSCALL,
    EXEC_SYSCALL_NUMBERS,
)

__all__ = ["AuditRecord", "EventAssembler", "ExecEvent", "SerialTracker", "decode_value", "parse_fields",
           "parse_record"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditRecord:
    """One audit record: ``type(audit(<sec>.<ms>:<serial>): <fields>)``."""

    type: int
    sec: int
    msec: int
    serial: int
    body: str


def parse_record(msg_type: int, payload: bytes | memoryview) -> AuditRecord | None:
    """The stamp and field text of one multicast audit message, or None if it has no ``audit(...)`` stamp."""
    text = bytes(payload).rstrip(b"\0\n").decode("ascii", "surrogateescape")
    if not text.startswith("audit("):
        return None
    end = text.find("): ", 6)
    if end < 0:
        end = text.find(")", 6)
        if end < 0:
            return None
    stamp = text[6:end]
    try:
        when, serial = stamp.split(":")
        sec, msec = when.split(".")
        return AuditRecord(msg_type, int(sec), int(msec), int(serial), text[end + 3:])
    except ValueError:
        return None


def parse_fields(body: str) -> list[tuple[str, str]]:
    """``name=value`` pairs of a kernel record, in order. The kernel never puts spaces inside a value: a
    string with spaces, quotes or control bytes is hex-encoded instead of quoted."""
    out = []
    for token in body.split(" "):
        name, sep, value = token.partition("=")
        if sep:
            out.append((name, value))
    return out


def decode_value(value: str) -> bytes | None:
    """A string field as the kernel wrote it: ``"text"``, hex digits (untrusted strings), or ``(null)``."""
    if value.startswith('"'):
        return value[1:-1].encode("latin-1", "surrogateescape") if value.endswith('"') else None
    if value == "(null)":
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return value.encode("latin-1", "surrogateescape")


def _encoded_len(value: str) -> int:
    """Length the kernel counts for a chunk in ``aN_len``: quoted text without its quotes, or hex digits."""
    return len(value) - 2 if value.startswith('"') else len(value)


@dataclass
class ExecEvent:
    """An execve/execveat as the audit records of one serial describe it."""

    serial: int
    filetime: int = 0
    arch: int = 0
    syscall: int = -1
    success: bool = False
    pid: int = 0
    ppid: int = 0
    uid: int = -1
    euid: int = -1
    tty: str | None = None  # as audit writes it: "pts0", "tty1", "(none)"
    comm: bytes | None = None
    exe: bytes | None = None
    key: bytes | None = None
    argc: int = -1
    args: dict[int, bytes] = field(default_factory=dict)
    long_args: dict[int, dict[int, str]] = field(default_factory=dict)  # aN[i] chunks, as encoded
    long_lens: dict[int, int] = field(default_factory=dict)  # aN_len
    cwd: bytes | None = None
    paths: int = 0
    proctitle: bytes | None = None
    has_syscall: bool = False
    has_execve: bool = False
    ended: bool = False
    born: float = 0.0  # monotonic time of the first record, for expiry

    @property
    def is_exec(self) -> bool:
        return self.has_execve or self.has_syscall and (self.arch, self.syscall) in EXEC_SYSCALL_NUMBERS

    def argv(self) -> list[bytes] | None:
        """The exact argv, or None if records of it are missing (an arg, a chunk, or a chunk's length)."""
        if self.argc < 0:
            return None
        out = []
        for i in range(self.argc):
            if i in self.args:
                out.append(self.args[i])
                continue
            chunks = self.long_args.get(i)
            if not chunks or len(chunks) != max(chunks) + 1:
                return None
            parts = [chunks[j] for j in range(len(chunks))]
            if i in self.long_lens and sum(map(_encoded_len, parts)) != self.long_lens[i]:
                return None
            decoded = [decode_value(p) for p in parts]
            if any(d is None for d in decoded):
                return None
            out.append(b"".join(decoded))  # type: ignore[arg-type]
        return out

    def command_line(self) -> str:
        argv = self.argv()
        return records.command_line_from_argv(argv if argv is not None else [])

    def details(self) -> records.Details:
        """What the SYSCALL and CWD records say of the process at the exec, exactly: the executable, the
        directory, the effective uid and its user name, the terminal."""
        uid = self.euid if self.euid >= 0 else None
        return records.Details(
            image=os.fsdecode(self.exe) if self.exe else None,
            current_directory=os.fsdecode(self.cwd) if self.cwd else None,
            uid=uid, user=user_name(uid) if uid is not None else None, tty=_tty_name(self.tty))

    def encode(self, details: records.Details | None = None) -> bytes:
        """The ProcessExec record: pid is the process (tgid), its parent, and itself as the creator; with
        ``details`` (e.g. ``details()``), its extension block."""
        return records.encode_process_exec(self.filetime, self.pid, self.ppid, self.pid, self.pid,
                                           self.command_line(), details)


def _tty_name(tty: str | None) -> str | None:
    """audit's tty field ("pts0", "tty1", "(none)") as ps writes it ("pts/0", "tty1", None)."""
    if not tty or tty == "(none)":
        return None
    return "pts/" + tty[3:] if tty.startswith("pts") else tty


class SerialTracker:
    """Finds audit events that never arrived: serials are handed out one by one to every event the kernel
    queues, so a serial still missing two ticks after a later one showed up was lost on the way (a full
    socket buffer, or the kernel's rate limit). Events from different CPUs may arrive slightly out of order;
    the two-tick wait covers that."""

    def __init__(self, max_ahead: int = 1 << 16) -> None:
        self.next: int | None = None
        self.ahead: set[int] = set()
        self.max_seen = 0
        self._horizons: deque[int] = deque(maxlen=2)
        self.max_ahead = max_ahead
        self.missing = 0

    def see(self, serial: int) -> None:
        nxt = self.next
        if nxt is None:
            self.next = serial + 1
            self.max_seen = serial
            return
        if serial == nxt:
            nxt += 1
            ahead = self.ahead
            while ahead and nxt in ahead:
                ahead.remove(nxt)
                nxt += 1
            self.next = nxt
        elif serial > nxt:
            if serial - nxt > 1 << 31:  # wrapped around 2**32, or a reset: start again from here
                self.next, self.ahead = serial + 1, set()
            else:
                self.ahead.add(serial)
                if len(self.ahead) > self.max_ahead:
                    self._give_up_below(min(self.ahead))
        if serial > self.max_seen:
            self.max_seen = serial

    def _give_up_below(self, limit: int) -> int:
        """Count serials below ``limit`` never seen as missing; return how many."""
        nxt = self.next
        if nxt is None or limit <= nxt:
            return 0
        seen = [s for s in self.ahead if s < limit]
        self.ahead.difference_update(seen)
        lost = (limit - nxt) - len(seen)
        self.next = limit
        while self.next in self.ahead:
            self.ahead.remove(self.next)
            self.next += 1
        self.missing += lost
        return lost

    def settle(self, upto: int) -> int:
        """Every serial up to ``upto`` has had its chance (a marker logged after them came back): count the
        ones never seen."""
        return self._give_up_below(upto + 1)

    def tick(self) -> int:
        """Called periodically; returns how many more serials are now known to be missing."""
        lost = 0
        if len(self._horizons) == self._horizons.maxlen:
            lost = self._give_up_below(self._horizons[0] + 1) if self.ahead else 0
        self._horizons.append(self.max_seen)
        return lost


#: The SYSCALL record's fields an ExecEvent keeps, and how each is written (arch in hex, strings quoted or hex).
_SYSCALL_FIELDS: dict[str, Callable[[str], object]] = {
    "arch": lambda v: int(v, 16), "syscall": int, "success": lambda v: v == "yes", "pid": int, "ppid": int,
    "uid": int, "euid": int, "tty": str, "comm": decode_value, "exe": decode_value, "key": decode_value,
}


class EventAssembler:
    """Collects audit records by serial into exec events. EOE ends an event; events that never end (a record
    of theirs lost) are flushed after ``timeout`` seconds or when more than ``max_pending`` are open: emitted
    if their argv is complete, otherwise dropped and counted in ``incomplete``."""

    def __init__(self, timeout: float = 2.0, max_pending: int = 4096) -> None:
        self.timeout = timeout
        self.max_pending = max_pending
        self.pending: OrderedDict[int, ExecEvent] = OrderedDict()
        self._done: OrderedDict[int, None] = OrderedDict()  # recently ended serials, to ignore stragglers
        self.ignored: set[int] = set()
        self._ignored_order: deque[int] = deque()
        self.failed = 0  # success=no execs: no record
        self.incomplete = 0  # exec events dropped because a record of theirs never came
        self.flushed = 0  # exec events emitted without their EOE (complete otherwise)
        self.parse_errors = 0
        self.config_changes: list[AuditRecord] = []

    def feed(self, msg_type: int, payload: bytes | memoryview, now: float | None = None
             ) -> tuple[AuditRecord | None, tuple[ExecEvent, ...]]:
        """Take one message; returns its parsed stamp (or None) and the exec events it completed (usually
        none; one at an EOE; more when the pending cap pushed complete ones out)."""
        rec = parse_record(msg_type, payload)
        if rec is None:
            if msg_type >= AUDIT_SYSCALL:
                self.parse_errors += 1
            return None, ()
        return rec, self.add(rec, now)

    def add(self, rec: AuditRecord, now: float | None = None) -> tuple[ExecEvent, ...]:
        serial = rec.serial
        t = rec.type
        if t == AUDIT_CONFIG_CHANGE:
            self.config_changes.append(rec)
        if serial in self.ignored or serial in self._done:
            return ()
        out: tuple[ExecEvent, ...] = ()
        event = self.pending.get(serial)
        if event is None:
            if t == AUDIT_EOE or t not in (AUDIT_SYSCALL, AUDIT_EXECVE, AUDIT_CWD, AUDIT_PATH, AUDIT_PROCTITLE):
                return ()  # a record of an event that is not a syscall (or an end we don't track)
            # audit's time is the wall clock at syscall entry, to the millisecond (a coarse, per-tick clock)
            when = filetime_from_unix_ns(rec.sec * 1_000_000_000 + rec.msec * 1_000_000)
            event = ExecEvent(serial, when, born=time.monotonic() if now is None else now)
            self.pending[serial] = event
            if len(self.pending) > self.max_pending:
                pushed_out = self._expire_one()
                if pushed_out is not None:
                    out = (pushed_out,)
        try:
            if t == AUDIT_SYSCALL:
                self._syscall(event, rec.body)
                if not event.is_exec:
                    self._ignore(serial)
            elif t == AUDIT_EXECVE:
                self._execve(event, rec.body)
            elif t == AUDIT_EOE:
                done = self._end(serial)
                if done is not None:
                    out += (done,)
            elif t == AUDIT_CWD:
                for name, value in parse_fields(rec.body):
                    if name == "cwd":
                        event.cwd = decode_value(value)
            elif t == AUDIT_PATH:
                event.paths += 1
            elif t == AUDIT_PROCTITLE:
                for name, value in parse_fields(rec.body):
                    if name == "proctitle":
                        event.proctitle = decode_value(value)
        except (ValueError, KeyError):
            self.parse_errors += 1
            log.debug("etwmon audit: cannot parse record %r", rec)
        return out

    @staticmethod
    def _syscall(event: ExecEvent, body: str) -> None:
        event.has_syscall = True
        for name, value in parse_fields(body):
            convert = _SYSCALL_FIELDS.get(name)
            if convert is not None:
                setattr(event, name, convert(value))

    @staticmethod
    def _execve(event: ExecEvent, body: str) -> None:
        event.has_execve = True
        for name, value in parse_fields(body):
            if name == "argc":
                event.argc = int(value)
            elif name[:1] == "a":
                bracket = name.find("[")
                if bracket > 0:  # aN[i]=chunk of a long argument
                    event.long_args.setdefault(int(name[1:bracket]), {})[int(name[bracket + 1:-1])] = value
                elif name.endswith("_len"):
                    event.long_lens[int(name[1:-4])] = int(value)
                else:
                    arg = decode_value(value)
                    event.args[int(name[1:])] = b"" if arg is None else arg

    def _ignore(self, serial: int) -> None:
        self.pending.pop(serial, None)
        self.ignored.add(serial)
        self._ignored_order.append(serial)
        while len(self._ignored_order) > self.max_pending:
            self.ignored.discard(self._ignored_order.popleft())

    def _remember_done(self, serial: int) -> None:
        self._done[serial] = None
        if len(self._done) > self.max_pending:
            self._done.popitem(last=False)

    def _end(self, serial: int) -> ExecEvent | None:
        event = self.pending.pop(serial, None)
        self._remember_done(serial)
        if event is None:
            return None
        return self._finish(event, ended=True)

    def _finish(self, event: ExecEvent, ended: bool) -> ExecEvent | None:
        if not event.is_exec:
            return None  # records of an event whose SYSCALL never came and that carry no argv: not an exec
        if event.has_syscall and not event.success:
            self.failed += 1
            return None
        if not event.has_syscall or event.argv() is None:
            self.incomplete += 1
            return None
        event.ended = ended
        if not ended:
            self.flushed += 1
        return event

    def _expire_one(self) -> ExecEvent | None:
        serial, event = self.pending.popitem(last=False)
        self._remember_done(serial)
        return self._finish(event, ended=False)

    def expire(self, now: float | None = None, everything: bool = False) -> list[ExecEvent]:
        """Close events older than ``timeout`` (all of them with ``everything``); return the complete ones."""
        now = time.monotonic() if now is None else now
        out = []
        while self.pending:
            event = next(iter(self.pending.values()))
            if not everything and now - event.born < self.timeout:
                break
            done = self._expire_one()
            if done is not None:
                out.append(done)
        return out
