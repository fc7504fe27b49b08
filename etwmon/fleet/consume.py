"""Fleet: ship a host's records to NATS JetStream (``Shipper``) and read every host's back (``FleetConsumer``),
with nothing lost silently on the way.

Each host publishes the bytes of its Monitor's ``readinto`` batches, unchanged, to its own subject
``etwmon.<host>.events`` on one stream. Headers say who sent the batch and where it sits in that host's run
(``Etwmon-Run``/``Etwmon-Seq``) and how many events the run has accounted for so far (``Etwmon-Total``), so a
consumer can tell a duplicate from a gap and give the size of a gap exactly, as a RecordsLost event of that
host. ``Nats-Msg-Id`` makes a retried publish stored once. Everything a message claims is checked: a consumer
counts and reports a bad message with the host it claims and goes on.

nats-py is an optional dependency (``pip install 'etwmon[nats]'``). Usage and server configuration:
docs/fleet.md.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import ssl
import stat
import struct
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import Error, RecordFormatError
from ..records import (
    HEADER_SIZE, Event, ItemType, RecordsLost, filetime_now, parse, record_headers,
)

__all__ = [
    "FleetError", "FleetAuth", "load_auth", "Shipper", "ShipperStats", "FleetConsumer", "HostBatch", "FleetReader",
    "FleetNotice", "HostStats", "subject_for", "default_host_id", "check_host_id", "parse_since", "parse_duration",
    "DEFAULT_STREAM", "SUBJECT_PATTERN", "AUTH_ENV",
]

log = logging.getLogger(__name__)

#: The stream every host publishes to, and the subjects it holds (one per host).
DEFAULT_STREAM = "ETWMON"
SUBJECT_PATTERN = "etwmon.*.events"
DEFAULT_MAX_AGE = 7 * 86_400.0  # seconds
DEFAULT_MAX_BYTES = 1 << 30
#: How long JetStream remembers a Nats-Msg-Id: a publish retried within it is stored once.
DUPLICATE_WINDOW = 120.0

# Message headers (values are ASCII; times are FILETIME integers in decimal).
H_MSG_ID = "Nats-Msg-Id"
H_HOST = "Etwmon-Host"
H_BOOT = "Etwmon-Boot"  # the kernel's boot id: pids and times belong to one boot
H_RUN = "Etwmon-Run"  # this run of the shipper: a new run starts its sequence at 1
H_SOURCE = "Etwmon-Source"
H_SEQ = "Etwmon-Seq"  # batch sequence within the run, from 1, no gaps
H_COUNT = "Etwmon-Count"  # records in the body
H_TOTAL = "Etwmon-Total"  # events accounted for in the run up to this batch: records + counts reported lost
H_FIRST = "Etwmon-First-Time"
H_LAST = "Etwmon-Last-Time"

_LOST_TYPE_LOW = int(ItemType.RecordsLost) & 0xFF
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
_HOST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class FleetError(Error):
    """The fleet cannot work: nats-py missing, the server refused the credentials or a subject, bad options."""


def _nats():
    try:
        import nats  # noqa: F401
        import nats.errors  # noqa: F401
        import nats.js.api  # noqa: F401
        import nats.js.errors  # noqa: F401
    except ImportError as exc:
        raise FleetError("the fleet needs nats-py: pip install 'etwmon[nats]'" + f" ({exc})") from None
    return nats


# --- names -------------------------------------------------------------------------------------------------


def check_host_id(host: str) -> str:
    """``host`` if it can be one subject token (letters, digits, ``_``, ``-``), else ``FleetError``."""
    if not isinstance(host, str) or not _HOST_ID.fullmatch(host):
        raise FleetError(f"host id {host!r} must be 1-128 letters, digits, '_' or '-' (it is a NATS subject "
                         "token: no dots, spaces or wildcards)")
    return host


def default_host_id() -> str:
    """The hostname, with each character a subject token cannot hold (dots of a FQDN) made ``_``."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:128]
    return name or "localhost"


def subject_for(host: str) -> str:
    """``etwmon.<host>.events``: the one subject a host publishes to (so permissions can pin it)."""
    return f"etwmon.{check_host_id(host)}.events"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:  # not Linux: one id per run stands in for the boot
        return uuid.uuid4().hex


_RELATIVE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_duration(text: str) -> float:
    """``30s``, ``10m``, ``2h``, ``7d`` or plain seconds → seconds; ``ValueError`` otherwise."""
    match = _RELATIVE.fullmatch(text)
    if match:
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a duration such as 3600, 90m, 12h or 7d, not {text!r}") from None
    if not value > 0:
        raise ValueError(f"a duration must be more than 0, not {text!r}")
    return value


def parse_since(text: str, now: datetime | None = None) -> datetime | None:
    """``--since``: ``all`` (None: everything the stream holds), an ISO-8601 time (UTC when it names no zone)
    or an age such as ``30s``, ``10m``, ``2h``, ``1d``. ``ValueError`` otherwise."""
    if text.strip().lower() == "all":
        return None
    if _RELATIVE.fullmatch(text):
        return (now or datetime.now(timezone.utc)) - timedelta(seconds=parse_duration(text))
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since takes 'all', an ISO-8601 time (2026-12-01T09:30:00Z) or an age (10m, 2h, 1d), "
                         f"not {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


# --- credentials ---------------------------------------------------------------------------------------------

#: The environment variables (and the names in an auth file) that hold credentials and TLS settings.
AUTH_ENV = {
    "user": "ETWMON_NATS_USER",
    "password": "ETWMON_NATS_PASSWORD",
    "token": "ETWMON_NATS_TOKEN",
    "nkey_seed_file": "ETWMON_NATS_NKEY_SEED_FILE",
    "creds_file": "ETWMON_NATS_CREDS_FILE",
    "tls_ca": "ETWMON_NATS_TLS_CA",
    "tls_cert": "ETWMON_NATS_TLS_CERT",
    "tls_key": "ETWMON_NATS_TLS_KEY",
}
ENV_AUTH_FILE = "ETWMON_NATS_AUTH_FILE"


