"""The shipper: publish a Monitor's ``readinto`` batches to JetStream, one message per batch, until each is
acknowledged, with the headers that let a consumer count what it never got (``wire``)."""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from ..errors import Error
from ..records import HEADER_SIZE, ItemType
from .auth import FleetAuth, _connect
from .wire import (
    DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES, DEFAULT_STREAM, DUPLICATE_WINDOW, H_BOOT, H_COUNT, H_FIRST, H_HOST, H_LAST,
    H_MSG_ID, H_RUN, H_SEQ, H_SOURCE, H_TOTAL, SUBJECT_PATTERN, _TOKEN, FleetError, _boot_id, _nats,
    check_host_id, default_host_id, describe_servers, no_jetstream, no_jetstream_error, subject_for,
)

__all__ = ["Shipper", "ShipperStats"]

log = logging.getLogger(__name__)

_LOST_TYPE_LOW = int(ItemType.RecordsLost) & 0xFF
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")


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
    ever_connected: bool = False  # reached the server at least once (else nothing could be delivered)


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
                 max_backoff: float = 2.0, drain_timeout: float = 10.0, away_report: float = 30.0) -> None:
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
        if not away_report > 0:
            raise ValueError(f"away_report must be > 0 seconds, not {away_report!r}")
        self.away_report = away_report
        self._give_up_at = float("inf")
        self.boot = _boot_id()
        # Unique per run (a consumer only compares run ids for equality); the start time in it is for people.
        self.run_id = f"{time.time_ns():x}-{uuid.uuid4().hex[:8]}"
        self._buf = bytearray(batch_bytes)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fatal: FleetError | None = None
        self._denied = ""  # the last permissions violation the server reported
        self._connected = self._ever_connected = False
        self._away_since: float | None = None  # wall-clock time since when the server is out of reach
        self._away_why = ""  # what the last attempt to reach it said
        self._seq = self._total = 0
        self._counts = dict(batches=0, records=0, bytes=0, lost_reported=0, retries=0, duplicates=0, unsent=0)

    def describe(self) -> str:
        return f"{describe_servers(self.url)} as {self.host} (stream {self.stream})"

    @property
    def stats(self) -> ShipperStats:
        return ShipperStats(host=self.host, run=self.run_id, connected=self._connected,
                            ever_connected=self._ever_connected, **self._counts)

    def away_text(self) -> str | None:
        """While the server is out of reach, one line saying so: which server, since when, why, and what waits
        (records in the ring; dropped and missed so far). None while connected."""
        since = self._away_since
        if since is None:
            return None
        ring = self.monitor.stats
        when = datetime.fromtimestamp(since, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        why = f" ({self._away_why})" if self._away_why else ""
        return (f"cannot reach {describe_servers(self.url)} since {when}{why}; still trying: {ring.items} records "
                f"waiting in the ring, {ring.dropped} dropped, {ring.lost} missed")

    async def _report_while_away(self) -> None:
        """Every ``away_report`` seconds the server stays out of reach, log ``away_text``."""
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.away_report)
            except asyncio.TimeoutError:
                text = self.away_text()
                if text is not None:
                    log.warning("%s", text)

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
            self._away_why = (text or type(exc).__name__)[:200]
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
                self._away_since, self._away_why = time.time(), ""
            self._connected = False

        def reconnected() -> None:
            self._connected = True
            self._away_since = None
            log.warning("reconnected to NATS")

        self._away_since = time.time()
        reporter = asyncio.ensure_future(self._report_while_away())
        try:
            nc = await _connect(self.url, self.auth, f"etwmon-ship-{self.host}", on_error,
                                on_disconnect=disconnected, on_reconnect=reconnected, stop=self._stop)
            if nc is None:  # stopped before any server answered: all the ring holds stays unsent
                self._counts["unsent"] += len(self.monitor.ring)
                return self.stats
            self._connected = self._ever_connected = True
            self._away_since = None
            return await self._connected_run(nc, nats, until, on_ready)
        finally:
            reporter.cancel()

    async def _connected_run(self, nc, nats, until, on_ready) -> ShipperStats:
        try:
            js = nc.jetstream(timeout=self.publish_timeout)
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
            if not self.create_stream:
                log.warning("there is no stream %s yet; publishing anyway (an administrator makes it)", self.stream)
                return
        except nats.js.errors.ServiceUnavailableError as exc:
            if no_jetstream(exc):
                raise no_jetstream_error(self.url) from None
            log.warning("could not check stream %s (%s); publishing anyway", self.stream, exc.description or exc)
            return
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
