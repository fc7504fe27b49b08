"""``etwmon.connect()``: a client of the etwmon service that reads like a Monitor (``readinto`` with the book's
contract, ``wait``, ``fileno``, ``events``, ``async for``, ``stats``), so the same code reads either.

DATA frames are received into one buffer and handed out from there: each frame lists where its records end,
so ``readinto`` finds how many whole records fit with one binary search and copies them with one slice.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import BufferTooSmall, Error, ServiceRefused, ServiceUnavailable, SourceError
from ..monitor import EventReader, MonitorStats, ReadyFlag
from ..ring import writable_bytes
from ..safedir import describe_mode
from . import protocol as P
from .server import default_socket

__all__ = ["Connection", "ConnectionStats", "connect", "SourceInfo"]

_UCRED = struct.Struct("3i")
_MAX_FRAME = 16 << 20  # never trust a server's max_frame beyond this
_STATS_TIMEOUT = 2.0


@dataclass(frozen=True)
class ConnectionStats(MonitorStats):
    """A connection's counters, from its last STATS answer plus what it has taken since. ``pushed``/``dropped``
    /``items``/``max_*``: this client's queue in the server (``dropped``: what the queue threw away because
    this client read too slowly); ``lost``: what the server's own Monitor lost (ring drops, source losses),
    passed on to this client; ``read``: records this client has taken with ``readinto``; ``reported``: the
    sum of the RecordsLost counts it was given in-band (== ``dropped + lost`` once it has read everything);
    ``server``: the server's figures (its Monitor, clients)."""

    reported: int = 0
    server: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SourceInfo:
    """What the service says about its source (``Connection.source``), shaped like a Source for readers."""

    name: str
    lossy: bool


class _Frame:
    __slots__ = ("data", "ends", "count", "index", "base", "lost")

    def __init__(self, data, ends: np.ndarray, count: int, lost: int) -> None:
        self.data, self.ends, self.count, self.lost = data, ends, count, lost
        self.index = 0  # the next record to hand out
        self.base = 0  # where it starts in data


