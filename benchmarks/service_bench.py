"""Service benchmark: records/s and MB/s from one Monitor through the etwmon service's Unix socket to 1 and to 4
client processes, against the same Monitor read in-process with ``readinto`` (64 KiB reads), and the latency
the socket adds between a record's push and its reader.

The same synthetic source feeds every case: it pushes a fixed set of records as fast as it can (throughput) or
one every millisecond stamped with CLOCK_MONOTONIC (latency), so the figures compare the paths, not the kernel.
Caps are set above the volume: nothing may be dropped, and a run that drops is reported as an error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))

from common import progress, summary, target  # noqa: E402
from ring_bench import make_records  # noqa: E402

import etwmon  # noqa: E402
from etwmon.records import encode_process_exit, record_headers  # noqa: E402
from etwmon.sources.base import Source  # noqa: E402

READ_SIZE = 64 * 1024
MIB = 1 << 20


class BurstSource(Source):
    """Waits for ``go``, then pushes ``records`` as fast as it can (notifying every 256), or with ``paced``
    seconds between records, each an exit record whose Time is CLOCK_MONOTONIC ns at its push."""

    name = "burst"

    def __init__(self, records: list[bytes] | None, go: threading.Event, paced: float = 0.0,
                 count: int = 0) -> None:
        self.records, self.go, self.paced, self.count = records, go, paced, count
        self.started_ns = 0
        self._stop = threading.Event()

    def run(self, sink) -> None:
        while not self.go.wait(0.05):
            if self._stop.is_set():
                return
        self.started_ns = time.monotonic_ns()
        if self.paced:
            for i in range(self.count):
                if self._stop.is_set():
                    return
                sink.push(encode_process_exit(time.monotonic_ns(), i, 0))
                sink.notify()
                time.sleep(self.paced)
        else:
            push, notify = sink.push, sink.notify
            for i, record in enumerate(self.records):
                push(record)
                if i & 255 == 255:
                    notify()
            notify()
        self._stop.wait()

    def stop(self) -> None:
        self._stop.set()


def _latencies(buf, n: int) -> np.ndarray:
    return time.monotonic_ns() - record_headers(buf[:n])["Time"].astype(np.int64)


def _drain_volume(reader, volume: int) -> int:
    """Read until ``volume`` bytes came; the CLOCK_MONOTONIC ns when the last arrived."""
    buf = bytearray(READ_SIZE)
    got = 0
    while got < volume:
        n = reader.readinto(buf)
        if n:
            got += n
        elif not reader.wait(10):
            raise RuntimeError(f"service benchmark: only {got} of {volume} bytes arrived")
    return time.monotonic_ns()


def _drain_latency(reader, count: int) -> np.ndarray:
    buf = bytearray(READ_SIZE)
    out = []
    seen = 0
    while seen < count:
        n = reader.readinto(buf)
        if n:
            lat = _latencies(buf, n)
            out.append(lat)
            seen += len(lat)
        elif not reader.wait(10):
            raise RuntimeError(f"service benchmark: only {seen} of {count} latency records arrived")
    return np.concatenate(out)


# --- in-process baselines -------------------------------------------------------------------------------------


def inprocess_throughput(records: list[bytes], volume: int) -> float:
    go = threading.Event()
    source = BurstSource(records, go)
    with etwmon.Monitor(source, max_items=len(records) + 16, max_bytes=volume + MIB, identity=False) as mon:
        go.set()
        end = _drain_volume(mon, volume)
        if mon.stats.dropped or mon.stats.lost:
            raise RuntimeError("service benchmark: the in-process ring dropped records")
    return (end - source.started_ns) / 1e9


def inprocess_latency(count: int, paced: float) -> np.ndarray:
    go = threading.Event()
    source = BurstSource(None, go, paced=paced, count=count)
    with etwmon.Monitor(source, max_items=count + 16, identity=False) as mon:
        go.set()
        return _drain_latency(mon, count)


# --- through the socket: the server and the clients are processes of their own --------------------------------


def _child(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], stdout=subprocess.PIPE,
                            text=True, env=env)


def _line(proc: subprocess.Popen, timeout: float = 60) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not result or not result[0]:
        proc.kill()
        raise RuntimeError(f"service benchmark: a child process said nothing (exit {proc.poll()})")
    return result[0].strip()


def socket_throughput(count: int, volume: int, clients: int, directory: str) -> list[float]:
    """Seconds from the first push until each client had every record."""
    path = os.path.join(directory, f"t{clients}.sock")
    server = _child("serve", path, "burst", str(count), str(clients))
    try:
        assert _line(server) == "listening"
        readers = [_child("client", path, "volume", str(volume), str(count)) for _ in range(clients)]
        ends = []
        for reader in readers:
            _, end = _line(reader, 120).split()
            ends.append(int(end))
            reader.wait(30)
        started = int(_line(server).split()[1])
        return [(end - started) / 1e9 for end in ends]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def socket_latency(count: int, paced: float, directory: str) -> np.ndarray:
    path = os.path.join(directory, "lat.sock")
    server = _child("serve", path, "paced", str(count), "1", str(paced))
    try:
        assert _line(server) == "listening"
        reader = _child("client", path, "latency", str(count), str(count))
        values = np.array(json.loads(_line(reader, 120)), dtype=np.int64)
        reader.wait(30)
        return values
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def _serve_child(path: str, mode: str, count: int, clients: int, paced: float) -> None:
    from etwmon.service import Server, ServerLimits

    go = threading.Event()
    if mode == "burst":
        records = make_records(count)
        volume = sum(map(len, records))
        source = BurstSource(records, go)
    else:
        volume = count * 24
        source = BurstSource(None, go, paced=paced, count=count)
    monitor = etwmon.Monitor(source, max_items=count + 16, max_bytes=volume + MIB, identity=False).start()
    server = Server(monitor, path, limits=ServerLimits(client_max_items=count + 16,
                                                       client_max_bytes=volume + MIB)).open()
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print("listening", flush=True)
    while server.readers < clients:
        time.sleep(0.005)
    go.set()
    while not source.started_ns:
        time.sleep(0.001)
    print("started", source.started_ns, flush=True)
    thread.join()
    server.close()
    monitor.close()


def _client_child(path: str, mode: str, amount: int, count: int) -> None:
    with etwmon.connect(path, max_items=count + 16, max_bytes=max(amount, count * 24) + MIB) as conn:
        if mode == "volume":
            end = _drain_volume(conn, amount)
            if conn.stats.reported:
                raise SystemExit("service benchmark: the client's queue dropped records")
            print("done", end, flush=True)
        else:
            print(json.dumps(_drain_latency(conn, amount).tolist()), flush=True)


# --- the benchmark --------------------------------------------------------------------------------------------


def _percentiles(values: np.ndarray) -> dict:
    us = values / 1e3
    return {"p50": float(np.percentile(us, 50)), "p99": float(np.percentile(us, 99)), "max": float(us.max()),
            "n": int(len(us))}


def run(quick: bool = False) -> dict:
    if not sys.platform.startswith("linux"):
        return {"status": "skipped", "reason": "the service is Linux-only (Unix socket with SO_PEERCRED)"}
    count = 100_000 if quick else 400_000
    repeats = 5 if quick else 9
    lat_count = 500 if quick else 3000
    paced = 0.002 if quick else 0.001
    records = make_records(count)
    volume = sum(map(len, records))
    progress(f"service: {count:,} records ({volume / MIB:.1f} MiB) per run, {repeats} repeats; latency: "
             f"{lat_count} records {paced * 1e3:g} ms apart")
    directory = tempfile.mkdtemp(prefix="etwmon-bench-")
    load = os.getloadavg()[0]  # the machine is shared: how busy it was says how much the figures mean
    rows = {"inprocess": [], 1: [], 4: []}
    try:
        for rep in range(repeats):
            progress(f"service: repeat {rep + 1}/{repeats}")
            rows["inprocess"].append(inprocess_throughput(records, volume))
            rows[1].append(max(socket_throughput(count, volume, 1, directory)))
            rows[4].append(max(socket_throughput(count, volume, 4, directory)))
        progress("service: latency")
        lat_in = inprocess_latency(lat_count, paced)
        lat_sock = socket_latency(lat_count, paced, directory)
    finally:
        subprocess.run(["rm", "-rf", directory])

    def rates(seconds: list[float]) -> tuple[dict, dict]:
        return summary(count / s for s in seconds), summary(volume / s / 1e6 for s in seconds)

    base_rate, base_mb = rates(rows["inprocess"])
    throughput = [{"clients": 0, "path": "in-process readinto", "records_per_s": base_rate, "MBps": base_mb,
                   "vs_inprocess": None}]
    for clients in (1, 4):
        rate, mb = rates(rows[clients])
        ratio = summary(b / s for b, s in zip(rows["inprocess"], rows[clients]))
        throughput.append({"clients": clients, "path": f"socket, {clients} client{'s' if clients > 1 else ''}",
                           "records_per_s": rate, "MBps": mb, "vs_inprocess": ratio})
    latency = {"inprocess_us": _percentiles(lat_in), "socket_us": _percentiles(lat_sock)}
    latency["added_p50_us"] = latency["socket_us"]["p50"] - latency["inprocess_us"]["p50"]
    latency["added_p99_us"] = latency["socket_us"]["p99"] - latency["inprocess_us"]["p99"]
    targets = [
        target("service", "socket to 1 client vs in-process (64 KiB reads)", throughput[1]["vs_inprocess"]["median"],
               0.5, "x"),
        target("service", "socket to each of 4 clients vs in-process", throughput[2]["vs_inprocess"]["median"],
               0.5, "x"),
        target("service", "latency the socket adds (p99)", latency["added_p99_us"] / 1e3, 1.0, "ms",
               higher_is_better=False),
    ]
    return {
        "status": "ok",
        "params": {"records": count, "volume_bytes": volume, "repeats": repeats, "read_size": READ_SIZE,
                   "mean_record_bytes": round(volume / count, 1), "latency_records": lat_count,
                   "latency_spacing_ms": paced * 1e3, "load_average_1min": load,
                   "record_mix": "ProcessCreate (~50-char command line) / ProcessExit, alternating"},
        "throughput": throughput,
        "latency": latency,
        "targets": targets,
    }


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "serve":
        _serve_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]),
                     float(sys.argv[6]) if len(sys.argv) > 6 else 0.0)
    elif role == "client":
        _client_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=1))
