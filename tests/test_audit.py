"""The audit source: exact argv from the kernel's audit records, its rule and state housekeeping, and its losses.

Offline tests feed records built in the exact shape the kernel writes them (``kernel_execve_records`` follows
``audit_log_execve_info`` in kernel/auditsc.c) and talk to a fake audit kernel over a fake netlink transport;
the ``root`` tests run against the live kernel and always put the machine-wide audit state back.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etwmon import Monitor, records
from etwmon.errors import SourceUnavailable
from etwmon.sources import audit
from etwmon.sources.audit import (
    AUDIT_ADD_RULE, AUDIT_CWD, AUDIT_DEL_RULE, AUDIT_EOE, AUDIT_EXECVE, AUDIT_GET,
    AUDIT_LIST_RULES, AUDIT_PATH, AUDIT_PROCTITLE, AUDIT_SET, AUDIT_SYSCALL, AuditControl, AuditRecord,
    AuditRule, AuditSource, AuditStatus, EventAssembler, RuleKey, SerialTracker, decode_value, exec_rules,
    parse_fields, parse_record,
)
from .conftest import require

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux")

# --- records in the kernel's shape ------------------------------------------------------------------------

MAX_EXECVE_AUDIT_LEN = 7500
_ABUF = 96  # sizeof(abuf) in audit_log_execve_info


def _contains_control(data: bytes) -> bool:
    return any(b == 0x22 or b < 0x21 or b > 0x7E for b in data)


def kernel_execve_records(argv: list[bytes]) -> list[str]:
    """The bodies of the EXECVE records the kernel writes for ``argv`` (kernel/auditsc.c,
    audit_log_execve_info): short args quoted or hex, long ones split as ``aN_len=`` + ``aN[i]=`` chunks
    over records of at most ~7500 bytes."""
    out: list[str] = []
    ab = [f"argc={len(argv)}"]
    len_max = len_rem = MAX_EXECVE_AUDIT_LEN
    len_buf = len_full = len_abuf = 0
    require_data, encode, it, arg, pos = True, False, 0, 0, 0
    buf = b""
    while arg < len(argv):
        a = argv[arg]
        if len_full == 0:
            len_full = len(a) - pos
        if require_data:
            count = len_max - len_buf
            if len(a) - pos >= count:  # strncpy_from_user filled the buffer without finding the NUL
                chunk = a[pos:pos + count]
                require_data, encode = True, True
                len_full *= 2
                pos += count
            else:
                chunk = a[pos:]
                require_data = False
                if not encode:
                    encode = _contains_control(chunk)
                if len_full < len_max:
                    len_full = len(chunk) * 2 if encode else len(chunk)
                pos = len(a)
            buf += chunk
            len_buf += len(chunk)
            len_abuf = len_buf * 2 if encode else len_buf + 2
        if _ABUF + 8 > len_rem:
            len_rem = len_max
            out.append("".join(ab))
            ab = []
        if require_data or it > 0 or len_abuf + _ABUF > len_rem:
            head = f" a{arg}_len={len_full}" if it == 0 else ""
            head += f" a{arg}[{it}]="
            it += 1
        else:
            head = f" a{arg}="
        ab.append(head)
        len_rem -= len(head)
        take = len_buf
        if encode:
            if len_abuf > len_rem:
                take = len_rem // 2
            ab.append(buf[:take].hex().upper())
            len_rem -= take * 2
            len_abuf -= take * 2
        else:
            if len_abuf > len_rem:
                take = len_rem - 2
            ab.append('"' + buf[:take].decode("latin-1") + '"')
            len_rem -= take + 2
            len_abuf -= take
        len_buf -= take
        buf = buf[take:]
        if len_buf == 0 and not require_data:
            arg, it, len_full, require_data, encode, pos = arg + 1, 0, 0, True, False, 0
    out.append("".join(ab))
    return out


def _untrusted(value: bytes) -> str:
    return value.hex().upper() if _contains_control(value) else f'"{value.decode("latin-1")}"'


def exec_event_records(serial: int, argv: list[bytes], pid: int = 4242, ppid: int = 4241, success: bool = True,
                       sec: int = 1_700_000_000, msec: int = 123, syscall: int = 59, arch: int = 0xC000003E,
                       eoe: bool = True) -> list[tuple[int, bytes]]:
    """(type, payload) of every record of one execve event, as the kernel multicasts them."""
    stamp = f"audit({sec}.{msec:03d}:{serial}): "
    exe = argv[0] if argv and argv[0].startswith(b"/") else b"/usr/bin/x"
    bodies = [(AUDIT_SYSCALL,
               f"arch={arch:x} syscall={syscall} success={'yes' if success else 'no'} exit={0 if success else -2} "
               f"a0=55d0 a1=55d1 a2=7ffc a3=0 items=2 ppid={ppid} pid={pid} auid=4294967295 uid=0 gid=0 euid=0 "
               f"suid=0 fsuid=0 egid=0 sgid=0 fsgid=0 tty=(none) ses=4294967295 comm={_untrusted(exe[-15:])} "
               f'exe={_untrusted(exe)} subj=unconfined key="etwmon:1:2:e0:b64"')]
    if success:
        bodies += [(AUDIT_EXECVE, body) for body in kernel_execve_records(argv)]
    bodies += [(AUDIT_CWD, 'cwd="/root"'),
               (AUDIT_PATH, f"item=0 name={_untrusted(exe)} inode=1 dev=00:01 mode=0100755 ouid=0 ogid=0 "
                            "rdev=00:00 nametype=NORMAL cap_fp=0 cap_fi=0 cap_fe=0 cap_fver=0 cap_frootid=0"),
               (AUDIT_PROCTITLE, "proctitle=" + b"\0".join(argv)[:128].hex().upper())]
    if eoe:
        bodies.append((AUDIT_EOE, ""))
    return [(t, (stamp + body).encode("latin-1")) for t, body in bodies]


def feed(assembler: EventAssembler, msgs, now: float = 0.0):
    done = []
    for msg_type, payload in msgs:
        _, events = assembler.feed(msg_type, payload, now)
        done.extend(events)
    return done


# --- parsing -------------------------------------------------------------------------------------------------


def test_parse_record_reads_the_stamp_and_the_fields():
    rec = parse_record(AUDIT_SYSCALL, b'audit(1700000000.007:991): arch=c000003e syscall=59 comm="true"\0')
    assert rec == AuditRecord(AUDIT_SYSCALL, 1_700_000_000, 7, 991, 'arch=c000003e syscall=59 comm="true"')
    assert parse_fields(rec.body) == [("arch", "c000003e"), ("syscall", "59"), ("comm", '"true"')]
    assert parse_record(AUDIT_SYSCALL, b"no stamp here") is None


def test_decode_value_quoted_hex_and_null():
    assert decode_value('"/bin/true"') == b"/bin/true"
    assert decode_value('""') == b""
    assert decode_value("68656C6C6F20776F726C64") == b"hello world"
    assert decode_value("(null)") is None


def test_builder_matches_known_kernel_output():
    # Shapes taken from a live kernel: quoted, hex for a space, an empty argument.
    assert kernel_execve_records([b"/bin/echo", b"a b", b""]) == ['argc=3 a0="/bin/echo" a1=612062 a2=""']
    long = kernel_execve_records([b"x", b"y" * 20000])
    assert long[0].startswith('argc=2 a0="x" a1_len=40000 a1[0]=7979')
    assert all(len(r) <= MAX_EXECVE_AUDIT_LEN + 100 for r in long) and len(long) == 6


ARGVS = {
    "plain": [b"/bin/true", b"storm-1"],
    "spaces and quotes": [b"/bin/echo", b"hello world", b"it's", b'say "hi"', b"back\\slash"],
    "newline, tab, empty": [b"/bin/echo", b"x\ny", b"\t", b"", b""],
    "non-UTF-8": [b"/bin/echo", b"\xff\xfe", b"caf\xc3\xa9", b"\x80abc"],
    "shell metacharacters": [b"/bin/sh", b"-c", b"echo $HOME; ls | wc -l && `id` > /dev/null"],
    "100 KB argument": [b"/bin/echo", b"A" * 100_000, b"tail"],
    "100 KB with specials": [b"/bin/echo", (b"a b\n\xff" * 25_000)],
    "exactly the buffer": [b"/bin/echo", b"B" * MAX_EXECVE_AUDIT_LEN, b"C" * (MAX_EXECVE_AUDIT_LEN - 1)],
}


@pytest.mark.parametrize("argv", ARGVS.values(), ids=ARGVS.keys())
def test_assembler_gives_back_the_exact_argv(argv):
    assembler = EventAssembler()
    done = feed(assembler, exec_event_records(10, argv))
    assert len(done) == 1
    event = done[0]
    assert event.argv() == argv
    assert (event.pid, event.ppid, event.success, event.ended) == (4242, 4241, True, True)
    assert event.cwd == b"/root" and event.paths == 1
    assert event.proctitle == b"\0".join(argv)[:128]
    assert not assembler.pending


@pytest.mark.parametrize("argv", ARGVS.values(), ids=ARGVS.keys())
def test_the_record_splits_back_or_shows_its_truncation(argv):
    event = feed(EventAssembler(), exec_event_records(10, argv))[0]
    (parsed,) = records.parse(event.encode())
    assert isinstance(parsed, records.ProcessExec)
    assert (parsed.pid, parsed.parent_pid, parsed.creating_pid, parsed.creating_tid) == (4242, 4241, 4242, 4242)
    assert parsed.filetime == (1_700_000_000_123 * 10_000 + records.FILETIME_UNIX_EPOCH)
    full = records.command_line_from_argv(argv)
    if len(full.encode("utf-16-le", "surrogatepass")) // 2 <= records.MAX_COMMAND_LINE:
        assert parsed.argv == argv and not parsed.truncated
    else:  # over the record's 64 KiB: cut visibly, and what is kept is the start of the exact command line
        assert parsed.truncated
        assert len(parsed.command_line) == records.MAX_COMMAND_LINE
        kept = parsed.command_line[:-len(records.TRUNCATION_MARKER)]
        assert full.startswith(kept)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.binary(max_size=40) | st.binary(min_size=7000, max_size=16000), min_size=1, max_size=6))
def test_any_argv_survives_records_and_the_wire(argv):
    argv = [a.replace(b"\0", b"") for a in argv]  # an argv string ends at its NUL
    event = feed(EventAssembler(), exec_event_records(5, argv))[0]
    assert event.argv() == argv
    (parsed,) = records.parse(event.encode())
    if not parsed.truncated:
        assert parsed.argv == argv


def test_failed_exec_and_other_syscalls_make_no_record():
    assembler = EventAssembler()
    assert feed(assembler, exec_event_records(1, [b"/nonexistent"], success=False)) == []
    assert assembler.failed == 1
    assert feed(assembler, exec_event_records(2, [b"/bin/x"], syscall=2)) == []  # open(), not an exec
    assert assembler.failed == 1 and assembler.incomplete == 0 and not assembler.pending
    # execveat and the 32-bit table are execs too
    assert len(feed(assembler, exec_event_records(3, [b"/bin/x"], syscall=322))) == 1
    assert len(feed(assembler, exec_event_records(4, [b"/bin/x"], syscall=11, arch=0x40000003))) == 1


def test_interleaved_events_assemble_by_serial():
    a = exec_event_records(1, [b"/bin/a", b"1"], pid=1)
    b = exec_event_records(2, [b"/bin/b", b"2"], pid=2)
    mixed = [m for pair in zip(a, b) for m in pair]
    done = feed(EventAssembler(), mixed)
    assert sorted((e.pid, tuple(e.argv())) for e in done) == [(1, (b"/bin/a", b"1")), (2, (b"/bin/b", b"2"))]


def test_event_without_eoe_is_flushed_when_complete_and_counted_when_not():
    assembler = EventAssembler(timeout=2.0)
    assert feed(assembler, exec_event_records(1, [b"/bin/a", b"x"], eoe=False), now=10.0) == []
    msgs = exec_event_records(2, [b"/bin/b", b"y" * 20000], eoe=False)
    del msgs[3]  # one EXECVE chunk record lost
    assert feed(assembler, msgs, now=10.0) == []
    assert len(assembler.pending) == 2
    assert assembler.expire(now=11.0) == []  # not yet
    done = assembler.expire(now=12.5)
    assert [e.argv() for e in done] == [[b"/bin/a", b"x"]] and not done[0].ended
    assert (assembler.flushed, assembler.incomplete, len(assembler.pending)) == (1, 1, 0)
    # a straggler of an expired event does not start a new one
    assert feed(assembler, [exec_event_records(2, [b"/bin/b"])[-1]]) == [] and not assembler.pending


def test_pending_events_are_capped():
    assembler = EventAssembler(timeout=1e9, max_pending=100)
    out = []
    for serial in range(1, 1001):
        out += feed(assembler, exec_event_records(serial, [b"/bin/a", b"%d" % serial], eoe=False))
    assert len(assembler.pending) <= 100
    assert [e.argv()[1] for e in out] == [b"%d" % i for i in range(1, 901)]
    assert assembler.flushed == 900  # complete but never ended: emitted early, counted
    assert len(assembler.ignored) <= 100 and len(assembler._done) <= 100


def test_serial_gaps_count_missing_events_but_not_reordering():
    tracker = SerialTracker()
    for s in [100, 102, 101, 103, 105, 104]:  # reordered, nothing missing
        tracker.see(s)
    for _ in range(3):
        assert tracker.tick() == 0
    for s in [106, 110, 111]:  # 107-109 never come
        tracker.see(s)
    assert tracker.tick() == 0 and tracker.tick() == 0  # could still be on the way
    assert tracker.tick() == 3 and tracker.missing == 3  # two whole ticks later: lost
    tracker.see(108)  # a very late one is not counted twice
    tracker.tick()
    assert tracker.missing == 3


# --- rules and keys -----------------------------------------------------------------------------------------


def test_exec_rules_cover_both_syscall_tables():
    rules = exec_rules("etwmon:1:2:e0:b64", machine="x86_64")
    assert [(r.arch, r.syscalls) for r in rules] == [(0xC000003E, {59, 322}), (0x40000003, {11, 358})]
    for rule in rules:
        assert rule.key == "etwmon:1:2:e0:b64"
        assert AuditRule.unpack(rule.pack()) == rule
        assert len(rule.pack()) == 4 * (4 + 64 + 3 * 64) + len(rule.strings)  # sizeof(audit_rule_data) + buf
    with pytest.raises(SourceUnavailable, match="syscall numbers"):
        exec_rules("k", machine="vax")


def test_rule_key_round_trip_and_liveness():
    key = RuleKey("etwmon", os.getpid(), audit._process_start(os.getpid()), 0, 64)
    assert RuleKey.parse(str(key), "etwmon") == key
    assert key.owner_alive()
    assert not RuleKey("etwmon", os.getpid(), key.start + 1, 0, 64).owner_alive()  # pid reused
    assert RuleKey.parse("other:1:2:e0:b64", "etwmon") is None
    assert RuleKey.parse("mine\x01etwmon:5:6:e1:b8192", "etwmon") == RuleKey("etwmon", 5, 6, 1, 8192)
    assert RuleKey.parse(None, "etwmon") is None


# --- a fake audit kernel behind a fake netlink transport ------------------------------------------------------

_HDR = struct.Struct("=IHHII")


def _msg(msg_type: int, seq: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return _HDR.pack(16 + len(payload), msg_type, flags, seq, 0) + payload


class FakeAuditKernel:
    """Answers AUDIT_GET/SET/ADD_RULE/DEL_RULE/LIST_RULES like kernel/audit.c; ``refuse`` makes every control
    request fail with that errno, ``refuse_multicast`` the bind to the log group."""

    def __init__(self, enabled: int = 0, backlog_limit: int = 64, refuse: int | None = None,
                 refuse_multicast: int | None = None) -> None:
        self.status = AuditStatus(enabled=enabled, backlog_limit=backlog_limit, failure=1)
        self.rules: list[bytes] = []
        self.requests: list[int] = []
        self.refuse = refuse
        self.refuse_multicast = refuse_multicast

    def factory(self, groups: int) -> "FakeTransport":
        if groups and self.refuse_multicast:
            raise OSError(self.refuse_multicast, os.strerror(self.refuse_multicast))
        return FakeTransport(self)

    def handle(self, data: bytes) -> list[bytes]:
        _, msg_type, flags, seq, _ = _HDR.unpack_from(data)
        payload = data[16:]
        self.requests.append(msg_type)

        def error(code: int) -> bytes:
            return _msg(2, seq, struct.pack("=i", -code) + data[:16])

        if self.refuse:
            return [error(self.refuse)]
        ack = [error(0)] if flags & 4 else []
        if msg_type == AUDIT_GET:
            return ack + [_msg(AUDIT_GET, seq, self.status.pack())]
        locked = self.status.enabled == 2
        if msg_type == AUDIT_SET:
            if locked:
                return [error(errno.EPERM)]
            req = AuditStatus.unpack(payload)
            assert req.enabled != 2, "etwmon must never lock audit"
            changes = {}
            if req.mask & 1:
                changes["enabled"] = req.enabled
            if req.mask & 0x10:
                changes["backlog_limit"] = req.backlog_limit
            self.status = AuditStatus(**{**vars(self.status), **changes})
            return ack
        if msg_type == AUDIT_ADD_RULE:
            if locked:
                return [error(errno.EPERM)]
            if payload in self.rules:
                return [error(errno.EEXIST)]
            self.rules.append(payload)
            return ack
        if msg_type == AUDIT_DEL_RULE:
            if locked:
                return [error(errno.EPERM)]
            if payload not in self.rules:
                return [error(errno.ENOENT)]
            self.rules.remove(payload)
            return ack
        if msg_type == AUDIT_LIST_RULES:
            return [_msg(AUDIT_LIST_RULES, seq, r, flags=2) for r in self.rules] + [_msg(3, seq, b"\0" * 4, 2)]
        return [error(errno.EINVAL)]

    def keys(self) -> list[str]:
        return [AuditRule.unpack(r).key for r in self.rules]


class FakeTransport:
    def __init__(self, kernel: FakeAuditKernel) -> None:
        self.kernel = kernel
        self.inbox: list[bytes] = []
        self._pair = socket.socketpair()

    def send(self, data: bytes) -> None:
        self.inbox.extend(self.kernel.handle(data))

    def recv(self, bufsize: int) -> bytes:
        if not self.inbox:
            raise socket.timeout("no reply")
        return self.inbox.pop(0)

    def fileno(self) -> int:
        return self._pair[0].fileno()

    def close(self) -> None:
        for s in self._pair:
            s.close()


def _fake_source(kernel: FakeAuditKernel) -> AuditSource:
    return AuditSource(probe=False, transport_factory=kernel.factory)


@linux_only
def test_locked_audit_is_unavailable_and_left_alone(monkeypatch):
    monkeypatch.setattr(audit.os, "geteuid", lambda: 0)  # as root: the kernel's answer is what decides
    monkeypatch.setattr(audit, "_has_capability", lambda cap: True)
    kernel = FakeAuditKernel(enabled=2)
    with pytest.raises(SourceUnavailable, match="locked"):
        _fake_source(kernel).open()
    assert "locked" in audit.audit_unavailable_reason(kernel.factory)
    assert set(kernel.requests) <= {AUDIT_GET}  # no rule, no SET: the lock state is never touched


@linux_only
@pytest.mark.parametrize("code, words", [(errno.EPERM, "CAP_AUDIT_CONTROL"), (errno.ECONNREFUSED, "container")])
def test_refused_control_is_unavailable(code, words):
    kernel = FakeAuditKernel(refuse=code)
    with pytest.raises(SourceUnavailable, match=words):
        _fake_source(kernel).open()
    assert kernel.requests == [AUDIT_GET]


@linux_only
def test_refused_log_group_is_unavailable_and_changes_nothing():
    kernel = FakeAuditKernel(enabled=0, refuse_multicast=errno.EPERM)
    with pytest.raises(SourceUnavailable, match="CAP_AUDIT_READ"):
        _fake_source(kernel).open()
    assert kernel.rules == [] and kernel.status.enabled == 0
    assert AUDIT_ADD_RULE not in kernel.requests and AUDIT_SET not in kernel.requests


@linux_only
def test_unavailable_reason_reports_lock_and_refusal(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(audit, "_has_capability", lambda cap: True)
    assert "locked" in audit.audit_unavailable_reason(FakeAuditKernel(enabled=2).factory)
    assert "EPERM" in audit.audit_unavailable_reason(FakeAuditKernel(refuse=errno.EPERM).factory)
    assert audit.audit_unavailable_reason(FakeAuditKernel(enabled=0).factory) is None
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in audit.audit_unavailable_reason(FakeAuditKernel().factory)
    monkeypatch.setattr(sys, "platform", "win32")
    assert "Linux" in audit.audit_unavailable_reason(FakeAuditKernel().factory)


@linux_only
def test_open_close_enables_raises_backlog_and_restores():
    kernel = FakeAuditKernel(enabled=0, backlog_limit=64)
    src = _fake_source(kernel)
    src.open()
    try:
        assert kernel.status.enabled == 1 and kernel.status.backlog_limit == audit.DEFAULT_BACKLOG_LIMIT
        keys = kernel.keys()
        assert len(keys) == 2 and all(RuleKey.parse(k, "etwmon").pid == os.getpid() for k in keys)
        assert RuleKey.parse(keys[0], "etwmon").enabled == 0
    finally:
        src.close()
    assert kernel.rules == [] and kernel.status.enabled == 0 and kernel.status.backlog_limit == 64
    src.close()  # idempotent
    assert AUDIT_DEL_RULE in kernel.requests


@linux_only
def test_enabled_audit_and_a_big_backlog_stay_as_they_were():
    kernel = FakeAuditKernel(enabled=1, backlog_limit=100_000)
    src = _fake_source(kernel)
    src.open()
    src.close()
    assert kernel.rules == [] and kernel.status.enabled == 1 and kernel.status.backlog_limit == 100_000
    assert AUDIT_SET not in kernel.requests


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


@linux_only
def test_rule_of_a_killed_run_is_removed_and_its_original_state_restored():
    # What a SIGKILLed instance leaves: its rule (with the state from before it), audit on, backlog raised.
    stale = exec_rules(f"etwmon:{_dead_pid()}:12345:e0:b64")
    kernel = FakeAuditKernel(enabled=1, backlog_limit=audit.DEFAULT_BACKLOG_LIMIT)
    kernel.rules = [r.pack() for r in stale]
    src = _fake_source(kernel)
    src.open()
    try:
        assert len(kernel.rules) == 2
        assert all(RuleKey.parse(k, "etwmon").pid == os.getpid() for k in kernel.keys())
        assert all(RuleKey.parse(k, "etwmon").enabled == 0 for k in kernel.keys())  # inherited
    finally:
        src.close()
    assert kernel.rules == [] and kernel.status.enabled == 0 and kernel.status.backlog_limit == 64


@linux_only
def test_another_live_instance_keeps_audit_on_when_one_stops():
    ppid = os.getppid()
    other = exec_rules(f"etwmon:{ppid}:{audit._process_start(ppid)}:e0:b64")
    kernel = FakeAuditKernel(enabled=1, backlog_limit=audit.DEFAULT_BACKLOG_LIMIT)
    kernel.rules = [r.pack() for r in other]
    src = _fake_source(kernel)
    src.open()
    src.close()
    assert kernel.rules == [r.pack() for r in other]  # the live one's rules stay
    assert kernel.status.enabled == 1 and kernel.status.backlog_limit == audit.DEFAULT_BACKLOG_LIMIT


@linux_only
def test_foreign_rules_are_never_touched():
    foreign = exec_rules("admin-execs")
    kernel = FakeAuditKernel(enabled=1)
    kernel.rules = [r.pack() for r in foreign]
    src = _fake_source(kernel)
    src.open()
    src.close()
    assert kernel.rules == [r.pack() for r in foreign]


def test_options_are_checked():
    with pytest.raises(ValueError):
        AuditSource(key="has:colon")
    with pytest.raises(TypeError):
        AuditSource(nonsense=1)  # type: ignore[call-arg]
    assert AuditSource.name == "audit" and not AuditSource.lossy
    assert {"process_exec", "command_line"} <= AuditSource.delivers
    assert "exact_loss_count" not in AuditSource.delivers


# --- live kernel ---------------------------------------------------------------------------------------------


def _live_control() -> AuditControl:
    return AuditControl(audit.NetlinkTransport(0))


def _etwmon_rules(control: AuditControl) -> list[tuple[AuditRule, RuleKey]]:
    out = []
    for rule in control.list_rules():
        key = RuleKey.parse(rule.key, "etwmon")
        if key is not None:
            out.append((rule, key))
    return out


def _state_before_etwmon(control: AuditControl) -> AuditStatus:
    """The audit state from before any etwmon instance changed it: the one recorded in a (live or left-over)
    etwmon rule's key if there is one — another instance may be running — else the current one."""
    status = control.status()
    for _, key in _etwmon_rules(control):
        return AuditStatus(**{**vars(status), "enabled": key.enabled, "backlog_limit": key.backlog_limit})
    return status


