"""etwmon._speedups, the bpf source's ring walk in C: the same records, in the same order, with the same counts as
the walk in Python, and the ring's and the identity stage's ways of taking its batches whole."""

from __future__ import annotations

import os
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from etwmon import ItemType, _native, parse
from etwmon import records as R
from etwmon.identity import IdentityStage, guid_prefix, make_guid
from etwmon.records import Details
from etwmon.ring import EventRing
from etwmon.sources.bpf import _event as ev
from etwmon.sources.bpf import _wire

from .conftest import REQUIRE_ROOT
from .helpers import BatchSink
from .test_bpf import Counter, MemoryRing, event, filetime, kernel_thread_record, reading_source
from .test_identity import HOST, T, _kernel_create, _kernel_exit

fast_walk = _wire.fast_walk


def _require_speedups() -> None:
    if fast_walk is not None:
        return
    reason = "etwmon._speedups was not built (no C compiler when the package was installed)"
    if REQUIRE_ROOT or os.environ.get("ETWMON_REQUIRE_SPEEDUPS") == "1":
        pytest.fail(f"the CI switch is on but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def speedups():
    _require_speedups()


class CheckedSink(BatchSink):
    """A sink that takes the C walk's batches (``push_checked``), and the seeded processes' records one by one."""

    def __init__(self, seeded: set[int] = frozenset()) -> None:
        super().__init__()
        self.checked: list[int] = []
        self.kinds: list[int] = []
        self.written: list[bytes] = []
        self._lookup = None
        if seeded:
            self._lookup = np.zeros(max(seeded) + 1, dtype=np.bool_)
            self._lookup[list(seeded)] = True

    def push_checked(self, data, ends, kinds) -> None:
        cuts = np.frombuffer(ends, dtype=np.int64)
        assert int(cuts[-1]) == len(data) and np.all(np.diff(cuts) > 0)
        self.checked.append(len(cuts))
        self.kinds.append(kinds)
        start = 0
        for end in cuts.tolist():
            self.push(data[start:end])
            start = end

    def push_written(self, record: bytes) -> None:
        self.written.append(bytes(record))
        self.push(record)

    def seeded_lookup(self):
        return self._lookup


def _fill_both(rings, chunk, i: int) -> int:
    """The same records (``_item`` of each (kind, jitter) in ``chunk``, numbered from ``i``) into each ring; the
    next number."""
    items = [_item(kind, i + k, jitter) for k, (kind, jitter) in enumerate(chunk)]
    for ring in rings:
        for sample, flag in items:
            at = ring.add(sample)
            if flag == "discard":
                for where in (at + 3, at + 3 + ring.mask + 1):
                    ring.data[where] |= 0x40
    return i + len(chunk)


def _item(kind: int, i: int, jitter: int):
    t = filetime(1_000) + 10 * i + jitter
    if kind == 0:
        return kernel_thread_record(1000 + i, 7, t, exit_code=None), None
    if kind == 1:
        return kernel_thread_record(1000 + i, 7, t, exit_code=i), None
    if kind == 2:
        return event(ev.EXEC, ns=1_000 + i, pid=7, argv=b"prog\0arg %d\0" % i), None
    if kind == 3:
        return b"\0" * 16, None  # shorter than any record: skipped, counted
    if kind == 4:
        return kernel_thread_record(2000 + i, 7, t), "discard"
    return event(ev.FORK_THREAD, pid=7, tid=3000 + i), None


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.lists(st.tuples(st.integers(0, 5), st.integers(-40, 5)), max_size=40), min_size=1,
                       max_size=6))
def test_the_c_walk_passes_what_the_python_walk_passes(chunks):
    """Runs of wire records, events between them, records too short, discarded ones and times stamped a little
    out of order, over a small ring that the passes wrap: the same records in the same order, the same times
    raised, the same skips and the same place in the ring."""
    rings = [MemoryRing(1 << 14), MemoryRing(1 << 14)]  # more than a chunk holds: the kernel never overfills
    sinks = [CheckedSink(), BatchSink()]
    sources = [reading_source(ring, Counter()) for ring in rings]
    for source, sink in zip(sources, sinks):
        source._decoder.push = sink.push
    i = 0
    for chunk in chunks:
        i = _fill_both(rings, chunk, i)
        for source, sink in zip(sources, sinks):
            source._drain(sink)
    c_sink, py_sink = sinks
    assert c_sink.records == py_sink.records
    assert [s.skipped for s in sources][0] == [s.skipped for s in sources][1]
    assert sources[0]._decoder.time_raised == sources[1]._decoder.time_raised
    assert sources[0].stats()["kernel_written"] == sources[1].stats()["kernel_written"]
    assert rings[0].cons == rings[1].cons == rings[0].prod
    times = [e.filetime for e in parse(b"".join(c_sink.records))]
    assert times == sorted(times)


