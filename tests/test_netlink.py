"""The proc connector source: the parser on kernel-shaped bytes, loss accounting, and the live kernel (root)."""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from . import cn_builders as cb
from .helpers import (
    ListSink, exit_3_and_sigkill, fork_storm_while_stalled, of_type, read_until, run_one_thread, timed_sleep,
    unprivileged,
)

import etwmon
from etwmon import ItemType, parse
from etwmon.records import FILETIME_UNIX_EPOCH
from etwmon.sources.netlink import (
    MESSAGE_SIZE, NetlinkSource, ProcEventDecoder, shell_exit_code,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the proc connector is Linux only")

OFFSET = 1_000_000_000_000  # wall clock minus monotonic, fixed for exact times in parser tests


def decoder(tmp_path=None, **options) -> tuple[ProcEventDecoder, ListSink]:
    sink = ListSink()
    if tmp_path is not None:
        options["proc_root"] = str(tmp_path)
    return ProcEventDecoder(sink, clock_offset_ns=OFFSET, **options), sink


def filetime(ts_ns: int) -> int:
    return (ts_ns + OFFSET) // 100 + FILETIME_UNIX_EPOCH


def fake_process(root, pid: int, argv: list[bytes], comm: bytes, ppid: int, start_ticks: int) -> None:
    """A /proc/<pid> with just cmdline and stat, in the kernel's formats."""
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "cmdline").write_bytes(b"".join(a + b"\0" for a in argv))
    rest = ["S", str(ppid)] + ["0"] * 17 + [str(start_ticks)] + ["0"] * 30
    (d / "stat").write_bytes(b"%d (%s) " % (pid, comm) + " ".join(rest).encode())


# --- the parser on kernel-shaped messages ------------------------------------------------------------------------


def test_message_is_76_bytes_as_the_kernel_sends_it():
    assert len(cb.fork(0, 0, 1, 10, 10, 11, 11)) == MESSAGE_SIZE == 76


def test_fork_of_a_process_and_of_a_thread():
    dec, sink = decoder()
    dec.command_lines[100] = "parent --flag 'two words'"
    dec.parse_messages(cb.fork(7, 0, 5_000, 101, 100, 200, 200))  # thread 101 of process 100 forks 200
    dec.parse_messages(cb.fork(8, 0, 6_000, 100, 100, 201, 100))  # process 100 starts thread 201
    create, thread = sink.events()
    assert create.type == ItemType.ProcessCreate
    assert (create.pid, create.parent_pid, create.creating_pid, create.creating_tid) == (200, 100, 100, 101)
    assert create.command_line == "parent --flag 'two words'"  # inherited
    assert create.filetime == filetime(5_000)
    assert thread.type == ItemType.ThreadCreate and (thread.tid, thread.pid) == (201, 100)
    assert thread.filetime == filetime(6_000)
    assert dec.command_lines[200] == "parent --flag 'two words'"


def test_a_command_line_handed_in_is_what_later_children_inherit():
    source = NetlinkSource()
    source.set_command_line(100, "ignored before open")  # no decoder yet: nothing to remember
    dec, sink = decoder()
    source._decoder = dec
    source.set_command_line(100, "python3 -c 'exact argv' $'\\n'")
    dec.parse_messages(cb.fork(7, 0, 5_000, 100, 100, 200, 200))
    (create,) = sink.events()
    assert create.pid == 200 and create.command_line == "python3 -c 'exact argv' $'\\n'"


@pytest.mark.parametrize("status, code", [
    (cb.wait_status_exited(0), 0), (cb.wait_status_exited(3), 3), (cb.wait_status_exited(255), 255),
    (cb.wait_status_signaled(signal.SIGKILL), 137), (cb.wait_status_signaled(signal.SIGTERM), 143),
    (cb.wait_status_signaled(signal.SIGSEGV, core=True), 139),
])
def test_exit_codes_are_what_a_shell_reports(status, code):
    assert shell_exit_code(status) == code
    dec, sink = decoder()
    dec.parse_messages(cb.exit_(0, 0, 10, 300, 300, status))
    dec.parse_messages(cb.exit_(1, 0, 11, 301, 300, status))
    process_exit, thread_exit = sink.events()
    assert process_exit.type == ItemType.ProcessExit and (process_exit.pid, process_exit.exit_code) == (300, code)
    assert thread_exit.type == ItemType.ThreadExit
    assert (thread_exit.tid, thread_exit.pid, thread_exit.exit_code) == (301, 300, code)


