"""EventRing: the bounded list of variable-length records that stands in for the driver's linked list.

Records live back to back in a preallocated numpy ``uint8`` arena used as a circular byte stream (a record may
wrap around its end); a numpy int64 slot table holds each record's end position in that stream. Both are fixed
by the caps, so memory does not grow with the event rate. ``readinto`` finds how many whole records fit with
one binary search over the slot table and moves them with one or two slice copies, not a loop per record.

A loss sits where it happened. ``push_lost`` marks the stream position between the last record pushed and the
next one; a full ring that drops its oldest records marks the position they leave behind, just before the oldest
record it keeps — which is where they were in the stream: everything before that point that a reader has not
taken is gone, so a reader sees ``[..., what it read before, RecordsLost n, oldest record kept, ...]``. Marks that
meet at one position (drops that reach a ``push_lost`` mark, repeated ``push_lost`` calls with nothing pushed
between) are one RecordsLost record with the sum. Its Time is when the source reported the loss; for drops alone,
the Time of the oldest record kept (the first after them: the bytes of those dropped are already overwritten), so
the stream keeps its order in time.
"""

from __future__ import annotations

import operator
import struct
import threading
from bisect import bisect_left, bisect_right
from collections import deque
from dataclasses import dataclass

import numpy as np

from . import _native
from .errors import BufferTooSmall, RecordFormatError
from .records import HEADER_SIZE, encode_records_lost, filetime_now

__all__ = ["EventRing", "RingStats", "DEFAULT_BYTES_PER_ITEM", "writable_bytes"]

#: With ``max_bytes=None`` the byte cap is ``max_items`` times this (a ProcessCreate with a 100-character
#: command line is 240 bytes), but never less than one largest record.
DEFAULT_BYTES_PER_ITEM = 1024
_LOST_SIZE = 24
_SMALL_BATCH = 16  # push_batch of at most this many records pushes them one by one
_MAX_LOST_COUNT = 0xFFFFFFFF
#: push_checked: up to this many records, their ends are unpacked into a tuple and written one by one (cheaper
#: than array operations for the few records of a quiet moment's batch).
_FEW = 16
_UNPACK_ENDS = [None] + [struct.Struct(f"<{k}q").unpack for k in range(1, _FEW + 1)]


def writable_bytes(buffer) -> memoryview:
    """``buffer`` as a flat writable byte view, the way every ``readinto`` takes it; ``TypeError`` when it is
    read-only."""
    out = memoryview(buffer)
    if out.readonly:
        raise TypeError("readinto() needs a writable buffer (bytearray, memoryview, numpy array), "
                        f"not read-only {type(buffer).__name__}")
    if out.ndim != 1 or out.format != "B":
        out = out.cast("B")
    return out


def _record_bytes(record) -> memoryview:
    """``record`` as a flat view of its bytes, or a TypeError that says what push() takes."""
    try:
        view = memoryview(record)
    except TypeError:
        raise TypeError("push() takes one encoded record, a bytes-like object (bytes, bytearray, memoryview), "
                        f"not {type(record).__name__}") from None
    if not view.c_contiguous:
        raise TypeError("push() takes one encoded record in contiguous memory, not a strided view")
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _whole_count(count) -> int:
    if isinstance(count, bool):
        raise TypeError(f"push_lost() takes a whole number of records, not {count!r}")
    try:
        return operator.index(count)  # int subclasses, numpy integers
    except TypeError:
        raise TypeError(f"push_lost() takes a whole number of records, not {count!r} "
                        f"({type(count).__name__})") from None


@dataclass(frozen=True)
class RingStats:
    """Counters of an EventRing. ``dropped``: records the full ring threw away (oldest first); ``lost``:
    records a source reported missing through ``push_lost``. Every one of both reaches readers as a
    RecordsLost count."""

    pushed: int
    read: int
    dropped: int
    lost: int
    items: int
    bytes: int
    max_items: int
    max_bytes: int


