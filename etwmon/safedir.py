"""Safe places for root's runtime files: private directories such as /run/etwmon (the service's socket) and
/run/etwmon-audit (the audit source's lock) and files in them, created and opened without following symlinks
and checked after opening.

Everything is opened relative to a directory descriptor that was checked (``O_DIRECTORY | O_NOFOLLOW``, then
``fstat``), so a name swapped for a symlink between a check and a use is never followed. The one looser bit
allowed is group *search* on the directory (0710): the service's ``--group`` reaches its socket that way, and
can neither list the directory nor put anything in it.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import Error

__all__ = ["RUN_DIR", "SafeDirError", "private_directory", "open_private_file", "unsafe_reason", "describe_mode",
           "user_name", "group_name"]

#: Where etwmon keeps its runtime files when it runs as root.
RUN_DIR = "/run/etwmon"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_REMOVE = "; remove it (etwmon makes it again, root-only)"


class SafeDirError(Error, PermissionError):
    """A runtime directory or file is not safe to use (wrong owner, open to others, a symlink, ...); the
    message names the path and what is wrong."""


def user_name(uid: int) -> str:
    """The user's name, or the number when it has none."""
    import pwd  # (Unix only; etwmon imports on Windows too)

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def group_name(gid: int) -> str:
    """The group's name, or the number when it has none."""
    import grp

    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def describe_mode(st: os.stat_result) -> str:
    """``0710 root:etwmon`` style text for messages."""
    return f"{stat.S_IMODE(st.st_mode):04o} {user_name(st.st_uid)}:{group_name(st.st_gid)}"


def unsafe_reason(st: os.stat_result, directory: bool) -> str | None:
    """What makes a private directory (``directory=True``) or a file in one unsafe to trust, or None."""
    euid = os.geteuid()
    if directory and not stat.S_ISDIR(st.st_mode):
        return "it is not a directory"
    if not directory and not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_uid != euid:
        return f"it is owned by uid {st.st_uid}, not by {'root' if euid == 0 else f'uid {euid}'}"
    mode = stat.S_IMODE(st.st_mode)
    if directory and mode & 0o067:
        return f"its mode is {mode:04o}, not 0700 (or 0710: a group may reach the service's socket)"
    if not directory and mode & 0o022:
        return f"it is group or world writable (mode {mode:04o})"
    if not directory and st.st_nlink != 1:
        return f"it has {st.st_nlink} hard links"
    return None


def _check_parent(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if st.st_uid not in (0, os.geteuid()):
        raise SafeDirError(f"refusing {path}: it belongs to uid {st.st_uid}, who could swap what is inside")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise SafeDirError(f"refusing {path}: it is writable by others without the sticky bit "
                           f"({describe_mode(st)}), so anyone could swap what is inside; use a directory only "
                           "root can write")


def private_directory(path: str = RUN_DIR, group: int | None = None) -> int:
    """Create (or check) the directory ``path`` for root's runtime files and return an open descriptor of it.

    A new directory is made mode 0700. An existing one must be a real directory (not a symlink) owned by this
    user with mode 0700 or 0710, or ``SafeDirError`` names the path and what is wrong. With ``group`` the
    directory is given to that group with search access (0710), so its members can reach a socket inside;
    without, a 0710 that a running service set is left as it is. The parent must not be writable by others
    unless it is sticky (/tmp). The caller closes the descriptor.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if not name:
        raise SafeDirError(f"refusing {path!r}: not a directory name")
    pfd = os.open(parent, _DIR_FLAGS)
    try:
        _check_parent(pfd, parent)
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            pass
        try:
            fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise SafeDirError(f"refusing {path}: it is a symbolic link or not a directory{_REMOVE}") from None
            raise
    finally:
        os.close(pfd)
    try:
        st = os.fstat(fd)
        problem = unsafe_reason(st, directory=True)
        if problem is not None:
            raise SafeDirError(f"refusing {path}: {problem}{_REMOVE}")
        if group is not None:
            if st.st_gid != group:
                os.fchown(fd, -1, group)
            if not st.st_mode & stat.S_IXGRP:
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IXGRP)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_private_file(dir_fd: int, name: str, flags: int = os.O_RDWR | os.O_CREAT, mode: int = 0o600,
                      path: str | None = None) -> int:
    """Open ``name`` inside a directory from ``private_directory`` without following a symlink, and check it
    is a regular file with one link, owned by this user, that nobody else can write (``SafeDirError``
    otherwise, naming ``path``, also for a symlink)."""
    path = path or name
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SafeDirError(f"refusing {path}: it is a symbolic link; remove it") from None
        raise
    try:
        problem = unsafe_reason(os.fstat(fd), directory=False)
        if problem is not None:
            raise SafeDirError(f"refusing {path}: {problem}; remove it")
        return fd
    except BaseException:
        os.close(fd)
        raise
