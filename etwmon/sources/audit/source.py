"""The ``audit`` source: process execs with their exact argv, from the kernel's audit log (Linux, root).

It installs its own execve/execveat audit rule and reads the records the kernel multicasts to read-only
listeners (``AUDIT_NLGRP_READLOG``, next to any running auditd): the EXECVE record holds argv as the kernel copied
it at exec time, so short-lived processes get their exact command line. The protocol is in ``protocol``,
record assembly in ``records``, the machine-wide state housekeeping in ``state`` (this package's other modules).
See docs/audit.md.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import sys
import threading
import dataclasses
import time
from typing import Any, Callable, Iterable

from ...clock import CLOCK_BOOTTIME, KernelClock
from ...errors import SourceUnavailable
from ...records import Details
from .._linux import (
    CAP_AUDIT_CONTROL, CAP_AUDIT_READ, WakePipe, has_capability, live_process_start, netlink_socket_drops,
)
from .._proc import clock_tick_ns, host_and_boot_id, parse_stat, read_proc, snapshot
from ..base import Sink, Source
from . import state as audit_state
from .protocol import (
    AUDIT_LOCKED, AUDIT_NLGRP_READLOG, AUDIT_TRUSTED_APP, NLMSGHDR, AuditControl, AuditRule,
    AuditStatus, NetlinkTransport, Transport, TransportFactory, exec_rules, knows_machine, this_machine,
)
from .records import EventAssembler, ExecEvent, SerialTracker, decode_value, parse_fields
from .state import RuleKey

__all__ = ["AuditSource"]

log = logging.getLogger(__name__)

DEFAULT_RCVBUF = 32 << 20
#: How far (FILETIME ticks) a /proc start time may lie after audit's time of the exec and still be the process
#: that exec'd: audit's clock is the coarse wall clock, to the millisecond.
_START_SLACK = 200_000


def _default_transport(groups: int) -> Transport:
    return NetlinkTransport(groups, rcvbuf=DEFAULT_RCVBUF if groups else None, timeout=None if groups else 2.0)


# --- availability ---------------------------------------------------------------------------------------------


def _status_problem(control: AuditControl) -> tuple[AuditStatus | None, str | None]:
    try:
        status = control.status()
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return None, ("the kernel refused audit control (EPERM): needs CAP_AUDIT_CONTROL in the host's user "
                          "namespace — containers usually lack it; use the 'netlink' source")
        if exc.errno == errno.ECONNREFUSED:
            return None, ("the kernel refused the audit request (ECONNREFUSED): audit works only from the host's "
                          "user namespace, not inside a container; use the 'netlink' source")
        return None, f"cannot query the audit status: {exc}"
    if status.enabled == AUDIT_LOCKED:
        return status, ("the audit configuration is locked (enabled=2, `auditctl -e 2`): rules cannot be added "
                        "until reboot; use the 'netlink' source")
    return status, None


def _unavailable_reason(transport_factory: TransportFactory = _default_transport) -> str | None:
    """Why the audit source cannot work here (with the fix), or None. Opens and closes one socket."""
    if not sys.platform.startswith("linux"):
        return "needs Linux (the kernel audit subsystem)"
    if os.geteuid() != 0 or not (has_capability(CAP_AUDIT_CONTROL) and has_capability(CAP_AUDIT_READ)):
        return "needs root (CAP_AUDIT_CONTROL and CAP_AUDIT_READ): run as root"
    if not knows_machine(this_machine()):
        return f"the audit source does not know the execve syscall numbers of {this_machine()!r}"
    try:
        transport = transport_factory(0)
    except OSError as exc:
        return f"cannot open a NETLINK_AUDIT socket ({exc}): kernel built without CONFIG_AUDIT?"
    control = AuditControl(transport)
    try:
        return _status_problem(control)[1]
    finally:
        control.close()


# --- the source ---------------------------------------------------------------------------------------------


class AuditSource(Source):
    """Process execs with their exact argv, from the kernel audit log (Linux, root).

    Options: ``key`` (rule key prefix, default "etwmon"), ``backlog_limit`` (raised to this while running,
    0 leaves it alone), ``rcvbuf`` (socket buffer bytes), ``probe`` (check at open that records arrive by
    exec'ing /bin/true once), ``transport_factory`` (for tests: makes the NETLINK_AUDIT sockets).
    """

    name = "audit"
    lossy = False
    # The loss count is an upper bound, not exact: the kernel's lost counter covers audit records of every
    # kind, and serial gaps cover events of every kind (docs/audit.md).
    delivers = frozenset({"process_exec", "command_line", "image", "current_directory", "uid", "user", "tty",
                          "process_snapshot"})

    #: How often the kernel's lost counter is polled and missing serials are settled.
    TICK = 0.25
    STATUS_EVERY = 1.0

    def __init__(self, *, key: str = audit_state.DEFAULT_KEY, backlog_limit: int = audit_state.DEFAULT_BACKLOG_LIMIT,
                 rcvbuf: int = DEFAULT_RCVBUF, probe: bool = True,
                 transport_factory: TransportFactory | None = None) -> None:
        super().__init__()
        self._boot_clock = KernelClock(CLOCK_BOOTTIME)  # /proc start times, for the identity stage
        self._tick_ns = clock_tick_ns()
        if ":" in key or not key:
            raise ValueError(f"key must be a non-empty string without ':', not {key!r}")
        self.key_prefix = key
        self.backlog_limit = backlog_limit
        self.rcvbuf = rcvbuf
        self.probe = probe
        self._factory = transport_factory or (lambda groups: NetlinkTransport(
            groups, rcvbuf=rcvbuf if groups else None, timeout=None if groups else 2.0))
        self._control: AuditControl | None = None
        self._log: Transport | None = None
        self._rules: list[AuditRule] = []
        self._key: RuleKey | None = None
        self._opened_status: AuditStatus | None = None
        self._set_backlog: int | None = None
        self._stop = threading.Event()
        self._wake = WakePipe()
        self._early: list[bytes] = []
        self._marker: str | None = None
        self._marker_serial: int | None = None
        self._daemon_at_start = 0  # the audit daemon's pid at open (0: none registered)
        self._assembler = EventAssembler()
        self._serials = SerialTracker()
        self._lost_base = 0
        self._kernel_lost = 0
        self._counts = {"execs": 0, "records": 0, "overruns": 0, "rules_restored": 0}
        self._lost_reported = 0
        self._audit_off_warned = False
        self._lock = threading.Lock()
        #: When the reader last found its socket empty (monotonic): every record multicast before then is read.
        self.caught_up_at = 0.0

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _unavailable_reason()

    @classmethod
    def stale_state(cls) -> list[str]:
        """Rules of killed etwmon instances and the audit state they changed (nothing when audit cannot be
        queried here: not root, no audit)."""
        try:
            control = AuditControl(_default_transport(0))
        except OSError:
            return []
        try:
            return audit_state.stale_state(control)
        except OSError:
            return []
        finally:
            control.close()

    @classmethod
    def cleanup(cls) -> list[str]:
        reason = _unavailable_reason()
        if reason is not None:
            raise SourceUnavailable(reason)
        try:
            control = AuditControl(_default_transport(0))
        except OSError as exc:
            raise SourceUnavailable(f"audit source: cannot open a NETLINK_AUDIT socket: {exc}") from exc
        try:
            return audit_state.cleanup(control)
        except OSError as exc:
            raise SourceUnavailable(str(exc)) from exc
        finally:
            control.close()

    # -- open / close ------------------------------------------------------------------------------------

    def open(self) -> None:
        if self._control is not None:
            return
        try:
            transport = self._factory(0)
        except OSError as exc:
            raise SourceUnavailable(f"cannot open a NETLINK_AUDIT socket: {exc}") from exc
        control = AuditControl(transport)
        # A new session: stop flag down, and a fresh serial baseline (the gaps between sessions are not losses).
        self._stop.clear()
        self._early, self._marker, self._marker_serial = [], None, None
        self._set_backlog = None
        missing, self._serials = self._serials.missing, SerialTracker()
        self._serials.missing = missing
        try:
            with audit_state.StateLock():
                self._open_locked(control)
        except BaseException:
            self._control = None
            self._teardown(control)
            raise
        try:
            self._mark("start", self._early)
            if self.probe:
                self._run_probe()
        except BaseException:
            self.close()
            raise

    def _open_locked(self, control: AuditControl) -> None:
        status, problem = _status_problem(control)
        if problem is not None:
            raise SourceUnavailable(f"audit source: {problem}")
        assert status is not None
        self._control = control
        try:
            listed = control.list_rules()
        except OSError as exc:
            raise SourceUnavailable(f"audit source: cannot list audit rules: {exc}") from exc
        # The state from before any etwmon instance touched audit: carried by rules of live or killed ones.
        original = (status.enabled, status.backlog_limit)
        for rule in listed:
            other = RuleKey.parse(rule.key, self.key_prefix)
            if other is None:
                continue
            original = (other.enabled, other.backlog_limit)
            if not other.owner_alive():
                log.info("etwmon audit: removing rule %s left by a process that is gone", other)
                self._delete_quietly(control, rule)
        me = os.getpid()
        self._key = RuleKey(self.key_prefix, me, live_process_start(me) or 0, original[0], original[1])
        try:
            self._log = self._factory(1 << (AUDIT_NLGRP_READLOG - 1))
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise SourceUnavailable("audit source: joining the audit log multicast group was refused: needs "
                                        "CAP_AUDIT_READ in the host's namespaces; use the 'netlink' source") from exc
            raise SourceUnavailable(f"audit source: cannot open the audit log socket: {exc}") from exc
        self._rules = exec_rules(str(self._key))
        added = []
        try:
            for rule in self._rules:
                control.add_rule(rule)
                added.append(rule)
            if status.enabled == 0:
                control.set_status(enabled=1)
            if self.backlog_limit and 0 < status.backlog_limit < self.backlog_limit:
                control.set_status(backlog_limit=self.backlog_limit)
                self._set_backlog = self.backlog_limit
            now = control.status()
        except OSError as exc:
            self._rules = added
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise SourceUnavailable(f"audit source: the kernel refused an audit rule change ({exc}); "
                                        "use the 'netlink' source") from exc
            raise SourceUnavailable(f"audit source: cannot install the exec rule: {exc}") from exc
        if now.enabled == AUDIT_LOCKED:  # locked between our checks: our rules are in, so still fine
            log.warning("etwmon audit: audit was locked while etwmon opened")
        self._daemon_at_start = status.pid
        if not status.pid:
            # kernel/audit.c, kauditd_hold_skb(): with no audit daemon registered, every record is also printed
            # to the kernel log (rate-limited). Registering as the daemon would stop that but make a real
            # auditd that starts later fail (EEXIST), so etwmon says so instead.
            log.warning("etwmon audit: no audit daemon is registered, so the kernel also prints the exec records "
                        "etwmon asks for, command lines included, to the kernel log (dmesg; rate-limited)")
        self._lost_base = now.lost
        self._wake.open()
        log.info("etwmon audit: rules %s installed (audit was enabled=%d backlog_limit=%d)", self._key,
                 status.enabled, status.backlog_limit)

    @staticmethod
    def _delete_quietly(control: AuditControl, rule: AuditRule) -> None:
        try:
            audit_state.delete_rule(control, rule)
        except OSError as exc:
            log.warning("etwmon audit: cannot remove rule %s: %s", rule.key, exc)

    def _read_until(self, done: Callable[[], bool], timeout: float, out: Callable[[ExecEvent, bytes], None]
                    ) -> bool:
        """Read the log socket until ``done()`` or ``timeout`` seconds; exec events go to ``out``."""
        deadline = time.monotonic() + timeout
        buf = bytearray(1 << 16)
        assert self._log is not None
        fd = self._log.fileno()
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                for event, record in self._drain(buf):
                    out(event, record)
        return True

    def _mark(self, what: str, early: list[bytes] | None, sink: Sink | None = None, timeout: float = 1.0) -> None:
        """Log a marker message and read up to it. Serials are only compared with ones seen before, so a
        marker at start gives the gap count its baseline and one at stop settles every serial before it:
        events dropped at the socket before our first or after our last record are counted too."""
        if self._control is None or self._log is None:
            return
        token = f"etwmon-audit-{what}-{os.getpid()}-{time.monotonic_ns()}"
        self._marker, self._marker_serial = token, None
        try:
            self._control.user_message(token)
        except OSError as exc:
            log.info("etwmon audit: cannot log a marker (%s): losses right at %s may go uncounted", exc, what)
            return

        def out(event: ExecEvent, record: bytes) -> None:
            if early is not None:
                early.append(record)
            elif sink is not None:
                self._emit(sink, event, record)

        if not self._read_until(lambda: self._marker_serial is not None, timeout, out):
            log.info("etwmon audit: the %s marker did not come back within %.1f s", what, timeout)
            return
        if what == "stop":
            self._serials.settle(self._marker_serial)  # type: ignore[arg-type]

    def _run_probe(self, timeout: float = 3.0) -> None:
        """Exec /bin/true once and wait for its audit event, so a source that would never see anything (a
        network namespace other than the host's, an auditd `never` rule ahead of ours) says so now."""
        token = f"etwmon-audit-probe-{os.getpid()}-{time.monotonic_ns()}"
        program = "/bin/true" if os.access("/bin/true", os.X_OK) else sys.executable
        argv = [program, token] if program == "/bin/true" else [program, "-c", "", token]
        pid = os.posix_spawn(program, argv, os.environ)
        os.waitpid(pid, 0)
        seen = []

        def out(event: ExecEvent, record: bytes) -> None:
            self._early.append(record)
            if event.pid == pid and (event.argv() or [b""])[-1] == token.encode():
                seen.append(event)

        if self._read_until(lambda: bool(seen), timeout, out):
            return
        if self._counts["overruns"]:
            raise SourceUnavailable(f"audit source: the test exec's records were dropped at the socket (rcvbuf "
                                    f"{self.rcvbuf} bytes is too small)")
        raise SourceUnavailable(
            "audit source: no audit record of a test exec arrived within "
            f"{timeout:.0f} s (a network namespace other than the host's, or an audit rule that suppresses "
            "execve ahead of etwmon's?); use the 'netlink' source")

    def close(self) -> None:
        control, self._control = self._control, None
        if control is None:
            return
        self._teardown(control)

    def _teardown(self, control: AuditControl) -> None:
        try:
            if self._rules:  # without a rule of ours in, nothing was changed
                try:
                    with audit_state.StateLock():
                        self._restore(control)
                except SourceUnavailable as exc:
                    # Our rules stay: they record how audit was, for the next instance or `etwmon cleanup`.
                    log.warning("%s; leaving audit as it is, with etwmon's rules recording how it was: `etwmon "
                                "cleanup` puts it back once this process has exited", exc)
        finally:
            self._rules = []
            self._key = None
            control.close()
            if self._log is not None:
                self._log.close()
                self._log = None
            self._wake.close()

    def _restore(self, control: AuditControl) -> None:
        """The last etwmon instance out puts enabled/backlog_limit back as they were; then our rules go.

        In that order, so a process killed half-way leaves a rule that tells the next instance what to restore,
        never a changed state with no rule to say so."""
        key = self._key
        try:
            if key is not None:
                self._restore_state(control, key)
        finally:
            for rule in self._rules:
                self._delete_quietly(control, rule)
            self._rules = []
            self._key = None

    def _restore_state(self, control: AuditControl, key: RuleKey) -> None:
        mine = str(key)
        try:
            others = False
            for rule, other in audit_state.etwmon_rules(control, self.key_prefix):
                if str(other) == mine:
                    continue
                if other.owner_alive():
                    others = True
                else:
                    self._delete_quietly(control, rule)
            if others:
                return  # another instance still runs: it restores when it stops
            # What we raised backlog_limit to; or, if a killed instance had raised it already, what it set.
            raised_to = self._set_backlog if self._set_backlog is not None else (self.backlog_limit or None)
            audit_state.restore(control, key, raised_to, self._daemon_at_start)
        except OSError as exc:
            log.warning("etwmon audit: cannot restore the audit state: %s", exc)

    # -- running -------------------------------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self._wake.wake()

    def _drain(self, buf: bytearray) -> Iterable[tuple[ExecEvent, bytes]]:
        """Read every message waiting on the log socket; yield each completed exec event with its record."""
        assert self._log is not None
        sock = getattr(self._log, "sock", None)
        view = memoryview(buf)
        assembler = self._assembler
        serials = self._serials
        while True:
            try:
                if sock is not None:
                    n = sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
                    data: Any = view[:n]
                else:
                    data = self._log.recv(len(buf))
                    n = len(data)
            except BlockingIOError:
                self.caught_up_at = time.monotonic()
                return
            except InterruptedError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Records were dropped at our socket; the serial tracker counts the events.
                    self._counts["overruns"] += 1
                    continue
                raise
            if n == 0:
                return
            offset = 0
            while offset + 16 <= n:
                length, msg_type = NLMSGHDR.unpack_from(data, offset)[:2]
                if length < 16 or offset + length > n:
                    length = n - offset  # the unicast quirk (nlmsg_len without the header) never reaches us
                self._counts["records"] += 1
                rec, done = assembler.feed(msg_type, data[offset + 16:offset + length])
                if rec is not None:
                    serials.see(rec.serial)
                    if msg_type == AUDIT_TRUSTED_APP and self._marker and self._marker in rec.body:
                        self._marker_serial = rec.serial
                for event in done:
                    yield event, event.encode(self._details_of(event))
                offset += (length + 3) & ~3
            if sock is None:
                return

    def _details_of(self, event: ExecEvent) -> Details | None:
        """The exec's details for the identity stage (None when it is off): what SYSCALL and CWD say, and the
        process's start time from /proc when it is the process that exec'd (it started before the exec), so
        the stage can name the process even though audit never saw its fork."""
        if not self.details:
            return None
        details = event.details()
        data = read_proc(f"/proc/{event.pid}/stat", 1024)
        parsed = parse_stat(data) if data else None
        if parsed is not None:
            start = self._boot_clock.filetime(parsed[2] * self._tick_ns)
            if start <= event.filetime + _START_SLACK:  # a later start is a reused pid: not this process
                details = dataclasses.replace(details, start_filetime=start)
        return details

    def host_and_boot_id(self) -> bytes:
        return host_and_boot_id()

    def process_snapshot(self) -> list:
        return snapshot()

    def _emit(self, sink: Sink, event: ExecEvent, record: bytes) -> None:
        sink.push(record)
        self._counts["execs"] += 1

    def run(self, sink: Sink) -> None:
        if self._log is None:
            raise RuntimeError("open() the audit source before run()")
        for record in self._early:
            sink.push(record)
            self._counts["execs"] += 1
        self._early = []
        sink.notify()
        buf = bytearray(1 << 17)
        poller = select.poll()
        poller.register(self._log.fileno(), select.POLLIN)
        poller.register(self._wake.fileno(), select.POLLIN)
        next_tick = time.monotonic() + self.TICK
        next_status = time.monotonic() + self.STATUS_EVERY
        while not self._stop.is_set():
            poller.poll(max(0.0, next_tick - time.monotonic()) * 1000)
            pushed = False
            for event, record in self._drain(buf):
                self._emit(sink, event, record)
                pushed = True
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self.TICK
                for event in self._assembler.expire(now):
                    self._emit(sink, event, event.encode(self._details_of(event)))
                    pushed = True
                self._handle_config_changes()
                if now >= next_status:
                    next_status = now + self.STATUS_EVERY
                    self._poll_status()
                self._serials.tick()
                pushed |= self._report_lost(sink)
            if pushed:
                sink.notify()
        # Drain what is already queued, and settle what we can, before returning.
        for event, record in self._drain(buf):
            self._emit(sink, event, record)
        self._mark("stop", None, sink, timeout=0.5)
        for event in self._assembler.expire(everything=True):
            self._emit(sink, event, event.encode(self._details_of(event)))
        self._poll_status()
        self._report_lost(sink)
        sink.notify()

    def _poll_status(self) -> None:
        control = self._control
        if control is None:
            return
        try:
            status = control.status()
        except OSError as exc:
            log.warning("etwmon audit: cannot poll the audit status: %s", exc)
            return
        if status.lost < self._lost_base:  # someone reset it (auditctl --reset-lost)
            self._kernel_lost += status.lost
        else:
            self._kernel_lost += status.lost - self._lost_base
        self._lost_base = status.lost
        if status.enabled == 0 and not self._audit_off_warned:
            self._audit_off_warned = True
            log.warning("etwmon audit: audit was disabled by someone else (auditctl -e 0): no exec is seen "
                        "until it is enabled again")

    def _handle_config_changes(self) -> None:
        """Put our rules back if someone deleted them (``auditctl -D``) while we run."""
        changes, self._assembler.config_changes = self._assembler.config_changes, []
        if not changes or self._control is None or self._key is None:
            return
        mine = str(self._key)
        for rec in changes:
            fields = dict(parse_fields(rec.body))
            if fields.get("op") in ('"remove_rule"', "remove_rule") and \
                    (decode_value(fields.get("key", "(null)")) or b"").decode("utf-8", "replace") == mine:
                log.warning("etwmon audit: our exec rule was removed by someone else; putting it back")
                try:
                    for rule in self._rules:
                        try:
                            self._control.add_rule(rule)
                        except OSError as exc:
                            if exc.errno != errno.EEXIST:
                                raise
                    self._counts["rules_restored"] += 1
                except OSError as exc:
                    log.warning("etwmon audit: cannot put the exec rule back: %s", exc)
                return

    def _lost_total(self) -> int:
        return self._kernel_lost + self._serials.missing + self._assembler.incomplete

    def _report_lost(self, sink: Sink) -> bool:
        with self._lock:
            total = self._lost_total()
            new = total - self._lost_reported
            self._lost_reported = total
        if new > 0:
            sink.push_lost(new)
            return True
        return False

    def stats(self) -> dict[str, int]:
        a = self._assembler
        out = {
            "lost": self._lost_total(),
            "parse_errors": a.parse_errors,
            "kernel_lost": self._kernel_lost,
            "serial_gaps": self._serials.missing,
            "incomplete": a.incomplete,
            "flushed": a.flushed,
            "failed_execs": a.failed,
            "pending": len(a.pending),
            **self._counts,
        }
        if self._log is not None and hasattr(self._log, "sock"):
            drops = netlink_socket_drops(os.fstat(self._log.fileno()).st_ino)
            if drops is not None:
                out["socket_drops"] = drops
        return out
