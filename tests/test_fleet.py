"""The fleet: Shippers publishing to a real nats-server (single, restarted, down, clustered), FleetConsumer
reading every host's events back exactly once and in order, and whatever is lost or hostile reported."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from .conftest import REQUIRE_ROOT  # noqa: E402

try:
    import nats
except ImportError:  # CI installs the test extra, which has nats-py: there, missing is a failure
    if REQUIRE_ROOT:
        raise
    pytest.skip("nats-py is not installed (pip install 'etwmon[nats]')", allow_module_level=True)

from etwmon import records as R  # noqa: E402
from etwmon.fleet import (  # noqa: E402
    DEFAULT_STREAM, FleetAuth, FleetConsumer, FleetError, FleetNotice, HostBatch, Shipper, check_host_id,
    default_host_id, load_auth, parse_since, subject_for,
)
from etwmon.monitor import Monitor  # noqa: E402
from etwmon.sources.base import Source  # noqa: E402

from .helpers import InThread  # noqa: E402
from .nats_servers import NatsServer, start_cluster  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class CounterSource(Source):
    """Pushes ThreadCreate records whose tid is 0, 1, 2, ...: ``rate`` per second (0: as fast as it can),
    ``total`` in all (None: until stopped). ``pushed`` is how many went into the ring."""

    name = "counter"
    delivers = frozenset({"thread_create"})

    def __init__(self, total: int | None = 1000, rate: float = 2000.0, burst: int = 50) -> None:
        super().__init__()
        self.total, self.rate, self.burst = total, rate, burst
        self.pushed = 0
        self._stop = threading.Event()

    def run(self, sink) -> None:
        start = time.monotonic()
        while not self._stop.is_set() and (self.total is None or self.pushed < self.total):
            n = self.burst if self.total is None else min(self.burst, self.total - self.pushed)
            for _ in range(n):
                sink.push(R.encode_thread_create(R.filetime_now(), self.pushed, 4242))
                self.pushed += 1
            sink.notify()
            if self.rate:
                ahead = self.pushed / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    self._stop.wait(ahead)
        # stay "running" until stopped, like a kernel source with nothing more to say
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()


class ShipperThread(InThread):
    """A Shipper of a Monitor over ``source`` on its own thread."""

    def __init__(self, url, host: str, source: Source, max_items: int = 100_000, **options) -> None:
        self.monitor = Monitor(source, max_items=max_items)
        self.monitor.start()
        self.shipper = Shipper(self.monitor, url, host, **options)
        self._start(self.shipper.run)

    def stop(self, timeout: float = 30.0) -> None:
        self.shipper.stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the shipper did not stop"
        self.monitor.close()
        if self.error is not None:
            raise self.error


def wait_for_stream(url: str, stream: str = DEFAULT_STREAM, timeout: float = 15.0) -> None:
    async def probe() -> bool:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=1)
        try:
            await nc.jetstream().stream_info(stream)
            return True
        except Exception:
            return False
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if asyncio.run(probe()):
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError(f"stream {stream} did not appear")


def make_stream(url: str, replicas: int = 1, stream: str = DEFAULT_STREAM) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(name=stream, subjects=["etwmon.*.events"], num_replicas=replicas,
                                            duplicate_window=120.0)
        finally:
            await nc.close()

    asyncio.run(go())


class Collector:
    """Reads a FleetConsumer until told what to expect: tids per host, RecordsLost per host, notices."""

    def __init__(self, consumer: FleetConsumer) -> None:
        self.consumer = consumer
        self.tids: dict[str, list[int]] = {}
        self.lost: dict[str, list[tuple[int, bool]]] = {}
        self.notices: list[FleetNotice] = []
        self.others: list = []

    def take(self, items) -> None:
        for item in items:
            if isinstance(item, FleetNotice):
                self.notices.append(item)
                continue
            assert list(R.parse(item.data)) == item.events  # the bytes are the events
            for i, event in enumerate(item.events):
                if isinstance(event, R.RecordsLost):
                    # The consumer's own gap report comes first in a batch with a gap.
                    self.lost.setdefault(item.host, []).append((event.count, i == 0 and item.gap > 0))
                elif isinstance(event, R.ThreadCreate):
                    self.tids.setdefault(item.host, []).append(event.tid)
                else:
                    self.others.append((item.host, event))

    def until(self, done, timeout: float = 30.0, step=None) -> None:
        deadline = time.monotonic() + timeout
        while not done(self):
            assert time.monotonic() < deadline, f"timed out: {self.summary()}"
            self.take(self.consumer.read(0.5))
            if step is not None:
                step()

    def seen(self, host: str) -> int:
        return len(self.tids.get(host, [])) + sum(c for c, _ in self.lost.get(host, []))

    def summary(self) -> str:
        return (f"tids={ {h: len(t) for h, t in self.tids.items()} } lost={self.lost} "
                f"notices={[(n.host, n.kind, n.message) for n in self.notices]} stats={self.consumer.stats}")


@pytest.fixture
def server(tmp_path):
    s = NatsServer(tmp_path).start()
    yield s
    s.stop(signal.SIGKILL)


# --- exactly once, per host in order --------------------------------------------------------------------


def test_three_hosts_to_one_consumer_every_record_once_in_order(server):
    hosts = {"alpha": 3000, "beta": 2000, "gamma-1": 2500}
    make_stream(server.url)
    with FleetConsumer(server.url) as consumer:  # from now on: the shippers start after it
        shippers = [ShipperThread(server.url, host, CounterSource(total=n, rate=4000)) for host, n in hosts.items()]
        col = Collector(consumer)
        col.until(lambda c: all(len(c.tids.get(h, [])) >= n for h, n in hosts.items()))
        for s in shippers:
            s.stop()
        col.take(consumer.read(0.5))
    for host, n in hosts.items():
        assert col.tids[host] == list(range(n)), host
        stats = consumer.stats[host]
        assert (stats.duplicates, stats.batches_lost, stats.records_lost, stats.malformed) == (0, 0, 0, 0)
    assert not col.lost and not col.notices
    for s in shippers:
        assert s.shipper.stats.records == hosts[s.shipper.host]
        assert s.shipper.stats.unsent == 0


@pytest.mark.root
def test_a_real_source_shipped_and_tagged_with_its_host(server):
    """The live kernel source through a Monitor, a Shipper and the server: the exits of processes started here
    arrive tagged with the host, with their exit codes."""
    consumer = FleetConsumer(server.url, hosts=["real-host"], since="all")
    monitor = Monitor("netlink", max_items=100_000)
    monitor.start()
    shipper = Shipper(monitor, server.url, "real-host")
    thread = threading.Thread(target=shipper.run, daemon=True)
    thread.start()
    try:
        wait_for_stream(server.url)
        children = [subprocess.Popen(["/bin/sh", "-c", f"exit {code}"]) for code in (3, 4, 5)]
        expected = {}
        for child in children:
            expected[child.pid] = child.wait()
        with consumer:
            got: dict[int, int] = {}
            deadline = time.monotonic() + 20
            while set(expected) - set(got) and time.monotonic() < deadline:
                for item in consumer.read(0.5):
                    if isinstance(item, HostBatch):
                        assert item.host == "real-host" and item.source == "netlink"
                        got.update((e.pid, e.exit_code) for e in item.events if isinstance(e, R.ProcessExit))
        assert {pid: got.get(pid) for pid in expected} == expected
    finally:
        shipper.stop()
        thread.join(20)
        monitor.close()


# --- the server going away --------------------------------------------------------------------------------


def test_server_restart_mid_stream_loses_nothing_and_duplicates_nothing(server):
    make_stream(server.url)
    total = 6000
    with FleetConsumer(server.url) as consumer:
        shipper = ShipperThread(server.url, "h1", CounterSource(total=total, rate=1500))
        col = Collector(consumer)
        col.until(lambda c: len(c.tids.get("h1", [])) >= 1000)
        server.stop()  # SIGTERM: the server shuts down cleanly, its file store stays
        time.sleep(1.0)
        server.start()
        col.until(lambda c: len(c.tids.get("h1", [])) >= total, timeout=40)
        shipper.stop()
        col.take(consumer.read(0.3))
    assert col.tids["h1"] == list(range(total))
    assert not col.lost and not col.notices
    assert consumer.stats["h1"].records_lost == 0


def test_server_down_ten_seconds_with_a_small_ring_drops_counted_on_the_host_and_seen_as_loss(server):
    make_stream(server.url)
    source = CounterSource(total=None, rate=400, burst=20)
    with FleetConsumer(server.url) as consumer:
        shipper = ShipperThread(server.url, "small", source, max_items=200)
        col = Collector(consumer)
        col.until(lambda c: len(c.tids.get("small", [])) >= 200)
        server.stop()
        time.sleep(10)
        server.start()
        time.sleep(1.5)  # back, and sending again
        shipper.stop()
        pushed = source.pushed
        dropped = shipper.monitor.stats.dropped
        col.until(lambda c: c.seen("small") >= pushed, timeout=30)
        col.take(consumer.read(0.3))
    assert dropped > 1000  # ~4000 pushed while the server was away, into 200 places
    assert sum(c for c, _ in col.lost["small"]) == dropped
    assert all(not gap for _, gap in col.lost["small"])  # the host's own report, not a gap in the stream
    tids = col.tids["small"]
    assert tids == sorted(set(tids)) and len(tids) + dropped == pushed
    assert shipper.shipper.stats.lost_reported == dropped
    assert consumer.stats["small"].records_lost == dropped


def test_cluster_stream_leader_stopped_mid_stream_nothing_lost(tmp_path):
    servers = start_cluster(tmp_path)
    urls = [s.url for s in servers]
    try:
        deadline = time.monotonic() + 20
        while True:  # the cluster needs a moment to elect its JetStream meta leader
            try:
                make_stream(urls[0], replicas=3)
                break
            except Exception:
                assert time.monotonic() < deadline, "the cluster never accepted the stream"
                time.sleep(0.3)

        async def leader() -> str:
            nc = await nats.connect(urls)
            try:
                return (await nc.jetstream().stream_info(DEFAULT_STREAM)).cluster.leader
            finally:
                await nc.close()

        total = 5000
        with FleetConsumer(urls) as consumer:
            shipper = ShipperThread(urls, "c1", CounterSource(total=total, rate=1500))
            col = Collector(consumer)
            col.until(lambda c: len(c.tids.get("c1", [])) >= 1000)
            name = asyncio.run(leader())
            victim = next(s for s in servers if s.name == name)
            victim.stop(signal.SIGKILL)
            col.until(lambda c: len(c.tids.get("c1", [])) >= total, timeout=60)
            shipper.stop()
            col.take(consumer.read(0.3))
        assert asyncio.run(leader()) != name
        assert col.tids["c1"] == list(range(total))
        assert not col.lost and not col.notices
    finally:
        for s in servers:
            s.stop(signal.SIGKILL)


_SHIP_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from tests.test_fleet import CounterSource
    from etwmon.monitor import Monitor
    from etwmon.fleet import Shipper
    source = CounterSource(total=None, rate=1000, burst=10)
    with Monitor(source) as monitor:
        Shipper(monitor, {url!r}, "killed", batch_wait=0.005).run()
""")