def test_exec_reads_proc_and_keeps_non_utf8_bytes(tmp_path):
    argv = [b"/usr/bin/prog", b"two words", b"caf\xe9", b""]
    fake_process(tmp_path, 400, argv, b"prog", ppid=399, start_ticks=100)
    dec, sink = decoder(tmp_path)
    dec.parse_messages(cb.exec_(0, 1, 2_000_000_000, 401, 400))  # thread 401 of 400 exec'd, 1 s after start
    (ev,) = sink.events()
    assert ev.type == ItemType.ProcessExec
    assert (ev.pid, ev.parent_pid, ev.creating_pid, ev.creating_tid) == (400, 399, 400, 401)
    assert ev.argv == argv
    assert dec.command_lines[400] == ev.command_line
    # A fork after the exec inherits the new command line from the cache, without /proc.
    dec.parse_messages(cb.fork(1, 1, 2_000_000_100, 400, 400, 402, 402))
    assert sink.events()[-1].command_line == ev.command_line


def test_exec_of_a_reused_pid_never_takes_the_other_process_command_line(tmp_path):
    # /proc/500 now belongs to a process that started (tick 300 = 3 s) after the exec event (1 s).
    fake_process(tmp_path, 500, [b"someone", b"else"], b"someone", ppid=1, start_ticks=300)
    dec, sink = decoder(tmp_path)
    dec.parse_messages(cb.exec_(0, 0, 1_000_000_000, 500, 500))
    (ev,) = sink.events()
    assert ev.command_line == "" and ev.parent_pid == 0
    assert dec.cmdline_gone == 1


def test_exec_of_a_vanished_process_gives_an_empty_command_line(tmp_path):
    dec, sink = decoder(tmp_path)
    dec.parse_messages(cb.exec_(0, 0, 1_000_000_000, 600, 600))
    (ev,) = sink.events()
    assert ev.command_line == "" and dec.cmdline_gone == 1


def test_exec_of_a_zombie_gives_its_comm(tmp_path):
    fake_process(tmp_path, 700, [], b"true", ppid=1, start_ticks=10)  # exited: cmdline is empty
    dec, sink = decoder(tmp_path)
    dec.parse_messages(cb.exec_(0, 0, 1_000_000_000, 700, 700))
    (ev,) = sink.events()
    assert ev.command_line == "true" and dec.cmdline_comm == 1


def test_cmdline_false_reports_the_comm(tmp_path):
    fake_process(tmp_path, 800, [b"/bin/sleep", b"5"], b"sleep", ppid=1, start_ticks=10)
    dec, sink = decoder(tmp_path, cmdline=False)
    dec.parse_messages(cb.exec_(0, 0, 1_000_000_000, 800, 800))
    assert sink.events()[0].command_line == "sleep"


def test_exec_events_false_makes_no_record_and_forgets_the_old_command_line():
    dec, sink = decoder(exec_events=False)
    dec.command_lines[900] = "old program"
    dec.parse_messages(cb.exec_(0, 0, 1, 900, 900))
    assert sink.records == [] and 900 not in dec.command_lines


def test_other_events_make_no_records_but_count_in_the_sequence():
    dec, sink = decoder()
    for seq, msg in enumerate([cb.comm(0, 0, 1, 5, 5, b"name"), cb.message(1, cb.proc_event(cb.UID, 0, 2, 5, 5)),
                               cb.message(2, cb.proc_event(cb.PTRACE, 0, 3, 5, 5, 6, 6)),
                               cb.message(3, cb.proc_event(cb.COREDUMP, 0, 4, 5, 5, 1, 1)),
                               cb.ack(4, 0, 5, 1)]):
        dec.parse_messages(msg)
    assert sink.records == [] and dec.received == 5 and dec.lost == 0


# --- loss accounting ---------------------------------------------------------------------------------------------


def test_sequence_gaps_are_counted_per_cpu():
    dec, sink = decoder()
    feed = [  # (seq, cpu): cpu 0 counts 10, 11, 15 (3 lost); cpu 1 counts 500, 501, 502, 510 (7 lost)
        (10, 0), (500, 1), (11, 0), (501, 1), (502, 1), (15, 0), (510, 1),
    ]
    for seq, cpu in feed:
        dec.parse_messages(cb.fork(seq, cpu, 1, 2, 2, 3, 2))
    assert sink.lost == [3, 7] and dec.lost == 10 and dec.received == 7
    assert dec.sequence_windows() == {0: (10, 15), 1: (500, 510)}
    assert len(sink.records) == 7


def test_first_message_on_a_cpu_has_no_predecessor_and_wraparound_is_no_gap():
    dec, sink = decoder()
    for seq, cpu in [(123456, 3), (0xFFFFFFFE, 0), (0xFFFFFFFF, 0), (0, 0), (1, 0), (4, 0)]:
        dec.parse_messages(cb.fork(seq, cpu, 1, 2, 2, 3, 2))
    assert sink.lost == [2] and dec.seq_resets == 0


