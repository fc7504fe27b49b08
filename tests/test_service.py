"""The etwmon service over a real Unix socket: the readinto contract through it, per-client queues and exact
loss accounting, server-side filters, access control, hostile clients, the daemon's systemd behaviour, and
live storms with the kernel source (root)."""

from __future__ import annotations

import json
import os
import resource
import select
import shutil
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

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import etwmon
from etwmon import records as R
from etwmon.records import ItemType
from etwmon.safedir import SafeDirError, open_private_file, private_directory
from etwmon.service import Server, ServerLimits, connect
from etwmon.service import protocol as P

from .conftest import require
from .helpers import InThread, ScriptedSource

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = sys.platform.startswith("linux") and os.geteuid() == 0

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the service is Linux-only")


# --- a source the test drives, and a server on a temp socket ------------------------------------------------


def feed(source: ScriptedSource, items) -> None:
    """Hand the scripted source records (bytes), source losses (ints) and failures (exceptions), in order."""
    batch: list[bytes] = []
    for item in items:
        if isinstance(item, (bytes, bytearray)):
            batch.append(item)
            continue
        if batch:
            source.commands.put(("records", batch))
            batch = []
        source.commands.put(("fail", item) if isinstance(item, BaseException) else ("lost", item))
    if batch:
        source.commands.put(("records", batch))


class Served(InThread):
    """A Monitor on a ScriptedSource behind a Server on a temp socket, served from a thread."""

    def __init__(self, path: str, **server_options) -> None:
        self.source = ScriptedSource()
        self.monitor = etwmon.Monitor(self.source, max_items=200_000, max_bytes=64 << 20, identity=False).start()
        self.path = path
        self.server = Server(self.monitor, path, **server_options).open()
        self._start(self.server.serve_forever)

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
        feed(served.source, records)
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
        assert s.source_stats == served.monitor.stats.source_stats and s.server["pushed"] == 6000


def test_first_record_that_does_not_fit_stays_for_next_time(served):
    with connect(served.path) as conn:
        records = [R.encode_process_create(1, 1, 1, 1, 1, "x" * 30), R.encode_process_exit(2, 2, 0),
                   R.encode_process_create(3, 3, 1, 1, 1, "y" * 100)]
        feed(served.source, records)
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
        feed(served.source, creates(0, 1000))
        got_fast = read_all(fast, 1000)
        assert [e.pid for e in got_fast] == list(range(1000))  # the other client is not touched
        wait_for(lambda: slow.stats.pushed == 1000, what="the slow client's queue to take all")
        events = read_all(slow, 100)
        assert isinstance(events[0], etwmon.RecordsLost) and events[0].count == 900
        assert [e.pid for e in events[1:]] == list(range(900, 1000))  # the newest stay, in order
        s = slow.stats
        assert (s.pushed, s.dropped, s.reported, s.read, s.lost) == (1000, 900, 900, 100, 0)


def test_the_servers_own_losses_reach_every_client_in_band_where_they_happened(served, caplog):
    caplog.set_level("WARNING", logger="etwmon.service")
    with connect(served.path) as a, connect(served.path, types="create") as b:
        feed(served.source, creates(0, 5) + [7] + creates(5, 5))  # the source says it missed 7
        for conn in (a, b):
            events = read_all(conn, 10)
            assert [("lost", e.count) if isinstance(e, etwmon.RecordsLost) else e.pid for e in events] == \
                [0, 1, 2, 3, 4, ("lost", 7), 5, 6, 7, 8, 9]
            assert conn.stats.lost == 7 and conn.stats.reported == 7
    assert "lost 7 records" in caplog.text  # and the service's log says so


def test_events_async_and_fileno_read_like_a_monitor(served):
    import asyncio

    with connect(served.path) as conn:
        feed(served.source, creates(0, 50))
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

        feed(served.source, creates(100, 20))
        assert asyncio.run(asyncio.wait_for(take(20), 10)) == list(range(100, 120))
        assert conn.source.name == "scripted"


