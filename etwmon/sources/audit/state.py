"""Who changed the machine-wide audit state, and putting it back: etwmon's rule keys, the lock that serialises
instances changing audit, restoring ``enabled``/``backlog_limit``, and cleaning up after a killed instance.

Every etwmon instance tags its exec rules with a key naming its pid, its start time and the audit state from
before any etwmon instance touched it (``RuleKey``). So the last instance out restores that state even if the one
that changed it was killed, and ``etwmon cleanup`` can do the same with no instance running.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from dataclasses import dataclass

from ...errors import SourceUnavailable
from ...safedir import SafeDirError, open_private_file, private_directory
from .._linux import live_process_start
from .protocol import AuditControl, AuditRule, AuditStatus

__all__ = ["DEFAULT_BACKLOG_LIMIT", "DEFAULT_KEY", "RuleKey", "StateLock", "cleanup", "restore", "stale_state"]

log = logging.getLogger(__name__)

DEFAULT_KEY = "etwmon"
#: What etwmon raises backlog_limit to while it runs (auditd's own sample rules use 8192): a storm then waits
#: less in audit_log_start for kauditd, and a short stall of the reader does not lose records.
DEFAULT_BACKLOG_LIMIT = 8192

#: The lock's home: a directory only root can enter, so nobody else can plant a link or hold the lock there. Not
#: /run/etwmon: that is the service's (systemd makes it 0710 for the socket's group and removes it at stop, which
#: would swap the lock file under a running instance).
LOCK_DIR = "/run/etwmon-audit"
LOCK_NAME = "lock"
#: Seconds to wait for another instance that holds the lock (it holds it only while it changes audit).
LOCK_TIMEOUT = 10.0


@dataclass(frozen=True)
class RuleKey:
    """The key etwmon tags its rules with: ``<prefix>:<pid>:<start>:e<enabled>:b<backlog_limit>``.

    Owner pid and start time tell a live instance from a killed one (pid reuse included); the audit state
    from before etwmon touched it travels with the rule, so whichever instance stops last restores it even
    after the one that changed it was killed."""

    prefix: str
    pid: int
    start: int
    enabled: int
    backlog_limit: int

    def __str__(self) -> str:
        return f"{self.prefix}:{self.pid}:{self.start}:e{self.enabled}:b{self.backlog_limit}"

    @classmethod
    def parse(cls, text: str | None, prefix: str) -> "RuleKey | None":
        if not text:
            return None
        for key in text.split("\x01"):  # auditctl joins several keys with \x01
            parts = key.split(":")
            if len(parts) == 5 and parts[0] == prefix and parts[3][:1] == "e" and parts[4][:1] == "b":
                try:
                    return cls(prefix, int(parts[1]), int(parts[2]), int(parts[3][1:]), int(parts[4][1:]))
                except ValueError:
                    return None
        return None

    def owner_alive(self) -> bool:
        """The process that installed the rule still runs (a zombie, killed but not reaped, does not)."""
        return live_process_start(self.pid) == self.start


def etwmon_rules(control: AuditControl, prefix: str) -> list[tuple[AuditRule, RuleKey]]:
    """The rules in the kernel that etwmon instances using ``prefix`` installed, with their keys."""
    out = []
    for rule in control.list_rules():
        key = RuleKey.parse(rule.key, prefix)
        if key is not None:
            out.append((rule, key))
    return out


# --- the lock ----------------------------------------------------------------------------------------------------


def _open_lock_file(directory: str, name: str) -> int:
    """The lock file, made safely (``etwmon.safedir``, shared with the service's socket): the directory created
    0700 (or found 0700/0710, owned by us) and opened without following a link, then the file in it opened
    relative to that directory, never through a link, and checked to be a regular file of ours that nobody else
    may write."""
    path = os.path.join(directory, name)
    try:
        dir_fd = private_directory(directory)
    except SafeDirError as exc:
        raise SourceUnavailable(f"audit source: the lock directory: {exc}") from exc
    except OSError as exc:
        raise SourceUnavailable(f"audit source: cannot create the lock directory {directory} ({exc.strerror}); "
                                "etwmon does not change the audit state without its lock") from exc
    try:
        return open_private_file(dir_fd, name, os.O_RDWR | os.O_CREAT, 0o600, path=path)
    except SafeDirError as exc:
        raise SourceUnavailable(f"audit source: the lock file: {exc}") from exc
    except OSError as exc:
        raise SourceUnavailable(f"audit source: refusing the lock file {path}: {exc.strerror}; remove it") from exc
    finally:
        os.close(dir_fd)


class StateLock:
    """Serialises etwmon instances changing the machine-wide audit state (the kernel releases it when its
    holder dies). Raises ``SourceUnavailable`` naming the path and the problem when the lock cannot be trusted
    or another process holds it longer than ``LOCK_TIMEOUT`` seconds: etwmon never goes on unlocked."""

    def __init__(self) -> None:
        self._fd: int | None = None

    def __enter__(self) -> "StateLock":
        fd = _open_lock_file(LOCK_DIR, LOCK_NAME)
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._fd = fd
                return self
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    path = os.path.join(LOCK_DIR, LOCK_NAME)
                    raise SourceUnavailable(
                        f"audit source: another process has held {path} for {LOCK_TIMEOUT:g} s (an etwmon "
                        f"instance stuck while changing audit? `fuser -v {path}` names it); etwmon does not "
                        "change the audit state without its lock") from None
                time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


# --- restoring ------------------------------------------------------------------------------------------------


def restore(control: AuditControl, key: RuleKey, raised_to: int | None, daemon_at_start: int = 0) -> list[str]:
    """Put ``enabled`` and ``backlog_limit`` back as ``key`` recorded them, where nobody changed them since:
    audit is disabled again unless an audit daemon registered after ``daemon_at_start`` (its pid then, 0: none)
    and wants it on; backlog_limit goes back only if it still is ``raised_to``, what etwmon set. Call only when
    no other etwmon instance is alive. Returns what was done, one line each."""
    done = []
    status = control.status()
    if status.enabled == 1 and key.enabled == 0:
        if status.pid and status.pid != daemon_at_start:
            log.info("etwmon audit: an audit daemon (pid %d) registered meanwhile; leaving audit enabled",
                     status.pid)
        else:
            control.set_status(enabled=0)
            done.append("audit disabled again (enabled=0, as it was before etwmon)")
    if raised_to is not None and status.backlog_limit == raised_to and key.backlog_limit < raised_to:
        control.set_status(backlog_limit=key.backlog_limit)
        done.append(f"backlog_limit put back from {raised_to} to {key.backlog_limit}")
    return done


def delete_rule(control: AuditControl, rule: AuditRule) -> bool:
    """Delete one rule; False if someone else already did."""
    try:
        control.delete_rule(rule)
        return True
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise


def _changes(status: AuditStatus, key: RuleKey) -> list[str]:
    """How the audit state differs from what a killed instance's key recorded, where etwmon made it so."""
    out = []
    if status.enabled == 1 and key.enabled == 0:
        daemon = (f" (an audit daemon, pid {status.pid}, is registered: cleanup leaves audit enabled)"
                  if status.pid else "")
        out.append(f"audit is enabled=1, was 0 before etwmon{daemon}")
    if status.backlog_limit == DEFAULT_BACKLOG_LIMIT and key.backlog_limit < DEFAULT_BACKLOG_LIMIT:
        out.append(f"backlog_limit is {status.backlog_limit}, was {key.backlog_limit} before etwmon")
    return out


def _dead_and_alive(control: AuditControl, prefix: str
                    ) -> tuple[list[tuple[AuditRule, RuleKey]], list[RuleKey]]:
    dead, alive = [], []
    for rule, key in etwmon_rules(control, prefix):
        if key.owner_alive():
            alive.append(key)
        else:
            dead.append((rule, key))
    return dead, alive


def stale_state(control: AuditControl, prefix: str = DEFAULT_KEY) -> list[str]:
    """What killed etwmon instances left in the kernel's audit state, one line each; [] when nothing."""
    dead, alive = _dead_and_alive(control, prefix)
    if not dead:
        return []
    by_owner: dict[int, list[RuleKey]] = {}
    for _, key in dead:
        by_owner.setdefault(key.pid, []).append(key)
    out = [f"{len(keys)} audit exec rule{'s' if len(keys) > 1 else ''} left by etwmon pid {pid}, which is gone "
           f"(key {keys[0]})" for pid, keys in by_owner.items()]
    if alive:
        out.append(f"(etwmon pid {alive[0].pid} still runs: it restores the audit state when it stops)")
    else:
        out += _changes(control.status(), dead[0][1])
    return out


def cleanup(control: AuditControl, prefix: str = DEFAULT_KEY) -> list[str]:
    """Remove the rules of killed etwmon instances and, when no instance is alive, restore the audit state they
    recorded; never touches a live instance's rules. Returns what was done, one line each; [] when nothing."""
    with StateLock():
        dead, alive = _dead_and_alive(control, prefix)
        if not dead:
            return []
        # The state first, then the rules: killed half-way, a rule still says what to restore.
        done = [] if alive else restore(control, dead[0][1], raised_to=DEFAULT_BACKLOG_LIMIT)
        removed: dict[int, int] = {}
        for rule, key in dead:
            if delete_rule(control, rule):
                removed[key.pid] = removed.get(key.pid, 0) + 1
        done += [f"removed {n} audit exec rule{'s' if n > 1 else ''} left by etwmon pid {pid}"
                 for pid, n in removed.items()]
        return done
