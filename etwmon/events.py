"""Reading records: the Event classes, ``parse`` (lazy Event objects over a batch), and the checks every reader
shares (``parse_array``, the batch as numpy columns with no object per record, is ``etwmon.columns``,
re-exported here).

The wire format itself — layouts, encoders, the extension block's tags — is ``etwmon.records``, which
re-exports everything here, so ``from etwmon.records import parse`` keeps working. Every reader of untrusted
bytes (a fleet message, a client socket, a recording) relies on one promise: ``parse``, ``parse_array`` and
``record_headers`` raise nothing but ``RecordFormatError``, whatever the bytes, and an Event they deliver can
be formatted (its time and every detail are in range).
"""

from __future__ import annotations

import functools
import struct
from _codecs import utf_16_le_decode as _utf_16_le_decode
from dataclasses import dataclass, field, fields as _dc_fields, make_dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, ClassVar, Iterator

import numpy as np

from ._native import fields as _c_fields  # the extension-field walk in C, or None (etwmon/_speedups.c)
from ._native import scan as _c_scan  # parse's checks in C, or None
from .errors import RecordFormatError
from .users import user_name
from .records import (  # the wire's small structs too (_EXT_HEADER, _TLV, _I64, _U32)
    _CMDLINE_OFFSET, _EXT_HEADER, _HEADER, _I64, _IMAGE_NAME_CHARS, _TAG_FIELDS, _TLV, _U32, DTYPES,
    EXTENSION_HEADER_SIZE, EXTENSION_VERSION, HEADER_SIZE, IMAGE_LOAD_DTYPE, PROCESS_CREATE_DTYPE,
    TRUNCATION_MARKER, _DETAILS_DOC, EventFlags, ItemType, _details_fields, _encode_create, _field_value,
    datetime_to_filetime, encode_image_load, encode_process_exit, encode_records_lost, encode_thread_create,
    encode_thread_exit, filetime_to_datetime,
)

__all__ = [
    "Event", "ProcessCreate", "ProcessExec", "ProcessExit", "ThreadCreate", "ThreadExit", "ImageLoad",
    "RecordsLost", "UnknownRecord", "parse", "parse_arrays", "parse_array", "record_headers", "RecordBatch",
    "ARRAY_DTYPE", "RECORD_INDEX_DTYPE", "MAX_FILETIME", "read_array",
]

#: The last FILETIME a datetime can hold (9999-12-31 23:59:59.999999 UTC): a Time past it, or a negative one,
#: is malformed (no clock writes it, and no formatter could show it).
MAX_FILETIME = datetime_to_filetime(datetime.max.replace(tzinfo=timezone.utc)) + 9


# --- events ----------------------------------------------------------------------------------------------
#
# Slotted frozen dataclasses. ``parse`` builds them without running __init__: it sets the fixed fields (one
# struct unpack) and leaves the rest (command line, extension block) in ``_lazy`` — the batch's bytes and
# where the record is — decoded on first access of any of them (``__getattr__`` only runs for a slot not yet
# set). ``parse`` has already checked those bytes, so decoding cannot fail later.


@dataclass(frozen=True, slots=True)
class Event:
    """One parsed record. ``filetime`` is the raw Time field; ``time`` the same as an aware UTC datetime."""

    type: ClassVar[ItemType] = ItemType.NONE
    _LAZY: ClassVar[frozenset[str]] = frozenset()
    filetime: int
    _lazy: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def time(self) -> datetime:
        return filetime_to_datetime(self.filetime)

    def details(self) -> Details | None:
        """The extension block's content (process, exit and thread records), or None when the record has none."""
        return _details_of(self) if int(self.type) in _DETAIL_NAMES else None

    def encode(self) -> bytes:
        """The record of this event, as the encoders write it (``parse`` gives the event back)."""
        return _ENCODERS[int(self.type)](self)

    def __getattr__(self, name: str) -> Any:
        # Only reached for a slot not set yet: the lazily decoded attributes of a parsed record. (A subclass
        # that is not slotted never sets _lazy: it was built whole.)
        if name == "_lazy":
            return None
        if name not in type(self)._LAZY:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        _decode(self)
        return object.__getattribute__(self, name)


def _split_command_line(line: str) -> list[str]:
    import shlex

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