def test_server_side_filters_keep_filtered_events_off_the_socket(served):
    with connect(served.path, types="exit") as exits, connect(served.path, match=["needle"]) as matched, \
            connect(served.path) as everything:
        feed(served.source, creates(0, 10) + creates(10, 2, "needle") + [R.encode_process_exit(20, 11, 0)]
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
    feed(served.source, creates(0, 500))
    wait_for(lambda: conn.stats.pushed == 500, what="records queued")
    served.stop()
    data = read_until_end(conn)
    assert [e.pid for e in etwmon.parse(data)] == list(range(500))
    assert not conn.running and not conn.wait(0.1) and conn.readinto(bytearray(100)) == 0  # an end, no error
    conn.close()


def test_a_failing_source_ends_every_client_with_source_error(served):
    conn = connect(served.path)
    feed(served.source, creates(0, 3) + [RuntimeError("the kernel went away")])
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
        other = etwmon.Monitor(ScriptedSource(), identity=False)
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
    mon = etwmon.Monitor(ScriptedSource(), identity=False).start()
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
        feed(served.source, creates(0, 3))
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
            feed(served.source, batch)
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
    fd = private_directory(target)  # e.g. the audit lock while the service runs: accepted, left as it is
    os.close(fd)
    assert stat.S_IMODE(os.lstat(target).st_mode) == 0o710
    for mode in (0o750, 0o711, 0o730, 0o775):
        os.chmod(target, mode)
        with pytest.raises(SafeDirError, match=f"mode is {mode:04o}, not 0700"):
            private_directory(target)
    link = os.path.join(sockdir, "link")
    os.symlink(target, link)
    with pytest.raises(SafeDirError, match="symbolic link"):
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
    with pytest.raises(SafeDirError, match="owned by uid 65534, not by root"):
        private_directory(target)


def test_open_private_file_never_follows_a_symlink(sockdir):
    fd = private_directory(os.path.join(sockdir, "run"))
    try:
        victim = os.path.join(sockdir, "victim")
        Path(victim).write_text("keep")
        os.symlink(victim, "lock", dir_fd=fd)
        with pytest.raises(SafeDirError, match="symbolic link"):
            open_private_file(fd, "lock")
        assert Path(victim).read_text() == "keep"
        os.unlink("lock", dir_fd=fd)
        os.link(victim, "lock", dst_dir_fd=fd)
        with pytest.raises(SafeDirError, match="hard links"):
            open_private_file(fd, "lock")
        os.unlink("lock", dir_fd=fd)
        lock = open_private_file(fd, "lock")
        assert stat.S_IMODE(os.fstat(lock).st_mode) == 0o600
        os.close(lock)
    finally:
        os.close(fd)


# --- `etwmon serve` as a process: systemd behaviour, kills, access control, a live storm (root) ---------------


class Daemon:
    """``etwmon serve --source netlink`` on a temp socket, started the way systemd does (NOTIFY_SOCKET)."""

    def __init__(self, sockdir: str, *args: str, name: str = "s.sock") -> None:
        self.path = os.path.join(sockdir, name)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = tempfile.mktemp(prefix="notify-", dir=sockdir)
        self.notify.bind(notify_path)
        self.notify.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "etwmon", "serve", "--socket", self.path,
                                      "--source", "netlink", *args],
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()
        try:
            self.ready = self.notify.recv(4096).decode()
        except socket.timeout:
            self.proc.kill()
            raise AssertionError("no READY=1 from etwmon serve: " + "".join(self.lines))

    def _collect(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 20) -> int:
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        self.notify.close()
        return code


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


