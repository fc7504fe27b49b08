"""open_source: "auto" takes the best source that works and says why it fell back; names that can't work raise."""

from __future__ import annotations

import sys
import types
import warnings

import pytest

import etwmon
from etwmon import sources
from etwmon.sources.base import Source


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
