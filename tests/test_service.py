"""The etwmon service over a real Unix socket: the readinto contract through it, per-client queues and exact
loss accounting, server-side filters, access control, hostile clients, the daemon's systemd behaviour, and
live storms with the kernel source (root)."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import etwmon
from etwmon import records as R
from etwmon.records import ItemType
from etwmon.safedir import SafeDirError, open_private_file, private_directory
from etwmon.service import Server, ServerLimits, connect
from etwmon.service import protocol as P
from etwmon.sources.base import Source

from . import cn_builders as cb
from .conftest import require

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = sys.platform.startswith("linux") and os.geteuid() == 0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the service is Linux-only")


# --- a source the test drives, and a server on a temp socket ------------------------------------------------


class FeedSource(Source):
    """Pushes exactly what the test hands it (records, or ints: source losses), then notifies."""

    name = "feed"
    delivers = frozenset({"process_create", "process_exit"})

    def __init__(self) -> None:
        self._queue: list = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self.fail_with: BaseException | None = None

    def run(self, sink) -> None:
        while not self._stopped.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            with self._lock:
                batch, self._queue = self._queue, []
            for item in batch:
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, int):
                    sink.push_lost(item)
                else:
                    sink.push(item)
            if batch:
                sink.notify()

    def feed(self, items) -> None:
        with self._lock:
            self._queue.extend(items)
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()


class Served:
    """A Monitor on a FeedSource behind a Server on a temp socket, served from a thread."""

    def __init__(self, path: str, **server_options) -> None:
        self.source = FeedSource()
        self.monitor = etwmon.Monitor(self.source, max_items=200_000, max_bytes=64 << 20).start()
        self.path = path
        self.server = Server(self.monitor, path, **server_options).open()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive(), "the server did not stop"

    def close(self) -> None:
        if self.thread.is_alive():
            self.stop()
        self.server.close()
        self.monitor.close()


@pytest.fixture
def sockdir():
    path = tempfile.mkdtemp(prefix="etwmon-svc-")
    yield path
    subprocess.run(["rm", "-rf", path])


@pytest.fixture
def served(sockdir):
    s = Served(os.path.join(sockdir, "s.sock"))
    yield s
    s.close()


def creates(first: int, count: int, text: str = "cmd") -> list[bytes]:
    return [R.encode_process_create(i, i, 1, 2, 3, f"{text} {i}") for i in range(first, first + count)]


def read_all(conn, want: int, timeout: float = 20.0, bufsize: int = 0x10000) -> list:
    """Events from ``conn`` until ``want`` non-RecordsLost events arrived (or the timeout: then fail)."""
    buf = bytearray(bufsize)
    out: list = []
    deadline = time.monotonic() + timeout
    while sum(e.type != ItemType.RecordsLost for e in out) < want:
        assert time.monotonic() < deadline, f"only {len(out)} events of {want} arrived"
        n = conn.readinto(buf)
        if n:
            out.extend(etwmon.parse(bytes(buf[:n])))
        else:
            conn.wait(0.5)
    return out


def read_until_end(conn, bufsize: int = 0x10000, timeout: float = 30.0) -> bytes:
    buf = bytearray(bufsize)
    out = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "the stream did not end"
        n = conn.readinto(buf)
        if n:
            out += buf[:n]
            continue
        if not conn.running:
            return bytes(out)
        conn.wait(0.5)


def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# --- the readinto contract over the socket --------------------------------------------------------------------


def test_records_cross_the_socket_byte_for_byte_in_order(served):
    records = creates(0, 3000) + [R.encode_process_exit(i, i, i % 256) for i in range(3000)]
    with connect(served.path, max_items=10_000) as conn:
        served.source.feed(records)
        buf = bytearray(0x10000)
        got = bytearray()
        want = sum(map(len, records))
        while len(got) < want:
            n = conn.readinto(buf)
            got += buf[:n]
            if not n:
                assert conn.wait(10), "records stopped coming"
        assert bytes(got) == b"".join(records)
        s = conn.stats
        assert (s.read, s.dropped, s.lost, s.reported, s.items) == (6000, 0, 0, 0, 0)


def test_first_record_that_does_not_fit_stays_for_next_time(served):
    with connect(served.path) as conn:
        records = [R.encode_process_create(1, 1, 1, 1, 1, "x" * 30), R.encode_process_exit(2, 2, 0),
                   R.encode_process_create(3, 3, 1, 1, 1, "y" * 100)]
        served.source.feed(records)
        wait_for(lambda: conn.wait(0.2), what="records")
        sizes = [len(r) for r in records]
        buf = bytearray(sizes[0] + sizes[1] + 10)  # room for two and a bit: the third waits
        assert conn.readinto(buf) == sizes[0] + sizes[1]
        assert bytes(buf[:sizes[0] + sizes[1]]) == records[0] + records[1]
        with pytest.raises(etwmon.BufferTooSmall) as info:
            conn.readinto(bytearray(sizes[2] - 1))
        assert info.value.needed == sizes[2]  # nothing was consumed: the same record is still next
        assert conn.readinto(buf := bytearray(sizes[2])) == sizes[2] and bytes(buf) == records[2]
        assert conn.readinto(bytearray(100)) == 0


def test_a_slow_clients_losses_come_first_and_add_up_exactly(served):
    with connect(served.path, max_items=100) as slow, connect(served.path, max_items=10_000) as fast:
        served.source.feed(creates(0, 1000))
        got_fast = read_all(fast, 1000)
        assert [e.pid for e in got_fast] == list(range(1000))  # the other client is not touched
        wait_for(lambda: slow.stats.pushed == 1000, what="the slow client's queue to take all")
        events = read_all(slow, 100)
        assert isinstance(events[0], etwmon.RecordsLost) and events[0].count == 900
        assert [e.pid for e in events[1:]] == list(range(900, 1000))  # the newest stay, in order
        s = slow.stats
        assert (s.pushed, s.dropped, s.reported, s.read, s.lost) == (1000, 900, 900, 100, 0)


def test_the_servers_own_losses_reach_every_client_in_band(served):
    with connect(served.path) as a, connect(served.path) as b:
        served.source.feed(creates(0, 5) + [7] + creates(5, 5))  # the source says it missed 7
        for conn in (a, b):
            events = read_all(conn, 10)
            lost = [e for e in events if isinstance(e, etwmon.RecordsLost)]
            assert sum(e.count for e in lost) == 7
            assert [e.pid for e in events if not isinstance(e, etwmon.RecordsLost)] == list(range(10))
            assert conn.stats.lost == 7 and conn.stats.reported == 7


def test_events_async_and_fileno_read_like_a_monitor(served):
    import asyncio

    with connect(served.path) as conn:
        served.source.feed(creates(0, 50))
        # fileno() is readable while records wait, also those already received but not taken yet.
        assert select.select([conn.fileno()], [], [], 10)[0]
        small = bytearray(200)
        assert conn.readinto(small) > 0
        assert conn.readable()
        assert select.select([conn.fileno()], [], [], 0)[0], "records are waiting but fileno() is not readable"
        got = [e.pid for e in conn.events(timeout=0.5)]
        assert got and got[-1] == 49

        async def take(n):
            out = []
            async for event in conn:
                out.append(event.pid)
                if len(out) == n:
                    return out

        served.source.feed(creates(100, 20))
        assert asyncio.run(asyncio.wait_for(take(20), 10)) == list(range(100, 120))
        assert conn.source.name == "feed"


def test_server_side_filters_keep_filtered_events_off_the_socket(served):
    with connect(served.path, types="exit") as exits, connect(served.path, match=["needle"]) as matched, \
            connect(served.path) as everything:
        served.source.feed(creates(0, 10) + creates(10, 2, "needle") + [R.encode_process_exit(20, 11, 0)]
                           + [R.encode_process_exit(21, 3, 0)])
        assert len(read_all(everything, 14)) == 14
        wait_for(lambda: exits.stats.pushed == 2, what="two exits queued")
        assert [(e.type, e.pid) for e in read_all(exits, 2)] == [(ItemType.ProcessExit, 11),
                                                                 (ItemType.ProcessExit, 3)]
        assert [(e.type, e.pid) for e in read_all(matched, 3)] == [
            (ItemType.ProcessCreate, 10), (ItemType.ProcessCreate, 11), (ItemType.ProcessExit, 11)]
        assert matched.stats.pushed == 3  # the rest never crossed the socket


def test_a_bad_filter_is_refused_with_the_reason(served):
    with pytest.raises(etwmon.ServiceRefused) as info:
        connect(served.path, types="nonsense")
    assert "nonsense" in str(info.value) and info.value.code == "bad-hello"


def test_caps_beyond_the_servers_limits_are_cut_to_them(sockdir):
    s = Served(os.path.join(sockdir, "s.sock"), limits=ServerLimits(client_max_items=50, client_max_bytes=1 << 17))
    try:
        with connect(s.path, max_items=10**9, max_bytes=10**12) as conn:
            assert (conn.granted["max_items"], conn.granted["max_bytes"]) == (50, 1 << 17)
            assert (conn.stats.max_items, conn.stats.max_bytes) == (50, 1 << 17)
    finally:
        s.close()


# --- the end of the stream ------------------------------------------------------------------------------------


def test_a_stopping_server_delivers_what_is_queued_then_ends_cleanly(served):
    conn = connect(served.path)
    served.source.feed(creates(0, 500))
    wait_for(lambda: conn.stats.pushed == 500, what="records queued")
    served.stop()
    data = read_until_end(conn)
    assert [e.pid for e in etwmon.parse(data)] == list(range(500))
    assert not conn.running and not conn.wait(0.1) and conn.readinto(bytearray(100)) == 0  # an end, no error
    conn.close()


def test_a_failing_source_ends_every_client_with_source_error(served):
    conn = connect(served.path)
    served.source.feed(creates(0, 3) + [RuntimeError("the kernel went away")])
    with pytest.raises(etwmon.SourceError, match="the kernel went away"):
        read_until_end(conn)
    served.thread.join(10)
    assert isinstance(served.error, etwmon.SourceError)
    conn.close()


def test_nobody_there_is_a_clear_error(sockdir):
    with pytest.raises(etwmon.ServiceUnavailable, match="no etwmon service at"):
        connect(os.path.join(sockdir, "missing.sock"))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.path.join(sockdir, "stale.sock"))
    stale.close()  # a socket file nobody listens on
    with pytest.raises(etwmon.ServiceUnavailable, match="nothing listens"):
        connect(os.path.join(sockdir, "stale.sock"))


def test_a_stale_socket_is_replaced_but_a_live_server_is_not(sockdir):
    path = os.path.join(sockdir, "s.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    s = Served(path)
    try:
        with connect(path) as conn:
            assert conn.running
        other = etwmon.Monitor(FeedSource())
        other.start()
        try:
            with pytest.raises(etwmon.Error, match="another etwmon service is listening"):
                Server(other, path).open()
        finally:
            other.close()
    finally:
        s.close()
    assert not os.path.exists(path)  # close() removes its own socket


def test_something_else_at_the_socket_path_is_never_removed(sockdir):
    path = os.path.join(sockdir, "s.sock")
    Path(path).write_text("precious")
    mon = etwmon.Monitor(FeedSource()).start()
    try:
        with pytest.raises(SafeDirError, match="is not a socket"):
            Server(mon, path).open()
    finally:
        mon.close()
    assert Path(path).read_text() == "precious"


# --- hostile clients ------------------------------------------------------------------------------------------


def raw_client(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def refusal(sock: socket.socket) -> dict:
    """The REFUSED message the server sent before closing."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    kind, _, length = P.HEADER.unpack_from(data)
    assert kind == P.REFUSED, data[:40]
    return json.loads(data[8:8 + length])


