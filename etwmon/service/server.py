"""The etwmon service's server: one Monitor, one Unix socket, any number of clients, each with its own bounded
queue (an EventRing) so a slow client loses — counted, reported in-band — without slowing anyone else.

One thread runs a selector loop over the listening socket, the Monitor's wake-up descriptor and the clients.
Every socket is non-blocking and every buffer has a cap, so a hostile client (garbage, huge lengths, half
messages, never reading, a thousand connections) costs a bounded amount and never stalls the loop.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import stat
import struct
import time
from collections import deque
from typing import Any, Iterable

import numpy as np

from .. import __version__
from ..errors import Error, ProtocolError, SourceError
from ..records import HEADER_SIZE, MAX_RECORD_SIZE, parse
from ..ring import EventRing
from ..safedir import RUN_DIR, SafeDirError, describe_mode, group_name, open_trusted, private_directory, user_name
from . import protocol as P

__all__ = ["Server", "DEFAULT_SOCKET", "ENV_SOCKET", "ServerLimits", "default_socket"]

log = logging.getLogger(__name__)

#: Where ``etwmon serve`` listens and ``etwmon.connect()`` / ``etwmon tail`` look by default.
DEFAULT_SOCKET = os.path.join(RUN_DIR, "etwmon.sock")
#: An environment variable that moves that default (a second service, tests).
ENV_SOCKET = "ETWMON_SOCKET"


def default_socket(environ: dict[str, str] | None = None) -> str:
    """The socket path used when none is given: $ETWMON_SOCKET, else /run/etwmon/etwmon.sock."""
    return (os.environ if environ is None else environ).get(ENV_SOCKET, "").strip() or DEFAULT_SOCKET

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python 3.11 does not name it
_UCRED = struct.Struct("3i")
_BATCH = 1 << 20  # bytes taken from the Monitor's ring per read
_FRAME_RECORDS = 256 * 1024  # record bytes per DATA frame (a largest record always fits)
_FRAMES_PER_TURN = 4  # frames one client may send per loop turn, so a fast one cannot starve the others
_RECV = 4096  # bytes read from one client per loop turn
_STOP_DRAIN = 1.0  # seconds a stopping server keeps sending what clients have queued
_ACCEPT_PAUSE = 0.5  # seconds without accepting after accept() fails (out of descriptors)
_REFUSAL_LOG_INTERVAL = 10.0
_LOSS_LOG_INTERVAL = 10.0  # the Monitor's losses are logged at most this often, summed
_REFUSALS_LOGGED = 20  # refusals logged one by one per interval
_MAX_FILTER_VALUES = 1024
_MAX_PATTERN = 4096


class ServerLimits:
    """The caps that bound what clients can make the server hold: at most ``max_clients`` connections (the
    next one is refused at once), each queue at most ``client_max_items`` records / ``client_max_bytes``
    bytes (a client asking for more gets these), ``hello_timeout`` seconds to say hello. The server's
    memory for clients is at most about ``max_clients`` × (``client_max_bytes`` + 8 × ``client_max_items``
    + 470 KiB)."""

    def __init__(self, max_clients: int = 64, client_max_items: int = 100_000,
                 client_max_bytes: int = 16 << 20, hello_timeout: float = 5.0) -> None:
        if max_clients < 1 or client_max_items < 1 or client_max_bytes < MAX_RECORD_SIZE + 1:
            raise ValueError("max_clients and client_max_items must be >= 1, client_max_bytes >= 64 KiB")
        self.max_clients = max_clients
        self.client_max_items = client_max_items
        self.client_max_bytes = client_max_bytes
        self.hello_timeout = hello_timeout


def _user(uid: int) -> str:
    name = user_name(uid)
    return f"{uid} ({name})" if name != str(uid) else name


def _group(gid: int) -> str:
    name = group_name(gid)
    return f"{gid} ({name})" if name != str(gid) else name


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups as they were at connect time (SO_PEERGROUPS), () if unknown."""
    size = 256 * 4
    for _ in range(4):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size *= 4
                continue
            return ()
        return struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4])
    return ()