@dataclass(frozen=True, slots=True)
class ProcessCreate(Event):
    """A process was created (or, as ProcessExec, exec'd). The attributes after ``command_line`` come from the
    record's extension block; None means unknown (see ``flags`` for how far to trust what is known)."""

    type: ClassVar[ItemType] = ItemType.ProcessCreate
    pid: int
    parent_pid: int
    creating_pid: int
    creating_tid: int
    command_line: str
    process_guid: str | None = None
    parent_process_guid: str | None = None
    image: str | None = None
    current_directory: str | None = None
    uid: int | None = None
    user: str | None = None
    parent_image: str | None = None
    parent_command_line: str | None = None
    parent_user: str | None = None
    tty: str | None = None
    session: int | None = None
    cgroup: str | None = None
    container_id: str | None = None
    start_filetime: int | None = None
    rule_name: str | None = None
    #: Which file ran (Linux, bpf): its device (st_dev) and inode, ExeFlags bits; then the namespaces and
    #: cgroup it ran in. What tells a bind mount over a path, or a program in another mount namespace, apart.
    exe_device: int | None = None
    exe_inode: int | None = None
    exe_flags: int | None = None
    mnt_ns: int | None = None
    pid_ns: int | None = None
    ns_pid: int | None = None
    cgroup_id: int | None = None
    #: The executable's hashes in Sysmon's form (``MD5=<HEX>,SHA256=<HEX>``), when asked for (etwmon.hashes).
    hashes: str | None = None
    flags: EventFlags = EventFlags(0)

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
        """True when the command line (or a detail) was cut to fit the 64 KiB record."""
        return self.command_line.endswith(TRUNCATION_MARKER) or bool(self.flags & EventFlags.TRUNCATED)

    @property
    def start_time(self) -> datetime | None:
        """When the process started (aware UTC), if the source knows."""
        return None if self.start_filetime is None else filetime_to_datetime(self.start_filetime)


@dataclass(frozen=True, slots=True)
class ProcessExec(ProcessCreate):
    """A Linux exec: the same pid now runs a new program with a new command line."""

    type: ClassVar[ItemType] = ItemType.ProcessExec


@dataclass(frozen=True, slots=True)
class ProcessExit(Event):
    """A process ended; ``exit_code`` as a shell reports it (EXIT_CODE_UNKNOWN where the source cannot know).
    ``uid``/``user`` are the process's, when the writer of the record put them in its block."""

    type: ClassVar[ItemType] = ItemType.ProcessExit
    pid: int
    exit_code: int
    process_guid: str | None = None
    image: str | None = None
    uid: int | None = None
    user: str | None = None
    start_filetime: int | None = None
    lifetime: timedelta | None = None
    rule_name: str | None = None
    flags: EventFlags = EventFlags(0)


@dataclass(frozen=True, slots=True)
class ThreadCreate(Event):
    """A thread ``tid`` started in process ``pid`` (``process_guid``: the process's, when known)."""

    type: ClassVar[ItemType] = ItemType.ThreadCreate
    tid: int
    pid: int
    process_guid: str | None = None
    flags: EventFlags = EventFlags(0)


@dataclass(frozen=True, slots=True)
class ThreadExit(Event):
    """Thread ``tid`` of process ``pid`` ended with ``exit_code`` (the process lives on unless it was the last)."""

    type: ClassVar[ItemType] = ItemType.ThreadExit
    tid: int
    pid: int
    exit_code: int
    process_guid: str | None = None
    flags: EventFlags = EventFlags(0)


@dataclass(frozen=True, slots=True)
class ImageLoad(Event):
    """An image (executable or shared library / DLL) ``image_name`` was mapped into process ``pid`` at
    ``load_address`` (Windows: ETW's image events; Linux: the bpf source with ``image_loads=True``). The
    attributes after ``image_name`` come from the extension block (None: unknown)."""

    type: ClassVar[ItemType] = ItemType.ImageLoad
    pid: int
    image_size: int
    load_address: int
    #: The loaded file's whole path (from the extension block's ImageLoaded when ImageFileName had to cut it).
    image_name: str
    process_guid: str | None = None
    #: The process's executable (Sysmon's Image); image_name is the loaded file (Sysmon's ImageLoaded).
    image: str | None = None
    #: The loaded file's device (st_dev) and inode: the extension block's "the record's file" fields.
    exe_device: int | None = None
    exe_inode: int | None = None
    #: The loaded file's hashes in Sysmon's form (``SHA256=<HEX>``), when asked for (etwmon.hashes).
    hashes: str | None = None
    flags: EventFlags = EventFlags(0)

    @property
    def image_device(self) -> int | None:
        """The loaded file's device as stat(2) gives st_dev (``exe_device``; JSON names it image_device)."""
        return self.exe_device

    @property
    def image_inode(self) -> int | None:
        """The loaded file's inode number (``exe_inode``; JSON names it image_inode)."""
        return self.exe_inode