def assert_still_serving(served) -> None:
    with connect(served.path) as conn:
        served.source.feed(creates(0, 3))
        assert [e.pid for e in read_all(conn, 3)][-3:] == [0, 1, 2]
    assert served.thread.is_alive() and served.error is None


@pytest.mark.parametrize("message, code", [
    (b"GET / HTTP/1.1\r\n\r\n", "protocol"),  # garbage: a huge length field
    (P.HEADER.pack(P.HELLO, 0, 0xFFFFFFFF), "protocol"),
    (P.frame(P.HELLO, b"\xff\xfe not json"), "bad-hello"),
    (P.frame(P.HELLO, b"[" * 10000), "bad-hello"),
    (P.frame(P.STATS_REQUEST), "bad-hello"),
    (P.json_frame(P.HELLO, {"version": 99}), "version"),
    (P.json_frame(P.HELLO, {"version": 1, "max_items": -5}), "bad-hello"),
    (P.json_frame(P.HELLO, {"version": 1, "filter": {"pids": ["x"] * 5}}), "bad-hello"),
    (P.json_frame(P.HELLO, {"version": 1, "filter": {"match": ["a" * 5000]}}), "bad-hello"),
])
def test_bad_messages_get_a_refusal_naming_why(served, message, code):
    sock = raw_client(served.path)
    sock.sendall(message)
    answer = refusal(sock)
    assert answer["code"] == code and answer["error"]
    sock.close()
    assert_still_serving(served)


