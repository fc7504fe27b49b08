"""The ``etwmon`` command line: ``etwmon tail`` prints process and thread events as they happen (text for
people, JSON lines for jq), ``etwmon sources`` says which event sources work on this machine and why not.

Usage reference: docs/cli.md. Everything a process controls (command lines, image names) is escaped before it
reaches a terminal: see ``escape_text``.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import json
import os
import re
import select
import signal
import stat
import sys
import time
import warnings
from typing import Callable, Iterable, NoReturn, Sequence, TextIO

from . import __version__
from .errors import Error, SourceError, SourceUnavailable
from .records import (
    EXIT_CODE_UNKNOWN, Event, ImageLoad, ItemType, ProcessCreate, ProcessExit, RecordsLost, ThreadCreate,
    ThreadExit, UnknownRecord, filetime_to_datetime, parse,
)
from .sources import SOURCES, available_sources

__all__ = ["main", "escape_text", "event_to_json", "format_event", "EventFilter", "parse_event_types",
           "ENV_MAX_ITEMS", "ENV_MAX_BYTES"]

PROG = "etwmon"
#: Environment variables that set the ring's caps (an option on the command line wins).
ENV_MAX_ITEMS = "ETWMON_MAX_ITEMS"
ENV_MAX_BYTES = "ETWMON_MAX_BYTES"
#: The smallest --max-bytes: one largest record (Size is a USHORT) must fit, or the source would fail on it.
MIN_MAX_BYTES = 0x10000
_READ_SIZE = 0x10000  # the book's client buffer: any record fits
#: ``tail --batch-wait``: how long to gather events behind the first before printing (a person does not see
#: 10 ms; a storm costs about half the CPU), and the most it may be (the ring keeps filling meanwhile).
DEFAULT_BATCH_WAIT = 0.01
MAX_BATCH_WAIT = 1.0
_sleep = time.sleep  # (tests replace it)

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


# --- escaping: what a process controls never reaches a terminal raw ------------------------------------------

# C0 controls, DEL and C1 controls (a terminal acts on them: ESC sequences retitle, clear, move the cursor);
# Unicode format characters that reorder or hide text (bidi embeddings/overrides/isolates, zero-width
# characters, invisible operators, tag characters); line/paragraph separators; lone surrogates (bytes that were
# not UTF-8, kept by surrogateescape, or broken UTF-16). All of these are in Unicode categories Cc/Cf/Cs/Zl/Zp,
# so str.isprintable() is a correct fast path.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb"
    "\ud800-\udfff\U000e0000-\U000e007f]"
)


def _escape_char(match: re.Match) -> str:
    c = ord(match.group())
    if c < 0x80:
        return f"\\x{c:02x}"
    if 0xDC80 <= c <= 0xDCFF:
        return f"\\x{c - 0xDC00:02x}"  # a byte that was not UTF-8, shown as that byte
    if c <= 0xFFFF:
        return f"\\u{c:04x}"
    return f"\\U{c:08x}"


def escape_text(text: str) -> str:
    """``text`` made safe for a terminal: control and invisible format characters become visible escapes.

    ``\\xNN`` is one byte (an ASCII control such as ESC ``\\x1b``, or a byte that was not UTF-8); ``\\uNNNN`` /
    ``\\UNNNNNNNN`` is a Unicode character (C1 controls, bidi overrides, zero-width characters, ...).
    Backslashes are left alone so Windows paths stay readable: the text form is for eyes, the JSON form is
    exact.
    """
    if text.isprintable():
        return text
    return _UNSAFE.sub(_escape_char, text)


# --- event formatting ------------------------------------------------------------------------------------------


def _exit_code(code: int) -> int | None:
    return None if code == EXIT_CODE_UNKNOWN else code


def _local_clock(filetime: int) -> str:
    return filetime_to_datetime(filetime).astimezone().strftime("%H:%M:%S.%f")[:-3]


def _iso_utc(filetime: int) -> str:
    return filetime_to_datetime(filetime).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_event(event: Event) -> str:
    """One line of ``etwmon tail`` text output: local time, record type, ``key=value`` fields, the command
    line last (escaped). A RecordsLost record is a WARNING line with the count."""
    when = _local_clock(event.filetime)
    if isinstance(event, ProcessCreate):  # ProcessExec too
        return (f"{when} {event.type.name:<13} pid={event.pid} ppid={event.parent_pid} "
                f"cmd={escape_text(event.command_line)}")
    if isinstance(event, ProcessExit):
        code = _exit_code(event.exit_code)
        return f"{when} {'ProcessExit':<13} pid={event.pid} code={'?' if code is None else code}"
    if isinstance(event, ThreadExit):
        code = _exit_code(event.exit_code)
        return f"{when} {'ThreadExit':<13} tid={event.tid} pid={event.pid} code={'?' if code is None else code}"
    if isinstance(event, ThreadCreate):
        return f"{when} {'ThreadCreate':<13} tid={event.tid} pid={event.pid}"
    if isinstance(event, ImageLoad):
        return (f"{when} {'ImageLoad':<13} pid={event.pid} address=0x{event.load_address:x} "
                f"size={event.image_size} image={escape_text(event.image_name)}")
    if isinstance(event, RecordsLost):
        return f"{when} WARNING: {event.count} records lost here (ring full or source overrun)"
    if isinstance(event, UnknownRecord):
        return f"{when} {'Unknown':<13} item_type={event.item_type} size={len(event.data)}"
    return f"{when} {escape_text(repr(event))}"


def _json_text(text: str) -> tuple[str, str | None]:
    """(valid Unicode text, None), or when ``text`` holds bytes that are not UTF-8: (the text with U+FFFD in
    their place, base64 of the exact bytes). jq turns lone-surrogate escapes into U+FFFD, so they can't carry
    the bytes."""
    try:
        text.encode("utf-8")
        return text, None
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the original bytes (os.fsdecode on Linux)
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")  # broken UTF-16 from Windows: kept as WTF-8
    return raw.decode("utf-8", "replace"), base64.b64encode(raw).decode("ascii")


def _put_text(obj: dict, key: str, text: str) -> None:
    obj[key], exact = _json_text(text)
    if exact is not None:
        obj[key + "_base64"] = exact


def event_to_json(event: Event) -> dict:
    """The JSON object of one event (field names are documented in docs/cli.md and stable)."""
    obj: dict = {"type": event.type.name, "time": _iso_utc(event.filetime)}
    if isinstance(event, ProcessCreate):
        obj.update(pid=event.pid, parent_pid=event.parent_pid, creating_pid=event.creating_pid,
                   creating_tid=event.creating_tid)
        _put_text(obj, "command_line", event.command_line)
        obj["truncated"] = event.truncated
    elif isinstance(event, ProcessExit):
        obj.update(pid=event.pid, exit_code=_exit_code(event.exit_code))
    elif isinstance(event, ThreadExit):
        obj.update(tid=event.tid, pid=event.pid, exit_code=_exit_code(event.exit_code))
    elif isinstance(event, ThreadCreate):
        obj.update(tid=event.tid, pid=event.pid)
    elif isinstance(event, ImageLoad):
        # A string: jq reads numbers as doubles, which cannot hold every 64-bit address.
        obj.update(pid=event.pid, image_size=event.image_size, load_address=f"0x{event.load_address:x}")
        _put_text(obj, "image_name", event.image_name)
    elif isinstance(event, RecordsLost):
        obj["count"] = event.count
    elif isinstance(event, UnknownRecord):
        obj.update(type="Unknown", item_type=event.item_type,
                   data_base64=base64.b64encode(event.data).decode("ascii"))
    return obj


def _json_line(event: Event) -> str:
    # ensure_ascii: the line is pure ASCII, so no control character (not even DEL or C1) reaches a terminal.
    return json.dumps(event_to_json(event), ensure_ascii=True, separators=(",", ":"))


# --- filters ---------------------------------------------------------------------------------------------------

_PROCESS = frozenset({ItemType.ProcessCreate, ItemType.ProcessExec, ItemType.ProcessExit})
_THREAD = frozenset({ItemType.ThreadCreate, ItemType.ThreadExit})
#: --type names (compared without case, "_" or "-") and the record types they select.
EVENT_TYPE_NAMES: dict[str, frozenset[ItemType]] = {
    **{t.name.lower(): frozenset({t}) for t in (_PROCESS | _THREAD | {ItemType.ImageLoad})},
    "create": frozenset({ItemType.ProcessCreate}),
    "exec": frozenset({ItemType.ProcessExec}),
    "exit": frozenset({ItemType.ProcessExit}),
    "process": _PROCESS,
    "thread": _THREAD,
    "image": frozenset({ItemType.ImageLoad}),
}


def parse_event_types(spec: str) -> frozenset[ItemType]:
    """``"process_create,exec"`` → the record types; ``ValueError`` naming the choices on an unknown name."""
    selected: set[ItemType] = set()
    for word in spec.split(","):
        key = word.strip().lower().replace("_", "").replace("-", "")
        if not key:
            continue
        if key not in EVENT_TYPE_NAMES:
            raise ValueError(f"unknown event type {word.strip()!r}; choose from "
                             + ", ".join(_type_choices()))
        selected |= EVENT_TYPE_NAMES[key]
    if not selected:
        raise ValueError("no event type given; choose from " + ", ".join(_type_choices()))
    return frozenset(selected)


def _type_choices() -> list[str]:
    snake = [re.sub(r"(?<!^)(?=[A-Z])", "_", t.name).lower()
             for t in sorted(_PROCESS | _THREAD | {ItemType.ImageLoad})]
    return snake + ["create", "exec", "exit", "process", "thread", "image"]


class EventFilter:
    """Which events ``etwmon tail`` prints. A RecordsLost report always passes: loss is never hidden.

    - ``types``: record types to show (None: all).
    - ``pids``: only events of these processes (ProcessCreate of the pid itself, its exec, exit, threads,
      image loads); with ``descendants``, processes they create join the set, followed live through the
      ProcessCreate parent links. A process leaves the set when it exits (pids get reused).
    - ``substrings`` / ``globs``: only processes whose command line contains a substring or matches an
      ``fnmatch`` glob (case-sensitive, whole command line). A ProcessCreate/ProcessExec is tested itself;
      the later events of a matching process (exit, threads, image loads) pass too, until an exec to a
      command line that does not match.

    Filters combine with AND; repeated values of one filter with OR. The tracking sees every event, so
    ``--type exit --match nginx`` shows the exits of processes started as nginx.
    """

    def __init__(self, types: Iterable[ItemType] | None = None, pids: Iterable[int] | None = None,
                 descendants: bool = False, substrings: Sequence[str] = (), globs: Sequence[str] = ()) -> None:
        self.types = frozenset(types) if types is not None else None
        self.followed: set[int] | None = set(pids) if pids is not None else None
        self.descendants = descendants
        self._substrings = list(substrings)
        self._globs = [re.compile(fnmatch.translate(g), re.DOTALL) for g in globs]
        self.matched: set[int] | None = set() if (self._substrings or self._globs) else None

    def _command_line_matches(self, command_line: str) -> bool:
        return (any(s in command_line for s in self._substrings)
                or any(g.match(command_line) for g in self._globs))

    def __call__(self, event: Event) -> bool:
        kind = event.type
        if kind == ItemType.RecordsLost:
            return True
        pid = getattr(event, "pid", None)
        keep = True
        followed = self.followed
        if followed is not None:
            if self.descendants and kind == ItemType.ProcessCreate and event.parent_pid in followed:
                followed.add(pid)
            keep = pid in followed
            if kind == ItemType.ProcessExit and keep and pid is not None:
                followed.discard(pid)
        matched = self.matched
        if matched is not None:
            if isinstance(event, ProcessCreate):
                if self._command_line_matches(event.command_line):
                    matched.add(event.pid)
                else:
                    matched.discard(event.pid)
                    keep = False
            else:
                hit = pid in matched
                if kind == ItemType.ProcessExit and hit:
                    matched.discard(pid)
                keep = keep and hit
        if self.types is not None and kind not in self.types:
            return False
        return keep


# --- options ---------------------------------------------------------------------------------------------------


class UsageError(Exception):
    """A bad option or environment value: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the fix, not the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _whole_number(text: str, what: str, minimum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise UsageError(f"{what} must be a whole number, not {text!r}") from None
    if value < minimum:
        raise UsageError(f"{what} must be at least {minimum}, not {value}")
    return value


_SIZE = re.compile(r"\s*(\d[\d_]*)\s*(?:([kmg])(?:i?b)?|b)?\s*", re.IGNORECASE)
_UNITS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _byte_size(text: str, what: str, minimum: int) -> int:
    match = _SIZE.fullmatch(text)
    if match is None:
        raise UsageError(f"{what} must be a size in bytes such as 65536, 512K or 64M, not {text!r}")
    value = int(match.group(1)) * _UNITS[match.group(2) and match.group(2).lower()]
    if value < minimum:
        raise UsageError(f"{what} must be at least {minimum} bytes (64K: one largest record), not {value}")
    return value


def _limits(args: argparse.Namespace, environ: dict[str, str]) -> tuple[int | None, int | None]:
    """The ring's caps: the option, else the environment variable, else the Monitor's default (None)."""
    if args.max_items is not None:
        items: int | None = _whole_number(args.max_items, "--max-items", 1)
    elif environ.get(ENV_MAX_ITEMS, "").strip():
        items = _whole_number(environ[ENV_MAX_ITEMS], ENV_MAX_ITEMS, 1)
    else:
        items = None
    if args.max_bytes is not None:
        size: int | None = _byte_size(args.max_bytes, "--max-bytes", MIN_MAX_BYTES)
    elif environ.get(ENV_MAX_BYTES, "").strip():
        size = _byte_size(environ[ENV_MAX_BYTES], ENV_MAX_BYTES, MIN_MAX_BYTES)
    else:
        size = None
    return items, size


def _positive_pid(text: str) -> int:
    return _whole_number(text, "--pid", 1)


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise UsageError(f"--socket-mode must be octal permission bits such as 0660, not {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise UsageError(f"--socket-mode must be from 0000 to 0777, not {text}")
    return mode


def _uid(text: str) -> int:
    import pwd

    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        if text.isdigit():
            return int(text)
        raise UsageError(f"--allow-uid: no user named {text!r}") from None


def _gid(text: str) -> int:
    import grp

    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        if text.isdigit():
            return int(text)
        raise UsageError(f"--allow-gid: no group named {text!r}") from None


def _build_parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Watch processes and threads start and stop (SysMon-style records).")
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {__version__} (Python {sys.version.split()[0]}, {sys.platform})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    tail = commands.add_parser(
        "tail", help="print events as they happen (Ctrl-C to stop)",
        description="Print process and thread events as they happen, until Ctrl-C (exit 0, summary on stderr).",
        epilog=f"Environment: {ENV_MAX_ITEMS}, {ENV_MAX_BYTES} set the ring caps when the options are not "
               "given. Reference: docs/cli.md.")
    tail.add_argument("--source", default="auto", choices=["auto", *SOURCES],
                      help="event source (default: auto, the best that works here; see 'etwmon sources')")
    tail.add_argument("--json", action="store_true",
                      help="one JSON object per line (ASCII, UTC ISO-8601 times) instead of text")
    tail.add_argument("--type", dest="types", action="append", metavar="TYPES",
                      help="only these event types, comma-separated: process_create, process_exec, process_exit, "
                           "thread_create, thread_exit, image_load, or create, exec, exit, process, thread, image")
    tail.add_argument("--pid", dest="pids", action="append", type=_positive_pid, metavar="PID",
                      help="only events of this process (repeatable)")
    tail.add_argument("--descendants", action="store_true",
                      help="with --pid: also the processes it creates, and theirs, followed live")
    tail.add_argument("--match", dest="substrings", action="append", default=[], metavar="TEXT",
                      help="only processes whose command line contains TEXT (repeatable: any)")
    tail.add_argument("--glob", dest="globs", action="append", default=[], metavar="PATTERN",
                      help="only processes whose whole command line matches the glob PATTERN (repeatable: any)")
    tail.add_argument("--max-items", metavar="N",
                      help=f"ring capacity in records (default: ${ENV_MAX_ITEMS}, else 10000)")
    tail.add_argument("--max-bytes", metavar="SIZE",
                      help=f"ring capacity in bytes, e.g. 64M (default: ${ENV_MAX_BYTES}, else 1 KiB per record)")
    tail.add_argument("--batch-wait", type=float, default=DEFAULT_BATCH_WAIT, metavar="SECONDS",
                      help="when events arrive, wait this long for more before printing them: fewer wake-ups, "
                           f"less CPU (default: {DEFAULT_BATCH_WAIT}; 0 prints each at once)")
    tail.add_argument("--stats", action="store_true",
                      help="print a status line (rate, ring fill, lost, dropped) on stderr periodically")
    tail.add_argument("--stats-interval", type=float, default=5.0, metavar="SECONDS",
                      help="seconds between --stats lines (default: 5)")

    serve = commands.add_parser(
        "serve", help="run as the service: one event source, served to clients on a Unix socket",
        description="Run in the foreground as the etwmon service (fit for systemd: logs on stderr, SIGTERM "
                    "stops, SIGHUP re-opens the log file, READY=1 to $NOTIFY_SOCKET). Clients read with "
                    "'etwmon tail --connect' or etwmon.connect().",
        epilog="Reference: docs/service.md.")
    serve.add_argument("--socket", metavar="PATH", help="the socket to listen on (default: "
                       "/run/etwmon/etwmon.sock, in a root-only directory etwmon creates)")
    serve.add_argument("--source", default="auto", choices=["auto", *SOURCES],
                       help="event source (default: auto, the best that works here)")
    serve.add_argument("--max-items", metavar="N",
                       help=f"the source's ring capacity in records (default: ${ENV_MAX_ITEMS}, else 100000)")
    serve.add_argument("--max-bytes", metavar="SIZE",
                       help=f"the source's ring capacity in bytes (default: ${ENV_MAX_BYTES}, else 1 KiB per record)")
    serve.add_argument("--group", metavar="NAME", help="the group that owns the socket and may read events")
    serve.add_argument("--socket-mode", metavar="OCTAL", type=_octal_mode,
                       help="the socket's permission bits (default: 0600, or 0660 with --group)")
    serve.add_argument("--allow-uid", dest="allow_uids", action="append", default=[], type=_uid, metavar="USER",
                       help="a user (name or uid) allowed to read, besides root (repeatable)")
    serve.add_argument("--allow-gid", dest="allow_gids", action="append", default=[], type=_gid, metavar="GROUP",
                       help="a group (name or gid) whose members may read (repeatable)")
    serve.add_argument("--max-clients", type=lambda t: _whole_number(t, "--max-clients", 1), default=64,
                       metavar="N", help="connections at most; the next is refused (default: 64)")
    serve.add_argument("--client-max-items", type=lambda t: _whole_number(t, "--client-max-items", 1),
                       default=100_000, metavar="N", help="the largest queue a client may ask for, in records "
                       "(default: 100000)")
    serve.add_argument("--client-max-bytes", type=lambda t: _byte_size(t, "--client-max-bytes", MIN_MAX_BYTES),
                       default=16 << 20, metavar="SIZE",
                       help="the largest queue a client may ask for, in bytes (default: 16M)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="the least severe messages logged (default: info: also every connect/disconnect)")
    serve.add_argument("--log-file", metavar="PATH", help="also log to this file (SIGHUP re-opens it)")

    sources = commands.add_parser("sources", help="which event sources work here, and why the others don't",
                                  description="List the event sources, whether each works on this machine "
                                              "(and if not, why), what it delivers and whether it can miss "
                                              "events.")
    sources.add_argument("--json", action="store_true", help="one JSON object per source per line")
    return parser


# --- output plumbing -----------------------------------------------------------------------------------------


def _silence_stdout() -> None:
    """The reader went away: point stdout at /dev/null so the interpreter's final flush has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _say(err: TextIO, message: str) -> None:
    try:
        err.write(f"{PROG}: {message}\n")
        err.flush()
    except (OSError, ValueError):
        pass


class _Waiter:
    """Block until the monitor has records, a timeout passes, or stdout's reader is gone.

    ``poll`` sees POLLERR on a pipe whose reader closed, so ``etwmon tail | head -n 1`` ends as soon as head
    exits, even when no further event comes to fail a write. Without ``poll`` (Windows): ``Monitor.wait``.
    """

    def __init__(self, monitor, out: TextIO, batch_wait: float = 0.0) -> None:
        self._monitor = monitor
        self._batch_wait = batch_wait
        self._poll = select.poll() if hasattr(select, "poll") else None
        self._out_fd = -1
        if self._poll is None:
            return
        self._poll.register(monitor.fileno(), select.POLLIN)
        try:
            fd = out.fileno()
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                self._poll.register(fd, 0)  # POLLERR/POLLHUP are always reported
                self._out_fd = fd
        except (OSError, ValueError, AttributeError):
            pass

    def wait(self, timeout: float | None) -> None:
        if self._poll is None:
            self._monitor.wait(timeout)
        else:
            ms = None if timeout is None else max(0, int(timeout * 1000))
            for fd, flags in self._poll.poll(ms):
                if fd == self._out_fd and flags & (select.POLLERR | select.POLLHUP):
                    raise BrokenPipeError("the reader of stdout went away")
        if self._batch_wait and self._monitor.ring.readable():
            # Records are there: give the ones right behind them a moment to join the batch. One wake-up per
            # batch instead of per event halves the CPU in a storm; the source keeps reading the kernel meanwhile.
            _sleep(self._batch_wait)


class _Signals:
    """SIGINT, SIGTERM and SIGHUP end ``etwmon tail`` cleanly (the source releases what it set up in the
    kernel, e.g. audit rules). While a batch is being read and written the signal is held until the batch is
    out (so JSON output never ends in half a line); a second signal does not wait. A signal the caller set to
    be ignored (``nohup``, a background job) stays ignored."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self) -> None:
        self.holding = False
        self.pending = False
        self._installed: list[int] = []

    def handler(self, signum: int, frame: object) -> None:
        if self.holding and not self.pending:
            self.pending = True
            return
        raise KeyboardInterrupt

    def install(self) -> None:
        for name in self.NAMES:
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
                signal.signal(number, self.handler)
                self._installed.append(number)

    def ignore(self) -> None:
        for number in self._installed:
            signal.signal(number, signal.SIG_IGN)

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        if self.pending:
            raise KeyboardInterrupt


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --- commands --------------------------------------------------------------------------------------------------


def _tail(args: argparse.Namespace, out: TextIO, err: TextIO, environ: dict[str, str]) -> int:
    from .monitor import Monitor  # here, so `etwmon sources` and --help stay light

    max_items, max_bytes = _limits(args, environ)
    if args.descendants and not args.pids:
        raise UsageError("--descendants needs --pid (whose descendants to follow)")
    if not 0 <= args.batch_wait <= MAX_BATCH_WAIT:
        raise UsageError(f"--batch-wait must be from 0 to {MAX_BATCH_WAIT:g} seconds (the ring fills meanwhile), "
                         f"not {args.batch_wait}")
    if not args.stats_interval > 0:
        raise UsageError(f"--stats-interval must be more than 0 seconds, not {args.stats_interval}")
    types = None
    if args.types:
        try:
            types = parse_event_types(",".join(args.types))
        except ValueError as exc:
            raise UsageError(f"--type: {exc}") from None
    keep = EventFilter(types=types, pids=args.pids, descendants=args.descendants,
                       substrings=args.substrings, globs=args.globs)
    render: Callable[[Event], str] = _json_line if args.json else format_event

    signals = _Signals()
    signals.install()
    try:
        monitor = Monitor(source=args.source, max_items=10_000 if max_items is None else max_items,
                          max_bytes=max_bytes)
    except (MemoryError, ValueError) as exc:
        raise UsageError(f"cannot make a ring of {max_items} records / {max_bytes} bytes: {exc}") from None
    shown = 0
    how_it_ended = "stopped"
    buf = bytearray(_READ_SIZE)
    view = memoryview(buf)

    def show_batch() -> int:
        nonlocal shown
        n = monitor.readinto(buf)
        if n:
            events = [event for event in parse(view[:n]) if keep(event)]
            if events:
                out.write("\n".join(map(render, events)))
                out.write("\n")
                out.flush()
                shown += sum(event.type != ItemType.RecordsLost for event in events)
        return n

    try:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                monitor.start()
            for warning in caught:
                _say(err, f"warning: {warning.message}")
            source = monitor.source
            ring = monitor.ring
            if source.lossy:
                _say(err, f"warning: the {source.name} source polls and can miss short-lived processes "
                          "without counting them")
            # Last of the start-up lines: from here on every event is seen (scripts may wait for it).
            _say(err, f"watching (source: {source.name}, ring: {ring.max_items} records / "
                      f"{_human_bytes(ring.max_bytes)}); Ctrl-C to stop")

            waiter = _Waiter(monitor, out, args.batch_wait)
            interval = args.stats_interval if args.stats else None
            next_stats = time.monotonic() + interval if interval else None
            last = (time.monotonic(), 0)
            while True:
                signals.hold()
                n = show_batch()
                signals.release()
                if next_stats is not None and time.monotonic() >= next_stats:
                    last = _print_stats(err, monitor, shown, last)
                    next_stats = time.monotonic() + interval
                if n:
                    continue
                if not monitor.running:
                    how_it_ended = "the source stopped"
                    break
                waiter.wait(None if next_stats is None else max(0.0, next_stats - time.monotonic()))
        except KeyboardInterrupt:
            signals.ignore()
            # Stop the source, then show what it had captured up to then: the summary's counts cover all of it.
            monitor.stop()
            while show_batch():
                pass
    except BrokenPipeError:
        signals.ignore()
        _silence_stdout()
        monitor.close()
        return EXIT_OK
    except BaseException:
        signals.ignore()
        monitor.close()
        raise
    monitor.close()
    stats = monitor.stats
    unread = f", {stats.items} unread" if stats.items else ""
    _say(err, f"{how_it_ended}: {stats.read} records, {shown} shown, {stats.lost} lost, "
              f"{stats.dropped} dropped{unread}")
    return EXIT_OK


def _print_stats(err: TextIO, monitor, shown: int, last: tuple[float, int]) -> tuple[float, int]:
    now = time.monotonic()
    stats = monitor.stats
    then, pushed_then = last
    rate = (stats.pushed - pushed_then) / max(now - then, 1e-9)
    fill = max(stats.items / stats.max_items, stats.bytes / stats.max_bytes) * 100
    parse_errors = f", {stats.parse_errors} parse errors" if stats.parse_errors else ""
    _say(err, f"stats: {stats.pushed} records ({rate:.1f}/s), ring {stats.items}/{stats.max_items} records "
              f"{_human_bytes(stats.bytes)} ({fill:.0f}% full), {stats.lost} lost, {stats.dropped} dropped, "
              f"{shown} shown{parse_errors}")
    return now, stats.pushed


def _serve(args: argparse.Namespace, err: TextIO, environ: dict[str, str]) -> int:
    from .monitor import Monitor
    from .service import DEFAULT_SOCKET, Server, ServerLimits
    from .service.daemon import run, setup_logging

    max_items, max_bytes = _limits(args, environ)
    file_handler = setup_logging(args.log_level, args.log_file)
    try:
        monitor = Monitor(source=args.source, max_items=100_000 if max_items is None else max_items,
                          max_bytes=max_bytes)
    except (MemoryError, ValueError) as exc:
        raise UsageError(f"cannot make a ring of {max_items} records / {max_bytes} bytes: {exc}") from None
    server = Server(monitor, args.socket or DEFAULT_SOCKET, socket_mode=args.socket_mode, group=args.group,
                    allow_uids=args.allow_uids, allow_gids=args.allow_gids,
                    limits=ServerLimits(max_clients=args.max_clients, client_max_items=args.client_max_items,
                                        client_max_bytes=args.client_max_bytes))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.start()
    for warning in caught:
        _say(err, f"warning: {warning.message}")
    try:
        server.open()
        return run(server, file_handler)
    finally:
        server.close()
        monitor.close()


def _auto_choice(infos: list) -> str | None:
    """The source ``--source auto`` would pick here: the first available one in the picker's order."""
    from .sources import auto_order

    available = {info.name for info in infos if info.available}
    return next((name for name in auto_order() if name in available), None)


def _sources(args: argparse.Namespace, out: TextIO) -> int:
    infos = available_sources()
    auto = _auto_choice(infos)
    if args.json:
        for info in infos:
            out.write(json.dumps({"name": info.name, "available": info.available, "reason": info.reason,
                                  "lossy": info.lossy, "delivers": sorted(info.delivers),
                                  "auto": info.name == auto}) + "\n")
        out.flush()
        return EXIT_OK
    width = max(len(info.name) for info in infos)
    for info in infos:
        mark = "*" if info.name == auto else " "
        works = "works" if info.available else "no   "
        exact = "lossy" if info.lossy else "exact"
        delivers = ", ".join(sorted(info.delivers)) or "-"
        out.write(f"{mark} {info.name:<{width}}  {works}  {exact}  delivers: {delivers}\n")
        if not info.available:
            out.write(f"  {'':<{width}}  why not: {escape_text(info.reason or 'unknown')}\n")
    out.write("* = what --source auto picks here" if auto else "no source works here")
    out.write("; lossy = can miss events without counting them\n")
    out.flush()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The ``etwmon`` console script. Returns the exit status: 0 ok, 1 runtime error, 2 usage error."""
    out, err = sys.stdout, sys.stderr
    for stream in (out, err):
        try:  # text output of odd characters must not crash on a non-UTF-8 locale
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    try:
        args = _build_parser().parse_args(argv)
        if args.command == "sources":
            return _sources(args, out)
        if args.command == "serve":
            return _serve(args, err, dict(os.environ))
        return _tail(args, out, err, dict(os.environ))
    except UsageError as exc:
        _say(err, f"error: {exc}")
        return EXIT_USAGE
    except SourceUnavailable as exc:
        _say(err, f"error: {exc}")
        return EXIT_RUNTIME
    except SourceError as exc:
        cause = exc.__cause__
        _say(err, f"error: {exc}" if cause is None else f"error: the event source failed: {cause}")
        return EXIT_RUNTIME
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_OK
    except ImportError as exc:  # a source module that cannot load here
        _say(err, f"error: the {getattr(args, 'source', '?')} source cannot be loaded: {exc}")
        return EXIT_RUNTIME
    except PermissionError as exc:
        _say(err, f"error: {exc.strerror or exc}: run as root (or Administrator), or use --source procfs")
        return EXIT_RUNTIME
    except (Error, OSError) as exc:
        _say(err, f"error: {exc}")
        return EXIT_RUNTIME
    except KeyboardInterrupt:  # before the monitor started (e.g. while argparse ran)
        return EXIT_OK
