"""The ``etwmon`` command line: argument parsing and wiring. ``etwmon tail`` prints process and thread events as
they happen (text for people, JSON lines for jq), ``etwmon serve`` runs the service that serves them on a Unix
socket, ``etwmon sources`` says which event sources work on this machine and why not.

Usage reference: docs/cli.md. How an event looks lives in ``etwmon.formats``, which events pass in
``etwmon.filters``, the tail loop (over any ``etwmon.tail.Reader``) in ``etwmon.tail``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import socket
import sys
from typing import Any, Callable, NoReturn, Sequence, TextIO

from . import __version__
from .errors import Error, RecordingFormatError, SourceError, SourceUnavailable
from .filters import DEFAULT_EVENT_TYPES, EventFilter, parse_event_types
from .cli_options import UsageError, add_capture_options, add_identity_option, hash_algorithms, image_load_option
from .formats import RENDERERS, escape_text, host_renderer, human_bytes
from .records import ItemType
from .ring import DEFAULT_BYTES_PER_ITEM
from .sources import SOURCES, available_sources
from .tail import PROG, Reader, TailOptions, say, silence_stdout, tail

__all__ = ["main", "ENV_MAX_ITEMS", "ENV_MAX_BYTES"]

#: Environment variables that set the ring's caps (an option on the command line wins).
ENV_MAX_ITEMS = "ETWMON_MAX_ITEMS"
ENV_MAX_BYTES = "ETWMON_MAX_BYTES"
#: The smallest --max-bytes: one largest record (Size is a USHORT) must fit, or the source would fail on it.
MIN_MAX_BYTES = 0x10000
DEFAULT_MAX_ITEMS = 10_000
SHIP_MAX_ITEMS = 100_000
#: The service's source ring: it feeds every client, so it gets room for a burst while the server is busy.
DEFAULT_SERVE_MAX_ITEMS = 100_000
#: ``tail --batch-wait``: how long to gather events behind the first before printing (a person does not see
#: 10 ms; a storm costs about half the CPU), and the most it may be (the ring keeps filling meanwhile).
DEFAULT_BATCH_WAIT = 0.01
MAX_BATCH_WAIT = 1.0
#: The longest ``--stats-interval``: a day (a longer wait is a mistake, not a wish).
MAX_STATS_INTERVAL = 86400.0

EXIT_OK, EXIT_RUNTIME, EXIT_USAGE = 0, 1, 2


# --- options: each value is checked once, by its argparse ``type=`` callable --------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the fix, not the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _whole_number(minimum: int) -> Callable[[str], int]:
    def whole_number(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value
    return whole_number


_SIZE = re.compile(r"\s*(\d[\d_]*)\s*(?:([kmg])(?:i?b)?|b)?\s*", re.IGNORECASE)
_UNITS = {None: 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _byte_size(text: str) -> int:
    match = _SIZE.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"must be a size in bytes such as 65536, 512K or 64M, not {text!r}")
    value = int(match.group(1)) * _UNITS[match.group(2) and match.group(2).lower()]
    if value < MIN_MAX_BYTES:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_MAX_BYTES} bytes (64K: one largest record), "
                                         f"not {value}")
    return value


def _seconds(low: float, high: float, low_allowed: bool) -> Callable[[str], float]:
    """A number of seconds from ``low`` (included when ``low_allowed``) to ``high``: finite, so every later
    deadline and poll timeout is a real number."""
    span = f"from {low:g} to {high:g} seconds" if low_allowed else f"more than {low:g} and at most {high:g} seconds"

    def seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number of seconds ({span}), not {text!r}") from None
        if not (math.isfinite(value) and (low <= value if low_allowed else low < value) and value <= high):
            raise argparse.ArgumentTypeError(f"must be {span}, not {text}")
        return value
    return seconds


def _event_types(text: str) -> frozenset[ItemType]:
    try:
        return parse_event_types(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _from_environment(environ: dict[str, str], name: str, convert: Callable[[str], int]) -> int | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        return convert(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"{name} {exc}") from None


def _limits(args: argparse.Namespace, environ: dict[str, str]) -> tuple[int | None, int | None]:
    """The ring's caps: the option, else the environment variable, else the Monitor's default (None)."""
    items = args.max_items if args.max_items is not None else \
        _from_environment(environ, ENV_MAX_ITEMS, _whole_number(1))
    size = args.max_bytes if args.max_bytes is not None else _from_environment(environ, ENV_MAX_BYTES, _byte_size)
    return items, size


def _fleet_type(name: str, then: Callable[[Any], Any] = lambda value: value) -> Callable[[str], Any]:
    """An argparse type made of the fleet wire contract's own check ``name`` (loaded when it is used): what it
    refuses is a usage error with its message."""
    def convert(text: str) -> Any:
        from .fleet import wire

        try:
            return then(getattr(wire, name)(text))
        except (wire.FleetError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


_host_id = _fleet_type("check_host_id")
_nats_url = _fleet_type("check_server_url")
_since = _fleet_type("parse_since", lambda since: since or "all")
_duration = _fleet_type("parse_duration")


def _nats_options(command: argparse.ArgumentParser) -> None:
    """What ``ship`` and ``tail --from`` share: the stream and where the credentials are."""
    command.add_argument("--stream", default="ETWMON", metavar="NAME", help="JetStream stream (default: ETWMON)")
    command.add_argument("--auth-file", metavar="FILE",
                         help="NATS credentials as ETWMON_NATS_*=value lines, mode 600 (default: "
                              "$ETWMON_NATS_AUTH_FILE, else the ETWMON_NATS_* environment variables)")


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be octal permission bits such as 0660, not {text!r}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"must be from 0000 to 0777, not {text}")
    return mode


def _group_name(text: str) -> str:
    from .service.install import group_name

    try:
        return group_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _account(kind: str) -> Callable[[str], int]:
    """A user (``kind="user"``) or group name, or a number, as its id."""
    def account_id(text: str) -> int:
        import grp
        import pwd

        try:
            return pwd.getpwnam(text).pw_uid if kind == "user" else grp.getgrnam(text).gr_gid
        except KeyError:
            if text.isdigit():
                return int(text)
            raise argparse.ArgumentTypeError(f"no {kind} named {text!r}") from None
    return account_id


def _build_parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Watch processes and threads start and stop (SysMon-style records).")
    parser.add_argument("--version", action="version",
                        version=f"{PROG} {__version__} (Python {sys.version.split()[0]}, {sys.platform})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    tail_ = commands.add_parser(
        "tail", help="print events as they happen (Ctrl-C to stop)",
        description="Print process events (threads too with --type all) as they happen, until Ctrl-C (exit 0, "
                    "summary on stderr).",
        epilog=f"Environment: {ENV_MAX_ITEMS}, {ENV_MAX_BYTES} set the ring caps when the options are not "
               "given. Reference: docs/cli.md.")
    tail_.add_argument("--source", default="auto", choices=["auto", *SOURCES],
                       help="event source (default: auto: the etwmon service's socket when one is there and you "
                            "are not root, else the best source that works here; see 'etwmon sources')")
    tail_.add_argument("--connect", metavar="PATH", nargs="?", const=_default_socket(),
                       help="read from the etwmon service at the socket PATH (default: $ETWMON_SOCKET, else "
                            "/run/etwmon/etwmon.sock) instead of a source of its own; --type, --pid, --match, --glob "
                            "then filter in the service")
    tail_.add_argument("--no-identity", dest="identity", action="store_false",
                       help="the book's records only: no ProcessGuid, user, image or parent fields (less CPU per event)")
    add_identity_option(tail_)
    tail_.add_argument("--json", action="store_true",
                       help="one JSON object per line (ASCII, UTC ISO-8601 times) instead of text: --format json")
    tail_.add_argument("--format", choices=sorted(RENDERERS), default=None,
                       help="text (default: one line per event, its date and time in ISO-8601 UTC, e.g. "
                            "2026-12-06T23:17:12.123Z), json, or ecs (Elastic Common Schema documents, one per line)")
    tail_.add_argument("--from", dest="servers", action="append", metavar="URL", type=_nats_url,
                       help="read the fleet's events from NATS JetStream at nats://HOST:PORT instead of a local "
                            "source (repeat for a cluster's servers); see docs/fleet.md")
    tail_.add_argument("--replay", metavar="FILE",
                       help="read the events of a recording ('etwmon record') instead of a live source; every "
                            "filter and format applies (docs/recording.md)")
    tail_.add_argument("--host", dest="hosts", action="append", type=_host_id, metavar="NAME",
                       help="with --from: only this host's events (repeatable)")
    tail_.add_argument("--since", type=_since, metavar="TIME",
                       help="with --from: replay from TIME (10m, 2h, 1d, an ISO-8601 time, or all) instead of "
                            "starting with what arrives from now on")
    tail_.add_argument("--durable", metavar="NAME",
                       help="with --from: a consumer name the server remembers, to continue where it stopped")
    _nats_options(tail_)
    tail_.add_argument("--type", dest="types", action="append", type=_event_types, metavar="TYPES",
                       help="only these event types, comma-separated: process_create, process_exec, process_exit, "
                            "thread_create, thread_exit, image_load, or create, exec, exit, process, thread, image, "
                            "all (default: process, i.e. create, exec and exit; --type process,thread adds threads; "
                            "image loads are read only when asked for: image, image_load or all)")
    tail_.add_argument("--pid", dest="pids", action="append", type=_whole_number(1), metavar="PID",
                       help="only events of this process (repeatable)")
    tail_.add_argument("--descendants", action="store_true",
                       help="with --pid: also the processes it creates, and theirs, followed live")
    tail_.add_argument("--match", dest="substrings", action="append", default=[], metavar="TEXT",
                       help="only processes whose command line contains TEXT (repeatable: any)")
    tail_.add_argument("--glob", dest="globs", action="append", default=[], metavar="PATTERN",
                       help="only processes whose whole command line matches the glob PATTERN (repeatable: any)")
    tail_.add_argument("--config", metavar="FILE",
                       help="a Sysmon XML configuration: only the processes its ProcessCreate/ProcessTerminate "
                            "rules keep, named by rule, command lines redacted (docs/rules.md; check it first "
                            "with 'etwmon rules check FILE')")
    tail_.add_argument("--hashes", type=hash_algorithms, metavar="ALGS",
                       help="the executable's hashes in each process record (and the file's in each image load), "
                            "Sysmon's form (MD5=...,SHA256=...): "
                            "md5, sha1, sha256 comma-separated, or * (default: the --config file's "
                            "<HashAlgorithms>, else none; docs/identity.md)")
    tail_.add_argument("--max-items", type=_whole_number(1), metavar="N",
                       help=f"ring capacity in records (default: ${ENV_MAX_ITEMS}, else {DEFAULT_MAX_ITEMS})")
    tail_.add_argument("--max-bytes", type=_byte_size, metavar="SIZE",
                       help=f"ring capacity in bytes, e.g. 64M (default: ${ENV_MAX_BYTES}, else 1 KiB per record)")
    tail_.add_argument("--batch-wait", type=_seconds(0, MAX_BATCH_WAIT, True), default=DEFAULT_BATCH_WAIT,
                       metavar="SECONDS",
                       help="when events arrive, wait this long for more before printing them: fewer wake-ups, "
                            f"less CPU (default: {DEFAULT_BATCH_WAIT}; 0 prints each at once)")
    tail_.add_argument("--stats", action="store_true",
                       help="print a status line (rate, ring fill, missed, dropped) on stderr periodically")
    tail_.add_argument("--stats-interval", type=_seconds(0, MAX_STATS_INTERVAL, False), default=5.0,
                       metavar="SECONDS", help="seconds between --stats lines (default: 5)")

    ship = commands.add_parser(
        "ship", help="send this host's events to a NATS JetStream server (Ctrl-C to stop)",
        description="Watch this host and publish its records, batch by batch, to etwmon.<host>.events on a "
                    "JetStream stream (made if absent). Records wait in the ring while the server is away.",
        epilog="Credentials: --auth-file or the ETWMON_NATS_* environment variables, never argv. "
               "Reference: docs/fleet.md.")
    ship.add_argument("--to", dest="servers", action="append", required=True, metavar="URL", type=_nats_url,
                      help="nats://HOST:PORT (or tls://); repeat for the servers of a cluster")
    ship.add_argument("--host-id", type=_host_id, metavar="NAME",
                      help="this host's name in the fleet (default: the hostname, dots made '_')")
    ship.add_argument("--source", default="auto", choices=["auto", *SOURCES], help="event source (default: auto)")
    ship.add_argument("--config", metavar="FILE",
                      help="a Sysmon XML configuration: ship only what its rules keep, command lines redacted "
                           "before they leave this host (docs/rules.md)")
    ship.add_argument("--max-items", type=_whole_number(1), metavar="N",
                      help=f"ring capacity in records (default: ${ENV_MAX_ITEMS}, else {SHIP_MAX_ITEMS}: the ring "
                           "holds the records while the server is away)")
    ship.add_argument("--max-bytes", type=_byte_size, metavar="SIZE",
                      help=f"ring capacity in bytes (default: ${ENV_MAX_BYTES}, else 1 KiB per record)")
    ship.add_argument("--retention-age", type=_duration, default=7 * 86400.0, metavar="AGE",
                      help="when making the stream: how long it keeps records, e.g. 12h, 7d (default: 7d)")
    ship.add_argument("--retention-bytes", type=_byte_size, default=1 << 30, metavar="SIZE",
                      help="when making the stream: the most it keeps, oldest dropped first (default: 1G)")
    ship.add_argument("--replicas", type=_whole_number(1), default=1, metavar="N",
                      help="when making the stream: copies in a cluster (default: 1)")
    ship.add_argument("--no-create-stream", action="store_true",
                      help="never make the stream (an administrator does; see docs/fleet.md)")
    ship.add_argument("--batch-wait", type=_seconds(0, MAX_BATCH_WAIT, True), default=DEFAULT_BATCH_WAIT,
                      metavar="SECONDS",
                      help=f"let a batch gather this long after its first record (default: {DEFAULT_BATCH_WAIT})")
    ship.add_argument("--stats", action="store_true",
                      help="print a status line (rate, ring fill, lost, dropped, sent) on stderr periodically")
    ship.add_argument("--stats-interval", type=_seconds(0, MAX_STATS_INTERVAL, False), metavar="SECONDS",
                      help="seconds between --stats lines (default: 5), and between the lines saying the server "
                           "is out of reach while it is (default: 30)")
    _nats_options(ship)

    sources = commands.add_parser("sources", help="which event sources work here, and why the others don't",
                                  description="List the event sources, whether each works on this machine "
                                              "(and if not, why), what it delivers and whether it can miss "
                                              "events.")
    sources.add_argument("--json", action="store_true", help="one JSON object per source per line")

    serve = commands.add_parser(
        "serve", help="run as the service: one event source, served to clients on a Unix socket",
        description="Run in the foreground as the etwmon service (fit for systemd: logs on stderr with levels, "
                    "SIGTERM stops, SIGHUP re-opens the log file, READY=1 to $NOTIFY_SOCKET). Clients read with "
                    "'etwmon tail --connect' or etwmon.connect().",
        epilog=f"Environment: {ENV_MAX_ITEMS}, {ENV_MAX_BYTES} set the source's ring caps when the options are "
               "not given. Reference: docs/service.md.")
    serve.add_argument("--socket", metavar="PATH", default=_default_socket(),
                       help="the socket to listen on (default: $ETWMON_SOCKET, else /run/etwmon/etwmon.sock, "
                            "in a root-only directory etwmon makes safely)")
    serve.add_argument("--source", default="auto", choices=["auto", *SOURCES],
                       help="event source (default: auto, the best that works here)")
    serve.add_argument("--max-items", type=_whole_number(1), metavar="N",
                       help=f"the source's ring capacity in records (default: ${ENV_MAX_ITEMS}, else "
                            f"{DEFAULT_SERVE_MAX_ITEMS})")
    serve.add_argument("--max-bytes", type=_byte_size, metavar="SIZE",
                       help=f"the source's ring capacity in bytes (default: ${ENV_MAX_BYTES}, else 1 KiB per "
                            "record)")
    serve.add_argument("--group", metavar="GROUP", type=_account("group"),
                       help="the group (name or gid) that owns the socket: its members may read events")
    serve.add_argument("--socket-mode", metavar="OCTAL", type=_octal_mode,
                       help="the socket's permission bits (default: 0600, or 0660 with --group)")
    serve.add_argument("--allow-uid", dest="allow_uids", action="append", default=[], type=_account("user"),
                       metavar="USER", help="a user (name or uid) allowed to read besides root (repeatable); "
                                            "checked with the peer's credentials")
    serve.add_argument("--allow-gid", dest="allow_gids", action="append", default=[], type=_account("group"),
                       metavar="GROUP", help="a group (name or gid) whose members may read (repeatable)")
    serve.add_argument("--max-clients", type=_whole_number(1), default=64, metavar="N",
                       help="connections at most; the next one is refused at once (default: 64)")
    serve.add_argument("--client-max-items", type=_whole_number(1), default=100_000, metavar="N",
                       help="the largest queue a client may have, in records (default: 100000)")
    serve.add_argument("--client-max-bytes", type=_byte_size, default=16 << 20, metavar="SIZE",
                       help="the largest queue a client may have, in bytes (default: 16M); clients' memory is "
                            "at most about --max-clients times this")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                       help="the least severe messages logged (default: info: also every connect and disconnect)")
    serve.add_argument("--log-file", metavar="PATH", help="also log to this file (SIGHUP re-opens it)")
    serve.add_argument("--config", metavar="FILE",
                       help="Sysmon-style rules (XML, see docs/rules.md) applied before any client sees an event; "
                            "SIGHUP reloads it (a refused file keeps the rules in force)")
    add_capture_options(serve, "serve")

    service = commands.add_parser("service", help="install the service as a systemd unit, or remove it",
                                  description="Install etwmon as a systemd service (as 'sysmon -i config.xml' does): "
                                              "a unit running this installation's 'etwmon serve', its readers' "
                                              "group, and systemd told; or remove all that. See docs/service.md.")
    service_commands = service.add_subparsers(dest="service_command", metavar="SUBCOMMAND", parser_class=_Parser)
    service_commands.required = True
    service_install = service_commands.add_parser(
        "install", help="write the unit, create the group, and (with systemd running) enable and start it",
        description="Write /etc/systemd/system/etwmon.service with ExecStart = this installation's etwmon, create "
                    "the group (unless it exists), then with systemd as PID 1 run 'systemctl daemon-reload' and "
                    "'systemctl enable --now etwmon'; without it, say what to run.")
    service_install.add_argument("--config", metavar="FILE", help="Sysmon-style rules for the service (checked now)")
    service_install.add_argument("--group", metavar="NAME", default="etwmon", type=_group_name,
                                 help="the group whose members may read events (default: etwmon)")
    service_uninstall = service_commands.add_parser(
        "uninstall", help="stop and disable the service, remove its unit, and the group install created")
    for sub in (service_install, service_uninstall):
        sub.add_argument("--dry-run", action="store_true", help="print what would be done (install: the unit), "
                                                                "change nothing")
        sub.add_argument("--unit-dir", metavar="DIR", default="/etc/systemd/system",
                         help="where the unit file goes (default: /etc/systemd/system)")

    commands.add_parser("cleanup", help="remove what killed etwmon instances left in the kernel, and restore it",
                        description="Remove what etwmon instances that were killed (kill -9) left in the kernel "
                                    "(audit rules, audit enabled, a raised backlog limit) and restore the state "
                                    "they recorded, without starting a monitor. What a running instance owns is "
                                    "left alone. 'etwmon sources' shows what there is.")

    rules = commands.add_parser("rules", help="Sysmon XML configurations: check what etwmon applies",
                                description="Work with Sysmon XML configurations (docs/rules.md).")
    rules_commands = rules.add_subparsers(dest="rules_command", metavar="SUBCOMMAND", parser_class=_Parser)
    rules_commands.required = True
    check = rules_commands.add_parser("check", help="what of FILE is applied, what is ignored and why, per rule",
                                      description="Load FILE as 'tail --config' would and list every rule: "
                                                  "applied, or ignored and why. Exit 0 if it loads, 2 if refused.")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--json", action="store_true", help="one JSON object per rule per line")
    _recording_commands(commands)
    return parser


def _recording_commands(commands) -> None:
    """``record``, ``report`` and ``export``: docs/recording.md."""
    from .recording.record import DEFAULT_GRACE

    record = commands.add_parser(
        "record", help="record events to a file: a command's process tree, or everything until Ctrl-C",
        description="With COMMAND: run it (as --user; under sudo the invoking user) and record its process tree "
                    "only (membership decided at fork, by ProcessGuid ancestry), until it exits; exit with its "
                    "status. Without: record everything (after --config's rules) until Ctrl-C, SIGTERM, "
                    "--max-size or --duration.",
        epilog="Replay with 'etwmon tail --replay FILE', see it with 'etwmon report', query it after 'etwmon "
               "export'. Reference: docs/recording.md.")
    record.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="the recording to write (created 0600; an existing file only with --force)")
    record.add_argument("--source", default="auto", choices=["auto", *SOURCES],
                        help="event source (default: auto, the best that works here)")
    record.add_argument("--config", metavar="FILE",
                        help="a Sysmon XML configuration: only what its rules keep, command lines redacted")
    record.add_argument("--user", metavar="NAME",
                        help="run COMMAND as this user (default: $SUDO_USER when run through sudo, else as is)")
    record.add_argument("--max-size", type=_byte_size, metavar="SIZE",
                        help="stop recording when the file reaches SIZE, e.g. 100M")
    record.add_argument("--duration", type=_duration, metavar="TIME",
                        help="stop recording after TIME, e.g. 30s, 10m, 2h")
    record.add_argument("--grace", type=_seconds(0, 60, True), default=DEFAULT_GRACE, metavar="SECONDS",
                        help=f"after COMMAND exits, keep recording this long (default: {DEFAULT_GRACE})")
    record.add_argument("--force", action="store_true", help="replace FILE if it exists")
    add_capture_options(record, "record")
    record.add_argument("command_args", nargs=argparse.REMAINDER, metavar="COMMAND ARGS",
                        help="the command to run and record (after --)")

    report = commands.add_parser(
        "report", help="a recording as one self-contained HTML page (tree, timeline, summary, search)",
        description="Write a recording as one HTML page that opens offline: the process tree, a timeline of "
                    "lifetimes, a summary and a search box.")
    report.add_argument("file", metavar="FILE")
    report.add_argument("-o", "--output", required=True, metavar="OUT.html")
    report.add_argument("--force", action="store_true", help="replace OUT.html if it exists")

    export = commands.add_parser(
        "export", help="a recording as Parquet, JSON lines or a Chrome/Perfetto trace",
        description="Convert a recording: parquet (one row per event, typed columns named as in the JSON "
                    "output; needs etwmon[parquet]), jsonl (what 'tail --json' prints) or chrome-trace (the Trace "
                    "Event Format: Perfetto's UI and chrome://tracing open it, a track per process).")
    export.add_argument("file", metavar="FILE")
    export.add_argument("--format", required=True, choices=["parquet", "jsonl", "chrome-trace"])
    export.add_argument("-o", "--output", required=True, metavar="OUT")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _recording(args: argparse.Namespace, err: TextIO, environ: dict[str, str]) -> int:
    """``record``, ``report``, ``export``: the logic lives in etwmon.recording."""
    if args.command == "record":
        from .recording.record import RecordOptions, record

        command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
        if args.config:
            _load_rules(args.config)  # a refused configuration is a usage error, before anything starts
        return record(RecordOptions(output=args.output, command=command, source=args.source, config=args.config,
                                    user=args.user, max_size=args.max_size, duration=args.duration,
                                    grace=args.grace, overwrite=args.force, hashes=args.hashes,
                                    image_loads=bool(image_load_option(args)), identity=args.identity), err, environ)
    if args.command == "report":
        from .recording.report import write_report

        return write_report(args.file, args.output, err, overwrite=args.force)
    from .recording.export import export

    return export(args.file, args.format, args.output, err, overwrite=args.force)


# --- messages ----------------------------------------------------------------------------------------------------

# The library names a source as Python does (``source='procfs'``); on the command line that is ``--source procfs``.
_SOURCE_KEYWORD = re.compile(r"source='(\w+)'((?: or '\w+')*)")


def cli_terms(message: str) -> str:
    """A library message in command-line terms: ``use source='netlink' or 'procfs'`` becomes
    ``use --source netlink or --source procfs``."""
    def option(match: re.Match) -> str:
        others = re.findall(r"'(\w+)'", match.group(2))
        return " or ".join(f"--source {name}" for name in (match.group(1), *others))
    return _SOURCE_KEYWORD.sub(option, message)


def _error(err: TextIO, message: str) -> None:
    say(err, f"error: {cli_terms(message)}")


# --- commands --------------------------------------------------------------------------------------------------


def _default_socket() -> str:
    from .service.server import default_socket

    return default_socket()


def _service_here(err: TextIO) -> str | None:
    """The service's default socket when ``etwmon tail`` should use it: not root, and a socket is there."""
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        return None
    path = _default_socket()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except PermissionError:
        say(err, f"note: {os.path.dirname(path)} is not open to you, so an etwmon service there cannot be used "
                 "(ask to be added to its group); using a source of its own")
        return None
    except OSError:
        return None
    import stat as stat_

    return path if stat_.S_ISSOCK(st.st_mode) else None


