"""What every kernel event source is to the Monitor: open, run on a thread pushing records, stop, close.

A source never touches the ring directly: it pushes encoded records (``etwmon.records`` encoders) into a
``Sink`` and reports what it missed with ``sink.push_lost``, so ring drops and source losses share one path.
"""

from __future__ import annotations

import socket
from typing import Any, ClassVar, Protocol

__all__ = ["Sink", "Source", "CAPABILITIES", "DETAIL_CAPABILITIES"]

#: The details (Event attributes of the extension block) a source can deliver; the identity stage adds
#: process_guid, parent_process_guid, start_time and the parent fields for every process it saw start (or
#: found in the source's process_snapshot).
DETAIL_CAPABILITIES = frozenset({
    "image", "current_directory", "uid", "user", "tty", "session", "cgroup", "container_id",
})

#: What a source can deliver (``Source.delivers``), pinned per source by tests/test_contracts.py. A detail name
#: means the source knows it exactly at the event; with "details_from_proc" too, it reads it from /proc after the
#: event instead (a race, flagged on each event as EventFlags.PROCFS). "process_snapshot": it can list the
#: processes running when it starts, so the identity stage knows the parents of what follows.
CAPABILITIES = frozenset({
    "process_create", "process_exit", "process_exec", "thread_create", "thread_exit", "image_load",
    "command_line", "exit_code", "exact_loss_count", "details_from_proc", "process_snapshot",
}) | DETAIL_CAPABILITIES


class Sink(Protocol):
    """Where a running source puts what it sees (the Monitor gives it one backed by its EventRing)."""

    def push(self, record: bytes) -> None:
        """One encoded record."""

    def push_lost(self, count: int) -> None:
        """``count`` events the source knows it missed (kernel buffer overruns, sequence gaps, ...)."""

    def notify(self) -> None:
        """A batch is done: wake readers. Call after each burst of pushes, not after every record."""


class Source:
    """Base class of a kernel event source. Subclasses set the class attributes and implement the methods.

    Life cycle, driven by the Monitor: ``open()`` in the caller's thread (so ``SourceUnavailable`` reaches
    the caller at once), ``run(sink)`` on the Monitor's thread until ``stop()`` is called from any thread,
    then ``close()``. ``run`` must return promptly (well under a second) after ``stop()``.
    """

    #: The name ``open_source`` knows it by.
    name: ClassVar[str] = ""
    #: True when it can miss events without being able to count them (polling).
    lossy: ClassVar[bool] = False
    #: Subset of CAPABILITIES.
    delivers: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this source cannot work on this machine (with the fix), or None if it should. Cheap: it does
        not open anything that needs cleaning up."""
        return None

    @classmethod
    def stale_state(cls) -> list[str]:
        """What an earlier instance of this source that was killed left behind in the kernel (rules, sessions,
        changed settings), one line each for a person; [] when nothing. Changes nothing; ``etwmon sources``
        shows it."""
        return []

    @classmethod
    def cleanup(cls) -> list[str]:
        """Remove what ``stale_state()`` reports and restore what was recorded; returns what was done, one line
        each. Never touches what a live instance owns. ``etwmon cleanup`` calls it."""
        return []

    #: Set by the Monitor before ``open()``: True when its identity stage is on, so the source reads the details
    #: it declares (image, cwd, user, ...) and puts them in its records; False spares that cost.
    details: bool = False

    def host_and_boot_id(self) -> bytes:
        """What names this host and this boot (host id, NUL, boot id), for ProcessGuids. The default knows
        only the host name, so guids of two boots of one host can only differ by their start times."""
        return socket.gethostname().encode() + b"\0"

    def process_snapshot(self) -> list[tuple[int, int, str, Any]]:
        """The processes running now, as (pid, ppid, command line, ``records.Details`` with start_filetime),
        read after ``open()`` so that nothing starts unseen in between; [] when the source cannot list them."""
        return []

    def __init__(self, **options: Any) -> None:
        if options:
            raise TypeError(f"source {self.name!r} takes no option {', '.join(sorted(options))}")

    def open(self) -> None:
        """Acquire kernel resources; raise ``SourceUnavailable`` with the reason and the fix if it can't."""

    def run(self, sink: Sink) -> None:
        """Deliver records into ``sink`` until ``stop()``; exceptions propagate to the Monitor."""
        raise NotImplementedError

    def stop(self) -> None:
        """Ask ``run`` to return; thread-safe and idempotent."""

    def close(self) -> None:
        """Release what ``open`` acquired; idempotent."""

    def stats(self) -> dict[str, int]:
        """Source-side counters, at least ``lost`` (events missed and counted) and ``parse_errors``."""
        return {"lost": 0, "parse_errors": 0}

    def __enter__(self) -> "Source":
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