@pytest.mark.skipif(_native.reader_wait_method is None, reason="etwmon._speedups was not built (no C compiler)")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.tuples(st.lists(st.tuples(st.integers(0, 5), st.integers(-40, 5)), max_size=30),
                                 st.booleans(), st.booleans()), min_size=1, max_size=8),
       seeded=st.booleans())
def test_a_waiting_readers_pass_in_c_is_the_python_pass(chunks, seeded):
    """A reader woken in Monitor.wait() takes the ring through the C wait's pass (etwmon/_reader.c) or the Python
    _reader_pass: the same records, times, skips, loss reports, counters, flag raises and place in the ring, in the
    common case and in the others (a loss count due, records for Python, a seeded process)."""
    from etwmon.sources.bpf import _wait

    rings = [MemoryRing(1 << 14), MemoryRing(1 << 14)]
    sinks = [CheckedSink({7} if seeded else frozenset()), CheckedSink({7} if seeded else frozenset())]
    lost = [Counter(after=3, bumps=2), Counter(after=3, bumps=2)]
    sources = [reading_source(ring, counter) for ring, counter in zip(rings, lost)]
    notes = [[], []]
    fds = []
    waits = []
    for source, sink, note in zip(sources, sinks, notes):
        source._decoder.push = sink.push
        sink.notify = lambda note=note: note.append(1)
        source._sink, source._running = sink, True
        source._quick = (sink.push_checked, sink.seeded_lookup)
        r, w = os.pipe()
        os.write(w, b"x")  # the monitor's flag, up: each wait ends at once and takes its pass
        fds += [r, w]
        wait = _wait.ReaderWait([], [], r, source._reader_pass, source._waiting, source._sleeping)
        wait._source = source
        waits.append(wait)
    try:
        i = 0
        for chunk, due, notify in chunks:
            i = _fill_both(rings, chunk, i)
            for source, wait in zip(sources, waits):
                source._lost_due = 0.0 if due else time.monotonic() + 3600
                wait.notify = notify
            assert _native.reader_wait_method(waits[0], 0) is False
            assert _wait.ReaderWait._wait(waits[1], 0) is False
        assert sinks[0].records == sinks[1].records and sinks[0].lost == sinks[1].lost
        assert sinks[0].checked == sinks[1].checked and sinks[0].written == sinks[1].written
        assert notes[0] == notes[1]
        assert sources[0].skipped == sources[1].skipped
        assert sources[0]._decoder.time_raised == sources[1]._decoder.time_raised
        assert sources[0]._decoder.events == sources[1]._decoder.events
        assert sources[0]._decoder.last_filetime == sources[1]._decoder.last_filetime
        assert sources[0].stats()["kernel_written"] == sources[1].stats()["kernel_written"]
        assert rings[0].cons == rings[1].cons == rings[0].prod
        assert waits[0].wakeups == waits[1].wakeups == len(chunks)
    finally:
        for wait in waits:
            wait.close()
        for fd in fds:
            os.close(fd)


@pytest.mark.skipif(_native.reader_wait_method is None, reason="etwmon._speedups was not built (no C compiler)")
def test_a_waiting_readers_c_pass_takes_nothing_from_a_source_that_is_not_running():
    from etwmon.sources.bpf import _wait

    ring, sink = MemoryRing(), CheckedSink()
    ring.add(kernel_thread_record(1, 7, filetime(1_000)))
    source = reading_source(ring, Counter())
    source._sink, source._quick, source._lost_due = sink, (sink.push_checked, None), time.monotonic() + 3600
    r, w = os.pipe()
    os.write(w, b"x")
    wait = _wait.ReaderWait([], [], r, source._reader_pass, source._waiting, source._sleeping)
    wait._source = source
    try:
        for running, stopping in ((False, False), (True, True)):
            source._running, source._stopping = running, stopping
            assert _native.reader_wait_method(wait, 0) is False
            assert sink.records == [] and ring.cons == 0
        source._stopping = False
        assert _native.reader_wait_method(wait, 0) is False
        assert len(sink.records) == 1 and ring.cons == ring.prod
    finally:
        wait.close()
        os.close(r)
        os.close(w)


def test_a_run_between_events_is_one_batch_and_says_what_it_holds():
    ring, sink = MemoryRing(1 << 16), CheckedSink()
    t = filetime(1_000)
    ring.add(kernel_thread_record(1, 7, t))
    ring.add(kernel_thread_record(2, 7, t + 1, exit_code=0))
    ring.add(event(ev.EXEC, ns=1_000, pid=7, argv=b"x\0"))
    ring.add(_kernel_create(1, t + 2, 500, 400, t, t - 9, "a"))
    ring.add(_kernel_exit(t + 3, 500, t))
    source = reading_source(ring, Counter())
    source._decoder.push = sink.push
    assert source._drain(sink) == 5
    assert sink.checked == [2, 2] and sink.kinds == [4, 1 | 2]
    assert [e.type for e in parse(b"".join(sink.records))] == [
        ItemType.ThreadCreate, ItemType.ThreadExit, ItemType.ProcessExec, ItemType.ProcessCreate,
        ItemType.ProcessExit]


