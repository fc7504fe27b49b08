"""What several test modules share: a Sink that keeps what a source pushes, read loops over a Monitor, a scripted
source, and running ``etwmon`` (or the tailer) as a user runs it, with tagged child processes to watch."""

from __future__ import annotations

import collections
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Callable

import pytest

import etwmon
from etwmon import records as R
from etwmon.records import Event, parse
from etwmon.sources.base import Source

from .conftest import require

# --- driving a source or a Monitor directly -----------------------------------------------------------------------


class ListSink:
    """A Sink that keeps every record a source pushes and every loss it reports (thread-safe).

    ``lost_error``: raise it from ``push_lost`` instead (a source that cannot count losses must never call it;
    or a sink that fails, to test how the source copes)."""

    def __init__(self, lost_error: BaseException | None = None) -> None:
        self.records: list[bytes] = []
        self.lost: list[int] = []
        self.notified = 0
        self.lost_error = lost_error
        self._lock = threading.Lock()

    def push(self, record: bytes) -> None:
        with self._lock:
            self.records.append(bytes(record))

    def push_lost(self, count: int) -> None:
        if self.lost_error is not None:
            raise self.lost_error
        with self._lock:
            self.lost.append(count)

    def notify(self) -> None:
        self.notified += 1

    @property
    def lost_total(self) -> int:
        return sum(self.lost)

    def events(self) -> list[Event]:
        """Everything pushed so far, parsed."""
        with self._lock:
            return list(parse(b"".join(self.records)))

    def take(self) -> list[Event]:
        """Everything pushed since the last take(), parsed."""
        with self._lock:
            records, self.records = self.records, []
        return list(parse(b"".join(records)))


class BatchSink(ListSink):
    """A ListSink that also takes batches, the way the Monitor's ring does (records back to back, their ends)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []

    def push_batch(self, data, ends) -> None:
        view, start = bytes(memoryview(data).cast("B")), 0
        self.batches.append(len(ends))
        for end in map(int, ends):
            self.push(view[start:end])
            start = end


def drain(mon: etwmon.Monitor, bufsize: int = 1 << 20) -> list[Event]:
    """Every event readable right now (no waiting)."""
    buf = bytearray(bufsize)
    events: list[Event] = []
    while n := mon.readinto(buf):
        events += parse(bytes(buf[:n]))
    return events


def exit_3_and_sigkill() -> tuple[int, int]:
    """Run ``sh -c 'exit 3'`` and a ``sleep 30`` killed with SIGKILL, both reaped; returns their pids."""
    code3 = subprocess.Popen(["sh", "-c", "exit 3"])
    code3.wait()
    killed = subprocess.Popen(["sleep", "30"])
    time.sleep(0.05)
    killed.kill()
    killed.wait()
    return code3.pid, killed.pid


def run_one_thread() -> int:
    """Run a Python child that starts one thread (which sleeps 0.1 s) and ends; returns the thread's id."""
    code = ("import threading, time\n"
            "t = threading.Thread(target=time.sleep, args=(0.1,)); t.start()\n"
            "print(t.native_id, flush=True); t.join()\n")
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def read_until(mon: etwmon.Monitor, until: Callable[[list[Event]], bool] | None, timeout: float = 20.0,
               keep: Callable[[Event], bool] | None = None, quiet: float = 0.3,
               bufsize: int = 1 << 20) -> list[Event]:
    """Read events (waiting for more in ``mon.wait``) until ``until(events)`` is true or ``timeout`` passes, and
    return them; the caller's assertion says what was missing. ``until=None``: until nothing more comes within
    ``quiet`` seconds. ``keep`` keeps only some events (memory, on a busy machine)."""
    buf = bytearray(bufsize)
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while True:
        n = mon.readinto(buf)
        if n:
            got = parse(bytes(buf[:n]))
            events += got if keep is None else [e for e in got if keep(e)]
            continue
        if until is not None and until(events):
            return events
        left = deadline - time.monotonic()
        if left <= 0:
            return events
        if not mon.wait(min(left, quiet)) and until is None:
            return events
        if not mon.running and not mon.readable():
            return events


def timed_sleep(mon: etwmon.Monitor) -> tuple[int, int, list[Event], list[Event]]:
    """Run ``sleep 0.3`` between two readings of the wall clock (FILETIME) and read ``mon`` until its exit:
    (before, after, every event read, the sleep's own events)."""
    before = R.filetime_now()
    child = subprocess.Popen(["sleep", "0.3"])
    child.wait()
    after = R.filetime_now()
    events = read_until(mon, lambda evs: any(e.type == R.ItemType.ProcessExit and e.pid == child.pid for e in evs))
    return before, after, events, [e for e in events if getattr(e, "pid", None) == child.pid]


