"""Recordings without a kernel: the file format, the reader (Reader protocol, truncation, damage), the process-tree
filter, the report's data, the exports and the CLI's report/export/replay commands."""

from __future__ import annotations

import json
import os
import zlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import etwmon
from etwmon.errors import BufferTooSmall
from etwmon.records import ItemType, ProcessCreate, encode_process_create, encode_process_exit, parse
from etwmon.recording import RecordingFormatError, RecordingWriter, open_recording
from etwmon.recording.format import CHUNK_HEADER, encode_header
from etwmon.recording.output import OutputExists, create_output
from etwmon.recording.processes import collect
from etwmon.recording.report import render_report, script_json
from etwmon.recording.tree import ProcessTreeFilter

from .helpers import etwmon_argv, run
from .recording_builders import T0, guid, life, tree_records, write_recording

HOSTILE = ("</script><script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
           "<!-- \u2028\u2029 & \x1b[2J")


# --- the file format and the reader -------------------------------------------------------------------------


def test_round_trip_gives_back_every_record_in_order(tmp_path):
    records = tree_records()
    write_recording(tmp_path / "r.rec", records)
    with open_recording(tmp_path / "r.rec") as reader:
        got = b""
        buf = bytearray(1000)
        while True:
            n = reader.readinto(buf)
            if not n:
                break
            got += bytes(buf[:n])
        assert got == b"".join(records)
        assert reader.complete and reader.note is None
        assert reader.summary == {"events": len(records)}
        assert reader.header["source"] == "test" and reader.header["format_version"] == 1
        assert reader.stats.read == len(records) and reader.stats.lost == 5
        assert not reader.running and not reader.readable()


def test_readinto_gives_whole_records_and_says_when_the_buffer_is_too_small(tmp_path):
    records = tree_records()
    write_recording(tmp_path / "r.rec", records, chunk_bytes=1 << 20)
    reader = etwmon.open_recording(tmp_path / "r.rec")
    with pytest.raises(BufferTooSmall) as caught:
        reader.readinto(bytearray(10))
    assert caught.value.needed == len(records[0])
    first = len(records[0]) + len(records[1])
    buf = bytearray(first + 1)  # room for two records and a byte: the third waits
    assert reader.readinto(buf) == first
    assert [e.pid for e in parse(buf[:first])] == [100, 100]
    assert reader.stats.read == 2


def test_events_fileno_wait_follow_the_reader_protocol(tmp_path):
    import select

    write_recording(tmp_path / "r.rec", tree_records())
    reader = open_recording(tmp_path / "r.rec")
    assert reader.wait(0) is True and reader.running
    assert select.select([reader.fileno()], [], [], 0)[0]  # readable while records are left
    events = list(reader.events())
    assert sum(isinstance(e, ProcessCreate) and e.type == ItemType.ProcessCreate for e in events) == 7
    assert reader.wait(0) is False and not reader.running
    assert not select.select([reader.fileno()], [], [], 0)[0]
    reader.close()


def test_a_file_that_is_not_a_recording_is_one_clear_error(tmp_path):
    for name, data in [("text", b"hello, world\n"), ("empty", b""), ("zip", b"PK\x03\x04" + bytes(100))]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(RecordingFormatError, match="is not an etwmon recording"):
            open_recording(tmp_path / name)
    future = encode_header({"source": "x"}).replace(b"\x01\x00", b"\x09\x00", 1)
    (tmp_path / "future").write_bytes(future)
    with pytest.raises(RecordingFormatError, match="format version 9"):
        open_recording(tmp_path / "future")


