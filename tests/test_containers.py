"""Where a process ran and which file: container ids from cgroup paths, namespaces, the executable's identity
and hashes (docs/identity.md) — as pure functions, in JSON/ECS, and live on the bpf source (root; cgroups named
as container runtimes name them, no runtime needed)."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import etwmon
from etwmon.containers import container_id_from_cgroup, event_container_id
from etwmon.formats import event_to_ecs, event_to_json
from etwmon.hashes import HashCache, HashStage, file_hashes, parse_algorithms
from etwmon.records import Details, EventFlags, ExeFlags, ExtensionTag, ItemType, ProcessExec, encode_process_exec, \
    block_fields, filetime_now, parse

from .conftest import require
from .helpers import read_until

CID = "0123456789abcdef" * 4


# --- container ids: the runtime's names ------------------------------------------------------------------------

@pytest.mark.parametrize("path, expected", [
    (f"/system.slice/docker-{CID}.scope", CID),
    (f"/docker/{CID}", CID),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-podabc.slice/cri-containerd-{CID}.scope", CID),
    (f"/kubepods/burstable/pod1234-5678/{CID}", CID),
    (f"/machine.slice/libpod-{CID}.scope/container", CID),
    (f"/system.slice/crio-{CID}.scope", CID),
    ("/user.slice/user-0.slice/session-3.scope", None),
    (f"/user.slice/{CID}", None),  # a bare id under no runtime's parent is not a container's
    (f"/system.slice/docker-{CID[:-1]}.scope", None),  # 63 digits
    (f"/system.slice/docker-{CID.upper()}.scope", None),  # runtimes write lower case
    ("/", None), ("", None), (None, None),
])
def test_container_id_from_the_cgroup_path(path, expected):
    assert container_id_from_cgroup(path) == expected


def test_the_deepest_container_wins_and_a_recorded_id_is_kept():
    inner = "f" * 64
    assert container_id_from_cgroup(f"/docker/{CID}/docker/{inner}") == inner
    event = ProcessExec(filetime_now(), 1, 0, 0, 0, "x", cgroup=f"/docker/{CID}", container_id="given")
    assert event_container_id(event) == "given"


def _exec(**details) -> ProcessExec:
    record = encode_process_exec(filetime_now(), 42, 1, 42, 42, "prog arg", details=Details(**details))
    (event,) = parse(record)
    return event


def test_json_and_ecs_carry_where_and_which_file():
    event = _exec(cgroup=f"/system.slice/docker-{CID}.scope", pid_ns=4026532001, ns_pid=1, mnt_ns=4026532000,
                  exe_device=2049, exe_inode=1234, exe_flags=int(ExeFlags.MEMFD | ExeFlags.SETUID),
                  hashes="MD5=0A,SHA256=ABCD")
    obj = event_to_json(event)
    assert obj["cgroup"] == f"/system.slice/docker-{CID}.scope" and obj["container_id"] == CID
    assert (obj["pid_namespace"], obj["namespace_pid"], obj["mount_namespace"]) == (4026532001, 1, 4026532000)
    assert (obj["image_device"], obj["image_inode"], obj["image_flags"]) == (2049, 1234, ["memfd", "setuid"])
    assert obj["hashes"] == "MD5=0A,SHA256=ABCD"
    doc = event_to_ecs(event)
    assert doc["container"]["id"] == CID
    assert doc["process"]["hash"] == {"md5": "0a", "sha256": "abcd"}
    assert doc["etwmon"]["image_flags"] == ["memfd", "setuid"] and doc["etwmon"]["namespace_pid"] == 1
    unknown = event_to_json(_exec(uid=0))
    assert all(unknown[k] is None for k in ("cgroup", "container_id", "pid_namespace", "image_flags", "hashes"))
    assert "container" not in event_to_ecs(_exec(cgroup="/user.slice"))


# --- hashes: the pieces ------------------------------------------------------------------------------------------

def test_algorithm_names_are_sysmons_in_sysmons_order():
    assert parse_algorithms("sha256,md5") == (("MD5", "SHA256"), [])
    assert parse_algorithms("*")[0] == ("MD5", "SHA1", "SHA256")
    assert parse_algorithms("md5,IMPHASH", strict=False)[0] == ("MD5",)
    for bad in ("imphash", "crc32", "sha256;md5"):
        with pytest.raises(ValueError):
            parse_algorithms(bad)


def test_file_hashes_are_sysmons_form_in_upper_case_hex(tmp_path):
    path = tmp_path / "f"
    data = os.urandom(3 << 20)  # over one read chunk
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert file_hashes(fd, ("MD5", "SHA256")) == (f"MD5={hashlib.md5(data).hexdigest().upper()},"
                                                      f"SHA256={hashlib.sha256(data).hexdigest().upper()}")
        assert file_hashes(fd, ("SHA256",), size_limit=1 << 20) is None  # too big: not hashed
    finally:
        os.close(fd)


def test_the_cache_is_bounded_least_recently_used_out():
    cache = HashCache(max_entries=2)
    cache.put(("a",), "A")
    cache.put(("b",), "B")
    assert cache.get(("a",)) == (True, "A")  # a is now the most recent
    cache.put(("c",), "C")
    assert cache.get(("b",)) == (False, None) and cache.get(("a",))[0] and cache.evicted == 1


class _Collect:
    """A sink keeping what is pushed into it."""

    def __init__(self, out: list[bytes]) -> None:
        self.push = out.append

    def push_lost(self, count: int) -> None:
        pass

    def notify(self) -> None:
        pass


def _record_for(path: Path, pid: int, when: int | None = None) -> bytes:
    st = os.stat(path)
    return encode_process_exec(filetime_now() if when is None else when, pid, 1, pid, pid, "x",
                               details=Details(exe_device=st.st_dev & 0xFFFFFFFF, exe_inode=st.st_ino, exe_flags=0,
                                               image=str(path), uid=0))


def _hash_field(record: bytes) -> str | None:
    _, fields = block_fields(record)
    value = dict(fields).get(int(ExtensionTag.Hashes))
    return None if value is None else value.decode("utf-16-le")


def test_the_stage_hashes_the_file_the_record_names_and_a_rewrite_changes_the_key(tmp_path):
    stage = HashStage("sha256", wait=5.0)
    out: list[bytes] = []
    stage.attach(_Collect(out))
    try:
        prog = tmp_path / "prog"
        prog.write_bytes(b"one" * 1000)
        stage.push(_record_for(prog, pid=2 ** 22 + 7))  # no such pid: found by its path, checked by dev/ino
        with open(prog, "r+b") as f:  # rewritten in place: same inode, new size/mtime/ctime
            f.write(b"two" * 2000)
        stage.push(_record_for(prog, pid=2 ** 22 + 7))
        old = prog.stat()
        other = tmp_path / "other"
        other.write_bytes(b"x")
        os.rename(other, prog)  # another file at the path: the record's inode is not there any more
        rec = encode_process_exec(filetime_now(), 5, 1, 5, 5, "x", details=Details(
            exe_device=old.st_dev & 0xFFFFFFFF, exe_inode=old.st_ino, exe_flags=0, image=str(prog)))
        stage.push(rec)
        later = tmp_path / "later"
        later.write_bytes(b"new")
        stage.push(_record_for(later, pid=2 ** 22 + 7, when=filetime_now() - 10_000_000))  # changed after the event
    finally:
        stage.close()
    hashes = [_hash_field(r) for r in out]
    assert hashes[0] == "SHA256=" + hashlib.sha256(b"one" * 1000).hexdigest().upper()
    assert hashes[1] == "SHA256=" + hashlib.sha256(b"two" * 2000).hexdigest().upper()
    flags = [next(parse(r)).flags for r in out]
    assert hashes[2] is None and flags[2] & EventFlags.NO_HASH  # never the new file's hash
    assert hashes[3] is None and flags[3] & EventFlags.NO_HASH
    assert stage.stats()["hashed"] == 2


def test_a_slow_hash_is_marked_pending_and_does_not_hold_the_record(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(128 << 20)  # sparse: reading it still takes a while
    stage = HashStage("sha256", wait=0.0)
    out: list[bytes] = []
    stage.attach(_Collect(out))
    try:
        started = time.monotonic()
        stage.push(_record_for(big, pid=2 ** 22 + 9))
        assert time.monotonic() - started < 0.5
    finally:
        stage.close()
    (event,) = parse(out[0])
    assert event.flags & EventFlags.HASH_PENDING and event.hashes is None


# --- live: the bpf source ------------------------------------------------------------------------------------------

UNIFIED = Path("/sys/fs/cgroup/unified")


def _cgroup_root_v2() -> Path | None:
    for path in (UNIFIED, Path("/sys/fs/cgroup")):
        if (path / "cgroup.procs").exists() and (path / "cgroup.controllers").exists():
            return path
    return None


def _cgroup_root_v1() -> Path | None:
    for name in ("pids", "memory"):
        path = Path("/sys/fs/cgroup", name)
        if (path / "cgroup.procs").exists() and not (path / "cgroup.controllers").exists():
            return path
    return None


def _remove_cgroups(*paths: Path) -> None:
    for path in paths:  # innermost first; a reaped process may linger a moment
        for _ in range(50):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


@pytest.fixture(scope="module")
def live():
    from etwmon.sources.bpf import BpfSource

    require(os.geteuid() == 0, "needs root")
    reason = BpfSource.unavailable_reason()
    require(reason is None, f"bpf: {reason}")
    with etwmon.Monitor(source="bpf", max_items=200_000, hashes="sha256") as mon:
        yield mon


def _exec_of(mon, argv: list[str], marker: str, program: str, **kwargs) -> ProcessExec:
    """Run argv, which ends up exec'ing ``program`` with ``marker`` in its command line; return that exec."""
    subprocess.run(argv, timeout=30, **kwargs)

    def mine(event) -> bool:
        return (event.type == ItemType.ProcessExec and marker in event.command_line
                and event.argv[0] == program.encode())

    events = read_until(mon, lambda evs: bool(evs), keep=mine)
    assert events, (marker, mon.stats)
    return events[-1]


