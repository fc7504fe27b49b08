"""etwmon.clock: kernel clock readings to FILETIME, with offsets from bracketed readings."""

from __future__ import annotations

import time

import pytest

from etwmon import clock, records
from etwmon.clock import CLOCK_BOOTTIME, CLOCK_MONOTONIC, KernelClock, clock_offset_ns, filetime_from_unix_ns


def test_filetime_from_unix_ns_is_exact():
    assert filetime_from_unix_ns(0) == clock.FILETIME_UNIX_EPOCH
    assert filetime_from_unix_ns(1_700_000_000_123_456_789) == 17_000_000_001_234_567 + clock.FILETIME_UNIX_EPOCH
    # records re-exports the same functions (its wire format speaks of them)
    assert records.filetime_from_unix_ns is filetime_from_unix_ns and records.filetime_now is clock.filetime_now
    assert records.FILETIME_UNIX_EPOCH == clock.FILETIME_UNIX_EPOCH


def test_a_kernel_clock_with_a_given_offset_converts_exactly():
    kc = KernelClock(CLOCK_MONOTONIC, offset_ns=1_000_000_000_000_000_000)
    assert kc.filetime(0) == 10_000_000_000_000_000 + clock.FILETIME_UNIX_EPOCH
    assert kc.filetime(12_345) == kc.filetime(0) + 123  # 100 ns ticks, cut down
    assert kc.filetime(12_399) == kc.filetime(0) + 123


def _bracketed(clock_id: int) -> tuple[int, int, int]:
    """(clock before, wall, clock after)."""
    before = time.clock_gettime_ns(clock_id)
    wall = time.time_ns()
    after = time.clock_gettime_ns(clock_id)
    return before, wall, after


@pytest.mark.parametrize("clock_id", [CLOCK_MONOTONIC, CLOCK_BOOTTIME], ids=["monotonic", "boottime"])
def test_the_offset_lies_within_a_bracket_read_around_it(clock_id):
    b1, w1, a1 = _bracketed(clock_id)
    offset = clock_offset_ns(clock_id)
    b2, w2, a2 = _bracketed(clock_id)
    # wall - clock at each bracket lies in [w - after, w - before]; the offset measured between them must too
    # (the two clocks run at the same rate: NTP slews both, by far less than these brackets in a few µs).
    low = min(w1 - a1, w2 - a2)
    high = max(w1 - b1, w2 - b2)
    assert low <= offset <= high


def test_a_timestamp_taken_now_converts_to_between_two_wall_readings():
    for clock_id in (CLOCK_MONOTONIC, CLOCK_BOOTTIME):
        kc = KernelClock(clock_id)
        before = clock.filetime_now()
        stamp = kc.now_ns()
        after = clock.filetime_now()
        slack = kc.error_ns // 100 + 1  # the offset is exact to within half its bracket; FILETIME cuts to 100 ns
        assert before - slack <= kc.filetime(stamp) <= after + slack


def test_resync_measures_again():
    kc = KernelClock(CLOCK_MONOTONIC, offset_ns=0)
    assert kc.error_ns == 0
    kc.resync()
    b, w, a = _bracketed(CLOCK_MONOTONIC)
    assert w - a - kc.error_ns <= kc.offset_ns <= w - b + kc.error_ns  # the real offset, not 0 any more
