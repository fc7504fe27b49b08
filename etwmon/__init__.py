"""etwmon: watch processes and threads start and stop, SysMon-style.

A kernel event source feeds a bounded ring of SysMon-compatible binary records; clients drain it with
``readinto``, whole records at a time, and ``parse`` turns the bytes into Event objects.
"""

from .errors import (
    BufferTooSmall, Error, ProtocolError, RecordFormatError, RecordingFormatError, ServiceRefused,
    ServiceUnavailable, SourceError, SourceUnavailable,
)
from .records import (
    Event, ImageLoad, ItemType, ProcessCreate, ProcessExec, ProcessExit, RecordsLost, ThreadCreate, ThreadExit,
    UnknownRecord, parse, parse_array, parse_arrays,
)
from .ring import EventRing, RingStats

__version__ = "0.1.0"

__all__ = [
    "BufferTooSmall", "Error", "RecordFormatError", "SourceError", "SourceUnavailable", "ServiceUnavailable",
    "ServiceRefused", "ProtocolError", "RecordingFormatError",
    "Event", "ImageLoad", "ItemType", "ProcessCreate", "ProcessExec", "ProcessExit", "RecordsLost",
    "ThreadCreate", "ThreadExit", "UnknownRecord", "parse", "parse_array", "parse_arrays",
    "EventRing", "RingStats", "Monitor", "MonitorStats", "open_source", "connect", "Connection", "open_recording",
    "__version__",
]


def __getattr__(name: str):
    # Monitor and the sources load on first use, so `import etwmon` stays cheap and OS-neutral.
    if name in ("Monitor", "MonitorStats"):
        from . import monitor
        return getattr(monitor, name)
    if name in ("connect", "Connection"):
        from . import service
        return getattr(service, name)
    if name == "open_recording":
        from .recording import open_recording
        return open_recording
    if name == "open_source":
        from .sources import open_source
        return open_source
    raise AttributeError(f"module 'etwmon' has no attribute {name!r}")
