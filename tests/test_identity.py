"""The identity stage on synthetic records: ProcessGuid, the process table (seed, reuse, eviction), parent fields
and ancestry. The live tests per source are in tests/test_identity_live.py."""

from __future__ import annotations

import os
import re
from datetime import timedelta

import pytest

import etwmon
from etwmon import records as R
from etwmon.identity import IdentityStage, guid_prefix, make_guid
from etwmon.records import Details, EventFlags, with_packed

from .helpers import BatchSink, ListSink

HOST = b"machine-a\0boot-1"
T = 134_000_000_000_000_000
SYSMON_GUID = re.compile(r"^\{[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\}$")


def stage(max_processes: int = 1000) -> tuple[IdentityStage, ListSink]:
    sink = ListSink()
    return IdentityStage(sink, HOST, max_processes), sink


def fork(st, t, pid, ppid, line="", details=None):
    st.push(R.encode_process_create(t, pid, ppid, ppid, ppid, line, details))


def exec_(st, t, pid, ppid, line, image, **more):
    st.push(R.encode_process_exec(t, pid, ppid, pid, pid, line, Details(image=image, flags=int(EventFlags.PROCFS),
                                                                          **more)))


def test_guid_depends_on_host_boot_pid_and_start():
    prefix = guid_prefix(HOST)
    base = make_guid(prefix, 100, T)
    assert len(base) == 16 and R.guid_bytes(R.guid_text(base)) == base
    assert SYSMON_GUID.match(R.guid_text(base))
    others = {make_guid(prefix, 101, T), make_guid(prefix, 100, T + 1), make_guid(guid_prefix(b"machine-b\0boot-1"), 100, T),
              make_guid(guid_prefix(b"machine-a\0boot-2"), 100, T)}
    assert base not in others and len(others) == 4
    assert make_guid(prefix, 100, T) == base  # deterministic
    # The host tag is the same on both boots, the boot tag differs.
    assert guid_prefix(b"machine-a\0boot-2")[:4] == prefix[:4] != guid_prefix(b"machine-b\0boot-1")[:4]


def test_one_guid_on_create_exec_threads_and_exit_with_the_image_and_lifetime():
    st, sink = stage()
    fork(st, T, 10, 1, "init")
    exec_(st, T + 1, 10, 1, "bash -c x", "/usr/bin/bash", uid=0, user="root", current_directory="/root")
    st.push(R.encode_thread_create(T + 2, 11, 10))
    st.push(R.encode_thread_exit(T + 3, 11, 10, 0))
    st.push(R.encode_process_exit(T + 15_000_000, 10, 0))
    create, exec_ev, tc, te, exit_ = sink.events()
    assert create.process_guid and SYSMON_GUID.match(create.process_guid)
    assert create.process_guid == exec_ev.process_guid == tc.process_guid == te.process_guid == exit_.process_guid
    assert exec_ev.image == exit_.image == "/usr/bin/bash" and exec_ev.user == "root" and exec_ev.uid == 0
    assert exec_ev.current_directory == "/root" and exec_ev.flags & EventFlags.PROCFS
    assert exit_.lifetime == timedelta(seconds=1.5) and exit_.start_filetime == T == create.start_filetime
    assert create.flags & EventFlags.UNKNOWN_PARENT  # pid 1 was never seen: nothing is made up for it
    assert create.parent_process_guid is None and create.parent_image is None
    assert st.stats()["unknown_parent"] == 2


def test_a_reused_pid_gets_a_new_guid_and_each_exit_its_own():
    st, sink = stage()
    fork(st, T, 50, 1)
    st.push(R.encode_process_exit(T + 10, 50, 0))
    fork(st, T + 5_000_000, 50, 1)
    st.push(R.encode_process_exit(T + 6_000_000, 50, 0))
    c1, e1, c2, e2 = sink.events()
    assert c1.process_guid != c2.process_guid
    assert (e1.process_guid, e2.process_guid) == (c1.process_guid, c2.process_guid)