@dataclass(frozen=True)
class FleetAuth:
    """How to authenticate to NATS: any of user/password, token, an nkey seed file, a credentials (.creds) file,
    and TLS (a CA file to trust; a client certificate and key). Built by ``load_auth`` from a file or the
    environment so no secret ever needs to be in argv."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey_seed_file: str | None = None
    creds_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def connect_options(self, url: str) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``."""
        opts: dict[str, Any] = {}
        if self.user is not None:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        if self.token is not None:
            opts["token"] = self.token
        if self.nkey_seed_file or self.creds_file:
            import importlib.util

            if importlib.util.find_spec("nkeys") is None:  # nats-py signs the server's nonce with it
                raise FleetError("nkey and credentials-file authentication need the nkeys package: "
                                 "pip install nkeys")
            if self.nkey_seed_file:
                opts["nkeys_seed"] = self.nkey_seed_file
            if self.creds_file:
                opts["user_credentials"] = self.creds_file
        if self.tls_ca or self.tls_cert or url.startswith("tls://"):
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            opts["tls"] = context
        return opts


def _read_auth_file(path: str) -> dict[str, str]:
    """``NAME=value`` lines (the AUTH_ENV names; ``#`` comments), from a file only its owner can read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise FleetError(f"cannot open the NATS auth file {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "r", encoding="utf-8") as f:
        info = os.fstat(f.fileno())
        if hasattr(os, "geteuid"):
            if not stat.S_ISREG(info.st_mode):
                raise FleetError(f"the NATS auth file {path} is not a regular file")
            if info.st_uid not in (0, os.geteuid()):
                raise FleetError(f"the NATS auth file {path} belongs to uid {info.st_uid}, not to this user or root")
            if info.st_mode & 0o077:
                raise FleetError(f"the NATS auth file {path} holds secrets but others may read or write it "
                                 f"(mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 {path}")
        text = f.read()
    values: dict[str, str] = {}
    known = set(AUTH_ENV.values())
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or name not in known:
            raise FleetError(f"{path} line {number}: expected NAME=value with NAME one of {', '.join(sorted(known))}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values


def load_auth(environ: Mapping[str, str] | None = None, path: str | None = None) -> FleetAuth:
    """Credentials from the auth file ``path`` (or ``$ETWMON_NATS_AUTH_FILE``), then the AUTH_ENV variables
    for what the file does not set."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_AUTH_FILE) or None
    values = _read_auth_file(path) if path else {}
    chosen = {key: values.get(name, environ.get(name) or None) for key, name in AUTH_ENV.items()}
    return FleetAuth(**chosen)


