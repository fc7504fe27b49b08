"""libbpf 1.x through ctypes: open, size, load and attach etwmon's BPF object, and map its ring buffer.

Only the calls etwmon needs, with their C signatures from libbpf 1.1's ``libbpf.h``; libbpf reports errors as
NULL or a negative errno (its 1.0 behaviour), turned into ``OSError`` here. Everything the kernel holds for a
loaded object is a file descriptor of this process, so closing the object or the process dying (even by
SIGKILL) detaches the programs and frees the maps: nothing is pinned, nothing outlives its owner.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import platform
import struct
from typing import Any

__all__ = ["Libbpf", "LoadedObject", "RingBuffer", "load_libbpf", "tracepoint_arguments",
           "wait_for_rcu_grace_period", "memory_ordering_reason", "LIBBPF_SONAME"]

log = logging.getLogger(__name__)

LIBBPF_SONAME = "libbpf.so.1"

_c_void_p, _c_char_p, _c_int, _c_uint32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32
# libbpf_print_fn_t: int (*)(enum libbpf_print_level level, const char *fmt, va_list args). A va_list is passed
# as a pointer on x86-64 (an array type there), so vsnprintf can format it; elsewhere only the format is logged.
_PRINT_FN = ctypes.CFUNCTYPE(_c_int, _c_int, _c_char_p, _c_void_p)
_VA_LIST_IS_POINTER = platform.machine() in ("x86_64", "AMD64")

_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "bpf_object__open_file": (_c_void_p, [_c_char_p, _c_void_p]),
    "bpf_object__load": (_c_int, [_c_void_p]),
    "bpf_object__close": (None, [_c_void_p]),
    "bpf_object__find_map_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
    "bpf_object__find_program_by_name": (_c_void_p, [_c_void_p, _c_char_p]),
    "bpf_map__set_max_entries": (_c_int, [_c_void_p, _c_uint32]),
    "bpf_map__max_entries": (_c_uint32, [_c_void_p]),
    "bpf_map__fd": (_c_int, [_c_void_p]),
    "bpf_program__attach": (_c_void_p, [_c_void_p]),
    "bpf_program__attach_perf_event": (_c_void_p, [_c_void_p, _c_int]),
    "bpf_map__set_initial_value": (_c_int, [_c_void_p, _c_void_p, ctypes.c_size_t]),
    "bpf_link__destroy": (_c_int, [_c_void_p]),
    "bpf_map_lookup_elem": (_c_int, [_c_int, _c_void_p, _c_void_p]),
    "bpf_map_update_elem": (_c_int, [_c_int, _c_void_p, _c_void_p, ctypes.c_uint64]),
    "libbpf_num_possible_cpus": (_c_int, []),
    "libbpf_set_print": (_c_void_p, [_c_void_p]),
    "bpf_program__set_autoload": (_c_int, [_c_void_p, ctypes.c_bool]),
    "btf__load_vmlinux_btf": (_c_void_p, []),
    "btf__find_by_name_kind": (ctypes.c_int32, [_c_void_p, _c_char_p, _c_uint32]),
    "btf__type_by_id": (_c_void_p, [_c_void_p, _c_uint32]),
    "btf__free": (None, [_c_void_p]),
}

_BTF_KIND_PTR, _BTF_KIND_TYPEDEF, _BTF_KIND_FUNC_PROTO = 2, 8, 13


class _BtfType(ctypes.Structure):
    """struct btf_type (uapi linux/btf.h): name_off, info (vlen in bits 0-15, kind in bits 24-28), size/type."""

    _fields_ = [("name_off", _c_uint32), ("info", _c_uint32), ("type", _c_uint32)]


class Libbpf:
    """The loaded shared library with typed functions."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        self._vsnprintf = ctypes.CDLL(libc_name).vsnprintf
        self._vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        self._messages: list[str] = []
        self._print_buffer = ctypes.create_string_buffer(1 << 20)
        self._print = _PRINT_FN(self._on_print)  # kept alive as long as libbpf may call it

    def _on_print(self, level: int, fmt: bytes | None, args: int | None) -> int:
        if fmt is None:
            return 0
        if _VA_LIST_IS_POINTER and args:
            buf = self._print_buffer
            self._vsnprintf(buf, len(buf), fmt, args)
            text = buf.value.decode("utf-8", "replace")
            if len(text) > 4000:  # the verifier's log comes as one message: its end says what failed
                text = "...\n" + text[-4000:]
        else:
            text = fmt.decode("utf-8", "replace")
        self._messages.append(text.rstrip("\n"))
        del self._messages[:-200]  # the verifier's log can be long: the end says what failed
        return 0

    def capture(self) -> "_Capture":
        """Route libbpf's messages to this object while a call runs (restored afterwards, as libbpf's print
        function is process-wide); ``messages()`` gives them."""
        return _Capture(self)

    def messages(self) -> str:
        return "\n".join(self._messages[-20:])


