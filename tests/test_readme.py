"""The README's library example runs as written and shows a process started while it watches."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

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
