"""Builders of the ``(event_id, dict)`` pairs pywintrace 0.2.0 calls back with (``pywintrace_030`` turns one into
0.3.0's shape), a fake pywintrace, and a stand-in for the machine's ETW (sessions that can die, fail to stop or to
answer a query, orphans left by killed processes) to run the ETW source on Linux: ETW can never run here, so
these shapes are the whole test of the Windows path.

Shapes, from pywintrace 0.2.0's etw/etw.py: the dict holds 'EventHeader' (EVENT_HEADER as a dict, etw.py:744-764),
every payload field by name as the string TdhFormatProperty printed (etw.py:547-594; never converted to int, see
etw.py:591), 'Description' and 'Task Name' (the upper-cased task or provider name, etw.py:772-817). Field lists:
the Microsoft-Windows-Kernel-Process manifest (per event version) and the classic MOF classes Process_TypeGroup1
(Process_V4), Thread_TypeGroup1 (Thread_V3) and Image_Load (Image_V3).

How TDH prints each kind of value (the parts etwmon reads are marked *):
  decimal    * UInt32 with xs:unsignedInt / win:PID / win:TID out types, and MOF uint32 without Format
  hex32      * MOF Format("x") (classic ProcessId, ParentId, TThreadId) and win:HexInt32: "0x" + upper-case hex
  pointer    * win:Pointer / MOF Pointer (ImageBase, ImageSize): "0x" + hex. Case and zero-padding are not
               verified against a live TdhFormatProperty; the tests also feed lower-case and 16-digit padded forms.
  sint32     * MOF sint32 (classic ExitStatus): signed decimal, so 0xC0000005 prints as -1073741819
  filetime     win:FILETIME (CreateTime...): an ISO date with U+200E marks in it; etwmon never parses it
"""

from __future__ import annotations

import copy
import ctypes
import itertools
import logging
import queue
import re
import threading
import types
from datetime import datetime, timezone
from typing import Any, Callable

from etwmon.records import datetime_to_filetime
from etwmon.sources.etw import control as C

__all__ = [
    "KERNEL_PROCESS", "PROCESS", "THREAD", "IMAGE_LOAD", "DISK_IO", "T0",
    "dec", "hex32", "pointer", "sint32", "filetime_text",
    "header", "pywintrace_event", "without", "replaced",
    "kp_process_start", "kp_process_stop", "kp_thread_start", "kp_thread_stop", "kp_image_load", "kp_event",
    "kl_process", "kl_thread", "kl_image", "classic_event", "pywintrace_030",
    "FakeEtwWorld", "FakeWinError", "FakeTraceControl", "FakeAdvapi32", "OrphanSession",
]

# Provider / event-class GUIDs as pywintrace prints them: str(GUID) -> StringFromCLSID -> "{UPPER-CASE}".
KERNEL_PROCESS = "{22FB2CD6-0E7B-422B-A0C7-2FAD1FD0E716}"
PROCESS = "{3D6FA8D0-FE05-11D0-9DDA-00C04FD7BA7C}"
THREAD = "{3D6FA8D1-FE05-11D0-9DDA-00C04FD7BA7C}"
IMAGE_LOAD = "{2CB15D1D-5FC1-11D2-ABE1-00A0C911F518}"
DISK_IO = "{3D6FA8D4-FE05-11D0-9DDA-00C04FD7BA7C}"  # a classic class etwmon does not read

#: A FILETIME with a non-zero 100 ns digit: 2024-05-17 09:30:15.1234567 UTC.
T0 = datetime_to_filetime(datetime(2024, 5, 17, 9, 30, 15, 123456, tzinfo=timezone.utc)) + 7

_NULL_GUID = "{00000000-0000-0000-0000-000000000000}"


# --- how TDH prints values ----------------------------------------------------------------------------------

def dec(n: int) -> str:
    return str(n)


def hex32(n: int) -> str:
    return f"0x{n:X}"


def pointer(n: int) -> str:
    return f"0x{n:X}"


def sint32(n: int) -> str:
    n &= 0xFFFFFFFF
    return str(n - (1 << 32) if n >= 1 << 31 else n)


def filetime_text(ft: int) -> str:
    """What TdhFormatProperty makes of a win:FILETIME: an ISO date with left-to-right marks between the parts."""
    when = datetime(1601, 1, 1, tzinfo=timezone.utc).timestamp() + ft / 1e7
    iso = datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    lrm = "\u200e"
    return lrm + iso[:4] + lrm + "-" + lrm + iso[5:7] + lrm + "-" + lrm + iso[8:] + "00Z"


# --- the dict pywintrace builds -----------------------------------------------------------------------------

