"""How an event looks to a person or a program: one line of text, a JSON object, a JSON line, an ECS document.

One place for it: ``etwmon tail`` renders with these, and so do the service and the fleet consumer, so an event
reads the same everywhere. Everything a process controls (command lines, image names) is escaped before it can
reach a terminal (``escape_text``); the JSON form is exact (bytes that are not UTF-8 ride along in base64).
Field names are documented in docs/cli.md and stable.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Callable

from .records import (
    EXIT_CODE_UNKNOWN, Event, EventFlags, ImageLoad, ItemType, ProcessCreate, ProcessExit, RecordsLost,
    ThreadCreate, ThreadExit, UnknownRecord, filetime_to_datetime,
)

__all__ = ["escape_text", "format_event", "event_to_json", "json_line", "event_to_ecs", "ecs_line", "ECS_VERSION",
           "host_renderer", "RENDERERS", "human_bytes"]

# --- escaping: what a process controls never reaches a terminal raw ------------------------------------------

# C0 controls, DEL and C1 controls (a terminal acts on them: ESC sequences retitle, clear, move the cursor);
# Unicode format characters that reorder or hide text (bidi embeddings/overrides/isolates, zero-width
# characters, invisible operators, tag characters); line/paragraph separators; lone surrogates (bytes that were
# not UTF-8, kept by surrogateescape, or broken UTF-16). All of these are in Unicode categories Cc/Cf/Cs/Zl/Zp,
# so str.isprintable() is a correct fast path.
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u00ad\u061c\u180e\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb"
    "\ud800-\udfff\U000e0000-\U000e007f]"
)


def _escape_char(match: re.Match) -> str:
    c = ord(match.group())
    if c < 0x80:
        return f"\\x{c:02x}"
    if 0xDC80 <= c <= 0xDCFF:
        return f"\\x{c - 0xDC00:02x}"  # a byte that was not UTF-8, shown as that byte
    if c <= 0xFFFF:
        return f"\\u{c:04x}"
    return f"\\U{c:08x}"


def escape_text(text: str) -> str:
    """``text`` made safe for a terminal: control and invisible format characters become visible escapes.

    ``\\xNN`` is one byte (an ASCII control such as ESC ``\\x1b``, or a byte that was not UTF-8); ``\\uNNNN`` /
    ``\\UNNNNNNNN`` is a Unicode character (C1 controls, bidi overrides, zero-width characters, ...).
    Backslashes are left alone so Windows paths stay readable: the text form is for eyes, the JSON form is
    exact.
    """
    if text.isprintable():
        return text
    return _UNSAFE.sub(_escape_char, text)


# --- event formatting ------------------------------------------------------------------------------------------


def _exit_code(code: int) -> int | None:
    return None if code == EXIT_CODE_UNKNOWN else code


def _local_clock(filetime: int) -> str:
    return filetime_to_datetime(filetime).astimezone().strftime("%H:%M:%S.%f")[:-3]


def _iso_utc(filetime: int) -> str:
    return filetime_to_datetime(filetime).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def format_event(event: Event) -> str:
    """One line of ``etwmon tail`` text output: local time, record type, ``key=value`` fields, the command
    line last (escaped). A RecordsLost record is a WARNING line with the count."""
    when = _local_clock(event.filetime)
    if isinstance(event, ProcessCreate):  # ProcessExec too
        return (f"{when} {event.type.name:<13} pid={event.pid} ppid={event.parent_pid}{_who(event)}"
                f"{_rule_text(event)} cmd={escape_text(event.command_line)}")
    if isinstance(event, ProcessExit):
        code = _exit_code(event.exit_code)
        image = f" image={escape_text(event.image)}" if event.image is not None else ""
        return (f"{when} {'ProcessExit':<13} pid={event.pid} code={'?' if code is None else code}{image}"
                f"{_rule_text(event)}")
    if isinstance(event, ThreadExit):
        code = _exit_code(event.exit_code)
        return f"{when} {'ThreadExit':<13} tid={event.tid} pid={event.pid} code={'?' if code is None else code}"
    if isinstance(event, ThreadCreate):
        return f"{when} {'ThreadCreate':<13} tid={event.tid} pid={event.pid}"
    if isinstance(event, ImageLoad):
        process = f" process={escape_text(event.image)}" if event.image is not None else ""
        return (f"{when} {'ImageLoad':<13} pid={event.pid} address=0x{event.load_address:x} "
                f"size={event.image_size} image={escape_text(event.image_name)}{process}")
    if isinstance(event, RecordsLost):
        return f"{when} WARNING: {event.count} records lost here (ring full or source overrun)"
    if isinstance(event, UnknownRecord):
        return f"{when} {'Unknown':<13} item_type={event.item_type} size={len(event.data)}"
    return f"{when} {escape_text(repr(event))}"


def _who(event: ProcessCreate) -> str:
    """`` user=... image=...`` of a process event, the ones the identity stage knows (user: the name, else the
    uid; names and paths are escaped: a process chooses them)."""
    out = ""
    if event.user is not None:
        out += f" user={escape_text(event.user)}"
    elif event.uid is not None:
        out += f" user={event.uid}"
    if event.image is not None:
        out += f" image={escape_text(event.image)}"
    return out


def _rule_text(event: Event) -> str:
    """`` rule=NAME`` when rules named the event (``tail --config``)."""
    name = getattr(event, "rule_name", None)
    return "" if name is None else f" rule={escape_text(name)}"


def _json_text(text: str) -> tuple[str, str | None]:
    """(valid Unicode text, None), or when ``text`` holds bytes that are not UTF-8: (the text with U+FFFD in
    their place, base64 of the exact bytes). jq turns lone-surrogate escapes into U+FFFD, so they can't carry
    the bytes."""
    try:
        text.encode("utf-8")
        return text, None
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the original bytes (os.fsdecode on Linux)
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")  # broken UTF-16 from Windows: kept as WTF-8
    return raw.decode("utf-8", "replace"), base64.b64encode(raw).decode("ascii")


def _put_text(obj: dict, key: str, text: str) -> None:
    obj[key], exact = _json_text(text)
    if exact is not None:
        obj[key + "_base64"] = exact


# The identity stage's attributes in JSON, in this order; null = unknown. Text fields a process controls get a
# ``_base64`` twin when they hold bytes that are not UTF-8, like command_line; start_time is ISO-8601 UTC like
# time, lifetime seconds (a number), flags a list of EventFlags names.
_PROCESS_DETAILS = ("process_guid", "parent_process_guid", "image", "current_directory", "uid", "user",
                    "parent_image", "parent_command_line", "parent_user", "tty", "session", "cgroup",
                    "container_id", "start_time", "rule_name", "flags")
_EXIT_DETAILS = ("process_guid", "image", "start_time", "lifetime", "rule_name", "flags")
_THREAD_DETAILS = ("process_guid", "flags")
_IMAGE_LOAD_DETAILS = ("process_guid", "image", "image_device", "image_inode", "flags")
_TEXT_DETAILS = frozenset({"image", "current_directory", "user", "parent_image", "parent_command_line",
                           "parent_user", "tty", "cgroup", "container_id", "rule_name"})


def _put_details(obj: dict, event: Event, names: tuple[str, ...]) -> None:
    """The identity fields, all of them (null = unknown) when the record has an extension block; none when it
    has not (``--no-identity``, or a writer without one), so the book's records keep their short form."""
    if event.details() is None:  # type: ignore[attr-defined]
        return
    for name in names:
        if name == "start_time":
            start = event.start_filetime  # type: ignore[attr-defined]
            obj[name] = None if start is None else _iso_utc(start)
        elif name == "lifetime":
            lifetime = event.lifetime  # type: ignore[attr-defined]
            obj[name] = None if lifetime is None else lifetime.total_seconds()
        elif name == "flags":  # the quality flags by name: ["PROCFS", "UNKNOWN_PARENT"]
            flags = event.flags  # type: ignore[attr-defined]
            obj[name] = [f.name for f in EventFlags if f in flags]
        else:
            value = getattr(event, name)
            if value is not None and name in _TEXT_DETAILS:
                _put_text(obj, name, value)
            else:
                obj[name] = value