def _open_reader(args: argparse.Namespace, environ: dict[str, str], err: TextIO) -> tuple[Reader, bool]:
    """What ``etwmon tail`` reads from, and whether tail filters itself: with --from the fleet's stream; a service
    connection (``--connect``, or the service's socket when not root and it is there), filtered in the service;
    else a Monitor on a local source; with --replay a recording. Each is a ``Reader``."""
    if args.replay:
        if args.servers or args.connect is not None or args.config or args.source != "auto":
            raise UsageError("--replay reads a recording: --from, --connect, --source and --config choose live "
                             "events (rules apply when recording: etwmon record --config FILE)")
        from .recording import open_recording

        return open_recording(args.replay), True
    if args.servers and args.config:
        raise UsageError("--config applies rules where the events are read from the kernel; with --from they "
                         "are the shipping host's: etwmon ship --config FILE")
    if args.servers and args.hashes:
        raise UsageError("--hashes are computed where the events are read from the kernel: the shipping host's")
    if args.servers:
        if args.connect is not None:
            raise UsageError("--from and --connect are two places to read from: give one")
        from . import fleet

        consumer = fleet.FleetConsumer(args.servers, hosts=args.hosts, since=args.since, durable=args.durable,
                                       stream=args.stream, auth=fleet.load_auth(environ, args.auth_file))
        return fleet.FleetReader(consumer, on_notice=lambda notice: say(
            err, f"warning: host {notice.host}: {notice.kind} message: {escape_text(notice.message)}"
            if notice.kind != "restarted" else f"warning: host {notice.host}: {escape_text(notice.message)}")), True
    if args.hosts or args.since or args.durable:
        raise UsageError("--host, --since and --durable go with --from (they choose what to read of the fleet)")
    max_items, max_bytes = _limits(args, environ)
    items = DEFAULT_MAX_ITEMS if max_items is None else max_items
    path = args.connect
    if path is None and args.source == "auto" and not args.config and not args.hashes:
        path = _service_here(err)
        if path is not None:
            from .errors import ServiceRefused, ServiceUnavailable
            from .service import Connection

            try:
                return Connection(path, items, max_bytes, **_service_filter(args)).start(), False
            except (ServiceUnavailable, ServiceRefused) as exc:
                say(err, f"note: not using the etwmon service: {exc}; using a source of its own")
    elif path is not None:
        if args.source != "auto":
            raise UsageError("--connect reads the service's source; give --source to 'etwmon serve' instead")
        if args.config:
            raise UsageError("--config applies rules where the events are read from the kernel; with --connect "
                             "they are the service's: etwmon serve --config FILE")
        if args.hashes:
            raise UsageError("--hashes are computed where the events are read from the kernel: the service's")
        from .service import Connection

        return Connection(path, items, max_bytes, **_service_filter(args)), False
    from .monitor import Monitor  # here, so `etwmon sources` and --help stay light

    rules = _load_rules(args.config) if args.config else None
    options = image_load_option(args)  # image loads
    try:
        return Monitor(source=args.source, max_items=items, max_bytes=max_bytes, rules=rules,
                       identity=args.identity, hashes=args.hashes, **options), True
    except (MemoryError, ValueError) as exc:  # numpy cannot have the arena (or the slot table)
        size = human_bytes(max_bytes if max_bytes is not None else items * DEFAULT_BYTES_PER_ITEM)
        why = "not enough memory" if isinstance(exc, MemoryError) else str(exc)
        raise UsageError(f"cannot allocate a ring of {items} records / {size}: {why}; "
                         f"give a smaller --max-bytes or --max-items (or {ENV_MAX_BYTES}/{ENV_MAX_ITEMS})") from None


