"""open_source: "auto" takes the best source that works and says why it fell back; names that can't work raise."""

from __future__ import annotations

import subprocess
import sys
import types
import warnings

import pytest

import etwmon
from etwmon import sources
from etwmon.sources.base import Source

from .helpers import Watch, assert_clean_stderr, etwmon_argv, run, unprivileged


class Good(Source):
    name = "good"
    delivers = frozenset({"process_create"})
    opened = 0

    def open(self) -> None:
        type(self).opened += 1


class Polling(Source):
    name = "polling"
    lossy = True


class NoRoot(Source):
    name = "noroot"

    @classmethod
    def unavailable_reason(cls):
        return "run as root or use source='polling'"


class FailsToOpen(Source):
    name = "failsopen"

    def open(self) -> None:
        raise etwmon.SourceUnavailable("the kernel said EPERM")


@pytest.fixture
def fake_registry(monkeypatch):
    module = types.ModuleType("fake_sources")
    for cls in (Good, Polling, NoRoot, FailsToOpen):
        setattr(module, cls.__name__, cls)
    monkeypatch.setitem(sys.modules, "fake_sources", module)
    broken = types.ModuleType("broken_sources")
    broken.__getattr__ = lambda name: (_ for _ in ()).throw(RuntimeError("no such device"))
    monkeypatch.setitem(sys.modules, "broken_sources", broken)
    monkeypatch.setattr(sources, "SOURCES", {
        "good": "fake_sources:Good", "polling": "fake_sources:Polling", "noroot": "fake_sources:NoRoot",
        "failsopen": "fake_sources:FailsToOpen", "missing": "no_such_module_here:X",
        "broken": "broken_sources:X"})
    return monkeypatch


def test_auto_takes_the_first_that_works_without_warning(fake_registry):
    fake_registry.setattr(sources, "auto_order", lambda: ["good", "polling"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(sources.open_source("auto"), Good)


def test_auto_falls_back_to_polling_with_a_warning_saying_why(fake_registry):
    fake_registry.setattr(sources, "auto_order", lambda: ["noroot", "failsopen", "polling"])
    with pytest.warns(RuntimeWarning) as caught:
        source = sources.open_source()
    assert isinstance(source, Polling)
    message = str(caught[0].message)
    assert "can miss events" in message and "run as root" in message and "EPERM" in message


def test_auto_with_nothing_working_raises_every_reason(fake_registry):
    fake_registry.setattr(sources, "auto_order", lambda: ["noroot", "missing"])
    with pytest.raises(etwmon.SourceUnavailable, match="noroot: run as root.*missing: cannot load"):
        sources.open_source("auto")


def test_a_named_source_that_cannot_work_raises_the_reason(fake_registry):
    with pytest.raises(etwmon.SourceUnavailable, match="'noroot' is unavailable: run as root"):
        sources.open_source("noroot")
    with pytest.raises(etwmon.SourceUnavailable, match="EPERM"):
        sources.open_source("failsopen")


def test_unknown_name_lists_the_choices(fake_registry):
    with pytest.raises(etwmon.SourceUnavailable, match="unknown source 'nope'; choose one of auto, good"):
        sources.open_source("nope")


def test_unknown_option_is_a_type_error(fake_registry):
    with pytest.raises(TypeError, match="no option colour"):
        sources.open_source("good", colour="red")


def test_available_sources_says_why_not(fake_registry):
    infos = {i.name: i for i in sources.available_sources()}
    assert infos["good"].available and infos["good"].reason is None
    assert infos["good"].delivers == frozenset({"process_create"})
    assert not infos["noroot"].available and "run as root" in infos["noroot"].reason
    assert infos["polling"].lossy
    assert not infos["missing"].available and "cannot load" in infos["missing"].reason
    broken = infos["broken"]  # its module raises something other than ImportError at import
    assert not broken.available and "RuntimeError: no such device" in broken.reason


def test_auto_order_is_the_documented_preference():
    order = sources.auto_order()
    if sys.platform.startswith("linux"):
        assert order == ["bpf", "linux", "netlink", "procfs"]
    elif sys.platform == "win32":
        assert order == ["etw"]
    order.append("mutated")  # a copy: the picker's table is not changed through it
    assert "mutated" not in sources.auto_order()


def test_falling_back_because_only_root_can_watch_is_one_short_line_saying_the_loss_and_the_fix(fake_registry):
    class NoRootEither(NoRoot):
        name = "norooteither"

        @classmethod
        def unavailable_reason(cls):
            return "this kernel lets only root (CAP_NET_ADMIN) join the proc connector: run as root"

    fake_registry.setattr(sys.modules["fake_sources"], "NoRootEither", NoRootEither, raising=False)
    fake_registry.setitem(sources.SOURCES, "norooteither", "fake_sources:NoRootEither")
    fake_registry.setattr(sources, "auto_order", lambda: ["noroot", "norooteither", "polling"])
    with pytest.warns(RuntimeWarning) as caught:
        assert isinstance(sources.open_source(), Polling)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message == ("only root can watch the kernel here, so the polling source polls /proc: it misses "
                       "short-lived processes and exit codes; for every event, run as root or use the etwmon "
                       "service (etwmon service install)")
    assert "etwmon:" not in message and "\n" not in message


# --- what an unprivileged user of the command line sees --------------------------------------------------------


def _kernel_lets_this_process_join_the_proc_connector(argv_prefix: list[str]) -> bool:
    """Asked of the kernel, in a child with the same privileges as the command under test."""
    child = ("import socket\ns = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11)\n"
             "try:\n    s.bind((0, 1))\nexcept PermissionError:\n    print('refused')\nelse:\n    print('joined')")
    return subprocess.run([*argv_prefix, sys.executable, "-c", child], capture_output=True, text=True,
                          timeout=30).stdout.strip() == "joined"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only: the proc connector")
def test_unprivileged_tail_says_in_one_line_what_polling_loses_and_what_to_do():
    prefix = unprivileged([])
    with Watch(unprivileged(etwmon_argv("tail"))) as w:
        source = w.ready()
        status = w.stop()
    assert status == 0
    assert_clean_stderr(w.stderr)
    assert "etwmon: warning: etwmon:" not in w.stderr and "source='" not in w.stderr
    if _kernel_lets_this_process_join_the_proc_connector(prefix):
        assert source == "netlink" and "only root can watch" not in w.stderr, w.stderr
    else:
        assert source == "procfs", w.stderr
        said = [line for line in w.stderr.splitlines() if "only root can watch the kernel here" in line]
        assert said == ["etwmon: warning: only root can watch the kernel here, so the procfs source polls /proc: it "
                        "misses short-lived processes and exit codes; for every event, run as root or use the "
                        "etwmon service (etwmon service install)"], w.stderr
        assert "polls and can miss" not in w.stderr, w.stderr  # said once, not twice in other words


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_unprivileged_cleanup_names_the_fix_in_command_line_terms():
    done = run(unprivileged(etwmon_argv("cleanup")))
    err = done.stderr.decode()
    assert done.returncode == 1, err  # it could not look at what needs root to see
    assert err and all(line.startswith("etwmon: ") for line in err.splitlines()), err
    assert "source='" not in err, err
    for line in err.splitlines():  # the fix is this command as root, not another source
        assert "needs root" not in line or line.endswith(": run etwmon cleanup as root"), err
    assert_clean_stderr(err)
