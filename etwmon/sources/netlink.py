"""Linux proc connector source: fork, exec and exit of every task, from the kernel's NETLINK_CONNECTOR socket.

The 40-byte ``proc_event`` (``include/uapi/linux/cn_proc.h``) is parsed here with ``struct``; losses are counted
exactly from the per-CPU sequence numbers the kernel stamps on every message (``drivers/connector/cn_proc.c``).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import select
import socket
import struct
import sys
import threading
import time
from typing import Callable, ClassVar

from .. import clock
from ..errors import SourceUnavailable
from ..records import (
    Details, command_line_from_argv, encode_process_create, encode_process_exec,
    encode_process_exit, encode_thread_create, encode_thread_exit,
)
from ._linux import CAP_NET_ADMIN, WakePipe, has_capability, require_available, set_receive_buffer
from ._proc import (
    argv_of, clock_tick_ns, details_now, host_and_boot_id, parse_stat, read_proc, snapshot,
    stat_details,
)
from .base import Sink, Source

__all__ = [
    "NetlinkSource", "ProcEventDecoder", "shell_exit_code",
    "NETLINK_CONNECTOR", "CN_IDX_PROC", "CN_VAL_PROC", "PROC_CN_MCAST_LISTEN", "PROC_CN_MCAST_IGNORE",
    "PROC_EVENT_NONE", "PROC_EVENT_FORK", "PROC_EVENT_EXEC", "PROC_EVENT_UID", "PROC_EVENT_GID",
    "PROC_EVENT_SID", "PROC_EVENT_PTRACE", "PROC_EVENT_COMM", "PROC_EVENT_NONZERO_EXIT",
    "PROC_EVENT_COREDUMP", "PROC_EVENT_EXIT", "MESSAGE_SIZE",
]

log = logging.getLogger(__name__)

# --- the kernel's constants (include/uapi/linux/connector.h, cn_proc.h, netlink.h) ----------------------------

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

PROC_EVENT_NONE = 0x00000000  # the answer to LISTEN/IGNORE ("ack")
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_UID = 0x00000004
PROC_EVENT_GID = 0x00000040
PROC_EVENT_SID = 0x00000080
PROC_EVENT_PTRACE = 0x00000100
PROC_EVENT_COMM = 0x00000200
PROC_EVENT_NONZERO_EXIT = 0x20000000
PROC_EVENT_COREDUMP = 0x40000000
PROC_EVENT_EXIT = 0x80000000

_NLMSG_NOOP, _NLMSG_ERROR, _NLMSG_DONE, _NLMSG_OVERRUN = 1, 2, 3, 4
_SOL_NETLINK, _NETLINK_DROP_MEMBERSHIP = 270, 2  # linux/socket.h, linux/netlink.h

# nlmsghdr (16) + cn_msg (20) + proc_event (40): what every proc connector message is, in host byte order.
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_CN_MSG = struct.Struct("=IIIIHH")  # id.idx, id.val, seq, ack, len, flags
_NLMSGHDR_SIZE = _NLMSGHDR.size  # 16
_CN_MSG_SIZE = _CN_MSG.size  # 20
PROC_EVENT_SIZE = 40  # what, cpu, timestamp_ns, then a 24-byte union
MESSAGE_SIZE = _NLMSGHDR_SIZE + _CN_MSG_SIZE + PROC_EVENT_SIZE  # 76
# The whole 76-byte message in one unpack (the hot path): nlmsghdr, cn_msg, what, cpu, timestamp_ns, six u32
# of the union (fork: parent_pid, parent_tgid, child_pid, child_tgid; exec: pid, tgid; exit: pid, tgid,
# exit_code, exit_signal, parent_pid, parent_tgid).
_MESSAGE = struct.Struct("=IHHII" "IIIIHH" "IIQ" "IIIIII")
_EVENT = struct.Struct("=IIQIIIIII")  # a proc_event on its own (the slow path)
_WHAT_AND_TGID = struct.Struct("=IIQII")  # what, cpu, timestamp_ns, pid, tgid of an EXEC
_LISTEN = struct.Struct("=IHHII" "IIIIHH" "I")  # what we send: nlmsghdr + cn_msg + proc_cn_mcast_op
# The union bytes each event needs (a shorter proc_event is malformed for that type).
_NEEDS = {PROC_EVENT_NONE: 20, PROC_EVENT_FORK: 32, PROC_EVENT_EXEC: 24, PROC_EVENT_EXIT: 32}
assert _MESSAGE.size == MESSAGE_SIZE and _EVENT.size == PROC_EVENT_SIZE

_SEQ_MASK = 0xFFFFFFFF
#: How far (ns) a start time may lie after the event and still be the same process: covers measuring the
#: boot-time offset; /proc's start time is cut to whole clock ticks, which only makes it earlier.
_START_SLACK_NS = 2_000_000


def shell_exit_code(wait_status: int) -> int:
    """The kernel's ``task->exit_code`` (a raw wait status) as a shell reports it: the exit status for a
    normal exit (``exit(3)`` -> 3), 128 + the signal number for a death by signal (SIGKILL -> 137)."""
    signo = wait_status & 0x7F
    return 128 + signo if signo else (wait_status >> 8) & 0xFF


class ProcEventDecoder:
    """Turns raw proc connector messages into records pushed into a Sink, counting what the kernel lost.

    ``parse_messages(buf, n)`` handles the first ``n`` bytes of one ``recv`` (one or more netlink messages);
    the live source's loop and the tests call the same code. Malformed messages are counted in
    ``parse_errors`` and skipped; it never raises on bad input.

    Loss accounting: the kernel numbers every proc connector message it sends with a per-CPU counter
    (``cn_msg.seq``) and names the CPU in ``proc_event.cpu``. It bumps the counter for every event while anyone
    listens, before offering the message to each listener, so for a socket subscribed to all events a jump in
    one CPU's sequence is exactly the number of messages this socket did not get (its buffer was full, or the
    kernel could not allocate the message). Each gap goes to ``sink.push_lost`` at once.
    """

    def __init__(self, sink: Sink | None = None, *, exec_events: bool = True, cmdline: bool = True,
                 clock_offset_ns: int | None = None, max_cached: int = 65536,
                 proc_root: str = "/proc", details: bool = False) -> None:
        self.attach(sink)
        self.exec_events = exec_events
        self.cmdline = cmdline
        #: Read the exec'd process's image, cwd, user, terminal and cgroup from /proc (for the identity stage).
        self.details = details
        # The kernel stamps events with ktime_get_ns(), i.e. CLOCK_MONOTONIC: its offset to the wall clock is
        # measured once, when the source opens.
        self.clock = clock.KernelClock(clock.CLOCK_MONOTONIC, offset_ns=clock_offset_ns)
        self._boot_offset_ns = clock.clock_offset_ns(clock.CLOCK_MONOTONIC, reference=clock.CLOCK_BOOTTIME)
        self._boot_clock = clock.KernelClock(clock.CLOCK_BOOTTIME)  # for /proc start times
        self._tick_ns = clock_tick_ns()
        self._proc = proc_root
        self.max_cached = max_cached
        #: tgid -> command line, filled at fork and exec, dropped at exit and after any loss.
        self.command_lines: dict[int, str] = {}
        self._prefetched: dict[int, bytes | None] = {}  # tgid -> cmdline read ahead of decoding (a batch)
        self._last_seq: dict[int, int] = {}
        self._first_seq: dict[int, int] = {}
        self.received = 0  # messages that carried a sequence number
        self.lost = 0
        self.parse_errors = 0
        self.seq_resets = 0  # a CPU's sequence went backwards (not counted as loss)
        self.cmdline_gone = 0  # execs whose process had exited (or been reused) before /proc was read
        self.cmdline_comm = 0  # execs whose command line is the comm (zombie, or cmdline=False)

    def attach(self, sink: Sink | None) -> None:
        """Send records and losses to ``sink`` from now on."""
        self.sink = sink
        self._push: Callable[[bytes], None] = sink.push if sink is not None else _no_sink
        self._push_lost: Callable[[int], None] = sink.push_lost if sink is not None else _no_sink

    # -- the hot path ------------------------------------------------------------------------------------

    def parse_messages(self, buf, n: int | None = None, offset: int = 0) -> None:
        """Decode ``n`` bytes of ``buf`` from ``offset`` (all of it when ``n`` is None): one or more netlink
        messages, as one ``recv`` returns them."""
        if n is None:
            n = len(buf) - offset
        if n == MESSAGE_SIZE:  # what every recv returns: one whole message
            try:
                (nl_len, nl_type, _, _, _, idx, val, seq, _, cn_len, _,
                 what, cpu, ts, a, b, c, d, _, _) = _MESSAGE.unpack_from(buf, offset)
            except struct.error:
                self.parse_errors += 1
                return
            if nl_len == MESSAGE_SIZE and cn_len == PROC_EVENT_SIZE and idx == CN_IDX_PROC and val == CN_VAL_PROC:
                self._event(what, cpu, seq, ts, a, b, c, d)
                return
        if offset:
            try:
                buf = memoryview(buf)[offset:]
            except TypeError:
                self.parse_errors += 1
                return
        self._parse_slow(buf, n)

    def parse_batch(self, buf, offsets: list[int], sizes: list[int]) -> None:
        """Decode the datagrams one batch of receives put into ``buf`` (``sizes[i]`` bytes at ``offsets[i]``),
        reading the command lines of the execs among them first (``prefetch_command_lines``)."""
        self.prefetch_command_lines(buf, offsets, sizes)
        parse = self.parse_messages
        try:
            for offset, n in zip(offsets, sizes):
                parse(buf, n, offset)
        finally:
            self._prefetched.clear()  # read for this batch only: a later exec of the same pid reads afresh

    def skip_to(self, cpu: int, seq: int, count: int) -> None:
        """``count`` messages of ``cpu``, the last numbered ``seq``, were received but not decoded (a stopping
        source out of time): count them, and any gap among them, as lost."""
        prev = self._last_seq.get(cpu)
        gap = (seq - prev) & _SEQ_MASK if prev is not None else count
        if gap >= 0x80000000:  # the sequence went backwards: only what was received is known
            self.seq_resets += 1
            gap = count
        if prev is None:
            self._first_seq[cpu] = seq
        self._last_seq[cpu] = seq
        if gap:
            self._count_lost(gap)

    def prefetch_command_lines(self, buf, offsets: list[int], sizes: list[int]) -> None:
        """Read /proc/<pid>/cmdline for every exec among a batch of received messages before decoding any of
        them: a short-lived program's command line is gone once it exits, so each one is read as early as
        possible rather than after everything queued ahead of it. ``_exec_info`` then checks, as always,
        that the pid still names the process that exec'd (a cmdline read earlier than its stat is sound)."""
        if not (self.cmdline and self.exec_events):
            return
        unpack, proc, early = _WHAT_AND_TGID.unpack_from, self._proc, self._prefetched
        for offset, size in zip(offsets, sizes):
            if size == MESSAGE_SIZE:
                what, _, _, _, tgid = unpack(buf, offset + _NLMSGHDR_SIZE + _CN_MSG_SIZE)
                if what == PROC_EVENT_EXEC and tgid not in early:
                    early[tgid] = read_proc(f"{proc}/{tgid}/cmdline")

    def _event(self, what: int, cpu: int, seq: int, ts: int, a: int, b: int, c: int, d: int) -> None:
        last = self._last_seq
        prev = last.get(cpu)
        if prev is None:
            if what == PROC_EVENT_NONE and cpu == _SEQ_MASK:
                return  # an old kernel's ack: it carries the sender's sequence, not the per-CPU count
            self._first_seq[cpu] = seq
        elif seq != prev + 1:
            gap = (seq - prev - 1) & _SEQ_MASK
            if gap < 0x80000000:
                if gap:  # (0 when the counter wrapped from 2**32 - 1 to 0)
                    self._count_lost(gap)
            else:
                self.seq_resets += 1
                self._first_seq[cpu] = seq
        last[cpu] = seq
        self.received += 1
        if what == PROC_EVENT_FORK:
            # a = parent_pid, b = parent_tgid, c = child_pid, d = child_tgid
            if c != d:
                self._push(encode_thread_create(self.clock.filetime(ts), c, d))
                return
            lines = self.command_lines
            line = lines.get(b)
            if line is None:
                line = self._inherited_command_line(b, ts)
            if len(lines) >= self.max_cached:
                self._evict_oldest()
            lines[d] = line
            self._push(encode_process_create(self.clock.filetime(ts), d, b, b, a, line))
        elif what == PROC_EVENT_EXIT:
            # a = pid, b = tgid, c = exit_code (a raw wait status)
            code = shell_exit_code(c)
            time_ = self.clock.filetime(ts)
            if a == b:
                self.command_lines.pop(b, None)
                self._push(encode_process_exit(time_, b, code))
            else:
                self._push(encode_thread_exit(time_, a, b, code))
        elif what == PROC_EVENT_EXEC:
            # a = pid (the thread that called exec), b = tgid
            if not self.exec_events:
                self.command_lines.pop(b, None)  # stale now; read again from /proc when it forks
                return
            parent, line, details = self._exec_info(b, ts)
            lines = self.command_lines
            if len(lines) >= self.max_cached and b not in lines:
                self._evict_oldest()
            lines[b] = line
            self._push(encode_process_exec(self.clock.filetime(ts), b, parent, b, a, line, details))
        # UID, GID, SID, PTRACE, COMM, COREDUMP and acks make no record.

    def _evict_oldest(self) -> None:
        lines = self.command_lines
        try:  # another thread (the combined linux source) may write exact command lines in meanwhile
            del lines[next(iter(lines))]
        except (StopIteration, RuntimeError, KeyError):
            pass

    def _parse_slow(self, buf, n: int) -> None:
        """Any number of netlink messages of any shape; whatever does not parse is counted and skipped."""
        try:
            view = memoryview(buf)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            n = min(n, len(view))
        except (TypeError, ValueError):
            self.parse_errors += 1
            return
        offset = 0
        while offset < n:
            if n - offset < _NLMSGHDR_SIZE:
                self.parse_errors += 1  # a truncated header
                return
            nl_len, nl_type, _, _, _ = _NLMSGHDR.unpack_from(view, offset)
            if nl_len < _NLMSGHDR_SIZE or nl_len > n - offset:
                self.parse_errors += 1  # a length that cannot be trusted ends this buffer
                return
            if nl_type not in (_NLMSG_NOOP, _NLMSG_ERROR, _NLMSG_OVERRUN):
                self._cn_message(view, offset + _NLMSGHDR_SIZE, nl_len - _NLMSGHDR_SIZE)
            offset += (nl_len + 3) & ~3  # NLMSG_ALIGN

    def _cn_message(self, view: memoryview, start: int, size: int) -> None:
        if size < _CN_MSG_SIZE:
            self.parse_errors += 1
            return
        idx, val, seq, _, cn_len, _ = _CN_MSG.unpack_from(view, start)
        if idx != CN_IDX_PROC or val != CN_VAL_PROC:
            return  # another connector user's message: not ours to count
        if cn_len > size - _CN_MSG_SIZE or cn_len < 16:
            self.parse_errors += 1
            return
        data = bytes(view[start + _CN_MSG_SIZE:start + _CN_MSG_SIZE + min(cn_len, PROC_EVENT_SIZE)])
        what = int.from_bytes(data[:4], sys.byteorder)
        if cn_len < _NEEDS.get(what, 16):
            self.parse_errors += 1
            return
        what, cpu, ts, a, b, c, d, _, _ = _EVENT.unpack(data.ljust(PROC_EVENT_SIZE, b"\0"))
        self._event(what, cpu, seq, ts, a, b, c, d)

    # -- loss ------------------------------------------------------------------------------------------

    def _count_lost(self, count: int) -> None:
        self.lost += count
        self._push_lost(count)
        # A missed exec or exit makes cached command lines untrustworthy (pids are reused): start afresh.
        self.command_lines.clear()

    def sequence_windows(self) -> dict[int, tuple[int, int]]:
        """Per CPU, the first and last kernel sequence number seen: every message between them was either
        received or counted in ``lost``."""
        return {cpu: (self._first_seq[cpu], last) for cpu, last in self._last_seq.items()}

    # -- /proc at fork and exec ------------------------------------------------------------------------

    def _same_process(self, starttime_ticks: int, event_ns: int) -> bool:
        """Whether a process that started at ``starttime_ticks`` (/proc, boot-time clock ticks) can be the one
        the event at ``event_ns`` (monotonic) is about: a pid reused after the event started later."""
        start_ns = starttime_ticks * self._tick_ns - self._boot_offset_ns
        if start_ns <= event_ns + _START_SLACK_NS:
            return True
        # The machine may have been suspended since we measured.
        self._boot_offset_ns = clock.clock_offset_ns(clock.CLOCK_MONOTONIC, reference=clock.CLOCK_BOOTTIME)
        return starttime_ticks * self._tick_ns - self._boot_offset_ns <= event_ns + _START_SLACK_NS

    def _exec_info(self, pid: int, event_ns: int) -> tuple[int, str, Details | None]:
        """(parent pid, command line, details or None) of the process that exec'd, read from /proc, never
        another process's.

        cmdline is read before stat and the details after it: if stat then shows a process that started before
        the exec, the pid was not reused in between (pids are not handed back to an older process), so the
        cmdline was this process's. The details are read last, so they may describe a later state (another
        exec, or none if it exited): they are flagged EventFlags.PROCFS.
        """
        proc = self._proc
        if not self.cmdline:
            raw = None
        elif pid in self._prefetched:
            raw = self._prefetched.pop(pid)
        else:
            raw = read_proc(f"{proc}/{pid}/cmdline")
        stat = read_proc(f"{proc}/{pid}/stat", 1024)
        parsed = stat_details(stat) if stat else None
        if parsed is None or not self._same_process(parsed[4], event_ns):
            self.cmdline_gone += 1
            return 0, "", None
        comm, ppid = parsed[0], parsed[1]
        details = None
        if self.details:
            details = details_now(proc, pid, parsed, self._tick_ns, self._boot_clock)
        if raw:
            return ppid, command_line_from_argv(argv_of(raw)), details
        self.cmdline_comm += 1  # an exited process (zombie) has no cmdline left, but still its comm
        return ppid, command_line_from_argv([comm]), details

    def _inherited_command_line(self, parent_tgid: int, event_ns: int) -> str:
        """The command line a forked child starts with: its parent's, from /proc when we have not seen it."""
        proc = self._proc
        raw = read_proc(f"{proc}/{parent_tgid}/cmdline") if self.cmdline else None
        stat = read_proc(f"{proc}/{parent_tgid}/stat", 1024)
        parsed = parse_stat(stat) if stat else None
        if parsed is None or not self._same_process(parsed[2], event_ns):
            return ""
        if raw:
            return command_line_from_argv(argv_of(raw))
        return command_line_from_argv([parsed[0]])