def _service_filter(args: argparse.Namespace) -> dict:
    """tail's filter options as ``Connection`` options: the service filters, so only those events cross."""
    types = None
    if args.types:
        types = sorted({t.name for t in frozenset().union(*args.types)})
    return {"types": types, "pids": args.pids, "descendants": args.descendants, "match": args.substrings,
            "globs": args.globs}


def _tail(args: argparse.Namespace, out: TextIO, err: TextIO, environ: dict[str, str]) -> int:
    if args.descendants and not args.pids:
        raise UsageError("--descendants needs --pid (whose descendants to follow)")
    if args.json:
        if args.format not in (None, "json"):
            raise UsageError(f"--json and --format {args.format} ask for two output forms: give one")
        args.format = "json"
    args.format = args.format or "text"
    if args.identity is not True and (args.servers or args.connect is not None):
        raise UsageError(f"--{'full' if args.identity else 'no'}-identity applies where the events are read from the "
                         "kernel; with --from or --connect the records are made elsewhere")
    args.types = args.types or [DEFAULT_EVENT_TYPES]  # the library's Monitor delivers everything; tail shows this
    types = frozenset().union(*args.types)
    reader, filter_here = _open_reader(args, environ, err)
    if args.servers:  # every line says whose event it is: the host of the batch being shown
        render = host_renderer(args.format, lambda: reader.host)
    elif args.format == "ecs":
        here = reader.header.get("host") if args.replay else socket.gethostname()
        render = host_renderer("ecs", lambda: here)
    else:
        render = RENDERERS[args.format]
    keep = EventFilter(types=types, pids=args.pids, descendants=args.descendants, substrings=args.substrings,
                       globs=args.globs) if filter_here else (lambda event: True)
    # Text and JSON filtered by type only are formatted a batch at a time, from the buffer (the same lines).
    batch = not args.servers and args.format in ("text", "json") and not (args.pids or args.substrings
                                                                         or args.globs)
    options = TailOptions(
        render=render, keep=keep,
        batch_wait=args.batch_wait, stats_interval=args.stats_interval if args.stats else None,
        batch_form=args.format if batch else None,
        batch_types=frozenset(int(t) for t in types) if batch and filter_here else None)
    return tail(reader, options, out, err)


