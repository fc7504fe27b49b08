"""ETW events into SysMon records: ``to_records`` reads one pywintrace callback argument, choosing by its
provider (Microsoft-Windows-Kernel-Process by event id, the classic kernel logger's event classes by opcode), for
both pywintrace shapes (0.2.0's strings, 0.3.0's typed ints). Every value is checked; a field that is missing or
unreadable raises ``EtwEventError``. Where the shapes come from: the notes at the top of ``source``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from ...errors import Error
from ...records import (
    EXIT_CODE_UNKNOWN, Details, encode_image_load, encode_process_create, encode_process_exit, encode_thread_create,
    encode_thread_exit,
)

__all__ = ["EtwEventError", "EtwRecord", "to_records", "KERNEL_PROCESS_GUID", "PROCESS_GUID", "THREAD_GUID",
           "IMAGE_LOAD_GUID"]

#: Microsoft-Windows-Kernel-Process (manifest: keywords WINEVENT_KEYWORD_PROCESS 0x10, _THREAD 0x20, _IMAGE 0x40).
KERNEL_PROCESS_GUID = "{22FB2CD6-0E7B-422B-A0C7-2FAD1FD0E716}"
#: The event class GUIDs classic kernel events carry as EventHeader.ProviderId.
PROCESS_GUID = "{3D6FA8D0-FE05-11D0-9DDA-00C04FD7BA7C}"
THREAD_GUID = "{3D6FA8D1-FE05-11D0-9DDA-00C04FD7BA7C}"
IMAGE_LOAD_GUID = "{2CB15D1D-5FC1-11D2-ABE1-00A0C911F518}"

# Classic event types (EventDescriptor.Opcode) of Process_TypeGroup1, Thread_TypeGroup1 and Image_Load.
_START, _END, _DC_START, _DC_END, _IMAGE_LOAD = 1, 2, 3, 4, 10

# Microsoft-Windows-Kernel-Process event ids.
_KP_PROCESS_START, _KP_PROCESS_STOP, _KP_THREAD_START, _KP_THREAD_STOP, _KP_IMAGE_LOAD = 1, 2, 3, 4, 5

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


class EtwEventError(Error, ValueError):
    """A pywintrace event lacks a field etwmon needs, or has one it cannot read. The source counts these as
    ``parse_errors`` and drops the event; ``to_records`` raises it so callers see why."""


# --- reading pywintrace's values ----------------------------------------------------------------------------

# TdhFormatProperty writes integers in decimal (xs:unsignedInt, win:PID, sint32 can be negative) or as "0x" hex
# (win:HexInt32/64, MOF Format("x"), pointers). Accept both, around whitespace, with leading zeros ("010" is ten,
# where int("010", 0) would fail) and nothing else: no underscores, no octal, no floats. pywintrace 0.3.0 hands
# over ints for integer out types: taken as they are (bools and floats are not numbers here).
_NUMBER = re.compile(r"\s*([+-]?)(?:0[xX]([0-9A-Fa-f]+)|([0-9]+))\s*\Z")


def _number(fields: Mapping[str, Any], name: str) -> int:
    try:
        value = fields[name]
    except KeyError:
        raise EtwEventError(f"field {name!r} is missing") from None
    if isinstance(value, bool):
        raise EtwEventError(f"field {name!r} is {value!r}, not a number")
    if isinstance(value, int):
        return value
    if not isinstance(value, str):
        raise EtwEventError(f"field {name!r} is {value!r}, not a number")
    match = _NUMBER.match(value)
    if match is None:
        raise EtwEventError(f"field {name!r} is {value!r}, not a number")
    sign, hexdigits, decimal = match.groups()
    number = int(hexdigits, 16) if hexdigits is not None else int(decimal, 10)
    return -number if sign == "-" else number


def _unsigned(fields: Mapping[str, Any], name: str, limit: int = _U32) -> int:
    value = _number(fields, name)
    if not 0 <= value <= limit:
        raise EtwEventError(f"field {name!r} = {value} is out of range 0..{limit:#x}")
    return value


def _status(fields: Mapping[str, Any], name: str) -> int:
    """An exit code as the ULONG Windows keeps (0xC0000005, not -1073741819): the classic ExitStatus is a sint32
    that TDH prints signed, Kernel-Process's ExitCode a UInt32."""
    value = _number(fields, name)
    if not -0x80000000 <= value <= _U32:
        raise EtwEventError(f"field {name!r} = {value} does not fit 32 bits")
    return value & _U32