def test_a_record_whose_size_disagrees_with_its_length_is_skipped_and_reported_lost():
    ring, sink = MemoryRing(), CheckedSink()
    t = filetime(1_000)
    good = kernel_thread_record(1, 7, t)
    bad = bytearray(kernel_thread_record(2, 7, t + 1))
    struct.pack_into("<H", bad, 2, len(bad) + 8)  # says it is longer than it is
    ring.add(good)
    ring.add(bytes(bad))
    ring.add(kernel_thread_record(3, 7, t + 2))
    source = reading_source(ring, Counter())
    source._drain(sink)
    assert [e.tid for e in parse(b"".join(sink.records))] == [1, 3]
    assert source.skipped == 1 and sum(sink.lost) == 1 and source.stats()["lost"] == 1


def test_a_record_still_being_written_ends_the_pass_and_the_last_pass_counts_it():
    ring, sink = MemoryRing(), CheckedSink()
    t = filetime(1_000)
    ring.add(kernel_thread_record(1, 7, t))
    ring.add(kernel_thread_record(2, 7, t + 1), busy=True)
    ring.add(kernel_thread_record(3, 7, t + 2))
    source = reading_source(ring, Counter())
    source._drain(sink)
    assert [e.tid for e in parse(b"".join(sink.records))] == [1] and ring.cons < ring.prod
    source._drain(sink, final=True)
    assert [e.tid for e in parse(b"".join(sink.records))] == [1, 3]
    assert source.skipped == 1 and ring.cons == ring.prod and sum(sink.lost) == 1


def test_records_of_seeded_processes_go_one_by_one_in_ring_order():
    ring, sink = MemoryRing(), CheckedSink(seeded={300})
    t = filetime(1_000)
    written = [kernel_thread_record(1, 7, t), kernel_thread_record(301, 300, t + 1),  # a seeded process's thread
               _kernel_create(1, t + 2, 500, 300, t + 2, t - 9, "child of a seeded one"),  # a seeded parent
               _kernel_create(1, t + 3, 501, 7, t + 3, t - 9, "other"), kernel_thread_record(2, 7, t + 4)]
    for record in written:
        ring.add(record)
    source = reading_source(ring, Counter())
    source._drain(sink)
    assert sink.records == written
    assert sink.written == written[1:3] and sink.checked == [1, 2]


def test_the_walk_refuses_positions_that_do_not_describe_one_ring():
    data = bytearray(2 * 4096)
    with pytest.raises(ValueError):
        fast_walk(bytes(data), 4095, 0, 8192, False, 0, None)  # more than a ring's length in one pass
    with pytest.raises(ValueError):
        fast_walk(bytes(4096), 4095, 0, 8, False, 0, None)  # the second mapping is missing


def test_a_ring_corrupted_with_a_length_past_the_ring_stops_with_an_error_not_a_read_past_it():
    data = bytearray(2 * 4096)
    struct.pack_into("<I", data, 0, 5000)
    with pytest.raises(ValueError, match="longer than the ring"):
        fast_walk(bytes(data), 4095, 0, 4096, False, 0, None)


# --- EventRing.push_checked ----------------------------------------------------------------------------------------


def _record(i: int, size: int) -> bytes:
    return R.encode_process_exec(filetime(i), i, 1, 1, 1, "x" * size)


@settings(max_examples=80, deadline=None)
@given(batches=st.lists(st.lists(st.integers(0, 300), min_size=1, max_size=40), min_size=1, max_size=12),
       max_items=st.integers(1, 60), max_bytes=st.integers(1200, 8000), reads=st.integers(0, 3))
def test_push_checked_leaves_the_ring_as_push_batch_does(batches, max_items, max_bytes, reads):
    """Batches of a few records (the short loop) and many (the array path), wrapping the arena and the slot table,
    with drops when a cap is reached: what readers read, and the counts, are the same."""
    rings = [EventRing(max_items, max_bytes), EventRing(max_items, max_bytes)]
    out = [[], []]
    i = 0
    for sizes in batches:
        recs = [_record(i + k, s) for k, s in enumerate(sizes)]
        i += len(recs)
        data = b"".join(recs)
        ends = np.cumsum([len(r) for r in recs]).astype(np.int64)
        rings[0].push_checked(data, ends.tobytes(), 4)
        rings[1].push_batch(data, ends)
        for ring, got in zip(rings, out):
            for _ in range(reads):
                buf = bytearray(2000)
                n = ring.readinto(buf)
                got.append(bytes(buf[:n]))
    for ring, got in zip(rings, out):
        buf = bytearray(1 << 16)
        while n := ring.readinto(buf):
            got.append(bytes(buf[:n]))
    assert b"".join(out[0]) == b"".join(out[1])
    assert rings[0].stats == rings[1].stats


# --- IdentityStage.push_checked ------------------------------------------------------------------------------------