def test_shipper_sigkilled_and_restarted_the_consumer_reports_it(server, tmp_path):
    make_stream(server.url)
    script = tmp_path / "ship.py"
    script.write_text(_SHIP_SCRIPT.format(root=str(ROOT), url=server.url))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with FleetConsumer(server.url) as consumer:
        col = Collector(consumer)
        first = subprocess.Popen([sys.executable, str(script)], env=env)
        try:
            col.until(lambda c: len(c.tids.get("killed", [])) >= 500)
            first.send_signal(signal.SIGKILL)
            first.wait()
            seen_first = len(col.tids["killed"])
            col.take(consumer.read(0.5))
            second = subprocess.Popen([sys.executable, str(script)], env=env)
            col.until(lambda c: any(n.kind == "restarted" for n in c.notices)
                      and len(c.tids["killed"]) >= seen_first + 500)
        finally:
            for p in (first, locals().get("second")):
                if p is not None:
                    p.kill()
                    p.wait()
    restarts = [n for n in col.notices if n.kind == "restarted"]
    assert len(restarts) == 1 and restarts[0].host == "killed"
    tids = col.tids["killed"]
    # Run 1: tids 0..k in order, none skipped; then run 2 from 0 again, in order.
    cut = next(i for i in range(1, len(tids)) if tids[i] <= tids[i - 1])
    assert tids[:cut] == list(range(cut))
    assert tids[cut:] == list(range(len(tids) - cut))
    assert consumer.stats["killed"].restarts == 1


