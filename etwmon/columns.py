"""The columnar readers: a batch of records as numpy arrays, without an object per record.

``parse_array`` gives every fixed field in one structured array (``ARRAY_DTYPE``) and the command lines as one
array (``RecordBatch``); ``record_headers`` the headers alone; ``parse_arrays`` one array per record type in the
book's layouts. They check the records exactly as ``etwmon.events.parse`` does (the same walk) and raise only
``RecordFormatError``. Re-exported by ``etwmon.events`` and ``etwmon.records``.
"""

from __future__ import annotations

import struct
from typing import Any, Iterator

import numpy as np

from .events import _CREATE_FIELDS, _U32X2, _U32X3, _as_bytes_view, _checked, _utf16, _walk
from .records import _CMDLINE_OFFSET, _U32, DTYPES, HEADER_SIZE, ItemType

__all__ = ["RECORD_INDEX_DTYPE", "record_headers", "parse_arrays", "ARRAY_DTYPE", "RecordBatch", "parse_array",
           "read_array"]


#: One row per record of a buffer: where it starts and its header fields.
RECORD_INDEX_DTYPE = np.dtype([("offset", "<i8"), ("Type", "<i2"), ("Size", "<u2"), ("Time", "<i8")])


def record_headers(buffer) -> np.ndarray:
    """The header of every record in ``buffer`` as a structured array (offset, Type, Size, Time).

    Checks the records the way ``parse`` does (``RecordFormatError`` naming the offset)."""
    rows = list(_walk(_as_bytes_view(buffer)))
    return np.array(rows, dtype=RECORD_INDEX_DTYPE)


def parse_arrays(buffer) -> dict[ItemType, np.ndarray]:
    """A batch as numpy structured arrays, one per record type present, for analysis without Python objects.

    Each array has the type's dtype from ``DTYPES`` (for ProcessCreate/ProcessExec the fixed part: the command
    lines are variable-length, use ``parse_array`` or ``parse`` for those). Unknown types are left out.
    """
    index = record_headers(buffer)
    data = np.frombuffer(_as_bytes_view(buffer), dtype=np.uint8)
    out: dict[ItemType, np.ndarray] = {}
    for item, dtype in DTYPES.items():
        starts = index["offset"][index["Type"] == item]
        if not len(starts):
            continue
        take = min(dtype.itemsize, int(index["Size"][index["Type"] == item].min()))
        rows = np.zeros((len(starts), dtype.itemsize), dtype=np.uint8)
        rows[:, :take] = data[starts[:, None] + np.arange(take)]
        out[item] = rows.view(dtype).reshape(len(starts))
    return out


# --- the columnar batch ------------------------------------------------------------------------------------

