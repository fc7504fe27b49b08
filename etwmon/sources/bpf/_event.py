"""The kernel's event (etwmon_event.h) on the Python side: its layout, what each field means, and how one becomes
the wire format's records. ``TaskDetails`` is the per-record structure of what only the kernel knew exactly at
the event (start times, credentials, cgroup, tty, executable and working directory), for enrichment.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from ...clock import KernelClock
from ...records import (
    FILETIME_UNIX_EPOCH, TRUNCATION_MARKER, command_line_from_argv, encode_process_create, encode_process_exec,
    encode_process_exit, encode_thread_create, encode_thread_exit,
)
from .._proc import argv_of
from ..netlink import shell_exit_code

__all__ = [
    "EVENT", "EVENT_SIZE", "FIELDS", "TaskDetails", "EventDecoder",
    "FORK_PROCESS", "FORK_THREAD", "EXEC", "EXIT_THREAD", "EXIT_PROCESS",
    "ARGV_TRUNCATED", "ARGV_FAULT", "NO_MM", "EXE_TRUNCATED", "CWD_TRUNCATED", "LEADER_REPLACED",
    "FILENAME_TRUNCATED", "NO_TTY", "CGROUP_TRUNCATED", "CGROUP_V1", "ARGV_MAX", "EXE_KNOWN", "EXE_MEMFD",
    "EXE_DELETED", "EXE_SETUID", "EXE_SETGID", "stat_device", "KIND_BASE", "CONFIG", "CONFIG_WIRE", "CONFIG_IDENTITY",
    "CONFIG_CREATES",
]

# etwmon_event.kind: from KIND_BASE up, so that the ring tells them from the wire records the kernel writes itself
KIND_BASE = 0x100
FORK_PROCESS, FORK_THREAD, EXEC, EXIT_THREAD, EXIT_PROCESS = 0x101, 0x102, 0x103, 0x104, 0x105
# struct etwmon_config (the `config` map) and its flags
CONFIG = struct.Struct("<Q8sII")
CONFIG_WIRE, CONFIG_IDENTITY, CONFIG_CREATES = 0x1, 0x2, 0x4
# etwmon_event.flags
ARGV_TRUNCATED = 0x0001
ARGV_FAULT = 0x0002
NO_MM = 0x0004
EXE_TRUNCATED = 0x0008
CWD_TRUNCATED = 0x0010
LEADER_REPLACED = 0x0020
FILENAME_TRUNCATED = 0x0040
NO_TTY = 0x0080
CGROUP_TRUNCATED = 0x0100
CGROUP_V1 = 0x0200
ARGV_MAX = 32768
# etwmon_event.exe_flags
EXE_KNOWN, EXE_MEMFD, EXE_DELETED, EXE_SETUID, EXE_SETGID = 0x01, 0x02, 0x04, 0x08, 0x10

#: struct etwmon_event, field by field (name, struct code); tests check it against the object's BTF.
FIELDS: list[tuple[str, str]] = [
    ("kind", "H"), ("flags", "H"), ("size", "I"), ("time_ns", "Q"),
    ("pid", "I"), ("tid", "I"), ("ppid", "I"), ("creating_pid", "I"), ("creating_tid", "I"), ("exit_code", "I"),
    ("start_boottime", "Q"), ("parent_start_boottime", "Q"), ("cgroup_id", "Q"),
    ("uid", "I"), ("euid", "I"), ("gid", "I"), ("egid", "I"), ("loginuid", "I"), ("sessionid", "I"),
    ("argv_len", "I"), ("argv_full_len", "I"),
    ("filename_len", "H"), ("exe_len", "H"), ("cwd_len", "H"), ("reserved", "H"),
    ("comm", "16s"), ("tty", "32s"),
    ("exe_ino", "Q"), ("exe_dev", "I"), ("exe_flags", "I"), ("mnt_ns", "I"), ("pid_ns", "I"), ("ns_pid", "I"),
    ("cgroup_len", "H"), ("reserved2", "H"),
]
EVENT = struct.Struct("<" + "".join(code for _, code in FIELDS))
EVENT_SIZE = EVENT.size  # 184: the tail starts here
# The first ten fields: all that a thread event or an exit needs (the hot path of a thread storm).
_HEAD = struct.Struct("<HHIQIIIIII")

_UNSET = 0xFFFFFFFF


def stat_device(dev: int) -> int:
    """The kernel's internal device number (major << 20 | minor) as ``os.stat().st_dev`` gives it."""
    major, minor = dev >> 20, dev & 0xFFFFF
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


