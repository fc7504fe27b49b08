"""``etwmon tail``'s lines for a whole batch, from the batch's bytes: what ``format_event`` and ``json_line`` give
for each record, without an Event object per record.

One walk of each extension block checks it (as ``parse`` does) and takes what the form shows. Text lines are made
by the per-event builders from the decoded values. A JSON line is assembled from pieces: each field's piece
(``"image":"/usr/bin/cc"``, with its ``_base64`` twin when the text is not UTF-8) is rendered once per distinct
value and remembered (a process's image, directory, user, guid recur in its every record and its children's), in
the order ``json_line`` writes them; the tests hold both to the same bytes, hostile command lines included.
"""

from __future__ import annotations

from datetime import timedelta
from json.encoder import encode_basestring_ascii as _quote  # json.dumps's own (ensure_ascii=True)
from typing import Any, Callable

from ._native import json_batch as _c_json_batch
from .containers import container_id_from_cgroup
from .events import (
    _C_RULES, _CMDLINE_OFFSET, _CREATE_FIELDS, _DECODE_FOR, _U32, _U32X2, _U32X3, HEADER_SIZE, _as_bytes_view,
    _block_bounds, _checked, _fields, _guid_text, _scan, _utf16, decode_table, parse,
)
from .formats import (
    _JSON_DETAILS, _RENAMED, _TYPE_NAMES, _WHERE, EXIT_CODE_UNKNOWN, TRUNCATION_MARKER, _flag_names, _image_flags,
    _iso_utc, _json_text, _second, _start_time, _text_clock, _text_line, format_event, json_line,
)
from .records import _TAG_FIELDS, MAX_FILETIME, EventFlags

__all__ = ["format_batch_typed"]

#: The extension fields the text form shows, per record type (the batch formatter decodes only these).
_TEXT_DECODE = {1: decode_table({"user", "uid", "image", "rule_name", "container_id", "cgroup"}),
                101: decode_table({"user", "uid", "image", "rule_name", "container_id", "cgroup"}),
                2: decode_table({"user", "uid", "image", "lifetime", "rule_name"}), 3: {}, 4: {}}
_NO_DETAILS: dict = {}
_TRUNCATED = int(EventFlags.TRUNCATED)


def format_batch_typed(buffer, form: str = "text",
                       types: frozenset[int] | None = None) -> tuple[list[str], list[int]]:
    """``etwmon.formats.format_batch``, and the record type of each line (``etwmon tail`` counts the lines that
    are events)."""
    if form not in ("text", "json"):
        raise ValueError(f"format_batch makes text or json lines, not {form!r}")
    view = _as_bytes_view(buffer)
    data = buffer if type(buffer) is bytes else view.tobytes()
    text_form = form == "text"
    if not text_form and _c_json_batch is not None:  # the same lines in C
        rows, blocks, error = _checked(data)  # headers and blocks checked (in C too)
        if error is not None:
            raise error
        return _c_json_batch(data, rows, blocks, types, _c_context(), _fallback_line(data))
    rows, blocks, error = _scan(data)  # the headers checked; each block is checked below as it is read
    out: list[str] = []
    kinds: list[int] = []

    wanted = _TEXT_DECODE if text_form else _PIECES
    append = out.append
    for (offset, item, size, ft), (start, end) in zip(rows, blocks):
        shown = types is None or item in types or item == 100
        flags = 0
        details: dict = _NO_DETAILS
        if start:
            flags, pos, stop = _block_bounds(data, start, end)
            details = _fields(data, pos, stop, offset, wanted.get(item, _NO_DETAILS) if shown else _NO_DETAILS)
        if not shown:
            continue
        kinds.append(item)
        body = offset + HEADER_SIZE
        text = None
        if item == 1 or item == 101:
            a, b, c2, c, chars = _CREATE_FIELDS.unpack_from(data, body)  # pid, ppid, creating tid, creating pid
            at = offset + _CMDLINE_OFFSET
            text = _utf16(data[at:at + 2 * chars])
        elif item == 2 or item == 3:
            a, b = _U32X2.unpack_from(data, body)
            c = c2 = 0
        elif item == 4:
            a, b, c = _U32X3.unpack_from(data, body)
            c2 = 0
        elif item == 100:
            a, b, c, c2 = _U32.unpack_from(data, body)[0], 0, 0, 0
        else:  # image loads and unknown records are rare: their Event tells
            (event,) = parse(data[offset:offset + size])
            append((format_event(event) if text_form else json_line(event)) + "\n")
            continue
        if text_form:
            append(_text_line(item, _text_clock(ft), a, b, c, text, details) + "\n")
        else:
            append(_json_line(item, ft, a, b, c, c2, text, flags, details))
    if error is not None:
        raise error
    return out, kinds


