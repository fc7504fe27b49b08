"""``etwmon record``: watch, run a command (as the invoking user under sudo), keep its process tree, write a
recording; or record everything until a stop signal, a size or a duration.

The loop drains the Monitor's ring in big batches: without a command the batch goes to the file as it is (no
Python per record); with one, ``ProcessTreeFilter`` picks the tree's records first, then the ``--config`` rules
judge them (after the tree, so a rule that leaves out a parent cannot cut its children off the tree).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence, TextIO

import numpy as np

from .. import __version__
from ..clock import filetime_now
from ..errors import Error
from ..formats import escape_text, human_bytes
from ..records import ItemType, parse, record_headers
from .tree import ProcessTreeFilter
from .writer import RecordingWriter

__all__ = ["RecordOptions", "BatchRecorder", "record", "DEFAULT_GRACE"]

#: After the command exits, how long its stragglers' records (a last child's exit) may take to arrive.
DEFAULT_GRACE = 0.5
#: The recorder's ring: room for a burst while a chunk is being compressed.
RING_ITEMS = 100_000
_READ_SIZE = 1 << 20
_PROGRESS_TTY = 0.25
_PROGRESS_LOG = 10.0
_CREATE, _EXIT, _LOST = int(ItemType.ProcessCreate), int(ItemType.ProcessExit), int(ItemType.RecordsLost)


@dataclass
class RecordOptions:
    output: str
    command: list[str] = field(default_factory=list)
    source: str = "auto"
    config: str | None = None
    user: str | None = None
    max_size: int | None = None
    duration: float | None = None
    grace: float = DEFAULT_GRACE
    overwrite: bool = False
    #: Hashes asked for (``"sha256"``; None: the configuration's <HashAlgorithms>, else none).
    hashes: str | None = None
    #: Image loads too (bpf only; off: nothing watches mmap).
    image_loads: bool = False
    #: The identity mode (``Monitor(identity=...)``): True, or "full" for self-contained process records.
    identity: bool | str = True


class RecordError(Error):
    """``etwmon record`` cannot do what it was asked (an unknown user, a command that cannot start...)."""


class _CommandFailed(Exception):
    """The command could not be started: ``status`` is what a shell would exit with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Account:
    name: str
    uid: int
    gid: int
    groups: list[int]
    home: str


def _account(options: RecordOptions, environ: dict[str, str]) -> _Account | None:
    """Whom the command runs as: ``--user``, else ``$SUDO_USER`` when root through sudo, else None (as is)."""
    import pwd

    name = options.user
    if name is None and hasattr(os, "geteuid") and os.geteuid() == 0:
        name = environ.get("SUDO_USER") or None
        if name == "root":
            name = None
    if name is None:
        return None
    try:
        entry = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
    except KeyError:
        raise RecordError(f"--user: no user named {name!r}") from None
    if entry.pw_uid != os.geteuid() and os.geteuid() != 0:
        raise RecordError(f"--user {name}: only root can run the command as another user")
    return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid, os.getgrouplist(entry.pw_name, entry.pw_gid),
                    entry.pw_dir)


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


class _Signals:
    """Stop signals count themselves; with a command SIGTERM and SIGHUP are passed on to it (SIGINT from the
    terminal reaches it on its own), without one any signal ends the recording."""

    def __init__(self) -> None:
        self.count = 0
        self.child: subprocess.Popen | None = None
        self._saved: list[tuple[int, Any]] = []

    def _handler(self, signum: int, frame: object) -> None:
        self.count += 1
        child = self.child
        if child is not None and signum != signal.SIGINT and child.poll() is None:
            try:
                child.send_signal(signum)
            except OSError:
                pass

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous = signal.getsignal(number)
            if previous is signal.SIG_IGN:
                continue
            self._saved.append((number, signal.SIG_DFL if previous is None else previous))
            signal.signal(number, self._handler)

    def restore(self) -> None:
        for number, previous in self._saved:
            signal.signal(number, previous)
        self._saved.clear()


class _Progress:
    """The progress line on stderr: rewritten in place on a terminal, a line every few seconds elsewhere."""

    def __init__(self, err: TextIO) -> None:
        self.err = err
        try:
            self.tty = err.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._every = _PROGRESS_TTY if self.tty else _PROGRESS_LOG
        self._next = time.monotonic() + self._every
        self._shown = False

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + self._every
        try:
            if self.tty:
                self.err.write(f"\r\x1b[Krecording: {text}")
                self._shown = True
            else:
                self.err.write(f"etwmon: recording: {text}\n")
            self.err.flush()
        except (OSError, ValueError):
            pass

    def end(self) -> None:
        if self._shown:
            try:
                self.err.write("\r\x1b[K")
                self.err.flush()
            except (OSError, ValueError):
                pass


