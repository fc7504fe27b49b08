"""Monitor with a scripted source: waking readers, fileno, async iteration, errors, start/stop cycles."""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time

import pytest

import etwmon
from etwmon.sources.base import Source

from .helpers import ScriptedSource, drain


class UnavailableSource(Source):
    name = "never"

    def open(self) -> None:
        raise etwmon.SourceUnavailable("never works: use another source")


def test_a_notify_without_records_wakes_no_one():
    source = ScriptedSource()
    with etwmon.Monitor(source=source) as mon:
        for pid in (1, 2):
            done, go = threading.Event(), threading.Event()
            source.commands.put(("notify", None))
            source.commands.put(("ack", done))
            source.commands.put(("gate", go))
            source.send(pid)
            assert done.wait(5)  # the empty notify has happened, the record not yet
            readable, _, _ = select.select([mon.fileno()], [], [], 0)
            assert readable == []  # fileno() is readable only when records are there
            threading.Timer(0.3, go.set).start()
            # Never False while running with nothing read: it blocks until the record after the empty notify.
            assert mon.wait(None if pid == 1 else 10) is True
            assert [e.pid for e in drain(mon)] == [pid]


def test_wait_returns_as_soon_as_records_arrive():
    source = ScriptedSource()
    with etwmon.Monitor(source=source) as mon:
        assert mon.wait(timeout=0.05) is False
        sent = threading.Event()

        def send() -> None:
            sent.set()
            source.send(1, 2)

        threading.Timer(0.2, send).start()
        assert mon.wait(timeout=60) is True  # woken by the records, not by the timeout...
        assert sent.is_set()  # ...and not before they were sent
        assert [e.pid for e in drain(mon)] == [1, 2]
        assert mon.wait(timeout=0.05) is False


def test_fileno_is_readable_exactly_while_records_wait():
    source = ScriptedSource()
    with etwmon.Monitor(source=source) as mon:
        fd = mon.fileno()
        assert select.select([fd], [], [], 0.05)[0] == []
        source.send(7)
        assert select.select([fd], [], [], 5)[0] == [fd]
        assert select.select([fd], [], [], 0)[0] == [fd]  # level-triggered: still readable until drained
        assert [e.pid for e in drain(mon)] == [7]
        assert select.select([fd], [], [], 0.05)[0] == []
        source.send(8)
        assert select.select([fd], [], [], 5)[0] == [fd]


def test_partial_read_keeps_fileno_readable():
    source = ScriptedSource()
    with etwmon.Monitor(source=source) as mon:
        source.send(1, 2, 3)
        assert mon.wait(5)
        assert mon.readinto(bytearray(24)) == 24
        assert select.select([mon.fileno()], [], [], 0)[0] == [mon.fileno()]


def test_async_iteration_yields_events_without_blocking_the_loop():
    source = ScriptedSource()

    async def main():
        got = []
        with etwmon.Monitor(source=source) as mon:
            first_two = asyncio.Event()

            async def sender():
                # Runs only while the loop is free: if iterating blocked the loop, 12 would never be sent.
                source.send(10, 11)
                await first_two.wait()
                source.send(12)

            task = asyncio.create_task(sender())
            async for event in mon:
                got.append(event.pid)
                if len(got) == 2:
                    first_two.set()  # 12 is sent by the other task while this one waits in the iteration
                if len(got) == 3:
                    break
            await task
        return got

    # On a thread of its own: a blocked loop cannot even time out, and must fail the test, not hang it.
    result: list = []
    runner = threading.Thread(target=lambda: result.append(asyncio.run(asyncio.wait_for(main(), 10))), daemon=True)
    runner.start()
    runner.join(20)
    assert result == [[10, 11, 12]], "the event loop was blocked"


def test_events_iterator_ends_after_timeout():
    source = ScriptedSource()
    with etwmon.Monitor(source=source) as mon:
        source.send(5, 6)
        assert [e.pid for e in mon.events(timeout=0.3)] == [5, 6]


def test_source_failure_surfaces_to_the_reader_and_records_stay_readable():
    source = ScriptedSource()
    mon = etwmon.Monitor(source=source).start()
    try:
        source.send(1, 2)
        source.commands.put(("fail", OSError(5, "device on fire")))
        deadline = time.monotonic() + 5
        while mon.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not mon.running
        with pytest.raises(etwmon.SourceError, match="device on fire") as info:
            mon.readinto(bytearray(100))
        assert isinstance(info.value.__cause__, OSError)
        buf = bytearray(100)
        n = mon.readinto(buf)  # nothing already read in is lost
        assert [e.pid for e in etwmon.parse(buf[:n])] == [1, 2]
        with pytest.raises(etwmon.SourceError):
            mon.readinto(buf)  # and once empty, it keeps saying why
        with pytest.raises(etwmon.SourceError):
            mon.wait(0.1)
    finally:
        mon.close()


def test_losses_are_counted_and_in_band():
    source = ScriptedSource()
    with etwmon.Monitor(source=source, max_items=2) as mon:
        source.commands.put(("lost", 4))
        source.send(1, 2, 3)
        done = threading.Event()
        source.commands.put(("ack", done))  # the source has pushed everything before this
        assert done.wait(10)
        events = drain(mon)
        stats = mon.stats
    assert isinstance(events[0], etwmon.RecordsLost) and events[0].count == 5
    assert [e.pid for e in events[1:]] == [2, 3]
    assert (stats.lost, stats.dropped, stats.pushed, stats.read) == (4, 1, 3, 2)
    assert stats.source == "scripted" and stats.source_stats["lost"] == 4


def test_unavailable_source_raises_in_the_caller():
    mon = etwmon.Monitor(source=UnavailableSource())
    with pytest.raises(etwmon.SourceUnavailable, match="never works"):
        mon.start()
    assert not mon.running
    with pytest.raises(etwmon.SourceUnavailable, match="unknown source 'bogus'"):
        etwmon.Monitor(source="bogus").start()


def test_start_and_stop_are_idempotent_and_do_not_leak():
    def fds() -> int:
        return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0

    source = ScriptedSource()
    mon = etwmon.Monitor(source=source)
    mon.stop()  # before start: nothing to do
    threads, files = threading.active_count(), fds()
    for i in range(1000):
        mon.start()
        mon.start()
        if i % 100 == 0:
            source.send(i)
            assert mon.wait(5)
        mon.stop()
        mon.stop()
    assert source.opened == source.closed == 1000
    assert threading.active_count() == threads
    mon.close()
    assert fds() <= files
    for _ in range(200):  # context managers too, each with its own wake-up socket pair
        with etwmon.Monitor(source=ScriptedSource()):
            pass
    assert fds() <= files and threading.active_count() == threads
    assert [e.pid for e in drain(mon)] == list(range(0, 1000, 100))


def test_fileno_needs_a_started_monitor():
    with pytest.raises(etwmon.Error, match="not started"):
        etwmon.Monitor(source=ScriptedSource()).fileno()