def test_the_cli_says_not_a_recording_in_one_line_with_status_2(tmp_path):
    (tmp_path / "notes.txt").write_text("just text\n")
    for argv in (["tail", "--replay"], ["report", "-o", str(tmp_path / "o.html")],
                 ["export", "--format", "jsonl", "-o", str(tmp_path / "o.jsonl")]):
        args = argv[:2] + [str(tmp_path / "notes.txt")] + argv[2:] if argv[0] == "tail" else \
            [argv[0], str(tmp_path / "notes.txt"), *argv[1:]]
        result = run(etwmon_argv(*args))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.decode().strip().splitlines()
        assert lines == [f"etwmon: error: {tmp_path / 'notes.txt'} is not an etwmon recording (no recording header)"]
    assert not (tmp_path / "o.html").exists() and not (tmp_path / "o.jsonl").exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=10**6))
def test_a_recording_cut_at_any_byte_reads_to_its_last_whole_chunk(tmp_path, cut):
    path = tmp_path / "r.rec"
    if not path.exists():
        write_recording(path, tree_records(20), chunk_bytes=2048)
    data = path.read_bytes()
    cut %= len(data) + 1
    (tmp_path / "cut.rec").write_bytes(data[:cut])
    header_end = data.index(CHUNK_HEADER.pack(b"RECS", 0, 0, 0, 0)[:4])  # first chunk's kind
    if cut < header_end:
        with pytest.raises(RecordingFormatError):
            open_recording(tmp_path / "cut.rec")
        return
    # The whole chunks in data[:cut], found independently of the reader by walking the chunk headers.
    whole, pos, complete = b"", header_end, False
    while pos + CHUNK_HEADER.size <= cut:
        kind, stored, raw, _, _ = CHUNK_HEADER.unpack_from(data, pos)
        if pos + CHUNK_HEADER.size + stored > cut:
            break
        if kind == b"END.":
            complete = True
            break
        whole += zlib.decompress(data[pos + CHUNK_HEADER.size:pos + CHUNK_HEADER.size + stored])
        pos += CHUNK_HEADER.size + stored
    with open_recording(tmp_path / "cut.rec") as reader:
        events = list(reader.events())
        assert [e.encode() for e in events] == [e.encode() for e in parse(whole)]
        assert reader.complete is complete
        if not complete:
            assert "truncated" in reader.note or "without the recorder's end mark" in reader.note
            assert str(tmp_path / "cut.rec") in reader.note


def test_a_damaged_chunk_stops_the_reading_there_and_says_so(tmp_path):
    path = tmp_path / "r.rec"
    write_recording(path, tree_records(20), chunk_bytes=2048)
    data = bytearray(path.read_bytes())
    first = data.index(b"RECS")
    second = data.index(b"RECS", first + 4)
    data[second + CHUNK_HEADER.size + 3] ^= 0xFF
    path.write_bytes(bytes(data))
    with open_recording(path) as reader:
        events = list(reader.events())
        assert "fails its checksum" in reader.note and not reader.complete
        kept = CHUNK_HEADER.unpack_from(data, first)[3]
        assert len(events) == kept


def test_the_truncation_note_reaches_tail_replay_on_stderr(tmp_path):
    write_recording(tmp_path / "r.rec", tree_records(20), chunk_bytes=2048, close=False)
    result = run(etwmon_argv("tail", "--replay", str(tmp_path / "r.rec"), "--type", "exit"))
    assert result.returncode == 0, result.stderr
    err = result.stderr.decode()
    assert "warning" in err and "without the recorder's end mark" in err
    out = result.stdout.decode().splitlines()
    assert out and all(line.split()[1] == "exit" or "records lost" in line for line in out), out


# --- replay through tail ------------------------------------------------------------------------------------