class BatchRecorder:
    """What the recorder does with each batch the ring gives: without a ``tree``, the batch goes to the file as it
    is (numpy counts its creates and losses: no Python per record); with one, the tree's records, judged by the
    rules ``stage`` when there is one (``stage_for(rules)``), go to the file. Counts ``events``, ``processes``
    (creates) and ``lost`` (RecordsLost counts) as written."""

    def __init__(self, writer: RecordingWriter, tree: ProcessTreeFilter | None = None) -> None:
        self.writer = writer
        self.tree = tree
        self.stage: Any = None
        self.events = self.processes = self.lost = 0
        self._kept: list[bytes] = []

    def stage_for(self, rules: Any) -> None:
        from ..rules import RulesStage

        self.stage = RulesStage(self, rules)

    # The rules stage's sink: what it keeps comes back here.
    def push(self, record: Any) -> None:
        self._kept.append(bytes(record))

    def push_lost(self, count: int) -> None:  # the rules stage never loses; part of the Sink shape
        self.lost += count

    def notify(self, force: bool = False) -> None:
        pass

    def take(self, data: memoryview, ends: np.ndarray, count: int) -> None:
        """One batch of ``count`` whole records whose ends are ``ends[:count]`` (``readinto_indexed``)."""
        writer = self.writer
        if self.tree is None:
            starts = np.concatenate(([0], ends[:count - 1]))
            raw = np.frombuffer(data, dtype=np.uint8)
            types = raw[starts].astype(np.int32) | (raw[starts + 1].astype(np.int32) << 8)
            self.processes += int(np.count_nonzero(types == _CREATE))
            for at in starts[types == _LOST].tolist():
                self.lost += int.from_bytes(data[at + 16:at + 20], "little")
            writer.write(data, count)
            self.events += count
            return
        tree = self.tree
        processes, lost = tree.processes, tree.lost
        kept, n = tree.select(data)
        if self.stage is None:
            self.processes += tree.processes - processes
            self.lost += tree.lost - lost
        elif n:  # the rules judge the tree's records: count what they keep
            view = memoryview(kept)
            for offset, _, size, _ in record_headers(view).tolist():
                self.stage.push(view[offset:offset + size])
            kept, n = b"".join(self._kept), len(self._kept)
            self._kept.clear()
            for event in parse(kept):
                if event.type == ItemType.RecordsLost:
                    self.lost += event.count
                elif event.type == ItemType.ProcessCreate:
                    self.processes += 1
        if not n:
            return
        writer.write(kept, n)
        self.events += n


