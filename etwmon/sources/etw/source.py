"""Windows source: process, thread and image-load events from ETW through pywintrace, as SysMon records.

``EtwSource``: the session's life cycle (where it can run, starting, reading, losses, stopping, sessions a killed
etwmon left behind). ``to_records`` (in ``events``) turns one pywintrace callback argument into records,
choosing by the event's provider; the tests drive it with recorded event shapes of pywintrace 0.2.0 (PyPI) and
0.3.0 (the repository). ``NtPathMapper`` (in ``paths``) maps NT device paths to drive letters. Sessions are
queried and stopped by etwmon's own checked ``ControlTraceW`` calls (``TraceControl``, in ``control``). This
package imports on any OS (``etw`` and ``advapi32`` are loaded only on use), but it has never run against a live
Windows session: see docs/windows.md for what is verified and how.
"""

# Where the shapes come from (pywintrace's etw/etw.py at tags v0.2.0 and v0.3.0; line numbers are 0.2.0's):
# - The callback gets one tuple ``(event_id, out)``: EventConsumer._processEvent calls
#   ``self.event_callback((event_id, out))`` (etw.py:839). event_id is EventHeader.EventDescriptor.Id (0.2.0,
#   etw.py:736); 0.3.0 passes EventDescriptor.Opcode instead when the session is named "NT Kernel Logger". So
#   etwmon reads the id and the opcode from the EventDescriptor, never from the tuple.
# - ``out['EventHeader']`` is a dict of the EVENT_HEADER fields (etw.py:744-764): ints for ThreadId, ProcessId,
#   TimeStamp (a LARGE_INTEGER, evntcons.py EVENT_HEADER), the EventDescriptor as a dict {Id, Version, Channel,
#   Level, Opcode, Task, Keyword}, ProviderId and ActivityId as str(GUID) = "{XXXXXXXX-...}" (GUID.py __str__).
# - TimeStamp is a FILETIME: the consumer opens the session with PROCESS_TRACE_MODE_REAL_TIME |
#   PROCESS_TRACE_MODE_EVENT_RECORD (etw.py:275) and without PROCESS_TRACE_MODE_RAW_TIMESTAMP, so ProcessTrace
#   converts time stamps to system time.
# - Payload fields are what TdhFormatProperty printed, by property name (etw.py:547-594). In 0.2.0 the
#   TDH_CONVERTER_LOOKUP step (etw.py:591) only converts when ``type(data)`` already *is* the converter, which a
#   str never is, so every value stays a str. 0.3.0 inverted that test: values whose out type is INT,
#   UNSIGNEDINT, LONG or UNSIGNEDLONG arrive as ints (int() of the printed decimal), hex and pointer out types stay
#   "0x..." strings. In both, a field TDH could not format is None (etw.py:577); a parse failure of the whole event
#   still calls back, with the header and whatever fields were read (etw.py:822-839).
# - Classic (MOF) kernel events arrive with EventDescriptor.Id 0 and the event type in EventDescriptor.Opcode,
#   ProviderId = the event class GUID.
# - NT Kernel Logger: EventProvider.start (etw.py:134-175) takes providers[0].guid as Wnode.Guid and
#   providers[0].any_bitmask as EnableFlags when the session name is "NT Kernel Logger"; ERROR_ALREADY_EXISTS on
#   StartTraceW marks the session as someone else's (etw.py:173, 200-205).
# - ETW(properties=...) uses the TraceProperties given (so etwmon sets FlushTimer itself); without it pywintrace
#   builds one from ring_buf_size.
# - The consumer thread is NOT a daemon in 0.2.0 (etw.py:302), so a session left running keeps the interpreter
#   from exiting; 0.3.0 made it one. EventConsumer._run loops on ProcessTrace and sets end_capture when it fails,
#   so a session that ends under it ends the thread without a word.
# - ETW.query() and ETW.control_stop() ignore ControlTraceW's status (a failed query reads as zeros), which is why
#   etwmon makes those calls itself (TraceControl); EventProvider.stop() checks it but raises before
#   consumer.stop() runs.
# - 0.2.0's etw/common.py:59 calls logging.basicConfig(level=logging.ERROR) at import; _import_pywintrace undoes it.

from __future__ import annotations

import atexit
import importlib.util
import itertools
import logging
import os
import re
import sys
import threading
import uuid
from typing import Any, Callable

from ...errors import Error, SourceError, SourceUnavailable
from ..base import Sink, Source
from .control import (
    ERROR_ACCESS_DENIED, ERROR_WMI_INSTANCE_NOT_FOUND, SessionControlError, SessionStatus,
    TraceControl, process_started,
)
from .events import KERNEL_PROCESS_GUID, EtwEventError, EtwRecord, _same_path, to_records
from .paths import NtPathMapper