@dataclass(frozen=True, slots=True)
class RecordsLost(Event):
    """``count`` records were lost (dropped by a full ring or missed by the source) just before this point."""

    type: ClassVar[ItemType] = ItemType.RecordsLost
    count: int


@dataclass(frozen=True, slots=True)
class UnknownRecord(Event):
    """A record of a type this version does not know; kept whole so nothing is hidden."""

    type: ClassVar[ItemType] = ItemType.NONE
    item_type: int
    data: bytes


#: Per record type, how an event of it is encoded.
_ENCODERS: dict[int, Any] = {
    1: lambda e: _encode_create(1, e.filetime, e.pid, e.parent_pid, e.creating_pid, e.creating_tid, e.command_line,
                                _details_of(e)),
    101: lambda e: _encode_create(101, e.filetime, e.pid, e.parent_pid, e.creating_pid, e.creating_tid,
                                  e.command_line, _details_of(e)),
    2: lambda e: encode_process_exit(e.filetime, e.pid, e.exit_code, _details_of(e)),
    3: lambda e: encode_thread_create(e.filetime, e.tid, e.pid, _details_of(e)),
    4: lambda e: encode_thread_exit(e.filetime, e.tid, e.pid, e.exit_code, _details_of(e)),
    5: lambda e: encode_image_load(e.filetime, e.pid, e.image_size, e.load_address, e.image_name, _details_of(e)),
    100: lambda e: encode_records_lost(e.filetime, e.count),
    0: lambda e: e.data,  # UnknownRecord: kept whole
}

_TAG_NAMES = frozenset(name for name, _ in _TAG_FIELDS.values())


def _details_class() -> type:
    """``records.Details``, made from the Event classes' declarations of the attributes a block carries:
    ProcessCreate's, with ProcessExit's ``lifetime`` after ``start_filetime``; then ``flags`` as an int."""
    create = [f for f in _dc_fields(ProcessCreate) if f.name in _TAG_NAMES]
    at = [f.name for f in create].index("start_filetime") + 1
    block = create[:at] + [f for f in _dc_fields(ProcessExit) if f.name == "lifetime"] + create[at:]
    spec = [(f.name, f.type, field(default=None)) for f in block] + [("flags", "int", field(default=0))]
    namespace = {"__doc__": _DETAILS_DOC, "__module__": "etwmon.records", "fields": _details_fields}
    return make_dataclass("Details", spec, frozen=True, namespace=namespace)


Details = _details_class()
#: Per record type, the Event attributes its extension block can carry.
_EXTENSION_ATTRS: dict[int, frozenset[str]] = {
    int(cls.type): frozenset(f.name for f in _dc_fields(cls)) & _TAG_NAMES
    for cls in (ProcessCreate, ProcessExec, ProcessExit, ThreadCreate, ThreadExit, ImageLoad)
}
_CREATE_ATTRS = _EXTENSION_ATTRS[1]
_DETAIL_NAMES = {int(t): tuple(sorted(names)) for t, names in _EXTENSION_ATTRS.items()}
_DETAIL_KNOWN = frozenset(f.name for f in _dc_fields(Details))


def _details_of(event: Event) -> Details | None:
    """The Details an event's attributes describe, or None when it has none (no block is written then)."""
    values = {name: getattr(event, name) for name in _DETAIL_NAMES[int(event.type)] if name in _DETAIL_KNOWN}
    if "user" in values:
        values["user"] = _stored_user(event)
    flags = int(event.flags)  # type: ignore[attr-defined]
    if not flags and all(v is None for v in values.values()):
        return None
    return Details(flags=flags, **values)


def _stored_user(event: Event) -> str | None:
    """The User the event's record carries (``event.user`` names the uid when it carries none)."""
    slot = _STORED_USER[ProcessExit if isinstance(event, ProcessExit) else ProcessCreate]
    event.uid  # noqa: B018 - decodes a parsed record first
    return slot.__get__(event)


