"""The extension block inside ProcessCreate/ProcessExec/ProcessExit/ThreadCreate/ThreadExit: round trips, cuts
that keep a record within 64 KiB, readers that skip what they do not know, and the book's C client ignoring it."""

from __future__ import annotations

import dataclasses
import pwd
import subprocess
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import etwmon
from etwmon import records as R
from etwmon.records import Details, EventFlags

from .test_records import T0, _build_c_client, _expected_line

GUID = "{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}"
PARENT = "{00000001-0002-0003-0405-060708090a0b}"
FULL = Details(
    process_guid=GUID, parent_process_guid=PARENT, image="/usr/bin/python3.11", current_directory="/srv/caf\u00e9",
    uid=65534, user="nobody", parent_image="/usr/bin/bash", parent_command_line="bash -c 'python3 x.py'",
    parent_user="root", tty="pts/3", session=4711, cgroup="/system.slice/docker-ab12.scope", container_id="ab12",
    start_filetime=T0 - 5, rule_name="technique_id=T1059", flags=int(EventFlags.PROCFS),
)


def extended_records() -> list[bytes]:
    return [
        R.encode_process_create(T0, 4242, 1, 1, 1, "python3 x.py", FULL),
        R.encode_process_exec(T0 + 1, 4242, 1, 4242, 4242, "python3 y.py",
                              Details(process_guid=GUID, image="/usr/bin/python3", uid=0)),
        R.encode_thread_create(T0 + 2, 4243, 4242, Details(process_guid=GUID)),
        R.encode_thread_exit(T0 + 3, 4243, 4242, 0, Details(process_guid=GUID)),
        R.encode_process_exit(T0 + 4, 4242, 3, Details(process_guid=GUID, image="/usr/bin/python3",
                                                       start_filetime=T0 - 5, lifetime=timedelta(seconds=1.5))),
        R.encode_process_create(T0 + 5, 9, 8, 8, 8, "", Details(flags=int(EventFlags.UNKNOWN_PARENT))),
    ]


def test_every_field_round_trips_and_encode_gives_the_same_bytes():
    records = extended_records()
    events = list(etwmon.parse(b"".join(records)))
    create, exec_, tcreate, texit, exit_, bare = events
    for name in ("process_guid", "parent_process_guid", "image", "current_directory", "uid", "user",
                 "parent_image", "parent_command_line", "parent_user", "tty", "session", "cgroup", "container_id",
                 "start_filetime", "rule_name"):
        assert getattr(create, name) == getattr(FULL, name), name
    assert create.flags == EventFlags.PROCFS and not create.truncated
    assert create.command_line == "python3 x.py" and create.start_time is not None
    # no User in the record: the uid's name, looked up where it is read (the record stays as it came: below)
    assert (exec_.process_guid, exec_.image, exec_.uid, exec_.user, exec_.current_directory) == (
        GUID, "/usr/bin/python3", 0, pwd.getpwuid(0).pw_name, None)
    assert tcreate.process_guid == texit.process_guid == exit_.process_guid == GUID
    assert exit_.lifetime == timedelta(seconds=1.5) and exit_.image == "/usr/bin/python3" and exit_.exit_code == 3
    assert bare.flags == EventFlags.UNKNOWN_PARENT and bare.process_guid is None
    for event, record in zip(events, records):
        assert event.encode() == record
    # A changed attribute (a redacted command line) is re-encoded with the block intact.
    redacted = dataclasses.replace(create, command_line="python3 [redacted]", parent_command_line="bash [x]")
    (again,) = etwmon.parse(redacted.encode())
    assert again == redacted and again.user == "nobody"
    named = dataclasses.replace(exit_, rule_name="exits")
    (again,) = etwmon.parse(named.encode())
    assert again.rule_name == "exits" and again.process_guid == GUID


def test_a_record_without_details_is_the_books_record():
    plain = R.encode_process_create(T0, 1, 2, 3, 4, "a b")
    assert len(plain) == 40 + 6
    (event,) = etwmon.parse(plain)
    assert event.process_guid is None and event.flags == 0 and event.details() is None
    assert event.encode() == plain


def test_the_block_sits_after_the_nul_terminated_command_line_and_size_covers_it():
    record = R.encode_process_create(T0, 1, 2, 3, 4, "abc", Details(process_guid=GUID))
    base = 40 + 6
    assert record[34 + 6:36 + 6] == b"\0\0"
    version, length, flags = R._EXT_HEADER.unpack_from(record, base)
    assert (version, flags) == (1, 0) and len(record) == base + length
    assert int.from_bytes(record[2:4], "little") == len(record)
    assert record[base + 8:base + 12] == (1).to_bytes(2, "little") + (16).to_bytes(2, "little")
    assert R.guid_text(record[base + 12:base + 28]) == GUID


def test_with_details_appends_to_a_sources_record_as_the_encoder_would():
    for plain, details, encoded in [
        (R.encode_process_exec(T0, 7, 1, 7, 7, "ls -l"), FULL, R.encode_process_exec(T0, 7, 1, 7, 7, "ls -l", FULL)),
        (R.encode_process_exit(T0, 7, 0), Details(process_guid=GUID, lifetime=timedelta(milliseconds=3)),
         R.encode_process_exit(T0, 7, 0, Details(process_guid=GUID, lifetime=timedelta(milliseconds=3)))),
        (R.encode_thread_exit(T0, 8, 7, 0), Details(process_guid=GUID),
         R.encode_thread_exit(T0, 8, 7, 0, Details(process_guid=GUID))),
    ]:
        assert R.with_details(plain, details) == encoded
        assert R.with_details(encoded, details) == encoded  # replaces the block, never stacks a second one
    # Fields a record type does not carry are left out, not misplaced.
    (tc,) = etwmon.parse(R.with_details(R.encode_thread_create(T0, 8, 7), FULL))
    assert tc.process_guid == GUID and len(tc.encode()) == 24 + 8 + 20
    with pytest.raises(ValueError):
        R.with_details(R.encode_records_lost(T0, 3), FULL)