class Connection(EventReader):
    """A client of an etwmon service: ``Connection(path, max_items=10_000, max_bytes=None, ...)``, then
    ``start()`` (or ``with``), or ``etwmon.connect(...)`` which starts it.

    ``max_items``/``max_bytes``: the caps of this client's queue in the server (granted up to the server's
    limits; ``max_bytes=None``: 1 KiB per record). ``types`` (e.g. ``"process,exec"``), ``pids``,
    ``descendants``, ``match``, ``globs``: a filter the server applies, so filtered events do not cross the
    socket (the meaning is ``etwmon tail``'s --type/--pid/--descendants/--match/--glob). A RecordsLost report
    always passes. Read it from one thread at a time (a Monitor takes several).
    """

    def __init__(self, path: str | None = None, max_items: int = 10_000, max_bytes: int | None = None, *,
                 types: str | Iterable[str] | None = None, pids: Iterable[int] | None = None,
                 descendants: bool = False, match: Sequence[str] = (), globs: Sequence[str] = (),
                 timeout: float = 5.0) -> None:
        self.path = path or default_socket()
        self._hello: dict[str, Any] = {"version": P.VERSION, "max_items": max_items, "max_bytes": max_bytes}
        spec: dict[str, Any] = {}
        if types is not None:
            spec["types"] = [types] if isinstance(types, str) else list(types)
        if pids is not None:
            spec["pids"] = [int(p) for p in pids]
        if descendants:
            spec["descendants"] = True
        if match:
            spec["match"] = list(match)
        if globs:
            spec["glob"] = list(globs)
        if spec:
            self._hello["filter"] = spec
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._poll: Any = None  # epoll over the socket and the "records are here" flag: fileno()
        self._flag: ReadyFlag | None = None
        self._frames: deque[_Frame] = deque()
        self._rbuf = bytearray(0)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        self._max_frame = 0
        self._welcome: dict[str, Any] = {}
        self._end: dict[str, Any] | None = None  # the END message, once it came
        self._lost_connection: str | None = None
        self._error_raised = False
        self._received = self._read = self._reported = 0
        self._stats: dict[str, Any] = {}
        self._stats_received = 0  # records received when the last STATS answer came
        self._stats_serial = 0
        self.source: SourceInfo | None = None

    # -- life cycle ------------------------------------------------------------------------------------

    def start(self) -> "Connection":
        """Connect, say hello, and wait for the welcome (``timeout`` seconds). Raises ``ServiceUnavailable``
        when no service answers at the path, ``ServiceRefused`` (naming why) when it or the socket's
        permissions refuse this client."""
        if self._sock is not None:
            return self
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        deadline = time.monotonic() + self._timeout
        try:
            while True:
                try:
                    sock.connect(self.path)
                    break
                except BlockingIOError:
                    # A Unix socket's backlog is full: the server is busy accepting; try again until timeout.
                    if time.monotonic() >= deadline:
                        raise ServiceUnavailable(f"the etwmon service at {self.path} did not accept the "
                                                 f"connection within {self._timeout:g} s (its backlog is full)")
                    time.sleep(0.01)
        except ServiceUnavailable:
            sock.close()
            raise
        except FileNotFoundError:
            sock.close()
            raise ServiceUnavailable(f"no etwmon service at {self.path} (is 'etwmon serve' running? "
                                     "'systemctl status etwmon')") from None
        except ConnectionRefusedError:
            sock.close()
            raise ServiceUnavailable(f"nothing listens on {self.path}: a socket left by a service that "
                                     "stopped") from None
        except PermissionError:
            sock.close()
            raise ServiceRefused(_permission_message(self.path), "permission") from None
        except OSError as exc:
            sock.close()
            raise ServiceUnavailable(f"cannot connect to the etwmon service at {self.path}: "
                                     f"{exc.strerror or exc}") from None
        try:
            self._check_server(sock)
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                sock.sendall(P.json_frame(P.HELLO, self._hello))
            except (BrokenPipeError, ConnectionResetError):
                pass  # a refusal may already be waiting to be read
            self._sock = sock
            self._rbuf = bytearray(P.HEADER.size + P.MAX_CONTROL)
            self._rview = memoryview(self._rbuf)
            while not self._welcome:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServiceUnavailable(f"the etwmon service at {self.path} did not answer within "
                                             f"{self._timeout:g} s")
                sock.settimeout(left)
                self._receive(blocking=True)
                if self._lost_connection or self._end is not None:
                    raise ServiceUnavailable(f"the etwmon service at {self.path} closed the connection before "
                                             f"welcoming this client: {self._lost_connection or self._end}")
        except BaseException:
            self._sock = None
            sock.close()
            raise
        sock.setblocking(False)
        self._poll = select.epoll()
        self._flag = ReadyFlag()
        self._poll.register(sock.fileno(), select.EPOLLIN)
        self._poll.register(self._flag.fileno(), select.EPOLLIN)
        self._set_flag()
        return self

    def _check_server(self, sock: socket.socket) -> None:
        # Anyone can create a socket in a shared directory: read events only from root or ourselves.
        pid, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid not in (0, os.geteuid()):
            raise ServiceRefused(f"{self.path} is served by uid {uid} (pid {pid}), neither root nor you: not an "
                                 "etwmon service to trust", "untrusted-server")

    def stop(self) -> None:
        """Leave the service (records already received stay readable, and ``stats`` keeps the last counters,
        asked for on the way out); idempotent."""
        sock = self._sock
        if sock is None:
            return
        if self.running:
            self._refresh_stats()
            try:
                sock.send(P.frame(P.BYE))
            except OSError:
                pass
            self._end = {"reason": "this client left", "error": False}
        self._detach()
        self._close_descriptors()

    def close(self) -> None:
        """``stop()`` and release the descriptors (``fileno()`` is invalid afterwards)."""
        self.stop()

    def _close_descriptors(self) -> None:
        for closer in (self._poll, self._flag, self._sock):
            if closer is not None:
                try:
                    closer.close()
                except OSError:
                    pass
        self._poll = self._flag = self._sock = None

    def __enter__(self) -> "Connection":
        return self.start()

    def _release(self) -> None:
        """Collected unclosed: the descriptors only (no goodbye to the service from a finalizer)."""
        self._close_descriptors()

    @property
    def running(self) -> bool:
        """True while connected and the service has not ended the stream."""
        return self._sock is not None and self._end is None and self._lost_connection is None

    # -- receiving -------------------------------------------------------------------------------------

    def _receive(self, blocking: bool = False) -> bool:
        """One recv from the socket, parsed into frames; False when nothing was there."""
        sock = self._sock
        if sock is None or self._end is not None or self._lost_connection is not None:
            return False
        if self._frames:
            self._detach()  # handed-out frames point into the receive buffer, about to be reused
        if self._rstart == self._rend:
            self._rstart = self._rend = 0
        elif len(self._rbuf) - self._rend < P.HEADER.size + self._max_frame or self._rend == len(self._rbuf):
            # Keep the partial frame, with room behind it for a whole one (the buffer holds two).
            size = self._rend - self._rstart
            self._rbuf[:size] = self._rbuf[self._rstart:self._rend]
            self._rstart, self._rend = 0, size
        try:
            n = sock.recv_into(self._rview[self._rend:])
        except (BlockingIOError, InterruptedError, socket.timeout):
            return False
        except OSError as exc:
            self._lost(f"the connection to the etwmon service at {self.path} failed: {exc.strerror or exc}")
            return True
        if n == 0:
            self._lost(f"the etwmon service at {self.path} closed the connection without an END message "
                       "(was it killed?)")
            return True
        self._rend += n
        self._parse_frames()
        return True

    def _parse_frames(self) -> None:
        buf, view = self._rbuf, self._rview
        pos, end = self._rstart, self._rend
        header, prefix = P.HEADER, P.DATA_PREFIX
        while end - pos >= header.size:
            kind, _flags, length = header.unpack_from(buf, pos)
            limit = self._max_frame if kind == P.DATA else P.MAX_CONTROL
            if length > limit:
                self._rstart = self._rend = 0
                raise self._broken(f"a frame of {length} bytes (kind {kind:#x}), more than {limit}")
            if end - pos < header.size + length:
                break
            body = pos + header.size
            pos = body + length
            if kind == P.DATA:
                if length < prefix.size:
                    raise self._broken("a DATA frame shorter than its prefix")
                nbytes, count, lost, _ = prefix.unpack_from(buf, body)
                start = body + prefix.size
                if prefix.size + nbytes + 4 * count != length:
                    raise self._broken("a DATA frame whose sizes do not add up")
                if not count:
                    continue
                ends = np.frombuffer(buf, dtype="<u4", count=count, offset=start + nbytes)
                if int(ends[-1]) != nbytes or (count > 1 and bool((np.diff(ends.astype(np.int64)) <= 0).any())):
                    raise self._broken("a DATA frame whose record ends are not ascending")
                self._frames.append(_Frame(view[start:start + nbytes], ends, count, lost))
                self._received += count - (1 if lost else 0)
            elif kind == P.STATS:
                self._stats = P.decode_json(view[body:pos], "STATS")
                self._stats_received = self._received
                self._stats_serial += 1
            elif kind == P.END:
                self._end = P.decode_json(view[body:pos], "END")
            elif kind == P.WELCOME:
                welcome = P.decode_json(view[body:pos], "WELCOME")
                self._welcome = welcome
                self._max_frame = min(int(welcome.get("max_frame", 0)), _MAX_FRAME)
                self.source = SourceInfo(str(welcome.get("source", "")), bool(welcome.get("lossy", False)))
                self._rbuf = bytearray(2 * (P.HEADER.size + max(self._max_frame, P.MAX_CONTROL)))
                rest = end - pos
                self._rbuf[:rest] = buf[pos:end]
                buf, view = self._rbuf, memoryview(self._rbuf)
                self._rview = view
                pos, end = 0, rest
                self._rend = rest
            elif kind == P.REFUSED:
                refused = P.decode_json(view[body:pos], "REFUSED")
                self._lost(f"refused: {refused.get('error')}")
                raise ServiceRefused(f"the etwmon service at {self.path} refused this client: "
                                     f"{refused.get('error', '?')}", str(refused.get("code", "")))
            else:
                raise self._broken(f"an unknown frame kind {kind:#x}")
        self._rstart = pos

    def _broken(self, what: str) -> SourceError:
        self._lost(f"the etwmon service at {self.path} sent {what}: protocol error")
        return SourceError(self._lost_connection)

    def _lost(self, why: str) -> None:
        if self._lost_connection is None and self._end is None:
            self._lost_connection = why

    def _detach(self) -> None:
        """Copy the frames still being handed out out of the receive buffer, so it can be reused."""
        for frame in self._frames:
            if not isinstance(frame.data, bytes):
                frame.data = bytes(frame.data)
                frame.ends = frame.ends.copy()

    # -- the "records are here" flag behind fileno() ------------------------------------------------------

    def _set_flag(self) -> None:
        if self._flag is not None:
            self._flag.put(bool(self._frames))

    # -- reading ---------------------------------------------------------------------------------------

    def _check_end(self) -> None:
        """At the end of what was received: raise ``SourceError`` once if the stream ended badly."""
        if self._error_raised:
            return
        if self._lost_connection is not None:
            self._error_raised = True
            raise SourceError(self._lost_connection)
        if self._end is not None and self._end.get("error"):
            self._error_raised = True
            raise SourceError(f"the etwmon service ended the stream: {self._end.get('reason')}")

    def readinto(self, buffer) -> int:
        """Copy as many whole records as fit into ``buffer`` and return the byte count: the first record that
        does not fit stays for the next call; after losses (this client's queue, or the server's) a
        RecordsLost record comes first. 0 when nothing is waiting; ``BufferTooSmall(needed)`` (consuming
        nothing) when not even one record fits. At the end of the stream: 0, and once ``SourceError`` if the
        service failed or the connection was lost (killed server)."""
        out = writable_bytes(buffer)
        frames = self._frames
        if not frames:
            self._receive()
        room = len(out)
        pos = 0
        while frames:
            frame = frames[0]
            index, base = frame.index, frame.base
            ends = frame.ends
            j = int(np.searchsorted(ends, base + room - pos, side="right"))
            if j <= index:
                break
            stop = int(ends[j - 1])
            out[pos:pos + stop - base] = frame.data[base:stop]
            pos += stop - base
            taken = j - index
            if index == 0 and frame.lost:
                self._reported += frame.lost
                taken -= 1
            self._read += taken
            frame.index, frame.base = j, stop
            if j < frame.count:
                break
            frames.popleft()
            if not frames and pos < room:
                self._receive()
        if pos == 0 and frames:
            frame = frames[0]
            raise BufferTooSmall(int(frame.ends[frame.index]) - frame.base, room)
        self._set_flag()
        if pos == 0:
            self._check_end()
        return pos

    def readable(self) -> bool:
        """True when ``readinto`` would return records now (received and not yet taken)."""
        return bool(self._frames)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until records are waiting, or ``timeout`` seconds pass, or the stream ends; True if there
        is something to read. Raises ``SourceError`` once when the stream ended badly and nothing is left."""
        if self._frames:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sock = self._sock
            if sock is None or not self.running:
                self._check_end()
                return False
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ready, _, _ = select.select([sock], [], [], left)
            except (ValueError, OSError):
                return bool(self._frames)
            if ready:
                self._receive()
                if self._frames:
                    self._set_flag()
                    return True
            elif deadline is not None and time.monotonic() >= deadline:
                return False

    def fileno(self) -> int:
        """A descriptor readable while records are waiting or the service has sent something (select/poll/
        event loops): records received but not yet taken count, unlike on the raw socket."""
        if self._poll is None:
            raise Error("the connection is not open: call start() or use it as a context manager first")
        return self._poll.fileno()

    # -- state -----------------------------------------------------------------------------------------

    def _refresh_stats(self) -> None:
        """Ask for the service's counters and wait (up to 2 s) for the answer; data that arrives before it is
        kept for readinto."""
        serial = self._stats_serial
        try:
            self._sock.send(P.frame(P.STATS_REQUEST))
        except OSError:
            return
        deadline = time.monotonic() + _STATS_TIMEOUT
        while self._stats_serial == serial and self.running:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([self._sock], [], [], left)
            if ready:
                self._receive()
        self._set_flag()

    @property
    def lossy(self) -> bool:
        """True when the service's source can miss events without counting them (polling)."""
        return bool(self.source and self.source.lossy)

    def describe(self) -> str:
        """What is read, for ``etwmon tail``'s "watching (...)" line."""
        from ..formats import human_bytes

        source = self.source.name if self.source else "?"
        return (f"service: {self.path}, source: {source}, queue: {self._welcome.get('max_items', 0)} records / "
                f"{human_bytes(int(self._welcome.get('max_bytes', 0)))}")

    @property
    def stats(self) -> ConnectionStats:
        """Counters, asking the service for fresh ones (up to 2 s) while connected."""
        if self.running:
            self._refresh_stats()
        s = self._stats
        local = sum(f.count - f.index for f in self._frames)
        pending = sum(len(f.data) - f.base for f in self._frames)
        # The STATS answer came after every record sent before it, so what is queued = the server's queue
        # then + what had arrived by then and is not taken yet.
        items = int(s["items"]) + max(0, self._stats_received - self._read) if s else local
        return ConnectionStats(
            pushed=int(s.get("pushed", self._received)), read=self._read, dropped=int(s.get("dropped", 0)),
            lost=int(s.get("lost", 0)), items=items,
            bytes=int(s.get("bytes", 0)) + pending, max_items=int(self._welcome.get("max_items", 0)),
            max_bytes=int(self._welcome.get("max_bytes", 0)), source=self.source.name if self.source else "",
            parse_errors=int(s.get("server", {}).get("parse_errors", 0)),
            source_stats=dict(s.get("server", {}).get("source_stats", {})), reported=self._reported,
            server=dict(s.get("server", {})))

    @property
    def granted(self) -> dict[str, Any]:
        """The WELCOME: the queue caps the service granted, its source, version and limits."""
        return dict(self._welcome)

    def __repr__(self) -> str:
        state = "connected" if self.running else "ended"
        return f"<Connection {self.path!r} {state} read={self._read} reported_lost={self._reported}>"