def event_to_json(event: Event) -> dict:
    """The JSON object of one event (field names are documented in docs/cli.md and stable)."""
    obj: dict = {"type": event.type.name, "time": _iso_utc(event.filetime)}
    rule_name = getattr(event, "rule_name", None)
    if rule_name is not None:  # the Sysmon rule that included it (tail --config)
        obj["rule_name"] = rule_name
    if isinstance(event, ProcessCreate):
        obj.update(pid=event.pid, parent_pid=event.parent_pid, creating_pid=event.creating_pid,
                   creating_tid=event.creating_tid)
        _put_text(obj, "command_line", event.command_line)
        obj["truncated"] = event.truncated
        _put_details(obj, event, _PROCESS_DETAILS)
    elif isinstance(event, ProcessExit):
        obj.update(pid=event.pid, exit_code=_exit_code(event.exit_code))
        _put_details(obj, event, _EXIT_DETAILS)
    elif isinstance(event, ThreadExit):
        obj.update(tid=event.tid, pid=event.pid, exit_code=_exit_code(event.exit_code))
        _put_details(obj, event, _THREAD_DETAILS)
    elif isinstance(event, ThreadCreate):
        obj.update(tid=event.tid, pid=event.pid)
        _put_details(obj, event, _THREAD_DETAILS)
    elif isinstance(event, ImageLoad):
        # A string: jq reads numbers as doubles, which cannot hold every 64-bit address.
        obj.update(pid=event.pid, image_size=event.image_size, load_address=f"0x{event.load_address:x}")
        _put_text(obj, "image_name", event.image_name)
        _put_details(obj, event, _IMAGE_LOAD_DETAILS)
    elif isinstance(event, RecordsLost):
        obj["count"] = event.count
    elif isinstance(event, UnknownRecord):
        obj.update(type="Unknown", item_type=event.item_type,
                   data_base64=base64.b64encode(event.data).decode("ascii"))
    return obj