def test_tail_replay_applies_tails_filters_and_formats(tmp_path):
    write_recording(tmp_path / "r.rec", tree_records())
    path = str(tmp_path / "r.rec")
    result = run(etwmon_argv("tail", "--replay", path, "--json", "--type", "exit", "--pid", "201"))
    assert result.returncode == 0, result.stderr
    objects = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert [(o["type"], o.get("pid"), o.get("exit_code")) for o in objects] == [
        ("ProcessExit", 201, 3), ("RecordsLost", None, None)]
    assert "5 missed" in result.stderr.decode()  # the recording's losses in tail's summary
    result = run(etwmon_argv("tail", "--replay", path, "--match", "file3.c", "--format", "ecs"))
    docs = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert {d["host"]["name"] for d in docs} == {"testhost"}  # the recorded host, not this one
    assert any(d.get("process", {}).get("command_line") == "cc -c file3.c" for d in docs)
    result = run(etwmon_argv("tail", "--replay", path, "--source", "procfs"))
    assert result.returncode == 2 and b"--replay reads a recording" in result.stderr


# --- the process tree filter --------------------------------------------------------------------------------


def _tree_events(records):
    return list(parse(b"".join(records)))


def test_the_tree_keeps_descendants_by_guid_including_a_daemon_and_not_a_reused_pid():
    root = life(500, 42, "sh build.sh", start=0, end=None)
    child = life(501, 500, "sh -c daemonize", start=100, end=300, parent_guid=guid(500))
    daemon = life(502, 501, "daemon --forever", start=200, end=None, parent_guid=guid(501, 100))
    unrelated = life(600, 1, "cron job", start=150, end=400, parent_guid=guid(1))
    # pid 501 reused by an unrelated process after the member exited: a different guid.
    reused = life(501, 1, "unrelated again", start=1000, end=1100, parent_guid=guid(1))
    # The daemon's later child, after its parent exited and it was re-parented to init (ppid 1).
    grandchild = life(503, 1, "daemon worker", start=1200, end=1300, parent_guid=guid(502, 200))
    events = _tree_events(root + child + daemon + unrelated + reused + grandchild)
    tree = ProcessTreeFilter(500, 42)
    kept = [e for e in events if tree.keep(e)]
    kept_cmds = {e.command_line for e in kept if isinstance(e, ProcessCreate)}
    assert kept_cmds == {"parent-program", "sh build.sh", "sh -c daemonize", "daemon --forever", "daemon worker"}
    assert tree.processes == 4
    assert not any(getattr(e, "pid", None) == 600 for e in kept)
    assert tree.running == 2  # root and daemon: no exit seen (the worker exited)


def test_the_tree_needs_the_root_forked_by_the_recorder():
    # Same pid, forked by someone else: not the root.
    events = _tree_events(life(500, 43, "impostor", start=0, end=10))
    tree = ProcessTreeFilter(500, 42)
    assert not any(tree.keep(e) for e in events)


def test_the_tree_follows_pids_when_records_have_no_guid():
    records = [encode_process_create(T0, 700, 42, 42, 42, "root"),
               encode_process_create(T0 + 1, 701, 700, 700, 700, "child"),
               encode_process_create(T0 + 2, 800, 1, 1, 1, "other"),
               encode_process_create(T0 + 3, 702, 701, 701, 701, "grandchild"),
               encode_process_exit(T0 + 4, 701, 0),
               encode_process_create(T0 + 5, 701, 1, 1, 1, "pid 701 reused")]
    tree = ProcessTreeFilter(700, 42)
    data, count = tree.select(b"".join(records))
    assert count == 4
    assert [(e.type.name, e.pid) for e in parse(data)] == [
        ("ProcessCreate", 700), ("ProcessCreate", 701), ("ProcessCreate", 702), ("ProcessExit", 701)]