def test_the_servers_consumer_deleted_under_the_reader_is_made_again_nothing_lost(server):
    """What a leader change or a server losing its consumers looks like to the reader: it starts again right
    after the last message it read."""
    make_stream(server.url)
    total = 4000

    async def delete_consumers() -> int:
        nc = await nats.connect(server.url)
        try:
            jsm = nc.jsm()
            names = [c.name for c in await jsm.consumers_info(DEFAULT_STREAM)]
            for name in names:
                await jsm.delete_consumer(DEFAULT_STREAM, name)
            return len(names)
        finally:
            await nc.close()

    with FleetConsumer(server.url) as consumer:
        shipper = ShipperThread(server.url, "h1", CounterSource(total=total, rate=2000))
        col = Collector(consumer)
        col.until(lambda c: len(c.tids.get("h1", [])) >= 1000)
        assert asyncio.run(delete_consumers()) == 1
        col.until(lambda c: len(c.tids.get("h1", [])) >= total)
        shipper.stop()
        col.take(consumer.read(0.3))
    assert consumer.resets >= 1
    assert col.tids["h1"] == list(range(total))
    assert not col.lost and not col.notices


# --- untrusted input ----------------------------------------------------------------------------------------


def _headers(host, seq, count, total, run="0001-aa", boot="b00t", **extra):
    h = {"Etwmon-Host": host, "Etwmon-Boot": boot, "Etwmon-Run": run, "Etwmon-Source": "test",
         "Etwmon-Seq": str(seq), "Etwmon-Count": str(count), "Etwmon-Total": str(total),
         "Nats-Msg-Id": f"{host}.{boot}.{run}.{seq}.{time.monotonic_ns()}"}
    h.update(extra)
    return {k: v for k, v in h.items() if v is not None}


