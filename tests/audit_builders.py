"""Audit records in the exact shape the kernel writes them, a fake audit kernel behind a fake netlink transport,
and the helpers the live audit tests share (the machine-wide audit state put back whatever a test does).

``kernel_execve_records`` follows ``audit_log_execve_info`` in kernel/auditsc.c; ``FakeAuditKernel`` answers
requests like kernel/audit.c.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from etwmon import Monitor, records
from etwmon.sources.audit import protocol as audit_protocol
from etwmon.sources.audit import state as audit_state
from etwmon.sources.audit import AuditSource
from etwmon.sources.audit.protocol import (
    AUDIT_GET, AUDIT_LIST_RULES, AUDIT_SET, AUDIT_ADD_RULE, AUDIT_DEL_RULE, AUDIT_CWD, AUDIT_EOE, AUDIT_EXECVE,
    AUDIT_PATH, AUDIT_PROCTITLE, AUDIT_SYSCALL, AuditControl, AuditRule, AuditStatus,
)
from etwmon.sources.audit.records import EventAssembler
from etwmon.sources.audit.state import RuleKey

from .conftest import require
from .helpers import ListSink


@pytest.fixture(autouse=True)
def private_lock_dir(request, tmp_path, monkeypatch):
    """Tests against a fake kernel take a lock of their own; live ones share /run/etwmon-audit with every instance."""
    if request.node.get_closest_marker("root") is None:
        lock_dir = tmp_path / "etwmon-lock"
        lock_dir.mkdir(mode=0o700)
        monkeypatch.setattr(audit_state, "LOCK_DIR", str(lock_dir))


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


def fake_source(kernel: FakeAuditKernel) -> AuditSource:
    return AuditSource(probe=False, transport_factory=kernel.factory)


def until(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until true or ``timeout`` seconds: waiting on a condition, not for a time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- live kernel ---------------------------------------------------------------------------------------------


def live_control() -> AuditControl:
    return AuditControl(audit_protocol.NetlinkTransport(0))


def etwmon_rules(control: AuditControl) -> list[tuple[AuditRule, RuleKey]]:
    out = []
    for rule in control.list_rules():
        key = RuleKey.parse(rule.key, "etwmon")
        if key is not None:
            out.append((rule, key))
    return out


def state_before_etwmon(control: AuditControl) -> AuditStatus:
    """The audit state from before any etwmon instance changed it: the one recorded in a (live or left-over)
    etwmon rule's key if there is one — another instance may be running — else the current one."""
    status = control.status()
    for _, key in etwmon_rules(control):
        return AuditStatus(**{**vars(status), "enabled": key.enabled, "backlog_limit": key.backlog_limit})
    return status


@pytest.fixture
def live_audit():
    """The live kernel's audit, put back as it was whatever the test does: rules of this process (and of
    children it names in ``owners``) removed; enabled/backlog_limit restored when no other instance runs."""
    require(sys.platform.startswith("linux") and os.geteuid() == 0, "needs root on Linux")
    reason = AuditSource.unavailable_reason()
    require(reason is None, f"audit unusable here: {reason}")
    control = live_control()
    before = state_before_etwmon(control)
    owners = {os.getpid()}
    yield before, owners
    try:
        others = False
        for rule, key in etwmon_rules(control):
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


def assert_restored(before: AuditStatus, gone_pids: set[int]) -> None:
    control = live_control()
    try:
        rules = etwmon_rules(control)
        assert not [k for _, k in rules if k.pid in gone_pids], "an etwmon rule was left behind"
        if not [k for _, k in rules if k.owner_alive()]:  # no other instance is running right now
            now = control.status()
            assert now.enabled == before.enabled
            assert now.backlog_limit == before.backlog_limit
    finally:
        control.close()


class _KeepingAuditSource(AuditSource):
    """An AuditSource that also keeps every ExecEvent it assembled (argv before encoding, and the records'
    shape), for tests that look at more than the record holds."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.exec_events: list = []

    def _emit(self, sink, event, record) -> None:
        self.exec_events.append(event)
        super()._emit(sink, event, record)


class Running:
    """An AuditSource running on a thread, keeping every ExecEvent it assembled (argv before encoding)."""

    def __init__(self, **options) -> None:
        self.source = _KeepingAuditSource(**options)
        self.sink = ListSink()
        self.exec_events = self.source.exec_events
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


def storm(binary: str, n: int) -> str:
    return subprocess.run([binary, str(n), "/bin/true", STORM_TAG], capture_output=True, text=True,
                          check=True).stdout.strip()


def read_storm(mon: Monitor, n: int, keep: list | None = None) -> tuple[dict[int, list[bytes]], int, dict]:
    """Read until the argv of all ``n`` storm children arrived (or 20 s): {i: argv}, records lost, stats.
    ``keep``: a list that gets every event read, in stream order."""
    seen: dict[int, list[bytes]] = {}
    lost = 0
    buf = bytearray(1 << 20)
    deadline = time.monotonic() + 20
    while len(seen) < n and time.monotonic() < deadline:
        mon.wait(0.5)
        events = list(records.parse(buf[:mon.readinto(buf)]))
        lost += sum(e.count for e in events if isinstance(e, records.RecordsLost))
        seen.update(storm_argvs(events))
        if keep is not None:
            keep += events
    return seen, lost, mon.stats.source_stats


def run_storm(source: str, binary: str, n: int) -> tuple[str, dict[int, list[bytes]], int, dict]:
    """An exec storm of ``n`` children watched by a Monitor of ``source``: the storm's own report, then what
    ``read_storm`` returns."""
    with Monitor(source=source, max_items=200_000) as mon:
        out = storm(binary, n)
        return (out, *read_storm(mon, n))


def assert_storm_exact(seen: dict[int, list[bytes]], lost: int, n: int) -> None:
    assert all(exact(i, argv) for i, argv in seen.items())  # every command line reported is exact,
    assert len(seen) >= 0.999 * n  # nearly all are there,
    assert len(seen) + lost >= n  # and whatever was missed was counted


def storm_argvs(events) -> dict[int, list[bytes]]:
    """Storm index -> argv of every ProcessExec that is one of our storm's children."""
    seen = {}
    prefix = STORM_TAG.encode() + b"-"
    for event in events:
        argv = event.argv if isinstance(event, records.ProcessExec) else None
        if argv and len(argv) == 2 and argv[1].startswith(prefix):
            seen[int(argv[1][len(prefix):])] = argv
    return seen


def exact(i: int, argv: list[bytes]) -> bool:
    return argv == [b"/bin/true", b"%s-%d" % (STORM_TAG.encode(), i)]