def test_a_lost_exit_does_not_give_the_new_process_the_old_guid():
    st, sink = stage()
    fork(st, T, 50, 1)
    fork(st, T + 5_000_000, 50, 1)  # the exit in between was lost
    exec_(st, T + 6_000_000, 50, 1, "ls", "/bin/ls", start_filetime=T + 5_000_000)
    c1, c2, x = sink.events()
    assert c1.process_guid != c2.process_guid == x.process_guid
    # An exec whose start the source knows to be another process's is a new process, not the old guid.
    exec_(st, T + 9_000_000, 50, 1, "ls", "/bin/ls", start_filetime=T + 8_000_000)
    assert sink.events()[-1].process_guid not in (c1.process_guid, c2.process_guid)


def test_a_grandchild_carries_its_parents_image_and_command_line():
    st, sink = stage()
    fork(st, T, 20, 1)
    exec_(st, T + 1, 20, 1, "bash -c 'sleep 1'", "/usr/bin/bash", user="alice")
    fork(st, T + 2, 21, 20, "bash -c 'sleep 1'")
    exec_(st, T + 3, 21, 20, "sleep 1", "/usr/bin/sleep")
    _, bash, child_fork, sleep = sink.events()
    assert child_fork.image == "/usr/bin/bash"  # a fork runs its parent's program until it execs
    assert child_fork.flags & EventFlags.PROCFS  # ... as known from /proc
    for ev in (child_fork, sleep):
        assert ev.parent_process_guid == bash.process_guid
        assert (ev.parent_image, ev.parent_command_line, ev.parent_user) == ("/usr/bin/bash", bash.command_line, "alice")
        assert not ev.flags & EventFlags.UNKNOWN_PARENT
    assert sleep.image == "/usr/bin/sleep" and sleep.process_guid == child_fork.process_guid


def test_a_process_whose_parent_ran_before_the_monitor_gets_it_from_the_seed():
    st, sink = stage()
    seeded = st.seed([
        (1, 0, "/sbin/init", Details(start_filetime=T - 100, image="/sbin/init", uid=0, user="root")),
        (300, 1, "sshd: alice", Details(start_filetime=T - 50, image="/usr/sbin/sshd", user="alice")),
        (301, 300, "gone", Details()),  # no start time: cannot be given a guid
    ])
    assert seeded == 2
    fork(st, T, 400, 300, "sshd: alice")
    st.push(R.encode_process_exit(T + 10, 300, 0))
    create, parent_exit = sink.events()
    assert (create.parent_image, create.parent_command_line, create.parent_user) == (
        "/usr/sbin/sshd", "sshd: alice", "alice")
    assert create.parent_process_guid == parent_exit.process_guid and parent_exit.flags & EventFlags.SEEDED
    assert parent_exit.image == "/usr/sbin/sshd" and parent_exit.lifetime == timedelta(microseconds=6)
    chain = st.ancestors(create.process_guid)
    assert [(p.pid, p.image, p.seeded) for p in chain] == [(300, "/usr/sbin/sshd", True), (1, "/sbin/init", True)]
    assert chain[0].exited and not chain[1].exited  # an exited parent stays in the chain while there is room
    assert chain[0].process_guid == create.parent_process_guid and chain[1].command_line == "/sbin/init"


def test_a_fork_the_seed_already_saw_keeps_the_seeds_guid():
    st, sink = stage()
    st.seed([(500, 1, "x", Details(start_filetime=T - 2))])  # /proc's start, cut to a clock tick
    fork(st, T, 500, 1, "x")
    (create,) = sink.events()
    assert create.process_guid == R.guid_text(make_guid(guid_prefix(HOST), 500, T - 2))


def test_what_the_source_knows_is_kept_and_stage_fields_are_the_tables():
    st, sink = stage()
    fork(st, T, 20, 1)
    st.push(R.encode_process_exec(T + 1, 20, 1, 20, 20, "x", Details(
        image="/x", uid=7, cgroup="/a", parent_image="/not/the/parent", process_guid="{" + "0" * 8 + "-0000-0000-0000-" + "0" * 12 + "}")))
    _, ev = sink.events()
    assert (ev.image, ev.uid, ev.cgroup) == ("/x", 7, "/a")
    assert ev.parent_image is None and ev.process_guid == sink.events()[0].process_guid
    assert ev.encode() == sink.records[-1]  # written in block order: parse and encode agree byte for byte