__all__ = [
    "EtwSource", "EtwEventError", "EtwRecord", "NtPathMapper", "to_records", "MODES", "DEFAULT_MODE",
    "KERNEL_PROCESS_GUID", "KERNEL_LOGGER_NAME", "SESSION_PREFIX", "FLUSH_TIMER_SECONDS", "TraceControl",
    "SessionStatus", "SessionControlError",
]

log = logging.getLogger(__name__)

# --- what is enabled ----------------------------------------------------------------------------------------

#: Microsoft-Windows-Kernel-Process (manifest: keywords WINEVENT_KEYWORD_PROCESS 0x10, _THREAD 0x20, _IMAGE 0x40).
KEYWORD_PROCESS = 0x10
KEYWORD_THREAD = 0x20
KEYWORD_IMAGE = 0x40
TRACE_LEVEL_INFORMATION = 4  # etw/evntrace.py

#: The classic kernel logger (evntrace.h): its fixed session name and control GUID (the event class GUIDs its
#: events carry are in ``events``).
KERNEL_LOGGER_NAME = "NT Kernel Logger"
SYSTEM_TRACE_CONTROL_GUID = "{9E814AAD-3204-11D2-9A82-006008A86939}"
EVENT_TRACE_FLAG_PROCESS = 0x1  # etw/evntrace.py
EVENT_TRACE_FLAG_THREAD = 0x2
EVENT_TRACE_FLAG_IMAGE_LOAD = 0x4
EVENT_TRACE_SYSTEM_LOGGER_MODE = 0x02000000  # etw/evntrace.py; Windows 8+

# winerror.h codes pywintrace raises as OSError(winerror=...) (TraceControl's are in control)
ERROR_ALREADY_EXISTS = 183
ERROR_NO_SYSTEM_RESOURCES = 1450

#: Every session etwmon names itself is ``etwmon-<pid>-<process start, hex>-<n>``: the owner and its start time
#: tell a session left by a killed etwmon from one a running etwmon still reads.
SESSION_PREFIX = "etwmon-"
#: EVENT_TRACE_PROPERTIES.FlushTimer: ETW delivers a buffer that is not full after at most this many seconds, so
#: a quiet machine's process events are not held until a buffer fills.
FLUSH_TIMER_SECONDS = 1
#: The session's buffers (EVENT_TRACE_PROPERTIES BufferSize, MinimumBuffers, MaximumBuffers; docs/windows.md).
#: A burst of process starts (a fork tree, a build) fills small buffers faster than the consumer empties them:
#: measured on Kernel-Process, 32 KiB buffers lost 41.8 % of the starts and 256 KiB buffers, more of them, none.
#: ETW allocates MinimumBuffers at the start (non-paged memory), grows to MaximumBuffers under load and frees
#: the extra ones when it passes: 2 per CPU (ETW's own floor), at least 8, then 48 more for bursts.
DEFAULT_BUFFER_KB = 256
MIN_BUFFERS_PER_CPU = 2
MIN_BUFFERS_FLOOR = 8
BURST_BUFFERS = 48
MAX_BUFFERS = 4096


def _cpu_count() -> int:
    return os.cpu_count() or 1


def default_buffer_counts(cpus: int) -> tuple[int, int]:
    """(MinimumBuffers, MaximumBuffers) for a machine with ``cpus`` logical processors."""
    minimum = max(MIN_BUFFERS_FLOOR, MIN_BUFFERS_PER_CPU * cpus)
    return minimum, minimum + BURST_BUFFERS


def _buffer_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= MAX_BUFFERS:
        raise ValueError(f"{name} must be a whole number of buffers from 2 to {MAX_BUFFERS}, not {value!r}")
    return value
#: EVENT_TRACE_SYSTEM_LOGGER_MODE (private kernel sessions) came with Windows 8 = NT 6.2.
MIN_WINDOWS = (6, 2)

#: "kernel-logger": classic SystemTraceProvider events (command lines); "kernel-process": the
#: Microsoft-Windows-Kernel-Process manifest provider (no command lines).
MODES = ("kernel-logger", "kernel-process")
#: Command lines are what a security user looks at first, and since Windows 8 a kernel-logger session can be
#: private (its own name, not the single shared "NT Kernel Logger"), so the classic events are the default.
DEFAULT_MODE = "kernel-logger"


# --- where this can run -------------------------------------------------------------------------------------
# Seams: the tests replace these (tests/etw_builders.py FakeEtwWorld.seams) to play Windows on Linux.


def _platform() -> str:
    return sys.platform


def _pywintrace_installed() -> bool:
    return importlib.util.find_spec("etw") is not None