def test_the_tree_keeps_its_image_loads_by_guid_even_after_the_exit():
    from etwmon.records import Details, encode_image_load

    root = life(500, 42, "sh run.sh", start=0, end=50, parent_guid=guid(42))
    other = life(600, 1, "cron job", start=10, end=60, parent_guid=guid(1))

    def load(pid: int, start: int, name: str) -> bytes:  # the bpf source's: a ring of its own, after the exits
        return encode_image_load(T0 + 70, pid, 4096, 0x7F0000000000, name, Details(process_guid=guid(pid, start)))

    records = root + other + [load(500, 0, "/tmp/mine.so"), load(600, 10, "/tmp/theirs.so"),
                              load(500, 999, "/tmp/pid-reused.so"),
                              encode_image_load(T0 + 80, 500, 4096, 0x1000, "/tmp/no-guid.so")]  # exited: by pid
    tree = ProcessTreeFilter(500, 42)
    data, _ = tree.select(b"".join(records))
    assert [e.image_name for e in parse(data) if e.type == ItemType.ImageLoad] == ["/tmp/mine.so"]


# --- output files -------------------------------------------------------------------------------------------


def test_output_files_are_not_written_through_symlinks_nor_over_existing_files(tmp_path):
    target = tmp_path / "precious"
    target.write_text("keep me")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OutputExists):
        create_output(tmp_path / "link")
    with pytest.raises(OutputExists):
        create_output(target)
    fd = create_output(tmp_path / "link", overwrite=True)  # the link is replaced, its target untouched
    os.close(fd)
    assert target.read_text() == "keep me" and not (tmp_path / "link").is_symlink()
    fd = create_output(tmp_path / "new" / "dir" / "f")
    os.close(fd)
    assert (os.stat(tmp_path / "new").st_mode & 0o777) == 0o700
    assert (os.stat(tmp_path / "new" / "dir" / "f").st_mode & 0o777) == 0o600


# --- the report ---------------------------------------------------------------------------------------------


def test_script_json_cannot_end_the_script_element():
    text = script_json({"cmd": HOSTILE})
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in text
    assert json.loads(text) == {"cmd": HOSTILE}


def test_the_report_holds_the_data_once_escaped_and_nothing_that_loads(tmp_path):
    write_recording(tmp_path / "r.rec", tree_records(hostile=HOSTILE))
    with open_recording(tmp_path / "r.rec") as reader:
        page = render_report(reader)
    assert page.count("</script>") == 2 and page.count("<script") == 2  # the data block and the page's script
    assert "<img" not in page and "onerror=\"document" not in page
    csp = page.split('http-equiv="Content-Security-Policy" content="', 1)[1].split('"', 1)[0]
    assert "default-src 'none'" in csp and "unsafe-inline" not in csp
    before, rest = page.split('<script type="application/json" id="etwmon-data">', 1)
    block, after = rest.split("</script>", 1)
    for loader in ("http://", "https://", "url(", "@import", "src=", "href=", "fetch(", "XMLHttpRequest",
                   "innerHTML", "insertAdjacentHTML", "document.write"):
        assert loader not in before + after, loader  # the page itself loads nothing, writes no HTML
    data = json.loads(block)
    cmds = [p[4] for p in data["procs"]]
    assert "make all" in cmds and any("document.title" in c and "\\x1b[2J" in c for c in cmds)
    assert data["summary"]["lost"] == 5 and data["summary"]["failed_total"] == 2


def test_the_process_model_of_a_recording():
    found = collect(parse(b"".join(tree_records())))
    by_pid = {p.pid: p for p in found.processes}
    assert len(found.processes) == 7 and found.lost == 5
    assert by_pid[201].exit_code == 3 and by_pid[201].failed and by_pid[100].exit_code == 2
    assert by_pid[300].parent == by_pid[200].index and by_pid[200].parent == by_pid[100].index
    assert by_pid[100].parent == -1  # its parent is not in the recording
    assert by_pid[203].command_line == "cc -c file3.c" and by_pid[203].threads == 2
    assert by_pid[100].end - by_pid[100].start == 10_000_000


# --- exports ------------------------------------------------------------------------------------------------