# --- JSON lines from pieces -----------------------------------------------------------------------------------


def _text_piece(key: str, text: str) -> str:
    """``"key":"text"`` as json.dumps writes it, with the ``key_base64`` twin when the text is not UTF-8."""
    value, exact = _json_text(text)
    piece = f'"{key}":{_quote(value)}'
    return piece if exact is None else f'{piece},"{key}_base64":"{exact}"'


def _piece_maker(attribute: str, kind: str) -> Callable[[bytes], Any]:
    """How a field's (checked) value bytes become its JSON piece(s)."""
    key = {"start_filetime": "start_time", "exe_flags": "image_flags"}.get(attribute, attribute)
    key = next((name for name, attr in _RENAMED.items() if attr == attribute), key)
    if attribute == "rule_name":  # its value goes early in the line, its twin in the details' order
        def rule(raw: bytes) -> tuple[str, str]:
            value, exact = _json_text(_utf16(raw))
            return f'"rule_name":{_quote(value)}', "" if exact is None else f',"rule_name_base64":"{exact}"'
        return rule
    if attribute == "cgroup":  # the path, and the container it names (shown when the block names none)
        def cgroup(raw: bytes) -> tuple[str, str]:
            path = _utf16(raw)
            container = container_id_from_cgroup(path)
            return (_text_piece(key, path),
                    '"container_id":null' if container is None else _text_piece("container_id", container))
        return cgroup
    if attribute == "uid":  # the piece, and the user's (a record without User shows the uid's name, if named)
        def uid(raw: bytes) -> tuple[str, str]:
            number = int.from_bytes(raw, "little")
            name = None if _USER_OF is None else _USER_OF({"uid": number}.get)
            return f'"uid":{number}', '"user":null' if name is None else _text_piece("user", name)
        return uid
    if kind == "text":
        return lambda raw: _text_piece(key, _utf16(raw))
    if kind == "guid":
        return lambda raw: f'"{key}":{_quote(_guid_text(raw))}'
    if attribute == "start_filetime":
        return lambda raw: f'"start_time":"{_start_time(int.from_bytes(raw, "little", signed=True))}"'
    if attribute == "exe_flags":
        def image_flags(raw: bytes) -> str:
            names = _image_flags({"exe_flags": int.from_bytes(raw, "little")}.get)
            return '"image_flags":[' + ",".join(f'"{name}"' for name in names) + "]"
        return image_flags
    if kind == "us":  # json.dumps writes a float as repr does
        return lambda raw: f'"lifetime":{timedelta(microseconds=int.from_bytes(raw, "little")).total_seconds()!r}'
    return lambda raw: f'"{key}":{int.from_bytes(raw, "little", signed=kind == "i64")}'


class _Remembered(dict):
    """A field's pieces by its value bytes: made once per distinct value (``make``), remembered for recent short
    values (bounded: at most 256 values of at most 256 bytes; a longer value is made each time). Looked up with
    its ``__getitem__``, a hit costs no Python frame."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[bytes], Any]) -> None:
        super().__init__()
        self.make = make

    def __missing__(self, raw: bytes) -> Any:
        made = self.make(raw)
        if len(raw) <= 256:
            if len(self) >= 256:
                self.clear()
            self[raw] = made
        return made


#: Per record type: tag -> (attribute, its piece(s) from the value bytes), for every tag its Event has an
#: attribute for (one the JSON form does not show still says the record has a block).
_REMEMBERED = {tag: _Remembered(_piece_maker(attribute, kind)) for tag, (attribute, kind) in _TAG_FIELDS.items()}
#: (the field walk in C looks in the remembered pieces itself, and asks for a new one only on a miss)
_PIECES = {item: {tag: (attribute, _REMEMBERED[tag].__getitem__, _REMEMBERED[tag]) for tag, (attribute, _) in
                  table.items()} for item, table in _DECODE_FOR.items() if item != 5}


#: Details shown, when the record has none, as another field's value implies (its second piece).
_IMPLIED_BY = {"user": "uid", "container_id": "cgroup"}


def _details_plan(names: tuple[str, ...]) -> tuple[tuple[str, str, str, str | None], ...]:
    """(how, attribute, its piece when unknown, the attribute that implies it) for the JSON details ``names``, in
    order. How: "piece"; "pair" (its piece is the first of two); "implied" (see _IMPLIED_BY); "flags"; "rule_name"."""
    plan = []
    for name in names:
        attribute = {"start_time": "start_filetime", "image_flags": "exe_flags"}.get(name, _RENAMED.get(name, name))
        how = ("implied" if name in _IMPLIED_BY else "pair" if name in _IMPLIED_BY.values()
               else name if name in ("rule_name", "flags") else "piece")
        plan.append((how, attribute, f'"{name}":null', _IMPLIED_BY.get(name)))
    return tuple(plan)


class _FlagPieces(dict):
    """``"flags":[...]`` by the flags' value, made once per value (bounded: flags come from untrusted records)."""

    def __missing__(self, flags: int) -> str:
        if len(self) >= 256:
            self.clear()
        piece = self[flags] = '"flags":[' + ",".join(f'"{name}"' for name in _flag_names(flags)) + "]"
        return piece


