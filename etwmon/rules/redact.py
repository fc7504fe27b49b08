"""Command-line redaction: ``<Redact>`` patterns, matched by RE2 (linear time on attacker-controlled text), applied
to the text fields of one encoded record (bytes in, bytes out) whatever wrote the record.

A text that was cut before it got here (it ends with TRUNCATION_MARKER: the kernel read only a prefix of argv, or
an encoder cut it to fit 64 KiB) may end inside a secret that no longer matches a fixed-length pattern. So at a
cut a *partial* match counts: everything from the first place where a match could begin and still be running at
the cut is redacted. That place is found by a second RE2 pattern, built here from the user's pattern, matching
every prefix of what the user's pattern matches (docs/rules.md, "Redaction at a cut").
"""

from __future__ import annotations

import re
import struct
import warnings
from typing import Any, Sequence

from ..errors import RecordFormatError, RuleConfigError, RulesError
from ..records import (
    TRUNCATION_MARKER, ExtensionTag, block_fields, encode_process_create, encode_process_exec, pack_field,
    with_packed,
)
from .config import Redaction

try:  # Python 3.11+
    import re._constants as _sre  # type: ignore[import-not-found]
    import re._parser as _sre_parse  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["REDACTED", "Redactors", "prefix_pattern"]

#: What a redacted part of a command line becomes.
REDACTED = "***"
_PARENT_COMMAND_LINE = int(ExtensionTag.ParentCommandLine)
_CREATE_TYPES = (1, 101)
_TIME_PIDS = struct.Struct("<qIIII")


def _re2():
    try:
        import re2
    except ImportError:
        raise RulesError("<Redact> patterns need google-re2 (linear-time matching): "
                         "pip install 'etwmon[rules]' (in a clone: pip install -e '.[rules]')") from None
    return re2


# --- the prefix closure of a pattern ----------------------------------------------------------------------------
#
# prefix(R) matches every prefix of every string R matches. Built from Python's parse of the pattern (RE2 exposes
# none) and written out in RE2 syntax, so it keeps RE2's meaning of \d, \w, \s, \b and case folding. Sizes stay
# linear: prefix(A1 A2 ... An) = prefix(A1) | A1 (prefix(A2) | A2 (...)). An assertion at the cut cannot be
# judged (the text goes on beyond it), so there it counts as true.

_CATEGORIES = {
    _sre.CATEGORY_DIGIT: r"\d", _sre.CATEGORY_NOT_DIGIT: r"\D", _sre.CATEGORY_SPACE: r"\s",
    _sre.CATEGORY_NOT_SPACE: r"\S", _sre.CATEGORY_WORD: r"\w", _sre.CATEGORY_NOT_WORD: r"\W",
}
_ASSERTIONS = {
    _sre.AT_BEGINNING: "^", _sre.AT_BEGINNING_STRING: r"\A", _sre.AT_END: "$", _sre.AT_END_STRING: r"\z",
    _sre.AT_BOUNDARY: r"\b", _sre.AT_NON_BOUNDARY: r"\B",
}
_FLAGS = ((re.IGNORECASE, "i"), (re.MULTILINE, "m"), (re.DOTALL, "s"))


class _Unsupported(Exception):
    pass


def _char(code: int) -> str:
    return "\\x{%x}" % code


def _flags(add: int, remove: int = 0) -> str:
    on = "".join(c for flag, c in _FLAGS if add & flag)
    off = "".join(c for flag, c in _FLAGS if remove & flag)
    return on + (f"-{off}" if off else "")


def _set(items) -> str:
    out = []
    negate = ""
    for op, arg in items:
        if op is _sre.NEGATE:
            negate = "^"
        elif op is _sre.LITERAL:
            out.append(_char(arg))
        elif op is _sre.RANGE:
            out.append(f"{_char(arg[0])}-{_char(arg[1])}")
        elif op is _sre.CATEGORY and arg in _CATEGORIES:
            out.append(_CATEGORIES[arg])
        else:
            raise _Unsupported(f"the character class item {op}")
    return f"[{negate}{''.join(out)}]"


def _single(op, arg) -> str | None:
    """One character's pattern, or None when ``op`` is not a single character."""
    if op is _sre.LITERAL:
        return _char(arg)
    if op is _sre.NOT_LITERAL:
        return f"[^{_char(arg)}]"
    if op is _sre.ANY:
        return "."
    if op is _sre.IN:
        return _set(arg)
    return None


