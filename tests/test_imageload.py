"""Image loads from the bpf source: the kernel-written ImageLoad record, its fix-up, and the live kernel (a C program
built here dlopen()s a library built here; LD_PRELOAD; a dlopen/dlclose storm; off attaches nothing)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import etwmon
from etwmon import ItemType, parse
from etwmon.filters import parse_event_types
from etwmon.records import (
    EXTENSION_VERSION, IMAGE_LOAD_DTYPE, TRUNCATION_MARKER, EventFlags, ExtensionTag, ImageLoad, block_fields,
)
from etwmon.sources.bpf import BpfSource
from etwmon.sources.bpf import imageload as il

from .conftest import require
from .helpers import ListSink, read_until
from .test_bpf import bpf_fds

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="eBPF is Linux only")

GUID = "{9e963500-d551-7e8b-0000-18b2a9271b49}"


# --- the record ----------------------------------------------------------------------------------------------


def kernel_record(path: bytes, exe: bytes = b"/usr/bin/prog", *, pid: int = 42, size: int = 0x5000,
                  base: int = 0x7F0000000000, dev: int = 0xFE00, ino: int = 77, flags: int = 0) -> bytes:
    """An ImageLoad record as imageload.bpf.c writes it: every byte of a path as one UTF-16 unit (a byte >= 0x80
    as U+DC80..U+DCFF), a name longer than 300 cut to 288 and the marker, the whole path then in ImageLoaded."""
    def units(raw: bytes) -> bytes:
        return b"".join(struct.pack("<H", b if b < 0x80 else 0xDC00 | b) for b in raw)

    name = units(path) if len(path) <= 300 else units(path[:288]) + TRUNCATION_MARKER.encode("utf-16-le")
    fields = struct.pack("<HH", 1, 16) + bytes.fromhex("0035969e51d58b7e000018b2a9271b49")
    fields += struct.pack("<HHI", 17, 4, dev) + struct.pack("<HHQ", 18, 8, ino)
    if len(path) > 300:
        flags |= 1
        fields += struct.pack("<HH", 25, 2 * len(path)) + units(path)
    fields += struct.pack("<HH", 3, 2 * len(exe)) + units(exe)
    size_total = 640 + 8 + len(fields)
    head = struct.pack("<hH4xqIIQ", 5, size_total, 134_410_729_407_886_085, pid, size, base)
    return head + name + b"\0" * (640 - 32 - len(name)) + struct.pack("<HHI", 1, 8 + len(fields), flags) + fields


def test_the_kernels_record_is_the_books_struct_and_the_extension_block():
    record = kernel_record(b"/usr/lib/x86_64-linux-gnu/libz.so.1")
    assert IMAGE_LOAD_DTYPE.itemsize == 640 and IMAGE_LOAD_DTYPE.fields["ImageFileName"][1] == 32
    (event,) = parse(record)
    assert event == ImageLoad(134_410_729_407_886_085, 42, 0x5000, 0x7F0000000000,
                              "/usr/lib/x86_64-linux-gnu/libz.so.1", process_guid=GUID, image="/usr/bin/prog",
                              exe_device=0xFE00, exe_inode=77, flags=EventFlags(0))
    assert event.encode() == record  # the Python encoder writes the kernel's bytes: one layout
    # The record's file (here the loaded one) in the tags a process record names its executable with; ImageLoaded 25
    assert (int(ExtensionTag.ExeDevice), int(ExtensionTag.ExeInode), int(ExtensionTag.ImageLoaded)) == (17, 18, 25)
    assert (event.image_device, event.image_inode) == (event.exe_device, event.exe_inode) == (0xFE00, 77)
    assert EXTENSION_VERSION == 1


def test_a_long_name_is_cut_visibly_and_whole_in_image_loaded():
    path = b"/opt/" + b"d" * 390 + b"/libx.so"
    record = kernel_record(path)
    (event,) = parse(record)
    assert event.image_name == path.decode() and event.flags & EventFlags.TRUNCATED
    name = bytes(record[32:632]).decode("utf-16-le")
    assert name == path[:288].decode() + TRUNCATION_MARKER and record[632:634] == b"\0\0"
    assert dict(block_fields(record)[1])[25] == path.decode().encode("utf-16-le")
    assert event.encode() == record


@pytest.mark.parametrize("path", [b"/tmp/\xc3\xa9t\xc3\xa9/lib.so", b"/tmp/\xe9-not-utf8.so",
                                  b"/tmp/" + "\u00e9".encode() * 200 + b".so"])
def test_non_ascii_paths_are_fixed_up_on_that_record(path):
    record = kernel_record(path, exe="/usr/bin/\u00fcber".encode())
    fixed = il.fix_text(record, 0x1)
    (event,) = parse(fixed)
    assert event.image_name == os.fsdecode(path)  # UTF-8 decoded; bytes that are not UTF-8 survive as escapes
    assert os.fsencode(event.image_name) == path and event.image == "/usr/bin/\u00fcber"
    whole = len(os.fsdecode(path).encode("utf-16-le", "surrogatepass")) // 2
    assert bool(event.flags & EventFlags.TRUNCATED) == (whole > 300)  # 405 bytes but 206 characters: not cut
    assert (event.pid, event.image_size, event.load_address, event.process_guid, event.image_inode) == (
        42, 0x5000, 0x7F0000000000, GUID, 77)


def test_a_path_the_walk_cut_keeps_its_marker_and_flag():
    path = "\u2026[truncated]/deep/lib.so".encode()
    (event,) = parse(il.fix_text(kernel_record(path, flags=1), 0x1 | 0x2))
    assert event.image_name == TRUNCATION_MARKER + "/deep/lib.so" and event.flags & EventFlags.TRUNCATED


def test_the_type_names_ask_for_image_loads():
    assert parse_event_types("image") == {ItemType.ImageLoad}
    assert ItemType.ImageLoad in parse_event_types("all") and ItemType.ProcessExec in parse_event_types("all")


def test_the_object_reserves_rodata_for_the_configuration_alone():
    require(shutil.which("bpftool") is not None, "bpftool is needed to read the object's BTF")
    dump = json.loads(subprocess.run(["bpftool", "btf", "dump", "file", str(il.OBJECT_PATH), "-j"], check=True,
                                     capture_output=True, text=True).stdout)
    types = {t["id"]: t for t in dump["types"]}
    (rodata,) = [t for t in dump["types"] if t["kind"] == "DATASEC" and t["name"] == ".rodata"]
    assert [types[v["type_id"]]["name"] for v in rodata["vars"]] == ["imageload_config"]
    (config,) = [t for t in dump["types"] if t["kind"] == "STRUCT" and t["name"] == "imageload_config"]
    assert config["size"] == il._CONFIG.size


# --- live -----------------------------------------------------------------------------------------------------

PROGRAM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/auxv.h>
#include <unistd.h>

static int adds_of(struct dl_phdr_info *info, size_t size, void *data)
{
	*(unsigned long long *)data = info->dlpi_adds;
	return 1;
}

int main(int argc, char **argv)
{
	int n = argc > 2 ? atoi(argv[2]) : 1;
	unsigned long long before = 0, after = 0;
	Dl_info info;
	void *pre = dlsym(RTLD_DEFAULT, "preload_value");

	if (pre && dladdr(pre, &info))
		printf("preload %d %s %p\n", getpid(), info.dli_fname, info.dli_fbase);
	if (dladdr((void *)main, &info))
		printf("main %d %p\n", getpid(), info.dli_fbase);
	printf("interpreter %d 0x%lx\n", getpid(), getauxval(AT_BASE));
	dl_iterate_phdr(adds_of, &before);
	for (int i = 0; i < n; i++) {
		void *h = dlopen(argv[1], RTLD_NOW);
		if (!h) {
			fprintf(stderr, "%s\n", dlerror());
			return 1;
		}
		if (i == 0 && dladdr(dlsym(h, "probe_value"), &info))
			printf("loaded %d %s %p\n", getpid(), info.dli_fname, info.dli_fbase);
		dlclose(h);
	}
	dl_iterate_phdr(adds_of, &after);
	printf("adds %d %llu\n", getpid(), after - before);
	return 0;
}
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """The test program and two libraries, built in a temp directory."""
    require(shutil.which("cc") is not None, "a C compiler is needed to build the test program")
    where = tmp_path_factory.mktemp("imageload")
    (where / "probe.c").write_text("int probe_value(void) { return 42; }\n")
    (where / "preload.c").write_text("int preload_value(void) { return 7; }\n")
    (where / "main.c").write_text(PROGRAM)
    for lib in ("probe", "preload"):
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(where / f"lib{lib}.so"), str(where / f"{lib}.c")],
                       check=True)
    subprocess.run(["cc", "-o", str(where / "dlopener"), str(where / "main.c"), "-ldl"], check=True)
    return {"dir": where.resolve(), "main": where / "dlopener", "probe": (where / "libprobe.so").resolve(),
            "preload": (where / "libpreload.so").resolve()}


@pytest.fixture(scope="module")
def bpf_ok():
    reason = BpfSource.unavailable_reason()
    require(reason is None, f"bpf: {reason}")


def run_program(programs, n: int = 1, env: dict | None = None) -> dict[str, tuple]:
    out = subprocess.run([str(programs["main"]), str(programs["probe"]), str(n)], check=True, capture_output=True,
                         text=True, env=env, timeout=120).stdout
    lines = {}
    for line in out.splitlines():
        what, pid, *rest = line.split()
        lines[what] = (int(pid), *rest)
    return lines


def our_mmap_attachments() -> set[str]:
    """The mmap tracepoints this process has BPF programs attached to, as ``bpftool perf list`` shows them."""
    listing = subprocess.run(["bpftool", "perf", "list", "-j"], capture_output=True, text=True, check=True).stdout
    return {a.get("tracepoint") for a in json.loads(listing or "[]")
            if a.get("pid") == os.getpid() and "mmap" in str(a.get("tracepoint"))}


def image_span(path: Path) -> int:
    """What ld.so reserves for an ELF64 library: from its first PT_LOAD's page to its last one's end."""
    data = path.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads = []
    for i in range(phnum):
        p_type, _, _, p_vaddr, _, _, p_memsz, p_align = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            loads.append((p_vaddr & ~(max(p_align, 4096) - 1), p_vaddr + p_memsz))
    return loads[-1][1] - loads[0][0]


@pytest.mark.root
def test_live_dlopen_and_ld_preload_give_one_image_load_each_at_dladdrs_base(bpf_ok, programs):
    require(shutil.which("bpftool") is not None, "bpftool is needed to see what is attached")
    with etwmon.Monitor(source="bpf", max_items=200_000, image_loads=True) as mon:
        assert our_mmap_attachments() == {"sys_enter_mmap", "sys_exit_mmap"}
        env = dict(os.environ, LD_PRELOAD=str(programs["preload"]))
        lines = run_program(programs, env=env)
        pid = lines["loaded"][0]

        def mine(event) -> bool:
            return getattr(event, "pid", None) == pid

        events = read_until(mon, lambda evs: sum(e.type == ItemType.ProcessExit for e in evs) >= 1, keep=mine)
        events += read_until(mon, None, timeout=2, keep=mine)  # a load read in the pass after its exit (own ring)
        stats = mon.stats
    loads = [e for e in events if e.type == ItemType.ImageLoad]
    probe = [e for e in loads if e.image_name == str(programs["probe"])]
    preload = [e for e in loads if e.image_name == str(programs["preload"])]
    assert len(probe) == 1 and len(preload) == 1, [e.image_name for e in loads]
    assert probe[0].load_address == int(lines["loaded"][2], 16)  # dladdr's dli_fbase
    assert preload[0].load_address == int(lines["preload"][2], 16)
    st = programs["probe"].stat()
    assert (probe[0].image_device, probe[0].image_inode) == (st.st_dev, st.st_ino)
    assert probe[0].image_size == image_span(programs["probe"])  # the span ld.so reserved
    assert probe[0].image == str(programs["main"].resolve())
    libc = [e for e in loads if "/libc.so" in e.image_name]
    assert len(libc) == 1  # ld.so's loads too, one record per image
    # What exec mapped itself (no mmap syscall): the program and its interpreter, at their bases.
    main = [e for e in loads if e.image_name == str(programs["main"].resolve())]
    assert [e.load_address for e in main] == [int(lines["main"][1], 16)]
    interpreter = [e for e in loads if e.load_address == int(lines["interpreter"][1], 16)]
    assert len(interpreter) == 1 and "ld-linux" in interpreter[0].image_name, [e.image_name for e in loads]
    assert len(loads) == len({e.image_name for e in loads})
    # The kernel's ProcessGuid is the one the identity stage gives the process's other records.
    guids = {e.process_guid for e in events}
    assert len(guids) == 1 and None not in guids, guids
    assert stats.source_stats["image_loads"] >= 3 and "image_loads_lost_ring" in stats.source_stats


@pytest.mark.root
def test_live_without_image_loads_nothing_watches_mmap(bpf_ok, programs):
    require(shutil.which("bpftool") is not None, "bpftool is needed to see what is attached")
    with etwmon.Monitor(source="bpf", max_items=200_000) as mon:
        assert our_mmap_attachments() == set()
        names = {json.loads(subprocess.run(["bpftool", "prog", "show", "id", str(i), "-j"], capture_output=True,
                                           text=True, check=True).stdout)["name"] for i in bpf_fds()["prog"]}
        # the source's (its exit program the variant this kernel takes), and no imageload_*
        assert names == {"etwmon_fork", "etwmon_exec", mon.source.exit_program}, names
        pid = run_program(programs)["loaded"][0]
        events = read_until(mon, lambda evs: any(e.type == ItemType.ProcessExit for e in evs),
                            keep=lambda e: getattr(e, "pid", None) == pid)
    assert events and not [e for e in events if e.type == ItemType.ImageLoad]
    assert "image_loads" not in mon.stats.source_stats


@pytest.mark.root
def test_live_a_dlopen_storm_is_counted_or_reported_lost(bpf_ok, programs):
    with etwmon.Monitor(source="bpf", max_items=500_000, image_loads=True) as mon:
        lines = run_program(programs, n=3000)
        pid, adds = lines["adds"][0], int(lines["adds"][1])
        keep = (lambda e: getattr(e, "pid", None) == pid or e.type == ItemType.RecordsLost)
        events = read_until(mon, lambda evs: any(e.type == ItemType.ProcessExit for e in evs), keep=keep, timeout=60)
        events += read_until(mon, None, timeout=2, keep=keep)  # loads read in the pass after the exit (own ring)
        stats = mon.stats
    got = sum(1 for e in events if e.type == ItemType.ImageLoad and e.image_name == str(programs["probe"]))
    lost = stats.source_stats["image_loads_lost"]
    assert adds >= 3000  # the program's own count: every dlopen after a dlclose maps the library again
    assert got <= adds and got + lost >= adds, (got, lost, adds)
    assert stats.dropped == 0
    after = mon.stats.source_stats  # closed: the counts stay
    assert after["image_loads"] >= stats.source_stats["image_loads"] >= got
    assert after["image_loads_lost"] == sum(after[f"image_loads_lost_{c}"] for c in il.LOST_CAUSES) >= lost


@pytest.mark.root
def test_live_a_ring_too_small_counts_every_load_it_had_no_room_for(bpf_ok, programs):
    reader = il.ImageLoadReader(ring_size=4096)
    reader.open()
    sink = ListSink()
    try:
        lines = run_program(programs, n=500)
        pid, adds = lines["adds"][0], int(lines["adds"][1])
        while reader.drain(sink):
            pass
        stats = reader.stats()
    finally:
        reader.close()
    got = sum(1 for e in sink.events() if e.pid == pid and e.image_name == str(programs["probe"]))
    assert stats["image_loads_lost_ring"] > 0 and sink.lost_total == stats["image_loads_lost"]
    assert got < adds and got + sink.lost_total >= adds, (got, sink.lost_total, adds)


@pytest.mark.root
def test_live_a_non_ascii_library_path_arrives_decoded(bpf_ok, programs, tmp_path):
    odd = tmp_path / "caf\u00e9-\u6f22"
    odd.mkdir()
    lib = odd / "libprobe.so"
    shutil.copy(programs["probe"], lib)
    with etwmon.Monitor(source="bpf", max_items=200_000, image_loads=True) as mon:
        out = subprocess.run([str(programs["main"]), str(lib), "1"], check=True, capture_output=True, text=True)
        pid = int(out.stdout.split()[1])
        events = read_until(mon, lambda evs: any(e.type == ItemType.ImageLoad and "caf" in e.image_name
                                                 for e in evs), keep=lambda e: getattr(e, "pid", None) == pid)
        stats = mon.stats
    assert [e.image_name for e in events if e.type == ItemType.ImageLoad and "caf" in e.image_name] == [
        str(lib.resolve())]
    assert stats.source_stats["image_loads_non_ascii"] >= 1


def test_text_and_json_show_the_process_and_the_file():
    from etwmon.formats import event_to_ecs, event_to_json, format_batch, format_event

    (event,) = parse(kernel_record(b"/tmp/\x1b]0;x\x07/lib.so"))
    line = format_event(event)
    assert "process=/usr/bin/prog" in line and "\x1b" not in line  # a path is attacker-chosen text
    obj = event_to_json(event)
    assert (obj["process_guid"], obj["image"], obj["image_device"], obj["image_inode"]) == (
        GUID, "/usr/bin/prog", 0xFE00, 77)
    assert '"image_device":65024,' in format_batch(kernel_record(b"/lib/x.so"), "json")[0]  # the batch path too
    doc = event_to_ecs(event)
    assert (doc["process"]["executable"], doc["process"]["entity_id"], doc["dll"]["name"]) == (
        "/usr/bin/prog", GUID, "lib.so")
    assert (doc["etwmon"]["image_device"], doc["etwmon"]["image_inode"]) == (0xFE00, 77)


def test_sysmon_image_load_rules_judge_image_loads_on_their_own():
    pytest.importorskip("defusedxml")
    from etwmon.records import encode_process_exit
    from etwmon.rules import RulesStage, RuleSet

    rules = RuleSet.from_xml("""<Sysmon schemaversion="4.90"><EventFiltering>
      <RuleGroup groupRelation="or"><ImageLoad onmatch="include">
        <ImageLoaded condition="begin with">/tmp/</ImageLoaded>
        <ImageLoaded condition="begin with">/dev/shm/</ImageLoaded>
      </ImageLoad></RuleGroup>
      <RuleGroup groupRelation="or"><ImageLoad onmatch="exclude">
        <Image condition="end with">/trusted</Image>
      </ImageLoad></RuleGroup>
      <RuleGroup groupRelation="or"><ProcessTerminate onmatch="exclude">
        <Image condition="is">/nothing</Image>
      </ProcessTerminate></RuleGroup>
    </EventFiltering></Sysmon>""")
    assert not rules.ignored
    sink = ListSink()
    stage = RulesStage(sink, rules)
    stage.push(kernel_record(b"/usr/lib/x86_64-linux-gnu/libc.so.6"))  # not included
    stage.push(kernel_record(b"/tmp/evil.so"))  # included
    stage.push(kernel_record(b"/dev/shm/x.so", exe=b"/opt/trusted"))  # excluded: exclude wins
    stage.push(encode_process_exit(1, 42, 0))  # the process was not excluded by its image loads
    assert [getattr(e, "image_name", None) for e in sink.events()] == ["/tmp/evil.so", None]
    stats = stage.stats()
    assert stats["kept"] == 2 and stats["excluded"] == 1 and stats["not_included"] == 1


@pytest.mark.root
def test_live_tail_type_image_shows_the_load_and_another_source_is_refused(bpf_ok, programs):
    from .helpers import Watch, clean_env, etwmon_argv, run

    with Watch(etwmon_argv("tail", "--type", "image", "--json", "--source", "bpf"), env=clean_env()) as w:
        assert w.ready() == "bpf"
        pid = run_program(programs)["loaded"][0]
        w.wait_out(lambda line: str(programs["probe"]).encode() in line, what="the library's ImageLoad")
        assert w.stop() == 0
    loads = [o for o in w.json_lines() if o["type"] == "ImageLoad" and o["pid"] == pid]
    assert {o["image_name"] for o in loads} >= {str(programs["probe"]), str(programs["main"].resolve())}
    assert all(o["process_guid"] and o["image"] == str(programs["main"].resolve()) for o in loads)
    refused = run(etwmon_argv("tail", "--type", "all", "--source", "procfs"), env=clean_env())
    assert refused.returncode == 2 and b"image loads come from the bpf source only" in refused.stderr


def test_image_load_rules_read_the_record_where_it_lies_as_from_the_event():
    pytest.importorskip("defusedxml")
    from etwmon.records import encode_image_load
    from etwmon.rules import RuleSet

    long_path = b"/opt/" + b"d" * 390 + b"/libx.so"
    filters = ['<ImageLoaded condition="begin with" name="tmp">/tmp/</ImageLoaded>',
               '<ImageLoaded condition="end with" name="cut">/libx.so</ImageLoaded>',  # only the whole path ends so
               '<Image condition="end with" name="exe">/trusted</Image>',
               '<ImageInode condition="is" name="ino">4242</ImageInode>',
               '<ImageDevice condition="more than" name="dev">65100</ImageDevice>',
               f'<ProcessGuid condition="is" name="guid">{GUID}</ProcessGuid>',
               '<ProcessId condition="is" name="pid">7</ProcessId>']
    records = [kernel_record(b"/tmp/evil.so"), kernel_record(b"/usr/lib/libc.so.6", exe=b"/opt/trusted"),
               kernel_record(long_path), kernel_record(b"/lib/x.so", ino=4242, dev=0xFFFF),
               kernel_record(b"/lib/y.so", pid=7), encode_image_load(1, 9, 4096, 0x1000, "/tmp/no-block.so"),
               ImageLoad(1, 8, 4096, 0x2000, "/lib/z.so", process_guid="{00000000-0000-0000-0000-000000000001}",
                         image="/bin/x", exe_device=1, exe_inode=2).encode()]
    for one in filters + ["".join(filters)]:
        ruleset = RuleSet.from_xml('<Sysmon schemaversion="4.90"><EventFiltering><RuleGroup groupRelation="or">'
                                   f'<ImageLoad onmatch="include">{one}</ImageLoad></RuleGroup></EventFiltering>'
                                   '</Sysmon>')
        assert not ruleset.ignored
        kept = 0
        for record in records:
            (event,) = parse(record)
            verdict = ruleset.decide_record(record)
            assert verdict == ruleset.decide(event), (one, event)
            kept += verdict.keep
        assert 0 < kept < len(records), one  # each filter keeps some and not all: the fields were read
