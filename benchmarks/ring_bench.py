"""Ring benchmark: EventRing push and readinto against a naive port of the book's linked list and against
the copy ceiling (plain slice copies of the same volume), all in the same process on the same records."""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from common import progress, summary, target, timed as _timed
from etwmon.records import encode_process_create, encode_process_exit, filetime_now
from etwmon.ring import EventRing

KIB = 1024
MIB = 1024 * KIB
FULL_SIZES = [4 * KIB, 16 * KIB, 64 * KIB, 256 * KIB, MIB, 4 * MIB]
QUICK_SIZES = [4 * KIB, 64 * KIB, MIB, 4 * MIB]


class NaiveList:
    """The book's design ported as directly as Python allows: a list of records under a lock, a count cap that
    drops the oldest, and a read that copies one record at a time, putting back the first that doesn't fit."""

    def __init__(self, max_items: int) -> None:
        self._items: deque = deque()
        self._lock = threading.Lock()
        self.max_items = max_items
        self.dropped = 0

    def push(self, record: bytes) -> None:
        with self._lock:
            if len(self._items) >= self.max_items:
                self._items.popleft()
                self.dropped += 1
            self._items.append(record)

    def readinto(self, buffer) -> int:
        out = memoryview(buffer)
        room, pos = len(out), 0
        with self._lock:
            items = self._items
            while items:
                record = items.popleft()
                size = len(record)
                if pos + size > room:
                    items.appendleft(record)  # the book's InsertHeadList: it waits for the next read
                    break
                out[pos:pos + size] = record
                pos += size
        return pos


def make_records(count: int) -> list[bytes]:
    """ProcessCreate records with ~50-character command lines alternating with ProcessExit records."""
    now = filetime_now()
    records = []
    for i in range(count):
        pid = 10_000 + i
        if i % 2 == 0:
            command_line = f"/usr/bin/python3 -m worker --job {i:08d} --queue=batch-{i % 97:02d}"
            records.append(encode_process_create(now + i, pid, 1, 1, 1, command_line))
        else:
            records.append(encode_process_exit(now + i, pid - 1, 0))
    return records


def _push_all(push, records: list[bytes]) -> None:
    for record in records:
        push(record)


def _drain(readinto, buffer) -> int:
    total = 0
    while True:
        n = readinto(buffer)
        if not n:
            return total
        total += n


def _ceiling(source: memoryview, buffer, volume: int) -> int:
    """Slice copies of ``volume`` bytes, one buffer-full at a time: what readinto could at best approach."""
    out = memoryview(buffer)
    size = len(out)
    pos = 0
    while pos < volume:
        n = min(size, volume - pos)
        out[:n] = source[pos:pos + n]
        pos += n
    return pos


def run(quick: bool = False) -> dict:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    repeats = 3 if quick else 7
    volume_target = (8 if quick else 16) * MIB  # each drain moves this much: 4 buffer-fulls of 4 MiB
    distinct = make_records(4096)
    per_cycle = sum(len(r) for r in distinct)
    cycles = -(-volume_target // per_cycle)
    records = distinct * cycles
    volume = per_cycle * cycles
    count = len(records)
    # Caps above the volume, so every record pushed stays and the 4 MiB buffers are filled.
    max_items, max_bytes = count + 1024, volume + MIB
    progress(f"ring: {count:,} records, {volume / MIB:.1f} MiB per drain, buffers "
             f"{', '.join(_size_name(s) for s in sizes)}, {repeats} repeats")
    ring = EventRing(max_items=max_items, max_bytes=max_bytes)
    naive = NaiveList(max_items=max_items)
    source = memoryview(np.random.default_rng(1).integers(0, 256, volume, dtype=np.uint8))
    buffers = {size: bytearray(size) for size in sizes}
    # Touch every page once so first-use page faults do not land in anyone's timing.
    _push_all(ring.push, records)
    _drain(ring.readinto, buffers[sizes[-1]])

    full_ring = EventRing(max_items=1000)  # every push drops the oldest record: the path a storm takes
    push_rates, append_rates, push_ratios, full_rates = [], [], [], []
    rows = {size: {"ring": [], "naive": [], "ceiling": [], "vs_naive": [], "vs_ceiling": []} for size in sizes}
    for rep in range(repeats):
        progress(f"ring: repeat {rep + 1}/{repeats}")
        full_rates.append(count / _timed(lambda: _push_all(full_ring.push, records)))
        for size in sizes:
            buf = buffers[size]
            t_push = _timed(lambda: _push_all(ring.push, records))
            t_append = _timed(lambda: _push_all(naive.push, records))
            moved = {}
            t_ring = _timed(lambda: moved.__setitem__("ring", _drain(ring.readinto, buf)))
            t_naive = _timed(lambda: moved.__setitem__("naive", _drain(naive.readinto, buf)))
            t_ceiling = _timed(lambda: moved.__setitem__("ceiling", _ceiling(source, buf, volume)))
            if not moved["ring"] == moved["naive"] == moved["ceiling"] == volume:
                raise RuntimeError(f"ring benchmark moved different volumes: {moved} vs {volume}")
            if ring.stats.dropped or naive.dropped:
                raise RuntimeError("ring benchmark: a ring dropped records; its caps are too small")
            push_rates.append(count / t_push)
            append_rates.append(count / t_append)
            push_ratios.append(t_append / t_push)
            row = rows[size]
            row["ring"].append(volume / t_ring / 1e6)
            row["naive"].append(volume / t_naive / 1e6)
            row["ceiling"].append(volume / t_ceiling / 1e6)
            row["vs_naive"].append(t_naive / t_ring)
            row["vs_ceiling"].append(t_ceiling / t_ring)

    readinto = [{"buffer": size, "buffer_name": _size_name(size),
                 "ring_MBps": summary(r["ring"]), "naive_MBps": summary(r["naive"]),
                 "ceiling_MBps": summary(r["ceiling"]), "ring_vs_naive": summary(r["vs_naive"]),
                 "ring_vs_ceiling": summary(r["vs_ceiling"])} for size, r in rows.items()]
    push = {"ring_records_per_s": summary(push_rates), "deque_records_per_s": summary(append_rates),
            "ring_vs_deque": summary(push_ratios), "full_ring_records_per_s": summary(full_rates)}
    by_size = {row["buffer"]: row for row in readinto}

    def median(stat):
        return stat["median"] if stat else None

    targets = [
        target("ring", "readinto 64 KiB vs naive list", median(by_size.get(64 * KIB, {}).get("ring_vs_naive")),
               10.0, "x"),
        target("ring", "readinto 1 MiB vs copy ceiling", median(by_size.get(MIB, {}).get("ring_vs_ceiling")),
               0.5, "x"),
        target("ring", "push rate", median(push["ring_records_per_s"]), 1e6, "records/s"),
        target("ring", "push vs deque append", median(push["ring_vs_deque"]), 0.3, "x"),
    ]
    return {
        "status": "ok",
        "params": {"records": count, "volume_bytes": volume, "repeats": repeats,
                   "mean_record_bytes": round(volume / count, 1), "ring_max_items": max_items,
                   "ring_max_bytes": max_bytes, "record_mix": "ProcessCreate (~50-char command line) / "
                   "ProcessExit, alternating"},
        "push": push,
        "readinto": readinto,
        "targets": targets,
    }


def _size_name(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"
