"""The ETW source on Linux: recorded pywintrace event shapes through ``to_records`` and back out of ``parse``,
and the session life cycle against a fake pywintrace that mirrors the real one's classes and call order."""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

import etwmon
from etwmon import ImageLoad, ProcessCreate, ProcessExit, RecordsLost, ThreadCreate, ThreadExit, parse
from etwmon.records import EXIT_CODE_UNKNOWN
from etwmon.sources.etw import control as C
from etwmon.sources.etw import source as E
from etwmon.sources.etw import EtwEventError, EtwSource, NtPathMapper, to_records

from . import etw_builders as B
from .helpers import ListSink, read_until
from .etw_builders import T0, FakeEtwWorld, FakeGUID, FakeWinError

REPO = Path(__file__).resolve().parents[1]
OWN_START = 0x1DA5E3F2C4B1A00  # this process's start time (FILETIME) as the stand-in's process table has it

DRIVES = {"C:": "\\Device\\HarddiskVolume3", "D:": "\\Device\\HarddiskVolume10", "E:": "\\Device\\HarddiskVolume1"}
MAPPER = NtPathMapper(query_dos_device=DRIVES.get, system_root="C:\\Windows")
NOTEPAD_NT = "\\Device\\HarddiskVolume3\\Windows\\System32\\notepad.exe"
NOTEPAD = "C:\\Windows\\System32\\notepad.exe"
T0_TIME = datetime(2024, 5, 17, 9, 30, 15, 123456, tzinfo=timezone.utc)


def one(event, **options) -> etwmon.Event:
    """The single record ``event`` maps to, parsed back."""
    records = to_records(event, **options)
    assert len(records) == 1, records
    (parsed,) = list(parse(records[0]))
    return parsed


# --- Microsoft-Windows-Kernel-Process -----------------------------------------------------------------------


@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_kernel_process_start_every_version(version):
    event = B.kp_process_start(version=version, pid=6312, ppid=4420, image=NOTEPAD_NT, creating_pid=4421,
                               creating_tid=7716)
    got = one(event, map_path=MAPPER)
    # No command line in this provider: the program's path stands in for it.
    assert got == ProcessCreate(T0, pid=6312, parent_pid=4420, creating_pid=4421, creating_tid=7716,
                                command_line=NOTEPAD)
    assert got.time == T0_TIME


def test_kernel_process_start_path_with_spaces_is_quoted_and_unmapped_paths_stay():
    event = B.kp_process_start(image="\\Device\\HarddiskVolume10\\Program Files\\App\\app.exe")
    assert one(event, map_path=MAPPER).command_line == '"D:\\Program Files\\App\\app.exe"'
    # Without a mapper (off Windows) the NT path is kept as ETW gave it.
    assert one(event).command_line == '"\\Device\\HarddiskVolume10\\Program Files\\App\\app.exe"'


@pytest.mark.parametrize("version", [0, 1, 2])
@pytest.mark.parametrize("code", [0, 3, 259, 0xC0000005, 0xFFFFFFFF])
def test_kernel_process_stop(version, code):
    got = one(B.kp_process_stop(version=version, pid=6312, exit_code=code))
    assert got == ProcessExit(T0, pid=6312, exit_code=code)
    assert got.time == T0_TIME


@pytest.mark.parametrize("version", [0, 1])
def test_kernel_process_threads(version):
    start = one(B.kp_thread_start(version=version, pid=6312, tid=7720))
    assert start == ThreadCreate(T0, tid=7720, pid=6312)
    stop = one(B.kp_thread_stop(version=version, pid=6312, tid=7720, timestamp=T0 + 1))
    assert stop == ThreadExit(T0 + 1, tid=7720, pid=6312, exit_code=EXIT_CODE_UNKNOWN)


@pytest.mark.parametrize("base, size", [(0x7FFB1C200000, 0x1F8000), (0xFFFFF8057A200000, 0x1046000), (0x400000, 0)])
def test_kernel_process_image_load(base, size):
    got = one(B.kp_image_load(pid=6312, base=base, size=size), map_path=MAPPER)
    assert got == ImageLoad(T0, pid=6312, image_size=size, load_address=base,
                            image_name="C:\\Windows\\System32\\ntdll.dll")
    assert got.time == T0_TIME


@pytest.mark.parametrize("event", [
    B.kp_image_load(event_id=6),  # ImageUnload
    B.kp_event(15, 1, {"ProcessID": "4"}, opcode=0, task_name="PROCESSRUNDOWN", keyword=0x10),
    B.kp_event(7, 0, {"ProcessID": "4", "ThreadID": "8", "OldPriority": "8", "NewPriority": "9"}, opcode=0,
               task_name="CPUBASEPRIORITYCHANGE", keyword=0x80),
    B.kp_event(0, 0, {}, opcode=0, task_name="", keyword=0),
    B.kp_event(9999, 0, {}, opcode=0, task_name="", keyword=0),
])
def test_kernel_process_events_without_a_record(event):
    assert to_records(event) == []


def test_kernel_process_ignores_other_providers():
    event = B.replaced(B.kp_process_start(), "ProviderId", B.DISK_IO, in_header=True)
    assert to_records(event) == []
    # GUID spelling is not significant.
    lower = B.replaced(B.kp_process_start(), "ProviderId", B.KERNEL_PROCESS.lower(), in_header=True)
    assert len(to_records(lower)) == 1


# --- the classic kernel logger ------------------------------------------------------------------------------


def test_kernel_logger_process_start_has_the_command_line():
    command_line = '"C:\\Windows\\system32\\notepad.exe" C:\\Users\\ann\\todo list.txt'
    event = B.kl_process(1, pid=0x18A8, ppid=0x1144, command_line=command_line, creating_pid=4421,
                         creating_tid=7716)
    assert event[0] == 0 and event[1]["ProcessId"] == "0x18A8"  # what pywintrace hands over: id 0, hex ids
    got = one(event, map_path=MAPPER)
    assert got == ProcessCreate(T0, pid=0x18A8, parent_pid=0x1144, creating_pid=4421, creating_tid=7716,
                                command_line=command_line)
    assert got.time == T0_TIME


def test_kernel_logger_process_without_command_line_uses_the_image_name():
    got = one(B.kl_process(1, pid=4, ppid=0, image_file_name="System", command_line=""))
    assert got.command_line == "System" and got.pid == 4 and got.parent_pid == 0


@pytest.mark.parametrize("status", [0, 1, 259, 0xC0000005, 0xC000013A, 0xFFFFFFFF])
def test_kernel_logger_process_end_exit_status_is_unsigned(status):
    event = B.kl_process(2, pid=0x18A8, exit_status=status)
    if status >= 0x80000000:
        assert event[1]["ExitStatus"].startswith("-")  # a sint32 in the MOF: TDH prints it signed
    assert one(event) == ProcessExit(T0, pid=0x18A8, exit_code=status)


def test_kernel_logger_threads():
    assert one(B.kl_thread(1, pid=0x18A8, tid=0x1E28)) == ThreadCreate(T0, tid=0x1E28, pid=0x18A8)
    assert one(B.kl_thread(2, pid=0x18A8, tid=0x1E28)) == ThreadExit(
        T0, tid=0x1E28, pid=0x18A8, exit_code=EXIT_CODE_UNKNOWN)


def test_kernel_logger_image_load():
    got = one(B.kl_image(10, pid=6312, base=0x7FFB1C200000, size=0x1F8000,
                         file_name="\\Device\\HarddiskVolume3\\Windows\\System32\\kernel32.dll"),
              map_path=MAPPER)
    assert got == ImageLoad(T0, pid=6312, image_size=0x1F8000, load_address=0x7FFB1C200000,
                            image_name="C:\\Windows\\System32\\kernel32.dll")