def test_half_a_message_and_silence_are_cut_off_at_the_hello_deadline(sockdir):
    s = Served(os.path.join(sockdir, "s.sock"), limits=ServerLimits(hello_timeout=0.3))
    try:
        half = raw_client(s.path)
        half.sendall(P.json_frame(P.HELLO, {"version": 1})[:10])
        silent = raw_client(s.path)
        for sock in (half, silent):
            assert "no HELLO" in refusal(sock)["error"]
        wait_for(lambda: s.server.clients == 0, what="the server to drop them")
        assert_still_serving(s)
    finally:
        s.close()


def test_a_client_that_never_reads_costs_a_bounded_queue_and_stalls_nobody(served):
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(served.path)
    idle.sendall(P.json_frame(P.HELLO, {"version": 1, "max_items": 1000, "max_bytes": 1 << 17}))
    for _ in range(50):
        idle.sendall(P.frame(P.STATS_REQUEST))  # asking for stats it never reads: still bounded
    with connect(served.path, max_items=100_000, max_bytes=16 << 20) as reader:
        total = 0
        for round_ in range(10):
            batch = creates(total, 5000)
            served.source.feed(batch)
            total += len(batch)
            events = read_all(reader, 5000)
            assert [e.pid for e in events] == list(range(total - 5000, total))
        client = next(c for c in served.server._clients.values() if c.ring and c.ring.max_items == 1000)
        st_ = client.ring.stats
        assert st_.items <= 1000 and st_.bytes <= 1 << 17  # bounded, whatever it is sent
        assert st_.pushed == total and st_.dropped + st_.items + st_.read == total
        assert len(client.control) <= 1  # the WELCOME at most; stats requests coalesce
    idle.close()


