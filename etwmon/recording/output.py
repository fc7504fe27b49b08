"""Output files of the recorder, the report and the exports, created without following symlinks.

A recording holds every command line of a run, so it is created 0600 (owned by ``--user`` when root records for
one). The final name is created with ``O_CREAT | O_EXCL | O_NOFOLLOW``: a name planted in a shared directory
(a symlink to /etc/shadow, a file someone else owns) makes the creation fail instead of being written through.
An existing file is replaced only when asked (``overwrite``), by unlinking the name (a symlink is removed, never
followed) and creating it afresh. Missing directories are made 0700.
"""

from __future__ import annotations

import errno
import os

from ..errors import Error

__all__ = ["OutputExists", "create_output"]


class OutputExists(Error, FileExistsError):
    """The output file is there and overwriting was not asked for."""


def create_output(path: str | os.PathLike[str], overwrite: bool = False, mode: int = 0o600,
                  owner: tuple[int, int] | None = None) -> int:
    """A new file at ``path`` opened for writing (its descriptor); ``owner`` (uid, gid) is given the file and any
    directory made for it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        _make_directories(directory, owner)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        if not overwrite:
            raise OutputExists(f"{path} exists: give another name, or --force to replace it") from None
        if os.path.isdir(path) and not os.path.islink(path):
            raise OutputExists(f"{path} is a directory") from None
        os.unlink(path)
        fd = os.open(path, flags, mode)
    try:
        if owner is not None and hasattr(os, "fchown"):
            os.fchown(fd, *owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_directories(directory: str, owner: tuple[int, int] | None) -> None:
    parent = os.path.dirname(directory)
    if parent != directory and not os.path.isdir(parent):
        _make_directories(parent, owner)
    try:
        os.mkdir(directory, 0o700)
    except FileExistsError:
        return
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
    if owner is not None and hasattr(os, "chown"):
        os.chown(directory, *owner, follow_symlinks=False)
