"""EventRing against a plain reference model, under threads, and with every kind of bad input."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import etwmon
from etwmon import records as R
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
    """What EventRing must do, written the plainest way: a deque, two caps, drop oldest, whole records out."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.items: deque[bytes] = deque()
        self.max_items, self.max_bytes = max_items, max_bytes
        self.dropped = self.pending = self.pushed = self.read = 0

    def push(self, record: bytes) -> None:
        while self.items and (len(self.items) == self.max_items
                              or sum(map(len, self.items)) + len(record) > self.max_bytes):
            self.items.popleft()
            self.dropped += 1
            self.pending += 1
        self.items.append(record)
        self.pushed += 1

    def readinto(self, size: int) -> bytes:
        out = b""
        if self.pending:
            if size < 24:
                raise etwmon.BufferTooSmall(24)
            out = R.encode_records_lost(0, self.pending)
            self.pending = 0
        while self.items and len(out) + len(self.items[0]) <= size:
            out += self.items.popleft()
            self.read += 1
        if not out and self.items:
            raise etwmon.BufferTooSmall(len(self.items[0]))
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

    @rule(sizes=st.lists(st.sampled_from([24, 40, 42, 56, 64, 100, 160, 250]), max_size=30))
    def push_batch(self, sizes):
        # The same as pushing each in order, whatever the caps (the service fans batches out with it).
        records = []
        for size in sizes:
            self.seq += 1
            records.append(record_of_size(size, self.seq))
        ends = np.cumsum([len(r) for r in records], dtype=np.int64)
        if any(len(r) > self.model.max_bytes for r in records):
            before = self.ring.stats
            with pytest.raises(etwmon.RecordFormatError):
                self.ring.push_batch(b"".join(records), ends)
            assert self.ring.stats == before
            return
        self.ring.push_batch(b"".join(records), ends)
        for record in records:
            self.model.push(record)

    @rule(size=st.integers(0, 700))
    def readinto_indexed(self, size):
        buf = bytearray(size)
        ends = np.full(size // 16 + 1, -1, dtype=np.int64)
        try:
            expected = self.model.readinto(size)
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


TestRingAgainstModel = RingMachine.TestCase
TestRingAgainstModel.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


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


def test_source_losses_share_the_in_band_report():
    ring = EventRing(max_items=2)
    for i in range(3):
        ring.push(record_of_size(24, i))
    ring.push_lost(5)
    buf = bytearray(4096)
    events = list(etwmon.parse(buf[:ring.readinto(buf)]))
    assert events[0].count == 6 and ring.stats.lost == 5 and ring.stats.dropped == 1


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
    lost, record = R.parse(buf[:ring.readinto(buf)])  # not wedged: the next read works and is exact
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
