"""The eBPF source: the committed object and its rebuild, the decoder on kernel-shaped events, and the live kernel."""

from __future__ import annotations

import collections
import ctypes
import json
import os
import shutil
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import etwmon
from etwmon import ItemType, parse
from etwmon.records import (
    FILETIME_UNIX_EPOCH, MAX_COMMAND_LINE, MAX_RECORD_SIZE, TRUNCATION_MARKER, block_fields, command_line_from_argv,
    filetime_now,
)
from etwmon.clock import CLOCK_BOOTTIME, KernelClock
from etwmon.sources import bpf as bpf_module
from etwmon.sources.bpf import BpfSource, TaskDetails
from etwmon.sources.bpf import _event as ev
from etwmon.sources.bpf._wire import WireMover

from . import cn_builders as cb
from .conftest import require
from .helpers import (
    BatchSink, ListSink, exit_3_and_sigkill, fork_storm_while_stalled, of_type, read_until, records_until,
    run_one_thread, timed_sleep,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="eBPF is Linux only")

BPF_DIR = Path(bpf_module.__file__).parent
OFFSET = 1_000_000_000_000  # wall clock minus boot time, fixed for exact times in decoder tests


# --- the committed object ----------------------------------------------------------------------------------------


def test_the_committed_object_rebuilds_byte_for_byte(tmp_path):
    """CI's proof that etwmon.bpf.o is what etwmon.bpf.c compiles to with the documented command."""
    for tool in ("clang-14", "llvm-strip-14"):
        require(shutil.which(tool) is not None, f"{tool} is needed to rebuild the BPF object (apt-get install "
                                                "clang-14 llvm-14 libbpf-dev)")
    require(Path("/usr/include/bpf/bpf_helpers.h").is_file(), "libbpf-dev's headers are needed to rebuild")
    subprocess.run(["sh", str(BPF_DIR / "build.sh"), str(tmp_path)], check=True, cwd=tmp_path)
    for name in ("etwmon.bpf.o", "etwmon_nopace.bpf.o", "imageload.bpf.o"):
        rebuilt = (tmp_path / name).read_bytes()
        committed = (BPF_DIR / name).read_bytes()
        assert rebuilt == committed, f"{name} differs from its source: run etwmon/sources/bpf/build.sh"
        sections = subprocess.run(["llvm-readelf-14", "-S", str(tmp_path / name)], capture_output=True,
                                  text=True).stdout if shutil.which("llvm-readelf-14") else ""
        if sections:
            assert ".BTF.ext" in sections and " .BTF " in sections and ".debug_info" not in sections


def test_the_python_layout_is_the_struct_the_object_was_built_with():
    require(shutil.which("bpftool") is not None, "bpftool is needed to read the object's BTF")
    dump = json.loads(subprocess.run(["bpftool", "btf", "dump", "file", str(BPF_DIR / "etwmon.bpf.o"), "-j"],
                                     check=True, capture_output=True, text=True).stdout)
    (struct_,) = [t for t in dump["types"] if t.get("name") == "etwmon_event" and t["kind"] == "STRUCT"]
    assert struct_["size"] == ev.EVENT_SIZE
    offsets, at = [], 0
    for name, code in ev.FIELDS:
        size = struct.calcsize("<" + code)
        offsets.append((name, at * 8))
        at += size
    assert [(m["name"], m["bits_offset"]) for m in struct_["members"]] == offsets


# --- the decoder on kernel-shaped events -------------------------------------------------------------------------


def event(kind: int, *, flags: int = 0, ns: int = 5_000, pid: int = 100, tid: int | None = None, ppid: int = 1,
          cpid: int = 0, ctid: int = 0, code: int = 0, argv: bytes = b"", argv_full: int | None = None,
          filename: bytes = b"", exe: bytes = b"", cwd: bytes = b"", comm: bytes = b"prog",
          tty: bytes = b"", exe_ino: int = 0, exe_dev: int = 0, exe_flags: int = 0, mnt_ns: int = 0,
          pid_ns: int = 0, ns_pid: int = 0, cgroup: bytes = b"") -> bytes:
    """A struct etwmon_event as the kernel side writes it."""
    tail = argv + filename + exe + cwd + cgroup
    fields = dict(kind=kind, flags=flags, size=ev.EVENT_SIZE + len(tail), time_ns=ns, pid=pid,
                  tid=pid if tid is None else tid, ppid=ppid, creating_pid=cpid, creating_tid=ctid, exit_code=code,
                  start_boottime=1_000, parent_start_boottime=500, cgroup_id=77, uid=1000, euid=0, gid=1001,
                  egid=0, loginuid=0xFFFFFFFF, sessionid=3, argv_len=len(argv),
                  argv_full_len=len(argv) if argv_full is None else argv_full, filename_len=len(filename),
                  exe_len=len(exe), cwd_len=len(cwd), reserved=0, comm=comm, tty=tty, exe_ino=exe_ino,
                  exe_dev=exe_dev, exe_flags=exe_flags, mnt_ns=mnt_ns, pid_ns=pid_ns, ns_pid=ns_pid, cgroup_len=len(cgroup),
                  reserved2=0)
    return ev.EVENT.pack(*(fields[name] for name, _ in ev.FIELDS)) + tail


def decode(*events: bytes, enrich=None) -> tuple[list, ev.EventDecoder]:
    records: list[bytes] = []
    decoder = ev.EventDecoder(records.append, KernelClock(CLOCK_BOOTTIME, offset_ns=OFFSET), enrich)
    for raw in events:
        decoder.decode(memoryview(raw), 0)
    return list(parse(b"".join(records))), decoder


def filetime(ns: int) -> int:
    return (ns + OFFSET) // 100 + FILETIME_UNIX_EPOCH


def test_fork_of_a_process_carries_the_parents_argv_and_a_thread_fork_is_a_thread_create():
    argv = b"python3\0-c\0two words\0"
    (create, thread), _ = decode(event(ev.FORK_PROCESS, pid=200, ppid=100, cpid=100, ctid=101, argv=argv),
                                 event(ev.FORK_THREAD, ns=6_000, pid=100, tid=201, cpid=100, ctid=100))
    assert create.type == ItemType.ProcessCreate
    assert (create.pid, create.parent_pid, create.creating_pid, create.creating_tid) == (200, 100, 100, 101)
    assert create.argv == [b"python3", b"-c", b"two words"] and create.filetime == filetime(5_000)
    assert thread.type == ItemType.ThreadCreate and (thread.tid, thread.pid) == (201, 100)
    assert thread.filetime == filetime(6_000)


@pytest.mark.parametrize("status, code", [
    (cb.wait_status_exited(0), 0), (cb.wait_status_exited(3), 3), (cb.wait_status_signaled(signal.SIGKILL), 137),
    (cb.wait_status_signaled(signal.SIGSEGV, core=True), 139),
])
def test_exit_codes_are_what_a_shell_reports(status, code):
    (thread_exit, process_exit), _ = decode(event(ev.EXIT_THREAD, pid=300, tid=301, code=status),
                                            event(ev.EXIT_PROCESS, pid=300, code=status))
    assert thread_exit.type == ItemType.ThreadExit and (thread_exit.tid, thread_exit.exit_code) == (301, code)
    assert process_exit.type == ItemType.ProcessExit and (process_exit.pid, process_exit.exit_code) == (300, code)