def _repeat(arg, full: bool) -> str:
    low, high, sub = arg
    body = f"(?:{_full(sub)})"
    if full:
        return body + ("*" if high == _sre.MAXREPEAT and low == 0 else
                       f"{{{low},}}" if high == _sre.MAXREPEAT else f"{{{low},{high}}}")
    if high == 0:
        return ""
    head = body + ("*" if high == _sre.MAXREPEAT else f"{{0,{high - 1}}}")
    return f"{head}(?:{_prefix(sub)})"


def _item(op, arg, full: bool) -> str:
    single = _single(op, arg)
    if single is not None:
        return single if full else f"(?:{single})?"
    if op is _sre.BRANCH:
        parts = [(_full if full else _prefix)(branch) for branch in arg[1]]
        return "(?:" + "|".join(parts) + ")"
    if op is _sre.SUBPATTERN:
        _, add, remove, sub = arg
        return f"(?{_flags(add, remove)}:{(_full if full else _prefix)(sub)})"
    if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
        return _repeat(arg, full)
    if op is _sre.AT and arg in _ASSERTIONS:
        return _ASSERTIONS[arg] if full else ""
    raise _Unsupported(str(op).lower())


def _full(items) -> str:
    return "".join(_item(op, arg, True) for op, arg in items)


def _prefix(items) -> str:
    items = list(items)
    out = ""
    for op, arg in reversed(items):
        out = f"(?:{_item(op, arg, False)}|{_item(op, arg, True)}{out})"
    return out