def test_a_sequence_going_back_is_a_reset_not_a_loss():
    dec, sink = decoder()
    for seq in (100, 101, 50, 51):
        dec.parse_messages(cb.fork(seq, 0, 1, 2, 2, 3, 2))
    assert sink.lost == [] and dec.seq_resets == 1


def test_a_loss_empties_the_command_line_cache():
    dec, sink = decoder()
    dec.command_lines[5] = "cached"
    dec.parse_messages(cb.exit_(0, 0, 1, 7, 7, 0))
    dec.parse_messages(cb.exit_(2, 0, 1, 8, 8, 0))  # one message lost: what it said is unknown
    assert dec.command_lines == {} and sink.lost == [1]


def test_old_kernel_acks_with_cpu_minus_one_are_not_sequenced():
    dec, sink = decoder()
    dec.parse_messages(cb.fork(10, 0, 1, 2, 2, 3, 2))
    dec.parse_messages(cb.ack(77, 0xFFFFFFFF, 1, 1))  # seq = the request's own, not a per-CPU count
    dec.parse_messages(cb.fork(11, 0, 1, 2, 2, 3, 2))
    assert sink.lost == [] and 0xFFFFFFFF not in dec.sequence_windows()


# --- malformed input ---------------------------------------------------------------------------------------------


def test_several_messages_in_one_buffer_and_foreign_ones_skipped():
    dec, sink = decoder()
    foreign = cb.message(0, cb.proc_event(cb.FORK, 0, 1, 1, 1, 2, 2), idx=7, val=1)  # another connector user
    noop = cb.nlmsghdr(16, type_=1)
    buf = cb.fork(0, 0, 1, 2, 2, 3, 2) + foreign + noop + cb.exit_(1, 0, 2, 3, 2, 0)
    dec.parse_messages(bytearray(buf) + bytearray(100), len(buf))  # n bytes of a larger buffer
    assert [e.type for e in sink.events()] == [ItemType.ThreadCreate, ItemType.ThreadExit]
    assert dec.parse_errors == 0 and dec.received == 2


@pytest.mark.parametrize("cut", range(1, MESSAGE_SIZE))
def test_a_truncated_message_is_one_parse_error(cut):
    dec, sink = decoder()
    dec.parse_messages(cb.fork(0, 0, 1, 2, 2, 3, 3)[:cut])
    assert dec.parse_errors == 1 and sink.records == [] and dec.received == 0


def test_lengths_that_lie_are_parse_errors():
    dec, sink = decoder()
    msg = bytearray(cb.fork(0, 0, 1, 2, 2, 3, 3))
    too_long = bytearray(msg)
    struct.pack_into("=I", too_long, 0, 200)
    too_short = bytearray(msg)
    struct.pack_into("=I", too_short, 0, 8)
    short_fork = cb.message(0, cb.proc_event(cb.FORK, 0, 1, 2, 2, 3, 3)[:24])  # fork needs 32 bytes of union
    cn_len_lies = bytearray(msg)
    struct.pack_into("=H", cn_len_lies, 32, 60)  # says 60 bytes of data, 40 follow
    for bad in (too_long, too_short, short_fork, cn_len_lies):
        dec.parse_messages(bytearray(bad), len(bad))
    assert dec.parse_errors == 4 and sink.records == []


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes_never_raise(data):
    dec, sink = decoder()
    dec.parse_messages(bytearray(data), len(data))
    assert len(list(parse(b"".join(sink.records)))) == len(sink.records)  # each push is one well-formed record
    assert sum(sink.lost) == dec.lost and len(sink.records) <= dec.received
    if data and (len(data) < 16 or not 16 <= struct.unpack_from("=I", data)[0] <= len(data)):
        # No first header to trust: exactly one parse error, and nothing else happened.
        assert (dec.parse_errors, dec.received, sink.records, sink.lost) == (1, 0, [], [])
    elif not data:
        assert (dec.parse_errors, dec.received) == (0, 0)
    else:
        assert dec.parse_errors + dec.received >= 1  # the frame was an event or an error (or foreign, below)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 0xFFFFFFFF),
                          st.sampled_from([cb.FORK, cb.EXIT, cb.COMM, cb.UID, cb.NONE, 0x1234]),
                          st.lists(st.integers(0, 0xFFFFFFFF), min_size=6, max_size=6)), max_size=20),
       st.integers(0, 20 * 76), st.randoms())
