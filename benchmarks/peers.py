"""The monitors the storm benchmarks compare: etwmon (one per Linux source), forkstat, pyroute2's
ProcEventSocket and bpftrace (an eBPF peer of etwmon's bpf source), each run as its own process and driven the same way (start, wait until subscribed, storm,
stop, collect what it saw); plus the setup step that installs missing peers.

Every tool's output is reduced to the same observations: ``create`` ids (process or thread), ``exit`` ids,
and ``exec`` (pid, argv) pairs, so they are scored against the generator's ground truth by one function.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import HERE, cpu_seconds, progress, wait_caught_up

WATCH = HERE / "watch.py"
READY_TIMEOUT = 30.0


@dataclass
class Observed:
    """What one monitor reported during a trial, in tool-neutral form."""

    create: list[int] = field(default_factory=list)
    exit: list[int] = field(default_factory=list)
    exec: list[tuple[int, tuple[str, ...] | None]] = field(default_factory=list)
    error: str | None = None  # the monitor failed or died: what it said
    lost_reported: int | None = None  # events the monitor itself said it lost (None: it cannot say)
    latency_us: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def delivered(self) -> int:
        """Every process/thread event it reported, the storm's and the rest of the machine's."""
        return len(self.create) + len(self.exit) + len(self.exec)


# --- setup ---------------------------------------------------------------------------------------------


def _run_quiet(cmd: list[str], timeout: float = 600, env: dict | None = None) -> tuple[bool, str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or [""]
    return out.returncode == 0, tail[0]


def ensure_forkstat() -> str | None:
    """Make forkstat available (apt-get, as root); the reason it is not, or None."""
    return ensure_apt_package("forkstat", "forkstat")


def ensure_apt_package(command: str, package: str) -> str | None:
    """Make ``command`` available by installing ``package`` with apt-get (as root, ``apt-get update`` first if
    the install fails); the reason it is not, or None."""
    if shutil.which(command):
        return None
    if not shutil.which("apt-get"):
        return f"{command} is not installed and there is no apt-get to install it"
    if os.geteuid() != 0:
        return f"{command} is not installed (apt-get install {package} needs root)"
    progress(f"setup: apt-get install -y {package}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    ok, why = _run_quiet(["apt-get", "install", "-y", package], env=env)
    if not ok:
        progress("setup: install failed, running apt-get update first")
        subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
        ok, why = _run_quiet(["apt-get", "install", "-y", package], env=env)
    if not ok or not shutil.which(command):
        return f"apt-get install {package} failed: {why}"
    return None


def ensure_python_package(module: str, requirement: str) -> str | None:
    """Make a PyPI package importable by this interpreter (pip install); the reason it is not, or None."""
    if importlib.util.find_spec(module) is not None:
        return None
    progress(f"setup: pip install {requirement}")
    ok, why = _run_quiet([sys.executable, "-m", "pip", "install", "--quiet", requirement])
    importlib.invalidate_caches()
    if not ok or importlib.util.find_spec(module) is None:
        return f"pip install {requirement} failed: {why}"
    return None


def etwmon_sources() -> dict[str, tuple[str | None, frozenset[str]]]:
    """The Linux kernel sources etwmon has here: the reason each cannot run (None: it can) and what it
    delivers (``Source.delivers``)."""
    from etwmon.sources import SOURCES, source_class

    found: dict[str, tuple[str | None, frozenset[str]]] = {}
    for name in ("bpf", "netlink", "linux", "audit"):
        if name not in SOURCES:
            continue
        try:  # one source that fails to load must not hide the others
            cls = source_class(name)
            found[name] = (cls.unavailable_reason(), frozenset(cls.delivers))
        except Exception as exc:
            found[name] = (f"cannot load the {name!r} source: {type(exc).__name__}: {exc}", frozenset())
    return found


# --- the tools -----------------------------------------------------------------------------------------


class Tool:
    """One monitor under test. ``start()`` returns once it is subscribed; ``stop()`` returns what it saw."""

    name = ""
    #: What it reports, in etwmon's capability names (``etwmon.sources.base.CAPABILITIES``): a storm is only
    #: scored on the events its monitor claims to deliver.
    delivers: frozenset[str] = frozenset({"process_create", "process_exec", "process_exit", "thread_create",
                                          "thread_exit", "command_line"})

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None
        self.cpu_start: float | None = None  # its CPU seconds the moment it was subscribed

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> Observed:
        raise NotImplementedError

    def caught_up(self) -> bool:
        """Wait until it has worked through the storm's events (see common.wait_caught_up); False on timeout."""
        return wait_caught_up(self.pid)

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()


