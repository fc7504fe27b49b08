"""The wire format: SysMon-compatible binary records (``SysMonPublic.h``, x64), their encoders and ``parse``.

Every record starts with a 16-byte ``ItemHeader`` whose ``Size`` is the whole record's length, so records of
different kinds follow each other in one buffer and a reader that does not know a type skips it by ``Size``.
The numpy dtypes below *are* the layout; the ``struct`` packers used on the hot path are derived from them.
"""

from __future__ import annotations

import enum
import shlex
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import ClassVar, Iterator, Sequence, Union

import numpy as np

from .clock import FILETIME_UNIX_EPOCH, filetime_from_unix_ns, filetime_now
from .errors import RecordFormatError

__all__ = [
    "ItemType", "HEADER_DTYPE", "PROCESS_EXIT_DTYPE", "PROCESS_CREATE_DTYPE", "THREAD_CREATE_DTYPE",
    "THREAD_EXIT_DTYPE", "IMAGE_LOAD_DTYPE", "RECORDS_LOST_DTYPE", "DTYPES", "HEADER_SIZE",
    "MAX_RECORD_SIZE", "MAX_COMMAND_LINE", "TRUNCATION_MARKER", "EXIT_CODE_UNKNOWN", "FILETIME_UNIX_EPOCH",
    "filetime_now", "filetime_from_unix_ns", "filetime_to_datetime", "datetime_to_filetime",
    "command_line_from_argv", "encode_process_create", "encode_process_exec", "encode_process_exit",
    "encode_thread_create", "encode_thread_exit", "encode_image_load", "encode_records_lost",
    "Event", "ProcessCreate", "ProcessExec", "ProcessExit", "ThreadCreate", "ThreadExit", "ImageLoad",
    "RecordsLost", "UnknownRecord", "parse", "parse_arrays", "record_headers",
]


class ItemType(enum.IntEnum):
    """The ``Type`` field of ``ItemHeader``: the book's six values, then etwmon's extensions from 100 up."""

    NONE = 0
    ProcessCreate = 1
    ProcessExit = 2
    ThreadCreate = 3
    ThreadExit = 4
    ImageLoad = 5
    RecordsLost = 100  # extension: how many records were lost just before this point
    ProcessExec = 101  # extension: a Linux exec, laid out like ProcessCreateInfo


# --- layouts (natural C alignment, as MSVC/gcc lay out SysMonPublic.h on x64) -------------------------------

_HEADER_FIELDS = [("Type", "<i2"), ("Size", "<u2"), ("Time", "<i8")]


def _struct(*fields: tuple) -> np.dtype:
    return np.dtype(_HEADER_FIELDS + list(fields), align=True)


HEADER_DTYPE = _struct()
PROCESS_EXIT_DTYPE = _struct(("ProcessId", "<u4"), ("ExitCode", "<u4"))
PROCESS_CREATE_DTYPE = _struct(
    ("ProcessId", "<u4"), ("ParentProcessId", "<u4"), ("CreatingThreadId", "<u4"),
    ("CreatingProcessId", "<u4"), ("CommandLineLength", "<u2"), ("CommandLine", "<u2", (1,)),
)
THREAD_CREATE_DTYPE = _struct(("ThreadId", "<u4"), ("ProcessId", "<u4"))
# ThreadExitInfo derives from ThreadCreateInfo: its ExitCode follows the 24-byte base (and pads to 32).
THREAD_EXIT_DTYPE = _struct(("ThreadId", "<u4"), ("ProcessId", "<u4"), ("ExitCode", "<u4"))
IMAGE_LOAD_DTYPE = _struct(
    ("ProcessId", "<u4"), ("ImageSize", "<u4"), ("LoadAddress", "<u8"), ("ImageFileName", "<u2", (301,)),
)
RECORDS_LOST_DTYPE = _struct(("Count", "<u4"))

