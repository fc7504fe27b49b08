"""Safe places for root's runtime files: the private directory /run/etwmon (the service's socket, the audit
source's lock) and files in it, created and opened without following symlinks and checked after opening.

Everything is opened relative to a directory descriptor that was checked (``O_DIRECTORY | O_NOFOLLOW``, then
``fstat``), so a name swapped for a symlink between a check and a use is never followed.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import stat

from .errors import Error

__all__ = ["RUN_DIR", "SafeDirError", "private_directory", "open_private_file", "describe_mode"]

#: Where etwmon keeps its runtime files when it runs as root.
RUN_DIR = "/run/etwmon"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SafeDirError(Error, PermissionError):
    """A runtime directory or file is not safe to use (wrong owner, writable by others, a symlink, ...)."""


def describe_mode(st: os.stat_result) -> str:
    """``0710 root:etwmon`` style text for messages."""
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{stat.S_IMODE(st.st_mode):04o} {owner}:{group}"


def _check_parent(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if st.st_uid not in (0, os.geteuid()):
        raise SafeDirError(f"{path} belongs to uid {st.st_uid}: it could swap what is inside; use a directory "
                           "owned by root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise SafeDirError(f"{path} is writable by others without the sticky bit ({describe_mode(st)}): anyone "
                           "could swap what is inside; use a directory only root can write")


def private_directory(path: str = RUN_DIR, group: int | None = None) -> int:
    """Create (or check) the directory ``path`` for root's runtime files and return an open descriptor of it.

    A new directory is made mode 0700, or 0710 with ``group`` (members may reach a socket inside, not list
    it). An existing one must be a real directory (not a symlink) owned by this user and writable by nobody
    else, or ``SafeDirError`` says what is wrong; its mode is never tightened (another user of the directory
    may have given its group access), world bits are removed and ``group`` gets search access. The parent
    must not be writable by others unless it is sticky (/tmp). The caller closes the descriptor.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if not name:
        raise SafeDirError(f"{path!r} is not a directory name")
    pfd = os.open(parent, _DIR_FLAGS & ~os.O_NOFOLLOW)
    try:
        _check_parent(pfd, parent)
        try:
            os.mkdir(name, 0o700, dir_fd=pfd)
        except FileExistsError:
            pass
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise SafeDirError(f"{path} is a symlink or not a directory: remove it (etwmon makes it)") from None
            raise
    finally:
        os.close(pfd)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise SafeDirError(f"{path} belongs to uid {st.st_uid}, not to uid {os.geteuid()} "
                               f"({describe_mode(st)}): remove it (etwmon makes it)")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise SafeDirError(f"{path} is writable by others ({describe_mode(st)}): what is inside cannot be "
                               "trusted; remove it (etwmon makes it)")
        mode = stat.S_IMODE(st.st_mode) & ~0o007
        if group is not None:
            if st.st_gid != group:
                os.fchown(fd, -1, group)
            mode |= 0o010
        if mode != stat.S_IMODE(st.st_mode):
            os.fchmod(fd, mode)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_private_file(dir_fd: int, name: str, flags: int = os.O_RDWR | os.O_CREAT, mode: int = 0o600) -> int:
    """Open ``name`` inside a directory from ``private_directory`` without following a symlink, and check it
    is a regular file with one link, owned by this user, that nobody else can write (``SafeDirError``
    otherwise, also for a symlink)."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SafeDirError(f"{name} is a symbolic link: remove it") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SafeDirError(f"{name} is not a regular file")
        if st.st_nlink != 1:
            raise SafeDirError(f"{name} has {st.st_nlink} hard links: remove it")
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise SafeDirError(f"{name} is {describe_mode(st)}: it must belong to uid {os.geteuid()} and be "
                               "writable by nobody else; remove it")
        return fd
    except BaseException:
        os.close(fd)
        raise