def _checked(stage, records) -> None:
    data = b"".join(records)
    kinds = 0
    for r in records:
        kinds |= 1 if r[0] in (1, 101) else 2 if r[0] == 2 else 4
    stage.push_checked(data, np.cumsum([len(r) for r in records]).astype(np.int64).tobytes(), kinds)


def test_identity_takes_the_c_walks_batches_whole_and_the_table_learns_what_push_batch_teaches_it():
    prefix = guid_prefix(HOST)
    records = []
    for i in range(150):  # past the pending bound: applied along the way too
        pid = 1000 + i
        records += [_kernel_create(1, T + 3 * i, pid, 10, T + 3 * i, T - 5, "sh -c x"),
                    _kernel_create(101, T + 3 * i + 1, pid, 10, T + 3 * i, T - 5, f"/usr/bin/p{pid} {i}"),
                    R.encode_thread_create(T + 3 * i + 1, pid + 50_000, pid)]
        if i % 3:
            records.append(_kernel_exit(T + 3 * i + 2, pid, T + 3 * i))
    tables = []
    for way in ("checked", "batch"):
        sink = CheckedSink()
        stage = IdentityStage(sink, HOST, lean=True)
        for k in range(0, len(records), 7):
            if way == "checked":
                _checked(stage, records[k:k + 7])
            else:
                stage.push_batch(np.frombuffer(b"".join(records[k:k + 7]), dtype=np.uint8).copy(),
                                 np.cumsum([len(r) for r in records[k:k + 7]]))
        assert sink.records == records  # byte for byte, in order
        if way == "checked":
            assert sink.checked and sum(sink.checked) == len(records)
        stage.apply_exits()
        tables.append({guid: (e.pid, e.exited, e.command_line, e.parent_guid)
                       for guid, e in stage.table.by_guid.items()})
        live = R.guid_text(make_guid(prefix, 1147, T + 3 * 147))  # 147 % 3 == 0: no exit
        info = stage.process(live)
        assert info.command_line == "/usr/bin/p1147 147" and not info.exited and info.image == "/usr/bin/p1147"
        assert stage.process(R.guid_text(make_guid(prefix, 1149, T + 3 * 149))).exited
    assert tables[0] == tables[1] and len(tables[0]) == 150


def test_identity_a_record_pushed_alone_after_a_whole_batch_sees_the_table_with_that_batch_in_it():
    sink = CheckedSink()
    stage = IdentityStage(sink, HOST, lean=True)
    stage.seed([(300, 1, "daemon", Details(start_filetime=T - 10**9, image="/usr/sbin/d"))])
    _checked(stage, [_kernel_create(1, T, 500, 10, T, T - 5, "parent")])
    # a record of the seeded process, alone (as the walk hands it over): the batch before it is applied first
    stage.push_written(_kernel_create(1, T + 1, 501, 300, T + 1, T - 10**9 + 7, "child of the daemon"))
    assert 500 in stage.table.live and 501 in stage.table.live
    (out,) = list(parse(sink.records[1]))
    assert out.parent_image == "/usr/sbin/d" and out.parent_command_line == "daemon"


def test_identity_in_full_mode_takes_a_checked_batch_through_its_own_path():
    sink = CheckedSink()
    stage = IdentityStage(sink, HOST, lean=False)
    records = [_kernel_create(1, T, 500, 10, T, T - 5, "a"), _kernel_create(1, T + 1, 501, 500, T + 1, T, "b")]
    _checked(stage, records)
    events = list(parse(b"".join(sink.records)))
    assert events[1].parent_command_line == "a" and events[1].user == "root"
    assert not sink.checked  # the stage wrote fields into the records: not passed on whole


# --- the backlog: folded into the table when nobody reads it --------------------------------------------------------


def _stage_pushes():
    paths = [pytest.param(IdentityStage._push_checked_batch, id="python")]
    if _native.stage_push_checked_method is not None:
        paths.append(pytest.param(_native.stage_push_checked_method, id="c"))
    return paths


@pytest.fixture(params=_stage_pushes())
def stage_push(request, monkeypatch):
    """The identity stage's push_checked in C (etwmon/_backlog.c, where built) and in Python, each in turn."""
    monkeypatch.setattr(IdentityStage, "push_checked", request.param)
    return request.param


def _two_short_lived(t: int, pid: int) -> tuple[list[bytes], int, int]:
    """A batch of a storm: two processes started by pid 10 that exec and end; and the next time and pid."""
    batch = []
    for _ in range(2):
        pid += 1
        batch += [_kernel_create(1, t, pid, 10, t, T, "sh"), _kernel_create(101, t + 1, pid, 10, t, T, "/bin/true"),
                  _kernel_exit(t + 2, pid, t)]
        t += 3
    return batch, t, pid