def json_line(event: Event) -> str:
    """The JSON object of one event as one line of ASCII text (no newline)."""
    # ensure_ascii: the line is pure ASCII, so no control character (not even DEL or C1) reaches a terminal.
    return json.dumps(event_to_json(event), ensure_ascii=True, separators=(",", ":"))


# --- Elastic Common Schema ----------------------------------------------------------------------------------

#: The ECS version the ``ecs`` form follows; docs/fleet.md has the mapping (and OCSF's, on paper).
ECS_VERSION = "8.11.0"

# Record type → (event.category, event.type, event.action).
_ECS_KINDS: dict[ItemType, tuple[list[str], list[str], str]] = {
    ItemType.ProcessCreate: (["process"], ["start"], "process-create"),
    ItemType.ProcessExec: (["process"], ["start"], "process-exec"),
    ItemType.ProcessExit: (["process"], ["end"], "process-exit"),
    ItemType.ThreadCreate: (["process"], ["start"], "thread-create"),
    ItemType.ThreadExit: (["process"], ["end"], "thread-exit"),
    ItemType.ImageLoad: (["library"], ["start"], "image-load"),
    ItemType.RecordsLost: (["process"], ["info"], "records-lost"),
}
# Enrichment attributes (None = unknown, left out) → where ECS puts them.
_ECS_ENRICHMENT = (
    ("process_guid", ("process", "entity_id")), ("parent_process_guid", ("process", "parent", "entity_id")),
    ("image", ("process", "executable")), ("current_directory", ("process", "working_directory")),
    ("parent_image", ("process", "parent", "executable")),
    ("parent_command_line", ("process", "parent", "command_line")),
    ("uid", ("user", "id")), ("user", ("user", "name")), ("container_id", ("container", "id")),
)


def _put(obj: dict, path: tuple[str, ...], value: object) -> None:
    for key in path[:-1]:
        obj = obj.setdefault(key, {})
    obj[path[-1]] = value


def _ecs_text(obj: dict, path: tuple[str, ...], text: str) -> None:
    value, exact = _json_text(text)
    _put(obj, path, value)
    if exact is not None:  # the exact bytes, under etwmon's own namespace
        _put(obj, ("etwmon", "_".join(path[1:]) + "_base64"), exact)


