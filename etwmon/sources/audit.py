"""Exact command lines on Linux from the kernel's audit log, and the combined "linux" source built on it.

``AuditSource`` installs its own execve/execveat audit rule and reads the records the kernel multicasts to
read-only listeners (``AUDIT_NLGRP_READLOG``, next to any running auditd): the EXECVE record holds argv as the
kernel copied it at exec time, so short-lived processes get their exact command line. ``LinuxSource`` joins it
with the proc connector (``etwmon.sources.netlink``) for forks, threads and exits. See docs/audit.md.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import platform
import select
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from .. import records
from ..errors import SourceUnavailable
from .base import Sink, Source

__all__ = [
    "AuditSource", "LinuxSource", "AuditControl", "AuditStatus", "AuditRule", "AuditRecord", "ExecEvent",
    "EventAssembler", "SerialTracker", "NetlinkTransport", "Transport", "TransportFactory", "RuleKey",
    "parse_record", "parse_fields", "exec_rules", "audit_unavailable_reason", "ExecJoin",
]

log = logging.getLogger(__name__)

# --- kernel constants (include/uapi/linux/audit.h, linux/netlink.h) ----------------------------------------

NETLINK_AUDIT = 9
AUDIT_NLGRP_READLOG = 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
AUDIT_GET, AUDIT_SET, AUDIT_ADD_RULE, AUDIT_DEL_RULE, AUDIT_LIST_RULES = 1000, 1001, 1011, 1012, 1013
AUDIT_SYSCALL, AUDIT_PATH, AUDIT_CONFIG_CHANGE, AUDIT_CWD, AUDIT_EXECVE = 1300, 1302, 1305, 1307, 1309
AUDIT_EOE, AUDIT_PROCTITLE = 1320, 1327
AUDIT_TRUSTED_APP = 1121  # a free-text user message: etwmon's markers
AUDIT_STATUS_ENABLED, AUDIT_STATUS_BACKLOG_LIMIT = 0x1, 0x10
AUDIT_FILTER_EXIT, AUDIT_ALWAYS = 0x04, 2
AUDIT_ARCH, AUDIT_FILTERKEY = 11, 210
AUDIT_EQUAL = 0x40000000
AUDIT_BITMASK_SIZE = AUDIT_MAX_FIELDS = 64
AUDIT_MAX_KEY_LEN = 256
AUDIT_LOCKED = 2  # status.enabled when `auditctl -e 2` made the configuration immutable until reboot
CAP_AUDIT_CONTROL, CAP_AUDIT_READ = 30, 37
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

_NLMSGHDR = struct.Struct("=IHHII")
_STATUS = struct.Struct("=11I")  # struct audit_status as of Linux 5.x/6.x (44 bytes); older kernels send less
_RULE_HEAD = struct.Struct(f"=3I{AUDIT_BITMASK_SIZE}I{AUDIT_MAX_FIELDS}I{AUDIT_MAX_FIELDS}I{AUDIT_MAX_FIELDS}II")
_ERRNO = struct.Struct("=i")

#: (AUDIT_ARCH value, execve, execveat) per syscall table a machine runs: native first, then its 32-bit one.
_EXEC_SYSCALLS: dict[str, list[tuple[int, int, int]]] = {
    "x86_64": [(0xC000003E, 59, 322), (0x40000003, 11, 358)],  # b64, b32 (i386)
    "aarch64": [(0xC00000B7, 221, 281), (0x40000028, 11, 387)],  # b64, b32 (arm eabi)
    "riscv64": [(0xC00000F3, 221, 281)],
    "ppc64le": [(0xC0000015, 11, 362)],
    "s390x": [(0x80000016, 11, 354)],
}

#: What etwmon raises backlog_limit to while it runs (auditd's own sample rules use 8192): a storm then waits
#: less in audit_log_start for kauditd, and a short stall of the reader does not lose records.
DEFAULT_BACKLOG_LIMIT = 8192
DEFAULT_RCVBUF = 32 << 20
DEFAULT_KEY = "etwmon"
_LOCK_PATHS = ("/run/lock/etwmon-audit.lock", os.path.join(tempfile.gettempdir(), "etwmon-audit.lock"))


# --- transport ---------------------------------------------------------------------------------------------


class Transport(Protocol):
    """One NETLINK_AUDIT socket: what AuditControl and the log reader need (tests pass canned ones)."""

    def send(self, data: bytes) -> None: ...
    def recv(self, bufsize: int) -> bytes: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


#: Makes a Transport; ``groups`` is the netlink multicast bitmask to bind (0: requests only).
TransportFactory = Callable[[int], Transport]


class NetlinkTransport:
    """A real NETLINK_AUDIT socket. ``groups=1`` (AUDIT_NLGRP_READLOG) needs CAP_AUDIT_READ."""

    def __init__(self, groups: int = 0, rcvbuf: int | None = None, timeout: float | None = 2.0) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT)
        try:
            if rcvbuf:
                try:
                    self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
                except OSError:  # without CAP_NET_ADMIN: as much as rmem_max allows
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, groups))
            self.sock.settimeout(timeout)
        except BaseException:
            self.sock.close()
            raise

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (0, 0))

    def recv(self, bufsize: int) -> bytes:
        return self.sock.recv(bufsize)

    def recv_into(self, buffer: bytearray | memoryview) -> int:
        return self.sock.recv_into(buffer)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def _default_transport(groups: int) -> Transport:
    return NetlinkTransport(groups, rcvbuf=DEFAULT_RCVBUF if groups else None, timeout=None if groups else 2.0)


# --- control: status and rules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditStatus:
    """``struct audit_status`` as AUDIT_GET returns it."""

    mask: int = 0
    enabled: int = 0
    failure: int = 0
    pid: int = 0
    rate_limit: int = 0
    backlog_limit: int = 0
    lost: int = 0
    backlog: int = 0
    feature_bitmap: int = 0
    backlog_wait_time: int = 0
    backlog_wait_time_actual: int = 0

    @classmethod
    def unpack(cls, payload: bytes) -> "AuditStatus":
        data = bytes(payload[:_STATUS.size]).ljust(_STATUS.size, b"\0")
        return cls(*_STATUS.unpack(data))

    def pack(self) -> bytes:
        return _STATUS.pack(self.mask, self.enabled, self.failure, self.pid, self.rate_limit, self.backlog_limit,
                            self.lost, self.backlog, self.feature_bitmap, self.backlog_wait_time,
                            self.backlog_wait_time_actual)


@dataclass(frozen=True)
class AuditRule:
    """``struct audit_rule_data``: a syscall filter rule. ``fields`` are (field, op, value) with op in the
    AUDIT_EQUAL style; string fields (the key) take their text from ``strings`` in order."""

    flags: int
    action: int
    mask: tuple[int, ...]
    fields: tuple[tuple[int, int, int], ...]
    strings: bytes = b""

    def pack(self) -> bytes:
        n = len(self.fields)
        pad = [0] * (AUDIT_MAX_FIELDS - n)
        return _RULE_HEAD.pack(
            self.flags, self.action, n, *self.mask, *[f for f, _, _ in self.fields], *pad,
            *[v for _, _, v in self.fields], *pad, *[op for _, op, _ in self.fields], *pad, len(self.strings),
        ) + self.strings

    @classmethod
    def unpack(cls, payload: bytes) -> "AuditRule":
        values = _RULE_HEAD.unpack_from(payload)
        flags, action, n = values[:3]
        mask = tuple(values[3:3 + AUDIT_BITMASK_SIZE])
        base = 3 + AUDIT_BITMASK_SIZE
        fields = values[base:base + n]
        vals = values[base + AUDIT_MAX_FIELDS:base + AUDIT_MAX_FIELDS + n]
        ops = values[base + 2 * AUDIT_MAX_FIELDS:base + 2 * AUDIT_MAX_FIELDS + n]
        buflen = values[-1]
        strings = bytes(payload[_RULE_HEAD.size:_RULE_HEAD.size + buflen])
        return cls(flags, action, mask, tuple(zip(fields, ops, vals)), strings)

    @property
    def key(self) -> str | None:
        """The rule's key (``-k``), or None. Several keys are joined by \\x01 in one field (auditctl's way)."""
        offset = 0
        for f, _, value in self.fields:
            if f == AUDIT_FILTERKEY:
                return self.strings[offset:offset + value].decode("utf-8", "replace")
            if f in _STRING_FIELDS:
                offset += value
        return None

    @property
    def syscalls(self) -> set[int]:
        return {i * 32 + b for i, word in enumerate(self.mask) for b in range(32) if word >> b & 1}

    @property
    def arch(self) -> int | None:
        for f, _, value in self.fields:
            if f == AUDIT_ARCH:
                return value
        return None


# Rule fields whose value is a string length in the buffer (audit.h): subj/obj labels, watch, dir, key, exe.
_STRING_FIELDS = frozenset({13, 14, 15, 16, 17, 19, 20, 21, 22, 23, 105, 107, 210, 112})


def _machine() -> str:
    machine = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine.lower(), machine)


def exec_rules(key: str, machine: str | None = None) -> list[AuditRule]:
    """``-a always,exit -F arch=<each> -S execve -S execveat -k <key>`` for every syscall table this machine
    runs (64- and 32-bit). Raises SourceUnavailable on a machine whose syscall numbers etwmon doesn't know."""
    machine = machine or _machine()
    tables = _EXEC_SYSCALLS.get(machine)
    if not tables:
        raise SourceUnavailable(f"the audit source does not know the execve syscall numbers of {machine!r}")
    text = key.encode()
    if not 0 < len(text) <= AUDIT_MAX_KEY_LEN:
        raise ValueError(f"an audit key is 1-{AUDIT_MAX_KEY_LEN} bytes, not {len(text)}")
    rules = []
    for arch, *numbers in tables:
        mask = [0] * AUDIT_BITMASK_SIZE
        for nr in numbers:
            mask[nr // 32] |= 1 << (nr % 32)
        rules.append(AuditRule(AUDIT_FILTER_EXIT, AUDIT_ALWAYS, tuple(mask),
                               ((AUDIT_ARCH, AUDIT_EQUAL, arch), (AUDIT_FILTERKEY, AUDIT_EQUAL, len(text))), text))
    return rules


class AuditError(OSError):
    """The kernel answered an audit request with an error (errno set)."""


class AuditControl:
    """Requests to the kernel's audit subsystem over NETLINK_AUDIT: status, enable, backlog, rules."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._seq = int(time.time()) & 0xFFFF

    def close(self) -> None:
        self.transport.close()

    def _request(self, msg_type: int, payload: bytes = b"", until: int = NLMSG_ERROR) -> list[tuple[int, bytes]]:
        """Send one request; return its (type, payload) replies. ``until``: NLMSG_ERROR waits for the ACK
        (changes), a reply type returns at the first reply of that type (AUDIT_GET: the kernel may send the
        status after an ACK, so none is asked for), NLMSG_DONE collects a dump. Errors raise AuditError."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        flags = NLM_F_REQUEST | (NLM_F_ACK if until == NLMSG_ERROR else 0)
        self.transport.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(payload), msg_type, flags, seq, 0) + payload)
        replies: list[tuple[int, bytes]] = []
        while True:
            data = self.transport.recv(1 << 16)
            if not data:
                raise AuditError(errno.EIO, "audit netlink socket closed")
            offset = 0
            while offset + _NLMSGHDR.size <= len(data):
                length, rtype, _rflags, rseq, _pid = _NLMSGHDR.unpack_from(data, offset)
                if length < _NLMSGHDR.size:
                    break
                body = data[offset + _NLMSGHDR.size:offset + length]
                offset += (length + 3) & ~3
                if rseq != seq:
                    continue  # a late reply to an earlier request
                if rtype == NLMSG_ERROR:
                    code = -_ERRNO.unpack_from(body)[0] if len(body) >= 4 else errno.EIO
                    if code:
                        raise AuditError(code, f"{os.strerror(code)} (audit request {msg_type})")
                    if until == NLMSG_ERROR:
                        return replies
                    continue
                if rtype == NLMSG_DONE:
                    if until == NLMSG_DONE:
                        return replies
                    continue
                replies.append((rtype, body))
                if rtype == until:
                    return replies

    def status(self) -> AuditStatus:
        for rtype, body in self._request(AUDIT_GET, until=AUDIT_GET):
            if rtype == AUDIT_GET:
                return AuditStatus.unpack(body)
        raise AuditError(errno.EPROTO, "no status in the kernel's reply to AUDIT_GET")

    def set_status(self, *, enabled: int | None = None, backlog_limit: int | None = None) -> None:
        mask = 0
        if enabled is not None:
            if enabled == AUDIT_LOCKED:
                raise ValueError("etwmon never locks the audit configuration")
            mask |= AUDIT_STATUS_ENABLED
        if backlog_limit is not None:
            mask |= AUDIT_STATUS_BACKLOG_LIMIT
        self._request(AUDIT_SET, AuditStatus(mask=mask, enabled=enabled or 0,
                                             backlog_limit=backlog_limit or 0).pack())

    def list_rules(self) -> list[AuditRule]:
        # No ACK: the kernel sends the list from a worker thread, so an ACK could come before the rules.
        return [AuditRule.unpack(body) for rtype, body in self._request(AUDIT_LIST_RULES, until=NLMSG_DONE)
                if rtype == AUDIT_LIST_RULES]

    def user_message(self, text: str) -> None:
        """Log a user message (AUDIT_TRUSTED_APP; needs CAP_AUDIT_WRITE): it gets a serial like any event."""
        self._request(AUDIT_TRUSTED_APP, text.encode() + b"\0")

    def add_rule(self, rule: AuditRule) -> None:
        self._request(AUDIT_ADD_RULE, rule.pack())

    def delete_rule(self, rule: AuditRule) -> None:
        # A listed rule carries its list number in flags; the kernel takes it back the same way.
        self._request(AUDIT_DEL_RULE, rule.pack())