def _body(tids):
    return b"".join(R.encode_thread_create(R.filetime_now(), t, 1) for t in tids)


def _publish(url, messages):
    async def go():
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            return [await js.publish(subject, body, headers=headers) for subject, body, headers in messages]
        finally:
            await nc.close()

    return asyncio.run(go())


def test_garbage_truncated_and_forged_messages_are_counted_with_their_host_and_the_consumer_goes_on(server):
    make_stream(server.url)
    good = _body(range(10))
    bad_size = bytearray(_body([0]))
    bad_size[2:4] = (3).to_bytes(2, "little")  # Size 3: smaller than a header
    s1, s2 = subject_for("h1"), subject_for("h2")
    with FleetConsumer(server.url) as consumer:
        _publish(server.url, [
            (s1, good, _headers("h1", 1, 10, 10)),
            (s1, random.Random(7).randbytes(333), _headers("h1", 2, 10, 20)),                        # garbage body
            (s1, good[:-7], _headers("h1", 3, 10, 30)),                              # truncated
            (s1, bytes(bad_size), _headers("h1", 3, 1, 31)),                         # bad Size
            (s1, good, {}),                                                          # no headers at all
            (s1, good, _headers("h1", 3, 10, 40, **{"Etwmon-Host": "h2"})),          # forged: says h2
            (s1, good, _headers("h1", "x3", 10, 40)),                                # not a number
            (s1, good, _headers("h1", 3, 10, 10 ** 30)),                             # absurd total
            (s1, good, _headers("h1", 3, 9, 40)),                                    # count disagrees
            (s1, good, _headers("h1", 3, 10, 40, run="0001-aa;x=1")),                # run not a token
            (s2, b"\x00" * 15, _headers("h2", 1, 1, 1)),                             # half a header
            (s1, _body(range(10, 20)), _headers("h1", 2, 10, 20)),                   # good again
            (s1, _body(range(10, 20)), _headers("h1", 2, 10, 20)),                   # a duplicate batch
            (s1, _body(range(30, 40)), _headers("h1", 4, 10, 40)),                   # batch 3 never came
        ])
        col = Collector(consumer)
        col.until(lambda c: len(c.tids.get("h1", [])) >= 30)
        col.take(consumer.read(0.3))
    kinds = [(n.host, n.kind) for n in col.notices]
    assert kinds.count(("h1", "malformed")) == 8 and kinds.count(("h1", "forged")) == 1
    assert kinds.count(("h2", "malformed")) == 1
    assert col.tids["h1"] == list(range(20)) + list(range(30, 40))
    assert col.lost["h1"] == [(10, True)]  # the gap, exactly: batch 3's 10 records
    stats = consumer.stats["h1"]
    assert (stats.malformed, stats.duplicates, stats.batches_lost, stats.records_lost) == (9, 1, 1, 10)
    assert consumer.stats["h2"].malformed == 1
    forged = next(n for n in col.notices if n.kind == "forged")
    assert "'h2'" in forged.message