def records_until(mon: etwmon.Monitor, until: Callable[[list[Event]], bool], timeout: float = 20.0,
                  linger: float = 0.3, bufsize: int = 1 << 22) -> list[bytes]:
    """The records (each one's bytes, as the ring gives them) until ``until(events)`` holds (then ``linger``
    seconds more) or ``timeout`` seconds pass."""
    buf = bytearray(bufsize)
    out: list[bytes] = []
    events: list[Event] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if until(events):
            deadline = min(deadline, time.monotonic() + linger)
        mon.wait(0.1)
        n = mon.readinto(buf)
        at = 0
        while at < n:
            size = buf[at + 2] | buf[at + 3] << 8
            out.append(bytes(buf[at:at + size]))
            at += size
        events += parse(bytes(buf[:n]))
    return out


class ScriptedSource(Source):
    """Pushes what the test hands it, when the test says so; can be told to fail."""

    name = "scripted"
    delivers = frozenset({"process_exit"})

    def __init__(self) -> None:
        super().__init__()
        self.commands: queue.Queue = queue.Queue()
        self.opened = self.closed = 0
        self.lost = 0

    def open(self) -> None:
        self.opened += 1

    def run(self, sink) -> None:
        while True:
            command = self.commands.get()
            if command is None:
                return
            kind, value = command
            if kind == "records":
                for record in value:
                    sink.push(record)
                sink.notify()
            elif kind == "lost":
                self.lost += value
                sink.push_lost(value)
                sink.notify()
            elif kind == "fail":
                raise value
            elif kind == "notify":  # a notify() after pushing nothing (a combined source that holds a record)
                sink.notify()
            elif kind == "ack":  # tell the test everything before this was done
                value.set()
            elif kind == "gate":  # go on when the test says so
                value.wait(10)

    def stop(self) -> None:
        self.commands.put(None)

    def close(self) -> None:
        self.closed += 1

    def stats(self) -> dict[str, int]:
        return {"lost": self.lost, "parse_errors": 0}

    def send(self, *pids: int) -> None:
        self.commands.put(("records", [R.encode_process_exit(R.filetime_now(), pid, 0) for pid in pids]))


# --- running etwmon as a user would ----------------------------------------------------------------------------

PY = sys.executable
WAIT = 20.0  # seconds; generous because the machine is shared, never a timing assertion
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SUMMARY = re.compile(r"etwmon: (?:stopped|the source stopped|stdout closed): (\d+) records, (\d+) shown, (\d+) missed, "
                     r"(\d+) dropped")
ESC_TITLE = "\x1b]0;pwned\x07"
ESC_CLEAR = "\x1b[2J"

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux")


def etwmon_argv(*args: str) -> list[str]:
    return [PY, "-m", "etwmon", *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETWMON_MAX_")}
    env.update(extra)
    return env


def unprivileged(argv: list[str]) -> list[str]:
    """``argv`` without any capability: as root, setpriv empties the bounding set (uid 0 keeps reading the
    Python installed under /root); as a normal user, unchanged."""
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    require(setpriv is not None, "setpriv (util-linux) is needed to drop capabilities")
    return [setpriv, "--inh-caps=-all", "--bounding-set=-all", *argv]


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env or clean_env(),
                          timeout=timeout)


def new_tag() -> str:
    return f"tag-{uuid.uuid4().hex[:12]}"


def spawn(tag: str, *extra: str | bytes, code: int = 7, seconds: float = 0.4) -> int:
    """Run ``sh -c 'sleep S; exit CODE' TAG EXTRA...`` to its end and return its pid. The sleep keeps it alive
    long enough for /proc readers (the proc connector reads the command line at exec; procfs polls)."""
    argv = [b"sh", b"-c", f"sleep {seconds}; exit {code}".encode(), tag.encode(),
            *(os.fsencode(a) for a in extra)]
    child = subprocess.Popen(argv)
    assert child.wait(timeout=WAIT) == code
    return child.pid


def _default_stop_signals() -> None:
    for number in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(number, signal.SIG_DFL)


