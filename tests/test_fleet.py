"""The fleet: Shippers publishing to a real nats-server (single, restarted, down, clustered), FleetConsumer
reading every host's events back exactly once and in order, and whatever is lost or hostile reported."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

nats = pytest.importorskip("nats", reason="nats-py is not installed (pip install 'etwmon[nats]')")

from etwmon import records as R  # noqa: E402
from etwmon.fleet import (  # noqa: E402
    DEFAULT_STREAM, FleetAuth, FleetConsumer, FleetError, FleetNotice, HostEvent, Shipper, check_host_id,
    default_host_id, load_auth, parse_since, subject_for,
)
from etwmon.monitor import Monitor  # noqa: E402
from etwmon.sources.base import Source  # noqa: E402

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


class ShipperThread:
    """A Shipper of a Monitor over ``source`` on its own thread."""

    def __init__(self, url, host: str, source: Source, max_items: int = 100_000, **options) -> None:
        self.monitor = Monitor(source, max_items=max_items)
        self.monitor.start()
        self.shipper = Shipper(self.monitor, url, host, **options)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.shipper.run()
        except BaseException as exc:  # kept for the test to raise
            self.error = exc

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
        self.others: list[HostEvent] = []

    def take(self, items) -> None:
        for item in items:
            if isinstance(item, FleetNotice):
                self.notices.append(item)
            elif isinstance(item.event, R.RecordsLost):
                self.lost.setdefault(item.host, []).append((item.event.count, item.gap))
            elif isinstance(item.event, R.ThreadCreate):
                self.tids.setdefault(item.host, []).append(item.event.tid)
            else:
                self.others.append(item)

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
                    if isinstance(item, HostEvent) and isinstance(item.event, R.ProcessExit):
                        assert item.host == "real-host"
                        got[item.event.pid] = item.event.exit_code
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
