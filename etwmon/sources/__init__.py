"""The kernel event sources and the picker: one module per OS mechanism, ``open_source`` chooses.

``open_source("auto")`` takes the best source that works here and falls back to polling ``/proc`` with a
warning that says why. A source that cannot work raises ``SourceUnavailable`` with the reason and the fix.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from ..errors import SourceUnavailable
from .base import Sink, Source

__all__ = ["open_source", "source_class", "available_sources", "auto_order", "SourceInfo", "SOURCES", "Source",
           "Sink"]

#: name -> "module:Class". A new source is one module in this folder and one line here.
SOURCES: dict[str, str] = {
    "etw": "etwmon.sources.etw:EtwSource",
    "bpf": "etwmon.sources.bpf:BpfSource",
    "linux": "etwmon.sources.linux:LinuxSource",
    "audit": "etwmon.sources.audit:AuditSource",
    "netlink": "etwmon.sources.netlink:NetlinkSource",
    "procfs": "etwmon.sources.procfs:ProcfsSource",
}

#: What "auto" tries, best first, per platform; the last one is the fallback.
_AUTO = {"win32": ["etw"], "linux": ["bpf", "linux", "netlink", "procfs"]}


@dataclass(frozen=True)
class SourceInfo:
    name: str
    available: bool
    reason: str | None  # why not, with the fix, when not available
    lossy: bool
    delivers: frozenset[str]


def source_class(name: str) -> type[Source]:
    """The Source class registered as ``name``."""
    try:
        module, _, cls = SOURCES[name].partition(":")
    except KeyError:
        raise SourceUnavailable(f"unknown source {name!r}; choose one of auto, {', '.join(SOURCES)}") from None
    return getattr(importlib.import_module(module), cls)


def _reason(cls: type[Source]) -> str | None:
    try:
        return cls.unavailable_reason()
    except Exception as exc:  # a broken probe must not break the listing
        return f"{type(exc).__name__}: {exc}"


def available_sources() -> list[SourceInfo]:
    """Every known source, whether it works on this machine, and if not, why not."""
    infos = []
    for name in SOURCES:
        try:
            cls = source_class(name)
        except Exception as exc:  # a source that cannot even load must not break the listing
            infos.append(SourceInfo(name, False, f"cannot load: {type(exc).__name__}: {exc}", False, frozenset()))
            continue
        reason = _reason(cls)
        infos.append(SourceInfo(name, reason is None, reason, cls.lossy, cls.delivers))
    return infos


def auto_order() -> list[str]:
    """The sources "auto" tries on this platform, best first; it takes the first that opens."""
    return list(_AUTO.get(sys.platform, ["procfs"]))


def open_source(name: str = "auto", *, details: bool = False, **options: Any) -> Source:
    """Create and open a source. ``name`` is "auto" or one of ``SOURCES``; options go to the source;
    ``details``: have it read the details it declares for the identity stage (``Source.details``).

    "auto" picks ETW on Windows; on Linux the eBPF source (root, a kernel with BTF), else the audit+proc-connector
    source (root, audit usable), else the proc connector (root, or any user where the kernel lets one join), else
    ``/proc`` polling with a one-line ``RuntimeWarning`` saying what that loses and what to do (``fallback_message``).
    """
    if name != "auto":
        cls = source_class(name)
        reason = _reason(cls)
        if reason is not None:
            raise SourceUnavailable(f"source {name!r} is unavailable: {reason}")
        source = cls(**options)
        source.details = details
        source.open()
        return source
    why: list[str] = []
    candidates = auto_order()
    for i, candidate in enumerate(candidates):
        try:
            cls = source_class(candidate)
        except Exception as exc:
            why.append(f"{candidate}: cannot load ({type(exc).__name__}: {exc})")
            continue
        reason = _reason(cls)
        if reason is None:
            source = cls(**options) if i == 0 or not options else _with_known(cls, options)
            source.details = details
            try:
                source.open()
            except SourceUnavailable as exc:
                why.append(f"{candidate}: {exc}")
                continue
            if why and source.lossy:
                warnings.warn(fallback_message(candidate, why), RuntimeWarning, stacklevel=2)
            return source
        why.append(f"{candidate}: {reason}")
    raise SourceUnavailable("no event source works here: " + "; ".join(why))


#: What a polling fallback loses, and the one thing that gets it back.
_LOSSY = "it misses short-lived processes and exit codes"
_FIX = "for every event, run as root or use the etwmon service (etwmon service install)"


def fallback_message(name: str, why: list[str]) -> str:
    """One line for falling back to the lossy source ``name``: what is lost and what to do. When every better
    source said it needs root, that is the whole story (``etwmon sources`` lists each reason); otherwise the
    reasons are part of the line, since root alone would not help."""
    if why and all("root" in reason for reason in why):
        return f"only root can watch the kernel here, so the {name} source polls /proc: {_LOSSY}; {_FIX}"
    return f"falling back to the {name} source, which can miss events ({_LOSSY}): " + "; ".join(why)


def _with_known(cls: type[Source], options: dict[str, Any]) -> Source:
    """Options meant for the preferred source that a fallback does not take are dropped with a warning."""
    try:
        return cls(**options)
    except TypeError as exc:
        warnings.warn(f"etwmon: the {cls.name!r} source ignores the options given: {exc}", RuntimeWarning,
                      stacklevel=3)
        return cls()