class WatcherTool(Tool):
    """A Python monitor run by ``watch.py`` (etwmon or pyroute2): it prints "ready" once subscribed, reads
    "stop" on stdin, then writes what it saw as JSON."""

    def _argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        self.out = self.workdir / f"{self.name}.json"
        self.out.unlink(missing_ok=True)
        self.stderr = open(self.workdir / f"{self.name}.stderr", "w")
        self.proc = subprocess.Popen([sys.executable, str(WATCH), *self._argv(), "--out", str(self.out)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1)
        line = _readline(self.proc, READY_TIMEOUT)
        self.cpu_start = cpu_seconds(self.pid)
        if line.strip() != "ready":
            self.kill()
            raise RuntimeError(f"{self.name} did not start: {line.strip() or self._stderr_tail()}")

    def stop(self) -> Observed:
        try:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.kill()
        self.stderr.close()
        if self.proc.returncode != 0 or not self.out.exists():
            return Observed(error=f"exited with status {self.proc.returncode}: {self._stderr_tail()}")
        data = json.loads(self.out.read_text())
        return Observed(create=data["create"], exit=data["exit"],
                        exec=[(pid, tuple(argv) if argv is not None else None) for pid, argv in data["exec"]],
                        error=data.get("error"), lost_reported=data.get("lost_reported"),
                        latency_us=data.get("latency_us"), extra=data.get("extra", {}))

    def _stderr_tail(self) -> str:
        try:
            lines = (self.workdir / f"{self.name}.stderr").read_text().strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""


#: How a program reads etwmon's Monitor (``watch.py etwmon --mode``), beyond ``readinto`` alone: the name each
#: variant of a source's tool gets ("etwmon-bpf parse").
READ_MODES = ("readinto", "parse", "parse_array")


class EtwmonTool(WatcherTool):
    #: Only watched at the storms' full rate (the per-path CPU comparison), not at every rate level.
    full_rate_only = False

    def __init__(self, workdir: Path, source: str, max_items: int, max_bytes: int | None = None,
                 delivers: frozenset[str] | None = None, mode: str = "readinto") -> None:
        super().__init__(workdir)
        self.source = source
        if delivers is not None:
            self.delivers = delivers
        self.mode = mode
        self.name = f"etwmon-{source}" + ("" if mode == "readinto" else f" {mode}")
        self.full_rate_only = mode != "readinto"
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.extra_args: list[str] = []  # more watch.py options (the memory benchmark's)

    def _argv(self) -> list[str]:
        argv = ["etwmon", "--source", self.source, "--max-items", str(self.max_items), "--mode", self.mode]
        if self.max_bytes:
            argv += ["--max-bytes", str(self.max_bytes)]
        return argv + self.extra_args


class Pyroute2Tool(WatcherTool):
    name = "pyroute2"
    # The proc connector carries no command line and ProcEventSocket reads none.
    delivers = Tool.delivers - {"command_line"}

    def _argv(self) -> list[str]:
        return ["pyroute2"]


class ForkstatTool(Tool):
    """forkstat writing its ordinary text output to a file, parsed afterwards."""

    name = "forkstat"
    # clone is on so thread creation is reported too (forkstat shows it as "clone <tid> thread").
    ARGS = ["-e", "fork,exec,exit,clone"]
    #: The argument of the processes run to see that forkstat is listening (and where its output starts).
    CANARY = "etwmon-bench-canary"

    def start(self) -> None:
        self.out = self.workdir / "forkstat.out"
        self.stdout = open(self.out, "w")
        self.stderr = open(self.workdir / "forkstat.stderr", "w")
        self.proc = subprocess.Popen(["forkstat", *self.ARGS], stdin=subprocess.DEVNULL, stdout=self.stdout,
                                     stderr=self.stderr)
        # forkstat says nothing when it is listening, and its output is block-buffered (writing it line by
        # line would cost it more than it does in use). So canary processes are run until its output file
        # shows the first buffer-full: by then it is subscribed.
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and self.alive():
            if self.out.stat().st_size > 0:
                self.cpu_start = cpu_seconds(self.pid)
                return
            subprocess.run(["/bin/true", self.CANARY])
        self.kill()
        raise RuntimeError(f"forkstat did not start: {self._stderr_tail()}")

    #: Seconds it may take to flush and exit after SIGINT.
    STOP_TIMEOUT = 10.0

    def stop(self) -> Observed:
        error = None if self.alive() else f"{self.name} died with status {self.proc.returncode}"
        if self.alive():
            self.proc.send_signal(signal.SIGINT)  # it flushes its output and exits on SIGINT
            try:
                self.proc.wait(timeout=self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                error = f"{self.name} did not exit on SIGINT (killed; its last output may be lost)"
                self.kill()
        self.stdout.close()
        self.stderr.close()
        obs = self.parse(self.out.read_text(errors="replace"), after=self.CANARY)
        obs.error = error
        return obs

    @staticmethod
    def parse(text: str, after: str | None = None) -> Observed:
        return parse_forkstat(text, after)

    def _stderr_tail(self) -> str:
        lines = (self.workdir / "forkstat.stderr").read_text().strip().splitlines()
        return lines[-1] if lines else ""


class TailTool(ForkstatTool):
    """``etwmon tail --json`` as a user runs it, its own process, its output to a file (tail writes a regular file
    in 64 KiB chunks), parsed afterwards; stopped with SIGINT as Ctrl-C does."""

    full_rate_only = True
    CANARY = "etwmon-bench-tail-canary"

    def __init__(self, workdir: Path, source: str, max_items: int, delivers: frozenset[str] | None = None) -> None:
        super().__init__(workdir)
        self.source = source
        self.name = f"etwmon-{source} tail --json"
        self.max_items = max_items
        if delivers is not None:
            self.delivers = delivers

    def start(self) -> None:
        self.out = self.workdir / f"tail-{self.source}.jsonl"
        self.stdout = open(self.out, "w")
        self.stderr = open(self.workdir / f"tail-{self.source}.stderr", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "etwmon", "tail", "--json", "--source", self.source,
                                      "--type", "process,thread", "--max-items", str(self.max_items)],  # threads too, as forkstat
                                     stdin=subprocess.DEVNULL, stdout=self.stdout, stderr=self.stderr)
        # It says "watching" before the source is subscribed; a canary's exec in its output proves it listens.
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and self.alive():
            with open(self.out, "rb") as f:
                if self.CANARY.encode() in f.read():
                    self.cpu_start = cpu_seconds(self.pid)
                    return
            subprocess.run(["/bin/true", self.CANARY])
            time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"{self.name} did not start: {self._stderr_tail()}")

    #: The process run after a storm: its exec in the output means tail has written everything before it.
    END = "etwmon-bench-tail-end"

    def caught_up(self, timeout: float = 15.0) -> bool:
        """Its output is flushed every batch, so a marker process's exec showing up proves it caught up (it
        never goes idle on a machine where other work makes events)."""
        subprocess.run(["/bin/true", self.END])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.alive():
            with open(self.out, "rb") as f:
                f.seek(max(0, self.out.stat().st_size - 65536))
                if self.END.encode() in f.read():
                    return True
            time.sleep(0.02)
        return not self.alive()

    @staticmethod
    def parse(text: str, after: str | None = None) -> Observed:
        return parse_tail_json(text, after)

    def _stderr_tail(self) -> str:
        lines = (self.workdir / f"tail-{self.source}.stderr").read_text().strip().splitlines()
        return lines[-1] if lines else ""


