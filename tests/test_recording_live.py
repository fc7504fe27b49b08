"""Recordings of the live kernel, and the report opened in headless Chromium.

The live tests record shell commands through ``etwmon record`` (root: the bpf source, or what auto picks) while
unrelated processes run; the browser tests open reports in Debian's chromium and look at the DOM the page's
script built, a screenshot, and every request the browser tried to make.
"""

from __future__ import annotations

import shlex
import subprocess
import time

import pytest

import etwmon
from etwmon.records import ItemType, ProcessCreate

from .browser import Browser, png_pixels
from .helpers import WAIT, clean_env, etwmon_argv, linux_only, new_tag, run
from .recording_builders import tree_records, write_recording

HOSTILE_SCRIPT = "</script><script>document.title='pwned'</script>"
HOSTILE_IMG = "<img src=x onerror=\"document.title='pwned'\">"


def _report(tmp_path, recording) -> str:
    out = tmp_path / "report.html"
    result = run(etwmon_argv("report", str(recording), "-o", str(out)))
    assert result.returncode == 0, result.stderr
    return out


_CMD_CELLS = "Array.from(document.querySelectorAll('#viewport .row:not([hidden]) .c.cmd'), e => e.textContent)"


def _open(tmp_path, page, height: int = 900) -> Browser:
    browser = Browser(tmp_path, height=height)
    try:
        browser.open(page)
    except BaseException:
        browser.close()
        raise
    return browser


def _only_the_page(browser: Browser, page) -> None:
    assert browser.requests == [page.resolve().as_uri()]  # nothing but the page itself was requested
    assert browser.exceptions == [] and browser.messages == []  # no script error, no CSP report


# --- the report in the browser (synthetic recordings: no root needed) ---------------------------------------


def test_the_browser_check_sees_a_request_when_a_page_makes_one(tmp_path):
    """The control for the tests below: a page that loads something is caught."""
    page = tmp_path / "loads.html"
    page.write_text('<!DOCTYPE html><body><img src="http://127.0.0.1:9/x.png">'
                    '<script>document.body.dataset.ready = "1"</script></body>')
    with _open(tmp_path, page) as browser:
        assert "http://127.0.0.1:9/x.png" in browser.requests