def prefix_pattern(pattern: str) -> str:
    """An RE2 pattern matching every prefix of every string ``pattern`` matches (the empty one included).
    ValueError says what it cannot handle (then the pattern is refused: a cut could not be redacted safely)."""
    if re.search(r"(?<!\\)\{,", pattern):
        # Python reads x{,3} as x{0,3}, RE2 as the text "{,3}": ambiguous, so refused.
        raise ValueError("write a repetition as {0,n}, not {,n} (RE2 reads the latter as text)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "possible nested set": [[:alpha:]] means something else to RE2
            parsed = _sre_parse.parse(pattern)
    except (re.error, Warning) as exc:
        raise ValueError(f"etwmon reads the pattern as Python's re does too, to redact at a cut, and "
                         f"Python's re says: {exc}") from None
    try:
        body = _prefix(parsed)
    except _Unsupported as exc:
        raise ValueError(f"{exc} cannot be redacted at a cut") from None
    flags = _flags(parsed.state.flags)
    return f"(?{flags}:{body})" if flags else body


# --- applying redactions ----------------------------------------------------------------------------------------


#: Lone surrogates (a Linux command line's undecodable bytes, escaped; a Windows one's unpaired halves) are not
#: text RE2 can read: each is matched as a code point of its own at the top of plane 16 instead, one character
#: for one, so positions stay the same and an undecodable byte inside a secret is part of it like any other.
_SURROGATES = {code: 0x10F800 + code - 0xD800 for code in range(0xD800, 0xE000)}


def _matchable(text: str) -> str:
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.translate(_SURROGATES)


class _Redactor:
    """One ``<Redact>``: its RE2 pattern and the pattern of its prefixes (for cut text)."""

    def __init__(self, redaction: Redaction, source: str) -> None:
        re2 = _re2()
        where = f"{source}, line {redaction.line}"
        if not redaction.pattern:
            raise RuleConfigError(f"{where}: an empty <Redact> pattern")
        options = re2.Options()
        options.log_errors = False
        try:
            self.regex = re2.compile(redaction.pattern, options)
        except re2.error as exc:
            why = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            raise RuleConfigError(f"{where}: <Redact> {redaction.pattern!r} is not a pattern RE2 can match in "
                                  f"linear time ({why}); backreferences and lookarounds are not available") \
                from None
        try:
            self.tail = re2.compile(f"(?:{prefix_pattern(redaction.pattern)})\\z", options)
        except (ValueError, re2.error) as exc:
            raise RuleConfigError(f"{where}: <Redact> {redaction.pattern!r}: {exc}") from None
        self.redaction = redaction
        self.groups = self.regex.groups

    def spans(self, data: str) -> list[tuple[int, int]]:
        """What to redact in ``data``: the whole matches, or their groups when the pattern has any."""
        out: list[tuple[int, int]] = []
        groups = self.groups
        for match in self.regex.finditer(data):
            if not groups:
                out.append(match.span())
                continue
            pos = -1
            for group in range(1, groups + 1):
                a, b = match.span(group)
                if a < 0 or a < pos:
                    continue  # a group that did not take part, or one inside a group already redacted
                out.append((a, b))
                pos = b
        return out

    def cut_start(self, head: str) -> int:
        """Where a match that the cut at the end of ``head`` may have interrupted could begin (len(head): none)."""
        start = len(head)
        trimmed = [head]
        if head.endswith(("'", '"')):  # a quote the join of argv closed after the cut
            trimmed.append(head[:-1])
        for text in trimmed:
            match = self.tail.search(text)
            if match is not None and match.end() > match.start():
                start = min(start, match.start())
        return start


def _replace(data: str, spans: list[tuple[int, int]]) -> str:
    """``data`` with each span (overlapping ones merged, empty ones ignored) become REDACTED."""
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if b <= a:
            continue
        if merged and a < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out, pos = [], 0
    for a, b in merged:
        out.append(data[pos:a])
        out.append(REDACTED)
        pos = b
    out.append(data[pos:])
    return "".join(out)


class Redactors:
    """All ``<Redact>`` of a configuration. (No RE2 set decides first which of them can apply: a set that runs out
    of DFA memory reports no match without saying so, where a single pattern falls back to its NFA.)"""

    def __init__(self, redactions: Sequence[Redaction], source: str) -> None:
        self.redactors = tuple(_Redactor(r, source) for r in redactions)
        self.redactions = tuple(redactions)

    def __bool__(self) -> bool:
        return bool(self.redactors)

    def text(self, text: str) -> tuple[str, list[Redaction]]:
        """``text`` with every redaction applied, and the redactions that changed it. A text ending with
        TRUNCATION_MARKER was cut: a match that may have run on past the cut is redacted up to it."""
        if not self.redactors:
            return text, []
        cut = text.endswith(TRUNCATION_MARKER)
        data = _matchable(text)
        end = len(text) - len(TRUNCATION_MARKER) if cut else len(text)
        head, shown = (data[:end], text[:end]) if cut else (data, text)
        applied = []
        for redactor in self.redactors:
            spans = redactor.spans(head)
            if cut:
                spans.append((redactor.cut_start(head), len(head)))
            new = _replace(head, spans)
            if new != head:
                applied.append(redactor.redaction)
                shown = _replace(shown, spans)
                head = new
        if not applied:
            return text, []
        return (shown + TRUNCATION_MARKER if cut else shown), applied

    # -- records -------------------------------------------------------------------------------------------------

    def record(self, record: Any) -> tuple[Any, list[Redaction]]:
        """An encoded ProcessCreate/ProcessExec/ProcessExit with its command line and ParentCommandLine redacted
        (the same object when nothing changed), and the redactions that changed it. Only the fields that change
        are re-encoded; a text field that is not UTF-16 raises RecordFormatError (never passed on unredacted)."""
        if type(record) is not bytes:
            record = bytes(record)
        item = record[0] | record[1] << 8
        size = record[2] | record[3] << 8
        applied: list[Redaction] = []
        command_line = None
        if item in _CREATE_TYPES:
            chars = record[32] | record[33] << 8
            if size > len(record) or 34 + 2 * chars > size:
                raise RecordFormatError("a process record whose CommandLineLength runs past its Size", 0)
            text = bytes(record[34:34 + 2 * chars]).decode("utf-16-le", "surrogatepass")
            new, applied = self.text(text)
            if applied:
                command_line = new
            base = 40 + 2 * chars
        else:
            base = 24
        parent = None
        flags, given = block_fields(record, packed=True) if size > base else (0, [])
        fields = [packed for _, packed in given]
        for position, (tag, packed) in enumerate(given):
            if tag != _PARENT_COMMAND_LINE:
                continue
            if len(packed) % 2:
                raise RecordFormatError("a ParentCommandLine of odd length is not UTF-16", 0)
            text = packed[4:].decode("utf-16-le", "surrogatepass")
            new, more = self.text(text)
            if more:
                parent = fields
                fields[position] = pack_field(_PARENT_COMMAND_LINE, new.encode("utf-16-le", "surrogatepass"))
                applied += [r for r in more if r not in applied]
        if command_line is None and parent is None:
            return record, []
        if command_line is not None:
            # The new command line in a record of its own, then the block again: a record that no longer fits
            # is cut now, after redaction, so the cut can only hide redacted text.
            time, pid, ppid, ctid, cpid = _TIME_PIDS.unpack_from(record, 8)
            encode = encode_process_create if item == 1 else encode_process_exec
            record = encode(time, pid, ppid, cpid, ctid, command_line)
        return with_packed(record, flags, fields) if fields or size > base else record, applied