# --- checking and decoding a batch -------------------------------------------------------------------------

_U32X2 = struct.Struct("<II")
_U32X3 = struct.Struct("<III")
_CREATE_FIELDS = struct.Struct("<IIIIH")
_IMAGE_FIELDS = struct.Struct("<IIQ")
_CREATE_SIZE = PROCESS_CREATE_DTYPE.itemsize  # 40
_IMAGE_NAME_OFFSET = IMAGE_LOAD_DTYPE.fields["ImageFileName"][1]
_IMAGE_SIZE = IMAGE_LOAD_DTYPE.itemsize  # 640: an ImageLoad's extension block starts here
_MIN_SIZE = {int(t): d.itemsize for t, d in DTYPES.items()}
_MIN_SIZE[int(ItemType.ProcessCreate)] = _MIN_SIZE[int(ItemType.ProcessExec)] = _CMDLINE_OFFSET + 2
#: Where the extension block starts in the fixed-size record types that can carry one.
_BLOCK_AT = {2: 24, 3: 24, 4: 32, 5: IMAGE_LOAD_DTYPE.itemsize}
#: Value sizes of the fixed-size kinds of fields; a known field of another size is malformed.
_KIND_SIZE = {"guid": 16, "u32": 4, "i64": 8, "u64": 8, "us": 8}
# Per tag: the exact size its value must have (0: text, an even size), or None when any size is taken.
_TAG_RULE = {tag: (0 if kind == "text" else _KIND_SIZE.get(kind)) for tag, (_, kind) in _TAG_FIELDS.items()}
# FILETIME fields (their attribute says so: start_filetime): refused out of range, like a record's Time.
_TIME_TAGS = frozenset(tag for tag, (name, kind) in _TAG_FIELDS.items() if kind == "i64" and name.endswith("_filetime"))


def _as_bytes_view(buffer) -> memoryview:
    view = memoryview(buffer)
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


def _block_bounds(view, start: int, end: int) -> tuple[int, int, int]:
    """(flags, first field, end of the fields) of the extension block in ``view[start:end]``; (0, 0, 0) when
    there is none or it is of a version this reader does not know (then it is skipped whole, as the format says)."""
    if end - start < EXTENSION_HEADER_SIZE:
        return 0, 0, 0
    version, length, flags = _EXT_HEADER.unpack_from(view, start)
    if version != EXTENSION_VERSION or length < EXTENSION_HEADER_SIZE or start + length > end:
        return 0, 0, 0
    return flags, start + EXTENSION_HEADER_SIZE, start + length


def _check_block(view, start: int, end: int, offset: int) -> None:
    """Refuse (RecordFormatError at ``offset``) a block whose known fields could not be decoded: text of an odd
    length (not UTF-16), a GUID or number of the wrong size, a time out of range. Unknown tags are skipped; a
    field that runs past the block ends it (the reader keeps what came before)."""
    _, pos, stop = _block_bounds(view, start, end)
    _fields(view, pos, stop, offset, _NO_DECODE)


def _fields(view, pos: int, stop: int, offset: int, decode: dict) -> dict:
    """Attribute -> value of the fields of ``view[pos:stop]`` that ``decode`` (a ``decode_table``) names,
    checking every known field on the way (``RecordFormatError`` at ``offset``, see ``_check_block``): one walk
    both checks and decodes. In C where etwmon._speedups was built (a refused field: the Python walk says why)."""
    if _c_fields is not None:
        out = _c_fields(view, pos, stop, decode, _C_RULES, MAX_FILETIME)
        if out is not None:
            return out
    return _fields_py(view, pos, stop, offset, decode)


def _fields_py(view, pos: int, stop: int, offset: int, decode: dict) -> dict:
    """``_fields`` in Python: the decoders get the value as a slice of ``view``."""
    out: dict = {}
    unpack = _TLV.unpack_from
    rules = _RULE_OF
    while pos + 4 <= stop:
        tag, size = unpack(view, pos)
        pos += 4
        end = pos + size
        if end > stop:
            break
        rule = rules[tag]
        if rule is not None and rule != size:  # (a time's rule is -8: its value is always looked at)
            if rule == 0:
                if size & 1:
                    raise RecordFormatError(f"extension field {tag} holds text of odd length {size}", offset)
            elif rule > 0 or size != 8:
                raise RecordFormatError(f"extension field {tag} has {size} bytes, needs {abs(rule)}", offset)
            elif not 0 <= _I64.unpack_from(view, pos)[0] <= MAX_FILETIME:
                raise RecordFormatError(f"extension field {tag} holds a time out of range", offset)
        known = decode.get(tag)
        if known is not None:
            out[known[0]] = known[1](view[pos:end])
        pos = end
    return out