@pytest.fixture
def live_audit():
    """The live kernel's audit, put back as it was whatever the test does: rules of this process (and of
    children it names in ``owners``) removed; enabled/backlog_limit restored when no other instance runs."""
    require(sys.platform.startswith("linux") and os.geteuid() == 0, "needs root on Linux")
    reason = AuditSource.unavailable_reason()
    require(reason is None, f"audit unusable here: {reason}")
    control = _live_control()
    before = _state_before_etwmon(control)
    owners = {os.getpid()}
    yield before, owners
    try:
        others = False
        for rule, key in _etwmon_rules(control):
            if key.pid in owners or not key.owner_alive():
                control.delete_rule(rule)
            else:
                others = True
        if not others:
            now = control.status()
            if now.enabled != before.enabled and before.enabled in (0, 1) and now.enabled in (0, 1):
                control.set_status(enabled=before.enabled)
            if now.backlog_limit != before.backlog_limit:
                control.set_status(backlog_limit=before.backlog_limit)
    finally:
        control.close()


def _assert_restored(before: AuditStatus, gone_pids: set[int]) -> None:
    control = _live_control()
    try:
        rules = _etwmon_rules(control)
        assert not [k for _, k in rules if k.pid in gone_pids], "an etwmon rule was left behind"
        if not [k for _, k in rules if k.owner_alive()]:  # no other instance is running right now
            now = control.status()
            assert now.enabled == before.enabled
            assert now.backlog_limit == before.backlog_limit
    finally:
        control.close()