def test_an_exit_the_source_dates_is_named_though_the_table_never_saw_the_process():
    st, sink = stage()
    st.push(R.encode_process_exit(T + 20_000_000, 88, 0, Details(start_filetime=T)))  # as bpf writes it
    (exit_,) = sink.events()
    assert exit_.process_guid == R.guid_text(make_guid(guid_prefix(HOST), 88, T))
    assert exit_.lifetime == timedelta(seconds=2)


def test_an_exec_of_a_process_never_seen_and_without_a_start_has_no_guid():
    st, sink = stage()
    st.push(R.encode_process_exec(T, 77, 1, 77, 77, "x"))
    st.push(R.encode_thread_create(T, 78, 77))
    st.push(R.encode_process_exit(T, 77, 0))
    assert all(e.process_guid is None for e in sink.events())
    assert st.stats()["no_guid"] == 3


def test_other_records_pass_unchanged_and_losses_go_through():
    st, sink = stage()
    lost, image = R.encode_records_lost(T, 5), R.encode_image_load(T, 1, 2, 3, "x")
    st.push(lost)
    st.push(image)
    st.push_lost(3)
    assert sink.records == [lost, image] and sink.lost == [3]


def test_the_table_is_bounded_and_counts_what_it_forgets():
    st, sink = stage(max_processes=4)
    for pid in range(100, 103):
        fork(st, T + pid, pid, 1)
    st.push(R.encode_process_exit(T + 200, 101, 0))
    for pid in range(103, 106):
        fork(st, T + pid, pid, 1)
    stats = st.stats()
    # 6 processes into 4 places: the exited one goes first, then the oldest live one.
    assert stats["known"] == 4 and stats["evicted"] == 2 and stats["evicted_live"] == 1
    st.push(R.encode_process_exit(T + 300, 100, 0))  # evicted while alive: its exit cannot be named any more
    assert sink.events()[-1].process_guid is None
    with pytest.raises(ValueError):
        IdentityStage(ListSink(), HOST, 1)


def test_etw_sequence_numbers_make_the_guids_even_for_a_parent_started_before_the_monitor():
    from etwmon.identity import guid_from_sequence
    from etwmon.sources.etw import to_records

    from .etw_builders import kp_process_start, kp_process_stop, kp_thread_start

    st, sink = stage()
    for event in (kp_process_start(version=3, pid=6312, ppid=4420, session=2), kp_thread_start(pid=6312, tid=7720),
                  kp_process_stop(pid=6312, exit_code=0)):
        for record in to_records(event, details=True):
            st.push(record)
    create, thread, exit_ = sink.events()
    own, parent = (R.guid_text(guid_from_sequence(guid_prefix(HOST), n)) for n in (1234, 1200))
    assert create.process_guid == thread.process_guid == exit_.process_guid == own
    assert create.parent_process_guid == parent  # the kernel's number, though the table never saw 4420
    assert create.flags & EventFlags.UNKNOWN_PARENT and create.parent_image is None  # its fields are unknown
    assert create.session == 2 and create.image.endswith("notepad.exe") and exit_.image == create.image
    # Without the identity stage's request, the source's records stay the book's.
    (plain,) = to_records(kp_process_start(version=3))
    assert len(plain) == 40 + 2 * int.from_bytes(plain[32:34], "little")


def test_the_bpf_sources_kernel_facts_become_the_block():
    from etwmon.clock import CLOCK_BOOTTIME, KernelClock
    from etwmon.sources.bpf import _event as bpf_event
    from etwmon.sources.bpf._details import task_enricher, tty_name

    clock = KernelClock(CLOCK_BOOTTIME, offset_ns=0)
    enrich = task_enricher(clock)

    def task(kind, flags=0, exe=b"/usr/bin/sleep", cwd=b"/srv/\xff", tty=b"pts3"):
        return bpf_event.TaskDetails(kind, flags, 5_000, 42, 42, 1, 3_000, 1_000, 0, 65534, 0, 0, None, None, 7,
                                     b"sleep", tty, b"/bin/sleep", exe, cwd)

    (ev,) = etwmon.parse(enrich(R.encode_process_exec(T, 42, 1, 42, 42, "sleep 1"), task(bpf_event.EXEC)))
    assert (ev.image, ev.current_directory, ev.uid, ev.user, ev.tty) == (
        "/usr/bin/sleep", os.fsdecode(b"/srv/\xff"), 65534, "nobody", "pts/3")
    assert ev.start_filetime == clock.filetime(3_000) and ev.flags == 0  # the kernel's, not /proc's: no PROCFS
    (cut,) = etwmon.parse(enrich(R.encode_process_exec(T, 42, 1, 42, 42, "x"),
                                 task(bpf_event.EXEC, flags=bpf_event.EXE_TRUNCATED, tty=b"")))
    assert cut.image is None and cut.flags & EventFlags.TRUNCATED and cut.tty is None  # unknown, not shown cut
    (end,) = etwmon.parse(enrich(R.encode_process_exit(T, 42, 0), task(bpf_event.EXIT_PROCESS)))
    assert end.start_filetime == clock.filetime(3_000)
    thread = R.encode_thread_create(T, 43, 42)
    assert enrich(thread, task(bpf_event.FORK_THREAD)) == thread and enrich.threads is False  # not even called
    assert tty_name(b"tty1") == "tty1" and tty_name(None) is None