def test_a_backlog_nobody_reads_is_folded_within_its_cap_keeping_living_processes_and_their_ancestors(stage_push):
    prefix = guid_prefix(HOST)
    sink = CheckedSink()
    stage = IdentityStage(sink, HOST, max_bytes=1 << 20, lean=True)  # a backlog of 128 KiB
    _checked(stage, [_kernel_create(1, T, 10, 1, T, T - 5, "before the storm")])
    stage.apply_exits()  # pid 10 is in the table
    t, pid, biggest = T + 10, 1000, 0
    daemon = shell = None
    for i in range(3000):
        batch, t, pid = _two_short_lived(t, pid)
        if i == 1000:  # a short-lived shell starts a daemon and ends: the daemon lives on, its chain is kept
            shell, daemon = (pid + 1, t), (pid + 2, t + 1)
            batch += [_kernel_create(1, t, pid + 1, 10, t, T, "sh -c 'backdoor &'"),
                      _kernel_create(1, t + 1, pid + 2, pid + 1, t + 1, t, "sh -c 'backdoor &'"),
                      _kernel_create(101, t + 2, pid + 2, pid + 1, t + 1, t, "/tmp/backdoor --listen"),
                      _kernel_exit(t + 3, pid + 1, t)]
            pid += 2
            t += 4
        _checked(stage, batch)
        biggest = max(biggest, stage._backlog_bytes)
    assert biggest <= stage.backlog_max_bytes  # folded whenever it outgrew its cap
    assert stage.folded > 2000 and stage.table.evicted >= stage.folded  # the storm's processes: dropped, counted
    assert len(sink.records) == 1 + 3000 * 6 + 4  # every record passed on regardless
    with stage._lock:  # before the table is read: what is left of the backlog is small
        assert len(stage.table) < 3000
    info = stage.process(R.guid_text(make_guid(prefix, *daemon)))
    assert info is not None and not info.exited and info.command_line == "/tmp/backdoor --listen"
    chain = stage.ancestors(info.process_guid)
    assert [(p.pid, p.command_line, p.exited) for p in chain] == [
        (shell[0], "sh -c 'backdoor &'", True), (10, "before the storm", False)]
    stats = stage.stats()
    assert stats["bytes"] + stage.backlog_max_bytes <= stats["max_bytes"] == 1 << 20


def test_a_source_that_says_when_it_sleeps_gets_the_folds_then_and_the_cap_still_holds(stage_push):
    # With defer_folds (the bpf source calls idle() before each sleep), a fold due within 1/32 of the cap waits for
    # idle(), so it holds back no batch being read; a backlog past the cap is folded at once all the same.
    sink = CheckedSink()
    stage = IdentityStage(sink, HOST, max_bytes=1 << 20, lean=True)
    stage.defer_folds = True
    cap, t, pid = stage.backlog_max_bytes, T + 10, 1000
    folds: list[int] = []
    real_fold = stage._fold_backlog

    def fold():
        folds.append(stage._backlog_bytes)
        real_fold()

    stage._fold_backlog = fold
    deferred = 0
    for i in range(3000):
        batch, t, pid = _two_short_lived(t, pid)
        before = len(folds)
        _checked(stage, batch)
        assert len(folds) == before or folds[-1] > cap  # only past the cap does a push fold
        assert stage._backlog_bytes <= cap
        if i % 7:  # the source sleeps now and then (a storm): the folds come then
            before = len(folds)
            stage.idle()
            deferred += len(folds) - before
    assert deferred > 10 and stage.folded > 2000
    assert all(size > cap - (cap >> 5) for size in folds)  # never more than one fold (1/32) before the cap


def _reader_waits():
    from etwmon.sources.bpf import _wait

    waits = [pytest.param(_wait.ReaderWait._wait, id="python")]
    if _native.reader_wait_method is not None:
        waits.append(pytest.param(_native.reader_wait_method, id="c"))
    return waits


@pytest.mark.parametrize("wait_method", _reader_waits())
def test_a_waiting_reader_does_the_sources_deferred_work_before_it_sleeps_then_its_pass(wait_method):
    from etwmon.sources.bpf import _wait

    calls: list = []
    read_fd, write_fd = os.pipe()
    other_r, other_w = os.pipe()
    waiting: list = []
    wait = _wait.ReaderWait([], [], read_fd, lambda notify: calls.append(("pass", len(waiting), notify)) or 0,
                            waiting, lambda: calls.append("sleeping"))
    try:
        t0 = time.monotonic()
        assert wait_method(wait, 0.05) is False  # nothing woke it: the timeout, then its pass all the same
        assert time.monotonic() - t0 >= 0.045
        assert calls == ["sleeping", ("pass", 1, True)] and wait.wakeups == 0
        os.write(write_fd, b"x")  # the monitor's records-waiting flag (one of its own): the wait ends at once
        calls.clear()
        wait.notify = False
        assert wait_method(wait, None) is False
        assert calls == ["sleeping", ("pass", 1, False)]  # counted as waiting through its pass, not after
        assert waiting == [] and wait.entries == 2 and wait.wakeups == 1
        os.write(other_w, b"x")  # a descriptor of the caller's: True, for the caller to look at
        assert wait_method(wait, 5, (other_r,)) is True
        assert wait.wakeups == 2  # (the flag is still readable: level-triggered)
    finally:
        wait.close()
        for fd in (read_fd, write_fd, other_r, other_w):
            os.close(fd)