def header(*, provider: str, event_id: int = 0, version: int = 0, opcode: int = 0, task: int = 0, level: int = 4,
           channel: int = 0, keyword: int = 0, pid: int = 4, tid: int = 8, timestamp: int = T0,
           flags: int = 0x0040) -> dict[str, Any]:
    """EventHeader exactly as etw.py:744-763 fills it (ints from the ctypes EVENT_HEADER, GUIDs as strings)."""
    return {
        "Size": 0, "HeaderType": 0, "Flags": flags, "EventProperty": 0,
        "ThreadId": tid, "ProcessId": pid, "TimeStamp": timestamp, "ProviderId": provider,
        "EventDescriptor": {"Id": event_id, "Version": version, "Channel": channel, "Level": level,
                            "Opcode": opcode, "Task": task, "Keyword": keyword},
        "KernelTime": 0, "UserTime": 0, "ActivityId": _NULL_GUID,
    }


def pywintrace_event(event_header: dict[str, Any], fields: dict[str, Any], task_name: str,
                     description: str = "") -> tuple[int, dict[str, Any]]:
    """The callback argument: ``out`` starts as {EventHeader, 'Task Name': provider GUID} (etw.py:744-764), then
    gets the parsed fields, 'Description' and the real 'Task Name' (etw.py:815-835)."""
    out: dict[str, Any] = {"EventHeader": event_header, "Task Name": event_header["ProviderId"]}
    out.update(fields)
    out["Description"] = description
    out["Task Name"] = task_name
    return event_header["EventDescriptor"]["Id"], out


def without(event: tuple[int, dict], name: str, *, in_header: bool = False) -> tuple[int, dict]:
    """A copy of ``event`` with one payload (or EventHeader) field gone, as when TDH parsing stops early."""
    event_id, out = copy.deepcopy(event)
    del (out["EventHeader"] if in_header else out)[name]
    return event_id, out


def replaced(event: tuple[int, dict], name: str, value: Any, *, in_header: bool = False) -> tuple[int, dict]:
    """A copy of ``event`` with one field's value replaced (None is what pywintrace gives for a field TDH could
    not format, etw.py:577)."""
    event_id, out = copy.deepcopy(event)
    (out["EventHeader"] if in_header else out)[name] = value
    return event_id, out


_DECIMAL = re.compile(r"-?[0-9]+")


def pywintrace_030(event: tuple[int, dict], *, session_name: str = "etwmon-1-1-1",
                   strings: tuple[str, ...] = ()) -> tuple[int, dict]:
    """``event`` as pywintrace 0.3.0 delivers it. Its TDH_CONVERTER_LOOKUP step converts values of the integer
    out types (INT, UNSIGNEDINT, LONG, UNSIGNEDLONG) with int(), so those arrive as ints; hex, pointer, PID and
    TID out types stay the printed strings. Which out type each manifest field has is not known here, so every
    decimal field becomes an int except the ones named in ``strings``. 0.3.0 also passes EventDescriptor.Opcode
    as the event id when the session is named "NT Kernel Logger" (EventConsumer.kernel_trace)."""
    event_id, out = copy.deepcopy(event)
    for name, value in out.items():
        if name in ("EventHeader", "Description", "Task Name") or name in strings:
            continue
        if isinstance(value, str) and _DECIMAL.fullmatch(value):
            out[name] = int(value)
    if session_name.lower() == "nt kernel logger":
        event_id = out["EventHeader"]["EventDescriptor"]["Opcode"]
    return event_id, out


# --- Microsoft-Windows-Kernel-Process -----------------------------------------------------------------------
# Keyword bits: the WINEVENT_KEYWORD_* mask plus the Analytic channel bit (events go to .../Analytic, channel 16).

_KP_ANALYTIC = 0x8000000000000000


def kp_event(event_id: int, version: int, fields: dict[str, Any], *, opcode: int, task_name: str,
             keyword: int, description: str = "", pid: int = 4, tid: int = 8,
             timestamp: int = T0) -> tuple[int, dict]:
    """Any Microsoft-Windows-Kernel-Process event."""
    h = header(provider=KERNEL_PROCESS, event_id=event_id, version=version, opcode=opcode, task=event_id,
               level=4, channel=16, keyword=_KP_ANALYTIC | keyword, pid=pid, tid=tid, timestamp=timestamp)
    return pywintrace_event(h, fields, task_name, description)