def test_ancestors_never_return_a_command_line_the_rules_redacted():
    from etwmon.rules import RuleSet

    from .helpers import ScriptedSource, read_until

    rules = RuleSet.from_xml('<Sysmon schemaversion="4.90"><EventFiltering/><Redaction>'
                             '<Redact>(--password[= ])(\\S+)</Redact></Redaction></Sysmon>')
    secret = "hunter2-" + "k" * 40
    parent_line = f"deploy --password={secret} --host db"
    t = R.filetime_now()
    source = ScriptedSource()
    with etwmon.Monitor(source=source, rules=rules) as mon:
        source.commands.put(("records", [R.encode_process_create(t, 500, 1, 1, 1, parent_line),
                                         R.encode_process_create(t + 10, 501, 500, 500, 500, "child")]))
        events = read_until(mon, lambda evs: len(evs) >= 2)
        child = [e for e in events if e.pid == 501][0]
        chain = mon.ancestors(child.process_guid)
        assert chain[0].pid == 500 and chain[0].command_line.startswith("deploy ")
        assert chain[0].command_line.endswith(" --host db")
        assert secret not in chain[0].command_line and secret[:8] not in chain[0].command_line
        assert secret not in repr(chain) and secret not in (child.parent_command_line or "")
    with etwmon.Monitor(source=ScriptedSource()) as plain:  # without rules nothing is hidden
        plain.source.commands.put(("records", [R.encode_process_create(t, 500, 1, 1, 1, parent_line),
                                               R.encode_process_create(t + 10, 501, 500, 500, 500, "child")]))
        events = read_until(plain, lambda evs: len(evs) >= 2)
        child = [e for e in events if e.pid == 501][0]
        assert plain.ancestors(child.process_guid)[0].command_line == parent_line


def test_the_table_is_bounded_in_bytes_whatever_the_command_lines():
    """A local user who execs processes with 32 K-character command lines cannot grow the table (and so the root
    daemon's memory) past its byte cap: what tracemalloc sees it hold stays under the cap, evictions counted."""
    import tracemalloc

    cap = 4 << 20
    st, big_sink = stage(max_processes=16384)
    st.table = type(st.table)(16384, cap)
    line = "A" * 32000
    records = []
    for i in range(300):  # each the child of the one before, half of them exited
        records.append(R.encode_process_create(T + 100 * i, 2000 + i, 1999 + i, 1999 + i, 1999 + i, line,
                                               Details(image="/usr/bin/x", start_filetime=T + 100 * i)))
        if i % 2:
            records.append(R.encode_process_exit(T + 100 * i + 50, 2000 + i - 1, 0))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for record in records:
        st.push(record)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    stats = st.stats()
    assert stats["bytes"] <= cap and stats["max_bytes"] == cap
    assert stats["evicted"] > 200 and stats["evicted_live"] > 0  # exited ones first, then live ones
    # what the table holds is what it counts, at most: the sink's copies of the records are not the table's
    sink_bytes = sum(len(r) + 33 for r in big_sink.records)
    assert held - sink_bytes <= stats["bytes"] * 1.1 + 64 * 1024
    # a small table of ordinary processes counts within 10 % of what it holds
    small, sink = stage(max_processes=16384)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(1000):
        small.push(R.encode_process_create(T + i, 5000 + i, 1, 1, 1, f"/usr/bin/prog --flag {i}",
                                           Details(image="/usr/bin/prog", current_directory="/home/u", uid=1000,
                                                   user="u", start_filetime=T + i)))
    held = tracemalloc.get_traced_memory()[0] - before - sum(len(r) + 33 for r in sink.records)
    tracemalloc.stop()
    assert 0.9 * held <= small.table.bytes <= 1.5 * held


