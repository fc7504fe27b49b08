"""``etwmon service install``/``uninstall`` (the unit, the group, what systemd is told) and ``etwmon serve``
leaving no /run/etwmon behind when it made it."""

from __future__ import annotations

import grp
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from .helpers import assert_clean_stderr, clean_env, etwmon_argv, run

from etwmon.safedir import RUN_DIR
from etwmon.service import install as service_install


def _install(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run(etwmon_argv("service", *args), env=env)


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("systemd-analyze is missing: installing the Debian package systemd for it")
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "systemd"],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=600)
        tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is missing (apt-get install systemd) and could not be installed here")
    return tool


def test_dry_run_prints_a_unit_that_systemd_analyze_verify_accepts_and_changes_nothing(tmp_path):
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    group = f"etw{uuid.uuid4().hex[:8]}"
    done = _install("install", "--dry-run", "--group", group, "--unit-dir", str(unit_dir))
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert list(unit_dir.iterdir()) == []  # nothing written
    with pytest.raises(KeyError):
        grp.getgrnam(group)  # nothing created
    assert "dry run, nothing changed" in err and f"groupadd --system {group}" in err
    unit = done.stdout.decode()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).split()
    # This installation's etwmon: the console script next to this Python, or this Python with -m etwmon.
    here = os.path.abspath(sys.executable)
    assert exec_start[0] in (os.path.join(os.path.dirname(here), "etwmon"), here)
    assert os.access(exec_start[0], os.X_OK)
    assert exec_start[-3:] == ["serve", "--group", group]
    assert "ProtectHome=yes" not in unit or not any(
        os.path.realpath(p).startswith(("/root/", "/home/")) for p in (sys.executable, sys.prefix, __file__))
    written = tmp_path / "etwmon.service"
    written.write_text(unit)
    verify = subprocess.run([_systemd_analyze(), "verify", str(written)], capture_output=True, text=True,
                            timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "etwmon.service" not in verify.stderr, verify.stderr  # no complaint about the unit at all


def test_protect_home_is_read_only_when_anything_the_service_reads_is_under_a_home():
    command = ["/home/alice/etwmon/.venv/bin/etwmon"]
    hidden = service_install.render_unit(command, "etwmon", None, created_group=False, protect_home="read-only")
    assert "ProtectHome=read-only" in hidden and "ProtectHome=yes" not in hidden
    assert service_install._under_home("/root/.pyenv/versions/3.11.7/bin/python3.11")
    assert service_install._under_home("/home/alice/etwmon")
    assert not service_install._under_home("/homestead/etwmon") and not service_install._under_home("/opt/etwmon")


def test_private_tmp_is_off_when_the_installation_lives_under_tmp(tmp_path, monkeypatch):
    """PrivateTmp=yes gives the service an empty /tmp: a venv or configuration there would vanish for it."""
    monkeypatch.setattr(service_install, "etwmon_command", lambda: ["/tmp/clone/.venv/bin/etwmon"])
    plan = service_install.plan_install(None, "etwmon", str(tmp_path))
    assert "PrivateTmp=no" in plan.unit and "ExecStart=/tmp/clone/.venv/bin/etwmon serve" in plan.unit
    monkeypatch.setattr(service_install, "etwmon_command", lambda: ["/opt/etwmon/.venv/bin/etwmon"])
    monkeypatch.setattr(service_install, "_installation_paths", lambda: ["/opt/etwmon/.venv/bin/etwmon"])
    plan = service_install.plan_install(None, "etwmon", str(tmp_path))
    assert "PrivateTmp=yes" in plan.unit and "ProtectHome=yes" in plan.unit


def test_exec_start_words_are_quoted_for_systemd():
    unit = service_install.render_unit(["/opt/my etwmon/bin/etwmon"], "etwmon", "/etc/etwmon/100%.xml",
                                       created_group=False, protect_home="yes")
    line = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    assert line == '"/opt/my etwmon/bin/etwmon" serve --group etwmon --config "/etc/etwmon/100%%.xml"'


def test_a_bad_group_name_or_missing_config_is_refused_before_anything_happens(tmp_path):
    done = _install("install", "--dry-run", "--group=-rf", "--unit-dir", str(tmp_path))
    assert done.returncode == 2 and b"not a valid group name" in done.stderr, done.stderr  # a usage error
    done = _install("install", "--dry-run", "--config", str(tmp_path / "none.xml"), "--unit-dir", str(tmp_path))
    assert done.returncode == 1 and b"no such file" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_install_without_root_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    from etwmon.cli import main

    monkeypatch.setattr(service_install.os, "geteuid", lambda: 1000)
    for command in (["install"], ["uninstall"]):
        if command == ["uninstall"]:  # something to uninstall, so the privilege is what stops it
            (tmp_path / "etwmon.service").write_text(service_install.render_unit(
                ["/usr/bin/etwmon"], "etwmon", None, created_group=False, protect_home="yes"))
        assert main(["service", *command, "--unit-dir", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("etwmon: error: ") and "needs root" in err, err
        assert "sudo" in err and "--dry-run" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["etwmon.service"]


@pytest.mark.root
def test_install_writes_the_unit_creates_the_group_and_uninstall_undoes_both(tmp_path):
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    group = f"etw{uuid.uuid4().hex[:8]}"
    try:
        done = _install("install", "--group", group, "--unit-dir", str(unit_dir))
        err = done.stderr.decode()
        assert done.returncode == 0, err
        assert grp.getgrnam(group).gr_gid < 1000  # a system group
        unit = (unit_dir / "etwmon.service").read_text()
        assert f"serve --group {group}" in unit and f"created the group {group}" in unit
        assert (unit_dir / "etwmon.service").stat().st_mode & 0o777 == 0o644
        if service_install.systemd_is_running():
            assert "started and enabled" in err, err
        else:  # no systemd as PID 1 (a container, this test machine): what to run instead
            assert "systemd is not running here" in err and "systemctl enable --now etwmon.service" in err, err
        assert f"usermod -aG {group} USER" in err
        assert_clean_stderr(err)
        # Again: the group is there now, so the unit does not claim it (and uninstall will not remove it).
        again = _install("install", "--group", group, "--unit-dir", str(unit_dir))
        assert again.returncode == 0, again.stderr
        assert "created the group" not in (unit_dir / "etwmon.service").read_text()
        (unit_dir / "etwmon.service").write_text(unit)  # the first install's record: it made the group
        dry = _install("uninstall", "--dry-run", "--unit-dir", str(unit_dir))
        assert dry.returncode == 0 and f"would run: groupdel {group}" in dry.stderr.decode(), dry.stderr
        assert (unit_dir / "etwmon.service").exists()
        gone = _install("uninstall", "--unit-dir", str(unit_dir))
        assert gone.returncode == 0, gone.stderr
        assert not (unit_dir / "etwmon.service").exists()
        with pytest.raises(KeyError):
            grp.getgrnam(group)
        nothing = _install("uninstall", "--unit-dir", str(unit_dir))
        assert nothing.returncode == 0 and b"nothing to uninstall" in nothing.stderr
    finally:
        try:
            grp.getgrnam(group)
        except KeyError:
            pass
        else:
            subprocess.run(["groupdel", group], check=False)


@pytest.mark.root
def test_install_refuses_a_symlink_where_the_unit_goes(tmp_path):
    (tmp_path / "etwmon.service").symlink_to("/etc/passwd")
    done = _install("install", "--unit-dir", str(tmp_path), "--group", "root")
    assert done.returncode == 1 and b"not a regular file" in done.stderr, done.stderr
    assert (tmp_path / "etwmon.service").is_symlink()


@pytest.mark.root
def test_uninstall_leaves_a_unit_it_did_not_write(tmp_path):
    (tmp_path / "etwmon.service").write_text("[Service]\nExecStart=/bin/true\n")
    done = _install("uninstall", "--unit-dir", str(tmp_path))
    assert done.returncode == 1 and b"not written by 'etwmon service install'" in done.stderr, done.stderr
    assert (tmp_path / "etwmon.service").exists()


# --- etwmon serve and /run/etwmon --------------------------------------------------------------------------------


def _serve_and_stop() -> str:
    env = clean_env()
    env.pop("ETWMON_SOCKET", None)
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen(etwmon_argv("serve", "--source", "procfs"), stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "ready: serving" in line:
                break
        assert any("ready: serving" in line for line in lines), "".join(lines)
        assert os.path.exists(os.path.join(RUN_DIR, "etwmon.sock"))
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(30) == 0, "".join(lines) + rest
        return "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.root
def test_serve_removes_the_run_directory_it_made_and_keeps_one_it_found():
    if os.path.lexists(RUN_DIR):
        pytest.skip(f"{RUN_DIR} is there already (a service runs here?): it cannot show who made it")
    log = _serve_and_stop()
    assert not os.path.lexists(RUN_DIR), f"{RUN_DIR} left behind after SIGTERM: {os.listdir(RUN_DIR)}"
    assert_clean_stderr(log)
    # As systemd's RuntimeDirectory= does: made before the start; then it is systemd's to remove, not etwmon's.
    os.mkdir(RUN_DIR, 0o700)
    try:
        _serve_and_stop()
        assert os.path.isdir(RUN_DIR) and os.listdir(RUN_DIR) == []
    finally:
        os.rmdir(RUN_DIR)


def test_contrib_unit_is_what_install_writes():
    contrib = (Path(__file__).resolve().parents[1] / "contrib" / "etwmon.service").read_text()
    assert contrib.endswith(service_install.render_unit(["/opt/etwmon/.venv/bin/etwmon"], "etwmon", None,
                                                        created_group=False, protect_home="yes"))
    assert "/usr/local/bin/etwmon" not in contrib