class _Capture:
    def __init__(self, libbpf: Libbpf) -> None:
        self.libbpf = libbpf
        self.previous: int | None = None

    def __enter__(self) -> "_Capture":
        self.libbpf._messages.clear()
        self.previous = self.libbpf.libbpf_set_print(ctypes.cast(self.libbpf._print, _c_void_p))
        return self

    def __exit__(self, *exc: object) -> None:
        self.libbpf.libbpf_set_print(self.previous)


_LIBBPF: Libbpf | None = None


def load_libbpf() -> Libbpf:
    """libbpf.so.1 (Debian: the libbpf1 package), loaded once; OSError when it is not installed."""
    global _LIBBPF
    if _LIBBPF is None:
        _LIBBPF = Libbpf(ctypes.CDLL(LIBBPF_SONAME, use_errno=True))
    return _LIBBPF


def tracepoint_arguments(libbpf: Libbpf, tracepoint: str) -> int | None:
    """How many arguments the running kernel's tracepoint passes to a tp_btf program (its
    ``btf_trace_<tracepoint>`` prototype, less the leading context pointer), from the kernel's BTF; None when
    the BTF cannot say."""
    btf = libbpf.btf__load_vmlinux_btf()
    if not btf:
        return None
    try:
        type_id = libbpf.btf__find_by_name_kind(btf, f"btf_trace_{tracepoint}".encode(), _BTF_KIND_TYPEDEF)
        for kind in (_BTF_KIND_TYPEDEF, _BTF_KIND_PTR, _BTF_KIND_FUNC_PROTO):
            if type_id <= 0:
                return None
            ptr = libbpf.btf__type_by_id(btf, type_id)
            if not ptr:
                return None
            t = _BtfType.from_address(ptr)
            if (t.info >> 24) & 0x1F != kind:
                return None
            if kind == _BTF_KIND_FUNC_PROTO:
                return max((t.info & 0xFFFF) - 1, 0)
            type_id = t.type
        return None
    finally:
        libbpf.btf__free(btf)


def _errno_error(what: str, code: int, detail: str = "") -> OSError:
    code = abs(code) or errno.EINVAL
    message = f"{what}: {os.strerror(code)}"
    if detail:
        message += f"\n{detail}"
    return OSError(code, message)


