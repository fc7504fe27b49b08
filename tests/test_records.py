"""The wire format: layouts against the book's structs (compiled C), encode/parse round trips, bad buffers."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import etwmon
from etwmon import records as R
from etwmon.records import ItemType

from .conftest import require

C_CLIENT = Path(__file__).parent / "c_client" / "sysmon_client.c"
T0 = R.datetime_to_filetime(datetime(2026, 11, 23, 19, 21, 20, 123456, tzinfo=timezone.utc)) + 7


def sample_records() -> list[bytes]:
    return [
        R.encode_process_create(T0, 4242, 1, 77, 78, "/usr/bin/python3 -c 'print(\"hi\")' --flag"),
        R.encode_process_exit(T0 + 1, 4242, 3),
        R.encode_thread_create(T0 + 2, 4243, 4242),
        R.encode_thread_exit(T0 + 3, 4243, 4242, 0xC0000005),
        R.encode_image_load(T0 + 4, 4242, 0x1000, 0x7FF6_0000_1000, r"C:\Windows\System32\ntdll.dll"),
        R.encode_process_exec(T0 + 5, 4242, 1, 4242, 4242, "sleep 0.3"),
        R.encode_records_lost(T0 + 6, 12),
        R.encode_process_create(T0 + 7, 9, 8, 8, 8, ""),
        R.encode_process_create(T0 + 8, 10, 8, 8, 8, "caf\u00e9 \U0001F600 " + os.fsdecode(b"\xff\xfe")),
    ]


# --- layout ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, size, offsets", [
    (R.HEADER_DTYPE, 16, {"Type": 0, "Size": 2, "Time": 8}),
    (R.PROCESS_EXIT_DTYPE, 24, {"ProcessId": 16, "ExitCode": 20}),
    (R.PROCESS_CREATE_DTYPE, 40, {"ProcessId": 16, "ParentProcessId": 20, "CreatingThreadId": 24,
                                  "CreatingProcessId": 28, "CommandLineLength": 32, "CommandLine": 34}),
    (R.THREAD_CREATE_DTYPE, 24, {"ThreadId": 16, "ProcessId": 20}),
    (R.THREAD_EXIT_DTYPE, 32, {"ThreadId": 16, "ProcessId": 20, "ExitCode": 24}),
    (R.IMAGE_LOAD_DTYPE, 640, {"ProcessId": 16, "ImageSize": 20, "LoadAddress": 24, "ImageFileName": 32}),
    (R.RECORDS_LOST_DTYPE, 24, {"Count": 16}),
])
def test_dtype_layout_matches_the_table(dtype, size, offsets):
    assert dtype.itemsize == size
    for name, offset in offsets.items():
        assert dtype.fields[name][1] == offset, name


def test_encoded_records_agree_with_the_dtypes():
    for record in sample_records():
        item = int.from_bytes(record[:2], "little")
        dtype = R.DTYPES[ItemType(item)]
        row = np.frombuffer(record[:dtype.itemsize], dtype=dtype)[0]
        assert row["Size"] == len(record)
        assert row["Type"] == item
    create = np.frombuffer(sample_records()[0][:40], dtype=R.PROCESS_CREATE_DTYPE)[0]
    assert (create["ProcessId"], create["ParentProcessId"], create["CreatingThreadId"],
            create["CreatingProcessId"]) == (4242, 1, 78, 77)


def test_process_create_size_is_sizeof_plus_command_line_and_nul_terminated():
    text = "a b c"
    record = R.encode_process_create(T0, 1, 2, 3, 4, text)
    assert len(record) == 40 + 2 * len(text)
    assert int.from_bytes(record[32:34], "little") == len(text)
    assert record[34:34 + 2 * len(text)].decode("utf-16-le") == text
    assert record[34 + 2 * len(text):36 + 2 * len(text)] == b"\0\0"


def _build_c_client(tmp_path: Path, *defines: str) -> Path:
    gcc = shutil.which("gcc")
    require(gcc is not None, "gcc is not installed: the C client test needs it")
    exe = tmp_path / ("sysmon_client" + "".join(defines))
    subprocess.run([gcc, "-std=c11", "-O1", "-Wall", "-Werror", *defines, "-o", str(exe), str(C_CLIENT)],
                   check=True)
    return exe


def _wchars(text: str) -> str:
    data = text.encode("utf-16-le", "surrogatepass")
    units = [int.from_bytes(data[i:i + 2], "little") for i in range(0, len(data), 2)]
    return ".".join(f"{u:04x}" for u in units) or "-"


def _expected_line(ev: etwmon.Event) -> str:
    head = f"{getattr(ev, 'item_type', int(ev.type))} {ev.filetime} "
    if isinstance(ev, R.ProcessCreate):
        return (head + f"{ev.pid} {ev.parent_pid} {ev.creating_tid} {ev.creating_pid} "
                f"{len(ev.command_line.encode('utf-16-le', 'surrogatepass')) // 2} {_wchars(ev.command_line)} nul=0")
    if isinstance(ev, R.ProcessExit):
        return head + f"{ev.pid} {ev.exit_code}"
    if isinstance(ev, R.ThreadExit):
        return head + f"{ev.tid} {ev.pid} {ev.exit_code}"
    if isinstance(ev, R.ThreadCreate):
        return head + f"{ev.tid} {ev.pid}"
    if isinstance(ev, R.ImageLoad):
        return head + f"{ev.pid} {ev.image_size} {ev.load_address} {_wchars(ev.image_name)}"
    if isinstance(ev, R.RecordsLost):
        return head + f"{ev.count}"
    return head + f"skipped {len(ev.encode())}"


def test_c_client_reads_readinto_output_like_parse(tmp_path):
    exe = _build_c_client(tmp_path)
    ring = etwmon.EventRing(max_items=4, max_bytes=1 << 16)
    unknown = R._HEADER.pack(150, 24, T0) + b"\x01" * 8  # a future extension: the C client skips it by Size
    out = bytearray()
    buf = bytearray(300)  # small, so records are pushed back and read over several calls
    for record in sample_records() + [unknown]:
        ring.push(record)  # 10 records into 4 slots: drops, reported as RecordsLost
    while True:
        n = ring.readinto(buf)
        if not n:
            break
        out += buf[:n]
    data = tmp_path / "records.bin"
    data.write_bytes(out)
    printed = subprocess.run([str(exe), str(data)], check=True, capture_output=True, text=True).stdout.splitlines()
    events = list(etwmon.parse(out))
    assert [_expected_line(ev) for ev in events] == printed
    assert isinstance(events[0], R.RecordsLost) and events[0].count == 6
    assert printed[-1].endswith("skipped 24")


# --- round trips -----------------------------------------------------------------------------------------


def test_parse_gives_back_every_field_and_the_time():
    events = list(etwmon.parse(b"".join(sample_records())))
    assert [type(e).__name__ for e in events] == [
        "ProcessCreate", "ProcessExit", "ThreadCreate", "ThreadExit", "ImageLoad", "ProcessExec", "RecordsLost",
        "ProcessCreate", "ProcessCreate"]
    create, exit_, tcreate, texit, image, exec_, lost, empty, unicode = events
    assert (create.pid, create.parent_pid, create.creating_pid, create.creating_tid) == (4242, 1, 77, 78)
    assert shlex.split(create.command_line) == ["/usr/bin/python3", "-c", 'print("hi")', "--flag"]
    assert create.time == datetime(2026, 11, 23, 19, 21, 20, 123456, tzinfo=timezone.utc)
    assert create.filetime == T0 and create.type is ItemType.ProcessCreate
    assert (exit_.pid, exit_.exit_code) == (4242, 3)
    assert (tcreate.tid, tcreate.pid) == (4243, 4242)
    assert (texit.tid, texit.pid, texit.exit_code) == (4243, 4242, 0xC0000005)
    assert (image.pid, image.image_size, image.load_address) == (4242, 0x1000, 0x7FF6_0000_1000)
    assert image.image_name == r"C:\Windows\System32\ntdll.dll"
    assert exec_.type is ItemType.ProcessExec and exec_.command_line == "sleep 0.3"
    assert lost.count == 12 and lost.time.tzinfo is timezone.utc
    assert empty.command_line == "" and empty.argv == []
    assert unicode.argv == ["café".encode(), "\U0001F600".encode(), b"\xff\xfe"]
    for event, record in zip(events, sample_records()):
        assert event.encode() == record


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6), st.integers(0, 2**32 - 1), st.integers(0, R.MAX_FILETIME))
def test_any_argv_survives_the_round_trip(argv, pid, ft):
    argv = [a for a in argv if b"\0" not in a]
    line = R.command_line_from_argv(argv)
    (event,) = etwmon.parse(R.encode_process_exec(ft, pid, 0, pid, pid, line))
    assert event.argv == argv and event.pid == pid and event.filetime == ft


def test_too_long_command_line_is_cut_visibly_within_the_size_limit():
    text = "x" * 40_000
    record = R.encode_process_create(T0, 1, 2, 3, 4, text)
    assert len(record) <= R.MAX_RECORD_SIZE
    (event,) = etwmon.parse(record)
    assert event.truncated and event.command_line.endswith(R.TRUNCATION_MARKER)
    assert len(event.command_line) == R.MAX_COMMAND_LINE
    assert event.command_line.startswith("x" * 1000)
    (short,) = etwmon.parse(R.encode_process_create(T0, 1, 2, 3, 4, "x" * R.MAX_COMMAND_LINE))
    assert not short.truncated and len(short.command_line) == R.MAX_COMMAND_LINE


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 400), st.lists(st.text(alphabet="ab '\"\\$\n\t\u00e9\U0001F600", max_size=60), min_size=8,
                                      max_size=12))
def test_argv_of_a_cut_command_line_is_the_prefix_that_survived(offset, tail):
    # The cut lands anywhere in the quoted tail: inside quotes, after a backslash, between arguments.
    argv = ["p" * (R.MAX_COMMAND_LINE - len(R.TRUNCATION_MARKER) - offset), *tail, "z" * 500]
    (event,) = etwmon.parse(R.encode_process_create(T0, 1, 2, 3, 4, R.command_line_from_argv(argv)))
    assert event.truncated
    got = [a.decode("utf-8", "surrogateescape") for a in event.argv]
    assert 1 <= len(got) <= len(argv)
    assert got[:-1] == argv[:len(got) - 1]
    assert argv[len(got) - 1].startswith(got[-1])


def test_argv_of_text_that_is_not_shell_quoting_splits_on_whitespace():
    # A Windows command line, or a comm name with a stray quote, still gives its words instead of raising.
    (event,) = etwmon.parse(R.encode_process_create(T0, 1, 2, 3, 4, "it's \"C:\\Program Files\\x.exe"))
    assert event.argv == [b"it's", b'"C:\\Program', b'Files\\x.exe']


def test_cut_never_splits_a_surrogate_pair():
    text = "\U0001F600" * 20_000
    (event,) = etwmon.parse(R.encode_process_create(T0, 1, 2, 3, 4, text))
    kept = event.command_line[:-len(R.TRUNCATION_MARKER)]
    assert kept and set(kept) == {"\U0001F600"}


def test_long_image_name_is_cut_to_the_field():
    (event,) = etwmon.parse(R.encode_image_load(T0, 1, 2, 3, "\\d" * 400))
    assert len(event.image_name) == 300 and event.image_name.endswith(R.TRUNCATION_MARKER)


def test_records_lost_count_must_fit_a_ulong():
    with pytest.raises(ValueError):
        R.encode_records_lost(T0, 0)
    with pytest.raises(ValueError):
        R.encode_records_lost(T0, 2**32)


def test_filetime_conversions():
    assert R.filetime_to_datetime(R.FILETIME_UNIX_EPOCH) == datetime(1970, 1, 1, tzinfo=timezone.utc)
    assert R.filetime_from_unix_ns(1_000_000_000) == R.FILETIME_UNIX_EPOCH + 10_000_000
    before = time.time_ns()
    now = R.filetime_now()
    after = time.time_ns()
    assert R.filetime_from_unix_ns(before) <= now <= R.filetime_from_unix_ns(after)  # read between the two
    when = R.filetime_to_datetime(now)
    assert datetime.fromtimestamp(before // 1000 / 1e6, timezone.utc) <= when <= \
        datetime.fromtimestamp(-(-after // 1000) / 1e6, timezone.utc)


def test_parse_arrays_gives_structured_batches():
    arrays = etwmon.parse_arrays(b"".join(sample_records()))
    assert set(arrays) == {ItemType.ProcessCreate, ItemType.ProcessExit, ItemType.ThreadCreate,
                           ItemType.ThreadExit, ItemType.ImageLoad, ItemType.ProcessExec, ItemType.RecordsLost}
    creates = arrays[ItemType.ProcessCreate]
    assert list(creates["ProcessId"]) == [4242, 9, 10]
    assert list(creates["Time"]) == [T0, T0 + 7, T0 + 8]
    assert arrays[ItemType.ThreadExit]["ExitCode"][0] == 0xC0000005
    assert arrays[ItemType.RecordsLost]["Count"][0] == 12
    index = R.record_headers(b"".join(sample_records()))
    assert list(index["Size"]) == [len(r) for r in sample_records()]


def test_parse_accepts_any_buffer_kind():
    data = b"".join(sample_records())
    expected = list(etwmon.parse(data))
    assert list(etwmon.parse(bytearray(data))) == expected
    assert list(etwmon.parse(memoryview(data))) == expected
    assert list(etwmon.parse(np.frombuffer(data, dtype=np.uint8))) == expected


# --- bad buffers ------------------------------------------------------------------------------------------


def _patched_size(record: bytes, size: int) -> bytes:
    return record[:2] + size.to_bytes(2, "little") + record[4:]


@pytest.mark.parametrize("make, offset, words", [
    (lambda good: good + _patched_size(R.encode_process_exit(T0, 1, 0), 0), 24, "smaller than the 16-byte header"),
    (lambda good: good + _patched_size(R.encode_process_exit(T0, 1, 0), 8), 24, "smaller than the 16-byte header"),
    (lambda good: good + R.encode_process_exit(T0, 1, 0)[:20], 24, "runs past the end"),
    (lambda good: good + b"\1\0\x18", 24, "truncated header"),
    (lambda good: good + _patched_size(R.encode_process_exit(T0, 1, 0), 16), 24, "needs at least 24"),
    (lambda good: good + R.encode_process_create(T0, 1, 2, 3, 4, "abc")[:32] + b"\x09\0" + b"\0" * 12, 24,
     "CommandLineLength 9 runs past the record's Size"),
])
def test_parse_of_a_bad_buffer_names_the_offset(make, offset, words):
    good = R.encode_process_exit(T0, 5, 0)
    data = make(good)
    parsed = []
    with pytest.raises(etwmon.Error) as info:
        for event in etwmon.parse(data):
            parsed.append(event)
    assert info.value.offset == offset and f"at offset {offset}" in str(info.value)
    assert words in str(info.value)
    assert [e.pid for e in parsed] == [5]  # what came before the bad record was delivered
    with pytest.raises(etwmon.RecordFormatError):
        R.record_headers(data)


def test_command_line_length_past_size_is_an_error():
    record = bytearray(R.encode_process_create(T0, 1, 2, 3, 4, "abc"))
    record[32:34] = (50).to_bytes(2, "little")
    with pytest.raises(etwmon.RecordFormatError, match="CommandLineLength 50"):
        list(etwmon.parse(record))


def test_unknown_types_are_kept_whole():
    unknown = R._HEADER.pack(150, 20, T0) + b"abcd"
    (event,) = etwmon.parse(unknown + b"")
    assert isinstance(event, R.UnknownRecord) and event.item_type == 150 and event.data == unknown
