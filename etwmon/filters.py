"""Which events a reader keeps: ``EventFilter`` (types, pids and their descendants, command-line matches) and
``parse_event_types`` for the ``--type`` names. Used by ``etwmon tail``; the service and the fleet consumer filter
the same way."""

from __future__ import annotations

import fnmatch
import re
from typing import Iterable, Sequence

from .records import Event, ItemType, ProcessCreate

__all__ = ["EventFilter", "parse_event_types", "EVENT_TYPE_NAMES", "DEFAULT_EVENT_TYPES"]

_PROCESS = frozenset({ItemType.ProcessCreate, ItemType.ProcessExec, ItemType.ProcessExit})
_THREAD = frozenset({ItemType.ThreadCreate, ItemType.ThreadExit})
#: --type names (compared without case, "_" or "-") and the record types they select.
EVENT_TYPE_NAMES: dict[str, frozenset[ItemType]] = {
    **{t.name.lower(): frozenset({t}) for t in (_PROCESS | _THREAD | {ItemType.ImageLoad})},
    "create": frozenset({ItemType.ProcessCreate}),
    "exec": frozenset({ItemType.ProcessExec}),
    "exit": frozenset({ItemType.ProcessExit}),
    "process": _PROCESS,
    "thread": _THREAD,
    "image": frozenset({ItemType.ImageLoad}),
    "all": _PROCESS | _THREAD | {ItemType.ImageLoad},
}
#: What ``etwmon tail`` shows without --type: process events (create, exec, exit), as Sysmon, execsnoop and
#: forkstat do; threads flood a busy host's screen. (The library's Monitor delivers everything.)
DEFAULT_EVENT_TYPES = _PROCESS


def parse_event_types(spec: str) -> frozenset[ItemType]:
    """``"process_create,exec"`` → the record types; ``ValueError`` naming the choices on an unknown name."""
    selected: set[ItemType] = set()
    for word in spec.split(","):
        key = word.strip().lower().replace("_", "").replace("-", "")
        if not key:
            continue
        if key not in EVENT_TYPE_NAMES:
            raise ValueError(f"unknown event type {word.strip()!r}; choose from "
                             + ", ".join(_type_choices()))
        selected |= EVENT_TYPE_NAMES[key]
    if not selected:
        raise ValueError("no event type given; choose from " + ", ".join(_type_choices()))
    return frozenset(selected)


def _type_choices() -> list[str]:
    snake = [re.sub(r"(?<!^)(?=[A-Z])", "_", t.name).lower()
             for t in sorted(_PROCESS | _THREAD | {ItemType.ImageLoad})]
    return snake + ["create", "exec", "exit", "process", "thread", "image", "all"]


class EventFilter:
    """Which events ``etwmon tail`` prints. A RecordsLost report always passes: loss is never hidden.

    - ``types``: record types to show (None: all).
    - ``pids``: only events of these processes (ProcessCreate of the pid itself, its exec, exit, threads,
      image loads); with ``descendants``, processes they create join the set, followed live through the
      ProcessCreate parent links. A process leaves the set when it exits (pids get reused).
    - ``substrings`` / ``globs``: only processes whose command line contains a substring or matches an
      ``fnmatch`` glob (case-sensitive, whole command line). A ProcessCreate/ProcessExec is tested itself;
      the later events of a matching process (exit, threads, image loads) pass too, until an exec to a
      command line that does not match.

    Filters combine with AND; repeated values of one filter with OR. The tracking sees every event, so
    ``--type exit --match nginx`` shows the exits of processes started as nginx.
    """

    def __init__(self, types: Iterable[ItemType] | None = None, pids: Iterable[int] | None = None,
                 descendants: bool = False, substrings: Sequence[str] = (), globs: Sequence[str] = ()) -> None:
        self.types = frozenset(types) if types is not None else None
        self.followed: set[int] | None = set(pids) if pids is not None else None
        self.descendants = descendants
        self._substrings = list(substrings)
        self._globs = [re.compile(fnmatch.translate(g), re.DOTALL) for g in globs]
        self.matched: set[int] | None = set() if (self._substrings or self._globs) else None

    def _command_line_matches(self, command_line: str) -> bool:
        return (any(s in command_line for s in self._substrings)
                or any(g.match(command_line) for g in self._globs))

    def __call__(self, event: Event) -> bool:
        kind = event.type
        if kind == ItemType.RecordsLost:
            return True
        pid = getattr(event, "pid", None)
        keep = True
        followed = self.followed
        if followed is not None:
            if self.descendants and kind == ItemType.ProcessCreate and event.parent_pid in followed:
                followed.add(pid)
            keep = pid in followed
            if kind == ItemType.ProcessExit and keep and pid is not None:
                followed.discard(pid)
        matched = self.matched
        if matched is not None:
            if isinstance(event, ProcessCreate):
                if self._command_line_matches(event.command_line):
                    matched.add(event.pid)
                else:
                    matched.discard(event.pid)
                    keep = False
            else:
                hit = pid in matched
                if kind == ItemType.ProcessExit and hit:
                    matched.discard(pid)
                keep = keep and hit
        if self.types is not None and kind not in self.types:
            return False
        return keep