def test_well_framed_random_events_and_truncations_never_raise(events, cut, rnd):
    dec, sink = decoder()
    buf = b"".join(cb.message(seq, cb.proc_event(what, cpu, 1, *words[:4]) if what != cb.EXIT
                              else cb.proc_event(what, cpu, 1, *words)) for cpu, seq, what, words in events)
    cut = min(cut, len(buf))
    mutated = bytearray(buf[:cut])
    if mutated:
        mutated[rnd.randrange(len(mutated))] ^= 1 << rnd.randrange(8)
    dec.parse_messages(mutated, len(mutated))
    dec.parse_messages(bytearray(buf), len(buf))
    assert sum(sink.lost) == dec.lost
    assert len(list(parse(b"".join(sink.records)))) == len(sink.records)  # whatever came out is whole records
    # The intact stream on its own decodes exactly: one record per fork and exit, none for the rest, and the
    # losses are the per-CPU sequence gaps.
    dec, sink = decoder()
    dec.parse_messages(bytearray(buf), len(buf))
    expected, lost, last = [], 0, {}
    for cpu, seq, what, words in events:
        if cpu in last and seq != (last[cpu] + 1) & 0xFFFFFFFF:
            gap = (seq - last[cpu] - 1) & 0xFFFFFFFF
            lost += gap if gap < 0x80000000 else 0
        last[cpu] = seq
        if what == cb.FORK:
            expected.append(ItemType.ThreadCreate if words[2] != words[3] else ItemType.ProcessCreate)
        elif what == cb.EXIT:
            expected.append(ItemType.ThreadExit if words[0] != words[1] else ItemType.ProcessExit)
    assert [e.type for e in parse(b"".join(sink.records))] == expected
    assert (dec.parse_errors, dec.received, dec.lost, sum(sink.lost)) == (0, len(events), lost, lost)


# --- the run loop: ENOBUFS is not counted twice ------------------------------------------------------------------


class ScriptedSocket:
    """Stands in for the netlink socket: recv_into returns the scripted messages or raises the scripted errors,
    then EAGAIN; fileno() is a real descriptor so poll() works."""

    def __init__(self, script: list) -> None:
        self.script = collections.deque(script)
        self.options: list[tuple[int, int, int]] = []
        self._r, self._w = socket.socketpair()

    def fileno(self) -> int:
        return self._r.fileno()

    def recv_into(self, buf) -> int:
        if not self.script:
            raise BlockingIOError(errno.EAGAIN, "empty")
        item = self.script.popleft()
        if isinstance(item, int):
            raise OSError(item, os.strerror(item))
        buf[:len(item)] = item
        return len(item)

    def send(self, data) -> int:
        return len(data)

    def setsockopt(self, level: int, option: int, value: int) -> None:
        self.options.append((level, option, value))

    def close(self) -> None:
        self._r.close()
        self._w.close()


def test_enobufs_is_resolved_by_the_gaps_that_follow_and_never_double_counted():
    source = NetlinkSource()
    sock = ScriptedSocket([
        cb.fork(10, 0, 1, 2, 2, 3, 2), cb.fork(20, 1, 1, 2, 2, 4, 2),
        errno.ENOBUFS,  # the buffer overflowed: cpu 0 lost 11..14, cpu 1 lost 21
        cb.fork(15, 0, 1, 2, 2, 5, 2), cb.fork(22, 1, 1, 2, 2, 6, 2),
        errno.ENOBUFS,  # and again: cpu 0 lost 16 (seen when 17 arrives)
        cb.fork(17, 0, 1, 2, 2, 7, 2),
    ])
    source._sock = sock
    source._decoder = ProcEventDecoder(clock_offset_ns=OFFSET)
    source._wake.open()
    sink = ListSink()
    runner = threading.Thread(target=source.run, args=(sink,))
    runner.start()
    deadline = time.monotonic() + 5
    while sock.script and time.monotonic() < deadline:
        time.sleep(0.01)
    source.stop()
    runner.join(5)
    source._sock = None
    sock.close()
    source.close()
    assert not runner.is_alive()
    assert source.overruns == 2
    assert sum(sink.lost) == source.stats()["lost"] == 4 + 1 + 1
    assert len(sink.records) == 5 and sink.notified >= 1


def run_stopped(source: NetlinkSource, sock: ScriptedSocket, early: list[bytes]) -> ListSink:
    """``run`` of a source that was stopped before it began: only the stopping path runs, over the scripted
    queue. ``early`` are messages that came during the subscription (decoded first, as baselines)."""
    source._sock = sock
    source._decoder = ProcEventDecoder(clock_offset_ns=OFFSET)
    source._early = list(early)
    source._wake.open()
    sink = ListSink()
    source.stop()
    try:
        source.run(sink)  # on this thread: it must return by itself
    finally:
        source._sock = None
        sock.close()
        source.close()
    return sink