@pytest.mark.parametrize("event", [
    B.kl_process(4), B.kl_process(39), B.kl_process(11), B.kl_thread(4), B.kl_thread(36),
    B.kl_image(2), B.kl_image(4),
    B.classic_event(B.DISK_IO, 10, 3, {"DiskNumber": "0"}, "DISKIO"),  # opcode 10 of another class
    B.classic_event(B.DISK_IO, 1, 3, {"ProcessId": "0x4", "ParentId": "0x0"}, "DISKIO"),
])
def test_kernel_logger_events_without_a_record(event):
    assert to_records(event) == []
    assert to_records(event, rundown=True) == []


def test_kernel_logger_rundown_is_left_out_by_default_and_recorded_on_request():
    process, thread, image = B.kl_process(3, pid=0x2A0, ppid=0x1F4), B.kl_thread(3, pid=0x2A0, tid=0x2A4), \
        B.kl_image(3, pid=0x2A0)
    for event in (process, thread, image):
        assert to_records(event) == []
    # With rundown: creations "by" process/thread 0, since nobody in the header created them.
    assert one(process, rundown=True) == ProcessCreate(
        T0, pid=0x2A0, parent_pid=0x1F4, creating_pid=0, creating_tid=0, command_line=process[1]["CommandLine"])
    assert one(thread, rundown=True) == ThreadCreate(T0, tid=0x2A4, pid=0x2A0)
    assert one(image, rundown=True).image_name == image[1]["FileName"]


def test_to_records_takes_no_mode():
    # The provider decides; a mode argument from before that would otherwise be silently taken for something.
    with pytest.raises(TypeError):
        to_records(B.kl_process(), "kernel-logger")


# --- how numbers are read -----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["6312", " 6312", "6312 ", "\t6312\n", "06312", "0006312", "+6312",
                                  "0x18A8", "0x18a8", "0X18A8", " 0x18A8 ", "0x00000000000018A8"])
def test_numbers_in_every_spelling_tdh_might_use(text):
    event = B.replaced(B.kp_process_start(pid=1), "ProcessID", text)
    assert one(event).pid == 6312


@pytest.mark.parametrize("text", ["0x7FFB1C200000", "0x7ffb1c200000", "0x00007FFB1C200000", str(0x7FFB1C200000)])
def test_pointer_spellings(text):
    event = B.replaced(B.kp_image_load(base=1), "ImageBase", text)
    assert one(event).load_address == 0x7FFB1C200000


# Fields each event needs; removing or spoiling any one of them must drop the event with EtwEventError.
REQUIRED = [
    ("kernel-process", B.kp_process_start(), ["ProcessID", "ParentProcessID"], ["ImageName"]),
    ("kernel-process", B.kp_process_stop(), ["ProcessID", "ExitCode"], []),
    ("kernel-process", B.kp_thread_start(), ["ProcessID", "ThreadID"], []),
    ("kernel-process", B.kp_thread_stop(), ["ProcessID", "ThreadID"], []),
    ("kernel-process", B.kp_image_load(), ["ProcessID", "ImageBase", "ImageSize"], ["ImageName"]),
    ("kernel-logger", B.kl_process(1), ["ProcessId", "ParentId"], ["CommandLine"]),
    ("kernel-logger", B.kl_process(2), ["ProcessId", "ExitStatus"], []),
    ("kernel-logger", B.kl_thread(1), ["ProcessId", "TThreadId"], []),
    ("kernel-logger", B.kl_thread(2), ["ProcessId", "TThreadId"], []),
    ("kernel-logger", B.kl_image(10), ["ProcessId", "ImageBase", "ImageSize"], ["FileName"]),
]
CASES = [(kind, event, name, numeric) for kind, event, numbers, texts in REQUIRED
         for name, numeric in [(n, True) for n in numbers] + [(t, False) for t in texts]]


@pytest.mark.parametrize("kind, event, name, numeric", CASES, ids=[f"{c[0]}-{c[1][1]['Task Name']}-{c[2]}"
                                                                     for c in CASES])
def test_malformed_fields_drop_the_event(kind, event, name, numeric):
    assert len(to_records(event)) == 1  # the intact event maps
    with pytest.raises(EtwEventError, match=name):
        to_records(B.without(event, name))
    with pytest.raises(EtwEventError, match=name):
        to_records(B.replaced(event, name, None))  # what pywintrace gives for a field TDH failed on
    if numeric:
        for bad in ["", " ", "abc", "0x", "0xZZ", "1_000", "12.5", "0o17", "1e3", "--5", "5 5", "\u0665"]:
            with pytest.raises(EtwEventError, match=name):
                to_records(B.replaced(event, name, bad))


@pytest.mark.parametrize("name, value", [
    ("ProcessID", "-5"), ("ProcessID", "4294967296"), ("ProcessID", "0x100000000"),
    ("ParentProcessID", "-1"),
])
def test_out_of_range_ids(name, value):
    with pytest.raises(EtwEventError, match="out of range"):
        to_records(B.replaced(B.kp_process_start(), name, value))


def test_out_of_range_sizes_and_codes():
    with pytest.raises(EtwEventError, match="out of range"):
        to_records(B.replaced(B.kp_image_load(), "ImageSize", "0x100000000"))
    with pytest.raises(EtwEventError, match="out of range"):
        to_records(B.replaced(B.kp_image_load(), "ImageBase", "0x10000000000000000"))
    for code in ["4294967296", "-2147483649"]:
        with pytest.raises(EtwEventError, match="32 bits"):
            to_records(B.kp_process_stop(exit_code_text=code))


@pytest.mark.parametrize("header_field", ["TimeStamp", "ProcessId", "ThreadId", "ProviderId"])
def test_malformed_header(header_field):
    with pytest.raises(EtwEventError, match=header_field):
        to_records(B.without(B.kp_process_start(), header_field, in_header=True))


def test_malformed_shapes():
    for event in [None, 42, "x", (1,), (1, 2, 3), ("1", {}), (True, {}), (1, []), (1, {}), (1, {"EventHeader": 5})]:
        with pytest.raises(EtwEventError):
            to_records(event)
    with pytest.raises(EtwEventError, match="TimeStamp"):
        to_records(B.replaced(B.kp_process_stop(), "TimeStamp", -1, in_header=True))
    with pytest.raises(EtwEventError, match="EventDescriptor"):
        to_records(B.without(B.kl_process(), "EventDescriptor", in_header=True))


# --- NT paths -----------------------------------------------------------------------------------------------


def test_nt_path_mapper():
    calls = []

    def query(drive):
        calls.append(drive)
        return DRIVES.get(drive)

    mapper = NtPathMapper(query_dos_device=query, system_root="C:\\Windows")
    assert mapper("\\Device\\HarddiskVolume3\\Windows\\notepad.exe") == "C:\\Windows\\notepad.exe"
    assert mapper("\\device\\harddiskvolume3\\x") == "C:\\x"  # NT names are case-insensitive
    assert mapper("\\Device\\HarddiskVolume10\\a.dll") == "D:\\a.dll"  # not Volume1 + "0"
    assert mapper("\\Device\\HarddiskVolume1\\a.dll") == "E:\\a.dll"
    assert mapper("\\Device\\HarddiskVolume1") == "\\Device\\HarddiskVolume1"  # the device itself: no file
    assert mapper("\\SystemRoot\\System32\\drivers\\tcpip.sys") == "C:\\Windows\\System32\\drivers\\tcpip.sys"
    assert mapper("\\??\\C:\\Windows\\system32\\conhost.exe") == "C:\\Windows\\system32\\conhost.exe"
    assert mapper("C:\\already.exe") == "C:\\already.exe"
    assert mapper("notepad.exe") == "notepad.exe"
    assert len(calls) == 26  # the drive table is read once, not per path


