"""The bpf source's wake-ups: the kernel's pacer (one wake-up per batch_wait window), a reader in Monitor.wait()
that drains the ring itself, the object without the pacer, and a stop with a wake-up still pending."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import threading
import time

import pytest

import etwmon
from etwmon import ItemType
from etwmon.records import filetime_now
from etwmon.sources.bpf import BpfSource

from .conftest import require
from .helpers import read_until

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="eBPF is Linux only"), pytest.mark.root]


@pytest.fixture
def bpf_ok():
    reason = BpfSource.unavailable_reason()
    require(reason is None, f"the bpf source cannot run here: {reason}")


def forks(n: int, pause: float = 0.0) -> set[int]:
    """``n`` children of this process that exit at once (``pause`` seconds apart); their pids."""
    pids = set()
    for _ in range(n):
        proc = subprocess.Popen(["/bin/true"])
        proc.wait()
        pids.add(proc.pid)
        if pause:
            time.sleep(pause)
    return pids


def forking_while_reading(mon: etwmon.Monitor, n: int, pause: float) -> tuple[list, set[int]]:
    """``n`` children made on another thread, ``pause`` seconds apart, while this one reads ``mon`` (waiting in
    ``wait()``) until their exits are in: the events read, and the children's pids."""
    pids: set[int] = set()
    done = threading.Event()

    def fork() -> None:
        time.sleep(0.2)
        for _ in range(n):
            pids.update(forks(1))
            time.sleep(pause)
        done.set()

    threading.Thread(target=fork, daemon=True).start()
    events = read_until(mon, lambda es: done.is_set() and exits_of(es, pids) == pids, timeout=10)
    return events, pids


def exits_of(events, pids: set[int]) -> set[int]:
    return {e.pid for e in events if e.type == ItemType.ProcessExit and e.pid in pids}


def paced_monitor(**options) -> etwmon.Monitor:
    source = BpfSource(**options)
    mon = etwmon.Monitor(source=source, max_items=100_000)
    mon.start()
    return mon


def test_with_the_pacer_a_waiting_reader_is_woken_by_the_kernel_and_takes_the_records_itself(bpf_ok):
    mon = paced_monitor(batch_wait=0.002)
    try:
        source = mon.source
        require(source.pacing == "kernel", "this kernel refused the wake-up pacer (a BPF timer in tp_btf programs)")
        assert source.stats()["wake_us"] == 2000
        read_until(mon, None, timeout=0.5)  # what the start made
        before = source.wakeups
        events, pids = forking_while_reading(mon, 5, pause=0.05)
        assert exits_of(events, pids) == pids
        stats = source.stats()
        # The reader blocked in wait() was the one woken: the source's own thread stayed asleep meanwhile.
        assert stats["reader_wakeups"] >= 3
        assert source.wakeups - before <= 2
    finally:
        mon.close()


def test_a_burst_costs_a_wake_up_per_window_not_per_record(bpf_ok):
    mon = paced_monitor(batch_wait=0.05)
    try:
        require(mon.source.pacing == "kernel", "this kernel refused the wake-up pacer")
        read_until(mon, None, timeout=0.3)  # what the start made
        woken = mon.source.stats()["reader_wakeups"] + mon.source.wakeups
        start = time.monotonic()
        pids = forks(60)
        elapsed = time.monotonic() - start
        events = read_until(mon, lambda es: exits_of(es, pids) == pids, timeout=10)
        assert exits_of(events, pids) == pids
        stats = mon.source.stats()
        wakeups = stats["reader_wakeups"] + mon.source.wakeups - woken
        # 120 records (a create and an exit per child, more with the execs) in `elapsed` seconds: at most one
        # wake-up per 50 ms window, and a last one.
        assert wakeups <= elapsed / 0.05 + 3, (wakeups, elapsed)
        assert stats["lost"] == 0
    finally:
        mon.close()


def test_records_wait_at_most_about_one_window_and_batches_gather_for_it(bpf_ok):
    """The pacer wakes the reader batch_wait after the first record it has not seen, not at that record (as the
    ring's adaptive rule would), and never much later. (Other processes' events open windows too, so a record of
    ours may wait less than a window: the bound below is the one that holds on a busy machine.)"""
    mon = paced_monitor(batch_wait=0.2)
    try:
        require(mon.source.pacing == "kernel", "this kernel refused the wake-up pacer")
        read_until(mon, None, timeout=0.5)
        firsts: list[float] = []  # per batch read: how long its oldest record waited
        ours: dict[int, float] = {}  # our children's creates: how long each waited
        pids: set[int] = set()
        done = threading.Event()

        def fork() -> None:
            for _ in range(4):
                time.sleep(0.5)
                pids.update(forks(1))
            done.set()

        threading.Thread(target=fork, daemon=True).start()
        buf = bytearray(1 << 20)
        deadline = time.monotonic() + 20
        while (not done.is_set() or mon.readable() or exits_of_pids(ours, pids)) and time.monotonic() < deadline:
            if mon.wait(2.0):
                n = mon.readinto(buf)
                now = filetime_now()
                events = [e for e in etwmon.parse(bytes(buf[:n])) if e.type != ItemType.RecordsLost]
                if events:
                    firsts.append((now - min(e.filetime for e in events)) / 1e7)
                for e in events:
                    if e.type == ItemType.ProcessCreate:
                        ours[e.pid] = (now - e.filetime) / 1e7
        waited = [ours[pid] for pid in pids if pid in ours]
        assert len(waited) == 4, (pids, ours.keys() & pids)
        assert max(waited) <= 0.2 + 0.3, waited
        assert max(firsts) >= 0.1, firsts  # the adaptive rule would deliver each within a few ms
    finally:
        mon.close()


