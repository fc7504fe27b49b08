"""``etwmon service install`` / ``uninstall``: the etwmon service as a systemd unit, as ``sysmon -i config.xml``
installs Sysmon — a unit whose ExecStart is this installation's etwmon, the readers' group, and systemd told.

The unit file is also the record of what ``install`` did (a comment names a group it created), so ``uninstall``
undoes exactly that. Without systemd as PID 1 nothing is started: what to run is said instead.
"""

from __future__ import annotations

import grp
import logging
import os
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Error

__all__ = ["UNIT_NAME", "UNIT_DIR", "DEFAULT_GROUP", "InstallError", "Plan", "plan_install", "render_unit",
           "install", "uninstall", "systemd_is_running", "etwmon_command", "group_name", "run_command"]

log = logging.getLogger(__name__)

UNIT_NAME = "etwmon.service"
UNIT_DIR = "/etc/systemd/system"
DEFAULT_GROUP = "etwmon"
#: The comment line by which the unit remembers that ``install`` made the group (so ``uninstall`` removes it).
_CREATED_GROUP = "# etwmon service install: created the group "
#: Where systemd's ProtectHome=yes hides files; an installation or configuration there needs read-only instead.
_HOME_DIRS = ("/home", "/root", "/run/user")
#: What PrivateTmp=yes replaces with empty directories of the service's own.
_TMP_DIRS = ("/tmp", "/var/tmp")


class InstallError(Error):
    """``etwmon service install``/``uninstall`` cannot do what was asked; the message names the fix."""


def etwmon_command() -> list[str]:
    """How systemd should start this installation's etwmon: the console script next to this Python (a venv's
    ``bin/etwmon``) when there is one, else this Python with ``-m etwmon``. Paths are absolute and not resolved
    through symlinks, so a venv stays a venv."""
    here = Path(os.path.abspath(sys.executable))
    script = here.parent / "etwmon"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [str(here), "-m", "etwmon"]


def _under(path: str, tops: tuple[str, ...]) -> bool:
    path = os.path.abspath(path)
    return any(path == top or path.startswith(top + "/") for top in tops)


def _under_home(path: str) -> bool:
    return _under(path, _HOME_DIRS)


def _installation_paths() -> list[str]:
    """Every path the service must read to start: the command, the Python it runs (and where it really lives),
    the environment's prefixes and etwmon's own package (an editable install lives in its clone)."""
    import etwmon

    paths = etwmon_command()[:1] + [os.path.realpath(sys.executable), sys.prefix, sys.base_prefix,
                                    os.path.realpath(os.path.dirname(etwmon.__file__))]
    return [os.path.abspath(p) for p in paths]


@dataclass
class Plan:
    """What ``install`` would do: the unit's text and where it goes, the group, and the systemctl commands."""

    unit_path: Path
    unit: str
    group: str
    create_group: bool
    command: list[str]
    config: str | None
    steps: list[list[str]] = field(default_factory=list)