class ListSink:
    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.lost = 0
        self.lock = threading.Lock()

    def push(self, record: bytes) -> None:
        with self.lock:
            self.records.append(bytes(record))

    def push_lost(self, count: int) -> None:
        self.lost += count

    def notify(self) -> None:
        pass

    def events(self):
        return list(records.parse(b"".join(self.records)))


class Running:
    """An AuditSource running on a thread, keeping every ExecEvent it assembled (argv before encoding)."""

    def __init__(self, **options) -> None:
        self.source = AuditSource(**options)
        self.sink = ListSink()
        self.exec_events: list = []
        self.source.exec_hook = lambda event, record: self.exec_events.append(event) or True
        self.thread = threading.Thread(target=self.source.run, args=(self.sink,), daemon=True)

    def __enter__(self) -> "Running":
        self.source.open()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.source.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()
        self.source.close()

    def wait_for(self, predicate, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in list(self.exec_events) if predicate(e)]
            if found:
                return found
            time.sleep(0.02)
        return []


@pytest.fixture(scope="module")
def storm_binary(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    require(gcc is not None, "needs gcc to build the exec storm generator")
    src = tmp_path_factory.mktemp("storm") / "storm.c"
    src.write_text(STORM_C)
    exe = src.with_suffix("")
    subprocess.run([gcc, "-O2", "-o", str(exe), str(src)], check=True)
    return str(exe)


STORM_C = textwrap.dedent(r"""
    /* Exec storm: N children of `<prog> <tag>-<i>` spawned as fast as posix_spawn goes, 64 in flight. */
    #include <spawn.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <sys/wait.h>
    #include <time.h>
    extern char **environ;
    int main(int argc, char **argv) {
        int n = argc > 1 ? atoi(argv[1]) : 3000, running = 0, failed = 0;
        const char *prog = argc > 2 ? argv[2] : "/bin/true", *tag = argc > 3 ? argv[3] : "storm";
        char arg[64];
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        for (int i = 0; i < n; i++) {
            int st;
            if (running >= 64 && wait(&st) > 0) running--;
            snprintf(arg, sizeof arg, "%s-%d", tag, i);
            char *av[] = {(char *)prog, arg, NULL};
            pid_t pid;
            if (posix_spawn(&pid, prog, NULL, NULL, av, environ) != 0) { failed++; continue; }
            running++;
        }
        while (running > 0) { int st; if (wait(&st) > 0) running--; else break; }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
        printf("%d %d %.6f %.1f\n", n, failed, s, n / s);
        return failed != 0;
    }
""")


#: Marks this test run's storm children apart from anyone else's on the machine.
STORM_TAG = f"etwstorm{os.getpid()}"


def _storm(binary: str, n: int) -> str:
    return subprocess.run([binary, str(n), "/bin/true", STORM_TAG], capture_output=True, text=True,
                          check=True).stdout.strip()


def _read_storm(mon: Monitor, n: int) -> tuple[dict[int, list[bytes]], int, dict]:
    """Read until the argv of all ``n`` storm children arrived (or 20 s): {i: argv}, records lost, stats."""
    seen: dict[int, list[bytes]] = {}
    lost = 0
    buf = bytearray(1 << 20)
    deadline = time.monotonic() + 20
    while len(seen) < n and time.monotonic() < deadline:
        mon.wait(0.5)
        events = list(records.parse(buf[:mon.readinto(buf)]))
        lost += sum(e.count for e in events if isinstance(e, records.RecordsLost))
        seen.update(_storm_argvs(events))
    return seen, lost, mon.stats.source_stats


def _storm_argvs(events) -> dict[int, list[bytes]]:
    """Storm index -> argv of every ProcessExec that is one of our storm's children."""
    seen = {}
    prefix = STORM_TAG.encode() + b"-"
    for event in events:
        argv = event.argv if isinstance(event, records.ProcessExec) else None
        if argv and len(argv) == 2 and argv[1].startswith(prefix):
            seen[int(argv[1][len(prefix):])] = argv
    return seen


def _exact(i: int, argv: list[bytes]) -> bool:
    return argv == [b"/bin/true", b"%s-%d" % (STORM_TAG.encode(), i)]


@pytest.mark.root
@pytest.mark.slow
def test_exec_storm_command_lines_are_exact(live_audit, storm_binary):
    before, _ = live_audit
    n = 3000
    with Monitor(source="audit", max_items=100_000) as mon:
        out = _storm(storm_binary, n)
        seen, lost, stats = _read_storm(mon, n)
    right = sum(_exact(i, argv) for i, argv in seen.items())
    print(f"\nstorm: {out} (n failed seconds rate); audit exact: {right}/{n}; lost {lost}; {stats}")
    assert right >= 0.999 * n
    assert len(seen) + lost >= n  # whatever was missed was counted
    _assert_restored(before, {os.getpid()})


@pytest.mark.root
def test_argv_edge_cases_come_out_exact(live_audit):
    argvs = [v for k, v in ARGVS.items() if k not in ("plain", "shell metacharacters")]
    with Running() as run:
        pids = {}
        for argv in argvs:
            pid = os.posix_spawn("/bin/echo", argv, {})
            os.waitpid(pid, 0)
            pids[pid] = argv
        for pid, argv in pids.items():
            found = run.wait_for(lambda e, pid=pid: e.pid == pid and e.ppid == os.getpid())
            assert found, f"no exec event for {argv[:2]!r}"
            event = found[0]
            assert event.argv() == argv
            assert event.exe == b"/usr/bin/echo" or event.exe.endswith(b"/echo")
            assert event.ppid == os.getpid()
            # the records' shape is what the offline builder produces
            model = feed(EventAssembler(), exec_event_records(1, argv))[0]
            assert (event.args, event.long_args, event.long_lens) == (model.args, model.long_args, model.long_lens)
    by_pid = {e.pid: e for e in run.sink.events() if isinstance(e, records.ProcessExec)}
    for pid, argv in pids.items():
        parsed = by_pid[pid]
        if parsed.truncated:  # 100 KB: cut visibly at the record's limit
            assert len(parsed.command_line) == records.MAX_COMMAND_LINE
            assert records.command_line_from_argv(argv).startswith(
                parsed.command_line[:-len(records.TRUNCATION_MARKER)])
        else:
            assert parsed.argv == argv


@pytest.mark.root
def test_failed_exec_makes_no_record(live_audit):
    with Running() as run:
        failed_before = run.source.stats()["failed_execs"]
        with pytest.raises(FileNotFoundError):
            os.posix_spawn("/nonexistent/etwmon-missing", ["/nonexistent/etwmon-missing", "x"], {})
        marker = os.posix_spawn("/bin/true", ["/bin/true", "etwmon-after-failure"], {})
        os.waitpid(marker, 0)
        assert run.wait_for(lambda e: e.pid == marker and e.ppid == os.getpid())
        assert run.source.stats()["failed_execs"] > failed_before
    assert not [e for e in run.sink.events() if isinstance(e, records.ProcessExec)
                and "etwmon-missing" in e.command_line]


@pytest.mark.root
def test_monitor_stop_removes_the_rule_and_restores_state(live_audit):
    before, _ = live_audit
    with Monitor(source="audit") as mon:
        control = _live_control()
        try:
            mine = [k for _, k in _etwmon_rules(control) if k.pid == os.getpid()]
            assert len(mine) == 2  # b64 and b32
            assert control.status().enabled == 1
        finally:
            control.close()
        assert mon.source.name == "audit"
    _assert_restored(before, {os.getpid()})


_KILLED_CHILD = textwrap.dedent("""
    import sys, time
    from etwmon import Monitor
    mon = Monitor(source="audit").start()
    print("ready", flush=True)
    time.sleep(60)
""")


@pytest.mark.root
def test_rule_of_a_killed_process_is_removed_at_the_next_start(live_audit):
    before, owners = live_audit
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD], stdout=subprocess.PIPE, text=True)
    owners.add(child.pid)
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        control = _live_control()
        try:
            left = [k for _, k in _etwmon_rules(control) if k.pid == child.pid]
            assert len(left) == 2 and not left[0].owner_alive()  # what a killed run leaves
            assert (left[0].enabled, left[0].backlog_limit) == (before.enabled, before.backlog_limit)
        finally:
            control.close()
        with Monitor(source="audit"):
            control = _live_control()
            try:
                assert not [k for _, k in _etwmon_rules(control) if k.pid == child.pid]
            finally:
                control.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    _assert_restored(before, {os.getpid(), child.pid})


