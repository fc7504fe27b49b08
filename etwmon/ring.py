"""EventRing: the bounded list of variable-length records that stands in for the driver's linked list.

Records live back to back in a preallocated numpy ``uint8`` arena used as a circular byte stream (a record may
wrap around its end); a numpy int64 slot table holds each record's end position in that stream. Both are fixed
by the caps, so memory does not grow with the event rate. ``readinto`` finds how many whole records fit with
one binary search over the slot table and moves them with one or two slice copies, not a loop per record.
"""

from __future__ import annotations

import operator
import threading
from bisect import bisect_right
from dataclasses import dataclass

import numpy as np

from .errors import BufferTooSmall, RecordFormatError
from .records import HEADER_SIZE, encode_records_lost, filetime_now

__all__ = ["EventRing", "RingStats", "DEFAULT_BYTES_PER_ITEM"]

#: With ``max_bytes=None`` the byte cap is ``max_items`` times this (a ProcessCreate with a 100-character
#: command line is 240 bytes), but never less than one largest record.
DEFAULT_BYTES_PER_ITEM = 1024
_LOST_SIZE = 24
_MAX_LOST_COUNT = 0xFFFFFFFF


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
        self._pending_lost = 0  # lost + dropped not yet reported in-band

    # -- producer --------------------------------------------------------------------------------------

    def push(self, record) -> None:
        """Append one encoded record (its header's Size must equal its length).

        A full ring (either cap) first drops its oldest records, counted in ``stats.dropped`` and reported to
        the next reader as a RecordsLost record. Raises ``RecordFormatError`` (and changes nothing) on a record
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
        """Record that a source missed ``count`` records: counted in ``stats.lost`` and reported to the next
        reader in the same RecordsLost record as the ring's own drops. ``count`` is a whole number >= 0
        (``TypeError``/``ValueError`` otherwise, and nothing changes)."""
        if type(count) is not int:
            count = _whole_count(count)
        if count < 0:
            raise ValueError(f"push_lost() takes a count of records >= 0, not {count}")
        if count:
            with self._lock:
                self._lost += count
                self._pending_lost += count

    def _reject(self, record) -> None:
        if len(record) < HEADER_SIZE:
            raise RecordFormatError(f"a record needs at least {HEADER_SIZE} bytes, got {len(record)}")
        size = record[2] | (record[3] << 8)
        raise RecordFormatError(f"record header says Size {size} but the record is {len(record)} bytes")

    def _make_room(self, end: int) -> None:
        """Drop the oldest records until the one ending at stream position ``end`` fits (lock held)."""
        cap, max_items, ends = self.max_bytes, self.max_items, self._endv
        head, head_pos, count, dropped = self._head, self._head_pos, self._count, 0
        while count and (count == max_items or end - head_pos > cap):
            head_pos = ends[head]
            head = head + 1 if head + 1 < max_items else 0
            count -= 1
            dropped += 1
        self._head, self._head_pos, self._count = head, head_pos, count
        self._dropped += dropped
        self._pending_lost += dropped

    # -- readers ---------------------------------------------------------------------------------------

    def readinto(self, buffer) -> int:
        """Copy as many whole records as fit into ``buffer``, oldest first, and return the byte count.

        The first record that does not fit stays for the next call. After losses the copy starts with one
        RecordsLost record. Returns 0 when the ring is empty; raises ``BufferTooSmall`` (consuming nothing)
        when not even one record fits, and ``TypeError`` for a read-only buffer.
        """
        out = memoryview(buffer)
        if out.readonly:
            raise TypeError("readinto() needs a writable buffer (bytearray, memoryview, numpy array), "
                            f"not read-only {type(buffer).__name__}")
        if out.ndim != 1 or out.format != "B":
            out = out.cast("B")
        room = len(out)
        with self._lock:
            pos = 0
            if self._pending_lost:
                if room < _LOST_SIZE:
                    raise BufferTooSmall(_LOST_SIZE, room)
                part = min(self._pending_lost, _MAX_LOST_COUNT)
                out[:_LOST_SIZE] = encode_records_lost(filetime_now(), part)
                self._pending_lost -= part
                pos = _LOST_SIZE
            count, max_items, cap = self._count, self.max_items, self.max_bytes
            head, head_pos = self._head, self._head_pos
            ends = self._endv
            while count:
                hi = head + count if head + count <= max_items else max_items
                # Records head..j-1 all end within the room left: one binary search, no per-record loop.
                j = bisect_right(ends, head_pos + room - pos, head, hi)
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
                pos += nbytes
                head_pos += nbytes
                count -= j - head
                self._read += j - head
                head = j if j < max_items else 0
                if j < hi:
                    break
            self._head, self._head_pos, self._count = head, head_pos, count
            if pos == 0 and count:
                raise BufferTooSmall(ends[head] - head_pos, room)
            return pos

    # -- state -----------------------------------------------------------------------------------------

    def __len__(self) -> int:
        """Records waiting to be read (a pending RecordsLost report is not counted)."""
        return self._count

    @property
    def pending_lost(self) -> int:
        """Records lost or dropped that no reader has been told about yet."""
        return self._pending_lost

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