def kp_process_start(*, version: int = 3, pid: int = 6312, ppid: int = 4420, session: int = 1,
                     image: str = "\\Device\\HarddiskVolume3\\Windows\\System32\\notepad.exe",
                     creating_pid: int = 4420, creating_tid: int = 7716, timestamp: int = T0) -> tuple[int, dict]:
    """Event 1 ProcessStart. The header is the creating thread's (the event is logged in its context)."""
    create_time = filetime_text(timestamp)
    if version == 0:  # ProcessStartArgs
        fields = {"ProcessID": dec(pid), "CreateTime": create_time, "ParentProcessID": dec(ppid),
                  "SessionID": dec(session), "ImageName": image}
    elif version == 1:  # ProcessStartArgs_V1
        fields = {"ProcessID": dec(pid), "CreateTime": create_time, "ParentProcessID": dec(ppid),
                  "SessionID": dec(session), "Flags": dec(0), "ImageName": image}
    elif version == 2:  # ProcessStartArgs_V2
        fields = {"ProcessID": dec(pid), "CreateTime": create_time, "ParentProcessID": dec(ppid),
                  "SessionID": dec(session), "Flags": dec(0), "ImageName": image,
                  "ImageChecksum": dec(0x3F2A1), "TimeDateStamp": dec(0x5E7A1B2C), "PackageFullName": "",
                  "PackageRelativeAppId": ""}
    elif version == 3:  # template ProcessRundownArgs_V1
        fields = {"ProcessID": dec(pid), "ProcessSequenceNumber": dec(1234), "CreateTime": create_time,
                  "ParentProcessID": dec(ppid), "ParentProcessSequenceNumber": dec(1200),
                  "SessionID": dec(session), "Flags": dec(0), "ProcessTokenElevationType": dec(1),
                  "ProcessTokenIsElevated": dec(1), "MandatoryLabel": "S-1-16-12288", "ImageName": image,
                  "ImageChecksum": dec(0x3F2A1), "TimeDateStamp": dec(0x5E7A1B2C), "PackageFullName": "",
                  "PackageRelativeAppId": ""}
    else:
        raise ValueError(f"ProcessStart has versions 0-3, not {version}")
    return kp_event(1, version, fields, opcode=1, task_name="PROCESSSTART", keyword=0x10,
                    description="Process %1 started at time %2 by parent %3 running in session %4 with name %5.",
                    pid=creating_pid, tid=creating_tid, timestamp=timestamp)


def kp_process_stop(*, version: int = 2, pid: int = 6312, exit_code: int = 0, image: str = "notepad.exe",
                    timestamp: int = T0, exit_code_text: str | None = None) -> tuple[int, dict]:
    """Event 2 ProcessStop; ExitCode is a UInt32 printed in decimal (xs:unsignedInt)."""
    code = dec(exit_code) if exit_code_text is None else exit_code_text
    fields: dict[str, Any] = {"ProcessID": dec(pid)}
    if version >= 2:  # ProcessStopArgs_V2
        fields["ProcessSequenceNumber"] = dec(1234)
    fields.update({"CreateTime": filetime_text(timestamp - 10_000_000), "ExitTime": filetime_text(timestamp),
                   "ExitCode": code, "TokenElevationType": dec(1), "HandleCount": dec(0), "CommitCharge": dec(0),
                   "CommitPeak": dec(1_900_544)})
    if version >= 1:  # ProcessStopArgs_V1
        fields.update({"CPUCycleCount": dec(52_341_234), "ReadOperationCount": dec(3),
                       "WriteOperationCount": dec(0), "ReadTransferKiloBytes": dec(12),
                       "WriteTransferKiloBytes": dec(0), "HardFaultCount": dec(0)})
    if version > 2:
        raise ValueError(f"ProcessStop has versions 0-2, not {version}")
    fields["ImageName"] = image  # win:AnsiString, the short name
    return kp_event(2, version, fields, opcode=2, task_name="PROCESSSTOP", keyword=0x10,
                    description="Process %1 (which started at time %2) stopped at time %3 with exit code %4.",
                    pid=pid, tid=9000, timestamp=timestamp)


def _thread_fields(version: int, pid: int, tid: int, stop: bool) -> dict[str, Any]:
    fields = {"ProcessID": dec(pid), "ThreadID": dec(tid), "StackBase": pointer(0xFFFFF58A2C5D0000),
              "StackLimit": pointer(0xFFFFF58A2C5CA000), "UserStackBase": pointer(0x9A3E200000),
              "UserStackLimit": pointer(0x9A3E1FC000), "StartAddr": pointer(0x7FFB1C2A1F30),
              "Win32StartAddr": pointer(0x7FF7A3B01A40), "TebBase": pointer(0x9A3D3A5000)}
    if version >= 1:  # ThreadStartArgs_V1 / ThreadStopArgs_V1
        fields["SubProcessTag"] = dec(0)
        if stop:
            fields["CycleTime"] = dec(1_234_567)
    if version > 1:
        raise ValueError(f"ThreadStart/Stop have versions 0-1, not {version}")
    return fields


