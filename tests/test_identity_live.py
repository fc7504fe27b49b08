"""The identity stage live, per source that declares the field: user and uid of a ``runuser -u nobody``, the
directory a process was started in, two ProcessGuids for one reused pid, a grandchild's parent fields, an exit's
guid, and a parent that ran before the monitor started, found in the seeded table."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

import etwmon
from etwmon import ItemType, parse
from etwmon.records import EventFlags, block_fields
from etwmon.sources import SOURCES, source_class

from .conftest import require
from .helpers import records_until

SOURCE_NAMES = [n for n in SOURCES if n != "etw"]
SLEEP = shutil.which("sleep") or "/bin/sleep"
BASH = shutil.which("bash") or "/bin/bash"


def _tag() -> str:
    """A unique sleep length (0.4-0.5 s: long enough for a polling source to see it) names our processes."""
    return f"0.4{uuid.uuid4().int % 10**6:06d}"


def _source(name: str, *needs: str):
    cls = source_class(name)
    reason = cls.unavailable_reason()
    require(reason is None, f"{name}: {reason}")
    missing = [n for n in needs if n not in cls.delivers]
    if missing:
        pytest.skip(f"{name} does not declare {', '.join(missing)}")
    return cls


def _collect(mon: etwmon.Monitor, until, timeout: float = 10.0) -> list:
    """Events until ``until(events)`` holds (then half a second more) or ``timeout`` seconds pass."""
    return list(parse(b"".join(records_until(mon, until, timeout, linger=0.5, bufsize=1 << 20))))


def _watch(name: str, script: str, until, identity: bool | str = "full", monitor: list | None = None
           ) -> tuple[list, subprocess.Popen]:
    """Events of a ``bash -c script`` run under a monitor of source ``name``, until ``until(events, child)``
    (``monitor``: a list the Monitor is appended to, to ask its table afterwards)."""
    with etwmon.Monitor(source=name, max_items=200_000, identity=identity) as mon:
        if monitor is not None:
            monitor.append(mon)
        time.sleep(0.3)
        child = subprocess.Popen([BASH, "-c", script])
        child.wait(10)
        return _collect(mon, lambda evs: until(evs, child)), child


def _starts(events: list, pid: int) -> list:
    """The process's ProcessCreate/ProcessExec events, the last one being its final program."""
    return [e for e in events if e.type in (ItemType.ProcessCreate, ItemType.ProcessExec) and e.pid == pid]


def _running(events: list, tag: str) -> list:
    return [e for e in events if e.type in (ItemType.ProcessCreate, ItemType.ProcessExec) and tag in e.command_line]


@pytest.mark.root
@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_runuser_nobody_shows_that_uid_and_user_and_a_cd_shows_the_directory(name, tmp_path):
    _source(name, "uid", "user", "current_directory", "image")
    nobody = pwd.getpwnam("nobody")
    workdir = tmp_path / f"wd-{uuid.uuid4().hex[:8]}"
    workdir.mkdir()
    workdir.chmod(0o755)
    tmp_path.chmod(0o755)
    tag = _tag()
    script = f"cd {shlex.quote(str(workdir))} && runuser -u nobody -- {SLEEP} {tag}; true"
    events, _ = _watch(name, script, lambda evs, child: any(e.image == SLEEP for e in _running(evs, tag)))
    sleeps = [e for e in _running(events, tag) if e.image == SLEEP]
    assert sleeps, f"{name}: no event shows {SLEEP} running {tag}: {_running(events, tag)}"
    last = sleeps[-1]
    assert (last.uid, last.user) == (nobody.pw_uid, "nobody")
    assert last.current_directory == str(workdir)
    assert last.process_guid and last.parent_process_guid
    if "details_from_proc" in source_class(name).delivers:
        assert last.flags & EventFlags.PROCFS
    else:
        assert not last.flags & EventFlags.PROCFS


REUSE = r"""
import os, sys
first = os.fork()
if first == 0:
    os._exit(0)
os.waitpid(first, 0)
for attempt in range(500):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:  # the next fork takes first, if nobody is faster
        f.write(str(first - 1))
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    if pid == first:
        print(first, attempt, flush=True)
        sys.exit(0)
sys.exit(1)
"""


@pytest.mark.root
@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_a_reused_pid_gets_two_guids_and_each_exit_carries_its_creates(name, tmp_path):
    cls = _source(name)
    if cls.lossy or "process_exit" not in cls.delivers or "process_create" not in cls.delivers:
        pytest.skip(f"{name} cannot see a process that lives a millisecond")
    require(os.path.exists("/proc/sys/kernel/ns_last_pid"), "no /proc/sys/kernel/ns_last_pid")
    script = tmp_path / "reuse.py"
    script.write_text(REUSE)
    with etwmon.Monitor(source=name, max_items=200_000) as mon:
        time.sleep(0.2)
        helper = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
        assert helper.returncode == 0, f"the pid was never handed out twice: {helper.stderr}"
        pid = int(helper.stdout.split()[0])

        def done(evs):
            return len([e for e in evs if e.type == ItemType.ProcessExit and e.pid == pid]) >= 2

        events = _collect(mon, done)
    mine = [e for e in events if getattr(e, "pid", None) == pid and e.type in (ItemType.ProcessCreate,
                                                                                  ItemType.ProcessExit)]
    # Only the helper's two children with that pid (another program may have got it in between: skip those).
    creates = [e for e in mine if e.type == ItemType.ProcessCreate]
    assert len(creates) >= 2, mine
    guids = [e.process_guid for e in creates]
    assert None not in guids and len(set(guids)) == len(guids)
    # Each exit names the process its create named, in order.
    order = [e.process_guid for e in mine]
    assert order[:4] == [guids[0], guids[0], guids[1], guids[1]], mine


