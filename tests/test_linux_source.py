"""The ``linux`` source: the proc connector joined with audit, each exec once with audit's exact argv, in the
order things happened, at the proc connector's nanosecond time; and nothing kept alive after it stops."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
import weakref

import pytest

from etwmon import Monitor, records
from etwmon.sources.audit import AuditSource
from etwmon.sources.linux import ExecJoin, LinuxSource

from .audit_builders import (  # noqa: F401 (fixtures are used by name)
    STORM_TAG, assert_restored, live_audit, read_storm, storm, storm_binary,
)
from .helpers import ListSink



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


def test_join_stamps_audits_exec_with_the_proc_connectors_time():
    sink = ListSink()
    join = ExecJoin(sink, hold=2.0)
    join.netlink_push(_exec_record(60, "from-proc", ft=5_000_123))  # proc connector first
    join.audit_push(_exec_record(60, "exact one", ft=4_990_000))  # audit's coarse millisecond time: earlier
    join.audit_push(_exec_record(61, "exact two", ft=4_990_000))  # audit first
    join.netlink_push(_exec_record(61, "from-proc", ft=5_000_456))
    join.audit_push(_exec_record(62, "only audit", ft=4_990_000))  # the proc connector lost this one
    join.expire(now=time.monotonic() + 3)
    assert [(e.pid, e.command_line, e.filetime) for e in sink.events()] == [
        (60, "exact one", 5_000_123), (61, "exact two", 5_000_456), (62, "only audit", 4_990_000)]


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
    from etwmon.sources.netlink import NetlinkSource

    assert LinuxSource.name == "linux" and not LinuxSource.lossy
    assert LinuxSource.delivers == NetlinkSource.delivers | AuditSource.delivers
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
    assert_restored(before, {os.getpid()})


@pytest.mark.root
def test_auto_prefers_the_linux_source(live_audit, monkeypatch):
    from etwmon.sources import open_source
    from etwmon.sources.bpf import BpfSource

    # auto tries bpf first (tests/test_bpf.py); where it cannot work, linux comes next
    monkeypatch.setattr(BpfSource, "unavailable_reason", classmethod(lambda cls: "not here"))
    source = open_source("auto")
    try:
        assert source.name == "linux"
    finally:
        source.close()


@pytest.mark.root
def test_a_stopped_linux_monitor_is_freed_without_a_garbage_collection(live_audit):
    """Nothing of a stopped Monitor is kept alive by a reference cycle: 300 start/stop cycles once held 300
    rings (10 MiB each by default) until a full collection."""
    gc.collect()
    gc.disable()  # only reference counting frees now
    try:
        mon = Monitor(source="linux", max_items=1000)
        with mon:
            mon.wait(0.05)
            source = weakref.ref(mon.source)
        ring = weakref.ref(mon.ring)
        join = weakref.ref(mon.source.join)
        del mon
        assert ring() is None and source() is None and join() is None
    finally:
        gc.enable()


#: CLOCK_REALTIME_COARSE (include/uapi/linux/time.h): the per-tick clock audit stamps its records with.
_CLOCK_REALTIME_COARSE = 5


@pytest.mark.root
def test_linux_source_time_never_runs_backwards_within_a_process(live_audit, storm_binary):
    """Each storm child's records (create, exec, exit: one after the other in the kernel) come in order and
    their times never decrease: the exec carries the proc connector's nanosecond time like the others, not
    audit's millisecond one of a coarse clock (which put 133 of 198 execs before their own create)."""
    n = 1000
    events: list = []
    with Monitor(source="linux", max_items=200_000) as mon:
        storm(storm_binary, n)
        seen, lost, stats = read_storm(mon, n, keep=events)
    assert len(seen) + lost >= n and len(seen) > n // 2
    lives: dict[int, list[list]] = {}  # pid -> the records of each process that had it, in stream order
    for event in events:
        if type(event) is records.ProcessCreate:  # a fork: a new process (a pid may be reused)
            lives.setdefault(event.pid, []).append([event])
        elif isinstance(event, (records.ProcessExec, records.ProcessExit, records.ThreadCreate,
                                records.ThreadExit)) and event.pid in lives:
            lives[event.pid][-1].append(event)
    # Only an exec the proc connector lost (counted) is pushed with audit's time, good to a tick of its clock
    # plus its millisecond; every other record carries one clock's nanoseconds, cut to FILETIME's 100 ns.
    coarse = int(time.clock_getres(_CLOCK_REALTIME_COARSE) * 1e7) + 10_000 if stats["exec_audit_only"] else 0
    tag = STORM_TAG.encode() + b"-"
    worst, pairs, storm_lives, created_then_exec, worst_other = 0, 0, 0, 0, 0
    for life in (life for each in lives.values() for life in each):
        steps = [earlier.filetime - later.filetime for earlier, later in zip(life, life[1:])]
        if any(isinstance(e, records.ProcessExec) and len(e.argv) == 2 and e.argv[1].startswith(tag) for e in life):
            storm_lives += 1
            created_then_exec += type(life[1]) is records.ProcessExec
            pairs += len(steps)
            worst = max([worst, *steps])
        else:
            # Other processes' threads: events of two threads on two CPUs reach the socket in the order the
            # kernel sent them, which is not always the order it stamped them (a task preempted in between).
            worst_other = max([worst_other, *steps])
    print(f"\n{storm_lives} storm processes, {pairs} successive pairs, worst step back {worst * 100} ns, "
          f"audit-only execs {stats['exec_audit_only']} (other processes: worst step back {worst_other * 100} ns)")
    assert worst <= coarse
    assert storm_lives == len(seen) and created_then_exec == storm_lives  # in stream order: create, then exec
