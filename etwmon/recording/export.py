"""``etwmon export``: a recording as Parquet (one row per event, typed columns named as in the JSON output, for
DuckDB and pandas), JSON lines (what ``tail --json`` prints) or a Chrome trace (the Trace Event Format that
Perfetto's UI and chrome://tracing open: a track per process, its lifetime as one slice, its execs as instants).
"""

from __future__ import annotations

import json
import os
from typing import Any, BinaryIO, Iterable, TextIO

from ..errors import Error
from ..formats import _json_text, escape_text, event_to_json, human_bytes, json_line
from ..records import Event, ImageLoad
from .output import create_output
from .processes import collect
from .reader import describe_filter, open_recording

__all__ = ["FORMATS", "export", "parquet_schema", "write_parquet", "write_jsonl", "write_chrome_trace"]

FORMATS = ("parquet", "jsonl", "chrome-trace")
_BATCH = 65_536
#: Parquet columns: the JSON output's field names; text as strings, ids and counts as integers, times as UTC
#: timestamps (microseconds), lifetime in seconds (as in JSON), flags as a list of names.
_COLUMNS = (
    ("type", "string"), ("time", "timestamp"), ("pid", "int64"), ("parent_pid", "int64"), ("tid", "int64"),
    ("creating_pid", "int64"), ("creating_tid", "int64"), ("process_guid", "string"),
    ("parent_process_guid", "string"), ("image", "string"), ("command_line", "string"),
    ("command_line_base64", "string"), ("truncated", "bool"), ("current_directory", "string"), ("uid", "int64"),
    ("user", "string"), ("parent_image", "string"), ("parent_command_line", "string"), ("parent_user", "string"),
    ("tty", "string"), ("session", "int64"), ("cgroup", "string"), ("container_id", "string"),
    ("start_time", "timestamp"), ("lifetime", "float64"), ("exit_code", "int64"), ("rule_name", "string"),
    ("flags", "list"), ("image_name", "string"), ("image_size", "int64"), ("load_address", "uint64"),
    ("count", "int64"), ("item_type", "int64"),
)


class ExportUnavailable(Error):
    """An export format needs an extra that is not installed."""


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ExportUnavailable("Parquet export needs pyarrow: pip install 'etwmon[parquet]'") from None
    return pyarrow, pyarrow.parquet


def parquet_schema():
    """The Parquet export's pyarrow schema."""
    pa, _ = _pyarrow()
    kinds = {"string": pa.string(), "int64": pa.int64(), "uint64": pa.uint64(), "bool": pa.bool_(),
             "float64": pa.float64(), "timestamp": pa.timestamp("us", tz="UTC"), "list": pa.list_(pa.string())}
    return pa.schema([(name, kinds[kind]) for name, kind in _COLUMNS])


def _row(event: Event) -> dict[str, Any]:
    row = event_to_json(event)
    row["time"] = event.time
    start = getattr(event, "start_time", None)
    if "start_time" in row:
        row["start_time"] = start
    if isinstance(event, ImageLoad):
        row["load_address"] = event.load_address
    return row


def write_parquet(events: Iterable[Event], stream: BinaryIO, metadata: dict[str, str] | None = None) -> int:
    """The events as a Parquet file on ``stream``; the row count."""
    pa, pq = _pyarrow()
    schema = parquet_schema()
    if metadata:
        schema = schema.with_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    rows: list[dict[str, Any]] = []
    total = 0
    with pq.ParquetWriter(stream, schema, compression="zstd") as writer:
        for event in events:
            rows.append(_row(event))
            if len(rows) >= _BATCH:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                total += len(rows)
                rows = []
        if rows or not total:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            total += len(rows)
    return total


def write_jsonl(events: Iterable[Event], stream: BinaryIO) -> int:
    """The events as JSON lines (``tail --json``'s form); the line count."""
    count = 0
    lines: list[str] = []
    for event in events:
        lines.append(json_line(event))
        count += 1
        if len(lines) >= 4096:
            stream.write(("\n".join(lines) + "\n").encode("ascii"))
            lines = []
    if lines:
        stream.write(("\n".join(lines) + "\n").encode("ascii"))
    return count


