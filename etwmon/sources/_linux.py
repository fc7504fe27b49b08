"""Linux facts several sources need, each found one way: capabilities, whether a process is alive, and sizing a
netlink socket's receive buffer (with the warning when the kernel grants less)."""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

from ..errors import SourceUnavailable
from ._proc import parse_stat, read_proc, stat_state

if TYPE_CHECKING:
    from .base import Source

__all__ = [
    "CAP_NET_ADMIN", "CAP_AUDIT_CONTROL", "CAP_AUDIT_READ", "effective_capabilities", "has_capability",
    "live_process_start", "netlink_socket_drops", "require_available", "set_receive_buffer",
]

log = logging.getLogger(__name__)

CAP_NET_ADMIN = 12
CAP_AUDIT_CONTROL = 30
CAP_AUDIT_READ = 37

_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


def effective_capabilities() -> int | None:
    """This process's effective capability set (``CapEff`` of /proc/self/status), or None if unreadable."""
    data = read_proc("/proc/self/status")
    for line in (data or b"").splitlines():
        if line.startswith(b"CapEff:"):
            try:
                return int(line.split()[1], 16)
            except (IndexError, ValueError):
                return None
    return None


def has_capability(cap: int) -> bool:
    """Whether this process has capability ``cap`` (a CAP_* number) in its effective set.

    One rule for every source: the kernel's own answer (CapEff) decides, so root in a container that dropped a
    capability does not have it. Only when /proc/self/status cannot be read does the rule from before
    capabilities stand in: euid 0 has them all, anyone else none."""
    caps = effective_capabilities()
    if caps is None:
        return os.geteuid() == 0
    return bool(caps >> cap & 1)


def live_process_start(pid: int, proc_root: str = "/proc") -> int | None:
    """Start time (clock ticks since boot) of process ``pid`` if it is alive; None if there is no such process
    or it has died: a zombie (state Z, killed but not yet reaped by its parent) or dead (X) counts as gone.
    (pid, start time) names one process even when the pid is reused."""
    data = read_proc(f"{proc_root}/{pid}/stat", 1024)
    parsed = parse_stat(data) if data else None
    if parsed is None or stat_state(data) in ("Z", "X"):  # type: ignore[arg-type]
        return None
    return parsed[2]


def require_available(source: Source) -> None:
    """Raise SourceUnavailable with the source's own reason when it cannot run here (what a source's open() checks
    first)."""
    reason = source.unavailable_reason()
    if reason is not None:
        raise SourceUnavailable(reason)


def _rmem_max() -> int | None:
    data = read_proc("/proc/sys/net/core/rmem_max")
    try:
        return int(data) if data else None
    except ValueError:
        return None


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB" if size >= 1 << 20 else f"{size} bytes"


def set_receive_buffer(sock: socket.socket, size: int, what: str) -> int:
    """Give ``sock`` a receive buffer of ``size`` bytes: SO_RCVBUFFORCE (CAP_NET_ADMIN) past net.core.rmem_max,
    else SO_RCVBUF, which that sysctl caps. Returns what SO_RCVBUF then reports: twice the size granted (the
    kernel doubles it for its own bookkeeping). Less than asked is logged once as a warning saying what
    happened and how to fix it; ``what`` names the socket in it (e.g. "etwmon netlink")."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size)
    except OSError:  # not CAP_NET_ADMIN: SO_RCVBUF, capped by net.core.rmem_max
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        except OSError as exc:
            log.warning("%s: cannot set the socket receive buffer to %s: %s", what, _mib(size), exc)
    reported = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    granted = reported // 2
    if granted < size:
        rmem_max = _rmem_max()
        cap = f" at {rmem_max} bytes" if rmem_max is not None else ""
        log.warning("%s: asked for a socket receive buffer of %s, got %s: net.core.rmem_max caps it%s without "
                    "CAP_NET_ADMIN, so bursts may overflow it (every loss is counted). To get it all, run as root "
                    "or raise the cap: sysctl -w net.core.rmem_max=%d", what, _mib(size), _mib(granted), cap, size)
    return reported


def netlink_socket_drops(inode: int) -> int | None:
    """sk_drops of the netlink socket with this inode (messages the kernel could not queue to it), from
    /proc/net/netlink; None if it is not listed."""
    data = read_proc("/proc/net/netlink", 1 << 16)
    for line in (data or b"").splitlines()[1:]:
        parts = line.split()
        try:
            if len(parts) >= 10 and int(parts[9]) == inode:
                return int(parts[8])
        except ValueError:
            return None
    return None


class WakePipe:
    """The pipe a source's ``run()`` polls beside its kernel socket, so that ``stop()`` from any thread wakes it
    at once. ``fileno()`` is the end to poll; ``wake()`` is safe before ``open()`` and after ``close()``."""

    def __init__(self) -> None:
        self._read = self._write = -1

    def open(self) -> None:
        if self._read < 0:
            self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._read

    def wake(self) -> None:
        if self._write >= 0:
            try:
                os.write(self._write, b"\1")
            except OSError:  # full (already woken) or closed meanwhile: either way run() will see it
                pass

    def close(self) -> None:
        fds, self._read, self._write = (self._read, self._write), -1, -1
        for fd in fds:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
