"""The ``etw`` source (Windows, administrator): process, thread and image-load events from ETW through pywintrace.

One idea per module: ``source`` (``EtwSource``: the session's life cycle, where it can run, losses, sessions a
killed etwmon left behind), ``events`` (``to_records``: one pywintrace event into records, both providers and both
pywintrace shapes), ``paths`` (``NtPathMapper``: NT device paths into drive letters) and ``control`` (etwmon's own
checked ``ControlTraceW`` calls: query, stop, list sessions). Imports on any OS; see docs/windows.md.
"""

from .control import SessionControlError, SessionStatus, TraceControl
from .events import (  # noqa: F401 (the provider GUIDs stay reachable here, as before the split)
    IMAGE_LOAD_GUID, KERNEL_PROCESS_GUID, PROCESS_GUID, THREAD_GUID, EtwEventError, EtwRecord, to_records,
)
from .paths import NtPathMapper
from .source import (  # noqa: F401 (the session constants stay reachable here, as before the split)
    DEFAULT_MODE, EVENT_TRACE_FLAG_IMAGE_LOAD, EVENT_TRACE_FLAG_PROCESS, EVENT_TRACE_FLAG_THREAD,
    EVENT_TRACE_SYSTEM_LOGGER_MODE, FLUSH_TIMER_SECONDS, KERNEL_LOGGER_NAME, KEYWORD_IMAGE, KEYWORD_PROCESS,
    KEYWORD_THREAD, MIN_WINDOWS, MODES, SESSION_PREFIX, SYSTEM_TRACE_CONTROL_GUID, TRACE_LEVEL_INFORMATION, EtwSource,
)

__all__ = [
    "EtwSource", "EtwEventError", "EtwRecord", "NtPathMapper", "to_records", "MODES", "DEFAULT_MODE",
    "KERNEL_PROCESS_GUID", "KERNEL_LOGGER_NAME", "SESSION_PREFIX", "FLUSH_TIMER_SECONDS", "TraceControl",
    "SessionStatus", "SessionControlError",
]