def parse_tail_json(text: str, after: str | None = None) -> Observed:
    """``etwmon tail --json`` lines (docs/cli.md): creates, execs (the command line split as a shell would),
    exits, and RecordsLost counts. With ``after``, only the lines after the last one that mentions it count."""
    import shlex

    obs = Observed(lost_reported=0)
    lines = text.splitlines()
    if after:
        marks = [i for i, line in enumerate(lines) if after in line]
        lines = lines[marks[-1] + 1:] if marks else lines
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line cut short by the stop
        kind = event.get("type")
        if kind == "ProcessCreate":
            obs.create.append(event["pid"])
        elif kind == "ThreadCreate":
            obs.create.append(event["tid"])
        elif kind == "ProcessExec":
            command_line = event.get("command_line")
            try:
                argv = tuple(shlex.split(command_line)) if isinstance(command_line, str) else None
            except ValueError:
                argv = (command_line,)
            obs.exec.append((event["pid"], argv))
        elif kind == "ProcessExit":
            obs.exit.append(event["pid"])
        elif kind == "ThreadExit":
            obs.exit.append(event["tid"])
        elif kind == "RecordsLost":
            obs.lost_reported += event.get("count", 0)
    return obs


def path_tools(tool: EtwmonTool, workdir: Path) -> list[Tool]:
    """The other ways of reading one etwmon source that the storms compare at full rate: ``parse`` of every
    record, ``parse_array`` when this etwmon has it, ``etwmon tail --json``, and for bpf readinto with
    ``identity="full"`` (self-contained records, as the default was before the kernel wrote creates whole)."""
    import etwmon

    modes = [m for m in READ_MODES[1:] if m != "parse_array" or hasattr(etwmon, "parse_array")]
    full = []
    if tool.source == "bpf":
        full = [EtwmonTool(workdir, tool.source, tool.max_items, tool.max_bytes, tool.delivers)]
        full[0].name, full[0].full_rate_only, full[0].extra_args = "etwmon-bpf full", True, ["--identity", "full"]
    return ([EtwmonTool(workdir, tool.source, tool.max_items, tool.max_bytes, tool.delivers, mode)
             for mode in modes] + full + [TailTool(workdir, tool.source, tool.max_items, tool.delivers)])