_NO_DECODE: dict = {}
#: Per tag (a list, indexed by it): None any size, 0 text (an even size), -8 a FILETIME, else the exact size.
_RULE_OF: list[int | None] = [None] * 0x10000
for _tag, _rule in _TAG_RULE.items():
    _RULE_OF[_tag] = -8 if _tag in _TIME_TAGS else _rule
assert all(_TAG_RULE[tag] == 8 for tag in _TIME_TAGS)


def _scan(view) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int]], RecordFormatError | None]:
    """The records of ``view`` as (offset, Type, Size, Time) rows, checking each header on the way (Size, Time,
    CommandLineLength, a RecordsLost's Count), up to the first that is malformed (its error, else None); and
    where each row's extension block is (start, end; (0, 0) for none), for ``_checked``."""
    end = len(view)
    offset = 0
    unpack_header = _HEADER.unpack_from
    min_size = _MIN_SIZE
    block_at = _BLOCK_AT
    rows: list[tuple[int, int, int, int]] = []
    blocks: list[tuple[int, int]] = []
    error = None
    while offset < end:
        if end - offset < HEADER_SIZE:
            error = f"truncated header: {end - offset} bytes left, a header needs 16"
            break
        item, size, ft = unpack_header(view, offset)
        if size < HEADER_SIZE:
            error = f"record Size {size} is smaller than the 16-byte header"
            break
        if offset + size > end:
            error = f"record Size {size} runs past the end of the buffer ({end} bytes)"
            break
        need = min_size.get(item, HEADER_SIZE)
        if size < need:
            error = f"record of type {item} has Size {size}, needs at least {need}"
            break
        if not 0 <= ft <= MAX_FILETIME:
            error = f"record Time {ft} is out of range (1601-01-01 to 9999-12-31)"
            break
        block = (0, 0)
        if item == 1 or item == 101:  # ProcessCreate, ProcessExec (raw numbers: see parse)
            chars = view[offset + 32] | (view[offset + 33] << 8)
            base = _CMDLINE_OFFSET + 2 * chars
            if base > size:
                error = f"CommandLineLength {chars} runs past the record's Size {size}"
                break
            base += _CREATE_SIZE - _CMDLINE_OFFSET
            if size > base:
                block = (offset + base, offset + size)
        elif size > 24 and item in block_at and size > block_at[item]:
            block = (offset + block_at[item], offset + size)
        elif item == 100 and not (view[offset + 16] or view[offset + 17] or view[offset + 18] or view[offset + 19]):
            error = "RecordsLost with a Count of 0"
            break
        rows.append((offset, item, size, ft))
        blocks.append(block)
        offset += size
    return rows, blocks, None if error is None else RecordFormatError(error, offset)


#: Below this many extension blocks in a batch, they are checked one by one (numpy's set-up costs more).
_VECTOR_BLOCKS = 192
_RULES = np.full(0x10000, -1, dtype=np.int32)  # per tag: -1 any size, 0 text (even), else the exact size
for _tag, _rule in _TAG_RULE.items():
    if _rule is not None:
        _RULES[_tag] = _rule
_IS_TIME = np.zeros(0x10000, dtype=bool)
_IS_TIME[list(_TIME_TAGS)] = True
#: The rules for the C check (etwmon._speedups.scan): -1 any size, 0 text, -8 a FILETIME, else the exact size.
_C_RULES = np.array([-1 if rule is None else rule for rule in _RULE_OF], dtype=np.int32).tobytes()


def _u16s(raw: np.ndarray, at: np.ndarray) -> np.ndarray:
    return raw[at].astype(np.int64) | (raw[at + 1].astype(np.int64) << 8)