class LoadedObject:
    """A BPF object file opened, sized, loaded into the kernel and attached; ``close()`` undoes all of it.
    ``skip``: programs of the object not to load at all; ``settings``: map name -> the value of its entry 0,
    written after load and before the programs are attached."""

    def __init__(self, libbpf: Libbpf, path: str, programs: list[str], max_entries: dict[str, int],
                 skip: tuple[str, ...] = (), settings: dict[str, bytes] | None = None,
                 initial_values: dict[str, bytes] | None = None, perf_events: dict[str, int] | None = None) -> None:
        """``settings``: map name -> the bytes of its first entry, written after load and before attach;
        ``initial_values``: map name (".rodata" for ``const volatile`` globals) -> its bytes, set before load;
        ``perf_events``: program name -> a perf event descriptor to attach it to (a tracepoint opened with
        perf_event_open; the object owns each descriptor from here on, the link once attached), after ``programs``."""
        self.libbpf = libbpf
        unattached = dict(perf_events or {})
        self._obj: int | None = None
        self._links: list[int] = []
        lb = libbpf
        with lb.capture():
            obj = lb.bpf_object__open_file(path.encode(), None)
            if not obj:
                code = ctypes.get_errno()
                for fd in unattached.values():
                    os.close(fd)
                raise _errno_error(f"cannot open {path}", code, lb.messages())
            self._obj = obj
            try:
                for name, entries in max_entries.items():
                    rc = lb.bpf_object__find_map_by_name(obj, name.encode())
                    if not rc:
                        raise _errno_error(f"no map {name!r} in {path}", errno.ENOENT)
                    err = lb.bpf_map__set_max_entries(rc, entries)
                    if err:
                        raise _errno_error(f"cannot size map {name!r} to {entries}", err)
                for name in skip:  # programs this kernel cannot load (another variant of one is used)
                    prog = lb.bpf_object__find_program_by_name(obj, name.encode())
                    if not prog or lb.bpf_program__set_autoload(prog, False):
                        raise _errno_error(f"cannot leave program {name!r} out", errno.ENOENT)
                for name, value in (initial_values or {}).items():
                    m = lb.bpf_object__find_map_by_name(obj, name.encode())
                    if not m:
                        raise _errno_error(f"no map {name!r} in {path}", errno.ENOENT)
                    err = lb.bpf_map__set_initial_value(m, value, len(value))
                    if err:
                        raise _errno_error(f"cannot set the initial value of {name!r} ({len(value)} bytes)", err)
                err = lb.bpf_object__load(obj)
                if err:
                    raise _errno_error("the kernel refused the BPF object", err, lb.messages())
                for name, value in (settings or {}).items():
                    self.write_entry(name, value)
                for name in programs:
                    prog = lb.bpf_object__find_program_by_name(obj, name.encode())
                    if not prog:
                        raise _errno_error(f"no program {name!r} in {path}", errno.ENOENT)
                    link = lb.bpf_program__attach(prog)
                    if not link:
                        raise _errno_error(f"cannot attach {name!r}", ctypes.get_errno(), lb.messages())
                    self._links.append(link)
                for name, fd in list(unattached.items()):
                    prog = lb.bpf_object__find_program_by_name(obj, name.encode())
                    link = lb.bpf_program__attach_perf_event(prog, fd) if prog else None
                    if not link:
                        code = ctypes.get_errno() if prog else errno.ENOENT
                        raise _errno_error(f"cannot attach {name!r} to its perf event", code, lb.messages())
                    del unattached[name]
                    self._links.append(link)
            except BaseException:
                for fd in unattached.values():
                    os.close(fd)
                self.close()
                raise

    def map_fd(self, name: str) -> int:
        m = self.libbpf.bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise _errno_error(f"no map {name!r}", errno.ENOENT)
        return self.libbpf.bpf_map__fd(m)

    def write_entry(self, name: str, value: bytes) -> None:
        """Write ``value`` over entry 0 of the array map ``name``. Zeros over a value holding a bpf_timer
        cancel the timer (the kernel waits for a callback that is running)."""
        key = ctypes.c_uint32(0)
        buf = ctypes.create_string_buffer(value, len(value))
        if self.libbpf.bpf_map_update_elem(self.map_fd(name), ctypes.byref(key), buf, 0):
            raise _errno_error(f"cannot write entry 0 of the map {name!r}", ctypes.get_errno())

    def read_entry(self, name: str, size: int) -> bytes:
        """The ``size`` bytes of entry 0 of the array map ``name`` (the kernel zeroes a timer's bytes)."""
        key = ctypes.c_uint32(0)
        buf = ctypes.create_string_buffer(size)
        if self.libbpf.bpf_map_lookup_elem(self.map_fd(name), ctypes.byref(key), buf):
            raise _errno_error(f"cannot read entry 0 of the map {name!r}", ctypes.get_errno())
        return buf.raw

    def detach(self) -> None:
        """Detach every program (no more events); the maps stay readable until ``close()``. Idempotent."""
        links, self._links = self._links, []
        for link in reversed(links):
            self.libbpf.bpf_link__destroy(link)

    def close(self) -> None:
        """Detach every program and free the object (idempotent)."""
        self.detach()
        obj, self._obj = self._obj, None
        if obj:
            self.libbpf.bpf_object__close(obj)