def test_records_the_kernel_wrote_pass_whole_but_a_seeded_processs_get_the_tables_guid():
    import numpy as np

    from etwmon.records import pack_field, with_packed

    sink = BatchSink()
    st = IdentityStage(sink, HOST)

    def take() -> list:
        out = sink.events()
        sink.records.clear()
        return out

    seeded_start = T - 10**9
    st.seed([(300, 1, "seeded --daemon", Details(start_filetime=seeded_start))])
    prefix = guid_prefix(HOST)
    st.push(R.encode_process_create(T, 400, 300, 300, 300, "child"))  # the table gives it its guid
    (child,) = take()
    kernel_guid = R.guid_bytes(child.process_guid)  # the programs compute the same bytes
    other_guid = make_guid(prefix, 300, seeded_start + 12345)  # what the kernel's exact start makes of pid 300
    records = [with_packed(R.encode_thread_create(T + 1, 401, 400), 0, [pack_field(1, kernel_guid)]),
               with_packed(R.encode_thread_create(T + 2, 301, 300), 0, [pack_field(1, other_guid)]),
               with_packed(R.encode_process_exit(T + 3, 400, 0), 0, [pack_field(1, kernel_guid)])]
    data = b"".join(records)
    st.push_batch(np.frombuffer(data, dtype=np.uint8), np.cumsum([len(r) for r in records]))
    thread, seeded_thread, exit_ = take()
    assert thread.process_guid == exit_.process_guid == child.process_guid
    assert seeded_thread.process_guid == R.guid_text(make_guid(prefix, 300, seeded_start))  # the table's
    assert len(sink.batches) == 2  # the two runs around the seeded process's record
    assert not st.table.live[400].exited  # not applied yet: nobody looked
    assert st.process(child.process_guid).exited  # applied when the table is read
    assert st.stats()["processes"] == 1  # only the seeded process lives on


def test_a_seeded_parent_with_a_command_line_longer_than_a_record_gives_its_child_a_cut_one():
    """/proc's command line of a process that ran before the monitor can exceed what a record holds; its child's
    ParentCommandLine is cut (visibly), and the stage keeps going."""
    st, sink = stage()
    st.seed([(300, 1, "sh -c x " + "A" * 70_000, Details(start_filetime=T - 50, image="/bin/sh"))])
    fork(st, T, 400, 300, "sh -c x")
    (create,) = sink.events()
    assert create.parent_command_line.startswith("sh -c x AAAA")
    assert create.parent_command_line.endswith(R.TRUNCATION_MARKER) and create.truncated
    assert len(create.encode()) <= R.MAX_RECORD_SIZE


def _kernel_create(item: int, t: int, pid: int, ppid: int, start: int, pstart: int, line: str) -> bytes:
    """A ProcessCreate/ProcessExec as the bpf programs write it: the guids, uid, start and image, no User or
    parent fields."""
    prefix = guid_prefix(HOST)
    encode = R.encode_process_create if item == 1 else R.encode_process_exec
    return encode(t, pid, ppid, ppid, ppid, line, Details(
        process_guid=R.guid_text(make_guid(prefix, pid, start)),
        parent_process_guid=R.guid_text(make_guid(prefix, ppid, pstart)), uid=0, start_filetime=start,
        image=f"/usr/bin/p{pid}"))


def _kernel_exit(t: int, pid: int, start: int) -> bytes:
    from etwmon.records import pack_field, with_packed

    return with_packed(R.encode_process_exit(t, pid, 0), 0, [pack_field(1, make_guid(guid_prefix(HOST), pid, start))])


def _batch(st, records) -> None:
    import numpy as np

    data = b"".join(records)
    st.push_batch(np.frombuffer(data, dtype=np.uint8).copy(), np.cumsum([len(r) for r in records]))


