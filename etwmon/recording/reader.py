"""Replay a recording: ``open_recording(path)`` is a reader like a Monitor, a service connection or the fleet
reader (``readinto``, ``wait``, ``fileno``, ``events``, ``stats``), so ``etwmon tail --replay`` and any code
written for a live Monitor read a file unchanged.

Opening checks the whole file once (chunk lengths and checksums, not decompressing): a file cut by a crash or a full
disk, or damaged, reads back to its last whole chunk, and ``note`` (also logged as a warning) says where and why.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import stat
from typing import Any, Iterator

import numpy as np

from ..errors import BufferTooSmall, RecordFormatError
from ..formats import escape_text, human_bytes
from ..monitor import EventReader, MonitorStats, ReadyFlag
from ..records import Event, HEADER_SIZE, ItemType, record_headers
from .format import (
    CHUNK_HEADER, END, MAX_CHUNK_RAW, RECS, ChunkHeader, RecordingFormatError, decompress, read_chunk_header,
    read_header,
)

__all__ = ["RecordingReader", "open_recording"]

log = logging.getLogger(__name__)

_LOST = int(ItemType.RecordsLost)


class RecordingReader(EventReader):
    """The records of a recording file, through the Reader protocol. Ready at once (``start()`` is a no-op kept
    for the protocol); ``running`` is True until every record was read or ``stop()`` was called.

    ``header``: the file's header fields (source, host, boot_id, start_time, filter, ...); ``summary``: the
    recorder's closing summary (None when the file does not end with one); ``complete``: True when the file
    ended as the recorder closed it; ``note``: why it did not (None when it did)."""

    lossy = False

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._file = open(self.path, "rb")
        try:
            st = os.fstat(self._file.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise RecordingFormatError(f"{self.path} is not a regular file")
            self.header, start = read_header(self._file, self.path)
            self.summary: dict[str, Any] | None = None
            self.note: str | None = None
            self._chunks = self._index(start, st.st_size)
        except BaseException:
            self._file.close()
            raise
        self.complete = self.note is None
        if self.note is not None:
            log.warning("%s", self.note)
        self.total_records = sum(c[1].records for c in self._chunks)
        self.total_bytes = sum(c[1].raw for c in self._chunks)
        self._next_chunk = 0
        self._raw = b""
        self._ends = np.zeros(0, dtype=np.int64)
        self._lost = np.zeros(0, dtype=np.int64)
        self._at = 0  # next record in the current chunk
        self._read = self._lost_read = 0
        self._stopped = False
        self._flag = ReadyFlag()
        self._update_wakeup()

    # -- the file --------------------------------------------------------------------------------------

    def _index(self, offset: int, size: int) -> list[tuple[int, ChunkHeader]]:
        """(where the stored bytes start, header) of every whole RECS chunk with a good checksum, in order; sets
        ``note`` where the file stops being readable and ``summary`` from the END chunk."""
        chunks = []
        f, name = self._file, self.path
        number = 0
        while True:
            head = f.read(CHUNK_HEADER.size)
            if not head:
                self.note = (f"{name} ends after chunk {number} without the recorder's end mark (a crash, a kill or "
                             f"a full disk?): all {number} chunks read, later events were not written")
                return chunks
            if len(head) < CHUNK_HEADER.size:
                self.note = (f"{name} is truncated at byte {size}: read up to its last whole chunk ({number}, ending "
                             f"at byte {offset}); the {size - offset} bytes after it are an incomplete chunk")
                return chunks
            chunk = read_chunk_header(head)
            if chunk.kind not in (RECS, END) or chunk.raw > MAX_CHUNK_RAW:
                self.note = (f"{name} is damaged at byte {offset} (not a chunk header): read up to its last whole "
                             f"chunk ({number}); the {size - offset} bytes from there are ignored")
                return chunks
            stored = f.read(chunk.stored)
            if len(stored) < chunk.stored:
                self.note = (f"{name} is truncated at byte {size}: read up to its last whole chunk ({number}, ending "
                             f"at byte {offset}); the {size - offset} bytes after it are an incomplete chunk")
                return chunks
            if not chunk.check(stored):
                self.note = (f"{name}: chunk {number + 1} at byte {offset} fails its checksum: read up to the chunk "
                             f"before it; the {size - offset} bytes from there are ignored")
                return chunks
            if chunk.kind == END:
                try:
                    self.summary = json.loads(decompress(chunk, stored))
                except (RecordingFormatError, ValueError):
                    self.summary = None
                end = offset + CHUNK_HEADER.size + chunk.stored
                if end < size:
                    self.note = f"{name}: {size - end} bytes after the recording's end mark are ignored"
                return chunks
            chunks.append((offset + CHUNK_HEADER.size, chunk))
            offset += CHUNK_HEADER.size + chunk.stored
            number += 1

    def _load_next(self) -> bool:
        """Decompress the next chunk into the current one; False when there is none (or it is unreadable)."""
        while self._next_chunk < len(self._chunks):
            where, chunk = self._chunks[self._next_chunk]
            self._next_chunk += 1
            self._file.seek(where)
            try:
                raw = decompress(chunk, self._file.read(chunk.stored))
                index = record_headers(raw)
            except (RecordingFormatError, RecordFormatError) as exc:
                self.note = f"{self.path}: chunk {self._next_chunk} cannot be read ({exc}): reading stops there"
                self.complete = False
                log.warning("%s", self.note)
                self._chunks = self._chunks[:self._next_chunk - 1]
                return False
            if not len(index):
                continue
            self._raw = raw
            self._ends = index["offset"] + index["Size"]
            lost = np.zeros(len(index), dtype=np.int64)
            at = index["offset"][index["Type"] == _LOST]
            if len(at):
                data = np.frombuffer(raw, dtype=np.uint8)
                lost[index["Type"] == _LOST] = data[at[:, None] + HEADER_SIZE + np.arange(4)].astype(np.int64) \
                    @ np.array([1, 1 << 8, 1 << 16, 1 << 24], dtype=np.int64)
            self._lost = lost
            self._at = 0
            return True
        return False

    # -- the Reader protocol ---------------------------------------------------------------------------

    def start(self) -> "RecordingReader":
        return self

    def stop(self) -> None:
        self._stopped = True

    def close(self) -> None:
        self._stopped = True
        self._file.close()
        self._flag.close()

    def __enter__(self) -> "RecordingReader":
        return self

    @property
    def running(self) -> bool:
        return not self._stopped and self.readable()

    def readable(self) -> bool:
        return self._at < len(self._ends) or self._next_chunk < len(self._chunks)

    def wait(self, timeout: float | None = None) -> bool:
        """A file has everything at once: True while records are left, never blocks."""
        return self.readable()

    def fileno(self) -> int:
        """Readable while records are left."""
        return self._flag.fileno()

    def readinto(self, buffer) -> int:
        """Whole records into ``buffer``, as many as fit (at most one chunk's); 0 at the end. Raises
        BufferTooSmall when not even the next record fits."""
        if self._at >= len(self._ends) and not self._load_next():
            self._update_wakeup()
            return 0
        out = memoryview(buffer).cast("B")
        ends, at = self._ends, self._at
        start = int(ends[at - 1]) if at else 0
        last = int(np.searchsorted(ends, start + len(out), side="right"))
        if last == at:
            raise BufferTooSmall(int(ends[at]) - start, len(out))
        stop = int(ends[last - 1])
        out[:stop - start] = self._raw[start:stop]
        self._read += last - at
        self._lost_read += int(self._lost[at:last].sum())
        self._at = last
        self._update_wakeup()
        return stop - start

    def _update_wakeup(self) -> None:
        """Keep ``fileno()`` readable exactly while records are left (one byte in the pair, sent once)."""
        self._flag.put(self.readable())

    def events(self, timeout: float | None = None, bufsize: int = 0x10000) -> Iterator[Event]:
        """Every event of the recording, in order (``timeout`` is ignored: a file does not wait)."""
        return super().events(0, bufsize)

    @property
    def stats(self) -> MonitorStats:
        """``read`` records so far, ``lost`` the RecordsLost counts among them; ``max_items``/``max_bytes`` the
        file's whole count and size, ``items``/``bytes`` what is left of the current chunk."""
        left = len(self._ends) - self._at
        left_bytes = int(self._ends[-1] - (self._ends[self._at - 1] if self._at else 0)) if left else 0
        return MonitorStats(pushed=self.total_records, read=self._read, dropped=0, lost=self._lost_read,
                            items=left, bytes=left_bytes, max_items=max(1, self.total_records),
                            max_bytes=max(1, self.total_bytes), source=f"recording of {self.header.get('source')}")

    def describe(self) -> str:
        h = self.header
        return (f"replay: {escape_text(self.path)}, {escape_text(str(h.get('source')))} source on "
                f"{escape_text(str(h.get('host')))} from {escape_text(str(h.get('start_time')))}, "
                f"{self.total_records} records / {human_bytes(self.total_bytes)}, {describe_filter(h.get('filter'))}")

    def __repr__(self) -> str:
        return f"<RecordingReader {self.path!r} {self._read}/{self.total_records} records>"


def describe_filter(what: Any) -> str:
    """The header's ``filter`` for a person."""
    if not isinstance(what, dict):
        return "kept: everything"
    command = what.get("command")
    parts = ["kept: everything"]
    if isinstance(command, list) and all(isinstance(a, str) for a in command):
        parts = [f"kept: the process tree of {escape_text(shlex.join(command))}"]
        if what.get("user"):
            parts.append(f"run as {escape_text(str(what['user']))}")
    if what.get("config"):
        parts.append(f"rules: {escape_text(str(what['config']))}")
    return ", ".join(parts)


def open_recording(path: str | os.PathLike[str]) -> RecordingReader:
    """A reader of the recording at ``path`` (``RecordingFormatError`` when it is not one)."""
    return RecordingReader(path)