def test_a_retried_publish_is_stored_once(server):
    make_stream(server.url)
    headers = _headers("h1", 1, 3, 3)
    acks = _publish(server.url, [(subject_for("h1"), _body(range(3)), headers)] * 2)
    assert acks[0].seq == acks[1].seq and acks[1].duplicate and not acks[0].duplicate


def test_a_durable_consumer_continues_where_it_stopped(server):
    make_stream(server.url)
    s1 = subject_for("h1")
    _publish(server.url, [(s1, _body(range(i * 10, i * 10 + 10)), _headers("h1", i + 1, 10, 10 * i + 10))
                          for i in range(3)])
    with FleetConsumer(server.url, durable="central", since="all") as consumer:
        col = Collector(consumer)
        col.until(lambda c: len(c.tids.get("h1", [])) >= 30)
        consumer.read(0.2)  # acknowledges what the last read returned
    _publish(server.url, [(s1, _body(range(i * 10, i * 10 + 10)), _headers("h1", i + 1, 10, 10 * i + 10))
                          for i in range(3, 5)])
    with FleetConsumer(server.url, durable="central", since="all") as again:
        col2 = Collector(again)
        col2.until(lambda c: len(c.tids.get("h1", [])) >= 20)
        col2.take(again.read(0.3))
    assert col2.tids["h1"] == list(range(30, 50))
    assert not col2.lost


def test_since_replays_and_the_default_starts_from_now(server):
    make_stream(server.url)
    s1 = subject_for("h1")
    _publish(server.url, [(s1, _body(range(5)), _headers("h1", 1, 5, 5))])
    time.sleep(0.05)
    with FleetConsumer(server.url) as from_now, FleetConsumer(server.url, since="all") as replay:
        _publish(server.url, [(s1, _body(range(5, 8)), _headers("h1", 2, 3, 8))])
        now_col, replay_col = Collector(from_now), Collector(replay)
        now_col.until(lambda c: len(c.tids.get("h1", [])) >= 3)
        replay_col.until(lambda c: len(c.tids.get("h1", [])) >= 8)
    assert now_col.tids["h1"] == [5, 6, 7] and not now_col.lost  # the first batch seen sets where it starts
    assert replay_col.tids["h1"] == list(range(8))


def test_only_the_hosts_asked_for(server):
    make_stream(server.url)
    _publish(server.url, [(subject_for(h), _body([i]), _headers(h, 1, 1, 1)) for i, h in enumerate("abc")])
    with FleetConsumer(server.url, hosts=["b", "c"], since="all") as consumer:
        col = Collector(consumer)
        col.until(lambda c: len(c.tids) >= 2)
        col.take(consumer.read(0.3))
    assert col.tids == {"b": [1], "c": [2]}


# --- permissions and credentials ----------------------------------------------------------------------------

PERMISSIONS = """
authorization {
  users: [
    { user: h1, password: h1-secret, permissions: {
        publish: { allow: ["etwmon.h1.events", "$JS.API.STREAM.INFO.ETWMON"] },
        subscribe: { allow: ["_INBOX.>"] } } },
    { user: reader, password: reader-secret }
  ]
}
"""


@pytest.fixture
def locked_server(tmp_path):
    s = NatsServer(tmp_path, extra=PERMISSIONS).start()
    asyncio.run(_admin_stream(s.url))
    yield s
    s.stop(signal.SIGKILL)


