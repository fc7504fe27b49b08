"""Run the etwmon benchmark suite: ``python benchmarks/run.py`` (full, ~32 min on 2 cores) or ``--quick``
(< 2 min, what CI runs). Prints a table, writes ``<out>/latest.json`` and plots, and with ``--write-results``
also ``benchmarks/RESULTS.md`` with its plots in ``benchmarks/plots/``.

Every figure is compared with baselines measured in the same run; targets are reported as PASS/MISS, never
asserted. The storm, cost and memory benchmarks need root and Linux; without them they are reported as skipped,
with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import HERE, machine_facts, progress  # noqa: E402

BENCHMARKS = ("ring", "readers", "service", "rules", "storms", "cost", "perftest", "memory", "identity", "imageload",
              "fleet", "recording")
KERNEL_BENCHMARKS = ("storms", "cost", "perftest", "memory", "identity", "imageload")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smaller version (< 2 minutes), as CI runs it")
    parser.add_argument("--out", type=Path, default=HERE / "results",
                        help="directory for latest.json and the plots (default: benchmarks/results)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated benchmarks to run (default: all of {','.join(BENCHMARKS)})")
    parser.add_argument("--write-results", action="store_true",
                        help="also write benchmarks/RESULTS.md and benchmarks/plots/*.png (the committed report)")
    parser.add_argument("--max-items", type=int, default=100_000,
                        help="ring max_items of the etwmon monitors in the storm benchmarks (default 100000)")
    parser.add_argument("--no-setup", action="store_true",
                        help="do not install missing peers (forkstat, pyroute2, matplotlib); report them skipped")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return args


def kernel_problem() -> str | None:
    """Why the kernel benchmarks cannot run here, or None."""
    if not sys.platform.startswith("linux"):
        return "needs Linux (the proc connector and audit)"
    if os.geteuid() != 0:
        return ("needs root (the audit source, forkstat, and the full-size socket buffers the storms are measured "
                "with): run as root")
    if not (shutil.which("gcc") or shutil.which("cc")):
        return "needs gcc to build the storm generators (apt-get install gcc)"
    return None


def setup_peers(args: argparse.Namespace) -> dict[str, str | None]:
    """Install missing peers (unless --no-setup); the reason each one that is still missing is skipped."""
    import peers

    if args.no_setup:
        return {"forkstat": None if shutil.which("forkstat") else "forkstat is not installed (--no-setup)",
                "pyroute2": None if _importable("pyroute2") else "pyroute2 is not installed (--no-setup)",
                "bpftrace": None if shutil.which("bpftrace") and (peers.TRACEFS / "events").is_dir()
                else "bpftrace is not installed or tracefs is not mounted (--no-setup)"}
    bpftrace, args.mounted_tracefs = peers.ensure_bpftrace()
    return {"forkstat": peers.ensure_forkstat(), "pyroute2": peers.ensure_python_package("pyroute2", "pyroute2"),
            "bpftrace": bpftrace}


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run_kernel_benchmarks(args: argparse.Namespace, results: dict) -> None:
    import peers

    wanted = [name for name in args.only if name in KERNEL_BENCHMARKS]
    problem = kernel_problem()
    if problem:
        for name in wanted:
            results[name] = {"status": "skipped", "reason": problem}
            progress(f"{name}: skipped: {problem}")
        return
    args.mounted_tracefs = False
    try:
        reasons = setup_peers(args)
        _run_kernel_benchmarks(args, results, wanted, reasons)
    finally:
        if args.mounted_tracefs:
            peers.unmount_tracefs()


def _run_kernel_benchmarks(args: argparse.Namespace, results: dict, wanted: list[str], reasons: dict) -> None:
    import identity_bench
    import memory_bench
    import peers
    import perftest_bench
    import storm_bench

    sources = peers.etwmon_sources()
    workdir = args.out / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    tools, skipped = peers.make_tools(workdir, reasons["forkstat"], reasons["pyroute2"], sources,
                                      max_items=args.max_items, max_bytes=None, bpftrace_reason=reasons["bpftrace"])
    for name, why in skipped.items():
        progress(f"storms: {name} skipped: {why}")
    # etwmon-bpf read three more ways (parse, parse_array where it exists, tail --json): the storms at full rate
    # and the perftest compare them; the other benchmarks take one tool per source.
    bpf = next((t for t in tools if t.name == "etwmon-bpf"), None)
    paths = peers.path_tools(bpf, workdir) if bpf and {"storms", "perftest"} & set(wanted) else []
    progress("storms: building the generators")
    exes = storm_bench.build_generators(HERE / ".build")
    max_rates = storm_bench.measure_max_rates(exes, 0.5 if args.quick else 2.0)
    etwmon_tools = [t for t in tools if t.name.startswith("etwmon-")]

    if "storms" in wanted:
        results["storms"] = _guard("storms", lambda: dict(
            status="ok", skipped_tools=skipped,
            **storm_bench.run_storms(_after(tools, bpf, paths), exes, max_rates, args.quick)))
        if results["storms"]["status"] == "ok":
            results["storms"]["targets"] = storm_bench.storm_targets(results["storms"])
            results["storms"]["params"]["etwmon_ring"] = {"max_items": args.max_items, "max_bytes": "default"}
    if "cost" in wanted:
        results["cost"] = _guard("cost", lambda: dict(
            skipped_tools=skipped, **storm_bench.run_cost(tools, exes["exec"], max_rates["exec"], args.quick)))
    if "perftest" in wanted:
        results["perftest"] = _guard("perftest", lambda: dict(
            skipped_tools=skipped, **perftest_bench.run(
                tools + paths + ([peers.window_tool(bpf, workdir, perftest_bench.LONGER_WINDOW)] if bpf else []),
                exes["exec"], max_rates["exec"], args.quick, skipped)))
    if "memory" in wanted:
        if not etwmon_tools:
            results["memory"] = {"status": "skipped", "reason": "no etwmon kernel source works here: " +
                                 "; ".join(f"{k}: {v}" for k, v in skipped.items() if k.startswith("etwmon-"))}
        else:
            # netlink first (the figure earlier runs compare with), then bpf, whose BPF ring is kernel memory
            # outside the RSS measured and whose events are the biggest (argv, paths)
            names = [t.source for t in etwmon_tools]
            chosen = [s for s in ("netlink", "bpf") if s in names] or names[:1]
            runs = [_guard("memory", lambda s=s: memory_bench.run(workdir, exes, s, args.quick)) for s in chosen]
            results["memory"] = dict(runs[0], more=runs[1:])
            results["memory"]["targets"] = [t for r in runs for t in r.get("targets", [])]
    if "identity" in wanted:
        if not etwmon_tools:
            results["identity"] = {"status": "skipped", "reason": "no etwmon kernel source works here"}
        else:
            results["identity"] = _guard("identity", lambda: identity_bench.run(etwmon_tools, exes, max_rates,
                                                                                  args.quick))
    if "imageload" in wanted:
        if sources.get("bpf", ("not found", None))[0] is not None:
            results["imageload"] = {"status": "skipped",
                                    "reason": f"image loads need the bpf source: {sources.get('bpf', ('missing',))[0]}"}
        else:
            import imageload_bench

            results["imageload"] = _guard("imageload", lambda: imageload_bench.run(
                workdir, HERE / ".build", exes["exec"], max_rates["exec"], args.quick, args.max_items))


def _after(tools: list, tool, more: list) -> list:
    """``tools`` with ``more`` right after ``tool`` (so a storm round runs a source's read paths together)."""
    if tool is None:
        return tools
    i = tools.index(tool) + 1
    return tools[:i] + more + tools[i:]


def _guard(name: str, fn) -> dict:
    """Run one benchmark; a crash of the harness is reported as that benchmark's error, not the suite's end."""
    try:
        return fn()
    except Exception as exc:
        progress(f"{name}: ERROR {type(exc).__name__}: {exc}")
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    machine = machine_facts()
    progress(f"etwmon benchmarks ({'quick' if args.quick else 'full'}): {', '.join(args.only)}; "
             f"{machine['cpu']}, {machine['cores']} cores, {machine['kernel']}, Python {machine['python']}, "
             f"numpy {machine['numpy']}, etwmon {machine['etwmon']}")
    benchmarks: dict[str, dict] = {}
    if "ring" in args.only:
        import ring_bench

        benchmarks["ring"] = _guard("ring", lambda: ring_bench.run(args.quick))
    if "readers" in args.only:
        import readers_bench

        benchmarks["readers"] = _guard("readers", lambda: readers_bench.run(args.quick))
    if "service" in args.only:
        import service_bench

        benchmarks["service"] = _guard("service", lambda: service_bench.run(args.quick))
    if "rules" in args.only:
        if _importable("defusedxml"):
            import rules_bench

            benchmarks["rules"] = _guard("rules", lambda: rules_bench.run(args.quick))
        else:
            benchmarks["rules"] = {"status": "skipped", "reason": "needs defusedxml: pip install 'etwmon[rules]'"}
            progress(f"rules: skipped: {benchmarks['rules']['reason']}")
    if any(name in KERNEL_BENCHMARKS for name in args.only):
        run_kernel_benchmarks(args, benchmarks)
    if "fleet" in args.only:
        import fleet_bench

        benchmarks["fleet"] = _guard("fleet", lambda: fleet_bench.run(args.quick))
    if "recording" in args.only:
        import recording_bench

        benchmarks["recording"] = _guard("recording", lambda: recording_bench.run(args.quick))

    results = {
        "suite": "etwmon benchmarks",
        "mode": "quick" if args.quick else "full",
        "machine": machine,
        "duration_s": time.monotonic() - started,
        "benchmarks": {name: benchmarks[name] for name in BENCHMARKS if name in benchmarks},
        "targets": [t for name in BENCHMARKS for t in benchmarks.get(name, {}).get("targets", [])],
    }
    plot_paths, plot_note = _plots(results, args.out, setup=not args.no_setup)
    results["plots"] = [str(p) for p in plot_paths] if plot_paths else plot_note
    (args.out / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")

    import report

    sys.stdout.write(report.terminal(results))
    progress(f"wrote {args.out / 'latest.json'}" + "".join(f", {p}" for p in plot_paths))
    if args.write_results:
        committed, _ = _plots(results, HERE / "plots", setup=not args.no_setup)
        rel = [str(p.relative_to(HERE)) for p in committed]
        (HERE / "RESULTS.md").write_text(report.markdown(results, rel))
        progress(f"wrote {HERE / 'RESULTS.md'}")
    failed = [name for name, bench in benchmarks.items() if bench.get("status") == "error"]
    if failed:
        progress(f"benchmarks that failed to run: {', '.join(failed)}")
        return 1
    return 0


def _plots(results: dict, directory: Path, setup: bool) -> tuple[list[Path], str]:
    import report

    if not _importable("matplotlib"):
        import peers

        why = peers.ensure_python_package("matplotlib", "matplotlib") if setup else "matplotlib is not installed"
        if why:
            progress(f"plots skipped: {why}")
            return [], f"skipped: {why}"
    try:
        return report.plots(results, directory), ""
    except Exception as exc:
        progress(f"plots failed: {type(exc).__name__}: {exc}")
        return [], f"failed: {type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
