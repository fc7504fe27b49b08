"""The ``etwmon tail`` loop: drain a ``Reader``, keep the events a filter passes, write each as one whole line,
report stats and a summary on stderr.

A ``Monitor`` is a Reader; a service connection (``tail --connect``) or a fleet consumer (``tail --from``) is
another object with the same few methods, so every way of tailing shares this one loop. Stop signals (SIGINT,
SIGTERM, SIGHUP) only count themselves and wake the loop through a descriptor (``signal.set_wakeup_fd``): the
loop stops where it chooses, so output ends on a line boundary, also when stdout is a full pipe nobody reads.
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, TextIO

from .batch_format import format_batch_typed
from .formats import human_bytes
from .records import Event, ItemType, parse

if TYPE_CHECKING:
    from .monitor import MonitorStats

__all__ = ["Reader", "TailOptions", "tail", "say", "silence_stdout", "missed_text", "lost_text", "PROG",
           "READ_SIZE", "STOP_WRITE_WAIT"]

PROG = "etwmon"
READ_SIZE = 0x10000  # the book's client buffer: any record fits
#: After a stop signal, how long stdout may take nothing before the rest is given up (and counted as not written).
STOP_WRITE_WAIT = 1.0
# A write of at most PIPE_BUF bytes to a pipe is atomic: it goes in whole or not at all, so whole lines up to this
# size never reach a reader in part. Longer lines go in pieces of this size, each after poll() says there is room.
_PIPE_BUF = getattr(select, "PIPE_BUF", 512)
_FILE_CHUNK = 0x10000  # a regular file never blocks: bigger writes, fewer calls
_sleep = time.sleep  # (tests replace it)
_LOST = int(ItemType.RecordsLost)


# The words for loss, one per meaning, everywhere tail speaks (docs/cli.md defines them): "missed" = events the
# source could not capture (kernel buffer overruns, sequence gaps: ``stats.lost``); "dropped" = records etwmon had
# and discarded because a ring or a client's queue was full (``stats.dropped``); "lost" = both, what a
# ``WARNING: N records lost here`` line reports where it happened.


def missed_text(stats: Any) -> str:
    """How many events the source missed, and whether that is all of them: a source that could not read its
    kernel's loss counters (``loss_unknown`` in its stats, e.g. an ETW session that did not answer) says so."""
    if (getattr(stats, "source_stats", None) or {}).get("loss_unknown"):
        return f"at least {stats.lost} missed (the source could not read all of its loss counters)"
    return f"{stats.lost} missed"


lost_text = missed_text  # the name it had