@pytest.mark.root
def test_live_a_docker_v2_scope_gives_its_cgroup_and_container_id(live):
    root = _cgroup_root_v2()
    require(root is not None, "no cgroup v2 hierarchy mounted")
    cid, tag = secrets.token_hex(32), secrets.token_hex(4)
    slice_ = root / f"etwmon-test-{tag}.slice"
    scope = slice_ / f"docker-{cid}.scope"
    scope.mkdir(parents=True)
    try:
        marker = f"v2-{tag}"
        exec_ = _exec_of(live, ["sh", "-c", f'echo $$ > {scope}/cgroup.procs && exec /bin/true {marker}'], marker,
                        "/bin/true")
    finally:
        _remove_cgroups(scope, slice_)
    assert exec_.cgroup == f"/etwmon-test-{tag}.slice/docker-{cid}.scope"
    assert event_to_json(exec_)["container_id"] == cid and event_to_ecs(exec_)["container"]["id"] == cid


@pytest.mark.root
def test_live_a_docker_v1_cgroup_gives_its_path_when_the_v2_one_is_the_root(live):
    v1 = _cgroup_root_v1()
    require(v1 is not None, "no pids or memory v1 hierarchy mounted")
    v2 = _cgroup_root_v2()
    cid, tag = secrets.token_hex(32), secrets.token_hex(4)
    parent = v1 / f"docker-etwmon-{tag}"  # a "docker" of our own, so a real one is never touched
    group = parent / "docker" / cid
    group.mkdir(parents=True)
    to_v2_root = f"echo $$ > {v2}/cgroup.procs && " if v2 is not None else ""  # as a v1-only runtime leaves it
    try:
        marker = f"v1-{tag}"
        exec_ = _exec_of(live, ["sh", "-c", f'{to_v2_root}echo $$ > {group}/cgroup.procs && exec /bin/true {marker}'],
                         marker, "/bin/true")
    finally:
        _remove_cgroups(group, group.parent, parent)
    assert exec_.cgroup == f"/docker-etwmon-{tag}/docker/{cid}"
    assert event_to_json(exec_)["container_id"] == cid


