"""The identity stage's backlog: batches of records the kernel wrote (creates, execs, exits), kept whole for the
process table until it is read, and folded into it with array operations when they outgrow their byte cap.

A batch that passes the stage whole (``IdentityStage.push_checked``) costs the table nothing then: its bytes are
kept. When somebody reads the table (``ancestors()``, ``process()``, ``stats``) the backlog is applied record by
record, in order, as if the table had been fed all along. When nobody does and the backlog outgrows its cap, its
oldest 1/32 is *folded*: a process that started and ended there, and is no living process's ancestor there,
would only have joined the table as an exited entry, to be evicted oldest first; folding drops it at once
(counted in the table's ``evicted``), in one pass of array operations over those records. What is left is applied
one by one: the processes that did not end there (and their ancestors), the exits of processes the table already
had, and anything the arrays cannot read (a record whose block does not start with the guid fields the programs
write).

Every ProcessGuid the programs write starts with the same 8 bytes (the host and boot tags, ``guid_prefix``), so a
process is keyed by the last 8 (its pid and start time): one uint64.
"""

from __future__ import annotations

import struct

import numpy as np

from . import _native

__all__ = ["concat", "fold_plan", "prepare"]

_KEY = np.arange(8)
_END = struct.Struct("<q")
_PREFIX = np.arange(8)


def prepare() -> None:
    """Import what the first fold would (np.unique imports numpy.ma on first use: 10-40 ms that would otherwise
    hold back the batch being read then); for a stage that will keep a backlog, when it starts."""
    import numpy.ma  # noqa: F401


def concat(entries) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The records of pending entries (``(bytes, WHOLE, ends bytes)`` batches, ``(record, None, None)`` single
    records, ``(array, starts, ends)`` noted runs) as one byte array and where each record starts and ends in
    it: one join of the bytes and one of the ends, each batch's ends moved by where it starts (np.repeat)."""
    blobs, ends, counts = [], [], []
    for raw, starts, stops in entries:
        if starts is None:
            blobs.append(bytes(raw))
            ends.append(_END.pack(len(raw)))
            counts.append(1)
        elif isinstance(starts, np.ndarray):
            for a, b in zip(starts.tolist(), stops.tolist()):
                blobs.append(bytes(raw[a:b]))
                ends.append(_END.pack(b - a))
                counts.append(1)
        else:  # a whole batch
            blobs.append(raw)
            ends.append(stops)
            counts.append(len(stops) >> 3)
    if not blobs:
        empty = np.zeros(0, dtype=np.int64)
        return np.zeros(0, dtype=np.uint8), empty, empty
    sizes = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    bases = np.cumsum(sizes) - sizes
    stop = np.frombuffer(b"".join(ends), dtype=np.int64) + np.repeat(bases, counts)
    start = np.empty_like(stop)
    start[0] = 0
    start[1:] = stop[:-1]
    return np.frombuffer(b"".join(blobs), dtype=np.uint8), start, stop


def _u16(raw: np.ndarray, at: np.ndarray) -> np.ndarray:
    return raw[at].astype(np.int64) | raw[at + 1].astype(np.int64) << 8


def _guid_at(raw: np.ndarray, at: np.ndarray, tag: int, prefix: np.ndarray, ok: np.ndarray):
    """(key, readable): the uint64 key of the guid field (Tag ``tag``, Length 16) at ``at`` where ``ok``."""
    n = len(at)
    key = np.zeros(n, dtype=np.uint64)
    good = ok.copy()
    idx = np.flatnonzero(good)
    if len(idx):
        at_ok = at[idx]
        good[idx] = (_u16(raw, at_ok) == tag) & (_u16(raw, at_ok + 2) == 16)
        good[idx] &= (raw[(at_ok + 4)[:, None] + _PREFIX] == prefix).all(axis=1)
        idx = np.flatnonzero(good)
        if len(idx):
            key[idx] = raw[(at[idx] + 12)[:, None] + _KEY].copy().view(np.uint64).ravel()
    return key, good