def _text(fields: Mapping[str, Any], name: str) -> str:
    try:
        value = fields[name]
    except KeyError:
        raise EtwEventError(f"field {name!r} is missing") from None
    if not isinstance(value, str):
        raise EtwEventError(f"field {name!r} is {value!r}, not a string")
    return value


def _split(event: Any) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(payload, EventHeader) of one callback argument, checked. The tuple's event id is not used: what it holds
    depends on the pywintrace version and the session's name, the EventDescriptor does not."""
    if not isinstance(event, (tuple, list)) or len(event) != 2:
        raise EtwEventError(f"expected the (event_id, dict) pair pywintrace calls back with, got {type(event)}")
    event_id, data = event
    if isinstance(event_id, bool) or not isinstance(event_id, int) or not isinstance(data, Mapping):
        raise EtwEventError(f"expected (int, dict), got ({type(event_id).__name__}, {type(data).__name__})")
    header = data.get("EventHeader")
    if not isinstance(header, Mapping):
        raise EtwEventError("EventHeader is missing")
    return data, header


def _time(header: Mapping[str, Any]) -> int:
    value = _number(header, "TimeStamp")
    if not 0 <= value < 1 << 63:
        raise EtwEventError(f"TimeStamp {value} is not a FILETIME")
    return value


def _provider(header: Mapping[str, Any]) -> str:
    value = header.get("ProviderId")
    if not isinstance(value, str):
        raise EtwEventError("EventHeader.ProviderId is missing")
    return value.strip().strip("{}").upper()


def _opcode(header: Mapping[str, Any]) -> int:
    descriptor = header.get("EventDescriptor")
    if not isinstance(descriptor, Mapping):
        raise EtwEventError("EventHeader.EventDescriptor is missing")
    return _unsigned(descriptor, "Opcode", 0xFF)


def _quoted(path: str) -> str:
    """An image path used as a command line, quoted the way Windows quotes a program path with spaces, so that
    CommandLineToArgvW gives it back as one argument."""
    return f'"{path}"' if any(c.isspace() for c in path) else path


def _same_path(path: str) -> str:
    return path


# --- one event -> records -----------------------------------------------------------------------------------

_KP = KERNEL_PROCESS_GUID.strip("{}")
_PROCESS, _THREAD, _IMAGE = (g.strip("{}") for g in (PROCESS_GUID, THREAD_GUID, IMAGE_LOAD_GUID))


class EtwRecord(bytes):
    """One encoded record (bytes, as every source pushes) that also carries what ETW says about the process
    beyond the wire format, for the stages between the source and the ring (identity):

    - ``process_sequence_number``: Microsoft-Windows-Kernel-Process's ProcessSequenceNumber (ProcessStart v3,
      ProcessStop v2), a number Windows never reuses until reboot, unlike the pid;
    - ``parent_process_sequence_number``: ParentProcessSequenceNumber (ProcessStart v3).

    Each is an int, or None when the event does not carry it (classic kernel events, older versions, a field
    TDH could not format). The ring stores only the bytes.
    """

    process_sequence_number: int | None
    parent_process_sequence_number: int | None

    def __new__(cls, record: bytes, process_sequence_number: int | None = None,
                parent_process_sequence_number: int | None = None) -> "EtwRecord":
        self = super().__new__(cls, record)
        self.process_sequence_number = process_sequence_number
        self.parent_process_sequence_number = parent_process_sequence_number
        return self


