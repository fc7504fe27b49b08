"""The /proc polling source: snapshot diffs on a fake /proc, and live children it must see (no privilege)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import etwmon
from etwmon import ItemType
from etwmon.records import EXIT_CODE_UNKNOWN, FILETIME_UNIX_EPOCH
from etwmon.sources.procfs import ProcfsSource

from .helpers import ListSink, drain, read_until

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")


def write_process(root, pid: int, comm: bytes, ppid: int, start: int, argv: list[bytes] | None = None,
                  threads: dict[int, int] | None = None, flags: int = 0, exe: str | None = None) -> None:
    """A fake /proc/<pid> with stat (``flags``: its 9th field), cmdline, exe (a symlink, when given) and
    task/<tid>/stat in the kernel's formats."""
    def stat(dir_, task_id: int, task_start: int) -> None:
        rest = ["S", str(ppid)] + ["0"] * 4 + [str(flags)] + ["0"] * 12 + [str(task_start)] + ["0"] * 30
        (dir_ / "stat").write_bytes(b"%d (%s) " % (task_id, comm) + " ".join(rest).encode())

    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    stat(d, pid, start)
    (d / "cmdline").write_bytes(b"".join(a + b"\0" for a in (argv or [])))
    if (d / "exe").is_symlink():
        (d / "exe").unlink()
    if exe is not None:
        (d / "exe").symlink_to(exe)
    task = d / "task"
    if task.exists():
        for old in task.iterdir():
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    for tid, tstart in {pid: start, **(threads or {})}.items():
        (task / str(tid)).mkdir(parents=True, exist_ok=True)
        stat(task / str(tid), tid, tstart)


def remove_process(root, pid: int) -> None:
    import shutil
    shutil.rmtree(root / str(pid))


@pytest.fixture
def fake_proc(tmp_path):
    write_process(tmp_path, 1, b"init", 0, 1, [b"/sbin/init"])
    source = ProcfsSource(proc_root=str(tmp_path))
    source.open()
    return tmp_path, source, ListSink(lost_error=AssertionError("procfs cannot count losses"))


def test_baseline_is_silent_then_creates_and_exits_are_reported(fake_proc):
    root, source, sink = fake_proc
    source.poll(sink)
    assert sink.take() == []
    write_process(root, 50, b"prog", 1, 12_345, [b"/bin/prog", b"an arg", b"caf\xe9"], threads={51: 12_400})
    boot0, wall0 = time.clock_gettime_ns(time.CLOCK_BOOTTIME), time.time_ns()
    source.poll(sink)  # it measures the wall clock against the boot clock in here
    wall1, boot1 = time.time_ns(), time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    create, thread = sink.take()
    assert create.type == ItemType.ProcessCreate
    assert (create.pid, create.parent_pid, create.creating_pid) == (50, 1, 1)
    assert create.argv == [b"/bin/prog", b"an arg", b"caf\xe9"]
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    # Stamped with its start time (ticks since boot) on the wall clock, not with the time it was noticed: the
    # offset it used was read between our two readings, so it lies between what they bracket.
    start_ns = 12_345 * tick
    low = (start_ns + wall0 - boot1) // 100 + FILETIME_UNIX_EPOCH
    high = (start_ns + wall1 - boot0) // 100 + FILETIME_UNIX_EPOCH
    assert low <= create.filetime <= high
    assert thread.type == ItemType.ThreadCreate and (thread.tid, thread.pid) == (51, 50)
    write_process(root, 50, b"prog", 1, 12_345, [b"/bin/prog"], threads={})
    source.poll(sink)
    (thread_exit,) = sink.take()
    assert thread_exit.type == ItemType.ThreadExit and thread_exit.tid == 51
    assert thread_exit.exit_code == EXIT_CODE_UNKNOWN
    remove_process(root, 50)
    source.poll(sink)
    (exit_,) = sink.take()
    assert exit_.type == ItemType.ProcessExit and exit_.pid == 50 and exit_.exit_code == EXIT_CODE_UNKNOWN


def test_a_reused_pid_is_an_exit_and_a_create(fake_proc):
    root, source, sink = fake_proc
    write_process(root, 70, b"first", 1, 100, [b"first"], threads={71: 100})
    source.poll(sink)
    sink.take()
    write_process(root, 70, b"second", 1, 900, [b"second", b"x"])  # same pid, later start: another process
    source.poll(sink)
    events = sink.take()
    assert [(e.type, getattr(e, "tid", None)) for e in events] == [
        (ItemType.ProcessCreate, None), (ItemType.ThreadExit, 71), (ItemType.ProcessExit, None)]
    assert events[0].argv == [b"second", b"x"]