@pytest.mark.root
def test_live_a_new_pid_namespace_gives_a_small_namespace_pid(live):
    require(shutil.which("unshare") is not None, "no unshare")
    marker = f"pidns-{secrets.token_hex(4)}"
    exec_ = _exec_of(live, ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", f"exec /bin/true {marker}"],
                     marker, "/bin/true")
    obj = event_to_json(exec_)
    assert obj["namespace_pid"] == 1 and exec_.pid != 1
    assert obj["pid_namespace"] != os.stat("/proc/self/ns/pid").st_ino


MEMFD_EXEC = r"""
import os, sys
fd = os.memfd_create("etwmon-test", 0)
with open("/bin/true", "rb") as f:
    os.write(fd, f.read())
os.execv(f"/proc/self/fd/{fd}", ["fileless", sys.argv[1]])
"""


@pytest.mark.root
def test_live_a_program_run_from_a_memfd_is_flagged(live):
    marker = f"memfd-{secrets.token_hex(4)}"
    exec_ = _exec_of(live, [sys.executable, "-c", MEMFD_EXEC, marker], marker, "fileless")
    assert "memfd" in event_to_json(exec_)["image_flags"]
    assert exec_.exe_flags & ExeFlags.MEMFD


@pytest.mark.root
def test_live_a_bind_mount_over_a_path_shows_the_other_files_inode_and_namespace(live, tmp_path):
    require(shutil.which("unshare") is not None and os.path.exists("/usr/bin/yes"), "no unshare or /usr/bin/yes")
    fake = tmp_path / "fake"
    shutil.copy("/bin/true", fake)
    marker = f"bind-{secrets.token_hex(4)}"
    exec_ = _exec_of(live, ["unshare", "--mount", "sh", "-c",
                            f"mount --bind {fake} /usr/bin/yes && exec /usr/bin/yes {marker}"], marker,
                      "/usr/bin/yes")
    obj = event_to_json(exec_)
    assert exec_.image == "/usr/bin/yes"  # what the path says...
    assert obj["image_inode"] == fake.stat().st_ino != os.stat("/usr/bin/yes").st_ino  # ...and which file ran
    assert obj["image_device"] == fake.stat().st_dev
    assert obj["mount_namespace"] != os.stat("/proc/self/ns/mnt").st_ino


