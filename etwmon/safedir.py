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
           "user_name", "group_name", "open_trusted"]

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


_MAX_SYMLINKS = 40  # as the kernel's own limit on a path's symbolic links


def _owner_problem(st: os.stat_result) -> str | None:
    if st.st_uid not in (0, os.geteuid()):
        return f"it is owned by uid {st.st_uid} ({user_name(st.st_uid)}), neither root nor this user"
    return None


def open_trusted(path: str, directory: bool = False, flags: int = os.O_RDONLY) -> int:
    """Open ``path`` only if nobody but root and this user could have put it there or changed it, as sshd's
    StrictModes judges a user's files: every directory from ``/`` down, and the file itself, owned by root or
    this user and not writable by its group or others. One exception: a sticky directory owned by root or this
    user (``/tmp``), where others may add names but never remove or rename what is not theirs; a symbolic link
    in such a directory is refused (whoever could write there may have made it). Elsewhere a symbolic link is
    followed, and its target checked the same way. Every step is opened without following a symlink, relative
    to the checked directory above it, and checked with ``fstat``, so nothing swapped in between is trusted.

    Returns the open descriptor (``directory``: of a directory; else of a regular file, opened with ``flags``,
    never blocking on a FIFO). ``SafeDirError`` names the path and what is wrong."""
    path = os.path.abspath(path)
    todo = [part for part in path.split("/") if part]
    fd = os.open("/", _DIR_FLAGS)
    where, hops = "/", 0
    try:
        shared = _check_step(fd, where, True)
        while todo:
            name = todo.pop(0)
            last = not todo
            step = _DIR_FLAGS if (not last or directory) else flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
            try:
                nfd = os.open(name, step | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR) or not _is_link(name, fd):
                    raise SafeDirError(f"refusing {path}: cannot open {os.path.join(where, name)}: "
                                       f"{exc.strerror}") from None
                if shared:
                    raise SafeDirError(f"refusing {path}: {os.path.join(where, name)} is a symlink in a directory "
                                       "others may write; point to the file itself") from None
                hops += 1
                if hops > _MAX_SYMLINKS:
                    raise SafeDirError(f"refusing {path}: too many symbolic links") from None
                target = os.readlink(name, dir_fd=fd)
                todo[:0] = [part for part in target.split("/") if part]
                if target.startswith("/"):
                    os.close(fd)
                    fd, where = os.open("/", _DIR_FLAGS), "/"
                    shared = _check_step(fd, where, True)
                continue
            os.close(fd)
            fd, where = nfd, os.path.join(where, name) if name != ".." else os.path.dirname(where) or "/"
            shared = _check_step(fd, where if not last else path, directory or not last)
        result, fd = fd, -1
        return result
    finally:
        if fd >= 0:
            os.close(fd)


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False


def _check_step(fd: int, path: str, directory: bool) -> bool:
    """Check one opened step of a trusted path; True when it is a sticky directory others may write."""
    st = os.fstat(fd)
    problem = _owner_problem(st)
    writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if problem is None and directory and not stat.S_ISDIR(st.st_mode):
        problem = "it is not a directory"
    if problem is None and not directory and not stat.S_ISREG(st.st_mode):
        problem = "it is not a regular file"
    if problem is None and writable and not (directory and st.st_mode & stat.S_ISVTX):
        who = "anyone" if st.st_mode & stat.S_IWOTH else "its group"
        problem = (f"it is writable by others: {who} may write it ({describe_mode(st)}"
                   f"{'' if directory else ', ' + stat.filemode(st.st_mode)})")
    if problem is not None:
        raise SafeDirError(f"refusing {path}: {problem}; whoever can change it decides what etwmon does")
    return bool(writable)


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