def test_a_new_program_name_is_an_exec(fake_proc):
    root, source, sink = fake_proc
    write_process(root, 80, b"sh", 1, 100, [b"sh", b"-c", b"exec sleep 9"])
    source.poll(sink)
    sink.take()
    write_process(root, 80, b"sleep", 1, 100, [b"sleep", b"9"])
    source.poll(sink)
    (ev,) = sink.take()
    assert ev.type == ItemType.ProcessExec and ev.pid == 80 and ev.argv == [b"sleep", b"9"]


PF_KTHREAD = 0x00200000


def test_a_kernel_thread_renaming_itself_is_not_an_exec(fake_proc):
    """kworker/1:1 becomes kworker/1:1-events as it takes other work: the same kernel thread, no new program."""
    root, source, sink = fake_proc
    write_process(root, 44, b"kworker/1:1", 2, 100, [], flags=PF_KTHREAD | 0x40)
    source.poll(sink)
    assert [e.type for e in sink.take()] == [ItemType.ProcessCreate]
    for name in (b"kworker/1:1-events", b"kworker/1:1-mm_percpu_wq", b"kworker/1:1"):
        write_process(root, 44, name, 2, 100, [], flags=PF_KTHREAD | 0x40)
        source.poll(sink)
        assert sink.take() == [], name


def test_a_process_renaming_itself_is_not_an_exec_but_a_new_program_is(fake_proc):
    """prctl(PR_SET_NAME) changes comm alone; an exec changes comm with the command line or the executable."""
    root, source, sink = fake_proc
    write_process(root, 81, b"python3", 1, 100, [b"python3", b"worker.py"], exe="/usr/bin/python3.11")
    source.poll(sink)
    sink.take()
    write_process(root, 81, b"worker-3", 1, 100, [b"python3", b"worker.py"], exe="/usr/bin/python3.11")
    source.poll(sink)
    assert sink.take() == []  # renamed: same command line, same executable
    # The same argv, another executable (exec -a, or a program replaced under the same name): an exec.
    write_process(root, 81, b"worker", 1, 100, [b"python3", b"worker.py"], exe="/opt/worker/bin/worker")
    source.poll(sink)
    (ev,) = sink.take()
    assert ev.type == ItemType.ProcessExec and ev.pid == 81 and ev.argv == [b"python3", b"worker.py"]
    # Another user's process, whose executable cannot be read: a new name with a new command line is an exec.
    write_process(root, 81, b"sleep", 1, 100, [b"sleep", b"9"])
    source.poll(sink)
    (ev,) = sink.take()
    assert ev.type == ItemType.ProcessExec and ev.argv == [b"sleep", b"9"]


def test_a_kernel_thread_that_becomes_a_user_program_is_an_exec(fake_proc):
    """A usermode helper: the kernel starts a thread that execs a program (modprobe, a coredump handler)."""
    root, source, sink = fake_proc
    write_process(root, 95, b"kworker/u4:2", 2, 100, [], flags=PF_KTHREAD)
    source.poll(sink)
    sink.take()
    write_process(root, 95, b"modprobe", 2, 100, [b"/sbin/modprobe", b"-q", b"fs-foo"], exe="/usr/bin/kmod")
    source.poll(sink)
    (ev,) = sink.take()
    assert ev.type == ItemType.ProcessExec and ev.argv == [b"/sbin/modprobe", b"-q", b"fs-foo"]


def test_kernel_threads_and_zombies_get_their_comm(fake_proc):
    root, source, sink = fake_proc
    write_process(root, 90, b"kworker/0:1", 2, 100, [])
    source.poll(sink)
    (ev,) = sink.take()
    assert ev.command_line == "kworker/0:1"


def test_options_are_checked():
    with pytest.raises(ValueError):
        ProcfsSource(interval=0)
    with pytest.raises(TypeError):
        ProcfsSource(bogus=1)
    assert ProcfsSource.lossy and "exit_code" not in ProcfsSource.delivers
    assert "exact_loss_count" not in ProcfsSource.delivers