@dataclass(frozen=True, slots=True)
class TaskDetails:
    """What the kernel knew about the task at the event, exactly (one per record, for enrichment).

    Times are nanoseconds since boot (CLOCK_BOOTTIME, the clock of /proc/<pid>/stat's starttime). Ids are in
    the initial user namespace. Byte strings are as the kernel has them (paths need not be UTF-8); None where
    the event does not carry the field (exits and thread events carry no paths or tty).
    """

    kind: int                 # FORK_PROCESS, FORK_THREAD, EXEC, EXIT_THREAD, EXIT_PROCESS
    flags: int                # ARGV_TRUNCATED, EXE_TRUNCATED, CWD_TRUNCATED, LEADER_REPLACED, ... (bits)
    time_ns: int              # the event's kernel timestamp (boot ns)
    pid: int                  # the process (tgid)
    tid: int                  # the thread
    ppid: int                 # the real parent's tgid
    start_boottime: int       # the process's start (task->start_boottime of the thread the event is about)
    parent_start_boottime: int
    uid: int
    euid: int
    gid: int
    egid: int
    loginuid: int | None      # audit login uid, None when unset
    sessionid: int | None     # audit session id, None when unset
    cgroup_id: int            # cgroup v2 id (the inode number of its directory under /sys/fs/cgroup)
    comm: bytes
    tty: bytes | None         # e.g. b"pts3"; b"" when no controlling terminal; None on thread events/exits
    filename: bytes | None    # exec: bprm->filename, the path exec was given
    exe: bytes | None         # the executable's path (mm->exe_file), up to the root of its mount namespace
    cwd: bytes | None         # the working directory, likewise
    exe_dev: int | None = None  # forks and execs: the executable's device (st_dev) and inode; None if unknown
    exe_ino: int | None = None
    exe_flags: int = 0          # EXE_* bits (EXE_KNOWN: the task had an executable)
    mnt_ns: int | None = None   # inode numbers of the task's mount and pid namespaces; None if unknown
    pid_ns: int | None = None
    ns_pid: int | None = None   # the process id in its pid namespace
    cgroup: bytes | None = None  # forks and execs: the cgroup path (etwmon_cgroup.h: v2, else a v1 hierarchy's)

    @classmethod
    def from_event(cls, data, offset: int) -> "TaskDetails":
        (kind, flags, _, time_ns, pid, tid, ppid, _, _, _, start, pstart, cgroup, uid, euid, gid, egid, loginuid,
         sessionid, argv_len, _, filename_len, exe_len, cwd_len, _, comm, tty, exe_ino, exe_dev, exe_flags, mnt_ns,
         pid_ns, ns_pid, cgroup_len, _) = EVENT.unpack_from(data, offset)
        has_tail = kind in (FORK_PROCESS, EXEC)
        filename = exe = cwd = cgroup_path = None
        if has_tail:
            at = offset + EVENT_SIZE + argv_len
            filename = bytes(data[at:at + filename_len]) if kind == EXEC else None
            at += filename_len
            exe = bytes(data[at:at + exe_len]) if exe_len else None
            at += exe_len
            cwd = bytes(data[at:at + cwd_len]) if cwd_len else None
            at += cwd_len
            cgroup_path = bytes(data[at:at + cgroup_len]) if cgroup_len else None
        return cls(kind, flags, time_ns, pid, tid, ppid, start, pstart, uid, euid, gid, egid,
                   None if loginuid == _UNSET else loginuid, None if sessionid == _UNSET else sessionid, cgroup,
                   comm.rstrip(b"\0"), tty.rstrip(b"\0") if has_tail else None, filename, exe, cwd,
                   stat_device(exe_dev) if exe_flags else None, exe_ino if exe_flags else None, exe_flags,
                   mnt_ns or None, pid_ns or None, ns_pid if pid_ns else None, cgroup_path)


