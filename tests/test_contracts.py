"""Each source delivers what it declares, and nothing it declares it can't.

``Source.delivers`` and ``Source.lossy`` are what ``etwmon sources`` shows and what a user picks a source by. Here
every source that can run on this machine watches the same child (it execs with a tag, lives, execs again,
starts a thread, exits 3)
and the records must match the declaration in both directions: a declared kind of record is there, an undeclared
one is not.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
import uuid

import pytest

import etwmon
from etwmon import ItemType
from etwmon.records import EXIT_CODE_UNKNOWN, EventFlags
from etwmon.sources import SOURCES, source_class
from etwmon.sources.base import CAPABILITIES, DETAIL_CAPABILITIES

from .conftest import require
from .helpers import read_until

#: What each record type shows of the capability names in ``Source.delivers``.
RECORD_CAPABILITY = {
    ItemType.ProcessCreate: "process_create",
    ItemType.ProcessExec: "process_exec",
    ItemType.ProcessExit: "process_exit",
    ItemType.ThreadCreate: "thread_create",
    ItemType.ThreadExit: "thread_exit",
    ItemType.ImageLoad: "image_load",
}

CHILD = r"""
import os, sys, threading, time
if sys.argv[1] == "first":  # live a moment, then exec under another program name: even polling sees that
    time.sleep(0.4)
    renamed = os.path.join(os.path.dirname(sys.argv[0]), "renamed-python")
    os.execv(renamed, [renamed, sys.argv[0], "second", sys.argv[2]])
t = threading.Thread(target=time.sleep, args=(0.6,))
t.start()
print(t.native_id, flush=True)
t.join()
time.sleep(0.4)
sys.exit(3)
"""


def test_every_declared_capability_is_a_known_name():
    for name in SOURCES:
        cls = source_class(name)
        assert cls.name == name
        assert cls.delivers and cls.delivers <= CAPABILITIES, (name, cls.delivers - CAPABILITIES)
        assert isinstance(cls.lossy, bool)
        # An exact loss count and being lossy contradict each other.
        assert not (cls.lossy and "exact_loss_count" in cls.delivers), name


def test_image_loads_come_from_the_bpf_source_alone():
    """The proc connector, audit and /proc have no event for a file mapped executable: only the kernel-side
    programs see it (etwmon sources shows this)."""
    assert {n for n in SOURCES if "image_load" in source_class(n).delivers} == {"etw", "bpf"}
    listing = subprocess.run([sys.executable, "-m", "etwmon", "sources"], capture_output=True, text=True).stdout
    assert ("image_load (opt-in: tail --type image, Monitor(image_loads=True)) comes from etw, bpf only: linux, "
            "audit, netlink, procfs have no event for it") in listing


def _watch_child(source: str, wanted: set[str], script) -> tuple[list, int, int, str]:
    """The records about the child (pid or thread of it) once every ``wanted`` kind of record arrived or 10 s
    passed, plus whatever came in half a second more; and the child's pid, thread id and tag."""
    tag = f"contract-{uuid.uuid4().hex[:10]}"
    # start() returns subscribed (a polling source has taken its baseline look): the child is seen from birth.
    # Image loads are opt-in (their volume): asked for where the source declares them.
    options = {"image_loads": True} if "image_load" in wanted else {}
    with etwmon.Monitor(source=source, max_items=200_000, **options) as mon:
        child = subprocess.Popen([sys.executable, str(script), "first", tag], stdout=subprocess.PIPE, text=True)
        tid = int(child.stdout.readline())
        child.wait(10)
        child.stdout.close()

        def ours(event) -> bool:
            return getattr(event, "pid", None) == child.pid

        events = read_until(mon, lambda evs: wanted <= {RECORD_CAPABILITY.get(e.type) for e in evs},
                            timeout=10, keep=ours)
        events += read_until(mon, None, timeout=0.5, keep=ours, quiet=0.5)
    return events, child.pid, tid, tag


@pytest.mark.root
@pytest.mark.parametrize("name", [n for n in SOURCES if n != "etw"])
def test_the_records_match_the_declaration(name, tmp_path):
    cls = source_class(name)
    reason = cls.unavailable_reason()
    require(reason is None, f"{name}: {reason}")
    record_kinds = {c for c in cls.delivers if c in RECORD_CAPABILITY.values()}
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    (tmp_path / "renamed-python").symlink_to(sys.executable)
    events, pid, tid, tag = _watch_child(name, record_kinds, script)
    seen = {RECORD_CAPABILITY[e.type] for e in events if e.type in RECORD_CAPABILITY}
    assert seen == record_kinds, f"{name} declares {sorted(record_kinds)} and delivered {sorted(seen)}"

    threads = {(e.type, e.tid) for e in events if e.type in (ItemType.ThreadCreate, ItemType.ThreadExit)}
    for kind in ("thread_create", "thread_exit"):
        if kind in cls.delivers:
            item = ItemType.ThreadCreate if kind == "thread_create" else ItemType.ThreadExit
            assert (item, tid) in threads, f"{name}: no {kind} for thread {tid}"

    lines = [e.command_line for e in events if e.type in (ItemType.ProcessCreate, ItemType.ProcessExec)]
    has_tag = any(tag in line for line in lines)
    assert has_tag == ("command_line" in cls.delivers), (name, lines)

    codes = {e.exit_code for e in events if e.type == ItemType.ProcessExit}
    if "process_exit" in cls.delivers:
        expected = {3} if "exit_code" in cls.delivers else {EXIT_CODE_UNKNOWN}
        assert codes == expected, f"{name}: exit codes {codes}"

    # The details (identity stage on, the default): what the source declares is on the child's last program,
    # right; what it does not declare is unknown. tty and container_id depend on where the tests run (no
    # terminal, no container), so only their absence is pinned.
    starts = [e for e in events if e.type in (ItemType.ProcessCreate, ItemType.ProcessExec)
              and "second" in e.command_line]
    assert starts, f"{name}: no event of the child's second program"
    last = starts[-1]
    expected_values = {
        "image": os.path.realpath(sys.executable), "current_directory": os.getcwd(), "uid": os.geteuid(),
        "user": pwd.getpwuid(os.geteuid()).pw_name, "session": os.getsid(0),
    }
    for detail in sorted(DETAIL_CAPABILITIES):
        value = getattr(last, detail)
        if detail not in cls.delivers:
            assert value is None, f"{name} does not declare {detail} and delivered {value!r}"
        elif detail in expected_values:
            assert value == expected_values[detail], (name, detail, value)
        elif detail not in ("tty", "container_id"):
            assert value is not None, f"{name} declares {detail} and delivered none"
    assert bool(last.flags & EventFlags.PROCFS) == ("details_from_proc" in cls.delivers), (name, last.flags)
    # One ProcessGuid on everything the source says about the child, when the source saw it start.
    guids = {e.process_guid for e in events}
    if "process_create" in cls.delivers:
        assert len(guids) == 1 and None not in guids, f"{name}: guids {guids}"
    else:
        assert len(guids - {None}) <= 1, f"{name}: guids {guids}"
    if "process_snapshot" in cls.delivers:  # its parent (this process) ran before the monitor: seeded
        assert last.parent_process_guid is not None and not last.flags & EventFlags.UNKNOWN_PARENT
