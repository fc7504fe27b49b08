"""Monitor: a kernel event source running on its own thread, feeding an EventRing that callers drain.

Readers block in ``wait()`` (or select on ``fileno()``, or ``async for``) instead of sleep-polling: the source
thread makes a socket pair readable after each burst of records, and the reader clears it once the ring is
empty. An exception in the source thread is kept and raised to the reader as ``SourceError``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Sequence, Union

from .errors import Error, SourceError
from .formats import human_bytes
from .identity import DEFAULT_MAX_BYTES, DEFAULT_MAX_PROCESSES, IdentityStage, ProcessInfo
from .records import Event, parse
from .ring import EventRing, RingStats
from .sources import Source, open_source

if TYPE_CHECKING:
    from .events import RecordBatch
    from .rules import RuleSet

__all__ = ["Monitor", "MonitorStats", "EventReader"]

log = logging.getLogger(__name__)

_STOP_TIMEOUT = 10.0


@dataclass(frozen=True)
class MonitorStats(RingStats):
    """Ring counters plus the source's: ``lost`` counts events the source missed (and said so),
    ``dropped`` records the full ring threw away; both reach readers as RecordsLost counts."""

    source: str = ""
    parse_errors: int = 0
    source_stats: dict[str, int] = field(default_factory=dict)
    #: The identity stage's counters (processes, known, bytes, max_bytes, evicted, evicted_live, unknown_parent,
    #: no_guid); {} when it is off.
    identity: dict[str, int] = field(default_factory=dict)
    #: The rules stage's counters (``etwmon.rules.RulesStage.stats``); empty without rules.
    rules: dict[str, Any] = field(default_factory=dict)
    #: The hashing stage's counters (``etwmon.hashes.HashStage.stats``); empty without hashes.
    hashes: dict[str, int] = field(default_factory=dict)


class _Sink:
    """What the source thread pushes into: the ring, plus the wake-up descriptor for readers."""

    def __init__(self, ring: EventRing, wakeup: "_Wakeup") -> None:
        self.push = ring.push
        self.push_batch = ring.push_batch  # records back to back and where each ends (the bpf source's batches)
        self.push_checked = ring.push_checked  # the same, their headers checked already (the bpf source's C walk)
        self.push_lost = ring.push_lost
        self.notify = wakeup.set


class ReadyFlag:
    """A descriptor select() sees readable exactly while the flag is up: one byte in a socket pair (which works
    on every OS), sent once when it goes up and taken back when it goes down."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self.up = False

    def fileno(self) -> int:
        return self._r.fileno()

    def put(self, up: bool) -> None:
        if up == self.up:
            return
        self.up = up
        try:
            if up:
                self._w.send(b"\1")
            else:
                self._r.recv(64)
        except OSError:  # BlockingIOError too
            pass

    def close(self) -> None:
        self._r.close()
        self._w.close()


class _Wakeup:
    """A level-triggered "records are waiting" flag for a ring's readers."""

    def __init__(self, ring: EventRing) -> None:
        self._ring = ring
        self._flag = self.flag = ReadyFlag()
        self._lock = threading.Lock()
        self.fileno = self._flag.fileno
        self.close = self._flag.close

    def set(self, force: bool = False) -> None:
        """Make the descriptor readable if records are waiting (a source's notify() after pushing nothing
        must not wake readers for nothing), or in any case with ``force`` (the end, an error)."""
        with self._lock:
            if not self._flag.up and (force or self._ring.readable()):
                self._flag.put(True)

    def clear_if_drained(self) -> None:
        if not self._flag.up:  # (only set() raises it, under the lock: a flag raised as this looks is seen next time)
            return
        # Under the lock a push either happened before readable() (seen) or its notify() comes after (sets).
        with self._lock:
            if self._flag.up and not self._ring.readable():
                self._flag.put(False)


