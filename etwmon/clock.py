"""Time for every source: the records' FILETIME from the clocks kernels stamp events with, and now.

A record's Time is a FILETIME (100 ns ticks since 1601-01-01 UTC). Kernels stamp events with other clocks: the
proc connector and ``bpf_ktime_get_ns`` with CLOCK_MONOTONIC, ``bpf_ktime_get_boot_ns`` and /proc start times
with CLOCK_BOOTTIME, audit with the wall clock. ``KernelClock`` converts one of them, with the offset to the wall
clock measured once from bracketed readings (the tightest of a few ``clock, wall, clock`` triples).
"""

from __future__ import annotations

import time

__all__ = ["FILETIME_UNIX_EPOCH", "filetime_now", "filetime_from_unix_ns", "clock_offset_ns", "KernelClock"]

#: FILETIME of 1970-01-01 00:00 UTC: 100 ns ticks since 1601-01-01.
FILETIME_UNIX_EPOCH = 116_444_736_000_000_000

CLOCK_MONOTONIC: int = time.CLOCK_MONOTONIC
#: CLOCK_BOOTTIME counts time suspended too; where there is none (not Linux), the monotonic clock stands in.
CLOCK_BOOTTIME: int = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
CLOCK_REALTIME: int = getattr(time, "CLOCK_REALTIME", 0)


def filetime_now() -> int:
    """Now as a FILETIME (what ``KeQuerySystemTimePrecise`` returns)."""
    return time.time_ns() // 100 + FILETIME_UNIX_EPOCH


def filetime_from_unix_ns(ns: int) -> int:
    """Nanoseconds since the Unix epoch (wall clock) to FILETIME."""
    return ns // 100 + FILETIME_UNIX_EPOCH


def clock_offset_ns(clock: int, reference: int = CLOCK_REALTIME, readings: int = 5) -> int:
    """``reference`` minus ``clock`` in nanoseconds: the reference clock read between two readings of
    ``clock``, taking the tightest bracket of ``readings`` tries (a thread preempted mid-reading gives a wide
    bracket and is not used). Wrong by at most half that bracket, typically well under a microsecond."""
    return _measure(clock, reference, readings)[0]


def _measure(clock: int, reference: int, readings: int) -> tuple[int, int]:
    """(offset, the width of the bracket it came from) in nanoseconds."""
    best_span, offset = -1, 0
    for _ in range(readings):
        before = time.clock_gettime_ns(clock)
        ref = time.clock_gettime_ns(reference)
        after = time.clock_gettime_ns(clock)
        if best_span < 0 or after - before < best_span:
            best_span, offset = after - before, ref - (before + after) // 2
    return offset, best_span


class KernelClock:
    """FILETIME of timestamps in nanoseconds of one kernel clock (default CLOCK_MONOTONIC, what the proc
    connector's ``ktime_get_ns()`` and eBPF's ``bpf_ktime_get_ns()`` return; CLOCK_BOOTTIME for
    ``bpf_ktime_get_boot_ns()``).

    The offset to the wall clock is measured when the clock is made (``offset_ns`` gives it instead, for
    tests) and kept: events of one source then never go backwards when the wall clock is stepped, at the price
    of drifting from it by what NTP slews meanwhile. ``resync()`` measures it again.
    """

    __slots__ = ("clock", "offset_ns", "error_ns")

    def __init__(self, clock: int = CLOCK_MONOTONIC, offset_ns: int | None = None) -> None:
        self.clock = clock
        #: How far ``offset_ns`` may be off, at most (half its bracket; 0 when given).
        self.error_ns = 0
        if offset_ns is None:
            self.resync()
        else:
            self.offset_ns = offset_ns

    def resync(self) -> None:
        offset, span = _measure(self.clock, CLOCK_REALTIME, 5)
        self.offset_ns, self.error_ns = offset, (span + 1) // 2

    def filetime(self, ns: int) -> int:
        """FILETIME of ``ns``, a reading of this clock."""
        return (ns + self.offset_ns) // 100 + FILETIME_UNIX_EPOCH

    def now_ns(self) -> int:
        """This clock now, in nanoseconds."""
        return time.clock_gettime_ns(self.clock)