# --- rule keys: who installed a rule, and what audit looked like before -----------------------------------


def _process_start(pid: int) -> int | None:
    """Start time (clock ticks since boot) of ``pid``, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    try:
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


@dataclass(frozen=True)
class RuleKey:
    """The key etwmon tags its rules with: ``<prefix>:<pid>:<start>:e<enabled>:b<backlog_limit>``.

    Owner pid and start time tell a live instance from a killed one (pid reuse included); the audit state
    from before etwmon touched it travels with the rule, so whichever instance stops last restores it even
    after the one that changed it was killed."""

    prefix: str
    pid: int
    start: int
    enabled: int
    backlog_limit: int

    def __str__(self) -> str:
        return f"{self.prefix}:{self.pid}:{self.start}:e{self.enabled}:b{self.backlog_limit}"

    @classmethod
    def parse(cls, text: str | None, prefix: str) -> "RuleKey | None":
        if not text:
            return None
        for key in text.split("\x01"):  # auditctl joins several keys with \x01
            parts = key.split(":")
            if len(parts) == 5 and parts[0] == prefix and parts[3][:1] == "e" and parts[4][:1] == "b":
                try:
                    return cls(prefix, int(parts[1]), int(parts[2]), int(parts[3][1:]), int(parts[4][1:]))
                except ValueError:
                    return None
        return None

    def owner_alive(self) -> bool:
        return _process_start(self.pid) == self.start


class _StateLock:
    """Serialises etwmon instances changing the machine-wide audit state (released by the kernel if killed)."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self._fd: int | None = None

    def __enter__(self) -> "_StateLock":
        for path in _LOCK_PATHS:
            try:
                self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                break
            except OSError:
                continue
        if self._fd is None:
            return self  # nowhere to lock: still correct for a single instance
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("etwmon audit: waited %.0f s for %s; going on without it", self.timeout, path)
                    return self
                time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