def kp_thread_start(*, version: int = 1, pid: int = 6312, tid: int = 7720, timestamp: int = T0) -> tuple:
    """Event 3 ThreadStart."""
    return kp_event(3, version, _thread_fields(version, pid, tid, False), opcode=1, task_name="THREADSTART",
                    keyword=0x20, description="Thread %2 (in Process %1) started.", pid=pid, tid=tid,
                    timestamp=timestamp)


def kp_thread_stop(*, version: int = 1, pid: int = 6312, tid: int = 7720, timestamp: int = T0) -> tuple:
    """Event 4 ThreadStop (ThreadStartArgs in version 0)."""
    return kp_event(4, version, _thread_fields(version, pid, tid, True), opcode=2, task_name="THREADSTOP",
                    keyword=0x20, description="Thread %2 (in Process %1) stopped.", pid=pid, tid=tid,
                    timestamp=timestamp)


def kp_image_load(*, pid: int = 6312, base: int = 0x7FFB1C200000, size: int = 0x1F8000,
                  name: str = "\\Device\\HarddiskVolume3\\Windows\\System32\\ntdll.dll", timestamp: int = T0,
                  event_id: int = 5) -> tuple:
    """Event 5 ImageLoad (event 6 ImageUnload has the same template)."""
    fields = {"ImageBase": pointer(base), "ImageSize": pointer(size), "ProcessID": dec(pid),
              "ImageCheckSum": dec(0x1FF3A4), "TimeDateStamp": dec(0x8A1B2C3D), "DefaultBase": pointer(base),
              "ImageName": name}
    task = "IMAGELOAD" if event_id == 5 else "IMAGEUNLOAD"
    return kp_event(event_id, 0, fields, opcode=0, task_name=task, keyword=0x40,
                    description=f"Process %3 had an image {'loaded' if event_id == 5 else 'unloaded'} "
                                "with name %7.", pid=pid, tid=7716, timestamp=timestamp)


# --- classic kernel logger (event id 0, event type in Opcode, event class GUID in ProviderId) -----------------

def classic_event(provider: str, opcode: int, version: int, fields: dict[str, Any], task_name: str, *,
                  pid: int = 4, tid: int = 8, timestamp: int = T0) -> tuple[int, dict]:
    h = header(provider=provider, event_id=0, version=version, opcode=opcode, task=0, level=0, channel=0,
               keyword=0, pid=pid, tid=tid, timestamp=timestamp, flags=0x0140)  # CLASSIC_HEADER | 64_BIT_HEADER
    return pywintrace_event(h, fields, task_name)


def kl_process(opcode: int = 1, *, pid: int = 6312, ppid: int = 4420, session: int = 1, exit_status: int = 0,
               image_file_name: str = "notepad.exe",
               command_line: str = '"C:\\Windows\\system32\\notepad.exe" C:\\Users\\ann\\todo.txt',
               creating_pid: int = 4420, creating_tid: int = 7716, timestamp: int = T0) -> tuple:
    """Process_TypeGroup1 (Process_V4): 1 Start, 2 End, 3 DCStart, 4 DCEnd, 39 Defunct."""
    fields = {"UniqueProcessKey": pointer(0xFFFFA40F1C2D3080), "ProcessId": hex32(pid), "ParentId": hex32(ppid),
              "SessionId": dec(session), "ExitStatus": sint32(exit_status),
              "DirectoryTableBase": pointer(0x1A2B3000), "Flags": dec(0),
              "UserSID": "S-1-5-21-3623811015-3361044348-30300820-1013", "ImageFileName": image_file_name,
              "CommandLine": command_line, "PackageFullName": "", "ApplicationId": ""}
    return classic_event(PROCESS, opcode, 4, fields, "PROCESS", pid=creating_pid, tid=creating_tid,
                         timestamp=timestamp)


def kl_thread(opcode: int = 1, *, pid: int = 6312, tid: int = 7720, timestamp: int = T0) -> tuple:
    """Thread_TypeGroup1 (Thread_V3): 1 Start, 2 End, 3 DCStart, 4 DCEnd."""
    fields = {"ProcessId": hex32(pid), "TThreadId": hex32(tid), "StackBase": pointer(0xFFFFF58A2C5D0000),
              "StackLimit": pointer(0xFFFFF58A2C5CA000), "UserStackBase": pointer(0x9A3E200000),
              "UserStackLimit": pointer(0x9A3E1FC000), "Affinity": pointer(0xFF),
              "Win32StartAddr": pointer(0x7FF7A3B01A40), "TebBase": pointer(0x9A3D3A5000),
              "SubProcessTag": hex32(0), "BasePriority": dec(8), "PagePriority": dec(5), "IoPriority": dec(2),
              "ThreadFlags": dec(0)}
    return classic_event(THREAD, opcode, 3, fields, "THREAD", pid=pid, tid=tid, timestamp=timestamp)


