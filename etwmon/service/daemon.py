"""What makes ``etwmon serve`` a good systemd service: levelled logging on stderr (journald reads the level),
an optional log file that SIGHUP re-opens, SIGTERM as a clean stop, and ``sd_notify`` readiness written to
$NOTIFY_SOCKET with the socket module (no dependency)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from typing import Iterator

from ..errors import Error, SourceError
from ..safedir import RUN_DIR
from .server import Server

__all__ = ["setup_logging", "sd_notify", "run", "ReopenableFileHandler", "run_directory_cleanup"]

log = logging.getLogger("etwmon.service")

# journald's syslog priorities, read from a "<N>" prefix on each stderr line (SyslogLevelPrefix=yes).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>" + super().format(record)


class ReopenableFileHandler(logging.FileHandler):
    """A log file that ``reopen()`` (on SIGHUP) closes and opens again by name: logrotate's contract."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def _stderr_is_journal() -> bool:
    # systemd sets JOURNAL_STREAM to "device:inode" of the stream it connected stderr to.
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in value.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def setup_logging(level: str = "info", log_file: str | None = None) -> ReopenableFileHandler | None:
    """Log etwmon's messages at ``level`` and above to stderr (with journald priorities when stderr is the
    journal, with times otherwise) and, with ``log_file``, to that file too. Returns the file handler."""
    root = logging.getLogger("etwmon")
    root.setLevel(getattr(logging, level.upper()))
    for handler in list(root.handlers):
        root.removeHandler(handler)
    err = logging.StreamHandler(sys.stderr)
    if _stderr_is_journal():
        err.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        err.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(err)
    root.propagate = False
    file_handler = None
    if log_file:
        file_handler = ReopenableFileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(file_handler)
    return file_handler


def sd_notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. "READY=1") to systemd's $NOTIFY_SOCKET; False when there is none (not run by
    systemd with Type=notify) or it cannot be reached."""
    address = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET")
    if not address or address[0] not in "/@":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
        return True
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)
        return False


def run(server: Server, file_handler: ReopenableFileHandler | None = None, rules_path: str | None = None) -> int:
    """Serve until SIGTERM/SIGINT (clean stop) with SIGHUP re-opening the log file and, with ``rules_path``,
    reloading the rules from it (a refused file keeps the rules in force); tell systemd when ready and when
    stopping. The server is open and its Monitor started.
    Returns the exit status: 0 after a clean stop, 1 when the source failed."""

    def stop(signum: int, frame: object) -> None:
        server.stop(f"{signal.Signals(signum).name} received")

    def hangup(signum: int, frame: object) -> None:
        server.call_soon(reopen)  # in the loop, never inside whatever logging call the signal interrupted

    def reopen() -> None:
        if file_handler is not None:
            file_handler.reopen()
            log.info("SIGHUP: re-opened the log file %s", file_handler.baseFilename)
        else:
            log.info("SIGHUP: logging goes to stderr, nothing to re-open")
        if rules_path is not None:
            reload_rules()

    def reload_rules() -> None:
        try:
            server.monitor.set_rules(rules_path)
        except Error as exc:  # RuleConfigError, RulesError: the old rules stay in force
            log.error("SIGHUP: the rules in %s were refused, the previous rules stay in force: %s", rules_path, exc)
        else:
            log.info("SIGHUP: reloaded the rules from %s", rules_path)

    previous = {number: signal.signal(number, handler) for number, handler in
                ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, hangup))}
    try:
        sd_notify(f"READY=1\nSTATUS=serving {server.monitor.source.name} events on {server.path}\nMAINPID={os.getpid()}")
        log.info("ready: serving the %s source's events on %s", server.monitor.source.name, server.path)
        try:
            server.serve_forever()
        except SourceError as exc:
            log.error("stopped because the event source failed: %s", exc.__cause__ or exc)
            return 1
        finally:
            sd_notify("STOPPING=1")
        return 0
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


@contextlib.contextmanager
def run_directory_cleanup(socket_path: str) -> Iterator[None]:
    """Around a server's life: remove the socket's directory (/run/etwmon) at the end if it was not there at the
    start, i.e. this process made it. Under systemd, RuntimeDirectory= makes it before the start and removes it
    after the stop, so it is left alone; one that still holds anything (another server's socket) is kept."""
    directory = os.path.dirname(os.path.abspath(socket_path))
    made_here = directory == RUN_DIR and not os.path.lexists(directory)
    try:
        yield
    finally:
        if made_here:
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("left %s in place: %s", directory, exc.strerror or exc)