def test_the_report_opens_offline_shows_the_tree_and_loads_nothing(tmp_path):
    write_recording(tmp_path / "r.rec", tree_records(8))
    page = _report(tmp_path, tmp_path / "r.rec")
    with _open(tmp_path, page, height=1400) as browser:
        cells = browser.evaluate(_CMD_CELLS)
        assert {"make all", "as -o file0.o", *(f"cc -c file{k}.c" for k in range(8))} == set(cells)
        assert browser.evaluate("document.querySelectorAll('#viewport .row.fail:not([hidden])').length") == 2
        # Collapsing the root hides its descendants; the search finds one and shows it with its ancestors.
        browser.evaluate("document.getElementById('collapse').click()")
        assert browser.evaluate(_CMD_CELLS) == ["make all"]
        browser.evaluate("var s = document.getElementById('search'); s.value = 'file0.o';"
                         "s.dispatchEvent(new Event('input'))")
        time.sleep(0.5)
        assert browser.evaluate(_CMD_CELLS) == ["make all", "cc -c file0.c", "as -o file0.o"]
        assert browser.evaluate("document.getElementById('matches').textContent") == "1 match"
        png = browser.screenshot()
        _only_the_page(browser, page)
    width, height, rows = png_pixels(png)
    colours = {row[i:i + 3] for row in rows[::7] for i in range(0, len(row), 4 * 5)}
    assert len(colours) > 20, "the screenshot is (nearly) blank"
    dark = sum(1 for row in rows[height // 3::3] for i in range(0, len(row), 4) if row[i] < 80)
    assert dark > 100  # text was drawn below the header


def test_hostile_command_lines_are_text_in_the_rendered_page(tmp_path):
    hostile = f"sh -c true {HOSTILE_SCRIPT} {HOSTILE_IMG} \u202eevil"
    write_recording(tmp_path / "r.rec", tree_records(3, hostile=hostile))
    page = _report(tmp_path, tmp_path / "r.rec")
    with _open(tmp_path, page) as browser:
        assert browser.evaluate("document.title") == "etwmon recording"
        assert browser.evaluate("document.querySelectorAll('img').length") == 0
        assert browser.evaluate("document.scripts.length") == 2
        shown = [c for c in browser.evaluate(_CMD_CELLS) if "document.title" in c]
        # As text, the bidi override shown as an escape.
        assert shown == [f"sh -c true {HOSTILE_SCRIPT} {HOSTILE_IMG} \\u202eevil"]
        _only_the_page(browser, page)


# --- live recordings (root) ------------------------------------------------------------------------------------

TREE_SCRIPT = """
for i in 1 2 3 4 5; do
  sh -c 'for j in 1 2 3 4 5 6 7 8 9 10; do /bin/echo {tag}-L3 "$0" "$j" >/dev/null; done' {tag}-L2-$i
done
sh -c '(sleep 0.3; /bin/echo {tag}-daemon >/dev/null) & exit 0' {tag}-daemonizer
exit 3
"""


def _unrelated_loop(tag: str) -> subprocess.Popen:
    return subprocess.Popen(["sh", "-c", f'while :; do /bin/echo {tag}-unrelated >/dev/null; sleep 0.02; done'],
                            stdin=subprocess.DEVNULL)


@linux_only
@pytest.mark.root
def test_record_keeps_exactly_the_commands_tree_and_exits_with_its_status(tmp_path):
    tag = new_tag()
    loop = _unrelated_loop(tag)
    try:
        time.sleep(0.2)
        out = tmp_path / "tree.rec"
        result = subprocess.run(
            etwmon_argv("record", "-o", str(out), "--grace", "2", "--", "sh", "-c", TREE_SCRIPT.format(tag=tag),
                        f"{tag}-root"),
            capture_output=True, timeout=120, env=clean_env(), stdin=subprocess.DEVNULL)
    finally:
        loop.kill()
        loop.wait()
    err = result.stderr.decode()
    assert result.returncode == 3, err  # the command's own status
    assert "the command exited with status 3" in err and "none lost" in err
    with etwmon.open_recording(out) as reader:
        assert reader.complete, reader.note
        assert reader.header["filter"]["command"][:2] == ["sh", "-c"]
        events = list(reader.events())
        summary = reader.summary
    assert summary["exit_status"] == 3 and summary["events"] == len(events)
    execs = [e for e in events if e.type == ItemType.ProcessExec]
    creates = [e for e in events if e.type == ItemType.ProcessCreate]
    lines = [e.command_line for e in execs]
    assert sum(c.startswith(f"/bin/echo {tag}-L3 ") for c in lines) == 50
    assert sum(c.startswith("sh -c 'for j in") for c in lines) == 5
    assert sum(c.startswith("sh -c '(sleep 0.3;") and c.endswith(f"{tag}-daemonizer") for c in lines) == 1
    assert lines.count(f"/bin/echo {tag}-daemon") == 1 and "sleep 0.3" in lines  # the daemonized child stays in
    assert not any(f"{tag}-unrelated" in e.command_line for e in execs + creates)  # nothing unrelated
    # Exactly the tree: every process's parent is in the file, back to the root the recorder forked.
    guids = {e.process_guid for e in creates}
    assert len(guids) == len(creates) and None not in guids
    root = [e for e in creates if e.parent_process_guid not in guids]
    assert len(root) == 1 and root[0].parent_pid == reader.header["recorder_pid"]
    assert all(e.process_guid in guids for e in events if e.type != ItemType.RecordsLost)
    assert len(creates) == summary["processes"] >= 59
    # Replayed through tail with its filters.
    replay = run(etwmon_argv("tail", "--replay", str(out), "--type", "exec", "--glob", f"/bin/echo {tag}-L3 *"))
    assert replay.returncode == 0 and len(replay.stdout.splitlines()) == 50


@linux_only
@pytest.mark.root
def test_record_runs_the_command_as_the_user_and_gives_them_the_file(tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody")
    out = tmp_path / "d" / "as-user.rec"
    env = clean_env(SUDO_USER="nobody")  # as `sudo etwmon record` would have it
    result = subprocess.run(etwmon_argv("record", "-o", str(out), "--", "sh", "-c", "id -u; exit 0"),
                            capture_output=True, timeout=120, env=env, stdin=subprocess.DEVNULL, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().strip() == str(nobody.pw_uid)
    st = out.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (nobody.pw_uid, 0o600)
    with etwmon.open_recording(out) as reader:
        execs = [e for e in reader.events() if e.type == ItemType.ProcessExec]
    assert execs and all(e.uid == nobody.pw_uid for e in execs)


@linux_only
@pytest.mark.root
def test_record_everything_until_duration_and_refuse_to_overwrite(tmp_path):
    tag = new_tag()
    out = tmp_path / "all.rec"
    recorder = subprocess.Popen(etwmon_argv("record", "-o", str(out), "--duration", "3s"), stderr=subprocess.PIPE,
                                env=clean_env(), stdin=subprocess.DEVNULL)
    first = recorder.stderr.readline()
    assert first.startswith(b"etwmon: recording everything to "), first
    subprocess.run(["sh", "-c", f"/bin/echo {tag} >/dev/null"], check=True)
    _, err = recorder.communicate(timeout=WAIT + 10)
    assert recorder.returncode == 0, err
    assert b"--duration 3 s reached" in err
    with etwmon.open_recording(out) as reader:
        events = list(reader.events())
        assert reader.complete and reader.header["filter"]["command"] is None
    assert any(isinstance(e, ProcessCreate) and tag in e.command_line for e in events)
    again = run(etwmon_argv("record", "-o", str(out), "--duration", "1s"))
    assert again.returncode == 1 and b"exists" in again.stderr


@linux_only
@pytest.mark.root
def test_a_recorded_hostile_command_is_text_in_the_browser(tmp_path):
    out = tmp_path / "hostile.rec"
    result = subprocess.run(etwmon_argv("record", "-o", str(out), "--", "sh", "-c", "exit 0", HOSTILE_SCRIPT,
                                        HOSTILE_IMG), capture_output=True, timeout=120, env=clean_env(),
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    page = _report(tmp_path, out)
    with _open(tmp_path, page) as browser:
        assert browser.evaluate("document.title") == "etwmon recording"
        assert browser.evaluate("document.querySelectorAll('img').length") == 0
        cells = [shlex.split(c) for c in browser.evaluate(_CMD_CELLS) if "document.title" in c]
        assert ["sh", "-c", "exit 0", HOSTILE_SCRIPT, HOSTILE_IMG] in cells, cells
        _only_the_page(browser, page)


@linux_only
@pytest.mark.root
def test_record_says_why_a_command_cannot_run_and_leaves_no_file(tmp_path):
    out = tmp_path / "nothing.rec"
    result = run(etwmon_argv("record", "-o", str(out), "--", str(tmp_path / "no-such-program")))
    assert result.returncode == 127  # as a shell says it
    assert result.stderr.decode().splitlines()[-1].startswith(f"etwmon: error: cannot run {tmp_path}/no-such-program")
    assert not out.exists()
    result = run(etwmon_argv("record", "-o", str(out), "--user", "no-such-user-here", "--", "true"))
    assert result.returncode == 1 and b"no user named 'no-such-user-here'" in result.stderr
    assert not out.exists()