def _ship(args: argparse.Namespace, err: TextIO, environ: dict[str, str]) -> int:
    from . import fleet
    from .monitor import Monitor

    max_items, max_bytes = _limits(args, environ)
    auth = fleet.load_auth(environ, args.auth_file)
    rules = _load_rules(args.config) if args.config else None
    monitor = Monitor(source=args.source, max_items=SHIP_MAX_ITEMS if max_items is None else max_items,
                      max_bytes=max_bytes, rules=rules)
    shipper = fleet.Shipper(monitor, args.servers, args.host_id, stream=args.stream, auth=auth,
                            max_age=args.retention_age, max_bytes=args.retention_bytes, replicas=args.replicas,
                            create_stream=not args.no_create_stream, batch_wait=args.batch_wait,
                            away_report=args.stats_interval or 30.0)
    from .fleet.command import run_ship

    return run_ship(monitor, shipper, err, (args.stats_interval or 5.0) if args.stats else None)


def _load_rules(path: str):
    """The RuleSet of ``tail --config`` (its warnings reach stderr through the library's log)."""
    from .errors import RuleConfigError
    from .rules import RuleSet

    try:
        return RuleSet.load(path)
    except RuleConfigError as exc:
        raise UsageError(f"--config: {exc}") from None


def _rules_check(args: argparse.Namespace, out: TextIO) -> int:
    from .errors import RuleConfigError
    from .rules import RuleSet
    from .rules.check import check_lines, check_records

    logger = logging.getLogger("etwmon.rules")  # the report below says it all, once
    logger.addHandler(logging.NullHandler())
    logger.propagate = False
    try:
        rules = RuleSet.load(args.file)
    except RuleConfigError as exc:
        raise UsageError(str(exc)) from None
    if args.json:
        for record in check_records(rules):
            out.write(json.dumps(record, ensure_ascii=True) + "\n")
    else:
        for line in check_lines(rules):
            out.write(escape_text(line) + "\n")
    out.flush()
    return EXIT_OK