def _is_elevated() -> bool:
    try:
        import ctypes

        return bool(ctypes.windll.shell32.IsUserAnAdmin())  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):
        return False


_process_started = process_started  # pid -> start FILETIME, None when gone


def _trace_control() -> TraceControl:
    """The TraceControl the source uses (a seam: the tests give one over their stand-in)."""
    global _TRACE_CONTROL
    if _TRACE_CONTROL is None:
        _TRACE_CONTROL = TraceControl()
    return _TRACE_CONTROL


_TRACE_CONTROL: TraceControl | None = None


def _windows_version() -> tuple[int, int, int]:
    """(major, minor, build) of Windows itself, not the version shown to an unmanifested program (a seam)."""
    info = sys.getwindowsversion()  # type: ignore[attr-defined]
    return tuple(getattr(info, "platform_version", (info.major, info.minor, info.build)))[:3]  # type: ignore


_INSTALL = 'pip install -e ".[etw]" (from a clone of etwmon)'


def _import_pywintrace() -> tuple[Any, Any]:
    """(the ``etw`` package, its ``TraceProperties`` class), without pywintrace's logging side effect."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import etw
        from etw.etw import TraceProperties
    except ImportError as exc:
        raise SourceUnavailable(f"pywintrace cannot be imported ({exc}): {_INSTALL}") from exc
    finally:
        # etw/common.py:59 runs logging.basicConfig(level=logging.ERROR) at import: it would configure the
        # application's root logger for it (and make the application's own basicConfig a no-op). Undo it.
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    for name in ("ETW", "ProviderInfo", "GUID"):
        if not hasattr(etw, name):
            raise SourceUnavailable(f"the installed 'etw' module is not pywintrace (no etw.{name}): {_INSTALL}")
    return etw, TraceProperties


# --- sessions etwmon left behind ----------------------------------------------------------------------------

_SESSION_NAME = re.compile(re.escape(SESSION_PREFIX) + r"(\d+)-([0-9a-f]+)-(\d+)")
_LEFT_RUNNING: set[str] = set()  # sessions this process tried to stop and could not (under _LIVE_LOCK)
_own_start: int | None = None


def _own_start_time() -> int:
    """This process's start (FILETIME) for its session names; 0 when Windows will not say (then a session of this
    pid is never taken for another process's)."""
    global _own_start
    if _own_start is None:
        try:
            _own_start = _process_started(os.getpid()) or 0
        except Exception as exc:  # AttributeError off Windows, SessionControlError
            log.debug("cannot read this process's start time: %r", exc)
            _own_start = 0
    return _own_start


def _stale_sessions(control: TraceControl) -> list[tuple[str, str]]:
    """(name, why) of every etwmon session no running etwmon reads: its owner is gone, its pid now belongs to
    another process, or this process failed to stop it. Raises ``SessionControlError`` if listing fails."""
    with _LIVE_LOCK:
        live = {source.session_name for source in _LIVE}
        left_running = set(_LEFT_RUNNING)
    stale = []
    for name in control.sessions():
        match = _SESSION_NAME.fullmatch(name)
        if match is None or name in live:
            continue
        pid, started, _ = int(match[1]), int(match[2], 16), match[3]
        if name in left_running:
            stale.append((name, "stopping it failed earlier in this process"))
            continue
        if pid == os.getpid() and started == _own_start_time():
            continue  # this process's, being started or stopped right now
        try:
            now = _process_started(pid)
        except Exception as exc:  # cannot tell: leave it alone
            log.debug("cannot tell whether process %d still runs: %r", pid, exc)
            continue
        if now is None:
            stale.append((name, f"process {pid}, which started it, is gone"))
        elif started and now != started:
            stale.append((name, f"process {pid}, which started it, has exited and its pid was reused"))
    return stale


def _stop_stale(control: TraceControl) -> tuple[list[str], list[str]]:
    """Stop what ``_stale_sessions`` finds: (what was done, what failed), one line per session for a person."""
    done, failed = [], []
    for name, why in _stale_sessions(control):
        try:
            control.stop(name)
        except SessionControlError as exc:
            if exc.winerror != ERROR_WMI_INSTANCE_NOT_FOUND:
                failed.append(f"could not stop ETW session {name!r} ({why}): {exc}; try {_logman_stop(name)}")
                continue
            done.append(f"ETW session {name!r} ({why}) had stopped already")
        else:
            done.append(f"stopped ETW session {name!r} ({why})")
        with _LIVE_LOCK:
            _LEFT_RUNNING.discard(name)
    return done, failed


def _logman_stop(name: str) -> str:
    return f'logman stop "{name}" -ets' if " " in name else f"logman stop {name} -ets"


# --- sessions alive in this process, stopped at exit --------------------------------------------------------