def test_lean_creates_the_kernel_wrote_pass_whole_and_feed_the_table_when_it_is_read():
    sink = BatchSink()
    st = IdentityStage(sink, HOST, lean=True)
    records = [_kernel_create(1, T, 500, 400, T, T - 9, "sh -c x"), _kernel_create(101, T + 1, 500, 400, T, T - 9, "sh -c x"),
               _kernel_create(1, T + 2, 501, 500, T + 2, T, "sh -c x"),
               _kernel_create(101, T + 3, 501, 500, T + 2, T, "/usr/bin/p501 'a b'"), _kernel_exit(T + 4, 501, T + 2)]
    _batch(st, records)
    assert sink.records == records and len(sink.batches) == 1  # byte for byte, in one batch
    assert len(st.table) == 0 and st._pending_count == 5  # noted, not applied: nobody asked
    guid = R.guid_text(make_guid(guid_prefix(HOST), 501, T + 2))
    chain = st.ancestors(guid)
    assert [(p.pid, p.command_line, p.image) for p in chain] == [(500, "sh -c x", "/usr/bin/p500")]
    assert st.process(guid).exited and st.process(guid).command_line == "/usr/bin/p501 'a b'"
    assert st.process(guid).user == "root"  # the uid's name, looked up when the table is fed
    # the default stage writes User and the parent's fields into the same records, one by one
    full_sink = BatchSink()
    full = IdentityStage(full_sink, HOST)
    _batch(full, records)
    event = list(R.parse(full_sink.records[3]))[0]
    assert (event.user, event.parent_image, event.parent_command_line) == ("root", "/usr/bin/p500", "sh -c x")
    assert full_sink.records[4] == records[4]  # the exit passes whole
    lean = list(R.parse(records[3]))[0]
    for name in ("process_guid", "parent_process_guid", "uid", "start_filetime", "image", "command_line"):
        assert getattr(lean, name) == getattr(event, name), name


def test_lean_the_table_keeps_the_kernels_record_and_reads_its_details_only_when_asked():
    sink = BatchSink()
    st = IdentityStage(sink, HOST, lean=True)
    records = [_kernel_create(1, T, 500, 400, T, T - 9, "sh -c x"),
               _kernel_create(1, T + 2, 501, 500, T + 2, T, "sh -c x"),
               _kernel_create(101, T + 3, 501, 500, T + 2, T, "/usr/bin/p501 'a b'")]
    _batch(st, records)
    st.apply_exits()  # the table is fed (as when 64 wait): entries, no parsing
    child = st.table.live[501]
    assert child._fields is None and child._raw == records[2]  # the exec's record, kept whole
    assert child.command_line.decode("utf-16-le") == "/usr/bin/p501 'a b'"
    assert st.table.bytes >= sum(e.nbytes() for e in st.table.live.values()) > 0  # counted in bytes meanwhile
    info = st.process(R.guid_text(make_guid(guid_prefix(HOST), 501, T + 2)))
    assert (info.image, info.uid, info.command_line) == ("/usr/bin/p501", 0, "/usr/bin/p501 'a b'")
    assert child._fields is not None and child._raw is None  # read once, when asked
    assert [p.pid for p in st.ancestors(info.process_guid)] == [500]


def test_lean_a_create_whose_parent_was_seeded_takes_the_tables_guid_for_the_parent():
    sink = BatchSink()
    st = IdentityStage(sink, HOST, lean=True)
    st.seed([(400, 1, "daemon", Details(start_filetime=T - 10**9, image="/usr/sbin/d"))])
    record = _kernel_create(1, T, 500, 400, T, T - 10**9 + 12345, "daemon")  # the kernel's exact parent start
    _batch(st, [record])
    (out,) = list(R.parse(sink.records[0]))
    assert out.parent_process_guid == R.guid_text(make_guid(guid_prefix(HOST), 400, T - 10**9))
    assert out.parent_image == "/usr/sbin/d" and out.parent_command_line == "daemon"