@pytest.mark.root
def test_serve_notifies_systemd_logs_clients_reopens_logs_and_stops_on_sigterm(sockdir, daemons):
    log_file = os.path.join(sockdir, "etwmon.log")
    d = Daemon(sockdir, "--log-file", log_file)
    daemons.append(d)
    assert "READY=1" in d.ready and d.path in d.ready
    conn = connect(d.path)
    assert conn.source.name == "netlink"
    outcome: dict = {}

    def keep_reading():  # a client that reads, as a real one does: it gets everything, then the END
        try:
            read_until_end(conn, timeout=60)
            outcome["end"] = conn._end
        except BaseException as exc:
            outcome["end"] = exc

    reader = threading.Thread(target=keep_reading, daemon=True)
    reader.start()
    os.rename(log_file, log_file + ".1")  # what logrotate does, then it sends SIGHUP
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: os.path.exists(log_file) and "re-opened" in Path(log_file).read_text(), what="log re-open")
    d.proc.send_signal(signal.SIGTERM)
    assert d.notify.recv(4096) == b"STOPPING=1"
    assert d.stop(sig=None) == 0
    reader.join(60)
    assert outcome["end"] == {"reason": "SIGTERM received", "error": False}  # an END, not an error
    assert not conn.running
    conn.close()
    log = d.log()
    assert f"uid 0 (root), pid {os.getpid()}) connected" in log
    assert f"pid {os.getpid()}) disconnected" in log and "SIGTERM received" in log
    assert "connected" in Path(log_file + ".1").read_text()
    assert not os.path.exists(d.path)  # the socket goes with the service


@pytest.mark.root
def test_a_killed_server_ends_its_clients_with_source_error_not_a_hang(sockdir, daemons):
    d = Daemon(sockdir)
    daemons.append(d)
    waiting, reading = connect(d.path), connect(d.path)
    outcome: dict = {}

    def block_in_wait():
        try:
            while waiting.wait(None):
                waiting.readinto(bytearray(0x10000))
            outcome["wait"] = "returned"
        except etwmon.SourceError as exc:
            outcome["wait"] = exc

    thread = threading.Thread(target=block_in_wait, daemon=True)
    thread.start()
    d.proc.kill()
    d.proc.wait()
    thread.join(10)
    assert not thread.is_alive(), "a client blocked in wait() hung after the server was killed"
    assert isinstance(outcome["wait"], etwmon.SourceError) and "killed" in str(outcome["wait"])
    with pytest.raises(etwmon.SourceError, match="without an END"):
        read_until_end(reading)
    assert not reading.running
    waiting.close()
    reading.close()
    # The killed server left its socket behind; the next one replaces it.
    d2 = Daemon(sockdir)
    daemons.append(d2)
    with connect(d2.path) as conn:
        assert conn.running
    assert d2.stop() == 0


CLIENT_LOOP = """
import sys, etwmon
conn = etwmon.connect(sys.argv[1])
print("connected", flush=True)
buf = bytearray(4096)
while True:
    conn.wait(1)
    conn.readinto(buf)
"""