_LIVE: set["EtwSource"] = set()
_LIVE_LOCK = threading.Lock()
_exit_hook_installed = False
_session_numbers = itertools.count(1)


def _stop_all_sessions() -> None:
    """Stop every session this process still has, so none is left running to fill the system's ~64 slots."""
    with _LIVE_LOCK:
        sources = list(_LIVE)
    for source in sources:
        try:
            source.close()
        except Exception as exc:  # at exit: report, keep going
            log.error("could not stop ETW session %r at exit: %r", source.session_name, exc)


def _install_exit_hook() -> None:
    global _exit_hook_installed
    with _LIVE_LOCK:
        if _exit_hook_installed:
            return
        _exit_hook_installed = True
    # pywintrace 0.2.0's consumer thread is not a daemon (etw.py:302) and the interpreter joins such threads *before*
    # atexit handlers run, so an atexit handler alone would never get to stop the session and exit would hang.
    # threading's own exit hook runs before that join (it is how concurrent.futures shuts down its workers).
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        try:
            register(_stop_all_sessions)
        except RuntimeError:  # the interpreter is already shutting down
            pass
    atexit.register(_stop_all_sessions)


def _new_session_name() -> str:
    return f"{SESSION_PREFIX}{os.getpid()}-{_own_start_time():x}-{next(_session_numbers)}"


# --- the source ---------------------------------------------------------------------------------------------

_PENDING_LIMIT = 100_000  # records held between open() and run(); beyond this they are counted as lost


