"""The kernel audit subsystem's netlink protocol, as etwmon uses it: status, enabling, backlog and rules.

``AuditControl`` sends requests over a NETLINK_AUDIT socket (``include/uapi/linux/audit.h``) and reads the
replies; ``exec_rules`` builds the ``-a always,exit -S execve -S execveat -k <key>`` rules etwmon installs.
"""

from __future__ import annotations

import errno
import os
import platform
import socket
import struct
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from ...errors import SourceUnavailable
from .._linux import set_receive_buffer

__all__ = ["AuditControl", "AuditError", "AuditRule", "AuditStatus", "NetlinkTransport", "Transport",
           "TransportFactory", "exec_rules"]

# --- kernel constants (include/uapi/linux/audit.h, linux/netlink.h) ----------------------------------------

NETLINK_AUDIT = 9
AUDIT_NLGRP_READLOG = 1
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
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

NLMSGHDR = struct.Struct("=IHHII")
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

#: Every (AUDIT_ARCH value, syscall number) that is an exec on some machine etwmon knows.
EXEC_SYSCALL_NUMBERS = frozenset((arch, nr) for tables in _EXEC_SYSCALLS.values() for arch, *nrs in tables
                                 for nr in nrs)


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
                set_receive_buffer(self.sock, rcvbuf, "etwmon audit")
            self.sock.bind((0, groups))
            self.sock.settimeout(timeout)
        except BaseException:
            self.sock.close()
            raise

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, (0, 0))

    def recv(self, bufsize: int) -> bytes:
        return self.sock.recv(bufsize)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


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


def this_machine() -> str:
    """The machine name the syscall tables are known by (``platform.machine()``, with its aliases)."""
    name = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(name.lower(), name)


def knows_machine(name: str) -> bool:
    return name in _EXEC_SYSCALLS


def exec_rules(key: str, machine: str | None = None) -> list[AuditRule]:
    """``-a always,exit -F arch=<each> -S execve -S execveat -k <key>`` for every syscall table this machine
    runs (64- and 32-bit). Raises SourceUnavailable on a machine whose syscall numbers etwmon doesn't know."""
    machine = machine or this_machine()
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
        self.transport.send(NLMSGHDR.pack(NLMSGHDR.size + len(payload), msg_type, flags, seq, 0) + payload)
        replies: list[tuple[int, bytes]] = []
        while True:
            data = self.transport.recv(1 << 16)
            if not data:
                raise AuditError(errno.EIO, "audit netlink socket closed")
            offset = 0
            while offset + NLMSGHDR.size <= len(data):
                length, rtype, _rflags, rseq, _pid = NLMSGHDR.unpack_from(data, offset)
                if length < NLMSGHDR.size:
                    break
                body = data[offset + NLMSGHDR.size:offset + length]
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


