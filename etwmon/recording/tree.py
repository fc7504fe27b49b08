"""Which records belong to a command's process tree: membership is decided at fork, by ProcessGuid ancestry.

The root is the process the recorder started (its ProcessCreate: that pid, forked by the recorder). A process
joins when its ProcessCreate names a member as its parent (``parent_process_guid``), so a child that daemonizes
and is re-parented to init stays in, and a pid reused by an unrelated process later does not get in (its guid
differs). Every later record of a member (exec, threads, exit, image loads) carries its guid: an image load,
read from a ring of its own, may come after its process's exit and is still kept. RecordsLost always passes:
a loss may have touched the tree, and is never hidden.

Records without a guid (``--no-identity``, or a source that did not know one) are followed by pid while the
process lives: a create whose parent pid is a live member joins, an exit leaves.
"""

from __future__ import annotations

import struct

from ..errors import RecordFormatError
from ..records import HEADER_SIZE, IMAGE_LOAD_DTYPE, Event, ExtensionTag, ItemType, block_fields, guid_bytes

__all__ = ["ProcessTreeFilter"]

_CREATE, _EXEC, _EXIT, _LOST = (int(ItemType.ProcessCreate), int(ItemType.ProcessExec), int(ItemType.ProcessExit),
                                int(ItemType.RecordsLost))
_CREATES = frozenset({_CREATE, _EXEC})
_IMAGE_LOAD, _IMAGE_BASE = int(ItemType.ImageLoad), IMAGE_LOAD_DTYPE.itemsize
_GUID_TAG, _PARENT_TAG = int(ExtensionTag.ProcessGuid), int(ExtensionTag.ParentProcessGuid)
_HEAD = struct.Struct("<hH")
_U32 = struct.Struct("<I")
#: Where each process or thread record keeps its ProcessId (the wire format, records.py).
_PIDS_AT = {_CREATE: 16, _EXEC: 16, _EXIT: 16, int(ItemType.ThreadCreate): 20, int(ItemType.ThreadExit): 20}
#: Sizes without an extension block (a longer record has one); creates are always looked at.
_BASE = {_EXIT: 24, int(ItemType.ThreadCreate): 24, int(ItemType.ThreadExit): 32}


class ProcessTreeFilter:
    """``ProcessTreeFilter(root_pid, creator_pid)``: ``select(buffer)`` gives a batch's records of the tree, whole,
    as one bytes object; ``keep(event)`` decides one parsed event the same way.

    ``select`` reads only what it needs of each record (Type, the pids, the guid fields of the extension block),
    without making Event objects: it runs on every record the whole system produces while a command is recorded.
    """

    def __init__(self, root_pid: int, creator_pid: int) -> None:
        self.root_pid = root_pid
        self.creator_pid = creator_pid
        self.guids: set[bytes] = set()  # every member, for good: membership is decided once, at fork
        self.live_pids: dict[int, bytes | None] = {}  # member pid -> its guid, while it lives
        self.rooted = False
        self.processes = 0  # members seen
        self.exited = 0  # members whose exit was seen
        self.lost = 0  # the counts of the RecordsLost records passed

    def _decide(self, kind: int, pid: int, parent_pid: int, guid: bytes | None, parent: bytes | None) -> bool:
        if kind == _LOST:
            return True
        if kind == _CREATE:
            if not self.rooted and pid == self.root_pid and parent_pid == self.creator_pid:
                member = self.rooted = True
            elif parent is not None and guid is not None:
                member = parent in self.guids
            else:
                member = parent_pid in self.live_pids
            if member:
                if guid is not None:
                    self.guids.add(guid)
                self.live_pids[pid] = guid
                self.processes += 1
            return member
        member = guid in self.guids if guid is not None else pid in self.live_pids
        if member and kind == _EXIT:
            self.live_pids.pop(pid, None)
            self.exited += 1
        return member

    def keep(self, event: Event) -> bool:
        if event.type == _LOST:
            self.lost += event.count  # type: ignore[attr-defined]
        guid = getattr(event, "process_guid", None)
        parent = getattr(event, "parent_process_guid", None)
        return self._decide(int(event.type), getattr(event, "pid", 0), getattr(event, "parent_pid", 0),
                            None if guid is None else guid_bytes(guid), None if parent is None else guid_bytes(parent))

    def select(self, buffer) -> tuple[bytes, int]:
        """(the records of ``buffer`` that belong to the tree, how many), in order."""
        view = memoryview(buffer).cast("B")
        end = len(view)
        parts = []
        pos = 0
        decide = self._decide
        while pos < end:
            if end - pos < HEADER_SIZE:
                raise RecordFormatError("truncated header", pos)
            kind, size = _HEAD.unpack_from(view, pos)
            if size < HEADER_SIZE or pos + size > end:
                raise RecordFormatError(f"record Size {size} does not fit the buffer", pos)
            record = view[pos:pos + size]
            pos += size
            if kind == _LOST:
                parts.append(record)
                self.lost += _U32.unpack_from(record, 16)[0] if size >= 20 else 0
                continue
            pids = _PIDS_AT.get(kind)
            if pids is None:  # ImageLoad (by its ProcessGuid, else by pid) and unknown types (by pid)
                guid = None
                if kind == _IMAGE_LOAD and size > _IMAGE_BASE:
                    guid = next((value for tag, value in block_fields(record)[1] if tag == _GUID_TAG), None)
                if guid is not None:  # image loads come from a ring of their own: maybe after the exit
                    if guid in self.guids:
                        parts.append(record)
                    continue
                pid = _U32.unpack_from(record, 16)[0] if size >= 20 else 0
                if pid in self.live_pids:
                    parts.append(record)
                continue
            guid = parent = None
            if size > _BASE.get(kind, size) or kind in _CREATES:
                _, fields = block_fields(record)
                for tag, value in fields:
                    if tag == _GUID_TAG:
                        guid = value
                    elif tag == _PARENT_TAG:
                        parent = value
            pid = _U32.unpack_from(record, pids)[0]
            parent_pid = _U32.unpack_from(record, 20)[0] if kind in _CREATES else 0
            if decide(_CREATE if kind == _CREATE else kind, pid, parent_pid, guid, parent):
                parts.append(record)
        return b"".join(parts), len(parts)

    @property
    def running(self) -> int:
        """Members whose exit was not seen (a daemon the command left behind, or one still finishing)."""
        return len(self.live_pids)

    def __repr__(self) -> str:
        return f"<ProcessTreeFilter root={self.root_pid} members={self.processes} running={self.running}>"