def _serve(args: argparse.Namespace, err: TextIO, environ: dict[str, str]) -> int:
    import warnings

    from .monitor import Monitor
    from .service import Server, ServerLimits
    from .service.daemon import run, run_directory_cleanup, setup_logging

    max_items, max_bytes = _limits(args, environ)
    file_handler = setup_logging(args.log_level, args.log_file)
    items = DEFAULT_SERVE_MAX_ITEMS if max_items is None else max_items
    try:
        monitor = Monitor(source=args.source, max_items=items, max_bytes=max_bytes,
                          rules=_load_rules(args.config) if args.config else None, hashes=args.hashes,
                          identity=args.identity, **image_load_option(args))
    except (MemoryError, ValueError) as exc:
        raise UsageError(f"cannot allocate a ring of {items} records: {exc}; give a smaller --max-bytes or "
                         "--max-items") from None
    server = Server(monitor, args.socket, socket_mode=args.socket_mode, group=args.group,
                    allow_uids=args.allow_uids, allow_gids=args.allow_gids,
                    limits=ServerLimits(max_clients=args.max_clients, client_max_items=args.client_max_items,
                                        client_max_bytes=args.client_max_bytes))
    with run_directory_cleanup(server.path):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                monitor.start()
            for warning in caught:
                say(err, f"warning: {cli_terms(str(warning.message))}")
            server.open()
            return run(server, file_handler, rules_path=args.config)
        finally:
            server.close()
            monitor.close()