def test_nt_path_mapper_rereads_drives_for_an_unknown_device_at_most_every_interval():
    drives = dict(DRIVES)
    now = [100.0]
    mapper = NtPathMapper(query_dos_device=drives.get, system_root=None, refresh_seconds=5.0, clock=lambda: now[0])
    usb = "\\Device\\HarddiskVolume7\\tool.exe"
    assert mapper(usb) == usb
    drives["F:"] = "\\Device\\HarddiskVolume7"  # a USB stick plugged in
    now[0] += 1.0
    assert mapper(usb) == usb  # too soon to look again
    now[0] += 5.0
    assert mapper(usb) == "F:\\tool.exe"
    assert mapper("\\SystemRoot\\x") == "\\SystemRoot\\x"  # no SystemRoot known: left alone


def test_nt_path_mapper_survives_a_failing_drive_and_no_windows():
    def query(drive):
        if drive == "A:":
            raise OSError("floppy on fire")
        return DRIVES.get(drive)

    assert NtPathMapper(query_dos_device=query)("\\Device\\HarddiskVolume3\\x") == "C:\\x"
    nowhere = NtPathMapper(system_root="")  # the real QueryDosDeviceW: absent on Linux
    assert nowhere("\\Device\\HarddiskVolume3\\x") == "\\Device\\HarddiskVolume3\\x"


# --- where it can run ---------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="checks the message on a non-Windows machine")
def test_monitor_etw_off_windows_says_windows_and_the_extra():
    reason = EtwSource.unavailable_reason()
    assert "Windows" in reason and 'pip install -e ".[etw]"' in reason and "netlink" in reason
    with pytest.raises(etwmon.SourceUnavailable, match=r"Windows.*pip install -e \"\.\[etw\]\""):
        etwmon.Monitor(source="etw").start()
    with pytest.raises(etwmon.SourceUnavailable, match=r"Windows.*pip install -e \"\.\[etw\]\""):
        etwmon.Monitor(source=EtwSource()).start()  # a Source object is opened directly: same check


def test_reasons_on_windows(monkeypatch):
    monkeypatch.setattr(E, "_platform", lambda: "win32")
    monkeypatch.setattr(E, "_windows_version", lambda: (10, 0, 19045))
    monkeypatch.setattr(E, "_pywintrace_installed", lambda: False)
    monkeypatch.setattr(E, "_is_elevated", lambda: False)
    assert 'pip install -e ".[etw]"' in EtwSource.unavailable_reason()
    monkeypatch.setattr(E, "_pywintrace_installed", lambda: True)
    assert "elevated (administrator) prompt" in EtwSource.unavailable_reason()
    monkeypatch.setattr(E, "_is_elevated", lambda: True)
    assert EtwSource.unavailable_reason() is None