@pytest.mark.parametrize("drain_seconds, decoded, lost", [
    (5.0, 2 + 5, 1),      # time enough: everything queued is decoded; only the gap (cpu 0 seq 12) is lost
    (0.0, 2, 4 + 2),      # no time: the five queued messages and the gap are counted as lost, none decoded
])
def test_stop_decodes_what_is_queued_while_time_allows_and_counts_the_rest_as_lost(drain_seconds, decoded, lost,
                                                                                  monkeypatch):
    monkeypatch.setattr(NetlinkSource, "STOP_DRAIN_SECONDS", drain_seconds)
    source = NetlinkSource()
    sock = ScriptedSocket([
        cb.fork(10, 0, 1, 2, 2, 5, 2), cb.fork(20, 1, 1, 2, 2, 6, 2), cb.fork(11, 0, 1, 2, 2, 7, 2),
        cb.fork(13, 0, 1, 2, 2, 8, 2),  # cpu 0 lost 12
        cb.fork(21, 1, 1, 2, 2, 9, 2),
    ])
    sink = run_stopped(source, sock, early=[cb.fork(9, 0, 1, 2, 2, 3, 2), cb.fork(19, 1, 1, 2, 2, 4, 2)])
    assert len(sink.records) == decoded
    assert sum(sink.lost) == source.stats()["lost"] == lost
    assert source.sequence_windows() == {0: (9, 13), 1: (19, 21)}
    # It left the proc connector's group first, so a storm could not have kept the queue growing.
    assert (270, 2, 1) in sock.options and not sock.script


# --- live kernel (root) ------------------------------------------------------------------------------------------


@pytest.fixture
def netlink_monitor():
    with etwmon.Monitor(source="netlink", max_items=200_000) as mon:
        yield mon


@pytest.mark.root
def test_live_exit_codes(netlink_monitor):
    mon = netlink_monitor
    exited, killed = exit_3_and_sigkill()
    events = read_until(mon, lambda evs: {killed, exited} <= {e.pid for e in of_type(evs, ItemType.ProcessExit)})
    exits = {e.pid: e.exit_code for e in of_type(events, ItemType.ProcessExit)}
    assert exits[exited] == 3
    assert exits[killed] == 137
    assert mon.stats.lost == 0


@pytest.mark.root
def test_live_thread_create_and_exit(netlink_monitor):
    tid = run_one_thread()
    def process_ended(evs) -> bool:
        pids = {e.pid for e in evs if e.type == ItemType.ThreadCreate and e.tid == tid}
        return any(e.type == ItemType.ProcessExit and e.pid in pids for e in evs)

    events = read_until(netlink_monitor, process_ended)
    creates = [e for e in of_type(events, ItemType.ThreadCreate) if e.tid == tid]
    exits = [e for e in of_type(events, ItemType.ThreadExit) if e.tid == tid]
    assert len(creates) == 1 and len(exits) == 1
    pid = creates[0].pid
    assert pid != tid and exits[0].pid == pid and exits[0].exit_code == 0
    assert any(e.pid == pid for e in of_type(events, ItemType.ProcessExit))


@pytest.mark.root
def test_live_fork_without_exec_has_the_right_parent_and_inherited_command_line(netlink_monitor):
    code = ("import os, sys\n"
            "pid = os.fork()\n"
            "if pid == 0: os._exit(5)\n"
            "os.waitpid(pid, 0); print(os.getpid(), pid, flush=True)\n")
    child = subprocess.run([sys.executable, "-c", code, "marker-arg"], capture_output=True, text=True, check=True)
    parent, grandchild = map(int, child.stdout.split())
    events = read_until(netlink_monitor, lambda evs: any(e.type == ItemType.ProcessExit and e.pid == grandchild
                                                    for e in evs))
    (create,) = [e for e in of_type(events, ItemType.ProcessCreate) if e.pid == grandchild]
    assert (create.parent_pid, create.creating_pid, create.creating_tid) == (parent, parent, parent)
    assert create.argv[-1] == b"marker-arg"  # what it inherited from the Python that forked it
    (exit_,) = [e for e in of_type(events, ItemType.ProcessExit) if e.pid == grandchild]
    assert exit_.exit_code == 5
    assert not [e for e in of_type(events, ItemType.ProcessExec) if e.pid == grandchild]


@pytest.mark.root
def test_live_exec_command_line_and_times_close_to_the_wall_clock(netlink_monitor):
    before, after, _, mine = timed_sleep(netlink_monitor)
    (exec_,) = of_type(mine, ItemType.ProcessExec)
    assert exec_.argv == [b"sleep", b"0.3"]
    assert exec_.parent_pid == os.getpid()
    assert [e.type for e in mine] == [ItemType.ProcessCreate, ItemType.ProcessExec, ItemType.ProcessExit]
    slack = 50 * 10_000  # 50 ms in FILETIME ticks
    for e in mine:
        assert before - slack <= e.filetime <= after + slack, e
    # exec -> exit took at least the 0.3 s the child slept (less than the clock's 100 ns ticks aside)
    assert mine[2].filetime - mine[1].filetime >= 3_000_000