class EventReader:
    """What every reader of records offers on top of ``readinto``/``wait``/``fileno``/``running``/``readable``:
    parsed events, blocking or ``async``. A Monitor and a service connection (``etwmon.connect``) are both
    one, so the same code reads either."""

    running: bool

    def readinto(self, buffer) -> int:
        raise NotImplementedError

    def wait(self, timeout: float | None = None) -> bool:
        raise NotImplementedError

    def fileno(self) -> int:
        raise NotImplementedError

    def readable(self) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _release(self) -> None:
        """What collecting an unclosed reader does: ``close()`` unless a reader says otherwise."""
        self.close()

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:
            pass

    def read_array(self, buffer: bytearray | memoryview | None = None) -> "RecordBatch":
        """One ``readinto`` as columns (``etwmon.records.parse_array``): the records waiting now, none when there
        are none. ``buffer`` (default: a new 64 KiB one) may be reused at once: the batch holds its own copy."""
        from .events import read_array

        return read_array(self, buffer)

    def events(self, timeout: float | None = None, bufsize: int = 0x10000) -> Iterator[Event]:
        """Parsed events as they come. Ends when the monitor stops, or when ``timeout`` seconds pass with
        nothing new (``timeout=None``: wait forever)."""
        buf = bytearray(bufsize)
        while True:
            n = self.readinto(buf)
            if n:
                yield from parse(bytes(buf[:n]))
                continue
            if not self.running:
                return
            if not self.wait(timeout) and timeout is not None:
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        """``async for event in monitor``: events as they come, without blocking the event loop."""
        import asyncio

        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        fd = self.fileno()
        try:
            loop.add_reader(fd, ready.set)
            has_reader = True
        except (NotImplementedError, AttributeError):  # e.g. the Proactor loop on Windows
            has_reader = False
        buf = bytearray(0x10000)
        try:
            while True:
                n = self.readinto(buf)
                if n:
                    for event in parse(bytes(buf[:n])):
                        yield event
                    continue
                if not self.running:
                    return
                if has_reader:
                    ready.clear()
                    if not self.readable():
                        await ready.wait()
                else:
                    await loop.run_in_executor(None, self.wait, 0.2)
        finally:
            if has_reader:
                loop.remove_reader(fd)