DTYPES: dict[ItemType, np.dtype] = {
    ItemType.ProcessCreate: PROCESS_CREATE_DTYPE,
    ItemType.ProcessExit: PROCESS_EXIT_DTYPE,
    ItemType.ThreadCreate: THREAD_CREATE_DTYPE,
    ItemType.ThreadExit: THREAD_EXIT_DTYPE,
    ItemType.ImageLoad: IMAGE_LOAD_DTYPE,
    ItemType.RecordsLost: RECORDS_LOST_DTYPE,
    ItemType.ProcessExec: PROCESS_CREATE_DTYPE,
}

HEADER_SIZE = HEADER_DTYPE.itemsize  # 16
MAX_RECORD_SIZE = 0xFFFF  # Size is a USHORT
_CMDLINE_OFFSET = PROCESS_CREATE_DTYPE.fields["CommandLine"][1]  # 34
_IMAGE_NAME_CHARS = IMAGE_LOAD_DTYPE.fields["ImageFileName"][0].shape[0]  # 301, NUL included
# Longest command line (in UTF-16 code units) whose record still has Size <= 65535.
MAX_COMMAND_LINE = (MAX_RECORD_SIZE - PROCESS_CREATE_DTYPE.itemsize) // 2
#: Appended (inside the limit) to a command line that was cut to fit a record; never appears otherwise
#: unless the program's own arguments end with it.
TRUNCATION_MARKER = "\u2026[truncated]"
#: Exit code for sources that cannot know it (procfs). Real Linux exit codes are 0-255 and 128+signal.
EXIT_CODE_UNKNOWN = 0xFFFFFFFF


def _packer(dtype: np.dtype, upto: str | None = None) -> struct.Struct:
    """A little-endian ``struct`` packer laid out exactly like ``dtype`` (up to field ``upto``, exclusive)."""
    codes = {"<i2": "h", "<u2": "H", "<i8": "q", "<u4": "I", "<u8": "Q"}
    fmt, pos = "<", 0
    for name in dtype.names:
        sub, offset = dtype.fields[name][:2]
        if name == upto or sub.shape:
            break
        fmt += "x" * (offset - pos) + codes[sub.str]
        pos = offset + sub.itemsize
    end = dtype.fields[upto][1] if upto else dtype.itemsize
    return struct.Struct(fmt + "x" * (end - pos))


_HEADER = _packer(HEADER_DTYPE)
_PROCESS_EXIT = _packer(PROCESS_EXIT_DTYPE)
_PROCESS_CREATE_HEAD = _packer(PROCESS_CREATE_DTYPE, "CommandLine")  # the 34 bytes before the WCHARs
_THREAD_CREATE = _packer(THREAD_CREATE_DTYPE)
_THREAD_EXIT = _packer(THREAD_EXIT_DTYPE)
_IMAGE_LOAD_HEAD = _packer(IMAGE_LOAD_DTYPE, "ImageFileName")
_RECORDS_LOST = _packer(RECORDS_LOST_DTYPE)
# NUL after the command line plus the tail padding sizeof() already counts (40 - 34 = 6 bytes).
_CREATE_TAIL = b"\0" * (PROCESS_CREATE_DTYPE.itemsize - _CMDLINE_OFFSET)

# --- time ------------------------------------------------------------------------------------------------

# FILETIME_UNIX_EPOCH, filetime_now and filetime_from_unix_ns live in etwmon.clock (re-exported here: they
# are part of the wire format's vocabulary).
_FILETIME_ORIGIN = datetime(1601, 1, 1, tzinfo=timezone.utc)


