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

from ... import _native

__all__ = ["RingWaiter", "ReaderWait"]

_EDGE = select.EPOLLIN | select.EPOLLET


class RingWaiter:
    """Sleeps until the kernel wakes the readers of the ``paced`` rings (edge-triggered), or one of the ``adaptive``
    rings or ``fd`` is readable (level-triggered: a ring under the adaptive rule wakes nobody for a record written
    while its reader was behind); ``watch`` adds other descriptors to wake for (readable, an error, a hang-up)."""

    def __init__(self, paced: list[int], adaptive: list[int], fd: int) -> None:
        self._ep = select.epoll()
        self._own = set(paced) | set(adaptive) | {fd}
        self._others: set[int] = set()
        try:
            for ring in paced:
                self._ep.register(ring, _EDGE)
            for ring in adaptive:
                self._ep.register(ring, select.EPOLLIN)
            self._ep.register(fd, select.EPOLLIN)
        except BaseException:
            self._ep.close()
            raise

    def watch(self, fds) -> None:
        for fd in fds:
            if fd not in self._others:
                self._ep.register(fd, select.EPOLLIN)  # EPOLLERR and EPOLLHUP come anyway
                self._others.add(fd)

    def sleep(self, timeout: float | None) -> tuple[bool, bool]:
        """(woken by the rings or ``fd``, woken by a watched descriptor); both False when ``timeout`` (seconds;
        None: no limit) passed first."""
        ready = self._ep.poll(-1 if timeout is None else max(timeout, 0.0))
        own = others = False
        for fd, _ in ready:
            if fd in self._own:
                own = True
            else:
                others = True
        return own, others

    def close(self) -> None:
        self._ep.close()


class ReaderWait:
    """What ``Monitor.wait()`` uses when the source offers it (``BpfSource.reader_wait``): sleep until the
    kernel's next wake-up (or ``notify_fd``: the monitor's records-waiting flag, which the source thread and
    ``stop()`` raise) and take what the rings hold then. While a reader waits here, the source's thread
    stays out of the way (see BpfSource._run)."""

    def __init__(self, paced: list[int], adaptive: list[int], notify_fd: int, drain: Callable[[bool], int],
                 waiting: list, sleeping: Callable[[], None]) -> None:
        self._waiter = RingWaiter(paced, adaptive, notify_fd)
        self._poll, self._own = self._waiter._ep.poll, self._waiter._own
        self._drain = drain
        #: The source's list of the readers waiting now (one entry each while in wait(): a list's append and
        #: remove are atomic, no lock is needed).
        self._waiting = waiting
        self._sleeping = sleeping  # the source's deferred work, before this thread sleeps
        self.wakeups = 0
        #: How many waits have begun here (the source only looks whether it changed: a count two readers raise
        #: at once may miss one, never both).
        self.entries = 0
        #: Whether a pass from here raises the monitor's records-waiting flag: only needed while somebody may
        #: watch it (``Monitor.fileno()`` was asked for); the reader here sees the records without it.
        self.notify = True
        #: The BpfSource whose ``_reader_pass`` ``drain`` is, for the C wait to run its common case itself
        #: (etwmon/_reader.c); None: ``drain`` is called as it is.
        self._source = None

    def _wait(self, timeout: float | None, also=()) -> bool:
        """Sleep for the kernel's wake-up (or the flag, or ``timeout``), then take what the rings hold. ``also``:
        descriptors to wake for besides; True when one of them did (the caller looks). ``wait`` is this in C
        where etwmon._speedups is built (etwmon/_reader.c, step for step the same)."""
        if also:
            self._waiter.watch(also)
        waiting = self._waiting
        waiting.append(self)
        self.entries += 1
        try:
            self._sleeping()
            # No look before sleeping: records that came since the last pass have armed the pacer, which wakes
            # this thread within a window of the first of them (at once if that wake-up already came): a
            # reader that comes back often still takes one batch per window, not the few records of each visit.
            own = others = False
            for fd, _ in self._poll(-1 if timeout is None else max(timeout, 0.0)):  # RingWaiter.sleep, inline
                if fd in self._own:
                    own = True
                else:
                    others = True
            if own:
                self.wakeups += 1
            self._drain(self.notify)
            return others
        finally:
            waiting.remove(self)

    def close(self) -> None:
        self._waiter.close()


ReaderWait.wait = _native.reader_wait_method or ReaderWait._wait  # type: ignore[assignment]
