"""Wire records the kernel wrote itself (thread records and process exits, see etwmon_event.h), moved from the BPF
ring to the sink in batches: one gather of their bytes out of the ring's pages, the times checked and raised
together, and one ``push_batch``, with no Python per record beyond the ring walk that found them."""

from __future__ import annotations

import numpy as np

from ._event import EventDecoder

from ..._native import drain as fast_drain  # a whole pass in one call, or None (etwmon/_speedups.c)
from ..._native import walk as fast_walk  # the ring walk in C, or None (etwmon/_speedups.c)

__all__ = ["WireMover", "SMALL_BATCH", "fast_drain", "fast_walk"]

#: Up to this many records a batch is pushed record by record (the latency path: cheaper than the array work).
SMALL_BATCH = 64
_I64 = np.dtype("<i8")
_EIGHT = np.arange(8)


class WireMover:
    """Pushes runs of wire records found in the ring into a sink, keeping the decoder's clock: a record whose
    Time is earlier than the one before it (two CPUs stamp a little out of ring order) is raised to it and
    counted in the decoder's ``time_raised``, as the decoder does for the events it writes."""

    def __init__(self, decoder: EventDecoder) -> None:
        self.decoder = decoder
        self.records = 0

    def push(self, sink, data, ats: list[int], sizes: list[int]) -> None:
        """The records at ring offsets ``ats`` (``sizes`` bytes each, in ring order) of ``data``."""
        n = len(ats)
        self.records += n
        self.decoder.events += n
        batch = getattr(sink, "push_batch", None)
        if n <= SMALL_BATCH or batch is None:
            self._one_by_one(getattr(sink, "push_written", sink.push), data, ats, sizes)
            return
        lo = ats[0]
        hi = ats[-1] + sizes[-1]
        region = np.frombuffer(data, dtype=np.uint8, count=hi - lo, offset=lo)
        starts = np.asarray(ats, dtype=np.int64) - lo
        size = np.asarray(sizes, dtype=np.int64)
        # Keep each record's bytes, drop the 8-byte ring headers and the padding between them: +1 where a
        # record starts, -1 where it ends (never where the next starts: a header lies between), summed.
        marks = np.zeros(hi - lo + 1, dtype=np.int8)
        marks[starts] = 1
        marks[starts + size] = -1
        out = region[np.cumsum(marks[:-1], dtype=np.int8).view(np.bool_)]
        ends = np.cumsum(size)
        at = (ends - size + 8)[:, None] + _EIGHT  # the 8 bytes of each Time
        times = out[at].view(_I64).ravel()
        floor = self.decoder.last_filetime
        raised = np.maximum.accumulate(np.maximum(times, floor))
        changed = raised != times
        if changed.any():
            out[at[changed]] = raised[changed].view(np.uint8).reshape(-1, 8)
            self.decoder.time_raised += int(np.count_nonzero(changed))
        self.decoder.last_filetime = int(raised[-1])
        batch(out, ends)

    def _one_by_one(self, push, data, ats: list[int], sizes: list[int]) -> None:
        decoder = self.decoder
        for at, size in zip(ats, sizes):
            record = bytes(data[at:at + size])
            time = int.from_bytes(record[8:16], "little", signed=True)
            if time < decoder.last_filetime:
                decoder.time_raised += 1
                record = record[:8] + decoder.last_filetime.to_bytes(8, "little", signed=True) + record[16:]
            else:
                decoder.last_filetime = time
            push(record)
