"""Which records belong to a command's process tree: membership is decided at fork, by ProcessGuid ancestry.

The root is the process the recorder started (its ProcessCreate: that pid, forked by the recorder). A process
joins when its ProcessCreate names a member as its parent (``parent_process_guid``), so a child that daemonizes
and is re-parented to init stays in, and a pid reused by an unrelated process later does not get in (its guid
differs). Every later record of a member (exec, threads, exit) carries its guid. RecordsLost always passes:
a loss may have touched the tree, and is never hidden.

Records without a guid (``--no-identity``, or a source that did not know one) are followed by pid while the
process lives: a create whose parent pid is a live member joins, an exit leaves.
"""

from __future__ import annotations

from ..records import Event, ItemType, ProcessCreate, parse, record_headers

__all__ = ["ProcessTreeFilter"]

_CREATE, _EXEC, _EXIT, _LOST = (ItemType.ProcessCreate, ItemType.ProcessExec, ItemType.ProcessExit,
                                ItemType.RecordsLost)


class ProcessTreeFilter:
    """``ProcessTreeFilter(root_pid, creator_pid)``: ``keep(event)`` says whether an event is the tree's;
    ``select(buffer)`` gives a batch's records of the tree, whole, as one bytes object."""

    def __init__(self, root_pid: int, creator_pid: int) -> None:
        self.root_pid = root_pid
        self.creator_pid = creator_pid
        self.guids: set[str] = set()  # every member, for good: membership is decided once, at fork
        self.live_pids: dict[int, str | None] = {}  # member pid -> its guid, while it lives
        self.rooted = False
        self.processes = 0  # members seen
        self.exited = 0  # members whose exit was seen

    def keep(self, event: Event) -> bool:
        kind = event.type
        if kind == _LOST:
            return True
        guid = getattr(event, "process_guid", None)
        if kind == _CREATE:
            assert isinstance(event, ProcessCreate)
            parent = event.parent_process_guid
            if not self.rooted and event.pid == self.root_pid and event.parent_pid == self.creator_pid:
                member = True
                self.rooted = True
            elif parent is not None and guid is not None:
                member = parent in self.guids
            else:
                member = event.parent_pid in self.live_pids
            if member:
                if guid is not None:
                    self.guids.add(guid)
                self.live_pids[event.pid] = guid
                self.processes += 1
            return member
        pid = getattr(event, "pid", None)
        if guid is not None:
            member = guid in self.guids
        else:
            member = pid in self.live_pids
        if member and kind == _EXIT:
            self.live_pids.pop(pid, None)
            self.exited += 1
        return member

    def select(self, buffer) -> tuple[bytes, int]:
        """(the records of ``buffer`` that belong to the tree, how many), in order."""
        view = memoryview(buffer).cast("B")
        index = record_headers(view)
        parts = []
        for (offset, _, size, _), event in zip(index.tolist(), parse(view)):
            if self.keep(event):
                parts.append(view[offset:offset + size])
        return b"".join(parts), len(parts)

    @property
    def running(self) -> int:
        """Members whose exit was not seen (a daemon the command left behind, or one still finishing)."""
        return len(self.live_pids)

    def __repr__(self) -> str:
        return f"<ProcessTreeFilter root={self.root_pid} members={self.processes} running={self.running}>"

