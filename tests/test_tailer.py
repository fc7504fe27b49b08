"""examples/tailer.py, the SysMonClient, run as a reader of the book would run it, against real processes."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest

from .helpers import (
    ESC_CLEAR, ESC_TITLE, PY, WAIT, Watch, assert_auto_picked, assert_clean_stderr, linux_only, new_tag, run,
    spawn, unprivileged,
)

TAILER = str(Path(__file__).resolve().parents[1] / "examples" / "tailer.py")
CLOCK = rb"^\d\d:\d\d:\d\d\.\d{3}: "
SUMMARY = re.compile(r"^(\d+) records, (\d+) lost$", re.M)

# A process that starts one thread, so thread lines appear too.
THREADED = "import threading, sys; t = threading.Thread(target=sys.getrecursionlimit); t.start(); t.join()"


def tailer(*args: str) -> list[str]:
    return [PY, TAILER, *args]


def _summary(stderr: str) -> tuple[int, int]:
    match = SUMMARY.search(stderr)
    assert match, f"no summary in {stderr!r}"
    return int(match.group(1)), int(match.group(2))


@pytest.mark.root
def test_tailer_prints_the_books_lines() -> None:
    tag = new_tag()
    with Watch(tailer()) as w:
        assert_auto_picked(w.ready())
        pid = spawn(tag, ESC_TITLE, ESC_CLEAR, code=3)
        threaded = subprocess.Popen([PY, "-c", THREADED, tag])
        assert threaded.wait(WAIT) == 0
        created = w.wait_out(lambda l: re.match(CLOCK + rb"Process %d (Created|Exec)\. Command line: sh -c " % pid, l)
                             is not None and tag.encode() in l, what=f"creation of {pid}")
        exited = w.wait_out(lambda l: re.match(CLOCK + rb"Process %d Exited \(Code: " % pid, l) is not None,
                            what=f"exit of {pid}")
        w.wait_out(lambda l: re.match(CLOCK + rb"Thread \d+ Created in process %d$" % threaded.pid,
                                      l.rstrip(b"\n")) is not None, what="a thread creation")
        w.wait_out(lambda l: re.match(CLOCK + rb"Thread \d+ Exited from process %d \(Code: 0\)$" % threaded.pid,
                                      l.rstrip(b"\n")) is not None, what="a thread exit")
        status = w.stop()
    assert status == 0
    # Escape sequences from the command line are shown escaped, never sent to the terminal.
    assert rb"'\x1b]0;pwned\x07' '\x1b[2J'" in created
    assert b"\x1b" not in w.stdout and b"\x07" not in w.stdout
    assert exited.rstrip(b"\n").endswith(b"(Code: 3)")
    records, lost = _summary(w.stderr)
    assert records >= 2
    assert lost == sum(int(n) for n in re.findall(rb"WARNING: (\d+) records lost", w.stdout))
    for line in w.out:
        assert re.match(CLOCK, line), line
    assert_clean_stderr(w.stderr)


@pytest.mark.root
def test_tailer_shows_lost_records_as_a_warning() -> None:
    """A stopped client behind a storm loses records: more than the default ring (10,000) and the kernel
    socket buffer of the proc connector (~20,000 messages) hold, so the loss does not depend on timing."""
    with Watch(tailer()) as w:
        source = w.ready()
        assert_auto_picked(source)
        # 80,000 records while the client sleeps: threads are quickest.
        storm = [PY, "-c", "import threading\nfor _ in range(40000): t = threading.Thread(target=int); "
                           "t.start(); t.join()"]
        w.proc.send_signal(signal.SIGSTOP)
        try:
            subprocess.run(storm, check=True, timeout=120)
        finally:
            w.proc.send_signal(signal.SIGCONT)
        line = w.wait_out(lambda l: b"WARNING:" in l, what="a WARNING line", timeout=60)
        assert re.match(CLOCK + rb"WARNING: \d+ records lost$", line.rstrip(b"\n")), line
        w.stop()
    records, lost = _summary(w.stderr)
    assert lost == sum(int(n) for n in re.findall(rb"WARNING: (\d+) records lost", w.stdout)) > 0


@linux_only
def test_tailer_unprivileged_on_procfs() -> None:
    tag = new_tag()
    with Watch(unprivileged(tailer("--source", "procfs"))) as w:
        assert w.ready() == "procfs"
        pid = spawn(tag, seconds=0.6)
        w.wait_out(lambda l: re.match(CLOCK + rb"Process %d (Created|Exec)\. Command line: " % pid, l) is not None
                   and tag.encode() in l, what=f"creation of {pid}")
        w.wait_out(lambda l: re.match(CLOCK + rb"Process %d Exited \(Code: (unknown|\d+)\)" % pid, l) is not None,
                   what=f"exit of {pid}")
        assert w.stop(signal.SIGTERM) == 0
    assert _summary(w.stderr)[0] >= 2
    assert_clean_stderr(w.stderr)


@linux_only
def test_tailer_unavailable_source_is_one_line() -> None:
    done = run(tailer("--source", "etw"))
    err = done.stderr.decode()
    assert done.returncode == 1
    assert err.startswith("tailer: ") and err.count("\n") == 1 and "Windows" in err
    assert_clean_stderr(err)


@linux_only
def test_tailer_unprivileged_with_auto_says_a_fallback_in_one_clean_line() -> None:
    """Whatever "auto" picks without privileges, the tailer's stderr is its own lines: a fallback to polling is one
    ``tailer: warning:`` line, not Python's RuntimeWarning with the source line under it."""
    with Watch(unprivileged(tailer())) as w:
        source = w.ready()
        assert w.stop(signal.SIGTERM) == 0
    assert "RuntimeWarning" not in w.stderr and "warnings.warn" not in w.stderr and "Monitor(" not in w.stderr
    assert_clean_stderr(w.stderr)
    lines = w.stderr.splitlines()
    assert all(line.startswith(("tailer: warning: ", "watching ")) or SUMMARY.match(line) for line in lines), lines
    warned = [line for line in lines if line.startswith("tailer: warning: ")]
    if source == "procfs":  # nothing better opened: the one line says what is lost and what to do
        assert len(warned) == 1 and "root" in warned[0] and "service" in warned[0], lines
    else:
        assert warned == [], lines