class _Recorder:
    def __init__(self, options: RecordOptions, err: TextIO, environ: dict[str, str]) -> None:
        self.options, self.err, self.environ = options, err, environ
        self.account = _account(options, environ) if options.command else None
        self.rules = None
        if options.config:
            from ..rules import RuleSet

            self.rules = RuleSet.load(options.config)
        self.writer: RecordingWriter | None = None
        self.tree: ProcessTreeFilter | None = None
        self.batches: BatchRecorder | None = None
        self.child: subprocess.Popen | None = None
        self.status: int | None = None
        self.stop_reason = ""

    # -- the run ----------------------------------------------------------------------------------

    def run(self) -> int:
        from ..monitor import Monitor

        options = self.options
        owner = (self.account.uid, self.account.gid) if self.account is not None and os.geteuid() == 0 else None
        # The file first: a name that cannot be used fails before anything is started.
        self.writer = RecordingWriter(options.output, overwrite=options.overwrite, owner=owner)
        hashes = options.hashes
        if hashes is None and self.rules is not None:  # the rules judge a command's tree here, not in the Monitor
            hashes = getattr(self.rules.config, "hash_algorithms", None)
        monitor = Monitor(source=options.source, max_items=RING_ITEMS,
                          rules=None if options.command else self.rules, hashes=hashes, identity=options.identity,
                          **({"image_loads": True} if options.image_loads else {}))
        started = datetime.now(timezone.utc)
        start_filetime = filetime_now()
        try:
            monitor.start()
            header = {
                "etwmon_version": __version__, "host": socket.gethostname(), "boot_id": _boot_id(),
                "source": monitor.source.name, "lossy": monitor.lossy,
                "start_time": started.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "start_filetime": start_filetime,
                "filter": {"command": list(options.command) or None, "config": options.config,
                           "user": self.account.name if self.account else None},
                "recorder_pid": os.getpid(),
            }
            self.writer.begin(header)
            self.batches = BatchRecorder(self.writer)
            return self._loop(monitor, started)
        except _CommandFailed as exc:
            self._say(f"error: {exc}")
            self.writer.abandon()
            os.unlink(self.writer.path)  # nothing of the command to keep
            return exc.status
        finally:
            monitor.close()
            if not self.writer.closed:
                begun = self.writer.begun
                self.writer.abandon()
                if not begun:  # nothing was recorded: leave no empty file behind
                    os.unlink(self.writer.path)

    def _start_command(self) -> None:
        options, account = self.options, self.account
        kwargs: dict[str, Any] = {}
        if account is not None and account.uid != os.geteuid():
            env = dict(self.environ)
            env.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
            kwargs.update(user=account.uid, group=account.gid, extra_groups=account.groups, env=env)
        try:
            self.child = subprocess.Popen(options.command, **kwargs)
        except OSError as exc:
            # As a shell (and time, strace) says it: 127 not found, 126 found but not runnable.
            status = 127 if isinstance(exc, FileNotFoundError) else 126
            raise _CommandFailed(status, f"cannot run {escape_text(shlex.join(options.command))}: "
                                         f"{exc.strerror or exc}") from None
        self.tree = self.batches.tree = ProcessTreeFilter(self.child.pid, os.getpid())
        if self.rules is not None:
            self.batches.stage_for(self.rules)

    def _loop(self, monitor: Any, started: datetime) -> int:
        options, writer, err = self.options, self.writer, self.err
        signals = _Signals()
        progress = _Progress(err)
        buf = bytearray(_READ_SIZE)
        view = memoryview(buf)
        ends = np.zeros(_READ_SIZE // 16 + 1, dtype=np.int64)
        begun = time.monotonic()
        deadline = begun + options.duration if options.duration else None
        grace_end: float | None = None
        signals.install()
        try:
            # The start-up line, last before the command starts (scripts may wait for it).
            what = "the command's process tree" if options.command else "everything"
            until = "" if options.command else "; Ctrl-C to stop"
            self._say(f"recording {what} to {escape_text(writer.path)} ({monitor.describe()}){until}")
            if options.command:
                self._start_command()
                signals.child = self.child
            while True:
                n, count, _ = monitor.readinto_indexed(buf, ends)
                if n:
                    self.batches.take(view[:n], ends, count)
                writer.tick()
                progress.show(self._progress_text())
                if self._limit_reached(signals, deadline):
                    break
                if self.child is not None and self.status is None and self.child.poll() is not None:
                    self.status = self.child.returncode
                    grace_end = time.monotonic() + options.grace
                if grace_end is not None and time.monotonic() >= grace_end and not monitor.readable():
                    self.stop_reason = "the command exited"
                    break
                if not n:
                    if not monitor.running:
                        self.stop_reason = "the source stopped"
                        break
                    monitor.wait(0.1)
            monitor.stop()
            while True:
                n, count, _ = monitor.readinto_indexed(buf, ends)
                if not n:
                    break
                self.batches.take(view[:n], ends, count)
            progress.end()
            summary = self._summary(monitor, started, begun)
            writer.close(summary)
            self._say_summary(summary)
            if self.child is not None and self.status is None:
                # The recording ended first (a limit or a signal): the command's status is still its own.
                self._say("the recording has ended; waiting for the command to exit")
                self.status = self.child.wait()
        finally:
            signals.restore()
        return self._exit_status()

    def _limit_reached(self, signals: _Signals, deadline: float | None) -> bool:
        options = self.options
        if signals.count and (self.child is None or signals.count > 1):
            self.stop_reason = "stopped by a signal"
            return True
        if options.max_size is not None and self.writer.size + self.writer.pending_bytes // 8 >= options.max_size:
            self.stop_reason = f"--max-size {human_bytes(options.max_size)} reached"
            return True
        if deadline is not None and time.monotonic() >= deadline:
            self.stop_reason = f"--duration {options.duration:g} s reached"
            return True
        return False

    def _exit_status(self) -> int:
        status = self.status
        if status is None:
            return 0
        return 128 - status if status < 0 else status  # killed by a signal: 128 + its number, as a shell says

    def _progress_text(self) -> str:
        b = self.batches
        return (f"{b.events} events, {b.processes} processes, "
                f"{human_bytes(self.writer.size + self.writer.pending_bytes // 8)}")

    def _summary(self, monitor: Any, started: datetime, begun: float) -> dict[str, Any]:
        stats = monitor.stats
        tree = self.tree
        return {
            "events": self.batches.events, "processes": self.batches.processes, "lost": self.batches.lost,
            "source_lost": stats.lost, "ring_dropped": stats.dropped,
            "end_time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "end_filetime": filetime_now(), "seconds": round(time.monotonic() - begun, 3),
            "stop_reason": self.stop_reason, "exit_status": None if self.status is None else self._exit_status(),
            "tree_running": tree.running if tree is not None else None,
            "rules": self.batches.stage.stats() if self.batches.stage is not None else (stats.rules or None),
        }

    def _say(self, text: str) -> None:
        try:
            self.err.write(f"etwmon: {text}\n")
            self.err.flush()
        except (OSError, ValueError):
            pass

    def _say_summary(self, summary: dict[str, Any]) -> None:
        size = human_bytes(self.writer.size)
        lost = summary["lost"]
        loss = f"{lost} lost" if lost else "none lost"
        self._say(f"{summary['stop_reason'] or 'stopped'}: recorded {summary['events']} events of "
                  f"{summary['processes']} processes in {summary['seconds']:.1f} s to {escape_text(self.writer.path)} "
                  f"({size}), {loss}")
        if lost:
            self._say(f"warning: {lost} records were lost while recording (RecordsLost records mark where)")
        if summary.get("tree_running"):
            self._say(f"note: {summary['tree_running']} processes of the tree were still running when the "
                      "recording stopped (daemons the command left behind?)")
        if self.status is not None:
            self._say(f"the command exited with status {self._exit_status()}")


def record(options: RecordOptions, err: TextIO, environ: dict[str, str]) -> int:
    """Run ``etwmon record``; returns the command's exit status (0 without a command)."""
    return _Recorder(options, err, environ).run()