#: One row per record of ``parse_array``: the header, the fixed fields of every type (0 where a type has no
#: such field), and where the variable parts are in the batch's bytes (``RecordBatch.data``).
ARRAY_DTYPE = np.dtype([
    ("type", "<i2"),                 # ItemType number
    ("size", "<u2"),                 # the record's Size
    ("time", "<i8"),                 # FILETIME
    ("offset", "<i8"),               # where the record starts in data
    ("pid", "<u4"),                  # ProcessId (every type but RecordsLost)
    ("tid", "<u4"),                  # ThreadId (ThreadCreate, ThreadExit)
    ("parent_pid", "<u4"),           # ParentProcessId (ProcessCreate, ProcessExec)
    ("creating_pid", "<u4"),         # CreatingProcessId (ProcessCreate, ProcessExec)
    ("creating_tid", "<u4"),         # CreatingThreadId (ProcessCreate, ProcessExec)
    ("exit_code", "<u4"),            # ExitCode (ProcessExit, ThreadExit)
    ("count", "<u4"),                # Count (RecordsLost)
    ("command_line_offset", "<i8"),  # the command line's UTF-16LE in data (ProcessCreate, ProcessExec)
    ("command_line_chars", "<u4"),   # its length in UTF-16 code units (0: none)
    ("block_offset", "<i8"),         # the extension block in data
    ("block_size", "<u4"),           # its size in bytes (0: none)
])
#: One ``ARRAY_DTYPE`` row as ``struct`` packs it (the dtype has no padding).
_ROW = struct.Struct("<hHqqIIIIIIIqIqI")
#: Below this many records, ``parse_array`` builds its rows one by one (numpy's set-up costs more than the loop).
_VECTOR_ROWS = 64
#: The five ULONGs after the header (offsets 16..35): every fixed field but an image load's address is one of them.
_BODY_AT = np.arange(HEADER_SIZE, HEADER_SIZE + 20)
#: The columns pid .. count, in ARRAY_DTYPE's order, and per kind of record which body ULONG fills each (-1: none).
_WORD_COLUMNS = ("pid", "tid", "parent_pid", "creating_pid", "creating_tid", "exit_code", "count")
_WORD_OF = {  # ItemType number -> (pid, tid, parent_pid, creating_pid, creating_tid, exit_code, count)
    1: (0, -1, 1, 3, 2, -1, -1), 101: (0, -1, 1, 3, 2, -1, -1), 2: (0, -1, -1, -1, -1, 1, -1),
    3: (1, 0, -1, -1, -1, -1, -1), 4: (1, 0, -1, -1, -1, 2, -1), 5: (0, -1, -1, -1, -1, -1, -1),
    100: (-1, -1, -1, -1, -1, -1, 0),
}
_KIND = np.zeros(0x10000, dtype=np.uint8)  # Type (as uint16) -> row of the tables below; 0: a type without fields
_WORD_AT = np.zeros((len(_WORD_OF) + 1, len(_WORD_COLUMNS)), dtype=np.intp)
_WORD_HAS = np.zeros((len(_WORD_OF) + 1, len(_WORD_COLUMNS)), dtype=np.uint32)
for _row, (_item, _words) in enumerate(_WORD_OF.items(), 1):
    _KIND[_item] = _row
    _WORD_AT[_row] = [max(w, 0) for w in _words]
    _WORD_HAS[_row] = [w >= 0 for w in _words]
_HAS_COMMAND_LINE = np.zeros(len(_WORD_OF) + 1, dtype=bool)
_HAS_COMMAND_LINE[[_KIND[1], _KIND[101]]] = True


class RecordBatch:
    """A batch of records as columns: ``fields`` (a structured array of ``ARRAY_DTYPE``, one row per record,
    in order), ``command_lines`` (an object array of str, None where a record has none) and ``data`` (the
    batch's bytes, which the offsets in ``fields`` point into). ``len(batch)`` is the number of records."""

    __slots__ = ("fields", "data", "_command_lines")

    def __init__(self, fields: np.ndarray, data: bytes) -> None:
        self.fields = fields
        self.data = data
        self._command_lines: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.fields)

    @property
    def command_lines(self) -> np.ndarray:
        """The command line of each record (ProcessCreate, ProcessExec), None for the others; decoded once."""
        if self._command_lines is None:
            out = np.full(len(self.fields), None, dtype=object)
            data = self.data
            rows = np.flatnonzero((self.fields["type"] == 1) | (self.fields["type"] == 101))
            starts = self.fields["command_line_offset"][rows].tolist()
            chars = self.fields["command_line_chars"][rows].tolist()
            out[rows] = [_utf16(data[s:s + 2 * c]) for s, c in zip(starts, chars)]
            self._command_lines = out
        return self._command_lines


def parse_array(buffer) -> RecordBatch:
    """The records of ``buffer`` as columns (``RecordBatch``): every fixed field in one structured array of
    ``ARRAY_DTYPE``, the command lines as one array. Checks the records as ``parse`` does (and raises only
    ``RecordFormatError``); the batch is copied once, so the caller may reuse its buffer."""
    view = _as_bytes_view(buffer)
    data = buffer if type(buffer) is bytes else view.tobytes()
    rows, blocks, error = _checked(data)
    if error is not None:
        raise error
    if len(rows) < _VECTOR_ROWS or not rows:
        fields = np.frombuffer(bytearray(b"".join(_packed_rows(data, rows, blocks))), dtype=ARRAY_DTYPE)
    else:
        fields = _vector_rows(data, rows, blocks)
    return RecordBatch(fields, data)