def _hashed_exec(mon, program: str, tries: int = 5) -> list[ProcessExec]:
    """Execs of ``program`` until one carries its hashes (the first may be HASH_PENDING)."""
    out = []
    for _ in range(tries):
        marker = f"hash-{secrets.token_hex(4)}"
        out.append(_exec_of(mon, [program, marker], marker, program))
        if out[-1].hashes is not None:
            break
    return out


@pytest.mark.root
def test_live_hashes_are_sha256sums_and_a_binary_replaced_in_place_gets_a_new_one(live, tmp_path):
    expected = subprocess.run(["sha256sum", "/bin/true"], capture_output=True, text=True, check=True).stdout.split()[0]
    execs = _hashed_exec(live, "/bin/true")
    assert execs[-1].hashes == f"SHA256={expected.upper()}"
    assert all(e.flags & EventFlags.HASH_PENDING for e in execs[:-1])  # marked, never wrong
    assert event_to_ecs(execs[-1])["process"]["hash"]["sha256"] == expected

    prog = tmp_path / "prog"
    shutil.copy("/bin/true", prog)
    first = _hashed_exec(live, str(prog))[-1]
    inode = prog.stat().st_ino
    with open("/bin/false", "rb") as src, open(prog, "r+b") as dst:  # in place: the same inode
        dst.write(src.read())
        dst.truncate()
    assert prog.stat().st_ino == inode
    second = _hashed_exec(live, str(prog))[-1]
    false_sum = hashlib.sha256(Path("/bin/false").read_bytes()).hexdigest().upper()
    assert first.hashes == f"SHA256={expected.upper()}" and second.hashes == f"SHA256={false_sum}"
    assert second.exe_inode == first.exe_inode == inode
    assert live.stats.hashes["hashed"] >= 2


def test_a_hashes_rule_sees_the_hash_stages_field(tmp_path):
    pytest.importorskip("defusedxml")
    from etwmon.rules import RuleSet, RulesStage

    prog = tmp_path / "prog"
    prog.write_bytes(b"known bad" * 100)
    digest = hashlib.sha256(prog.read_bytes()).hexdigest()
    rules = RuleSet.from_xml('<Sysmon schemaversion="4.90"><HashAlgorithms>sha256</HashAlgorithms><EventFiltering>'
                             '<RuleGroup groupRelation="or"><ProcessCreate onmatch="include">'
                             f'<Hashes condition="contains" name="bad">SHA256={digest}</Hashes>'
                             '</ProcessCreate></RuleGroup></EventFiltering></Sysmon>')
    out: list[bytes] = []
    stage = HashStage(rules.config.hash_algorithms, wait=5.0)
    sink = stage.attach(RulesStage(_Collect(out), rules))
    try:
        sink.push(_record_for(prog, pid=2 ** 22 + 11))
        other = tmp_path / "other"
        other.write_bytes(b"fine")
        sink.push(_record_for(other, pid=2 ** 22 + 11))
    finally:
        stage.close()
    (kept,) = [e for r in out for e in parse(r)]
    assert kept.rule_name == "bad" and kept.hashes == f"SHA256={digest.upper()}"
    monitor = etwmon.Monitor(source="procfs", rules=rules)  # <HashAlgorithms> turns hashing on
    assert monitor._hash_stage is not None and monitor._hash_stage.algorithms == ("SHA256",)
    assert etwmon.Monitor(source="procfs")._hash_stage is None  # off: no stage at all
    with pytest.raises(ValueError, match="crc32"):
        etwmon.Monitor(source="procfs", hashes="crc32")
