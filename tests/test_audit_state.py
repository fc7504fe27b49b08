"""The machine-wide audit state etwmon changes: its lock (root-only, never followed through a link, never
skipped), killed instances (zombies too) told from live ones, ``stale_state``/``cleanup`` and ``etwmon cleanup``,
backlog raised and restored, foreign rules and other live instances left alone, and the kernel-log warning.

Offline tests use the fake audit kernel; the ``root`` ones the live kernel, which they always put back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from etwmon import Monitor
from etwmon.errors import SourceUnavailable
from etwmon.sources import _linux
from etwmon.sources.audit import state as audit_state
from etwmon.sources.audit import AuditSource
from etwmon.sources.audit.protocol import (
    AUDIT_ADD_RULE, AUDIT_DEL_RULE, AUDIT_SET, AuditControl, AuditStatus, exec_rules,
)

from .audit_builders import (  # noqa: F401 (fixtures are used by name)
    until,
    FakeAuditKernel, assert_restored, etwmon_rules, fake_source, live_audit, live_control, private_lock_dir,
)
from .conftest import require

if not sys.platform.startswith("linux"):
    pytest.skip("Linux only (the kernel audit subsystem).", allow_module_level=True)

DEFAULT = audit_state.DEFAULT_BACKLOG_LIMIT


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return data[data.rfind(b")") + 2:][:1].decode()


# --- the lock ---------------------------------------------------------------------------------------------------


def _lock_dir() -> str:
    return audit_state.LOCK_DIR


def test_the_lock_is_made_root_only_in_its_own_directory(tmp_path, monkeypatch):
    where = tmp_path / "run-etwmon"
    monkeypatch.setattr(audit_state, "LOCK_DIR", str(where))
    kernel = FakeAuditKernel()
    src = fake_source(kernel)
    src.open()
    src.close()
    st = os.lstat(where)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    st = os.lstat(where / audit_state.LOCK_NAME)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()


def _refused(kernel: FakeAuditKernel, *words: str) -> str:
    with pytest.raises(SourceUnavailable) as info:
        fake_source(kernel).open()
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert AUDIT_ADD_RULE not in kernel.requests and AUDIT_SET not in kernel.requests  # nothing changed
    return message


def test_a_symlink_planted_as_the_lock_file_is_refused_and_not_followed(tmp_path):
    target = tmp_path / "nologin"
    os.symlink(target, os.path.join(_lock_dir(), audit_state.LOCK_NAME))
    _refused(FakeAuditKernel(), os.path.join(_lock_dir(), audit_state.LOCK_NAME), "symbolic link")
    assert not os.path.lexists(target)  # root's etwmon did not create the file the link points to


def test_a_symlink_planted_as_the_lock_directory_is_refused(tmp_path, monkeypatch):
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    link = tmp_path / "run-etwmon"
    os.symlink(real, link)
    monkeypatch.setattr(audit_state, "LOCK_DIR", str(link))
    _refused(FakeAuditKernel(), str(link), "symbolic link")
    assert os.listdir(real) == []


def test_a_lock_directory_others_may_enter_is_refused():
    os.chmod(_lock_dir(), 0o777)
    _refused(FakeAuditKernel(), _lock_dir(), "mode is 0777, not 0700")
    os.chmod(_lock_dir(), 0o750)
    _refused(FakeAuditKernel(), _lock_dir(), "mode is 0750")


def test_a_lock_file_others_may_write_is_refused():
    path = os.path.join(_lock_dir(), audit_state.LOCK_NAME)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    os.chmod(path, 0o662)
    _refused(FakeAuditKernel(), path, "group or world writable")
    os.chmod(path, 0o600)
    src = fake_source(FakeAuditKernel())
    src.open()  # and once it is right, it works
    src.close()


def test_a_lock_file_that_is_not_a_regular_file_is_refused():
    path = os.path.join(_lock_dir(), audit_state.LOCK_NAME)
    os.mkfifo(path, 0o600)
    _refused(FakeAuditKernel(), path, "not a regular file")


def test_a_lock_owned_by_someone_else_is_refused():
    require(os.geteuid() == 0, "needs root to give the lock directory to another user")
    os.chown(_lock_dir(), 12345, 12345)
    _refused(FakeAuditKernel(), _lock_dir(), "owned by uid 12345, not by root")
    os.chown(_lock_dir(), 0, 0)
    path = os.path.join(_lock_dir(), audit_state.LOCK_NAME)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    os.chown(path, 12345, 12345)
    _refused(FakeAuditKernel(), path, "owned by uid 12345")


_HOLDER = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.readline()
""")