class Watch:
    """A long-running command (``etwmon tail`` or the tailer) with its output collected line by line."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        # The stop signals a user sends reach it with their default meaning, also when these tests run under
        # nohup (SIGHUP ignored, which etwmon tail keeps ignored on purpose).
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env or clean_env(), preexec_fn=_default_stop_signals)
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._collect, args=(s, d), daemon=True)
                         for s, d in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def _collect(self, stream, lines: list[bytes]) -> None:
        for line in iter(stream.readline, b""):
            with self._changed:
                lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _wait(self, lines: list[bytes], test: Callable[[bytes], bool], timeout: float, what: str) -> bytes:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in lines[seen:]:
                    if test(line):
                        return line
                seen = len(lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)):
                    raise AssertionError(f"no {what} within {timeout:.0f} s; exit status {self.proc.poll()}; "
                                         f"stderr: {self.stderr!r}; last stdout: {self.out[-5:]!r}")
                self._changed.wait(min(left, 0.5))

    def ready(self, timeout: float = WAIT) -> str:
        """Wait for the "watching ... (source: NAME" line on stderr; return the source name."""
        line = self._wait(self.err, lambda l: b"watching" in l, timeout, "'watching' line on stderr")
        match = re.search(rb"source: (\w+)", line)
        assert match, line
        return match.group(1).decode()

    def wait_out(self, test: Callable[[bytes], bool], timeout: float = WAIT, what: str = "expected line") -> bytes:
        return self._wait(self.out, test, timeout, what)

    def wait_err(self, test: Callable[[bytes], bool], timeout: float = WAIT, what: str = "expected line") -> bytes:
        return self._wait(self.err, test, timeout, what)

    def stop(self, sig: int = signal.SIGINT, timeout: float = WAIT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            status = self.proc.wait(timeout)
        finally:
            self.kill()
        for reader in self._readers:
            reader.join(5)
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def stdout(self) -> bytes:
        return b"".join(self.out)

    @property
    def stderr(self) -> str:
        return b"".join(self.err).decode("utf-8", "replace")

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.out]

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def delivers(source: str) -> frozenset[str]:
    from etwmon.sources import source_class
    return source_class(source).delivers


#: What the default source as root must deliver: the root tests of ``etwmon tail`` and the tailer check all of it.
EXACT_DELIVERS = frozenset({"process_create", "process_exec", "process_exit", "thread_create", "thread_exit",
                            "exit_code", "command_line", "exact_loss_count"})
#: How far a source's event times may stray from the wall clock: its offset to it is measured once, to within
#: microseconds, when it opens, and NTP may slew the wall clock by up to 500 ppm meanwhile (50 ms in 100 s).
CLOCK_SLACK_NS = 50_000_000


def assert_auto_picked(source: str) -> None:
    """``source`` (what the "watching" line named) is what ``--source auto`` must pick here, and exact: a
    silent fallback to a lossy source would otherwise turn off the checks a root test makes after this one,
    which are then unconditional."""
    from etwmon.sources import auto_order, available_sources

    infos = {info.name: info for info in available_sources()}
    expected = next(name for name in auto_order() if infos[name].available)
    assert source == expected, f"auto picked {source}, not {expected}: " + \
        "; ".join(f"{n}: {i.reason}" for n, i in infos.items() if not i.available)
    assert not infos[source].lossy and EXACT_DELIVERS <= infos[source].delivers, infos[source]


def assert_clean_stderr(stderr: str) -> None:
    for noise in ("Traceback", "Exception ignored", "BrokenPipeError", "KeyboardInterrupt"):
        assert noise not in stderr, stderr


def gated(ring) -> threading.Event:
    """Make ``ring.push`` wait until the returned event is set: the source thread stalls and stops reading its
    kernel buffer (socket, BPF ring), as a slow consumer of its own would."""
    gate = threading.Event()
    push = ring.push

    def waiting_push(record) -> None:
        gate.wait()
        push(record)

    ring.push = waiting_push
    return gate


def fork_storm_while_stalled(mon: etwmon.Monitor, forks: str, n: int) -> collections.Counter:
    """Start ``mon`` with its ring gated (``gated``), run the ``forks`` generator (tests/cn_builders.py) for ``n``
    children while its source is stalled, then let it go: the children's pids, counted (pids can repeat)."""
    gate = gated(mon.ring)
    mon.start()
    try:
        out = subprocess.run([forks, str(n)], check=True, capture_output=True, text=True).stdout.split("\n")
    finally:
        gate.set()
    return collections.Counter(int(line.split()[0]) for line in out[1:] if line)


def of_type(events: list[Event], item_type: R.ItemType) -> list[Event]:
    """The events of one record type."""
    return [e for e in events if e.type == item_type]


class InThread:
    """Base of the tests' background runners: ``_start(main)`` runs ``main`` on a daemon thread (``thread``) and
    keeps what it raised in ``error``, for the test to check or raise."""

    error: BaseException | None = None
    thread: threading.Thread

    def _start(self, main: Callable[[], object]) -> None:
        self.error = None
        self.thread = threading.Thread(target=self._main, args=(main,), daemon=True)
        self.thread.start()

    def _main(self, main: Callable[[], object]) -> None:
        try:
            main()
        except BaseException as exc:  # kept for the test to raise
            self.error = exc


def nameless_uid() -> int:
    """A uid the user database has no name for (records may carry any uid)."""
    import pwd

    for uid in range(4_000_000_000, 4_000_001_000):
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
    pytest.skip("every uid tried has a name")
