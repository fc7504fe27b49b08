"""Real nats-server processes for the fleet tests: one server or a 3-node cluster on loopback, on free ports,
with their JetStream store in a temp dir; stopped (and restartable on the same port and store) by the tests.

CI installs Debian's nats-server; without it the tests skip, or fail under ETWMON_REQUIRE_ROOT=1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .conftest import require

__all__ = ["NatsServer", "nats_server_binary", "free_port", "start_cluster"]


def nats_server_binary() -> str:
    """The nats-server executable (PATH, then Debian's /usr/sbin), or skip/fail the test."""
    found = shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if os.access(p, os.X_OK)), None)
    require(found is not None, "nats-server is not installed (apt-get install nats-server)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NatsServer:
    """One nats-server with JetStream, configured by a file written into ``workdir``.

    ``extra`` is more configuration text (authorization blocks, cluster blocks). ``stop()`` and ``start()``
    keep the port and the store, so a restart is the same server coming back.
    """

    def __init__(self, workdir: Path, name: str = "n1", extra: str = "", port: int | None = None) -> None:
        self.binary = nats_server_binary()
        self.name = name
        self.workdir = Path(workdir) / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.config = self.workdir / "server.conf"
        self.log = self.workdir / "server.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        store = self.workdir / "store"
        self.config.write_text(
            f'server_name: "{self.name}"\nlisten: "127.0.0.1:{self.port}"\n'
            f'jetstream {{ store_dir: "{store}", max_memory_store: 256MB, max_file_store: 4GB }}\n'
            f"{self.extra}\n")

    def start(self, wait: float = 10.0) -> "NatsServer":
        self.write_config()
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    if s.recv(4096).startswith(b"INFO"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nats-server {self.name} did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def start_cluster(workdir: Path, size: int = 3, cluster: str = "etwmon-test") -> list[NatsServer]:
    """``size`` servers joined by routes on loopback, each with its own store; JetStream clustered."""
    route_ports = [free_port() for _ in range(size)]
    servers = []
    for i in range(size):
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i)
        extra = (f'cluster {{ name: "{cluster}", listen: "127.0.0.1:{route_ports[i]}", routes: [{routes}] }}')
        servers.append(NatsServer(workdir, name=f"n{i + 1}", extra=extra))
    for server in servers:
        server.start()
    return servers
