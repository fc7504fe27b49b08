"""Reading /proc the way both Linux sources need: whole small files that may vanish, argv, stat fields."""

from __future__ import annotations

import os

_O_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


def read_proc(path: str, size: int = 4096) -> bytes | None:
    """A whole small /proc file, or None when it cannot be read (the process is gone, no permission)."""
    try:
        fd = os.open(path, _O_READ)
    except OSError:
        return None
    try:
        data = os.read(fd, size)
        if len(data) == size:  # long command lines come in pieces
            parts = [data]
            while more := os.read(fd, 65536):
                parts.append(more)
            data = b"".join(parts)
        return data
    except OSError:
        return None
    finally:
        os.close(fd)


def argv_of(cmdline: bytes) -> list[bytes]:
    """/proc/<pid>/cmdline (every argument followed by a NUL) as the argument list; empty arguments kept."""
    return (cmdline[:-1] if cmdline.endswith(b"\0") else cmdline).split(b"\0")


def parse_stat(data: bytes) -> tuple[bytes, int, int] | None:
    """(comm, ppid, starttime in clock ticks since boot) from /proc/<pid>/stat, or None if it does not parse."""
    open_paren = data.find(b"(")
    close_paren = data.rfind(b")")  # comm may itself contain ")"
    if open_paren < 0 or close_paren < open_paren:
        return None
    fields = data[close_paren + 2:].split()
    try:
        return data[open_paren + 1:close_paren], int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def stat_state(data: bytes) -> str | None:
    """The state letter from /proc/<pid>/stat (R, S, D, Z for a zombie, X for dead, ...), or None."""
    close_paren = data.rfind(b")")
    state = data[close_paren + 2:close_paren + 3] if close_paren >= 0 else b""
    return state.decode("ascii", "replace") if state else None


def clock_tick_ns() -> int:
    """Nanoseconds per clock tick, the unit of /proc start times."""
    try:
        return 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 10_000_000