def _text(value: str | None) -> str | None:
    return None if value is None else _json_text(value)[0]


def chrome_trace(events: Iterable[Event], header: dict[str, Any]) -> dict[str, Any]:
    """The Trace Event Format (JSON object form) of the events: one track (trace pid) per process life, named
    ``image (pid)``; its lifetime as a complete ("X") slice, each exec an instant, each loss a global instant.
    Times are microseconds from the first event."""
    found = collect(events)
    t0 = found.first or 0
    end = found.last or t0

    def us(filetime: int) -> float:
        return (filetime - t0) / 10

    out: list[dict[str, Any]] = []
    for p in found.processes:
        track = p.index + 1  # a track per life: a reused pid gets its own
        name = os.path.basename(p.image) if p.image else (p.command_line.split(" ", 1)[0] or "?")
        out.append({"ph": "M", "name": "process_name", "pid": track, "tid": p.pid,
                    "args": {"name": f"{_text(name)} ({p.pid})"}})
        out.append({"ph": "M", "name": "process_sort_index", "pid": track, "tid": p.pid,
                    "args": {"sort_index": p.index}})
        out.append({"ph": "M", "name": "thread_name", "pid": track, "tid": p.pid, "args": {"name": str(p.pid)}})
        start = p.start if p.start is not None else t0
        stop = p.end if p.end is not None else end
        args = {"pid": p.pid, "parent_pid": p.parent_pid, "command_line": _text(p.command_line),
                "image": _text(p.image), "user": _text(p.user), "current_directory": _text(p.current_directory),
                "exit_code": p.exit_code, "process_guid": p.guid, "parent_process_guid": p.parent_guid,
                "started_before_recording": p.start is None, "running_at_end": p.end is None}
        out.append({"ph": "X", "name": _text(name), "cat": "process", "pid": track, "tid": p.pid,
                    "ts": us(start), "dur": max(0.0, us(stop) - us(start)), "args": args})
        for when, command_line in p.execs:
            out.append({"ph": "i", "s": "t", "name": "exec", "cat": "exec", "pid": track, "tid": p.pid,
                        "ts": us(when), "args": {"command_line": _text(command_line)}})
    for when, count in found.losses:
        out.append({"ph": "i", "s": "g", "name": f"{count} records lost", "cat": "loss", "pid": 0, "tid": 0,
                    "ts": us(when), "args": {"count": count}})
    other = {"source": header.get("source"), "host": header.get("host"), "start_time": header.get("start_time"),
             "kept": describe_filter(header.get("filter")), "etwmon_version": header.get("etwmon_version")}
    return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": other}


def write_chrome_trace(events: Iterable[Event], header: dict[str, Any], stream: BinaryIO) -> int:
    """The Chrome trace on ``stream``; the number of trace events."""
    trace = chrome_trace(events, header)
    stream.write(json.dumps(trace, ensure_ascii=True, separators=(",", ":")).encode("ascii"))
    return len(trace["traceEvents"])


def export(path: str, form: str, output: str, err: TextIO, overwrite: bool = False) -> int:
    """``etwmon export FILE --format FORM -o OUT``."""
    if form not in FORMATS:
        raise ValueError(f"unknown export format {form!r}; choose from {', '.join(FORMATS)}")
    if form == "parquet":
        _pyarrow()  # the missing extra is said before anything is written
    with open_recording(path) as reader:
        fd = create_output(output, overwrite=overwrite)
        with os.fdopen(fd, "wb") as stream:
            if form == "parquet":
                meta = {"etwmon_recording_header": json.dumps(reader.header, ensure_ascii=True)}
                count, what = write_parquet(reader.events(), stream, meta), "rows"
            elif form == "jsonl":
                count, what = write_jsonl(reader.events(), stream), "lines"
            else:
                count, what = write_chrome_trace(reader.events(), reader.header, stream), "trace events"
            size = stream.tell()
    err.write(f"etwmon: wrote {escape_text(output)}: {count} {what} ({human_bytes(size)})\n")
    err.flush()
    return 0