def _auto_choice(infos: list) -> str | None:
    """The source ``--source auto`` would pick here: the first available one in the picker's order."""
    from .sources import auto_order

    available = {info.name for info in infos if info.available}
    return next((name for name in auto_order() if name in available), None)


def _stale_state(name: str) -> list[str]:
    """What killed instances of source ``name`` left behind (``Source.stale_state``); a broken probe says so."""
    from .sources import source_class

    try:
        return source_class(name).stale_state()
    except Exception as exc:  # one source's failure must not break the listing
        return [f"cannot check: {type(exc).__name__}: {exc}"]


def _sources(args: argparse.Namespace, out: TextIO) -> int:
    infos = available_sources()
    auto = _auto_choice(infos)
    stale = {info.name: _stale_state(info.name) for info in infos}
    if args.json:
        for info in infos:
            reason = None if info.reason is None else cli_terms(info.reason)
            out.write(json.dumps({"name": info.name, "available": info.available, "reason": reason,
                                  "lossy": info.lossy, "delivers": sorted(info.delivers),
                                  "auto": info.name == auto, "stale": stale[info.name]}) + "\n")
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
            out.write(f"  {'':<{width}}  why not: {escape_text(cli_terms(info.reason or 'unknown'))}\n")
        for line in stale[info.name]:
            out.write(f"  {'':<{width}}  stale: {escape_text(line)}\n")
    out.write("* = what --source auto picks here" if auto else "no source works here")
    out.write("; lossy = can miss events without counting them\n")
    images = [info.name for info in infos if "image_load" in info.delivers]  # image loads
    out.write(f"image_load (opt-in: tail --type image, Monitor(image_loads=True)) comes from {', '.join(images)} "
              f"only: {', '.join(i.name for i in infos if i.name not in images)} have no event for it\n")
    if any(stale.values()):
        out.write("stale = left by a killed etwmon instance: 'etwmon cleanup' removes it\n")
    out.flush()
    return EXIT_OK