def test_a_huge_command_line_and_parent_command_line_are_cut_visibly_and_the_guid_survives():
    line = "x" * 40_000
    details = dataclasses.replace(FULL, parent_command_line="p" * 40_000)
    for record in (R.encode_process_create(T0, 1, 2, 3, 4, line, details),
                   R.with_details(R.encode_process_create(T0, 1, 2, 3, 4, line), details)):
        assert len(record) <= R.MAX_RECORD_SIZE
        (event,) = etwmon.parse(record)
        assert event.truncated and event.flags & EventFlags.TRUNCATED and event.flags & EventFlags.PROCFS
        assert event.command_line.endswith(R.TRUNCATION_MARKER) and event.command_line.startswith("x" * 1000)
        assert event.process_guid == GUID and event.parent_process_guid == PARENT and event.image == FULL.image
        assert event.parent_command_line.endswith(R.TRUNCATION_MARKER)
        assert event.parent_command_line.startswith("p" * 100)
        assert event.encode() == record


def test_a_detail_with_no_room_left_is_unknown_and_flagged():
    # Fixed fields first, text after: with room only for the header and the GUID, the image is left out.
    block = R._block(0, Details(process_guid=GUID, image="/" + "i" * 100).fields(), 8 + 20 + 10)
    version, length, flags = R._EXT_HEADER.unpack(block[:8])
    assert length == 28 and flags == EventFlags.TRUNCATED


def test_readers_skip_unknown_tags_and_unknown_versions():
    record = bytearray(R.encode_process_exit(T0, 5, 0, Details(process_guid=GUID)))
    # A field from a newer writer (tag 999) between the header and the GUID.
    extra = (999).to_bytes(2, "little") + (3).to_bytes(2, "little") + b"abc"
    record[24 + 8:24 + 8] = extra
    record[2:4] = len(record).to_bytes(2, "little")
    record[26:28] = (len(record) - 24).to_bytes(2, "little")
    (event,) = etwmon.parse(bytes(record))
    assert event.process_guid == GUID
    record[24:26] = (2).to_bytes(2, "little")  # a version this reader does not know: skipped whole
    (event,) = etwmon.parse(bytes(record))
    assert event.process_guid is None and event.pid == 5


def test_a_field_running_past_its_block_ends_the_block_without_raising():
    record = bytearray(R.encode_process_exit(T0, 5, 0, Details(process_guid=GUID, image="/bin/true")))
    record[24 + 8 + 20 + 2:24 + 8 + 20 + 4] = (500).to_bytes(2, "little")  # the image's Length
    (event,) = etwmon.parse(bytes(record))
    assert event.process_guid == GUID and event.image is None


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300), st.one_of(st.none(), st.text(max_size=300)), st.one_of(st.none(), st.integers(0, 2**32 - 1)),
       st.integers(0, 15))
def test_any_details_survive_the_round_trip(line, image, uid, flags):
    details = Details(process_guid=GUID, image=image, uid=uid, parent_command_line=line, flags=flags)
    record = R.encode_process_exec(T0, 1, 2, 1, 1, line, details)
    (event,) = etwmon.parse(record)
    assert (event.command_line, event.image, event.uid, event.parent_command_line, int(event.flags)) == (
        line, image, uid, line, flags)
    assert event.encode() == record


def _strip(record: bytes) -> bytes:
    """The book's record without the block: what a client that ignores it sees."""
    base = R._base_size(record)
    return record[:2] + base.to_bytes(2, "little") + record[4:base]


def test_the_books_c_client_ignores_the_block(tmp_path):
    exe = _build_c_client(tmp_path)
    records = extended_records()
    with_block, without = tmp_path / "with.bin", tmp_path / "without.bin"
    with_block.write_bytes(b"".join(records))
    without.write_bytes(b"".join(_strip(r) for r in records))
    printed = subprocess.run([str(exe), str(with_block)], check=True, capture_output=True, text=True).stdout
    plain = subprocess.run([str(exe), str(without)], check=True, capture_output=True, text=True).stdout
    assert printed == plain
    assert printed.splitlines() == [_expected_line(e) for e in etwmon.parse(b"".join(records))]
    assert "ext=" not in printed


def test_a_c_client_reads_the_block_after_the_readme_table(tmp_path):
    exe = _build_c_client(tmp_path, "-DREAD_EXTENSION")
    records = extended_records()
    data = tmp_path / "records.bin"
    data.write_bytes(b"".join(records))
    printed = subprocess.run([str(exe), str(data)], check=True, capture_output=True, text=True).stdout.splitlines()
    for line, event in zip(printed, etwmon.parse(b"".join(records)), strict=True):
        details = event.details()
        fields = "".join(f" {tag}:{value.hex()}" for tag, value in details.fields())
        assert line == _expected_line(event) + f" ext=1/{details.flags}" + fields
    assert f" 1:{R.guid_bytes(GUID).hex()}" in printed[0] and f" 5:{(65534).to_bytes(4, 'little').hex()}" in printed[0]