# --- records and events ---------------------------------------------------------------------------------------


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
        return self.has_execve or self.has_syscall and (self.arch, self.syscall) in _EXEC_NUMBERS

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

    def encode(self) -> bytes:
        """The ProcessExec record: pid is the process (tgid), its parent, and itself as the creator."""
        return records.encode_process_exec(self.filetime, self.pid, self.ppid, self.pid, self.pid,
                                           self.command_line())


_EXEC_NUMBERS = frozenset((arch, nr) for tables in _EXEC_SYSCALLS.values() for arch, *nrs in tables for nr in nrs)
_INT_FIELDS = {"pid": "pid", "ppid": "ppid", "uid": "uid", "syscall": "syscall"}


def _filetime(sec: int, msec: int) -> int:
    return (sec * 1000 + msec) * 10_000 + records.FILETIME_UNIX_EPOCH


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
            event = ExecEvent(serial, _filetime(rec.sec, rec.msec), born=time.monotonic() if now is None else now)
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
            if name == "arch":
                event.arch = int(value, 16)
            elif name == "syscall":
                event.syscall = int(value)
            elif name == "success":
                event.success = value == "yes"
            elif name == "pid":
                event.pid = int(value)
            elif name == "ppid":
                event.ppid = int(value)
            elif name == "uid":
                event.uid = int(value)
            elif name == "comm":
                event.comm = decode_value(value)
            elif name == "exe":
                event.exe = decode_value(value)
            elif name == "key":
                event.key = decode_value(value)

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


