"""The compiled helpers of etwmon/_speedups.c, or None for each where the package was built without a C compiler
(or ``ETWMON_NO_SPEEDUPS=1`` asks for the Python code they stand in for, e.g. to compare the two)."""

from __future__ import annotations

import os

_NAMES = ["drain", "fields", "fold_plan", "json_batch", "reader_wait_method", "ring_copy", "ring_push",
          "ring_push_checked_method", "ring_readinto_method", "scan", "stage_push_checked_method", "walk"]

try:
    from . import _speedups
except ImportError:  # pragma: no cover - exercised where the build had no compiler
    _speedups = None  # type: ignore[assignment]

if os.environ.get("ETWMON_NO_SPEEDUPS") == "1":
    _speedups = None  # type: ignore[assignment]

drain = getattr(_speedups, "drain", None)
fields = getattr(_speedups, "fields", None)
fold_plan = getattr(_speedups, "fold_plan", None)
json_batch = getattr(_speedups, "json_batch", None)
reader_wait_method = getattr(_speedups, "reader_wait_method", None)
ring_copy = getattr(_speedups, "ring_copy", None)
ring_push = getattr(_speedups, "ring_push", None)
ring_push_checked_method = getattr(_speedups, "ring_push_checked_method", None)
ring_readinto_method = getattr(_speedups, "ring_readinto_method", None)
scan = getattr(_speedups, "scan", None)
stage_push_checked_method = getattr(_speedups, "stage_push_checked_method", None)
walk = getattr(_speedups, "walk", None)

__all__ = _NAMES
