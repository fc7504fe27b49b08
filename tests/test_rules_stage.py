"""The rules stage between the source and the ring: excluded events take no ring space, threads follow their
process, redaction re-encodes the record so no reader sees the secret, counters per rule; Monitor(rules=...)
and a live `etwmon tail --config`."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
import uuid

import pytest

pytest.importorskip("defusedxml")

from etwmon import Monitor, parse  # noqa: E402
from etwmon import records as R  # noqa: E402
from etwmon.errors import RecordFormatError  # noqa: E402
from etwmon.rules import RuleSet, RulesStage  # noqa: E402
from etwmon.rules import stage as stage_module  # noqa: E402

from .helpers import (  # noqa: E402
    ListSink, ScriptedSource, Watch, assert_clean_stderr, etwmon_argv, nameless_uid, read_until,
)

CONFIG = '''<Sysmon schemaversion="4.90">
  <EventFiltering>
    <RuleGroup name="" groupRelation="or">
      <ProcessCreate onmatch="include">
        <CommandLine condition="contains" name="deploys">deploy</CommandLine>
        <CommandLine condition="begin with" name="backups">/usr/bin/backup</CommandLine>
      </ProcessCreate>
      <ProcessCreate onmatch="exclude">
        <CommandLine condition="contains" name="dry runs">--dry-run</CommandLine>
      </ProcessCreate>
      <ProcessTerminate onmatch="exclude">
        <ProcessId condition="is">4242</ProcessId>
      </ProcessTerminate>
    </RuleGroup>
  </EventFiltering>
  <Redaction>
    <Redact name="password flag">--password[= ](\\S+)</Redact>
    <Redact name="tokens">tok_[A-Za-z0-9]+</Redact>
  </Redaction>
</Sysmon>'''


def t() -> int:
    return R.filetime_now()


def create(pid, line, ppid=1):
    return R.encode_process_create(t(), pid, ppid, ppid, ppid, line)


def exec_(pid, line, ppid=1):
    return R.encode_process_exec(t(), pid, ppid, pid, pid, line)


@pytest.fixture
def staged():
    sink = ListSink()
    return RulesStage(sink, RuleSet.from_xml(CONFIG)), sink


def test_only_kept_records_reach_the_sink_and_threads_follow_their_process(staged):
    stage, sink = staged
    for record in [create(10, "/bin/bash"), exec_(10, "deploy app"), R.encode_thread_create(t(), 11, 10),
                   create(20, "/bin/bash"), exec_(20, "ls -l"), R.encode_thread_create(t(), 21, 20),
                   R.encode_thread_exit(t(), 21, 20, 0), R.encode_thread_create(t(), 31, 30),
                   exec_(40, "deploy --dry-run"), R.encode_thread_create(t(), 41, 40),
                   R.encode_process_exit(t(), 20, 0), R.encode_process_exit(t(), 4242, 0),
                   R.encode_records_lost(t(), 3)]:
        stage.push(record)
    kinds = [(type(e).__name__, getattr(e, "pid", None), getattr(e, "tid", None)) for e in sink.events()]
    assert kinds == [
        ("ProcessExec", 10, None), ("ThreadCreate", 10, 11),  # included, and its thread
        ("ThreadCreate", 30, 31),  # a process rules never judged: its threads pass (never hidden)
        ("ProcessExit", 20, None),  # ProcessTerminate rules judge exits on their own, as in Sysmon
        ("RecordsLost", None, None),  # loss reports always pass
    ]
    stats = stage.stats()
    assert stats["evaluated"] == 7 and stats["kept"] == 2  # 3 creates/execs + 2 exits judged, threads followed
    assert stats["not_included"] == 3 and stats["excluded"] == 2  # creates of 10 and 20, exec of 20; dry run, 4242
    assert stats["followers_dropped"] == 3  # threads 21 (twice) and 41
    by_rule = {r["name"]: r for r in stats["rules"]}
    assert by_rule["deploys"]["matched"] == 1 and by_rule["dry runs"]["excluded"] == 1


def test_an_exec_to_an_excluded_program_drops_the_threads_after_it(staged):
    stage, sink = staged
    stage.push(exec_(50, "deploy"))
    stage.push(R.encode_thread_create(t(), 51, 50))
    stage.push(exec_(50, "sleep 1"))  # same pid, new program: not included any more
    stage.push(R.encode_thread_create(t(), 52, 50))
    stage.push(R.encode_process_exit(t(), 50, 0))
    stage.push(R.encode_thread_create(t(), 53, 50))  # pid reused after the exit: not judged again yet
    assert [(type(e).__name__, getattr(e, "tid", None)) for e in sink.events()] == [
        ("ProcessExec", None), ("ThreadCreate", 51), ("ProcessExit", None), ("ThreadCreate", 53)]


def test_redaction_rewrites_the_record_itself(staged):
    stage, sink = staged
    stage.push(exec_(60, "deploy --password=hunter2 --token tok_AbC123 --password secret2"))
    stage.push(exec_(61, "/usr/bin/backup --password=keepme2 /srv"))
    stage.push(exec_(62, "deploy plain"))
    raw = b"".join(sink.records)
    for secret in ("hunter2", "tok_AbC123", "secret2", "keepme2"):
        assert secret.encode("utf-16-le") not in raw and secret.encode() not in raw
    lines = [e.command_line for e in sink.events()]
    assert lines == ["deploy --password=*** --token *** --password ***", "/usr/bin/backup --password=*** /srv",
                     "deploy plain"]
    stats = stage.stats()
    assert stats["redacted"] == 2
    assert {r["redaction"]: r["redacted"] for r in stats["redactions"]} == {"password flag": 2, "tokens": 1}


def test_an_unchanged_record_is_passed_on_as_it_came(staged):
    stage, sink = staged
    record = R.encode_process_exit(t(), 63, 0)  # kept (no exclude matches), named by no rule, nothing to redact
    stage.push(record)
    assert sink.records == [record]


def test_the_including_rule_names_the_record(staged):
    stage, sink = staged
    stage.push(exec_(64, "/usr/bin/backup /srv --password=x"))
    stage.push(R.encode_process_exit(t(), 64, 0))
    created, exited = sink.events()
    assert created.rule_name == "backups" and created.command_line == "/usr/bin/backup /srv --password=***"
    assert exited.rule_name is None


def test_parent_command_line_is_redacted_and_rule_name_set_in_the_block_kept_whole():
    sink = ListSink()
    stage = RulesStage(sink, RuleSet.from_xml(CONFIG))
    details = R.Details(process_guid="{11111111-2222-3333-4444-555555555555}", image="/usr/bin/deploy",
                        user="ops", parent_command_line="sh -c 'x --password=hunter2'", uid=1000,
                        parent_image="/bin/sh", cgroup="/system.slice/x.service")
    stage.push(R.encode_process_exec(t(), 70, 1, 70, 70, "deploy now tok_abc123", details))
    (record,) = sink.records
    assert b"hunter2" not in record and "hunter2".encode("utf-16-le") not in record
    assert "tok_abc123".encode("utf-16-le") not in record
    event = next(parse(record))
    assert event.command_line == "deploy now ***"
    assert event.parent_command_line == "sh -c 'x --password=***"
    assert event.rule_name == "deploys"
    kept = dataclasses.replace(event, rule_name=None, parent_command_line=None, command_line="")
    assert kept.details() == dataclasses.replace(details, parent_command_line=None)  # the rest untouched
    # The block keeps its order (RuleName after the fixed-size fields), as every writer puts it.
    tags = [tag for tag, _ in R.block_fields(record)[1]]
    assert tags == sorted(tags, key=R.TAG_ORDER.index)
    assert stage.stats()["redacted"] == 1
    assert [r["redacted"] for r in stage.stats()["redactions"]] == [1, 1]


def test_a_parent_command_line_that_is_not_utf16_drops_the_record():
    sink = ListSink()
    stage = RulesStage(sink, RuleSet.from_xml(CONFIG))
    record = R.with_packed(exec_(71, "deploy"), 0, [R.pack_field(int(R.ExtensionTag.ParentCommandLine),
                                                                 "x --password=hunter2".encode("utf-16-le") + b"!")])
    stage.push(record)
    assert sink.records == [] and stage.stats()["unredactable"] == 1


def test_a_record_the_rules_cannot_read_goes_no_further(staged):
    stage, sink = staged
    bad = bytearray(exec_(65, "deploy --password=hunter2"))
    bad[32:34] = (5000).to_bytes(2, "little")  # CommandLineLength past the record's Size
    stage.push(bytes(bad))
    stage.push(exec_(66, "deploy"))
    assert [e.pid for e in sink.events()] == [66]
    assert stage.stats()["unreadable"] == 1


def test_undecided_events_are_kept_counted_and_warned_once(caplog):
    sink = ListSink()
    stage = RulesStage(sink, RuleSet.from_xml(
        '<Sysmon><EventFiltering><ProcessCreate onmatch="include"><Image condition="image" name="shells">bash'
        '</Image></ProcessCreate></EventFiltering></Sysmon>'))
    with caplog.at_level("WARNING", logger="etwmon.rules"):
        for pid in (80, 81, 82):
            stage.push(exec_(pid, "/bin/bash"))  # these records carry no image: the rule cannot judge them
    assert len(sink.records) == 3
    stats = stage.stats()
    assert stats["undecided"] == 3 and stats["unknown_fields"] == {"Image": 3}
    warnings = [r.getMessage() for r in caplog.records if "does not know Image" in r.getMessage()]
    assert len(warnings) == 1 and "'shells'" in warnings[0]


def test_replace_swaps_the_rules_and_restarts_the_counters(staged):
    stage, sink = staged
    stage.push(exec_(90, "ls"))
    assert stage.stats()["not_included"] == 1
    stage.replace(RuleSet.from_xml('<Sysmon><EventFiltering><ProcessCreate onmatch="exclude"/></EventFiltering>'
                                   '</Sysmon>', "new.xml"))
    stage.push(exec_(91, "ls"))
    assert [e.pid for e in sink.events()] == [91]
    stats = stage.stats()
    assert stats["source"] == "new.xml" and stats["kept"] == 1 and stats["not_included"] == 0


def test_the_excluded_process_table_is_bounded(monkeypatch):
    monkeypatch.setattr(stage_module, "MAX_TRACKED_PROCESSES", 3)
    sink = ListSink()
    stage = RulesStage(sink, RuleSet.from_xml(CONFIG))
    for pid in range(100, 105):
        stage.push(exec_(pid, "ls"))
    assert stage.stats()["forgotten"] == 2
    stage.push(R.encode_thread_create(t(), 1, 100))  # forgotten: shown, not hidden
    stage.push(R.encode_thread_create(t(), 2, 104))
    assert [e.tid for e in sink.events()] == [1]


def test_a_user_condition_names_the_uid_of_a_record_that_carries_no_user():
    import pwd

    root = pwd.getpwuid(0).pw_name
    nameless = nameless_uid()
    ruleset = RuleSet.from_xml(f'<Sysmon schemaversion="4.90"><EventFiltering><ProcessCreate onmatch="include">'
                               f'<User condition="is" name="by-user">{root.upper()}</User></ProcessCreate>'
                               f'</EventFiltering></Sysmon>')
    kernel = R.encode_process_exec(t(), 5, 1, 5, 5, "x", R.Details(uid=0))  # the uid only, as the kernel writes
    named = R.encode_process_exec(t(), 6, 1, 6, 6, "x", R.Details(uid=0, user="someone"))  # the record's wins
    unknown = R.encode_process_exec(t(), 7, 1, 7, 7, "x", R.Details(uid=nameless))
    for record, keep, undecided in ((kernel, True, None), (named, False, None), (unknown, True, "User")):
        verdict = ruleset.decide_record(record)
        (event,) = parse(record)
        assert (verdict.keep, verdict.unknown) == (keep, undecided)
        assert (ruleset.decide(event).keep, ruleset.decide(event).unknown) == (keep, undecided)
    assert ruleset.decide_record(kernel).rule_name == "by-user"


# --- Monitor -------------------------------------------------------------------------------------------------


def _read(monitor: Monitor, want: int) -> list:
    return read_until(monitor, lambda events: len(events) >= want, quiet=0.3)


def test_monitor_applies_rules_before_the_ring_and_reloads(tmp_path):
    path = tmp_path / "sysmon.xml"
    path.write_text(CONFIG)
    path.chmod(0o644)
    source = ScriptedSource()
    with Monitor(source=source, rules=path) as monitor:
        source.commands.put(("records", [exec_(1, "ls"), exec_(2, "deploy --password=x1"), exec_(3, "cat"),
                                         R.encode_thread_create(t(), 4, 3)]))
        events = _read(monitor, 1)
        assert [e.command_line for e in events] == ["deploy --password=***"]
        assert monitor.ring.stats.pushed == 1  # excluded events took no ring space
        stats = monitor.stats.rules
        assert stats["kept"] == 1 and stats["not_included"] == 2 and stats["followers_dropped"] == 1
        path.write_text('<Sysmon><EventFiltering><ProcessCreate onmatch="exclude"/></EventFiltering></Sysmon>')
        monitor.set_rules(path)  # what the service does on SIGHUP
        source.commands.put(("records", [exec_(5, "ls")]))
        assert [e.command_line for e in _read(monitor, 1)] == ["ls"]
        path.write_text("<Sysmon><broken")
        with pytest.raises(Exception, match="not well-formed"):
            monitor.set_rules(path)
        assert monitor.rules.source == str(path)  # the last good rules stay in force
        source.commands.put(("records", [exec_(6, "ls")]))
        assert [e.pid for e in _read(monitor, 1)] == [6]
    assert Monitor(source=ScriptedSource()).stats.rules == {}


# --- live ----------------------------------------------------------------------------------------------------


LIVE_CONFIG = '''<Sysmon schemaversion="4.90">
  <EventFiltering>
    <RuleGroup name="" groupRelation="or">
      <ProcessCreate onmatch="include">
        <CommandLine condition="contains" name="marked">{marker}</CommandLine>
      </ProcessCreate>
      <ProcessCreate onmatch="exclude">
        <CommandLine condition="contains">{marker}-skip</CommandLine>
      </ProcessCreate>
      <ProcessTerminate onmatch="include"/>
    </RuleGroup>
  </EventFiltering>
  <Redaction><Redact name="password">--password=(\\S+)</Redact></Redaction>
</Sysmon>'''


def _tail(config, fmt: list[str], marker: str, secret: str) -> Watch:
    """``etwmon tail --config`` while four processes run: two marked, one marked but excluded, one unrelated;
    a secret on two command lines."""
    watch = Watch(etwmon_argv("tail", "--config", str(config), "--batch-wait", "0", *fmt))
    with watch:
        watch.ready()
        true = shutil.which("true")
        for argv in ([true, f"{marker}-one", f"--password={secret}"], [true, f"{marker}-skip"],
                     [true, "unrelated", f"--password={secret}"], [true, f"{marker}-two"]):
            subprocess.run(argv, check=True)
        watch.wait_out(lambda line: f"{marker}-two".encode() in line, what=f"the {marker}-two process")
        time.sleep(0.5)  # anything wrongly let through has time to show
        assert watch.stop() == 0
    assert_clean_stderr(watch.stderr)
    return watch


@pytest.mark.root
def test_live_tail_with_config_shows_only_matching_processes_and_never_the_secret(tmp_path):
    marker = f"etwmon-rules-{uuid.uuid4().hex[:8]}"
    secret = f"s3cret-{uuid.uuid4().hex[:8]}"
    config = tmp_path / "live.xml"
    config.write_text(LIVE_CONFIG.format(marker=marker))
    config.chmod(0o644)

    watch = _tail(config, ["--json"], marker, secret)
    assert secret.encode() not in watch.stdout and secret not in watch.stderr
    events = watch.json_lines()
    processes = [e for e in events if e["type"] in ("ProcessCreate", "ProcessExec")]
    lines = [e["command_line"] for e in processes]
    assert any(f"{marker}-one --password=***" in line for line in lines), lines
    assert any(f"{marker}-two" in line for line in lines), lines
    assert all(marker in line and f"{marker}-skip" not in line for line in lines), lines  # only matching ones
    assert not [e for e in events if e["type"] == "ProcessExit"]  # <ProcessTerminate onmatch="include"/>
    named = {e.get("rule_name") for e in processes}
    assert named <= {"marked", None}
    if "rule_name" in getattr(R.ProcessExec, "__dataclass_fields__", {}):
        assert named == {"marked"}  # the record carries the rule's name
    assert "rules kept" in watch.stderr  # the summary says what the rules did

    text = _tail(config, [], marker, secret)
    assert secret.encode() not in text.stdout
    assert f"{marker}-one --password=***".encode() in text.stdout and f"{marker}-skip".encode() not in text.stdout


@pytest.mark.root
def test_live_readinto_bytes_never_hold_the_secret(tmp_path):
    marker = f"etwmon-rules-{uuid.uuid4().hex[:8]}"
    secret = f"s3cret-{uuid.uuid4().hex[:8]}"
    rules = RuleSet.from_xml(LIVE_CONFIG.format(marker=marker))
    raw = bytearray()
    buf = bytearray(1 << 16)
    with Monitor(rules=rules) as monitor:
        time.sleep(0.3)
        true = shutil.which("true")
        subprocess.run([true, f"{marker}-one", f"--password={secret}"], check=True)
        subprocess.run([true, "unrelated", f"--password={secret}"], check=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and f"{marker}-one".encode("utf-16-le") not in raw:
            monitor.wait(0.5)
            raw += buf[:monitor.readinto(buf)]
        time.sleep(0.5)
        raw += buf[:monitor.readinto(buf)]
        stats = monitor.stats.rules
    assert f"{marker}-one --password=***".encode("utf-16-le") in raw
    assert secret.encode("utf-16-le") not in raw and secret.encode() not in raw
    assert stats["redacted"] >= 1 and stats["kept"] >= 1
    assert os.geteuid() == 0


PARENT_CONFIG = '''<Sysmon schemaversion="4.90"><EventFiltering><ProcessCreate onmatch="include">
  <ParentCommandLine condition="contains" name="child">{marker}</ParentCommandLine>
</ProcessCreate></EventFiltering>
<Redaction><Redact name="password">--password=(\\S+)</Redact></Redaction></Sysmon>'''


@pytest.mark.root
def test_live_by_default_a_parent_command_line_rule_matches_and_its_secret_stays_redacted():
    from etwmon.sources.bpf import BpfSource

    from .conftest import require

    require(BpfSource.unavailable_reason() is None, f"bpf: {BpfSource.unavailable_reason()}")
    marker = f"etwmon-parent-{uuid.uuid4().hex[:8]}"
    secret = f"s3cret-{uuid.uuid4().hex[:8]}"
    true = shutil.which("true")
    with Monitor(source="bpf", rules=RuleSet.from_xml(PARENT_CONFIG.format(marker=marker))) as monitor:
        time.sleep(0.3)
        sh = subprocess.run(["sh", "-c", f"{true} child-of-marked; true {marker} --password={secret}"], check=True)
        assert sh.returncode == 0
        events = read_until(monitor, lambda evs: any(e.type == R.ItemType.ProcessExec
                                                     and e.command_line.endswith("child-of-marked") for e in evs))
        execs = [e for e in events if e.type == R.ItemType.ProcessExec and e.command_line.endswith("child-of-marked")]
        chain = monitor.ancestors(execs[0].process_guid) if execs else []
        kernel_written = monitor.stats.source_stats["kernel_written"]
    assert execs and execs[0].rule_name == "child" and execs[0].image == os.path.realpath(true)
    assert marker in execs[0].parent_command_line and "--password=***" in execs[0].parent_command_line
    assert all(marker in (e.parent_command_line or "") for e in events if isinstance(e, R.ProcessCreate))
    assert chain and "--password=***" in chain[0].command_line
    assert not [e for e in events if secret in repr(e)] and secret not in repr(chain)
    assert kernel_written > 0  # the kernel wrote records: the rules still saw the parent's command line


def _random_record(rng, pid: int) -> bytes:
    """A process record as a source and the identity stage may write it, fields present or not, sometimes a
    duplicate tag (the later one counts), a GUID of the wrong length, or a block of another version."""
    words = ["deploy", "--dry-run", "/usr/bin/backup", "x", "Image", "/bin/sh", "svc", "ÄÖ", "\udcff", "quiet"]
    text = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(0, 4)))  # noqa: E731
    names = ["image", "current_directory", "user", "parent_image", "parent_command_line", "parent_user"]
    fields = {name: text() for name in names if rng.random() < 0.7}
    if rng.random() < 0.5:
        fields["process_guid"] = str(uuid.UUID(int=rng.getrandbits(128)))
    details = R.Details(**fields) if fields else None
    kind = rng.choice([R.encode_process_create, R.encode_process_exec, "exit"])
    if kind == "exit":
        record = R.encode_process_exit(t(), pid, 0, R.Details(image=fields.get("image"),
                                                              process_guid=fields.get("process_guid")))
    else:
        record = kind(t(), pid, rng.randrange(5000), pid, pid, text(), details)
    if rng.random() < 0.2 and len(R.block_fields(record)[1]):
        flags, packed = R.block_fields(record, packed=True)
        extra = [R.pack_field(int(R.ExtensionTag.Image), text().encode("utf-16-le", "surrogatepass")),
                 R.pack_field(int(R.ExtensionTag.ProcessGuid), b"short")]
        record = R.with_packed(record, flags, [p for _, p in packed] + extra)
    if rng.random() < 0.05 and len(record) > 48:
        record = bytearray(record)
        base = R._base_size(record)
        if base < len(record):
            record[base] = 2  # a block of a version this reader does not know: no block
        record = bytes(record)
    return record


RICH = '''<Sysmon schemaversion="4.90"><EventFiltering><RuleGroup name="" groupRelation="or">
  <ProcessCreate onmatch="include">
    <Image condition="end with" name="shells">/sh</Image>
    <CommandLine condition="contains any" name="deploys">deploy;backup</CommandLine>
    <ParentCommandLine condition="contains">ÄÖ</ParentCommandLine>
    <Rule groupRelation="and" name="svc">
      <User condition="is">svc</User><CurrentDirectory condition="begin with">x</CurrentDirectory>
    </Rule>
    <ProcessGuid condition="begin with" name="guids">{0</ProcessGuid>
    <ParentProcessId condition="less than">100</ParentProcessId>
  </ProcessCreate>
  <ProcessCreate onmatch="exclude">
    <CommandLine condition="contains">--dry-run</CommandLine>
    <ParentUser condition="is">quiet</ParentUser>
    <ParentImage condition="image">sh</ParentImage>
  </ProcessCreate>
  <ProcessTerminate onmatch="include">
    <Image condition="contains">svc</Image>
    <User condition="is">svc</User>
    <ProcessGuid condition="end with">0}</ProcessGuid>
  </ProcessTerminate>
</RuleGroup></EventFiltering></Sysmon>'''


def test_records_are_judged_where_they_lie_exactly_as_their_parsed_events_are():
    import random

    rng = random.Random(7)
    rules = RuleSet.from_xml(RICH)
    judged = 0
    for pid in range(3000):
        record = _random_record(rng, pid)
        try:
            (event,) = list(parse(record))
        except RecordFormatError:  # e.g. a GUID of the wrong length: parse refuses the whole record
            continue
        assert rules.decide_record(record) == rules.decide(event), (event, record)
        assert rules.decide_record(memoryview(record)) == rules.decide(event)
        judged += 1
    assert judged > 2000


def test_the_block_walk_in_c_reads_what_the_walk_in_python_reads_damaged_records_included(monkeypatch):
    # The fields rules read, from the C walk (etwmon._speedups, when built) and from the Python walk, on records
    # with duplicate tags, GUIDs of the wrong length, blocks of another version, and bytes changed anywhere.
    import random

    from etwmon.rules import fields as F

    rng = random.Random(11)
    rules = RuleSet.from_xml(RICH)
    readers = [rules._events[event].record_fields for event in ("ProcessCreate", "ProcessTerminate")]

    def read(record):
        reader = readers[0] if record[0] in (1, 101) else readers[1]
        try:
            return reader.values(record)
        except RecordFormatError as exc:
            return str(exc), exc.offset

    records = []
    for pid in range(1500):
        record = bytearray(_random_record(rng, pid))
        if rng.random() < 0.3:
            record[rng.randrange(16, len(record))] = rng.randrange(256)
        records.append(bytes(record))
    in_c = [read(r) for r in records]
    monkeypatch.setattr(F, "_c_fields", None)
    assert [read(r) for r in records] == in_c


def test_the_stage_builds_no_event_per_record(staged, monkeypatch):
    def no_events(*args, **kwargs):
        raise AssertionError("an Event was built on the hot path")

    stage, sink = staged
    for cls in (R.ProcessCreate, R.ProcessExec, R.ProcessExit):
        monkeypatch.setattr(cls, "__init__", no_events)
    stage.push(exec_(80, "ls"))  # not included
    stage.push(exec_(81, "deploy it"))  # included, named in place
    stage.push(R.encode_process_exit(t(), 81, 0))
    monkeypatch.undo()
    assert [e.command_line for e in sink.events() if e.type != R.ItemType.ProcessExit] == ["deploy it"]
    assert sink.events()[0].rule_name == "deploys"