class _Holder:
    """Another process holding the lock until told to let go."""

    def __enter__(self) -> "_Holder":
        path = os.path.join(_lock_dir(), audit_state.LOCK_NAME)
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, path], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


def test_a_lock_held_by_another_process_is_waited_for_then_refused(monkeypatch):
    monkeypatch.setattr(audit_state, "LOCK_TIMEOUT", 0.3)
    kernel = FakeAuditKernel(enabled=0)
    with _Holder():
        message = _refused(kernel, os.path.join(_lock_dir(), audit_state.LOCK_NAME), "another process has held")
    assert "does not change the audit state without its lock" in message
    assert kernel.rules == [] and kernel.status.enabled == 0  # it did not go on unlocked
    src = fake_source(kernel)  # released: the next start works
    src.open()
    src.close()
    assert kernel.rules == [] and kernel.status.enabled == 0


def test_a_lock_held_at_stop_leaves_the_rules_that_record_the_state(monkeypatch, caplog):
    monkeypatch.setattr(audit_state, "LOCK_TIMEOUT", 0.3)
    kernel = FakeAuditKernel(enabled=0, backlog_limit=64)
    src = fake_source(kernel)
    src.open()
    with _Holder(), caplog.at_level(logging.WARNING, logger="etwmon.sources.audit"):
        src.close()
    assert any("etwmon cleanup" in r.getMessage() for r in caplog.records)
    # nothing restored without the lock, and the rules that say how audit was are still in
    assert len(kernel.rules) == 2 and kernel.status.enabled == 1 and kernel.status.backlog_limit == DEFAULT
    assert all(audit_state.RuleKey.parse(k, "etwmon").enabled == 0 for k in kernel.keys())


# --- killed instances: stale_state and cleanup ----------------------------------------------------------------------


def _control(kernel: FakeAuditKernel) -> AuditControl:
    return AuditControl(kernel.factory(0))


def test_stale_state_names_what_a_killed_instance_left_and_cleanup_restores_it():
    dead = _dead_pid()
    key = f"etwmon:{dead}:12345:e0:b64"
    kernel = FakeAuditKernel(enabled=1, backlog_limit=DEFAULT)
    kernel.rules = [r.pack() for r in exec_rules(key)]
    control = _control(kernel)
    assert audit_state.stale_state(control) == [
        f"2 audit exec rules left by etwmon pid {dead}, which is gone (key {key})",
        "audit is enabled=1, was 0 before etwmon",
        f"backlog_limit is {DEFAULT}, was 64 before etwmon",
    ]
    assert kernel.rules and AUDIT_SET not in kernel.requests  # looking changes nothing
    kernel.requests.clear()
    assert audit_state.cleanup(control) == [
        "audit disabled again (enabled=0, as it was before etwmon)",
        f"backlog_limit put back from {DEFAULT} to 64",
        f"removed 2 audit exec rules left by etwmon pid {dead}",
    ]
    assert kernel.rules == [] and (kernel.status.enabled, kernel.status.backlog_limit) == (0, 64)
    sets = [i for i, r in enumerate(kernel.requests) if r == AUDIT_SET]
    deletes = [i for i, r in enumerate(kernel.requests) if r == AUDIT_DEL_RULE]
    assert max(sets) < min(deletes)  # killed half-way, a rule still says what to restore
    assert audit_state.stale_state(control) == [] and audit_state.cleanup(control) == []  # a no-op now


