"""Linux eBPF source: every process fork, thread create, exec and exit recorded in the kernel as it happens, with
the exact argv, from a committed CO-RE BPF object (etwmon.bpf.c) loaded through ctypes on libbpf.so.1.

The programs run on the tp_btf tracepoints sched_process_fork/exec/exit and write one event each into a BPF
ring buffer, which this module reads through its mmap'ed pages. Events the ring had no room for are counted
in the kernel per CPU and reach readers as RecordsLost, like the Monitor's own ring drops.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import sys
import threading
import time
from pathlib import Path
from typing import Callable, ClassVar

from ...clock import CLOCK_BOOTTIME, KernelClock
from ...errors import SourceUnavailable
from .._linux import WakePipe, has_capability, require_available
from ..base import Sink, Source
from .._proc import host_and_boot_id, snapshot
from ...identity import guid_prefix
from ...records import FILETIME_UNIX_EPOCH
from ._details import task_enricher
from ._libbpf import wait_for_rcu_grace_period
from ._event import (
    CONFIG, CONFIG_CREATES, CONFIG_IDENTITY, CONFIG_WIRE, EVENT_SIZE, KIND_BASE, Enricher, EventDecoder, TaskDetails,
)
from ._wait import ReaderWait, RingWaiter
from ._wire import WireMover, fast_drain, fast_walk

__all__ = ["BpfSource", "TaskDetails", "OBJECT_PATH", "BTF_PATH"]

log = logging.getLogger(__name__)

#: The committed, reproducibly built object (build.sh next to it rebuilds it).
OBJECT_PATH = Path(__file__).with_name("etwmon.bpf.o")
#: The same programs without the wake-up pacer (a BPF timer), for a kernel that refuses a timer in them.
NOPACE_OBJECT_PATH = Path(__file__).with_name("etwmon_nopace.bpf.o")
BTF_PATH = "/sys/kernel/btf/vmlinux"
_PROGRAMS = ["etwmon_exit", "etwmon_exec", "etwmon_fork"]  # exits first: a task seen born is seen dying
#: The exit program that takes the tracepoint's group_dead, where sched_process_exit passes it (see exit_program).
_EXIT_GROUP_DEAD = "etwmon_exit_group_dead"
_LOCKDOWN = "/sys/kernel/security/lockdown"
#: Linux 5.17: bpf_loop (the path walks); ring buffers, bpf_ktime_get_boot_ns and CAP_BPF are 5.8, tp_btf 5.5.
MIN_KERNEL = (5, 17)
_CAP_SYS_ADMIN, _CAP_PERFMON, _CAP_BPF = 21, 38, 39
#: At stop, after the programs are detached: the pause when the kernel cannot wait for them (see _settle), and
#: how long a record may stay reserved before it is skipped and counted as lost.
_SETTLE_PAUSE = 0.01
_WIRE_MIN = 24  # the smallest wire record (ThreadCreate without a block)
_KIND_HIGH = KIND_BASE >> 8  # the high byte of the first 16 bits: 0 for a wire Type, >= 1 for an event kind
_BUSY_WAIT = 0.1
#: With the pacer: how long the source's thread sleeps while a reader waits on the ring itself (it then drains
#: what a reader that stopped reading left), and at most between wake-ups otherwise (none is missed: a timeout
#: only bounds the damage of a kernel that could not deliver the pacer's wake-up).
_READER_BACKSTOP_MS = 250
_IDLE_BACKSTOP = 1.0
#: How often a run reads the kernel's loss counter (a system call; the last pass always reads it).
_LOST_CHECK = 0.05
#: struct pacer's size (a bpf_timer, two u64, two u32): writing zeros over it cancels the timer; its `late` count
#: is at _PACER_LATE.
_PACER_SIZE = 40
_PACER_LATE = 24
_FIX = "use `--source netlink` (or source='netlink')"


def _kernel_version(release: str | None = None) -> tuple[int, int]:
    parts = (release or os.uname().release).split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)


def choose_exit_program(libbpf) -> str:
    """The exit program for this kernel: the one that takes sched_process_exit's ``group_dead`` (true for
    exactly one thread of a process) where the tracepoint passes it, per the kernel's BTF; otherwise the one
    that reads ``signal->live``, which two threads ending in one exit_group can both see at 0."""
    from ._libbpf import tracepoint_arguments

    return _EXIT_GROUP_DEAD if (tracepoint_arguments(libbpf, "sched_process_exit") or 0) >= 2 else "etwmon_exit"


class BpfSource(Source):
    """Process and thread events from eBPF programs on the scheduler's tracepoints (Linux 5.17+, root).

    Options: ``ring_size`` (bytes of the BPF ring buffer, a power of two of pages; default 8 MiB),
    ``batch_wait`` (seconds the reader waits after a wake-up so that one wake-up serves a batch; default
    0.001), ``enrich`` (``enrich(record, details) -> record``: called with each record and the kernel's
    ``TaskDetails`` for it, e.g. to add an extension block; default None, which costs nothing; given, every
    event comes as TaskDetails and the kernel writes no record itself), ``kernel_creates`` (default True: the
    programs write ProcessCreate and ProcessExec records themselves, see docs/linux.md; False: user space writes
    them from the events, as it did before), ``image_loads`` (also an ImageLoad record per file mapped
    executable, from programs on mmap's syscall tracepoints; default False, which attaches nothing there).

    Nothing outlives the process: the programs, their links and the maps are file descriptors of it, so
    ``stale_state()`` has nothing to report even after a SIGKILL (the kernel frees them when it exits).
    """

    name: ClassVar[str] = "bpf"
    lossy: ClassVar[bool] = False
    delivers: ClassVar[frozenset[str]] = frozenset({
        "process_create", "process_exit", "process_exec", "thread_create", "thread_exit", "command_line",
        "exit_code", "exact_loss_count", "image", "current_directory", "uid", "user", "tty", "process_snapshot",
        "cgroup",
        "image_load",  # image loads: with image_loads=True (imageload.py)
    })

    def __init__(self, *, ring_size: int = 8 << 20, batch_wait: float = 0.001,
                 enrich: Enricher | None = None, kernel_creates: bool = True, image_loads: bool = False,
                 kernel_pacing: bool = True) -> None:
        super().__init__()
        page = mmap.PAGESIZE
        if (isinstance(ring_size, bool) or not isinstance(ring_size, int) or ring_size < page
                or ring_size & (ring_size - 1)):
            raise ValueError(f"ring_size must be a power of two of at least {page} bytes, not {ring_size!r}")
        if isinstance(batch_wait, bool) or not isinstance(batch_wait, (int, float)) or not 0 <= batch_wait <= 1:
            raise ValueError(f"batch_wait must be 0..1 seconds, not {batch_wait!r}")
        if enrich is not None and not callable(enrich):
            raise TypeError("enrich must be callable or None")
        self.ring_size = ring_size
        self.batch_wait = float(batch_wait)
        self.enrich = enrich
        #: Whether the programs write process creates and execs in the wire format too (the default; False: they
        #: come as events and are written here, per record, as before).
        self.kernel_creates = bool(kernel_creates)
        self.image_loads = bool(image_loads)  # image loads: opt-in, see imageload.py
        #: Whether to load the programs with the kernel's wake-up pacer (when the kernel accepts it; False: the
        #: object without it, woken by the ring's adaptive rule, with the ``batch_wait`` pause in this thread).
        self.kernel_pacing = bool(kernel_pacing)
        self._pacer = False  # whether the programs loaded are the ones with the pacer
        self._settings = b""  # the config map's entry, as written at open (see set_batch_wait)
        self._wake_late_seen = 0
        self._drain_lock = threading.Lock()  # one pass at a time: this thread's or a waiting reader's
        self._sink: Sink | None = None
        self._idle: Callable[[], None] | None = None  # the sink's work for before a sleep (_sleeping)
        self._waiting: list[ReaderWait] = []  # readers in ReaderWait.wait() now, drained for by themselves
        self._quick: tuple | None = None  # for a run whose sink takes C passes: (push_checked, seeded_lookup)
        self._reader_waits: list[ReaderWait] = []
        self._closed_reader_wakeups = 0
        self._images = None  # image loads: an ImageLoadReader once opened (kept after close, for stats)
        self._object = None
        self._ring = None
        self._lost = None
        self._decoder: EventDecoder | None = None
        self._wake = WakePipe()
        self._stopping = False
        self._lost_reported = 0
        self._kernel_lost = 0  # the kernel's loss count as last read, and when to read it next
        self._lost_due = 0.0
        self.wakeups = 0
        self._mover: WireMover | None = None
        #: Whether the programs write thread records and exits in the wire format (set by open(): not when a
        #: custom ``enrich`` wants every event as TaskDetails).
        self.wire = False
        #: The exit program in use (``choose_exit_program``), set by open().
        self.exit_program: str | None = None
        #: Ring records this reader could not use (shorter than an event, or still reserved when the programs
        #: were gone): counted in ``lost`` with the kernel's own count.
        self.skipped = 0
        self._state = threading.Lock()  # run() vs close() from another thread
        self._running = False
        self._close_pending = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not sys.platform.startswith("linux"):
            return "needs Linux (eBPF)"
        if not (has_capability(_CAP_SYS_ADMIN) or (has_capability(_CAP_BPF) and has_capability(_CAP_PERFMON))):
            return f"needs root (or CAP_BPF and CAP_PERFMON) to load eBPF programs: run as root or {_FIX}"
        if _kernel_version() < MIN_KERNEL:
            return (f"the kernel is too old ({os.uname().release}; the eBPF programs need Linux "
                    f"{MIN_KERNEL[0]}.{MIN_KERNEL[1]} or later): {_FIX}")
        if not os.path.exists(BTF_PATH):
            return f"the kernel has no BTF ({BTF_PATH} is missing; it needs CONFIG_DEBUG_INFO_BTF=y): {_FIX}"
        try:
            with open(_LOCKDOWN) as f:
                if "[confidentiality]" in f.read():
                    return (f"kernel lockdown (confidentiality) forbids eBPF programs from reading kernel memory: "
                            f"{_FIX}")
        except OSError:
            pass
        try:
            from ._libbpf import load_libbpf
            load_libbpf()
        except OSError as exc:
            return f"libbpf.so.1 cannot be loaded ({exc}): install libbpf1 (apt-get install libbpf1) or {_FIX}"
        from ._libbpf import memory_ordering_reason
        ordering = memory_ordering_reason()
        if ordering is not None:
            return f"{ordering}: install libatomic1 or {_FIX}"
        if not OBJECT_PATH.is_file():
            return f"the BPF object {OBJECT_PATH} is missing from this installation: reinstall etwmon or {_FIX}"
        return None

    # -- life cycle ------------------------------------------------------------------------------------

    def open(self) -> None:
        if self._object is not None:
            return
        require_available(self)
        from ._libbpf import LoadedObject, PerCpuCounter, RingBuffer, load_libbpf
        libbpf = load_libbpf()
        cpus = libbpf.libbpf_num_possible_cpus()
        exit_program = self.exit_program = choose_exit_program(libbpf)
        other = _EXIT_GROUP_DEAD if exit_program == "etwmon_exit" else "etwmon_exit"
        # bpf_ktime_get_boot_ns() is CLOCK_BOOTTIME: its offset to the wall clock is measured now, once, and
        # given to the programs too, which write thread records and exits in the wire format themselves (unless
        # a custom enricher wants to see every event).
        boot_clock = KernelClock(CLOCK_BOOTTIME)
        self.wire = self.enrich is None
        flags = ((CONFIG_WIRE | (CONFIG_CREATES if self.kernel_creates else 0) if self.wire else 0)
                 | (CONFIG_IDENTITY if self.details else 0))
        wake_us = round(self.batch_wait * 1e6)
        settings = CONFIG.pack(boot_clock.offset_ns + 100 * FILETIME_UNIX_EPOCH,
                               guid_prefix(self.host_and_boot_id()), flags, wake_us)
        paths = [OBJECT_PATH, NOPACE_OBJECT_PATH] if self.kernel_pacing else [NOPACE_OBJECT_PATH]
        for path in paths:
            try:
                obj = LoadedObject(libbpf, str(path), [exit_program] + _PROGRAMS[1:],
                                   {"scratch": max(cpus, 1), "events": self.ring_size}, skip=(other,),
                                   settings={"config": settings})
                break
            except OSError as exc:
                if path is not paths[-1]:  # the pacer refused (a timer in these programs): do without it
                    log.info("etwmon bpf: the kernel refused the wake-up pacer (%s); the ring's adaptive wake-ups "
                             "are used, with a %.0f ms pause in the reader", exc, 1000 * self.batch_wait)
                    continue
                raise SourceUnavailable(f"cannot load the eBPF programs ({exc}): {_FIX}") from exc
        self._pacer = path == OBJECT_PATH
        self._settings = settings
        try:
            self._ring = RingBuffer(obj.map_fd("events"), self.ring_size)
            self._lost = PerCpuCounter(libbpf, obj.map_fd("lost"))
            self._wake.open()
        except BaseException:
            if self._ring is not None:
                self._ring.close()
                self._ring = None
            obj.close()
            raise
        self._object = obj
        self._lost_reported = self._kernel_lost = 0
        self._lost_due = 0.0
        self.skipped = 0
        self._stopping = False
        enrich = self.enrich
        if enrich is None and self.details:  # the identity stage is on: the kernel's facts go in the records
            enrich = task_enricher(boot_clock)
        self._decoder = EventDecoder(self._no_sink, boot_clock, enrich)
        self._decoder.kernel_creates = bool(self.wire and self.kernel_creates)
        self._mover = WireMover(self._decoder)
        if self.image_loads:  # image loads: their own object and ring, sharing this clock (times and guids)
            from .imageload import ImageLoadReader
            self._images = ImageLoadReader(boot_clock=boot_clock)
            try:
                self._images.open()
            except BaseException:
                self.close()
                raise

    @property
    def pacing(self) -> str | None:
        """How wake-ups are paced once open: "kernel" (the pacer: one per ``batch_wait`` window, and a reader in
        ``Monitor.wait()`` drains the ring itself), "reader" (the programs without the pacer: this thread pauses
        ``batch_wait`` after each wake-up), "none" (``batch_wait`` 0: every wake-up is drained at once)."""
        if self._object is None:
            return None
        if not self.batch_wait:
            return "none"
        return "kernel" if self._pacer else "reader"

    def set_batch_wait(self, seconds: float) -> bool:
        """Change ``batch_wait``; with the pacer loaded, the kernel uses it from its next window on (the settings
        map is rewritten) and True is returned. False: no pacer, and only this thread's pause changes."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= 1:
            raise ValueError(f"batch_wait must be 0..1 seconds, not {seconds!r}")
        self.batch_wait = float(seconds)
        obj = self._object
        if obj is None or not self._pacer:
            return False
        base, prefix, flags, _ = CONFIG.unpack(self._settings)
        obj.write_entry("config", CONFIG.pack(base, prefix, flags, round(self.batch_wait * 1e6)))
        return True

    def _wake_late(self) -> int:
        """Wake-ups the programs forced because the pacer's timer was late (its expiry waited in softirq)."""
        obj = self._object
        if obj is not None and self._pacer:
            try:
                self._wake_late_seen = int.from_bytes(obj.read_entry("pacer", _PACER_SIZE)[_PACER_LATE:_PACER_LATE + 8],
                                                      "little")
            except OSError:
                pass
        return self._wake_late_seen

    def host_and_boot_id(self) -> bytes:
        return host_and_boot_id()

    def process_snapshot(self) -> list:
        return snapshot()

    @staticmethod
    def _no_sink(_: bytes) -> None:
        raise RuntimeError("BpfSource: run() attaches the sink")

    def run(self, sink: Sink) -> None:
        with self._state:
            ring, decoder = self._ring, self._decoder
            if ring is None or decoder is None:
                raise SourceUnavailable("BpfSource.run() before open()")
            self._running = True
        try:
            self._run(sink, ring, decoder)
        finally:
            with self._state:
                self._running = False
                release = self._close_pending
            if release:  # close() came while this thread still read the ring: it is this thread's to free
                self._release()

    def _run(self, sink: Sink, ring, decoder: EventDecoder) -> None:
        decoder.push = sink.push
        self._sink = sink
        checked = getattr(sink, "push_checked", None)
        self._quick = ((checked, getattr(sink, "seeded_lookup", None))
                       if checked is not None and fast_drain is not None else None)
        self._idle = getattr(sink, "idle", None)  # the identity stage's deferred work (see _sleeping)
        if self._idle is not None:
            sink.defer_folds = True  # type: ignore[attr-defined]
            for wait in self._reader_waits:  # made before this run began: called directly from now on
                wait._sleeping = self._idle
        if self._pacer:
            self._run_paced(sink, ring)
        else:
            self._run_adaptive(sink, ring)
        # Detach first, then take what is left: every event the programs wrote is read or counted as lost
        # (a source that has run is opened again before it runs again).
        self._object.detach()  # type: ignore[union-attr]
        if self._images is not None:  # image loads
            self._images.detach()
        if self._pacer:  # a wake-up still pending would come after the last pass: cancel it
            self._wake_late()  # (its count, before it is gone)
            self._object.write_entry("pacer", bytes(_PACER_SIZE))  # type: ignore[union-attr]
        self._settle()
        with self._drain_lock:
            self._final_drain(sink)

    def _rings(self, ring) -> tuple[list[int], list[int]]:
        """The rings to wait on: (paced by the kernel: edge-triggered, those with the ring's adaptive wake-up:
        level-triggered, since a record committed during a pass wakes nobody under that rule)."""
        return [ring.fd], ([self._images.fd] if self._images is not None else [])

    def _run_paced(self, sink: Sink, ring) -> None:
        """The kernel wakes the rings' readers once per ``batch_wait`` window: a pass per wake-up. While a reader
        waits in ``Monitor.wait()`` (ReaderWait) it is woken instead and takes the records itself; this thread
        then only looks in now and then for a reader that stopped reading."""
        waiter = RingWaiter(*self._rings(ring), self._wake.fileno())
        stopper = select.poll()
        stopper.register(self._wake.fileno(), select.POLLIN)
        entries = self._reader_entries()
        try:
            while not self._stopping:
                if self._waiting or self._reader_entries() != entries:  # a reader waits on the ring (or did since)
                    entries = self._reader_entries()
                    stopper.poll(_READER_BACKSTOP_MS)
                    continue
                self._pass(sink)
                self._sleeping()
                if not self._stopping and waiter.sleep(_IDLE_BACKSTOP)[0]:
                    self.wakeups += 1
        finally:
            waiter.close()

    def _run_adaptive(self, sink: Sink, ring) -> None:
        """Without the pacer: the ring wakes this thread whenever it has caught up, and ``batch_wait`` after a
        pass lets the events behind the first land (one pass, and one notify of readers, per batch_wait in a
        storm instead of one per event)."""
        poller = select.poll()
        for fd in [fd for fds in self._rings(ring) for fd in fds] + [self._wake.fileno()]:
            poller.register(fd, select.POLLIN)
        stopper = select.poll()  # the wait between passes, which stop() cuts short
        stopper.register(self._wake.fileno(), select.POLLIN)
        wait_ms = self.batch_wait * 1000
        while not self._stopping:
            if not self._pass(sink):
                self._sleeping()
                poller.poll()  # readable as soon as the ring holds anything (the kernel's adaptive wake-up)
                self.wakeups += 1
            if wait_ms:
                stopper.poll(wait_ms)

    def _sleeping(self) -> None:
        """Before the thread that takes the records sleeps (this one's, or a reader's in ReaderWait): the sink's
        deferred work, done where it delays no batch already read (the identity stage's backlog folds)."""
        idle = self._idle
        if idle is not None:
            idle()

    def _pass(self, sink: Sink) -> int:
        with self._drain_lock:
            if self._ring is None:
                return 0
            return self._drain(sink)

    # -- readers that drain the ring themselves ----------------------------------------------------------

    def reader_wait(self, notify_fd: int) -> ReaderWait | None:
        """A ReaderWait for ``Monitor.wait()`` while this source runs with the kernel's pacer (None otherwise):
        the waiting reader is woken by the kernel and drains the ring into the sink ``run()`` was given, so a
        batch costs one thread's wake-up rather than this thread's and then the reader's. ``notify_fd``: the
        monitor's records-waiting flag (raised by this thread's passes, errors and stop)."""
        ring = self._ring
        if not self._pacer or ring is None:
            return None
        # (the sink's deferred work itself once run() has found it: a call fewer per wake-up than _sleeping)
        wait = ReaderWait(*self._rings(ring), notify_fd, self._reader_pass, self._waiting,
                          self._idle if self._idle is not None else self._sleeping)
        if fast_drain is not None:
            wait._source = self  # the C wait runs _reader_pass's common case itself (etwmon/_reader.c)
        self._reader_waits.append(wait)
        return wait

    def _reader_entries(self) -> int:
        """How many waits readers have begun (ReaderWait.entries): the source's thread looks whether it changed."""
        return sum(w.entries for w in self._reader_waits)

    def _reader_pass(self, notify: bool) -> int:
        """One pass from a waiting reader's thread: only while run() runs (its sink; the last pass is its own).
        ``notify``: raise the readers' flag too (not needed when no reader watches the monitor's fileno()). Where
        etwmon._speedups is built, the C wait runs the common case of this itself (etwmon/_reader.c) and calls
        this only for the rest."""
        with self._drain_lock:
            sink = self._sink
            if self._ring is None or sink is None or not self._running or self._stopping:
                return 0
            return self._drain(sink, notify=notify)

    def _settle(self) -> None:
        """Wait until no program that was running as they were detached still runs: membarrier's global
        command waits for an RCU grace period, and tracepoint programs run inside RCU read-side sections; where
        the kernel refuses it (nohz_full), a pause far longer than any program runs."""
        if not wait_for_rcu_grace_period():
            time.sleep(_SETTLE_PAUSE)

    def _final_drain(self, sink: Sink) -> None:
        """Everything left in the ring, read or counted: what is still reserved after a wait (a program that
        could not finish) is skipped and counted as lost, as are the losses counted after the last pass."""
        deadline = time.monotonic() + _BUSY_WAIT
        ring = self._ring
        while True:
            self._drain(sink)
            if ring.consumer_pos() >= ring.producer_pos():  # type: ignore[union-attr]
                break
            if time.monotonic() >= deadline:
                self._drain(sink, final=True)
                break
            time.sleep(0.001)
        if self._report_lost(sink):
            sink.notify()

    def _lost_check(self, now: float | None) -> bool:
        """Whether this pass reads the loss counters (system calls): at most every _LOST_CHECK seconds during a
        run (``now``: the time of the pass), and always at the end (``now`` None)."""
        if now is None:
            return True
        if now < self._lost_due:
            return False
        self._lost_due = now + _LOST_CHECK
        return True

    def _report_lost(self, sink: Sink, check: bool = True) -> bool:
        """Pass on what the kernel counted as lost, and what this reader had to skip, since the last report
        (``check``: read the kernel's count now; else the one read last)."""
        if check:
            self._kernel_lost = self._lost.total()  # type: ignore[union-attr]
        lost = self._kernel_lost + self.skipped
        if lost > self._lost_reported:
            sink.push_lost(lost - self._lost_reported)
            self._lost_reported = lost
            return True
        return False

    def _drain(self, sink: Sink, final: bool = False, notify: bool = True) -> int:
        """Decode what the ring holds now (one pass: a storm that keeps filling it must not keep readers
        waiting), give the space back, report new kernel-side losses and wake readers; returns the number of
        events.

        The ring is read through its mmap'ed pages rather than libbpf's ring_buffer__consume: measured here on
        100 k thread events with the same decoder, the reader thread used 1.7-2.2 us per event this way and
        2.4-2.7 us with ring_buffer__consume, whose ctypes callback per record costs more than walking the
        records in place (what libbpf's consumer does in C, see its ringbuf.c). ``final``: the programs are
        detached and settled, so a record still reserved will never be committed: skip it, counted as lost."""
        ring = self._ring
        images = self._images  # image loads: only those written before this pass began (see imageload.py)
        images_upto = images.producer_pos() if images is not None else 0
        check = self._lost_check(None if final else time.monotonic())
        checked = getattr(sink, "push_checked", None) if fast_drain is not None else None
        if checked is not None:  # the pass in C, up to the first record for Python (if any)
            count = self._drain_fast(sink, checked, ring, final)
            if count < 0:
                if not check and (images is None or images.empty()):
                    return 0  # nothing new (a waiting reader's first look, mostly): no more work than that
                count = 0
        else:
            cons = start = ring.consumer_pos()  # type: ignore[union-attr]
            prod = ring.producer_pos()  # type: ignore[union-attr]  # an acquire load: the records before it are visible
            if cons == prod and not check and (images is None or images.empty()):
                return 0
            cons, count = self._walk(sink, ring, cons, prod, final)
            if cons != start:
                ring.advance(cons)
        if self._report_lost(sink, check):
            count += 1
        if images is not None:  # image loads
            count += images.drain(sink, images_upto, check)
        if count and notify:
            sink.notify()
        return count

    def _drain_fast(self, sink: Sink, checked, ring, final: bool) -> int:
        """A pass in C (etwmon._speedups.drain): the positions read, the wire records gathered into one batch and
        passed on whole (``push_checked``) and the space given back, in one call; from a record for Python on
        (an event, a record of a process seeded from /proc), ``_walk_fast``. The records taken, or -1 when the
        ring held nothing new."""
        seeded = getattr(sink, "seeded_lookup", None)
        got = fast_drain(ring.position_words[0], ring.position_words[1], ring.data, ring.mask, final,
                         self._decoder.last_filetime, seeded() if seeded is not None else None, checked)
        return -1 if got is None else self._drain_took(sink, checked, ring, final, got)

    def _drain_took(self, sink: Sink, checked, ring, final: bool, got: tuple) -> int:
        """The bookkeeping of a C pass (``got``: what ``fast_drain`` returned), and the rest of the ring from a
        record for Python on; the records taken."""
        decoder = self._decoder
        cons, prod, n, decoder.last_filetime, raised, skipped, stop = got
        if raised:
            decoder.time_raised += raised
        if skipped:
            self.skipped += skipped
        if n:
            decoder.events += n
            self._mover.records += n  # type: ignore[union-attr]
        if stop < 0:
            return n
        cons, more = self._walk_fast(sink, checked, ring, cons, prod, final, stop)
        ring.advance(cons)
        return n + more

    def _walk_fast(self, sink: Sink, checked, ring, cons: int, prod: int, final: bool,
                   stop: int | None = None) -> tuple[int, int]:
        """``_walk`` in C (etwmon._speedups): the wire records between the events gathered into one batch each
        and passed on whole (``push_checked``); events, and records of processes seeded from /proc (which the
        identity stage handles one by one), in between, in ring order. ``stop``: where a walk just stopped (at
        ``cons``), to begin with that record."""
        decoder, mover = self._decoder, self._mover
        data, mask, header = ring.data, ring.mask, ring.header
        seeded = getattr(sink, "seeded_lookup", None)
        count = 0
        while True:
            if stop is None:
                (cons, blob, ends, n, decoder.last_filetime, raised, skipped, kinds,  # type: ignore[union-attr]
                 stop) = fast_walk(data, mask, cons, prod, final, decoder.last_filetime,  # type: ignore
                                   seeded() if seeded is not None else None)
                if raised:
                    decoder.time_raised += raised  # type: ignore[union-attr]
                if skipped:
                    self.skipped += skipped
                if n:
                    decoder.events += n  # type: ignore[union-attr]
                    mover.records += n  # type: ignore[union-attr]
                    count += n
                    checked(blob, ends, kinds)
                if stop < 0:
                    return cons, count
            size = header(stop) & ~(ring.BUSY | ring.DISCARD)  # committed: the walk stopped before it, not at it
            if data[stop + 9] >= _KIND_HIGH:
                if size >= EVENT_SIZE:
                    decoder.decode(data, stop + 8)  # type: ignore[union-attr]
                    count += 1
                else:
                    self.skipped += 1
            else:  # a record of a seeded process: one by one, through the identity stage's push_written
                mover.push(sink, data, [stop + 8], [size])  # type: ignore[union-attr]
                count += 1
            cons += (size + 8 + 7) & ~7
            stop = None

    def _walk(self, sink: Sink, ring, cons: int, prod: int, final: bool) -> tuple[int, int]:
        """Decode the events and move the wire records from ``cons`` up to ``prod`` (or the first record not
        committed yet); returns the position after the last one taken and how many there were."""
        decode, move = self._decoder.decode, self._mover.push  # type: ignore[union-attr]
        data, mask, header = ring.data, ring.mask, ring.header  # type: ignore[union-attr]
        busy, discard = ring.BUSY, ring.DISCARD  # type: ignore[union-attr]
        count = 0
        ats: list[int] = []  # wire records the kernel wrote (thread records, exits), moved in one batch
        sizes: list[int] = []
        while cons < prod:
            at = cons & mask
            length = header(at)
            if length & busy:
                if not final:
                    break  # reserved, not committed yet: the next pass takes it
                self.skipped += 1  # never to be committed (final pass, after the wait): counted, not waited for
            size = length & ~(busy | discard)
            if not length & (discard | busy):
                if size < _WIRE_MIN:
                    self.skipped += 1  # shorter than any record: nothing to read, but never silently gone
                elif data[at + 9] < _KIND_HIGH:  # a wire record's Type (< 0x100), not an event's kind
                    if not ats:
                        first_at, first_cons = at, cons
                    # Offsets run on past the ring's end into its second mapping, so a batch that wraps is one
                    # contiguous region (a pass reads at most one ring's length).
                    ats.append(first_at + (cons - first_cons) + 8)
                    sizes.append(size)
                    count += 1
                elif size >= EVENT_SIZE:
                    if ats:  # in ring order: the wire records before this event first
                        move(sink, data, ats, sizes)
                        ats, sizes = [], []
                    decode(data, at + 8)
                    count += 1
                else:
                    self.skipped += 1
            cons += (size + 8 + 7) & ~7
        if ats:
            move(sink, data, ats, sizes)
        return cons, count

    def stop(self) -> None:
        self._stopping = True
        self._wake.wake()

    def close(self) -> None:
        """Free the programs, maps and ring. Safe while ``run()`` still reads the ring on another thread (a
        Monitor whose stop timed out): the thread is told to stop and frees them itself when it returns."""
        self._stopping = True
        with self._state:
            if self._running:
                self._close_pending = True
                self._wake.wake()
                return
        self._release()

    def _release(self) -> None:
        with self._drain_lock:  # no reader's pass is in the ring's pages as they are unmapped
            self._sink = None
            waits, self._reader_waits = self._reader_waits, []
            for wait in waits:
                self._closed_reader_wakeups += wait.wakeups
                wait.close()
        with self._state:
            self._close_pending = False
            if self._images is not None:  # image loads (the reader stays, closed, for stats())
                self._images.close()
            ring, self._ring = self._ring, None
            obj, self._object = self._object, None
            self._lost = None
        if ring is not None:
            ring.close()
        if obj is not None:
            obj.close()
        self._wake.close()

    def stats(self) -> dict[str, int]:
        d = self._decoder
        base = {"lost": self._lost_reported, "parse_errors": 0, "wakeups": self.wakeups, "skipped": self.skipped,
                # with the pacer: its window (0: not paced in the kernel), and the wake-ups of waiting readers
                "wake_us": round(self.batch_wait * 1e6) if self._pacer else 0,
                "reader_wakeups": sum(w.wakeups for w in self._reader_waits) + self._closed_reader_wakeups}
        if d is not None:
            base.update(events=d.events, time_raised=d.time_raised, argv_truncated=d.argv_truncated,
                        argv_unreadable=d.argv_unreadable, creates_slow=d.creates_slow,
                        kernel_written=self._mover.records if self._mover is not None else 0,
                        c_walk=int(fast_walk is not None))  # 1: the ring walked in C (etwmon._speedups)
        base["wake_late"] = self._wake_late()
        if self._images is not None:  # image loads: image_loads, image_loads_lost (by cause), ...
            images = self._images.stats()
            base["parse_errors"] += images.pop("parse_errors")
            base.update(images)
            base["lost"] += base["image_loads_lost"]
        return base