def _filter_from_hello(spec: Any):
    """An EventFilter from the HELLO's ``filter`` object (None for none); ProtocolError on anything wrong."""
    from ..filters import EventFilter, parse_event_types

    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ProtocolError("filter must be a JSON object")
    unknown = set(spec) - {"types", "pids", "descendants", "match", "glob"}
    if unknown:
        raise ProtocolError(f"unknown filter field {sorted(unknown)[0]!r}")

    def strings(name: str) -> list[str]:
        values = spec.get(name) or []
        if (not isinstance(values, list) or len(values) > _MAX_FILTER_VALUES
                or not all(isinstance(v, str) and len(v) <= _MAX_PATTERN for v in values)):
            raise ProtocolError(f"filter {name} must be a list of at most {_MAX_FILTER_VALUES} strings of at most "
                                f"{_MAX_PATTERN} characters")
        return values

    types = None
    if spec.get("types") is not None:
        try:
            types = parse_event_types(",".join(strings("types")))
        except ValueError as exc:
            raise ProtocolError(f"filter types: {exc}") from None
    pids = spec.get("pids")
    if pids is not None and (not isinstance(pids, list) or len(pids) > _MAX_FILTER_VALUES or not all(
            isinstance(p, int) and not isinstance(p, bool) and 0 < p < 2**32 for p in pids)):
        raise ProtocolError(f"filter pids must be a list of at most {_MAX_FILTER_VALUES} process ids")
    descendants = spec.get("descendants", False)
    if not isinstance(descendants, bool):
        raise ProtocolError("filter descendants must be true or false")
    match, globs = strings("match"), strings("glob")
    if types is None and pids is None and not match and not globs:
        return None
    return EventFilter(types=types, pids=pids, descendants=descendants, substrings=match, globs=globs)