class PerCpuCounter:
    """One u64 slot (``key``) of a BPF_MAP_TYPE_PERCPU_ARRAY, summed over the CPUs."""

    def __init__(self, libbpf: Libbpf, fd: int, key: int = 0) -> None:
        self._lookup = libbpf.bpf_map_lookup_elem
        self._fd = fd
        self._cpus = libbpf.libbpf_num_possible_cpus()
        self._key = ctypes.c_uint32(key)
        self._values = (ctypes.c_uint64 * max(self._cpus, 1))()
        self._key_p = ctypes.cast(ctypes.byref(self._key), _c_void_p)
        self._values_p = ctypes.cast(self._values, _c_void_p)

    def total(self) -> int:
        if self._lookup(self._fd, self._key_p, self._values_p):
            raise _errno_error("cannot read the loss counter", ctypes.get_errno())
        return sum(self._values)


# --- memory ordering ---------------------------------------------------------------------------------------
#
# libbpf's consumer (ringbuf.c) reads producer_pos and each record's header with smp_load_acquire and writes
# consumer_pos with smp_store_release: a record's bytes are read only after the kernel's commit of it is seen,
# and the kernel reuses space only after the reader is done with it. On x86-64 every load is an acquire load and
# every store a release store (TSO), so plain reads of the mapping do it. Elsewhere (arm64) the reads go through
# libatomic's __atomic_load_N/__atomic_store_N with those orders.

_ACQUIRE, _RELEASE = 2, 3  # __ATOMIC_ACQUIRE, __ATOMIC_RELEASE
_TSO = platform.machine() in ("x86_64", "AMD64", "i386", "i686")
_ATOMIC: Any = None


def _libatomic() -> Any:
    global _ATOMIC
    if _ATOMIC is None:
        lib = ctypes.CDLL(ctypes.util.find_library("atomic") or "libatomic.so.1")
        for name, ctype in (("__atomic_load_4", ctypes.c_uint32), ("__atomic_load_8", ctypes.c_uint64)):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctype, [_c_void_p, _c_int]
        lib.__atomic_store_8.restype = None
        lib.__atomic_store_8.argtypes = [_c_void_p, ctypes.c_uint64, _c_int]
        _ATOMIC = lib
    return _ATOMIC


def memory_ordering_reason() -> str | None:
    """None when this machine can read a BPF ring with the ordering libbpf uses; else why not."""
    if _TSO:
        return None
    try:
        _libatomic()
    except OSError as exc:
        return f"reading the ring on {platform.machine()} needs libatomic.so.1 for acquire loads ({exc})"
    return None


_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "arm64": 283, "i686": 375, "i386": 375}.get(platform.machine())
_MEMBARRIER_CMD_GLOBAL = 1


def wait_for_rcu_grace_period() -> bool:
    """membarrier(MEMBARRIER_CMD_GLOBAL): returns once every CPU has passed an RCU grace period, so a program
    that a tracepoint was running when it was detached has finished. False when the kernel refuses it."""
    if _SYS_MEMBARRIER is None:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.syscall(ctypes.c_long(_SYS_MEMBARRIER), _c_int(_MEMBARRIER_CMD_GLOBAL), _c_int(0)) == 0