class EventRing:
    """A bounded FIFO of encoded records; a full ring drops its oldest records and counts them.

    Safe for one producer thread and any number of reader threads.
    """

    def __init__(self, max_items: int = 10_000, max_bytes: int | None = None) -> None:
        if isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 1:
            raise ValueError(f"max_items must be a whole number >= 1, not {max_items!r}")
        if max_bytes is None:
            max_bytes = max(max_items * DEFAULT_BYTES_PER_ITEM, 0x10000)
        elif isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < HEADER_SIZE:
            raise ValueError(f"max_bytes must be a whole number >= {HEADER_SIZE}, not {max_bytes!r}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._arena = np.zeros(max_bytes, dtype=np.uint8)
        self._mem = memoryview(self._arena)
        # Slot i holds the stream position where record i ends; the head record starts at _head_pos.
        self._ends = np.zeros(max_items, dtype=np.int64)
        self._endv = memoryview(self._ends)
        self._lock = threading.Lock()
        self._head = 0  # slot of the oldest record
        self._count = 0
        self._head_pos = 0  # stream position of the oldest record (bytes pushed and still held start here)
        self._tail_pos = 0  # stream position where the next record goes
        self._tail_slot = 0  # slot the next record's end goes to
        self._read = self._dropped = self._lost = 0
        self._pending_lost = 0  # not yet reported in-band: the marks' counts (+ drops not yet marked, below)
        # Loss marks, oldest first: [stream position, count, Time]. A mark at position p is read out as a
        # RecordsLost record just before the record that starts at p (or after everything, at the tail).
        self._marks: deque[list[int]] = deque()
        # Drops happen at the front, so their mark is always at _head_pos: _dropped - _drops_marked of them (plus
        # _head_lost from marks they reached, the latest Time of those in _head_time), made a mark only when
        # read, so a full ring's push only counts.
        self._drops_marked = self._head_lost = self._head_time = 0

    # -- producer --------------------------------------------------------------------------------------

    def push(self, record) -> None:
        """Append one encoded record (its header's Size must equal its length).

        A full ring (either cap) first drops its oldest records, counted in ``stats.dropped`` and reported
        in-band as a RecordsLost record where they were: just before the oldest record kept. Raises ``RecordFormatError`` (and changes nothing) on a record
        that is too short, whose Size disagrees with its length, or that is larger than ``max_bytes``, and
        ``TypeError`` on something that is not bytes-like. Any C-contiguous buffer counts by its bytes (a numpy
        array of another item type too).
        """
        if type(record) is not bytes and type(record) is not bytearray:  # the sources' own types skip this
            record = _record_bytes(record)
        n = len(record)
        if n < HEADER_SIZE or record[2] | (record[3] << 8) != n:
            self._reject(record)
        cap = self.max_bytes
        if n > cap:
            raise RecordFormatError(f"a {n}-byte record cannot fit a ring of max_bytes={cap}")
        with self._lock:
            start = self._tail_pos
            end = start + n
            count = self._count
            if count == self.max_items or end - self._head_pos > cap:
                self._make_room(end)
                count = self._count
            at = start % cap
            if at + n <= cap:
                self._mem[at:at + n] = record
            else:  # wraps around the end of the arena
                first = cap - at
                view = memoryview(record)
                self._mem[at:] = view[:first]
                self._mem[:n - first] = view[first:]
            slot = self._tail_slot
            self._endv[slot] = end
            self._tail_slot = slot + 1 if slot + 1 < self.max_items else 0
            self._count = count + 1
            self._tail_pos = end

    def push_lost(self, count: int) -> None:
        """Record that a source missed ``count`` records just now: counted in ``stats.lost`` and read out as a
        RecordsLost record after the records pushed so far and before the next one. ``count`` is a whole
        number >= 0 (``TypeError``/``ValueError`` otherwise, and nothing changes)."""
        if type(count) is not int:
            count = _whole_count(count)
        if count < 0:
            raise ValueError(f"push_lost() takes a count of records >= 0, not {count}")
        if count:
            now = filetime_now()
            with self._lock:
                self._lost += count
                self._pending_lost += count
                marks = self._marks
                if marks and marks[-1][0] == self._tail_pos:
                    marks[-1][1] += count
                else:
                    marks.append([self._tail_pos, count, now])

    def _reject(self, record) -> None:
        if len(record) < HEADER_SIZE:
            raise RecordFormatError(f"a record needs at least {HEADER_SIZE} bytes, got {len(record)}")
        size = record[2] | (record[3] << 8)
        raise RecordFormatError(f"record header says Size {size} but the record is {len(record)} bytes")

    def push_batch(self, data, ends) -> None:
        """Append the whole records of ``data`` (back to back) at once, as ``push`` of each in order would,
        under one lock and with bulk copies: how the service fans one batch out to every client's queue.

        ``ends`` (ascending integers, e.g. what ``readinto_indexed`` wrote) says where each record ends in
        ``data``; the last must be ``len(data)``. When the batch alone exceeds a cap only its newest records
        stay, the others count as dropped. Raises ``RecordFormatError`` (changing nothing) when a record's
        Size disagrees with ``ends`` or a record is larger than ``max_bytes``.
        """
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        ends = np.asarray(ends, dtype=np.int64)
        k = len(ends)
        if k == 0:
            if len(view):
                raise RecordFormatError(f"{len(view)} bytes of records but no record ends given")
            return
        if k <= _SMALL_BATCH:
            # A few records (a quiet moment, the latency path): push() each is cheaper than the array work.
            if int(ends[-1]) != len(view):
                raise RecordFormatError(f"record ends do not cut {len(view)} bytes into records")
            cuts = ends.tolist()
            start = 0
            for stop in cuts:  # all checked first: a bad batch changes nothing
                size = stop - start
                if size < HEADER_SIZE or view[start + 2] | (view[start + 3] << 8) != size:
                    raise RecordFormatError(f"record ends do not cut {len(view)} bytes into records whose "
                                            "headers say their sizes", start)
                if size > self.max_bytes:
                    raise RecordFormatError(f"a {size}-byte record cannot fit a ring of max_bytes={self.max_bytes}")
                start = stop
            start = 0
            for stop in cuts:
                self.push(view[start:stop])
                start = stop
            return
        total = int(ends[-1])
        starts = np.empty(k, dtype=np.int64)
        starts[0] = 0
        starts[1:] = ends[:-1]
        sizes = ends - starts
        if total != len(view) or int(sizes.min()) < HEADER_SIZE:
            raise RecordFormatError(f"record ends do not cut {len(view)} bytes into records of at least "
                                    f"{HEADER_SIZE} bytes")
        raw = np.frombuffer(view, dtype=np.uint8)
        said = raw[starts + 2].astype(np.int64) | (raw[starts + 3].astype(np.int64) << 8)
        bad = np.flatnonzero(said != sizes)
        if len(bad):
            i = int(bad[0])
            raise RecordFormatError(f"record header says Size {int(said[i])} but the record is "
                                    f"{int(sizes[i])} bytes", int(starts[i]))
        cap, max_items = self.max_bytes, self.max_items
        if int(sizes.max()) > cap:
            raise RecordFormatError(f"a {int(sizes.max())}-byte record cannot fit a ring of max_bytes={cap}")
        # The newest part of the batch that fits both caps on its own: the rest is dropped at once.
        first = max(0, k - max_items)
        if total - int(starts[first]) > cap:
            first = int(np.searchsorted(starts, total - cap, side="left"))
        keep = k - first
        begin = int(starts[first])
        n = total - begin
        with self._lock:
            start = self._tail_pos
            end = start + n
            if first:
                # Even the batch's own older records did not fit: nothing held before them can stay, and the
                # batch's dropped records join the same mark, at the start of what it keeps.
                self._make_room_for(end, max_items)  # the head is now at ``start``
                self._dropped += first
                if self._marks and self._marks[0][0] <= start:
                    self._take_marks(start)
            elif self._count + keep > max_items or end - self._head_pos > cap:
                self._make_room_for(end, keep)
            at = start % cap
            if at + n <= cap:
                self._mem[at:at + n] = view[begin:total]
            else:
                part = cap - at
                self._mem[at:] = view[begin:begin + part]
                self._mem[:n - part] = view[begin + part:total]
            slot = self._tail_slot
            span = min(keep, max_items - slot)
            positions = ends[first:] + (start - begin)
            self._ends[slot:slot + span] = positions[:span]
            if span < keep:
                self._ends[:keep - span] = positions[span:]
            self._tail_slot = (slot + keep) % max_items
            self._count += keep
            self._tail_pos = end

    def _push_checked(self, data, ends, kinds: int = 0) -> None:
        """``push_batch`` for records whose headers were checked already (the bpf source's C walk checks every
        record's Size against its length): ``data`` the records back to back, ``ends`` the bytes of their ends
        as little-endian int64 (the last is ``len(data)``). One lock and one or two slice copies whatever the
        batch's size; the slot table is written in a short loop for a few records (the latency path) and with
        one array operation for more. ``kinds`` (what the batch holds) is for the stages before the ring."""
        k = len(ends) >> 3
        n = len(data)
        cap, max_items = self.max_bytes, self.max_items
        if not k or k > max_items or n > cap:
            if k or n:  # the batch alone exceeds a cap (or is empty but has bytes): the full checks
                self.push_batch(data, np.frombuffer(ends, dtype=np.int64))
            return
        cuts = _UNPACK_ENDS[k](ends) if k <= _FEW else np.frombuffer(ends, dtype=np.int64)
        if int(cuts[-1]) != n:
            self.push_batch(data, np.frombuffer(ends, dtype=np.int64))  # not what it says: the full checks
            return
        with self._lock:
            start = self._tail_pos
            end = start + n
            if self._count + k > max_items or end - self._head_pos > cap:
                self._make_room_for(end, k)
            at = start % cap
            if at + n <= cap:
                self._mem[at:at + n] = data
            else:
                part = cap - at
                view = memoryview(data)
                self._mem[at:] = view[:part]
                self._mem[:n - part] = view[part:]
            slot = self._tail_slot
            if k <= _FEW:
                endv = self._endv
                for stop in cuts:
                    endv[slot] = start + stop
                    slot += 1
                    if slot == max_items:
                        slot = 0
                self._tail_slot = slot
            else:
                if slot + k <= max_items:
                    np.add(cuts, start, out=self._ends[slot:slot + k])
                else:
                    span = max_items - slot
                    np.add(cuts[:span], start, out=self._ends[slot:])
                    np.add(cuts[span:], start, out=self._ends[:k - span])
                self._tail_slot = (slot + k) % max_items
            self._count += k
            self._tail_pos = end

    def _make_room(self, end: int) -> None:
        """Drop the oldest records until the one ending at stream position ``end`` fits (lock held). A loop:
        one push usually drops one record, and this is the cheapest way to drop one."""
        cap, max_items, ends = self.max_bytes, self.max_items, self._endv
        head, head_pos, count, dropped = self._head, self._head_pos, self._count, 0
        while count and (count == max_items or end - head_pos > cap):
            head_pos = ends[head]
            head = head + 1 if head + 1 < max_items else 0
            count -= 1
            dropped += 1
        self._head, self._head_pos, self._count = head, head_pos, count
        if dropped:
            self._dropped += dropped
            if self._marks and self._marks[0][0] <= head_pos:
                self._take_marks(head_pos)

    def _make_room_for(self, end: int, items: int) -> None:
        """``_make_room`` for a batch of ``items`` records ending at ``end``, which may drop thousands (a client
        that does not read): record ends ascend in stream order, so it is one binary search, not a loop."""
        cap, max_items, ends = self.max_bytes, self.max_items, self._endv
        head, head_pos, count = self._head, self._head_pos, self._count
        drop = max(0, count + items - max_items)
        need = end - cap  # the oldest record kept must start at or after this stream position
        if head_pos < need:
            hi = min(head + count, max_items)
            i = bisect_left(ends, need, head, hi)
            if i < hi:
                by_bytes = i - head + 1
            else:
                by_bytes = hi - head + bisect_left(ends, need, 0, head + count - max_items) + 1
            drop = max(drop, by_bytes)
        drop = min(drop, count)
        if drop:
            last = (head + drop - 1) % max_items
            self._head_pos = int(ends[last])
            self._head = (last + 1) % max_items
            self._count = count - drop
            self._dropped += drop
            if self._marks and self._marks[0][0] <= self._head_pos:
                self._take_marks(self._head_pos)

    def _take_marks(self, pos: int) -> None:
        """Records dropped from the front up to ``pos`` reached the marks at or before it (lock held): those
        losses sat among the dropped records and join the same RecordsLost record."""
        marks = self._marks
        while marks and marks[0][0] <= pos:
            _, count, time = marks.popleft()
            self._head_lost += count
            if time > self._head_time:
                self._head_time = time

    def _time_of(self, pos: int) -> int:
        """The Time field of the record held at stream position ``pos``."""
        cap = self.max_bytes
        at = (pos + 8) % cap
        if at + 8 <= cap:
            return int.from_bytes(self._mem[at:at + 8], "little", signed=True)
        return int.from_bytes(bytes(self._mem[at:]) + bytes(self._mem[:at + 8 - cap]), "little", signed=True)

    # -- readers ---------------------------------------------------------------------------------------

    def _readinto(self, buffer) -> int:
        """Copy as many whole records as fit into ``buffer``, oldest first, and return the byte count.

        The first record that does not fit stays for the next call. Losses are RecordsLost records where they
        happened (see the module's note), so one copy may hold several. Returns 0 when the ring is empty; raises ``BufferTooSmall`` (consuming nothing)
        when not even one record fits, and ``TypeError`` for a read-only buffer.
        """
        return self._copy_out(buffer, None)[0]

    def readinto_indexed(self, buffer, ends: np.ndarray) -> tuple[int, int, int]:
        """``readinto`` that also says where each record it copied ends, for passing the batch on whole
        (``push_batch``, the service) without walking the records again.

        ``ends`` is a writable int64 array with room for ``len(buffer) // 16 + 1`` entries; entry i gets the
        end offset of record i in ``buffer``. Returns (bytes, records, lost): ``lost`` is the count of the
        leading RecordsLost record (then record 0), or 0 when there is none. A copy stops just before any
        other loss, so a RecordsLost record only ever leads a batch and whoever passes batches on (``push_lost``
        then ``push_batch``) keeps every loss where it was.
        """
        if len(ends) < len(memoryview(buffer).cast("B")) // HEADER_SIZE + 1:
            raise ValueError(f"ends needs room for len(buffer) // {HEADER_SIZE} + 1 entries")
        return self._copy_out(buffer, ends)

    def _copy_out(self, buffer, index) -> tuple[int, int, int]:
        out = writable_bytes(buffer)
        room = len(out)
        with self._lock:
            pos = records = lost = 0
            count, max_items, cap = self._count, self.max_items, self.max_bytes
            head, head_pos = self._head, self._head_pos
            ends, marks = self._endv, self._marks
            at_head = self._dropped - self._drops_marked + self._head_lost
            if at_head:  # the drops' mark, at the head; Time 0: the Time of the record after it
                if marks and marks[0][0] <= head_pos:  # a source loss reported there since
                    marks[0][1] += at_head
                    marks[0][2] = max(marks[0][2], self._head_time)
                else:
                    marks.appendleft([head_pos, at_head, self._head_time])
                self._pending_lost += self._dropped - self._drops_marked
                self._drops_marked = self._dropped
                self._head_lost = self._head_time = 0
            while True:
                if marks and marks[0][0] <= head_pos:
                    mark = marks[0]
                    if room - pos < _LOST_SIZE or (index is not None and records):
                        break
                    n = min(mark[1], _MAX_LOST_COUNT)
                    when = mark[2] or (self._time_of(head_pos) if count else filetime_now())
                    out[pos:pos + _LOST_SIZE] = encode_records_lost(when, n)
                    pos += _LOST_SIZE
                    self._pending_lost -= n
                    if n == mark[1]:
                        marks.popleft()
                    else:
                        mark[1] -= n
                    if index is not None:
                        index[0] = _LOST_SIZE
                        records, lost = 1, n
                    continue
                if not count:
                    break
                limit = head_pos + room - pos
                if marks and marks[0][0] < limit:
                    limit = marks[0][0]  # the records before the next loss, then the loss
                hi = head + count if head + count <= max_items else max_items
                # Records head..j-1 all end within the limit: one binary search, no per-record loop.
                j = bisect_right(ends, limit, head, hi)
                if j == head:
                    break
                nbytes = ends[j - 1] - head_pos
                at = head_pos % cap
                if at + nbytes <= cap:
                    out[pos:pos + nbytes] = self._mem[at:at + nbytes]
                else:
                    first = cap - at
                    out[pos:pos + first] = self._mem[at:]
                    out[pos + first:pos + nbytes] = self._mem[:nbytes - first]
                if index is not None:
                    index[records:records + j - head] = self._ends[head:j] + (pos - head_pos)
                    records += j - head
                pos += nbytes
                head_pos += nbytes
                count -= j - head
                self._read += j - head
                head = j if j < max_items else 0
                if j < hi and not (marks and marks[0][0] <= head_pos):
                    break
            self._head, self._head_pos, self._count = head, head_pos, count
            if pos == 0 and (count or marks):
                needed = _LOST_SIZE if marks and marks[0][0] <= head_pos else ends[head] - head_pos
                raise BufferTooSmall(needed, room)
            return pos, records, lost

    # -- state -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Records waiting to be read (a pending RecordsLost report is not counted)."""
        return self._count

    @property
    def pending_lost(self) -> int:
        """Records lost or dropped that no reader has been told about yet."""
        return self._pending_lost + self._dropped - self._drops_marked

    def readable(self) -> bool:
        """True when ``readinto`` would return something (records, or a RecordsLost report)."""
        return bool(self._count or self._pending_lost)

    @property
    def stats(self) -> RingStats:
        with self._lock:
            return RingStats(pushed=self._read + self._dropped + self._count, read=self._read, dropped=self._dropped, lost=self._lost,
                             items=self._count, bytes=self._tail_pos - self._head_pos,
                             max_items=self.max_items, max_bytes=self.max_bytes)

    def __repr__(self) -> str:
        s = self.stats
        return (f"EventRing(items={s.items}/{s.max_items}, bytes={s.bytes}/{s.max_bytes}, "
                f"dropped={s.dropped}, lost={s.lost})")


#: The public names: in C where etwmon._speedups is built (etwmon/_ring.c: the common case, when nothing is
#: dropped to push and no loss waits to be read out; the methods above for the rest), else those methods.
EventRing.push_checked = _native.ring_push_checked_method or EventRing._push_checked  # type: ignore[assignment]
EventRing.readinto = _native.ring_readinto_method or EventRing._readinto  # type: ignore[assignment]