class _Client:
    """One connection: its socket, credentials, what it has sent us so far, its queue and its outgoing frame."""

    def __init__(self, number: int, sock: socket.socket, pid: int, uid: int, gid: int, deadline: float) -> None:
        self.number = number
        self.sock = sock
        self.pid, self.uid, self.gid = pid, uid, gid
        self.deadline: float | None = deadline  # for the HELLO
        self.inbox = bytearray()
        self.ring: EventRing | None = None
        self.keep = None  # the client's EventFilter, if any
        self.out = bytearray()
        self.out_view = memoryview(self.out)
        self.out_start = self.out_end = 0
        self.ends: np.ndarray | None = None
        self.control: deque[bytes] = deque()
        self.stats_wanted = False
        self.ending: bytes | None = None  # the END frame, sent once the queue is empty
        self.closing = False  # nothing more to send after what is in ``out``/``control``
        self.writing = False  # registered for EVENT_WRITE

    def who(self) -> str:
        return f"client {self.number} (uid {_user(self.uid)}, pid {self.pid})"

    def start_queue(self, max_items: int, max_bytes: int) -> None:
        self.ring = EventRing(max_items=max_items, max_bytes=max_bytes)
        self.out = bytearray(P.HEADER.size + P.DATA_PREFIX.size + _FRAME_RECORDS
                             + 4 * (_FRAME_RECORDS // HEADER_SIZE + 1))
        self.out_view = memoryview(self.out)
        self.ends = np.zeros(_FRAME_RECORDS // HEADER_SIZE + 1, dtype=np.int64)

    def has_output(self) -> bool:
        return (self.out_start < self.out_end or bool(self.control) or self.stats_wanted
                or (self.ring is not None and self.ring.readable()) or self.ending is not None)


class Server:
    """Serve one started Monitor's records on a Unix socket (``etwmon serve`` wires it up).

    ``path``: the socket (default ``/run/etwmon/etwmon.sock``, in a directory made safe by
    ``etwmon.safedir``). ``socket_mode``: its permission bits (default 0600, 0660 with ``group``); ``group``:
    the group name or id that owns the socket and may connect; ``allow_uids``/``allow_gids``: who else may
    connect, checked with SO_PEERCRED (root and the server's own user always may; members of ``group`` are
    allowed too). ``limits``: ``ServerLimits``. Call ``open()``, then ``serve_forever()`` until ``stop()``
    (from any thread or a signal handler), then ``close()``.
    """

    def __init__(self, monitor, path: str = DEFAULT_SOCKET, *, socket_mode: int | None = None,
                 group: str | int | None = None, allow_uids: Iterable[int] = (), allow_gids: Iterable[int] = (),
                 limits: ServerLimits | None = None) -> None:
        self.monitor = monitor
        self.path = os.path.abspath(path)
        self.gid = _resolve_group(group) if group is not None else None
        self.socket_mode = socket_mode if socket_mode is not None else (0o660 if self.gid is not None else 0o600)
        self.allow_uids = frozenset(allow_uids) | {0, os.geteuid()}
        self.allow_gids = frozenset(allow_gids) | ({self.gid} if self.gid is not None else set())
        self.limits = limits or ServerLimits()
        self._listener: socket.socket | None = None
        self._inode = -1
        self._selector: selectors.BaseSelector | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._stop_reason = "the service is stopping"
        self._clients: dict[int, _Client] = {}
        self._calls: deque = deque()
        self._numbers = 0
        self._batch = bytearray(_BATCH)
        self._batch_view = memoryview(self._batch)
        self._batch_ends = np.zeros(_BATCH // HEADER_SIZE + 1, dtype=np.int64)
        self._source_error: str | None = None
        self.refused = 0  # connections refused (not allowed, too many, bad hello)
        self._accept_paused_until = 0.0
        self._lost_unlogged = 0
        self._lost_logged_at = 0.0
        self._refusal_window = time.monotonic()
        self._refusals_logged = self._refusals_unlogged = 0

    # -- set-up ----------------------------------------------------------------------------------------

    def open(self) -> "Server":
        """Create the socket directory (for the default path) and the socket, and listen."""
        directory, name = os.path.split(self.path)
        if directory == RUN_DIR:
            try:
                dir_fd = private_directory(RUN_DIR, group=self.gid)
            except PermissionError as exc:
                if isinstance(exc, SafeDirError):
                    raise
                raise SafeDirError(f"cannot make {RUN_DIR} ({exc.strerror}): run 'etwmon serve' as root, or give "
                                   "--socket PATH in a directory of your own") from None
        else:
            # Owned by root or the serving user, as is every directory above it, and none writable by others
            # (a sticky one such as /tmp excepted): else someone else could swap the socket.
            dir_fd = open_trusted(directory, directory=True)
        try:
            self._remove_stale(dir_fd, name)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            # Bound through the checked directory's descriptor: a path component swapped meanwhile is not
            # followed; the umask makes the socket's mode right from its first moment.
            old = os.umask(0o777 & ~self.socket_mode)
            try:
                sock.bind(f"/proc/self/fd/{dir_fd}/{name}")
            finally:
                os.umask(old)
            if self.gid is not None:
                os.chown(name, -1, self.gid, dir_fd=dir_fd, follow_symlinks=False)
            self._inode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino
            sock.listen(128)
            sock.setblocking(False)
        finally:
            os.close(dir_fd)
        self._listener = sock
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._selector.register(self.monitor.fileno(), selectors.EVENT_READ, "monitor")
        log.info("listening on %s (mode %04o%s; allowed uids %s%s; at most %d clients, queues up to %d records "
                 "/ %d bytes)", self.path, self.socket_mode,
                 f", group {_group(self.gid)}" if self.gid is not None else "",
                 ", ".join(map(str, sorted(self.allow_uids))),
                 f", gids {', '.join(map(str, sorted(self.allow_gids)))}" if self.allow_gids else "",
                 self.limits.max_clients, self.limits.client_max_items, self.limits.client_max_bytes)
        return self

    def _remove_stale(self, dir_fd: int, name: str) -> None:
        """A socket left by a killed server is removed; anything else at the path is refused, never removed."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise SafeDirError(f"{self.path} exists and is not a socket of uid {os.geteuid()} "
                               f"({describe_mode(st)}): remove it or choose another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(f"/proc/self/fd/{dir_fd}/{name}")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)
            log.info("removed the stale socket %s of a server that is gone", self.path)
            return
        except OSError:
            pass
        finally:
            probe.close()
        raise Error(f"another etwmon service is listening on {self.path}: stop it first or choose another --socket")

    # -- the loop --------------------------------------------------------------------------------------

    def stop(self, reason: str = "the service is stopping") -> None:
        """Ask ``serve_forever`` to end (thread-safe, async-signal-safe enough for a Python signal handler)."""
        self._stop_reason = reason
        self._stopping = True
        try:
            self._wake_w.send(b"\1")
        except OSError:
            pass

    def call_soon(self, fn) -> None:
        """Run ``fn()`` in the serving thread at its next turn (from a signal handler or another thread)."""
        self._calls.append(fn)
        try:
            self._wake_w.send(b"\1")
        except OSError:
            pass

    def serve_forever(self) -> None:
        """Run until ``stop()`` or the Monitor's source ends; then send each client what it has queued (for up
        to a second), an END message, and close the connections. Raises ``SourceError`` if the source failed
        (after telling the clients)."""
        if self._selector is None:
            self.open()
        selector = self._selector
        while not self._stopping:
            for key, events in selector.select(self._next_timeout()):
                what = key.data
                if what == "monitor":
                    self._take_from_monitor()
                elif what == "listen":
                    self._accept()
                elif what == "wake":
                    self._drain_wake()
                else:
                    client = what
                    if client.number not in self._clients:
                        continue
                    if events & selectors.EVENT_READ:
                        self._receive(client)
                    if events & selectors.EVENT_WRITE and client.number in self._clients:
                        self._flush(client)
            self._expire_hellos()
            if self._accept_paused_until and time.monotonic() >= self._accept_paused_until:
                self._accept_paused_until = 0.0
                self._selector.register(self._listener, selectors.EVENT_READ, "listen")
            if not self.monitor.running and not self.monitor.readable():
                self._end_of_source()
        self._shut_down()
        if self._source_error:
            raise SourceError(self._source_error)

    def _next_timeout(self) -> float:
        deadlines = [c.deadline for c in self._clients.values() if c.deadline is not None]
        if self._accept_paused_until:
            deadlines.append(self._accept_paused_until)
        if not deadlines:
            return 1.0
        return max(0.0, min(min(deadlines) - time.monotonic(), 1.0))

    def _drain_wake(self) -> None:
        try:
            self._wake_r.recv(4096)
        except OSError:
            pass
        while self._calls:
            fn = self._calls.popleft()
            try:
                fn()
            except Exception:
                log.exception("a requested action failed")

    def _end_of_source(self) -> None:
        try:
            self.monitor.readinto_indexed(self._batch_view, self._batch_ends)  # raises the source's error
        except SourceError as exc:
            self._source_error = str(exc)
            log.error("%s", exc)
            self.stop(f"the event source failed: {exc.__cause__ or exc}")
            return
        self.stop("the event source stopped")

    # -- from the Monitor to every queue -----------------------------------------------------------------

    def _take_from_monitor(self) -> None:
        for _ in range(8):  # then let the clients and new connections have a turn
            try:
                n, count, lost = self.monitor.readinto_indexed(self._batch_view, self._batch_ends)
            except SourceError:
                return  # the loop sees the source has ended and reports its error
            if not n:
                break
            self._fan_out(n, count, lost)
        for client in list(self._clients.values()):
            if client.ring is not None and not client.writing and client.has_output():
                self._flush(client)

    def _fan_out(self, n: int, count: int, lost: int) -> None:
        live = [c for c in self._clients.values() if c.ring is not None and c.ending is None]
        first, offset = (1, int(self._batch_ends[0])) if lost else (0, 0)
        if lost:  # the Monitor's own losses (ring drops, source losses) reach every client in-band too
            for client in live:
                client.ring.push_lost(lost)
            self._log_loss(lost)
        if count <= first or not live:
            return
        data = self._batch_view[offset:n]
        ends = self._batch_ends[first:count] - offset
        filtered = []
        for client in live:
            if client.keep is None:
                client.ring.push_batch(data, ends)
            else:
                filtered.append(client)
        if filtered:
            events = list(parse(data))  # parsed once for every filtered client
            starts = np.concatenate(([0], ends[:-1])).tolist()
            stops = ends.tolist()
            for client in filtered:
                keep, push = client.keep, client.ring.push
                for event, start, stop in zip(events, starts, stops):
                    if keep(event):
                        push(data[start:stop])

    def _log_loss(self, lost: int) -> None:
        self._lost_unlogged += lost
        now = time.monotonic()
        if now - self._lost_logged_at >= _LOSS_LOG_INTERVAL:
            m = self.monitor.stats
            log.warning("the source's side lost %d records (ring full or source overrun; %d lost and %d dropped "
                        "since the start): every client is told in-band", self._lost_unlogged, m.lost, m.dropped)
            self._lost_unlogged, self._lost_logged_at = 0, now

    # -- connections -----------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: pause accepting (no busy loop), serve the ones we have
                log.warning("cannot accept connections for a moment: %s", exc.strerror or exc)
                self._selector.unregister(self._listener)
                self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE
                return
            sock.setblocking(False)
            try:
                pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
            except OSError:
                sock.close()
                continue
            self._numbers += 1
            number = self._numbers
            if uid not in self.allow_uids and gid not in self.allow_gids and not (
                    self.allow_gids and self.allow_gids.intersection(_peer_groups(sock))):
                allowed = "uids " + ", ".join(map(_user, sorted(self.allow_uids)))
                if self.allow_gids:
                    allowed += "; gids " + ", ".join(map(_group, sorted(self.allow_gids)))
                self._refuse(sock, "not-allowed",
                             f"uid {_user(uid)} (gid {_group(gid)}) may not read this etwmon service: it allows "
                             f"{allowed}; ask its administrator for --allow-uid {uid} or an allowed group",
                             f"client {number} (uid {_user(uid)}, pid {pid})")
                continue
            live = len(self._clients)
            if live >= self.limits.max_clients:
                self._refuse(sock, "too-many-clients",
                             f"this etwmon service already has {live} clients, its limit (--max-clients)",
                             f"client {number} (uid {_user(uid)}, pid {pid})")
                continue
            if self._stopping:
                self._refuse(sock, "stopping", "the etwmon service is stopping", f"client {number}")
                continue
            client = _Client(number, sock, pid, uid, gid, time.monotonic() + self.limits.hello_timeout)
            self._clients[number] = client
            self._selector.register(sock, selectors.EVENT_READ, client)
            log.info("%s connected", client.who())

    def _refuse(self, sock: socket.socket, code: str, message: str, who: str) -> None:
        self.refused += 1
        self._log_refusal(who, message)
        try:
            sock.send(P.json_frame(P.REFUSED, {"code": code, "error": message}))
        except OSError:
            pass
        sock.close()

    def _expire_hellos(self) -> None:
        now = time.monotonic()
        for client in list(self._clients.values()):
            if client.deadline is not None and now >= client.deadline:
                self._protocol_error(client, "bad-hello",
                                     f"no HELLO within {self.limits.hello_timeout:g} s of connecting")

    def _receive(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._drop(client, f"connection error: {exc.strerror or exc}")
            return
        if not data:
            self._drop(client, "disconnected")
            return
        if client.closing:
            return  # refused or ending: what it says no longer matters
        inbox = client.inbox
        inbox += data
        while len(inbox) >= P.HEADER.size:
            kind, flags, length = P.HEADER.unpack_from(inbox)
            if length > P.MAX_CLIENT_MESSAGE:
                self._protocol_error(client, "protocol", f"a message of {length} bytes; the limit is "
                                                         f"{P.MAX_CLIENT_MESSAGE}")
                return
            if len(inbox) < P.HEADER.size + length:
                return  # half a message: the rest comes later (or the HELLO deadline ends it)
            payload = bytes(inbox[P.HEADER.size:P.HEADER.size + length])
            del inbox[:P.HEADER.size + length]
            try:
                self._handle(client, kind, payload)
            except ProtocolError as exc:
                self._protocol_error(client, "bad-hello" if client.ring is None else "protocol", str(exc))
                return
            if client.number not in self._clients or client.closing:
                return

    def _handle(self, client: _Client, kind: int, payload: bytes) -> None:
        if client.ring is None:
            if kind != P.HELLO:
                raise ProtocolError(f"the first message must be HELLO (kind {P.HELLO}), not kind {kind}")
            self._hello(client, P.decode_json(payload, "HELLO"))
        elif kind == P.STATS_REQUEST:
            client.stats_wanted = True  # many requests before one reply get that one reply: bounded
            if not client.writing:
                self._flush(client)
        elif kind == P.BYE:
            self._drop(client, "said bye")
        elif kind == P.HELLO:
            raise ProtocolError("HELLO was already sent")
        else:
            raise ProtocolError(f"unknown message kind {kind}")

    def _hello(self, client: _Client, hello: dict[str, Any]) -> None:
        version = hello.get("version")
        if version != P.VERSION:
            self._refuse_live(client, "version", f"this etwmon service speaks protocol version {P.VERSION}, the "
                                                 f"client asked for {version!r}; use the same etwmon version")
            return
        limits = self.limits

        def whole(name: str, default: int, low: int, high: int) -> int:
            value = hello.get(name)
            if value is None:
                return min(default, high)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ProtocolError(f"{name} must be a whole number >= {low}, not {value!r}")
            return min(value, high)

        max_items = whole("max_items", 10_000, 1, limits.client_max_items)
        max_bytes = whole("max_bytes", max(max_items * 1024, 0x10000), MAX_RECORD_SIZE + 1,
                          limits.client_max_bytes)
        client.keep = _filter_from_hello(hello.get("filter"))
        client.start_queue(max_items, max_bytes)
        client.deadline = None
        source = self.monitor.source
        client.control.append(P.json_frame(P.WELCOME, {
            "version": P.VERSION, "server": f"etwmon {__version__}", "source": getattr(source, "name", ""),
            "lossy": bool(getattr(source, "lossy", False)), "client": client.number, "max_items": max_items,
            "max_bytes": max_bytes, "max_frame": len(client.out) - P.HEADER.size}))
        log.info("%s reads: queue %d records / %d bytes%s", client.who(), max_items, max_bytes,
                 ", filtered" if client.keep is not None else "")
        self._flush(client)

    def _log_refusal(self, who: str, message: str) -> None:
        # A flood of connections must not flood the log: the first few per interval, then a count.
        now = time.monotonic()
        if now - self._refusal_window >= _REFUSAL_LOG_INTERVAL:
            if self._refusals_unlogged:
                log.warning("refused %d more connections in the last %.0f s (not logged one by one)",
                            self._refusals_unlogged, now - self._refusal_window)
            self._refusal_window, self._refusals_logged, self._refusals_unlogged = now, 0, 0
        if self._refusals_logged < _REFUSALS_LOGGED:
            self._refusals_logged += 1
            log.warning("refused %s: %s", who, message)
        else:
            self._refusals_unlogged += 1

    def _refuse_live(self, client: _Client, code: str, message: str) -> None:
        self.refused += 1
        self._log_refusal(client.who(), message)
        self._say_and_close(client, P.json_frame(P.REFUSED, {"code": code, "error": message}))

    def _protocol_error(self, client: _Client, code: str, message: str) -> None:
        self.refused += 1
        self._log_refusal(client.who(), f"it broke the protocol: {message}")
        self._say_and_close(client, P.json_frame(P.REFUSED, {"code": code, "error": message}))

    def _say_and_close(self, client: _Client, last: bytes) -> None:
        # Best effort, never waiting: a client that is not reading just loses the explanation.
        try:
            client.sock.send(last)
        except OSError:
            pass
        self._drop(client, "closed by the server")

    def _drop(self, client: _Client, why: str) -> None:
        if self._clients.pop(client.number, None) is None:
            return
        try:
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()
        if client.ring is not None:
            s = client.ring.stats
            log.info("%s disconnected (%s): %d records sent, %d dropped by its queue, %d lost upstream, "
                     "%d unsent", client.who(), why, s.read, s.dropped, s.lost, s.items)
        else:
            log.info("%s disconnected (%s) before its HELLO", client.who(), why)

    # -- sending ---------------------------------------------------------------------------------------

    def _stats_frame(self, client: _Client) -> bytes:
        s = client.ring.stats
        m = self.monitor.stats
        return P.json_frame(P.STATS, {
            "pushed": s.pushed, "read": s.read, "dropped": s.dropped, "lost": s.lost, "items": s.items,
            "bytes": s.bytes, "max_items": s.max_items, "max_bytes": s.max_bytes,
            "server": {"source": m.source, "pushed": m.pushed, "read": m.read, "dropped": m.dropped, "lost": m.lost,
                       "items": m.items, "parse_errors": m.parse_errors, "clients": len(self._clients),
                       "refused": self.refused,
                       "source_stats": {k: v for k, v in m.source_stats.items() if isinstance(v, (int, float, str))}}})

    def _next_frame(self, client: _Client) -> bool:
        """Put the next frame into ``client.out``; False when there is nothing to send."""
        if client.control:
            frame = client.control.popleft()
        elif client.stats_wanted:
            client.stats_wanted = False
            frame = self._stats_frame(client)
        elif client.ring is not None and client.ring.readable():
            head = P.HEADER.size + P.DATA_PREFIX.size
            n, count, lost = client.ring.readinto_indexed(client.out_view[head:head + _FRAME_RECORDS], client.ends)
            np.frombuffer(client.out, dtype="<u4", count=count, offset=head + n)[:] = client.ends[:count]
            P.HEADER.pack_into(client.out, 0, P.DATA, 0, P.DATA_PREFIX.size + n + 4 * count)
            P.DATA_PREFIX.pack_into(client.out, P.HEADER.size, n, count, lost, 0)
            client.out_start, client.out_end = 0, head + n + 4 * count
            return True
        elif client.ending is not None:
            frame, client.ending = client.ending, None
            client.closing = True
        else:
            return False
        client.out[:len(frame)] = frame
        client.out_start, client.out_end = 0, len(frame)
        return True

    def _flush(self, client: _Client) -> None:
        """Send what the client has waiting, without ever blocking: what the socket does not take now waits
        for the next turn (EVENT_WRITE), and meanwhile its queue keeps the newest records within its caps."""
        frames = 0
        sock = client.sock
        while True:
            if client.out_start == client.out_end:
                if frames >= _FRAMES_PER_TURN or not self._next_frame(client):
                    break
                frames += 1
            try:
                sent = sock.send(client.out_view[client.out_start:client.out_end])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._drop(client, f"connection error: {exc.strerror or exc}")
                return
            client.out_start += sent
        if client.closing and client.out_start == client.out_end and not client.control:
            self._drop(client, "ended")
            return
        want = client.has_output()
        if want != client.writing:
            client.writing = want
            self._selector.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0), client)

    # -- the end ---------------------------------------------------------------------------------------

    def _shut_down(self) -> None:
        """Take what the Monitor still holds, give clients a moment to receive their queues, then END."""
        try:
            self.monitor.stop()
            while True:
                n, count, lost = self.monitor.readinto_indexed(self._batch_view, self._batch_ends)
                if not n:
                    break
                self._fan_out(n, count, lost)
        except SourceError:
            pass
        for client in list(self._clients.values()):
            if client.ring is None:
                self._drop(client, "the service stopped before its HELLO")
                continue
            client.ending = P.json_frame(P.END, {"reason": self._stop_reason, "error": bool(self._source_error)})
            self._flush(client)
        deadline = time.monotonic() + _STOP_DRAIN
        for what in (self._listener, self.monitor.fileno()):  # not accepting; the stopped Monitor stays readable
            try:
                self._selector.unregister(what)
            except (KeyError, ValueError):
                pass
        while self._clients and time.monotonic() < deadline:
            for key, events in self._selector.select(max(0.0, deadline - time.monotonic())):
                client = key.data
                if not isinstance(client, _Client) or client.number not in self._clients:
                    if key.data == "wake":
                        self._drain_wake()
                    continue
                if events & selectors.EVENT_READ:
                    self._receive(client)
                if events & selectors.EVENT_WRITE and client.number in self._clients:
                    self._flush(client)
        for client in list(self._clients.values()):
            self._drop(client, "the service stopped (its queue was not taken in time)")
        log.info("stopped: %s", self._stop_reason)

    def close(self) -> None:
        """Close the socket (and remove its path) and every connection; idempotent."""
        for client in list(self._clients.values()):
            self._drop(client, "the service closed")
        if self._listener is not None:
            try:
                st = os.stat(self.path, follow_symlinks=False)
                if stat.S_ISSOCK(st.st_mode) and st.st_ino == self._inode:  # ours, not a successor's
                    os.unlink(self.path)
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        self._wake_r.close()
        self._wake_w.close()

    @property
    def clients(self) -> int:
        """Connections open now (said hello or not yet)."""
        return len(self._clients)

    @property
    def readers(self) -> int:
        """Clients welcomed and reading now."""
        return sum(c.ring is not None for c in self._clients.values())


def _resolve_group(group: str | int) -> int:
    if isinstance(group, int):
        return group
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise Error(f"no group named {group!r} (create it with 'groupadd {group}')") from None
