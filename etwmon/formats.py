"""How an event looks to a person or a program: one line of text, a JSON object, a JSON line, an ECS document.

One place for it: ``etwmon tail`` renders with these, and so do the service and the fleet consumer, so an event
reads the same everywhere. Everything a process controls (command lines, image names) is escaped before it can
reach a terminal (``escape_text``); the JSON form is exact (bytes that are not UTF-8 ride along in base64).
Field names are documented in docs/cli.md and stable.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from datetime import timedelta
from typing import Any, Callable

from .containers import container_id_from_cgroup
from .events import _EXTENSION_ATTRS
from .records import (
    EXIT_CODE_UNKNOWN, TRUNCATION_MARKER, Event, EventFlags, ExeFlags, ImageLoad, ItemType, ProcessCreate,
    ProcessExec, ProcessExit, RecordsLost, ThreadCreate, ThreadExit, UnknownRecord, filetime_to_datetime,
)
from .users import user_name

__all__ = ["escape_text", "format_event", "event_to_json", "json_line", "format_batch", "event_to_ecs", "ecs_line",
           "ECS_VERSION", "host_renderer", "RENDERERS", "human_bytes", "TEXT_WORDS"]

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
#
# Each form is built by one function per record kind from plain values (numbers, text, a dict of details), so the
# per-event formatters (from an Event) and the batch formatter's text lines (``etwmon.batch_format``, from a
# batch's bytes, without an object per record) give the same bytes: they call the same builders. Its JSON lines
# are assembled from per-field pieces in the same order; tests hold both to the per-event lines.

_FILETIME_UNIX_EPOCH_US = 11_644_473_600_000_000  # 1601-01-01 to 1970-01-01 in microseconds
#: Text lines' record words, as forkstat names them: a ProcessCreate on Linux is a fork (the child runs its
#: parent's program until it execs), a ProcessExec the program starting.
TEXT_WORDS = {1: "fork", 101: "exec", 2: "exit", 3: "thread", 4: "thread-exit", 5: "image-load"}
_WIDTH = 11
_RECORDS_LOST_TEXT = "records lost here (missed by the source or dropped by a full ring)"


def _exit_code(code: int) -> int | None:
    return None if code == EXIT_CODE_UNKNOWN else code


_SECONDS: dict[int, str] = {}


def _second(second: int) -> str:
    """``YYYY-MM-DDTHH:MM:SS`` of a FILETIME's whole second (``filetime // 10**7``), remembered: a batch's
    records share a few seconds, so a line's clock is one lookup and its fraction."""
    text = _SECONDS.get(second)
    if text is None:
        if len(_SECONDS) >= 4096:
            _SECONDS.clear()
        text = _SECONDS[second] = filetime_to_datetime(second * 10_000_000).strftime("%Y-%m-%dT%H:%M:%S")
    return text


def _text_clock(filetime: int) -> str:
    """ISO-8601 UTC date and time to the millisecond, as text lines show it: ``2026-12-06T23:17:12.123Z``."""
    second, ticks = divmod(filetime, 10_000_000)
    return f"{_second(second)}.{ticks // 10_000:03d}Z"


def _iso_utc(filetime: int) -> str:
    """ISO-8601 UTC to the microsecond, as JSON shows it: ``2026-12-06T23:17:12.123456Z``."""
    second, ticks = divmod(filetime, 10_000_000)
    return f"{_second(second)}.{ticks // 10:06d}Z"


@functools.lru_cache(maxsize=4096)
def _start_time(filetime: int) -> str:
    """``_iso_utc`` of a start time: a process's fork, execs and exit all carry the same one."""
    return _iso_utc(filetime)


def _who_text(user: str | None, uid: int | None, image: str | None, container: str | None = None) -> str:
    """`` user=... image=...``: the ones known (user: the name, else the uid; a process chooses names and paths,
    so they are escaped)."""
    out = ""
    if user is None and uid is not None:
        user = user_name(uid)  # the record carries the uid only (the bpf source's creates): named here, cached
    if user is not None:
        out += f" user={escape_text(user)}"
    elif uid is not None:
        out += f" user={uid}"
    if image is not None:
        out += f" image={escape_text(image)}"
    if container is not None:
        out += f" container={escape_text(container[:12])}"
    return out


def _rule_text(name: str | None) -> str:
    """`` rule=NAME`` when rules named the event (``tail --config``)."""
    return "" if name is None else f" rule={escape_text(name)}"


