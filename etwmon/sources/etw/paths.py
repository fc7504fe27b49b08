"""NT paths into drive-letter paths: ``NtPathMapper``, over QueryDosDevice, the way the book's client maps them."""

from __future__ import annotations

import logging
import os
import time
from typing import Callable

__all__ = ["NtPathMapper"]

log = logging.getLogger(__name__)


def _query_dos_device(drive: str) -> str | None:
    """The NT device behind a drive letter ("C:" -> "\\Device\\HarddiskVolume3"), or None."""
    try:
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):
        return None
    buffer = ctypes.create_unicode_buffer(1024)
    if not kernel32.QueryDosDeviceW(drive, buffer, len(buffer)):
        return None
    return buffer.value  # the first name of the MULTI_SZ: the current mapping


class NtPathMapper:
    """Turns the NT paths ETW reports (``\\Device\\HarddiskVolume3\\Windows\\notepad.exe``,
    ``\\SystemRoot\\...``, ``\\??\\C:\\...``) into drive-letter paths, the way the book's client does with
    QueryDosDevice. The drive table is read once and re-read (at most every ``refresh_seconds``) when a device
    path matches no drive, e.g. after a USB stick was plugged in. Paths it cannot map stay as they are.

    ``query_dos_device(drive) -> device or None`` and ``system_root`` are injectable for tests.
    """

    def __init__(self, query_dos_device: Callable[[str], str | None] | None = None,
                 system_root: str | None = None, refresh_seconds: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._query = query_dos_device or _query_dos_device
        self._system_root = system_root if system_root is not None else os.environ.get("SystemRoot")
        self._refresh_seconds = refresh_seconds
        self._clock = clock
        self._table: list[tuple[str, str]] | None = None  # (device prefix, lower case, with "\"; drive)
        self._loaded_at = 0.0

    def _load(self) -> None:
        table = []
        for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
            try:
                device = self._query(letter + ":")
            except Exception as exc:  # a broken drive must not break the event stream
                log.debug("QueryDosDevice(%s:) failed: %r", letter, exc)
                continue
            if device:
                table.append((device.rstrip("\\").lower() + "\\", letter + ":"))
        # Longest device first: \Device\HarddiskVolume10 must not be read as HarddiskVolume1 + "0".
        table.sort(key=lambda row: len(row[0]), reverse=True)
        self._table, self._loaded_at = table, self._clock()

    def _lookup(self, path: str) -> str | None:
        lower = path.lower()
        for prefix, drive in self._table or ():
            if lower.startswith(prefix):
                return drive + path[len(prefix) - 1:]
        return None

    def __call__(self, path: str) -> str:
        if path.startswith("\\??\\"):
            return path[4:]
        if path[:12].lower() == "\\systemroot\\" and self._system_root:
            return self._system_root.rstrip("\\") + path[11:]
        if not path.lower().startswith("\\device\\"):
            return path
        if self._table is None:
            self._load()
        mapped = self._lookup(path)
        if mapped is None and self._clock() - self._loaded_at >= self._refresh_seconds:
            self._load()
            mapped = self._lookup(path)
        return path if mapped is None else mapped