def _sequence(fields: Mapping[str, Any], name: str) -> int | None:
    """An optional UInt64 sequence number: None when absent or unreadable (it is extra knowledge, never a
    reason to drop the event it comes with)."""
    try:
        return _unsigned(fields, name, _U64)
    except EtwEventError:
        return None


def to_records(event: Any, *, map_path: Callable[[str], str] | None = None,
               rundown: bool = False, details: bool = False) -> list[EtwRecord]:
    """The records for one pywintrace callback argument ``(event_id, dict)``: usually one, none for events
    etwmon does not record (unknown ids, image unloads, rundown ends, other providers).

    The provider in ``EventHeader.ProviderId`` decides how the event is read: Microsoft-Windows-Kernel-Process
    by EventDescriptor.Id, the classic kernel event classes (Process, Thread, Image_Load) by
    EventDescriptor.Opcode, so events of both kinds can come through one call, and the pywintrace version (0.2.0
    strings, 0.3.0 typed ints and its Opcode-as-event-id for "NT Kernel Logger") does not matter.

    ``map_path`` turns NT device paths into drive-letter paths (``NtPathMapper``); by default names stay as
    ETW gave them. ``rundown=True`` records the kernel logger's start-of-session snapshot (DCStart) of running
    processes, threads and images as creations with creating process and thread 0. ``details=True`` (the
    identity stage is on) puts what the event says of a new process beyond the book's fields into the record's
    extension block: its session (both providers) and its image path (Kernel-Process's ImageName).
    Raises ``EtwEventError`` when a field it needs is missing or unreadable.
    """
    mapper = map_path or _same_path
    fields, header = _split(event)
    provider = _provider(header)
    if provider == _KP:
        return _kernel_process(fields, header, mapper, details)
    if provider in (_PROCESS, _THREAD, _IMAGE):
        return _kernel_logger(provider, fields, header, mapper, rundown, details)
    return []


def _event_id(header: Mapping[str, Any]) -> int:
    descriptor = header.get("EventDescriptor")
    if not isinstance(descriptor, Mapping):
        raise EtwEventError("EventHeader.EventDescriptor is missing")
    return _unsigned(descriptor, "Id", 0xFFFF)


def _kernel_process(fields: Mapping[str, Any], header: Mapping[str, Any],
                    mapper: Callable[[str], str], details: bool = False) -> list[EtwRecord]:
    # Field names: the Microsoft-Windows-Kernel-Process manifest. ProcessStart versions 0-3 only add fields
    # (v1 Flags; v2 ImageChecksum, TimeDateStamp, PackageFullName, PackageRelativeAppId; v3 sequence numbers,
    # token elevation, MandatoryLabel), ProcessStop v2 adds ProcessSequenceNumber, ThreadStart/Stop v1
    # SubProcessTag (and CycleTime): the ones needed here are in every version, the sequence numbers optional.
    event_id = _event_id(header)
    if event_id not in (_KP_PROCESS_START, _KP_PROCESS_STOP, _KP_THREAD_START, _KP_THREAD_STOP, _KP_IMAGE_LOAD):
        return []
    when = _time(header)
    if event_id == _KP_PROCESS_START:
        # Logged in the creating thread's context, like the book's process-notify callback: the header names it.
        image = mapper(_text(fields, "ImageName"))
        record = encode_process_create(when, _unsigned(fields, "ProcessID"), _unsigned(fields, "ParentProcessID"),
                                       _unsigned(header, "ProcessId"), _unsigned(header, "ThreadId"),
                                       _quoted(image),
                                       Details(image=image, session=_sequence(fields, "SessionID")) if details
                                       else None)
        return [EtwRecord(record, _sequence(fields, "ProcessSequenceNumber"),
                          _sequence(fields, "ParentProcessSequenceNumber"))]
    if event_id == _KP_PROCESS_STOP:
        record = encode_process_exit(when, _unsigned(fields, "ProcessID"), _status(fields, "ExitCode"))
        return [EtwRecord(record, _sequence(fields, "ProcessSequenceNumber"))]
    if event_id == _KP_THREAD_START:
        return [EtwRecord(encode_thread_create(when, _unsigned(fields, "ThreadID"), _unsigned(fields, "ProcessID")))]
    if event_id == _KP_THREAD_STOP:  # ThreadStop carries no exit status
        return [EtwRecord(encode_thread_exit(when, _unsigned(fields, "ThreadID"), _unsigned(fields, "ProcessID"),
                                             EXIT_CODE_UNKNOWN))]
    # ImageLoad: ImageBase and ImageSize are win:Pointer (printed "0x..."), ProcessID a UInt32.
    return [EtwRecord(encode_image_load(when, _unsigned(fields, "ProcessID"), _unsigned(fields, "ImageSize"),
                                        _unsigned(fields, "ImageBase", _U64), mapper(_text(fields, "ImageName"))))]