#: ``enrich(record, details) -> record``: called for each record when given (see BpfSource); one whose
#: ``threads`` attribute is False is not called for thread records (building TaskDetails costs ~6 µs).
Enricher = Callable[[bytes, TaskDetails], bytes]


class EventDecoder:
    """Turns kernel events into records pushed into a sink, with kernel time mapped to FILETIME.

    ``clock`` maps the kernel's CLOCK_BOOTTIME stamps to FILETIME (its wall-clock offset measured when the source
    opens and kept, so a wall-clock step does not reorder the stream). Records come out
    in ring order; two CPUs may stamp events a little out of that order, so a time earlier than the one before
    is raised to it (counted in ``time_raised``): the stream never goes backwards.
    """

    def __init__(self, push: Callable[[bytes], None], clock: KernelClock, enrich: Enricher | None = None) -> None:
        self.push = push
        # KernelClock.filetime inlined on the hot path: FILETIME = (ns + offset) // 100 + epoch
        self._offset = clock.offset_ns + 100 * FILETIME_UNIX_EPOCH
        self.enrich = enrich
        self._enrich_threads = enrich if enrich is not None and getattr(enrich, "threads", True) else None
        self.last_filetime = 0
        self.time_raised = 0
        self.events = 0
        self.argv_truncated = 0
        self.argv_unreadable = 0
        #: Process creates and execs that came as events while the kernel writes them itself (argv, a path or the
        #: tty not ASCII, argv cut or unreadable, a record over 64 KiB): written here, exactly as before.
        self.creates_slow = 0
        #: Whether the kernel writes creates and execs itself (set by the source).
        self.kernel_creates = False

    def decode(self, data, offset: int) -> None:
        """One event at ``offset`` of ``data`` (the ring's mapped pages)."""
        kind, flags, _, ns, pid, tid, ppid, cpid, ctid, code = _HEAD.unpack_from(data, offset)
        self.events += 1
        ft = (ns + self._offset) // 100
        if ft < self.last_filetime:
            ft = self.last_filetime
            self.time_raised += 1
        else:
            self.last_filetime = ft
        enrich, push = self.enrich, self.push
        if kind == FORK_THREAD:
            record = encode_thread_create(ft, tid, pid)
            enrich = self._enrich_threads
        elif kind == EXIT_THREAD:
            record = encode_thread_exit(ft, tid, pid, shell_exit_code(code))
            enrich = self._enrich_threads
        elif kind == EXIT_PROCESS:
            if tid != pid:  # the last thread was not the leader: it ends too (ctid holds its own status)
                thread_exit = encode_thread_exit(ft, tid, pid, shell_exit_code(ctid))
                threads = self._enrich_threads
                push(threads(thread_exit, TaskDetails.from_event(data, offset)) if threads else thread_exit)
            record = encode_process_exit(ft, pid, shell_exit_code(code))
        elif kind == FORK_PROCESS or kind == EXEC:
            if self.kernel_creates:
                self.creates_slow += 1
            line = self._command_line(data, offset, flags)
            encode = encode_process_exec if kind == EXEC else encode_process_create
            record = encode(ft, pid, ppid, cpid, ctid, line)
        else:
            return  # a kind this version does not know (a newer object): nothing to say about it
        push(enrich(record, TaskDetails.from_event(data, offset)) if enrich else record)

    def _command_line(self, data, offset: int, flags: int) -> str:
        if flags & (NO_MM | ARGV_FAULT):
            if flags & ARGV_FAULT:
                self.argv_unreadable += 1
            comm = bytes(data[offset + 104:offset + 120]).split(b"\0", 1)[0]
            return command_line_from_argv([comm])  # a kernel thread, or argv the kernel could not read
        argv_len = int.from_bytes(data[offset + 88:offset + 92], "little")
        if not argv_len:
            return ""
        start = offset + EVENT_SIZE
        line = command_line_from_argv(argv_of(bytes(data[start:start + argv_len])))
        if flags & ARGV_TRUNCATED:
            # Cut in the kernel: mark it (the encoder cuts again, keeping one marker, if it is still too long).
            self.argv_truncated += 1
            line += TRUNCATION_MARKER
        return line
