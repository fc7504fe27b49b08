"""The bpf source's kernel facts (``TaskDetails``) as the extension block the identity stage builds on: the
executable, the working directory, the effective uid and its user name, the terminal and the process's start
time, all read in the kernel at the event, so nothing here is read after the fact (no EventFlags.PROCFS)."""

from __future__ import annotations

import os
import struct
from typing import Callable

from ...clock import KernelClock
from ...records import EventFlags, ExtensionTag, pack_field, with_packed
from .._proc import user_name
from ._event import CWD_TRUNCATED, EXE_TRUNCATED, EXEC, EXIT_PROCESS, FORK_PROCESS, TaskDetails

__all__ = ["task_enricher", "tty_name"]

_I64 = struct.Struct("<q")
_U32 = struct.Struct("<I")
_UID, _START, _IMAGE, _CWD, _USER, _TTY = (int(ExtensionTag.Uid), int(ExtensionTag.StartTime),
                                           int(ExtensionTag.Image), int(ExtensionTag.CurrentDirectory),
                                           int(ExtensionTag.User), int(ExtensionTag.Tty))
_TRUNCATED = int(EventFlags.TRUNCATED)


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
        fields = [pack_field(_UID, _U32.pack(task.euid)), start]
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
        return with_packed(record, flags, fields)

    enrich.threads = False  # type: ignore[attr-defined]  # (the stage names a thread's process itself)
    return enrich
