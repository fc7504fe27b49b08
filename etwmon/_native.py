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

# Each helper by its name (drain, fields, fold_plan, ...), or None.
globals().update({name: getattr(_speedups, name, None) for name in _NAMES})

__all__ = _NAMES
