"""Write a recording: the header, then records (readinto bytes, whole records only) gathered into compressed
chunks, each written as soon as it is ``chunk_bytes`` big or ``flush_interval`` seconds old, so a crash loses at
most that much; ``close()`` writes the end mark with the recorder's summary.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from .format import END, RECS, encode_chunk, encode_header
from .output import create_output

__all__ = ["RecordingWriter", "CHUNK_BYTES", "FLUSH_INTERVAL"]

#: Raw bytes gathered into one chunk (about 1,000-2,000 process records): big enough to compress well.
CHUNK_BYTES = 256 << 10
#: The longest a record waits in memory before its chunk is written.
FLUSH_INTERVAL = 1.0


class RecordingWriter:
    """``RecordingWriter(path, header)``: creates ``path`` (see ``output.create_output``; ``overwrite``,
    ``owner``) and writes the header (or, without one, ``begin(header)`` does, once the source is known: the name
    is taken before anything starts). ``write(records, count)`` adds whole records; ``tick()`` writes a chunk
    that waited long enough; ``close(summary)`` writes the rest and the end mark."""

    def __init__(self, path: str | os.PathLike[str], header: dict[str, Any] | None = None, *, overwrite: bool = False,
                 owner: tuple[int, int] | None = None, chunk_bytes: int = CHUNK_BYTES,
                 flush_interval: float = FLUSH_INTERVAL) -> None:
        self.path = os.fspath(path)
        self._fd = create_output(self.path, overwrite=overwrite, owner=owner)
        self._pending: list[bytes] = []
        self._pending_bytes = self._pending_records = 0
        self._chunk_bytes = chunk_bytes
        self._flush_interval = flush_interval
        self._since = time.monotonic()
        self.records = 0  # records written (in chunks)
        self.raw_bytes = 0
        self.size = 0  # bytes in the file
        self.closed = False
        self._begun = False
        if header is not None:
            self.begin(header)

    def begin(self, header: dict[str, Any]) -> None:
        """Write the file header (once, before any record)."""
        if self._begun:
            raise ValueError("the header is written already")
        self._begun = True
        self._write(encode_header(header))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        self.size += len(data)

    def write(self, records: bytes, count: int) -> None:
        """Add ``count`` whole records (wire format, as readinto gives them)."""
        if not count:
            return
        if not self._begun:
            raise ValueError("begin(header) first")
        if not self._pending:
            self._since = time.monotonic()
        self._pending.append(bytes(records))
        self._pending_bytes += len(records)
        self._pending_records += count
        if self._pending_bytes >= self._chunk_bytes:
            self.flush()

    def tick(self) -> None:
        """Write the pending records when the oldest has waited ``flush_interval`` seconds."""
        if self._pending and time.monotonic() - self._since >= self._flush_interval:
            self.flush()

    def flush(self) -> None:
        """Write the pending records as one chunk."""
        if not self._pending:
            return
        raw = b"".join(self._pending)
        self._write(encode_chunk(RECS, raw, self._pending_records))
        self.records += self._pending_records
        self.raw_bytes += len(raw)
        self._pending, self._pending_bytes, self._pending_records = [], 0, 0

    @property
    def begun(self) -> bool:
        """True once the header is written."""
        return self._begun

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Write what is pending and the end mark (with ``summary``), and close the file; idempotent."""
        if self.closed:
            return
        try:
            if not self._begun:
                raise ValueError("begin(header) first")
            self.flush()
            body = json.dumps(summary or {}, ensure_ascii=True, separators=(",", ":"), sort_keys=True)
            self._write(encode_chunk(END, body.encode("ascii")))
            os.fsync(self._fd)
        finally:
            self.closed = True
            os.close(self._fd)

    def abandon(self) -> None:
        """Close without the end mark (what a crash leaves: the reader says so)."""
        if not self.closed:
            self.closed = True
            os.close(self._fd)
