"""Memory: etwmon's RSS, sampled every second, while thread and exec storms run flat out. The reader drains the
ring for the first half, then stops reading, so the ring fills to its caps: RSS must level off there, within the
ring's caps plus the identity stage's process table's byte cap."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from common import progress, rss_bytes, target
from peers import EtwmonTool

from etwmon.identity import DEFAULT_MAX_BYTES

MIB = 1024 * 1024
MAX_ITEMS = 50_000
MAX_BYTES = 8 * MIB
#: RSS allowed above the first sample: the ring's own arrays plus room for the interpreter's churn.
SLACK = 16 * MIB


def table_cap(identity_stats: dict) -> tuple[int, str]:
    """The identity stage's process table byte cap and where it was found: the watching Monitor's
    ``stats.identity["max_bytes"]``, else ``etwmon.identity.DEFAULT_MAX_BYTES``."""
    if identity_stats.get("max_bytes"):
        return int(identity_stats["max_bytes"]), "the Monitor's stats.identity['max_bytes']"
    return DEFAULT_MAX_BYTES, "etwmon.identity.DEFAULT_MAX_BYTES"


def run(workdir: Path, exes: dict[str, Path], source: str, quick: bool) -> dict:
    seconds = 10 if quick else 120
    tool = EtwmonTool(workdir, source, MAX_ITEMS, MAX_BYTES)
    tool.extra_args = ["--discard", "--stall-after", str(seconds / 2)]
    tool.start()
    samples: list[tuple[float, int]] = []
    t0 = time.monotonic()
    # Both storms unthrottled with a time limit: the most events and the longest records this machine makes.
    storms = [subprocess.Popen([str(exes[kind]), "0", "0", str(seconds)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True) for kind in ("threads", "exec")]
    progress(f"memory: {source} watching thread + exec storms for {seconds} s, reader stops at {seconds / 2:.0f} s")
    try:
        while any(p.poll() is None for p in storms):
            rss = rss_bytes(tool.pid)
            if rss is not None:
                samples.append((time.monotonic() - t0, rss))
            time.sleep(1.0)
        outputs = [p.communicate()[0].split() for p in storms]
        seen = tool.stop()
    except BaseException:
        for p in storms:
            p.kill()
        tool.kill()
        raise
    items = {kind: int(out[1]) for kind, out in zip(("threads", "exec"), outputs)}
    rss = [r for _, r in samples]
    start, peak, end = rss[0], max(rss), rss[-1]
    half = [r for t, r in samples if t <= seconds / 2]
    growth = peak - start
    ring_bytes = MAX_BYTES + 8 * MAX_ITEMS  # the arena and the slot table
    cap, cap_from = table_cap(seen.extra.get("identity") or {})
    bound = ring_bytes + cap + SLACK
    progress(f"memory: RSS start {start / MIB:.1f} MiB, max {peak / MIB:.1f} MiB, end {end / MIB:.1f} MiB; "
             f"ring dropped {seen.extra.get('ring_dropped')}, source lost {seen.extra.get('source_lost')}")
    return {
        "status": "ok" if not seen.error else "error",
        "error": seen.error,
        "params": {"source": source, "seconds": seconds, "max_items": MAX_ITEMS, "max_bytes": MAX_BYTES,
                   "reader_stops_at_s": seconds / 2, "storms": "threads + exec, unthrottled",
                   "process_table_max_bytes": cap, "process_table_cap_from": cap_from},
        "items_made": items,
        "rss_samples": [{"t": round(t, 2), "rss": r} for t, r in samples],
        "rss_start": start, "rss_max": peak, "rss_end": end,
        "rss_max_while_reading": max(half) if half else None,
        "growth": growth, "growth_bound": bound,
        "process_table": seen.extra.get("identity") or {},
        "ring": {"pushed": seen.extra.get("pushed"), "dropped": seen.extra.get("ring_dropped"),
                 "source_lost": seen.extra.get("source_lost"), "lost_reported_in_stream": seen.lost_reported},
        "targets": [target("memory", f"etwmon-{source}: RSS growth over the storm (ring caps + process table byte "
                           "cap + 16 MiB allowed)", growth / MIB,
                           bound / MIB, "MiB", higher_is_better=False)],
    }