def test_a_last_thread_that_is_not_the_leader_ends_as_a_thread_and_then_the_process():
    # The leader left first (pthread_exit, status 0); thread 402 ends the process with exit(3).
    out, _ = decode(event(ev.EXIT_PROCESS, pid=400, tid=402, code=cb.wait_status_exited(3),
                          ctid=cb.wait_status_exited(3)))
    assert [(e.type, getattr(e, "tid", None), e.exit_code) for e in out] == [
        (ItemType.ThreadExit, 402, 3), (ItemType.ProcessExit, None, 3)]


def test_exec_gives_the_argv_exactly_with_hostile_and_non_utf8_bytes():
    argv = [b"/bin/echo", b"x\ny", b"", b"\xff\xfe", b"caf\xc3\xa9", b"$(id); `id` | 'q\"", b"-"]
    (e,), _ = decode(event(ev.EXEC, pid=500, ppid=1, cpid=500, ctid=501, argv=b"\0".join(argv) + b"\0"))
    assert e.type == ItemType.ProcessExec and e.argv == argv and not e.truncated
    assert (e.pid, e.parent_pid, e.creating_pid, e.creating_tid) == (500, 1, 500, 501)


def test_argv_cut_in_the_kernel_is_marked_even_when_the_text_would_fit():
    # 16,384 two-byte characters: 32 KiB read, more there; as text only 16 k code units, so the record has room.
    part = "é".encode() * (ev.ARGV_MAX // 2)
    (e,), d = decode(event(ev.EXEC, flags=ev.ARGV_TRUNCATED, argv=b"prog\0" + part[:ev.ARGV_MAX - 5],
                           argv_full=ev.ARGV_MAX * 2))
    assert e.truncated and e.command_line.endswith(TRUNCATION_MARKER)
    assert e.command_line.count(TRUNCATION_MARKER) == 1 and d.argv_truncated == 1
    assert e.argv[0] == b"prog" and part.startswith(e.argv[1][:100])


def test_a_command_line_too_long_for_the_record_is_cut_visibly_once():
    (e,), _ = decode(event(ev.EXEC, flags=ev.ARGV_TRUNCATED, argv=b"A" * ev.ARGV_MAX))
    assert e.truncated and len(e.command_line) == MAX_COMMAND_LINE
    assert e.command_line.count(TRUNCATION_MARKER) == 1


def test_kernel_threads_and_unreadable_argv_fall_back_to_the_comm():
    (k, f), d = decode(event(ev.FORK_PROCESS, flags=ev.NO_MM, comm=b"kworker/0:1"),
                       event(ev.EXEC, flags=ev.ARGV_FAULT, comm=b"prog"))
    assert k.command_line == "kworker/0:1" and f.command_line == "prog" and d.argv_unreadable == 1


def test_time_never_goes_backwards():
    out, d = decode(event(ev.FORK_THREAD, ns=10_000, tid=2), event(ev.FORK_THREAD, ns=9_000, tid=3),
                    event(ev.FORK_THREAD, ns=11_000, tid=4))
    assert [e.filetime for e in out] == [filetime(10_000), filetime(10_000), filetime(11_000)]
    assert d.time_raised == 1


def test_unknown_kinds_make_no_record():
    out, d = decode(event(99))
    assert out == [] and d.events == 1


def test_enrich_gets_the_kernels_details_of_every_record():
    seen: list[TaskDetails] = []

    def enrich(record: bytes, details: TaskDetails) -> bytes:
        seen.append(details)
        return record

    out, _ = decode(event(ev.EXEC, pid=7, argv=b"a\0", filename=b"/usr/bin/a", exe=b"/usr/bin/a.real",
                          cwd=b"/home/x", tty=b"pts3"),
                    event(ev.FORK_THREAD, pid=7, tid=8), enrich=enrich)
    assert len(out) == 2
    exec_, thread = seen
    assert (exec_.filename, exec_.exe, exec_.cwd, exec_.tty) == (b"/usr/bin/a", b"/usr/bin/a.real", b"/home/x",
                                                                  b"pts3")
    assert (exec_.uid, exec_.euid, exec_.gid, exec_.egid, exec_.loginuid, exec_.sessionid) == (1000, 0, 1001, 0,
                                                                                               None, 3)
    assert (exec_.start_boottime, exec_.parent_start_boottime, exec_.cgroup_id) == (1_000, 500, 77)
    assert thread.tid == 8 and thread.exe is None and thread.tty is None


def test_the_identity_enricher_says_which_file_ran_and_in_which_namespaces():
    from etwmon.records import ExeFlags
    from etwmon.sources.bpf._details import task_enricher

    dev = (8 << 20) | 0x123  # major 8, minor 0x123 as the kernel numbers it inside
    enrich = task_enricher(KernelClock(CLOCK_BOOTTIME, offset_ns=OFFSET))
    (known, memfd, none), _ = decode(
        event(ev.EXEC, pid=9, argv=b"a\0", exe=b"/usr/bin/a", exe_ino=4242, exe_dev=dev,
              exe_flags=ev.EXE_KNOWN | ev.EXE_SETUID | ev.EXE_SETGID, mnt_ns=4026531841, pid_ns=4026531836,
              ns_pid=1),
        event(ev.FORK_PROCESS, pid=10, argv=b"b\0", exe_ino=7, exe_dev=1,
              exe_flags=ev.EXE_KNOWN | ev.EXE_MEMFD | ev.EXE_DELETED),
        event(ev.FORK_PROCESS, pid=11, flags=ev.NO_MM), enrich=enrich)
    assert known.exe_device == os.makedev(8, 0x123) and known.exe_inode == 4242
    assert known.exe_flags == ExeFlags.SETUID | ExeFlags.SETGID
    assert (known.mnt_ns, known.pid_ns, known.ns_pid, known.cgroup_id) == (4026531841, 4026531836, 1, 77)
    assert memfd.exe_flags == ExeFlags.MEMFD | ExeFlags.DELETED and memfd.exe_inode == 7
    assert memfd.mnt_ns is None and memfd.pid_ns is None and memfd.ns_pid is None
    assert none.exe_device is none.exe_inode is none.exe_flags is None  # no executable: unknown, not 0


# --- the reader's stop path, on a ring in memory -----------------------------------------------------------------


class MemoryRing:
    """What BpfSource reads of a BPF ring buffer (RingBuffer's interface), over a bytearray the test fills."""

    BUSY, DISCARD = 1 << 31, 1 << 30

    def __init__(self, size: int = 1 << 16) -> None:
        self.data = bytearray(2 * size)
        self.mask = size - 1
        self.fd = -1
        # The position words as the pages hold them, for the pass in C (RingBuffer.position_words).
        self._cons, self._prod = ctypes.c_uint64(0), ctypes.c_uint64(0)
        self.position_words = (self._cons, self._prod)
        self.closed = False

    @property
    def cons(self) -> int:
        return self._cons.value

    @cons.setter
    def cons(self, pos: int) -> None:
        self._cons.value = pos

    @property
    def prod(self) -> int:
        return self._prod.value

    @prod.setter
    def prod(self, pos: int) -> None:
        self._prod.value = pos

    def add(self, sample: bytes, busy: bool = False) -> int:
        """Write a record at the producer position; the data pages are mapped twice in a row (as the kernel's
        are), so a record that runs past the ring's end is also at the start, and the reverse."""
        at = self.prod & self.mask
        size = self.mask + 1
        record = (len(sample) | (self.BUSY if busy else 0)).to_bytes(4, "little") + b"\0" * 4 + sample
        for i, byte in enumerate(record):
            self.data[(at + i) & self.mask] = self.data[((at + i) & self.mask) + size] = byte
        self.prod += (len(sample) + 8 + 7) & ~7
        return at

    def commit_all_mappings(self, at: int) -> None:
        self.data[at + 3] &= 0x7F
        self.data[at + 3 + self.mask + 1] &= 0x7F

    def commit(self, at: int) -> None:
        self.commit_all_mappings(at)

    def header(self, at: int) -> int:
        return int.from_bytes(self.data[at:at + 4], "little")

    def consumer_pos(self) -> int:
        return self.cons

    def producer_pos(self) -> int:
        return self.prod

    def advance(self, pos: int) -> None:
        self.cons = pos

    def close(self) -> None:
        self.closed = True


class Counter:
    """The kernel's per-CPU loss counter: ``bumps`` more each time it is read after ``after`` reads."""

    def __init__(self, after: int = 10**9, bumps: int = 0) -> None:
        self.reads, self.after, self.bumps, self.value = 0, after, bumps, 0

    def total(self) -> int:
        self.reads += 1
        if self.reads > self.after:
            self.value += self.bumps
        return self.value


def reading_source(ring: MemoryRing, lost: Counter) -> BpfSource:
    source = BpfSource()
    source._ring, source._lost = ring, lost
    source._decoder = ev.EventDecoder(source._no_sink, KernelClock(CLOCK_BOOTTIME, offset_ns=OFFSET))
    source._mover = WireMover(source._decoder)
    return source


def test_stop_counts_a_record_still_reserved_after_the_wait_and_reads_the_committed_ones_behind_it(monkeypatch):
    monkeypatch.setattr(bpf_module, "_BUSY_WAIT", 0.05)
    ring = MemoryRing()
    ring.add(event(ev.FORK_THREAD, pid=1, tid=2))
    ring.add(event(ev.FORK_THREAD, pid=1, tid=3), busy=True)  # a program that never commits
    ring.add(event(ev.FORK_THREAD, pid=1, tid=4))
    source, sink = reading_source(ring, Counter()), ListSink()
    source._decoder.push = sink.push
    source._final_drain(sink)
    assert [e.tid for e in sink.events()] == [2, 4]
    assert sink.lost_total == 1 and source.skipped == 1 and ring.cons == ring.prod
    assert source.stats()["lost"] == 1


def test_stop_waits_for_a_record_committed_during_the_wait(monkeypatch):
    ring = MemoryRing()
    at = ring.add(event(ev.FORK_THREAD, pid=1, tid=2), busy=True)
    source, sink = reading_source(ring, Counter()), ListSink()
    source._decoder.push = sink.push

    threading.Timer(0.02, ring.commit, args=(at,)).start()
    source._final_drain(sink)
    assert [e.tid for e in sink.events()] == [2] and sink.lost_total == 0 and source.skipped == 0


def test_a_record_shorter_than_an_event_and_losses_counted_after_the_last_pass_are_reported():
    ring = MemoryRing()
    ring.add(b"\0" * 16)  # shorter than any event
    ring.add(event(ev.FORK_THREAD, pid=1, tid=2))
    lost = Counter(after=1, bumps=3)  # the kernel counts 3 more after the pass's own read
    source, sink = reading_source(ring, lost), ListSink()
    source._decoder.push = sink.push
    source._final_drain(sink)
    assert [e.tid for e in sink.events()] == [2]
    assert sink.lost_total == source.stats()["lost"] == 1 + lost.value and lost.value >= 3


def test_close_while_run_still_reads_leaves_the_ring_to_the_reading_thread():
    ring = MemoryRing()
    source = reading_source(ring, Counter())
    object_ = type("Obj", (), {"detach": lambda self: None, "closed": False,
                               "close": lambda self: setattr(self, "closed", True)})()
    source._object = object_
    source._wake.open()
    ring.fd, never = os.pipe()  # poll()ed beside the wake pipe: never readable
    in_drain, go_on = threading.Event(), threading.Event()
    real_drain = source._drain

    def slow_drain(sink, final=False):
        in_drain.set()
        go_on.wait(5)
        return real_drain(sink, final)

    source._drain = slow_drain
    runner = threading.Thread(target=source.run, args=(ListSink(),))
    runner.start()
    assert in_drain.wait(5)
    source.close()  # as Monitor.stop does after its join timed out
    assert not ring.closed and not object_.closed  # still in use by run()
    go_on.set()
    runner.join(5)
    assert not runner.is_alive() and ring.closed and object_.closed and source._ring is None
    os.close(ring.fd)
    os.close(never)


def kernel_thread_record(tid: int, pid: int, time_: int, guid: bytes = b"\1" * 16, exit_code: int | None = None):
    """A thread record as the programs write it (etwmon_event.h): the book's layout, then the guid's block."""
    from etwmon.records import encode_thread_create, encode_thread_exit, pack_field, with_packed
    base = encode_thread_create(time_, tid, pid) if exit_code is None else encode_thread_exit(time_, tid, pid,
                                                                                            exit_code)
    return with_packed(base, 0, [pack_field(1, guid)])


@pytest.mark.parametrize("n", [3, 200])
def test_records_the_kernel_wrote_move_whole_in_ring_order_with_times_raised(n):
    ring, sink = MemoryRing(1 << 20), BatchSink()
    t = filetime(1_000)
    written = [kernel_thread_record(1000 + i, 7, t + i, exit_code=i % 2 or None) for i in range(n)]
    written[n // 2] = kernel_thread_record(5000, 7, t - 50)  # stamped on another CPU, a little earlier
    written[n - 1] = kernel_thread_record(6000, 7, t + n + 1000)  # after the event below
    for record in written[:n - 1]:
        ring.add(record)
    ring.add(event(ev.EXEC, ns=1_000 + 100 * (n + 10), pid=7, argv=b"prog\0"))  # an event user space writes, in between
    ring.add(written[n - 1])
    source = reading_source(ring, Counter())
    source._decoder.push = sink.push
    source._drain(sink)
    out = sink.events()
    assert [e.type for e in out].count(ItemType.ProcessExec) == 1 and out[n - 1].type == ItemType.ProcessExec
    others = [e for e in out if e.type != ItemType.ProcessExec]
    assert [(e.tid, e.pid, e.process_guid) for e in others] == [(r.tid, r.pid, r.process_guid)
                                                                for r in parse(b"".join(written))]
    times = [e.filetime for e in out]
    assert times == sorted(times) and out[n // 2].filetime == t + n // 2 - 1
    assert source._decoder.time_raised == 1 and source.stats()["kernel_written"] == n
    assert (sum(sink.batches) == n - 1) == (n - 1 > 64)  # a big run moves in one batch, a small one by record


def test_a_run_of_records_the_kernel_wrote_that_wraps_past_the_rings_end_moves_whole():
    ring, sink = MemoryRing(1 << 13), BatchSink()  # 8 KiB: 200 records of 64 ring bytes wrap it
    t = filetime(1_000)
    written = [kernel_thread_record(1000 + i, 7, t + i) for i in range(200)]
    source = reading_source(ring, Counter())
    source._decoder.push = sink.push
    for chunk in (written[:40], written[40:140], written[140:]):  # runs of > 64 records (one batch each) that
        # run past the ring's end, each less than the ring holds
        for record in chunk:
            ring.add(record)
        source._drain(sink)
    assert [e.tid for e in sink.events()] == [1000 + i for i in range(200)]
    assert ring.cons == ring.prod and source.stats()["kernel_written"] == 200
    assert sink.batches == [100]  # the wrapping run of 100 went as one batch (runs of 64 or fewer go one by one)


# --- availability --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, words", [
    ("not root", "root"), ("no btf", "BTF"), ("old kernel", "too old"), ("lockdown", "lockdown"),
    ("no libbpf", "libbpf.so.1"),
])
def test_unavailable_reasons_say_why_and_the_fix(monkeypatch, tmp_path, case, words):
    monkeypatch.setattr(bpf_module, "has_capability", lambda cap: case != "not root")
    monkeypatch.setattr(bpf_module, "BTF_PATH", str(tmp_path / ("missing" if case == "no btf" else "btf")))
    (tmp_path / "btf").write_bytes(b"")
    monkeypatch.setattr(bpf_module, "_kernel_version", lambda: (5, 4) if case == "old kernel" else (6, 18))
    lockdown = tmp_path / "lockdown"
    lockdown.write_text("none integrity [confidentiality]\n" if case == "lockdown" else "[none] integrity\n")
    monkeypatch.setattr(bpf_module, "_LOCKDOWN", str(lockdown))
    from etwmon.sources.bpf import _libbpf

    def no_libbpf():
        raise OSError("libbpf.so.1: cannot open shared object file")

    if case == "no libbpf":
        monkeypatch.setattr(_libbpf, "load_libbpf", no_libbpf)
    reason = BpfSource.unavailable_reason()
    assert reason is not None and words in reason and "--source netlink" in reason


def test_capabilities_instead_of_root_are_enough(monkeypatch):
    monkeypatch.setattr(bpf_module, "has_capability", lambda cap: cap in (38, 39))  # CAP_PERFMON, CAP_BPF
    reason = BpfSource.unavailable_reason()
    assert reason is None or "root" not in reason


def test_the_exit_program_is_chosen_from_the_kernels_btf():
    require(shutil.which("bpftool") is not None and os.path.exists(bpf_module.BTF_PATH), "bpftool and BTF needed")
    from etwmon.sources.bpf._libbpf import load_libbpf, tracepoint_arguments
    try:
        libbpf = load_libbpf()
    except OSError as exc:
        pytest.skip(f"libbpf.so.1: {exc}")
    dump = subprocess.run(["bpftool", "btf", "dump", "file", bpf_module.BTF_PATH, "format", "c"], check=True,
                          capture_output=True, text=True).stdout
    protos = {}
    for line in dump.splitlines():
        if line.startswith("typedef void (*btf_trace_sched_process_"):
            name = line.split("(*btf_trace_", 1)[1].split(")", 1)[0]
            protos[name] = line.split(")(", 1)[1].count(",")  # arguments after the context pointer
    assert protos["sched_process_fork"] == 2 and protos["sched_process_exec"] == 3
    for name, count in protos.items():
        assert tracepoint_arguments(libbpf, name) == count, name
    assert tracepoint_arguments(libbpf, "no_such_tracepoint") is None
    wanted = "etwmon_exit_group_dead" if protos["sched_process_exit"] >= 2 else "etwmon_exit"
    assert bpf_module.choose_exit_program(libbpf) == wanted


def test_options_are_checked():
    for bad in (0, 1000, 3 * 4096, True, "big"):
        with pytest.raises(ValueError):
            BpfSource(ring_size=bad)
    with pytest.raises(ValueError):
        BpfSource(batch_wait=-1)
    with pytest.raises(TypeError):
        BpfSource(enrich=3)
    with pytest.raises(TypeError):
        BpfSource(nonsense=1)


# --- live kernel (root) ----------------------------------------------------------------------------------------


def exited(pid: int):
    return lambda evs: any(e.type == ItemType.ProcessExit and e.pid == pid for e in evs)


@pytest.fixture(scope="module")
def bpf_ok():
    reason = BpfSource.unavailable_reason()
    require(reason is None, f"bpf: {reason}")


@pytest.fixture
def bpf_monitor(bpf_ok):
    with etwmon.Monitor(source="bpf", max_items=200_000) as mon:
        yield mon


def bpf_fds(pid: int | str = "self") -> dict[str, set[int]]:
    """The BPF programs and links a process holds, by kernel id, from /proc/<pid>/fdinfo."""
    out: dict[str, set[int]] = {"prog": set(), "link": set()}
    base = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(base):
        try:
            info = Path(base, fd).read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
        if "link_id" in fields:
            out["link"].add(int(fields["link_id"]))
        elif "prog_id" in fields and "prog_type" in fields:
            out["prog"].add(int(fields["prog_id"]))
    return out


def all_gone(prog_ids, timeout: float = 5.0) -> bool:
    """Whether the kernel freed these programs within ``timeout`` (it frees them after an RCU grace period)."""
    deadline = time.monotonic() + timeout
    while any(prog_exists(i) for i in prog_ids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def prog_exists(prog_id: int) -> bool:
    from etwmon.sources.bpf._libbpf import load_libbpf
    fn = load_libbpf().lib.bpf_prog_get_fd_by_id
    fn.argtypes, fn.restype = [ctypes.c_uint32], ctypes.c_int
    fd = fn(prog_id)
    if fd >= 0:
        os.close(fd)
        return True
    return False


@pytest.mark.root
def test_live_exit_codes_and_exec_argv(bpf_monitor):
    code3, killed = exit_3_and_sigkill()
    events = read_until(bpf_monitor, lambda evs: exited(code3)(evs) and exited(killed)(evs))
    exits = {e.pid: e.exit_code for e in of_type(events, ItemType.ProcessExit)}
    assert exits[code3] == 3 and exits[killed] == 137
    mine = [e for e in events if getattr(e, "pid", None) == code3]
    assert [e.type for e in mine] == [ItemType.ProcessCreate, ItemType.ProcessExec, ItemType.ProcessExit]
    assert mine[1].argv == [b"sh", b"-c", b"exit 3"] and mine[1].parent_pid == os.getpid()
    assert bpf_monitor.stats.lost == 0


@pytest.mark.root
def test_live_times_are_the_kernels_and_close_to_the_wall_clock(bpf_monitor):
    before, after, events, mine = timed_sleep(bpf_monitor)
    for e in mine:
        assert before - 20_000 <= e.filetime <= after + 20_000, e  # within 2 ms of the wall clock around it
    assert 0.29 <= (mine[-1].filetime - mine[1].filetime) / 1e7 < 2.0  # exec -> exit: the 0.3 s it slept
    times = [e.filetime for e in events]
    assert times == sorted(times)


@pytest.mark.root
def test_live_threads(bpf_monitor):
    tid = run_one_thread()
    events = read_until(bpf_monitor, lambda evs: any(e.type == ItemType.ThreadExit and e.tid == tid for e in evs)
                   and any(e.type == ItemType.ProcessExit and e.pid != tid and e.pid in
                           {x.pid for x in evs if getattr(x, "tid", None) == tid} for e in evs))
    (create,) = [e for e in of_type(events, ItemType.ThreadCreate) if e.tid == tid]
    (exit_,) = [e for e in of_type(events, ItemType.ThreadExit) if e.tid == tid]
    assert create.pid == exit_.pid != tid and exit_.exit_code == 0
    assert [e.exit_code for e in of_type(events, ItemType.ProcessExit) if e.pid == create.pid] == [0]


@pytest.mark.root
def test_live_fork_without_exec_inherits_the_parents_argv_read_in_the_kernel(bpf_monitor):
    code = ("import os\n"
            "pid = os.fork()\n"
            "if pid == 0: os._exit(5)\n"
            "os.waitpid(pid, 0); print(os.getpid(), pid, flush=True)\n")
    hostile = "it's \"quoted\" $(id)\n\ttab"
    child = subprocess.run([sys.executable, "-c", code, hostile, b"\xff\xferaw".decode("utf-8", "surrogateescape")],
                           capture_output=True, text=True, check=True)
    parent, grandchild = map(int, child.stdout.split())
    events = read_until(bpf_monitor, exited(grandchild))
    (create,) = [e for e in of_type(events, ItemType.ProcessCreate) if e.pid == grandchild]
    assert (create.parent_pid, create.creating_pid, create.creating_tid) == (parent, parent, parent)
    assert create.argv == [sys.executable.encode(), b"-c", code.encode(), hostile.encode(), b"\xff\xferaw"]
    assert [e.exit_code for e in of_type(events, ItemType.ProcessExit) if e.pid == grandchild] == [5]
    assert not [e for e in of_type(events, ItemType.ProcessExec) if e.pid == grandchild]


@pytest.mark.root
def test_live_long_argv_exact_and_longer_marked_truncated(bpf_monitor):
    exact = [b"/bin/true", b"x" * 20_480, b"a b\n\xff" * 100]
    wide = [b"/bin/true", "é".encode() * 20_000]  # 40,000 bytes: cut in the kernel, though the text would fit
    huge = [b"/bin/true", b"A" * 100_000, b"tail"]
    pids = {}
    for argv in (exact, wide, huge):
        pid = os.posix_spawn(argv[0], argv, {})
        os.waitpid(pid, 0)
        pids[pid] = argv
    events = read_until(bpf_monitor, lambda evs: all(exited(p)(evs) for p in pids))
    execs = {e.pid: e for e in of_type(events, ItemType.ProcessExec) if e.pid in pids}
    by_argv = {id(argv): execs[pid] for pid, argv in pids.items()}
    assert by_argv[id(exact)].argv == exact and not by_argv[id(exact)].truncated
    for argv in (wide, huge):
        e = by_argv[id(argv)]
        assert e.truncated and e.command_line.count(TRUNCATION_MARKER) == 1
        assert command_line_from_argv(argv).startswith(e.command_line[:-len(TRUNCATION_MARKER) - 1])
    huge_exec = by_argv[id(huge)]
    if huge_exec.details() is None:
        assert len(huge_exec.command_line) == MAX_COMMAND_LINE
    else:  # the command line leaves room for the extension block (README): together they fill the record
        assert MAX_RECORD_SIZE - 8 <= len(huge_exec.encode()) <= MAX_RECORD_SIZE
        assert len(huge_exec.command_line) > MAX_COMMAND_LINE - 4200


NON_LEADER_EXEC = r"""
import os, threading
def run():
    print(threading.get_native_id(), flush=True)
    os.execv("/bin/sh", ["/bin/sh", "-c", "exit 4", "non-leader-exec"])
t = threading.Thread(target=run)
t.start()
t.join()
"""


@pytest.mark.root
def test_live_non_leader_thread_exec_gives_one_exec_and_no_phantom_exit(bpf_monitor):
    child = subprocess.Popen([sys.executable, "-c", NON_LEADER_EXEC], stdout=subprocess.PIPE, text=True)
    tid = int(child.stdout.readline())
    assert child.wait(10) == 4
    child.stdout.close()
    events = read_until(bpf_monitor, exited(child.pid))
    mine = [e for e in events if getattr(e, "pid", None) == child.pid]
    kinds = [e.type for e in mine]
    assert kinds.count(ItemType.ProcessExit) == 1 and kinds[-1] == ItemType.ProcessExit
    assert mine[-1].exit_code == 4
    sh = [e for e in of_type(mine, ItemType.ProcessExec) if e.argv[0] == b"/bin/sh"]
    assert len(sh) == 1 and sh[0].argv == [b"/bin/sh", b"-c", b"exit 4", b"non-leader-exec"]
    assert sh[0].creating_tid == tid  # the thread that called exec
    # The thread that exec'd gave up its id for the leader's: that id ends once, the leader's never does.
    assert [e.tid for e in of_type(mine, ItemType.ThreadExit)] == [tid]
    assert [e.tid for e in of_type(mine, ItemType.ThreadCreate)] == [tid]


LEADER_LEAVES_FIRST_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>
static void *last(void *arg) { printf("%d\n", (int)syscall(SYS_gettid)); fflush(stdout); usleep(200000); exit(3); }
int main(void) { pthread_t t; pthread_create(&t, NULL, last, NULL); pthread_exit(NULL); }
"""


@pytest.mark.root
def test_live_leader_ending_first_is_a_thread_exit_and_the_last_thread_ends_the_process(bpf_monitor, tmp_path):
    cc = shutil.which("gcc") or shutil.which("cc")
    require(cc is not None, "gcc is needed to build the test program")
    (tmp_path / "leader.c").write_text(LEADER_LEAVES_FIRST_C)
    subprocess.run([cc, "-pthread", "-o", str(tmp_path / "leader"), str(tmp_path / "leader.c")], check=True)
    child = subprocess.Popen([str(tmp_path / "leader")], stdout=subprocess.PIPE, text=True)
    tid = int(child.stdout.readline())
    assert child.wait(10) == 3
    child.stdout.close()
    events = read_until(bpf_monitor, exited(child.pid))
    ends = [(e.type, getattr(e, "tid", None), e.exit_code) for e in events
            if e.type in (ItemType.ThreadExit, ItemType.ProcessExit) and e.pid == child.pid]
    # pid == tgid is not "the last thread": the leader's own end is a thread's, the process ends with the last
    assert ends == [(ItemType.ThreadExit, child.pid, 0), (ItemType.ThreadExit, tid, 3),
                    (ItemType.ProcessExit, None, 3)]


@pytest.mark.root
def test_live_records_the_kernel_writes_carry_the_guid_and_image_the_table_gives(bpf_monitor, tmp_path):
    """Thread records and exits are written in the kernel (with their ProcessGuid): the same guid as the
    ProcessCreate the identity stage made, the exit's image the exec's; a non-ASCII image is written in user
    space instead, every byte kept."""
    code = "import os, threading; t = threading.Thread(target=print); t.start(); t.join(); print(os.getpid())"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(child.communicate()[0].split()[-1])
    odd = tmp_path / "caf\u00e9 d\u00efr"
    odd.mkdir()
    shutil.copy("/bin/true", odd / "tr\u00fce")
    other = subprocess.Popen([str(odd / "tr\u00fce")])
    other.wait()
    events = read_until(bpf_monitor, lambda evs: exited(pid)(evs) and exited(other.pid)(evs))
    mine = [e for e in events if getattr(e, "pid", None) == pid]
    (exec_,) = of_type(mine, ItemType.ProcessExec)
    threads = of_type(mine, ItemType.ThreadCreate) + of_type(mine, ItemType.ThreadExit)
    (end,) = of_type(mine, ItemType.ProcessExit)
    assert len(threads) == 2 and {e.process_guid for e in threads} == {exec_.process_guid} == {end.process_guid}
    assert end.image == exec_.image == os.path.realpath(sys.executable) and end.start_filetime == exec_.start_filetime
    assert end.lifetime is not None and end.lifetime.total_seconds() > 0
    (odd_exec,) = [e for e in events if e.type == ItemType.ProcessExec and e.pid == other.pid]
    (odd_end,) = [e for e in events if e.type == ItemType.ProcessExit and e.pid == other.pid]
    assert odd_end.image == odd_exec.image == str(odd / "tr\u00fce") and odd_end.process_guid == odd_exec.process_guid
    stats = bpf_monitor.stats.source_stats
    assert bpf_monitor.source.wire and stats["kernel_written"] >= 3


EXIT_GROUP_C = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <unistd.h>
#include <sys/syscall.h>
static volatile int started;
static void *spin(void *arg) {
    printf("%d\n", (int)syscall(SYS_gettid)); fflush(stdout);
    __sync_fetch_and_add(&started, 1);
    for (;;) sched_yield();  /* live and runnable when exit_group comes */
}
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    pthread_t t;
    for (int i = 0; i < n; i++) pthread_create(&t, NULL, spin, NULL);
    while (started < n) sched_yield();
    usleep(20000);
    syscall(SYS_exit_group, 7);
}
"""


@pytest.mark.root
def test_live_exit_group_of_many_running_threads_ends_the_process_once(bpf_monitor, tmp_path):
    """Dozens of live threads ended by one exit_group: one ProcessExit per process, one ThreadExit per other
    thread, none twice, and the exit names the process its create named (the leader's start time)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    require(cc is not None, "gcc is needed to build the test program")
    (tmp_path / "group.c").write_text(EXIT_GROUP_C)
    subprocess.run([cc, "-O1", "-pthread", "-o", str(tmp_path / "group"), str(tmp_path / "group.c")], check=True)
    starts: dict[tuple[int, int], int] = {}  # (kind, pid) -> the start time the kernel gave

    def record_start(record: bytes, task: TaskDetails) -> bytes:
        if task.kind in (ev.FORK_PROCESS, ev.EXIT_PROCESS):
            starts[task.kind, task.pid] = task.start_boottime
        return record

    runs = []
    with etwmon.Monitor(source=BpfSource(enrich=record_start), identity=False) as raw:
        for _ in range(12):
            child = subprocess.Popen([str(tmp_path / "group"), "48"], stdout=subprocess.PIPE, text=True)
            out, _ = child.communicate(timeout=60)
            assert child.returncode == 7
            runs.append((child.pid, [int(x) for x in out.split()]))
        events = read_until(bpf_monitor, lambda evs: all(exited(pid)(evs) for pid, _ in runs), timeout=60)
        read_until(raw, lambda evs: all(exited(pid)(evs) for pid, _ in runs), timeout=60)
    time.sleep(0.3)
    events += read_until(bpf_monitor, None, timeout=0.5)
    for pid, tids in runs:
        assert len(tids) == 48
        mine = [e for e in events if getattr(e, "pid", None) == pid]
        exits = of_type(mine, ItemType.ProcessExit)
        assert [e.exit_code for e in exits] == [7], exits
        ended = collections.Counter(e.tid for e in of_type(mine, ItemType.ThreadExit))
        assert all(n == 1 for n in ended.values()), ended
        # every other thread ends as a thread; the leader does too when another thread was the last to go
        assert set(ended) - {pid} == set(tids)
        assert all(e.exit_code == 7 for e in of_type(mine, ItemType.ThreadExit))
        creates = [e for e in mine if e.type in (ItemType.ProcessCreate, ItemType.ProcessExec)]
        assert creates and {e.process_guid for e in creates} == {exits[0].process_guid}
        assert exits[0].start_filetime == creates[0].start_filetime
        assert starts[ev.EXIT_PROCESS, pid] == starts[ev.FORK_PROCESS, pid]  # the leader's, whoever ends last
    assert bpf_monitor.stats.lost == 0


@pytest.mark.root
def test_live_the_executable_and_namespaces_are_the_files_and_namespaces_stat_sees(bpf_monitor):
    child = subprocess.Popen(["/bin/sleep", "0.2"])
    child.wait()
    events = read_until(bpf_monitor, exited(child.pid))
    (exec_,) = [e for e in of_type(events, ItemType.ProcessExec) if e.pid == child.pid]
    binary = os.stat(os.path.realpath("/bin/sleep"))
    assert (exec_.exe_device, exec_.exe_inode) == (binary.st_dev, binary.st_ino)
    assert exec_.exe_flags == 0
    assert exec_.mnt_ns == os.stat("/proc/self/ns/mnt").st_ino
    assert exec_.pid_ns == os.stat("/proc/self/ns/pid").st_ino and exec_.ns_pid == child.pid
    assert exec_.cgroup_id and exec_.cgroup_id > 0


@pytest.mark.root
def test_live_two_instances_side_by_side(bpf_ok):
    with etwmon.Monitor(source="bpf") as one, etwmon.Monitor(source="bpf") as two:
        child = subprocess.Popen(["sh", "-c", "exit 3"])
        child.wait()
        for mon in (one, two):
            events = read_until(mon, exited(child.pid))
            assert [e.exit_code for e in of_type(events, ItemType.ProcessExit) if e.pid == child.pid] == [3]
        ids_one = one.source._object  # two loaded objects, not one shared
        assert ids_one is not two.source._object
    held = bpf_fds()
    assert not held["prog"] and not held["link"]


@pytest.mark.root
def test_live_stop_and_an_exception_leave_nothing_attached(bpf_ok):
    before = bpf_fds()
    with etwmon.Monitor(source="bpf") as mon:
        during = bpf_fds()
        assert len(during["prog"] - before["prog"]) == 3 and len(during["link"] - before["link"]) == 3
        subprocess.run(["true"])
        read_until(mon, None, timeout=0.5)
    after = bpf_fds()
    assert after == before
    assert all_gone(during["prog"] - before["prog"])

    def broken(record: bytes, details: TaskDetails) -> bytes:
        raise RuntimeError("enrichment failed")

    mon = etwmon.Monitor(source=BpfSource(enrich=broken))
    mon.start()
    try:
        subprocess.run(["true"])
        with pytest.raises(etwmon.SourceError):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                mon.wait(0.2)
                mon.readinto(bytearray(1 << 16))
    finally:
        mon.close()
    assert bpf_fds() == before


KILLED_CHILD = r"""
import json, os, sys, time
from etwmon.sources.bpf import BpfSource
source = BpfSource()
source.open()
ids = []
for fd in os.listdir("/proc/self/fdinfo"):
    try:
        info = open(f"/proc/self/fdinfo/{fd}").read()
    except OSError:
        continue
    fields = dict(l.split(":", 1) for l in info.splitlines() if ":" in l)
    if "prog_id" in fields and "prog_type" in fields and "link_id" not in fields:
        ids.append(int(fields["prog_id"]))
print(json.dumps(ids), flush=True)
time.sleep(60)
"""


@pytest.mark.root
def test_live_sigkill_leaves_no_program_attached(bpf_ok):
    env = dict(os.environ, PYTHONPATH=str(Path(etwmon.__file__).parent.parent))
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD], stdout=subprocess.PIPE, text=True, env=env)
    try:
        ids = json.loads(child.stdout.readline())
        assert len(ids) == 3 and all(prog_exists(i) for i in ids)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    assert all_gone(ids)


@pytest.mark.root
@pytest.mark.slow
def test_storm_of_2000_fork_exec_exit_is_exact_and_complete(bpf_monitor, storm_tools):
    out = subprocess.run([str(storm_tools["forkexec"]), "2000", "8", "/bin/true", "bpf-storm-%d"], check=True,
                         capture_output=True, text=True).stdout.split("\n")
    index = {int(line.split()[1]): int(line.split()[0]) for line in out[1:] if line}
    pids = collections.Counter(int(line.split()[1]) for line in out[1:] if line)
    events = read_until(bpf_monitor, lambda evs: sum(1 for e in evs if e.type == ItemType.ProcessExit and e.pid in pids)
                   >= 2000, timeout=60)
    stats = bpf_monitor.stats
    assert sum(pids.values()) == 2000
    for item in (ItemType.ProcessCreate, ItemType.ProcessExec, ItemType.ProcessExit):
        assert collections.Counter(e.pid for e in of_type(events, item) if e.pid in pids) == pids, item
    # pids can repeat within a storm; every exec's argv is exactly one of those its pid ran
    wanted = collections.defaultdict(set)
    for line in out[1:]:
        if line:
            i, pid = map(int, line.split())
            wanted[pid].add(f"bpf-storm-{i}".encode())
    for e in of_type(events, ItemType.ProcessExec):
        if e.pid in pids:
            assert e.argv[0] == b"/bin/true" and e.argv[1] in wanted[e.pid] and len(e.argv) == 2
    assert index and stats.lost == 0 and stats.dropped == 0 and not of_type(events, ItemType.RecordsLost)


@pytest.mark.root
@pytest.mark.slow
def test_storm_of_20000_threads_loses_nothing(bpf_monitor, storm_tools):
    out = subprocess.run([str(storm_tools["threads"]), "20000", "64"], check=True, capture_output=True,
                         text=True).stdout.split()
    pid, tids = int(out[0]), collections.Counter(map(int, out[1:]))
    events = read_until(bpf_monitor, exited(pid), timeout=60)
    stats = bpf_monitor.stats
    assert sum(tids.values()) == 20000
    assert collections.Counter(e.tid for e in of_type(events, ItemType.ThreadCreate) if e.pid == pid) == tids
    assert collections.Counter(e.tid for e in of_type(events, ItemType.ThreadExit) if e.pid == pid) == tids
    assert stats.lost == 0 and stats.dropped == 0


@pytest.mark.root
@pytest.mark.slow
def test_forced_loss_a_one_page_ring_counts_every_event_it_had_no_room_for(bpf_ok, storm_tools):
    with etwmon.Monitor(source="bpf", max_items=500_000, ring_size=64 << 20) as reference:
        t0 = filetime_now()
        source = BpfSource(ring_size=4096)
        mon = etwmon.Monitor(source=source, max_items=200_000)
        children = fork_storm_while_stalled(mon, str(storm_tools["forks"]), 400)
        time.sleep(0.3)
        mon.stop()
        t1 = filetime_now()
        events = read_until(mon, None, timeout=10)
        stats = mon.stats
        mon.close()
        everything = [e for e in read_until(reference, None, timeout=2) if t0 <= e.filetime <= t1]
        assert reference.stats.lost == 0
    expected = collections.Counter({(ItemType.ProcessCreate, pid): n for pid, n in children.items()})
    expected.update({(ItemType.ProcessExit, pid): n for pid, n in children.items()})
    seen = collections.Counter((e.type, e.pid) for e in events
                               if e.type in (ItemType.ProcessCreate, ItemType.ProcessExit) and e.pid in children)
    missing = sum((expected - seen).values())
    others = sum(1 for e in everything if getattr(e, "pid", None) not in children)
    assert missing > 0, "a one-page ring behind a stalled reader should have overflowed"
    # Every storm event that did not arrive is counted; the rest of the count is others' events meanwhile.
    assert missing <= stats.lost <= missing + others
    assert sum(e.count for e in of_type(events, ItemType.RecordsLost)) == stats.lost + stats.dropped
    assert stats.dropped == 0


# --- process creates and execs the kernel writes itself ---------------------------------------------------------

#: Spaces, quotes of both kinds, an empty argument, a tab, shell characters, safe punctuation: every shlex.quote case.
HOSTILE_ARGV = ["/bin/echo", "a b", "", "it's", "plain-x.y/z:1,2@h%+=", "$HOME", 'x"y', "tab\there", "'", "--o=v"]


def grandchild_records(records: list[bytes], argv: list[str]):
    """(sh's records, the records of sh's child that ran ``argv``), from a ``sh -c '<argv>; true'`` run."""
    want = command_line_from_argv(argv)
    events = [(r, next(iter(parse(r)))) for r in records]
    execs = [(r, e) for r, e in events if e.type == ItemType.ProcessExec and e.command_line == want]
    assert execs, f"no exec of {want!r}"
    pid = execs[-1][1].pid
    return [(r, e) for r, e in events if getattr(e, "pid", None) == pid and e.type in (
        ItemType.ProcessCreate, ItemType.ProcessExec, ItemType.ProcessExit)]


@pytest.mark.root
def test_live_creates_and_execs_the_kernel_writes_are_the_bytes_the_event_path_writes(bpf_ok, monkeypatch):
    # Both monitors map the kernel's clock with one offset, so that times and guids can be compared byte for byte.
    offset = KernelClock(CLOCK_BOOTTIME).offset_ns
    monkeypatch.setattr(bpf_module, "KernelClock", lambda clock: KernelClock(clock, offset_ns=offset))
    script = shlex.join(HOSTILE_ARGV) + " >/dev/null; true"  # sh forks, its child execs echo
    with etwmon.Monitor(source="bpf", max_items=200_000) as lean, \
            etwmon.Monitor(source="bpf", max_items=200_000, kernel_creates=False) as old:
        time.sleep(0.2)
        sh = subprocess.Popen(["sh", "-c", script])
        sh.wait()
        done = exited(sh.pid)
        new_records = records_until(lean, done)
        old_records = records_until(old, done)
        lean_stats, old_stats = lean.stats.source_stats, old.stats.source_stats
        mine = grandchild_records(new_records, HOSTILE_ARGV)
        chain = lean.ancestors(mine[1][1].process_guid)
    theirs = grandchild_records(old_records, HOSTILE_ARGV)
    assert [e.type for _, e in mine] == [e.type for _, e in theirs] == [
        ItemType.ProcessCreate, ItemType.ProcessExec, ItemType.ProcessExit]
    assert old_stats["kernel_written"] > 0 and lean_stats["kernel_written"] > 0
    for (new, n), (was, w) in zip(mine[:2], theirs[:2]):
        base = 40 + 2 * (new[32] | new[33] << 8)
        assert new[16:base] == was[16:base]  # pids, command line, its NUL
        assert abs(n.filetime - w.filetime) < 20_000  # (a time is raised when two CPUs stamp out of order)
        kernel_fields = block_fields(new)
        assert kernel_fields[0] == block_fields(was)[0]  # flags
        # every field the kernel wrote, in the identity stage's order and bytes; the stage's own on top
        assert kernel_fields[1] == [(t, v) for t, v in block_fields(was)[1] if t not in (6, 8, 9)]
        assert {t for t, _ in block_fields(was)[1]} - {t for t, _ in kernel_fields[1]} == {6, 8, 9}
        assert 7 in dict(kernel_fields[1])  # ParentImage: the kernel's, the bytes the table gives
        assert n.command_line == command_line_from_argv(HOSTILE_ARGV) or n.type == ItemType.ProcessCreate
        assert n.user == w.user == "root"  # named where it is read (the default) or by the stage (in the record)
    create, exec_, exit_ = (e for _, e in mine)
    assert shlex.split(exec_.command_line) == HOSTILE_ARGV
    assert create.process_guid == exec_.process_guid == exit_.process_guid
    assert exec_.parent_process_guid == create.parent_process_guid == chain[0].process_guid
    assert chain[0].pid == sh.pid and shlex.split(chain[0].command_line) == ["sh", "-c", script]
    assert chain[1].pid == os.getpid() and chain[0].user == "root"


@pytest.mark.root
def test_live_the_kernel_writes_parent_image_the_parents_program_at_the_event(bpf_ok):
    # sh forks a subshell (its ParentImage: sh, the program it was forked running) and execs sleep; the subshell
    # then execs true, whose parent now runs sleep: the kernel reads the parent's program at the exec.
    script = "(/bin/sleep 0.3; exec /bin/true marker-pimage) & exec /bin/sleep 1"
    with etwmon.Monitor(source="bpf", max_items=200_000) as mon:  # the default: records pass as the kernel wrote them
        time.sleep(0.2)
        sh = subprocess.Popen(["/bin/sh", "-c", script])
        sh.wait()
        records = records_until(mon, exited(sh.pid))
        stats = mon.stats.source_stats
    events = [next(iter(parse(r))) for r in records]
    sub = [e for e in events if e.type == ItemType.ProcessExec and e.command_line == "/bin/true marker-pimage"]
    assert sub, "no exec of the subshell's /bin/true"
    pid = sub[0].pid
    fork = [e for e in events if e.type == ItemType.ProcessCreate and e.pid == pid]
    sh_exec = [e for e in events if e.type == ItemType.ProcessExec and e.pid == sh.pid]
    assert fork and sh_exec and sh_exec[-1].image == os.path.realpath("/bin/sleep")
    assert fork[0].parent_pid == sh.pid and fork[0].image == os.path.realpath("/bin/sh")
    assert fork[0].parent_image == fork[0].image  # forked by its parent: the parent's program, sh
    assert sub[0].parent_pid == sh.pid and sub[0].parent_image == os.path.realpath("/bin/sleep")
    assert sub[0].image == os.path.realpath("/bin/true")
    # written by the kernel (no stage field around it: no ParentCommandLine, no User in the record)
    assert sub[0].parent_command_line is None and fork[0].parent_command_line is None
    assert stats["kernel_written"] > 0


@pytest.mark.root
@pytest.mark.parametrize("full", [False, True])
def test_live_tail_json_shows_the_user_by_default_and_the_parents_command_line_with_full_identity(bpf_ok, full):
    import pwd
    import uuid

    from .helpers import Watch, assert_clean_stderr, etwmon_argv

    marker = f"etwmon-user-{uuid.uuid4().hex[:8]}"
    true = shutil.which("true")
    watch = Watch(etwmon_argv("tail", "--source", "bpf", "--json", "--batch-wait", "0",
                              *(["--full-identity"] if full else [])))
    with watch:
        watch.ready()
        subprocess.run(["sh", "-c", f"{true} {marker}; true"], check=True)
        watch.wait_out(lambda line: marker.encode() in line, what=f"the {marker} exec")
        time.sleep(0.3)
        assert watch.stop() == 0
    assert_clean_stderr(watch.stderr)
    execs = [e for e in watch.json_lines() if e["type"] == "ProcessExec" and e["command_line"] == f"{true} {marker}"]
    assert execs, watch.stdout[-2000:]
    exec_ = execs[-1]
    assert exec_["user"] == pwd.getpwuid(exec_["uid"]).pw_name == pwd.getpwuid(os.geteuid()).pw_name
    assert exec_["parent_image"] == os.path.realpath("/bin/sh")
    parent = f"sh -c '{true} {marker}; true'"
    assert exec_["parent_command_line"] == (parent if full else None)


@pytest.mark.root
def test_live_a_command_line_that_is_not_ascii_comes_as_an_event_and_survives_byte_for_byte(bpf_ok):
    argv = [b"/bin/echo", b"caf\xc3\xa9", b"\xff\xfe not utf-8", b"it's"]
    code = f"import subprocess; subprocess.run({argv!r}, stdout=subprocess.DEVNULL)"
    with etwmon.Monitor(source="bpf", identity="lean", max_items=200_000) as mon:
        time.sleep(0.2)
        child = subprocess.Popen([sys.executable, "-c", code])
        child.wait()
        events = read_until(mon, exited(child.pid))
        stats = mon.stats.source_stats
    execs = [e for e in of_type(events, ItemType.ProcessExec) if e.parent_pid == child.pid]
    assert execs and execs[-1].argv == argv
    assert execs[-1].image == "/usr/bin/echo" and execs[-1].process_guid and execs[-1].parent_process_guid
    assert stats["creates_slow"] >= 1 and stats["kernel_written"] > 0
