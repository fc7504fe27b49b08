"""The wire format: SysMon-compatible binary records (``SysMonPublic.h``, x64), their encoders and the extension
block. Reading them (the Event classes, ``parse``, ``parse_array``) is ``etwmon.events``, re-exported here.

Every record starts with a 16-byte ``ItemHeader`` whose ``Size`` is the whole record's length, so records of
different kinds follow each other in one buffer and a reader that does not know a type skips it by ``Size``.
The numpy dtypes below *are* the layout; the ``struct`` packers used on the hot path are derived from them.
"""

from __future__ import annotations

import enum
import shlex
import struct
import uuid
from datetime import datetime, timedelta, timezone
from typing import Sequence, Union

import numpy as np

from .clock import FILETIME_UNIX_EPOCH, filetime_from_unix_ns, filetime_now

__all__ = [
    "ItemType", "HEADER_DTYPE", "PROCESS_EXIT_DTYPE", "PROCESS_CREATE_DTYPE", "THREAD_CREATE_DTYPE",
    "THREAD_EXIT_DTYPE", "IMAGE_LOAD_DTYPE", "RECORDS_LOST_DTYPE", "DTYPES", "HEADER_SIZE",
    "MAX_RECORD_SIZE", "MAX_COMMAND_LINE", "TRUNCATION_MARKER", "EXIT_CODE_UNKNOWN", "FILETIME_UNIX_EPOCH",
    "filetime_now", "filetime_from_unix_ns", "filetime_to_datetime", "datetime_to_filetime",
    "command_line_from_argv", "encode_process_create", "encode_process_exec", "encode_process_exit",
    "encode_thread_create", "encode_thread_exit", "encode_image_load", "encode_records_lost",
    "Event", "ProcessCreate", "ProcessExec", "ProcessExit", "ThreadCreate", "ThreadExit", "ImageLoad",
    "RecordsLost", "UnknownRecord", "parse", "parse_arrays", "parse_array", "record_headers", "RecordBatch",
    "ARRAY_DTYPE", "RECORD_INDEX_DTYPE", "MAX_FILETIME", "read_array",
    "EventFlags", "ExeFlags", "Details", "ExtensionTag", "EXTENSION_VERSION", "EXTENSION_HEADER_SIZE", "with_details",
    "with_fields", "with_packed", "pack_field", "block_fields", "field_value", "TAG_ORDER",
    "guid_text", "guid_bytes",
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
    return _cut_utf16(text.encode("utf-16-le", "surrogatepass"), limit)


_MARKER_UTF16 = TRUNCATION_MARKER.encode("utf-16-le")


def _cut_utf16(data: bytes, limit: int) -> bytes:
    """UTF-16LE ``data`` cut to ``limit`` code units, TRUNCATION_MARKER at the end, when it is longer."""
    if len(data) <= 2 * limit:
        return data
    keep = 2 * (limit - len(TRUNCATION_MARKER))
    if keep > 0 and 0xD800 <= int.from_bytes(data[keep - 2:keep], "little") <= 0xDBFF:
        keep -= 2  # don't split a surrogate pair
    return data[:max(keep, 0)] + _MARKER_UTF16


# --- the extension block -----------------------------------------------------------------------------------
#
# Appended to a record after what the book's layout puts there (after the NUL-terminated command line and the
# tail padding of ProcessCreateInfo, i.e. at sizeof(ProcessCreateInfo) + 2 * CommandLineLength; at 24 in
# ProcessExit/ThreadCreate, at 32 in ThreadExit). Size covers it, so the book's client, which walks by Size
# and reads only the fixed fields, never sees it, and one event stays one record.
#
#   ExtensionHeader: USHORT Version (1), USHORT Length (the whole block, header included), ULONG Flags
#   then fields until Length: USHORT Tag, USHORT Length (bytes of the value), the value (no padding)
#
# A field that is absent is unknown. Text is UTF-16LE without a NUL, GUIDs are the 16 bytes of a Windows GUID
# (Data1..3 little-endian), integers little-endian. Readers skip tags they do not know (newer writers may add
# some); a block whose Version is not 1 is skipped whole.


class EventFlags(enum.IntFlag):
    """Quality flags of one event (``Event.flags``): what a reader should know before trusting its details."""

    #: A text field (the command line or a detail) was cut to fit the 64 KiB record; it ends with TRUNCATION_MARKER.
    TRUNCATED = 0x1
    #: The details were read from /proc after the event, not taken from the kernel at the event: the process
    #: may have changed in between (another exec, chdir, setuid), or a detail may be missing because it exited.
    PROCFS = 0x2
    #: The parent is not in the process table (it exited before we knew it, or it was evicted): parent fields
    #: are unknown and parent_process_guid may be too.
    UNKNOWN_PARENT = 0x4
    #: The process was running before the monitor started: its details come from the start-up snapshot.
    SEEDED = 0x8
    #: Hashes were asked for but not ready when the record was written (the file is being hashed off the
    #: source's thread; later records of the same file carry them).
    HASH_PENDING = 0x10
    #: Hashes were asked for but the file that ran could not be hashed (gone, a memory file, changed since,
    #: not readable): see docs/identity.md.
    NO_HASH = 0x20


class ExtensionTag(enum.IntEnum):
    """The Tag of each field of the extension block, and the Event attribute it fills."""

    ProcessGuid = 1  # 16 bytes
    ParentProcessGuid = 2  # 16 bytes
    Image = 3  # text: the executable's full path
    CurrentDirectory = 4  # text
    Uid = 5  # ULONG: the effective user id on Linux
    User = 6  # text: the user name (Linux, when it resolves), the account or SID (Windows)
    ParentImage = 7  # text
    ParentCommandLine = 8  # text
    ParentUser = 9  # text
    Tty = 10  # text, e.g. "pts/3"
    Session = 11  # ULONG: the session id (Linux: the session leader's pid; Windows: the session number)
    Cgroup = 12  # text: the cgroup v2 path
    ContainerId = 13  # text: the container id the cgroup path names
    StartTime = 14  # LONGLONG FILETIME: when the process started
    Lifetime = 15  # ULONGLONG microseconds from start to exit (ProcessExit)
    RuleName = 16  # text: the name of the rule that matched the event (Sysmon's RuleName)
    ExeDevice = 17  # ULONG: the device of the record's file, as stat's st_dev gives it (Linux): the executable's,
    #                 an ImageLoad's loaded file's
    ExeInode = 18  # ULONGLONG: its inode number (with ExeDevice: which file ran / was loaded, whatever its path says)
    ExeFlags = 19  # ULONG: ExeFlags bits (memfd, deleted, setuid, setgid)
    MountNamespace = 20  # ULONG: inode number of the process's mount namespace (/proc/<pid>/ns/mnt)
    PidNamespace = 21  # ULONG: inode number of its pid namespace (/proc/<pid>/ns/pid)
    NamespacePid = 22  # ULONG: its process id as its own pid namespace numbers it
    CgroupId = 23  # ULONGLONG: its cgroup v2 id (the inode number of its directory under the cgroup2 mount)
    Hashes = 24  # text: the executable's hashes in Sysmon's form, "MD5=<HEX>,SHA256=<HEX>" (etwmon.hashes)
    ImageLoaded = 25  # text: the loaded image's whole path (ImageLoad), when ImageFileName (300 characters) cut it


class ExeFlags(enum.IntFlag):
    """What the executable file of a process is (the ExeFlags field, ``ProcessCreate.exe_flags``)."""

    #: An anonymous memory file (memfd_create): the program has no path on any disk.
    MEMFD = 0x1
    #: The file had no name left in any directory when the event happened (deleted after it was started).
    DELETED = 0x2
    #: The file's set-user-ID bit.
    SETUID = 0x4
    #: The file's set-group-ID bit (with group execute).
    SETGID = 0x8


EXTENSION_VERSION = 1
EXTENSION_HEADER_SIZE = 8
_EXT_HEADER = struct.Struct("<HHI")
_TIME_PIDS = struct.Struct("<qIIII")  # Time, ProcessId, ParentProcessId, CreatingThreadId, CreatingProcessId
_BASE_SIZE = {2: PROCESS_EXIT_DTYPE.itemsize, 3: THREAD_CREATE_DTYPE.itemsize, 4: THREAD_EXIT_DTYPE.itemsize,
              5: IMAGE_LOAD_DTYPE.itemsize}
_TLV = struct.Struct("<HH")
_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
# Tag -> (Event attribute, kind). Kinds: guid, text, u32, i64, u64, us (microseconds as a timedelta).
_TAG_FIELDS: dict[int, tuple[str, str]] = {
    1: ("process_guid", "guid"), 2: ("parent_process_guid", "guid"), 3: ("image", "text"),
    4: ("current_directory", "text"), 5: ("uid", "u32"), 6: ("user", "text"), 7: ("parent_image", "text"),
    8: ("parent_command_line", "text"), 9: ("parent_user", "text"), 10: ("tty", "text"), 11: ("session", "u32"),
    12: ("cgroup", "text"), 13: ("container_id", "text"), 14: ("start_filetime", "i64"), 15: ("lifetime", "us"),
    16: ("rule_name", "text"), 17: ("exe_device", "u32"), 18: ("exe_inode", "u64"), 19: ("exe_flags", "u32"),
    20: ("mnt_ns", "u32"), 21: ("pid_ns", "u32"), 22: ("ns_pid", "u32"), 23: ("cgroup_id", "u64"),
    24: ("hashes", "text"), 25: ("image_name", "text"),
}
# The order a block is written in: fixed-size fields, then text, the long parent command line last, so that
# when a record has little room left it is the least important text that is cut.
TAG_ORDER = _TAG_ORDER = (1, 2, 5, 11, 14, 15, 17, 18, 19, 20, 21, 22, 23, 16, 25, 3, 4, 6, 10, 12, 13, 24, 7, 9, 8)
_TEXT_TAGS = frozenset(t for t, (_, kind) in _TAG_FIELDS.items() if kind == "text")
#: Bytes of extension text a record keeps room for by cutting its command line (when both do not fit).
_TEXT_RESERVE = 8192


def guid_text(data: bytes) -> str:
    """16 GUID bytes as Sysmon writes a ProcessGuid: ``{xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx}``."""
    return "{" + str(uuid.UUID(bytes_le=bytes(data))) + "}"


def guid_bytes(text: str) -> bytes:
    """The 16 bytes of a GUID written as ``guid_text`` does (braces optional)."""
    return uuid.UUID(text.strip("{}")).bytes_le


def _value_bytes(kind: str, value) -> bytes:
    if kind == "text":
        return value.encode("utf-16-le", "surrogatepass")
    if kind == "guid":
        return guid_bytes(value) if isinstance(value, str) else bytes(value)
    if kind == "u32":
        return _U32.pack(value & 0xFFFFFFFF)
    if kind == "i64":
        return _I64.pack(value)
    if kind == "u64":
        return _U64.pack(value & 0xFFFFFFFFFFFFFFFF)
    return _U64.pack(value // timedelta(microseconds=1))  # "us": a timedelta


def _field_value(kind: str, data: bytes):
    """A field's value bytes as the Event attribute (None if it is malformed)."""
    if kind == "text":
        return data.decode("utf-16-le", "surrogatepass")
    if kind == "guid":
        return guid_text(data) if len(data) == 16 else None
    if kind == "u32":
        return _U32.unpack(data)[0] if len(data) == 4 else None
    if kind == "i64":
        return _I64.unpack(data)[0] if len(data) == 8 else None
    if kind == "u64":
        return _U64.unpack(data)[0] if len(data) == 8 else None
    return timedelta(microseconds=_U64.unpack(data)[0]) if len(data) == 8 else None


# ``Details`` (what a block says: a frozen dataclass of every attribute a block can carry, and ``flags``) is
# made in etwmon.events from the Event classes' declarations of those attributes, so they are declared once;
# re-exported at the end of this module. Its docstring and its ``fields`` method are these:
_DETAILS_DOC = """What the extension block of one record says; None = unknown (the field is left out of the block).

    Sources that know details exactly at the event, and the identity stage, hand one of these to the encoders
    (or to ``with_details``). Text is as in the Event attributes; ``process_guid`` in ``guid_text`` form.
    """


def _details_fields(self, allowed: frozenset[str] | None = None) -> list[tuple[int, bytes]]:
    """(tag, value bytes) of every known field, in block order (``allowed``: only these attributes). The
    loaded image's whole path (ImageLoaded) is the ImageLoad record's own: its encoder adds it."""
    out = []
    for tag in _TAG_ORDER:
        name, kind = _TAG_FIELDS[tag]
        value = getattr(self, name, None)
        if value is not None and (allowed is None or name in allowed):
            out.append((tag, _value_bytes(kind, value)))
    return out


def _block(flags: int, fields: Sequence[tuple[int, bytes]], room: int) -> bytes:
    """An extension block of at most ``room`` bytes: fields in the order given, text that does not fit cut
    (TRUNCATION_MARKER, EventFlags.TRUNCATED) or, with no room even for the marker, left out (unknown)."""
    parts = []
    used = EXTENSION_HEADER_SIZE
    pack = _TLV.pack
    for tag, value in fields:
        need = 4 + len(value)
        if used + need > room:
            flags |= EventFlags.TRUNCATED
            units = (room - used - 4) // 2
            if tag not in _TEXT_TAGS or units <= len(TRUNCATION_MARKER):
                continue
            value = _cut_utf16(value, units)
            need = 4 + len(value)
        parts.append(pack(tag, len(value)))
        parts.append(value)
        used += need
    if used > room:
        return b""
    return _EXT_HEADER.pack(EXTENSION_VERSION, used, int(flags)) + b"".join(parts)


def _fields_size(fields: Sequence[tuple[int, bytes]]) -> tuple[int, int]:
    """(bytes of the fixed-size fields, bytes of the text fields) of a block's fields, TLV headers included."""
    fixed = text = 0
    for tag, value in fields:
        if tag in _TEXT_TAGS:
            text += 4 + len(value)
        else:
            fixed += 4 + len(value)
    return fixed, text


def _create_with_block(item: int, time: int, pid: int, parent_pid: int, creating_pid: int, creating_tid: int,
                       text: bytes, flags: int, fields: Sequence[tuple[int, bytes]]) -> bytes:
    """A ProcessCreate/ProcessExec record with an extension block; ``text`` is the command line's UTF-16LE.
    When both do not fit in 64 KiB the command line is cut first to leave room for the fixed fields and up
    to _TEXT_RESERVE bytes of detail text, then the details' text is cut."""
    fixed, strings = _fields_size(fields)
    room_for_text = MAX_RECORD_SIZE - PROCESS_CREATE_DTYPE.itemsize - EXTENSION_HEADER_SIZE - fixed \
        - min(strings, _TEXT_RESERVE)
    if len(text) > room_for_text:
        text = _cut_utf16(text, room_for_text // 2)
        flags |= EventFlags.TRUNCATED
    base = PROCESS_CREATE_DTYPE.itemsize + len(text)
    block = _block(flags, fields, MAX_RECORD_SIZE - base)
    return (_PROCESS_CREATE_HEAD.pack(item, base + len(block), time, pid, parent_pid, creating_tid, creating_pid,
                                      len(text) // 2) + text + _CREATE_TAIL + block)


def _base_size(record) -> int:
    """Where a record's extension block starts (its Size when it has none)."""
    item = record[0] | (record[1] << 8)
    if item == 1 or item == 101:
        return PROCESS_CREATE_DTYPE.itemsize + 2 * (record[32] | (record[33] << 8))
    return _BASE_SIZE.get(item, len(record))


def with_fields(record: bytes, flags: int, fields: Sequence[tuple[int, bytes]]) -> bytes:
    """``record`` with its extension block replaced by one of ``flags`` and ``fields`` ((tag, value bytes) in
    block order, e.g. from ``Details.fields()``): the identity stage's fast path. A ProcessCreate/ProcessExec
    whose command line leaves too little room has the command line cut (see ``with_details``)."""
    item = record[0] | (record[1] << 8)
    base = _base_size(record)
    length = EXTENSION_HEADER_SIZE
    for _, value in fields:
        length += 4 + len(value)
    if base + length <= MAX_RECORD_SIZE and (item in _BASE_SIZE or item == 1 or item == 101):
        pack = _TLV.pack
        parts = [_HEADER.pack(item, base + length, _I64.unpack_from(record, 8)[0]), record[HEADER_SIZE:base],
                 _EXT_HEADER.pack(EXTENSION_VERSION, length, int(flags))]
        for tag, value in fields:
            parts.append(pack(tag, len(value)))
            parts.append(value)
        return b"".join(parts)
    if item == 1 or item == 101:
        time, pid, parent_pid, creating_tid, creating_pid = _TIME_PIDS.unpack_from(record, 8)
        return _create_with_block(item, time, pid, parent_pid, creating_pid, creating_tid,
                                  bytes(record[_CMDLINE_OFFSET:base - len(_CREATE_TAIL)]), flags, fields)
    if item not in _BASE_SIZE:
        raise ValueError(f"records of type {item} carry no extension block")
    block = _block(flags, fields, MAX_RECORD_SIZE - base)
    return _HEADER.pack(item, base + len(block), _I64.unpack_from(record, 8)[0]) + bytes(record[HEADER_SIZE:base]) \
        + block


def pack_field(tag: int, value: bytes) -> bytes:
    """One field of an extension block, Tag and Length included (what ``with_packed`` takes)."""
    return _TLV.pack(tag, len(value)) + value


def with_packed(record: bytes, flags: int, packed: Sequence[bytes]) -> bytes:
    """``with_fields`` for fields already packed with ``pack_field`` (in block order): the identity stage keeps
    them packed, so a record costs one join. Falls back to ``with_fields`` (which cuts) when they do not fit."""
    item = record[0] | (record[1] << 8)
    if item == 1 or item == 101:
        base = PROCESS_CREATE_DTYPE.itemsize + 2 * (record[32] | (record[33] << 8))
    else:
        base = _BASE_SIZE.get(item, 0)
        if not base:
            raise ValueError(f"records of type {item} carry no extension block")
    length = EXTENSION_HEADER_SIZE
    for field_ in packed:
        length += len(field_)
    if base + length > MAX_RECORD_SIZE:
        return with_fields(record, flags, [(_TLV.unpack_from(f)[0], f[4:]) for f in packed])
    return b"".join((_HEADER.pack(item, base + length, _I64.unpack_from(record, 8)[0]), record[HEADER_SIZE:base],
                     _EXT_HEADER.pack(EXTENSION_VERSION, length, flags), *packed))


def block_fields(record, packed: bool = False) -> tuple[int, list[tuple[int, bytes]]]:
    """(flags, [(tag, value bytes), ...]) of a record's extension block as written; (0, []) when it has none
    (or one of a version this reader does not know). ``packed``: each field whole, Tag and Length included."""
    base = _base_size(record)
    size = record[2] | (record[3] << 8)
    if size - base < EXTENSION_HEADER_SIZE:
        return 0, []
    version, length, flags = _EXT_HEADER.unpack_from(record, base)
    if version != EXTENSION_VERSION or base + length > size:
        return 0, []
    out = []
    pos, stop = base + EXTENSION_HEADER_SIZE, base + length
    unpack = _TLV.unpack_from
    while pos + 4 <= stop:
        tag, n = unpack(record, pos)
        pos += 4
        if pos + n > stop:
            break
        out.append((tag, bytes(record[pos - 4 if packed else pos:pos + n])))
        pos += n
    return flags, out


def with_details(record: bytes, details: Details) -> bytes:
    """``record`` (one encoded ProcessCreate, ProcessExec, ProcessExit, ThreadCreate or ThreadExit) with its
    extension block replaced by ``details``; fields the record type does not carry are left out. Where the
    command line and the details do not both fit in 64 KiB, the command line is cut to leave room for the fixed
    fields and 8 KiB of detail text, then detail text is cut; both visibly (TRUNCATION_MARKER, TRUNCATED)."""
    item = record[0] | (record[1] << 8)
    allowed = _EXTENSION_ATTRS.get(item)
    if allowed is None:
        raise ValueError(f"records of type {item} carry no extension block")
    return with_fields(record, details.flags, details.fields(allowed))


# --- encoders (the one place records are packed) -----------------------------------------------------------


def _encode_create(item: int, time: int, pid: int, parent_pid: int, creating_pid: int, creating_tid: int,
                   command_line: str, details: Details | None = None) -> bytes:
    if details is not None:
        return _create_with_block(item, time, pid, parent_pid, creating_pid, creating_tid,
                                  command_line.encode("utf-16-le", "surrogatepass"), details.flags,
                                  details.fields(_CREATE_ATTRS))
    text = _utf16(command_line, MAX_COMMAND_LINE)
    size = PROCESS_CREATE_DTYPE.itemsize + len(text)
    return _PROCESS_CREATE_HEAD.pack(item, size, time, pid, parent_pid, creating_tid, creating_pid,
                                     len(text) // 2) + text + _CREATE_TAIL


def encode_process_create(time: int, pid: int, parent_pid: int, creating_pid: int, creating_tid: int,
                          command_line: str, details: Details | None = None) -> bytes:
    """A ProcessCreateInfo record; Size = sizeof(ProcessCreateInfo) + command-line bytes, NUL-terminated,
    plus the extension block when ``details`` are given."""
    return _encode_create(1, time, pid, parent_pid, creating_pid, creating_tid, command_line, details)


def encode_process_exec(time: int, pid: int, parent_pid: int, creating_pid: int, creating_tid: int,
                        command_line: str, details: Details | None = None) -> bytes:
    """A ProcessExec record (extension 101): ProcessCreateInfo's layout for a Linux exec."""
    return _encode_create(101, time, pid, parent_pid, creating_pid, creating_tid, command_line, details)


def _with(record: bytes, details: Details | None) -> bytes:
    return record if details is None else with_details(record, details)


def encode_process_exit(time: int, pid: int, exit_code: int, details: Details | None = None) -> bytes:
    """A ProcessExitInfo record (+ the extension block: process_guid, image, start_filetime, lifetime,
    rule_name)."""
    return _with(_PROCESS_EXIT.pack(2, 24, time, pid, exit_code & 0xFFFFFFFF), details)


def encode_thread_create(time: int, tid: int, pid: int, details: Details | None = None) -> bytes:
    """A ThreadCreateInfo record (+ the extension block: the process's process_guid)."""
    return _with(_THREAD_CREATE.pack(3, 24, time, tid, pid), details)


def encode_thread_exit(time: int, tid: int, pid: int, exit_code: int, details: Details | None = None) -> bytes:
    """A ThreadExitInfo record (+ the extension block: the process's process_guid)."""
    return _with(_THREAD_EXIT.pack(4, 32, time, tid, pid, exit_code & 0xFFFFFFFF), details)


def encode_image_load(time: int, pid: int, image_size: int, load_address: int, image_name: str,
                      details: Details | None = None) -> bytes:
    """An ImageLoadInfo record: the name is cut to 300 WCHARs (TRUNCATION_MARKER at the end) and NUL-padded.
    With ``details`` (process_guid, image; exe_device and exe_inode: the loaded file's) an extension block
    follows, and a name that had to be cut is there whole (ImageLoaded, tag 25), the record flagged TRUNCATED."""
    whole = image_name.encode("utf-16-le", "surrogatepass")
    name = _cut_utf16(whole, _IMAGE_NAME_CHARS - 1)
    record = (_IMAGE_LOAD_HEAD.pack(5, IMAGE_LOAD_DTYPE.itemsize, time, pid, image_size, load_address) + name
              + b"\0" * (IMAGE_LOAD_DTYPE.itemsize - IMAGE_LOAD_DTYPE.fields["ImageFileName"][1] - len(name)))
    if details is None:
        return record
    fields = details.fields(_EXTENSION_ATTRS[5])
    flags = details.flags
    if len(name) != len(whole):
        flags |= EventFlags.TRUNCATED
        at = next((i for i, (tag, _) in enumerate(fields) if tag == 3), len(fields))  # block order: before Image
        fields.insert(at, (int(ExtensionTag.ImageLoaded), whole))
    return with_fields(record, flags, fields)


def encode_records_lost(time: int, count: int) -> bytes:
    """A RecordsLost marker (extension 100): ``count`` records were lost just before this point."""
    if not 0 < count <= 0xFFFFFFFF:
        raise ValueError(f"RecordsLost count must be 1..4294967295, not {count}")
    return _RECORDS_LOST.pack(100, 24, time, count)


# --- reading an extension field ---------------------------------------------------------------------


def field_value(tag: int, data: bytes):
    """The Event attribute value of one field of an extension block (its tag and value bytes)."""
    known = _TAG_FIELDS.get(tag)
    return None if known is None else _field_value(known[1], data)



# The Event classes and parse live in etwmon.events (which imports the layouts above); re-exported here so
# ``from etwmon.records import parse`` keeps working (and Details, made there). Imported last: events needs
# everything above.
from .events import (  # noqa: E402
    _CREATE_ATTRS, _EXTENSION_ATTRS, ARRAY_DTYPE, MAX_FILETIME, RECORD_INDEX_DTYPE, Details, Event, ImageLoad,
    ProcessCreate, ProcessExec, ProcessExit, RecordBatch, RecordsLost, ThreadCreate, ThreadExit, UnknownRecord, parse,
    parse_array, parse_arrays, read_array, record_headers,
)
