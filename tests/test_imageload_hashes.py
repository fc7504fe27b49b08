"""Hashes of loaded images (etwmon.hashes on ImageLoad records): the loaded file found by its path, verified by its
device and inode (a file swapped in at that path is never hashed in its place), shown in text/JSON/ECS, matched
by rules; live on the bpf source (root), a dlopen()ed library's SHA256."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

import etwmon
from etwmon import ItemType, parse
from etwmon.formats import event_to_ecs, event_to_json, format_event
from etwmon.hashes import HashStage
from etwmon.records import Details, EventFlags, ExtensionTag, block_fields, encode_image_load, filetime_now

from .helpers import ListSink, read_until
from .test_imageload import bpf_ok, programs, run_program  # noqa: F401 (fixtures: the dlopen program, bpf)

GUID = "{9e963500-d551-7e8b-0000-18b2a9271b49}"


class _Collect:
    """A sink keeping what is pushed into it (one by one, or in batches when ``batches`` is given)."""

    def __init__(self, out: list[bytes], batches: list | None = None) -> None:
        self.push = out.append
        if batches is not None:
            def push_batch(data, ends) -> None:
                batches.append(len(ends))
                start = 0
                for end in list(ends):
                    out.append(bytes(data[start:end]))
                    start = end
            self.push_batch = push_batch

    def push_lost(self, count: int) -> None:
        pass

    def notify(self) -> None:
        pass


def load_of(path: Path, *, st: os.stat_result | None = None, when: int | None = None, pid: int = 2 ** 22 + 3) -> bytes:
    """An ImageLoad record as the bpf source writes it for ``path`` (its device and inode: ``st``'s, else the
    file's now)."""
    st = st or os.stat(path, follow_symlinks=False)
    return encode_image_load(filetime_now() if when is None else when, pid, 0x4000, 0x7F0000000000, str(path),
                             Details(process_guid=GUID, image="/usr/bin/prog", exe_device=st.st_dev & 0xFFFFFFFF,
                                     exe_inode=st.st_ino))


def hashed(records: list[bytes], batch: bool = False) -> list[bytes]:
    out: list[bytes] = []
    batches: list[int] = []
    stage = HashStage("sha256,md5", wait=5.0)
    stage.attach(_Collect(out, batches if batch else None))
    try:
        if batch:
            stage.push_batch(b"".join(records), [sum(len(r) for r in records[:i + 1]) for i in range(len(records))])
            assert batches == [len(records)]  # passed on as one batch
        else:
            for record in records:
                stage.push(record)
    finally:
        stage.close()
    return out


def sums(data: bytes) -> str:
    return f"MD5={hashlib.md5(data).hexdigest().upper()},SHA256={hashlib.sha256(data).hexdigest().upper()}"


@pytest.mark.parametrize("batch", [False, True])
def test_an_image_load_carries_the_loaded_files_hashes_in_every_output(tmp_path, batch):
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"\x7fELF" + b"lib" * 5000)
    deep = tmp_path / ("d" * 200) / ("e" * 200)  # ImageFileName (300 characters) cuts it: found by ImageLoaded
    deep.mkdir(parents=True)
    long_lib = deep / "liblong.so"
    long_lib.write_bytes(b"long" * 100)
    out = hashed([load_of(lib), load_of(long_lib)], batch)
    first, second = (next(parse(r)) for r in out)
    assert first.type == ItemType.ImageLoad and first.hashes == sums(lib.read_bytes())
    assert second.image_name == str(long_lib) and second.flags & EventFlags.TRUNCATED
    assert second.hashes == sums(long_lib.read_bytes())
    assert first.process_guid == GUID and first.image == "/usr/bin/prog"  # the rest of the block kept
    assert f"hashes={sums(lib.read_bytes())}" in format_event(first)
    assert event_to_json(first)["hashes"] == sums(lib.read_bytes())
    doc = event_to_ecs(first)
    assert doc["dll"]["hash"] == {"md5": hashlib.md5(lib.read_bytes()).hexdigest(),
                                  "sha256": hashlib.sha256(lib.read_bytes()).hexdigest()}
    assert "hash" not in doc["process"]  # the process's executable is another file


def test_a_file_swapped_in_at_the_path_is_no_hash_never_its_hash(tmp_path):
    lib = tmp_path / "libx.so"
    lib.write_bytes(b"the loaded one")
    loaded = lib.stat()
    record = load_of(lib, st=loaded)
    swapped = tmp_path / "swap"
    swapped.write_bytes(b"an impostor")
    os.rename(swapped, lib)  # another file (inode) at the path now
    link_to_real = tmp_path / "liblink.so"
    real = tmp_path / "real.so"
    real.write_bytes(b"behind a symlink")
    link_to_real.symlink_to(real)
    by_link = load_of(link_to_real, st=real.stat())  # the device/inode the link leads to: not followed
    out = hashed([record, by_link])
    for raw in out:
        event = next(parse(raw))
        assert event.hashes is None and event.flags & EventFlags.NO_HASH
        assert int(ExtensionTag.Hashes) not in dict(block_fields(raw)[1])


def test_image_load_rules_match_hashes():
    pytest.importorskip("defusedxml")
    from etwmon.rules import RuleSet, RulesStage

    rules = RuleSet.from_xml("""<Sysmon schemaversion="4.90"><HashAlgorithms>sha256</HashAlgorithms><EventFiltering>
      <RuleGroup groupRelation="or"><ImageLoad onmatch="include">
        <Hashes condition="contains">SHA256=ABCD</Hashes>
      </ImageLoad></RuleGroup>
    </EventFiltering></Sysmon>""")
    assert not rules.ignored, rules.ignored
    sink = ListSink()
    stage = RulesStage(sink, rules)
    for text in ("SHA256=ABCD01", "SHA256=FFFF"):
        stage.push(encode_image_load(1, 9, 4096, 0x1000, f"/tmp/{text}.so", Details(process_guid=GUID, hashes=text)))
    assert [e.image_name for e in sink.events()] == ["/tmp/SHA256=ABCD01.so"]


@pytest.mark.root
def test_live_a_dlopened_library_carries_its_sha256(bpf_ok, programs):  # noqa: F811
    progs = programs
    expected = "SHA256=" + hashlib.sha256(progs["probe"].read_bytes()).hexdigest().upper()
    with etwmon.Monitor(source="bpf", max_items=200_000, image_loads=True, hashes="sha256") as mon:
        got = None
        for _ in range(5):  # the first may be HASH_PENDING (hashed off the hot path): the next load has it
            pid = run_program(progs)["loaded"][0]
            keep = (lambda e: getattr(e, "pid", None) == pid)
            events = read_until(mon, lambda evs: any(e.type == ItemType.ProcessExit for e in evs), keep=keep)
            # The image loads come from a ring of their own, read up to where it was when a pass began: one
            # written as that pass began comes in the next, after the exit read in this one.
            events += read_until(mon, None, timeout=2, keep=keep)
            loads = [e for e in events if e.type == ItemType.ImageLoad and e.image_name == str(progs["probe"])]
            assert len(loads) == 1
            if loads[0].hashes is not None:
                got = loads[0]
                break
            assert loads[0].flags & EventFlags.HASH_PENDING
        hash_stats = mon.stats.hashes
    assert got is not None and got.hashes == expected
    assert hash_stats["hashed"] >= 1
