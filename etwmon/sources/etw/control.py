"""ETW sessions controlled by name through advapi32 (ControlTraceW, QueryAllTracesW), every status checked, and
whether a process still runs (OpenProcess, GetProcessTimes): what the ETW source needs beyond pywintrace.

pywintrace's ETW.query() and ETW.control_stop() drop ControlTraceW's return value, so a failed query reads as
"nothing lost" and a failed stop goes unseen. The structures follow evntrace.h / wmistr.h for x64 with fixed-width
fields, so their layout (and the tests of it) are the same on every OS; the DLLs are loaded on first use, so this
module imports anywhere.
"""

from __future__ import annotations

import ctypes
import uuid
from dataclasses import dataclass
from typing import Any

from ...errors import Error

__all__ = ["TraceControl", "SessionStatus", "SessionControlError", "process_started", "ERROR_ACCESS_DENIED",
           "ERROR_INVALID_PARAMETER", "ERROR_MORE_DATA", "ERROR_WMI_INSTANCE_NOT_FOUND"]

# winerror.h
ERROR_ACCESS_DENIED = 5
ERROR_INVALID_PARAMETER = 87
ERROR_MORE_DATA = 234
ERROR_WMI_INSTANCE_NOT_FOUND = 4201  # ControlTrace: "the given session is not running"


class _WNODE_HEADER(ctypes.Structure):
    _fields_ = [("BufferSize", ctypes.c_uint32), ("ProviderId", ctypes.c_uint32),
                ("HistoricalContext", ctypes.c_uint64), ("TimeStamp", ctypes.c_int64),
                ("Guid", ctypes.c_ubyte * 16), ("ClientContext", ctypes.c_uint32), ("Flags", ctypes.c_uint32)]


class _EVENT_TRACE_PROPERTIES(ctypes.Structure):
    _fields_ = [("Wnode", _WNODE_HEADER), ("BufferSize", ctypes.c_uint32), ("MinimumBuffers", ctypes.c_uint32),
                ("MaximumBuffers", ctypes.c_uint32), ("MaximumFileSize", ctypes.c_uint32),
                ("LogFileMode", ctypes.c_uint32), ("FlushTimer", ctypes.c_uint32), ("EnableFlags", ctypes.c_uint32),
                ("AgeLimit", ctypes.c_int32), ("NumberOfBuffers", ctypes.c_uint32), ("FreeBuffers", ctypes.c_uint32),
                ("EventsLost", ctypes.c_uint32), ("BuffersWritten", ctypes.c_uint32),
                ("LogBuffersLost", ctypes.c_uint32), ("RealTimeBuffersLost", ctypes.c_uint32),
                ("LoggerThreadId", ctypes.c_void_p), ("LogFileNameOffset", ctypes.c_uint32),
                ("LoggerNameOffset", ctypes.c_uint32)]


_EVENT_TRACE_CONTROL_QUERY = 0
_EVENT_TRACE_CONTROL_STOP = 1
_MAX_NAME_BYTES = 1024 * 2  # ETW's longest session and log file names, 1024 WCHARs each (ControlTrace docs)
_PROPERTIES_SIZE = ctypes.sizeof(_EVENT_TRACE_PROPERTIES)
_BUFFER_SIZE = _PROPERTIES_SIZE + 2 * _MAX_NAME_BYTES
_QUERY_ALL_COUNT = 64  # "must be less than or equal to 64" before Windows 10; more is asked for on ERROR_MORE_DATA


class SessionControlError(Error):
    """A ControlTraceW or QueryAllTracesW call failed; ``winerror`` is its status (winerror.h)."""

    def __init__(self, what: str, winerror: int) -> None:
        self.winerror = winerror
        super().__init__(f"{what} failed with Windows error {winerror}{_ERROR_NAMES.get(winerror, '')}")


_ERROR_NAMES = {ERROR_ACCESS_DENIED: " (access denied)", ERROR_INVALID_PARAMETER: " (invalid parameter)",
                ERROR_MORE_DATA: " (more data)", ERROR_WMI_INSTANCE_NOT_FOUND: " (no such session running)"}


@dataclass(frozen=True)
class SessionStatus:
    """What ControlTraceW says of a session (its EVENT_TRACE_PROPERTIES, the parts etwmon reads)."""

    name: str
    events_lost: int  # EventsLost
    buffers_lost: int  # RealTimeBuffersLost
    flush_timer: int = 0
    log_file_mode: int = 0
    buffer_kb: int = 0


def _properties_buffer(guid: str | None = None) -> tuple[Any, _EVENT_TRACE_PROPERTIES]:
    """A zeroed EVENT_TRACE_PROPERTIES with room for both names after it, set up as ControlTrace asks for a
    query or stop: Wnode.BufferSize, Wnode.Guid, LoggerNameOffset and LogFileNameOffset."""
    buffer = (ctypes.c_ubyte * _BUFFER_SIZE)()
    props = _EVENT_TRACE_PROPERTIES.from_buffer(buffer)
    props.Wnode.BufferSize = _BUFFER_SIZE
    if guid:
        props.Wnode.Guid[:] = uuid.UUID(guid).bytes_le
    props.LoggerNameOffset = _PROPERTIES_SIZE
    props.LogFileNameOffset = _PROPERTIES_SIZE + _MAX_NAME_BYTES
    return buffer, props


def _name_at(buffer: Any, offset: int) -> str:
    """The NUL-terminated UTF-16 string ETW wrote at ``offset`` of a properties buffer ("" if none)."""
    if not _PROPERTIES_SIZE <= offset < len(buffer):
        return ""
    raw = bytes(buffer[offset:offset + _MAX_NAME_BYTES])
    return raw.decode("utf-16-le", "replace").split("\0", 1)[0]