def test_cleanup_never_touches_a_live_instance_or_foreign_rules():
    dead, ppid = _dead_pid(), os.getppid()
    live_key = f"etwmon:{ppid}:{_linux.live_process_start(ppid)}:e0:b64"
    live = [r.pack() for r in exec_rules(live_key)]
    foreign = [r.pack() for r in exec_rules("admin-execs")]
    kernel = FakeAuditKernel(enabled=1, backlog_limit=DEFAULT)
    kernel.rules = live + [r.pack() for r in exec_rules(f"etwmon:{dead}:1:e0:b64")] + foreign
    control = _control(kernel)
    assert audit_state.stale_state(control) == [
        f"2 audit exec rules left by etwmon pid {dead}, which is gone (key etwmon:{dead}:1:e0:b64)",
        f"(etwmon pid {ppid} still runs: it restores the audit state when it stops)",
    ]
    kernel.requests.clear()
    assert audit_state.cleanup(control) == [f"removed 2 audit exec rules left by etwmon pid {dead}"]
    assert kernel.rules == live + foreign  # the live one's and the admin's stay
    assert AUDIT_SET not in kernel.requests and (kernel.status.enabled, kernel.status.backlog_limit) == (1, DEFAULT)


def test_cleanup_leaves_audit_on_for_a_registered_audit_daemon():
    dead = _dead_pid()
    kernel = FakeAuditKernel(enabled=1, backlog_limit=DEFAULT)
    kernel.status = AuditStatus(**{**vars(kernel.status), "pid": 4321})
    kernel.rules = [r.pack() for r in exec_rules(f"etwmon:{dead}:1:e0:b64")]
    control = _control(kernel)
    assert "(an audit daemon, pid 4321, is registered: cleanup leaves audit enabled)" in \
        audit_state.stale_state(control)[1]
    assert audit_state.cleanup(control) == [f"backlog_limit put back from {DEFAULT} to 64",
                                            f"removed 2 audit exec rules left by etwmon pid {dead}"]
    assert (kernel.status.enabled, kernel.status.backlog_limit) == (1, 64)


def test_a_zombie_owner_is_gone():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = _linux.live_process_start(child.pid)
        key = audit_state.RuleKey("etwmon", child.pid, start, 0, 64)
        assert key.owner_alive()
        child.send_signal(signal.SIGKILL)
        assert until(lambda: _state(child.pid) == "Z")  # killed, not reaped: the pid and its stat remain
        assert not key.owner_alive()
        kernel = FakeAuditKernel(enabled=1, backlog_limit=DEFAULT)
        kernel.rules = [r.pack() for r in exec_rules(str(key))]
        src = fake_source(kernel)
        src.open()  # the zombie's rules go, its recorded state is inherited...
        assert all(audit_state.RuleKey.parse(k, "etwmon").pid == os.getpid() for k in kernel.keys())
        src.close()  # ...and restored by the last one out
        assert kernel.rules == [] and (kernel.status.enabled, kernel.status.backlog_limit) == (0, 64)
    finally:
        child.kill()
        child.wait()


# --- the kernel log ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("daemon", [0, 4321], ids=["no audit daemon", "auditd registered"])
def test_without_an_audit_daemon_it_warns_that_records_reach_the_kernel_log(daemon, caplog):
    kernel = FakeAuditKernel()
    kernel.status = AuditStatus(**{**vars(kernel.status), "pid": daemon})
    with caplog.at_level(logging.WARNING, logger="etwmon.sources.audit"):
        src = fake_source(kernel)
        src.open()
        src.close()
    warned = [r.getMessage() for r in caplog.records if "kernel log" in r.getMessage()]
    if daemon:
        assert warned == []
    else:
        assert warned == ["etwmon audit: no audit daemon is registered, so the kernel also prints the exec records "
                          "etwmon asks for, command lines included, to the kernel log (dmesg; rate-limited)"]