@pytest.mark.parametrize("wait_method", _reader_waits())
def test_a_waiting_reader_leaves_the_list_whatever_its_pass_raised(wait_method):
    from etwmon.sources.bpf import _wait

    read_fd, write_fd = os.pipe()
    waiting: list = []

    def failing(notify):
        raise KeyError("the pass failed")

    wait = _wait.ReaderWait([], [], read_fd, failing, waiting, lambda: None)
    try:
        os.write(write_fd, b"x")
        with pytest.raises(KeyError, match="the pass failed"):
            wait_method(wait, 1)
        assert waiting == []
        with pytest.raises(TypeError):
            wait_method(wait, "soon")
        assert waiting == []
        wait.close()
        with pytest.raises((ValueError, OSError)):  # what Monitor.wait() takes for a concurrent stop()
            wait_method(wait, 0)
        assert waiting == []
    finally:
        wait.close()
        os.close(read_fd)
        os.close(write_fd)


_FOLD_RECORD = st.tuples(st.sampled_from(["create", "exec", "exit", "thread", "odd", "foreign", "damaged"]),
                         st.integers(1, 12), st.integers(1, 12), st.integers(0, 3))


@pytest.mark.skipif(_native.fold_plan is None, reason="etwmon._speedups was not built (no C compiler)")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(st.lists(_FOLD_RECORD, min_size=1, max_size=12), min_size=1, max_size=10))
def test_a_fold_plan_in_c_is_the_python_plan(batches):
    """etwmon/_backlog.c against backlog's array code on backlogs of creates, execs and exits of a dozen pids (a
    pid's start time tells its incarnations apart; parents chain, end or live on), thread records, a create
    without a block, guids of another host, and damaged records: the same records applied, the same noted
    exits, the same count dropped."""
    from etwmon import backlog
    from etwmon.identity import _WHOLE

    entries = []
    t = T + 10
    for batch in batches:
        records = []
        for kind, pid, parent, start in batch:
            t += 1
            if kind in ("create", "exec"):
                records.append(_kernel_create(1 if kind == "create" else 101, t, pid, parent, T + start,
                                              T + (start + 1) % 4, f"p{pid}"))
            elif kind == "exit":
                records.append(_kernel_exit(t, pid, T + start))
            elif kind == "thread":
                records.append(kernel_thread_record(pid * 10, pid, t))
            elif kind == "odd":
                records.append(R.encode_process_create(t, pid, parent, parent, parent, "no block"))
            else:
                record = bytearray(_kernel_create(1, t, pid, parent, T + start, T, "x") if start % 2 else
                                   _kernel_exit(t, pid, T + start))
                if kind == "foreign":  # another host's guid prefix
                    at = record.index(guid_prefix(HOST))
                    record[at] ^= 0xFF
                else:  # a field's tag or length that is not what the programs write
                    at = record.index(guid_prefix(HOST)) - 4 + 2 * (start // 2)
                    record[at] ^= 0x5A
                records.append(bytes(record))
        data = b"".join(records)
        ends = np.cumsum([len(r) for r in records], dtype="<i8").tobytes()
        entries.append((data, _WHOLE, ends))
    old = backlog.concat(entries)
    prefix = guid_prefix(HOST)
    apply, rows, dropped = backlog.fold_plan(old, prefix)
    want_apply, want_rows, want_dropped = backlog._fold_plan(old, prefix)
    assert apply == want_apply and dropped == want_dropped
    assert rows.shape == want_rows.shape and rows.tobytes() == want_rows.tobytes()


def test_a_fold_plan_keeps_a_daemons_chain_and_drops_what_came_and_went():
    from etwmon import backlog
    from etwmon.identity import _WHOLE

    records = [_kernel_create(1, T + 1, 20, 10, T + 1, T, "sh"),  # the shell: ends, but its child lives on
               _kernel_create(1, T + 2, 21, 20, T + 2, T + 1, "daemon"),
               _kernel_create(1, T + 3, 30, 10, T + 3, T, "true"),  # came and went: dropped
               _kernel_exit(T + 4, 30, T + 3), _kernel_exit(T + 5, 20, T + 1),
               _kernel_exit(T + 6, 40, T)]  # started before this part: noted for the table
    ends = np.cumsum([len(r) for r in records], dtype="<i8").tobytes()
    old = backlog.concat([(b"".join(records), _WHOLE, ends)])
    for plan in (backlog.fold_plan, backlog._fold_plan):  # in C (where built), and the array code
        apply, rows, dropped = plan(old, guid_prefix(HOST))
        assert apply == [0, 1, 4] and dropped == 1
        assert [bytes(row) for row in rows] == [make_guid(guid_prefix(HOST), 40, T)]


def test_folding_marks_exited_the_processes_the_table_had_before_and_reads_irregular_records_one_by_one(stage_push):
    prefix = guid_prefix(HOST)
    sink = CheckedSink()
    stage = IdentityStage(sink, HOST, max_bytes=1 << 19, lean=True)
    _checked(stage, [_kernel_create(1, T, 10, 1, T, T - 5, "old")])
    stage.apply_exits()
    # a create without a block (no guid fields: a source that wrote none) amid the storm: applied one by one
    odd = R.encode_process_create(T + 1, 20, 10, 10, 10, "no block")
    _checked(stage, [odd, _kernel_exit(T + 2, 10, T)])
    t = T + 10
    for i in range(4000):
        pid = 1000 + i
        _checked(stage, [_kernel_create(1, t, pid, 1, t, T - 5, "x"), _kernel_exit(t + 1, pid, t)])
        t += 2
    assert stage.folded > 0
    with stage._lock:
        assert stage.table.live.get(20) is not None  # the odd create, read one by one when folded
    stage.table.apply_exits()
    assert stage.table.by_guid[make_guid(prefix, 10, T)].exited  # its exit folded as a noted exit


# --- live: the same Monitor with and without the walk in C ----------------------------------------------------------

_LIVE = r'''
import json, os, subprocess, time
import etwmon
from etwmon import ItemType, _native, parse
with etwmon.Monitor(source="bpf", max_items=100_000) as mon:
    subprocess.run(["/bin/echo", "two  spaces", "q'uote", "\x01\u00e9"], stdout=subprocess.DEVNULL)
    shell = subprocess.Popen(["/bin/sh", "-c", "sleep 30 & wait"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    time.sleep(0.5)
    buf, events = bytearray(1 << 20), []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if mon.wait(0.2):
            while n := mon.readinto(buf):
                events += parse(bytes(buf[:n]))
        if any(e.type == ItemType.ProcessExec and "sleep" in e.command_line and e.parent_pid == shell.pid
               for e in events):
            break
    sleep = next(e for e in events if e.type == ItemType.ProcessExec and e.parent_pid == shell.pid)
    chain = [p.pid for p in mon.ancestors(sleep.process_guid)]
    echo = [e.command_line for e in events if e.type == ItemType.ProcessExec and e.command_line.startswith("/bin/echo")]
    os.killpg(shell.pid, 9); shell.wait()
    print(json.dumps({"c_walk": mon.stats.source_stats["c_walk"], "echo": echo, "chain": chain[:2],
                      "shell": shell.pid, "me": os.getpid(), "lost": mon.stats.lost + mon.stats.dropped,
                      "defer_folds": mon._stage.defer_folds}))
'''


@pytest.mark.root
@pytest.mark.parametrize("walk", ["c", "python"])
def test_live_a_monitor_gives_the_same_events_and_ancestry_with_the_walk_in_c_and_in_python(walk):
    """The whole path, live: exact argv, the process table fed (the backlog applied when read), no loss; the walk
    in Python (ETWMON_NO_SPEEDUPS=1) is the fallback where the package was built without a compiler."""
    import json
    import subprocess
    import sys

    from etwmon.sources.bpf import BpfSource

    from .conftest import require

    reason = BpfSource.unavailable_reason()
    require(reason is None, f"bpf: {reason}")
    env = dict(os.environ, ETWMON_NO_SPEEDUPS="1" if walk == "python" else "0")
    out = subprocess.run([sys.executable, "-c", _LIVE], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["c_walk"] == (1 if walk == "c" else 0)
    from etwmon.records import command_line_from_argv

    assert got["echo"] == [command_line_from_argv(["/bin/echo", "two  spaces", "q'uote", "\x01\u00e9"])]
    assert got["chain"] == [got["shell"], got["me"]] and got["lost"] == 0
    assert got["defer_folds"]  # the source says when it sleeps: the identity stage's folds wait for that


# --- parse's checks in C (etwmon._speedups.scan) ----------------------------------------------------------------------


def _records_for_scan():
    t = filetime(1_000)
    return [
        _kernel_create(1, T, 500, 400, T, T - 9, "sh -c 'x'"), _kernel_create(101, T + 1, 500, 400, T, T - 9, "é ü"),
        _kernel_exit(T + 2, 500, T), kernel_thread_record(7, 500, t), kernel_thread_record(8, 500, t, exit_code=3),
        R.encode_records_lost(t, 5), R.encode_thread_create(t, 9, 500), R.encode_process_exit(t, 500, 1),
        R.encode_process_create(t, 1, 0, 0, 0, ""),
    ]


def _python_checked(data):
    from etwmon import events as E

    saved, E._c_scan = E._c_scan, None
    try:
        return E._checked(data)
    finally:
        E._c_scan = saved


@settings(max_examples=400, deadline=None)
@given(picks=st.lists(st.integers(0, 8), min_size=0, max_size=12),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=4),
       cut=st.integers(0, 5000))
def test_the_c_checks_give_the_rows_blocks_and_first_error_the_python_checks_give(picks, flips, cut):
    """Records of every kind (blocks included), bytes changed anywhere and the buffer cut anywhere: the same rows,
    blocks and first error (message and offset) as the checks in Python."""
    from etwmon import events as E

    pool = _records_for_scan()
    data = bytearray(b"".join(pool[k] for k in picks))
    for at, value in flips:
        if data:
            data[at % len(data)] = value
    data = bytes(data[:cut])
    c_rows, c_blocks, c_error = E._checked(data)
    rows, blocks, error = _python_checked(data)
    assert (c_rows, c_blocks) == (rows, blocks)
    assert (type(c_error), str(c_error), getattr(c_error, "offset", None)) == (
        type(error), str(error), getattr(error, "offset", None))


def test_a_block_with_a_bad_field_and_a_time_out_of_range_are_refused_in_c_as_in_python():
    from etwmon import events as E

    good = _kernel_create(1, T, 500, 400, T, T - 9, "x")
    at = 40 + 2 * 1 + 8  # the block's first field: ProcessGuid, Length 16
    odd = bytearray(good)
    struct.pack_into("<H", odd, at + 2, 15)  # a guid of 15 bytes
    late = bytearray(good)
    struct.pack_into("<q", late, at + 48 + 4, -5)  # StartTime before 1601
    for data in (bytes(odd), good + bytes(late)):
        c, py = E._checked(data), _python_checked(data)
        assert str(c[2]) == str(py[2]) and c[2] is not None and c[:2] == py[:2]
    assert "needs 16" in str(E._checked(bytes(odd))[2]) and "out of range" in str(E._checked(good + bytes(late))[2])


# --- tail's JSON lines in C (etwmon._speedups.json_batch) -------------------------------------------------------


def _batch_lines(data, types, way):
    from unittest import mock

    from etwmon import batch_format

    with mock.patch.object(batch_format, "_c_json_batch", batch_format._c_json_batch if way == "c" else None):
        try:
            return batch_format.format_batch_typed(data, "json", types)
        except Exception as exc:  # noqa: BLE001 - the comparison is the point
            return type(exc), str(exc), getattr(exc, "offset", None)


@settings(max_examples=300, deadline=None)
@given(picks=st.lists(st.integers(0, 10), min_size=0, max_size=12),
       flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=3),
       cut=st.integers(0, 5000), types=st.none() | st.frozensets(st.sampled_from([1, 2, 3, 4, 5, 101])))