def _status_of(name: str, props: _EVENT_TRACE_PROPERTIES) -> SessionStatus:
    return SessionStatus(name, props.EventsLost, props.RealTimeBuffersLost, props.FlushTimer, props.LogFileMode,
                         props.BufferSize)


def _load_advapi32() -> Any:
    """advapi32 with the prototypes etwmon calls (Windows only: ctypes has no WinDLL elsewhere)."""
    advapi32 = ctypes.WinDLL("advapi32")  # type: ignore[attr-defined]
    pointer = ctypes.POINTER(_EVENT_TRACE_PROPERTIES)
    advapi32.ControlTraceW.argtypes = [ctypes.c_uint64, ctypes.c_wchar_p, pointer, ctypes.c_uint32]
    advapi32.ControlTraceW.restype = ctypes.c_uint32
    advapi32.QueryAllTracesW.argtypes = [ctypes.POINTER(pointer), ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
    advapi32.QueryAllTracesW.restype = ctypes.c_uint32
    return advapi32


class TraceControl:
    """Query, stop and list ETW sessions by name with ControlTraceW / QueryAllTracesW, checking every status.

    ``advapi32`` is anything with those two functions (tests pass a stand-in); by default the real one is loaded
    on first use, so creating a TraceControl works on any OS.
    """

    def __init__(self, advapi32: Any = None) -> None:
        self._advapi32 = advapi32

    def _api(self) -> Any:
        if self._advapi32 is None:
            self._advapi32 = _load_advapi32()
        return self._advapi32

    def _control(self, name: str, guid: str | None, code: int) -> tuple[int, SessionStatus]:
        buffer, props = _properties_buffer(guid)
        status = self._api().ControlTraceW(0, name, ctypes.pointer(props), code)
        return status, _status_of(name, props)

    def query(self, name: str, guid: str | None = None) -> SessionStatus:
        """The session's counters now; raises ``SessionControlError`` (ERROR_WMI_INSTANCE_NOT_FOUND: it is not
        running) rather than returning zeros."""
        status, result = self._control(name, guid, _EVENT_TRACE_CONTROL_QUERY)
        if status != 0:
            raise SessionControlError(f"ControlTraceW(QUERY, {name!r})", status)
        return result

    def stop(self, name: str, guid: str | None = None) -> SessionStatus | None:
        """Stop the session; returns its final counters, or None when it stopped but they did not fit
        (ERROR_MORE_DATA: "ETW will have already stopped the session"). Raises ``SessionControlError`` when it
        did not stop (ERROR_WMI_INSTANCE_NOT_FOUND: it was not running)."""
        status, result = self._control(name, guid, _EVENT_TRACE_CONTROL_STOP)
        if status == ERROR_MORE_DATA:
            return None
        if status != 0:
            raise SessionControlError(f"ControlTraceW(STOP, {name!r})", status)
        return result

    def sessions(self) -> list[str]:
        """The names of the sessions running on this machine that this user may query (QueryAllTracesW)."""
        count = _QUERY_ALL_COUNT
        while True:
            buffers = [_properties_buffer() for _ in range(count)]
            array = (ctypes.POINTER(_EVENT_TRACE_PROPERTIES) * count)(*(ctypes.pointer(p) for _, p in buffers))
            found = ctypes.c_uint32(0)
            status = self._api().QueryAllTracesW(array, count, ctypes.pointer(found))
            if status == ERROR_MORE_DATA and found.value > count:  # Windows 10 allows more than 64 sessions
                count = found.value
                continue
            if status not in (0, ERROR_MORE_DATA):
                raise SessionControlError("QueryAllTracesW", status)
            return [_name_at(buffer, props.LoggerNameOffset) for buffer, props in buffers[:min(found.value, count)]]


_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_STILL_ACTIVE = 259


def process_started(pid: int) -> int | None:
    """When process ``pid`` started (FILETIME), or None when no such process runs; raises
    ``SessionControlError`` when Windows will not say."""
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    kernel32.OpenProcess.argtypes = [ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32]
    kernel32.OpenProcess.restype = ctypes.c_void_p
    kernel32.GetExitCodeProcess.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]
    kernel32.GetProcessTimes.argtypes = [ctypes.c_void_p] + [ctypes.POINTER(ctypes.c_uint64)] * 4
    kernel32.CloseHandle.argtypes = [ctypes.c_void_p]
    handle = kernel32.OpenProcess(_PROCESS_QUERY_LIMITED_INFORMATION, 0, pid)
    if not handle:
        code = ctypes.get_last_error()  # type: ignore[attr-defined]
        if code == ERROR_INVALID_PARAMETER:  # what OpenProcess says of a pid no process has
            return None
        raise SessionControlError(f"OpenProcess({pid})", code)
    try:
        exit_code = ctypes.c_uint32()
        if kernel32.GetExitCodeProcess(handle, ctypes.byref(exit_code)) and exit_code.value != _STILL_ACTIVE:
            return None  # exited; only a handle someone still holds keeps it listed
        times = [ctypes.c_uint64() for _ in range(4)]
        if not kernel32.GetProcessTimes(handle, *(ctypes.byref(t) for t in times)):
            raise SessionControlError(f"GetProcessTimes({pid})", ctypes.get_last_error())  # type: ignore[attr-defined]
        return times[0].value
    finally:
        kernel32.CloseHandle(handle)