def _lifetime_text(lifetime: timedelta | None) -> str:
    return "" if lifetime is None else f" lifetime={lifetime.total_seconds():.3f}s"


def _text_line(item: int, when: str, a: int, b: int, c: int, text: str | None, d: dict) -> str:
    """One text line. ``a, b, c``: the record's numbers (create/exec: pid, ppid; exit: pid, code; threads: tid,
    pid, code; lost: count; image load: pid, size, address); ``text`` the command line or image name; ``d`` the
    details (attribute → value, absent = unknown)."""
    get = d.get
    if item == 1:  # a fork: the child runs its parent's program (the image); the command line it inherited
        return (f"{when} {'fork':<{_WIDTH}} pid={a} ppid={b}"
                f"{_who_text(get('user'), get('uid'), get('image'), _container(get))}"
                f"{_rule_text(get('rule_name'))} cmd={escape_text(text)}")
    if item == 101:
        return (f"{when} {'exec':<{_WIDTH}} pid={a} ppid={b}"
                f"{_who_text(get('user'), get('uid'), get('image'), _container(get))}"
                f"{_rule_text(get('rule_name'))} cmd={escape_text(text)}")
    if item == 2:
        code = _exit_code(b)
        return (f"{when} {'exit':<{_WIDTH}} pid={a} code={'?' if code is None else code}"
                f"{_who_text(get('user'), get('uid'), get('image'))}{_lifetime_text(get('lifetime'))}"
                f"{_rule_text(get('rule_name'))}")
    if item == 4:
        code = _exit_code(c)
        return f"{when} {'thread-exit':<{_WIDTH}} tid={a} pid={b} code={'?' if code is None else code}"
    if item == 3:
        return f"{when} {'thread':<{_WIDTH}} tid={a} pid={b}"
    if item == 5:
        process = get("image")  # the process's executable (image= is the loaded file, as Windows names it)
        return (f"{when} {'image-load':<{_WIDTH}} pid={a} address=0x{c:x} size={b} "
                f"image={escape_text(text)}{'' if process is None else ' process=' + escape_text(process)}"
                f"{'' if get('hashes') is None else ' hashes=' + escape_text(get('hashes'))}")
    if item == 100:
        return f"{when} WARNING: {a} {_RECORDS_LOST_TEXT}"
    return f"{when} {'unknown':<{_WIDTH}} item_type={item} size={a}"


def _event_values(event: Event) -> tuple[int, int, int, int, str | None, dict]:
    """(item, a, b, c, text, details) of an event, as ``_text_line`` and ``_json_object`` take them."""
    item = int(event.type)
    if isinstance(event, ProcessCreate):
        item = 101 if isinstance(event, ProcessExec) else 1
        return item, event.pid, event.parent_pid, 0, event.command_line, _details_dict(event)
    if isinstance(event, ProcessExit):
        return 2, event.pid, event.exit_code, 0, None, _details_dict(event)
    if isinstance(event, ThreadExit):
        return 4, event.tid, event.pid, event.exit_code, None, _details_dict(event)
    if isinstance(event, ThreadCreate):
        return 3, event.tid, event.pid, 0, None, _details_dict(event)
    if isinstance(event, ImageLoad):
        return 5, event.pid, event.image_size, event.load_address, event.image_name, _details_dict(event)
    if isinstance(event, RecordsLost):
        return 100, event.count, 0, 0, None, {}
    if isinstance(event, UnknownRecord):
        return event.item_type, len(event.data), 0, 0, None, {}
    raise TypeError(f"not an event: {event!r}")


_DETAIL_ATTRS: dict[type, tuple[str, ...]] = {}


def _details_dict(event: Event) -> dict:
    """The event's known details (attribute → value), ``"flags"`` (int) and ``"block"`` (True: the record has an
    extension block, i.e. some detail is known or a flag is set)."""
    names = _DETAIL_ATTRS.get(type(event))
    if names is None:
        # (an image load's image_name is its own field, not a detail, even when the block holds it whole)
        names = _DETAIL_ATTRS[type(event)] = tuple(sorted(_EXTENSION_ATTRS.get(int(event.type), set())
                                                          - {"image_name"}))
    out = {}
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            out[name] = value
    flags = int(getattr(event, "flags", 0))
    out["flags"] = flags
    out["block"] = flags != 0 or len(out) > 1
    return out