def kl_image(opcode: int = 10, *, pid: int = 6312, base: int = 0x7FFB1C200000, size: int = 0x1F8000,
             file_name: str = "\\Device\\HarddiskVolume3\\Windows\\System32\\ntdll.dll",
             timestamp: int = T0) -> tuple:
    """Image_Load (Image_V3): 10 Load, 2 Unload, 3 DCStart, 4 DCEnd. ProcessId has no Format: decimal."""
    fields = {"ImageBase": pointer(base), "ImageSize": pointer(size), "ProcessId": dec(pid),
              "ImageCheckSum": dec(0x1FF3A4), "TimeDateStamp": dec(0x8A1B2C3D), "SignatureLevel": dec(12),
              "SignatureType": dec(1), "Reserved0": dec(0), "DefaultBase": pointer(base), "Reserved1": dec(0),
              "Reserved2": dec(0), "Reserved3": dec(0), "Reserved4": dec(0), "FileName": file_name}
    return classic_event(IMAGE_LOAD, opcode, 3, fields, "IMAGE", pid=pid, tid=7716, timestamp=timestamp)


# --- a fake pywintrace --------------------------------------------------------------------------------------
# The same classes and call structure as pywintrace 0.2.0 (ETW, EventProvider, EventConsumer, TraceProperties,
# ProviderInfo, GUID, with the same constructor signatures), over a FakeEtwWorld that plays the machine's ETW:
# sessions by name, and switches to make StartTrace, EnableTraceEx2 or ControlTrace fail.

ERROR_ACCESS_DENIED = 5
ERROR_ALREADY_EXISTS = 183
ERROR_NO_SYSTEM_RESOURCES = 1450
EVENT_TRACE_REAL_TIME_MODE = 0x100
EVENT_TRACE_SYSTEM_LOGGER_MODE = 0x02000000


class FakeWinError(OSError):
    """What ctypes.WinError(status) raises on Windows: an OSError with ``winerror``."""

    def __init__(self, code: int) -> None:
        super().__init__(None, f"Windows error {code}")
        self.winerror = code


class FakeGUID:
    def __init__(self, name: str | None = None) -> None:
        self.text = (name or _NULL_GUID).upper()

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f'GUID("{self.text}")'

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeGUID) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


class FakeTraceProperties:
    """TraceProperties (etw.py:39): ``get().contents`` is the EVENT_TRACE_PROPERTIES."""

    def __init__(self, ring_buf_size=1024, max_str_len=1024, min_buffers=0, max_buffers=0, props=None) -> None:
        wnode = types.SimpleNamespace(Guid=FakeGUID(), Flags=0x00020000, BufferSize=0)
        self._contents = types.SimpleNamespace(
            Wnode=wnode, BufferSize=ring_buf_size, MinimumBuffers=min_buffers, MaximumBuffers=max_buffers,
            LogFileMode=EVENT_TRACE_REAL_TIME_MODE, FlushTimer=0, EnableFlags=0, EventsLost=0, RealTimeBuffersLost=0)

    def get(self):
        return types.SimpleNamespace(contents=self._contents)


class FakeProviderInfo:
    """ProviderInfo (etw.py:1021): an int keyword mask is taken as is; a list or None would be looked up in the
    provider's manifest (None gives 0)."""

    def __init__(self, name, guid, level=4, any_keywords=None, all_keywords=None, params=None) -> None:
        self.name, self.guid, self.level, self.params = name, guid, level, params
        for attr, value in (("any_bitmask", any_keywords), ("all_bitmask", all_keywords)):
            if isinstance(value, list):
                raise AssertionError("keyword names need TdhEnumerateProviderFieldInformation")
            setattr(self, attr, 0 if value is None else value)