def test_a_thousand_connections_are_refused_beyond_the_limit_and_cost_nothing_after(sockdir):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 4096)
    require(want >= 1100, f"the open-file limit ({hard}) is below 1100: cannot hold 1000 connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    s = Served(os.path.join(sockdir, "s.sock"), limits=ServerLimits(max_clients=16))
    socks = []
    try:
        fds_before = len(os.listdir("/proc/self/fd"))
        for _ in range(1000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(s.path)  # blocking: waits while the backlog is full, until the server accepts more
            socks.append(sock)
        codes = {}
        deadline = time.monotonic() + 30
        for sock in socks:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                try:
                    sock.sendall(P.json_frame(P.HELLO, {"version": 1}))
                except BrokenPipeError:
                    pass  # refused and closed already: the refusal is still there to read
                kind, _, length = P.HEADER.unpack(sock.recv(8, socket.MSG_WAITALL))
                body = json.loads(sock.recv(length, socket.MSG_WAITALL)) if length else {}
                codes[kind, body.get("code")] = codes.get((kind, body.get("code")), 0) + 1
            except (OSError, struct.error) as exc:
                codes[type(exc).__name__] = codes.get(type(exc).__name__, 0) + 1
        assert codes.get((P.WELCOME, None)) == 16
        assert codes.get((P.REFUSED, "too-many-clients")) == 984, codes
        assert s.server.clients == 16
        for sock in socks:
            sock.close()
        socks.clear()
        wait_for(lambda: s.server.clients == 0, what="the server to see them go")
        assert len(os.listdir("/proc/self/fd")) <= fds_before + 2  # (this process holds both ends)
        assert_still_serving(s)
    finally:
        for sock in socks:
            sock.close()
        s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.one_of(
    st.binary(max_size=64),
    st.builds(lambda kind, length, body: P.HEADER.pack(kind, 0, length) + body,
              st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF), st.binary(max_size=32)),
    st.builds(lambda obj: P.json_frame(P.HELLO, obj), st.dictionaries(
        st.sampled_from(["version", "max_items", "max_bytes", "filter", "x"]),
        st.one_of(st.integers(-5, 2**40), st.none(), st.text(max_size=8), st.booleans(),
                  st.dictionaries(st.sampled_from(["types", "pids", "match", "glob", "descendants"]),
                                  st.one_of(st.lists(st.integers(-1, 2**33), max_size=3),
                                            st.lists(st.text(max_size=5), max_size=3), st.booleans())))))),
    max_size=6))