async def _admin_stream(url):
    nc = await nats.connect(url, user="reader", password="reader-secret")
    try:
        await nc.jetstream().add_stream(name=DEFAULT_STREAM, subjects=["etwmon.*.events"])
    finally:
        await nc.close()


def test_a_host_can_publish_only_to_its_own_subject(locked_server):
    url = locked_server.url
    h1 = FleetAuth(user="h1", password="h1-secret")
    reader = FleetAuth(user="reader", password="reader-secret")
    with FleetConsumer(url, auth=reader) as consumer:
        own = ShipperThread(url, "h1", CounterSource(total=100, rate=0), auth=h1)
        col = Collector(consumer)
        col.until(lambda c: len(c.tids.get("h1", [])) >= 100)
        own.stop()

        async def publish_as_h1_to_h2():
            errors = []

            async def on_error(exc):
                errors.append(str(exc))

            nc = await nats.connect(url, user="h1", password="h1-secret", error_cb=on_error)
            try:
                with pytest.raises(nats.errors.TimeoutError):
                    await nc.jetstream().publish(subject_for("h2"), _body([1]), headers=_headers("h2", 1, 1, 1),
                                                 timeout=1)
            finally:
                await nc.close()
            return errors

        errors = asyncio.run(publish_as_h1_to_h2())
        assert any("permissions violation" in e.lower() and "etwmon.h2.events" in e for e in errors)
        # A Shipper with another host's id on h1's credentials stops with the reason.
        impostor = ShipperThread(url, "h2", CounterSource(total=10, rate=0), auth=h1, publish_timeout=0.5)
        impostor.thread.join(20)
        assert isinstance(impostor.error, FleetError) and "etwmon.h2.events" in str(impostor.error)
        impostor.monitor.close()
        assert consumer.read(0.5) == []
    assert "h2" not in consumer.stats


def test_refused_credentials_are_one_clear_error(locked_server):
    with pytest.raises(FleetError, match="refused the credentials"):
        FleetConsumer(locked_server.url, auth=FleetAuth(user="h1", password="wrong")).open()


def _cli(args, env, timeout=30):
    return subprocess.run([sys.executable, "-m", "etwmon", *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **env), timeout=timeout)