def index(raw: np.ndarray, starts: np.ndarray, ends: np.ndarray, prefix: bytes):
    """Per record: its kind (1 create, 101 exec, 2 exit, 0 other), its process's key, its parent's key (creates
    and execs; 0 when the record names no parent guid) and whether the arrays could read it."""
    n = len(starts)
    size = ends - starts
    wire = raw[starts + 1] == 0
    kind = np.where(wire, raw[starts], 0).astype(np.int64)
    kind[~np.isin(kind, (1, 2, 101))] = 0
    pre = np.frombuffer(prefix, dtype=np.uint8)
    creates = (kind == 1) | (kind == 101)
    exits = kind == 2
    # creates, execs: the block after the command line (40 + 2 x its length), its 8-byte header, then the guids
    chars = np.zeros(n, dtype=np.int64)
    ok_c = creates & (size >= 40)
    chars[ok_c] = _u16(raw, starts[ok_c] + 32)
    first = starts + 40 + 2 * chars + 8
    ok_c &= first + 40 <= ends
    key_c, good_c = _guid_at(raw, np.where(ok_c, first, 0), 1, pre, ok_c)
    parent, has_parent = _guid_at(raw, np.where(good_c, first + 20, 0), 2, pre, good_c)
    parent[~has_parent] = 0
    # exits: the block at 24, the guid field at 32
    ok_e = exits & (size >= 52)
    key_e, good_e = _guid_at(raw, np.where(ok_e, starts + 32, 0), 1, pre, ok_e)
    key = np.where(creates, key_c, key_e)
    readable = np.where(creates, good_c, np.where(exits, good_e, True))
    return kind, key, parent, readable


def fold_plan(old, prefix: bytes) -> tuple[list[int], np.ndarray, int]:
    """What folding ``old`` (``concat``'s triple, the backlog's oldest part) means: (the indices of its records
    still to be applied one by one, in order; the guids (rows of 16 bytes) of exits of processes it did not see
    start, for ``ProcessTable.note_exits``; how many processes are dropped). A process whose exit is not in
    ``old`` (it lives on, or ends in the part that stays) is kept, with its ancestors there. In C where
    etwmon._speedups is built (etwmon/_backlog.c: one pass and a few hash sets, the same result)."""
    fast = _native.fold_plan
    if fast is not None:
        raw, starts, ends = old
        apply, rows, dropped = fast(raw, np.ascontiguousarray(starts, dtype=np.int64),
                                    np.ascontiguousarray(ends, dtype=np.int64), prefix)
        return apply, np.frombuffer(rows, dtype=np.uint8).reshape(-1, 16), dropped
    return _fold_plan(old, prefix)


def _fold_plan(old, prefix: bytes) -> tuple[list[int], np.ndarray, int]:
    """``fold_plan`` in Python (array operations)."""
    raw, starts, ends = old
    kind, key, parent, readable = index(raw, starts, ends, prefix)
    creates = ((kind == 1) | (kind == 101)) & readable
    exits = (kind == 2) & readable
    started = np.unique(key[creates])
    # Keep every process that has not ended here, and the ancestors of those here (a daemon's chain).
    keep = np.setdiff1d(started, key[exits])
    parent_of = dict(zip(key[creates].tolist(), parent[creates].tolist()))  # the last record's parent wins
    frontier = keep
    while len(frontier):
        parents = np.array([parent_of.get(k, 0) for k in frontier.tolist()], dtype=np.uint64)
        parents = np.unique(parents[np.isin(parents, started) & ~np.isin(parents, keep)])
        keep = np.union1d(keep, parents)
        frontier = parents
    kept = np.isin(key, keep)
    apply = (creates & kept) | (exits & kept) | ~readable  # what the arrays cannot read goes one by one
    before = exits & ~np.isin(key, started)  # ended here, started before: the table has it (or had)
    at = starts[before] + 36
    rows = raw[at[:, None] + np.arange(16)] if len(at) else np.zeros((0, 16), dtype=np.uint8)
    return np.flatnonzero(apply).tolist(), rows, int(len(started) - len(keep))
