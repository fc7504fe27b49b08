"""The process table: the processes the monitor knows, bounded in processes and in bytes, live ones by pid and
every one by guid for ancestry (``etwmon.identity`` feeds it and puts what it knows into records)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .records import _I64, ExtensionTag, block_fields, field_value, guid_text, pack_field
from .users import user_name

__all__ = ["ProcessInfo", "ProcessTable", "DEFAULT_MAX_PROCESSES", "DEFAULT_MAX_BYTES"]

#: Processes the table holds (live ones first; exited ones are kept for ancestry until room is needed).
DEFAULT_MAX_PROCESSES = 16384
#: Bytes the table may hold, as ``ProcessTable.bytes`` counts them (never less than what tracemalloc measures,
#: up to 1.5x more when every process carries a long parent command line; see tests/test_identity.py):
#: whichever of the two caps is reached first evicts. A command line is held twice in UTF-16 (the process's
#: own and the packed ParentCommandLine its children carry), so with 32 K-character command lines (any local
#: user can exec those) 32 MiB is ~250 processes' worth; with typical ones (~1.9 KB per process in all) the
#: count cap comes first (16,384 x 1.9 KB = ~31 MB).
DEFAULT_MAX_BYTES = 32 << 20
#: What an entry costs beyond its strings: the object, its dict and lists, the packed guid/start fields and
#: the table's two dict slots (measured with tracemalloc on CPython 3.11, rounded up).
_ENTRY_OVERHEAD = 1100
#: Exits that passed in batches and wait to be applied to the table: past this many they are applied at once.
_MAX_PENDING_EXITS = 16384
#: How far apart two start times of one pid may be and still be one process: the kernel's fork timestamp and
#: /proc's start time (cut to 10 ms clock ticks) of the same process differ by up to a tick and a bit.
_SAME_START = 250_000  # 25 ms in FILETIME ticks

_GUID, _PGUID = int(ExtensionTag.ProcessGuid), int(ExtensionTag.ParentProcessGuid)
_IMAGE, _UID, _USER = int(ExtensionTag.Image), int(ExtensionTag.Uid), int(ExtensionTag.User)
_PIMAGE, _PCMD, _PUSER = (int(ExtensionTag.ParentImage), int(ExtensionTag.ParentCommandLine),
                          int(ExtensionTag.ParentUser))
_START = int(ExtensionTag.StartTime)
#: Tags the identity stage writes itself; a source's value for them is replaced by the table's.
_STAGE_TAGS = frozenset({_GUID, _PGUID, _PIMAGE, _PCMD, _PUSER, _START})


@dataclass(frozen=True)
class ProcessInfo:
    """One process as the table knows it (``Monitor.ancestors`` returns these); None = unknown."""

    process_guid: str
    pid: int
    parent_process_guid: str | None
    parent_pid: int
    start_filetime: int
    image: str | None
    command_line: str | None
    user: str | None
    uid: int | None
    exited: bool
    seeded: bool


class _Entry:
    """A process in the table. Its details are kept as the packed fields the block carries (Tag, Length,
    value), so a record costs a join and a child's parent fields are made once, not per record."""

    __slots__ = ("pid", "guid", "start", "ppid", "parent_guid", "_fields", "_raw", "command_line", "head",
                 "start_field", "thread_block", "parent_tail", "tail", "exited", "seeded", "from_proc", "counted")

    def __init__(self, pid: int, guid: bytes, start: int, ppid: int, parent: "_Entry | None") -> None:
        self.pid = pid
        self.guid = guid
        self.start = start
        self.ppid = ppid
        self.parent_guid = parent.guid if parent is not None else None
        self._fields: dict[int, bytes] | None = {}  # its own details (image, cwd, uid, user, ...), packed
        self._raw: bytes | None = None  # or the record they are still to be read from (see ``fields``)
        self.command_line = b""  # UTF-16LE
        # The packed ProcessGuid (and ParentProcessGuid) that start every block of this process, and its StartTime.
        self.head = [pack_field(_GUID, guid)] + ([pack_field(_PGUID, parent.guid)] if parent is not None else [])
        self.start_field = pack_field(_START, _I64.pack(start))
        self.thread_block = [self.head[0]]
        self.parent_tail = parent.child_tail() if parent is not None else []
        self.tail: list[bytes] | None = None  # child_tail(), made when a first child needs it
        self.exited = False
        self.seeded = False
        self.from_proc = 0  # EventFlags.PROCFS when its details were read from /proc after the fact
        self.counted = 0  # bytes the table counts for it (ProcessTable.account)

    @property
    def fields(self) -> dict[int, bytes]:
        """Its own details, packed. An entry fed from a record the kernel wrote (``IdentityStage._feed``) keeps
        that record and reads them from it the first time they are asked for (``ancestors``, a child's parent
        fields), so that a process nobody asks about costs no parsing."""
        fields = self._fields
        if fields is None:
            fields = self._fields = {tag: value for tag, value in block_fields(self._raw, packed=True)[1]
                                     if tag not in _STAGE_TAGS}
            self._raw = None
        return fields

    def keep_record(self, record: bytes) -> None:
        """Details to be read from ``record`` (a create or exec the kernel wrote) when asked for."""
        self._fields = None
        self._raw = record

    def nbytes(self) -> int:
        """What holding this entry costs, at most: its strings, the copy its children's ParentCommandLine (and
        parent image and user) make of them, the parent fields it carries itself, and a fixed overhead. A parent's
        packed fields are shared by its children but counted in each, so the count errs on the high side."""
        own = len(self.command_line)
        if self._fields is None:  # the record kept whole (command line and block): more than the fields
            own += len(self._raw)  # type: ignore[arg-type]
        else:
            for value in self._fields.values():
                own += len(value)
        carried = 0
        for value in self.parent_tail:
            carried += len(value)
        return _ENTRY_OVERHEAD + 2 * own + carried

    def child_tail(self) -> list[bytes]:
        """The packed parent fields a child of this process carries: image, user, command line (block order)."""
        tail = self.tail
        if tail is None:
            tail = []
            image = self.fields.get(_IMAGE)
            if image is not None:
                tail.append(pack_field(_PIMAGE, image[4:]))
            user = self.fields.get(_USER)
            if user is not None:
                tail.append(pack_field(_PUSER, user[4:]))
            tail.append(pack_field(_PCMD, self.command_line))
            self.tail = tail
        return tail

    def info(self) -> ProcessInfo:
        f = self.fields
        value = (lambda tag: field_value(tag, f[tag][4:]) if tag in f else None)
        uid, user = value(_UID), value(_USER)
        if user is None and uid is not None:  # a record the kernel wrote names the uid: its name, looked up now
            user = user_name(uid)
        return ProcessInfo(
            process_guid=guid_text(self.guid), pid=self.pid,
            parent_process_guid=guid_text(self.parent_guid) if self.parent_guid else None, parent_pid=self.ppid,
            start_filetime=self.start, image=value(_IMAGE),
            command_line=self.command_line.decode("utf-16-le", "surrogatepass"), user=user,
            uid=uid, exited=self.exited, seeded=self.seeded)