def _kernel_logger(provider: str, fields: Mapping[str, Any], header: Mapping[str, Any],
                   mapper: Callable[[str], str], rundown: bool, details: bool = False) -> list[EtwRecord]:
    # Classic MOF classes (learn.microsoft.com/windows/win32/etw): Process_TypeGroup1 (types 1 Start, 2 End,
    # 3 DCStart, 4 DCEnd, 39 Defunct; ProcessId and ParentId are Format("x"), ExitStatus a sint32, ImageFileName
    # the ANSI file name, CommandLine wide), Thread_TypeGroup1 (1/2/3/4; ProcessId, TThreadId Format("x")),
    # Image_Load (10 Load, 2 Unload, 3 DCStart, 4 DCEnd; ImageBase/ImageSize pointers, ProcessId decimal, FileName
    # an NT path). Opcodes overlap between classes, so the class GUID in ProviderId decides.
    opcode = _opcode(header)
    snapshot = opcode == _DC_START
    if snapshot and not rundown:
        return []
    if provider == _PROCESS:
        if opcode == _START or snapshot:
            when = _time(header)
            command_line = _text(fields, "CommandLine")
            if not command_line:  # System, Registry, smss...: no command line; the image name says who it is
                command_line = _quoted(mapper(_text(fields, "ImageFileName")))
            # A rundown entry was not created by the thread logging it: creating process/thread 0.
            creating_pid = 0 if snapshot else _unsigned(header, "ProcessId")
            creating_tid = 0 if snapshot else _unsigned(header, "ThreadId")
            return [EtwRecord(encode_process_create(when, _unsigned(fields, "ProcessId"),
                                                    _unsigned(fields, "ParentId"), creating_pid, creating_tid,
                                                    command_line,
                                                    Details(session=_sequence(fields, "SessionId")) if details
                                                    else None))]
        if opcode == _END:
            return [EtwRecord(encode_process_exit(_time(header), _unsigned(fields, "ProcessId"),
                                                  _status(fields, "ExitStatus")))]
        return []
    if provider == _THREAD:
        if opcode == _START or snapshot:
            return [EtwRecord(encode_thread_create(_time(header), _unsigned(fields, "TThreadId"),
                                                   _unsigned(fields, "ProcessId")))]
        if opcode == _END:  # the classic Thread End carries no exit status either
            return [EtwRecord(encode_thread_exit(_time(header), _unsigned(fields, "TThreadId"),
                                                 _unsigned(fields, "ProcessId"), EXIT_CODE_UNKNOWN))]
        return []
    if opcode == _IMAGE_LOAD or snapshot:
        return [EtwRecord(encode_image_load(_time(header), _unsigned(fields, "ProcessId"),
                                            _unsigned(fields, "ImageSize"), _unsigned(fields, "ImageBase", _U64),
                                            mapper(_text(fields, "FileName"))))]
    return []