def event_to_ecs(event: Event, host: str | None = None) -> dict:
    """The event as an Elastic Common Schema document (nested objects): ``@timestamp``, ``event.*``,
    ``process.*``, ``host.name`` (``host``, when given); what ECS has no field for goes under ``etwmon.*``."""
    category, kind, action = _ECS_KINDS.get(event.type, (["process"], ["info"], "unknown"))
    doc: dict = {"@timestamp": _iso_utc(event.filetime), "ecs": {"version": ECS_VERSION},
                 "event": {"kind": "event", "category": category, "type": kind, "action": action,
                           "module": "etwmon", "code": str(int(event.type))}}
    if host is not None:
        doc["host"] = {"name": host}
    process: dict = {}
    if isinstance(event, ProcessCreate):  # ProcessExec too
        process.update(pid=event.pid, parent={"pid": event.parent_pid})
        doc["process"] = process
        _ecs_text(doc, ("process", "command_line"), event.command_line)
        try:
            process["args"] = [a.decode("utf-8", "replace") for a in event.argv]
        except UnicodeEncodeError:  # broken UTF-16 from Windows: not shell-quoted argv anyway
            process["args"] = [doc["process"]["command_line"]]
        process["args_count"] = len(process["args"])
        _put(doc, ("etwmon", "creating_pid"), event.creating_pid)
        _put(doc, ("etwmon", "creating_tid"), event.creating_tid)
        if event.truncated:
            _put(doc, ("etwmon", "truncated"), True)
    elif isinstance(event, ProcessExit):
        process["pid"] = event.pid
        code = _exit_code(event.exit_code)
        if code is not None:
            process["exit_code"] = code
    elif isinstance(event, (ThreadCreate, ThreadExit)):
        process.update(pid=event.pid, thread={"id": event.tid})
        if isinstance(event, ThreadExit):
            code = _exit_code(event.exit_code)
            if code is not None:
                _put(doc, ("etwmon", "thread_exit_code"), code)
    elif isinstance(event, ImageLoad):
        process["pid"] = event.pid
        doc["process"] = process
        if event.image is not None:
            _ecs_text(doc, ("process", "executable"), event.image)
        if event.process_guid is not None:
            _put(doc, ("process", "entity_id"), event.process_guid)
        _ecs_text(doc, ("dll", "path"), event.image_name)
        doc["dll"]["name"] = re.split(r"[\\/]", doc["dll"]["path"])[-1]
        _put(doc, ("etwmon", "image_size"), event.image_size)
        _put(doc, ("etwmon", "load_address"), f"0x{event.load_address:x}")
    elif isinstance(event, RecordsLost):
        doc["message"] = f"{event.count} records lost here (ring full or source overrun)"
        _put(doc, ("etwmon", "records_lost"), event.count)
    elif isinstance(event, UnknownRecord):
        _put(doc, ("etwmon", "item_type"), event.item_type)
        _put(doc, ("etwmon", "data_base64"), base64.b64encode(event.data).decode("ascii"))
    if process and "process" not in doc:
        doc["process"] = process
    for attribute, path in _ECS_ENRICHMENT:
        value = getattr(event, attribute, None)
        if value is not None:
            # ECS keeps these as keywords (user.id too): text
            _ecs_text(doc, path, value if isinstance(value, str) else str(value))
    return doc


def ecs_line(event: Event, host: str | None = None) -> str:
    """``event_to_ecs`` as one line of ASCII JSON (no newline)."""
    return json.dumps(event_to_ecs(event, host), ensure_ascii=True, separators=(",", ":"))


def host_renderer(form: str, host: Callable[[], str | None]) -> Callable[[Event], str]:
    """The ``form`` renderer (a RENDERERS name) with each event's host, asked of ``host()`` per event (a fleet
    reader names the host of the batch being shown): text puts the host first, json adds ``"host"``, ecs sets
    ``host.name``."""
    if form == "text":
        return lambda event: f"{escape_text(host() or '?')} {format_event(event)}"
    if form == "json":
        def line(event: Event) -> str:
            return json.dumps({"host": host(), **event_to_json(event)}, ensure_ascii=True, separators=(",", ":"))
        return line
    if form == "ecs":
        return lambda event: ecs_line(event, host())
    raise ValueError(f"unknown output form {form!r}; choose from {', '.join(sorted(RENDERERS))}")


#: ``etwmon tail`` output forms by name: each turns one event into one line (without the newline).
RENDERERS: dict[str, Callable[[Event], str]] = {"text": format_event, "json": json_line, "ecs": ecs_line}


def human_bytes(n: float) -> str:
    """A byte count for a person: ``512 B``, ``9.8 MiB``."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
