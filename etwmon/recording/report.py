"""``etwmon report``: a recording as one self-contained HTML page (page/report.{html,css,js} inlined): the process
tree (collapsible, virtualized: only the rows in view are in the DOM), a timeline bar per process, a summary and a
search box.

Everything from the recording is attacker-controlled text (a command line is whatever a program was given): it
travels as JSON in a ``<script type="application/json">`` block, escaped so no ``</script>`` or ``<!--`` can end or
change it (``<``, ``>``, ``&``, U+2028/2029 as ``\\uXXXX``), and the script puts it on the page with
``textContent`` only. Control and invisible characters are shown as escapes (``escape_text``), as in the terminal.
The Content-Security-Policy allows nothing but the page's own style and script (by hash): nothing is loaded.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections import Counter
from importlib import resources
from typing import Any, TextIO

from ..formats import escape_text, human_bytes
from ..records import filetime_to_datetime
from .output import create_output
from .processes import Processes, collect
from .reader import RecordingReader, describe_filter, open_recording

__all__ = ["render_report", "write_report", "script_json"]

#: Non-zero exits listed by name in the summary (all of them are in the tree, marked).
MAX_FAILED_LISTED = 200
TOP_IMAGES = 15
_FILETIME_PER_MS = 10_000


def script_json(value: Any) -> str:
    """``value`` as JSON that is safe inside a ``<script>`` element: ASCII only, and ``<``, ``>``, ``&`` escaped
    (so neither ``</script>`` nor ``<!--`` can appear); U+2028/2029 are escaped by ``ensure_ascii``."""
    text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _text(value: str | None) -> str | None:
    return None if value is None else escape_text(value)


def _ms(filetime: int | None, t0: int) -> float | None:
    return None if filetime is None else round((filetime - t0) / _FILETIME_PER_MS, 3)


def page_data(reader: RecordingReader, found: Processes, name: str) -> dict[str, Any]:
    """What the page shows, as JSON-able data (text already escaped for display)."""
    header, summary = reader.header, reader.summary or {}
    # The timeline spans the events (the recorder's start-up before the first of them is of no interest).
    t0 = found.first if found.first is not None else header.get("start_filetime")
    t0 = t0 if isinstance(t0, int) else 0
    end = found.last if found.last is not None else t0
    procs = [[p.parent, p.pid, p.parent_pid, _text(p.image), escape_text(p.command_line), _text(p.user),
              _text(p.current_directory), _ms(p.start, t0), _ms(p.end, t0), p.exit_code, len(p.execs), p.threads,
              p.guid] for p in found.processes]
    failed = [p.index for p in found.processes if p.failed]
    images = Counter(os.path.basename(p.image) if p.image else "?" for p in found.processes)
    meta = [["source", header.get("source")], ["host", header.get("host")], ["started", header.get("start_time")],
            ["kept", describe_filter(header.get("filter")).removeprefix("kept: ")]]
    command = (header.get("filter") or {}).get("command")
    if summary.get("exit_status") is not None and command:
        meta.append(["command's exit status", summary["exit_status"]])
    counts = [["processes", len(found.processes)], ["events", found.events],
              ["execs", sum(len(p.execs) for p in found.processes)],
              ["exits seen", sum(p.end is not None for p in found.processes)],
              ["non-zero exits", len(failed)], ["still running at the end", sum(p.end is None for p in found.processes)],
              ["records lost", found.lost], ["duration", f"{(end - t0) / 1e7:.3f} s"]]
    return {
        "file": escape_text(name),
        "meta": [[k, escape_text(str(v))] for k, v in meta if v is not None],
        "note": _text(reader.note),
        "t0": filetime_to_datetime(t0).timestamp() * 1000 if t0 else 0,
        "span": _ms(end, t0) or 0,
        "procs": procs,
        "summary": {
            "counts": counts,
            "top_images": [[escape_text(image), n] for image, n in images.most_common(TOP_IMAGES)],
            "failed": failed[:MAX_FAILED_LISTED], "failed_total": len(failed),
            "losses": [[_ms(t, t0), n] for t, n in found.losses[:MAX_FAILED_LISTED]], "lost": found.lost,
        },
    }


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("page", name).read_text(encoding="utf-8")


def _hash(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def render_report(reader: RecordingReader, name: str | None = None) -> str:
    """The page for the recording ``reader`` reads (from where it is)."""
    return _render(reader, collect(reader.events()), name)


def _render(reader: RecordingReader, found: Processes, name: str | None) -> str:
    data = page_data(reader, found, name if name is not None else os.path.basename(reader.path))
    style, script = _asset("report.css"), _asset("report.js")
    page = _asset("report.html")
    # Filled in one pass, so nothing inserted is itself searched for placeholders.
    parts = {"{style}": style, "{script}": script, "{data}": script_json(data),
             "{style_hash}": _hash(style), "{script_hash}": _hash(script)}
    out, at = [], 0
    while True:
        starts = [(page.find(key, at), key) for key in parts]
        starts = [(i, key) for i, key in starts if i >= 0]
        if not starts:
            out.append(page[at:])
            return "".join(out)
        i, key = min(starts)
        out.append(page[at:i])
        out.append(parts[key])
        at = i + len(key)


def write_report(path: str, output: str, err: TextIO, overwrite: bool = False) -> int:
    """``etwmon report FILE -o OUT.html``."""
    with open_recording(path) as reader:
        found = collect(reader.events())
        page = _render(reader, found, None).encode("utf-8")
    fd = create_output(output, overwrite=overwrite)
    with os.fdopen(fd, "wb") as f:
        f.write(page)
    err.write(f"etwmon: wrote {escape_text(output)}: {len(found.processes)} processes, {found.events} events "
              f"({human_bytes(len(page))})\n")
    err.flush()
    return 0
