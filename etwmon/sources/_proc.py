"""Reading /proc the way the Linux sources need: whole small files that may vanish, argv, stat fields, and the
details of a process (image, cwd, user, terminal, cgroup) for the identity stage."""

from __future__ import annotations

import os
import stat as _stat

from ..clock import CLOCK_BOOTTIME, KernelClock
from ..containers import container_id_from_cgroup
from ..records import Details, EventFlags, ExeFlags
from ..users import user_name

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


# --- the details of a process, for the identity stage (image, cwd, user, tty, session, cgroup) ---------------


def stat_details(data: bytes) -> tuple[bytes, int, int, int, int] | None:
    """(comm, ppid, session, tty_nr, starttime in clock ticks) from /proc/<pid>/stat, or None."""
    close_paren = data.rfind(b")")
    if data.find(b"(") < 0 or close_paren < 0:
        return None
    fields = data[close_paren + 2:].split()
    try:
        return (data[data.find(b"(") + 1:close_paren], int(fields[1]), int(fields[3]), int(fields[4]),
                int(fields[19]))
    except (IndexError, ValueError):
        return None


def tty_name(tty_nr: int) -> str | None:
    """The controlling terminal's name from stat's tty_nr (None: no terminal), as ps shows it."""
    if not tty_nr:
        return None
    major, minor = (tty_nr >> 8) & 0xFFF, (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    if 136 <= major <= 143:
        return f"pts/{minor + (major - 136) * 256}"
    if major == 4:
        return f"tty{minor}" if minor < 64 else f"ttyS{minor - 64}"
    return f"{major}:{minor}"


def effective_uid(status: bytes) -> int | None:
    """The effective uid from /proc/<pid>/status (its "Uid:" line: real, effective, saved, fs)."""
    at = status.find(b"\nUid:")
    if at < 0:
        return None
    try:
        return int(status[at + 5:status.index(b"\n", at + 5)].split()[1])
    except (ValueError, IndexError):
        return None


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


# The hierarchies read when the v2 one says "/" (as the bpf source's kernel side does: etwmon_cgroup.h).
_V1_HIERARCHIES = (b"pids", b"memory")


def cgroup_path(data: bytes) -> str | None:
    """The cgroup path from /proc/<pid>/cgroup: the v2 one (its "0::" line) unless it is the root, else the
    pids, then the memory controller's v1 one when that is below its root, else "/" (or None without a v2
    line and a v1 one)."""
    v2 = None
    v1: dict[bytes, bytes] = {}
    for line in data.splitlines():
        if line.startswith(b"0::"):
            v2 = line[3:]
        else:
            _, _, rest = line.partition(b":")
            controllers, _, path = rest.partition(b":")
            for name in controllers.split(b","):
                v1.setdefault(name, path)
    if v2 is not None and v2 != b"/":
        return os.fsdecode(v2)
    for name in _V1_HIERARCHIES:
        path = v1.get(name)
        if path is not None and path != b"/":
            return os.fsdecode(path)
    return None if v2 is None else "/"


def _namespace_pid(status: bytes) -> int | None:
    """The pid in the process's own pid namespace: the last number of status's "NSpid:" line."""
    at = status.find(b"\nNSpid:")
    if at < 0:
        return None
    try:
        return int(status[at + 7:status.index(b"\n", at + 7)].split()[-1])
    except (ValueError, IndexError):
        return None


def where_details(proc: str, pid: int, image: str | None, status: bytes | None) -> dict:
    """Which file ``pid`` runs (exe_device, exe_inode, exe_flags from a stat of /proc/<pid>/exe, which reaches
    the task's own file) and in which namespaces (mnt_ns, pid_ns: the inode numbers of /proc/<pid>/ns/*; ns_pid
    from status): the keyword arguments of ``records.Details``, what cannot be read left out."""
    out: dict = {}
    try:
        st = os.stat(f"{proc}/{pid}/exe")
    except OSError:
        st = None
    if st is not None:
        flags = 0
        if image is not None and image.startswith("/memfd:"):
            flags |= ExeFlags.MEMFD
        if image is not None and image.endswith(" (deleted)") or st.st_nlink == 0:
            flags |= ExeFlags.DELETED
        if st.st_mode & _stat.S_ISUID:
            flags |= ExeFlags.SETUID
        if st.st_mode & (_stat.S_ISGID | _stat.S_IXGRP) == _stat.S_ISGID | _stat.S_IXGRP:
            flags |= ExeFlags.SETGID
        out.update(exe_device=st.st_dev & 0xFFFFFFFF, exe_inode=st.st_ino, exe_flags=int(flags))
    for name, key in (("mnt", "mnt_ns"), ("pid", "pid_ns")):
        try:
            out[key] = os.stat(f"{proc}/{pid}/ns/{name}").st_ino
        except OSError:
            pass
    ns_pid = _namespace_pid(status) if status and "pid_ns" in out else None
    if ns_pid is not None:
        out["ns_pid"] = ns_pid
    return out


def process_details(proc: str, pid: int) -> dict:
    """What /proc says now about ``pid``'s image, cwd, effective uid and user, cgroup (and container): the
    keyword arguments of ``records.Details``; what cannot be read (gone, kernel thread, no permission) is left
    out. Read after the event, so the caller flags it (EventFlags.PROCFS) and checks the start time."""
    out: dict = {}
    image = _readlink(f"{proc}/{pid}/exe")
    if image is not None:
        out["image"] = os.fsdecode(image)
    cwd = _readlink(f"{proc}/{pid}/cwd")
    if cwd is not None:
        out["current_directory"] = os.fsdecode(cwd)
    # A file, the field read from it, and a field that follows from that one: the user of a uid, the container
    # of a cgroup.
    texts = {}
    for file, read, key, derive, derived_key in (("status", effective_uid, "uid", user_name, "user"),
                                                 ("cgroup", cgroup_path, "cgroup", container_id_from_cgroup,
                                                  "container_id")):
        text = texts[file] = read_proc(f"{proc}/{pid}/{file}", 4096)
        value = read(text) if text else None
        if value is None:
            continue
        out[key] = value
        derived = derive(value)
        if derived is not None:
            out[derived_key] = derived
    out.update(where_details(proc, pid, out.get("image"), texts["status"]))
    return out


def host_and_boot_id(proc: str = "/proc") -> bytes:
    """What names this host and this boot: /etc/machine-id and the kernel's random boot_id (a new one every
    boot); the hostname when there is no machine-id."""
    host = read_proc("/etc/machine-id", 256) or read_proc("/var/lib/dbus/machine-id", 256)
    if not host:
        host = os.uname().nodename.encode()
    boot = read_proc(f"{proc}/sys/kernel/random/boot_id", 256) or b""
    return host.strip() + b"\0" + boot.strip()


def details_now(proc: str, pid: int, stat: tuple[bytes, int, int, int, int], tick_ns: int,
                boot_clock: KernelClock, flags: int = EventFlags.PROCFS) -> Details:
    """``records.Details`` of ``pid`` from /proc now (``stat`` from ``stat_details``; ``boot_clock`` a
    ``KernelClock(CLOCK_BOOTTIME)`` for its start time): start time, session and terminal from stat, then
    ``process_details``; flagged as read after the fact."""
    _, _, session, tty_nr, start = stat
    return Details(start_filetime=boot_clock.filetime(start * tick_ns), session=session, tty=tty_name(tty_nr),
                   flags=int(flags), **process_details(proc, pid))


def snapshot(proc: str = "/proc") -> list[tuple[int, int, str, Details]]:
    """Every process running now as (pid, ppid, command line, Details): what the identity stage is seeded with
    when a monitor starts."""
    from ..records import command_line_from_argv

    tick, boot_clock = clock_tick_ns(), KernelClock(CLOCK_BOOTTIME)
    out = []
    try:
        names = [int(e.name) for e in os.scandir(proc) if e.name.isdigit()]
    except OSError:
        return out
    for pid in names:
        data = read_proc(f"{proc}/{pid}/stat", 1024)
        stat = stat_details(data) if data else None
        if stat is None:
            continue  # gone already
        raw = read_proc(f"{proc}/{pid}/cmdline")
        line = command_line_from_argv(argv_of(raw) if raw else [stat[0]])
        out.append((pid, stat[1], line, details_now(proc, pid, stat, tick, boot_clock, EventFlags.SEEDED)))
    return out