def test_the_c_json_lines_are_the_python_lines_or_the_same_error_on_damaged_batches(picks, flips, cut, types):
    """Records of every kind (blocks, rule names, image loads and losses included), bytes changed anywhere and
    the buffer cut anywhere, any type filter: the same lines and kinds as the Python formatter, or the same
    error (type, message, offset)."""
    t = filetime(2_000)
    pool = _records_for_scan() + [
        R.encode_image_load(t, 500, 4096, 0x7000, "/lib/libc.so.6",
                            Details(process_guid=make_guid(guid_prefix(HOST), 500, T), image="/bin/sh")),
        R.encode_process_exec(t, 500, 400, 400, 500, "x" * 40, Details(rule_name="caf\udce9", uid=0, cgroup="/a")),
    ]
    data = bytearray(b"".join(pool[k] for k in picks))
    for at, value in flips:
        if data:
            data[at % len(data)] = value
    data = bytes(data[:cut])
    assert _batch_lines(data, types, "c") == _batch_lines(data, types, "python")


def test_json_batch_refuses_rows_that_do_not_lie_within_their_records_rather_than_read_past_them():
    from etwmon import _native, batch_format

    good = R.encode_process_exec(filetime(3_000), 5, 1, 5, 5, "/bin/true")
    ctx, fallback = batch_format._c_context(), batch_format._fallback_line(good)
    t = filetime(3_000)
    assert _native.json_batch(good, [(0, 101, len(good), t)], [(0, 0)], None, ctx, fallback)[0]
    lying = bytearray(good)
    struct.pack_into("<H", lying, 32, 2000)  # a CommandLineLength far past the record
    exit_ = R.encode_process_exit(t, 5, 0)
    odd = bytearray(_kernel_create(1, T, 500, 400, T, T - 9, "x"))
    struct.pack_into("<H", odd, 40 + 2 + 8 + 2, 15)  # its block's ProcessGuid of 15 bytes: scan would refuse it
    for data, row, block in [(bytes(odd), (0, 1, len(odd), T), (42, len(odd))),
                             (bytes(lying), (0, 101, len(good), t), (0, 0)),
                             (good, (8, 101, len(good), t), (0, 0)),  # past the end
                             (good, (0, 101, len(good), t), (0, len(good) + 40)),  # a block past the data
                             (exit_, (0, 4, len(exit_), t), (0, 0))]:  # a thread exit's fields need 32 bytes
        with pytest.raises(ValueError):
            _native.json_batch(data, [row], [block], None, ctx, fallback)