class Reader(Protocol):
    """What ``tail`` drains: a ``Monitor`` (local source), and later a service connection or a fleet consumer.

    ``readinto`` keeps the ring's contract (whole records, a RecordsLost record after losses); ``stats`` has at
    least ``read``, ``lost``, ``dropped``, ``items``, ``pushed``, ``bytes``, ``max_items``, ``max_bytes``,
    ``parse_errors`` and ``source`` (a ``MonitorStats``)."""

    def start(self) -> object:
        """Begin delivering; raises ``etwmon.Error`` (e.g. ``SourceUnavailable``) when it cannot."""

    def stop(self) -> None:
        """Stop delivering; what was delivered stays readable."""

    def close(self) -> None:
        """``stop()`` and release everything; idempotent."""

    def wait(self, timeout: float | None = None) -> bool:
        """Block until something is readable or ``timeout`` passes; True if something is."""

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Whole records into ``buffer``; 0 when there is nothing."""

    def readable(self) -> bool:
        """True when ``readinto`` would return something now."""

    def fileno(self) -> int:
        """A descriptor that is readable while records are waiting (for poll)."""

    @property
    def running(self) -> bool:
        """False once delivery has ended (stopped, or the source ended)."""

    @property
    def lossy(self) -> bool:
        """True when events can be missed without being counted (polling)."""

    @property
    def stats(self) -> "MonitorStats":
        """The counters the summary and the stats lines report."""

    def describe(self) -> str:
        """What is watched, for the "watching (...)" line, e.g. ``source: netlink, ring: 10000 records / 9.8 MiB``."""


@dataclass(frozen=True)
class TailOptions:
    """How ``tail`` shows events: ``render`` one event as one line (``etwmon.formats.RENDERERS``), ``keep``
    the ones to show (``etwmon.filters.EventFilter``), ``batch_wait`` seconds to let a batch gather after its
    first record, ``stats_interval`` seconds between stats lines (None: none). ``batch_form`` ("text" or
    "json"), when set, formats whole batches from the buffer (``etwmon.formats.format_batch``: the same lines
    as ``render``, without an Event per record), keeping the record types in ``batch_types`` (None: all); it
    replaces ``render`` and ``keep``, so it is for filters on types only."""

    render: Callable[[Event], str]
    keep: Callable[[Event], bool] = lambda event: True
    batch_wait: float = 0.0
    stats_interval: float | None = None
    batch_form: str | None = None
    batch_types: frozenset[int] | None = None


def say(err: TextIO, message: str) -> None:
    """One ``etwmon: ...`` line on stderr; a stderr that is gone is not an error."""
    try:
        err.write(f"{PROG}: {message}\n")
        err.flush()
    except (OSError, ValueError):
        pass


def silence_stdout() -> None:
    """The reader went away: point stdout at /dev/null so the interpreter's final flush has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _fd_of(stream: TextIO) -> int | None:
    try:
        stream.flush()
        return stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP ask ``tail`` to stop: the handler only counts them, and the loop stops at a
    point it chooses (the source then releases what it set up in the kernel, e.g. audit rules). A second signal
    means do not wait for stdout: what it does not take at once is given up (and counted). A signal the caller
    set to be ignored (``nohup``, a background job) stays ignored. Handlers are restored by ``restore()``."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self) -> None:
        self.count = 0
        self._saved: list[tuple[int, object]] = []
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._saved_wakeup_fd = -1

    @property
    def requested(self) -> bool:
        return self.count > 0

    @property
    def forced(self) -> bool:
        return self.count > 1

    def _handler(self, signum: int, frame: object) -> None:
        self.count += 1

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # Python runs signal handlers in the main thread only; a caller on another thread keeps its own
        for name in self.NAMES:
            number = getattr(signal, name, None)
            if number is None:
                continue
            previous = signal.getsignal(number)
            if previous is signal.SIG_IGN:
                continue
            signal.signal(number, self._handler)
            self._saved.append((number, signal.SIG_DFL if previous is None else previous))
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        self._saved_wakeup_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        self._wake = (r, w)

    def fileno(self) -> int | None:
        """Readable after a signal came (until ``clear()``); None when not installed."""
        return None if self._wake is None else self._wake[0].fileno()

    def clear(self) -> None:
        if self._wake is not None:
            try:
                while self._wake[0].recv(512):
                    pass
            except OSError:
                pass

    def restore(self) -> None:
        for number, previous in self._saved:
            signal.signal(number, previous)
        self._saved.clear()
        if self._wake is not None:
            signal.set_wakeup_fd(self._saved_wakeup_fd)
            for sock in self._wake:
                sock.close()
            self._wake = None