def connect(path: str | None = None, max_items: int = 10_000, max_bytes: int | None = None,
            **options: Any) -> Connection:
    """Connect to the etwmon service at ``path`` (default: $ETWMON_SOCKET, else /run/etwmon/etwmon.sock) and
    return the started
    ``Connection`` (see there for the options). Use it like a Monitor: ``with etwmon.connect() as src: ...``."""
    return Connection(path, max_items=max_items, max_bytes=max_bytes, **options).start()


def _permission_message(path: str) -> str:
    """Why connecting to ``path`` was denied, naming the directory or socket whose mode stands in the way."""
    me, groups = os.geteuid(), set(os.getgroups()) | {os.getegid()}
    why = "the socket's permissions"
    parts = os.path.abspath(path).split(os.sep)[1:]
    for depth in range(1, len(parts) + 1):
        item = os.sep + os.path.join(*parts[:depth])
        try:
            st = os.stat(item)
        except OSError:
            break
        # Searching a directory needs x, connecting to a socket needs w, for the class (owner/group/other) we are.
        shift = 6 if st.st_uid == me else 3 if st.st_gid in groups else 0
        need = (stat.S_IXOTH if stat.S_ISDIR(st.st_mode) else stat.S_IWOTH) << shift
        if not st.st_mode & need:
            why = f"{item} is {describe_mode(st)}"
            break
    return (f"permission denied connecting to the etwmon service at {path}: {why} and you are uid {me}; ask its "
            "administrator to add you to the service's --group (or --allow-uid) and socket mode")