class FakeEventProvider:
    """EventProvider (etw.py:113): StartTraceW, EnableTraceEx2 per provider, ControlTraceW(STOP) on stop."""

    def __init__(self, world: "FakeEtwWorld", session: "FakeETW") -> None:
        self.world, self.session = world, session
        self.kernel_trace = session.session_name.lower() == "nt kernel logger"
        self.session_name = "NT Kernel Logger" if self.kernel_trace else session.session_name
        self.kernel_trace_was_running = False
        self.session_handle = types.SimpleNamespace(value=0)

    def start(self) -> None:
        props = self.session.properties.get().contents
        self.kernel_trace_was_running = False
        if self.kernel_trace:
            provider = self.session.providers[0]
            props.Wnode.Guid = provider.guid
            props.LogFileMode |= EVENT_TRACE_SYSTEM_LOGGER_MODE
            props.EnableFlags = provider.any_bitmask or 0x00010103  # DEFAULT_NT_KERNEL_LOGGER_FLAGS
        world = self.world
        with world.lock:
            if world.start_error is not None:
                raise world.start_error
            if self.session_name in world.sessions:
                if self.kernel_trace:
                    self.kernel_trace_was_running = True
                raise FakeWinError(ERROR_ALREADY_EXISTS)
            world.sessions[self.session_name] = self.session
            self.session_handle.value = next(world.handles)
        if not self.kernel_trace:
            for provider in self.session.providers:
                if world.enable_error is not None:
                    raise world.enable_error
                world.enabled.append((self.session_name, provider))

    def stop(self) -> None:
        if (self.session_handle.value == 0 and not self.kernel_trace) or \
                (self.kernel_trace and self.kernel_trace_was_running):
            return
        if self.world.provider_stop_error is not None:
            raise self.world.provider_stop_error
        self.world.stop_session(self.session_name)


class FakeEventConsumer:
    """EventConsumer (etw.py:231): a non-daemon thread (etw.py:302) calls back ``(event_id, out)`` until stop()."""

    def __init__(self, session: "FakeETW") -> None:
        self.session = session
        self.events: queue.Queue = queue.Queue()
        self.process_thread: threading.Thread | None = None

    def start(self) -> None:
        self.process_thread = threading.Thread(target=self._run, name="fake-ProcessTrace")
        self.process_thread.start()

    def _run(self) -> None:
        while True:
            event = self.events.get()
            if event is None:
                return
            if isinstance(event, threading.Event):  # drain() marker: everything before it was called back
                event.set()
                continue
            try:
                self.session.event_callback(event)
            except Exception as exc:  # what etw.py:841-843 does
                logging.getLogger("fake-pywintrace").error("Exception during callback: %s", exc)
                self.session.world.callback_errors.append(exc)

    def stop(self) -> None:
        self.events.put(None)
        if self.process_thread is not None:
            self.process_thread.join()
        self.session.world.readers_stopped.append(self.session.session_name)


class FakeETW:
    """ETW (etw.py:846) with its exact constructor signature: an option pywintrace 0.2.0 lacks fails here too."""

    world: "FakeEtwWorld"

    def __init__(self, session_name=None, ring_buf_size=1024, max_str_len=1024, min_buffers=0, max_buffers=0,
                 event_callback=None, task_name_filters=None, properties=None, providers=None,
                 ignore_exists_error=True, event_id_filters=None, callback_data_flag=0, callback_wait_time=0.0,
                 trace_logfile=None) -> None:
        self.providers = [] if providers is None else providers
        self.properties = properties if properties is not None else FakeTraceProperties(
            ring_buf_size, max_str_len, min_buffers, max_buffers)
        self.session_name = session_name if session_name is not None else "{random}"
        self.event_callback = event_callback
        self.ignore_exists_error = ignore_exists_error
        self.ring_buf_size = ring_buf_size
        self.provider: FakeEventProvider | None = None
        self.consumer: FakeEventConsumer | None = None
        self.running = False
        self.world.created.append(self)

    def start(self) -> None:
        if self.provider is None:
            self.provider = FakeEventProvider(self.world, self)
        if self.running is False:
            self.running = True
            try:
                self.provider.start()
            except OSError as wex:
                if (wex.winerror == ERROR_ALREADY_EXISTS and not self.ignore_exists_error) or \
                        wex.winerror != ERROR_ALREADY_EXISTS:
                    raise
            self.consumer = FakeEventConsumer(self)
            self.consumer.start()

    def stop(self) -> None:
        if self.provider:
            self.running = False
            self.provider.stop()
            self.consumer.stop()

    def query(self):
        world = self.world
        if world.query_failures:
            world.query_failures -= 1
            return FakeTraceProperties().get().contents  # ControlTraceW failed: pywintrace returns zeros
        events_lost, buffers_lost = world.lost.get(self.session_name, (0, 0))
        return types.SimpleNamespace(EventsLost=events_lost, RealTimeBuffersLost=buffers_lost)

    def control_stop(self, trace_properties) -> None:
        self.world.stop_session(self.session_name)