def test_cleanup_without_the_capabilities_says_why_and_fails():
    argv = [sys.executable, "-m", "etwmon", "cleanup"]
    if os.geteuid() == 0:  # drop every capability (uid 0 still reads the Python installed under /root)
        setpriv = shutil.which("setpriv")
        require(setpriv is not None, "setpriv (util-linux) is needed to drop capabilities")
        argv = [setpriv, "--inh-caps=-all", "--bounding-set=-all", *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "etwmon: linux: cannot clean up: needs root (CAP_AUDIT_CONTROL and CAP_AUDIT_READ)" in done.stderr
    assert "etwmon: audit: cannot clean up: needs root" in done.stderr
    assert done.stdout == ""


# --- live kernel -----------------------------------------------------------------------------------------------------

_INSTANCE = textwrap.dedent("""
    import sys
    from etwmon import Monitor
    mon = Monitor(source="audit").start()
    print("ready", flush=True)
    sys.stdin.readline()  # until told to stop (or killed)
    mon.stop()
    print("stopped", flush=True)
""")


def _instance() -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", _INSTANCE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def _others_alive(control: AuditControl, mine: set[int]) -> set[int]:
    return {k.pid for _, k in etwmon_rules(control) if k.pid not in mine and k.owner_alive()}


def _alone(mine: set[int], timeout: float = 60.0) -> None:
    """Wait until no other etwmon instance on this machine (someone else's tests) holds audit rules."""
    control = live_control()
    try:
        alone = until(lambda: not _others_alive(control, mine), timeout)
    finally:
        control.close()
    require(alone, "another etwmon instance kept running on this machine for a minute")


@pytest.mark.root
def test_live_lock_is_a_root_only_directory(live_audit):
    with Monitor(source="audit"):
        pass
    st = os.lstat(audit_state.LOCK_DIR)
    assert stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700
    st = os.lstat(os.path.join(audit_state.LOCK_DIR, audit_state.LOCK_NAME))
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not stat.S_IMODE(st.st_mode) & 0o077


@pytest.mark.root
def test_live_killed_but_unreaped_instance_counts_as_gone(live_audit):
    before, owners = live_audit
    a = _instance()
    owners.add(a.pid)
    try:
        a.send_signal(signal.SIGKILL)
        assert until(lambda: _state(a.pid) == "Z")  # a zombie: not reaped (no wait() yet)
        control = live_control()
        try:
            assert len([k for _, k in etwmon_rules(control) if k.pid == a.pid]) == 2  # what A left
            with Monitor(source="audit"):  # B
                assert not [k for _, k in etwmon_rules(control) if k.pid == a.pid]  # gone at B's start
                assert len([k for _, k in etwmon_rules(control) if k.pid == os.getpid()]) == 2
        finally:
            control.close()
        assert_restored(before, {a.pid, os.getpid()})  # B, the last one out, put audit back
    finally:
        a.kill()
        a.wait()


@pytest.mark.root
def test_live_backlog_is_raised_while_running_and_restored_after(live_audit):
    before, owners = live_audit
    _alone(owners)
    control = live_control()
    try:
        start = control.status()
        # Above what is set now, so the source raises it (the test itself changes nothing: others may be testing)
        target = DEFAULT if start.backlog_limit < DEFAULT else 2 * start.backlog_limit
        with Monitor(source=AuditSource(backlog_limit=target)):
            assert control.status().backlog_limit == target
            assert control.status().enabled == 1
        # An instance that started meanwhile inherited the state our key recorded: it restores it when it stops.
        require(until(lambda: not _others_alive(control, owners), 120),
                "another etwmon instance that started meanwhile kept running for two minutes")
        assert control.status().backlog_limit == start.backlog_limit
        assert control.status().enabled == start.enabled
    finally:
        control.close()


@pytest.mark.root
def test_live_foreign_rule_survives_a_run_and_cleanup(live_audit):
    before, _ = live_audit
    control = live_control()
    foreign = exec_rules(f"admin-execs-{os.getpid()}")  # what `auditctl -a always,exit -S execve -k ...` adds
    try:
        for rule in foreign:
            control.add_rule(rule)
        with Monitor(source="audit"):
            pass
        done = subprocess.run([sys.executable, "-m", "etwmon", "cleanup"], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        keys = [r.key for r in control.list_rules()]
        assert keys.count(f"admin-execs-{os.getpid()}") == 2
    finally:
        for rule in foreign:
            audit_state.delete_rule(control, rule)
        control.close()
    assert_restored(before, {os.getpid()})


@pytest.mark.root
def test_live_another_instance_keeps_audit_on_until_it_stops(live_audit):
    before, owners = live_audit
    a = _instance()
    owners.add(a.pid)
    control = live_control()
    try:
        with Monitor(source="audit"):
            pass
        # B stopped: A still runs, so A's rules and the state it needs stay
        assert len([k for _, k in etwmon_rules(control) if k.pid == a.pid]) == 2
        assert control.status().enabled == 1 and control.status().backlog_limit >= DEFAULT
        a.stdin.write("stop\n")
        a.stdin.flush()
        assert a.stdout.readline().strip() == "stopped"
        assert a.wait(10) == 0
    finally:
        control.close()
        if a.poll() is None:
            a.kill()
            a.wait()
    assert_restored(before, {a.pid, os.getpid()})  # A, the last one out, put it back


def _etwmon(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "etwmon", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.root
def test_live_kill_9_then_sources_shows_it_and_cleanup_restores(live_audit):
    before, owners = live_audit
    for attempt in range(6):  # another etwmon instance starting meanwhile takes the work over: try again
        _alone(owners)
        a = _instance()
        owners.add(a.pid)
        a.kill()
        a.wait()
        listing = _etwmon("sources")
        as_json = [json.loads(line) for line in _etwmon("sources", "--json").stdout.splitlines()]
        first = _etwmon("cleanup")
        second = _etwmon("cleanup")
        control = live_control()
        try:
            removed = f"linux: removed 2 audit exec rules left by etwmon pid {a.pid}"
            left = [k for _, k in etwmon_rules(control) if k.pid == a.pid]
            if _others_alive(control, owners) or removed not in first.stdout and not left:
                continue  # another instance's start removed A's rules (and took over its recorded state)
            gone = f"2 audit exec rules left by etwmon pid {a.pid}, which is gone"
            assert f"stale: {gone}" in listing.stdout and "'etwmon cleanup' removes it" in listing.stdout
            audit_row = next(row for row in as_json if row["name"] == "audit")
            assert [line for line in audit_row["stale"] if line.startswith(gone)]
            assert [row["stale"] for row in as_json if row["name"] == "netlink"] == [[]]
            assert first.returncode == 0, first.stderr
            assert removed in first.stdout
            assert not left
            now = control.status()
            assert (now.enabled, now.backlog_limit) == (before.enabled, before.backlog_limit)
            assert second.returncode == 0 and f"pid {a.pid}" not in second.stdout
            if not etwmon_rules(control):  # (no one else's killed instance turned up meanwhile)
                assert second.stdout == "nothing to clean up\n"
            return
        finally:
            control.close()
    require(False, "other etwmon instances kept starting on this machine during the test")


@pytest.mark.root
def test_live_warning_about_the_kernel_log_matches_the_kernel(live_audit, caplog):
    control = live_control()
    try:
        daemon = control.status().pid
    finally:
        control.close()
    with caplog.at_level(logging.WARNING, logger="etwmon.sources.audit"), Monitor(source="audit"):
        pass
    warned = [r for r in caplog.records if "to the kernel log" in r.getMessage()]
    assert len(warned) == (0 if daemon else 1)  # no audit daemon here: the kernel printks the records