class Monitor(EventReader):
    """Watch processes and threads: ``Monitor(source="auto", max_items=10_000, max_bytes=None, **options)``.

    ``source`` is a name known to ``etwmon.sources.open_source`` or a ``Source`` object; extra keyword options
    go to the source. Use as a context manager or call ``start()``/``stop()`` (both idempotent). Records stay
    readable after ``stop()`` until drained.

    ``identity`` (default True) runs the identity stage on the source's thread, before the ring: every process
    and thread record gets its ProcessGuid, the parent's guid, and the details the source knows
    (``etwmon.identity``); ``max_processes`` and ``max_process_bytes`` bound its process table. A create or exec
    the kernel wrote whole (the bpf source) passes as it is, in its batch: no User (``event.user`` names the uid
    where it is shown), no ParentUser or ParentCommandLine (``ancestors()`` gives them). ``identity="full"``: the
    stage adds User and the parent's fields to every create and exec, record by record (self-contained records,
    more CPU per event); ``"lean"`` is True. ``identity=False`` gives the book's records and spares the cost
    (docs/identity.md).

    ``image_loads=True`` (bpf source): also an ImageLoad record per file mapped executable (shared libraries,
    dlopen, LD_PRELOAD); off by default, and off attaches nothing to mmap.

    ``rules``: an ``etwmon.rules.RuleSet`` or the path of a Sysmon XML configuration (read here, so a refused
    one raises ``RuleConfigError`` before anything starts). Rules run between the source and the ring.

    ``hashes``: ``"sha256"``, ``"md5,sha256"``, ``"*"`` — the executable's hashes in each process record, and
    the loaded file's in each image load (``etwmon.hashes``; default: the rules configuration's
    ``<HashAlgorithms>``, else none and no cost).
    """

    def __init__(self, source: str | Source = "auto", max_items: int = 10_000, max_bytes: int | None = None,
                 rules: Union["RuleSet", str, "os.PathLike[str]", None] = None, *, identity: bool | str = True,
                 max_processes: int = DEFAULT_MAX_PROCESSES, max_process_bytes: int = DEFAULT_MAX_BYTES,
                 hashes: str | None = None,
                 **source_options: Any) -> None:
        self._rules = _load_rules(rules)
        if hashes is None and self._rules is not None:
            hashes = getattr(self._rules.config, "hash_algorithms", None)
        self._hash_stage: Any = None
        if hashes:  # built here: an unknown algorithm raises ValueError before anything starts
            from .hashes import HashStage

            self._hash_stage = HashStage(hashes)
        self._rules_stage = None
        self.ring = EventRing(max_items=max_items, max_bytes=max_bytes)
        if isinstance(identity, str) and identity not in ("lean", "full"):
            raise ValueError(f"identity must be True, False, 'full' or 'lean', not {identity!r}")
        self._identity = bool(identity)
        self._lean = identity != "full"
        self._max_processes = max_processes
        self._max_process_bytes = max_process_bytes
        self._stage: IdentityStage | None = None
        self._source_spec = source
        self._source_options = source_options
        self._source: Source | None = source if isinstance(source, Source) else None
        self._thread: threading.Thread | None = None
        self._alive = False  # the source's thread runs (what ``running`` says, without a call per wait())
        self._wakeup: _Wakeup | None = None
        self._inline: Any = None  # the source's ReaderWait for this run, False when it has none (see wait())
        self._fileno_given = False  # whether fileno() was asked for (see _reader_wait)
        self._error: BaseException | None = None
        self._error_reported = False
        self._lifecycle = threading.Lock()

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> "Monitor":
        """Open the source (``SourceUnavailable`` is raised here, in the caller's thread) and start reading."""
        with self._lifecycle:
            if self._thread is not None:
                return self
            if isinstance(self._source_spec, Source):
                if self._source_options:
                    raise TypeError("source options go to the Source object itself, not to Monitor")
                self._source = self._source_spec
                self._source.details = self._identity
                self._source.open()
            else:
                self._source = open_source(self._source_spec, details=self._identity, **self._source_options)
            self._stage = None
            if self._identity:
                # Seeded after open(): a process that starts in between is both in the seed and in the events.
                self._stage = IdentityStage(None, self._source.host_and_boot_id(), self._max_processes,
                                            self._max_process_bytes, lean=self._lean)
                self._stage.seed(self._source.process_snapshot())
            self._error, self._error_reported = None, False
            if self._wakeup is None:
                self._wakeup = _Wakeup(self.ring)
            wakeup = self._wakeup
            self._inline = None
            self._alive = True
            self._thread = threading.Thread(target=self._run, args=(self._source, wakeup, self._sink(wakeup)),
                                            name=f"etwmon-{self._source.name}", daemon=True)
            self._thread.start()
            return self

    def _sink(self, wakeup: _Wakeup) -> Any:
        """What the source pushes into: the ring, behind the rules stage when there are rules, behind the
        identity stage when it is on."""
        sink: Any = _Sink(self.ring, wakeup)
        if self._rules is not None:
            from .rules import RulesStage

            sink = self._rules_stage = RulesStage(sink, self._rules)
        if self._hash_stage is not None:  # identity -> hashes -> rules: it reads identity's fields, rules its Hashes
            sink = self._hash_stage.attach(sink)
        if self._stage is not None:  # source -> identity -> rules -> ring: rules see the identity fields
            sink = self._stage.attach(sink)
        return sink

    def _run(self, source: Source, wakeup: _Wakeup, sink: Any) -> None:
        try:
            source.run(sink)
        except BaseException as exc:  # kept for the reader: never die silently
            log.error("etwmon source %r failed: %r", source.name, exc)
            self._error = exc
        finally:
            self._alive = False
            wakeup.set(force=True)  # wake readers so they see records, the error, or the end

    def stop(self) -> None:
        """Stop the source and release its thread and descriptors. Records already read in stay readable."""
        with self._lifecycle:
            thread, source, wakeup = self._thread, self._source, self._wakeup
            if thread is None:
                return
            source.stop()
            thread.join(_STOP_TIMEOUT)
            if thread.is_alive():
                log.error("etwmon source %r did not stop within %.0f s", source.name, _STOP_TIMEOUT)
            source.close()
            if self._hash_stage is not None:
                self._hash_stage.close()
            self._thread = None
            self._inline = None
            wakeup.set(force=True)  # wake anyone still waiting: running is over

    def set_rules(self, rules: Union["RuleSet", str, "os.PathLike[str]"]) -> None:
        """Use other rules from the next record on (a path is read first: a refused configuration raises
        ``RuleConfigError`` and the rules in force stay). For a reload on SIGHUP. A monitor started without
        rules gets them at its next start()."""
        new = _load_rules(rules)
        if new is None:
            raise TypeError("set_rules() needs a RuleSet or the path of a configuration")
        self._rules = new
        stage = self._rules_stage
        if stage is not None:
            stage.replace(new)

    @property
    def rules(self) -> "RuleSet | None":
        """The RuleSet in force (None: every record goes to the ring)."""
        return self._rules

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def source(self) -> Source | None:
        """The Source object in use (after start())."""
        return self._source

    def __enter__(self) -> "Monitor":
        return self.start()

    def close(self) -> None:
        """stop() and close the wake-up descriptors (``fileno()`` is invalid afterwards; records already
        read in stay readable)."""
        self.stop()
        with self._lifecycle:
            if self._wakeup is not None:
                self._wakeup.close()
                self._wakeup = None

    # -- reading ---------------------------------------------------------------------------------------

    def _check_error(self) -> None:
        err = self._error
        if err is not None and (not self._error_reported or not self.ring.readable()):
            self._error_reported = True
            raise SourceError(f"the {self._source.name if self._source else '?'} source failed: {err!r}") from err

    def readinto(self, buffer) -> int:
        """``EventRing.readinto`` on this monitor's ring (see there). Raises ``SourceError`` if the source
        thread failed: once at once, then again whenever the ring is empty."""
        if self._error is not None:
            self._check_error()
        n = self.ring.readinto(buffer)
        wakeup = self._wakeup
        if wakeup is not None and wakeup.flag.up:  # (what clear_if_drained looks at first, without its call)
            wakeup.clear_if_drained()
        return n

    def readinto_indexed(self, buffer, ends) -> tuple[int, int, int]:
        """``readinto`` that also gives each record's end (``EventRing.readinto_indexed``): the service
        passes batches on to its clients' queues with it."""
        self._check_error()
        result = self.ring.readinto_indexed(buffer, ends)
        wakeup = self._wakeup
        if wakeup is not None:
            wakeup.clear_if_drained()
        return result

    def wait(self, timeout: float | None = None, also: Sequence[int] = ()) -> bool:
        """Block until records (or a RecordsLost report) are waiting, or ``timeout`` seconds pass; True if
        there is something to read. Returns at once when stopped. ``also``: descriptors to return for too (when
        one is readable, or has an error or a hang-up: the caller looks at them), e.g. a signal wake-up pipe.

        With the bpf source and its kernel pacer (the default), the waiting thread is woken by the kernel once
        per ``batch_wait`` window (``set_batch_wait``) and takes the records from the kernel's ring itself. With
        other sources it returns for the first record pushed, so a reader that wakes for every burst pays a
        wake-up per burst; one that can wait a few milliseconds may sleep that long after ``wait()`` returns and
        read a bigger batch (``etwmon tail --batch-wait``)."""
        if self._error is not None:
            self._check_error()
        if self.ring.readable():
            return True
        wakeup = self._wakeup
        if wakeup is None or not self._alive:
            return False
        inline = self._inline or self._reader_wait(wakeup)
        deadline = None if timeout is None else time.monotonic() + timeout
        left = timeout
        while True:
            try:
                if inline is not None:  # woken by the kernel, this thread takes the records from the source
                    other = inline.wait(left, also)
                else:
                    ready = select.select([wakeup, *also], [], [], left)[0]
                    other = bool(also) and any(fd is not wakeup for fd in ready)
            except (ValueError, OSError):  # closed by a concurrent stop()
                return self.ring.readable()
            if self._error is not None:
                self._check_error()
            if self.ring.readable():
                return True
            if other or not self._alive:
                return False
            wakeup.clear_if_drained()  # woken with nothing to read (a reader on another thread took it)
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False

    def set_batch_wait(self, seconds: float) -> bool:
        """Let a batch gather for ``seconds`` after its first record before a reader in ``wait()`` is woken,
        where the source does that itself (the bpf source's kernel pacer, from its next window on): True then;
        False when it cannot, and a reader that wants batches pauses after ``wait()`` itself."""
        setter = getattr(self._source, "set_batch_wait", None)
        return bool(setter is not None and setter(seconds))

    def _reader_wait(self, wakeup: _Wakeup):
        """The source's ReaderWait (``BpfSource.reader_wait``) for this run, made at the first wait(); None
        when the source has none (every other source, and bpf without its kernel pacer)."""
        inline = self._inline
        if inline is None:
            make = getattr(self._source, "reader_wait", None)
            inline = self._inline = (make(wakeup.fileno()) if make is not None else None) or False
            if inline:
                inline.notify = self._fileno_given
        return inline or None

    def readable(self) -> bool:
        """True when ``readinto`` would return something now (records, or a RecordsLost report)."""
        return self.ring.readable()

    def fileno(self) -> int:
        """A descriptor that is readable while records are waiting (for select/selectors/event loops)."""
        wakeup = self._wakeup
        if wakeup is None:
            raise Error("the Monitor is not started: call start() or use it as a context manager first")
        self._fileno_given = True  # from now on a reader in wait() raises the flag for it too
        if self._inline:
            self._inline.notify = True
        return wakeup.fileno()


    # -- state -----------------------------------------------------------------------------------------

    def ancestors(self, guid: str) -> list[ProcessInfo]:
        """The parents of the process whose ProcessGuid is ``guid``, nearest first, up to the first one the
        process table does not know (``etwmon.identity.ProcessInfo`` each). Needs the identity stage. Command
        lines come redacted by the monitor's rules, as in the records."""
        if self._stage is None:
            raise Error("ancestors() needs the identity stage: Monitor(identity=True), started")
        chain = self._stage.ancestors(guid)
        rules = self._rules
        if rules is None or not rules.redacts:
            return chain
        # The table keeps what the source saw, before the rules: what a redaction hides in the records it
        # hides here too (on the whole command line, never on a cut one), with the rules in force.
        return [dataclasses.replace(info, command_line=rules.redact(info.command_line)[0])
                if info.command_line else info for info in chain]

    @property
    def lossy(self) -> bool:
        """True when the source in use can miss events without counting them (procfs polling)."""
        return self._source is not None and self._source.lossy

    def describe(self) -> str:
        """What this monitor watches, for a person: ``source: netlink, ring: 10000 records / 9.8 MiB``."""
        name = self._source.name if self._source else self._source_spec
        rules = f", rules: {self._rules.source}" if self._rules is not None else ""
        return (f"source: {name}, ring: {self.ring.max_items} records / {human_bytes(self.ring.max_bytes)}"
                f"{rules}")

    @property
    def stats(self) -> MonitorStats:
        ring = self.ring.stats
        extra = self._source.stats() if self._source is not None else {}
        stage = self._rules_stage
        return MonitorStats(**vars(ring), source=self._source.name if self._source else "",
                            parse_errors=int(extra.get("parse_errors", 0)), source_stats=dict(extra),
                            rules=stage.stats() if stage is not None else {},
                            identity=self._stage.stats() if self._stage is not None else {},
                            hashes=self._hash_stage.stats() if self._hash_stage is not None else {})

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        name = self._source.name if self._source else self._source_spec
        return f"<Monitor source={name!r} {state} {self.ring!r}>"


def _load_rules(rules: Any) -> "RuleSet | None":
    if rules is None:
        return None
    from .rules import RuleSet

    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, (str, os.PathLike)):
        return RuleSet.load(rules)
    raise TypeError(f"rules must be a RuleSet or the path of a configuration, not {type(rules).__name__}")