def format_event(event: Event) -> str:
    """One line of ``etwmon tail`` text output: the date and time (ISO-8601, UTC), the record's word (``fork``,
    ``exec``, ``exit``, ``thread``, ``thread-exit``, ``image-load``), ``key=value`` fields, an exec's command line
    last (escaped). A RecordsLost record is a WARNING line with the count."""
    item, a, b, c, text, details = _event_values(event)
    return _text_line(item, _text_clock(event.filetime), a, b, c, text, details)


def _json_text(text: str) -> tuple[str, str | None]:
    """(valid Unicode text, None), or when ``text`` holds bytes that are not UTF-8: (the text with U+FFFD in
    their place, base64 of the exact bytes). jq turns lone-surrogate escapes into U+FFFD, so they can't carry
    the bytes."""
    if text.isascii():
        return text, None
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
                    "container_id", "pid_namespace", "namespace_pid", "mount_namespace", "image_device",
                    "image_inode", "image_flags", "hashes", "start_time", "rule_name", "flags")
_EXIT_DETAILS = ("process_guid", "image", "uid", "user", "start_time", "lifetime", "rule_name", "flags")
_THREAD_DETAILS = ("process_guid", "flags")
_IMAGE_LOAD_DETAILS = ("process_guid", "image", "image_device", "image_inode", "hashes", "flags")
_TEXT_DETAILS = frozenset({"image", "current_directory", "user", "parent_image", "parent_command_line",
                           "parent_user", "tty", "cgroup", "container_id", "rule_name", "hashes"})
_JSON_DETAILS = {1: _PROCESS_DETAILS, 101: _PROCESS_DETAILS, 2: _EXIT_DETAILS, 3: _THREAD_DETAILS,
                 4: _THREAD_DETAILS, 5: _IMAGE_LOAD_DETAILS}
_FLAG_NAMES: dict[int, list[str]] = {}


def _container(get: Callable[[str], Any]) -> str | None:
    """The container id: the record's, else the one its cgroup path names (the runtime's claim, docs/identity.md)."""
    known = get("container_id")
    return known if known is not None else container_id_from_cgroup(get("cgroup"))


def _image_flags(get: Callable[[str], Any]) -> list[str] | None:
    """ExeFlags as a list of lower-case names (``["memfd", "deleted"]``); None when unknown."""
    bits = get("exe_flags")
    if bits is None:
        return None
    names = _EXE_FLAG_NAMES.get(bits)
    if names is None:
        if len(_EXE_FLAG_NAMES) >= 256:  # (bits come from untrusted records: the memory stays bounded)
            _EXE_FLAG_NAMES.clear()
        names = _EXE_FLAG_NAMES[bits] = [f.name.lower() for f in ExeFlags if f & bits]
    return list(names)


_EXE_FLAG_NAMES: dict[int, list[str]] = {}


def _user(get: Callable[[str], Any]) -> str | None:
    """The record's User, else the name of its Uid (``Event.user``'s rule, for the batch formatter's details)."""
    user = get("user")
    if user is None:
        uid = get("uid")
        if uid is not None:
            return user_name(uid)
    return user


#: Where a process ran and which file (docs/identity.md): JSON name → its value from the details, where the name
#: is not the Event attribute's (or, as user, may be derived from another).
_WHERE: dict[str, Callable[[Callable[[str], Any]], object]] = {
    "user": _user,
    "container_id": _container, "pid_namespace": lambda get: get("pid_ns"),
    "namespace_pid": lambda get: get("ns_pid"), "mount_namespace": lambda get: get("mnt_ns"),
    "image_device": lambda get: get("exe_device"), "image_inode": lambda get: get("exe_inode"),
    "image_flags": _image_flags,
}


def _flag_names(flags: int) -> list[str]:
    names = _FLAG_NAMES.get(flags)
    if names is None:
        if len(_FLAG_NAMES) >= 256:  # (flags come from untrusted records: the memory stays bounded)
            _FLAG_NAMES.clear()
        names = _FLAG_NAMES[flags] = [f.name for f in EventFlags if f & flags]
    return list(names)


# How _put_details writes each JSON detail: a value as it is (from the attribute of that name or the one
# _RENAMED names), text a process controls (_put_text), or by a function of its own.
_PLAIN, _TEXT, _START, _LIFETIME, _FLAGS, _BY_FUNCTION = range(6)
_RENAMED = {"pid_namespace": "pid_ns", "namespace_pid": "ns_pid", "mount_namespace": "mnt_ns",
            "image_device": "exe_device", "image_inode": "exe_inode"}