# --- availability ---------------------------------------------------------------------------------------------


def _has_capability(cap: int) -> bool:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def _status_problem(control: AuditControl) -> tuple[AuditStatus | None, str | None]:
    try:
        status = control.status()
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return None, ("the kernel refused audit control (EPERM): needs CAP_AUDIT_CONTROL in the host's user "
                          "namespace — containers usually lack it; use the 'netlink' source")
        if exc.errno == errno.ECONNREFUSED:
            return None, ("the kernel refused the audit request (ECONNREFUSED): audit works only from the host's "
                          "user namespace, not inside a container; use the 'netlink' source")
        return None, f"cannot query the audit status: {exc}"
    if status.enabled == AUDIT_LOCKED:
        return status, ("the audit configuration is locked (enabled=2, `auditctl -e 2`): rules cannot be added "
                        "until reboot; use the 'netlink' source")
    return status, None


def audit_unavailable_reason(transport_factory: TransportFactory = _default_transport) -> str | None:
    """Why the audit source cannot work here (with the fix), or None. Opens and closes one socket."""
    if not sys.platform.startswith("linux"):
        return "needs Linux (the kernel audit subsystem)"
    if os.geteuid() != 0 or not (_has_capability(CAP_AUDIT_CONTROL) and _has_capability(CAP_AUDIT_READ)):
        return ("needs root (CAP_AUDIT_CONTROL and CAP_AUDIT_READ): run as root, or use source='netlink' "
                "(command lines read from /proc: a short-lived process's can be missed)")
    if _machine() not in _EXEC_SYSCALLS:
        return f"the audit source does not know the execve syscall numbers of {_machine()!r}"
    try:
        transport = transport_factory(0)
    except OSError as exc:
        return f"cannot open a NETLINK_AUDIT socket ({exc}): kernel built without CONFIG_AUDIT?"
    control = AuditControl(transport)
    try:
        return _status_problem(control)[1]
    finally:
        control.close()


def _proc_net_netlink_drops(inode: int) -> int | None:
    """sk_drops of our netlink socket (records the kernel could not queue to it), from /proc/net/netlink."""
    try:
        with open("/proc/net/netlink") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) >= 10 and int(parts[9]) == inode:
                    return int(parts[8])
    except (OSError, ValueError, StopIteration):
        pass
    return None


# --- the source ---------------------------------------------------------------------------------------------