#: What to do instead, in command-line terms (the library's users read ``--source procfs`` as ``source="procfs"``).
_FALLBACK = "use --source procfs (polling: can miss short-lived processes)"
_ROOT_OR_FALLBACK = f"run as root, or {_FALLBACK}"


def _no_sink(_: object) -> None:
    raise RuntimeError("ProcEventDecoder has no sink: call attach(sink) first")


def _probe_unprivileged() -> str | None:
    """Why this process, without CAP_NET_ADMIN, cannot join the proc connector's group here, or None when it can.

    Decided by trying: mainline Linux lets any user join since 6.6 (``cn_bind`` in drivers/connector/connector.c),
    but a kernel before that, or a build that keeps the old rule, refuses the bind with EPERM."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    except OSError as exc:
        return f"cannot open a NETLINK_CONNECTOR socket ({exc}); the kernel needs CONFIG_PROC_EVENTS: {_FALLBACK}"
    try:
        sock.bind((0, CN_IDX_PROC))
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return f"this kernel lets only root (CAP_NET_ADMIN) join the proc connector: {_ROOT_OR_FALLBACK}"
        return f"cannot join the proc connector's group ({exc}): {_ROOT_OR_FALLBACK}"
    finally:
        sock.close()
    return None


class NetlinkSource(Source):
    """Process and thread events from the Linux proc connector (root; any user where the kernel lets one join).

    Options: ``exec_events`` (default True; False: an exec makes no record, for a combined source that takes
    execs from elsewhere), ``cmdline`` (default True; False: an exec's command line is the program's comm,
    so only /proc/<pid>/stat is read), ``rcvbuf`` (socket receive buffer in bytes, default 8 MiB, forced with
    SO_RCVBUFFORCE as root; the kernel doubles it for its bookkeeping), ``nice`` (default -10: the nice value
    of the thread that reads the socket, where the process may raise it; None leaves it alone).
    """

    name: ClassVar[str] = "netlink"
    lossy: ClassVar[bool] = False
    delivers: ClassVar[frozenset[str]] = frozenset({
        "process_create", "process_exit", "process_exec", "thread_create", "thread_exit", "command_line",
        "exit_code", "exact_loss_count", "process_snapshot", "details_from_proc", "image", "current_directory",
        "uid", "user", "tty", "session", "cgroup", "container_id",
    })

    #: Messages decoded between two ``sink.notify()`` calls while the socket never runs dry.
    NOTIFY_EVERY = 256
    #: Messages received before decoding them, at most (fewer when the socket runs dry first).
    BATCH = 64
    #: Stopping: the most time spent decoding what is still queued; the rest is counted as lost, not decoded.
    STOP_DRAIN_SECONDS = 0.25
    #: Stopping: the most queued messages counted without decoding (the queue is finite once the socket has
    #: left the group: this only bounds the case where leaving failed).
    STOP_SKIM_MAX = 1 << 20

    def __init__(self, *, exec_events: bool = True, cmdline: bool = True, rcvbuf: int = 8 << 20,
                 nice: int | None = -10) -> None:
        super().__init__()
        if nice is not None and (isinstance(nice, bool) or not isinstance(nice, int) or not -20 <= nice <= 19):
            raise ValueError(f"nice must be None or -20..19, not {nice!r}")
        self.nice = nice
        if isinstance(rcvbuf, bool) or not isinstance(rcvbuf, int) or rcvbuf < 1:
            raise ValueError(f"rcvbuf must be a positive number of bytes, not {rcvbuf!r}")
        self.exec_events = bool(exec_events)
        self.cmdline = bool(cmdline)
        self.rcvbuf = rcvbuf
        self._sock: socket.socket | None = None
        self._wake = WakePipe()
        self._stopping = False
        self._early: list[bytes] = []
        self._decoder: ProcEventDecoder | None = None
        self.overruns = 0  # ENOBUFS reports: the socket buffer overflowed (the gaps say by how much)
        self.rcvbuf_granted = 0
        self._overrun_pending = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not sys.platform.startswith("linux"):
            return "needs Linux (the proc connector is a Linux kernel interface)"
        if not hasattr(socket, "AF_NETLINK"):
            return "this Python has no AF_NETLINK sockets"
        if has_capability(CAP_NET_ADMIN):
            return None
        return _probe_unprivileged()

    # -- life cycle ------------------------------------------------------------------------------------

    def open(self) -> None:
        if self._sock is not None:
            return
        require_available(self)
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as exc:
            raise SourceUnavailable(f"cannot open a NETLINK_CONNECTOR socket ({exc}); the kernel needs "
                                    f"CONFIG_PROC_EVENTS: {_FALLBACK}") from exc
        try:
            self.rcvbuf_granted = set_receive_buffer(sock, self.rcvbuf, "etwmon netlink")
            sock.bind((0, CN_IDX_PROC))
            self._decoder = ProcEventDecoder(exec_events=self.exec_events, cmdline=self.cmdline,
                                             details=self.details)
            self._sock = sock
            self._subscribe()
            self._wake.open()
        except OSError as exc:
            self._close_socket()
            why = f"not permitted: {_ROOT_OR_FALLBACK}" if exc.errno == errno.EPERM else str(exc)
            raise SourceUnavailable(f"cannot subscribe to the proc connector ({why})") from exc
        except SourceUnavailable:
            self._close_socket()
            raise
        # One message from every CPU we may run on, so each CPU's sequence has a baseline before anything
        # can be lost: without it a CPU whose first messages overflowed the buffer would lose them uncounted.
        self._emit_markers()
        self._stopping = False

    @staticmethod
    def _send_op(sock: socket.socket, op: int, cookie: int = 0) -> None:
        size = _LISTEN.size
        sock.send(_LISTEN.pack(size, _NLMSG_DONE, 0, 0, 0,
                               CN_IDX_PROC, CN_VAL_PROC, 0, cookie, 4, 0, op))

    def _subscribe(self) -> None:
        """Send LISTEN and wait for the kernel's answer (an event of type NONE whose ack is ours + 1)."""
        sock = self._sock
        assert sock is not None
        cookie = random.randrange(1, 0x7FFFFFFF)
        self._send_op(sock, PROC_CN_MCAST_LISTEN, cookie)
        buf = bytearray(0x10000)
        deadline = time.monotonic() + 2.0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SourceUnavailable("the proc connector did not answer the subscription within 2 s "
                                        "(not permitted here?): run as root in the initial namespaces, or "
                                        f"{_FALLBACK}")
            sock.settimeout(left)
            try:
                n = sock.recv_into(buf)
            except socket.timeout:
                continue
            except OSError as exc:
                self._receive_failed(exc)
                continue
            answer = self._ack_in(buf, n, cookie)
            if answer is None:
                self._early.append(bytes(buf[:n]))  # an event that came first: decoded when run() starts
                continue
            self._early.append(bytes(buf[:n]))  # the answer carries a sequence number too
            if answer:
                raise SourceUnavailable(f"the proc connector refused the subscription: {os.strerror(answer)}; "
                                        f"{_ROOT_OR_FALLBACK}")
            sock.setblocking(False)
            return

    @staticmethod
    def _ack_in(buf, n: int, cookie: int) -> int | None:
        """The error code of the kernel's answer to our LISTEN if this message is it, else None."""
        if n < MESSAGE_SIZE:
            return None
        fields = _MESSAGE.unpack_from(buf, 0)
        idx, val, ack, what, err = fields[5], fields[6], fields[8], fields[11], fields[14]
        if idx == CN_IDX_PROC and val == CN_VAL_PROC and what == PROC_EVENT_NONE and ack == cookie + 1:
            return err
        return None

    def _emit_markers(self) -> None:
        """Make the kernel send one COMM event on each CPU this thread may run on: rewrite this thread's own
        name (unchanged) while pinned to each CPU in turn. The events make no records; they pin down each CPU's
        sequence so that losses before them (at open) or after the last event (at stop) are seen as gaps."""
        try:
            allowed = os.sched_getaffinity(0)
        except OSError:
            return
        try:
            fd = os.open("/proc/thread-self/comm", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            name = os.read(fd, 64).rstrip(b"\n")
            if not name:
                return
            for cpu in sorted(allowed):
                try:
                    os.sched_setaffinity(0, {cpu})  # returns once this thread runs there
                    os.write(fd, name)
                except OSError:
                    continue
        except OSError:
            pass
        finally:
            try:
                os.sched_setaffinity(0, allowed)
            except OSError:
                pass
            os.close(fd)

    def run(self, sink: Sink) -> None:
        sock, decoder = self._sock, self._decoder
        if sock is None or decoder is None:
            raise SourceUnavailable("NetlinkSource.run() before open()")
        decoder.attach(sink)
        self._raise_priority()
        parse = decoder.parse_messages
        early, self._early = self._early, []
        for chunk in early:
            parse(chunk, len(chunk))
        sink.notify()
        # Up to BATCH datagrams are received back to back into one buffer before any is decoded, so that the
        # command lines of the execs among them can be read first (prefetch_command_lines).
        batch_max = self.BATCH
        big = bytearray(batch_max * 128 + 0x10000)
        view = memoryview(big)
        limit = len(big) - 0x10000  # room left for one more datagram of any size
        recv_into = sock.recv_into
        parse_batch = decoder.parse_batch
        receive_failed = self._receive_failed
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        poller.register(self._wake.fileno(), select.POLLIN)
        notify_every = self.NOTIFY_EVERY
        pending = 0
        offsets: list[int] = []
        sizes: list[int] = []
        while not self._stopping:
            idle = False
            offset = 0
            while offset <= limit and len(offsets) < batch_max:
                try:
                    n = recv_into(view[offset:])
                except OSError as exc:
                    if receive_failed(exc):
                        continue
                    idle = True
                    break
                offsets.append(offset)
                sizes.append(n)
                offset += (n + 7) & ~7
            if offsets:
                parse_batch(big, offsets, sizes)
                pending += len(offsets)
                offsets.clear()
                sizes.clear()
                if pending >= notify_every:
                    sink.notify()
                    pending = 0
            if not idle:
                continue
            if pending:
                sink.notify()
                pending = 0
            if self._overrun_pending:
                self._resolve_overrun(big)  # caught up: find out now how much the overflow cost
                sink.notify()
                continue
            poller.poll()
        self._finish(big)
        sink.notify()

    def _raise_priority(self) -> None:
        """Give this thread (only) the ``nice`` value, as auditd boosts its own priority: the sooner it runs
        after an exec, the likelier the program's command line is still there to read."""
        if self.nice is None:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)
        except (OSError, AttributeError) as exc:  # no CAP_SYS_NICE: run at the priority we have
            log.debug("etwmon netlink: cannot set nice %d: %s", self.nice, exc)

    def _receive_failed(self, exc: OSError) -> bool:
        """What a failed receive means, decided in this one place: True to receive again, False when the socket
        is empty; anything else is raised. ENOBUFS says the socket overflowed: how many messages that cost shows
        as gaps in the per-CPU sequences of the messages that follow, so nothing is counted here (no double
        count); the overflow is noted so those gaps are made visible soon (``_resolve_overrun``)."""
        if isinstance(exc, BlockingIOError):
            return False
        if isinstance(exc, InterruptedError):
            return True
        if exc.errno == errno.ENOBUFS:
            self.overruns += 1
            self._overrun_pending = True
            return True
        raise exc

    def _drain(self, buf: bytearray, deadline: float | None = None) -> bool:
        """Decode what is waiting on the socket until it is empty (True) or ``deadline`` passes (False)."""
        sock, parse = self._sock, self._decoder.parse_messages  # type: ignore[union-attr]
        recv_into, clock = sock.recv_into, time.monotonic  # type: ignore[union-attr]
        while deadline is None or clock() < deadline:
            try:
                n = recv_into(buf)
            except OSError as exc:
                if self._receive_failed(exc):
                    continue
                return True
            parse(buf, n)
        return False

    def _finish(self, buf: bytearray) -> None:
        """Stopping: decode what is queued for at most ``STOP_DRAIN_SECONDS``, and count what is left as lost.

        A marker on every CPU goes behind everything queued, so the losses since the last message seen on each
        CPU show as gaps; then the socket leaves the proc connector's group, so the queue only shrinks (a storm
        cannot keep a stopping source busy). What the time did not allow to decode is received without
        decoding and counted as lost from its sequence numbers, gaps included (``ProcEventDecoder.skip_to``)."""
        deadline = time.monotonic() + self.STOP_DRAIN_SECONDS
        self._overrun_pending = False  # an earlier overflow shows as gaps before the markers
        self._emit_markers()
        self._leave_group()
        if not self._drain(buf, deadline):
            self._skim(buf)
        if self._overrun_pending:  # it overflowed again: the markers themselves may be among the lost
            log.warning("etwmon netlink: the socket overflowed while stopping; losses after the last messages "
                        "received may be uncounted")
            self._overrun_pending = False

    def _leave_group(self) -> None:
        try:
            self._sock.setsockopt(_SOL_NETLINK, _NETLINK_DROP_MEMBERSHIP, CN_IDX_PROC)  # type: ignore[union-attr]
        except OSError as exc:  # still a member: the skim below is then bounded by STOP_SKIM_MAX
            log.debug("etwmon netlink: cannot leave the proc connector group: %s", exc)

    def _skim(self, buf: bytearray) -> None:
        """Receive what is still queued without decoding it, and count it as lost (see ``_finish``)."""
        recv_into, unpack, decoder = self._sock.recv_into, _MESSAGE.unpack_from, self._decoder  # type: ignore
        last: dict[int, list[int]] = {}  # cpu -> [last sequence, messages]
        for _ in range(self.STOP_SKIM_MAX):
            try:
                n = recv_into(buf)
            except OSError as exc:
                if self._receive_failed(exc):
                    continue
                break
            if n != MESSAGE_SIZE:
                decoder.parse_messages(buf, n)  # not the one-message shape: rare, decoded the careful way
                continue
            fields = unpack(buf, 0)
            idx, val, seq, what, cpu = fields[5], fields[6], fields[7], fields[11], fields[12]
            if idx != CN_IDX_PROC or val != CN_VAL_PROC or (what == PROC_EVENT_NONE and cpu == _SEQ_MASK):
                continue
            entry = last.setdefault(cpu, [seq, 0])
            entry[0] = seq
            entry[1] += 1
        for cpu, (seq, count) in last.items():
            decoder.skip_to(cpu, seq, count)  # type: ignore[union-attr]

    def _resolve_overrun(self, buf: bytearray) -> None:
        """After an overflow: a marker on every CPU, then read up to them, so every gap is seen and counted. Still
        pending when the socket did not run dry within a second (a storm): the loop tries again when idle."""
        for _ in range(3):
            self._overrun_pending = False
            self._emit_markers()
            if not self._drain(buf, time.monotonic() + 1.0):
                self._overrun_pending = True
                return
            if not self._overrun_pending:  # no new overflow on the way to the markers
                return

    def stop(self) -> None:
        self._stopping = True
        self._wake.wake()

    def host_and_boot_id(self) -> bytes:
        return host_and_boot_id()

    def process_snapshot(self) -> list:
        return snapshot()

    def set_command_line(self, tgid: int, command_line: str) -> None:
        """Use ``command_line`` for ``tgid`` from now on: the ProcessCreate of children it forks later carries
        it instead of one read from /proc (a combined source hands in audit's exact argv this way)."""
        decoder = self._decoder
        if decoder is not None:
            decoder.command_lines[tgid] = command_line

    def close(self) -> None:
        self._stopping = True
        self._close_socket()
        self._wake.close()

    def _close_socket(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            # Without IGNORE the kernel keeps counting a listener and stamping events for nobody.
            self._send_op(sock, PROC_CN_MCAST_IGNORE)
        except OSError as exc:
            log.debug("etwmon netlink: IGNORE failed: %s", exc)
        finally:
            sock.close()

    # -- state -----------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        d = self._decoder
        if d is None:
            return {"lost": 0, "parse_errors": 0, "received": 0, "overruns": self.overruns}
        return {"lost": d.lost, "parse_errors": d.parse_errors, "received": d.received,
                "overruns": self.overruns, "seq_resets": d.seq_resets, "cmdline_gone": d.cmdline_gone,
                "cmdline_comm": d.cmdline_comm, "rcvbuf": self.rcvbuf_granted}

    def sequence_windows(self) -> dict[int, tuple[int, int]]:
        """Per CPU, the first and last kernel sequence number seen (see ``ProcEventDecoder``)."""
        return self._decoder.sequence_windows() if self._decoder is not None else {}