def _detail_plan(names: tuple[str, ...]) -> tuple[tuple[str, int, Any], ...]:
    """(JSON name, how, attribute or function) for each of ``names``, in order."""
    plan = []
    for name in names:
        if name == "start_time":
            plan.append((name, _START, "start_filetime"))
        elif name == "lifetime":
            plan.append((name, _LIFETIME, name))
        elif name == "flags":
            plan.append((name, _FLAGS, name))
        elif name in _RENAMED:
            plan.append((name, _PLAIN, _RENAMED[name]))
        elif name in _WHERE:
            plan.append((name, _BY_FUNCTION, _WHERE[name]))
        else:
            plan.append((name, _TEXT if name in _TEXT_DETAILS else _PLAIN, name))
    return tuple(plan)


_DETAIL_PLANS = {names: _detail_plan(names) for names in set(_JSON_DETAILS.values())}


def _put_details(obj: dict, details: dict, names: tuple[str, ...]) -> None:
    """The identity fields, all of them (null = unknown) when the record has an extension block; none when it
    has not (``--no-identity``, or a writer without one), so the book's records keep their short form."""
    if not details.get("block"):
        return
    get = details.get
    for name, how, what in _DETAIL_PLANS[names]:
        if how == _PLAIN:
            obj[name] = get(what)
            continue
        if how == _TEXT:
            value = get(what)
        elif how == _START:
            start = get(what)
            obj[name] = None if start is None else _start_time(start)
            continue
        elif how == _LIFETIME:
            lifetime = get(what)
            obj[name] = None if lifetime is None else lifetime.total_seconds()
            continue
        elif how == _FLAGS:  # the quality flags by name: ["PROCFS", "UNKNOWN_PARENT"]
            obj[name] = _flag_names(details["flags"])
            continue
        else:
            value = what(get)
            if name not in _TEXT_DETAILS:
                obj[name] = value
                continue
        if value is None or value.isascii():
            obj[name] = value
        else:
            _put_text(obj, name, value)


_TYPE_NAMES = {int(t): t.name for t in ItemType}
_TRUNCATED = int(EventFlags.TRUNCATED)


def _json_object(item: int, when: str, a: int, b: int, c: int, text: str | None, d: dict, c2: int = 0,
                 data: bytes | None = None) -> dict:
    """The JSON object of one record from its values (see ``_text_line``; ``c2`` the creating tid of a
    create/exec, whose ``c`` is the creating pid; ``data`` an unknown record's bytes)."""
    obj: dict = {"type": _TYPE_NAMES.get(item, "Unknown"), "time": when}
    rule_name = d.get("rule_name")
    if rule_name is not None:  # the Sysmon rule that included it (tail --config)
        obj["rule_name"] = rule_name
    if item == 1 or item == 101:
        obj.update(pid=a, parent_pid=b, creating_pid=c, creating_tid=c2)
        _put_text(obj, "command_line", text)
        obj["truncated"] = text.endswith(TRUNCATION_MARKER) or bool(d.get("flags", 0) & _TRUNCATED)
    elif item == 2:
        obj.update(pid=a, exit_code=_exit_code(b))
    elif item == 4:
        obj.update(tid=a, pid=b, exit_code=_exit_code(c))
    elif item == 3:
        obj.update(tid=a, pid=b)
    elif item == 5:
        # A string: jq reads numbers as doubles, which cannot hold every 64-bit address.
        obj.update(pid=a, image_size=b, load_address=f"0x{c:x}")
        _put_text(obj, "image_name", text)
    elif item == 100:
        obj["count"] = a
    else:
        obj.update(type="Unknown", item_type=item, data_base64=base64.b64encode(data or b"").decode("ascii"))
    names = _JSON_DETAILS.get(item)
    if names is not None:
        _put_details(obj, d, names)
    return obj


def event_to_json(event: Event) -> dict:
    """The JSON object of one event (field names are documented in docs/cli.md and stable)."""
    item, a, b, c, text, details = _event_values(event)
    c2 = 0
    if item == 1 or item == 101:
        c, c2 = event.creating_pid, event.creating_tid  # type: ignore[attr-defined]
    return _json_object(item, _iso_utc(event.filetime), a, b, c, text, details, c2,
                        event.data if isinstance(event, UnknownRecord) else None)


# ensure_ascii: the line is pure ASCII, so no control character (not even DEL or C1) reaches a terminal.
_json_dumps = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode
try:  # etwmon[fast]: orjson encodes ~3x faster; its output is brought to exactly what json.dumps writes
    from orjson import JSONEncodeError as _OrjsonError, dumps as _orjson_dumps
