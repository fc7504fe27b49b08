"""Shared test switches.

Tests marked ``root`` need root and a live Linux kernel (proc connector, audit). Elsewhere they skip with the
reason printed; with ``ETWMON_REQUIRE_ROOT=1`` (CI sets it) a missing requirement is a failure instead.
"""

from __future__ import annotations

import os
import sys

import pytest

REQUIRE_ROOT = os.environ.get("ETWMON_REQUIRE_ROOT") == "1"


def _root_problem() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    if os.geteuid() != 0:
        return "needs root (run the tests as root, as CI does)"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is None:
        return
    problem = _root_problem()
    if problem is None:
        return
    if REQUIRE_ROOT:
        pytest.fail(f"ETWMON_REQUIRE_ROOT=1 but this test {problem}", pytrace=False)
    pytest.skip(problem)


def require(condition: bool, reason: str) -> None:
    """Skip (or, under ETWMON_REQUIRE_ROOT=1, fail) when a kernel facility a test needs is missing."""
    if condition:
        return
    if REQUIRE_ROOT:
        pytest.fail(f"ETWMON_REQUIRE_ROOT=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def storm_tools(tmp_path_factory):
    """The C storm generators of tests/cn_builders.py (forkexec, threads, forks), built once per run."""
    from . import cn_builders

    tools = cn_builders.compile_storm_tools(tmp_path_factory.mktemp("storm"))
    require(tools is not None, "the storm generators need gcc (apt-get install gcc)")
    return tools