@pytest.mark.root
def test_live_options_exec_events_false_and_cmdline_false():
    with etwmon.Monitor(source="netlink", exec_events=False) as mon:
        child = subprocess.Popen(["sleep", "0.05"])
        child.wait()
        events = read_until(mon, lambda evs: any(e.type == ItemType.ProcessExit and e.pid == child.pid for e in evs))
    assert [e.type for e in events if getattr(e, "pid", None) == child.pid] == [
        ItemType.ProcessCreate, ItemType.ProcessExit]
    with etwmon.Monitor(source="netlink", cmdline=False) as mon:
        child = subprocess.Popen(["sleep", "0.05"])
        child.wait()
        events = read_until(mon, lambda evs: any(e.type == ItemType.ProcessExit and e.pid == child.pid for e in evs))
    (exec_,) = [e for e in of_type(events, ItemType.ProcessExec) if e.pid == child.pid]
    assert exec_.command_line == "sleep"


@pytest.mark.root
def test_live_source_thread_gets_the_nice_value():
    def source_thread_priority(mon) -> int:
        # An event of ours read back means the source thread is past its start (where it sets its priority).
        child = subprocess.Popen(["true"])
        child.wait()
        events = read_until(mon, lambda evs: any(e.type == ItemType.ProcessExit and e.pid == child.pid for e in evs))
        assert any(e.type == ItemType.ProcessExit and e.pid == child.pid for e in events)
        return os.getpriority(os.PRIO_PROCESS, mon._thread.native_id)

    with etwmon.Monitor(source="netlink", nice=-7) as mon:
        assert source_thread_priority(mon) == -7
    with etwmon.Monitor(source="netlink", nice=None) as mon:
        assert source_thread_priority(mon) == os.getpriority(os.PRIO_PROCESS, 0)
    with pytest.raises(ValueError):
        NetlinkSource(nice=-21)


UNPRIVILEGED_CHILD = r"""
import errno, json, logging, socket, subprocess, sys, time
logging.basicConfig(level=logging.WARNING)
import etwmon
from etwmon.sources.netlink import NetlinkSource
caps = int(next(l for l in open("/proc/self/status") if l.startswith("CapEff:")).split()[1], 16)
# What the kernel does, asked directly: join the proc connector's group (NETLINK_CONNECTOR 11, CN_IDX_PROC 1).
probe = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11)
try:
    probe.bind((0, 1))
    joined = True
except OSError as exc:
    joined = exc.errno
probe.close()
reason = NetlinkSource.unavailable_reason()
codes = []
if reason is None:
    buf = bytearray(1 << 16)
    with etwmon.Monitor(source="netlink") as mon:
        subprocess.run(["sh", "-c", "exit 3"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and 3 not in codes:
            mon.wait(0.5)
            n = mon.readinto(buf)
            codes += [e.exit_code for e in etwmon.parse(buf[:n]) if e.type == etwmon.ItemType.ProcessExit]
print(json.dumps({"caps": caps, "joined": joined, "reason": reason, "codes": codes}))
"""


@pytest.mark.root
def test_without_any_capability_the_connector_works_where_the_kernel_lets_any_user_join():
    """Mainline Linux lets any user join the proc connector since 6.6, but not every build does (one 6.18 here
    refuses): the source must follow what the kernel does, found by trying, and say so when it cannot."""
    import json
    proc = subprocess.run(unprivileged([sys.executable, "-c", UNPRIVILEGED_CHILD]), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout)
    assert got["caps"] == 0
    if got["joined"] is True:
        assert got["reason"] is None and 3 in got["codes"]
        with open("/proc/sys/net/core/rmem_max") as f:
            small = int(f.read()) < 8 << 20
        assert ("net.core.rmem_max caps it" in proc.stderr) == small, proc.stderr  # a smaller buffer is said
    else:
        assert got["joined"] == errno.EPERM, got
        reason = got["reason"]
        assert reason == ("this kernel lets only root (CAP_NET_ADMIN) join the proc connector: run as root, or use "
                          "--source procfs (polling: can miss short-lived processes)")
        assert got["codes"] == []


class _RefusingSocket:
    """A NETLINK_CONNECTOR socket on a kernel that lets only CAP_NET_ADMIN join, seen by a process without it."""

    def __init__(self, *args) -> None:
        pass

    def bind(self, address) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    def close(self) -> None:
        pass