@pytest.mark.root
def test_a_client_killed_mid_read_is_dropped_and_the_others_go_on(sockdir, daemons, storm_tools):
    d = Daemon(sockdir)
    daemons.append(d)
    with connect(d.path, max_items=200_000, max_bytes=16 << 20) as other:
        child = subprocess.Popen([sys.executable, "-c", CLIENT_LOOP, d.path], stdout=subprocess.PIPE, text=True,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert child.stdout.readline().strip() == "connected"
        wait_for(lambda: other.stats.server.get("clients") == 2, what="two clients")
        storm = subprocess.Popen([str(storm_tools["threads"]), "5000", "16"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.05)
        child.kill()  # in the middle of its reading
        child.wait()
        out = storm.communicate(timeout=60)[0].split()
        pid, tids = int(out[0]), {int(t) for t in out[1:]}
        wait_for(lambda: f"pid {child.pid}) disconnected" in d.log(), what="the server to log the drop")
        seen: set[int] = set()
        deadline = time.monotonic() + 30
        while not tids <= seen:
            assert time.monotonic() < deadline, f"{len(tids - seen)} storm threads never arrived"
            for event in other.events(timeout=0.5):
                if event.type == ItemType.ThreadExit and event.pid == pid:
                    seen.add(event.tid)
                if tids <= seen:
                    break
        s = other.stats
        assert s.server["clients"] == 1 and s.dropped == 0 and s.lost == 0
    assert d.stop() == 0


NOBODY_CLIENT = """
import sys, etwmon
try:
    with etwmon.connect(sys.argv[1]) as conn:
        print("ok", conn.source.name)
except etwmon.ServiceRefused as exc:
    print("refused", exc.code, exc)
"""


@pytest.fixture(scope="module")
def nobody_python(tmp_path_factory):
    """(interpreter, PYTHONPATH) that uid nobody can run: the system Python with Debian's numpy, and a copy of
    this tree's etwmon in a directory anyone may read (the checkout may sit under a private home)."""
    require(shutil.which("runuser") is not None, "needs runuser (util-linux)")
    python = "/usr/bin/python3"
    require(subprocess.run([python, "-c", "import numpy"], capture_output=True).returncode == 0,
            "uid nobody needs a Python with numpy: apt-get install python3-numpy")
    place = tempfile.mkdtemp(prefix="etwmon-nobody-")
    shutil.copytree(ROOT / "etwmon", os.path.join(place, "etwmon"))
    subprocess.run(["chmod", "-R", "a+rX", place], check=True)
    yield python, place
    shutil.rmtree(place)


def run_as_nobody(nobody_python, path: str) -> str:
    python, pythonpath = nobody_python
    done = subprocess.run(["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={pythonpath}", python, "-c",
                           NOBODY_CLIENT, path], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture
def open_dir(sockdir):
    os.chmod(sockdir, 0o755)  # so the socket's own mode and the credentials check decide
    return sockdir


@pytest.mark.root
def test_an_unauthorized_uid_is_refused_naming_why(open_dir, daemons, nobody_python):
    d = Daemon(open_dir, "--socket-mode", "0666")
    daemons.append(d)
    answer = run_as_nobody(nobody_python, d.path)
    assert answer.startswith("refused not-allowed") and "uid 65534 (nobody)" in answer and "--allow-uid" in answer
    assert "refused client" in d.log() and "uid 65534 (nobody)" in d.log()
    assert d.stop() == 0


@pytest.mark.root
def test_an_allowed_uid_reads_and_the_socket_mode_alone_keeps_others_out(open_dir, daemons, nobody_python):
    allowed = Daemon(open_dir, "--socket-mode", "0666", "--allow-uid", "nobody", name="a.sock")
    daemons.append(allowed)
    assert run_as_nobody(nobody_python, allowed.path) == "ok netlink"
    assert "uid 65534 (nobody)" in allowed.log() and "connected" in allowed.log()
    private = Daemon(open_dir, name="p.sock")  # default mode 0600
    daemons.append(private)
    assert stat.S_IMODE(os.stat(private.path).st_mode) == 0o600
    answer = run_as_nobody(nobody_python, private.path)
    assert answer.startswith("refused permission") and "0600 root:root" in answer
    assert allowed.stop() == 0 and private.stop() == 0


def split_records(data: bytes) -> list:
    """Each record of a stream: its bytes, or ("lost", count) for a RecordsLost record."""
    out = []
    for offset, item, size, _ in R.record_headers(data).tolist():
        if item == int(ItemType.RecordsLost):
            out.append(("lost", struct.unpack_from("<I", data, offset + 16)[0]))
        else:
            out.append(data[offset:offset + size])
    return out


@pytest.mark.root
def test_three_clients_under_a_storm_readers_get_everything_once_in_order_the_idle_ones_losses_add_up(
        sockdir, daemons, storm_tools):
    d = Daemon(sockdir, "--max-items", "1000000", "--max-bytes", "256M")
    daemons.append(d)
    a = connect(d.path, max_items=100_000, max_bytes=16 << 20)
    b = connect(d.path, max_items=100_000, max_bytes=16 << 20)
    idle = connect(d.path, max_items=1000)
    streams: dict[str, bytes] = {}

    def reader(name, conn):
        streams[name] = read_until_end(conn, timeout=120)

    threads = [threading.Thread(target=reader, args=(name, conn), daemon=True) for name, conn in (("a", a), ("b", b))]
    for t in threads:
        t.start()
    storm = subprocess.run([str(storm_tools["threads"]), "20000", "64"], capture_output=True, text=True,
                           timeout=120, check=True)
    out = storm.stdout.split()
    pid, tids = int(out[0]), [int(t) for t in out[1:]]
    time.sleep(1.0)  # the storm's last events reach the queues
    late = threading.Thread(target=reader, args=("idle", idle), daemon=True)
    late.start()  # the idle client starts reading only now: its queue overflowed long ago
    time.sleep(1.0)
    assert d.stop() == 0
    for t in threads + [late]:
        t.join(120)
        assert not t.is_alive()
    full, second, lossy = (split_records(streams[k]) for k in ("a", "b", "idle"))
    # The readers: nothing lost, every storm thread's create and exit, each once, the same order for both.
    assert not [r for r in full if isinstance(r, tuple)] and not [r for r in second if isinstance(r, tuple)]
    assert second == full[len(full) - len(second):]
    events = list(etwmon.parse(b"".join(full)))
    created = [e.tid for e in events if e.type == ItemType.ThreadCreate and e.pid == pid]
    exited = [e.tid for e in events if e.type == ItemType.ThreadExit and e.pid == pid]
    assert sorted(created) == sorted(tids) and sorted(exited) == sorted(tids)
    assert len(set(full)) == len(full)  # exactly once
    # The idle one: what it lost is reported where it was lost, and with the records it kept adds up to
    # exactly the readers' stream since it connected.
    reported = sum(r[1] for r in lossy if isinstance(r, tuple))
    kept = [r for r in lossy if not isinstance(r, tuple)]
    assert reported > 0 and len(kept) > 0
    position = len(full) - (reported + len(kept))
    assert position >= 0
    for item in lossy:
        if isinstance(item, tuple):
            position += item[1]
        else:
            assert item == full[position], f"record {position} of the full stream is not where it should be"
            position += 1
    assert position == len(full)
    for conn in (a, b, idle):
        conn.close()


# --- etwmon tail over the service -----------------------------------------------------------------------------


def start_tail(*args: str) -> tuple[subprocess.Popen, str]:
    """``etwmon tail ARGS`` in a process of its own, once it says it is watching (that line is returned)."""
    proc = subprocess.Popen([sys.executable, "-m", "etwmon", "tail", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines = []
    while True:
        line = proc.stderr.readline()
        assert line, "etwmon tail ended before watching: " + "".join(lines)
        lines.append(line)
        if "watching (" in line:
            return proc, line


def test_tail_connect_prints_the_services_events_filtered_in_the_service(served):
    proc, watching = start_tail("--connect", served.path, "--json", "--type", "exit", "--batch-wait", "0")
    try:
        assert f"service: {served.path}, source: scripted" in watching
        wait_for(lambda: served.server.readers == 1, what="the tail to connect")
        feed(served.source, creates(0, 20) + [R.encode_process_exit(30 + i, i, i) for i in range(3)])
        lines = [json.loads(proc.stdout.readline()) for _ in range(3)]
        assert [(o["type"], o["pid"], o["exit_code"]) for o in lines] == [("ProcessExit", i, i) for i in range(3)]
        client = next(iter(served.server._clients.values()))
        assert client.ring.stats.pushed == 3  # the 20 creates never crossed the socket
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "3 records, 3 shown, 0 missed, 0 dropped" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tail_connect_to_nothing_says_so(sockdir):
    done = subprocess.run([sys.executable, "-m", "etwmon", "tail", "--connect", os.path.join(sockdir, "none.sock")],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 1 and "no etwmon service at" in done.stderr


@pytest.mark.root
def test_tail_without_root_uses_the_services_socket_when_one_is_there(open_dir, daemons, nobody_python):
    d = Daemon(open_dir, "--socket-mode", "0666", "--allow-uid", "nobody")
    daemons.append(d)
    python, pythonpath = nobody_python
    proc = subprocess.Popen(["runuser", "-u", "nobody", "--", "env", f"PYTHONPATH={pythonpath}",
                             f"ETWMON_SOCKET={d.path}", python, "-m", "etwmon", "tail", "--json", "--pid",
                             str(os.getpid()), "--descendants", "--batch-wait", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert f"service: {d.path}, source: netlink" in line, line + proc.stderr.read()
        wait_for(lambda: "uid 65534 (nobody)" in d.log() and "reads" in d.log(), what="the tail to connect")
        child = subprocess.run(["sh", "-c", "exit 7"])
        assert child.returncode == 7
        seen = []
        while not any(o["type"] == "ProcessExit" and o.get("exit_code") == 7 for o in seen):
            seen.append(json.loads(proc.stdout.readline()))
    finally:
        proc.terminate()
        proc.wait(30)
    assert d.stop() == 0


def test_the_audit_lock_and_the_services_socket_share_one_safe_directory(sockdir, monkeypatch):
    from etwmon.sources.audit import state as audit_state

    where = os.path.join(sockdir, "run")
    os.close(private_directory(where, group=os.getegid()))  # as `etwmon serve --group G` leaves /run/etwmon
    monkeypatch.setattr(audit_state, "LOCK_DIR", where)
    with audit_state.StateLock():
        pass
    assert stat.S_IMODE(os.lstat(where).st_mode) == 0o710  # the service's group keeps its way to the socket
    assert stat.S_IMODE(os.lstat(os.path.join(where, audit_state.LOCK_NAME)).st_mode) == 0o600


@pytest.mark.parametrize("args, words", [
    (["--socket-mode", "999"], "must be octal"),
    (["--socket-mode", "1777"], "from 0000 to 0777"),
    (["--group", "no-such-group-etwmon"], "no group named"),
    (["--allow-uid", "no-such-user-etwmon"], "no user named"),
    (["--max-clients", "0"], "at least 1"),
    (["--client-max-bytes", "1K"], "at least 65536"),
])
def test_serve_usage_errors_are_one_line_naming_the_fix(args, words):
    done = subprocess.run([sys.executable, "-m", "etwmon", "serve", "--socket", "/nonexistent/x.sock", *args],
                          capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_serve_refuses_a_socket_directory_anyone_may_write(sockdir):
    open_to_all = os.path.join(sockdir, "open")
    os.mkdir(open_to_all)
    os.chmod(open_to_all, 0o777)  # writable by anyone, not sticky: the socket could be swapped
    done = subprocess.run([sys.executable, "-m", "etwmon", "serve", "--source", "procfs", "--socket",
                           os.path.join(open_to_all, "s.sock")], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 1 and "writable by others" in done.stderr, done.stderr
    assert "run as root" not in done.stderr  # the message names the real fix, nothing else
    assert not os.listdir(open_to_all)


@pytest.mark.root
def test_serve_refuses_a_socket_directory_owned_by_another_user(sockdir):
    theirs = os.path.join(sockdir, "theirs")
    os.mkdir(theirs, 0o755)
    os.chown(theirs, 65534, 65534)  # not writable by others, but its owner could swap the socket
    done = subprocess.run([sys.executable, "-m", "etwmon", "serve", "--source", "procfs", "--socket",
                           os.path.join(theirs, "s.sock")], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 1 and "owned by uid 65534" in done.stderr, done.stderr
    assert not os.listdir(theirs)


@pytest.mark.root
def test_group_members_read_through_the_sockets_group_and_supplementary_groups_count(open_dir, daemons,
                                                                                    nobody_python):
    grouped = Daemon(open_dir, "--group", "nogroup", name="g.sock")  # nobody's own group
    daemons.append(grouped)
    st_ = os.stat(grouped.path)
    assert stat.S_IMODE(st_.st_mode) == 0o660 and st_.st_gid == 65534
    assert run_as_nobody(nobody_python, grouped.path) == "ok netlink"
    # --allow-gid with a group the client has only as a supplementary one (SO_PEERGROUPS)
    supplementary = Daemon(open_dir, "--socket-mode", "0666", "--allow-gid", "daemon", name="s.sock")
    daemons.append(supplementary)
    python, pythonpath = nobody_python
    done = subprocess.run(["runuser", "-u", "nobody", "-g", "nogroup", "-G", "daemon", "--", "env",
                           f"PYTHONPATH={pythonpath}", python, "-c", NOBODY_CLIENT, supplementary.path],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok netlink", done.stdout + done.stderr
    assert run_as_nobody(nobody_python, supplementary.path).startswith("refused not-allowed")  # without it: no
    assert grouped.stop() == 0 and supplementary.stop() == 0


def _rules_xml(tag: str, word: str) -> str:
    return (f'<Sysmon schemaversion="4.90"><EventFiltering><RuleGroup name="" groupRelation="or">'
            f'<ProcessCreate onmatch="include"><CommandLine condition="contains" name="picked">{tag}-{word}'
            f'</CommandLine><CommandLine condition="contains" name="sentinel">{tag}-sentinel</CommandLine>'
            f'</ProcessCreate></RuleGroup></EventFiltering>'
            f'<Redaction><Redact name="password">--password=(\\S+)</Redact></Redaction></Sysmon>')


@pytest.mark.root
def test_serve_config_applies_rules_before_clients_and_sighup_reloads_them(sockdir, daemons):
    pytest.importorskip("defusedxml")
    tag = f"svc-{os.getpid()}-{time.monotonic_ns()}"
    config = os.path.join(sockdir, "rules.xml")
    Path(config).write_text(_rules_xml(tag, "first"))
    # bpf: argv read in the kernel at exec (netlink reads /proc afterwards, too late for /bin/true)
    d = Daemon(sockdir, "--config", config, "--source", "bpf")
    daemons.append(d)
    conn = connect(d.path)
    buf = bytearray(0x10000)
    secret = "hunter2".encode("utf-16-le")

    def kept_after_running_both() -> list[str]:
        """Run /bin/true TAG-first and TAG-second (with a secret), then a sentinel the rules always keep; the
        words of the execs that reached this client before the sentinel."""
        for word in ("first", "second"):
            subprocess.run(["/bin/true", f"{tag}-{word}", "--password=hunter2"], check=True)
        subprocess.run(["/bin/true", f"{tag}-sentinel"], check=True)
        kept, deadline = [], time.monotonic() + 30
        while time.monotonic() < deadline:
            if not conn.wait(0.5):
                continue
            n = conn.readinto(buf)
            assert secret not in bytes(buf[:n])  # redacted in the service: the secret never crosses the socket
            for event in etwmon.parse(buf[:n]):
                if event.type != ItemType.ProcessExec or tag not in event.command_line:
                    continue
                word = event.command_line.split()[1].rsplit("-", 1)[1]
                if word == "sentinel":
                    return kept
                assert event.command_line.split()[2] == "--password=***"
                kept.append(word)
        raise AssertionError(f"the sentinel exec never arrived; kept so far: {kept}")

    assert kept_after_running_both() == ["first"]
    Path(config).write_text(_rules_xml(tag, "second"))
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reloaded the rules" in d.log(), what="the rules reload")
    assert kept_after_running_both() == ["second"]
    Path(config).write_text("<Sysmon><EventFiltering>")  # malformed: refused, the rules in force stay
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "were refused" in d.log(), what="the refused reload")
    assert kept_after_running_both() == ["second"]
    conn.close()
    assert d.stop() == 0