class OrphanSession:
    """A session some other process started and left running (a killed etwmon, another tool)."""

    def __init__(self, name: str) -> None:
        self.session_name = name


class FakeEtwWorld:
    """The machine's ETW as the fake pywintrace and FakeTraceControl see it, plus the process table.

    Switches: ``query_errors`` / ``stop_errors`` (winerror codes the next ControlTraceW QUERY / STOP calls fail
    with, one per call), ``list_error`` (QueryAllTracesW fails), ``lost`` (a session's EventsLost and
    RealTimeBuffersLost), ``processes`` (pid -> start FILETIME; a pid not there is gone), ``unknown_pids`` (Windows
    will not say whether they run). ``kill`` stops a session from outside etwmon."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sessions: dict[str, Any] = {}
        self.stopped: list[str] = []
        self.killed: list[str] = []
        self.readers_stopped: list[str] = []
        self.created: list[FakeETW] = []
        self.enabled: list[tuple[str, FakeProviderInfo]] = []
        self.handles = itertools.count(0x1000)
        self.start_error: OSError | None = None
        self.enable_error: OSError | None = None
        self.provider_stop_error: OSError | None = None
        self.query_failures = 0  # pywintrace's own ETW.query() (etwmon does not use it): zeros
        self.query_errors: list[int] = []
        self.stop_errors: list[int] = []
        self.list_error: int | None = None
        self.queries: list[str] = []
        self.lost: dict[str, tuple[int, int]] = {}
        self.processes: dict[int, int] = {}
        self.unknown_pids: set[int] = set()
        self.callback_errors: list[BaseException] = []
        self.on_stop: Callable[[str], None] | None = None
        self.control = FakeTraceControl(self)

    def stop_session(self, name: str) -> None:
        with self.lock:
            self.sessions.pop(name, None)
            self.stopped.append(name)
        if self.on_stop is not None:
            self.on_stop(name)

    def kill(self, name: str, *, reader_ends: bool = True) -> None:
        """``logman stop <name> -ets`` from another console: the session goes; with ``reader_ends`` pywintrace's
        reader thread ends too (ProcessTrace returned), as it does when ProcessTrace fails."""
        with self.lock:
            session = self.sessions.pop(name)
            self.killed.append(name)
        if reader_ends and session.consumer is not None:
            session.consumer.events.put(None)

    def end_reader(self, name: str) -> None:
        """pywintrace's reader thread ends while the session itself keeps running."""
        self.sessions[name].consumer.events.put(None)

    def process_started(self, pid: int) -> int | None:
        """etwmon.sources.etw._process_started over this world's process table."""
        if pid in self.unknown_pids:
            raise C.SessionControlError(f"OpenProcess({pid})", 5)
        return self.processes.get(pid)

    def seams(self) -> dict[str, Any]:
        """The etwmon.sources.etw attributes to replace so that the ETW source sees an elevated Windows 10 with
        pywintrace installed, and this world's ETW and process table."""
        return {"_platform": lambda: "win32", "_windows_version": lambda: (10, 0, 19045),
                "_pywintrace_installed": lambda: True, "_is_elevated": lambda: True,
                "_trace_control": lambda: self.control, "_process_started": self.process_started}

    def modules(self) -> dict[str, types.ModuleType]:
        """sys.modules entries that make ``import etw`` and ``from etw.etw import TraceProperties`` find the fake."""
        world = self
        fake_etw_class = type("ETW", (FakeETW,), {"world": world})
        package = types.ModuleType("etw")
        package.ETW = fake_etw_class
        package.ProviderInfo = FakeProviderInfo
        package.GUID = FakeGUID
        core = types.ModuleType("etw.etw")
        core.ETW = fake_etw_class
        core.ProviderInfo = FakeProviderInfo
        core.TraceProperties = FakeTraceProperties
        package.etw = core
        return {"etw": package, "etw.etw": core}

    def emit(self, *events: tuple[int, dict], session: str | None = None) -> None:
        """Deliver events to a running session's consumer (the only one, unless named)."""
        with self.lock:
            if session is None:
                if len(self.sessions) != 1:
                    raise AssertionError(f"emit() needs exactly one running session, there are {list(self.sessions)}")
                target = next(iter(self.sessions.values()))
            else:
                target = self.sessions[session]
        if target.consumer is None:
            raise AssertionError("the session has no consumer")
        for event in events:
            target.consumer.events.put(event)

    def drain(self, session: str | None = None) -> None:
        """Wait until every event emitted so far has been through the callback."""
        done = threading.Event()
        with self.lock:
            target = self.sessions[session] if session else next(iter(self.sessions.values()))
        target.consumer.events.put(done)
        if not done.wait(30):
            raise AssertionError("the fake consumer did not get through its events")