class EtwSource(Source):
    """ETW process, thread and image-load events (Windows, administrator, ``pip install -e ".[etw]"`` from a clone).

    ``mode="kernel-logger"`` (default): a private SystemTraceProvider session (Windows 8+) named
    ``etwmon-<pid>-<process start>-<n>`` with the process, thread and image-load flags; ProcessCreate records
    carry the real command line. ``session_name="NT Kernel Logger"`` uses the single system-wide kernel logger instead.
    ``mode="kernel-process"``: the Microsoft-Windows-Kernel-Process provider; it has no command line, so a
    ProcessCreate's command line is the program's path.

    ``images=False`` leaves image loads out. ``rundown=True`` (kernel-logger) also records the processes,
    threads and images already running when the session starts, as creations with creating process/thread 0.
    ``buffer_kb`` is the size of each ETW buffer (non-paged memory; default 256), ``min_buffers`` how many ETW
    allocates at the start and ``max_buffers`` how many it may grow to in a burst (defaults: 2 per CPU, at least
    8; that plus 48): at most ``max_buffers * buffer_kb`` KiB, said in ``stats()``. ``map_path`` turns NT
    device paths into drive-letter paths (default: ``NtPathMapper()`` on Windows, unchanged elsewhere).

    Every ``loss_poll_seconds`` the session is queried for what ETW lost; a session that no longer answers, or
    whose reader thread ended, ends ``run`` with ``SourceError`` naming the session. Records pushed are
    ``EtwRecord`` (bytes with the Kernel-Process sequence numbers). ``open`` first stops etwmon sessions that a
    killed etwmon left running (``stale_state``/``cleanup`` do the same on request).
    """

    name = "etw"
    lossy = False
    # session: both providers' SessionID; the image path only Kernel-Process has (the kernel logger's
    # ImageFileName is a bare file name), so it is not declared.
    delivers = frozenset({"process_create", "process_exit", "thread_create", "thread_exit", "image_load",
                          "command_line", "exit_code", "session"})

    def __init__(self, mode: str = DEFAULT_MODE, *, images: bool = True, rundown: bool = False,
                 session_name: str | None = None, buffer_kb: int = DEFAULT_BUFFER_KB,
                 min_buffers: int | None = None, max_buffers: int | None = None,
                 map_path: Callable[[str], str] | None = None, loss_poll_seconds: float = 1.0) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown ETW mode {mode!r}; choose one of {', '.join(MODES)}")
        if rundown and mode != "kernel-logger":
            raise ValueError("rundown=True needs mode='kernel-logger' (Kernel-Process has no start-of-session "
                             "snapshot)")
        if session_name is not None and session_name.lower() == KERNEL_LOGGER_NAME.lower() \
                and mode != "kernel-logger":
            raise ValueError(f"session name {KERNEL_LOGGER_NAME!r} is the classic kernel logger: "
                             "use it with mode='kernel-logger'")
        if isinstance(buffer_kb, bool) or not isinstance(buffer_kb, int) or not 4 <= buffer_kb <= 16384:
            raise ValueError(f"buffer_kb must be a whole number of KiB from 4 to 16384, not {buffer_kb!r}")
        if min_buffers is not None:
            _buffer_count("min_buffers", min_buffers)
        if max_buffers is not None:
            _buffer_count("max_buffers", max_buffers)
        if min_buffers is not None and max_buffers is not None and max_buffers < min_buffers:
            raise ValueError(f"max_buffers ({max_buffers}) must not be less than min_buffers ({min_buffers})")
        if not loss_poll_seconds > 0:
            raise ValueError(f"loss_poll_seconds must be > 0, not {loss_poll_seconds!r}")
        self.mode = mode
        self.images = bool(images)
        self.rundown = bool(rundown)
        self.buffer_kb = buffer_kb
        self._min_buffers, self._max_buffers = min_buffers, max_buffers
        self._requested_name = session_name
        self.session_name: str | None = None
        if mode == "kernel-process":  # the program's path stands in for the command line
            self.delivers = EtwSource.delivers - {"command_line"}
        if not self.images:
            self.delivers = self.delivers - {"image_load"}
        if map_path is None:
            map_path = NtPathMapper() if _platform() == "win32" else _same_path
        self._map_path = map_path
        self._loss_poll_seconds = loss_poll_seconds
        self._session: Any = None
        self._session_guid: str | None = None  # Wnode.Guid of the session, when etwmon chose it
        self._control: TraceControl | None = None
        self._session_lock = threading.Lock()
        self._lock = threading.Lock()  # the sink (and everything pushed into it)
        self._sink: Sink | None = None
        self._pending: list[bytes] = []
        self._pending_overflow = 0  # this session's records beyond _PENDING_LIMIT, not yet reported
        self._session_lost = (0, 0)  # this session's (EventsLost, RealTimeBuffersLost) already counted
        # Whether this session's loss counters have been read since it started or since a query failed: until
        # then what it lost is unknown, never "0". Sessions that ended unknown keep the total a lower bound.
        self._loss_known = False
        self._loss_unknown_ended = False
        self._query_warned = False
        self._stop = threading.Event()
        self._counts = dict.fromkeys(
            ("events", "records", "ignored", "parse_errors", "events_lost", "buffers_lost", "pending_lost",
             "refused", "query_failures", "left_running"), 0)

    # -- availability -------------------------------------------------------------------------------------

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if _platform() != "win32":
            return (f"needs Windows (ETW); on Linux use source='netlink' or 'procfs'. On Windows: {_INSTALL} "
                    "and run from an elevated (administrator) prompt")
        version = _windows_version()
        if tuple(version[:2]) < MIN_WINDOWS:
            return (f"needs Windows 8 or later (its private kernel session, EVENT_TRACE_SYSTEM_LOGGER_MODE, came "
                    f"with Windows 8); this is Windows {'.'.join(map(str, version))}")
        if not _pywintrace_installed():
            return f"pywintrace (the ETW binding) is not installed: {_INSTALL}"
        if not _is_elevated():
            return "ETW kernel sessions need an administrator: run from an elevated (administrator) prompt"
        return None

    @classmethod
    def stale_state(cls) -> list[str]:
        """etwmon ETW sessions still running that no running etwmon reads (their process is gone, its pid
        reused, or stopping them failed), one line each; [] off Windows."""
        if _platform() != "win32":
            return []
        try:
            stale = _stale_sessions(_trace_control())
        except SessionControlError as exc:
            return [f"cannot list the ETW sessions to look for leftovers: {exc}"]
        return [f"ETW session {name!r} is still running: {why}" for name, why in stale]

    @classmethod
    def cleanup(cls) -> list[str]:
        """Stop what ``stale_state`` reports; never a session a running etwmon reads. [] off Windows. Raises
        ``etwmon.Error`` when the sessions cannot be listed or one of them would not stop (after stopping the
        others; the message says what was done too)."""
        if _platform() != "win32":
            return []
        try:
            done, failed = _stop_stale(_trace_control())
        except SessionControlError as exc:
            raise Error(f"cannot list the ETW sessions to look for leftovers: {exc}") from exc
        if failed:
            raise Error("; ".join(failed + done))
        return done

    # -- life cycle ---------------------------------------------------------------------------------------

    def open(self) -> None:
        """Start the ETW session (events that arrive before ``run`` are held, up to a limit)."""
        reason = self.unavailable_reason()
        if reason is not None:
            raise SourceUnavailable(f"source 'etw' is unavailable: {reason}")
        with self._session_lock:
            if self._session is not None:
                return
        etw, trace_properties = _import_pywintrace()
        self._control = _trace_control()
        self._stop_leftovers()
        self._stop.clear()
        with self._lock:
            self._pending, self._pending_overflow = [], 0
        self._session_lost = (0, 0)  # ETW's counters start again with each session
        self._loss_known, self._query_warned = False, False
        name = self._requested_name or _new_session_name()
        session = self._make_session(etw, trace_properties, name)
        self.session_name = name
        _install_exit_hook()
        with _LIVE_LOCK:
            _LIVE.add(self)
        with self._session_lock:
            self._session = session
        try:
            session.start()
        except Exception as exc:
            self._abandon(session, exc)
            raise self._start_error(exc) from exc
        log.info("ETW session %r started (%s)", name, self.mode)

    def _stop_leftovers(self) -> None:
        # A killed etwmon's sessions hold slots (8 kernel-logger ones, two reserved, on the whole machine) until
        # reboot: free them before taking one, as the audit source removes its stale rules.
        try:
            done, failed = _stop_stale(self._control)
        except SessionControlError as exc:
            log.warning("cannot look for ETW sessions a killed etwmon left running: %s", exc)
            return
        for line in done:
            log.warning("%s", line)
        for line in failed:
            log.error("%s", line)

    def _make_session(self, etw: Any, trace_properties: Any, name: str) -> Any:
        common = dict(event_callback=self._on_event, ignore_exists_error=False)
        # etwmon's own TraceProperties for every session: buffer size, and FlushTimer so that a buffer with a
        # few process events in it is delivered within a second instead of when it fills.
        minimum, maximum = self.buffer_counts()
        properties = trace_properties(ring_buf_size=self.buffer_kb, min_buffers=minimum, max_buffers=maximum)
        props = properties.get().contents
        props.FlushTimer = FLUSH_TIMER_SECONDS
        props.BufferSize, props.MinimumBuffers, props.MaximumBuffers = self.buffer_kb, minimum, maximum
        self._session_guid = None
        if self.mode == "kernel-process":
            keywords = KEYWORD_PROCESS | KEYWORD_THREAD | (KEYWORD_IMAGE if self.images else 0)
            provider = etw.ProviderInfo("Microsoft-Windows-Kernel-Process", etw.GUID(KERNEL_PROCESS_GUID),
                                        level=TRACE_LEVEL_INFORMATION, any_keywords=keywords)
            return etw.ETW(session_name=name, properties=properties, providers=[provider], **common)
        flags = EVENT_TRACE_FLAG_PROCESS | EVENT_TRACE_FLAG_THREAD | (
            EVENT_TRACE_FLAG_IMAGE_LOAD if self.images else 0)
        if name.lower() == KERNEL_LOGGER_NAME.lower():
            # pywintrace's kernel path: providers[0].guid -> Wnode.Guid, any_bitmask -> EnableFlags.
            self._session_guid = SYSTEM_TRACE_CONTROL_GUID
            provider = etw.ProviderInfo(KERNEL_LOGGER_NAME, etw.GUID(SYSTEM_TRACE_CONTROL_GUID), any_keywords=flags)
            return etw.ETW(session_name=KERNEL_LOGGER_NAME, properties=properties, providers=[provider], **common)
        # A private SystemTraceProvider session ("Configuring and Starting a SystemTraceProvider Session",
        # Windows 8+): LogFileMode with EVENT_TRACE_SYSTEM_LOGGER_MODE, the flags in EnableFlags, a fresh GUID
        # (never SystemTraceControlGuid), no provider to enable.
        self._session_guid = "{%s}" % uuid.uuid4()
        props.LogFileMode |= EVENT_TRACE_SYSTEM_LOGGER_MODE
        props.EnableFlags = flags
        props.Wnode.Guid = etw.GUID(self._session_guid)
        return etw.ETW(session_name=name, properties=properties, providers=[], **common)

    def _is_shared_logger(self) -> bool:
        return (self.session_name or "").lower() == KERNEL_LOGGER_NAME.lower()

    def _start_error(self, exc: BaseException) -> SourceUnavailable:
        code = getattr(exc, "winerror", None)
        name = self.session_name
        if code == ERROR_ALREADY_EXISTS and self._is_shared_logger():
            fix = ("the NT Kernel Logger is already running (another tool has it, and there is only one); leave "
                   "session_name unset for a private session, or stop it: logman stop \"NT Kernel Logger\" -ets")
        elif code == ERROR_ALREADY_EXISTS:
            fix = f"an ETW session named {name!r} already exists: logman stop {name} -ets"
        elif code == ERROR_ACCESS_DENIED:
            fix = "access denied: run from an elevated (administrator) prompt"
        elif code == ERROR_NO_SYSTEM_RESOURCES:
            fix = ("no free ETW session (about 64 system-wide, 8 kernel-logger ones): look for leftovers with "
                   "`logman query -ets` and stop them with `logman stop <name> -ets`"
                   + (", or try mode='kernel-process'" if self.mode == "kernel-logger" else ""))
        else:
            fix = "see docs/windows.md"
        return SourceUnavailable(f"cannot start ETW session {name!r} ({exc!r}): {fix}")

    def run(self, sink: Sink) -> None:
        with self._session_lock:
            if self._session is None:
                raise SourceError("EtwSource.run() before open()")
        with self._lock:
            self._sink = sink
            pending, self._pending = self._pending, []
            overflow, self._pending_overflow = self._pending_overflow, 0
            for record in pending:
                sink.push(record)
            if overflow:
                sink.push_lost(overflow)
            if pending or overflow:
                sink.notify()
        try:
            while not self._stop.wait(self._loss_poll_seconds):
                self._check_session()
        finally:
            self._teardown()
            with self._lock:
                self._sink = None

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self._teardown()

    # -- events (pywintrace's consumer thread) ------------------------------------------------------------

    def _on_event(self, event: Any) -> None:
        # Never raise: pywintrace would only log it (etw.py:841). Every event ends up counted somewhere.
        if self._stop.is_set():
            return  # stopping: what the session still flushes is after the caller asked to stop
        counts = self._counts
        counts["events"] += 1
        try:
            records = to_records(event, map_path=self._map_path, rundown=self.rundown, details=self.details)
        except Exception as exc:  # EtwEventError, or a bug here: either way the event is counted, not fatal
            counts["parse_errors"] += 1
            n = counts["parse_errors"]
            if n <= 10 or n & (n - 1) == 0:
                log.warning("ETW event not understood (%d so far): %r", n, exc)
            return
        if not records:
            counts["ignored"] += 1
            return
        with self._lock:
            sink = self._sink
            if sink is None:  # between open() and run()
                room = _PENDING_LIMIT - len(self._pending)
                self._pending.extend(records[:max(room, 0)])
                overflow = max(len(records) - max(room, 0), 0)
                self._pending_overflow += overflow
                counts["pending_lost"] += overflow
                counts["records"] += min(len(records), max(room, 0))
                return
            pushed = 0
            try:
                for record in records:
                    sink.push(record)
                    pushed += 1
            except Exception as exc:  # e.g. a ring whose max_bytes is smaller than an ImageLoad record
                refused = len(records) - pushed
                counts["refused"] += refused
                log.error("the ring refused %d record(s): %r", refused, exc)
                sink.push_lost(refused)
            counts["records"] += pushed
            sink.notify()

    # -- the session's health and losses ------------------------------------------------------------------

    def _check_session(self) -> None:
        """Read what ETW lost since last time, and end ``run`` with ``SourceError`` if the session is gone: it no
        longer answers a query, or pywintrace's reader thread ended (it stops without a word when ProcessTrace
        returns, e.g. after ``logman stop``)."""
        session, name = self._session, self.session_name
        if session is None or self._control is None:
            return
        thread = getattr(getattr(session, "consumer", None), "process_thread", None)
        reader_ended = thread is not None and not thread.is_alive()
        try:
            status = self._control.query(name, self._session_guid)
        except SessionControlError as exc:
            if exc.winerror == ERROR_WMI_INSTANCE_NOT_FOUND:
                if self._stop.is_set():
                    return
                self._loss_known = False  # what it lost since the last query went with it
                raise SourceError(f"ETW session {name!r} is no longer running: something stopped it from outside "
                                  f"etwmon (`logman stop`, another tool) or Windows ended it; what it lost since "
                                  f"it last answered is unknown") from exc
            self._query_failed(exc)
        else:
            self._account(status)
        if reader_ended and not self._stop.is_set():
            raise SourceError(f"ETW session {name!r} delivers no more events: pywintrace's reader thread ended "
                              "(ProcessTrace returned)")

    def _query_failed(self, exc: SessionControlError) -> None:
        self._counts["query_failures"] += 1
        self._loss_known = False
        if not self._query_warned:  # once per session: the loss count is unknown until a query works again
            self._query_warned = True
            log.warning("cannot read ETW session %r's loss counters (%s): the loss count is unknown until a "
                        "query works again", self.session_name, exc)

    def _account(self, status: SessionStatus) -> None:
        """Push what ETW says it lost since last time: EventsLost (events it could not buffer) exactly, and
        RealTimeBuffersLost (whole buffers dropped because the consumer fell behind) as one per buffer, a lower
        bound, since a buffer's event count is gone with it. A session's counters only grow, so a query that
        works after failed ones catches up on what happened meanwhile."""
        if not self._loss_known and self._query_warned:
            log.info("ETW session %r answers again: its loss count is complete again", self.session_name)
        self._loss_known = True
        seen_events, seen_buffers = self._session_lost
        new_events = max(status.events_lost - seen_events, 0)
        new_buffers = max(status.buffers_lost - seen_buffers, 0)
        if not (new_events or new_buffers):
            return
        self._session_lost = (seen_events + new_events, seen_buffers + new_buffers)
        counts = self._counts
        counts["events_lost"] += new_events
        counts["buffers_lost"] += new_buffers
        log.warning("ETW session %r lost %d events and %d buffers", self.session_name, new_events, new_buffers)
        with self._lock:
            if self._sink is not None:
                self._sink.push_lost(new_events + new_buffers)
                self._sink.notify()

    def buffer_counts(self) -> tuple[int, int]:
        """(MinimumBuffers, MaximumBuffers) this source's sessions get: as given, else ``default_buffer_counts``
        for this machine (a given minimum above the default maximum raises the maximum with it)."""
        minimum, maximum = default_buffer_counts(_cpu_count())
        if self._min_buffers is not None:
            minimum = self._min_buffers
            maximum = max(maximum, minimum)
        if self._max_buffers is not None:
            maximum = self._max_buffers
            minimum = min(minimum, maximum)
        return minimum, maximum

    def stats(self) -> dict[str, int]:
        """``events`` seen, ``records`` made, ``ignored`` (events that make no record), ``parse_errors``,
        ``lost`` = ``events_lost`` + ``buffers_lost`` (ETW's; a lower bound when buffers were lost) +
        ``pending_lost`` (held between open and run past the limit) + ``refused`` (records the sink refused).

        ``loss_unknown`` is 1 when ``lost`` may be short of the truth because ETW's counters could not be read:
        the running session has not answered a query yet or its last query failed, or an earlier session ended
        that way. ``query_failures`` counts failed queries, ``left_running`` sessions that could not be stopped.
        """
        counts = dict(self._counts)
        counts["lost"] = (counts["events_lost"] + counts["buffers_lost"] + counts["pending_lost"]
                          + counts["refused"])
        minimum, maximum = self.buffer_counts()
        counts.update(buffer_kb=self.buffer_kb, min_buffers=minimum, max_buffers=maximum,
                      buffer_memory_max=maximum * self.buffer_kb * 1024)
        running_unknown = self._session is not None and not self._loss_known
        counts["loss_unknown"] = int(self._loss_unknown_ended or running_unknown)
        return counts

    # -- teardown -----------------------------------------------------------------------------------------

    def _teardown(self) -> None:
        """Stop the session if this source still has one; idempotent, any thread but pywintrace's own.

        The session is stopped by name with etwmon's checked ControlTraceW (its final counters are the last
        word on losses), then pywintrace's reader. pywintrace's own ETW.stop() is not used: when its first
        step fails it raises before stopping the reader, and its fallback ignores the status."""
        with self._session_lock:
            session, self._session = self._session, None
        if session is None:
            return
        with _LIVE_LOCK:
            _LIVE.discard(self)
        self._stop_session()
        self._stop_reader(session)
        if not self._loss_known:
            self._loss_unknown_ended = True

    def _stop_session(self) -> None:
        name = self.session_name or ""
        if self._control is None:
            return
        try:
            final = self._control.stop(name, self._session_guid)
        except SessionControlError as exc:
            if exc.winerror == ERROR_WMI_INSTANCE_NOT_FOUND:
                log.info("ETW session %r had stopped already", name)
            else:
                self._left_running(name, exc)
            return
        if final is not None:
            self._account(final)
        log.info("ETW session %r stopped", name)

    def _left_running(self, name: str, exc: SessionControlError) -> None:
        self._counts["left_running"] += 1
        with _LIVE_LOCK:
            _LEFT_RUNNING.add(name)
        log.error("ETW session %r is still running: stopping it failed (%s). It holds one of the machine's few "
                  "session slots: stop it with `etwmon cleanup` or `%s`", name, exc, _logman_stop(name))

    def _stop_reader(self, session: Any) -> None:
        consumer = getattr(session, "consumer", None)
        if consumer is None or getattr(consumer, "process_thread", None) is None:
            return
        try:
            consumer.stop()  # CloseTrace makes ProcessTrace return; then the thread is joined
        except Exception as exc:
            log.error("the reader of ETW session %r did not stop: %r", self.session_name, exc)

    def _abandon(self, session: Any, exc: BaseException) -> None:
        """A start that failed half-way: stop whatever part of the session did start."""
        with self._session_lock:
            self._session = None
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if getattr(exc, "winerror", None) == ERROR_ALREADY_EXISTS:
            return  # the session that exists is not ours: leave it alone
        provider = getattr(session, "provider", None)
        if getattr(getattr(provider, "session_handle", None), "value", None):  # StartTraceW worked
            self._stop_session()
        self._stop_reader(session)