def render_unit(command: list[str], group: str, config: str | None, *, created_group: bool,
                protect_home: str, private_tmp: bool = True) -> str:
    """The unit file's text. ``protect_home``: "yes" when nothing it reads is under /home, /root or /run/user,
    else "read-only" (the service writes nothing there either way). ``private_tmp``: False when something it
    reads is under /tmp or /var/tmp, which PrivateTmp=yes would replace with empty directories."""
    argv = [*command, "serve", "--group", group]
    if config is not None:
        argv += ["--config", config]
    lines = [
        "# etwmon as a system service, written by `etwmon service install` (docs/service.md); remove it with",
        "# `etwmon service uninstall`. One privileged process owns the kernel event source and serves its records",
        f"# on /run/etwmon/etwmon.sock to members of the group {group} (etwmon tail, etwmon.connect()).",
    ]
    if created_group:
        lines.append(f"{_CREATED_GROUP}{group}")
    lines += [
        "",
        "[Unit]",
        "Description=etwmon: process and thread start/stop events for local readers",
        "After=local-fs.target",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={' '.join(_systemd_quote(arg) for arg in argv)}",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=20",
        "Restart=on-failure",
        "RestartSec=2",
        "# etwmon checks this directory itself (root-owned, not writable by others, mode 0710 root:GROUP); systemd",
        "# makes it and removes it on stop.",
        "RuntimeDirectory=etwmon",
        "RuntimeDirectoryMode=0710",
        "# The kernel sources need root's capabilities (netlink, audit, BPF); the rest of the machine it need not",
        "# touch. ProtectHome is read-only, not yes, when etwmon or its configuration lives under a home directory;",
        "# PrivateTmp is off when they live under /tmp or /var/tmp.",
        "NoNewPrivileges=yes",
        f"ProtectHome={protect_home}",
        f"PrivateTmp={'yes' if private_tmp else 'no'}",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_UNIX AF_NETLINK",
        "LockPersonality=yes",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def _systemd_quote(arg: str) -> str:
    """One ExecStart word: systemd splits on whitespace and reads quotes, backslashes and % and $ specially."""
    if arg and all(c.isalnum() or c in "/._-+=:,@" for c in arg):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def systemd_is_running() -> bool:
    """systemd is PID 1 (what sd_booted(3) checks)."""
    return os.path.isdir("/run/systemd/system")


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def group_name(name: str) -> str:
    """``name`` if it is a group name groupadd takes (and no option), else ``ValueError`` saying the rule."""
    if not (0 < len(name) <= 32 and name.isascii() and (name[0].isalpha() or name[0] == "_")
            and all(c.isalnum() or c in "_-" for c in name)):
        raise ValueError(f"{name!r} is not a valid group name (letters, digits, '_' and '-', starting with a "
                         "letter, at most 32)")
    return name


def plan_install(config: str | None = None, group: str = DEFAULT_GROUP, unit_dir: str = UNIT_DIR) -> Plan:
    """Decide everything ``install`` does, changing nothing (``--dry-run`` prints this)."""
    try:
        group_name(group)
    except ValueError as exc:
        raise InstallError(f"--group {exc}") from None
    if config is not None:
        config = os.path.abspath(config)
        if not os.path.isfile(config):
            raise InstallError(f"--config {config}: no such file")
        from ..rules import RuleSet  # refused here, not at the service's first start

        RuleSet.load(config)
    command = etwmon_command()
    create_group = not _group_exists(group)
    reads = _installation_paths() + ([config] if config else [])
    protect_home = "read-only" if any(_under_home(p) for p in reads) else "yes"
    private_tmp = not any(_under(p, _TMP_DIRS) for p in reads)
    unit_path = Path(unit_dir) / UNIT_NAME
    unit = render_unit(command, group, config, created_group=create_group, protect_home=protect_home,
                       private_tmp=private_tmp)
    steps = [["groupadd", "--system", group]] if create_group else []
    steps += [["systemctl", "daemon-reload"], ["systemctl", "enable", "--now", UNIT_NAME]]
    return Plan(unit_path, unit, group, create_group, command, config, steps)


def _run(argv: list[str]) -> None:
    tool = shutil.which(argv[0])
    if tool is None:
        raise InstallError(f"{argv[0]} is not installed here, so '{shlex.join(argv)}' could not run")
    done = subprocess.run([tool, *argv[1:]], stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise InstallError(f"'{shlex.join(argv)}' failed (status {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-500:]}")


def _write_unit(path: Path, text: str) -> None:
    """Write the unit as root's 0644 file, replacing an existing regular file atomically; a symlink or other
    file at the path is refused (a unit directory is root's, but a link there could point anywhere)."""
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise InstallError(f"{path} exists and is not a regular file: remove it first")
        except FileNotFoundError:
            pass
        temporary = f".{path.name}.{os.getpid()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fchmod(f.fileno(), 0o644)
                os.fsync(f.fileno())
            os.rename(temporary, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(temporary, dir_fd=dir_fd)
            except OSError:
                pass
            raise
    finally:
        os.close(dir_fd)


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise InstallError(f"{what} needs root: run it with sudo (or --dry-run to see what it would do)")


def install(plan: Plan, say) -> None:
    """Carry out ``plan``: the group, the unit, and with systemd running, daemon-reload and enable --now; else
    ``say`` what to run. ``say(line)`` reports each step."""
    _need_root("installing the service")
    if plan.create_group:
        _run(plan.steps[0])
        say(f"created the group {plan.group}")
    _write_unit(plan.unit_path, plan.unit)
    say(f"wrote {plan.unit_path} (ExecStart={shlex.join([*plan.command, 'serve', '--group', plan.group])}"
        + (f" --config {shlex.quote(plan.config)})" if plan.config else ")"))
    if systemd_is_running():
        for step in plan.steps[-2:]:
            _run(step)
        say(f"started and enabled {UNIT_NAME}: journalctl -u etwmon shows its log")
    else:
        say(f"systemd is not running here (PID 1 is not systemd), so nothing was started: on a systemd host run "
            f"'systemctl daemon-reload && systemctl enable --now {UNIT_NAME}'; here, run "
            f"'{shlex.join([*plan.command, 'serve', '--group', plan.group])}' yourself")
    say(f"to let a user read events: usermod -aG {plan.group} USER (it counts from their next login)")


def uninstall(unit_dir: str = UNIT_DIR, *, dry_run: bool = False, say=print) -> bool:
    """Undo ``install``: stop and disable the service (with systemd running), remove the unit, and the group if
    ``install`` created it. Returns False when there was no unit to remove."""
    path = Path(unit_dir) / UNIT_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        say(f"nothing to uninstall: there is no {path}")
        return False
    if "written by `etwmon service install`" not in text:
        raise InstallError(f"{path} was not written by 'etwmon service install': remove it yourself")
    created = [line[len(_CREATED_GROUP):].strip() for line in text.splitlines() if line.startswith(_CREATED_GROUP)]
    steps = []
    running = systemd_is_running()
    if running:
        steps.append(["systemctl", "disable", "--now", UNIT_NAME])
    steps.append(["rm", str(path)])
    if running:
        steps.append(["systemctl", "daemon-reload"])
    steps += [["groupdel", group] for group in created if _group_exists(group)]
    if dry_run:
        for step in steps:
            say(f"would run: {shlex.join(step)}")
        return True
    _need_root("uninstalling the service")
    for step in steps:
        if step[0] == "rm":
            path.unlink()
            say(f"removed {path}")
        else:
            _run(step)
            say(f"ran: {shlex.join(step)}")
    return True


def run_command(command: str, *, config: str | None, group: str, unit_dir: str, dry_run: bool, out, say) -> int:
    """``etwmon service install|uninstall``: ``out`` gets the unit of a dry run, ``say(line)`` each step.
    Returns the exit status (0 done, 1 nothing to uninstall is still 0; errors raise ``InstallError``)."""
    if command == "uninstall":
        uninstall(unit_dir, dry_run=dry_run, say=say)
        return 0
    plan = plan_install(config, group, unit_dir)
    if dry_run:
        out.write(plan.unit)
        out.flush()
        say(f"dry run, nothing changed: would write {plan.unit_path}, then run: "
            + "; ".join(shlex.join(step) for step in plan.steps)
            + ("" if systemd_is_running() else " (systemd is not running here: the last two would be left to you)"))
        return 0
    install(plan, say)
    return 0