def test_unprivileged_user_on_a_refusing_kernel_is_told_what_to_do_in_command_line_terms(monkeypatch):
    from etwmon.sources import netlink
    monkeypatch.setattr(netlink.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netlink, "has_capability", lambda cap: False)
    monkeypatch.setattr(netlink.socket, "socket", _RefusingSocket)
    reason = NetlinkSource.unavailable_reason()
    assert "only root" in reason and "--source procfs" in reason
    assert "6.6" not in reason and "source='" not in reason  # what this kernel does, not what a version promises
    with pytest.raises(etwmon.SourceUnavailable, match="--source procfs"):
        etwmon.Monitor(source="netlink").start()


def test_cap_net_admin_alone_is_enough(monkeypatch):
    from etwmon.sources import netlink
    monkeypatch.setattr(netlink.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netlink, "has_capability", lambda cap: cap == 12)
    monkeypatch.setattr(netlink.socket, "socket", _RefusingSocket)  # never probed
    assert NetlinkSource.unavailable_reason() is None


# --- storms ------------------------------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.slow
def test_stop_in_a_storm_counts_every_message_it_did_not_decode(storm_tools, monkeypatch, caplog):
    """A thread storm that goes on while the source stops: the final drain may not keep up, and stops anyway;
    every message in each CPU's sequence window is then decoded or counted as lost, none unaccounted."""
    monkeypatch.setattr(NetlinkSource, "STOP_DRAIN_SECONDS", 0.0)  # nothing is decoded after stop(): all skimmed
    storm = subprocess.Popen([str(storm_tools["threads"]), "100000000", "64"], stdout=subprocess.DEVNULL)
    try:
        with etwmon.Monitor(source="netlink", max_items=1000) as mon:
            read_until(mon, lambda evs: sum(e.type == ItemType.ThreadCreate for e in evs) >= 2000, keep=lambda e:
                       e.type == ItemType.ThreadCreate)  # the storm is on
            source = mon.source
            with caplog.at_level(logging.ERROR, logger="etwmon"):
                mon.stop()
            assert storm.poll() is None, "the storm ended before the source stopped: nothing was tested"
    finally:
        storm.kill()
        storm.wait()
    assert not mon.running and "did not stop" not in caplog.text
    stats = source.stats()
    windows = source.sequence_windows()
    assert stats["seq_resets"] == 0
    assert stats["received"] + stats["lost"] == sum((last - first) % 2**32 + 1 for first, last in windows.values())
    assert mon.stats.lost == stats["lost"]



@pytest.mark.root
@pytest.mark.slow
def test_storm_of_2000_fork_exec_exit_children_loses_nothing(storm_tools):
    true = "/bin/true"
    with etwmon.Monitor(source="netlink", max_items=200_000) as mon:
        out = subprocess.run([str(storm_tools["forkexec"]), "2000", "8", true, "storm-%d"], check=True,
                             capture_output=True, text=True).stdout.split("\n")
        pids = collections.Counter(int(line.split()[1]) for line in out[1:] if line)
        events = read_until(mon, lambda evs: sum(1 for e in evs if e.type == ItemType.ProcessExit and e.pid in pids)
                       >= sum(pids.values()), timeout=60)
        stats = mon.stats
    assert sum(pids.values()) == 2000
    for item in (ItemType.ProcessCreate, ItemType.ProcessExec, ItemType.ProcessExit):
        seen = collections.Counter(e.pid for e in of_type(events, item) if e.pid in pids)
        assert seen == pids, item
    assert all(e.exit_code == 0 for e in of_type(events, ItemType.ProcessExit) if e.pid in pids)
    assert stats.lost == 0 and stats.dropped == 0 and stats.parse_errors == 0
    assert not of_type(events, ItemType.RecordsLost)


@pytest.mark.root
@pytest.mark.slow
def test_storm_of_20000_threads_loses_nothing(storm_tools):
    with etwmon.Monitor(source="netlink", max_items=200_000) as mon:
        out = subprocess.run([str(storm_tools["threads"]), "20000", "64"], check=True, capture_output=True,
                             text=True).stdout.split()
        pid, tids = int(out[0]), collections.Counter(map(int, out[1:]))
        events = read_until(mon, lambda evs: any(e.type == ItemType.ProcessExit and e.pid == pid for e in evs),
                       timeout=60)
        stats = mon.stats
    assert sum(tids.values()) == 20000
    assert collections.Counter(e.tid for e in of_type(events, ItemType.ThreadCreate) if e.pid == pid) == tids
    assert collections.Counter(e.tid for e in of_type(events, ItemType.ThreadExit) if e.pid == pid) == tids
    assert stats.lost == 0 and stats.dropped == 0


# --- forced loss -------------------------------------------------------------------------------------------------


