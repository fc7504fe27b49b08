"""The ``etwmon`` command line, run as a user runs it: a subprocess watching real tagged child processes.

Live tests use the default source as root (``root`` marker) and ``--source procfs`` with every capability
dropped for the unprivileged case. Small pure functions (escaping, JSON form, filters) are checked in-process.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

import pytest

from etwmon import records as R
from etwmon.filters import EventFilter, parse_event_types
from etwmon.formats import escape_text, event_to_json, format_event, json_line
from etwmon.records import ItemType, parse
from etwmon.sources import SOURCES

from .conftest import require
from .helpers import (
    CLOCK_SLACK_NS, ESC_CLEAR, ESC_TITLE, ISO_UTC, PY, SUMMARY, WAIT, ScriptedSource, Watch, assert_auto_picked,
    assert_clean_stderr, clean_env, etwmon_argv, linux_only, new_tag, run, spawn, unprivileged,
)


def summary_of(stderr: str) -> tuple[int, int, int, int]:
    match = SUMMARY.search(stderr)
    assert match, f"no summary line in stderr: {stderr!r}"
    return tuple(int(g) for g in match.groups())  # records, shown, missed, dropped


def events_of(lines: list[dict], pid: int) -> list[dict]:
    return [e for e in lines if e.get("pid") == pid]


def wait_json(watch: Watch, test: Callable[[dict], bool], what: str, timeout: float = WAIT) -> dict:
    line = watch.wait_out(lambda l: test(json.loads(l)), timeout, what)
    return json.loads(line)


# --- pure functions ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, shown", [
    ("plain /usr/bin/ls -l", "plain /usr/bin/ls -l"),
    (r"C:\Windows\System32\cmd.exe /c dir", r"C:\Windows\System32\cmd.exe /c dir"),
    ("caf\u00e9 \U0001F600", "caf\u00e9 \U0001F600"),
    (ESC_TITLE, r"\x1b]0;pwned\x07"),
    (ESC_CLEAR, r"\x1b[2J"),
    ("a\tb\nc\rd\0e\x7f", r"a\x09b\x0ac\x0dd\x00e\x7f"),
    ("csi \x9b2J nel \x85", r"csi \u009b2J nel \u0085"),
    ("evil\u202etxt.exe \u2066x\u2069 zw\u200bsp", r"evil\u202etxt.exe \u2066x\u2069 zw\u200bsp"),
    ("line\u2028sep tag\U000e0041", r"line\u2028sep tag\U000e0041"),
    (os.fsdecode(b"bad \xff\xfe utf8"), r"bad \xff\xfe utf8"),
    ("lone \ud800 surrogate", r"lone \ud800 surrogate"),
])
def test_escape_text(raw: str, shown: str) -> None:
    assert escape_text(raw) == shown
    assert escape_text(raw).isprintable()


def test_json_form_round_trips_bytes_and_is_ascii() -> None:
    argv = [b"sh", b"-c", b"exit 7", b"caf\xc3\xa9", b"\xff\xfe-bad", ESC_TITLE.encode()]
    command_line = R.command_line_from_argv(argv)
    t = R.datetime_to_filetime(datetime(2026, 11, 23, 19, 21, 20, 123456, tzinfo=timezone.utc))
    record = R.encode_process_create(t, 1234, 1, 1, 1, command_line)
    (event,) = parse(record)
    obj = event_to_json(event)
    assert obj["type"] == "ProcessCreate" and obj["time"] == "2026-11-23T19:21:20.123456Z"
    assert (obj["pid"], obj["parent_pid"], obj["truncated"]) == (1234, 1, False)
    assert base64.b64decode(obj["command_line_base64"]) == command_line.encode("utf-8", "surrogateescape")
    assert b"\xff\xfe-bad" in base64.b64decode(obj["command_line_base64"])
    assert "\ufffd\ufffd-bad" in obj["command_line"] and "caf\u00e9" in obj["command_line"]
    line = json_line(event)
    assert line.isascii() and "\x1b" not in line and "\\udc" not in line
    assert json.loads(line) == obj
    # Valid UTF-8 command lines carry no base64 twin.
    (plain,) = parse(R.encode_process_exec(t, 5, 1, 1, 1, "caf\u00e9 \u202e"))
    assert "command_line_base64" not in event_to_json(plain)
    assert event_to_json(plain)["command_line"] == "caf\u00e9 \u202e"


def test_json_and_text_forms_of_every_record_type() -> None:
    t = R.filetime_now()
    records = b"".join([
        R.encode_process_exit(t, 10, 3), R.encode_process_exit(t, 11, R.EXIT_CODE_UNKNOWN),
        R.encode_thread_create(t, 77, 10), R.encode_thread_exit(t, 77, 10, 0),
        R.encode_image_load(t, 10, 4096, 0xFFFF_F800_0000_1000, "C:\\x\\ntdll.dll\x1b[2J"),
        R.encode_records_lost(t, 12),
    ])
    objs = [event_to_json(e) for e in parse(records)]
    assert objs[0] == {"type": "ProcessExit", "time": objs[0]["time"], "pid": 10, "exit_code": 3}
    assert objs[1]["exit_code"] is None
    assert {k: objs[2][k] for k in ("type", "tid", "pid")} == {"type": "ThreadCreate", "tid": 77, "pid": 10}
    assert (objs[3]["type"], objs[3]["exit_code"]) == ("ThreadExit", 0)
    assert objs[4]["load_address"] == "0xfffff80000001000"  # a string: jq's doubles can't hold it
    assert objs[4]["image_name"] == "C:\\x\\ntdll.dll\x1b[2J"
    assert (objs[5]["type"], objs[5]["count"]) == ("RecordsLost", 12)
    texts = [format_event(e) for e in parse(records)]
    assert texts[0].endswith("exit        pid=10 code=3") and texts[1].endswith("code=?")
    assert texts[2].endswith("thread      tid=77 pid=10") and texts[3].endswith("thread-exit tid=77 pid=10 code=0")
    assert r"image=C:\x\ntdll.dll\x1b[2J" in texts[4] and "\x1b" not in "".join(texts)
    assert "WARNING: 12 records lost here (missed by the source or dropped by a full ring)" in texts[5]
    # ISO-8601 date and time in UTC, to the millisecond, as the record's own time says
    stamp = R.filetime_to_datetime(t).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    assert all(text.startswith(stamp + " ") for text in texts)


def test_json_and_text_carry_the_identity_fields() -> None:
    t = R.filetime_now()
    guid, parent = "{0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0}", "{00000001-0002-0003-0405-060708090a0b}"
    details = R.Details(process_guid=guid, parent_process_guid=parent, image="/usr/bin/sleep",
                        current_directory=os.fsdecode(b"/srv/\xff"), uid=65534, user="nobody",
                        parent_image="/usr/bin/bash", parent_command_line="bash -c 'sleep 1'", start_filetime=t - 10,
                        flags=int(R.EventFlags.PROCFS | R.EventFlags.SEEDED))
    records = b"".join([
        R.encode_process_exec(t, 10, 9, 10, 10, "sleep 1", details),
        R.encode_process_exit(t + 15_000_000, 10, 0, R.Details(process_guid=guid, image="/usr/bin/sleep\x1b[2J",
                                                               lifetime=timedelta(seconds=1.5))),
        R.encode_thread_create(t, 11, 10, R.Details(process_guid=guid)),
    ])
    exec_, exit_, thread = [event_to_json(e) for e in parse(records)]
    assert (exec_["process_guid"], exec_["parent_process_guid"], exec_["image"], exec_["uid"], exec_["user"]) == (
        guid, parent, "/usr/bin/sleep", 65534, "nobody")
    assert (exec_["parent_image"], exec_["parent_command_line"]) == ("/usr/bin/bash", "bash -c 'sleep 1'")
    assert base64.b64decode(exec_["current_directory_base64"]) == b"/srv/\xff"  # bytes survive, like argv
    assert exec_["tty"] is None and exec_["cgroup"] is None and exec_["container_id"] is None  # unknown
    assert exec_["flags"] == ["PROCFS", "SEEDED"] and exec_["start_time"].endswith("Z")
    assert (exit_["process_guid"], exit_["lifetime"]) == (guid, 1.5)
    assert thread["process_guid"] == guid
    assert json.loads(json_line(parse(records).__next__())) == exec_
    text = [format_event(e) for e in parse(records)]
    assert "exec        pid=10 ppid=9 user=nobody image=/usr/bin/sleep cmd=sleep 1" in text[0]
    assert text[1].endswith(r"exit        pid=10 code=0 image=/usr/bin/sleep\x1b[2J lifetime=1.500s")
    assert "\x1b" not in "".join(text)


def test_event_type_names() -> None:
    assert parse_event_types("process_create,exec") == {ItemType.ProcessCreate, ItemType.ProcessExec}
    assert parse_event_types("ProcessExit, thread") == {ItemType.ProcessExit, ItemType.ThreadCreate,
                                                        ItemType.ThreadExit}
    assert parse_event_types("image-load") == {ItemType.ImageLoad}
    with pytest.raises(ValueError, match="unknown event type 'forks'.*process_create"):
        parse_event_types("exec,forks")


def _events(*records: bytes) -> list:
    return list(parse(b"".join(records)))


def test_filter_follows_descendants_and_forgets_exited_pids() -> None:
    t = R.filetime_now()
    stream = _events(
        R.encode_process_create(t, 200, 100, 100, 100, "child"),       # child of 100: followed
        R.encode_process_create(t, 300, 200, 200, 200, "grandchild"),  # grandchild: followed
        R.encode_process_create(t, 400, 999, 999, 999, "stranger"),    # not related
        R.encode_thread_create(t, 301, 300),
        R.encode_records_lost(t, 2),                                   # always shown
        R.encode_process_exit(t, 300, 0),
        R.encode_process_create(t, 500, 300, 300, 300, "pid 300 reused?"),  # 300 exited: not a descendant
        R.encode_process_exit(t, 400, 0),
    )
    keep = EventFilter(pids=[100], descendants=True)
    shown = [e for e in stream if keep(e)]
    assert [(e.type.name, getattr(e, "pid", None)) for e in shown] == [
        ("ProcessCreate", 200), ("ProcessCreate", 300), ("ThreadCreate", 300), ("RecordsLost", None),
        ("ProcessExit", 300)]
    only = EventFilter(pids=[200])
    assert [e.pid for e in stream if only(e) and hasattr(e, "pid")] == [200]


def test_filter_match_follows_the_matching_process_and_types_apply_last() -> None:
    t = R.filetime_now()
    stream = _events(
        R.encode_process_create(t, 10, 1, 1, 1, "bash"),
        R.encode_process_exec(t, 10, 1, 1, 1, "nginx -g daemon"),
        R.encode_thread_create(t, 11, 10),
        R.encode_process_create(t, 20, 1, 1, 1, "other"),
        R.encode_process_exit(t, 20, 0),
        R.encode_process_exec(t, 10, 1, 1, 1, "sleep 1"),  # execs away from nginx: no longer followed
        R.encode_process_exit(t, 10, 0),
    )
    keep = EventFilter(substrings=["nginx"])
    assert [(e.type.name, e.pid) for e in stream if keep(e)] == [("ProcessExec", 10), ("ThreadCreate", 10)]
    glob = EventFilter(globs=["nginx *"], types=[ItemType.ThreadCreate])
    assert [(e.type.name, e.pid) for e in stream if glob(e)] == [("ThreadCreate", 10)]
    exits = EventFilter(globs=["*"], types=[ItemType.ProcessExit])
    assert [e.pid for e in stream if exits(e)] == [20, 10]


# --- the command line as a user runs it ---------------------------------------------------------------------


def test_version_from_console_script_and_module() -> None:
    script = Path(sysconfig.get_path("scripts")) / ("etwmon.exe" if os.name == "nt" else "etwmon")
    for argv in ([str(script), "--version"], etwmon_argv("--version")):
        done = run(argv)
        assert done.returncode == 0, done.stderr
        assert re.match(rb"etwmon \d+\.\d+\.\d+ ", done.stdout)


def test_sources_lists_every_source_with_reasons() -> None:
    done = run(etwmon_argv("sources", "--json"))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert {r["name"] for r in rows} == set(SOURCES)
    for row in rows:
        assert set(row) == {"name", "available", "reason", "lossy", "delivers", "auto", "stale"}
        assert (row["reason"] is None) == row["available"]
        assert isinstance(row["stale"], list) and all(isinstance(line, str) for line in row["stale"])
    # procfs works wherever these tests run (Linux), so auto always has a pick: exactly one row, one that works.
    auto = [r["name"] for r in rows if r["auto"]]
    assert len(auto) == 1, rows
    assert next(r for r in rows if r["name"] == auto[0])["available"]
    text = run(etwmon_argv("sources"))
    assert text.returncode == 0
    for row in rows:
        mark = "*" if row["name"] == auto[0] else " "
        assert re.search(rf"^{re.escape(mark)} {row['name']} ", text.stdout.decode(), re.M)
        if not row["available"]:
            assert row["reason"] in text.stdout.decode()
            assert "source='" not in row["reason"]  # command-line terms: --source NAME


@linux_only
def test_sources_on_linux_names_windows_for_etw_and_procfs_works() -> None:
    rows = {r["name"]: r for r in map(json.loads, run(etwmon_argv("sources", "--json")).stdout.splitlines())}
    assert rows["etw"]["available"] is False and "Windows" in rows["etw"]["reason"]
    assert rows["procfs"]["available"] is True and rows["procfs"]["lossy"] is True


@linux_only
def test_source_etw_on_linux_is_one_line_naming_windows() -> None:
    done = run(etwmon_argv("tail", "--source", "etw"))
    err = done.stderr.decode()
    assert done.returncode == 1
    assert err.count("\n") == 1 and err.startswith("etwmon: error:") and "Windows" in err
    assert_clean_stderr(err)
    assert done.stdout == b""


@pytest.mark.parametrize("args, env, says", [
    (["--source", "nosuch"], {}, "invalid choice: 'nosuch'"),
    (["--type", "forks"], {}, "unknown event type 'forks'"),
    (["--pid", "abc"], {}, "argument --pid: must be a whole number"),
    (["--pid", "0"], {}, "argument --pid: must be at least 1"),
    (["--descendants"], {}, "--descendants needs --pid"),
    *[(["--stats-interval", value], {}, "argument --stats-interval: must be more than 0 and at most 86400 seconds")
      for value in ("0", "inf", "1e300", "nan")],
    (["--stats-interval", "soon"], {}, "argument --stats-interval: must be a number of seconds"),
    *[(["--batch-wait", value], {}, "argument --batch-wait: must be from 0 to 1 seconds")
      for value in ("-0.1", "5", "nan")],
    (["--max-items", "0"], {}, "argument --max-items: must be at least 1"),
    (["--max-items", "lots"], {}, "argument --max-items: must be a whole number, not 'lots'"),
    (["--max-bytes", "1K"], {}, "argument --max-bytes: must be at least 65536 bytes"),
    (["--max-bytes", "12 parsecs"], {}, "argument --max-bytes: must be a size in bytes"),
    # More than any address space: numpy cannot have it, whatever the overcommit setting.
    (["--max-bytes", "1000000G"], {}, "cannot allocate a ring of 10000 records / 1000000.0 GiB: not enough "
                                      "memory; give a smaller --max-bytes"),
    ([], {"ETWMON_MAX_ITEMS": "abc"}, "ETWMON_MAX_ITEMS must be a whole number, not 'abc'"),
    ([], {"ETWMON_MAX_ITEMS": "-5"}, "ETWMON_MAX_ITEMS must be at least 1"),
    ([], {"ETWMON_MAX_BYTES": "100"}, "ETWMON_MAX_BYTES must be at least 65536 bytes"),
    (["--bogus"], {}, "unrecognized arguments: --bogus"),
    (["--hashes", "sha256,crc32"], {}, "argument --hashes: unknown hash algorithm 'crc32'"),
    (["--hashes", "sha256", "--from", "nats://127.0.0.1:1"], {}, "--hashes are computed where the events are read"),
])
def test_bad_values_are_one_line_usage_errors(args: list[str], env: dict[str, str], says: str) -> None:
    done = run(etwmon_argv("tail", "--source", "procfs", *args), env=clean_env(**env))
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert err.startswith("etwmon: error: ") and err.count("\n") == 1, err
    assert says in err
    assert_clean_stderr(err)


def test_no_command_is_a_usage_error() -> None:
    done = run(etwmon_argv())
    assert done.returncode == 2 and done.stderr.decode().startswith("etwmon: error: ")


def test_option_wins_over_environment_and_sizes_take_units() -> None:
    # In-process: the parsing path the subprocess tests above exercise for bad values.
    from etwmon.cli import _build_parser, _limits

    args = _build_parser().parse_args(["tail"])
    assert _limits(args, {}) == (None, None)
    assert _limits(args, {"ETWMON_MAX_ITEMS": "123", "ETWMON_MAX_BYTES": "2M"}) == (123, 2 << 20)
    args = _build_parser().parse_args(["tail", "--max-items", "50", "--max-bytes", "128KiB"])
    assert _limits(args, {"ETWMON_MAX_ITEMS": "123", "ETWMON_MAX_BYTES": "garbage"}) == (50, 128 << 10)


@linux_only
def test_environment_sets_the_ring_and_the_option_wins() -> None:
    cases = [({"ETWMON_MAX_ITEMS": "123", "ETWMON_MAX_BYTES": "1M"}, [], "ring: 123 records / 1.0 MiB"),
             ({"ETWMON_MAX_ITEMS": "123"}, ["--max-items", "50"], "ring: 50 records / ")]
    for env, args, says in cases:
        with Watch(unprivileged(etwmon_argv("tail", "--source", "procfs", *args)), env=clean_env(**env)) as w:
            w.ready()
            assert says in w.stderr
            assert w.stop() == 0


# --- live: unprivileged (procfs, every capability dropped) ----------------------------------------------------


@linux_only
def test_procfs_unprivileged_text_and_no_privilege_error() -> None:
    tag = new_tag()
    with Watch(unprivileged(etwmon_argv("tail", "--source", "procfs"))) as w:
        assert w.ready() == "procfs"
        assert "can miss short-lived processes" in w.stderr  # a lossy source says so
        pid = spawn(tag, code=3, seconds=0.6)
        line = w.wait_out(lambda l: tag.encode() in l, what=f"a line with {tag}")
        # (user= and image= when the identity stage knows them: an unprivileged reader of /proc may not)
        assert re.match(rb"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (fork|exec) +pid=%d ppid=\d+( user=\S+)?"
                        rb"( image=\S+)? cmd=sh -c " % pid, line)
        w.wait_out(lambda l: re.search(rb" exit +pid=%d code=" % pid, l) is not None,
                   what=f"the exit of {pid}")
        status = w.stop()
    assert status == 0
    records, shown, lost, dropped = summary_of(w.stderr)
    assert shown >= 2 and records >= shown
    assert_clean_stderr(w.stderr)
    # The audit log needs CAP_AUDIT_CONTROL and CAP_AUDIT_READ: without them, one line saying what to do.
    done = run(unprivileged(etwmon_argv("tail", "--source", "audit")))
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert err.startswith("etwmon: error:") and err.count("\n") == 1, err
    assert re.search(r"root|CAP_AUDIT|privilege|permission", err, re.I), err
    assert_clean_stderr(err)


@pytest.mark.parametrize("batch_wait", [0.0, 0.25])
def test_tail_gathers_the_events_that_follow_the_first_into_one_batch(batch_wait: float, monkeypatch) -> None:
    """``--batch-wait``: once records are there, the events arriving during the wait join the same read."""
    import etwmon
    from etwmon import tail


    source = ScriptedSource()
    slept: list[float] = []

    def sleep(seconds: float) -> None:  # an event arrives while tail waits for more
        slept.append(seconds)
        done = threading.Event()
        source.send(2)
        source.commands.put(("ack", done))
        assert done.wait(WAIT)

    monkeypatch.setattr(tail, "_sleep", sleep)
    with etwmon.Monitor(source=source) as mon:
        waiter = tail._Waiter(mon, None, tail.StopSignals(), batch_wait)
        source.send(1)
        waiter.wait(WAIT)
        buf = bytearray(1 << 16)
        pids = [event.pid for event in parse(buf[:mon.readinto(buf)])]
    assert slept == ([batch_wait] if batch_wait else [])
    assert pids == ([1, 2] if batch_wait else [1])


# --- live: the default source as root ----------------------------------------------------------------------------


def _start(*args: str) -> Watch:
    # A big ring: the machine is shared and a neighbour's fork storm must not push our events out.
    return Watch(etwmon_argv("tail", "--max-items", "200000", *args))


@pytest.mark.root
def test_default_source_json_lines() -> None:
    tag = new_tag()
    with _start("--json") as w:
        source = w.ready()
        spawned = [time.time_ns()]
        pid = spawn(tag, code=7)
        spawned.append(time.time_ns())
        started = wait_json(w, lambda e: e.get("pid") == pid and tag in e.get("command_line", ""),
                            f"ProcessCreate/Exec of {pid} with {tag}")
        ended = wait_json(w, lambda e: e["type"] == "ProcessExit" and e["pid"] == pid, f"exit of {pid}")
        status = w.stop()
    stopped = time.time_ns()
    assert status == 0
    assert_auto_picked(source)
    assert started["type"] in ("ProcessCreate", "ProcessExec")
    assert started["command_line"] == f"sh -c 'sleep 0.4; exit 7' {tag}"
    assert {"parent_pid", "creating_pid", "creating_tid", "truncated"} <= set(started)
    assert ended["exit_code"] == 7

    def ns(event: dict) -> int:
        when = datetime.strptime(event["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
        return int(when.timestamp()) * 10**9 + when.microsecond * 1000

    for event in w.json_lines():  # every line is one JSON object with a type and an ISO-8601 UTC time
        assert ISO_UTC.match(event["time"]), event
        assert ns(event) <= stopped + CLOCK_SLACK_NS, event  # nothing from the future
    # Our process ran between the two readings around spawn(), and its events say so.
    assert spawned[0] - CLOCK_SLACK_NS <= ns(started) <= ns(ended) <= spawned[1] + CLOCK_SLACK_NS
    records, shown, lost, dropped = summary_of(w.stderr)
    assert shown == sum(e["type"] != "RecordsLost" for e in w.json_lines())
    assert records >= shown
    assert_clean_stderr(w.stderr)


@pytest.mark.root
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_default_source_text_ends_cleanly_on(sig: int) -> None:
    tag = new_tag()
    with _start() as w:
        w.ready()
        pid = spawn(tag, code=5)
        w.wait_out(lambda l: b"pid=%d " % pid in l and tag.encode() in l, what=f"{tag} line")
        w.wait_out(lambda l: re.search(rb" exit +pid=%d code=" % pid, l) is not None, what="exit line")
        status = w.stop(sig)
    assert status == 0
    summary_of(w.stderr)
    assert_clean_stderr(w.stderr)


@pytest.mark.root
def test_ctrl_c_shows_what_was_captured_before_it() -> None:
    """Events that happened before Ctrl-C but were not yet shown (here: queued in the kernel while the process was
    stopped) are shown before the summary, and the summary leaves nothing unread."""
    with _start("--json") as w:
        w.ready()
        w.proc.send_signal(signal.SIGSTOP)
        try:
            children = [subprocess.Popen(["sh", "-c", "exit 4", new_tag()]) for _ in range(5)]
            pids = [child.pid for child in children]
            assert [child.wait(WAIT) for child in children] == [4] * 5
            w.proc.send_signal(signal.SIGINT)  # pending: it arrives with the queued events
        finally:
            w.proc.send_signal(signal.SIGCONT)
        # That one Ctrl-C ends it: a second one from w.stop() would mean "stop now, give up the rest" (a race
        # the test must not run).
        w.proc.wait(WAIT)
        status = w.stop()
    assert status == 0, w.stderr
    exits = {e["pid"] for e in w.json_lines() if e["type"] == "ProcessExit"}
    assert set(pids) <= exits, (pids, w.stderr)
    records, shown, lost, dropped = summary_of(w.stderr)
    assert "unread" not in w.stderr, w.stderr
    assert shown == sum(e["type"] != "RecordsLost" for e in w.json_lines())
    assert_clean_stderr(w.stderr)


@pytest.mark.root
@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_escape_sequences_in_command_lines_never_reach_the_terminal(as_json: bool) -> None:
    tag = new_tag()
    with _start(*(["--json"] if as_json else [])) as w:
        w.ready()
        pid = spawn(tag, ESC_TITLE, ESC_CLEAR, b"\xff\xfe-bad")
        ours = (b'"pid":%d,' % pid, b"pid=%d " % pid)
        line = w.wait_out(lambda l: tag.encode() in l and any(p in l for p in ours), what=f"{tag} line of {pid}")
        w.stop()
    assert b"\x1b" not in w.stdout and b"\x07" not in w.stdout
    assert "\x1b" not in w.stderr
    if as_json:
        event = json.loads(line)
        assert event["pid"] == pid
        assert ESC_TITLE in event["command_line"] and ESC_CLEAR in event["command_line"]
        exact = base64.b64decode(event["command_line_base64"])
        assert exact == b"sh -c 'sleep 0.4; exit 7' " + tag.encode() + \
            b" '\x1b]0;pwned\x07' '\x1b[2J' '\xff\xfe-bad'"
        assert line.isascii()
        # What ops pipe it into must read it, bytes and all (CI installs jq).
        require(shutil.which("jq") is not None, "jq is not installed (apt-get install jq)")
        jq = subprocess.run(["jq", "-r", ".command_line_base64"], input=line, capture_output=True)
        assert jq.returncode == 0 and base64.b64decode(jq.stdout) == exact
    else:
        assert rb"'\x1b]0;pwned\x07' '\x1b[2J' '\xff\xfe-bad'" in line


@pytest.mark.root
def test_pid_and_descendants_follow_the_tree_live() -> None:
    child_tag, other_tag = new_tag(), new_tag()
    script = f"read go; sh -c 'sleep 0.4; exit 5' {child_tag}; exit 4"
    for descendants in (True, False):
        parent = subprocess.Popen(["sh", "-c", script, "parent"], stdin=subprocess.PIPE)
        try:
            args = ["--json", "--pid", str(parent.pid)] + (["--descendants"] if descendants else [])
            with _start(*args) as w:
                w.ready()
                spawn(other_tag)  # not in the tree: never shown
                parent.communicate(b"go\n", timeout=WAIT)
                assert parent.returncode == 4
                wait_json(w, lambda e: e["type"] == "ProcessExit" and e["pid"] == parent.pid, "parent's exit")
                if descendants:
                    wait_json(w, lambda e: child_tag in e.get("command_line", ""), f"{child_tag} in the tree")
                w.stop()
        finally:
            parent.kill()
        events = [e for e in w.json_lines() if e["type"] != "RecordsLost"]
        assert other_tag.encode() not in w.stdout
        tree = {parent.pid}
        for event in events:
            if descendants and event["type"] == "ProcessCreate" and event["parent_pid"] in tree:
                tree.add(event["pid"])
            assert event["pid"] in tree, (event, tree)
        if not descendants:
            assert child_tag.encode() not in w.stdout
            assert {e["pid"] for e in events} == {parent.pid}


@pytest.mark.root
def test_type_filter() -> None:
    tag = new_tag()
    with _start("--json", "--type", "exit,exec") as w:
        source = w.ready()
        assert_auto_picked(source)
        pid = spawn(tag, code=9)
        ended = wait_json(w, lambda e: e["type"] == "ProcessExit" and e["pid"] == pid, f"exit of {pid}")
        wait_json(w, lambda e: e["type"] == "ProcessExec" and tag in e["command_line"], f"exec of {tag}")
        w.stop()
    assert {e["type"] for e in w.json_lines()} <= {"ProcessExit", "ProcessExec", "RecordsLost"}
    assert ended["exit_code"] == 9


@pytest.mark.root
@pytest.mark.parametrize("how", ["match", "glob"])
def test_command_line_match_and_glob(how: str) -> None:
    wanted, other = new_tag(), new_tag()
    pattern = wanted if how == "match" else f"sh -c * {wanted}"
    with _start("--json", f"--{how}", pattern) as w:
        w.ready()
        spawn(other)
        pid = spawn(wanted, code=6)
        wait_json(w, lambda e: e["type"] == "ProcessExit" and e["pid"] == pid, f"exit of {pid} (follows the match)")
        w.stop()
    assert other.encode() not in w.stdout
    matched: set[int] = set()
    for event in w.json_lines():
        if event["type"] == "RecordsLost":
            continue
        if "command_line" in event:
            assert wanted in event["command_line"], event
            matched.add(event["pid"])
        assert event["pid"] in matched, event


@pytest.mark.root
def test_stats_line_on_stderr() -> None:
    with _start("--stats", "--stats-interval", "0.2") as w:
        w.ready()
        line = w.wait_err(lambda l: b"stats:" in l, what="a stats line")
        spawn(new_tag())
        w.stop()
    assert re.match(rb"etwmon: stats: \d+ records \([\d.]+/s\), ring \d+/200000 records .*\(\d+% full\), "
                    rb"\d+ missed, \d+ dropped, \d+ shown", line), line


@pytest.mark.root
def test_records_lost_are_shown_in_text_and_json() -> None:
    """A one-record ring behind a stopped reader drops records: the drop is a line, never silent."""
    for as_json in (False, True):
        with Watch(etwmon_argv("tail", "--max-items", "1", *(["--json"] if as_json else []))) as w:
            w.ready()
            w.proc.send_signal(signal.SIGSTOP)  # the whole process: the source's events queue in the kernel
            try:
                children = [subprocess.Popen(["sh", "-c", "sleep 1", new_tag()]) for _ in range(20)]
                for child in children:
                    child.wait()
            finally:
                w.proc.send_signal(signal.SIGCONT)
            if as_json:
                lost = wait_json(w, lambda e: e["type"] == "RecordsLost", "a RecordsLost object")
                assert lost["count"] >= 1 and ISO_UTC.match(lost["time"])
            else:
                line = w.wait_out(lambda l: b"WARNING:" in l, what="a WARNING line")
                assert re.search(rb"WARNING: \d+ records lost", line)
            w.stop()
        records, shown, lost, dropped = summary_of(w.stderr)
        reported = sum(int(m) for m in re.findall(rb"WARNING: (\d+) records lost", w.stdout)) if not as_json \
            else sum(e["count"] for e in w.json_lines() if e["type"] == "RecordsLost")
        assert reported == lost + dropped > 0  # every loss counted reached the reader in-band


@pytest.mark.root
def test_broken_pipe_ends_quietly() -> None:
    proc = subprocess.Popen(etwmon_argv("tail", "--json"), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=clean_env())
    try:
        start_up = []
        while not start_up or b"watching" not in start_up[-1]:  # warnings may come first
            line = proc.stderr.readline()
            assert line, start_up
            start_up.append(line)
        tag = new_tag()
        spawn(tag)
        first = proc.stdout.readline()  # like `head -n 1`: one line, then the reader goes away
        json.loads(first)
        proc.stdout.close()
        spawn(new_tag())  # more output for a writer that would not notice otherwise
        status = proc.wait(WAIT)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 0, err
    assert_clean_stderr(err)
    records, shown, lost, dropped = summary_of(err)  # the counts are reported even so (on stderr)
    assert "etwmon: stdout closed: " in err and shown >= 1 and records >= shown


@pytest.mark.root
def test_broken_pipe_in_a_shell_pipeline() -> None:
    pipeline = subprocess.Popen(["sh", "-c", f"'{PY}' -m etwmon tail --json | head -n 1"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    try:
        deadline = time.monotonic() + WAIT
        while pipeline.poll() is None and time.monotonic() < deadline:
            spawn(new_tag(), seconds=0.1)  # events for the first line
        out, err = pipeline.communicate(timeout=WAIT)
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
            pipeline.wait()
    assert pipeline.returncode == 0
    assert len(out.splitlines()) == 1 and json.loads(out)["type"]
    assert_clean_stderr(err.decode())
    records, shown, lost, dropped = summary_of(err.decode())  # `etwmon tail | head`: the summary still comes
    assert shown >= 1 and records >= shown


@linux_only
def test_ctrl_c_with_a_reader_that_stopped_reading_leaves_whole_lines_only() -> None:
    """stdout is a pipe whose reader stopped reading: it fills, etwmon blocks writing, then SIGINT. etwmon must end
    on its own (the reader never resumes before it exits) and the pipe must hold whole JSON lines only; what
    could not be written is counted in the summary."""
    import fcntl
    import select
    import termios

    r, w = os.pipe()
    fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, 4096)  # one page: a few lines fill it
    proc = subprocess.Popen(unprivileged(etwmon_argv("tail", "--json", "--source", "procfs")),
                            stdin=subprocess.DEVNULL, stdout=w, stderr=subprocess.PIPE, env=clean_env())
    try:
        for line in iter(proc.stderr.readline, b""):  # the lossy-source warning, then the "watching" line
            if b"watching" in line:
                break
        # Five children with 3000-character command lines: ~35 KB of JSON, far more than the pipe holds. They
        # live 1 s, so the poller sees each of them.
        children = [subprocess.Popen(["sh", "-c", "sleep 1", new_tag(), "x" * 3000]) for _ in range(5)]
        for child in children:
            assert child.wait(WAIT) == 0
        deadline = time.monotonic() + WAIT
        while select.select([], [w], [], 0)[1]:  # our copy of the write end: writable until the pipe is full
            assert time.monotonic() < deadline, "the pipe never filled"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        status = proc.wait(WAIT)  # nobody reads: it must still end
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(w)
    left = bytearray(4)
    fcntl.ioctl(r, termios.FIONREAD, left)
    with os.fdopen(r, "rb") as reader:
        data = reader.read()
    assert status == 0, err
    assert_clean_stderr(err)
    assert int.from_bytes(left, sys.byteorder) == len(data) > 0
    assert data.endswith(b"\n"), data[-200:]
    lines = [json.loads(line) for line in data.splitlines()]  # every line whole
    records, shown, lost, dropped = summary_of(err)
    assert shown == sum(e["type"] != "RecordsLost" for e in lines)
    assert re.search(r", [1-9]\d* not written \(stdout blocked\)", err), err