def _packed_rows(data: bytes, rows: list, blocks: list) -> Iterator[bytes]:
    """Each (checked) record's ARRAY_DTYPE row, packed: the small batches' way."""
    pack = _ROW.pack
    for (offset, item, size, ft), (start, end) in zip(rows, blocks):
        body = offset + HEADER_SIZE
        if item == 1 or item == 101:
            pid, ppid, ctid, cpid, chars = _CREATE_FIELDS.unpack_from(data, body)
            yield pack(item, size, ft, offset, pid, 0, ppid, cpid, ctid, 0, 0, offset + _CMDLINE_OFFSET, chars,
                       start, end - start)
        elif item == 2:
            pid, code = _U32X2.unpack_from(data, body)
            yield pack(item, size, ft, offset, pid, 0, 0, 0, 0, code, 0, 0, 0, start, end - start)
        elif item == 3:
            tid, pid = _U32X2.unpack_from(data, body)
            yield pack(item, size, ft, offset, pid, tid, 0, 0, 0, 0, 0, 0, 0, start, end - start)
        elif item == 4:
            tid, pid, code = _U32X3.unpack_from(data, body)
            yield pack(item, size, ft, offset, pid, tid, 0, 0, 0, code, 0, 0, 0, start, end - start)
        elif item == 100:
            yield pack(item, size, ft, offset, 0, 0, 0, 0, 0, 0, _U32.unpack_from(data, body)[0], 0, 0, 0, 0)
        elif item == 5:
            yield pack(item, size, ft, offset, _U32.unpack_from(data, body)[0], 0, 0, 0, 0, 0, 0, 0, 0,
                       start, end - start)
        else:
            yield pack(item, size, ft, offset, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def _vector_rows(data: bytes, rows: list, blocks: list) -> np.ndarray:
    """The (checked) records' ARRAY_DTYPE rows, built column by column: the big batches' way."""
    n = len(rows)
    index = np.array(rows, dtype=RECORD_INDEX_DTYPE)
    out = np.empty(n, dtype=ARRAY_DTYPE)
    offsets = index["offset"]
    out["type"], out["size"], out["time"], out["offset"] = index["Type"], index["Size"], index["Time"], offsets
    raw = np.frombuffer(data, dtype=np.uint8)
    # The body's bytes of every record, as five ULONGs each; a record shorter than that (an exit) reads a few
    # bytes of the next one (or, at the end, the last byte again), which no column of its type takes.
    at = offsets[:, None] + _BODY_AT
    np.minimum(at, len(data) - 1, out=at)
    words = raw[at].view("<u4")
    kind = _KIND[index["Type"].view(np.uint16)]
    columns = np.take_along_axis(words, _WORD_AT[kind], axis=1) * _WORD_HAS[kind]
    for i, name in enumerate(_WORD_COLUMNS):
        out[name] = columns[:, i]
    creates = _HAS_COMMAND_LINE[kind]
    out["command_line_offset"] = np.where(creates, offsets + _CMDLINE_OFFSET, 0)
    out["command_line_chars"] = np.where(creates, words[:, 4] & 0xFFFF, 0)
    where = np.array(blocks, dtype=np.int64)
    out["block_offset"] = where[:, 0]
    out["block_size"] = where[:, 1] - where[:, 0]
    return out


def read_array(reader: Any, buffer: bytearray | memoryview | None = None) -> RecordBatch:
    """One ``reader.readinto(buffer)`` as columns (``parse_array``): the records waiting now (none when there
    are none). ``reader`` is any Reader (Monitor, service Connection, fleet reader, recording); ``buffer``
    (default: a new 64 KiB one) may be reused at once: the batch holds its own copy."""
    buf = bytearray(0x10000) if buffer is None else buffer
    return parse_array(memoryview(buf)[:reader.readinto(buf)])
