"""The README runs as written: its first block (set-up line, run line) verbatim in a fresh clone, and its library
example, each showing a process started while it watches."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from .helpers import assert_clean_stderr, new_tag, spawn

README = Path(__file__).resolve().parent.parent / "README.md"


def _library_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "the README has no python example"
    return blocks[0]


@pytest.mark.root
def test_readme_library_example_prints_an_exec_while_watching(tmp_path):
    script = tmp_path / "example.py"
    # Say when the Monitor is open, so the tagged child starts after it.
    script.write_text(_library_example().replace("as mon:\n", "as mon:\n    print('open', flush=True)\n", 1))
    example = subprocess.Popen([sys.executable, "-u", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        assert example.stdout.readline().strip() == "open", example.stderr.read()
        tag = f"readme-{uuid.uuid4().hex[:10]}"
        subprocess.run(["sh", "-c", "sleep 0.2", tag], check=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = example.stdout.readline()
            assert line, f"the example ended without showing {tag}: {example.stderr.read()}"
            if tag in line:
                fields = line.split()
                assert re.match(r"\d{4}-\d\d-\d\d", fields[0]) and fields[1].endswith("+00:00")  # aware UTC
                assert fields[3:] == ["sh", "-c", "'sleep", "0.2'", tag]
                break
        else:
            pytest.fail(f"{tag} not shown within 20 s")
        example.send_signal(signal.SIGINT)  # Ctrl-C: the stats, then a clean end
        rest, err = example.communicate(timeout=20)
        assert example.returncode == 0, err
        assert rest.rstrip().splitlines()[-1].startswith("MonitorStats(pushed="), rest
    finally:
        if example.poll() is None:
            example.kill()
            example.wait()


def test_ci_runs_the_readmes_test_command():
    section = README.read_text().split("## Test it", 1)[1]
    command = re.search(r"```sh\n(.*?)\n```", section, re.S).group(1).strip()
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert command in [line.strip() for line in ci], f"{command!r} is not a line of .ci/run"


def _first_block() -> list[str]:
    section = README.read_text().split("## Run it", 1)[1]
    block = re.search(r"```sh\n(.*?)\n```", section, re.S)
    assert block, "the README's 'Run it' section has no sh block"
    return block.group(1).splitlines()


def _fresh_clone(into: Path) -> Path:
    """The files git tracks, as they are in this checkout (so an edited README is what is tested), and nothing
    else: no venv, no build output, no cache."""
    repo = README.parent
    listed = subprocess.run(["git", "-C", str(repo), "ls-files", "-z"], capture_output=True)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout, so no fresh clone to make: {listed.stderr.decode().strip()}")
    clone = into / "etwmon"
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = repo / name
        if source.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name)
    return clone


@pytest.mark.slow
def test_readme_first_block_runs_verbatim_in_a_fresh_clone(tmp_path):
    """The set-up line, then the run line, as a new user types them into a shell in a fresh clone; the run line
    shows a process started while it watches, and Ctrl-C ends it with the summary and status 0. (Slow: it makes a
    venv and installs etwmon into it; pip takes numpy from its cache or the configured wheel directory.)"""
    lines = _first_block()
    assert len(lines) == 2, f"the first block is the set-up line and the run line: {lines}"
    setup, run_line = lines
    clone = _fresh_clone(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")
           and not k.startswith("ETWMON_")}
    done = subprocess.run(["bash", "-c", setup], cwd=clone, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, f"{setup!r} failed: {done.stderr[-3000:]}"
    # Its own session, so Ctrl-C (SIGINT to the foreground process group) reaches etwmon whatever the shell does.
    tail = subprocess.Popen(["bash", "-c", run_line], cwd=clone, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    out: list[bytes] = []
    collector = threading.Thread(target=lambda: out.extend(iter(tail.stdout.readline, b"")), daemon=True)
    try:
        err = b""
        deadline = time.monotonic() + 60
        while b"watching" not in err and time.monotonic() < deadline and tail.poll() is None:
            err += tail.stderr.readline()
        assert b"watching" in err, f"no 'watching' line from {run_line!r}: {err!r}; status {tail.poll()}"
        collector.start()
        tag = new_tag()
        spawn(tag, seconds=0.6)
        deadline = time.monotonic() + 30
        while not any(tag.encode() in line for line in list(out)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(tag.encode() in line for line in list(out)), f"{tag} not shown: {err!r} {out[-5:]!r}"
        os.killpg(tail.pid, signal.SIGINT)
        rest = tail.stderr.read()
        assert tail.wait(30) == 0, (err + rest).decode()
    finally:
        if tail.poll() is None:
            os.killpg(tail.pid, signal.SIGKILL)
            tail.wait()
    stderr = (err + rest).decode()
    assert re.search(r"^etwmon: stopped: \d+ records", stderr, re.M), stderr
    assert_clean_stderr(stderr)