def filetime_to_datetime(filetime: int) -> datetime:
    """FILETIME to an aware UTC datetime (microsecond precision: the last 100 ns digit is dropped)."""
    return _FILETIME_ORIGIN + timedelta(microseconds=filetime // 10)


def datetime_to_filetime(when: datetime) -> int:
    """An aware datetime to FILETIME."""
    delta = when - _FILETIME_ORIGIN
    return (delta.days * 86_400 + delta.seconds) * 10_000_000 + delta.microseconds * 10


# --- command lines ---------------------------------------------------------------------------------------


def command_line_from_argv(argv: Sequence[Union[bytes, str]]) -> str:
    """Join argv so that ``shlex.split`` gives it back. Bytes that are not UTF-8 survive as surrogate escapes
    (``os.fsdecode``); ``Event.argv`` turns them back into the original bytes."""
    return shlex.join(a if isinstance(a, str) else a.decode("utf-8", "surrogateescape") for a in argv)


def _utf16(text: str, limit: int) -> bytes:
    """UTF-16LE of ``text`` (lone surrogates kept, so non-UTF-8 bytes survive), cut to ``limit`` code units
    with TRUNCATION_MARKER at the end when it is longer."""
    data = text.encode("utf-16-le", "surrogatepass")
    if len(data) <= 2 * limit:
        return data
    keep = 2 * (limit - len(TRUNCATION_MARKER))
    if 0xD800 <= int.from_bytes(data[keep - 2:keep], "little") <= 0xDBFF:
        keep -= 2  # don't split a surrogate pair
    return data[:keep] + TRUNCATION_MARKER.encode("utf-16-le")


# --- encoders (the one place records are packed) -----------------------------------------------------------


def _encode_create(item: int, time: int, pid: int, parent_pid: int, creating_pid: int, creating_tid: int,
                   command_line: str) -> bytes:
    text = _utf16(command_line, MAX_COMMAND_LINE)
    size = PROCESS_CREATE_DTYPE.itemsize + len(text)
    return _PROCESS_CREATE_HEAD.pack(item, size, time, pid, parent_pid, creating_tid, creating_pid,
                                     len(text) // 2) + text + _CREATE_TAIL


def encode_process_create(time: int, pid: int, parent_pid: int, creating_pid: int, creating_tid: int,
                          command_line: str) -> bytes:
    """A ProcessCreateInfo record; Size = sizeof(ProcessCreateInfo) + command-line bytes, NUL-terminated."""
    return _encode_create(1, time, pid, parent_pid, creating_pid, creating_tid, command_line)


def encode_process_exec(time: int, pid: int, parent_pid: int, creating_pid: int, creating_tid: int,
                        command_line: str) -> bytes:
    """A ProcessExec record (extension 101): ProcessCreateInfo's layout for a Linux exec."""
    return _encode_create(101, time, pid, parent_pid, creating_pid, creating_tid, command_line)


def encode_process_exit(time: int, pid: int, exit_code: int) -> bytes:
    return _PROCESS_EXIT.pack(2, 24, time, pid, exit_code & 0xFFFFFFFF)


def encode_thread_create(time: int, tid: int, pid: int) -> bytes:
    return _THREAD_CREATE.pack(3, 24, time, tid, pid)


def encode_thread_exit(time: int, tid: int, pid: int, exit_code: int) -> bytes:
    return _THREAD_EXIT.pack(4, 32, time, tid, pid, exit_code & 0xFFFFFFFF)


def encode_image_load(time: int, pid: int, image_size: int, load_address: int, image_name: str) -> bytes:
    """An ImageLoadInfo record: the name is cut to 300 WCHARs (TRUNCATION_MARKER at the end) and NUL-padded."""
    name = _utf16(image_name, _IMAGE_NAME_CHARS - 1)
    return (_IMAGE_LOAD_HEAD.pack(5, IMAGE_LOAD_DTYPE.itemsize, time, pid, image_size, load_address) + name
            + b"\0" * (IMAGE_LOAD_DTYPE.itemsize - IMAGE_LOAD_DTYPE.fields["ImageFileName"][1] - len(name)))


def encode_records_lost(time: int, count: int) -> bytes:
    """A RecordsLost marker (extension 100): ``count`` records were lost just before this point."""
    if not 0 < count <= 0xFFFFFFFF:
        raise ValueError(f"RecordsLost count must be 1..4294967295, not {count}")
    return _RECORDS_LOST.pack(100, 24, time, count)


# --- events ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One parsed record. ``filetime`` is the raw Time field; ``time`` the same as an aware UTC datetime."""

    type: ClassVar[ItemType] = ItemType.NONE
    filetime: int

    @property
    def time(self) -> datetime:
        return filetime_to_datetime(self.filetime)

    def encode(self) -> bytes:  # pragma: no cover - every concrete event overrides it
        raise NotImplementedError


def _split_command_line(line: str) -> list[str]:
    if line.endswith(TRUNCATION_MARKER):
        line = line[: -len(TRUNCATION_MARKER)]
        # The cut may fall inside a quoted argument or right after an escaping backslash: close what it left open.
        for head in (line, line[:-1]):
            for closing in ("", "'", '"'):
                try:
                    return shlex.split(head + closing)
                except ValueError:
                    continue
    try:
        return shlex.split(line)
    except ValueError:
        return line.split()


@dataclass(frozen=True)
class ProcessCreate(Event):
    type: ClassVar[ItemType] = ItemType.ProcessCreate
    pid: int
    parent_pid: int
    creating_pid: int
    creating_tid: int
    command_line: str

    @property
    def argv(self) -> list[bytes]:
        """The command line split back into its arguments, as the bytes the program was given.

        POSIX quoting (``shlex``), as the Linux sources join argv; a Windows command line is one string the
        program parses itself, so read ``command_line`` there. A truncated command line gives the arguments
        that survived, the last one possibly cut short; text that is not valid shell quoting (a bare comm
        name with a stray quote) is split on whitespace rather than raising.
        """
        return [a.encode("utf-8", "surrogateescape") for a in _split_command_line(self.command_line)]

    @property
    def truncated(self) -> bool:
        """True when the command line was cut to fit the 64 KiB record."""
        return self.command_line.endswith(TRUNCATION_MARKER)

    def encode(self) -> bytes:
        return _encode_create(int(self.type), self.filetime, self.pid, self.parent_pid, self.creating_pid,
                              self.creating_tid, self.command_line)


@dataclass(frozen=True)
class ProcessExec(ProcessCreate):
    """A Linux exec: the same pid now runs a new program with a new command line."""

    type: ClassVar[ItemType] = ItemType.ProcessExec


@dataclass(frozen=True)
class ProcessExit(Event):
    type: ClassVar[ItemType] = ItemType.ProcessExit
    pid: int
    exit_code: int

    def encode(self) -> bytes:
        return encode_process_exit(self.filetime, self.pid, self.exit_code)


@dataclass(frozen=True)
class ThreadCreate(Event):
    type: ClassVar[ItemType] = ItemType.ThreadCreate
    tid: int
    pid: int

    def encode(self) -> bytes:
        return encode_thread_create(self.filetime, self.tid, self.pid)


@dataclass(frozen=True)
class ThreadExit(Event):
    type: ClassVar[ItemType] = ItemType.ThreadExit
    tid: int
    pid: int
    exit_code: int

    def encode(self) -> bytes:
        return encode_thread_exit(self.filetime, self.tid, self.pid, self.exit_code)


@dataclass(frozen=True)
class ImageLoad(Event):
    type: ClassVar[ItemType] = ItemType.ImageLoad
    pid: int
    image_size: int
    load_address: int
    image_name: str

    def encode(self) -> bytes:
        return encode_image_load(self.filetime, self.pid, self.image_size, self.load_address, self.image_name)


@dataclass(frozen=True)
class RecordsLost(Event):
    """``count`` records were lost (dropped by a full ring or missed by the source) just before this point."""

    type: ClassVar[ItemType] = ItemType.RecordsLost
    count: int

    def encode(self) -> bytes:
        return encode_records_lost(self.filetime, self.count)


@dataclass(frozen=True)
class UnknownRecord(Event):
    """A record of a type this version does not know; kept whole so nothing is hidden."""

    type: ClassVar[ItemType] = ItemType.NONE
    item_type: int
    data: bytes

    def encode(self) -> bytes:
        return self.data


# --- parsing ---------------------------------------------------------------------------------------------

_U32X2 = struct.Struct("<II")
_U32X3 = struct.Struct("<III")
_U32 = struct.Struct("<I")
_CREATE_FIELDS = struct.Struct("<IIIIH")
_IMAGE_FIELDS = struct.Struct("<IIQ")
_MIN_SIZE = {int(t): d.itemsize for t, d in DTYPES.items()}
_MIN_SIZE[int(ItemType.ProcessCreate)] = _MIN_SIZE[int(ItemType.ProcessExec)] = _CMDLINE_OFFSET + 2


def _as_bytes_view(buffer) -> memoryview:
    view = memoryview(buffer)
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


def _wstr(view: memoryview, start: int, chars: int) -> str:
    return bytes(view[start:start + 2 * chars]).decode("utf-16-le", "surrogatepass")


def _walk(view: memoryview) -> Iterator[tuple[int, int, int, int]]:
    """(offset, Type, Size, Time) of each record, checking every Size (and CommandLineLength) on the way."""
    end = len(view)
    offset = 0
    unpack_header = _HEADER.unpack_from
    while offset < end:
        if end - offset < HEADER_SIZE:
            raise RecordFormatError(f"truncated header: {end - offset} bytes left, a header needs 16", offset)
        item, size, ft = unpack_header(view, offset)
        if size < HEADER_SIZE:
            raise RecordFormatError(f"record Size {size} is smaller than the 16-byte header", offset)
        if offset + size > end:
            raise RecordFormatError(f"record Size {size} runs past the end of the buffer ({end} bytes)", offset)
        need = _MIN_SIZE.get(item, HEADER_SIZE)
        if size < need:
            raise RecordFormatError(f"record of type {item} has Size {size}, needs at least {need}", offset)
        if item == 1 or item == 101:  # ProcessCreate, ProcessExec (raw numbers: see parse)
            chars = view[offset + 32] | (view[offset + 33] << 8)
            if _CMDLINE_OFFSET + 2 * chars > size:
                raise RecordFormatError(f"CommandLineLength {chars} runs past the record's Size {size}", offset)
        yield offset, item, size, ft
        offset += size


def parse(buffer) -> Iterator[Event]:
    """Yield an Event for each record in ``buffer`` (bytes, bytearray, memoryview or a numpy array).

    Raises ``RecordFormatError`` naming the offset on a truncated record or a Size smaller than its type
    needs (never loops on Size 0); the records before it are delivered first. Types it does not know come out
    as ``UnknownRecord``.
    """
    view = _as_bytes_view(buffer)
    # The dispatch compares raw Type numbers (the ItemType values, fixed by the wire format), not ItemType
    # members: an int == int test is about six times cheaper than ``item == ItemType.ProcessExit`` (an
    # attribute lookup and IntEnum's __eq__; 0.12 vs 0.69 s per million three-way tests here), on every record.
    for offset, item, size, ft in _walk(view):
        body = offset + HEADER_SIZE
        if item == 2:
            yield ProcessExit(ft, *_U32X2.unpack_from(view, body))
        elif item == 1 or item == 101:
            pid, ppid, ctid, cpid, chars = _CREATE_FIELDS.unpack_from(view, body)
            text = _wstr(view, offset + _CMDLINE_OFFSET, chars)
            yield (ProcessCreate if item == 1 else ProcessExec)(ft, pid, ppid, cpid, ctid, text)
        elif item == 3:
            yield ThreadCreate(ft, *_U32X2.unpack_from(view, body))
        elif item == 4:
            yield ThreadExit(ft, *_U32X3.unpack_from(view, body))
        elif item == 100:
            yield RecordsLost(ft, _U32.unpack_from(view, body)[0])
        elif item == 5:
            pid, image_size, address = _IMAGE_FIELDS.unpack_from(view, body)
            name = _wstr(view, offset + IMAGE_LOAD_DTYPE.fields["ImageFileName"][1], _IMAGE_NAME_CHARS)
            yield ImageLoad(ft, pid, image_size, address, name.split("\0", 1)[0])
        else:
            yield UnknownRecord(ft, item, bytes(view[offset:offset + size]))


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
    lines are variable-length, use ``parse`` for those). Unknown types are left out.
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