class AuditSource(Source):
    """Process execs with their exact argv, from the kernel audit log (Linux, root).

    Options: ``key`` (rule key prefix, default "etwmon"), ``backlog_limit`` (raised to this while running,
    0 leaves it alone), ``rcvbuf`` (socket buffer bytes), ``probe`` (check at open that records arrive by
    exec'ing /bin/true once), ``transport_factory`` (for tests: makes the NETLINK_AUDIT sockets).
    """

    name = "audit"
    lossy = False
    # The loss count is an upper bound, not exact: the kernel's lost counter covers audit records of every
    # kind, and serial gaps cover events of every kind (docs/audit.md).
    delivers = frozenset({"process_exec", "command_line"})

    #: How often the kernel's lost counter is polled and missing serials are settled.
    TICK = 0.25
    STATUS_EVERY = 1.0

    def __init__(self, *, key: str = DEFAULT_KEY, backlog_limit: int = DEFAULT_BACKLOG_LIMIT,
                 rcvbuf: int = DEFAULT_RCVBUF, probe: bool = True,
                 transport_factory: TransportFactory | None = None) -> None:
        super().__init__()
        if ":" in key or not key:
            raise ValueError(f"key must be a non-empty string without ':', not {key!r}")
        self.key_prefix = key
        self.backlog_limit = backlog_limit
        self.rcvbuf = rcvbuf
        self.probe = probe
        self._factory = transport_factory or (lambda groups: NetlinkTransport(
            groups, rcvbuf=rcvbuf if groups else None, timeout=None if groups else 2.0))
        self._control: AuditControl | None = None
        self._log: Transport | None = None
        self._rules: list[AuditRule] = []
        self._key: RuleKey | None = None
        self._opened_status: AuditStatus | None = None
        self._set_backlog: int | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._early: list[bytes] = []
        self._marker: str | None = None
        self._marker_serial: int | None = None
        self.assembler = EventAssembler()
        self.serials = SerialTracker()
        self._lost_base = 0
        self._kernel_lost = 0
        self._counts = {"execs": 0, "records": 0, "overruns": 0, "rules_restored": 0}
        self._lost_reported = 0
        self._audit_off_warned = False
        self._lock = threading.Lock()
        #: When the reader last found its socket empty (monotonic): every record multicast before then is read.
        self.caught_up_at = 0.0
        #: Called with each assembled ExecEvent (the exact argv, before encoding) and its record; return False
        #: to keep the record out of the sink. For tests and tools that want more than the record holds.
        self.exec_hook: Callable[[ExecEvent, bytes], bool] | None = None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return audit_unavailable_reason()

    # -- open / close ------------------------------------------------------------------------------------

    def open(self) -> None:
        if self._control is not None:
            return
        try:
            transport = self._factory(0)
        except OSError as exc:
            raise SourceUnavailable(f"cannot open a NETLINK_AUDIT socket: {exc}") from exc
        control = AuditControl(transport)
        # A new session: stop flag down, and a fresh serial baseline (the gaps between sessions are not losses).
        self._stop.clear()
        self._early, self._marker, self._marker_serial = [], None, None
        self._set_backlog = None
        missing, self.serials = self.serials.missing, SerialTracker()
        self.serials.missing = missing
        try:
            with _StateLock():
                self._open_locked(control)
        except BaseException:
            self._control = None
            self._teardown(control)
            raise
        try:
            self._mark("start", self._early)
            if self.probe:
                self._run_probe()
        except BaseException:
            self.close()
            raise

    def _open_locked(self, control: AuditControl) -> None:
        status, problem = _status_problem(control)
        if problem is not None:
            raise SourceUnavailable(f"audit source: {problem}")
        assert status is not None
        self._control = control
        try:
            listed = control.list_rules()
        except OSError as exc:
            raise SourceUnavailable(f"audit source: cannot list audit rules: {exc}") from exc
        # The state from before any etwmon instance touched audit: carried by rules of live or killed ones.
        original = (status.enabled, status.backlog_limit)
        for rule in listed:
            other = RuleKey.parse(rule.key, self.key_prefix)
            if other is None:
                continue
            original = (other.enabled, other.backlog_limit)
            if not other.owner_alive():
                log.info("etwmon audit: removing rule %s left by a process that is gone", other)
                self._delete_quietly(control, rule)
        me = os.getpid()
        self._key = RuleKey(self.key_prefix, me, _process_start(me) or 0, original[0], original[1])
        try:
            self._log = self._factory(1 << (AUDIT_NLGRP_READLOG - 1))
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise SourceUnavailable("audit source: joining the audit log multicast group was refused: needs "
                                        "CAP_AUDIT_READ in the host's namespaces; use the 'netlink' source") from exc
            raise SourceUnavailable(f"audit source: cannot open the audit log socket: {exc}") from exc
        self._rules = exec_rules(str(self._key))
        added = []
        try:
            for rule in self._rules:
                control.add_rule(rule)
                added.append(rule)
            if status.enabled == 0:
                control.set_status(enabled=1)
            if self.backlog_limit and 0 < status.backlog_limit < self.backlog_limit:
                control.set_status(backlog_limit=self.backlog_limit)
                self._set_backlog = self.backlog_limit
            now = control.status()
        except OSError as exc:
            self._rules = added
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise SourceUnavailable(f"audit source: the kernel refused an audit rule change ({exc}); "
                                        "use the 'netlink' source") from exc
            raise SourceUnavailable(f"audit source: cannot install the exec rule: {exc}") from exc
        if now.enabled == AUDIT_LOCKED:  # locked between our checks: our rules are in, so still fine
            log.warning("etwmon audit: audit was locked while etwmon opened")
        self._opened_status = now
        self._lost_base = now.lost
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        log.info("etwmon audit: rules %s installed (audit was enabled=%d backlog_limit=%d)", self._key,
                 status.enabled, status.backlog_limit)

    @staticmethod
    def _delete_quietly(control: AuditControl, rule: AuditRule) -> None:
        try:
            control.delete_rule(rule)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # someone else removed it first
                log.warning("etwmon audit: cannot remove rule %s: %s", rule.key, exc)

    def _read_until(self, done: Callable[[], bool], timeout: float, out: Callable[[ExecEvent, bytes], None]
                    ) -> bool:
        """Read the log socket until ``done()`` or ``timeout`` seconds; exec events go to ``out``."""
        deadline = time.monotonic() + timeout
        buf = bytearray(1 << 16)
        assert self._log is not None
        fd = self._log.fileno()
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                for event, record in self._drain(buf):
                    out(event, record)
        return True

    def _mark(self, what: str, early: list[bytes] | None, sink: Sink | None = None, timeout: float = 1.0) -> None:
        """Log a marker message and read up to it. Serials are only compared with ones seen before, so a
        marker at start gives the gap count its baseline and one at stop settles every serial before it:
        events dropped at the socket before our first or after our last record are counted too."""
        if self._control is None or self._log is None:
            return
        token = f"etwmon-audit-{what}-{os.getpid()}-{time.monotonic_ns()}"
        self._marker, self._marker_serial = token, None
        try:
            self._control.user_message(token)
        except OSError as exc:
            log.info("etwmon audit: cannot log a marker (%s): losses right at %s may go uncounted", exc, what)
            return

        def out(event: ExecEvent, record: bytes) -> None:
            if early is not None:
                early.append(record)
            elif sink is not None:
                self._emit(sink, event, record)

        if not self._read_until(lambda: self._marker_serial is not None, timeout, out):
            log.info("etwmon audit: the %s marker did not come back within %.1f s", what, timeout)
            return
        if what == "stop":
            self.serials.settle(self._marker_serial)  # type: ignore[arg-type]

    def _run_probe(self, timeout: float = 3.0) -> None:
        """Exec /bin/true once and wait for its audit event, so a source that would never see anything (a
        network namespace other than the host's, an auditd `never` rule ahead of ours) says so now."""
        token = f"etwmon-audit-probe-{os.getpid()}-{time.monotonic_ns()}"
        program = "/bin/true" if os.access("/bin/true", os.X_OK) else sys.executable
        argv = [program, token] if program == "/bin/true" else [program, "-c", "", token]
        pid = os.posix_spawn(program, argv, os.environ)
        os.waitpid(pid, 0)
        seen = []

        def out(event: ExecEvent, record: bytes) -> None:
            self._early.append(record)
            if event.pid == pid and (event.argv() or [b""])[-1] == token.encode():
                seen.append(event)

        if self._read_until(lambda: bool(seen), timeout, out):
            return
        if self._counts["overruns"]:
            raise SourceUnavailable(f"audit source: the test exec's records were dropped at the socket (rcvbuf "
                                    f"{self.rcvbuf} bytes is too small)")
        raise SourceUnavailable(
            "audit source: no audit record of a test exec arrived within "
            f"{timeout:.0f} s (a network namespace other than the host's, or an audit rule that suppresses "
            "execve ahead of etwmon's?); use the 'netlink' source")

    def close(self) -> None:
        control, self._control = self._control, None
        if control is None:
            return
        self._teardown(control)

    def _teardown(self, control: AuditControl) -> None:
        try:
            with _StateLock():
                self._restore(control)
        finally:
            control.close()
            if self._log is not None:
                self._log.close()
                self._log = None
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def _restore(self, control: AuditControl) -> None:
        """The last etwmon instance out puts enabled/backlog_limit back as they were; then our rules go.

        In that order, so a process killed half-way leaves a rule that tells the next instance what to restore,
        never a changed state with no rule to say so."""
        key = self._key
        try:
            if key is not None:
                self._restore_state(control, key)
        finally:
            for rule in self._rules:
                self._delete_quietly(control, rule)
            self._rules = []
            self._key = None

    def _restore_state(self, control: AuditControl, key: RuleKey) -> None:
        mine = str(key)
        try:
            others = False
            for rule in control.list_rules():
                other = RuleKey.parse(rule.key, self.key_prefix)
                if other is None or str(other) == mine:
                    continue
                if other.owner_alive():
                    others = True
                else:
                    self._delete_quietly(control, rule)
            if others:
                return  # another instance still runs: it restores when it stops
            status = control.status()
            opened = self._opened_status
            if status.enabled == 1 and key.enabled == 0:
                if opened is not None and status.pid != opened.pid and status.pid:
                    log.info("etwmon audit: an audit daemon registered meanwhile; leaving audit enabled")
                else:
                    control.set_status(enabled=0)
            if self._set_backlog is not None and status.backlog_limit == self._set_backlog \
                    and key.backlog_limit != self._set_backlog:
                control.set_status(backlog_limit=key.backlog_limit)
            elif self._set_backlog is None and status.backlog_limit != key.backlog_limit \
                    and status.backlog_limit == self.backlog_limit and key.backlog_limit < self.backlog_limit:
                # a killed instance raised it; nobody changed it since
                control.set_status(backlog_limit=key.backlog_limit)
        except OSError as exc:
            log.warning("etwmon audit: cannot restore the audit state: %s", exc)

    # -- running -------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        fd = self._wake_w
        if fd >= 0:
            try:
                os.write(fd, b"\1")
            except OSError:
                pass

    def _drain(self, buf: bytearray) -> Iterable[tuple[ExecEvent, bytes]]:
        """Read every message waiting on the log socket; yield each completed exec event with its record."""
        assert self._log is not None
        sock = getattr(self._log, "sock", None)
        view = memoryview(buf)
        assembler = self.assembler
        serials = self.serials
        while True:
            try:
                if sock is not None:
                    n = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
                    data: Any = view[:n]
                else:
                    data = self._log.recv(len(buf))
                    n = len(data)
            except BlockingIOError:
                self.caught_up_at = time.monotonic()
                return
            except InterruptedError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Records were dropped at our socket; the serial tracker counts the events.
                    self._counts["overruns"] += 1
                    continue
                raise
            if n == 0:
                return
            offset = 0
            while offset + 16 <= n:
                length, msg_type = _NLMSGHDR.unpack_from(data, offset)[:2]
                if length < 16 or offset + length > n:
                    length = n - offset  # the unicast quirk (nlmsg_len without the header) never reaches us
                self._counts["records"] += 1
                rec, done = assembler.feed(msg_type, data[offset + 16:offset + length])
                if rec is not None:
                    serials.see(rec.serial)
                    if msg_type == AUDIT_TRUSTED_APP and self._marker and self._marker in rec.body:
                        self._marker_serial = rec.serial
                for event in done:
                    yield event, event.encode()
                offset += (length + 3) & ~3
            if sock is None:
                return

    def _emit(self, sink: Sink, event: ExecEvent, record: bytes) -> None:
        hook = self.exec_hook
        if hook is None or hook(event, record):
            sink.push(record)
        self._counts["execs"] += 1

    def run(self, sink: Sink) -> None:
        if self._log is None:
            raise RuntimeError("open() the audit source before run()")
        for record in self._early:
            sink.push(record)
            self._counts["execs"] += 1
        self._early = []
        sink.notify()
        buf = bytearray(1 << 17)
        poller = select.poll()
        poller.register(self._log.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        next_tick = time.monotonic() + self.TICK
        next_status = time.monotonic() + self.STATUS_EVERY
        while not self._stop.is_set():
            poller.poll(max(0.0, next_tick - time.monotonic()) * 1000)
            pushed = False
            for event, record in self._drain(buf):
                self._emit(sink, event, record)
                pushed = True
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.TICK
                for event in self.assembler.expire(now):
                    self._emit(sink, event, event.encode())
                    pushed = True
                self._handle_config_changes()
                if now >= next_status:
                    next_status = now + self.STATUS_EVERY
                    self._poll_status()
                self.serials.tick()
                pushed |= self._report_lost(sink)
            if pushed:
                sink.notify()
        # Drain what is already queued, and settle what we can, before returning.
        for event, record in self._drain(buf):
            self._emit(sink, event, record)
        self._mark("stop", None, sink, timeout=0.5)
        for event in self.assembler.expire(everything=True):
            self._emit(sink, event, event.encode())
        self._poll_status()
        self._report_lost(sink)
        sink.notify()

    def _poll_status(self) -> None:
        control = self._control
        if control is None:
            return
        try:
            status = control.status()
        except OSError as exc:
            log.warning("etwmon audit: cannot poll the audit status: %s", exc)
            return
        if status.lost < self._lost_base:  # someone reset it (auditctl --reset-lost)
            self._kernel_lost += status.lost
        else:
            self._kernel_lost += status.lost - self._lost_base
        self._lost_base = status.lost
        if status.enabled == 0 and not self._audit_off_warned:
            self._audit_off_warned = True
            log.warning("etwmon audit: audit was disabled by someone else (auditctl -e 0): no exec is seen "
                        "until it is enabled again")

    def _handle_config_changes(self) -> None:
        """Put our rules back if someone deleted them (``auditctl -D``) while we run."""
        changes, self.assembler.config_changes = self.assembler.config_changes, []
        if not changes or self._control is None or self._key is None:
            return
        mine = str(self._key)
        for rec in changes:
            fields = dict(parse_fields(rec.body))
            if fields.get("op") in ('"remove_rule"', "remove_rule") and \
                    (decode_value(fields.get("key", "(null)")) or b"").decode("utf-8", "replace") == mine:
                log.warning("etwmon audit: our exec rule was removed by someone else; putting it back")
                try:
                    for rule in self._rules:
                        try:
                            self._control.add_rule(rule)
                        except OSError as exc:
                            if exc.errno != errno.EEXIST:
                                raise
                    self._counts["rules_restored"] += 1
                except OSError as exc:
                    log.warning("etwmon audit: cannot put the exec rule back: %s", exc)
                return

    def _lost_total(self) -> int:
        return self._kernel_lost + self.serials.missing + self.assembler.incomplete

    def _report_lost(self, sink: Sink) -> bool:
        with self._lock:
            total = self._lost_total()
            new = total - self._lost_reported
            self._lost_reported = total
        if new > 0:
            sink.push_lost(new)
            return True
        return False

    def stats(self) -> dict[str, int]:
        a = self.assembler
        out = {
            "lost": self._lost_total(),
            "parse_errors": a.parse_errors,
            "kernel_lost": self._kernel_lost,
            "serial_gaps": self.serials.missing,
            "incomplete": a.incomplete,
            "flushed": a.flushed,
            "failed_execs": a.failed,
            "pending": len(a.pending),
            **self._counts,
        }
        if self._log is not None and hasattr(self._log, "sock"):
            drops = _proc_net_netlink_drops(os.fstat(self._log.fileno()).st_ino)
            if drops is not None:
                out["socket_drops"] = drops
        return out


# --- the combined source ----------------------------------------------------------------------------------------

_TYPE_PID = struct.Struct("<h14xI")  # ItemHeader.Type, then the first ULONG after the header
_TYPE_TID_PID = struct.Struct("<h14xII")
_EXEC, _PROCESS_EXIT, _THREAD_CREATE, _THREAD_EXIT = (int(records.ItemType.ProcessExec),
                                                      int(records.ItemType.ProcessExit),
                                                      int(records.ItemType.ThreadCreate),
                                                      int(records.ItemType.ThreadExit))


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
    connector exec waits for audit's record of the same pid: when it comes, only audit's is pushed; when it
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
        self.caught_up = caught_up or (lambda: float("inf"))  # no reader to wait for
        self.on_exec = on_exec
        self._lock = threading.Lock()
        self._pending: dict[int, deque[_Pending]] = {}
        self._early_audit: dict[int, deque[tuple[float, bytes]]] = {}  # audit execs ahead of the proc connector
        # Audit execs pushed without their proc connector exec: if that turns up late (its reader was behind),
        # it is the same exec, not a new one (until max_wait).
        self._audit_alone: dict[int, deque[float]] = {}
        self.matched = 0  # execs both reported: audit's pushed
        self.fallback = 0  # proc connector execs audit never reported: pushed as they were
        self.audit_only = 0  # audit execs the proc connector never reported (its losses are counted there)
        self.held = 0  # records that waited behind an exec
        self.late = 0  # proc connector execs that came after audit's had been pushed alone: dropped

    # The proc connector's thread.
    def netlink_push(self, record: bytes) -> None:
        item, pid = _record_pid(record)
        pending = self._pending
        if item != _EXEC and pid not in pending:  # the common case: only this thread adds to pending
            self.sink.push(record)
            return
        with self._lock:
            if item == _EXEC:
                early = self._early_audit.get(pid)
                if early:
                    _, exact = early.popleft()
                    if not early:
                        del self._early_audit[pid]
                    self.matched += 1
                    self.sink.push(exact)
                    return
                alone = self._audit_alone.get(pid)
                if alone:
                    alone.popleft()
                    if not alone:
                        del self._audit_alone[pid]
                    self.late += 1
                    return
                pending.setdefault(pid, deque()).append(_Pending(time.monotonic() + self.hold, bytes(record)))
                return
            waiting = pending.get(pid)
            if waiting:
                waiting[-1].held.append(bytes(record))
                self.held += 1
                return
        self.sink.push(record)

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
                self.sink.push(record)
                for held in first.held:
                    self.sink.push(held)
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
                    for held in entry.held:
                        self.sink.push(held)
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
    (the proc connector socket), ``audit_rcvbuf``, ``key``, ``backlog_limit``, ``probe`` (AuditSource's),
    ``transport_factory`` (tests).
    """

    name = "linux"
    lossy = False
    # Loss is the proc connector's exact count: an exec audit misses still comes through as a fallback record.
    delivers = frozenset({
        "process_create", "process_exit", "process_exec", "thread_create", "thread_exit", "command_line",
        "exit_code", "exact_loss_count",
    })

    def __init__(self, *, exec_wait: float = 2.0, rcvbuf: int = 8 << 20, audit_rcvbuf: int = DEFAULT_RCVBUF,
                 key: str = DEFAULT_KEY, backlog_limit: int = DEFAULT_BACKLOG_LIMIT, probe: bool = True,
                 transport_factory: TransportFactory | None = None) -> None:
        super().__init__()
        from .netlink import NetlinkSource

        if not exec_wait > 0:
            raise ValueError(f"exec_wait must be > 0 seconds, not {exec_wait!r}")
        self.exec_wait = exec_wait
        # exec_events stay on: the join needs them to see every exec; cmdline stays on for the fallback.
        self.netlink = NetlinkSource(exec_events=True, cmdline=True, rcvbuf=rcvbuf)
        self.audit = AuditSource(key=key, backlog_limit=backlog_limit, rcvbuf=audit_rcvbuf, probe=probe,
                                 transport_factory=transport_factory)
        self.join: ExecJoin | None = None
        self._audit_lost = 0
        self._stop = threading.Event()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        from .netlink import NetlinkSource

        reason = NetlinkSource.unavailable_reason()
        if reason is not None:
            return f"proc connector: {reason}"
        reason = audit_unavailable_reason()
        return None if reason is None else f"audit: {reason}"

    def open(self) -> None:
        self.netlink.open()
        try:
            self.audit.open()
        except BaseException:
            self.netlink.close()
            raise
        self._stop.clear()

    def _exact_line_for_children(self, pid: int, record: bytes) -> None:
        """Children forked later inherit audit's exact command line rather than one read from /proc."""
        (event,) = records.parse(record)
        self.netlink.set_command_line(pid, event.command_line)  # type: ignore[attr-defined]

    def _count_audit_lost(self, count: int) -> None:
        # Not pushed: an exec audit lost still arrives through the proc connector (ExecJoin.fallback).
        self._audit_lost += count

    def run(self, sink: Sink) -> None:
        join = self.join = ExecJoin(sink, hold=self.exec_wait, on_exec=self._exact_line_for_children,
                                    caught_up=lambda: self.audit.caught_up_at)
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
            for t in threads:
                t.join(5.0)
                if t.is_alive():
                    log.error("etwmon linux: %s did not stop", t.name)
            join.expire(everything=True)
            sink.notify()
        if errors:
            raise errors[0]

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