def test_lean_a_storm_nobody_reads_drops_processes_that_came_and_went_as_the_table_would_evict_them():
    import etwmon.identity as identity

    sink = BatchSink()
    st = IdentityStage(sink, HOST, max_processes=100, lean=True)
    records = [_kernel_create(1, T, 10, 1, T, T - 5, "init-child")]  # lives on
    for i in range(identity._MAX_PENDING_RECORDS // 2 + 10):
        pid = 1000 + i
        records += [_kernel_create(1, T + i, pid, 10, T + i, T, "x"), _kernel_exit(T + i + 1, pid, T + i)]
    for k in range(0, len(records), 500):
        _batch(st, records[k:k + 500])
    assert len(sink.records) == len(records)
    stats = st.stats()
    assert stats["known"] <= 100 and stats["evicted"] >= len(records) // 2 - 100
    assert st.process(R.guid_text(make_guid(guid_prefix(HOST), 10, T))) is not None  # the live one is kept


@pytest.mark.parametrize("lean", [True, False])
def test_kernel_written_records_one_by_one_feed_the_table_in_order(lean):
    sink = BatchSink()
    st = IdentityStage(sink, HOST, lean=lean)
    st.seed([(300, 1, "seeded", Details(start_filetime=T - 10**9, image="/usr/sbin/s"))])
    records = [_kernel_create(1, T, 500, 400, T, T - 9, "a"), _kernel_create(1, T + 1, 501, 500, T + 1, T, "b"),
               _kernel_exit(T + 2, 500, T), _kernel_create(1, T + 3, 500, 1, T + 3, T - 99, "reused"),
               with_packed(R.encode_thread_create(T + 4, 302, 300), 0, [R.pack_field(1, b"\1" * 16)])]
    for record in records:
        st.push_written(record)
    events = [next(iter(R.parse(r))) for r in sink.records]
    if lean:
        assert sink.records[:4] == records[:4]  # as the kernel wrote them
    else:
        assert events[1].parent_command_line == "a" and events[1].user == "root"
    assert events[4].process_guid == R.guid_text(make_guid(guid_prefix(HOST), 300, T - 10**9))  # the table's
    first = R.guid_text(make_guid(guid_prefix(HOST), 500, T))
    assert st.process(first).exited and not st.process(events[3].process_guid).exited
    assert [p.command_line for p in st.ancestors(events[1].process_guid)] == ["a"]


@pytest.mark.parametrize("takes_batches", [True, False])
def test_lean_creates_go_through_the_stage_when_the_next_stage_needs_the_parent_fields(takes_batches):
    # The rules stage (no push_batch) with rules on ParentCommandLine says batch_creates = False: the creates then
    # carry the parent's fields; with rules that need none of them they pass as the kernel wrote them.
    sink = BatchSink() if takes_batches else ListSink()
    sink.batch_creates = False
    st = IdentityStage(sink, HOST, lean=True)
    records = [_kernel_create(1, T, 500, 400, T, T - 9, "sh -c x"), _kernel_create(1, T + 2, 501, 500, T + 2, T, "b")]
    _batch(st, records)
    st.push_written(_kernel_create(101, T + 3, 501, 500, T + 2, T, "c"))
    events = [next(iter(R.parse(r))) for r in sink.records]
    assert [e.parent_command_line for e in events] == [None, "sh -c x", "sh -c x"]  # (500's parent: unknown)
    assert R.block_fields(sink.records[1])[1][-1][0] == int(R.ExtensionTag.ParentCommandLine)
    sink.batch_creates = True  # the rules were replaced: asked again at the next batch
    _batch(st, [_kernel_create(1, T + 4, 502, 500, T + 4, T, "d")])
    st.push_written(_kernel_create(101, T + 5, 502, 500, T + 4, T, "e"))
    assert sink.records[3:] == [_kernel_create(1, T + 4, 502, 500, T + 4, T, "d"),
                                _kernel_create(101, T + 5, 502, 500, T + 4, T, "e")]


def test_monitor_identity_modes():
    from .helpers import ScriptedSource

    with pytest.raises(ValueError, match="'full' or 'lean'"):
        etwmon.Monitor(source=ScriptedSource(), identity="fast")
    for mode, lean in ((True, True), ("lean", True), ("full", False)):
        with etwmon.Monitor(source=ScriptedSource(), identity=mode) as mon:
            assert mon._stage is not None and mon._stage.lean is lean
    with etwmon.Monitor(source=ScriptedSource(), identity=False) as mon:
        assert mon._stage is None