class _Waiter:
    """Block until the reader has records, a timeout passes, a stop signal comes, or stdout's reader is gone.

    ``poll`` sees POLLERR on a pipe whose reader closed, so ``etwmon tail | head -n 1`` ends as soon as head
    exits, even when no further event comes to fail a write. Without ``poll`` (Windows): ``Reader.wait`` in
    short slices, so a stop signal is seen within 0.2 s.
    """

    def __init__(self, reader: Reader, out_fd: int | None, signals: StopSignals, batch_wait: float) -> None:
        self._reader = reader
        self._signals = signals
        self._batch_wait = batch_wait
        self._poll = select.poll() if hasattr(select, "poll") else None
        self._out_fd = -1
        # A reader that gathers batches itself (a Monitor on the bpf source's kernel pacer: its set_batch_wait)
        # is waited on directly: its thread is woken once per batch, with no pause after it here, and the
        # signals' pipe and stdout wake it too (``wait(also=...)``).
        setter = getattr(reader, "set_batch_wait", None)
        self._paced = bool(setter is not None and setter(batch_wait) and self._poll is not None)
        self._also: list[int] = []
        if self._poll is None:
            return
        if not self._paced:
            self._poll.register(reader.fileno(), select.POLLIN)
        if signals.fileno() is not None:
            self._poll.register(signals.fileno(), select.POLLIN)
            self._also.append(signals.fileno())
        try:
            if out_fd is not None and stat.S_ISFIFO(os.fstat(out_fd).st_mode):
                self._poll.register(out_fd, 0)  # POLLERR/POLLHUP are always reported
                self._out_fd = out_fd
                self._also.append(out_fd)
        except OSError:
            pass

    def wait(self, timeout: float | None) -> None:
        if self._paced:
            if not self._reader.wait(timeout, also=self._also):  # type: ignore[call-arg]
                self._look(0)  # a signal, stdout gone, or the timeout
            return
        if self._poll is None:
            self._reader.wait(0.2 if timeout is None else min(timeout, 0.2))
        else:
            self._look(None if timeout is None else max(0, math.ceil(timeout * 1000)))
        if self._batch_wait and not self._signals.requested and self._reader.readable():
            # Records are there: give the ones right behind them a moment to join the batch. One wake-up per
            # batch instead of per event halves the CPU in a storm; the source keeps reading the kernel meanwhile.
            _sleep(self._batch_wait)

    def _look(self, ms: int | None) -> None:
        for fd, flags in self._poll.poll(ms):  # type: ignore[union-attr]
            if fd == self._out_fd and flags & (select.POLLERR | select.POLLHUP):
                raise BrokenPipeError("the reader of stdout went away")
            if fd == self._signals.fileno():
                self._signals.clear()


