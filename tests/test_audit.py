"""The audit source: exact argv from the kernel's audit records, its rule and state housekeeping, and its losses.

Offline tests feed records built in the exact shape the kernel writes them (``kernel_execve_records`` follows
``audit_log_execve_info`` in kernel/auditsc.c) and talk to a fake audit kernel over a fake netlink transport;
the ``root`` tests run against the live kernel and always put the machine-wide audit state back.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from etwmon import Monitor, records
from etwmon.errors import SourceUnavailable
from etwmon.sources import _linux
from etwmon.sources.audit import source as audit
from etwmon.sources.audit import state as audit_state
from etwmon.sources.audit import AuditSource
from etwmon.sources.audit.protocol import (
    AUDIT_ADD_RULE, AUDIT_DEL_RULE, AUDIT_GET, AUDIT_SET, AUDIT_SYSCALL, AuditRule, AuditStatus, exec_rules,
)
from etwmon.sources.audit.records import (
    AuditRecord, EventAssembler, SerialTracker, decode_value, parse_fields, parse_record,
)
from etwmon.sources.audit.state import RuleKey

from .audit_builders import (  # noqa: F401 (fixtures are used by name)
    until,
    MAX_EXECVE_AUDIT_LEN, FakeAuditKernel, Running, assert_restored, etwmon_rules, exact, exec_event_records,
    fake_source, feed, kernel_execve_records, live_audit, live_control, private_lock_dir, read_storm, run_storm,
    assert_storm_exact, storm,
    storm_argvs, storm_binary,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux")


# --- records in the kernel's shape ------------------------------------------------------------------------

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
    _assert_whole_or_visibly_cut(parsed, argv)
    assert parsed.truncated == argv_is_long(argv)


def argv_is_long(argv: list[bytes]) -> bool:
    return len(records.command_line_from_argv(argv).encode("utf-16-le", "surrogatepass")) // 2 > \
        records.MAX_COMMAND_LINE


def _assert_whole_or_visibly_cut(parsed: records.ProcessExec, argv: list[bytes]) -> None:
    """The record holds the exact command line, or, when that is over the record's 64 KiB, its start cut
    visibly: the marker at the end, the record full, every whole argument before the cut exact."""
    full = records.command_line_from_argv(argv)
    if not argv_is_long(argv):
        assert parsed.command_line == full and parsed.argv == argv and not parsed.truncated
        return
    line = parsed.command_line
    assert parsed.truncated and line.endswith(records.TRUNCATION_MARKER)
    # (one less when the cut would split a surrogate pair)
    assert records.MAX_COMMAND_LINE - 1 <= len(line.encode("utf-16-le", "surrogatepass")) // 2 <= records.MAX_COMMAND_LINE
    kept = line[:-len(records.TRUNCATION_MARKER)]
    assert kept and full.startswith(kept)
    got = parsed.argv
    assert got and got[:-1] == argv[:len(got) - 1]  # the last one may be cut short


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.binary(max_size=40) | st.binary(min_size=7000, max_size=16000), min_size=1, max_size=6))
@example([b"/bin/echo"] + [b"x y\xff" * 4000] * 3)  # over the record's limit: cut visibly, always tried
@example([b"/bin/echo", "\U0001F600".encode() * 20000])  # cut next to a surrogate pair
def test_any_argv_survives_records_and_the_wire(argv):
    argv = [a.replace(b"\0", b"") for a in argv]  # an argv string ends at its NUL
    event = feed(EventAssembler(), exec_event_records(5, argv))[0]
    assert event.argv() == argv
    (parsed,) = records.parse(event.encode())
    _assert_whole_or_visibly_cut(parsed, argv)


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
    key = RuleKey("etwmon", os.getpid(), _linux.live_process_start(os.getpid()), 0, 64)
    assert RuleKey.parse(str(key), "etwmon") == key
    assert key.owner_alive()
    assert not RuleKey("etwmon", os.getpid(), key.start + 1, 0, 64).owner_alive()  # pid reused
    assert RuleKey.parse("other:1:2:e0:b64", "etwmon") is None
    assert RuleKey.parse("mine\x01etwmon:5:6:e1:b8192", "etwmon") == RuleKey("etwmon", 5, 6, 1, 8192)
    assert RuleKey.parse(None, "etwmon") is None


# --- a fake audit kernel behind a fake netlink transport ------------------------------------------------------

@linux_only
def test_locked_audit_is_unavailable_and_left_alone(monkeypatch):
    monkeypatch.setattr(audit.os, "geteuid", lambda: 0)  # as root: the kernel's answer is what decides
    monkeypatch.setattr(audit, "has_capability", lambda cap: True)
    kernel = FakeAuditKernel(enabled=2)
    with pytest.raises(SourceUnavailable, match="locked"):
        fake_source(kernel).open()
    assert "locked" in audit._unavailable_reason(kernel.factory)
    assert set(kernel.requests) <= {AUDIT_GET}  # no rule, no SET: the lock state is never touched


@linux_only
@pytest.mark.parametrize("code, words", [(errno.EPERM, "CAP_AUDIT_CONTROL"), (errno.ECONNREFUSED, "container")])
def test_refused_control_is_unavailable(code, words):
    kernel = FakeAuditKernel(refuse=code)
    with pytest.raises(SourceUnavailable, match=words):
        fake_source(kernel).open()
    assert kernel.requests == [AUDIT_GET]


@linux_only
def test_refused_log_group_is_unavailable_and_changes_nothing():
    kernel = FakeAuditKernel(enabled=0, refuse_multicast=errno.EPERM)
    with pytest.raises(SourceUnavailable, match="CAP_AUDIT_READ"):
        fake_source(kernel).open()
    assert kernel.rules == [] and kernel.status.enabled == 0
    assert AUDIT_ADD_RULE not in kernel.requests and AUDIT_SET not in kernel.requests


@linux_only
def test_unavailable_reason_reports_lock_and_refusal(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(audit, "has_capability", lambda cap: True)
    assert "locked" in audit._unavailable_reason(FakeAuditKernel(enabled=2).factory)
    assert "EPERM" in audit._unavailable_reason(FakeAuditKernel(refuse=errno.EPERM).factory)
    assert audit._unavailable_reason(FakeAuditKernel(enabled=0).factory) is None
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in audit._unavailable_reason(FakeAuditKernel().factory)
    monkeypatch.setattr(sys, "platform", "win32")
    assert "Linux" in audit._unavailable_reason(FakeAuditKernel().factory)


@linux_only
def test_open_close_enables_raises_backlog_and_restores():
    kernel = FakeAuditKernel(enabled=0, backlog_limit=64)
    src = fake_source(kernel)
    src.open()
    try:
        assert kernel.status.enabled == 1 and kernel.status.backlog_limit == audit_state.DEFAULT_BACKLOG_LIMIT
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
    src = fake_source(kernel)
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
    kernel = FakeAuditKernel(enabled=1, backlog_limit=audit_state.DEFAULT_BACKLOG_LIMIT)
    kernel.rules = [r.pack() for r in stale]
    src = fake_source(kernel)
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
    other = exec_rules(f"etwmon:{ppid}:{_linux.live_process_start(ppid)}:e0:b64")
    kernel = FakeAuditKernel(enabled=1, backlog_limit=audit_state.DEFAULT_BACKLOG_LIMIT)
    kernel.rules = [r.pack() for r in other]
    src = fake_source(kernel)
    src.open()
    src.close()
    assert kernel.rules == [r.pack() for r in other]  # the live one's rules stay
    assert kernel.status.enabled == 1 and kernel.status.backlog_limit == audit_state.DEFAULT_BACKLOG_LIMIT


@linux_only
def test_foreign_rules_are_never_touched():
    foreign = exec_rules("admin-execs")
    kernel = FakeAuditKernel(enabled=1)
    kernel.rules = [r.pack() for r in foreign]
    src = fake_source(kernel)
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


@pytest.mark.root
@pytest.mark.slow
@pytest.mark.parametrize("source", ["audit", "linux"])
def test_exec_storm_command_lines_are_exact(live_audit, storm_binary, source):
    """Every command line of an exec storm is exact (with ``linux``, also a fallback's, read from /proc)."""
    before, _ = live_audit
    n = 3000
    out, seen, lost, stats = run_storm(source, storm_binary, n)
    print(f"\nstorm: {out} (n failed seconds rate); {source}: {len(seen)}/{n} seen; lost {lost}; {stats}")
    assert_storm_exact(seen, lost, n)
    assert_restored(before, {os.getpid()})


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
        control = live_control()
        try:
            mine = [k for _, k in etwmon_rules(control) if k.pid == os.getpid()]
            assert len(mine) == 2  # b64 and b32
            assert control.status().enabled == 1
        finally:
            control.close()
        assert mon.source.name == "audit"
    assert_restored(before, {os.getpid()})


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
        control = live_control()
        try:
            left = [k for _, k in etwmon_rules(control) if k.pid == child.pid]
            assert len(left) == 2 and not left[0].owner_alive()  # what a killed run leaves
            assert (left[0].enabled, left[0].backlog_limit) == (before.enabled, before.backlog_limit)
        finally:
            control.close()
        with Monitor(source="audit"):
            control = live_control()
            try:
                assert not [k for _, k in etwmon_rules(control) if k.pid == child.pid]
            finally:
                control.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert_restored(before, {os.getpid(), child.pid})


@pytest.mark.root
def test_rule_deleted_by_someone_else_is_put_back(live_audit):
    with Running() as run:
        control = live_control()
        try:
            for rule, key in etwmon_rules(control):
                if key.pid == os.getpid():
                    control.delete_rule(rule)  # what `auditctl -D` does to it
            deadline = time.monotonic() + 5
            while run.source.stats()["rules_restored"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len([k for _, k in etwmon_rules(control) if k.pid == os.getpid()]) == 2
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
        storm(storm_binary, n)
        control = live_control()
        try:  # kauditd has handed every queued record to the sockets (ours overflowing) when its queue is empty
            assert until(lambda: control.status().backlog == 0)
        finally:
            control.close()
        run.source._stop.clear()
        restarted = time.monotonic()
        run.thread = threading.Thread(target=run.source.run, args=(run.sink,), daemon=True)
        run.thread.start()
        assert until(lambda: run.source.caught_up_at > restarted)  # read all that was left; stopping settles
    seen = storm_argvs(run.sink.events())
    stats = run.source.stats()
    print(f"\nsmall buffer: {len(seen)}/{n} storm execs seen, lost {run.sink.lost_total}, {stats}")
    assert len(seen) < n  # the buffer did overflow
    assert stats["overruns"] >= 1
    assert run.sink.lost_total == stats["lost"] > 0
    assert len(seen) + run.sink.lost_total >= n
    assert all(exact(i, argv) for i, argv in seen.items())  # never a wrong one


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
    assert_restored(before, {os.getpid()})


@linux_only
def test_a_failed_open_can_be_retried():
    kernel = FakeAuditKernel(enabled=2)
    src = fake_source(kernel)
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
    src = fake_source(kernel)
    src.open()
    kernel.requests.clear()
    src.close()
    sets = [i for i, r in enumerate(kernel.requests) if r == AUDIT_SET]
    deletes = [i for i, r in enumerate(kernel.requests) if r == AUDIT_DEL_RULE]
    assert sets and deletes and max(sets) < min(deletes)  # killed half-way, a rule still says what to restore
