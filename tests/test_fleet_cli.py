"""`etwmon ship` and `etwmon tail --from` as a new user meets them: a server without JetStream, no stream yet,
nobody listening, a URL that is not NATS, and the --stats line: one clear line each and the right exit status."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REQUIRE_ROOT

try:
    import nats  # noqa: F401
except ImportError:
    if REQUIRE_ROOT:
        raise
    pytest.skip("nats-py is not installed (pip install 'etwmon[nats]')", allow_module_level=True)

from .helpers import Watch, clean_env, etwmon_argv  # noqa: E402
from .nats_servers import NatsServer, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHIP = ("ship", "--source", "procfs", "--host-id", "h1")


class PlainNatsServer(NatsServer):
    """nats-server as Debian's package starts it: no jetstream block."""

    def write_config(self) -> None:
        self.config.write_text(f'server_name: "{self.name}"\nlisten: "127.0.0.1:{self.port}"\n{self.extra}\n')


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(etwmon_argv(*args), capture_output=True, text=True, timeout=timeout,
                          env=clean_env(PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL)


@pytest.fixture
def plain_server(tmp_path):
    s = PlainNatsServer(tmp_path).start()
    yield s
    s.stop(signal.SIGKILL)


@pytest.fixture
def server(tmp_path):
    s = NatsServer(tmp_path).start()
    yield s
    s.stop(signal.SIGKILL)


@pytest.mark.parametrize("command", [[*SHIP, "--to"], ["tail", "--from"]], ids=["ship", "tail"])
def test_a_server_without_jetstream_is_one_line_saying_how_to_turn_it_on(plain_server, command):
    result = run(*command, plain_server.url)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert plain_server.url in line and "JetStream" in line and "jetstream {" in line and "store_dir" in line, line
    assert "Traceback" not in result.stderr


def test_tail_from_before_anything_was_shipped_names_the_server_not_a_python_list(server):
    result = run("tail", "--from", server.url)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "['" not in lines[0] and "[" not in lines[0], result.stderr
    assert f"no stream ETWMON on {server.url}" in lines[0] and "etwmon ship" in lines[0]


@pytest.mark.parametrize("command", [[*SHIP, "--to"], ["tail", "--from"]], ids=["ship", "tail"])
@pytest.mark.parametrize("url", ["http://127.0.0.1:4222", "https://nats.example", "127.0.0.1:4222", "nats:/x"])
def test_a_url_that_is_not_nats_is_refused_at_once(command, url):
    started = time.monotonic()
    result = run(*command, url, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "nats://" in result.stderr and "tls://" in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 15  # no connection attempt, no DNS


def test_ship_to_nobody_keeps_trying_says_so_periodically_and_a_stop_with_nothing_delivered_fails():
    url = f"nats://127.0.0.1:{free_port()}"
    with Watch(etwmon_argv(*SHIP, "--to", url, "--stats-interval", "1"),
               env=clean_env(PYTHONPATH=str(ROOT))) as ship:
        pattern = re.compile(rb"cannot reach " + re.escape(url.encode()) + rb" since \S+.*still trying.*"
                             rb"\d+ records waiting.*\d+ dropped")
        ship.wait_err(lambda l: bool(pattern.search(l)), timeout=60, what="a 'cannot reach' line")
        count = lambda: sum(1 for l in ship.err if pattern.search(l))  # noqa: E731
        deadline = time.monotonic() + 30
        while count() < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert count() >= 3, ship.stderr  # said again while it keeps trying
        status = ship.stop(signal.SIGINT)
    assert status == 1, ship.stderr
    last = ship.stderr.strip().splitlines()[-1]
    assert "nothing was delivered" in last and url in last, ship.stderr
    assert "Traceback" not in ship.stderr


def test_ship_started_before_its_server_delivers_once_the_server_comes(tmp_path):
    port = free_port()
    server = NatsServer(tmp_path, port=port)
    url = f"nats://127.0.0.1:{port}"
    try:
        with Watch(etwmon_argv(*SHIP, "--to", url), env=clean_env(PYTHONPATH=str(ROOT))) as ship:
            ship.wait_err(lambda l: b"cannot reach" in l, timeout=60, what="a 'cannot reach' line")
            server.start()
            ship.wait_err(lambda l: b"shipping to" in l, timeout=60, what="the shipping line")
            with Watch(etwmon_argv("tail", "--from", url, "--since", "all", "--json"),
                       env=clean_env(PYTHONPATH=str(ROOT))) as tail:
                tail.wait_out(lambda l: b'"host": "h1"' in l or b'"host":"h1"' in l, timeout=60,
                              what="an event of h1")
                assert tail.stop() == 0
            assert ship.stop(signal.SIGINT) == 0, ship.stderr
    finally:
        server.stop(signal.SIGKILL)
    assert re.search(r"stopped: [1-9]\d* batches", ship.stderr), ship.stderr


def test_ship_stats_prints_the_status_line_tail_has(server):
    with Watch(etwmon_argv(*SHIP, "--to", server.url, "--stats", "--stats-interval", "0.5"),
               env=clean_env(PYTHONPATH=str(ROOT))) as ship:
        line = ship.wait_err(lambda l: l.startswith(b"stats:") or b": stats:" in l, timeout=60,
                             what="a stats line").decode()
        assert re.search(r"stats: \d+ records \([\d.]+/s\), ring \d+/\d+ records \S+ \S* ?\(\d+% full\), "
                         r"\d+ missed, \d+ dropped, \d+ sent", line), line
        assert ship.stop(signal.SIGINT) == 0, ship.stderr