class RingBuffer:
    """A BPF ring buffer map read through its mmap'ed pages, as libbpf's ringbuf.c consumer does.

    Layout (kernel/bpf/ringbuf.c): page 0 holds consumer_pos (we write it), page 1 producer_pos (the kernel
    writes it), then the data pages, mapped twice in a row so a record that wraps is contiguous. Each record
    has an 8-byte header: its length with bit 31 "busy" (not committed yet) and bit 30 "discarded", then the
    sample, padded to 8 bytes. ``producer_pos()`` and ``header()`` are acquire loads, ``advance()`` a release
    store (see above).
    """

    BUSY = 1 << 31
    DISCARD = 1 << 30

    def __init__(self, fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self.fd = fd
        self.size = size
        self.mask = size - 1
        self._consumer = mmap.mmap(fd, page, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE,
                                   offset=0)
        try:
            self._producer = mmap.mmap(fd, page + 2 * size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ,
                                       offset=page)
        except BaseException:
            self._consumer.close()
            raise
        self.data = memoryview(self._producer)[page:]
        self._pos = ctypes.c_uint64.from_buffer(self._consumer)  # the consumer position, stored in place
        self._producer_view = memoryview(self._producer)
        #: The consumer's and the producer's position words as buffers, for a pass in C (_speedups.drain).
        self.position_words = (memoryview(self._consumer)[:8], self._producer_view[:8])
        if _TSO:
            unpack = struct.Struct("<I").unpack_from
            data = self.data
            self.header = lambda at: unpack(data, at)[0]
        else:
            atomic = _libatomic()
            import numpy as np

            producer = np.frombuffer(self._producer_view, dtype=np.uint8).ctypes.data  # read-only mapping
            base = producer + page
            load4, load8, store8 = atomic.__atomic_load_4, atomic.__atomic_load_8, atomic.__atomic_store_8
            consumer = ctypes.addressof(self._pos)
            self.header = lambda at: load4(base + at, _ACQUIRE)
            self.producer_pos = lambda: load8(producer, _ACQUIRE)  # type: ignore[method-assign]
            self.advance = lambda pos: store8(consumer, pos, _RELEASE)  # type: ignore[method-assign]

    def header(self, at: int) -> int:  # pragma: no cover - replaced per instance in __init__
        """The length word of the record at data offset ``at`` (with the BUSY and DISCARD bits)."""
        raise NotImplementedError

    def consumer_pos(self) -> int:
        return self._pos.value

    def producer_pos(self) -> int:
        return struct.unpack_from("<Q", self._producer_view, 0)[0]

    def advance(self, pos: int) -> None:
        """Give the space up to ``pos`` back to the kernel."""
        self._pos.value = pos

    def committed(self, upto: int | None = None) -> tuple[list[tuple[int, int]], int]:
        """Where each sample lies in ``data`` (offset, length) from the consumer position up to ``upto`` (default:
        the producer's), stopping at the first not committed yet, discarded ones left out; and the position after
        the last one taken, for ``advance`` once they are read."""
        data, mask, busy, discard = self.data, self.mask, self.BUSY, self.DISCARD
        cons = self._pos.value
        end = self.producer_pos() if upto is None else upto
        out = []
        while cons < end:
            at = cons & mask
            length = int.from_bytes(data[at:at + 4], "little")
            if length & busy:
                break  # reserved, not committed yet: the next pass takes it
            size = length & ~(busy | discard)
            if not length & discard:
                out.append((at + 8, size))
            cons += (size + 8 + 7) & ~7
        return out, cons

    def close(self) -> None:
        words, self.position_words = self.position_words, None
        self.__dict__.pop("header", None)
        self.__dict__.pop("producer_pos", None)
        self.__dict__.pop("advance", None)
        del self._pos
        try:
            for view in words or ():
                view.release()
            self.data.release()
            self._producer_view.release()
            self._producer.close()
            self._consumer.close()
        except BufferError:
            # A view of the pages is still held (e.g. by the traceback of a failed drain that a Monitor keeps
            # to report): the mappings go when the last view does, never while one can still read them.
            log.debug("ring buffer pages still referenced at close; unmapped when released")
