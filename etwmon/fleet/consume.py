"""The consumer: read every host's batches back from the stream and check each (dedup, gaps as exact
RecordsLost, hostile or forged messages counted and reported), then ``FleetReader``, the same consumer on a
thread behind the reader contract ``etwmon tail`` drains."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable, Mapping, Sequence

from ..errors import Error, RecordFormatError
from ..records import HEADER_SIZE, Event, ItemType, RecordsLost, filetime_now, parse, record_headers
from .auth import FleetAuth, _connect
from .wire import (
    MAX_FILETIME, MIN_FILETIME, describe_servers, no_jetstream, no_jetstream_error,
    DEFAULT_STREAM, H_BOOT, H_COUNT, H_HOST, H_RUN, H_SEQ, H_SOURCE, H_TOTAL, SUBJECT_PATTERN, _HOST_ID, _TOKEN,
    FleetError, _describe_url, _nats, check_host_id, parse_since, subject_for,
)

__all__ = ["FleetConsumer", "HostBatch", "FleetNotice", "HostStats", "FleetReader"]

log = logging.getLogger(__name__)


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
    # Runs of this host that a newer run replaced (bounded): a late batch of one is refused. A run id is only
    # ever compared for equality: its leading clock reading says nothing once a clock has stepped back.
    replaced: dict[str, None] = field(default_factory=dict)


_REPLACED_RUNS = 64  # runs remembered per host


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


def _check_times(events: list[Event], seq: int, run: str) -> None:
    """Refuse a batch with a time no one could show (before 1601, or past year 9998): every formatter turns a
    FILETIME into a date."""
    for index, event in enumerate(events):
        for name in ("filetime", "start_filetime"):
            value = getattr(event, name, None)
            if value is not None and not MIN_FILETIME <= value < MAX_FILETIME:
                raise _BadMessage("malformed", f"batch {seq} of run {run}: record {index} has a {name} of {value}, "
                                               "outside 1601-01-01 .. 9999-01-01")


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
        """Connect and make the server-side consumer (``FleetError`` on refused credentials, no JetStream, no
        stream; it may be opened again after)."""
        if self._nc is None:
            try:
                self._loop.run_until_complete(self._open())
            except BaseException:
                self._nc = self._js = None
                raise
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
            raise FleetError(f"there is no stream {self.stream} on {describe_servers(self.url)} yet: nothing was "
                             "shipped there (etwmon ship creates it)") from None
        except nats.js.errors.ServiceUnavailableError as exc:
            await self._nc.close()
            if no_jetstream(exc):
                raise no_jetstream_error(self.url) from None
            raise FleetError(f"JetStream on {describe_servers(self.url)} is unavailable: {exc.description}") from None
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
            kind, text = bad.kind, str(bad)
        except Exception as exc:  # whatever a hostile message finds: it is that message's fault, never the reader's
            log.debug("message on %s refused", subject, exc_info=True)
            kind, text = "malformed", f"{type(exc).__name__}: {exc}"[:300]
        stats.malformed += 1
        self.notices += 1
        return [FleetNotice(host, kind, text)]

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
        except Exception as exc:  # parse is meant to raise only RecordFormatError; a reader does not rely on it
            raise _BadMessage("malformed", f"batch {seq} of run {run}: {type(exc).__name__}: {exc}"[:300]) from None
        _check_times(events, seq, run)
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
                if run in state.replaced:
                    raise _BadMessage("malformed", f"batch {seq} of run {run}, which run {state.run} replaced")
                stats.restarts += 1
                self.notices += 1
                out.append(FleetNotice(host, "restarted",
                                       f"the shipper started again (run {run} after {state.run} at batch "
                                       f"{state.seq}); what happened between the runs was not watched"))
                gap = total - in_batch  # what this run sent before this batch, never seen here
                if gap > _MAX_LOST_COUNT:
                    raise _BadMessage("malformed", f"batch {seq} of run {run} claims {gap} events before it")
                stats.batches_lost += seq - 1
            replaced = state.replaced if state is not None else {}
            if state is not None:
                replaced[state.run] = None
                while len(replaced) > _REPLACED_RUNS:
                    del replaced[next(iter(replaced))]
            state = self._state[host] = _HostState(boot, run, seq, total, replaced)
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