class FakeTraceControl:
    """TraceControl over a FakeEtwWorld: query, stop and list sessions by name, failing as the world says."""

    def __init__(self, world: FakeEtwWorld) -> None:
        self.world = world

    def _status(self, name: str) -> "C.SessionStatus":
        session = self.world.sessions[name]
        events_lost, buffers_lost = self.world.lost.get(name, (0, 0))
        props = session.properties.get().contents if hasattr(session, "properties") else None
        return C.SessionStatus(name, events_lost, buffers_lost, getattr(props, "FlushTimer", 0),
                               getattr(props, "LogFileMode", 0), getattr(props, "BufferSize", 0))

    def query(self, name: str, guid: str | None = None) -> "C.SessionStatus":
        world = self.world
        with world.lock:
            world.queries.append(name)
            if world.query_errors:
                raise C.SessionControlError(f"ControlTraceW(QUERY, {name!r})", world.query_errors.pop(0))
            if name not in world.sessions:
                raise C.SessionControlError(f"ControlTraceW(QUERY, {name!r})", C.ERROR_WMI_INSTANCE_NOT_FOUND)
            return self._status(name)

    def stop(self, name: str, guid: str | None = None) -> "C.SessionStatus | None":
        world = self.world
        with world.lock:
            if world.stop_errors:
                raise C.SessionControlError(f"ControlTraceW(STOP, {name!r})", world.stop_errors.pop(0))
            if name not in world.sessions:
                raise C.SessionControlError(f"ControlTraceW(STOP, {name!r})", C.ERROR_WMI_INSTANCE_NOT_FOUND)
            final = self._status(name)
        world.stop_session(name)
        return final

    def sessions(self) -> list[str]:
        world = self.world
        with world.lock:
            if world.list_error is not None:
                raise C.SessionControlError("QueryAllTracesW", world.list_error)
            return list(world.sessions)


class FakeAdvapi32:
    """ControlTraceW and QueryAllTracesW as ETW answers them, over real EVENT_TRACE_PROPERTIES memory, for testing
    TraceControl's ctypes side: it checks the structure is set up as Microsoft's pages require (zeroed, with
    Wnode.BufferSize covering both names and the name offsets after the structure) and writes back what ETW would.
    ``sessions``: name -> dict of EVENT_TRACE_PROPERTIES fields; ``status``: a status to return instead."""

    def __init__(self, sessions: dict[str, dict[str, int]] | None = None) -> None:
        self.sessions = sessions if sessions is not None else {}
        self.status: int | None = None
        self.calls: list[tuple] = []

    @staticmethod
    def _checked(props) -> int:
        size = ctypes.sizeof(props)
        wnode = props.Wnode.BufferSize
        if props.LoggerNameOffset < size or props.LogFileNameOffset < size or \
                max(props.LoggerNameOffset, props.LogFileNameOffset) + 2048 > wnode:
            return 24  # ERROR_BAD_LENGTH
        if props.EventsLost or props.RealTimeBuffersLost or props.LogFileMode:
            raise AssertionError("the structure was not zeroed before use")
        return 0

    @staticmethod
    def _fill(props, name: str, fields: dict[str, int]) -> None:
        for key, value in fields.items():
            setattr(props, key, value)
        encoded = name.encode("utf-16-le") + b"\0\0"
        ctypes.memmove(ctypes.addressof(props) + props.LoggerNameOffset, encoded, len(encoded))

    def ControlTraceW(self, handle, name, props_pointer, code):  # noqa: N802 - the Windows name
        props = props_pointer.contents
        self.calls.append(("ControlTraceW", handle, name, code, bytes(props.Wnode.Guid)))
        bad = self._checked(props)
        if bad:
            return bad
        if self.status is not None:
            return self.status
        if name not in self.sessions:
            return C.ERROR_WMI_INSTANCE_NOT_FOUND
        self._fill(props, name, self.sessions[name])
        if code == 1:  # EVENT_TRACE_CONTROL_STOP
            del self.sessions[name]
        return 0

    def QueryAllTracesW(self, array, count, found_pointer):  # noqa: N802
        self.calls.append(("QueryAllTracesW", count))
        names = list(self.sessions)
        found_pointer.contents.value = len(names)
        for i, name in enumerate(names[:count]):
            props = array[i].contents
            bad = self._checked(props)
            if bad:
                return bad
            self._fill(props, name, self.sessions[name])
        if self.status is not None:
            return self.status
        return C.ERROR_MORE_DATA if len(names) > count else 0
