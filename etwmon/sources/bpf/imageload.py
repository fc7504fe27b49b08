"""Image loads from the kernel: the reader of imageload.bpf.o, whose programs on the mmap syscall tracepoints write
each image load as a finished ImageLoad record (the book's ImageLoadInfo and the extension block) into a ring of
their own. Loaded only when image loads are asked for (``BpfSource(image_loads=True)``): otherwise nothing watches
mmap at all.

``ImageLoadReader`` loads and attaches the object, and ``drain(sink)`` moves what its ring holds into a sink with
one copy per record (``push_batch`` when the sink has it); a record whose paths are not ASCII is fixed up here, on
that record alone, and counted. It runs in the bpf source's reader loop (poll ``fd`` beside the other ring) or on a
thread of its own.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import platform
import struct
import subprocess
import sys
from pathlib import Path

from ...clock import CLOCK_BOOTTIME, KernelClock
from ...errors import SourceUnavailable
from ...identity import guid_prefix
from ...records import EventFlags, ImageLoad, parse
from .._proc import host_and_boot_id

__all__ = ["ImageLoadReader", "OBJECT_PATH", "fix_text", "tracepoint_ids", "PROGRAMS", "LOST_CAUSES"]

log = logging.getLogger(__name__)

#: The committed, reproducibly built object (build.sh rebuilds it with etwmon.bpf.o).
OBJECT_PATH = Path(__file__).with_name("imageload.bpf.o")
#: Program -> the syscall tracepoint it runs on. The exit is attached first, so no entry is remembered unseen.
PROGRAMS = {"imageload_mmap_exit": "syscalls/sys_exit_mmap", "imageload_mmap_enter": "syscalls/sys_enter_mmap"}
#: The program on tp_btf/sched_process_exec: what exec maps without a syscall (the program, its interpreter).
EXEC_PROGRAM = "imageload_exec"
#: imageload.h's loss slots, by cause (each is an image load that could not be reported).
LOST_CAUSES = ("ring", "pending", "file")

# imageload.h
_NON_ASCII, _PATH_CUT, _EXE_CUT = 0x1, 0x2, 0x4
_PREFIX = 8
_BASE_SIZE = 640
_CONFIG = struct.Struct("<8sq")  # struct imageload_config: guid_prefix, offset_ns

_TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
# Read tracepoint ids where tracefs is not mounted: mount it in a mount namespace of a child's own, so this
# machine's mounts stay as they are.
_PRIVATE_TRACEFS = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def check(rc, what):
    if rc:
        sys.exit(what + ": " + os.strerror(ctypes.get_errno()))
check(libc.unshare(0x20000), "unshare(CLONE_NEWNS)")
check(libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None), "mount --make-rprivate /")
check(libc.mount(b"tracefs", b"/sys/kernel/tracing", b"tracefs", 0, None), "mount tracefs")
for name in sys.argv[1:]:
    with open("/sys/kernel/tracing/events/" + name + "/id") as f:
        print(f.read().strip())
"""
_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "ppc64le": 319, "s390x": 331}
_PERF_TYPE_TRACEPOINT = 2
_PERF_FLAG_FD_CLOEXEC = 8


def tracepoint_ids(names: list[str]) -> list[int]:
    """The ids of tracepoints ("syscalls/sys_enter_mmap"), from tracefs where it is mounted, else from a tracefs
    mounted privately by a child process (nothing changes for the rest of the machine)."""
    for base in _TRACEFS:
        try:
            return [int(Path(base, "events", name, "id").read_text()) for name in names]
        except (OSError, ValueError):
            continue
    done = subprocess.run([sys.executable, "-I", "-c", _PRIVATE_TRACEFS, *names], capture_output=True, text=True,
                          timeout=30)
    if done.returncode:
        raise SourceUnavailable(f"cannot read the ids of the tracepoints {', '.join(names)}: "
                                f"{done.stderr.strip() or done.returncode} (the kernel needs CONFIG_FTRACE_SYSCALLS)")
    return [int(line) for line in done.stdout.split()]