def _bad_blocks(view, raw: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which of the blocks ``raw[starts:ends]`` ``_check_block`` would refuse, walking every block's fields at
    once (one numpy step per field position instead of a Python loop per field)."""
    bad = np.zeros(len(starts), dtype=bool)
    idx = np.flatnonzero(ends - starts >= EXTENSION_HEADER_SIZE)
    if not len(idx):
        return bad
    first = starts[idx]
    version, length = _u16s(raw, first), _u16s(raw, first + 2)
    valid = (version == EXTENSION_VERSION) & (length >= EXTENSION_HEADER_SIZE) & (first + length <= ends[idx])
    idx, pos, stop = idx[valid], first[valid] + EXTENSION_HEADER_SIZE, first[valid] + length[valid]
    steps = 0
    while True:
        active = pos + 4 <= stop
        idx, pos, stop = idx[active], pos[active], stop[active]
        if not len(idx):
            return bad
        steps += 1
        if steps > 64:  # a block of many tiny fields (nobody writes one): the rest one by one
            for i, p, e in zip(idx.tolist(), pos.tolist(), stop.tolist()):
                bad[i] = _fields_bad(view, p, e)
            return bad
        tag, size = _u16s(raw, pos), _u16s(raw, pos + 2)
        pos = pos + 4
        inside = pos + size <= stop
        rule = _RULES[tag]
        wrong = inside & (((rule == 0) & (size & 1 == 1)) | ((rule > 0) & (size != rule)))
        timed = np.flatnonzero(inside & ~wrong & _IS_TIME[tag] & (size == 8))
        if len(timed):
            when = np.ascontiguousarray(raw[pos[timed, None] + np.arange(8)]).view("<i8").ravel()
            wrong[timed[(when < 0) | (when > MAX_FILETIME)]] = True
        bad[idx[wrong]] = True
        pos = np.where(inside, pos + size, stop)  # a field that runs past the block ends it


def _fields_bad(view, pos: int, stop: int) -> bool:
    try:
        _fields(view, pos, stop, 0, _NO_DECODE)
    except RecordFormatError:
        return True
    return False


def _checked(view) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int]], RecordFormatError | None]:
    """The rows and blocks of ``_scan`` up to the first malformed record (header or extension block), and its
    error. In C where etwmon._speedups was built (the same rows, blocks and error: tests/test_speedups.py)."""
    if _c_scan is not None:
        rows, blocks, failure = _c_scan(view, _MIN_SIZE, _BLOCK_AT, _C_RULES, MAX_FILETIME)
        return rows, blocks, None if failure is None else RecordFormatError(*failure)
    rows, blocks, error = _scan(view)
    with_block = [i for i, (start, _) in enumerate(blocks) if start]
    if len(with_block) < _VECTOR_BLOCKS:
        for i in with_block:
            start, end = blocks[i]
            try:
                _check_block(view, start, end, rows[i][0])
            except RecordFormatError as exc:
                return rows[:i], blocks[:i], exc
        return rows, blocks, error
    raw = np.frombuffer(view, dtype=np.uint8)
    where = np.array([blocks[i] for i in with_block], dtype=np.int64)
    bad = np.flatnonzero(_bad_blocks(view, raw, where[:, 0], where[:, 1]))
    if len(bad):
        i = with_block[int(bad[0])]
        try:
            _check_block(view, *blocks[i], rows[i][0])  # says why
        except RecordFormatError as exc:
            return rows[:i], blocks[:i], exc
    return rows, blocks, error


def _walk(view) -> Iterator[tuple[int, int, int, int]]:
    """(offset, Type, Size, Time) of each record, checked whole (``RecordFormatError`` naming the offset of the
    first malformed one, after the rows before it)."""
    rows, _, error = _checked(view)
    yield from rows
    if error is not None:
        raise error


def _guid_text(b: bytes) -> str:
    """``guid_text`` without building a uuid.UUID (Data1..3 are little-endian)."""
    h = (b[3::-1] + b[5:3:-1] + b[7:5:-1] + b[8:]).hex()
    return f"{{{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}}}"


_GUIDS: dict[bytes, str] = {}


def _guid_cached(b: bytes) -> str:
    """``_guid_text``, remembered: a process's guid is in each of its records, and in its children's."""
    text = _GUIDS.get(b)
    if text is None:
        if len(_GUIDS) >= 4096:
            _GUIDS.clear()
        text = _GUIDS[b] = _guid_text(b)
    return text


def _decoder(kind: str):
    """How a (checked) value of ``kind`` becomes its Event attribute."""
    if kind == "text":
        return _utf16
    if kind == "guid":
        return _guid_cached
    if kind in ("u32", "u64"):
        return functools.partial(int.from_bytes, byteorder="little")
    if kind == "i64":
        return functools.partial(int.from_bytes, byteorder="little", signed=True)
    if kind == "us":
        return lambda b: timedelta(microseconds=int.from_bytes(b, "little"))
    return lambda b: _field_value(kind, b)  # a kind this module has no fast path for


def _utf16(b: bytes) -> str:
    # The codec function itself: bytes.decode("utf-16-le") goes through a Python-level wrapper each time.
    return _utf_16_le_decode(b, "surrogatepass", True)[0]


#: Tag -> (Event attribute, decoder) for every tag of the extension block.
_DECODE = {tag: (name, _decoder(kind)) for tag, (name, kind) in _TAG_FIELDS.items()}


def decode_table(names) -> dict:
    """Tag -> (attribute, decoder) of the extension fields that fill the attributes ``names``."""
    return {tag: known for tag, known in _DECODE.items() if known[0] in names}


#: The same, per record type: only the tags its Event has attributes for.
_DECODE_FOR = {item: decode_table(allowed) for item, allowed in _EXTENSION_ATTRS.items()}


def _block_values(data: bytes, start: int, end: int, decode: dict) -> tuple[int, dict]:
    """(flags, attribute -> value) of the (checked) extension block in ``data[start:end]``, for the fields in
    ``decode`` (a ``decode_table``)."""
    flags, pos, stop = _block_bounds(data, start, end)
    return flags, _fields(data, pos, stop, start, decode)


_NO_DETAILS: dict = {}
_FLAGS = {0: EventFlags(0)}


def _decode(event: Event) -> None:
    """Set the lazily decoded attributes of a parsed record (its command line, its extension block)."""
    data, offset, size = event._lazy
    cls = type(event)
    item = int(cls.type)
    if item == 1 or item == 101:
        chars = data[offset + 32] | (data[offset + 33] << 8)
        start = offset + _CMDLINE_OFFSET
        _SET_COMMAND_LINE(event, _utf16(data[start:start + 2 * chars]))
        base = offset + _CREATE_SIZE + 2 * chars
    else:
        base = offset + _BLOCK_AT[item]
    if offset + size > base:
        flags, values = _block_values(data, base, offset + size, _DECODE_FOR[item])
    else:
        flags, values = 0, _NO_DETAILS
    get = values.get
    for name, setter in _DETAIL_SETTERS[item]:
        setter(event, get(name))
    flag = _FLAGS.get(flags)
    if flag is None:
        flag = _FLAGS[flags] = EventFlags(flags)
    _SET_FLAGS[item](event, flag)
    _LAZY_SET(event, None)  # decoded: let go of the batch


_DETAIL_SETTERS: dict[int, tuple] = {}
_SET_FLAGS: dict[int, Any] = {}
for _cls in (ProcessCreate, ProcessExec, ProcessExit, ThreadCreate, ThreadExit):
    _item = int(_cls.type)
    _cls._LAZY = _EXTENSION_ATTRS[_item] | {"flags"} | (
        {"command_line"} if issubclass(_cls, ProcessCreate) else set())
    _DETAIL_SETTERS[_item] = tuple((name, getattr(_cls, name).__set__) for name in sorted(_EXTENSION_ATTRS[_item]))
    _SET_FLAGS[_item] = _cls.flags.__set__  # type: ignore[attr-defined]
_SET_COMMAND_LINE = ProcessCreate.command_line.__set__  # type: ignore[attr-defined]


def _named_user(slot: Any) -> property:
    """``user``: the record's User, else the name of its Uid (``etwmon.users``: looked up once per uid, None when
    it has none). The kernel writes the uid; its name is found where it is read, not per record at capture."""
    get, set_ = slot.__get__, slot.__set__

    def user(self) -> str | None:
        value = get(self)  # (AttributeError before a parsed record is decoded: __getattr__ decodes it)
        if value is None:
            uid = self.uid
            if uid is not None:
                return user_name(uid)
        return value

    return property(user, set_, doc=_named_user.__doc__)


#: The User each record carries itself (``_details_of`` encodes that one, not a name looked up).
_STORED_USER = {cls: cls.user for cls in (ProcessCreate, ProcessExit)}  # type: ignore[attr-defined]
for _cls, _slot in _STORED_USER.items():
    _cls.user = _named_user(_slot)  # type: ignore[assignment, method-assign]

_new = object.__new__
_FILETIME = Event.filetime.__set__  # type: ignore[attr-defined]
_LAZY_SET = Event._lazy.__set__  # type: ignore[attr-defined]


def _setters(cls: type, names: tuple[str, ...]):
    return tuple(getattr(cls, name).__set__ for name in names)


_C_PID, _C_PPID, _C_CPID, _C_CTID = _setters(ProcessCreate, ("pid", "parent_pid", "creating_pid", "creating_tid"))
_X_PID, _X_CODE = _setters(ProcessExit, ("pid", "exit_code"))
_TC_TID, _TC_PID = _setters(ThreadCreate, ("tid", "pid"))
_TX_TID, _TX_PID, _TX_CODE = _setters(ThreadExit, ("tid", "pid", "exit_code"))


def parse(buffer) -> Iterator[Event]:
    """Yield an Event for each record in ``buffer`` (bytes, bytearray, memoryview or a numpy array).

    Raises ``RecordFormatError`` naming the offset on a record that is malformed (truncated, a Size smaller
    than its type needs, a Time out of range, an extension field that cannot be decoded) — nothing else,
    whatever the bytes; the records before it are delivered first (never loops on Size 0). Types it does not
    know come out as ``UnknownRecord``. The batch is copied once (unless it is ``bytes``): the events stay
    valid when the caller reuses its buffer.
    """
    view = _as_bytes_view(buffer)
    data = buffer if type(buffer) is bytes else view.tobytes()
    # The dispatch compares raw Type numbers (the ItemType values, fixed by the wire format), not ItemType
    # members: an int == int test is about six times cheaper than ``item == ItemType.ProcessExit``.
    new, set_time, set_lazy = _new, _FILETIME, _LAZY_SET
    for offset, item, size, ft in _walk(data):
        body = offset + HEADER_SIZE
        if item == 1 or item == 101:
            pid, ppid, ctid, cpid, _ = _CREATE_FIELDS.unpack_from(data, body)
            event = new(ProcessCreate if item == 1 else ProcessExec)
            _C_PID(event, pid)
            _C_PPID(event, ppid)
            _C_CPID(event, cpid)
            _C_CTID(event, ctid)
        elif item == 2:
            event = new(ProcessExit)
            pid, code = _U32X2.unpack_from(data, body)
            _X_PID(event, pid)
            _X_CODE(event, code)
        elif item == 3:
            event = new(ThreadCreate)
            tid, pid = _U32X2.unpack_from(data, body)
            _TC_TID(event, tid)
            _TC_PID(event, pid)
        elif item == 4:
            event = new(ThreadExit)
            tid, pid, code = _U32X3.unpack_from(data, body)
            _TX_TID(event, tid)
            _TX_PID(event, pid)
            _TX_CODE(event, code)
        elif item == 100:
            yield RecordsLost(ft, _U32.unpack_from(data, body)[0])
            continue
        elif item == 5:
            pid, image_size, address = _IMAGE_FIELDS.unpack_from(data, body)
            start = offset + _IMAGE_NAME_OFFSET
            name = data[start:start + 2 * _IMAGE_NAME_CHARS].decode("utf-16-le", "surrogatepass").split("\0", 1)[0]
            if size > _IMAGE_SIZE:  # built whole (image loads are few): the block, the whole path if it was cut
                flags, values = _block_values(data, offset + _IMAGE_SIZE, offset + size, _DECODE_FOR[5])
                whole = values.pop("image_name", None)
                yield ImageLoad(ft, pid, image_size, address, whole or name, flags=EventFlags(flags), **values)
            else:
                yield ImageLoad(ft, pid, image_size, address, name)
            continue
        else:
            yield UnknownRecord(ft, item, data[offset:offset + size])
            continue
        set_time(event, ft)
        set_lazy(event, (data, offset, size))
        yield event


# The columnar readers (record_headers, parse_arrays, parse_array, read_array) live in etwmon.columns, which
# builds on the checks above; re-exported here. Imported last: columns needs everything above.
from .columns import (  # noqa: E402
    ARRAY_DTYPE, RECORD_INDEX_DTYPE, RecordBatch, parse_array, parse_arrays, read_array, record_headers,
)