def exits_of_pids(seen: dict[int, float], pids: set[int]) -> bool:
    """Whether a create of ours is still to come (the loop reads on until all four are in)."""
    return len(pids) == 4 and not pids <= seen.keys()


def test_a_reader_on_fileno_is_served_by_the_sources_thread(bpf_ok):
    mon = paced_monitor()
    try:
        pids = forks(3)
        seen: list = []
        buf = bytearray(1 << 16)
        deadline = time.monotonic() + 10
        while exits_of(seen, pids) != pids and time.monotonic() < deadline:
            select.select([mon.fileno()], [], [], 0.5)
            n = mon.readinto(buf)
            seen += list(etwmon.parse(bytes(buf[:n])))
        assert exits_of(seen, pids) == pids
        assert mon.source.stats()["reader_wakeups"] == 0  # nobody waited in wait(): the thread did it all
    finally:
        mon.close()


@pytest.mark.parametrize("options, pacing", [({"kernel_pacing": False}, "reader"), ({"batch_wait": 0}, "none")])
def test_without_the_pacer_every_record_still_arrives(bpf_ok, options, pacing):
    mon = paced_monitor(**options)
    try:
        source = mon.source
        assert source.pacing == pacing
        assert source.stats()["wake_us"] == 0
        pids = forks(20)
        events = read_until(mon, lambda es: exits_of(es, pids) == pids, timeout=10)
        assert exits_of(events, pids) == pids
        if pacing == "reader":  # the programs without the pacer: the source's thread reads, readers wait for it
            assert source.stats()["reader_wakeups"] == 0
    finally:
        mon.close()


def test_stop_with_a_wake_up_pending_reads_everything_and_loses_nothing(bpf_ok):
    mon = paced_monitor(batch_wait=1.0)  # the pacer's wake-up is still a second away at stop
    try:
        require(mon.source.pacing == "kernel", "this kernel refused the wake-up pacer")
        pids = forks(10)
        mon.stop()
        events = read_until(mon, None, timeout=2)
        assert exits_of(events, pids) == pids
        stats = mon.source.stats()
        assert stats["lost"] == 0 and stats["skipped"] == 0
        assert not [e for e in events if e.type == ItemType.RecordsLost]
    finally:
        mon.close()


def test_readers_waiting_on_two_threads_share_the_records_without_loss_or_repeats(bpf_ok):
    mon = paced_monitor()
    try:
        got: list[list] = [[], []]
        stop = threading.Event()

        def reader(out: list) -> None:
            buf = bytearray(1 << 16)
            while not stop.is_set():
                if mon.wait(0.1):
                    n = mon.readinto(buf)
                    out += list(etwmon.parse(bytes(buf[:n])))

        threads = [threading.Thread(target=reader, args=(g,)) for g in got]
        for t in threads:
            t.start()
        pids = forks(40)
        deadline = time.monotonic() + 10
        while exits_of(got[0] + got[1], pids) != pids and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
        both = got[0] + got[1]
        assert exits_of(both, pids) == pids
        creates = [e.pid for e in both if e.type == ItemType.ProcessCreate and e.pid in pids]
        assert sorted(creates) == sorted(pids)  # each once
    finally:
        mon.close()


@pytest.mark.parametrize("source", ["bpf", "netlink"])
def test_wait_returns_for_another_descriptor_too_and_set_batch_wait_says_who_gathers(bpf_ok, source):
    with etwmon.Monitor(source=source, max_items=10_000) as mon:
        assert mon.set_batch_wait(0.01) is (source == "bpf" and mon.source.pacing == "kernel")
        read_until(mon, None, timeout=0.3)
        r, w = os.pipe()
        try:
            timer = threading.Timer(0.3, os.write, (w, b"x"))
            timer.start()
            start = time.monotonic()
            got = mon.wait(5.0, also=[r])
            took = time.monotonic() - start
            # Woken by the pipe (unless another process's event came first): well before the timeout either way.
            assert took < 2.0
            if not got:
                assert select.select([r], [], [], 0)[0] == [r]
        finally:
            timer.cancel()
            timer.join()
            os.close(r)
            os.close(w)