def window_tool(tool: EtwmonTool, workdir: Path, seconds: float) -> EtwmonTool:
    """``tool`` (bpf, readinto) with another ``batch_wait``: the perftest's row of what a longer window saves."""
    other = EtwmonTool(workdir, tool.source, tool.max_items, tool.max_bytes, tool.delivers)
    other.name = f"etwmon-bpf batch_wait={seconds * 1000:g}ms"
    other.full_rate_only = True
    other.extra_args = ["--batch-wait", str(seconds)]
    return other


TRACEFS = Path("/sys/kernel/tracing")


def ensure_bpftrace() -> tuple[str | None, bool]:
    """Make bpftrace runnable: installed, and tracefs mounted (its tracepoint probes need it). Returns the
    reason it is not (or None) and whether tracefs was mounted here (so the caller unmounts it afterwards)."""
    why = ensure_apt_package("bpftrace", "bpftrace")
    if why:
        return why, False
    if (TRACEFS / "events").is_dir():
        return None, False
    if os.geteuid() != 0:
        return "bpftrace needs root", False
    progress(f"setup: mount -t tracefs nodev {TRACEFS} (bpftrace's tracepoints need it; unmounted afterwards)")
    ok, why = _run_quiet(["mount", "-t", "tracefs", "nodev", str(TRACEFS)])
    if not ok or not (TRACEFS / "events").is_dir():
        return f"cannot mount tracefs for bpftrace: {why}", False
    return None, True


def unmount_tracefs() -> None:
    _run_quiet(["umount", str(TRACEFS)])


#: execsnoop's way (argv joined at execve entry) plus the scheduler tracepoints etwmon's bpf source uses.
#: bpftrace 0.17 does not parse rawtracepoint probes, so these are the classic tracepoints.
BPFTRACE_SCRIPT = r"""
tracepoint:sched:sched_process_fork { printf("fork %d %d\n", args->parent_pid, args->child_pid); }
tracepoint:syscalls:sys_enter_execve { printf("argv %d ", pid); join(args->argv); }
tracepoint:sched:sched_process_exec { printf("exec %d\n", pid); }
tracepoint:sched:sched_process_exit { printf("exit %d\n", args->pid); }
"""