class ReferenceListener:
    """A second proc connector socket with a huge buffer, read by its own thread: what the kernel sent."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE
        self.sock.bind((0, 1))
        self.sock.send(cb.nlmsghdr(40) + cb.cn_msg(0, struct.pack("=I", 1)))  # LISTEN
        self.events: list = []
        self.overruns = 0
        self._r, self._w = os.pipe()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        buf = bytearray(65536)
        while True:
            ready, _, _ = select.select([self.sock, self._r], [], [])
            if self.sock in ready:
                try:
                    n = self.sock.recv_into(buf)
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise
                    self.overruns += 1
                    continue
                self.events.extend(cb.read_events(buf, n))
            elif self._r in ready:
                return

    def close(self) -> None:
        time.sleep(0.2)  # let it read what is queued
        os.write(self._w, b"x")
        self._thread.join(5)
        self.sock.send(cb.nlmsghdr(40) + cb.cn_msg(0, struct.pack("=I", 2)))  # IGNORE
        self.sock.close()
        os.close(self._r)
        os.close(self._w)

    def lost(self) -> int:
        last, lost = {}, 0
        for cpu, seq, _, _ in self.events:
            if cpu in last:
                lost += (seq - last[cpu] - 1) & 0xFFFFFFFF
            last[cpu] = seq
        return lost


@pytest.mark.root
@pytest.mark.slow
def test_forced_loss_small_socket_buffer_counts_exactly_what_is_missing(storm_tools):
    reference = ReferenceListener()
    try:
        source = NetlinkSource(rcvbuf=4096)
        mon = etwmon.Monitor(source=source, max_items=200_000)
        children = fork_storm_while_stalled(mon, str(storm_tools["forks"]), 400)
        time.sleep(0.3)
        mon.stop()
        events = read_until(mon, None, timeout=10)
        stats, windows, received = mon.stats, source.sequence_windows(), source.stats()["received"]
        mon.close()
    finally:
        reference.close()
    assert source.overruns >= 1, "the stalled source's socket should have overflowed"
    assert reference.overruns == 0 and reference.lost() == 0, "the reference listener must see everything"
    # 1. The loss count is the number of messages the kernel sent that this socket did not get.
    in_window = [e for e in reference.events
                 if e[0] in windows and (e[1] - windows[e[0]][0]) & 0xFFFFFFFF
                 <= (windows[e[0]][1] - windows[e[0]][0]) & 0xFFFFFFFF]
    assert stats.lost == len(in_window) - received
    # 2. Every missing event of the storm (400 forks, 400 exits: ground truth from the generator) is among
    #    the counted losses; the rest of the count is other processes' events lost meanwhile.
    expected = collections.Counter({(ItemType.ProcessCreate, pid): n for pid, n in children.items()})
    expected.update({(ItemType.ProcessExit, pid): n for pid, n in children.items()})
    seen = collections.Counter((e.type, e.pid) for e in events
                               if e.type in (ItemType.ProcessCreate, ItemType.ProcessExit) and e.pid in children)
    missing = sum((expected - seen).values())
    storm_pids = set(children)
    others = sum(1 for _, _, what, u in in_window
                 if not ((what == cb.FORK and u[3] in storm_pids) or (what == cb.EXIT and u[1] in storm_pids)))
    assert missing > 0
    assert missing <= stats.lost <= missing + others
    # 3. Every loss reached the reader in-band, and the counters agree.
    assert sum(e.count for e in of_type(events, ItemType.RecordsLost)) == stats.lost + stats.dropped
    assert stats.dropped == 0 and stats.parse_errors == 0


@pytest.mark.root
@pytest.mark.slow
def test_forced_loss_tiny_ring_nobody_reads_reports_every_dropped_record(storm_tools):
    with etwmon.Monitor(source="netlink", max_items=50) as mon:
        out = subprocess.run([str(storm_tools["forks"]), "300"], check=True, capture_output=True,
                             text=True).stdout.split("\n")
        children = collections.Counter(int(line.split()[0]) for line in out[1:] if line)
        time.sleep(0.5)
        mon.stop()
        events = read_until(mon, None, timeout=10)
        stats = mon.stats
    records = [e for e in events if e.type != ItemType.RecordsLost]
    lost_reports = sum(e.count for e in of_type(events, ItemType.RecordsLost))
    assert stats.dropped > 0 and stats.lost == 0
    assert lost_reports == stats.dropped + stats.lost
    assert len(records) == stats.pushed - stats.dropped == stats.read
    expected = 2 * sum(children.values())  # a create and an exit each
    seen = sum(1 for e in records if e.type in (ItemType.ProcessCreate, ItemType.ProcessExit)
               and e.pid in children)
    assert 0 < expected - seen <= stats.dropped
