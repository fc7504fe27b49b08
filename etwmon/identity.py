"""Who is this process: ProcessGuid, a bounded table of the processes the monitor knows, and the stage that puts
both into every record (the extension block) on the source's thread, before the ring.

ProcessGuid (128 bits, shown as Sysmon shows it: ``{hhhhhhhh-bbbb-bbbb-pppp-ppppssssssss}``):

- bytes 0-3: the host tag, the first 4 bytes of SHA-256 of what names the host (``/etc/machine-id`` on Linux),
- bytes 4-7: the boot tag, the first 4 bytes of SHA-256 of the host name and the boot's id (the kernel's random
  ``boot_id``, new at every boot),
- bytes 8-11: the process id, big-endian (so it reads as hex in the text form),
- bytes 12-15: the low 32 bits of the process's start time as a FILETIME (100 ns ticks).

So a process has one guid on its create, its execs, its threads and its exit (the table hands out the guid it
gave at the start), two processes that share a pid differ (they start at different times: the low 32 bits of
100 ns ticks repeat only every 429.5 s, to the tick), and the same pid and start on another host or after a reboot
differ in the tags. The start time is the one the source knows for the process: the kernel's timestamp of the
fork, or /proc's start time (clock ticks) for a process that ran before the monitor started.

On Windows, where ETW's Kernel-Process events carry the kernel's ProcessSequenceNumber (unique until reboot),
bytes 8-15 are that number instead (``guid_from_sequence``), so a process's guid and its parent's come from the
kernel itself, even for a parent that started before the monitor.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import struct
from typing import Iterable

import numpy as np

from .records import (
    _I64, _U32, _U64, MAX_COMMAND_LINE, EventFlags, ExtensionTag, _utf16, block_fields, guid_bytes, pack_field,
    with_packed,
)
from . import _native, backlog
from .process_table import (  # the tags the stage writes itself (_STAGE_TAGS) and those it reads
    _GUID, _IMAGE, _PGUID, _SAME_START, _STAGE_TAGS, _START, _UID, _USER, DEFAULT_MAX_BYTES, DEFAULT_MAX_PROCESSES, ProcessInfo, ProcessTable, _Entry,
    _same_process,
)
from .users import user_name

__all__ = ["ProcessInfo", "ProcessTable", "IdentityStage", "guid_prefix", "make_guid", "guid_from_sequence",
           "DEFAULT_MAX_PROCESSES", "DEFAULT_MAX_BYTES"]

log = logging.getLogger(__name__)

#: Process records noted from batches while creates are among them: past this many they are applied (after
#: dropping the processes that started and ended among them, as far as the table would evict them anyway). Few
#: enough that applying them holds the reading thread about a millisecond at most (~10-20 µs a record): at 512 the
#: fork storm's p99 latency at 0.6 of its maximum rate was 6.3 ms, at 64 2.8-3.5 ms, for ~5 % more CPU.
_MAX_PENDING_RECORDS = 64
_WHOLE = object()  # in a pending entry's starts: a batch kept whole (push_checked), its process records found on use

_PID_START = struct.Struct(">II")
_PIDS = struct.Struct("<II")
_TLV = struct.Struct("<HH")
_START_AT = struct.Struct("<HHq")  # a StartTime field: Tag, Length, value
_END = struct.Struct("<q")
_PROCESS_TYPES = frozenset((1, 2, 101))  # ProcessCreate, ProcessExit, ProcessExec
_SEQUENCE = struct.Struct(">Q")

_CWD, _LIFETIME = int(ExtensionTag.CurrentDirectory), int(ExtensionTag.Lifetime)
_UNKNOWN_PARENT = int(EventFlags.UNKNOWN_PARENT)
_SEEDED = int(EventFlags.SEEDED)
_PROCFS = int(EventFlags.PROCFS)


def _u32_at(raw: np.ndarray, where: np.ndarray) -> np.ndarray:
    """The little-endian 32-bit values at byte offsets ``where`` of ``raw``."""
    return (raw[where].astype(np.uint32) | raw[where + 1].astype(np.uint32) << 8
            | raw[where + 2].astype(np.uint32) << 16 | raw[where + 3].astype(np.uint32) << 24)


def guid_prefix(host_and_boot: bytes) -> bytes:
    """The first 8 bytes of every ProcessGuid of this host and boot (``host_and_boot``: host id, NUL, boot id)."""
    host, _, boot = bytes(host_and_boot).partition(b"\0")
    return hashlib.sha256(host).digest()[:4] + hashlib.sha256(host + b"\0" + boot).digest()[:4]


def make_guid(prefix: bytes, pid: int, start_filetime: int) -> bytes:
    """The 16 bytes of a ProcessGuid (see the module's doc)."""
    return prefix + _PID_START.pack(pid & 0xFFFFFFFF, start_filetime & 0xFFFFFFFF)


def guid_from_sequence(prefix: bytes, sequence: int) -> bytes:
    """The 16 bytes of a ProcessGuid on Windows, where the kernel numbers processes itself and never reuses a
    number until reboot (Kernel-Process's ProcessSequenceNumber): the prefix, then that number big-endian."""
    return prefix + _SEQUENCE.pack(sequence & 0xFFFFFFFFFFFFFFFF)


class IdentityStage:
    """A Sink in front of another: puts the ProcessGuid, the parent's guid and fields, and the table's view of
    the process into the extension block of each process and thread record, then passes it on.

    What a source knows itself (its own block: image, cwd, uid, ...) is kept; the stage adds what only the table
    knows. A process it never saw start (it started before ``seed``, or its fork was lost) has no guid, and a
    child of one is flagged UNKNOWN_PARENT: nothing is guessed. A fork's child runs its parent's program until
    it execs, so a ProcessCreate without an image of its own carries the parent's.
    """

    def __init__(self, sink, host_and_boot: bytes, max_processes: int = DEFAULT_MAX_PROCESSES,
                 max_bytes: int = DEFAULT_MAX_BYTES, lean: bool = False) -> None:
        #: False (``Monitor(identity="full")``): every create and exec carries User and the parent's fields
        #: (ParentImage, ParentUser, ParentCommandLine) from the table, added here record by record. True (the
        #: Monitor's default): a create or exec the kernel wrote whole (the bpf source, ParentImage included)
        #: passes on as it is, in its batch, without User (named where shown) and the parent's command line and
        #: user; the table is fed from the batches when it is read (``ancestors``, ``process``) and gives them
        #: there (docs/identity.md), unless the next stage asks for them (``batch_creates``).
        self.lean = bool(lean)
        self._users: dict[int, bytes | None] = {}  # uid -> the packed User field (None: no name)
        # Lean: a reader (ancestors) may apply the noted records while the source's thread notes more or pushes
        # one; this lock keeps them apart (taken once per batch, or per record pushed one by one).
        self._lock = threading.Lock()
        self._push_batch = self._push_checked = None
        if sink is not None:
            self.attach(sink)
        self.prefix = guid_prefix(host_and_boot)
        self.table = ProcessTable(max_processes, max_bytes)
        #: The batches kept whole for the table (``push_checked``) may hold this many bytes, within ``max_bytes``
        #: (the table's entries get the rest); past it their oldest 1/32 is folded in (etwmon.backlog).
        self.backlog_max_bytes = max_bytes // 8
        self._backlog_bytes = 0
        #: Set by a source that calls ``idle()`` before each of its sleeps (the bpf source): a fold due within one
        #: fold (1/32) of the cap then waits for that moment, after the batch that made it due was read, rather
        #: than holding that batch back; past ``backlog_max_bytes`` it is done at once all the same (the cap holds).
        self.defer_folds = False
        self._fold_due = False
        if self.lean:
            self.table.reserved = self.backlog_max_bytes
            backlog.prepare()
        self.unknown_parent = 0  # creates/execs whose parent was not in the table
        self.folded = 0  # processes the backlog dropped when folded (also in the table's evicted)
        self.no_guid = 0  # records of a process the table did not know (no guid could be given)
        self._seeded: set[int] = set()  # pids of live seeded processes (their records take the slow path)
        self._seeded_array: np.ndarray | None = None  # lookup[pid]: whether pid is in _seeded
        # Process records that passed in batches while creates were among them: (batch array, starts, ends).
        self._pending: list[tuple] = []  # (record bytes, None, None) for one passed alone
        self._pending_count = 0
        self._pending_pids: set[int] | None = set()  # the pids their process records name (None: not read out)

        # Only the source's thread changes the table (seed() runs before it starts); readers (ancestors) only
        # look entries up by key, which is atomic in CPython, so the hot path takes no lock.

    def attach(self, sink) -> "IdentityStage":
        """Pass records on to ``sink`` from now on; returns itself (the Sink to give the source)."""
        self.sink = sink
        self.notify = sink.notify
        self.push_lost = sink.push_lost
        self._push = sink.push
        self._push_batch = getattr(sink, "push_batch", None)
        self._push_checked = getattr(sink, "push_checked", None)
        return self

    def _creates_whole(self) -> bool:
        """Whether a create or exec the kernel wrote passes as it is (lean), not through ``push``: not when the
        next stage must see each create (hashing the executable) or needs the parent's fields in it (rules on
        ParentCommandLine or ParentUser); asked per batch, as the rules can be replaced while running."""
        return self.lean and getattr(self.sink, "batch_creates", True)

    # -- records the kernel wrote whole (the bpf source's thread records and exits) ---------------------------

    def push_batch(self, data, ends) -> None:
        """Records that already carry their ProcessGuid (the bpf programs write them with the guid this stage
        would give: same prefix, pid and start time), back to back in ``data``, ``ends`` where each ends: thread
        records, ProcessExits, and ProcessCreates/ProcessExecs with the kernel's fields (parent guid included).
        They pass on in one batch; the table only notes the creates, execs and exits, to apply when it is next
        looked at (``apply_exits``). Records of a process seeded from /proc (whose guid the table made from
        /proc's start time), creates whose parent was seeded (the same for its guid), and any batch the next
        stage cannot take whole go through ``push`` one by one."""
        view = memoryview(data).cast("B") if not isinstance(data, np.ndarray) else data
        ends = np.asarray(ends, dtype=np.int64)
        raw = np.frombuffer(view, dtype=np.uint8)
        starts = np.empty_like(ends)
        starts[0] = 0
        starts[1:] = ends[:-1]
        types = raw[starts]
        exits = types == 2
        creates = (types == 1) | (types == 101)
        noted = exits | creates
        # A thread record's ProcessId is at 20; a process record's, an exit's and an image load's at 16.
        where = starts + np.where((types == 3) | (types == 4), 20, 16)
        special = self._seeded_mask(_u32_at(raw, where))
        has_creates = bool(creates.any())
        if has_creates and self._seeded:
            parents = self._seeded_mask(_u32_at(raw, starts + 20))
            if parents is not None:
                parents &= creates
                special = parents if special is None else special | parents
        if has_creates and self._push_batch is not None and not self._creates_whole():
            self._push_each(raw, starts, ends)  # creates one by one (see ``lean``), the rest as it is
            return
        if special is not None and not special.any():
            special = None
        if self._push_batch is None or special is not None:
            self._push_slowly(raw, starts, ends, special)
            return
        if noted.any():
            self._note(raw, starts[noted], ends[noted], has_creates)
        self._push_batch(raw, ends)

    def _push_checked_batch(self, data: bytes, ends: bytes, kinds: int) -> None:
        """``push_batch`` of a batch the bpf source's C walk gathered: ``data`` the records back to back, ``ends``
        the bytes of where each ends (little-endian int64), ``kinds`` what it holds (bit 0 a create or exec, bit 1
        an exit). The walk stops before every record of a seeded process (``seeded_lookup``), so when the next
        stage takes creates whole the batch passes on as it is and, when it holds process records, joins the
        backlog (``etwmon.backlog``): applied to the table when it is next read, folded into it with array
        operations when the backlog outgrows ``backlog_max_bytes``. A few operations per batch, none per
        record. ``push_checked`` is this in C where etwmon._speedups is built (etwmon/_backlog.c, the same steps
        on the same attributes)."""
        checked = self._push_checked
        if checked is None or not (self.lean and getattr(self.sink, "batch_creates", True)):  # _creates_whole()
            self.push_batch(np.frombuffer(data, dtype=np.uint8), np.frombuffer(ends, dtype=np.int64))
            return
        if kinds & 3:  # creates, execs or exits: the batch is kept for the table as it is
            with self._lock:
                self._pending.append((data, _WHOLE, ends))
                self._backlog_bytes += len(data)
                self._pending_pids = None  # not read out: a record pushed alone applies them first
            backlog, cap = self._backlog_bytes, self.backlog_max_bytes
            if backlog > cap:
                self._fold_backlog()
            elif self.defer_folds and backlog > cap - (cap >> 5):  # one fold from the cap: due at the next idle()
                self._fold_due = True
        checked(data, ends, kinds)

    def idle(self) -> None:
        """The source is about to sleep: fold the backlog now if a fold is due (see ``defer_folds``), so that it
        delays no batch that is already in."""
        if self._fold_due:
            self._fold_due = False
            self._fold_backlog()

    def seeded_lookup(self):
        """The processes seeded from /proc that are still alive, as a table by pid (one byte each, nonzero for
        seeded), or None when there are none: the bpf source's C walk stops before their records."""
        if not self._seeded:
            return None
        lookup = self._seeded_array
        if lookup is None:
            self._seeded_mask(np.zeros(1, dtype=np.int64))
            lookup = self._seeded_array
        return lookup

    def push_written(self, record: bytes) -> None:
        """One record of the kind ``push_batch`` takes: passed on as it is, unless its process (or a create's
        parent) was seeded from /proc, or the next stage wants creates one by one."""
        item = record[0]
        if item == 5:  # an image load: nothing for the table
            self._push(record)
            return
        process = item != 3 and item != 4
        pid = _U32.unpack_from(record, 16 if process else 20)[0]
        create = item == 1 or item == 101
        if pid in self._seeded or create and (not self._creates_whole()
                                              or _U32.unpack_from(record, 20)[0] in self._seeded):
            self.push(record)
            return
        if create or process and self._pending:
            with self._lock:
                self._pending.append((record, None, None))
                self._pending_count += 1
                if self._pending_pids is not None:
                    self._pending_pids.add(pid)
            if self._pending_count > _MAX_PENDING_RECORDS:
                self._apply_pending(compact=True)
        elif process and len(record) >= 52:
            self.table.note_exit(record[36:52])
        self._push(record)

    def _push_each(self, raw: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        """A batch with creates for a stage that adds their User and parent fields: the creates and execs through
        ``push``, thread records and exits passed on as they are (an exit marks its process exited), except those
        of processes seeded from /proc (``push``, for the table's guid)."""
        data = raw.tobytes()
        push, push_one, table, seeded = self._push, self._push_one, self.table, self._seeded
        unpack = _U32.unpack_from
        for a, b in zip(starts.tolist(), ends.tolist()):
            record = data[a:b]
            item = record[0]
            if item == 5:  # an image load: nothing for the table
                push(record)
            elif item == 3 or item == 4:
                if seeded and unpack(record, 20)[0] in seeded:
                    push_one(record)
                else:
                    push(record)
            elif item == 2 and b - a >= 52 and not (seeded and unpack(record, 16)[0] in seeded):
                entry = table.by_guid.get(record[36:52])
                if entry is not None and not entry.exited:
                    table.exit(entry)
                push(record)
            else:
                push_one(record)

    def _seeded_mask(self, pids: np.ndarray) -> np.ndarray | None:
        """Which of ``pids`` are processes seeded from /proc (None when none is)."""
        if not self._seeded:
            return None
        lookup = self._seeded_array
        if lookup is None:  # a table by pid (a few hundred KB at most): one indexing per batch, no search
            lookup = self._seeded_array = np.zeros(max(self._seeded) + 1, dtype=np.bool_)
            lookup[np.fromiter(self._seeded, dtype=np.int64, count=len(self._seeded))] = True
        mask = lookup[np.minimum(pids, len(lookup) - 1)] & (pids < len(lookup))
        return mask if mask.any() else None

    def _push_slowly(self, raw: np.ndarray, starts: np.ndarray, ends: np.ndarray, special) -> None:
        """Runs of ordinary records whole (``push_batch``), the others through ``push`` (each through
        ``push_written`` when the next stage takes records one by one)."""
        n = len(ends)
        batch = self._push_batch
        i = 0
        while i < n:
            if batch is None:
                self.push_written(raw[starts[i]:ends[i]].tobytes())
                i += 1
                continue
            if special is not None and special[i]:
                self.push(raw[starts[i]:ends[i]].tobytes())
                i += 1
                continue
            j = i + 1
            while j < n and not special[j]:
                j += 1
            run_ends = ends[i:j]
            types = raw[starts[i:j]]
            creates = (types == 1) | (types == 101)
            noted = creates | (types == 2)
            if noted.any():
                self._note(raw, starts[i:j][noted], run_ends[noted], bool(creates.any()))
            base = int(starts[i])
            batch(raw[base:int(ends[j - 1])], run_ends - base)
            i = j

    def _forget_seeded(self, pid: int) -> None:
        if pid in self._seeded:
            self._seeded.discard(pid)
            self._seeded_array = None

    def _note(self, raw: np.ndarray, starts: np.ndarray, ends: np.ndarray, creates: bool) -> None:
        """Keep the process records of a batch (creates, execs, exits) for the table, in order: exits alone as
        their guids in the table's own list (``ProcessTable.note_exits``) while no create waits, else the records
        themselves (``raw`` is the batch's own array, kept, not copied), applied by ``apply_exits``."""
        if not creates and not self._pending:
            self._note_exits(raw, starts, ends)
            return
        pids = _u32_at(raw, starts + 16).tolist()
        with self._lock:
            self._pending.append((raw, starts, ends))
            self._pending_count += len(starts)
            if self._pending_pids is not None:
                self._pending_pids.update(pids)
        if self._pending_count > _MAX_PENDING_RECORDS:
            self._apply_pending(compact=True)

    def _note_exits(self, raw: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> None:
        """Keep the ProcessGuids of exits the kernel wrote (after the 8-byte block header and the 4-byte
        field header), for ``apply_exits``."""
        ok = ends - starts >= 24 + 8 + 4 + 16
        at = starts[ok] + 36
        if len(at):
            self.table.note_exits(raw[at[:, None] + np.arange(16)])

    def _apply_pending(self, compact: bool = False) -> None:
        """Apply the noted creates, execs and exits to the table, in order (each create as ``push`` would have
        made it, the result not passed on). ``compact`` (too many wait): processes that were created and ended
        within what waits are dropped first, oldest first, as many as the table would have to evict for them
        anyway, so that a storm nobody reads the table during costs little per process; they are counted as
        evicted."""
        with self._lock:
            self._apply_pending_locked(compact)

    def _apply_pending_locked(self, compact: bool) -> None:
        pending, self._pending, self._pending_count, self._backlog_bytes = self._pending, [], 0, 0
        if not pending:
            return
        self._pending_pids = set()
        for entry in self.table.apply_exits():  # exits noted before the first create
            if entry.seeded:
                self._forget_seeded(entry.pid)
        records = []
        for raw, starts, ends in pending:
            if starts is None:  # one record passed alone
                records.append((raw, 0, len(raw)))
                continue
            if starts is _WHOLE:  # a batch kept whole (push_checked): its process records (a few, mostly)
                a = 0
                for (b,) in _END.iter_unpack(ends):
                    if raw[a] in _PROCESS_TYPES:
                        records.append((raw, a, b))
                    a = b
                continue
            records.extend((raw, a, b) for a, b in zip(starts.tolist(), ends.tolist()))
        drop = self._short_lived(records) if compact else set()
        self._apply_records(records[k] for k in range(len(records)) if k not in drop)

    def _fold_backlog(self) -> None:
        """Fold the backlog's oldest 1/32 into the table (etwmon.backlog): the processes that came and went
        there, with no living descendant, are dropped at once (counted as evicted), the rest applied in order.
        1/32 (128 KiB by default) holds the reading thread 1-2 ms here: a fold is short enough not to show in the
        p99 latency of a storm."""
        with self._lock:
            pending, part = self._pending, self._backlog_bytes // 32
            taken = split = 0
            while split < len(pending) and taken < part:
                raw, starts, _ = pending[split]
                if starts is _WHOLE:
                    taken += len(raw)
                split += 1
            old = pending[:split]
            del pending[:split]
            self._backlog_bytes -= taken
            self._pending_count -= sum(1 if s is None else len(s) for _, s, _ in old if s is not _WHOLE)
            for entry in self.table.apply_exits():  # exits noted before the first create
                if entry.seeded:
                    self._forget_seeded(entry.pid)
            records = backlog.concat(old)
            apply, exited, dropped = backlog.fold_plan(records, self.prefix)
            raw, starts, ends = records
            self._apply_records((raw, int(starts[k]), int(ends[k])) for k in apply)
            if len(exited):
                self.table.note_exits(exited)
            self.table.evicted += dropped
            self.folded += dropped

    def _apply_records(self, records) -> None:
        """Apply creates, execs and exits (``(buffer, start, end)`` each) to the table, in order."""
        table = self.table
        for raw, a, b in records:
            record = raw[a:b]
            if not isinstance(record, bytes):
                record = record.tobytes()
            if record[0] == 2:
                entry = table.by_guid.get(record[36:52]) if len(record) >= 52 else None
                if entry is not None and not entry.exited:
                    table.exit(entry)
                    if entry.seeded:
                        self._forget_seeded(entry.pid)
            else:
                self._feed(record, record[0] == 1)

    def _feed(self, record: bytes, fork: bool) -> None:
        """What ``_create`` does to the table for a create or exec the kernel wrote and that was passed on already
        (the table is fed after the fact): the entry, found or made, keeps the record and reads its details from
        it only when they are asked for. Anything unusual takes ``_create``."""
        pid, ppid = _PIDS.unpack_from(record, 16)
        chars = record[32] | record[33] << 8
        start = image = None
        at, end = 40 + 2 * chars + 8, len(record)  # past the command line, its NUL and padding, the block header
        if at + 60 <= end and _START_AT.unpack_from(record, at + 48)[:2] == (_START, 8):
            # where the bpf programs put it: after ProcessGuid, ParentProcessGuid and Uid (etwmon.bpf.c)
            start = _START_AT.unpack_from(record, at + 48)[2]
            if not fork:
                at = end
            else:
                at += 60
        while at + 4 <= end:
            tag, length = _TLV.unpack_from(record, at)  # the value's length
            if tag == _START and length == 8:
                start = _I64.unpack_from(record, at + 4)[0]
                if not fork:
                    break
            elif tag == _IMAGE:
                image = True
                break  # (text fields come after StartTime)
            at += 4 + length
        if start is None or fork and image is None:  # (a fork without an image takes its parent's)
            self._create(record, fork)
            return
        table = self.table
        entry = table.live.get(pid)
        same = _same_process(entry, start, fork)
        if same and entry._fields:  # type: ignore[union-attr]  # a process with details of its own (seeded): merged as _create does
            self._create(record, fork)
            return
        if not same:
            entry = _Entry(pid, make_guid(self.prefix, pid, start), start, ppid, table.live.get(ppid))
            table.add(entry)
        entry.keep_record(record)
        entry.command_line = record[34:34 + 2 * chars]
        entry.tail = None
        entry.from_proc = 0
        table.account(entry)
        if not entry.parent_tail:
            self.unknown_parent += 1

    def _short_lived(self, records: list) -> set[int]:
        """Indices of the creates and exits of processes that started and ended among ``records``, the oldest
        first, at most as many processes as the table would evict to hold every process created there."""
        creates_of: dict[bytes, list[int]] = {}  # guid -> its create and execs (one guid for all of them)
        ended: list[tuple[int, bytes]] = []
        for k, (raw, a, b) in enumerate(records):
            if raw[a] == 2:
                if b - a >= 52:
                    ended.append((k, bytes(raw[a + 36:a + 52])))
                continue
            at = a + 40 + 2 * (int(raw[a + 32]) | int(raw[a + 33]) << 8) + 12  # block header, Tag, Length
            if at + 16 <= b:
                creates_of.setdefault(bytes(raw[at:at + 16]), []).append(k)
        excess = len(self.table) + len(creates_of) - self.table.max_processes
        drop: set[int] = set()
        gone = 0
        for k, guid in ended:  # in order of the exits; a process's create came before its exit
            if gone >= excess:
                break
            ks = creates_of.get(guid)
            if ks is None:
                continue
            drop.add(k)
            drop.update(ks)
            gone += 1
        self.table.evicted += gone
        return drop

    def apply_exits(self) -> None:
        """Apply what passed in batches (creates, execs, exits) to the table, before it is read."""
        if self._pending:
            self._apply_pending()
            return
        for entry in self.table.apply_exits():
            if entry.seeded:
                self._forget_seeded(entry.pid)

    # -- seeding ----------------------------------------------------------------------------------------

    def seed(self, processes: Iterable[tuple[int, int, str, object]]) -> int:
        """Fill the table with the processes running now: (pid, ppid, command line, records.Details with at
        least start_filetime), parents before or after their children. Returns how many were taken."""
        rows = []
        for pid, ppid, command_line, details in processes:
            start = getattr(details, "start_filetime", None)
            if start is None:
                continue
            rows.append((pid, ppid, command_line, details, start))
        rows.sort(key=lambda r: r[4])  # parents started before their children
        n = 0
        table = self.table
        for pid, ppid, command_line, details, start in rows:
            old = table.live.get(pid)
            if old is not None and abs(old.start - start) <= _SAME_START:
                continue  # the source already told us about it
            entry = _Entry(pid, make_guid(self.prefix, pid, start), start, ppid, table.live.get(ppid))
            entry.seeded = True
            entry.from_proc = _PROCFS
            for tag, value in details.fields():
                if tag not in _STAGE_TAGS:
                    entry.fields[tag] = pack_field(tag, value)
            # /proc's command line can be longer than a record holds: cut it as the encoders cut theirs, or a
            # child's ParentCommandLine field would not fit its 16-bit length (and stop the source thread).
            entry.command_line = _utf16(command_line, MAX_COMMAND_LINE)
            table.add(entry)
            self._seeded.add(pid)
            self._seeded_array = None
            n += 1
        return n

    # -- the Sink side (the source's thread) ------------------------------------------------------------

    def push(self, record: bytes) -> None:
        if self.lean and self._pending:
            with self._lock:
                # the records noted before it, when it may need them in the table: when they name its process
                # (or a create's parent); a record of a seeded process or a child of one needs only the seed
                item = record[0] | record[1] << 8
                pids = self._pending_pids
                if (pids is None or item > 4 and item != 101 or (_U32.unpack_from(record, 20 if item in (3, 4) else 16)[0] in pids)
                        or item in (1, 101) and _U32.unpack_from(record, 20)[0] in pids):
                    self._apply_pending_locked(False)
                self._push_one(record)
        else:
            self._push_one(record)

    def _push_one(self, record: bytes) -> None:
        item = record[0]
        if record[1] or item > 4 or item == 0:
            if item == 101 and record[1] == 0:
                self._push(self._create(record, False))
                return
            self._push(record)  # ImageLoad, RecordsLost, unknown types pass unchanged
            return
        if item == 1:
            self._push(self._create(record, True))
        elif item == 2:
            self._push(self._exit(record))
        else:  # 3, 4: a thread of a process
            entry = self.table.live.get(_U32.unpack_from(record, 20)[0])
            if entry is None:
                self.no_guid += 1
                self._push(record)
            else:
                self._push(with_packed(record, 0, entry.thread_block))

    def _create(self, record: bytes, fork: bool) -> bytes:
        pid, ppid = _PIDS.unpack_from(record, 16)
        chars = record[32] | record[33] << 8
        own: dict[int, bytes] = {}
        start_given = None
        flags = 0
        if len(record) > 40 + 2 * chars:  # the source wrote details of its own
            flags, given = block_fields(record, packed=True)
            for tag, field_ in given:
                if tag == _START:
                    start_given = _I64.unpack_from(field_, 4)[0] if len(field_) == 12 else None
                elif tag not in _STAGE_TAGS:
                    own[tag] = field_
            if _USER not in own and _UID in own:  # the kernel wrote the record: the name of its uid, looked up once
                uid = _U32.unpack_from(own[_UID], 4)[0]
                user = self._users.get(uid, False)
                if user is False:
                    name = user_name(uid)
                    user = self._users[uid] = None if name is None else pack_field(
                        _USER, name.encode("utf-16-le", "surrogatepass"))
                if user is not None:
                    own[_USER] = user
        table = self.table
        entry = table.live.get(pid)
        sequence = getattr(record, "process_sequence_number", None)  # ETW's (etwmon.sources.etw.EtwRecord)
        if sequence is not None:
            return self._create_numbered(record, pid, ppid, chars, flags, own, start_given, sequence)
        start = start_given
        if fork and start is None:
            start = _I64.unpack_from(record, 8)[0]
        same = _same_process(entry, start, fork)
        if not same:
            if start is None:  # an exec of a process we never saw start, and the source cannot say when
                self.no_guid += 1
                return record
            parent = table.live.get(ppid)
            entry = _Entry(pid, make_guid(self.prefix, pid, start), start, ppid, parent)
            if fork and parent is not None and _IMAGE not in own:
                image = parent.fields.get(_IMAGE)
                if image is not None:
                    own[_IMAGE] = image  # a fork runs its parent's program
                    flags |= parent.from_proc
            table.add(entry)
        return self._describe(record, entry, chars, flags, own)

    def _create_numbered(self, record: bytes, pid: int, ppid: int, chars: int, flags: int, own: dict,
                         start_given: int | None, sequence: int) -> bytes:
        """A process the kernel numbered (ETW): its guid and its parent's come from the numbers."""
        table = self.table
        guid = guid_from_sequence(self.prefix, sequence)
        entry = table.get(guid)
        if entry is None:
            parent = table.live.get(ppid)
            parent_sequence = getattr(record, "parent_process_sequence_number", None)
            if parent_sequence is not None and (parent is None or parent.guid != guid_from_sequence(
                    self.prefix, parent_sequence)):
                parent = None  # the table's process with that pid is not the parent the kernel names
            start = _I64.unpack_from(record, 8)[0] if start_given is None else start_given
            entry = _Entry(pid, guid, start, ppid, parent)
            if parent is None and parent_sequence is not None:  # known by number, not in the table
                entry.parent_guid = guid_from_sequence(self.prefix, parent_sequence)
                entry.head.append(pack_field(_PGUID, entry.parent_guid))
            table.add(entry)
        return self._describe(record, entry, chars, flags, own)

    def _describe(self, record: bytes, entry: _Entry, chars: int, flags: int, own: dict) -> bytes:
        """The record with the block the table and the source's details make for ``entry``."""
        if own:
            entry.fields.update(own)
            entry.from_proc = flags & _PROCFS
        entry.command_line = record[34:34 + 2 * chars]
        entry.tail = None
        self.table.account(entry)
        if not entry.parent_tail:  # the parent's fields are unknown (its guid may be known, from ETW's numbers)
            flags |= _UNKNOWN_PARENT
            self.unknown_parent += 1
        if entry.seeded:
            flags |= _SEEDED
        f = entry.fields
        packed = list(entry.head)
        for tag in (5, 11):
            if tag in f:
                packed.append(f[tag])
        packed.append(entry.start_field)
        for tag in (17, 18, 19, 20, 21, 22, 23, 16, 3, 4, 6, 10, 12, 13):
            if tag in f:
                packed.append(f[tag])
        packed += entry.parent_tail
        return with_packed(record, flags, packed)

    def _exit(self, record: bytes) -> bytes:
        pid = _U32.unpack_from(record, 16)[0]
        entry = self.table.live.get(pid)
        sequence = getattr(record, "process_sequence_number", None)
        if sequence is not None:
            guid = guid_from_sequence(self.prefix, sequence)
            if entry is None or entry.guid != guid:
                entry = self.table.get(guid)
            if entry is None:  # a process that started before the monitor: the kernel's number still names it
                return with_packed(record, 0, [pack_field(_GUID, guid)])
        if entry is None:
            start = self._start_in(record)
            if start is None:
                self.no_guid += 1
                return record
            # A process that started before the monitor, and the source knows when (bpf): that names it.
            guid = make_guid(self.prefix, pid, start)
            lifetime = max(_I64.unpack_from(record, 8)[0] - start, 0) // 10
            return with_packed(record, 0, [pack_field(_GUID, guid), pack_field(_START, _I64.pack(start)),
                                           pack_field(_LIFETIME, _U64.pack(lifetime))])
        self.table.exit(entry)
        if entry.seeded:
            self._forget_seeded(pid)
        lifetime = max(_I64.unpack_from(record, 8)[0] - entry.start, 0) // 10
        packed = [entry.head[0], entry.start_field, pack_field(_LIFETIME, _U64.pack(lifetime))]
        image = entry.fields.get(_IMAGE)
        if image is not None:
            packed.append(image)
        return with_packed(record, _SEEDED if entry.seeded else 0, packed)

    @staticmethod
    def _start_in(record: bytes) -> int | None:
        """The StartTime a source put in a record's own block, if any."""
        if len(record) <= 24:
            return None
        for tag, field_ in block_fields(record, packed=True)[1]:
            if tag == _START and len(field_) == 12:
                return _I64.unpack_from(field_, 4)[0]
        return None

    # -- the reader's side --------------------------------------------------------------------------------

    def ancestors(self, guid: str) -> list[ProcessInfo]:
        """The parents of the process ``guid`` (text form), nearest first, up to the first the table does not
        know (pid 1's guid ends the chain on a system whose processes all started after the monitor's seed)."""
        self.apply_exits()
        return [e.info() for e in self.table.ancestors(guid_bytes(guid))]

    def process(self, guid: str) -> ProcessInfo | None:
        """What the table knows of the process ``guid``, or None."""
        self.apply_exits()
        entry = self.table.get(guid_bytes(guid))
        return entry.info() if entry is not None else None

    def stats(self) -> dict[str, int]:
        self.apply_exits()
        table = self.table
        return {"processes": len(table.live), "known": len(table), "bytes": table.bytes,
                "max_bytes": table.max_bytes, "evicted": table.evicted,
                "evicted_live": table.evicted_live, "unknown_parent": self.unknown_parent, "no_guid": self.no_guid,
                "folded": self.folded, "backlog_max_bytes": self.backlog_max_bytes if self.lean else 0}


IdentityStage._whole = _WHOLE  # what the C push_checked puts in a backlog entry (etwmon/_backlog.c)
IdentityStage.push_checked = (_native.stage_push_checked_method  # type: ignore[assignment]
                              or IdentityStage._push_checked_batch)