def test_parquet_export_is_one_typed_row_per_event(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is in the test extra: pip install -e '.[test]'")
    import pyarrow.parquet as pq

    records = tree_records()
    write_recording(tmp_path / "r.rec", records)
    result = run(etwmon_argv("export", str(tmp_path / "r.rec"), "--format", "parquet", "-o", str(tmp_path / "o.pq")))
    assert result.returncode == 0, result.stderr
    table = pq.read_table(tmp_path / "o.pq")
    assert table.num_rows == len(records)
    schema = table.schema
    assert schema.field("time").type == pa.timestamp("us", tz="UTC")
    for name in ("pid", "parent_pid", "exit_code", "uid", "tid"):
        assert pa.types.is_integer(schema.field(name).type), name
    for name in ("type", "process_guid", "parent_process_guid", "image", "command_line", "user"):
        assert schema.field(name).type == pa.string(), name
    rows = table.to_pylist()
    events = list(parse(b"".join(records)))
    assert [r["type"] for r in rows] == [e.type.name for e in events]
    assert [r["time"] for r in rows] == [e.time for e in events]
    exits = [r for r in rows if r["type"] == "ProcessExit"]
    assert sorted(r["exit_code"] for r in exits) == sorted([2, 0, 3, 0, 0, 0, 0])
    creates = [r for r in rows if r["type"] == "ProcessExec"]
    assert {r["command_line"] for r in creates} >= {"make all", "cc -c file3.c"}
    assert {r["process_guid"] for r in creates} >= {guid(100), guid(300, 5000)}
    assert all(r["user"] == "alice" for r in creates)
    assert [r["count"] for r in rows if r["type"] == "RecordsLost"] == [5]


def test_jsonl_export_is_what_tail_json_prints(tmp_path):
    write_recording(tmp_path / "r.rec", tree_records())
    run(etwmon_argv("export", str(tmp_path / "r.rec"), "--format", "jsonl", "-o", str(tmp_path / "o.jsonl")))
    tail = run(etwmon_argv("tail", "--replay", str(tmp_path / "r.rec"), "--json", "--type",
                           "process,thread,image"))
    assert (tmp_path / "o.jsonl").read_bytes() == tail.stdout


def test_chrome_trace_export_is_the_trace_event_format(tmp_path):
    write_recording(tmp_path / "r.rec", tree_records(hostile=HOSTILE))
    result = run(etwmon_argv("export", str(tmp_path / "r.rec"), "--format", "chrome-trace", "-o",
                             str(tmp_path / "t.json")))
    assert result.returncode == 0, result.stderr
    trace = json.loads((tmp_path / "t.json").read_text())
    events = trace["traceEvents"]
    assert trace["displayTimeUnit"] == "ms"
    for e in events:  # the fields the format requires of each phase
        assert e["ph"] in ("X", "M", "i")
        assert isinstance(e["pid"], int) and isinstance(e["tid"], int) and isinstance(e["name"], str)
        if e["ph"] == "X":
            assert e["ts"] >= 0 and e["dur"] >= 0
        if e["ph"] == "i":
            assert e["s"] in ("g", "p", "t")
    slices = [e for e in events if e["ph"] == "X"]
    assert len(slices) == 7 and len({e["pid"] for e in slices}) == 7  # a track per process
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert "make (100)" in names
    make = next(e for e in slices if e["args"]["pid"] == 100)
    assert make["dur"] == pytest.approx(1_000_000) and make["args"]["exit_code"] == 2
    assert any(e["name"] == "5 records lost" and e["s"] == "g" for e in events)
    assert any(e["args"].get("command_line") == HOSTILE for e in slices)


def test_export_and_report_refuse_to_overwrite_unless_forced(tmp_path):
    write_recording(tmp_path / "r.rec", tree_records())
    (tmp_path / "o.html").write_text("mine")
    result = run(etwmon_argv("report", str(tmp_path / "r.rec"), "-o", str(tmp_path / "o.html")))
    assert result.returncode == 1 and b"--force" in result.stderr
    assert (tmp_path / "o.html").read_text() == "mine"
    result = run(etwmon_argv("report", str(tmp_path / "r.rec"), "-o", str(tmp_path / "o.html"), "--force"))
    assert result.returncode == 0 and (tmp_path / "o.html").read_text().startswith("<!DOCTYPE html>")


def test_writer_refuses_records_before_its_header(tmp_path):
    writer = RecordingWriter(tmp_path / "r.rec")
    with pytest.raises(ValueError):
        writer.write(encode_process_exit(T0, 1, 0), 1)
    writer.abandon()
    assert (tmp_path / "r.rec").read_bytes() == b""


def test_many_small_reads_never_block(tmp_path):
    """The wake-up descriptor holds one byte at most: thousands of readinto calls do not fill (and block on) it."""
    import threading

    records = tree_records(700)
    write_recording(tmp_path / "r.rec", records, chunk_bytes=1 << 20)
    reader = open_recording(tmp_path / "r.rec")
    counted = []

    def read_one_by_one():
        buf = bytearray(max(len(r) for r in records))
        n = 0
        while reader.readinto(memoryview(buf)[:len(records[n])] if n < len(records) else buf):
            n += 1
        counted.append(n)

    worker = threading.Thread(target=read_one_by_one, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "readinto blocked"
    assert counted == [len(records)] and len(records) > 2000
    reader.close()


def test_rules_judge_the_trees_records_after_the_tree_is_decided(tmp_path):
    """An excluded parent does not cut its children off the tree; redaction happens before the file."""
    pytest.importorskip("defusedxml", reason="rules need defusedxml (in the test extra)")
    import numpy as np

    from etwmon.records import record_headers
    from etwmon.recording.record import BatchRecorder
    from etwmon.rules import RuleSet

    rules = RuleSet.from_xml(
        '<Sysmon><EventFiltering><ProcessCreate onmatch="exclude">'
        '<Image condition="end with">/cc</Image></ProcessCreate></EventFiltering>'
        r'<Redaction><Redact name="secret">--token=(\S+)</Redact></Redaction></Sysmon>')
    records = tree_records(3)
    from etwmon.records import Details, encode_process_exec

    secret = encode_process_exec(T0 + 20, 100, 1, 100, 100, "make all --token=hunter2",
                                 Details(process_guid=guid(100), parent_process_guid=guid(1), image="/usr/bin/make"))
    records.insert(2, secret)
    unrelated = life(900, 1, "unrelated", start=50, end=60, parent_guid=guid(1), image="/usr/bin/other")
    data = b"".join(records[:3] + unrelated + records[3:])
    index = record_headers(data)
    ends = (index["offset"] + index["Size"]).astype(np.int64)
    writer = RecordingWriter(tmp_path / "r.rec", {"source": "test"})
    batch = BatchRecorder(writer, ProcessTreeFilter(100, 1))
    batch.stage_for(rules)
    batch.take(memoryview(data), ends, len(ends))
    writer.close({})
    with open_recording(tmp_path / "r.rec") as reader:
        events = list(reader.events())
    lines = [e.command_line for e in events if isinstance(e, ProcessCreate)]
    assert "as -o file0.o" in lines  # the grandchild of make, under an excluded cc, is still in the tree
    assert not any(line.startswith("cc -c") for line in lines)  # the rules left the cc execs out
    assert "unrelated" not in lines  # not in the tree
    assert any("make all --token=" in line for line in lines)
    assert not any("hunter2" in line for line in lines)  # redacted before the file
    assert batch.events == len(events) and batch.lost == 5


def test_async_iteration_reads_the_whole_recording(tmp_path):
    import asyncio

    records = tree_records()
    write_recording(tmp_path / "r.rec", records)

    async def read_all():
        with open_recording(tmp_path / "r.rec") as reader:
            return [event async for event in reader]

    events = asyncio.run(read_all())
    assert [e.encode() for e in events] == [e.encode() for e in parse(b"".join(records))]