_FLAG_PIECES = _FlagPieces()
_PLANS = {item: _details_plan(names) for item, names in _JSON_DETAILS.items() if item != 5}
#: How the per-event form finds a user it is not told (from the uid, where ``formats._WHERE`` says so), or None.
_USER_OF = _WHERE.get("user")


def _json_line(item: int, ft: int, a: int, b: int, c: int, c2: int, text: str | None, flags: int,
               pieces: dict) -> str:
    """``json_line`` of a record from its numbers (as ``_json_object`` takes them), its command line, the flags
    and the pieces of its block's fields (attribute -> piece, see ``_piece_maker``)."""
    rule = pieces.get("rule_name")
    head = f'{{"type":"{_TYPE_NAMES[item]}","time":"{_iso_utc(ft)}"'
    if rule is not None:
        head += "," + rule[0]
    if item == 1 or item == 101:
        line = (f'{head},"pid":{a},"parent_pid":{b},"creating_pid":{c},"creating_tid":{c2},'
                f'{_text_piece("command_line", text)},"truncated":'  # type: ignore[arg-type]
                f'{"true" if text.endswith(TRUNCATION_MARKER) or flags & _TRUNCATED else "false"}')  # type: ignore
    elif item == 2:
        line = f'{head},"pid":{a},"exit_code":{"null" if b == EXIT_CODE_UNKNOWN else b}'
    elif item == 4:
        line = f'{head},"tid":{a},"pid":{b},"exit_code":{"null" if c == EXIT_CODE_UNKNOWN else c}'
    elif item == 3:
        line = f'{head},"tid":{a},"pid":{b}'
    else:  # RecordsLost
        return f'{head},"count":{a}}}\n'
    if not (flags or pieces):  # no block: the book's short form
        return line + "}\n"
    get = pieces.get
    parts = [line]
    for how, attribute, unknown, source in _PLANS[item]:
        if how == "piece":
            parts.append(get(attribute) or unknown)
        elif how == "flags":
            parts.append(_FLAG_PIECES[flags])
        elif how == "pair":
            pair = get(attribute)
            parts.append(unknown if pair is None else pair[0])
        elif how == "implied":
            piece = get(attribute)
            if piece is None:
                pair = get(source)
                piece = unknown if pair is None else pair[1]
            parts.append(piece)
        elif rule is None:  # rule_name unknown
            parts.append(unknown)
        elif rule[1]:  # its value went early; its twin comes here
            parts[-1] += rule[1]
    return ",".join(parts) + "}\n"


# --- the same in C (etwmon._speedups.json_batch) ----------------------------------------------------------------

#: The C side's codes for a plan's ways (_details_plan's "how").
_HOW_CODES = {"piece": 0, "pair": 1, "implied": 2, "flags": 3, "rule_name": 4}


def _fallback_line(data: bytes) -> Callable[[int, int], str]:
    def line(offset: int, size: int) -> str:  # image loads and unknown records: their Event tells
        (event,) = parse(data[offset:offset + size])
        return json_line(event) + "\n"
    return line


_C_CONTEXT: list[tuple] = []


def _c_context() -> tuple:
    """What json_batch reads the lines' pieces from (see etwmon/_json_lines.c), made once."""
    if not _C_CONTEXT:
        plans = {item: tuple((_HOW_CODES[how], attribute, unknown, source)
                             for how, attribute, unknown, source in plan) for item, plan in _PLANS.items()}
        _C_CONTEXT.append((_second, dict(_TYPE_NAMES), _PIECES, plans, _quote, _text_piece, _FLAG_PIECES,
                           TRUNCATION_MARKER, _C_RULES, MAX_FILETIME))
    return _C_CONTEXT[0]