except ImportError:  # pragma: no cover - the stdlib is the fallback
    _orjson_dumps = None
_NOT_ASCII = re.compile("[\x7f-\U0010ffff]")


def _ascii_escape(match: re.Match) -> str:
    c = ord(match.group())
    if c <= 0xFFFF:
        return f"\\u{c:04x}"
    c -= 0x10000
    return f"\\u{0xD800 | (c >> 10):04x}\\u{0xDC00 | (c & 0x3FF):04x}"


def _dumps(obj: dict) -> str:
    """``json.dumps(obj, ensure_ascii=True, separators=(",", ":"))``, through orjson when it is installed."""
    if _orjson_dumps is None:
        return _json_dumps(obj)
    lifetime = obj.get("lifetime")
    if lifetime is not None and lifetime < 1e-4:
        return _json_dumps(obj)  # json writes 1e-05 where orjson writes 0.00001
    try:
        out = _orjson_dumps(obj)
    except _OrjsonError:  # text it will not encode (a lone surrogate): json escapes it
        return _json_dumps(obj)
    if out.isascii() and b"\x7f" not in out:
        return out.decode("ascii")
    # orjson writes UTF-8 and a raw DEL; json.dumps escapes both (so no C1 control or bidi override reaches a
    # terminal). In JSON text, non-ASCII only occurs inside strings, so escaping every such character is exact.
    return _NOT_ASCII.sub(_ascii_escape, out.decode("utf-8"))


def json_line(event: Event) -> str:
    """The JSON object of one event as one line of ASCII text (no newline)."""
    return _dumps(event_to_json(event))


def format_batch(buffer, form: str = "text", types: frozenset[int] | None = None) -> list[str]:
    """The lines (each with its newline) of the records in ``buffer`` whose type is in ``types`` (None: all;
    a RecordsLost report is always kept): what ``format_event`` (``form`` "text") or ``json_line`` ("json")
    gives for each, built from the batch's bytes without an Event object per record (``etwmon.batch_format``).
    Raises only ``RecordFormatError`` on a malformed buffer, as ``parse`` does."""
    from .batch_format import format_batch_typed  # (it builds on this module)

    return format_batch_typed(buffer, form, types)[0]


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
    ("uid", ("user", "id")), ("user", ("user", "name")), ("cgroup", ("etwmon", "cgroup")),
    ("hashes", ("etwmon", "hashes")),
)


def _ecs_hashes(doc: dict, hashes: str | None, where: str) -> None:
    """``where``.hash.md5/sha1/sha256 (ECS's lower-case hex) from Sysmon's ``MD5=<HEX>,SHA256=<HEX>``."""
    for item in (hashes or "").split(","):
        algorithm, _, value = item.partition("=")
        if algorithm.upper() in ("MD5", "SHA1", "SHA256", "SHA512") and value:
            _put(doc, (where, "hash", algorithm.lower()), value.lower())


def _ecs_where(doc: dict, event: Event) -> None:
    """container.id, process.hash.* (ECS's lower-case hex) and etwmon.* for the namespaces and the file."""
    get = lambda name: getattr(event, name, None)  # noqa: E731
    container = _container(get)
    if container is not None:
        _put(doc, ("container", "id"), container)
    _ecs_hashes(doc, getattr(event, "hashes", None), "process")
    for name in ("pid_namespace", "namespace_pid", "mount_namespace", "image_device", "image_inode",
                 "image_flags"):
        value = _WHERE[name](get)
        if value is not None:
            _put(doc, ("etwmon", name), value)


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
        process["pid"] = event.pid  # (its executable and guid: _ECS_ENRICHMENT below)
        doc["process"] = process
        _ecs_text(doc, ("dll", "path"), event.image_name)
        doc["dll"]["name"] = re.split(r"[\\/]", doc["dll"]["path"])[-1]
        _put(doc, ("etwmon", "image_size"), event.image_size)
        _put(doc, ("etwmon", "load_address"), f"0x{event.load_address:x}")
        for name, value in (("image_device", event.exe_device), ("image_inode", event.exe_inode)):  # the dll's
            if value is not None:
                _put(doc, ("etwmon", name), value)
        _ecs_hashes(doc, event.hashes, "dll")  # the loaded file's: dll.hash.*
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
    if isinstance(event, (ProcessCreate, ProcessExit)):
        _ecs_where(doc, event)
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

