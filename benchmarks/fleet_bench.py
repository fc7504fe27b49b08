"""Fleet benchmark: records from one host through a local nats-server (JetStream, file storage) to a consumer.

The host is a child process: a Monitor over a paced source that stamps each record with the time it is pushed
(as a kernel source stamps the event), shipped by ``etwmon.fleet.Shipper``. The consumer is this process: a
``FleetConsumer`` reading from now on. Figures: records/s end to end, records missing at the consumer
(ring drops + gaps), and latency = the time the consumer's ``read`` returned a record minus the record's Time.
Paced trials run at the rate of this machine's unthrottled thread storm (~50 k events/s); the unthrottled
trial pushes as fast as the host can. As root, the storm trial ships the live netlink source while the thread
storm generator runs unthrottled, and scores the consumer against the tids the generator made.

Also ``python fleet_bench.py --ship URL RATE SECONDS`` and ``--ship-source URL SOURCE`` (the child's side).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import progress, summary, target  # noqa: E402

GOAL_RATE = 50_000  # events/s: this machine's unthrottled thread storm
GOAL_P99_MS = 100.0


def _nats_server() -> str | None:
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.access(p, os.X_OK)), None)


def problem() -> str | None:
    """Why the fleet benchmark cannot run here, or None."""
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed (pip install 'etwmon[nats]')"
    if _nats_server() is None:
        return "nats-server is not installed (apt-get install nats-server)"
    return None


# --- the host's side (a child process) --------------------------------------------------------------------


def ship(url: str, rate: float, seconds: float) -> None:
    from etwmon import records as R
    from etwmon.fleet import Shipper
    from etwmon.monitor import Monitor
    from etwmon.sources.base import Source

    class PacedSource(Source):
        """ThreadCreate records tid 0, 1, 2, ... stamped when pushed; ``rate`` per second (0: flat out)."""

        name = "paced"

        def __init__(self) -> None:
            super().__init__()
            self._stop = threading.Event()
            self.go = threading.Event()  # set once the shipper is connected: start-up is not latency
            self.pushed = 0

        def run(self, sink) -> None:
            self.go.wait()
            start = time.monotonic()
            end = start + seconds
            encode, now = R.encode_thread_create, R.filetime_now
            while not self._stop.is_set() and time.monotonic() < end:
                for _ in range(100):
                    sink.push(encode(now(), self.pushed, 1))
                    self.pushed += 1
                sink.notify()
                if rate:
                    ahead = self.pushed / rate - (time.monotonic() - start)
                    if ahead > 0:
                        time.sleep(ahead)
            self._stop.wait()

        def stop(self) -> None:
            self._stop.set()
            self.go.set()

    source = PacedSource()
    with Monitor(source, max_items=1_000_000) as monitor:
        shipper = Shipper(monitor, url, "bench")
        started = [float("inf")]

        def ready() -> None:
            started[0] = time.monotonic()
            source.go.set()

        def done() -> bool:
            return time.monotonic() > started[0] + seconds + 0.2

        stats = shipper.run(until=done, on_ready=ready)
        ring = monitor.stats
    # The parent reads this line: what the host pushed, dropped, sent.
    print(f"pushed={source.pushed} dropped={ring.dropped} sent={stats.records} batches={stats.batches}", flush=True)


def ship_source(url: str, source: str) -> None:
    """A live kernel source shipped until SIGTERM; says "ready" once connected, then its counts at the end."""
    from etwmon.fleet import Shipper
    from etwmon.monitor import Monitor

    with Monitor(source, max_items=1_000_000) as monitor:
        stats = Shipper(monitor, url, "storm").run(stop_signals=True, on_ready=lambda: print("ready", flush=True))
        ring = monitor.stats
    print(f"pushed={ring.pushed} dropped={ring.dropped} lost={ring.lost} sent={stats.records} "
          f"batches={stats.batches}", flush=True)


# --- the consumer's side ----------------------------------------------------------------------------------


class _Server:
    def __init__(self, workdir: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        conf = workdir / "server.conf"
        conf.write_text(f'listen: "127.0.0.1:{self.port}"\n'
                        f'jetstream {{ store_dir: "{workdir / "store"}", max_file_store: 4GB }}\n')
        self.proc = subprocess.Popen([_nats_server(), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nats-server did not start")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def _make_stream(url: str) -> None:
    import nats

    async def go() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(name="ETWMON", subjects=["etwmon.*.events"], max_bytes=2 << 30,
                                            duplicate_window=120.0)
        finally:
            await nc.close()

    asyncio.run(go())


def trial(url: str, rate: float, seconds: float) -> dict:
    """One host shipping ``rate`` records/s (0: flat out) for ``seconds``; the consumer's view."""
    from etwmon.fleet import FleetConsumer, HostBatch
    from etwmon.records import ItemType, filetime_now

    consumer = FleetConsumer(url, hosts=["bench"]).open()
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--ship", url, str(rate), str(seconds)],
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    latencies: list[float] = []
    received = lost = 0
    first = last = None
    expected = None
    deadline = time.monotonic() + seconds + 60
    try:
        while time.monotonic() < deadline:
            items = consumer.read(0.5)
            now = filetime_now()
            for item in items:
                if not isinstance(item, HostBatch):
                    continue
                for event in item.events:
                    if event.type == ItemType.ThreadCreate:
                        received += 1
                        latencies.append((now - event.filetime) / 10_000)  # ms
                    elif event.type == ItemType.RecordsLost:
                        lost += event.count
            if items:
                t = time.monotonic()
                first = first if first is not None else t
                last = t
            if expected is None and child.poll() is not None:
                line = child.stdout.read().strip().splitlines()[-1]
                expected = dict(part.split("=") for part in line.split())
            if expected is not None and received + lost >= int(expected["pushed"]) and not items:
                break
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        consumer.close()
    pushed = int(expected["pushed"]) if expected else None
    latencies.sort()

    def pct(p: float) -> float | None:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] if latencies else None

    span = (last - first) if first is not None and last is not None and last > first else None
    return {"rate": rate or "unthrottled", "seconds": seconds, "pushed": pushed, "received": received,
            "lost": lost, "missing": None if pushed is None else pushed - received,
            "dropped_on_host": int(expected["dropped"]) if expected else None,
            "records_per_s": received / span if span else None,
            "latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": latencies[-1] if latencies else None}}