class _LineWriter:
    """Writes lines to stdout so that each reaches the reader whole or not at all.

    A batch of lines is encoded once and kept as one run of bytes with the end of each line. It goes out with
    ``os.write`` in chunks of whole lines, at most PIPE_BUF bytes each, each after poll() says stdout has room:
    such a write to a pipe is atomic, so a stop signal (or a reader that stopped reading) always finds the output
    on a line boundary. A line longer than PIPE_BUF goes in pieces and, once begun, is finished (only a second
    stop signal with stdout blocked cuts it). After a stop signal, a stdout that takes nothing for
    ``STOP_WRITE_WAIT`` seconds is given up: the lines left are counted, not half-written. Without a descriptor
    (a StringIO, Windows): one ``stream.write`` and one flush per batch.
    """

    def __init__(self, out: TextIO, signals: StopSignals) -> None:
        self.shown = 0  # events written whole
        self.unwritten_reason = ""
        self._out = out
        self._signals = signals
        self._encoding = getattr(out, "encoding", None) or "utf-8"
        self._errors = getattr(out, "errors", None) or "strict"
        # Pending output: its bytes (or, for a stream, its text), where each line ends in them and whether it is
        # an event; _first is the first line not written whole, _done how much of the output is written.
        self._data: bytearray | list[str] = []
        self._ends: list[int] = []
        self._events: list[bool] = []
        self._first = 0
        self._done = 0
        self._poll = None
        self.fd = _fd_of(out) if hasattr(select, "poll") else None
        self._chunk = _PIPE_BUF
        if self.fd is not None:
            self._data = bytearray()
            self._poll = select.poll()
            self._poll.register(self.fd, select.POLLOUT)
            if signals.fileno() is not None:
                self._poll.register(signals.fileno(), select.POLLIN)
            try:
                if stat.S_ISREG(os.fstat(self.fd).st_mode):
                    self._chunk = _FILE_CHUNK
            except OSError:
                pass

    @property
    def unwritten(self) -> int:
        """Events taken from the reader that were not written (stdout blocked after a stop signal, or closed)."""
        return sum(self._events[self._first:])

    def add(self, events: list[Event], render: Callable[[Event], str]) -> None:
        self.add_lines([render(event) + "\n" for event in events], [int(event.type) for event in events])

    def add_lines(self, lines: list[str], kinds: list[int]) -> None:
        """Lines with their newlines, and the record type of each (a RecordsLost report is not an event)."""
        if not lines:
            return
        if self.fd is None:
            sizes: Any = map(len, lines)
            self._data.extend(lines)  # type: ignore[arg-type]
        else:
            text = "".join(lines)
            data = text.encode(self._encoding, self._errors)
            if len(data) == len(text):  # ASCII (JSON always is) in an encoding that keeps it: a byte a character
                sizes = map(len, lines)
            else:
                encoded = [line.encode(self._encoding, self._errors) for line in lines]
                data = b"".join(encoded)
                sizes = map(len, encoded)
            self._data += data  # type: ignore[operator]
        running = itertools.accumulate(sizes, initial=self._ends[-1] if self._ends else self._done)
        next(running)  # (where it starts)
        self._ends.extend(running)
        self._events.extend([kind != _LOST for kind in kinds])

    def flush(self, stopping: bool = False) -> bool:
        """Write what is pending; True when all of it is out. Returns False early, on a line boundary: when a
        stop signal came (``stopping`` False), or when a second one came or stdout took nothing for
        ``STOP_WRITE_WAIT`` seconds (``stopping`` True: the final drain)."""
        if self.fd is None:
            return self._flush_stream(stopping)
        ends, signals, chunk = self._ends, self._signals, self._chunk
        while self._first < len(ends):
            done = self._done
            line_end = ends[self._first]
            at_boundary = self._first == 0 or done == ends[self._first - 1]
            if at_boundary and signals.requested and not stopping:
                return False
            if not self._writable(stopping, at_boundary):
                return False
            if not at_boundary or line_end - done >= chunk:
                size = min(chunk, line_end - done)  # a long line: the next piece of it
            else:  # as many whole lines as fit
                size = ends[bisect.bisect_right(ends, done + chunk, self._first) - 1] - done
            start = done - self._base
            try:
                self._advance(os.write(self.fd, self._data[start:start + size]))
            except BrokenPipeError:
                self.unwritten_reason = "stdout closed"
                raise
        return True

    @property
    def _base(self) -> int:
        """Where the pending bytes begin in the output."""
        return self._ends[-1] - len(self._data) if self._ends else self._done

    def _writable(self, stopping: bool, at_boundary: bool) -> bool:
        """Wait until stdout can take a chunk (True), or say why not (False). Running, a stop signal ends the
        wait on a line boundary. Stopping, a stdout that takes nothing for STOP_WRITE_WAIT seconds is given up
        on a line boundary (half a line is always finished); after a second signal, only what it takes at once
        is written."""
        signals = self._signals
        while True:
            if signals.forced:
                wait_ms: float | None = 0
            else:
                wait_ms = STOP_WRITE_WAIT * 1000 if stopping else None
            ready = self._poll.poll(wait_ms)
            for fd, _ in ready:
                if fd == self.fd:
                    return True  # POLLOUT, or POLLERR/POLLHUP: the write then says what happened
            if ready:  # a signal
                signals.clear()
                if at_boundary and not stopping:
                    return False
                continue
            if at_boundary or signals.forced:
                self.unwritten_reason = "stdout blocked"
                return False

    def _advance(self, n: int) -> None:
        """``n`` more bytes are written: count the lines now whole, and let go of what all of them held."""
        self._done += n
        ends, events, first = self._ends, self._events, self._first
        while first < len(ends) and ends[first] <= self._done:
            self.shown += events[first]
            first += 1
        self._first = first
        if first == len(ends):
            self._data.clear()
            ends.clear()
            events.clear()
            self._first = 0

    def _flush_stream(self, stopping: bool) -> bool:
        if not self._ends or (self._signals.requested and not stopping):
            return not self._ends
        try:
            self._out.write("".join(self._data))  # type: ignore[arg-type]
            self._out.flush()
        except BrokenPipeError:
            self.unwritten_reason = "stdout closed"
            raise
        self._advance(self._ends[-1] - self._done)
        return True


def tail(reader: Reader, options: TailOptions, out: TextIO, err: TextIO) -> int:
    """Start ``reader`` and show its events on ``out`` until a stop signal, the end of the source, or a closed
    stdout; then a summary line on ``err``. Returns the exit status (0); errors of the reader propagate."""
    signals = StopSignals()
    signals.install()
    try:
        return _Tail(reader, options, out, err, signals).run()
    finally:
        signals.restore()


