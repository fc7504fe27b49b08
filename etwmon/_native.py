"""The compiled helpers of etwmon/_speedups.c, or None for each where the package was built without a C compiler
(or ``ETWMON_NO_SPEEDUPS=1`` asks for the Python code they stand in for, e.g. to compare the two)."""

from __future__ import annotations

import os

try:
    from ._speedups import fields, json_batch, ring_copy, ring_push, scan, walk
except ImportError:  # pragma: no cover - exercised where the build had no compiler
    fields = json_batch = ring_copy = ring_push = scan = walk = None

if os.environ.get("ETWMON_NO_SPEEDUPS") == "1":
    fields = json_batch = ring_copy = ring_push = scan = walk = None

__all__ = ["fields", "json_batch", "ring_copy", "ring_push", "scan", "walk"]
