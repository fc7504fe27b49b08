"""Image loads and hashes asked for on the command line beyond tail: ``etwmon record --image-loads`` (a recording
holds a dlopen()ed library's ImageLoad, hashed) and ``etwmon serve --image-loads`` (a client reading with
``tail --connect --type image`` gets them); a source that cannot see image loads is a usage error."""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys

import pytest

import etwmon
from etwmon import ItemType
from etwmon.records import EventFlags

from .helpers import Watch, clean_env, etwmon_argv, run
from .test_imageload import bpf_ok, programs, run_program  # noqa: F401 (fixtures: the dlopen program, bpf)
from .test_service import Daemon, daemons, sockdir  # noqa: F401 (fixtures: a served socket)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="image loads: the bpf source")


def test_record_and_serve_take_the_options_and_check_them():
    from etwmon.cli import _build_parser

    parser = _build_parser()
    args = parser.parse_args(["record", "-o", "x.rec", "--image-loads", "--hashes", "SHA256,md5", "--", "true"])
    assert args.image_loads and args.hashes == "MD5,SHA256"
    args = parser.parse_args(["serve", "--image-loads", "--hashes", "*"])
    assert args.image_loads and args.hashes == "MD5,SHA1,SHA256"
    assert not parser.parse_args(["serve"]).image_loads and parser.parse_args(["serve"]).hashes is None


@pytest.mark.parametrize("argv", [
    ("record", "-o", "never.rec", "--image-loads", "--source", "procfs", "--", "true"),
    ("serve", "--image-loads", "--source", "procfs", "--socket", "/nonexistent/never.sock"),
])
def test_image_loads_from_a_source_that_cannot_see_them_is_a_usage_error(argv, tmp_path):
    done = run(etwmon_argv(*argv), env=clean_env())
    assert done.returncode == 2 and b"image loads come from the bpf source only" in done.stderr, done.stderr
    assert not (tmp_path / "never.rec").exists()


@pytest.mark.parametrize("command", ["record", "serve"])
def test_an_unknown_hash_is_a_usage_error(command):
    done = run(etwmon_argv(command, *(["-o", "x.rec"] if command == "record" else []), "--hashes", "crc32"),
               env=clean_env())
    assert done.returncode == 2 and b"unknown hash algorithm 'crc32'" in done.stderr, done.stderr


@linux_only
@pytest.mark.root
def test_live_record_holds_the_dlopened_librarys_image_load_and_its_hash(bpf_ok, programs, tmp_path):  # noqa: F811
    out = tmp_path / "loads.rec"
    main, probe = shlex.quote(str(programs["main"])), shlex.quote(str(programs["probe"]))
    # Twice: a load hashed off the hot path may be HASH_PENDING the first time; the second is a cache hit.
    script = f"{main} {probe} 1 && {main} {probe} 1"
    result = subprocess.run(etwmon_argv("record", "-o", str(out), "--source", "bpf", "--image-loads", "--hashes",
                                        "sha256", "--grace", "2", "--", "sh", "-c", script),
                            capture_output=True, timeout=120, env=clean_env(), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr.decode()
    with etwmon.open_recording(out) as reader:
        events = list(reader.events())
    execs = {e.pid for e in events if e.type == ItemType.ProcessExec and e.command_line.startswith(str(programs["main"]))}
    loads = [e for e in events if e.type == ItemType.ImageLoad and e.image_name == str(programs["probe"])]
    assert len(execs) == 2 and {e.pid for e in loads} == execs, [(e.pid, e.image_name) for e in loads]
    expected = "SHA256=" + hashlib.sha256(programs["probe"].read_bytes()).hexdigest().upper()
    assert all(e.hashes == expected or (e.hashes is None and e.flags & EventFlags.HASH_PENDING) for e in loads)
    assert loads[-1].hashes == expected
    assert all(e.image == str(programs["main"].resolve()) and e.process_guid for e in loads)


@linux_only
@pytest.mark.root
def test_live_serve_with_image_loads_gives_them_to_a_client(bpf_ok, programs, sockdir, daemons):  # noqa: F811
    d = Daemon(sockdir, "--source", "bpf", "--image-loads", "--hashes", "sha256")
    daemons.append(d)
    with Watch(etwmon_argv("tail", "--connect", d.path, "--type", "image", "--json"), env=clean_env()) as w:
        w.ready()
        pid = run_program(programs)["loaded"][0]
        w.wait_out(lambda line: str(programs["probe"]).encode() in line, what="the library's ImageLoad")
        assert w.stop() == 0
    loads = [o for o in w.json_lines() if o["type"] == "ImageLoad" and o["pid"] == pid]
    assert {o["image_name"] for o in loads} >= {str(programs["probe"]), str(programs["main"].resolve())}
    assert all(o["hashes"] is None or o["hashes"].startswith("SHA256=") for o in loads)
    assert d.stop() == 0, d.log()