class BpftraceTool(ForkstatTool):
    """bpftrace running an execsnoop-style script on the sched_process_* tracepoints, its output (fully
    buffered, as forkstat's) written to a file and parsed afterwards."""

    name = "bpftrace"
    CANARY = "etwmon-bench-bpftrace-canary"

    def start(self) -> None:
        script = self.workdir / "etwmon-peer.bt"
        script.write_text(BPFTRACE_SCRIPT)
        self.out = self.workdir / "bpftrace.out"
        self.stdout = open(self.out, "w")
        self.stderr = open(self.workdir / "bpftrace.stderr", "w")
        self.proc = subprocess.Popen(["bpftrace", "-B", "full", str(script)], stdin=subprocess.DEVNULL,
                                     stdout=self.stdout, stderr=self.stderr)
        # Its "Attaching N probes..." comes before the probes are attached; canaries until one's argv shows
        # in the output (the first buffer-full) prove it is listening.
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and self.alive():
            if self.CANARY in self.out.read_text(errors="replace"):
                self.cpu_start = cpu_seconds(self.pid)
                return
            for _ in range(20):
                subprocess.run(["/bin/true", self.CANARY])
        self.kill()
        raise RuntimeError(f"bpftrace did not start: {self._stderr_tail()}")

    STOP_TIMEOUT = 30.0  # detaching its probes takes longer than forkstat's exit

    @staticmethod
    def parse(text: str, after: str | None = None) -> Observed:
        return parse_bpftrace(text, after)

    def _stderr_tail(self) -> str:
        lines = [line for line in (self.workdir / "bpftrace.stderr").read_text().strip().splitlines()
                 if "RLIMIT_MEMLOCK" not in line]  # its memlock warning is harmless on 5.11+ kernels
        return lines[-1] if lines else ""


def parse_bpftrace(text: str, after: str | None = None) -> Observed:
    """BPFTRACE_SCRIPT's lines: "fork <parent> <child>", "argv <pid> <args joined by spaces>", "exec <pid>"
    (an exec that succeeded: the argv seen last at its execve entry is its command line), "exit <tid>"."""
    obs = Observed()
    lines = text.splitlines()
    if after:
        marks = [i for i, line in enumerate(lines) if after in line]
        lines = lines[marks[-1] + 1:] if marks else lines
    argv: dict[int, tuple[str, ...]] = {}
    for line in lines:
        parts = line.split()
        if len(parts) < 2 or not parts[1].isdigit():
            continue
        event, pid = parts[0], int(parts[1])
        if event == "fork" and len(parts) >= 3 and parts[2].isdigit():
            obs.create.append(int(parts[2]))
        elif event == "argv":
            argv[pid] = tuple(parts[2:])
        elif event == "exec":
            obs.exec.append((pid, argv.pop(pid, None)))
        elif event == "exit":
            obs.exit.append(pid)
    return obs


def parse_forkstat(text: str, after: str | None = None) -> Observed:
    """forkstat's lines: "HH:MM:SS <event> <pid> <info> [duration] <process>"; info is parent/child for fork,
    parent/thread for clone, the exit status for exit, empty for exec (the command line follows the pid).
    With ``after``, only the lines after the last one that mentions it count."""
    obs = Observed()
    lines = text.splitlines()
    if after:
        marks = [i for i, line in enumerate(lines) if after in line]
        lines = lines[marks[-1] + 1:] if marks else lines
    for line in lines:
        parts = line.split()
        if len(parts) < 3 or not parts[2].isdigit():
            continue  # the column header it repeats, blank lines
        event, pid, rest = parts[1], int(parts[2]), parts[3:]
        if event in ("fork", "clone"):
            if rest and rest[0] in ("child", "thread"):
                obs.create.append(pid)
        elif event == "exec":
            obs.exec.append((pid, tuple(rest)))
        elif event == "exit":
            obs.exit.append(pid)
    return obs


def _readline(proc: subprocess.Popen, timeout: float) -> str:
    import select

    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def make_tools(workdir: Path, forkstat_reason: str | None, pyroute2_reason: str | None,
               sources: dict[str, tuple[str | None, frozenset[str]]], max_items: int, max_bytes: int | None,
               bpftrace_reason: str | None = "not requested") -> tuple[list[Tool], dict[str, str]]:
    """The tools that can run here, and for the others the reason they are skipped."""
    tools: list[Tool] = []
    skipped: dict[str, str] = {}
    for source in ("bpf", "netlink", "linux", "audit"):
        name = f"etwmon-{source}"
        reason, delivers = sources.get(source, ("etwmon has no such source", frozenset()))
        if reason is not None:
            skipped[name] = reason
        else:
            tools.append(EtwmonTool(workdir, source, max_items, max_bytes, delivers))
    if forkstat_reason:
        skipped["forkstat"] = forkstat_reason
    else:
        tools.append(ForkstatTool(workdir))
    if pyroute2_reason:
        skipped["pyroute2"] = pyroute2_reason
    else:
        tools.append(Pyroute2Tool(workdir))
    if bpftrace_reason:
        skipped["bpftrace"] = bpftrace_reason
    else:
        tools.append(BpftraceTool(workdir))
    return tools, skipped
