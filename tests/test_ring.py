"""EventRing against a plain reference model, under threads, and with every kind of bad input."""

from __future__ import annotations

import sys
import threading
from collections import deque

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import etwmon
from etwmon import records as R
from etwmon import _native
from etwmon.ring import EventRing

LOST = int(R.ItemType.RecordsLost)


def record_of_size(size: int, seq: int) -> bytes:
    """A ProcessCreate of exactly ``size`` bytes (even, >= 40) or a ProcessExit (24) carrying ``seq``."""
    if size == 24:
        return R.encode_process_exit(seq, seq, seq ^ 0x5A5A)
    return R.encode_process_create(seq, seq, 1, 2, 3, "x" * ((size - 40) // 2))


def normalized(data: bytes) -> bytes:
    """The bytes with each RecordsLost Time zeroed (it is the time of the read, which the model can't know)."""
    out = bytearray(data)
    for offset, item, size, _ in R.record_headers(out).tolist():
        if item == LOST:
            out[offset + 8:offset + 16] = bytes(8)
    return bytes(out)


class ModelRing:
    """What EventRing must do, written the plainest way: a deque of records and loss counts in stream order, two
    caps, drop oldest, whole records out. A loss count sits where it happened; dropped records become a loss
    count where they were (the front), joined with the counts they reach."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.stream: deque[bytes | int] = deque()
        self.max_items, self.max_bytes = max_items, max_bytes
        self.dropped = self.pushed = self.read = 0

    @property
    def items(self) -> list[bytes]:
        return [e for e in self.stream if isinstance(e, bytes)]

    @property
    def pending(self) -> int:
        return sum(e for e in self.stream if isinstance(e, int))

    def push(self, record: bytes) -> None:
        gone = 0
        while self.items and (len(self.items) == self.max_items
                              or sum(map(len, self.items)) + len(record) > self.max_bytes):
            entry = self.stream.popleft()
            if isinstance(entry, bytes):
                self.dropped += 1
                gone += 1
            else:
                gone += entry
        if gone:
            while self.stream and isinstance(self.stream[0], int):  # a loss just after the dropped ones
                gone += self.stream.popleft()
            self.stream.appendleft(gone)
        self.stream.append(record)
        self.pushed += 1

    def push_lost(self, count: int) -> None:
        if count:
            if self.stream and isinstance(self.stream[-1], int):
                self.stream[-1] += count
            else:
                self.stream.append(count)

    def readinto(self, size: int, indexed: bool = False) -> bytes:
        """``indexed``: stop before a loss that would not lead the batch (``readinto_indexed``)."""
        out = b""
        records = 0
        while self.stream:
            entry = self.stream[0]
            if isinstance(entry, int):
                if len(out) + 24 > size or (indexed and records):
                    break
                count = min(entry, 0xFFFFFFFF)
                out += R.encode_records_lost(0, count)
                if count == entry:
                    self.stream.popleft()
                else:
                    self.stream[0] = entry - count
            elif len(out) + len(entry) <= size:
                out += self.stream.popleft()
                self.read += 1
            else:
                break
            records += 1
        if not out and self.stream:
            entry = self.stream[0]
            raise etwmon.BufferTooSmall(24 if isinstance(entry, int) else len(entry))
        return out


class RingMachine(RuleBasedStateMachine):
    @initialize(max_items=st.integers(1, 12), max_bytes=st.integers(64, 600))
    def setup(self, max_items, max_bytes):
        self.ring = EventRing(max_items=max_items, max_bytes=max_bytes)
        self.model = ModelRing(max_items, max_bytes)
        self.seq = 0

    @rule(size=st.sampled_from([24, 40, 42, 56, 64, 100, 160, 250]))
    def push(self, size):
        self.seq += 1
        record = record_of_size(size, self.seq)
        if size > self.model.max_bytes:
            with pytest.raises(etwmon.RecordFormatError):
                self.ring.push(record)
            return
        self.ring.push(record)
        self.model.push(record)

    @rule(sizes=st.lists(st.sampled_from([24, 40, 42, 56, 64, 100, 160, 250]), max_size=30),
          checked=st.booleans())
    def push_batch(self, sizes, checked):
        # The same as pushing each in order, whatever the caps: push_batch (the service fans batches out with it)
        # and push_checked (what the bpf source's C walk passes on: records it checked, ends as little-endian
        # int64 bytes).
        records = []
        for size in sizes:
            self.seq += 1
            records.append(record_of_size(size, self.seq))
        ends = np.cumsum([len(r) for r in records], dtype="<i8")
        push = (lambda: self.ring.push_checked(b"".join(records), ends.tobytes(), 0)) if checked else (
            lambda: self.ring.push_batch(b"".join(records), ends))
        if any(len(r) > self.model.max_bytes for r in records):
            before = self.ring.stats
            with pytest.raises(etwmon.RecordFormatError):
                push()
            assert self.ring.stats == before
            return
        push()
        for record in records:
            self.model.push(record)

    @rule(count=st.sampled_from([0, 1, 3, 0xFFFFFFFF, 2**32 + 2]))
    def push_lost(self, count):
        self.ring.push_lost(count)
        self.model.push_lost(count)

    @rule(size=st.integers(0, 700))
    def readinto_indexed(self, size):
        buf = bytearray(size)
        ends = np.full(size // 16 + 1, -1, dtype=np.int64)
        try:
            expected = self.model.readinto(size, indexed=True)
        except etwmon.BufferTooSmall as want:
            with pytest.raises(etwmon.BufferTooSmall) as got:
                self.ring.readinto_indexed(buf, ends)
            assert got.value.needed == want.needed
            return
        n, count, lost = self.ring.readinto_indexed(buf, ends)
        assert normalized(bytes(buf[:n])) == normalized(expected)
        headers = R.record_headers(buf[:n])
        assert ends[:count].tolist() == (headers["offset"] + headers["Size"]).tolist()
        assert lost == (next(etwmon.parse(buf[:24])).count if count and headers["Type"][0] == LOST else 0)
        assert LOST not in headers["Type"][1:].tolist()  # a loss only ever leads an indexed batch

    @rule(size=st.integers(0, 700))
    def readinto(self, size):
        buf = bytearray(size + 5)
        view = memoryview(buf)[:size]
        try:
            expected = self.model.readinto(size)
        except etwmon.BufferTooSmall as want:
            with pytest.raises(etwmon.BufferTooSmall) as got:
                self.ring.readinto(view)
            assert got.value.needed == want.needed
            return
        n = self.ring.readinto(view)
        assert normalized(bytes(buf[:n])) == normalized(expected)
        assert buf[size:] == bytes(5)  # never writes past the buffer

    @invariant()
    def same_counts(self):
        if not hasattr(self, "ring"):
            return
        s = self.ring.stats
        m = self.model
        assert (s.pushed, s.read, s.dropped, s.items) == (m.pushed, m.read, m.dropped, len(m.items))
        assert s.bytes == sum(map(len, m.items)) <= s.max_bytes
        assert len(self.ring) == len(m.items)
        assert self.ring.readable() == bool(m.items or m.pending)
        assert self.ring.pending_lost == m.pending


TestRingAgainstModel = RingMachine.TestCase
TestRingAgainstModel.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


class PythonRingMachine(RingMachine):
    """The same machine with the ring's C paths (etwmon/_ring.c) off: both must match the model."""

    @initialize(max_items=st.integers(1, 12), max_bytes=st.integers(64, 600))
    def setup(self, max_items, max_bytes):
        self.saved = EventRing.push_checked, EventRing.readinto
        EventRing.push_checked, EventRing.readinto = EventRing._push_checked, EventRing._readinto
        super().setup(max_items, max_bytes)

    def teardown(self):
        if hasattr(self, "saved"):
            EventRing.push_checked, EventRing.readinto = self.saved


TestPythonRingAgainstModel = PythonRingMachine.TestCase
TestPythonRingAgainstModel.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


@pytest.mark.skipif(_native.ring_push is None, reason="etwmon._speedups was not built (no C compiler)")
def test_the_ring_uses_its_c_paths_and_they_hold_no_reference_to_the_ring():
    assert EventRing.readinto is _native.ring_readinto_method
    assert EventRing.push_checked is _native.ring_push_checked_method
    ring = EventRing(max_items=4, max_bytes=256)
    ring.push_checked(record_of_size(40, 1), np.array([40], dtype="<i8").tobytes())
    out = bytearray(100)
    assert ring.readinto(out) == 40 and ring.readinto(out) == 0
    assert sys.getrefcount(ring) == 2  # the name, the call's argument: no cycle keeps a ring's arena alive


@pytest.mark.skipif(_native.ring_push is None, reason="etwmon._speedups was not built (no C compiler)")
def test_the_ring_c_paths_leave_the_work_to_python_when_the_lock_is_held():
    ring = EventRing(max_items=4, max_bytes=256)
    record = record_of_size(40, 1)
    assert _native.ring_push(ring, record, np.array([40], dtype="<i8").tobytes()) is True
    with ring._lock:  # held elsewhere: neither waits, neither changes anything
        assert _native.ring_push(ring, record, np.array([40], dtype="<i8").tobytes()) is False
        assert _native.ring_copy(ring, bytearray(100)) is None
    assert len(ring) == 1
    assert _native.ring_copy(ring, bytearray(39)) is None  # too small: Python raises BufferTooSmall
    assert _native.ring_copy(ring, bytes(100)) is None  # read-only: Python raises TypeError
    out = bytearray(100)
    assert _native.ring_copy(ring, out) == 40 and bytes(out[:40]) == record
    assert _native.ring_copy(ring, out) == 0
    ring.push_lost(2)  # a loss to read out: Python writes the RecordsLost record
    assert _native.ring_copy(ring, out) is None
    for _ in range(4):
        ring.push(record)
    assert _native.ring_push(ring, record, np.array([40], dtype="<i8").tobytes()) is False  # would drop one
    assert len(ring) == 4


# --- the book's behaviours, one by one -------------------------------------------------------------------


def test_push_batch_rejects_ends_that_disagree_with_the_sizes():
    ring = EventRing()
    data = record_of_size(40, 1) + record_of_size(24, 2)
    for ends in ([40, 63], [24, 64], [64], [40, 60, 64]):
        with pytest.raises(etwmon.RecordFormatError):
            ring.push_batch(data, ends)
    with pytest.raises(etwmon.RecordFormatError):
        ring.push_batch(data, [])
    assert ring.stats.pushed == 0
    ring.push_batch(data, [40, 64])
    assert ring.readinto(bytearray(100)) == 64


def test_empty_ring_reads_zero():
    assert EventRing().readinto(bytearray(100)) == 0


def test_first_record_that_does_not_fit_stays_for_next_time():
    ring = EventRing()
    records = [record_of_size(s, i) for i, s in enumerate([40, 100, 24])]
    for r in records:
        ring.push(r)
    buf = bytearray(150)
    assert ring.readinto(buf) == 140  # 40 + 100; the 24 would fit but order is kept: it's next
    assert ring.readinto(buf) == 24 and bytes(buf[:24]) == records[2]


def test_buffer_too_small_consumes_nothing_and_says_how_much():
    ring = EventRing()
    ring.push(record_of_size(100, 1))
    with pytest.raises(etwmon.BufferTooSmall) as info:
        ring.readinto(bytearray(99))
    assert info.value.needed == 100 and isinstance(info.value, ValueError)
    assert len(ring) == 1 and ring.readinto(bytearray(100)) == 100


def test_drops_are_reported_in_band_first_and_counted():
    ring = EventRing(max_items=3)
    for i in range(10):
        ring.push(record_of_size(24, i))
    buf = bytearray(4096)
    events = list(etwmon.parse(buf[:ring.readinto(buf)]))
    assert isinstance(events[0], etwmon.RecordsLost) and events[0].count == 7
    assert [e.pid for e in events[1:]] == [7, 8, 9]
    assert ring.stats.dropped == 7 and ring.stats.read == 3 and ring.stats.pushed == 10
    assert ring.readinto(buf) == 0  # the report is given once


def test_byte_cap_drops_oldest_and_wraps_records_around_the_arena():
    ring = EventRing(max_items=100, max_bytes=250)
    out = bytearray()
    for i in range(7):
        ring.push(record_of_size(100, i))  # 100-byte records in a 250-byte arena: most straddle its end
        if len(ring) == 2:
            buf = bytearray(100)
            out += buf[:ring.readinto(buf)]
    for i in range(7, 10):  # three more with nobody reading: the byte cap holds two, the oldest goes
        ring.push(record_of_size(100, i))
    buf = bytearray(1000)
    out += buf[:ring.readinto(buf)]
    events = list(etwmon.parse(out))
    assert [e.pid for e in events[:6]] == [0, 1, 2, 3, 4, 5]
    assert isinstance(events[6], etwmon.RecordsLost) and events[6].count == 2
    assert [e.pid for e in events[7:]] == [8, 9]
    assert out[-200:] == record_of_size(100, 8) + record_of_size(100, 9)
    assert ring.stats.dropped == 2 and ring.stats.bytes == 0


def read_all(ring: EventRing, size: int = 4096) -> list:
    """Every event the ring holds, read with ``size``-byte buffers."""
    buf, events = bytearray(size), []
    while (n := ring.readinto(buf)):
        events += etwmon.parse(buf[:n])
    return events


def shape(events) -> list:
    """('lost', count) for a RecordsLost, the pid for a record: the order a reader sees."""
    return [("lost", e.count) if e.type == LOST else e.pid for e in events]


def test_a_source_loss_sits_between_the_records_around_it():
    ring = EventRing()
    ring.push(record_of_size(24, 1))
    ring.push_lost(5)
    ring.push(record_of_size(40, 3))
    assert shape(read_all(ring)) == [1, ("lost", 5), 3]
    assert ring.stats.lost == 5 and ring.pending_lost == 0


@pytest.mark.parametrize("size", [40, 48, 64, 88, 100, 4096])
def test_a_loss_keeps_its_place_across_partial_reads(size):
    ring = EventRing()
    ring.push(record_of_size(24, 1))
    ring.push(record_of_size(40, 2))
    ring.push_lost(5)
    ring.push_lost(2)  # nothing pushed between: one report
    ring.push(record_of_size(24, 3))
    ring.push_lost(1)  # at the end, after everything
    assert shape(read_all(ring, size)) == [1, 2, ("lost", 7), 3, ("lost", 1)]


def test_a_read_that_ends_just_before_a_loss_leaves_it_for_the_next_read():
    ring = EventRing()
    ring.push(record_of_size(24, 1))
    ring.push_lost(5)
    ring.push(record_of_size(24, 2))
    buf = bytearray(40)  # room for the record and not for the report after it
    assert shape(etwmon.parse(buf[:ring.readinto(buf)])) == [1]
    assert ring.pending_lost == 5 and ring.readable()
    assert shape(read_all(ring)) == [("lost", 5), 2]


def test_dropped_records_are_reported_where_they_were_before_the_oldest_kept():
    # The oldest records are dropped: in the stream they sat just after what a reader already took, so
    # that is where their report goes, ahead of the oldest record the ring still holds.
    ring = EventRing(max_items=3)
    ring.push(record_of_size(24, 1))
    buf = bytearray(24)
    assert shape(etwmon.parse(buf[:ring.readinto(buf)])) == [1]
    for pid in range(2, 7):  # 2 and 3 are dropped for 5 and 6
        ring.push(record_of_size(24, pid))
    ring.push_lost(4)
    ring.push(record_of_size(24, 7))  # drops 4: a third drop, still just before 5
    assert shape(read_all(ring)) == [("lost", 3), 5, 6, ("lost", 4), 7]
    assert ring.stats.dropped == 3 and ring.stats.lost == 4


def test_drops_that_reach_a_source_loss_join_it_in_one_report():
    ring = EventRing(max_items=2)
    for i in range(3):
        ring.push(record_of_size(24, i))  # 0 dropped
    ring.push_lost(5)  # after 1 and 2
    ring.push(record_of_size(24, 3))  # drops 1: not yet at the loss
    assert shape(read_all(ring)) == [("lost", 2), 2, ("lost", 5), 3]
    for i in range(10, 12):
        ring.push(record_of_size(24, i))
    ring.push_lost(5)  # after 10 and 11
    ring.push(record_of_size(24, 12))
    ring.push(record_of_size(24, 13))  # 10 and 11 dropped: they reach the loss after them
    assert shape(read_all(ring)) == [("lost", 7), 12, 13]
    assert ring.stats.lost == 10 and ring.stats.dropped == 4


def test_a_batch_too_big_for_the_ring_reports_its_drops_before_what_it_keeps():
    ring = EventRing(max_items=3)
    ring.push(record_of_size(24, 1))
    ring.push_lost(2)
    records = [record_of_size(24, pid) for pid in range(10, 30)]
    ring.push_batch(b"".join(records), np.cumsum([24] * 20))
    # 1, the loss after it and the batch's first 17 are gone: one report where they were
    assert shape(read_all(ring)) == [("lost", 1 + 2 + 17), 27, 28, 29]


def test_indexed_reads_stop_before_a_loss_so_batches_passed_on_keep_it_in_place():
    ring = EventRing()
    ring.push(record_of_size(24, 1))
    ring.push_lost(5)
    ring.push(record_of_size(24, 2))
    buf, ends = bytearray(4096), np.zeros(4096 // 16 + 1, dtype=np.int64)
    batches = []
    while True:
        n, count, lost = ring.readinto_indexed(buf, ends)
        if not n:
            break
        batches.append((shape(etwmon.parse(buf[:n])), count, lost))
    assert batches == [([1], 1, 0), ([("lost", 5), 2], 2, 5)]
    # and a queue fed the way the service feeds its clients' queues ends up the same
    queue = EventRing()
    source = EventRing()
    source.push(record_of_size(24, 1))
    source.push_lost(5)
    source.push(record_of_size(24, 2))
    while (got := source.readinto_indexed(buf, ends))[0]:
        n, count, lost = got
        first = 1 if lost else 0
        queue.push_lost(lost)
        if count > first:
            offset = int(ends[0]) if lost else 0
            queue.push_batch(buf[offset:n], ends[first:count] - offset)
    assert shape(read_all(queue)) == [1, ("lost", 5), 2]


def test_a_loss_report_carries_the_time_of_where_it_sits():
    ring = EventRing(max_items=2)
    before = R.filetime_now()
    ring.push(R.encode_process_exit(1000, 1, 0))
    ring.push_lost(1)  # the time the source said so
    after = R.filetime_now()
    ring.push(R.encode_process_exit(2000, 2, 0))
    ring.push(R.encode_process_exit(3000, 3, 0))  # drops pid 1 (Time 1000), which reaches the loss mark
    lost = read_all(ring)[0]
    assert lost.count == 2 and before <= lost.filetime <= after
    for time in (4000, 5000, 6000, 7000):  # drops 4000 and 5000: the oldest record kept says when
        ring.push(R.encode_process_exit(time, time, 0))
    assert [(e.type, e.filetime) for e in read_all(ring)] == [(LOST, 6000), (2, 6000), (2, 7000)]


def test_huge_losses_are_split_into_ulong_reports():
    ring = EventRing()
    ring.push_lost(2**32 + 5)
    buf = bytearray(24)
    counts = []
    while (n := ring.readinto(buf)):
        counts.append(next(etwmon.parse(buf[:n])).count)
    assert counts == [2**32 - 1, 6]


def test_readinto_accepts_memoryview_and_numpy_buffers():
    ring = EventRing()
    record = record_of_size(64, 1)
    ring.push(record)
    ring.push(record)
    arr = np.zeros(64, dtype=np.uint8)
    assert ring.readinto(arr) == 64 and arr.tobytes() == record
    big = bytearray(200)
    assert ring.readinto(memoryview(big)[10:]) == 64 and big[10:74] == record


# --- bad input leaves the ring unchanged ----------------------------------------------------------------


@pytest.mark.parametrize("bad, message", [
    (lambda r: r[:-2], "Size 24 but the record is 22"),
    (lambda r: r + b"\0\0", "Size 24 but the record is 26"),
    (lambda r: r[:10], "at least 16 bytes"),
    (lambda r: b"", "at least 16 bytes"),
])
def test_bad_records_are_refused_and_change_nothing(bad, message):
    ring = EventRing()
    ring.push(record_of_size(24, 1))
    before = ring.stats
    with pytest.raises(etwmon.RecordFormatError, match=message):
        ring.push(bad(record_of_size(24, 2)))
    assert ring.stats == before


def test_record_bigger_than_max_bytes_is_refused():
    ring = EventRing(max_bytes=100)
    ring.push(record_of_size(100, 1))
    with pytest.raises(etwmon.RecordFormatError, match="max_bytes=100"):
        ring.push(record_of_size(102, 2))
    assert len(ring) == 1 and ring.stats.dropped == 0


def test_read_only_buffer_is_a_type_error_and_consumes_nothing():
    ring = EventRing()
    ring.push(record_of_size(24, 1))
    with pytest.raises(TypeError, match="writable"):
        ring.readinto(bytes(100))
    with pytest.raises(TypeError):
        ring.readinto(memoryview(bytes(100)))
    assert len(ring) == 1


@pytest.mark.parametrize("kwargs", [{"max_items": 0}, {"max_items": -1}, {"max_items": 1.5},
                                    {"max_items": True}, {"max_bytes": 0}, {"max_bytes": 15}])
def test_caps_must_be_sensible(kwargs):
    with pytest.raises(ValueError):
        EventRing(**kwargs)


def test_memory_is_fixed_by_the_caps():
    ring = EventRing(max_items=1000, max_bytes=50_000)
    arena = ring._arena.nbytes + ring._ends.nbytes
    for i in range(20_000):
        ring.push(record_of_size(40 + 2 * (i % 30), i))
    assert ring._arena.nbytes + ring._ends.nbytes == arena == 50_000 + 8000
    assert ring.stats.bytes <= 50_000 and ring.stats.items <= 1000


# --- threads ---------------------------------------------------------------------------------------------


def test_one_producer_two_readers_every_record_once_or_counted_dropped():
    total = 1_000_000
    ring = EventRing(max_items=5000, max_bytes=200_000)
    sizes = [24, 40, 46, 60]
    templates = [record_of_size(s, 0) for s in sizes]
    done = threading.Event()
    seen: list[list[np.ndarray]] = [[], []]
    lost_reports = [0, 0]
    errors: list[str] = []

    def produce():
        push = ring.push
        for seq in range(1, total + 1):
            t = bytearray(templates[seq & 3])
            t[8:16] = seq.to_bytes(8, "little")  # Time = seq
            t[16:20] = (seq & 0xFFFFFFFF).to_bytes(4, "little")  # ProcessId = seq
            push(t)
        done.set()

    def read(k):
        rng = np.random.default_rng(k)
        buf = bytearray(70_000)
        while True:
            n = ring.readinto(memoryview(buf)[: int(rng.integers(64, 70_000))])
            if not n:
                if done.is_set() and not ring.readable():
                    return
                continue
            index = R.record_headers(buf[:n])
            data = np.frombuffer(buf, dtype=np.uint8, count=n)
            lost = index["Type"] == LOST
            for off in index["offset"][lost]:
                lost_reports[k] += int.from_bytes(data[off + 16:off + 20].tobytes(), "little")
            rest = index[~lost]
            pids = data[rest["offset"][:, None] + np.arange(16, 20)].copy().view("<u4").ravel()
            sizes_ok = np.isin(rest["Size"], sizes) & (rest["Size"] == np.array(sizes)[rest["Time"] & 3])
            if not (np.all(pids == rest["Time"]) and np.all(sizes_ok)):
                errors.append("torn or mixed-up record")
            seen[k].append(rest["Time"].copy())

    readers = [threading.Thread(target=read, args=(k,)) for k in range(2)]
    for t in readers:
        t.start()
    produce()
    for t in readers:
        t.join(120)
    assert not any(t.is_alive() for t in readers), "a reader never finished (it would have read nothing more)"
    assert not errors
    got = np.concatenate([np.concatenate(s) if s else np.array([], dtype=np.int64) for s in seen])
    stats = ring.stats
    assert len(np.unique(got)) == len(got), "a record was read twice"
    assert len(got) + stats.dropped == total == stats.pushed
    assert sum(lost_reports) == stats.dropped
    for s in seen:  # each reader sees its records in push order
        if s:
            mine = np.concatenate(s)
            assert np.all(np.diff(mine) > 0)


# --- values that are not records or counts: a clear error, and the ring as it was -------------------------------


def _ring_with_one_record_and_a_loss() -> EventRing:
    ring = EventRing()
    ring.push(record_of_size(24, 1))
    ring.push_lost(2)
    return ring


@pytest.mark.parametrize("count, error, message", [
    (1.5, TypeError, r"push_lost\(\) takes a whole number of records, not 1.5 \(float\)"),
    ("3", TypeError, r"push_lost\(\) takes a whole number of records, not '3' \(str\)"),
    (True, TypeError, r"push_lost\(\) takes a whole number of records, not True"),
    (None, TypeError, r"not None \(NoneType\)"),
    (-1, ValueError, r"push_lost\(\) takes a count of records >= 0, not -1"),
])
def test_push_lost_refuses_what_is_not_a_count_and_the_ring_stays_readable(count, error, message):
    ring = _ring_with_one_record_and_a_loss()
    before = ring.stats
    with pytest.raises(error, match=message):
        ring.push_lost(count)
    assert ring.stats == before and ring.pending_lost == 2
    buf = bytearray(100)
    record, lost = R.parse(buf[:ring.readinto(buf)])  # not wedged: the next read works and is exact
    assert lost.count == 2 and record.pid == 1


def test_push_lost_takes_numpy_integers():
    ring = EventRing()
    ring.push_lost(np.int64(3))
    ring.push_lost(np.uint32(4))
    assert ring.stats.lost == 7


@pytest.mark.parametrize("bad, message", [
    ("x", "push\\(\\) takes one encoded record, a bytes-like object .*, not str"),
    (24, "not int"),
    (None, "not NoneType"),
    (memoryview(bytes(48))[::2], "contiguous"),
])
def test_push_refuses_what_is_not_bytes_like(bad, message):
    ring = _ring_with_one_record_and_a_loss()
    before = ring.stats
    with pytest.raises(TypeError, match=message):
        ring.push(bad)
    assert ring.stats == before


def test_a_record_in_a_numpy_array_of_another_item_type_counts_by_its_bytes():
    record = record_of_size(24, 7)
    ring = EventRing()
    ring.push(np.frombuffer(record, dtype=np.int32))  # six int32 items: the same 24 bytes
    ring.push(np.frombuffer(record, dtype=np.uint8).reshape(4, 6))
    buf = bytearray(100)
    assert bytes(buf[:ring.readinto(buf)]) == record * 2
    short = np.frombuffer(record[:20], dtype=np.int32)  # 20 bytes, the header says 24
    with pytest.raises(etwmon.RecordFormatError, match="Size 24 but the record is 20 bytes"):
        ring.push(short)
    assert len(ring) == 0 and ring.stats.pushed == 2
