"""Waiting on the BPF ring: who is woken, and how often.

With the kernel's pacer (etwmon.bpf.c) the programs write every record without waking anyone and wake the
reader once per ``batch_wait`` window, from the first record it has not seen. Two places wait for that
wake-up: the source's own thread, and a reader blocked in ``Monitor.wait()``, which then drains the ring
itself so that one thread, not two, is woken per batch (each wake-up of a sleeping thread is the largest
single cost of a delivery). The descriptors are watched edge-triggered: a ring that holds records is always
"readable", but only the pacer's wake-up should end a wait, or a reader would spin on every new record.
"""

from __future__ import annotations

import select
from typing import Callable

__all__ = ["RingWaiter", "ReaderWait"]

_EDGE = select.EPOLLIN | select.EPOLLET


class RingWaiter:
    """Sleeps until the kernel wakes the rings' readers (edge-triggered), or ``fd`` (level) is readable."""

    def __init__(self, rings: list[int], fd: int) -> None:
        self._ep = select.epoll()
        try:
            for ring in rings:
                self._ep.register(ring, _EDGE)
            self._ep.register(fd, select.EPOLLIN)
        except BaseException:
            self._ep.close()
            raise

    def sleep(self, timeout: float | None) -> bool:
        """True when woken, False when ``timeout`` (seconds; None: no limit) passed first."""
        return bool(self._ep.poll(-1 if timeout is None else max(timeout, 0.0)))

    def close(self) -> None:
        self._ep.close()


class ReaderWait:
    """What ``Monitor.wait()`` uses when the source offers it (``BpfSource.reader_wait``): take what the rings
    hold, or sleep until the kernel's next wake-up (or ``notify_fd``: the monitor's records-waiting flag, which
    the source thread and ``stop()`` raise) and take it then. While a reader waits here, the source's thread
    stays out of the way (see BpfSource._run)."""

    def __init__(self, rings: list[int], notify_fd: int, drain: Callable[[], int],
                 waiting: Callable[[int], None]) -> None:
        self._waiter = RingWaiter(rings, notify_fd)
        self._drain = drain
        self._waiting = waiting
        self.wakeups = 0

    def wait(self, timeout: float | None) -> int:
        """Records taken from the rings (0: none, woken by the flag, or ``timeout`` passed)."""
        self._waiting(1)
        try:
            n = self._drain()
            if n:
                return n
            if self._waiter.sleep(timeout):
                self.wakeups += 1
            return self._drain()
        finally:
            self._waiting(-1)

    def close(self) -> None:
        self._waiter.close()