def _describe_url(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//", url)  # never repeat a password given in the URL


async def _connect(url: str | Sequence[str], auth: FleetAuth | None, name: str,
                   on_error: Callable[[Exception], None] | None = None, connect_timeout: float = 2.0,
                   reconnect_wait: float = 0.5, on_disconnect: Callable[[], None] | None = None,
                   on_reconnect: Callable[[], None] | None = None, stop: asyncio.Event | None = None,
                   give_up_after: float | None = None):
    """A nats-py connection that reconnects forever (None if ``stop`` is set first), or ``FleetError`` at once
    when the server refuses the credentials (nats-py would retry those forever too), or when no server answered
    within ``give_up_after`` seconds."""
    nats = _nats()
    servers = [url] if isinstance(url, str) else list(url)
    refused: list[Exception] = []
    done = asyncio.get_running_loop().create_future()
    said: set[str] = set()
    reasons: set[str] = set()

    async def error_cb(exc: Exception) -> None:
        text = str(exc)
        if re.search(r"authorization violation|authentication", text, re.IGNORECASE):
            refused.append(exc)
            if not done.done():
                done.set_result(None)
            return
        if refused:  # the server closes a refused connection: its reset is the refusal's echo, not news
            return
        if len(reasons) < 5:
            reasons.add(text or type(exc).__name__)
        if on_error is not None:
            on_error(exc)
        elif text not in said:  # once each: a server that is away would repeat it every reconnect
            said.add(text)
            log.warning("nats: %s", text or type(exc).__name__)

    async def disconnected_cb() -> None:
        if on_disconnect is not None:
            on_disconnect()

    async def reconnected_cb() -> None:
        if on_reconnect is not None:
            on_reconnect()

    options = (auth or FleetAuth()).connect_options(servers[0])
    task = asyncio.ensure_future(nats.connect(
        servers, name=name, error_cb=error_cb, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb,
        allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=reconnect_wait,
        connect_timeout=connect_timeout, **options))
    waits = [task, done] + ([asyncio.ensure_future(stop.wait())] if stop is not None else [])
    await asyncio.wait(waits, timeout=give_up_after, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():  # stopped, or gave up, while still trying to reach the server
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        for w in waits[1:]:
            w.cancel()
        if not refused and stop is not None and stop.is_set():
            return None
        if not refused:
            why = "; ".join(sorted(reasons)) or "no answer"
            raise FleetError(f"cannot reach {', '.join(map(_describe_url, servers))} within {give_up_after:.0f} s "
                             f"({why})") from None
    if refused:
        task.cancel()
        try:
            nc = await task
        except BaseException:
            nc = None
        if nc is not None:
            await nc.close()
        raise FleetError(f"{', '.join(map(_describe_url, servers))} refused the credentials ({refused[0]}): "
                         "check the user/password, token, nkey or creds file") from None
    for w in waits[1:]:
        w.cancel()
    return task.result()


# --- shipping --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShipperStats:
    """What a Shipper sent. A batch counts as sent only once JetStream acknowledged storing it."""

    host: str
    run: str
    batches: int = 0
    records: int = 0  # records in acknowledged batches (RecordsLost markers included)
    bytes: int = 0
    lost_reported: int = 0  # events the batches reported lost (ring drops and source losses)
    retries: int = 0  # publishes that had to be sent again
    duplicates: int = 0  # acknowledgements saying JetStream already had the batch (a retry that had landed)
    unsent: int = 0  # records left when stopping while the server stayed away (logged as an error)
    connected: bool = False


def _batch_summary(body: memoryview) -> tuple[int, int, int, int, int]:
    """(records, events accounted for, events reported lost, first time, last time) of a readinto batch:
    a RecordsLost record accounts for the records it counts, every other record for itself."""
    # The ring's own bytes (whole records, checked when pushed): a plain walk by Size is enough, and cheap.
    end, offset, records, markers, lost, last_at = len(body), 0, 0, 0, 0, 0
    while offset < end:
        if body[offset] == _LOST_TYPE_LOW and body[offset + 1] == 0:
            markers += 1
            lost += _U32.unpack_from(body, offset + HEADER_SIZE)[0]
        last_at = offset
        offset += body[offset + 2] | (body[offset + 3] << 8)
        records += 1
    if not records:
        return 0, 0, 0, 0, 0
    return (records, records - markers + lost, lost, _I64.unpack_from(body, 8)[0],
            _I64.unpack_from(body, last_at + 8)[0])


class Shipper:
    """Publish a Monitor's records to JetStream until stopped: ``Shipper(monitor, "nats://host:4222").run()``.

    Each ``readinto`` batch (up to ``batch_bytes``; ``batch_wait`` seconds are given to the records behind the
    first) is one message on ``etwmon.<host_id>.events``, published again until JetStream acknowledges it;
    meanwhile the Monitor's ring keeps the newer records (a full ring drops its oldest, counted, and the next
    batch starts with a RecordsLost record). The stream is created if absent, with ``max_age`` seconds and
    ``max_bytes`` retention, ``replicas`` copies in a cluster and file storage.
    """

    def __init__(self, monitor: Any, url: str | Sequence[str], host_id: str | None = None, *,
                 stream: str = DEFAULT_STREAM, auth: FleetAuth | None = None, max_age: float = DEFAULT_MAX_AGE,
                 max_bytes: int = DEFAULT_MAX_BYTES, replicas: int = 1, create_stream: bool = True,
                 batch_bytes: int = 0x10000, batch_wait: float = 0.01, publish_timeout: float = 2.0,
                 max_backoff: float = 2.0, drain_timeout: float = 10.0) -> None:
        self.monitor = monitor
        self.url = url
        self.host = check_host_id(host_id or default_host_id())
        self.subject = subject_for(self.host)
        if not _TOKEN.fullmatch(stream):
            raise FleetError(f"stream name {stream!r} must be letters, digits, '_' or '-'")
        self.stream = stream
        self.auth = auth
        self.max_age, self.max_bytes, self.replicas = max_age, max_bytes, replicas
        self.create_stream = create_stream
        self.batch_wait, self.publish_timeout, self.max_backoff = batch_wait, publish_timeout, max_backoff
        self.drain_timeout = drain_timeout
        self._give_up_at = float("inf")
        self.boot = _boot_id()
        # Runs of one host sort by start time, so a consumer can tell the newer run.
        self.run_id = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
        self._buf = bytearray(batch_bytes)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fatal: FleetError | None = None
        self._denied = ""  # the last permissions violation the server reported
        self._connected = False
        self._seq = self._total = 0
        self._counts = dict(batches=0, records=0, bytes=0, lost_reported=0, retries=0, duplicates=0, unsent=0)

    def describe(self) -> str:
        servers = [self.url] if isinstance(self.url, str) else list(self.url)
        return f"{', '.join(map(_describe_url, servers))} as {self.host} (stream {self.stream})"

    @property
    def stats(self) -> ShipperStats:
        return ShipperStats(host=self.host, run=self.run_id, connected=self._connected, **self._counts)

    def stop(self) -> None:
        """Ask ``run`` to stop the Monitor, send what its ring holds and return (thread-safe)."""
        loop, event = self._loop, self._stop
        if loop is not None and event is not None:
            loop.call_soon_threadsafe(event.set)

    def run(self, until: Callable[[], bool] | None = None, stop_signals: bool = False,
            on_ready: Callable[[], None] | None = None) -> ShipperStats:
        """Ship until ``stop()``, ``until()`` is true, or the Monitor stops; then send what is left. Blocks.
        With ``stop_signals`` (main thread only), SIGINT and SIGTERM mean ``stop()``; ``on_ready`` is called
        once connected with the stream in place."""
        return asyncio.run(self.run_async(until, stop_signals, on_ready))

    async def run_async(self, until: Callable[[], bool] | None = None, stop_signals: bool = False,
                        on_ready: Callable[[], None] | None = None) -> ShipperStats:
        nats = _nats()
        self._loop = loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if stop_signals:
            import signal

            for number in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(number, self._stop.set)

        def on_error(exc: Exception) -> None:
            text = str(exc)
            if "permissions violation" in text.lower():
                self._denied = text
            if "permissions violation" in text.lower() and self.subject in text:
                self._fatal = FleetError(f"the server does not let this user publish to {self.subject}: {text} "
                                         "(is --host-id the one its credentials are for?)")
            elif text not in said:
                said.add(text)
                log.warning("nats: %s", text or type(exc).__name__)

        said: set[str] = set()

        def disconnected() -> None:
            if self._connected:  # (not when closing)
                log.warning("lost the connection to NATS; records wait in the ring")
            self._connected = False

        def reconnected() -> None:
            self._connected = True
            log.warning("reconnected to NATS")

        nc = await _connect(self.url, self.auth, f"etwmon-ship-{self.host}", on_error,
                            on_disconnect=disconnected, on_reconnect=reconnected, stop=self._stop)
        if nc is None:
            return self.stats
        self._connected = True
        try:
            js = nc.jetstream(timeout=self.publish_timeout)
            if self.create_stream:
                await self._ensure_stream(js, nats)
            if on_ready is not None:
                on_ready()
            await self._ship(js, nats, until)
        finally:
            self._connected = False
            try:
                await asyncio.wait_for(nc.close(), 5)
            except Exception:
                pass
        return self.stats

    async def _ensure_stream(self, js, nats) -> None:
        api = nats.js.api
        unanswered = (nats.errors.TimeoutError, asyncio.TimeoutError, nats.errors.NoRespondersError)
        try:
            await js.stream_info(self.stream)
            return
        except nats.js.errors.NotFoundError:
            pass
        except unanswered as exc:  # not allowed to ask, or JetStream busy (a cluster electing): publish anyway
            log.warning("could not check stream %s (%s); publishing anyway", self.stream,
                        self._denied or type(exc).__name__)
            return
        config = api.StreamConfig(
            name=self.stream, subjects=[SUBJECT_PATTERN], max_age=self.max_age, max_bytes=self.max_bytes,
            storage=api.StorageType.FILE, num_replicas=self.replicas, duplicate_window=DUPLICATE_WINDOW,
            discard=api.DiscardPolicy.OLD, retention=api.RetentionPolicy.LIMITS)
        try:
            await js.add_stream(config)
            log.info("created stream %s (%s, max age %.0f s, max %d bytes, %d replicas)", self.stream,
                     SUBJECT_PATTERN, self.max_age, self.max_bytes, self.replicas)
        except unanswered as exc:
            raise FleetError(f"there is no stream {self.stream} and making it got no answer "
                             f"({self._denied or type(exc).__name__}): make it as an administrator and ship with "
                             "--no-create-stream (docs/fleet.md)") from None
        except nats.js.errors.APIError as exc:
            if "already in use" in str(exc):  # a concurrent shipper made it first
                return
            raise FleetError(f"cannot create stream {self.stream} (max age {self.max_age:.0f} s, max "
                             f"{self.max_bytes} bytes, {self.replicas} replicas): {exc.description or exc}") from None

    async def _wait_for_records(self, timeout: float) -> None:
        monitor, loop = self.monitor, asyncio.get_running_loop()
        if monitor.ring.readable():
            return
        ready = asyncio.Event()
        try:
            fd = monitor.fileno()
            loop.add_reader(fd, ready.set)
        except (Error, OSError, NotImplementedError, ValueError):
            await asyncio.sleep(min(timeout, 0.05))
            return
        try:
            waits = [asyncio.ensure_future(ready.wait()), asyncio.ensure_future(self._stop.wait())]
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        finally:
            loop.remove_reader(fd)

    async def _ship(self, js, nats, until) -> None:
        monitor, buf = self.monitor, self._buf
        view = memoryview(buf)
        stopped = False
        while True:
            self._check_fatal()
            if not stopped and (self._stop.is_set() or (until is not None and until())):
                # Stop the source first, so what is left to send is finite, then send it.
                stopped = True
                self._stop.set()
                self._give_up_at = time.monotonic() + self.drain_timeout
                await asyncio.get_running_loop().run_in_executor(None, monitor.stop)
            n = monitor.readinto(buf)
            if n:
                if not await self._publish_batch(js, nats, view[:n]):
                    return
                continue
            if stopped or not monitor.running:
                return
            await self._wait_for_records(0.5)
            if self.batch_wait and monitor.ring.readable() and not self._stop.is_set():
                await asyncio.sleep(self.batch_wait)

    def _check_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    async def _publish_batch(self, js, nats, body: memoryview) -> bool:
        """Publish until acknowledged: True; False when stopping and the server stayed away past
        ``drain_timeout`` (the batch is counted as unsent)."""
        records, events, lost, first, last = _batch_summary(body)
        self._seq += 1
        self._total += events
        seq = self._seq
        headers = {
            H_MSG_ID: f"{self.host}.{self.boot}.{self.run_id}.{seq}",
            H_HOST: self.host, H_BOOT: self.boot, H_RUN: self.run_id,
            H_SOURCE: getattr(self.monitor.source, "name", "") or "?",
            H_SEQ: str(seq), H_COUNT: str(records), H_TOTAL: str(self._total),
            H_FIRST: str(first), H_LAST: str(last),
        }
        payload = bytes(body)
        retryable = (nats.errors.TimeoutError, asyncio.TimeoutError, nats.errors.NoRespondersError,
                     nats.js.errors.NoStreamResponseError, nats.errors.ConnectionClosedError,
                     nats.errors.ConnectionReconnectingError, nats.errors.OutboundBufferLimitError,
                     nats.js.errors.ServiceUnavailableError, nats.errors.StaleConnectionError)
        backoff = 0.05
        while True:
            try:
                ack = await js.publish(self.subject, payload, headers=dict(headers), timeout=self.publish_timeout)
                break
            except retryable as exc:
                self._check_fatal()
                if isinstance(exc, nats.js.errors.NoStreamResponseError) and not self._counts["retries"]:
                    log.warning("no stream takes %s (yet?): make it (docs/fleet.md); retrying", self.subject)
                self._counts["retries"] += 1
                log.debug("publish of batch %d failed (%r); again in %.2f s", seq, exc, backoff)
            except nats.js.errors.APIError as exc:
                self._check_fatal()
                if exc.code is not None and exc.code < 500 and exc.code != 408:
                    raise FleetError(f"JetStream refused batch {seq} on {self.subject}: {exc}") from None
                self._counts["retries"] += 1
                log.debug("publish of batch %d failed (%r); again in %.2f s", seq, exc, backoff)
            if time.monotonic() > self._give_up_at:
                self._counts["unsent"] += records + len(self.monitor.ring)
                log.error("stopping with %d records unsent: the server did not come back within %.0f s",
                          self._counts["unsent"], self.drain_timeout)
                return False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)
        c = self._counts
        c["batches"] += 1
        c["records"] += records
        c["bytes"] += len(payload)
        c["lost_reported"] += lost
        if ack.duplicate:
            c["duplicates"] += 1
        return True


# --- consuming -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostBatch:
    """One batch of one host, checked: its ``events`` and the same records as bytes (``data``, the wire
    format, for readers of bytes). ``gap`` events were lost just before it (batches of this host that never
    came, or were refused as malformed): then ``events`` and ``data`` start with a RecordsLost of that count,
    made by the consumer. RecordsLost records the host sent itself (its ring dropped or its source missed
    records) are among the events as they came."""

    host: str
    events: list[Event]
    data: bytes
    boot: str
    run: str
    seq: int
    source: str
    gap: int = 0


@dataclass(frozen=True)
class FleetNotice:
    """Something about the stream rather than a host's events: ``kind`` is ``malformed`` (a message that
    breaks the format or lies in its headers), ``forged`` (its Etwmon-Host is not its subject's host) or
    ``restarted`` (the host's shipper started a new run: what happened between the runs was not watched).
    ``host`` is the host the message claims (from its subject)."""

    host: str
    kind: str
    message: str
    time: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


@dataclass
class HostStats:
    """What a consumer saw of one host."""

    batches: int = 0
    records: int = 0
    duplicates: int = 0  # batches seen before (dropped)
    batches_lost: int = 0  # gaps in the batch sequence
    records_lost: int = 0  # events in those gaps, plus those the host reported lost
    malformed: int = 0  # messages that broke the format or lied (forged included)
    restarts: int = 0


@dataclass
class _HostState:
    boot: str
    run: str
    seq: int
    total: int


_MAX_LOST_COUNT = 0xFFFFFFFF  # RecordsLost's Count is a ULONG
#: Seconds of pulls answered by nothing (no messages, no heartbeats) on a live connection before the consumer
#: is made again: its server may have died (a cluster), or it was dropped.
_SILENCE_RESET = 3.0
_DRAIN_PULL = 0.02  # seconds a pull for more waits while messages flow (the latency it may add)


class _BadMessage(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _header_int(headers: Mapping[str, str], name: str, minimum: int = 0) -> int:
    text = headers.get(name)
    if text is None:
        raise _BadMessage("malformed", f"no {name} header")
    if not re.fullmatch(r"\d{1,19}", text.strip()):
        raise _BadMessage("malformed", f"{name} {text[:40]!r} is not a whole number")
    value = int(text)
    if value < minimum:
        raise _BadMessage("malformed", f"{name} {value} is below {minimum}")
    return value


def _header_token(headers: Mapping[str, str], name: str) -> str:
    text = headers.get(name)
    if text is None:
        raise _BadMessage("malformed", f"no {name} header")
    if not _TOKEN.fullmatch(text):
        raise _BadMessage("malformed", f"{name} {text[:40]!r} is not a plain token")
    return text


class FleetConsumer:
    """Read every host's events from the stream: ``for item in consumer.read(timeout)``.

    ``hosts``: only these hosts (default: all). ``since``: replay from this time (a datetime), or everything
    the stream holds (``since="all"``); default: only what arrives from now on. ``durable``: a consumer name
    the server remembers, so a restarted reader continues after the last batch it acknowledged (a batch is
    acknowledged when the read() after the one that returned it is called, or at close()). ``open()`` gives up
    with ``FleetError`` when no server answers within ``connect_wait`` seconds; once connected it reconnects
    forever.

    ``read`` returns ``HostBatch`` items (per host in order, duplicates dropped, a gap in a host's batch
    sequence as a RecordsLost of the exact size) and ``FleetNotice`` items. It keeps going through server
    restarts and leader changes: when the server's consumer is gone or deliveries skip, it is made again
    from the stream sequence after the last message read.
    """

    def __init__(self, url: str | Sequence[str], *, hosts: Iterable[str] | None = None,
                 since: datetime | str | None = None, durable: str | None = None, stream: str = DEFAULT_STREAM,
                 auth: FleetAuth | None = None, fetch_batch: int = 64, connect_wait: float = 10.0) -> None:
        self.url = url
        self.connect_wait = connect_wait
        self.hosts = frozenset(check_host_id(h) for h in hosts) if hosts else None
        if isinstance(since, str):
            if since.strip().lower() != "all":
                since = parse_since(since)
        self.since = since
        if durable is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", durable):
            raise FleetError(f"durable consumer name {durable!r} must be 1-64 letters, digits, '_' or '-'")
        self.durable = durable
        if not _TOKEN.fullmatch(stream):
            raise FleetError(f"stream name {stream!r} must be letters, digits, '_' or '-'")
        self.stream = stream
        self.auth = auth
        self.fetch_batch = fetch_batch
        self.stats: dict[str, HostStats] = {}
        self.notices = 0
        self.resets = 0
        self._state: dict[str, _HostState] = {}
        self._loop = asyncio.new_event_loop()
        self._nc = None
        self._js = None
        self._sub = None
        self._last_stream_seq = 0  # of the last message read (the place to start again from)
        self._next_consumer_seq = 1
        self._unacked = None  # the last message returned, acknowledged (with all before it) at the next read
        self._consumer_name = ""
        self._flowing = False  # messages came at the last pull: ask for many, briefly
        self._silent_since: float | None = None  # since when pulls get no answer, not even heartbeats
        self._closed = False

    # -- life cycle ---------------------------------------------------------------------------------------

    @property
    def filter_subject(self) -> str:
        if self.hosts is not None and len(self.hosts) == 1:
            return subject_for(next(iter(self.hosts)))
        return SUBJECT_PATTERN

    def open(self) -> "FleetConsumer":
        """Connect and make the server-side consumer (``FleetError`` on refused credentials, no stream)."""
        if self._nc is None:
            self._loop.run_until_complete(self._open())
        return self

    def __enter__(self) -> "FleetConsumer":
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._nc is not None:
                self._loop.run_until_complete(self._close())
        finally:
            self._loop.close()

    async def _close(self) -> None:
        try:
            await asyncio.wait_for(self._ack(), 2)
        except Exception:
            pass
        try:
            if self._sub is not None:
                await self._sub.unsubscribe()
            if not self.durable:  # an ephemeral consumer would linger on the server for its inactivity time
                await self._js.delete_consumer(self.stream, self._consumer_name)
        except Exception:
            pass
        try:
            await asyncio.wait_for(self._nc.close(), 5)
        except Exception:
            pass

    async def _open(self) -> None:
        nats = _nats()
        self._nc = await _connect(self.url, self.auth, "etwmon-tail", None, give_up_after=self.connect_wait)
        self._js = self._nc.jetstream(timeout=5)
        try:
            await self._js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await self._nc.close()
            raise FleetError(f"there is no stream {self.stream} on {_describe_url(str(self.url))} yet "
                             "(etwmon ship creates it)") from None
        await self._subscribe(first=True)

    def _config(self, start_seq: int | None):
        api = _nats().js.api
        config = api.ConsumerConfig(filter_subject=self.filter_subject,
                                    inactive_threshold=None if self.durable else 300.0)
        if self.durable:
            # Acknowledging a message acknowledges all before it: one ack per read.
            config.ack_policy, config.max_ack_pending, config.ack_wait = api.AckPolicy.ALL, 1000, 60.0
        else:
            config.ack_policy = api.AckPolicy.NONE
        if start_seq is not None:
            config.deliver_policy, config.opt_start_seq = api.DeliverPolicy.BY_START_SEQUENCE, start_seq
        elif isinstance(self.since, datetime):
            config.deliver_policy = api.DeliverPolicy.BY_START_TIME
            config.opt_start_time = self.since.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        elif self.since == "all":
            config.deliver_policy = api.DeliverPolicy.ALL
        else:
            config.deliver_policy = api.DeliverPolicy.NEW
        if self.durable:
            config.durable_name = config.name = self.durable
        return config

    async def _subscribe(self, first: bool = False) -> None:
        """(Re)make the server's consumer so it delivers, in order, from the message after the last one read
        (or as asked, the first time)."""
        nats = _nats()
        jsm, js = self._js, self._js
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
            self._sub = None
        start: int | None = self._last_stream_seq + 1 if self._last_stream_seq else None
        if first and self.durable:
            try:
                info = await jsm.consumer_info(self.stream, self.durable)
                # Continue after what it acknowledged; making it again (not binding) keeps deliveries in
                # order: unacknowledged messages would otherwise come back after newer ones.
                floor = info.ack_floor.stream_seq if info.ack_floor else 0
                if floor:
                    start = floor + 1
                    self._last_stream_seq = floor
                elif info.config.opt_start_seq:  # made again at that point, nothing acknowledged since
                    start = info.config.opt_start_seq
                    self._last_stream_seq = start - 1
            except nats.js.errors.NotFoundError:
                pass
        if self.durable or self._consumer_name:
            try:
                await jsm.delete_consumer(self.stream, self.durable or self._consumer_name)
            except (nats.js.errors.NotFoundError, AttributeError):
                pass
            except Exception as exc:
                log.debug("could not delete the old consumer: %r", exc)
        config = self._config(start)
        if not self.durable:
            self._consumer_name = config.name = f"etwmon-tail-{uuid.uuid4().hex[:16]}"
        info = await jsm.add_consumer(self.stream, config=config)
        if start is None and info.delivered and info.delivered.stream_seq:
            # Deliver-new starts after the stream's last message at creation: start again from there.
            self._last_stream_seq = max(self._last_stream_seq, info.delivered.stream_seq)
        self._sub = await js.pull_subscribe_bind(self.durable or self._consumer_name, stream=self.stream)
        self._next_consumer_seq = 1

    async def _reset(self, why: str) -> None:
        self.resets += 1
        log.info("consumer made again from stream sequence %d: %s", self._last_stream_seq + 1, why)
        await self._subscribe()

    # -- reading ------------------------------------------------------------------------------------------

    def read(self, timeout: float | None = 1.0) -> list[HostBatch | FleetNotice]:
        """What arrived, waiting up to ``timeout`` seconds for the first message ([] when nothing came)."""
        if self._nc is None:
            self.open()
        return self._loop.run_until_complete(self._read(timeout))

    async def _ack(self) -> None:
        msg, self._unacked = self._unacked, None
        if msg is not None and self.durable:
            await msg.ack()

    async def _read(self, timeout: float | None) -> list:
        nats = _nats()
        try:
            await self._ack()
        except Exception as exc:  # the server will deliver them again; duplicates are dropped
            log.debug("ack failed: %r", exc)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0.01:
                return []
            # nats-py's fetch(n) returns once n messages came or its timeout passed: asking for many while
            # few flow would hold each for the whole timeout. So: wait for one (a pull that lingers, with
            # heartbeats to tell "nothing new" from "gone"), then take what else is there with short pulls.
            flowing = self._flowing
            try:
                if self._sub is None:
                    await self._subscribe()
                if flowing:
                    msgs = await self._sub.fetch(self.fetch_batch, timeout=_DRAIN_PULL)
                else:
                    wait = min(max(left, 0.05), 1.0)
                    # The server refuses a heartbeat of half the pull's expiry or more.
                    msgs = await self._sub.fetch(1, timeout=wait, heartbeat=wait / 4 if wait >= 0.2 else None)
            except nats.js.errors.FetchTimeoutError:
                self._flowing = False
                self._silent_since = None  # it sent heartbeats: it is there, and had nothing
                continue
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                self._flowing = False
                if not flowing:
                    # No heartbeat either: the server is away or our consumer is gone (server restart, leader
                    # change, inactivity). Make it again once the server answers.
                    await self._probe()
                continue
            except (nats.errors.Error, OSError) as exc:
                self._flowing = False
                log.debug("fetch failed: %r", exc)
                await asyncio.sleep(0.2)
                await self._probe()
                continue
            self._flowing = True
            self._silent_since = None
            out: list = []
            for msg in msgs:
                meta = msg.metadata
                if meta.sequence.stream <= self._last_stream_seq:  # delivered again: already read
                    self._next_consumer_seq = meta.sequence.consumer + 1
                    continue
                if meta.sequence.consumer != self._next_consumer_seq:
                    # A delivery went missing (in flight during a reconnect): it would come back after newer
                    # ones, so start again right after the last message read, in order.
                    await self._reset(f"delivery {meta.sequence.consumer} after {self._next_consumer_seq - 1}")
                    break
                self._next_consumer_seq += 1
                self._last_stream_seq = meta.sequence.stream
                self._unacked = msg
                out.extend(self._handle(msg.subject, msg.headers or {}, msg.data))
            if out:
                return out

    async def _probe(self) -> None:
        """A pull got no answer at all, not even a heartbeat. If the server says our consumer is gone, or it
        stays silent while the connection is up (its consumer lived on a server that died), make it again."""
        nats = _nats()
        now = time.monotonic()
        if self._silent_since is None:
            self._silent_since = now
        why = None
        try:
            await self._js.consumer_info(self.stream, self.durable or self._consumer_name, timeout=1)
        except nats.js.errors.NotFoundError:
            why = "the server's consumer is gone"
        except Exception as exc:  # server unreachable (nats-py is reconnecting), or the cluster is electing
            log.debug("server not answering: %r", exc)
            await asyncio.sleep(0.2)
        if why is None and now - self._silent_since > _SILENCE_RESET and self._nc.is_connected:
            why = f"no answer from the server's consumer for {now - self._silent_since:.0f} s"
        if why is None:
            return
        try:
            await self._reset(why)
            self._silent_since = None
        except Exception as exc:
            log.debug("cannot make the consumer again yet: %r", exc)
            await asyncio.sleep(0.2)

    # -- checking one message ----------------------------------------------------------------------------

    def _host_stats(self, host: str) -> HostStats:
        stats = self.stats.get(host)
        if stats is None:
            stats = self.stats[host] = HostStats()
        return stats

    def _handle(self, subject: str, headers: Mapping[str, str], body: bytes) -> list:
        parts = subject.split(".")
        host = parts[1] if len(parts) == 3 and _HOST_ID.fullmatch(parts[1]) else "?"
        if self.hosts is not None and host not in self.hosts:
            return []
        stats = self._host_stats(host)
        try:
            return self._check(host, stats, headers, body)
        except _BadMessage as bad:
            stats.malformed += 1
            self.notices += 1
            return [FleetNotice(host, bad.kind, str(bad))]

    def _check(self, host: str, stats: HostStats, headers: Mapping[str, str], body: bytes) -> list:
        claimed = headers.get(H_HOST)
        if claimed is None:
            raise _BadMessage("malformed", f"no {H_HOST} header")
        if claimed != host:
            raise _BadMessage("forged", f"a message on {host}'s subject says it is from {claimed[:64]!r}")
        boot = _header_token(headers, H_BOOT)
        run = _header_token(headers, H_RUN)
        seq = _header_int(headers, H_SEQ, 1)
        count = _header_int(headers, H_COUNT)
        total = _header_int(headers, H_TOTAL)
        try:
            events = list(parse(body))
        except RecordFormatError as exc:
            raise _BadMessage("malformed", f"batch {seq} of run {run}: {exc}") from None
        if len(events) != count:
            raise _BadMessage("malformed", f"batch {seq} of run {run} holds {len(events)} records, its "
                                           f"{H_COUNT} says {count}")
        markers = [e.count for e in events if e.type == ItemType.RecordsLost]
        reported = sum(markers)
        in_batch = len(events) - len(markers) + reported
        if total < in_batch:
            raise _BadMessage("malformed", f"batch {seq} of run {run}: {H_TOTAL} {total} is less than the "
                                           f"{in_batch} events it holds")
        out: list = []
        state = self._state.get(host)
        gap = 0
        if state is None or state.run != run:
            if state is not None:
                if run < state.run:
                    raise _BadMessage("malformed", f"batch {seq} of an older run {run} after run {state.run}")
                stats.restarts += 1
                self.notices += 1
                out.append(FleetNotice(host, "restarted",
                                       f"the shipper started again (run {run} after {state.run} at batch "
                                       f"{state.seq}); what happened between the runs was not watched"))
                gap = total - in_batch  # what this run sent before this batch, never seen here
                if gap > _MAX_LOST_COUNT:
                    raise _BadMessage("malformed", f"batch {seq} of run {run} claims {gap} events before it")
                stats.batches_lost += seq - 1
            state = self._state[host] = _HostState(boot, run, seq, total)
        else:
            if seq <= state.seq:
                stats.duplicates += 1
                return []
            if total - in_batch < state.total:
                raise _BadMessage("malformed", f"batch {seq} of run {run}: {H_TOTAL} {total} goes back "
                                               f"before batch {state.seq}'s {state.total}")
            if seq > state.seq + 1:
                gap = total - in_batch - state.total
                if gap > _MAX_LOST_COUNT:
                    raise _BadMessage("malformed", f"batch {seq} of run {run} claims {gap} events were lost "
                                                   "before it: more than a RecordsLost can say")
                stats.batches_lost += seq - state.seq - 1
            state.seq, state.total = seq, total
        data = body
        if gap:
            when = events[0].filetime if events else filetime_now()
            marker = RecordsLost(when, gap)
            events.insert(0, marker)
            data = marker.encode() + body
        stats.batches += 1
        stats.records += count
        stats.records_lost += gap + reported
        out.append(HostBatch(host, events, data, boot, run, seq, headers.get(H_SOURCE, "?")[:64], gap))
        return out

    def __repr__(self) -> str:
        return f"<FleetConsumer {_describe_url(str(self.url))} stream={self.stream} {self.filter_subject}>"


class FleetReader:
    """A FleetConsumer behind the reader contract ``etwmon tail`` drains (start/stop, wait/fileno, readinto
    whole records, stats), so fleet tailing shares the local loop.

    ``readinto`` gives one host's records per call (``host`` names it until the next call), a gap as a
    RecordsLost record. Notices (malformed, forged, restarted) go to ``on_notice`` and count in
    ``stats.parse_errors`` (malformed and forged). The consumer runs on a thread; it asks the server for more,
    and so acknowledges what came before, only once everything it handed over has been read.
    """

    lossy = False

    def __init__(self, consumer: FleetConsumer, on_notice: Callable[[FleetNotice], None] | None = None) -> None:
        import threading

        self.consumer = consumer
        self.host: str | None = None
        self._on_notice = on_notice
        self._lock = threading.Lock()
        self._chunks: list[tuple[str, bytes, int]] = []  # (host, whole records, how many) not yet read
        self._taken = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._received = self._read = 0

    def describe(self) -> str:
        c = self.consumer
        hosts = ", ".join(sorted(c.hosts)) if c.hosts else "all hosts"
        start = ("from now on" if c.since is None else "everything kept" if c.since == "all"
                 else f"since {c.since.isoformat()}")
        durable = f", durable consumer {c.durable}" if c.durable else ""
        return f"fleet: {_describe_url(str(c.url))} stream {c.stream}, {hosts}, {start}{durable}"

    def start(self) -> "FleetReader":
        import threading

        if self._thread is None:
            self.consumer.open()
            self._thread = threading.Thread(target=self._run, name="etwmon-fleet", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                chunks = []
                for item in self.consumer.read(0.25):
                    if isinstance(item, HostBatch):
                        if item.events:
                            chunks.append((item.host, item.data, len(item.events)))
                    elif self._on_notice is not None:
                        self._on_notice(item)
                if not chunks:
                    continue
                with self._lock:
                    self._chunks.extend(chunks)
                    self._received += sum(count for _, _, count in chunks)
                    self._wake()
                    # Ask for more (which acknowledges these) only once the reader has taken all of them.
                    while self._chunks and not self._stopping.is_set():
                        self._taken.wait(0.25)
        except BaseException as exc:  # kept for the reader, like a Monitor's source error
            log.error("fleet consumer failed: %r", exc)
            self._error = exc
        finally:
            self._wake()

    def _wake(self) -> None:
        try:
            self._w.send(b"\1")
        except OSError:
            pass

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._taken.notify_all()
        if self._thread is not None:
            self._thread.join(10)

    def close(self) -> None:
        self.stop()
        self.consumer.close()
        for s in (self._r, self._w):
            try:
                s.close()
            except OSError:
                pass

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def readable(self) -> bool:
        return bool(self._chunks) or self._error is not None

    def fileno(self) -> int:
        return self._r.fileno()

    def wait(self, timeout: float | None = None) -> bool:
        import select

        if not self.readable() and self.running:
            select.select([self._r], [], [], timeout)
        return self.readable()

    def readinto(self, buffer) -> int:
        if self._error is not None and not self._chunks:
            error, self._error = self._error, None
            raise error if isinstance(error, Error) else FleetError(f"the fleet consumer failed: {error!r}")
        out = memoryview(buffer).cast("B") if memoryview(buffer).format != "B" else memoryview(buffer)
        with self._lock:
            try:
                self._r.recv(4096)
            except OSError:
                pass
            if not self._chunks:
                self._taken.notify_all()
                return 0
            host, data, count = self._chunks[0]
            if len(data) <= len(out):
                n = len(data)
                self._chunks.pop(0)
            else:  # whole records only: the rest stays for the next call
                index = record_headers(data)
                ends = index["offset"] + index["Size"]
                fit = ends[ends <= len(out)]
                if not len(fit):
                    from ..errors import BufferTooSmall
                    raise BufferTooSmall(int(ends[0]), len(out))
                n = int(fit[-1])
                self._chunks[0] = (host, data[n:], count - len(fit))
                count = len(fit)
            out[:n] = data[:n]
            self.host = host
            self._read += count
            if self._chunks:
                self._wake()
            else:
                self._taken.notify_all()
            return n

    @property
    def stats(self):
        from ..monitor import MonitorStats

        hosts = list(self.consumer.stats.values())
        with self._lock:
            items = sum(count for _, _, count in self._chunks)
            size = sum(len(data) for _, data, _ in self._chunks)
            received, read = self._received, self._read
        # pushed/read count records (a gap's RecordsLost included); lost: what hosts reported and gaps held;
        # nothing is dropped here (the stream keeps what is not read yet). The caps: the most one pull can
        # hand over (fetch_batch messages of at most NATS's 1 MiB payload), which is all this reader holds.
        cap = self.consumer.fetch_batch << 20
        return MonitorStats(pushed=received, read=read, dropped=0, lost=sum(h.records_lost for h in hosts),
                            items=items, bytes=size, max_items=cap // HEADER_SIZE, max_bytes=cap,
                            source="fleet", parse_errors=sum(h.malformed for h in hosts))
