"""The bpf source's kernel facts (``TaskDetails``) as the extension block the identity stage builds on: the
executable, the working directory, the effective uid and its user name, the terminal and the process's start
time, all read in the kernel at the event, so nothing here is read after the fact (no EventFlags.PROCFS)."""

from __future__ import annotations

import os
import struct
from typing import Callable

from ...clock import KernelClock
from ...records import EventFlags, ExeFlags, ExtensionTag, pack_field, with_packed
from .._proc import user_name
from ._event import (
    CGROUP_TRUNCATED, CWD_TRUNCATED, EXE_DELETED, EXE_MEMFD, EXE_SETGID, EXE_SETUID, EXE_TRUNCATED, EXEC, EXIT_PROCESS, FORK_PROCESS,
    TaskDetails,
)

__all__ = ["task_enricher", "tty_name", "where_fields"]

_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
_UID, _START, _IMAGE, _CWD, _USER, _TTY, _CGROUP = (
    int(ExtensionTag.Uid), int(ExtensionTag.StartTime), int(ExtensionTag.Image), int(ExtensionTag.CurrentDirectory),
    int(ExtensionTag.User), int(ExtensionTag.Tty), int(ExtensionTag.Cgroup))
_TRUNCATED = int(EventFlags.TRUNCATED)
_U64 = struct.Struct("<Q")
_EXE_DEV, _EXE_INO, _EXE_FLAGS, _MNT_NS, _PID_NS, _NS_PID, _CGROUP_ID = (
    int(ExtensionTag.ExeDevice), int(ExtensionTag.ExeInode), int(ExtensionTag.ExeFlags),
    int(ExtensionTag.MountNamespace), int(ExtensionTag.PidNamespace), int(ExtensionTag.NamespacePid),
    int(ExtensionTag.CgroupId))
# etwmon_event.exe_flags bits -> records.ExeFlags bits
_EXE_BITS = ((EXE_MEMFD, int(ExeFlags.MEMFD)), (EXE_DELETED, int(ExeFlags.DELETED)),
             (EXE_SETUID, int(ExeFlags.SETUID)), (EXE_SETGID, int(ExeFlags.SETGID)))


def where_fields(task: TaskDetails) -> list[bytes]:
    """The packed fields that say which file ran and where (ExeDevice .. CgroupId, block order): what tells a
    program apart from another at the same path (a bind mount, another mount namespace)."""
    out = []
    if task.exe_dev is not None:
        bits = 0
        for kernel, ours in _EXE_BITS:
            if task.exe_flags & kernel:
                bits |= ours
        out += [pack_field(_EXE_DEV, _U32.pack(task.exe_dev & 0xFFFFFFFF)),
                pack_field(_EXE_INO, _U64.pack(task.exe_ino)), pack_field(_EXE_FLAGS, _U32.pack(bits))]
    if task.mnt_ns is not None:
        out.append(pack_field(_MNT_NS, _U32.pack(task.mnt_ns)))
    if task.pid_ns is not None:
        out += [pack_field(_PID_NS, _U32.pack(task.pid_ns)), pack_field(_NS_PID, _U32.pack(task.ns_pid))]
    if task.cgroup_id:
        out.append(pack_field(_CGROUP_ID, _U64.pack(task.cgroup_id)))
    return out


def tty_name(tty: bytes | None) -> str | None:
    """The kernel's tty name (b"pts3", b"tty1"; b"" for none) as ps writes it ("pts/3", "tty1", None)."""
    if not tty:
        return None
    name = os.fsdecode(tty)
    return "pts/" + name[3:] if name.startswith("pts") and name[3:].isdigit() else name


def _text(tag: int, raw: bytes) -> bytes:
    return pack_field(tag, os.fsdecode(raw).encode("utf-16-le", "surrogatepass"))


def task_enricher(boot_clock: KernelClock) -> Callable[[bytes, TaskDetails], bytes]:
    """``BpfSource(enrich=...)`` for the identity stage: each process record with what the kernel said of its
    task (fields in block order). A path the kernel had to cut is left unknown, with TRUNCATED set, rather than
    shown cut; thread records pass unchanged (the stage names their process)."""
    offset = boot_clock.offset_ns

    def enrich(record: bytes, task: TaskDetails) -> bytes:
        kind = task.kind
        start = pack_field(_START, _I64.pack((task.start_boottime + offset) // 100 + 116_444_736_000_000_000))
        if kind == EXIT_PROCESS:
            return with_packed(record, 0, [start])
        if kind != FORK_PROCESS and kind != EXEC:
            return record
        flags = 0
        fields = [pack_field(_UID, _U32.pack(task.euid)), start, *where_fields(task)]
        if task.exe is not None:
            if task.flags & EXE_TRUNCATED:
                flags |= _TRUNCATED
            else:
                fields.append(_text(_IMAGE, task.exe))
        if task.cwd is not None:
            if task.flags & CWD_TRUNCATED:
                flags |= _TRUNCATED
            else:
                fields.append(_text(_CWD, task.cwd))
        user = user_name(task.euid)
        if user is not None:
            fields.append(pack_field(_USER, user.encode("utf-16-le", "surrogatepass")))
        tty = tty_name(task.tty)
        if tty is not None:
            fields.append(pack_field(_TTY, tty.encode("utf-16-le")))
        if task.cgroup is not None:
            fields.append(_text(_CGROUP, task.cgroup))
        elif task.flags & CGROUP_TRUNCATED:
            flags |= _TRUNCATED
        return with_packed(record, flags, fields)

    enrich.threads = False  # type: ignore[attr-defined]  # (the stage names a thread's process itself)
    return enrich