def _cleanup(out: TextIO, err: TextIO) -> int:
    """``Source.cleanup()`` of every registered source; what each did, one line each."""
    from .sources import source_class

    status, done = EXIT_OK, False
    for name in SOURCES:
        try:
            lines = source_class(name).cleanup()
        except (Error, OSError, ImportError) as exc:
            why = cli_terms(str(exc))
            if why.startswith("needs root"):  # the fix is this command as root, not another source
                why = why.split(": ", 1)[0] + ": run etwmon cleanup as root"
            say(err, f"{name}: cannot clean up: {why}")
            status = EXIT_RUNTIME
            continue
        for line in lines:
            out.write(f"{name}: {escape_text(line)}\n")
            done = True
    if not done and status == EXIT_OK:
        out.write("nothing to clean up\n")
    out.flush()
    return status


class _CliLogFormat(logging.Formatter):
    """The library's log lines in the CLI's own form: ``etwmon: warning: ...``, one line each."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if message.startswith(f"{PROG} "):  # "etwmon audit: ..." -> "audit: ..."
            message = message[len(PROG) + 1:]
        return f"{PROG}: {record.levelname.lower()}: {message}"


def _log_to(err: TextIO) -> None:
    """Library warnings (and worse) reach stderr as CLI lines; a handler a caller installed is left alone."""
    logger = logging.getLogger(PROG)
    if logger.handlers:
        return
    handler = logging.StreamHandler(err)
    handler.setFormatter(_CliLogFormat())
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``etwmon`` console script. Returns the exit status: 0 ok, 1 runtime error, 2 usage error."""
    out, err = sys.stdout, sys.stderr
    for stream in (out, err):
        try:  # text output of odd characters must not crash on a non-UTF-8 locale
            stream.reconfigure(errors="backslashreplace")
        except (AttributeError, ValueError):
            pass
    _log_to(err)
    try:
        args = _build_parser().parse_args(argv)
        if args.command == "sources":
            return _sources(args, out)
        if args.command == "cleanup":
            return _cleanup(out, err)
        if args.command == "rules":
            return _rules_check(args, out)
        if args.command == "ship":
            return _ship(args, err, dict(os.environ))
        if args.command == "serve":
            return _serve(args, err, dict(os.environ))
        if args.command == "service":
            from .service.install import run_command

            return run_command(args.service_command, config=getattr(args, "config", None),
                               group=getattr(args, "group", "etwmon"), unit_dir=args.unit_dir,
                               dry_run=args.dry_run, out=out, say=lambda line: say(err, line))
        if args.command in ("record", "report", "export"):
            return _recording(args, err, dict(os.environ))
        return _tail(args, out, err, dict(os.environ))
    except (UsageError, RecordingFormatError) as exc:
        _error(err, str(exc))
        return EXIT_USAGE
    except SourceUnavailable as exc:
        _error(err, str(exc))
        return EXIT_RUNTIME
    except SourceError as exc:
        cause = exc.__cause__
        _error(err, str(exc) if cause is None else f"the event source failed: {cause}")
        return EXIT_RUNTIME
    except BrokenPipeError:  # `etwmon sources | head -1`
        silence_stdout()
        return EXIT_OK
    except ImportError as exc:  # a source module that cannot load here
        _error(err, f"the {getattr(args, 'source', '?')} source cannot be loaded: {exc}")
        return EXIT_RUNTIME
    except Error as exc:  # etwmon's own errors name the fix (a ServiceRefused or SafeDirError is a PermissionError too)
        _error(err, str(exc))
        return EXIT_RUNTIME
    except PermissionError as exc:
        _error(err, f"{exc.strerror or exc}: run as root (or Administrator), or use --source procfs")
        return EXIT_RUNTIME
    except OSError as exc:
        _error(err, str(exc))
        return EXIT_RUNTIME
    except KeyboardInterrupt:  # before the tail loop took the signals over (e.g. while argparse ran)
        return EXIT_OK