def test_stop_returns_promptly_even_with_a_long_interval():
    source = ProcfsSource(interval=30)
    source.open()
    runner = threading.Thread(target=source.run, args=(ListSink(lost_error=AssertionError("procfs cannot count losses")),))
    runner.start()
    source.stop()  # wherever the thread is: in the 30 s wait, or about to begin it
    runner.join(10)  # far less than the interval: only a stop that ends the wait gets here with it ended
    assert not runner.is_alive() and source.polls == 0
    source.close()


# --- live ---------------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import threading, time, sys
    t = threading.Thread(target=time.sleep, args=(0.6,))
    t.start()
    print(t.native_id, flush=True)
    t.join()
    time.sleep(0.3)
""")


def watch_a_child(interval: float = 0.05, preexec_fn=None) -> tuple[int, int, list]:
    """Start a Python child holding a thread for 0.6 s under a procfs Monitor; (pid, tid, events)."""
    with etwmon.Monitor(source="procfs", interval=interval) as mon:
        child = subprocess.Popen([sys.executable, "-c", CHILD, "procfs-probe"], stdout=subprocess.PIPE, text=True,
                                 preexec_fn=preexec_fn)
        tid = int(child.stdout.readline())
        child.wait()
        # Until the poller has seen it end (its exit is the last of its events), then what is left.
        events = read_until(mon, lambda evs: any(e.type == ItemType.ProcessExit and e.pid == child.pid for e in evs))
        mon.stop()
        events += drain(mon)
    return child.pid, tid, events


def test_live_child_process_and_thread_are_seen():
    pid, tid, events = watch_a_child()
    mine = [e for e in events if getattr(e, "pid", None) == pid]
    kinds = [e.type for e in mine]
    assert kinds.count(ItemType.ProcessCreate) == 1 and kinds.count(ItemType.ProcessExit) == 1
    create = next(e for e in mine if e.type == ItemType.ProcessCreate)
    assert create.argv[-1] == b"procfs-probe" and create.parent_pid == os.getpid()
    assert [e.tid for e in mine if e.type == ItemType.ThreadCreate] == [tid]
    assert [e.tid for e in mine if e.type == ItemType.ThreadExit] == [tid]
    assert all(e.exit_code == EXIT_CODE_UNKNOWN for e in mine if e.type in (ItemType.ProcessExit,
                                                                             ItemType.ThreadExit))
    assert kinds.index(ItemType.ProcessCreate) < kinds.index(ItemType.ProcessExit)


def test_live_runs_unprivileged():
    """Without root (as root: with the effective uid of nobody, which also drops every capability)."""
    dropped = os.geteuid() == 0
    if dropped:
        os.seteuid(65534)
    try:
        assert os.geteuid() != 0
        # The child itself may run as root: this interpreter may live where nobody cannot read it.
        pid, tid, events = watch_a_child(preexec_fn=(lambda: os.seteuid(0)) if dropped else None)
    finally:
        if dropped:
            os.seteuid(0)
    seen = {(e.type, getattr(e, "tid", None)) for e in events if getattr(e, "pid", None) == pid}
    assert {(ItemType.ProcessCreate, None), (ItemType.ThreadCreate, tid), (ItemType.ThreadExit, tid),
            (ItemType.ProcessExit, None)} <= seen


RENAMER = textwrap.dedent("""
    import os, sys, time
    print("started", flush=True)
    time.sleep(0.4)
    with open("/proc/self/comm", "w") as f:  # prctl(PR_SET_NAME): a new name, the same program
        f.write("renamed-" + sys.argv[1][-6:])
    time.sleep(0.4)
    os.execv("/bin/sleep", ["sleep", "0.4"])
""")


def test_live_a_rename_is_not_an_exec_and_the_exec_after_it_is():
    with etwmon.Monitor(source="procfs", interval=0.05) as mon:
        child = subprocess.Popen([sys.executable, "-c", RENAMER, "procfs-rename"], stdout=subprocess.PIPE,
                                 text=True)
        assert child.stdout.readline().strip() == "started"
        assert child.wait(20) == 0
        events = read_until(mon, lambda evs: any(e.type == ItemType.ProcessExit and e.pid == child.pid
                                                 for e in evs))
    mine = [e for e in events if getattr(e, "pid", None) == child.pid]
    execs = [e for e in mine if e.type == ItemType.ProcessExec]
    assert [e.argv for e in execs] == [[b"sleep", b"0.4"]], [(e.type, getattr(e, "command_line", "")) for e in mine]
