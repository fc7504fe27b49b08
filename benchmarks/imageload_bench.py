"""What image loads cost (the bpf source's opt-in): CPU per image load, and the exec storm's slowdown with image
loads on vs off beside the same storm with no monitor.

- CPU per image load: a dlopen/dlclose storm (generators/storm_dlopen.c, one library mapped again each time)
  watched by etwmon-bpf with image loads on and off, alternating; the monitor process's CPU with them on less
  the same storm with them off, per image load it delivered (the storm's, which the loader itself counts, and
  the rest of the machine's). The storm's own time per load with
  them on vs off is what the kernel side adds to each dlopen.
- The exec storm's slowdown: storm_bench.run_cost with etwmon-bpf (off) and etwmon-bpf-images (on): each exec
  maps the program, ld.so and libc, three image loads.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from common import cpu_seconds, progress, summary, target, wait_caught_up
from peers import EtwmonTool
from storm_bench import GENERATORS, run_cost

#: The goal: the exec storm's slowdown with image loads on, at most this many points over the same source off.
GOAL_EXTRA_SLOWDOWN = 10.0


def build(build_dir: Path) -> tuple[Path, Path]:
    """The dlopen storm and the library it loads."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        raise RuntimeError("no C compiler (gcc) to build the dlopen storm: apt-get install gcc")
    build_dir.mkdir(parents=True, exist_ok=True)
    lib_c = build_dir / "bench_image.c"
    lib_c.write_text("int bench_image_value(void) { return 1; }\n")
    lib, exe = build_dir / "libbench_image.so", build_dir / "storm_dlopen"
    for argv in ([gcc, "-O2", "-shared", "-fPIC", "-o", str(lib), str(lib_c)],
                 [gcc, "-O2", "-Wall", "-o", str(exe), str(GENERATORS / "storm_dlopen.c"), "-ldl"]):
        out = subprocess.run(argv, capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"gcc failed: {out.stderr.strip()}")
    return exe, lib.resolve()


def dlopen_storm(exe: Path, lib: Path, n: int) -> tuple[int, float]:
    """(loads the loader counted, seconds the storm took)."""
    out = subprocess.run([str(exe), str(lib), str(n)], capture_output=True, text=True, check=True, timeout=300)
    fields = out.stdout.split()
    return int(fields[1]), int(fields[3]) / 1e9


def _tools(workdir: Path, max_items: int) -> tuple[EtwmonTool, EtwmonTool]:
    off = EtwmonTool(workdir, "bpf", max_items)
    on = EtwmonTool(workdir, "bpf", max_items)
    on.name = "etwmon-bpf-images"
    on.extra_args = ["--image-loads"]
    return off, on


def run(workdir: Path, build_dir: Path, exec_exe: Path, exec_max_rate: float, quick: bool,
        max_items: int = 100_000) -> dict:
    exe, lib = build(build_dir)
    loads = 1_000 if quick else 20_000
    repeats = 1 if quick else 3
    off, on = _tools(workdir, max_items)
    runs = []
    for rep in range(repeats):
        baseline = dlopen_storm(exe, lib, loads)
        runs.append({"repeat": rep, "tool": "none", "loads": baseline[0], "seconds": baseline[1]})
        for tool in (on, off) if rep % 2 else (off, on):
            tool.start()
            try:
                cpu0 = tool.cpu_start
                count, seconds = dlopen_storm(exe, lib, loads)
                wait_caught_up(tool.pid)
                cpu1 = cpu_seconds(tool.pid)
                seen = tool.stop()
            except BaseException:
                tool.kill()
                raise
            delivered = seen.extra.get("image_loads") if seen.extra else None
            runs.append({"repeat": rep, "tool": tool.name, "loads": count, "seconds": seconds,
                         "cpu_s": None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
                         "image_loads_delivered": delivered, "lost": seen.lost_reported, "error": seen.error})
            progress(f"imageload: {tool.name:<18} {count:,} loads in {seconds:.2f} s, monitor CPU "
                     f"{runs[-1]['cpu_s'] or 0:.2f} s, image loads delivered {delivered}, lost {seen.lost_reported}")
    per_load = []
    for rep in range(repeats):
        mine = {r["tool"]: r for r in runs if r["repeat"] == rep}
        a, b, none = mine.get(on.name), mine.get(off.name), mine.get("none")
        delivered = a.get("image_loads_delivered") if a else None
        if a and b and a.get("cpu_s") is not None and b.get("cpu_s") is not None and a["loads"] and delivered:
            # per image load the monitor delivered: the storm's and the rest of the machine's, all of which it
            # handled (on a busy machine other processes' loads outnumber the storm's)
            per_load.append({"cpu_us_per_load": (a["cpu_s"] - b["cpu_s"]) / delivered * 1e6,
                             "storm_us_per_load_on": a["seconds"] / a["loads"] * 1e6,
                             "storm_us_per_load_off": b["seconds"] / b["loads"] * 1e6,
                             "storm_us_per_load_none": none["seconds"] / none["loads"] * 1e6 if none else None})
    progress("imageload: the exec storm with image loads off and on")
    cost = run_cost([off, on], exec_exe, exec_max_rate, quick)
    rows = {row["tool"]: row for row in cost["rows"]}
    slow_off = (rows.get(off.name, {}).get("slowdown_pct") or {}).get("median")
    slow_on = (rows.get(on.name, {}).get("slowdown_pct") or {}).get("median")
    targets = [target("imageload", "etwmon-bpf: exec storm slowdown, image loads on minus off (points)",
                      None if slow_on is None or slow_off is None else slow_on - slow_off, GOAL_EXTRA_SLOWDOWN, "%",
                      higher_is_better=False)]
    return {"status": "ok", "params": {"loads_per_storm": loads, "repeats": repeats},
            "runs": runs,
            "cpu_us_per_load": summary(r["cpu_us_per_load"] for r in per_load),
            "storm_us_per_load_on": summary(r["storm_us_per_load_on"] for r in per_load),
            "storm_us_per_load_off": summary(r["storm_us_per_load_off"] for r in per_load),
            "storm_us_per_load_none": summary(r["storm_us_per_load_none"] for r in per_load),
            "exec_cost": cost, "targets": targets}