@pytest.mark.parametrize("command", [["ship", "--source", "procfs", "--host-id", "h1", "--to"], ["tail", "--from"]])
def test_cli_refused_credentials_one_error_line(locked_server, command):
    result = _cli([*command, locked_server.url], {"ETWMON_NATS_USER": "h1", "ETWMON_NATS_PASSWORD": "wrong"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and "refused the credentials" in lines[0], result.stderr
    assert "wrong" not in result.stderr


# --- names, times, auth files ---------------------------------------------------------------------------------


def test_host_ids_are_single_subject_tokens():
    assert check_host_id("web-01_a") == "web-01_a"
    for bad in ("a.b", "a b", "*", ">", "", "x" * 129, "é"):
        with pytest.raises(FleetError):
            check_host_id(bad)
    assert check_host_id(default_host_id())


def test_parse_since():
    now = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)
    assert parse_since("10m", now) == now - timedelta(minutes=10)
    assert parse_since("1.5h", now) == now - timedelta(minutes=90)
    assert parse_since("2026-12-01T09:00:00Z") == datetime(2026, 12, 1, 9, tzinfo=timezone.utc)
    assert parse_since("2026-12-01T09:00:00") == datetime(2026, 12, 1, 9, tzinfo=timezone.utc)
    assert parse_since("all") is None
    with pytest.raises(ValueError):
        parse_since("yesterday")


def test_auth_from_a_private_file_then_the_environment(tmp_path):
    path = tmp_path / "nats.env"
    path.write_text("# the shipper's account\nETWMON_NATS_USER=h1\nETWMON_NATS_PASSWORD='s3cret'\n")
    path.chmod(0o600)
    auth = load_auth({"ETWMON_NATS_USER": "other", "ETWMON_NATS_TOKEN": "tok"}, str(path))
    assert (auth.user, auth.password, auth.token) == ("h1", "s3cret", "tok")
    assert "s3cret" not in repr(auth)
    assert load_auth({"ETWMON_NATS_AUTH_FILE": str(path)}).user == "h1"
    path.chmod(0o644)
    with pytest.raises(FleetError, match="chmod 600"):
        load_auth({}, str(path))
    path.chmod(0o600)
    link = tmp_path / "link.env"
    link.symlink_to(path)
    with pytest.raises(FleetError, match="cannot open"):
        load_auth({}, str(link))
    path.write_text("PASSWORD=x\n")
    with pytest.raises(FleetError, match="line 1"):
        load_auth({}, str(path))


# --- the command line end to end -------------------------------------------------------------------------------


@pytest.mark.root
def test_cli_ship_a_real_source_and_tail_from_it_as_json_ecs_and_text(server):
    from .helpers import Watch, clean_env, etwmon_argv, new_tag, spawn

    env = clean_env(PYTHONPATH=str(ROOT))
    with Watch(etwmon_argv("ship", "--to", server.url, "--host-id", "cli-host", "--source", "netlink"),
               env=env) as ship:
        ship.wait_err(lambda l: b"shipping to" in l, what="the shipping line")
        with Watch(etwmon_argv("tail", "--from", server.url, "--json", "--type", "exec"), env=env) as tail_json, \
                Watch(etwmon_argv("tail", "--from", server.url, "--format", "ecs", "--host", "cli-host"),
                      env=env) as tail_ecs:
            for w in (tail_json, tail_ecs):
                w.wait_err(lambda l: b"watching (fleet:" in l, what="the watching line")
            tag = new_tag()
            spawn(tag, code=3)
            line = tail_json.wait_out(lambda l: tag.encode() in l, what="the exec as JSON")
            obj = json.loads(line)
            assert obj["host"] == "cli-host" and obj["type"] == "ProcessExec" and tag in obj["command_line"]
            doc = json.loads(tail_ecs.wait_out(lambda l: tag.encode() in l and b"process-exec" in l))
            assert doc["host"]["name"] == "cli-host" and tag in doc["process"]["args"]
            _publish(server.url, [(subject_for("cli-host"), b"\xff" * 40, _headers("cli-host", 1, 1, 1))])
            tail_json.wait_err(lambda l: b"host cli-host" in l and b"malformed" in l, what="the malformed warning")
            assert tail_json.stop() == 0 and tail_ecs.stop() == 0
        assert ship.stop() == 0
    assert re.search(r"stopped: \d+ batches, \d+ records sent, 0 missed, 0 dropped", ship.stderr), ship.stderr
    assert "Traceback" not in ship.stderr + tail_json.stderr + tail_ecs.stderr


def test_cli_tail_from_options_belong_to_from():
    result = _cli(["tail", "--host", "h1"], {})
    assert result.returncode == 2 and "go with --from" in result.stderr
    result = _cli(["tail", "--from", "nats://127.0.0.1:1", "--since", "yesterday"], {})
    assert result.returncode == 2 and "--since" in result.stderr
    result = _cli(["ship", "--to", "nats://127.0.0.1:1", "--host-id", "a.b"], {})
    assert result.returncode == 2 and "subject" in result.stderr


def test_a_reader_with_no_server_gives_up_with_the_reason():
    from .nats_servers import free_port

    with pytest.raises(FleetError, match="cannot reach"):
        FleetConsumer(f"nats://127.0.0.1:{free_port()}", connect_wait=1.0).open()


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.pem", "server.key", "server.csr",
                                                          "server.pem"))
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    quiet = dict(check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
                    "-days", "1", "-subj", "/CN=etwmon test CA"], **quiet)
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                    "-subj", "/CN=127.0.0.1"], **quiet)
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                    "-out", cert, "-days", "1", "-extfile", ext], **quiet)
    return ca, cert, key


