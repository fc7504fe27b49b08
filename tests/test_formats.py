"""The readers' side of the records: lazy events, the columnar batch, the batch formatters against the per-event
ones (hostile command lines included), and that no bytes make parse or a formatter raise anything but
RecordFormatError."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import struct
import sys
from datetime import timedelta
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import etwmon
from etwmon import cli, columns, events, formats
from etwmon import records as R
from etwmon.errors import RecordFormatError
from etwmon.records import ItemType, parse

from .helpers import ScriptedSource, nameless_uid

T0 = R.filetime_from_unix_ns(1_700_000_000_123_456_789)

#: What a process controls, at its worst: terminal escapes, controls, bytes that are not UTF-8 (surrogate
#: escapes), broken UTF-16 (lone surrogates), bidi overrides, HTML that closes a script, quotes, backslashes.
HOSTILE = [
    "printf '\x1b]0;pwned\x07\x1b[2J'", "a\x00b\x7fc\x9bd\r\nnext", os.fsdecode(b"caf\xe9 \xff\xfe"),
    "lone\ud800x\udfff",
    "\u202egnp.exe \u200b\u2066x", "x</script><script>alert(1)</script>", "q'\"\\ \\\\ \"'\"'", "\U0001f600 ok",
    "ends with \\", "tab\there", "",
]


def hostile_batch() -> bytes:
    out = []
    for i, text in enumerate(HOSTILE):
        t = T0 + 10 * i
        details = R.Details(process_guid="{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}", image=text or None, user=text,
                            uid=1000 + i, current_directory=text, parent_command_line=text, rule_name=text or None,
                            tty=text, start_filetime=t - 5, flags=i % 16,
                            cgroup=f"/system.slice/docker-{i:064x}.scope" if i % 2 else text,
                            container_id=text if i % 3 == 1 else None)
        out.append(R.encode_process_create(t, 100 + i, 1, 1, 1, text))
        out.append(R.encode_process_create(t, 100 + i, 1, 1, 1, text, details))
        out.append(R.encode_process_exec(t + 1, 100 + i, 1, 100 + i, 100 + i, text, details))
        out.append(R.encode_thread_create(t + 2, 200 + i, 100 + i, R.Details(process_guid=details.process_guid)))
        out.append(R.encode_thread_exit(t + 3, 200 + i, 100 + i, i, None))
        out.append(R.encode_process_exit(t + 4, 100 + i, R.EXIT_CODE_UNKNOWN if i % 2 else i, R.Details(
            image=text, user=text or None, lifetime=timedelta(microseconds=i * 1_234_567), rule_name=text or None)))
        out.append(R.encode_image_load(t + 5, 100 + i, 4096, 0xFFFF_F800_0000_1000 + i, text))
    out.append(R.encode_records_lost(T0, 12))
    out.append(R._HEADER.pack(150, 24, T0) + b"\x01" * 8)  # a type of a newer writer
    out.append(R.encode_process_exec(R.MAX_FILETIME, 1, 0, 1, 1, "the last time a record can have"))
    out.append(R.encode_process_exit(0, 1, 0))  # and the first
    return b"".join(out)


# --- lazy events ---------------------------------------------------------------------------------------------


def test_parsed_events_equal_the_events_they_were_encoded_from() -> None:
    details = R.Details(process_guid="{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}", image="/bin/sh", uid=0, user="root",
                        lifetime=None, start_filetime=T0 - 1, flags=int(R.EventFlags.SEEDED))
    made = [
        R.ProcessExec(T0, 5, 1, 5, 5, "sh -c 'x'", **{k: v for k, v in vars_of(details).items()
                                                          if k in {"process_guid", "image", "uid", "user",
                                                                   "start_filetime"}},
                      flags=R.EventFlags.SEEDED),
        R.ProcessExit(T0, 5, 3, process_guid=details.process_guid, image="/bin/sh", user="root",
                      lifetime=timedelta(seconds=2)),
        R.ThreadCreate(T0, 6, 5), R.ThreadExit(T0, 6, 5, 0), R.RecordsLost(T0, 3),
    ]
    parsed = list(parse(b"".join(e.encode() for e in made)))
    assert parsed == made and [hash(e) for e in parsed] == [hash(e) for e in made]
    assert [repr(e) for e in parsed] == [repr(e) for e in made]


def vars_of(details: R.Details) -> dict:
    return {f.name: getattr(details, f.name) for f in dataclasses.fields(details)}


def test_parsed_events_are_slotted_frozen_and_outlive_the_buffer() -> None:
    buf = bytearray(hostile_batch())
    events = list(parse(memoryview(buf)))
    expected = [e.command_line for e in parse(bytes(buf)) if isinstance(e, R.ProcessCreate)]
    buf[:] = b"\xff" * len(buf)  # the caller reuses its buffer before reading the events
    assert [e.command_line for e in events if isinstance(e, R.ProcessCreate)] == expected
    event = events[2]
    assert not hasattr(event, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.pid = 1  # type: ignore[misc]
    changed = dataclasses.replace(event, command_line="other")
    assert changed.command_line == "other" and changed.image == event.image and changed.pid == event.pid


# --- parse refuses what no formatter could show ------------------------------------------------------------------


@pytest.mark.parametrize("when", [-1, -(2**63), R.MAX_FILETIME + 1, 2**63 - 1])
def test_times_out_of_range_are_malformed(when: int) -> None:
    record = R._HEADER.pack(2, 24, when) + struct.pack("<II", 5, 0)
    for read in (lambda b: list(parse(b)), R.parse_array, R.record_headers, formats.format_batch):
        with pytest.raises(RecordFormatError, match="Time .* out of range"):
            read(record)


def _exec_with_field(tag: int, value: bytes) -> bytes:
    record = R.encode_process_exec(T0, 5, 1, 5, 5, "sh")
    return R.with_fields(record, 0, [(tag, value)])


@pytest.mark.parametrize("tag, value, why", [
    (R.ExtensionTag.ParentCommandLine, b"abc", "odd length"),
    (R.ExtensionTag.Image, b"\x00", "odd length"),
    (R.ExtensionTag.ProcessGuid, b"\x00" * 15, "needs 16"),
    (R.ExtensionTag.Uid, b"\x00" * 8, "needs 4"),
    (R.ExtensionTag.StartTime, struct.pack("<q", -5), "out of range"),
    (R.ExtensionTag.StartTime, struct.pack("<q", R.MAX_FILETIME + 1), "out of range"),
])
def test_extension_fields_that_cannot_be_decoded_are_malformed(tag: int, value: bytes, why: str) -> None:
    record = _exec_with_field(tag, value)
    for read in (lambda b: list(parse(b)), R.parse_array, R.record_headers, formats.format_batch):
        with pytest.raises(RecordFormatError, match=why):
            read(record)
    fine = list(parse(_exec_with_field(tag, value[:-1] if len(value) % 2 else value) if why == "odd length"
                      else R.encode_process_exec(T0, 5, 1, 5, 5, "sh")))
    assert len(fine) == 1  # the well-formed neighbour parses


# --- the columnar batch --------------------------------------------------------------------------------------------


def test_parse_array_has_the_fields_parse_gives() -> None:
    data = hostile_batch()
    batch = R.parse_array(bytearray(data))
    events = list(parse(data))
    f = batch.fields
    assert batch.fields.dtype == R.ARRAY_DTYPE and len(batch) == len(events)
    for row, cmd, event in zip(f, batch.command_lines, events):
        item = int(event.type) if not isinstance(event, R.UnknownRecord) else event.item_type
        assert (row["type"], row["time"]) == (item, event.filetime)
        assert row["pid"] == getattr(event, "pid", 0) and row["tid"] == getattr(event, "tid", 0)
        assert row["exit_code"] == getattr(event, "exit_code", 0) and row["count"] == getattr(event, "count", 0)
        assert row["parent_pid"] == getattr(event, "parent_pid", 0)
        assert (row["creating_pid"], row["creating_tid"]) == (getattr(event, "creating_pid", 0),
                                                              getattr(event, "creating_tid", 0))
        assert cmd == getattr(event, "command_line", None)
        has_block = getattr(event, "details", lambda: None)() is not None
        assert bool(row["block_size"]) >= has_block  # a block is where the details are
        record = batch.data[row["offset"]:row["offset"] + row["size"]]
        assert list(parse(record)) == [event]
    assert len(R.parse_array(b"")) == 0


def test_read_array_reads_a_batch_from_a_monitor() -> None:
    source = ScriptedSource()
    with etwmon.Monitor(source=source) as mon:
        source.send(11, 12, 13)
        assert mon.wait(10)
        batch = mon.read_array()
    assert batch.fields["pid"].tolist() == [11, 12, 13]
    assert (batch.fields["type"] == int(ItemType.ProcessExit)).all()


# --- batch formatting gives the per-event lines ------------------------------------------------------------------


@pytest.mark.parametrize("form, render", [("text", formats.format_event), ("json", formats.json_line)])
def test_batch_lines_are_the_per_event_lines(form: str, render, json_encoder) -> None:
    data = hostile_batch()
    each = [render(event) + "\n" for event in parse(data)]
    assert formats.format_batch(data, form) == each
    assert formats.format_batch(memoryview(bytearray(data)), form) == each
    kept = {int(ItemType.ProcessExec), int(ItemType.ProcessExit)}
    assert formats.format_batch(data, form, frozenset(kept)) == [
        render(e) + "\n" for e in parse(data) if int(e.type) in kept | {int(ItemType.RecordsLost)}]
    joined = "".join(each)
    assert joined.isascii() if form == "json" else "\x1b" not in joined
    for bad in ("\x1b", "\x07", "\x9b", "\u202e", "\x00", "\r"):
        assert bad not in joined
    if form == "json":  # and the JSON is exact: the objects are event_to_json's
        assert [json.loads(line) for line in each] == json.loads(json.dumps(
            [formats.event_to_json(e) for e in parse(data)]))


def _records_of(data: bytes) -> list[bytes]:
    return [data[o:o + n] for o, n in zip(R.record_headers(data)["offset"].tolist(),
                                          R.record_headers(data)["Size"].tolist())]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 50])
def test_small_batches_read_as_each_record_alone(size: int, json_encoder) -> None:
    # What a storm hands a reader: a few records per readinto. Every window of the hostile records, through each
    # reader, gives what the per-event path gives for those records.
    records = _records_of(hostile_batch())
    for start in range(0, len(records), max(1, size // 2)):
        window = b"".join(records[start:start + size])
        each = list(parse(window))
        assert formats.format_batch(bytearray(window), "text") == [formats.format_event(e) + "\n" for e in each]
        assert formats.format_batch(window, "json") == [formats.json_line(e) + "\n" for e in each]
        batch = R.parse_array(memoryview(bytearray(window)))
        assert batch.fields["time"].tolist() == [e.filetime for e in each]
        assert batch.fields["pid"].tolist() == [getattr(e, "pid", 0) for e in each]
        assert batch.command_lines.tolist() == [getattr(e, "command_line", None) for e in each]
        _columns_both_ways(window)


def test_big_batches_take_the_columns_way_with_the_same_table() -> None:
    data = hostile_batch() * 3
    assert len(R.record_headers(data)) >= columns._VECTOR_ROWS  # (the default takes the column way here)
    _columns_both_ways(data)


@pytest.mark.parametrize("filetime", [0, 1, 9_999, 10_000, 9_999_999, 10_000_000, T0, T0 + 9_999_999,
                                      R.MAX_FILETIME - 10_000_000, R.MAX_FILETIME])
def test_clocks_are_the_datetimes_own(filetime: int) -> None:
    moment = R.filetime_to_datetime(filetime)
    (event,) = parse(R.encode_process_exit(filetime, 5, 0))
    assert formats.format_event(event).startswith(moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z ")
    assert formats.event_to_json(event)["time"] == moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert formats.format_batch(event.encode(), "json")[0].startswith(
        '{"type":"ProcessExit","time":"' + moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ") + '"')


@pytest.fixture(params=["orjson", "stdlib"])
def json_encoder(request, monkeypatch):
    """Each JSON test once with orjson (etwmon[fast]) and once with the stdlib fallback."""
    if request.param == "orjson":
        pytest.importorskip("orjson")
    else:
        monkeypatch.setattr(formats, "_orjson_dumps", None)
    return request.param


def test_the_json_form_is_jsons_own(json_encoder) -> None:
    extra = b"".join(R.encode_process_exit(T0, 5, 0, R.Details(image="\x7f\U0001f600\u2028", lifetime=timedelta(
        microseconds=us))) for us in (0, 1, 7, 99, 100, 12_345, 10**12))
    for event in parse(hostile_batch() + extra):
        assert formats.json_line(event) == json.dumps(formats.event_to_json(event), ensure_ascii=True,
                                                      separators=(",", ":"))


def test_text_lines_say_fork_exec_exit_with_user_image_and_lifetime() -> None:
    details = R.Details(image="/usr/bin/bash", user="alice", uid=1000)
    data = b"".join([
        R.encode_process_create(T0, 10, 9, 9, 9, "bash", details),
        R.encode_process_exec(T0, 10, 9, 10, 10, "ls -l", R.Details(image="/usr/bin/ls", user="alice")),
        R.encode_process_exit(T0, 10, 0, R.Details(image="/usr/bin/ls", user="alice",
                                                   lifetime=timedelta(milliseconds=1500))),
    ])
    fork, exec_, exit_ = formats.format_batch(data, "text")
    stamp = "2023-11-14T22:13:20.123Z"
    assert fork == f"{stamp} fork        pid=10 ppid=9 user=alice image=/usr/bin/bash cmd=bash\n"
    assert exec_ == f"{stamp} exec        pid=10 ppid=9 user=alice image=/usr/bin/ls cmd=ls -l\n"
    assert exit_ == f"{stamp} exit        pid=10 code=0 user=alice image=/usr/bin/ls lifetime=1.500s\n"


def test_a_record_with_a_uid_and_no_user_shows_the_uids_name_in_both_formatters(json_encoder) -> None:
    import pwd

    nameless = nameless_uid()
    me = os.geteuid()
    data = b"".join([  # what the bpf source's kernel writes: the uid, not its name
        R.encode_process_create(T0, 10, 9, 9, 9, "bash", R.Details(image="/usr/bin/bash", uid=me)),
        R.encode_process_exec(T0, 10, 9, 10, 10, "ls", R.Details(image="/usr/bin/ls", uid=nameless)),
        R.encode_process_exec(T0, 11, 9, 11, 11, "ls", R.Details(uid=me, user="given")),  # the record's wins
    ])
    name = pwd.getpwuid(me).pw_name
    events = list(parse(data))
    assert [e.user for e in events] == [name, None, "given"]
    assert events[0].encode() == data[:len(events[0].encode())]  # the name is shown, not written into the record
    for form, render in (("text", formats.format_event), ("json", formats.json_line)):
        assert formats.format_batch(data, form) == [render(e) + "\n" for e in events]
    fork, exec_, given = formats.format_batch(data, "text")
    assert f" user={name} image=/usr/bin/bash " in fork and f" user={nameless} image=/usr/bin/ls " in exec_
    assert [json.loads(line)["user"] for line in formats.format_batch(data, "json")] == [name, None, "given"]
    assert formats.event_to_ecs(events[0])["user"] == {"id": str(me), "name": name}


# --- fuzz: nothing but RecordFormatError, whatever the bytes -------------------------------------------------------


def _read_everything(data: bytes) -> None:
    """Every reader and formatter over ``data``: raises RecordFormatError or nothing."""
    try:
        events = list(parse(data))
    except RecordFormatError:
        events = None
    for reader in (R.parse_array, R.record_headers, lambda b: formats.format_batch(b, "text"),
                   lambda b: formats.format_batch(b, "json"), _columns_both_ways):
        try:
            reader(data)
        except RecordFormatError:
            assert events is None  # they agree on what is malformed
    if events is None:
        return
    for event in events:
        formats.format_event(event)
        json.loads(formats.json_line(event))
        json.loads(formats.ecs_line(event, "host"))
        event.encode()
    assert formats.format_batch(data, "text") == [formats.format_event(e) + "\n" for e in events]
    assert formats.format_batch(data, "json") == [formats.json_line(e) + "\n" for e in events]


def _columns_both_ways(data: bytes) -> None:
    """parse_array builds a small batch's rows one by one and a big one's column by column: the same table."""
    with mock.patch.object(columns, "_VECTOR_ROWS", 10**9):
        one_by_one = R.parse_array(data)
    with mock.patch.object(columns, "_VECTOR_ROWS", 1):
        by_column = R.parse_array(data)
    assert one_by_one.fields.dtype == by_column.fields.dtype == R.ARRAY_DTYPE
    assert one_by_one.fields.tobytes() == by_column.fields.tobytes()
    assert one_by_one.command_lines.tolist() == by_column.command_lines.tolist()


_SEEDS = [R.encode_process_exec(T0, 5, 1, 5, 5, "sh -c 'x'", R.Details(
    process_guid="{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}", image="/bin/sh", user="root", uid=0, tty="pts/1",
    start_filetime=T0 - 1, rule_name="r", parent_command_line="bash")),
    R.encode_process_exit(T0, 5, 0, R.Details(image="/bin/sh", lifetime=timedelta(seconds=1), start_filetime=T0)),
    R.encode_thread_exit(T0, 6, 5, 0, R.Details(process_guid="{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}")),
    R.encode_image_load(T0, 5, 1, 2, "C:\\x.dll"), R.encode_records_lost(T0, 1),
    R.encode_process_create(T0, 5, 1, 1, 1, "x")]
_FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(st.binary(max_size=600))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _read_everything(data)


@_FUZZ
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), min_size=1,
                                          max_size=6))
def test_fuzz_valid_records_with_mutated_bytes(seed: bytes, mutations: list[tuple[int, int]]) -> None:
    data = bytearray(seed)
    for at, value in mutations:
        data[at % len(data)] = value
    _read_everything(bytes(data))


@_FUZZ
@given(st.sampled_from([s for s in _SEEDS if len(s) > 24]), st.integers(0, 2**16), st.binary(min_size=1, max_size=8))
def test_fuzz_valid_records_with_bytes_put_in_the_extension_block(seed: bytes, at: int, value: bytes) -> None:
    base = R._base_size(seed)
    data = bytearray(seed)
    where = base + at % max(len(seed) - base, 1)
    data[where:where + len(value)] = value
    data[2:4] = struct.pack("<H", len(data))
    _read_everything(bytes(data))


# --- the CLI's default view -------------------------------------------------------------------------------------


def _tail_cli(monkeypatch, argv: list[str], records: list[bytes]) -> tuple[int, str, str]:
    """``etwmon tail ARGV`` over a scripted source that delivers ``records`` and ends."""
    source = ScriptedSource()
    source.commands.put(("records", records))
    source.commands.put(None)

    def open_reader(args, environ, err):
        return etwmon.Monitor(source=source), True

    monkeypatch.setattr(cli, "_open_reader", open_reader)
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    status = cli.main(["tail", *argv])
    return status, out.getvalue(), err.getvalue()


_MIXED = [R.encode_process_create(T0, 10, 9, 9, 9, "bash"), R.encode_thread_create(T0, 11, 10),
          R.encode_process_exec(T0, 10, 9, 10, 10, "ls"), R.encode_thread_exit(T0, 11, 10, 0),
          R.encode_records_lost(T0, 2), R.encode_process_exit(T0, 10, 0)]


@pytest.mark.parametrize("argv, words", [
    ([], ["fork", "exec", "WARNING:", "exit"]),
    (["--type", "process,thread"], ["fork", "thread", "exec", "thread-exit", "WARNING:", "exit"]),
    (["--type", "all"], ["fork", "thread", "exec", "thread-exit", "WARNING:", "exit"]),
    (["--type", "exec"], ["exec", "WARNING:"]),
    (["--type", "all", "--match", "ls"], ["exec", "thread-exit", "WARNING:", "exit"]),  # the per-event path
])
def test_tail_shows_process_events_by_default(monkeypatch, argv: list[str], words: list[str]) -> None:
    status, out, err = _tail_cli(monkeypatch, argv, _MIXED)
    assert status == 0, err
    assert [line.split()[1] for line in out.splitlines()] == words
    shown = len([word for word in words if word != "WARNING:"])
    assert f"6 records, {shown} shown, 0 missed, 0 dropped" in err


def test_tail_json_by_default_is_process_events_too(monkeypatch) -> None:
    status, out, err = _tail_cli(monkeypatch, ["--json"], _MIXED)
    assert status == 0, err
    assert [json.loads(line)["type"] for line in out.splitlines()] == [
        "ProcessCreate", "ProcessExec", "RecordsLost", "ProcessExit"]


@pytest.mark.parametrize("argv", [["--json", "--format", "text"], ["--json", "--format", "ecs"],
                                  ["--no-identity", "--connect", "/nonexistent.sock"]])
def test_conflicting_tail_options_are_refused(monkeypatch, argv: list[str]) -> None:
    status, out, err = _tail_cli(monkeypatch, argv, [])
    assert status == 2 and out == ""
    assert err.startswith("etwmon: error:") and err.count("\n") == 1, err


def test_the_help_says_the_time_zone_and_the_default_types(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["tail", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "ISO-8601 UTC" in text and "default: process" in text


def test_batch_json_lines_hold_plain_numbers() -> None:
    # Columns come out of numpy as Python ints: no "np.uint32(5)" or float noise in a line.
    line = formats.format_batch(R.encode_process_exit(T0, 5, 0), "json")[0]
    assert line == '{"type":"ProcessExit","time":"2023-11-14T22:13:20.123456Z","pid":5,"exit_code":0}\n'


@_FUZZ
@given(st.lists(st.sampled_from(_SEEDS), min_size=16, max_size=40), st.integers(0, 2**20),
       st.binary(min_size=1, max_size=4))
def test_fuzz_big_batches_are_checked_like_small_ones(seeds: list[bytes], at: int, value: bytes) -> None:
    # A batch with many extension blocks is checked a field position at a time across all of them (numpy); one
    # with few, block by block. Both must refuse the same record.
    data = bytearray(b"".join(seeds))
    at %= len(data)
    data[at:at + len(value)] = value
    data = bytes(data)
    try:
        with mock.patch.object(events, "_VECTOR_BLOCKS", 16):  # these 16-40 blocks: the numpy way
            whole = [e.filetime for e in parse(data)]
        whole_error = None
    except RecordFormatError as exc:
        whole_error = str(exc)
    one_by_one, error = [], None
    offset = 0
    while offset < len(data) and error is None:
        size = int.from_bytes(data[offset + 2:offset + 4], "little") if offset + 4 <= len(data) else 0
        try:
            one_by_one += [e.filetime for e in parse(data[offset:offset + max(size, 16)])]
        except RecordFormatError as exc:
            error = exc
        offset += max(size, 16)
    if whole_error is None:
        assert error is None and one_by_one == whole
    else:
        assert error is not None
        delivered = []
        try:
            with mock.patch.object(events, "_VECTOR_BLOCKS", 16):
                for event in parse(data):
                    delivered.append(event.filetime)
        except RecordFormatError:
            pass
        assert delivered == one_by_one[:len(delivered)]


def test_what_the_formatters_remember_stays_bounded_whatever_the_records_say() -> None:
    # Flags, ExeFlags bits, guids, seconds and field values come from untrusted records (a fleet message, a client):
    # each distinct one may be remembered, but only so many.
    from etwmon import batch_format

    records = b"".join(R.encode_process_exec(T0 + 10_000_000 * i, 5, 1, 5, 5, "x", R.Details(
        process_guid=f"{{0f1e2d3c-4b5a-6978-8796-{i:012x}}}", image=f"/bin/{i}", exe_device=1, exe_inode=i,
        exe_flags=i, flags=i % 4096)) for i in range(5000))
    assert len(formats.format_batch(records, "json")) == len(formats.format_batch(records, "text")) == 5000
    assert len(formats._FLAG_NAMES) <= 256 and len(formats._EXE_FLAG_NAMES) <= 256
    assert len(formats._SECONDS) <= 4096 and len(events._GUIDS) <= 4096
    remembered = list(batch_format._REMEMBERED.values())
    assert all(len(cache) <= 256 for cache in remembered) and max(len(cache) for cache in remembered) > 0
    assert len(batch_format._FLAG_PIECES) <= 256  # the flags' pieces (both formatters')


# Any code point, lone surrogates and controls included; or a hostile line, or a cgroup path naming a container.
_TEXTS = (st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=12)
          | st.sampled_from(HOSTILE + ["/system.slice/docker-" + "ab" * 32 + ".scope"]))
_DETAILS = st.fixed_dictionaries({}, optional={
    "process_guid": st.uuids().map(lambda u: "{" + str(u) + "}"),
    "parent_process_guid": st.uuids().map(lambda u: "{" + str(u) + "}"),
    "image": _TEXTS, "current_directory": _TEXTS, "uid": st.integers(0, 2**32 - 1), "user": _TEXTS,
    "parent_image": _TEXTS, "parent_command_line": _TEXTS, "parent_user": _TEXTS, "tty": _TEXTS,
    "session": st.integers(0, 2**32 - 1), "cgroup": _TEXTS, "container_id": _TEXTS,
    "start_filetime": st.integers(0, R.MAX_FILETIME), "rule_name": _TEXTS, "exe_device": st.integers(0, 2**32 - 1),
    "exe_inode": st.integers(0, 2**64 - 1), "exe_flags": st.integers(0, 2**32 - 1),
    "mnt_ns": st.integers(0, 2**32 - 1), "pid_ns": st.integers(0, 2**32 - 1), "ns_pid": st.integers(0, 2**32 - 1),
    "cgroup_id": st.integers(0, 2**64 - 1), "hashes": _TEXTS, "flags": st.integers(0, 2**32 - 1),
    "lifetime": st.integers(0, 2**63).map(lambda us: timedelta(microseconds=us)),
})


@_FUZZ
@given(st.lists(st.tuples(st.sampled_from([1, 101, 2, 3, 4, 5, 100]), _DETAILS, _TEXTS,
                          st.integers(0, 2**32 - 1) | st.just(R.EXIT_CODE_UNKNOWN),
                          st.integers(0, R.MAX_FILETIME)), min_size=1, max_size=6),
       st.sampled_from(["orjson", "stdlib"]), st.sampled_from(["c", "python"]),
       st.none() | st.frozensets(st.sampled_from([1, 101, 2, 3, 4, 5])))
def test_fuzz_batch_lines_are_the_per_event_lines_whatever_the_details(records, encoder, way, types) -> None:
    # Any mix of known and unknown details, any text (lone surrogates, controls, bidi), any numbers and times: the
    # batch formatter's lines (its JSON in C and in Python) are the per-event formatters' lines, byte for byte.
    from etwmon import batch_format

    out = []
    for item, values, text, number, when in records:
        allowed = {1: R._CREATE_ATTRS, 101: R._CREATE_ATTRS}.get(item, R._EXTENSION_ATTRS.get(item, frozenset()))
        details = R.Details(**{k: v for k, v in values.items() if k in allowed or k == "flags"})
        if item in (1, 101):
            encode = R.encode_process_create if item == 1 else R.encode_process_exec
            out.append(encode(when, number, 1, 2, 3, text, details))
        elif item == 2:
            out.append(R.encode_process_exit(when, 5, number, details))
        elif item == 3:
            out.append(R.encode_thread_create(when, number, 5, details))
        elif item == 4:
            out.append(R.encode_thread_exit(when, number, 5, number ^ 1, details))
        elif item == 5:
            out.append(R.encode_image_load(when, number, 4096, number << 12, text, details))
        else:
            out.append(R.encode_records_lost(when, number or 1))
    data = b"".join(out)
    shown = [e for e in parse(data) if types is None or int(e.type) in types or e.type == ItemType.RecordsLost]
    with mock.patch.object(formats, "_orjson_dumps", formats._orjson_dumps if encoder == "orjson" else None), \
            mock.patch.object(batch_format, "_c_json_batch", batch_format._c_json_batch if way == "c" else None):
        assert formats.format_batch(data, "json", types) == [formats.json_line(e) + "\n" for e in shown]
        assert formats.format_batch(data, "text", types) == [formats.format_event(e) + "\n" for e in shown]