class ProcessTable:
    """The processes the monitor knows, bounded like the ring, in processes and in bytes: live ones by pid, and
    every one by guid for ancestry. When either cap is reached the oldest exited process is forgotten first, then
    the oldest live one; both are counted (``evicted``, ``evicted_live``)."""

    def __init__(self, max_processes: int = DEFAULT_MAX_PROCESSES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if isinstance(max_processes, bool) or not isinstance(max_processes, int) or max_processes < 2:
            raise ValueError(f"max_processes must be at least 2, not {max_processes!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 2 * _ENTRY_OVERHEAD:
            raise ValueError(f"max_bytes must be at least {2 * _ENTRY_OVERHEAD}, not {max_bytes!r}")
        self.max_processes = max_processes
        self.max_bytes = max_bytes
        self.bytes = 0  # what the entries held cost (``_Entry.nbytes`` each)
        #: Bytes of the cap kept for records waiting to be applied (the identity stage's backlog): the entries
        #: get the rest, so that the two together stay within ``max_bytes``.
        self.reserved = 0
        self._pending_exits: list[np.ndarray | bytes] = []  # guids of exits that passed in batches, not yet applied
        self._pending_count = 0
        self.live: dict[int, _Entry] = {}
        self.by_guid: dict[bytes, _Entry] = {}
        self._exited: dict[bytes, None] = {}  # insertion-ordered: the oldest exit first
        self.evicted = 0
        self.evicted_live = 0

    def __len__(self) -> int:
        return len(self.by_guid)

    def add(self, entry: _Entry) -> None:
        old = self.live.get(entry.pid)
        if old is not None:
            self.exit(old)  # the pid was reused and we never saw the old process end (a lost event)
        self.live[entry.pid] = entry
        self.by_guid[entry.guid] = entry
        entry.counted = 0
        self.account(entry)

    def account(self, entry: _Entry) -> None:
        """Count what ``entry`` holds now (after it was added or its details changed), making room if needed."""
        size = entry.nbytes()
        self.bytes += size - entry.counted
        entry.counted = size
        if self.bytes + self.reserved > self.max_bytes or len(self.by_guid) > self.max_processes:
            self._make_room(entry)

    def exit(self, entry: _Entry) -> None:
        if self.live.get(entry.pid) is entry:
            del self.live[entry.pid]
        if not entry.exited:
            entry.exited = True
            self._exited[entry.guid] = None

    def _make_room(self, keep: _Entry) -> None:
        """Forget the oldest exited processes, then the oldest live ones, until both caps hold (never ``keep``,
        the one just counted: a single process bigger than the byte cap stays alone)."""
        if self._pending_count:
            self.apply_exits()  # exited processes go first
        while (self.bytes + self.reserved > self.max_bytes or len(self.by_guid) > self.max_processes) and len(self.by_guid) > 1:
            if self._exited:
                guid = next(iter(self._exited))
                del self._exited[guid]
                entry = self.by_guid.pop(guid, None)
                if entry is not None:
                    self.bytes -= entry.counted
                self.evicted += 1
                continue
            guid, entry = next(iter(self.by_guid.items()))
            if entry is keep:  # the oldest is the newest: move it to the end and take the next
                del self.by_guid[guid]
                self.by_guid[guid] = entry
                guid, entry = next(iter(self.by_guid.items()))
            del self.by_guid[guid]
            self.bytes -= entry.counted
            if self.live.get(entry.pid) is entry:
                del self.live[entry.pid]
            self.evicted += 1
            self.evicted_live += 1

    def note_exits(self, guids: np.ndarray) -> None:
        """Exits that passed without the table (rows of 16 guid bytes), applied when it is next read or must
        evict, or once too many wait."""
        self._pending_exits.append(guids)
        self._pending_count += len(guids)
        if self._pending_count > _MAX_PENDING_EXITS:
            self.apply_exits()

    def note_exit(self, guid: bytes) -> None:
        """One exit's guid (``note_exits`` without an array, for a record that passed alone)."""
        self._pending_exits.append(guid)
        self._pending_count += 1
        if self._pending_count > _MAX_PENDING_EXITS:
            self.apply_exits()

    def apply_exits(self) -> list[_Entry]:
        """Mark exited the processes of the noted exits; returns their entries."""
        pending, self._pending_exits, self._pending_count = self._pending_exits, [], 0
        done = []
        for guids in pending:
            blob = guids if isinstance(guids, bytes) else guids.tobytes()
            for k in range(0, len(blob), 16):
                entry = self.by_guid.get(blob[k:k + 16])
                if entry is not None and not entry.exited:
                    self.exit(entry)
                    done.append(entry)
        return done

    def get(self, guid: bytes) -> _Entry | None:
        return self.by_guid.get(guid)

    def ancestors(self, guid: bytes) -> list[_Entry]:
        """The chain of parents of ``guid``, nearest first, as far as the table knows it."""
        out: list[_Entry] = []
        entry = self.by_guid.get(guid)
        seen = {guid}
        while entry is not None and entry.parent_guid is not None and entry.parent_guid not in seen:
            seen.add(entry.parent_guid)
            entry = self.by_guid.get(entry.parent_guid)
            if entry is not None:
                out.append(entry)
        return out


def _same_process(entry: _Entry | None, start: int | None, fork: bool) -> bool:
    """Whether ``entry``, the table's process with a create's or exec's pid, is the process it names: a fork's
    child is a new process unless the table has it from the start-up snapshot (seeded, started then); an exec
    is its pid's process, when it started then or the source cannot say when."""
    if entry is None:
        return False
    if fork:
        return entry.seeded and abs(entry.start - start) <= _SAME_START  # type: ignore[operator]
    return start is None or abs(entry.start - start) <= _SAME_START