def _perf_tracepoint(tp_id: int) -> int:
    """A perf event descriptor of tracepoint ``tp_id`` (what libbpf's attach_tracepoint opens), for one BPF program
    to run on every CPU's hit of it."""
    nr = _PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise SourceUnavailable(f"image loads: perf_event_open's number on {platform.machine()} is not known here")
    attr = ctypes.create_string_buffer(struct.pack("<IIQ", _PERF_TYPE_TRACEPOINT, 64, tp_id), 64)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(nr), attr, ctypes.c_long(-1), ctypes.c_long(0), ctypes.c_long(-1),
                      ctypes.c_long(_PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        code = ctypes.get_errno() or errno.EINVAL
        raise OSError(code, f"perf_event_open(tracepoint {tp_id}): {os.strerror(code)}")
    return fd


def _from_escapes(text: str | None) -> str | None:
    """A text the kernel wrote byte for byte (bytes >= 0x80 as surrogate escapes) decoded as UTF-8, bytes that are
    not UTF-8 kept as escapes (``os.fsdecode``)."""
    return None if text is None else os.fsdecode(text.encode("utf-8", "surrogateescape"))


def fix_text(record: bytes, prefix_flags: int) -> bytes:
    """A kernel-written ImageLoad record whose paths held bytes >= 0x80, with them decoded as UTF-8 and the record
    re-encoded (the name cut to 300 characters again, the whole path in ImageLoaded when it still does not fit)."""
    (event,) = parse(record)
    assert isinstance(event, ImageLoad)
    flags = event.flags & ~EventFlags.TRUNCATED
    if prefix_flags & (_PATH_CUT | _EXE_CUT):
        flags |= EventFlags.TRUNCATED  # a cut by the walk stays (the encoder adds a name it must cut itself)
    return dataclasses.replace(event, image_name=_from_escapes(event.image_name), image=_from_escapes(event.image),
                               flags=EventFlags(flags)).encode()


class ImageLoadReader:
    """Loads imageload.bpf.o and reads its ring. ``boot_clock``: the bpf source's ``KernelClock(CLOCK_BOOTTIME)``
    (its offset makes the records' times and ProcessGuids, so both sources must share it); ``host_and_boot``:
    what names this host and boot (``_proc.host_and_boot_id()`` by default)."""

    def __init__(self, *, ring_size: int = 4 << 20, boot_clock: KernelClock | None = None,
                 host_and_boot: bytes | None = None) -> None:
        self.ring_size = ring_size
        self.boot_clock = boot_clock
        self.host_and_boot = host_and_boot
        self._object = None
        self._ring = None
        self._lost: list = []
        self._lost_by_cause = [0] * len(LOST_CAUSES)  # kept from the counters when closed
        self._lost_reported = 0
        self.loads = 0
        self.non_ascii = 0
        self.malformed = 0

    @property
    def fd(self) -> int:
        """Readable when the ring holds records (poll it)."""
        if self._ring is None:
            raise SourceUnavailable("ImageLoadReader used before open()")
        return self._ring.fd

    def open(self) -> None:
        if self._object is not None:
            return
        if not OBJECT_PATH.is_file():
            raise SourceUnavailable(f"the BPF object {OBJECT_PATH} is missing from this installation")
        from ._libbpf import LoadedObject, PerCpuCounter, RingBuffer, load_libbpf
        libbpf = load_libbpf()
        clock = self.boot_clock or KernelClock(CLOCK_BOOTTIME)
        prefix = guid_prefix(self.host_and_boot if self.host_and_boot is not None else host_and_boot_id())
        ids = tracepoint_ids(list(PROGRAMS.values()))
        fds: dict[str, int] = {}
        try:
            for name, tp_id in zip(PROGRAMS, ids):
                fds[name] = _perf_tracepoint(tp_id)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        cpus = max(libbpf.libbpf_num_possible_cpus(), 1)
        try:  # the object owns the descriptors from here on
            obj = LoadedObject(libbpf, str(OBJECT_PATH), [EXEC_PROGRAM],
                               {"imageload_scratch": cpus, "imageload_events": self.ring_size},
                               initial_values={".rodata": _CONFIG.pack(prefix, clock.offset_ns)}, perf_events=fds)
        except OSError as exc:
            raise SourceUnavailable(f"cannot load the image-load programs ({exc})") from exc
        try:
            self._ring = RingBuffer(obj.map_fd("imageload_events"), self.ring_size)
            lost_fd = obj.map_fd("imageload_lost")
            self._lost = [PerCpuCounter(libbpf, lost_fd, slot) for slot in range(len(LOST_CAUSES))]
        except BaseException:
            obj.close()
            raise
        self._object = obj
        self._lost_reported = 0

    def producer_pos(self) -> int:
        """Where the kernel's writing is now (``drain``'s ``upto``)."""
        return self._ring.producer_pos() if self._ring is not None else 0

    def empty(self) -> bool:
        """True when the ring holds nothing the reader has not taken."""
        ring = self._ring
        return ring is None or ring.consumer_pos() >= ring.producer_pos()

    def drain(self, sink, upto: int | None = None, check_lost: bool = True) -> int:
        """Move what the ring holds now into ``sink`` (one pass), give the space back and report new losses;
        returns the number of records pushed (a loss report counts as one). Does not notify the sink.
        ``check_lost``: read the loss counters (a system call each) in this pass (the bpf source does every
        so often, and in its last pass).

        ``upto``: a ``producer_pos()`` taken before the other ring was drained, so that no image load is pushed
        ahead of its process's exec (which the kernel wrote before it, into the other ring)."""
        ring = self._ring
        if ring is None:
            return 0
        data = ring.data
        samples, cons = ring.committed(upto)
        records: list[bytes] = []
        for at, size in samples:
            if size < _PREFIX + _BASE_SIZE:
                self.malformed += 1  # not a record this program writes: cannot happen, counted if it does
                continue
            record = bytes(data[at + _PREFIX:at + size])
            flags = data[at]
            if flags & _NON_ASCII:
                record = fix_text(record, flags)
                self.non_ascii += 1
            records.append(record)
        if samples or cons != ring.consumer_pos():
            ring.advance(cons)
        count = len(records)
        if records:
            self.loads += count
            push_batch = getattr(sink, "push_batch", None)
            if push_batch is not None and count > 1:
                ends, end = [], 0
                for r in records:
                    end += len(r)
                    ends.append(end)
                push_batch(b"".join(records), ends)
            else:
                for r in records:
                    sink.push(r)
        if not check_lost:
            return count
        lost = self.lost()
        if lost > self._lost_reported:
            sink.push_lost(lost - self._lost_reported)
            self._lost_reported = lost
            count += 1
        return count

    def lost(self) -> int:
        return sum(counter.total() for counter in self._lost)

    def detach(self) -> None:
        """No more records (the ring stays readable until ``close()``)."""
        if self._object is not None:
            self._object.detach()

    def close(self) -> None:
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.close()
        if self._lost:
            self._lost_by_cause = [counter.total() for counter in self._lost]
        obj, self._object = self._object, None
        if obj is not None:
            obj.close()
        self._lost = []

    def stats(self) -> dict[str, int]:
        """``image_loads`` (records delivered), ``image_loads_lost`` (and by cause), ``image_loads_non_ascii``,
        ``parse_errors`` (samples too short to be a record)."""
        out = {"image_loads": self.loads, "image_loads_lost": self._lost_reported,
               "image_loads_non_ascii": self.non_ascii, "parse_errors": self.malformed}
        by_cause = [counter.total() for counter in self._lost] if self._lost else self._lost_by_cause
        for cause, count in zip(LOST_CAUSES, by_cause):
            out[f"image_loads_lost_{cause}"] = count
        return out