def test_protocol_fuzz_never_crashes_or_stalls_the_server(fuzz_server, chunks):
    s = fuzz_server
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(s.path)
    sock.settimeout(2)
    try:
        for chunk in chunks:
            sock.sendall(chunk)
    except OSError:
        pass  # the server may already have cut it off
    sock.close()
    assert s.thread.is_alive() and s.error is None
    # And a well-behaved client is served at once.
    with connect(s.path, timeout=5) as conn:
        assert conn.running


@pytest.fixture(scope="module")
def fuzz_server():
    path = tempfile.mkdtemp(prefix="etwmon-fuzz-")
    s = Served(os.path.join(path, "s.sock"), limits=ServerLimits(hello_timeout=0.5, max_clients=64))
    yield s
    s.close()
    subprocess.run(["rm", "-rf", path])


# --- the safe runtime directory -------------------------------------------------------------------------------


def test_private_directory_is_made_safe_and_refuses_what_is_not(sockdir):
    target = os.path.join(sockdir, "run")
    fd = private_directory(target)
    os.close(fd)
    st_ = os.lstat(target)
    assert stat.S_ISDIR(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o700 and st_.st_uid == os.geteuid()
    fd = private_directory(target, group=os.getegid())
    os.close(fd)
    assert stat.S_IMODE(os.lstat(target).st_mode) == 0o710  # the group may reach a socket, not list
    fd = private_directory(target)
    os.close(fd)
    assert stat.S_IMODE(os.lstat(target).st_mode) == 0o710  # never tightened behind another user's back
    os.chmod(target, 0o775)
    with pytest.raises(SafeDirError, match="writable by others"):
        private_directory(target)
    link = os.path.join(sockdir, "link")
    os.symlink(target, link)
    with pytest.raises(SafeDirError, match="symlink"):
        private_directory(link)
    os.chmod(sockdir, 0o777)
    try:
        with pytest.raises(SafeDirError, match="without the sticky bit"):
            private_directory(os.path.join(sockdir, "other"))
    finally:
        os.chmod(sockdir, 0o700)


@pytest.mark.root
def test_private_directory_refuses_one_owned_by_another_user(sockdir):
    target = os.path.join(sockdir, "planted")
    os.mkdir(target, 0o700)
    os.chown(target, 65534, 65534)
    with pytest.raises(SafeDirError, match="belongs to uid 65534"):
        private_directory(target)


def test_open_private_file_never_follows_a_symlink(sockdir):
    fd = private_directory(os.path.join(sockdir, "run"))
    try:
        victim = os.path.join(sockdir, "victim")
        Path(victim).write_text("keep")
        os.symlink(victim, "lock", dir_fd=fd)
        with pytest.raises(OSError):
            open_private_file(fd, "lock")
        assert Path(victim).read_text() == "keep"
        os.unlink("lock", dir_fd=fd)
        lock = open_private_file(fd, "lock")
        assert stat.S_IMODE(os.fstat(lock).st_mode) == 0o600
        os.close(lock)
    finally:
        os.close(fd)