def test_token_over_tls_with_a_ca_from_the_auth_file(tmp_path):
    from .conftest import require
    import shutil

    require(shutil.which("openssl") is not None, "openssl is not installed")
    ca, cert, key = _certificates(tmp_path)
    server = NatsServer(tmp_path, extra=f'authorization {{ token: "t0ken-s3cret" }}\n'
                                        f'tls {{ cert_file: "{cert}", key_file: "{key}" }}').start()
    try:
        path = tmp_path / "nats.env"
        path.write_text(f"ETWMON_NATS_TOKEN=t0ken-s3cret\nETWMON_NATS_TLS_CA={ca}\n")
        path.chmod(0o600)
        auth = load_auth({}, str(path))
        url = f"tls://127.0.0.1:{server.port}"
        shipper = ShipperThread(url, "tls-host", CounterSource(total=300, rate=0), auth=auth)
        deadline = time.monotonic() + 20
        while True:
            try:
                consumer = FleetConsumer(url, since="all", auth=auth).open()
                break
            except FleetError as exc:  # the shipper makes the stream
                assert "no stream" in str(exc) and time.monotonic() < deadline
                time.sleep(0.2)
        with consumer:
            col = Collector(consumer)
            col.until(lambda c: len(c.tids.get("tls-host", [])) >= 300)
        shipper.stop()
        assert col.tids["tls-host"] == list(range(300))
        with pytest.raises(FleetError, match="refused the credentials"):
            FleetConsumer(url, auth=FleetAuth(token="wrong", tls_ca=str(ca))).open()
        with pytest.raises(FleetError, match="cannot reach.*(?i:certificate)"):
            FleetConsumer(url, auth=FleetAuth(token="t0ken-s3cret"), connect_wait=2.0).open()
    finally:
        server.stop(signal.SIGKILL)


def test_a_host_that_may_not_make_the_stream_says_so(tmp_path):
    s = NatsServer(tmp_path, extra=PERMISSIONS).start()
    try:
        shipper = ShipperThread(s.url, "h1", CounterSource(total=10, rate=0),
                                auth=FleetAuth(user="h1", password="h1-secret"), publish_timeout=0.5)
        shipper.thread.join(30)
        assert isinstance(shipper.error, FleetError) and "--no-create-stream" in str(shipper.error)
        shipper.monitor.close()
    finally:
        s.stop(signal.SIGKILL)


# --- the reader contract `etwmon tail` drains --------------------------------------------------------------------


class _ScriptedConsumer:
    """Stands in for a FleetConsumer: hands out the given reads, one per call, then nothing."""

    def __init__(self, reads) -> None:
        self.reads = list(reads)
        self.stats: dict = {}
        self.fetch_batch = 4
        self.hosts, self.since, self.durable, self.url, self.stream = None, None, None, "nats://x", "S"
        self.opened = self.closed = False

    def open(self):
        self.opened = True
        return self

    def read(self, timeout):
        if self.reads:
            return self.reads.pop(0)
        time.sleep(min(timeout, 0.05))
        return []

    def close(self):
        self.closed = True


def _batch(host, tids, gap=0):
    events = [R.ThreadCreate(R.filetime_now(), t, 1) for t in tids]
    if gap:
        events.insert(0, R.RecordsLost(R.filetime_now(), gap))
    return HostBatch(host, events, b"".join(e.encode() for e in events), "boot", "run", 1, "test", gap)


def test_fleet_reader_gives_one_hosts_whole_records_per_readinto():
    from etwmon.fleet import FleetReader

    notices = []
    consumer = _ScriptedConsumer([[_batch("a", range(5)), FleetNotice("b", "malformed", "bad"),
                                   _batch("b", range(100, 103), gap=7)], [_batch("a", range(5, 8))]])
    reader = FleetReader(consumer, on_notice=notices.append).start()
    try:
        assert consumer.opened
        buf = bytearray(24 * 2 + 10)  # two records and a bit: whole records only
        got: list[tuple[str, object]] = []
        deadline = time.monotonic() + 10
        while len(got) < 12 and time.monotonic() < deadline:
            if not reader.wait(0.5):
                continue
            n = reader.readinto(buf)
            assert n % 24 == 0 and n <= 48
            got += [(reader.host, e) for e in R.parse(buf[:n])]
        assert [(h, e.tid) for h, e in got if isinstance(e, R.ThreadCreate)] == \
            [("a", t) for t in range(5)] + [("b", t) for t in range(100, 103)] + [("a", t) for t in range(5, 8)]
        assert [(h, e.count) for h, e in got if isinstance(e, R.RecordsLost)] == [("b", 7)]
        assert [n.kind for n in notices] == ["malformed"]
        assert reader.stats.read == reader.stats.pushed == 12 and reader.stats.items == 0
    finally:
        reader.close()
    assert consumer.closed and not reader.running
