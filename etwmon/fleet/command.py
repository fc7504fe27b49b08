"""``etwmon ship``: run a Shipper over a Monitor with a person watching stderr — the shipping line, ``--stats``
status lines in the form ``etwmon tail`` prints them, the summary, and the exit status (1 when nothing could be
delivered or records were left unsent)."""

from __future__ import annotations

import threading
import time
from typing import Any, TextIO

from ..formats import human_bytes
from ..tail import missed_text, say
from .ship import Shipper, ShipperStats
from .wire import describe_servers

__all__ = ["run_ship"]

EXIT_OK, EXIT_RUNTIME = 0, 1


def status_line(monitor: Any, shipper: Shipper, rate: float) -> str:
    """tail's ``stats:`` line, with records ``sent`` (acknowledged by JetStream) where tail says ``shown``."""
    stats = monitor.stats
    fill = max(stats.items / stats.max_items, stats.bytes / stats.max_bytes) * 100
    return (f"stats: {stats.pushed} records ({rate:.1f}/s), ring {stats.items}/{stats.max_items} records "
            f"{human_bytes(stats.bytes)} ({fill:.0f}% full), {missed_text(stats)}, {stats.dropped} dropped, "
            f"{shipper.stats.records} sent")


def _print_stats(monitor: Any, shipper: Shipper, err: TextIO, interval: float, done: threading.Event) -> None:
    then, pushed_then = time.monotonic(), monitor.stats.pushed
    while not done.wait(interval):
        now, pushed = time.monotonic(), monitor.stats.pushed
        say(err, status_line(monitor, shipper, (pushed - pushed_then) / max(now - then, 1e-9)))
        then, pushed_then = now, pushed


def summary(stats: ShipperStats, ring: Any, servers: str) -> tuple[str, int]:
    """The last line and the exit status."""
    if not stats.batches and not stats.ever_connected:
        return (f"stopped: nothing was delivered: no server answered at {servers}; {stats.unsent} records not sent, "
                f"{missed_text(ring)}, {ring.dropped} dropped", EXIT_RUNTIME)
    unsent = f", {stats.unsent} not sent (the server stayed away)" if stats.unsent else ""
    return (f"stopped: {stats.batches} batches, {stats.records} records sent, {missed_text(ring)}, "
            f"{ring.dropped} dropped{unsent}", EXIT_RUNTIME if stats.unsent else EXIT_OK)


def run_ship(monitor: Any, shipper: Shipper, err: TextIO, stats_interval: float | None = None) -> int:
    """Ship until SIGINT/SIGTERM (or the source ends); ``stats_interval``: seconds between status lines (None:
    none). Returns the exit status."""
    done = threading.Event()
    printer = None
    if stats_interval is not None:
        printer = threading.Thread(target=_print_stats, args=(monitor, shipper, err, stats_interval, done),
                                   name="etwmon-ship-stats", daemon=True)
    with monitor:
        if printer is not None:
            printer.start()
        try:
            stats = shipper.run(stop_signals=True, on_ready=lambda: say(
                err, f"shipping to {shipper.describe()} (source: {monitor.source.name}, ring: "
                     f"{monitor.ring.max_items} records); Ctrl-C to stop"))
        finally:
            done.set()
            if printer is not None:
                printer.join(5)
        ring = monitor.stats
    line, status = summary(stats, ring, describe_servers(shipper.url))
    say(err, line)
    return status