@pytest.mark.root
def test_rule_deleted_by_someone_else_is_put_back(live_audit):
    with Running() as run:
        control = _live_control()
        try:
            for rule, key in _etwmon_rules(control):
                if key.pid == os.getpid():
                    control.delete_rule(rule)  # what `auditctl -D` does to it
            deadline = time.monotonic() + 5
            while run.source.stats()["rules_restored"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len([k for _, k in _etwmon_rules(control) if k.pid == os.getpid()]) == 2
        finally:
            control.close()
        pid = os.posix_spawn("/bin/true", ["/bin/true", "etwmon-after-restore"], {})
        os.waitpid(pid, 0)
        assert run.wait_for(lambda e: e.pid == pid and e.ppid == os.getpid())


@pytest.mark.root
def test_records_dropped_at_a_full_socket_are_counted(live_audit, storm_binary):
    """A reader that falls behind with a tiny socket buffer loses records: every lost exec is counted."""
    n = 400
    with Running(rcvbuf=4096, probe=False) as run:
        run.source._stop.set()  # not yet: hold the reader so the buffer overflows
        run.thread.join(5)
        _storm(storm_binary, n)
        time.sleep(0.3)
        run.source._stop.clear()
        run.thread = threading.Thread(target=run.source.run, args=(run.sink,), daemon=True)
        run.thread.start()
        time.sleep(2 * audit.AuditSource.TICK * 4)
    seen = _storm_argvs(run.sink.events())
    stats = run.source.stats()
    print(f"\nsmall buffer: {len(seen)}/{n} storm execs seen, lost {run.sink.lost}, {stats}")
    assert len(seen) < n  # the buffer did overflow
    assert stats["overruns"] >= 1
    assert run.sink.lost == stats["lost"] > 0
    assert len(seen) + run.sink.lost >= n
    assert all(_exact(i, argv) for i, argv in seen.items())  # never a wrong one


# --- LinuxSource: proc connector + audit ------------------------------------------------------------------

from etwmon.sources.audit import ExecJoin, LinuxSource  # noqa: E402


def _exec_record(pid: int, line: str, ft: int = 1) -> bytes:
    return records.encode_process_exec(ft, pid, 1, pid, pid, line)


def test_join_reports_each_exec_once_with_audits_argv():
    sink = ListSink()
    join = ExecJoin(sink, hold=2.0)
    join.netlink_push(records.encode_process_create(1, 50, 1, 1, 1, "parent"))
    join.netlink_push(_exec_record(50, "from-proc"))  # waits for audit
    join.netlink_push(records.encode_thread_create(2, 51, 50))  # held behind the exec
    join.netlink_push(records.encode_process_exit(3, 50, 0))
    join.netlink_push(records.encode_process_exit(3, 60, 0))  # another process: not held
    assert [type(e).__name__ for e in sink.events()] == ["ProcessCreate", "ProcessExit"]
    join.audit_push(_exec_record(50, "exact 'a b'"))
    events = sink.events()
    assert [type(e).__name__ for e in events] == ["ProcessCreate", "ProcessExit", "ProcessExec", "ThreadCreate",
                                                  "ProcessExit"]
    assert events[2].command_line == "exact 'a b'" and events[4].pid == 50
    assert (join.matched, join.fallback, join.held) == (1, 0, 2)
    assert join.waiting() == 0


def test_join_falls_back_to_the_proc_connector_exec_after_the_wait():
    sink = ListSink()
    join = ExecJoin(sink, hold=2.0)
    join.netlink_push(_exec_record(70, "from-proc"))
    join.netlink_push(records.encode_process_exit(3, 70, 1))
    assert not join.expire(now=time.monotonic() + 1.0) and sink.records == []
    assert join.expire(now=time.monotonic() + 2.5)
    assert [(type(e).__name__, getattr(e, "command_line", None)) for e in sink.events()] == [
        ("ProcessExec", "from-proc"), ("ProcessExit", None)]
    assert join.fallback == 1 and join.waiting() == 0


def test_join_waits_for_a_reader_that_is_behind_but_not_for_ever():
    sink = ListSink()
    reader = {"caught_up": 0.0}
    join = ExecJoin(sink, hold=2.0, caught_up=lambda: reader["caught_up"], max_wait=30.0)
    t0 = time.monotonic()
    join.netlink_push(_exec_record(75, "from-proc"))
    assert not join.expire(now=t0 + 5)  # the audit reader has not found its socket empty since: wait
    reader["caught_up"] = t0 + 1.0  # ...caught up, but before the wait was over: still wait
    assert not join.expire(now=t0 + 5)
    reader["caught_up"] = t0 + 4.0  # caught up after it: audit has nothing for this exec
    assert join.expire(now=t0 + 5) and join.fallback == 1
    join.netlink_push(_exec_record(76, "from-proc"))
    reader["caught_up"] = 0.0
    assert not join.expire(now=t0 + 20)
    assert join.expire(now=t0 + 33) and join.fallback == 2  # max_wait is the limit


def test_join_audit_first_waits_for_the_proc_connector_exec():
    sink = ListSink()
    join = ExecJoin(sink, hold=2.0)
    join.audit_push(_exec_record(80, "exact"))  # audit's reader ran ahead of the proc connector's
    assert sink.records == []
    join.netlink_push(records.encode_process_create(1, 80, 1, 1, 1, "parent"))
    join.netlink_push(_exec_record(80, "from-proc"))  # the same exec: audit's takes its place
    join.netlink_push(records.encode_process_exit(3, 80, 0))
    assert [(type(e).__name__, getattr(e, "command_line", None)) for e in sink.events()] == [
        ("ProcessCreate", "parent"), ("ProcessExec", "exact"), ("ProcessExit", None)]
    # an audit exec the proc connector never reports (it lost it, and counted that) is pushed after the wait
    join.audit_push(_exec_record(81, "only audit"))
    assert not join.expire(now=time.monotonic() + 1)
    assert join.expire(now=time.monotonic() + 3)
    assert sink.events()[-1].command_line == "only audit"
    assert (join.matched, join.audit_only, join.fallback, join.waiting()) == (1, 1, 0, 0)
    # ...and if the proc connector's reader was only far behind, its exec is that same one: not reported again
    join.netlink_push(_exec_record(81, "from-proc, late"))
    join.netlink_push(records.encode_process_exit(4, 81, 0))
    assert join.expire(now=time.monotonic() + 60) is False
    assert [getattr(e, "command_line", "exit") for e in sink.events()][-2:] == ["only audit", "exit"]
    assert (join.late, join.fallback, join.waiting()) == (1, 0, 0)


def test_join_exec_chain_of_one_pid_matches_in_order():
    sink = ListSink()
    join = ExecJoin(sink, hold=2.0)
    join.netlink_push(_exec_record(90, "proc-1"))
    join.netlink_push(_exec_record(90, "proc-2"))
    join.audit_push(_exec_record(90, "exact-1"))
    join.audit_push(_exec_record(90, "exact-2"))
    assert [e.command_line for e in sink.events()] == ["exact-1", "exact-2"]
    assert join.waiting() == 0 and join.matched == 2
    join.audit_push(_exec_record(91, "exact-3"))  # and audit first
    join.audit_push(_exec_record(91, "exact-4"))
    join.netlink_push(_exec_record(91, "proc-3"))
    join.netlink_push(_exec_record(91, "proc-4"))
    assert [e.command_line for e in sink.events()][2:] == ["exact-3", "exact-4"]
    assert join.waiting() == 0 and join.matched == 4


def test_linux_source_declares_the_union():
    from etwmon.sources.base import DETAIL_CAPABILITIES
    from etwmon.sources.netlink import NetlinkSource

    assert LinuxSource.name == "linux" and not LinuxSource.lossy
    # The details netlink reads from /proc at an exec are not on the linux source's execs (audit's replace them),
    # and it does not seed the identity stage yet.
    from_proc = DETAIL_CAPABILITIES | {"details_from_proc", "process_snapshot"}
    assert LinuxSource.delivers == (NetlinkSource.delivers - from_proc) | AuditSource.delivers
    with pytest.raises(TypeError):
        LinuxSource(nonsense=1)  # type: ignore[call-arg]


_THREAD_THEN_EXEC = ("import os, threading; t = threading.Thread(target=lambda: None); t.start(); t.join(); "
                     "os.execv('/bin/echo', ['/bin/echo', 'x y', '', 'caf\\xe9', 'q\"uote'])")


@pytest.mark.root
def test_linux_source_sees_fork_threads_exec_exit_once_each(live_audit):
    before, _ = live_audit
    with Monitor(source="linux", max_items=100_000) as mon:
        assert mon.source.name == "linux"
        proc = subprocess.Popen([sys.executable, "-c", _THREAD_THEN_EXEC], stdout=subprocess.DEVNULL)
        proc.wait()
        mine: list = []
        buf = bytearray(1 << 20)
        deadline = time.monotonic() + 10
        def ours_ended() -> bool:
            born = [i for i, e in enumerate(mine) if type(e) is records.ProcessCreate and e.parent_pid == os.getpid()]
            return bool(born) and any(isinstance(e, records.ProcessExit) for e in mine[born[-1]:])

        while time.monotonic() < deadline and not ours_ended():
            mon.wait(0.25)
            n = mon.readinto(buf)
            mine += [e for e in records.parse(buf[:n]) if getattr(e, "pid", None) == proc.pid]
        stats = mon.stats.source_stats
    # pids are reused quickly on a busy machine: ours starts at the fork from this process
    starts = [i for i, e in enumerate(mine) if isinstance(e, records.ProcessCreate)
              and not isinstance(e, records.ProcessExec) and e.parent_pid == os.getpid()]
    assert starts, mine
    mine = mine[starts[-1]:]
    kinds = [type(e).__name__ for e in mine]
    assert kinds[0] == "ProcessCreate" and kinds[-1] == "ProcessExit", kinds
    execs = [e for e in mine if isinstance(e, records.ProcessExec)]
    assert [e.argv for e in execs] == [[sys.executable.encode(), b"-c", _THREAD_THEN_EXEC.encode()],
                                       [b"/bin/echo", b"x y", b"", "café".encode(), b'q"uote']]
    assert kinds.count("ThreadCreate") >= 1 and kinds.count("ThreadExit") >= 1
    assert kinds.index("ThreadCreate") > kinds.index("ProcessExec")  # in the order they happened
    assert kinds.count("ProcessCreate") == 1 and kinds.count("ProcessExit") == 1
    assert mine[-1].exit_code == 0
    assert stats["exec_matched"] >= 2
    _assert_restored(before, {os.getpid()})


@pytest.mark.root
@pytest.mark.slow
def test_linux_source_storm_is_exact_and_complete(live_audit, storm_binary):
    before, _ = live_audit
    n = 3000
    with Monitor(source="linux", max_items=200_000) as mon:
        _storm(storm_binary, n)
        seen, lost, stats = _read_storm(mon, n)
    right = sum(_exact(i, argv) for i, argv in seen.items())
    print(f"\nlinux storm: exact {right}/{n}, lost {lost}, fallback {stats['exec_fallback']}")
    assert right >= 0.999 * n
    assert len(seen) + lost >= n
    _assert_restored(before, {os.getpid()})


@pytest.mark.root
def test_auto_prefers_the_linux_source(live_audit):
    from etwmon.sources import open_source

    source = open_source("auto")
    try:
        assert source.name == "linux"
    finally:
        source.close()


@pytest.mark.root
def test_a_source_object_can_run_again_after_close(live_audit):
    before, _ = live_audit
    source = AuditSource()
    for round_ in range(2):
        with Monitor(source=source) as mon:
            pid = os.posix_spawn("/bin/true", ["/bin/true", f"etwmon-round-{round_}"], {})
            os.waitpid(pid, 0)
            found: list = []
            buf = bytearray(1 << 20)
            deadline = time.monotonic() + 10
            while not found and time.monotonic() < deadline:
                mon.wait(0.25)
                n = mon.readinto(buf)
                found = [e for e in records.parse(buf[:n]) if isinstance(e, records.ProcessExec)
                         and e.pid == pid and e.parent_pid == os.getpid()]
            assert [e.argv for e in found] == [[b"/bin/true", b"etwmon-round-%d" % round_]]
    _assert_restored(before, {os.getpid()})


@linux_only
def test_a_failed_open_can_be_retried():
    kernel = FakeAuditKernel(enabled=2)
    src = _fake_source(kernel)
    with pytest.raises(SourceUnavailable):
        src.open()
    kernel.status = AuditStatus(enabled=0, backlog_limit=64)  # unlocked (after a reboot, say)
    src.open()
    try:
        assert len(kernel.rules) == 2 and kernel.status.enabled == 1
    finally:
        src.close()
    assert kernel.rules == [] and kernel.status.enabled == 0


@linux_only
def test_close_restores_the_state_before_removing_the_rule_that_records_it():
    kernel = FakeAuditKernel(enabled=0, backlog_limit=64)
    src = _fake_source(kernel)
    src.open()
    kernel.requests.clear()
    src.close()
    sets = [i for i, r in enumerate(kernel.requests) if r == AUDIT_SET]
    deletes = [i for i, r in enumerate(kernel.requests) if r == AUDIT_DEL_RULE]
    assert sets and deletes and max(sets) < min(deletes)  # killed half-way, a rule still says what to restore