def test_importing_the_module_does_not_import_pywintrace():
    code = ("import sys, etwmon.sources.etw as e; s = e.EtwSource(); e.EtwSource.unavailable_reason(); "
            "assert 'etw' not in sys.modules, 'etw imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_options():
    assert EtwSource().mode == "kernel-logger" == E.DEFAULT_MODE
    assert "command_line" in EtwSource().delivers
    assert "command_line" not in EtwSource("kernel-process").delivers
    assert "image_load" not in EtwSource(images=False).delivers
    with pytest.raises(ValueError, match="unknown ETW mode"):
        EtwSource("kernel")
    with pytest.raises(ValueError, match="rundown"):
        EtwSource("kernel-process", rundown=True)
    with pytest.raises(ValueError, match="kernel-logger"):
        EtwSource("kernel-process", session_name="NT Kernel Logger")
    for size in [0, 3, 20000, 64.0, True]:
        with pytest.raises(ValueError, match="buffer_kb"):
            EtwSource(buffer_kb=size)
    with pytest.raises(TypeError):
        EtwSource(colour="blue")


# --- the session, with a fake pywintrace --------------------------------------------------------------------


@pytest.fixture
def windows(monkeypatch):
    """An elevated Windows with pywintrace installed, as far as the ETW source can tell."""
    world = FakeEtwWorld()
    for name, module in world.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    for name, value in world.seams().items():
        monkeypatch.setattr(E, name, value)
    world.processes[os.getpid()] = OWN_START
    monkeypatch.setattr(E, "_own_start", None)
    monkeypatch.setattr(E, "_LEFT_RUNNING", set())
    yield world
    # Whatever a failed test left running: stop it, or pytest would wait forever for the non-daemon threads.
    for session in world.created:
        consumer = session.consumer
        if consumer is not None and consumer.process_thread is not None and consumer.process_thread.is_alive():
            consumer.stop()
    with E._LIVE_LOCK:
        E._LIVE.clear()


def read_events(mon: etwmon.Monitor, count: int, timeout: float = 30.0) -> list[etwmon.Event]:
    return read_until(mon, lambda events: len(events) >= count, timeout)


def only_session(world: FakeEtwWorld):
    assert len(world.sessions) == 1, world.sessions
    return next(iter(world.sessions.items()))


def no_fake_consumer_threads_left() -> bool:
    return not [t for t in threading.enumerate() if t.name == "fake-ProcessTrace"]


def test_kernel_process_session_end_to_end(windows):
    source = EtwSource("kernel-process", map_path=MAPPER)
    with etwmon.Monitor(source=source, identity=False) as mon:  # the source's own records
        name, session = only_session(windows)
        assert re.fullmatch(rf"etwmon-{os.getpid()}-{OWN_START:x}-\d+", name) and source.session_name == name
        (provider,) = session.providers
        assert provider.guid == FakeGUID(E.KERNEL_PROCESS_GUID)
        assert (provider.level, provider.any_bitmask, provider.all_bitmask) == (4, 0x10 | 0x20 | 0x40, 0)
        assert windows.enabled == [(name, provider)]
        props = session.properties.get().contents
        assert props.BufferSize == 256 and props.FlushTimer == 1 and session.ignore_exists_error is False
        windows.emit(
            B.kp_process_start(version=2, pid=6312, ppid=4420, image=NOTEPAD_NT, creating_pid=4420, creating_tid=77),
            B.kp_thread_start(pid=6312, tid=7720, timestamp=T0 + 1),
            B.kp_image_load(pid=6312, timestamp=T0 + 2),
            B.kp_image_load(event_id=6),  # unload: no record
            B.replaced(B.kp_process_stop(), "ExitCode", "n/a"),  # malformed: counted
            B.kp_thread_stop(pid=6312, tid=7720, timestamp=T0 + 3),
            B.kp_process_stop(pid=6312, exit_code=0xC0000005, timestamp=T0 + 4),
        )
        events = read_events(mon, 5)
        assert events == [
            ProcessCreate(T0, 6312, 4420, 4420, 77, NOTEPAD),
            ThreadCreate(T0 + 1, 7720, 6312),
            ImageLoad(T0 + 2, 6312, 0x1F8000, 0x7FFB1C200000, "C:\\Windows\\System32\\ntdll.dll"),
            ThreadExit(T0 + 3, 7720, 6312, EXIT_CODE_UNKNOWN),
            ProcessExit(T0 + 4, 6312, 0xC0000005),
        ]
        windows.drain()
        stats = source.stats()
        assert (stats["events"], stats["records"], stats["ignored"], stats["parse_errors"], stats["lost"]) == \
            (7, 5, 1, 1, 0)
        assert mon.stats.parse_errors == 1 and mon.stats.source == "etw"
    assert windows.sessions == {} and windows.stopped == [name]
    assert not session.consumer.process_thread.is_alive()
    assert source not in E._LIVE and windows.callback_errors == []


def test_kernel_process_without_images(windows):
    with etwmon.Monitor(source=EtwSource("kernel-process", images=False)):
        _, session = only_session(windows)
        assert session.providers[0].any_bitmask == 0x30


def test_private_kernel_logger_sessions(windows):
    first, second = EtwSource(map_path=MAPPER), EtwSource(images=False, buffer_kb=128)
    with etwmon.Monitor(source=first, identity=False) as mon, etwmon.Monitor(source=second, identity=False):
        assert len(windows.sessions) == 2  # private sessions live side by side
        one_session, other = windows.sessions[first.session_name], windows.sessions[second.session_name]
        for session, flags, kb in ((one_session, 0x7, 256), (other, 0x3, 128)):
            props = session.properties.get().contents
            assert session.providers == [] and props.EnableFlags == flags and props.BufferSize == kb
            assert props.FlushTimer == 1
            assert props.LogFileMode & E.EVENT_TRACE_SYSTEM_LOGGER_MODE and props.LogFileMode & 0x100
            assert props.Wnode.Guid not in (FakeGUID(E.SYSTEM_TRACE_CONTROL_GUID), FakeGUID())
        assert one_session.properties.get().contents.Wnode.Guid != other.properties.get().contents.Wnode.Guid
        command_line = '"C:\\Program Files\\App\\app.exe" --flag "a b"'
        windows.emit(
            B.kl_process(3, pid=0x2A0),  # rundown: left out
            B.kl_process(1, pid=0x18A8, ppid=0x1144, command_line=command_line, creating_pid=0x1144,
                         creating_tid=0x99),
            B.kl_thread(1, pid=0x18A8, tid=0x1E28),
            B.kl_image(10, pid=0x18A8),
            B.kl_image(2, pid=0x18A8),  # unload
            B.kl_thread(2, pid=0x18A8, tid=0x1E28),
            B.kl_process(2, pid=0x18A8, exit_status=1),
            session=first.session_name)
        events = read_events(mon, 5)
        assert [type(e) for e in events] == [ProcessCreate, ThreadCreate, ImageLoad, ThreadExit, ProcessExit]
        assert events[0] == ProcessCreate(T0, 0x18A8, 0x1144, 0x1144, 0x99, command_line)
        assert events[2].image_name == "C:\\Windows\\System32\\ntdll.dll"
        assert events[4] == ProcessExit(T0, 0x18A8, 1)
        windows.drain(first.session_name)
        assert first.stats()["ignored"] == 2
    assert windows.sessions == {} and sorted(windows.stopped) == sorted([first.session_name, second.session_name])


def test_kernel_logger_rundown_records(windows):
    with etwmon.Monitor(source=EtwSource(rundown=True)) as mon:
        windows.emit(B.kl_process(3, pid=0x2A0, ppid=0x1F4), B.kl_thread(3, pid=0x2A0, tid=0x2A4),
                     B.kl_process(4, pid=0x2A0))
        events = read_events(mon, 2)
        assert [(type(e), e.pid) for e in events] == [(ProcessCreate, 0x2A0), (ThreadCreate, 0x2A0)]
        assert (events[0].creating_pid, events[0].creating_tid) == (0, 0)


def test_the_shared_nt_kernel_logger(windows):
    source = EtwSource(session_name="NT Kernel Logger")
    with etwmon.Monitor(source=source):
        name, session = only_session(windows)
        assert name == "NT Kernel Logger"
        (provider,) = session.providers
        assert provider.guid == FakeGUID(E.SYSTEM_TRACE_CONTROL_GUID) and provider.any_bitmask == 0x7
        assert session.properties.get().contents.EnableFlags == 0x7
        assert session.properties.get().contents.FlushTimer == 1
    assert windows.sessions == {} and windows.stopped == ["NT Kernel Logger"]


def test_the_shared_nt_kernel_logger_already_running_is_left_alone(windows):
    someone_else = object()
    windows.sessions["NT Kernel Logger"] = someone_else
    with pytest.raises(etwmon.SourceUnavailable, match=r"NT Kernel Logger is already running.*logman stop"):
        etwmon.Monitor(source=EtwSource(session_name="nt kernel logger")).start()
    assert windows.sessions == {"NT Kernel Logger": someone_else} and windows.stopped == []
    assert no_fake_consumer_threads_left() and not E._LIVE


@pytest.mark.parametrize("code, message", [
    (5, "elevated"), (1450, r"logman query -ets.*kernel-process"), (87, "docs/windows.md")])
def test_start_trace_failure(windows, code, message):
    windows.start_error = FakeWinError(code)
    with pytest.raises(etwmon.SourceUnavailable, match=message):
        etwmon.Monitor(source=EtwSource()).start()
    assert windows.sessions == {} and no_fake_consumer_threads_left() and not E._LIVE


def test_a_session_started_then_failing_to_enable_is_stopped(windows):
    windows.enable_error = FakeWinError(1450)
    source = EtwSource("kernel-process")
    with pytest.raises(etwmon.SourceUnavailable, match="no free ETW session"):
        etwmon.Monitor(source=source).start()
    assert windows.sessions == {} and windows.stopped == [source.session_name]
    assert no_fake_consumer_threads_left() and not E._LIVE


def test_our_name_taken(windows):
    windows.sessions["etwmon-fixed"] = object()
    with pytest.raises(etwmon.SourceUnavailable, match="logman stop etwmon-fixed -ets"):
        etwmon.Monitor(source=EtwSource("kernel-process", session_name="etwmon-fixed")).start()
    assert list(windows.sessions) == ["etwmon-fixed"] and windows.stopped == []


def test_stop_is_etwmons_own_checked_stop_not_pywintraces(windows):
    # pywintrace's ETW.stop() raises half-way when EnableTraceEx2(DISABLE) fails and never stops its reader; etwmon
    # stops the session by name itself (ControlTraceW STOP, checked), then the reader.
    source = EtwSource("kernel-process")
    mon = etwmon.Monitor(source=source).start()
    name, session = only_session(windows)
    windows.provider_stop_error = FakeWinError(5)
    mon.stop()
    assert windows.sessions == {} and windows.stopped == [name] and windows.readers_stopped == [name]
    assert not session.consumer.process_thread.is_alive() and source.stats()["left_running"] == 0


class KeepingSink(ListSink):
    """A ListSink that also keeps the objects as the source pushed them (EtwRecords, with their attributes)."""

    def __init__(self, lost_error: BaseException | None = None) -> None:
        super().__init__(lost_error)
        self.objects: list[bytes] = []

    def push(self, record: bytes) -> None:
        super().push(record)
        self.objects.append(record)


def run_in_thread(source: EtwSource, sink) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target():
        try:
            source.run(sink)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, errors


def test_session_is_stopped_when_run_fails(windows):
    source = EtwSource("kernel-process", loss_poll_seconds=0.01)
    source.open()
    name, _ = only_session(windows)
    windows.lost[name] = (3, 0)
    thread, errors = run_in_thread(source, ListSink(lost_error=RuntimeError("sink on fire")))
    thread.join(30)
    assert not thread.is_alive() and [str(e) for e in errors] == ["sink on fire"]
    assert windows.sessions == {} and windows.stopped == [name] and no_fake_consumer_threads_left()


def test_events_before_run_are_kept_and_counted_past_the_limit(windows, monkeypatch):
    monkeypatch.setattr(E, "_PENDING_LIMIT", 2)
    source = EtwSource("kernel-process")
    source.open()
    windows.emit(*(B.kp_process_stop(pid=pid) for pid in (10, 11, 12)))
    windows.drain()
    sink = ListSink()
    thread, errors = run_in_thread(source, sink)
    deadline = time.monotonic() + 30
    while not sink.lost and time.monotonic() < deadline:
        time.sleep(0.01)
    source.stop()
    thread.join(30)
    assert not thread.is_alive() and errors == []
    assert [e.pid for r in sink.records for e in parse(r)] == [10, 11] and sink.lost == [1] and sink.notified
    assert source.stats()["lost"] == 1 and source.stats()["pending_lost"] == 1
    assert windows.sessions == {}


def test_losses_etw_reports_reach_the_stream_once(windows):
    source = EtwSource("kernel-process", loss_poll_seconds=0.01)
    with etwmon.Monitor(source=source) as mon:
        name, _ = only_session(windows)

        def lost_count():
            return sum(e.count for e in read_events(mon, 1, timeout=0.5) if isinstance(e, RecordsLost))

        windows.lost[name] = (5, 2)
        seen = 0
        deadline = time.monotonic() + 30
        while seen < 7 and time.monotonic() < deadline:
            seen += lost_count()
        assert seen == 7
        windows.query_errors = [5, 5, 5]  # failed queries: no reset, no double count when one works again
        windows.lost[name] = (6, 2)
        while seen < 8 and time.monotonic() < deadline:
            seen += lost_count()
        assert seen == 8
        stats = source.stats()
        assert (stats["events_lost"], stats["buffers_lost"], stats["lost"]) == (6, 2, 8)
        assert mon.stats.lost == 8


def test_losses_add_up_over_restarts(windows, monkeypatch):
    # Each session's ETW counters start from zero, and what was held past the limit is reported once.
    monkeypatch.setattr(E, "_PENDING_LIMIT", 1)
    source = EtwSource("kernel-process", loss_poll_seconds=0.01)
    sinks = []
    for events_lost in (4, 3):
        source.open()
        name, _ = only_session(windows)
        windows.emit(B.kp_process_stop(pid=1), B.kp_process_stop(pid=2))  # one held, one past the limit
        windows.drain()
        windows.lost[name] = (events_lost, 0)
        sink = ListSink()
        thread, errors = run_in_thread(source, sink)
        deadline = time.monotonic() + 30
        while sum(sink.lost) < 1 + events_lost and time.monotonic() < deadline:
            time.sleep(0.01)
        source.stop()
        thread.join(30)
        assert errors == [] and windows.sessions == {}
        sinks.append(sink)
    assert [sorted(s.lost) for s in sinks] == [[1, 4], [1, 3]]
    stats = source.stats()
    assert (stats["events_lost"], stats["pending_lost"], stats["lost"]) == (7, 2, 9)


def test_a_record_the_ring_refuses_is_counted_lost(windows):
    source = EtwSource("kernel-process")
    with etwmon.Monitor(source=source, max_bytes=600, identity=False) as mon:  # an ImageLoad record is 640 bytes
        windows.emit(B.kp_image_load(), B.kp_process_stop(pid=42))
        events = read_events(mon, 2)
        assert RecordsLost in [type(e) for e in events] and ProcessExit(T0, 42, 0) in events
        assert sum(e.count for e in events if isinstance(e, RecordsLost)) == 1
        assert source.stats()["refused"] == 1 and source.stats()["lost"] == 1


def test_the_callback_never_raises():
    def broken_mapper(path):
        raise RuntimeError("mapper bug")

    source = EtwSource("kernel-process", map_path=broken_mapper)
    garbage = [None, 42, (1,), ("x", {}), (1, {"EventHeader": None}), (1, {"EventHeader": {}}),
               B.replaced(B.kp_process_start(), "ProcessID", "six"), B.kp_image_load()]
    for event in garbage:
        source._on_event(event)  # pywintrace's thread calls this; nothing may escape
    assert source.stats()["parse_errors"] == len(garbage) and source.stats()["records"] == 0


def test_stop_and_restart_leave_nothing_behind(windows):
    source = EtwSource("kernel-process")
    names = []
    for _ in range(3):
        with etwmon.Monitor(source=source) as mon:
            names.append(only_session(windows)[0])
            windows.emit(B.kp_process_stop(pid=7))
            assert [e.pid for e in read_events(mon, 1)] == [7]
        assert windows.sessions == {}
    assert len(set(names)) == 3 and windows.stopped == names
    assert no_fake_consumer_threads_left() and not E._LIVE


def test_open_then_close_without_run(windows):
    source = EtwSource()
    source.open()
    name, _ = only_session(windows)
    source.close()
    source.close()  # idempotent
    assert windows.sessions == {} and windows.stopped == [name] and no_fake_consumer_threads_left()


def test_exit_hooks_are_installed_and_stop_every_session(windows, monkeypatch):
    registered = []
    monkeypatch.setattr(E, "_exit_hook_installed", False)
    monkeypatch.setattr(threading, "_register_atexit", lambda fn: registered.append(("threading", fn)),
                        raising=False)
    monkeypatch.setattr(atexit, "register", lambda fn: registered.append(("atexit", fn)))
    first, second = EtwSource(), EtwSource("kernel-process")
    first.open()
    second.open()
    assert registered == [("threading", E._stop_all_sessions), ("atexit", E._stop_all_sessions)]
    assert len(windows.sessions) == 2
    E._stop_all_sessions()
    assert windows.sessions == {} and no_fake_consumer_threads_left() and not E._LIVE


# --- a session that dies (issue 13, item 1) ------------------------------------------------------------------


def wait_for(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def read_until_error(mon: etwmon.Monitor, timeout: float = 30.0) -> etwmon.SourceError:
    buf = bytearray(0x10000)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            mon.wait(0.2)
            mon.readinto(buf)
        except etwmon.SourceError as exc:
            return exc
    raise AssertionError("the source did not fail")


@pytest.mark.parametrize("reader_ends", [False, True], ids=["reader-lives-on", "reader-ends"])
def test_a_session_stopped_from_outside_ends_the_source_naming_it(windows, reader_ends):
    source = EtwSource("kernel-process", loss_poll_seconds=0.01)
    with etwmon.Monitor(source=source) as mon:
        name, _ = only_session(windows)
        windows.emit(B.kp_process_stop(pid=7))
        assert [e.pid for e in read_events(mon, 1)] == [7]
        windows.kill(name, reader_ends=reader_ends)  # logman stop <name> -ets
        error = read_until_error(mon)
        assert name in str(error.__cause__) and wait_for(lambda: not mon.running)
        # What it lost between its last answer and its end cannot be known: the stats say so.
        assert source.stats()["loss_unknown"] == 1
    assert windows.readers_stopped == [name] and no_fake_consumer_threads_left() and not E._LIVE


def test_a_reader_thread_that_ends_ends_the_source_and_the_session(windows):
    # pywintrace's EventConsumer._run sets end_capture and returns when ProcessTrace fails: no word to anyone.
    source = EtwSource("kernel-process", loss_poll_seconds=0.01)
    with etwmon.Monitor(source=source) as mon:
        name, _ = only_session(windows)
        windows.end_reader(name)
        error = read_until_error(mon)
        assert re.search(rf"ETW session '{name}' delivers no more events", str(error.__cause__))
    assert windows.sessions == {} and windows.stopped == [name]  # and it does not hold a slot on


#: The start of a child process that plays Windows to the ETW source (``world`` is its FakeEtwWorld).
WINDOWS_PRELUDE = """
import os, signal, sys, threading, time
sys.path.insert(0, {repo!r})
import etwmon
from etwmon import cli
from etwmon.sources.etw import control as C
from etwmon.sources.etw import source as E
from tests.etw_builders import FakeEtwWorld

world = FakeEtwWorld()
sys.modules.update(world.modules())
for name, value in world.seams().items():
    setattr(E, name, value)
world.processes[os.getpid()] = 1
"""

TAIL_SCRIPT = WINDOWS_PRELUDE + textwrap.dedent("""
    def meanwhile():
        while not world.sessions:
            time.sleep(0.01)
        name = next(iter(world.sessions))
        if sys.argv[1] == "kill":
            world.kill(name)
        else:  # every query fails from now on, and so does the stop (whose final counters would tell); Ctrl-C
            world.stop_errors = [5]
            world.query_errors = [5] * 1_000_000
            while len(world.queries) < 1 or world.query_errors == [5] * 1_000_000:
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=meanwhile, daemon=True).start()
    sys.exit(cli.main(["tail", "--source", "etw"]))
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("how", ["kill", "query-fails"])
def test_tail_says_what_happened_to_the_session(tmp_path, how):
    script = tmp_path / "tail.py"
    script.write_text(TAIL_SCRIPT.format(repo=str(REPO)))
    out = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True, timeout=120)
    names = re.findall(r"etwmon-\d+-1-1", out.stderr)
    assert names, out.stderr
    if how == "kill":
        assert out.returncode == 1, out.stderr
        assert re.search(r"error: the event source failed: ETW session 'etwmon-\d+-1-1' is no longer running",
                         out.stderr), out.stderr
    else:
        assert out.returncode == 0, out.stderr
        assert "at least 0 missed (the source could not read all of its loss counters)" in out.stderr, out.stderr
        assert "is still running: stopping it failed" in out.stderr


# --- a stop that fails (item 2) ----------------------------------------------------------------------------


def test_a_failed_stop_is_reported_and_the_session_left_running_is_listed(windows, caplog):
    source = EtwSource("kernel-process")
    mon = etwmon.Monitor(source=source).start()
    name, session = only_session(windows)
    windows.stop_errors = [5]  # ControlTraceW(STOP) says ERROR_ACCESS_DENIED
    with caplog.at_level(logging.ERROR, logger="etwmon.sources.etw"):
        mon.stop()
    assert name in windows.sessions  # it is still running...
    assert f"ETW session '{name}' is still running" in caplog.text and f"logman stop {name} -ets" in caplog.text
    assert source.stats()["left_running"] == 1
    assert not session.consumer.process_thread.is_alive()  # ...but its reader is stopped all the same
    # ...and it is what `etwmon sources` shows and `etwmon cleanup` stops.
    (line,) = EtwSource.stale_state()
    assert name in line and "stopping it failed" in line
    assert EtwSource.cleanup() == [f"stopped ETW session '{name}' (stopping it failed earlier in this process)"]
    assert windows.sessions == {} and EtwSource.stale_state() == []


def test_a_session_already_gone_at_stop_is_not_a_failure(windows, caplog):
    source = EtwSource("kernel-process")
    source.open()
    name, _ = only_session(windows)
    windows.kill(name, reader_ends=False)
    with caplog.at_level(logging.INFO, logger="etwmon.sources.etw"):
        source.close()
    assert "had stopped already" in caplog.text and "still running" not in caplog.text
    assert source.stats()["left_running"] == 0 and no_fake_consumer_threads_left()


def test_a_start_that_fails_half_way_and_cannot_be_stopped_is_reported(windows, caplog):
    windows.enable_error = FakeWinError(1450)
    windows.stop_errors = [5]
    source = EtwSource("kernel-process")
    with caplog.at_level(logging.ERROR, logger="etwmon.sources.etw"), \
            pytest.raises(etwmon.SourceUnavailable, match="no free ETW session"):
        source.open()
    assert list(windows.sessions) == [source.session_name] and "still running" in caplog.text
    assert source.stats()["left_running"] == 1 and no_fake_consumer_threads_left()


# --- a query that fails (item 3) -----------------------------------------------------------------------------


def test_a_failing_query_warns_once_and_marks_the_loss_count_unknown(windows, caplog):
    source = EtwSource("kernel-process", loss_poll_seconds=0.01)
    assert source.stats()["loss_unknown"] == 0  # nothing opened: nothing that could have been lost
    source.open()
    assert source.stats()["loss_unknown"] == 1  # never queried yet: not "0 lost, exact"
    name, _ = only_session(windows)
    windows.query_errors = [5] * 20
    sink = ListSink()
    with caplog.at_level(logging.WARNING, logger="etwmon.sources.etw"):
        thread, errors = run_in_thread(source, sink)
        assert wait_for(lambda: source.stats()["query_failures"] >= 5)
        stats = source.stats()
        assert stats["loss_unknown"] == 1 and stats["lost"] == 0
        windows.lost[name] = (2, 1)  # lost while it did not answer
        assert wait_for(lambda: not windows.query_errors and sum(sink.lost) == 3)
        assert source.stats()["loss_unknown"] == 0  # ETW's counters only grow: caught up, complete again
        source.stop()
        thread.join(30)
    assert errors == [] and source.stats()["query_failures"] == 20
    assert caplog.text.count("loss count is unknown") == 1
    assert source.stats()["loss_unknown"] == 0  # the stop's final counters were read


def test_the_cli_summary_says_when_the_loss_count_is_unknown():
    from etwmon.tail import missed_text as lost_text
    from etwmon.monitor import MonitorStats

    known = MonitorStats(pushed=1, read=1, dropped=0, items=0, bytes=0, max_items=1, max_bytes=1, lost=3,
                         source_stats={"lost": 3, "loss_unknown": 0})
    unknown = MonitorStats(**{**vars(known), "source_stats": {"lost": 3, "loss_unknown": 1}})
    assert lost_text(known) == "3 missed"
    assert lost_text(unknown) == "at least 3 missed (the source could not read all of its loss counters)"


# --- sessions a killed etwmon left behind (item 4) -------------------------------------------------------------


def leftovers(world: FakeEtwWorld) -> dict[str, str]:
    """A machine after some crashes: name -> what should become of it."""
    world.processes.update({222: 0xABC, 333: 0xDEF})
    world.unknown_pids.add(444)
    plan = {
        "etwmon-111-abc-1": "stopped",  # its process is gone
        "etwmon-333-abc-2": "stopped",  # pid 333 now belongs to a process started at another time
        "etwmon-222-abc-1": "kept",  # another etwmon, alive, still reading it
        "etwmon-444-abc-1": "kept",  # Windows will not say whether 444 runs: leave it alone
        "etwmon-fixed": "kept",  # a session_name someone chose: not etwmon's own naming
        "NT Kernel Logger": "kept",
        "EventLog-System": "kept",
    }
    for name in plan:
        world.sessions[name] = B.OrphanSession(name)
    return plan


def test_stale_sessions_are_found_and_stopped_at_start(windows, caplog):
    plan = leftovers(windows)
    stale = sorted(EtwSource.stale_state())
    assert stale == [
        "ETW session 'etwmon-111-abc-1' is still running: process 111, which started it, is gone",
        "ETW session 'etwmon-333-abc-2' is still running: process 333, which started it, has exited and its pid "
        "was reused",
    ]
    assert sorted(windows.sessions) == sorted(plan)  # stale_state changes nothing
    with caplog.at_level(logging.WARNING, logger="etwmon.sources.etw"):
        with etwmon.Monitor(source=EtwSource("kernel-process")) as mon:
            assert sorted(windows.stopped) == ["etwmon-111-abc-1", "etwmon-333-abc-2"]
            assert mon.running
    assert "stopped ETW session 'etwmon-111-abc-1'" in caplog.text
    assert sorted(windows.sessions) == sorted(n for n, fate in plan.items() if fate == "kept")


def test_cleanup_stops_only_what_no_running_etwmon_reads(windows):
    live = EtwSource("kernel-process")
    live.open()  # this process's own session, live: never touched
    leftovers(windows)
    windows.processes[333] = 0xABC  # ...and 333 is the etwmon that started its session after all
    windows.stop_errors = [5]
    with pytest.raises(etwmon.Error) as info:  # `etwmon cleanup` exits non-zero with this
        EtwSource.cleanup()
    assert str(info.value) == (
        "could not stop ETW session 'etwmon-111-abc-1' (process 111, which started it, is gone): "
        "ControlTraceW(STOP, 'etwmon-111-abc-1') failed with Windows error 5 (access denied); try "
        "logman stop etwmon-111-abc-1 -ets")
    assert EtwSource.cleanup() == ["stopped ETW session 'etwmon-111-abc-1' (process 111, which started it, is gone)"]
    assert EtwSource.cleanup() == [] and EtwSource.stale_state() == []
    assert live.session_name in windows.sessions and "etwmon-333-abc-2" in windows.sessions
    live.close()


def test_etwmon_sources_shows_the_leftovers(windows, capsys):
    from etwmon import cli

    leftovers(windows)
    assert cli.main(["sources"]) == 0
    out = capsys.readouterr().out
    assert "stale: ETW session 'etwmon-111-abc-1' is still running: process 111, which started it, is gone" in out
    assert "etwmon-222-abc-1" not in out and "'etwmon cleanup' removes it" in out


def test_when_sessions_cannot_be_listed(windows, caplog):
    windows.list_error = 5
    assert EtwSource.stale_state() == ["cannot list the ETW sessions to look for leftovers: QueryAllTracesW "
                                       "failed with Windows error 5 (access denied)"]
    with pytest.raises(etwmon.Error, match="cannot list the ETW sessions.*QueryAllTracesW failed"):
        EtwSource.cleanup()
    with caplog.at_level(logging.WARNING, logger="etwmon.sources.etw"):
        with etwmon.Monitor(source=EtwSource("kernel-process")):  # starting is not blocked by it
            assert len(windows.sessions) == 1
    assert "cannot look for ETW sessions a killed etwmon left running" in caplog.text


def test_no_stale_state_off_windows():
    assert EtwSource.stale_state() == [] and EtwSource.cleanup() == []


# --- the Windows version (item 6) ----------------------------------------------------------------------------


def test_windows_before_8_is_refused_with_the_reason(windows, monkeypatch):
    monkeypatch.setattr(E, "_windows_version", lambda: (6, 1, 7601))
    reason = EtwSource.unavailable_reason()
    assert "needs Windows 8 or later" in reason and "6.1.7601" in reason
    with pytest.raises(etwmon.SourceUnavailable, match="Windows 8"):
        etwmon.Monitor(source=EtwSource()).start()
    assert windows.created == []  # refused before anything started
    monkeypatch.setattr(E, "_windows_version", lambda: (6, 2, 9200))
    assert EtwSource.unavailable_reason() is None


# --- checked ControlTraceW / QueryAllTracesW over real EVENT_TRACE_PROPERTIES memory ------------------------


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="the x64 layout")
def test_event_trace_properties_layout_is_evntrace_h_on_x64():
    assert ctypes.sizeof(C._WNODE_HEADER) == 48 and ctypes.sizeof(C._EVENT_TRACE_PROPERTIES) == 120
    offsets = {name: getattr(C._EVENT_TRACE_PROPERTIES, name).offset for name in
               ("BufferSize", "FlushTimer", "EventsLost", "RealTimeBuffersLost", "LoggerThreadId",
                "LogFileNameOffset", "LoggerNameOffset")}
    assert offsets == {"BufferSize": 48, "FlushTimer": 68, "EventsLost": 88, "RealTimeBuffersLost": 100,
                       "LoggerThreadId": 104, "LogFileNameOffset": 112, "LoggerNameOffset": 116}


def test_trace_control_query_and_stop_check_the_status():
    api = B.FakeAdvapi32({"etwmon-1-2-3": {"EventsLost": 5, "RealTimeBuffersLost": 2, "FlushTimer": 1,
                                           "BufferSize": 64}})
    control = C.TraceControl(api)
    guid = "{0A1B2C3D-4E5F-4071-8293-A4B5C6D7E8F9}"
    assert control.query("etwmon-1-2-3", guid) == C.SessionStatus("etwmon-1-2-3", 5, 2, 1, 0, 64)
    assert api.calls[-1] == ("ControlTraceW", 0, "etwmon-1-2-3", 0, C.uuid.UUID(guid).bytes_le)
    api.status = 5
    with pytest.raises(C.SessionControlError, match="QUERY.*error 5 \\(access denied\\)") as info:
        control.query("etwmon-1-2-3")  # pywintrace's query() would have returned zeros here
    assert info.value.winerror == 5
    api.status = C.ERROR_MORE_DATA
    assert control.stop("etwmon-1-2-3") is None  # stopped, the final counters did not fit
    api.status = None
    assert control.stop("etwmon-1-2-3").events_lost == 5 and api.sessions == {}
    for call in (control.query, control.stop):
        with pytest.raises(C.SessionControlError) as info:
            call("etwmon-1-2-3")
        assert info.value.winerror == E.ERROR_WMI_INSTANCE_NOT_FOUND


@pytest.mark.parametrize("count", [0, 3, 64, 70])
def test_trace_control_lists_every_session(count):
    names = [f"etwmon-{i}-abc-1" for i in range(count - 1)] + ["NT Kernel Logger"] * (count > 0)
    api = B.FakeAdvapi32({name: {"EventsLost": 0} for name in names})
    assert C.TraceControl(api).sessions() == names
    api.status = 5
    with pytest.raises(C.SessionControlError, match="QueryAllTracesW"):
        C.TraceControl(api).sessions()


def test_trace_control_needs_windows_only_when_called():
    control = C.TraceControl()  # creating it is fine anywhere
    if sys.platform != "win32":
        with pytest.raises(AttributeError):
            control.sessions()


# --- event shapes of both pywintrace versions (item 7) ----------------------------------------------------------

REPLAY = [
    B.kp_process_start(version=3), B.kp_process_start(version=0), B.kp_process_stop(exit_code=0xC0000005),
    B.kp_thread_start(), B.kp_thread_stop(), B.kp_image_load(),
    B.kl_process(1), B.kl_process(2, exit_status=0xC000013A), B.kl_thread(1), B.kl_thread(2), B.kl_image(10),
    B.kl_process(3), B.kp_image_load(event_id=6), B.classic_event(B.DISK_IO, 10, 3, {"DiskNumber": "0"}, "DISKIO"),
]


@pytest.mark.parametrize("event", REPLAY, ids=[f"{e[1]['Task Name']}-{i}" for i, e in enumerate(REPLAY)])
@pytest.mark.parametrize("shape", ["0.3.0", "0.3.0-ids-as-strings", "0.3.0-nt-kernel-logger"])
def test_pywintrace_030_shapes_give_the_same_records_as_020(event, shape):
    strings = ("ProcessID", "ParentProcessID", "ThreadID") if shape == "0.3.0-ids-as-strings" else ()
    session = "NT Kernel Logger" if shape == "0.3.0-nt-kernel-logger" else "etwmon-1-1-1"
    typed = B.pywintrace_030(event, session_name=session, strings=strings)
    assert to_records(typed, rundown=True) == to_records(event, rundown=True)


def test_pywintrace_030_shape_is_what_the_test_claims():
    event_id, out = B.pywintrace_030(B.kl_process(2, exit_status=0xC0000005), session_name="NT Kernel Logger")
    assert event_id == 2 and out["ExitStatus"] == -1073741819 and out["ProcessId"] == "0x18A8"
    assert one((event_id, out)) == ProcessExit(T0, 0x18A8, 0xC0000005)
    _, out = B.pywintrace_030(B.kp_process_start(pid=6312))
    assert out["ProcessID"] == 6312 and out["ProcessSequenceNumber"] == 1234 and isinstance(out["ImageName"], str)


def test_both_providers_in_one_stream(windows):
    # No mode needed to read an event: each names its provider. (A kernel-process session gets no classic events
    # on Windows; this shows the reading does not depend on the session.)
    source = EtwSource("kernel-process", map_path=MAPPER)
    with etwmon.Monitor(source=source, identity=False) as mon:  # the source's own records
        windows.emit(B.kl_process(1, pid=0x18A8, ppid=0x1144, command_line="app.exe -x"),
                     B.pywintrace_030(B.kp_process_stop(pid=6312, exit_code=3)), B.kl_thread(2, pid=1, tid=2))
        events = read_events(mon, 3)
    assert [type(e) for e in events] == [ProcessCreate, ProcessExit, ThreadExit]
    assert events[0].command_line == "app.exe -x" and events[1] == ProcessExit(T0, 6312, 3)


def test_kernel_process_sequence_numbers_are_kept_on_the_records():
    (start,) = to_records(B.kp_process_start(version=3))
    assert isinstance(start, E.EtwRecord) and isinstance(start, bytes)
    assert (start.process_sequence_number, start.parent_process_sequence_number) == (1234, 1200)
    (start_030,) = to_records(B.pywintrace_030(B.kp_process_start(version=3)))
    assert (start_030.process_sequence_number, start_030.parent_process_sequence_number) == (1234, 1200)
    (stop,) = to_records(B.kp_process_stop(version=2))
    assert (stop.process_sequence_number, stop.parent_process_sequence_number) == (1234, None)
    for event in (B.kp_process_start(version=2), B.kp_process_stop(version=1), B.kl_process(1), B.kp_thread_start()):
        (record,) = to_records(event)
        assert (record.process_sequence_number, record.parent_process_sequence_number) == (None, None)
    # A sequence number TDH could not format is unknown, and the event still counts.
    (unformatted,) = to_records(B.replaced(B.kp_process_start(version=3), "ProcessSequenceNumber", None))
    assert unformatted.process_sequence_number is None and unformatted.parent_process_sequence_number == 1200
    assert list(parse(start)) == list(parse(bytes(start)))  # the bytes are the record, unchanged


def test_the_source_pushes_the_sequence_numbers_to_its_sink(windows):
    source = EtwSource("kernel-process")
    source.open()
    windows.emit(B.kp_process_start(version=3, pid=50))
    windows.drain()
    sink = KeepingSink()
    thread, errors = run_in_thread(source, sink)
    assert wait_for(lambda: sink.objects)
    source.stop()
    thread.join(30)
    (record,) = sink.objects
    assert record.process_sequence_number == 1234 and record.parent_process_sequence_number == 1200


# --- leaving no session behind when the interpreter goes -----------------------------------------------------

EXIT_SCRIPT = WINDOWS_PRELUDE + textwrap.dedent("""
    if sys.argv[1] == "no-threading-hook":
        del threading._register_atexit
    world.on_stop = lambda name: print("stopped", name, flush=True)
    mon = etwmon.Monitor(source=E.EtwSource("kernel-process"))
    mon.start()
    print("started", *world.sessions, flush=True)
    if sys.argv[1] == "wait":
        while True:
            mon.wait(0.2)
    # else: leave without stopping anything
""")


def exit_script(tmp_path: Path) -> Path:
    path = tmp_path / "leave.py"
    path.write_text(EXIT_SCRIPT.format(repo=str(REPO)))
    return path


def test_interpreter_exit_stops_the_session(tmp_path):
    out = subprocess.run([sys.executable, str(exit_script(tmp_path)), "exit"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    started, stopped = out.stdout.split("\n")[:2]
    name = started.split()[1]
    assert name.startswith("etwmon-") and stopped == f"stopped {name}"


def test_without_the_threading_hook_exit_would_hang(tmp_path):
    # The control for the test above: pywintrace's consumer thread is not a daemon, and the interpreter joins such
    # threads before atexit handlers run, so atexit alone never gets to stop the session. (It never returns, so
    # the short timeout does not depend on this machine's speed.)
    with pytest.raises(subprocess.TimeoutExpired) as info:
        subprocess.run([sys.executable, str(exit_script(tmp_path)), "no-threading-hook"], capture_output=True,
                       text=True, timeout=8)
    assert b"started" in info.value.stdout and b"stopped" not in info.value.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_stops_the_session(tmp_path):
    child = subprocess.Popen([sys.executable, str(exit_script(tmp_path)), "wait"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        started = child.stdout.readline()
        assert started.startswith("started etwmon-"), child.stderr.read()
        child.send_signal(signal.SIGINT)
        stdout, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
    assert stdout.strip() == f"stopped {started.split()[1]}" and "KeyboardInterrupt" in stderr


# --- importing pywintrace -----------------------------------------------------------------------------------

FAKE_PACKAGE = {
    "__init__.py": """
        import logging
        logging.basicConfig(level=logging.ERROR)  # what pywintrace's etw/common.py:59 does at import
        HANDLERS_AFTER_IMPORT = list(logging.getLogger().handlers)
        from etw.etw import ETW, ProviderInfo
        class GUID:
            pass
    """,
    "etw.py": """
        class ETW:
            pass
        class ProviderInfo:
            pass
        class TraceProperties:
            pass
    """,
}


def write_package(root: Path, files: dict[str, str]) -> None:
    (root / "etw").mkdir()
    for name, text in files.items():
        (root / "etw" / name).write_text(textwrap.dedent(text))


def test_importing_pywintrace_leaves_the_applications_logging_alone(tmp_path, monkeypatch):
    write_package(tmp_path, FAKE_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "etw", raising=False)
    monkeypatch.delitem(sys.modules, "etw.etw", raising=False)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # an application that has not configured logging yet
    monkeypatch.setattr(root, "level", logging.WARNING)
    etw, trace_properties = E._import_pywintrace()
    assert len(etw.HANDLERS_AFTER_IMPORT) == 1  # the import did configure the root logger...
    assert root.handlers == [] and root.level == logging.WARNING  # ...and that was undone
    assert trace_properties.__name__ == "TraceProperties"
    sys.modules.pop("etw", None), sys.modules.pop("etw.etw", None)


def test_an_etw_module_that_is_not_pywintrace(tmp_path, monkeypatch):
    write_package(tmp_path, {"__init__.py": "", "etw.py": "class TraceProperties:\n    pass\n"})
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "etw", raising=False)
    monkeypatch.delitem(sys.modules, "etw.etw", raising=False)
    with pytest.raises(etwmon.SourceUnavailable, match=r"not pywintrace.*pip install -e \"\.\[etw\]\""):
        E._import_pywintrace()
    sys.modules.pop("etw", None), sys.modules.pop("etw.etw", None)


# --- buffers: sized for a burst of process starts, memory said -----------------------------------------------


@pytest.mark.parametrize("mode", E.MODES)
@pytest.mark.parametrize("cpus, minimum, maximum", [(1, 8, 56), (4, 8, 56), (8, 16, 64), (64, 128, 176)])
def test_sessions_get_256_kib_buffers_and_a_pool_sized_by_cpus(windows, monkeypatch, mode, cpus, minimum, maximum):
    monkeypatch.setattr(E, "_cpu_count", lambda: cpus)
    source = EtwSource(mode)
    with etwmon.Monitor(source=source, identity=False):
        _, session = only_session(windows)
        props = session.properties.get().contents
        assert (props.BufferSize, props.MinimumBuffers, props.MaximumBuffers) == (256, minimum, maximum)
        stats = source.stats()
        assert (stats["buffer_kb"], stats["min_buffers"], stats["max_buffers"]) == (256, minimum, maximum)
        assert stats["buffer_memory_max"] == maximum * 256 * 1024


def test_buffer_counts_can_be_chosen_and_nonsense_is_refused(windows):
    source = EtwSource("kernel-process", buffer_kb=1024, min_buffers=20, max_buffers=200)
    with etwmon.Monitor(source=source, identity=False):
        _, session = only_session(windows)
        props = session.properties.get().contents
        assert (props.BufferSize, props.MinimumBuffers, props.MaximumBuffers) == (1024, 20, 200)
    for bad in (dict(min_buffers=1), dict(max_buffers=1), dict(min_buffers=30, max_buffers=20),
                dict(min_buffers=True), dict(max_buffers=2.5), dict(max_buffers=100_000)):
        with pytest.raises(ValueError, match="buffers"):
            EtwSource(**bad)


def test_what_etw_loses_with_the_new_buffers_still_reaches_the_stream(windows):
    source = EtwSource("kernel-logger", loss_poll_seconds=0.01)
    with etwmon.Monitor(source=source) as mon:
        name, session = only_session(windows)
        assert session.properties.get().contents.BufferSize == 256
        windows.lost[name] = (3, 1)
        seen, deadline = 0, time.monotonic() + 30
        while seen < 4 and time.monotonic() < deadline:
            seen += sum(e.count for e in read_events(mon, 1, timeout=0.5) if isinstance(e, RecordsLost))
        assert seen == 4 and mon.stats.lost == 4