@pytest.mark.root
@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_a_grandchild_carries_its_parents_image_and_command_line(name):
    cls = _source(name, "image")
    tag = _tag()
    script = f"{SLEEP} {tag}; true"
    exits = "process_exit" in cls.delivers
    events, child = _watch(name, script, lambda evs, child: any(e.image == SLEEP for e in _running(evs, tag)) and (
        not exits or any(e.type == ItemType.ProcessExit and e.pid == child.pid for e in evs)), identity="full")
    bash = [e for e in _starts(events, child.pid) if e.image == BASH]
    assert bash, _starts(events, child.pid)
    bash = bash[-1]
    sleeps = [e for e in _running(events, tag) if e.image == SLEEP and e.pid != child.pid]
    assert sleeps, _running(events, tag)
    grandchild = sleeps[-1]
    assert grandchild.parent_process_guid == bash.process_guid
    assert grandchild.parent_image == BASH and grandchild.parent_command_line == bash.command_line
    assert shlex.split(bash.command_line) == [BASH, "-c", script]
    if exits:  # the exit carries the guid of its create and exec
        ends = [e for e in events if e.type == ItemType.ProcessExit and e.pid == child.pid]
        assert ends and ends[-1].process_guid == bash.process_guid and ends[-1].image == BASH
        assert ends[-1].lifetime is not None and ends[-1].lifetime.total_seconds() >= float(tag)


@pytest.mark.root
@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_a_parent_that_started_before_the_monitor_comes_from_the_seeded_table(name):
    cls = _source(name, "process_snapshot")
    tag = _tag()
    # The parent waits for a line before it starts the child, so it runs before the monitor and the child after.
    parent = subprocess.Popen([BASH, "-c", f"read go; {SLEEP} {tag}; true"], stdin=subprocess.PIPE, text=True)
    try:
        time.sleep(0.2)
        with etwmon.Monitor(source=name, max_items=200_000) as mon:
            time.sleep(0.3)
            parent.stdin.write("go\n")
            parent.stdin.flush()
            events = _collect(mon, lambda evs: any(e.image == SLEEP for e in _running(evs, tag)))
            sleeps = [e for e in _running(events, tag) if e.image == SLEEP and e.pid != parent.pid]
            assert sleeps, _running(events, tag)
            child = sleeps[-1]
            assert not child.flags & EventFlags.UNKNOWN_PARENT
            assert child.parent_image == BASH
            assert shlex.split(child.parent_command_line) == [BASH, "-c", f"read go; {SLEEP} {tag}; true"]
            chain = mon.ancestors(child.process_guid)
            assert chain and chain[0].process_guid == child.parent_process_guid
            assert chain[0].pid == parent.pid and chain[0].seeded and chain[0].image == BASH
            assert chain[1].pid == os.getpid()  # then this test's own process, and so on up
            assert chain[-1].pid == 1 or len(chain) >= 3
    finally:
        parent.stdin.close()
        parent.wait(10)


@pytest.mark.root
@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_by_default_a_grandchild_carries_its_parents_image_and_the_table_its_command_line(name):
    _source(name, "image", "uid", "user")
    tag = _tag()
    script = f"{SLEEP} {tag}; true"
    with etwmon.Monitor(source=name, max_items=200_000) as mon:
        time.sleep(0.3)
        child = subprocess.Popen([BASH, "-c", script])
        child.wait(10)
        records = records_until(mon, lambda evs: any(e.image == SLEEP for e in _running(evs, tag)), 10.0, 0.5)
        pairs = [(r, next(iter(parse(r)))) for r in records]
        events = [e for _, e in pairs]
        bash = [e for e in _starts(events, child.pid) if e.image == BASH][-1]
        record, grandchild = [(r, e) for r, e in pairs if e.type in (ItemType.ProcessCreate, ItemType.ProcessExec)
                              and tag in e.command_line and e.image == SLEEP and e.pid != child.pid][-1]
        chain = mon.ancestors(grandchild.process_guid)
    assert grandchild.parent_process_guid == bash.process_guid and grandchild.parent_image == BASH
    assert chain[0].process_guid == bash.process_guid and chain[0].command_line == bash.command_line
    assert chain[0].image == BASH and chain[0].user == pwd.getpwuid(os.geteuid()).pw_name
    assert grandchild.user == pwd.getpwuid(grandchild.uid).pw_name  # named where it is read
    in_record = dict(block_fields(record)[1])
    if name == "bpf":  # the kernel wrote it: no User, ParentUser or ParentCommandLine in the record
        assert grandchild.parent_command_line is None and grandchild.parent_user is None
        assert not {6, 8, 9} & set(in_record) and 7 in in_record
    else:  # written in user space, record by record: as in the full mode
        assert grandchild.parent_command_line == bash.command_line and {6, 7, 8} <= set(in_record)