class _Tail:
    def __init__(self, reader: Reader, options: TailOptions, out: TextIO, err: TextIO,
                 signals: StopSignals) -> None:
        self.reader, self.options, self.err, self.signals = reader, options, err, signals
        self.writer = _LineWriter(out, signals)
        self._buf = bytearray(READ_SIZE)
        self._view = memoryview(self._buf)

    def run(self) -> int:
        reader = self.reader
        try:
            self._start()
            ended = self._follow()
        except BrokenPipeError:
            silence_stdout()
            ended = "stdout closed"
        except BaseException:
            reader.close()
            raise
        reader.close()
        self._summary(ended)
        return 0

    def _start(self) -> None:
        reader, err = self.reader, self.err
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reader.start()
        for warning in caught:
            say(err, f"warning: {warning.message}")
        if reader.lossy and not any(f"{reader.stats.source} source" in str(w.message) for w in caught):
            say(err, f"warning: the {reader.stats.source} source polls and can miss short-lived processes "
                     "without counting them")
        # Last of the start-up lines: from here on every event is seen (scripts may wait for it).
        say(err, f"watching ({reader.describe()}); Ctrl-C to stop")

    def _take(self) -> int:
        """Read one batch and hand the kept events to the writer; the byte count read."""
        n = self.reader.readinto(self._buf)
        if n and self.options.batch_form is not None:
            lines, kinds = format_batch_typed(self._view[:n], self.options.batch_form, self.options.batch_types)
            if lines:
                self.writer.add_lines(lines, kinds)
        elif n:
            keep = self.options.keep
            events = [event for event in parse(self._view[:n]) if keep(event)]
            if events:
                self.writer.add(events, self.options.render)
        return n

    def _follow(self) -> str:
        """Show batches until a stop signal or the end of the source; how it ended, for the summary."""
        reader, signals, writer = self.reader, self.signals, self.writer
        waiter = _Waiter(reader, writer.fd, signals, self.options.batch_wait)
        interval = self.options.stats_interval
        next_stats = time.monotonic() + interval if interval else None
        last = (time.monotonic(), 0)
        while not signals.requested:
            n = self._take()
            if n and not writer.flush():
                break  # a stop signal, between two lines
            if next_stats is not None and time.monotonic() >= next_stats:
                last = self._print_stats(last)
                next_stats = time.monotonic() + interval
            if n > READ_SIZE // 2:
                continue  # the buffer was about full: more is waiting, read on
            if not reader.running:
                if n or reader.readable():  # pushed just before it ended
                    continue
                return "the source stopped"
            # A part batch (or none): wait for the next, and let the records behind it gather (batch_wait), rather
            # than read again at once the few that came while this one was written: one wake-up per batch.
            waiter.wait(None if next_stats is None else max(0.0, next_stats - time.monotonic()))
        # Stop the source, then show what it had captured up to then: the summary's counts cover all of it.
        reader.stop()
        while writer.flush(stopping=True) and self._take():
            pass
        return "stopped"

    def _print_stats(self, last: tuple[float, int]) -> tuple[float, int]:
        now = time.monotonic()
        stats = self.reader.stats
        then, pushed_then = last
        rate = (stats.pushed - pushed_then) / max(now - then, 1e-9)
        fill = max(stats.items / stats.max_items, stats.bytes / stats.max_bytes) * 100
        parse_errors = f", {stats.parse_errors} parse errors" if stats.parse_errors else ""
        say(self.err, f"stats: {stats.pushed} records ({rate:.1f}/s), ring {stats.items}/{stats.max_items} records "
                      f"{human_bytes(stats.bytes)} ({fill:.0f}% full), {missed_text(stats)}, {stats.dropped} dropped, "
                      f"{self.writer.shown} shown{parse_errors}")
        return now, stats.pushed

    def _summary(self, ended: str) -> None:
        stats, writer = self.reader.stats, self.writer
        unread = f", {stats.items} unread" if stats.items else ""
        unwritten = writer.unwritten
        not_written = f", {unwritten} not written ({writer.unwritten_reason})" if unwritten else ""
        judged = getattr(stats, "rules", None)
        by_rules = (f"; rules kept {judged['kept']} of {judged['evaluated']} process events ({judged['undecided']} "
                    f"undecided), dropped {judged['followers_dropped']} thread events with their process"
                    if judged else "")
        say(self.err, f"{ended}: {stats.read} records, {writer.shown} shown, {missed_text(stats)}, "
                      f"{stats.dropped} dropped{unread}{not_written}{by_rules}")