def storm_problem() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "needs root on Linux (the netlink source at full buffer size, as the storm benchmarks)"
    if not (shutil.which("gcc") or shutil.which("cc")):
        return "needs gcc to build the storm generator"
    return None


def storm_trial(url: str, threads: int) -> dict:
    """The netlink source on this machine shipped while the thread storm runs unthrottled: of the storm's
    ThreadCreate/ThreadExit events (scored by the tids the generator made), how many the consumer got."""
    import storm_bench
    from etwmon.fleet import FleetConsumer, HostBatch
    from etwmon.records import ItemType, filetime_now

    exe = storm_bench.build_generators(HERE / ".build")["threads"]
    consumer = FleetConsumer(url, hosts=["storm"]).open()
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--ship-source", url, "netlink"],
                             stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(HERE.parent)))
    seen: dict[int, int] = {}  # tid -> events seen (create + exit)
    latencies: list[float] = []
    lost = 0

    def take(timeout: float, tids: Counter | None) -> int:
        """Read once; how many of the storm's events came (any thread event while its tids are not known)."""
        nonlocal lost
        got = 0
        for item in consumer.read(timeout):
            if not isinstance(item, HostBatch):
                continue
            now = filetime_now()
            for event in item.events:
                if event.type in (ItemType.ThreadCreate, ItemType.ThreadExit):
                    seen[event.tid] = seen.get(event.tid, 0) + 1
                    latencies.append((now - event.filetime) / 10_000)
                    got += tids is None or event.tid in tids
                elif event.type == ItemType.RecordsLost:
                    lost += event.count
        return got

    try:
        assert child.stdout.readline().strip() == "ready", "the shipper did not start"
        done: list = []
        runner = threading.Thread(target=lambda: done.append(storm_bench.run_storm(exe, "threads", threads, 0)))
        runner.start()
        while runner.is_alive():  # the consumer reads while the storm runs
            take(0.2, None)
        runner.join()
        storm = done[0]
        made = Counter(storm.ids)
        quiet_since = time.monotonic()
        deadline = time.monotonic() + 60
        while (time.monotonic() < deadline and time.monotonic() - quiet_since < 3
               and sum(min(2 * n, seen.get(tid, 0)) for tid, n in made.items()) < 2 * storm.items):
            if take(0.5, made):
                quiet_since = time.monotonic()
        child.send_signal(signal.SIGTERM)
        counts = dict(part.split("=") for part in child.communicate(timeout=30)[0].split())
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        consumer.close()
    # (a tid the kernel reused within the storm counts each time it was made)
    expected = 2 * sum(made.values())
    captured = sum(min(2 * n, seen.get(tid, 0)) for tid, n in made.items())
    latencies.sort()
    return {"threads": storm.items, "storm_events_per_s": storm.events_per_s, "expected": expected,
            "captured": captured, "captured_pct": 100.0 * captured / expected if expected else None,
            "lost_reported": lost, "dropped_on_host": int(counts.get("dropped", 0)),
            "lost_by_source": int(counts.get("lost", 0)),
            "latency_ms": {"p50": latencies[len(latencies) // 2] if latencies else None,
                           "p99": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None}}


def run(quick: bool) -> dict:
    why = problem()
    if why:
        progress(f"fleet: skipped: {why}")
        return {"status": "skipped", "reason": why}
    repeats, seconds = (1, 3.0) if quick else (3, 10.0)
    threads = 50_000 if quick else 200_000
    no_storm = storm_problem()
    with tempfile.TemporaryDirectory(prefix="etwmon-fleet-bench-") as tmp:
        server = _Server(Path(tmp))
        try:
            _make_stream(server.url)
            paced, flat, storms = [], [], []
            for i in range(repeats):
                progress(f"fleet: repeat {i + 1}/{repeats}: {GOAL_RATE} records/s for {seconds:.0f} s")
                paced.append(trial(server.url, GOAL_RATE, seconds))
                progress(f"fleet: repeat {i + 1}/{repeats}: unthrottled for {seconds:.0f} s")
                flat.append(trial(server.url, 0, seconds))
                if no_storm is None:
                    progress(f"fleet: repeat {i + 1}/{repeats}: netlink through the fleet, {threads} threads "
                             "unthrottled")
                    storms.append(storm_trial(server.url, threads))
        finally:
            server.stop()
    missing = [t["missing"] for t in paced if t["missing"] is not None]
    p99 = [t["latency_ms"]["p99"] for t in paced if t["latency_ms"]["p99"] is not None]
    flat_rates = [t["records_per_s"] for t in flat if t["records_per_s"]]
    result = {
        "status": "ok",
        "params": {"repeats": repeats, "seconds": seconds, "paced_rate": GOAL_RATE, "storage": "file",
                   "batch_bytes": 0x10000, "batch_wait_s": 0.01},
        "paced": paced, "unthrottled": flat,
        "paced_records_per_s": summary([t["records_per_s"] for t in paced if t["records_per_s"]]),
        "paced_missing": summary(missing), "paced_p99_ms": summary(p99),
        "paced_p50_ms": summary([t["latency_ms"]["p50"] for t in paced if t["latency_ms"]["p50"] is not None]),
        "unthrottled_records_per_s": summary(flat_rates),
        "storm": storms if no_storm is None else {"status": "skipped", "reason": no_storm},
    }
    if storms:
        result["storm_captured_pct"] = summary([t["captured_pct"] for t in storms if t["captured_pct"] is not None])
        result["storm_events_per_s"] = summary([t["storm_events_per_s"] for t in storms])
        result["storm_p99_ms"] = summary([t["latency_ms"]["p99"] for t in storms if t["latency_ms"]["p99"]])
    worst_missing = max(missing) if missing else None
    result["targets"] = [
        target("fleet", f"records missing at {GOAL_RATE // 1000} k/s", worst_missing, 0, "records",
               higher_is_better=False),
        target("fleet", f"p99 latency at {GOAL_RATE // 1000} k/s", max(p99) if p99 else None, GOAL_P99_MS, "ms",
               higher_is_better=False),
        target("fleet", "unthrottled end to end", min(flat_rates) if flat_rates else None, GOAL_RATE, "records/s"),
    ]
    if storms:
        pct = [t["captured_pct"] for t in storms if t["captured_pct"] is not None]
        p99s = [t["latency_ms"]["p99"] for t in storms if t["latency_ms"]["p99"] is not None]
        result["targets"] += [
            target("fleet", "thread storm via netlink, captured at the consumer", min(pct) if pct else None,
                   100.0, "%"),
            target("fleet", "thread storm via netlink, p99 latency", max(p99s) if p99s else None, GOAL_P99_MS,
                   "ms", higher_is_better=False)]
    return result


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--ship":
        ship(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
    elif len(sys.argv) == 4 and sys.argv[1] == "--ship-source":
        ship_source(sys.argv[2], sys.argv[3])
    else:
        import json

        print(json.dumps(run("--quick" in sys.argv), indent=1, default=str))
