"""Sysmon rule semantics, compiled for speed: which process events a configuration keeps, which rule names them,
and which command-line secrets it redacts.

A RuleSet is immutable once built (share it, swap it whole); the counting lives in the stage that applies it
(``etwmon.rules.stage``). Semantics and the choices made where Sysmon's documentation is silent: docs/rules.md.

Three-valued logic: a condition on a field the event's source does not know (the attribute is None) is
*unknown*, neither a match nor a miss. Rules combine with Kleene logic (OR: any true is true; AND: any false
is false); an event whose verdict stays unknown is kept — a filter never hides what it could not judge — and
counted as undecided, naming the field.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, NamedTuple, Union

from ..containers import rule_container_id
from ..records import ItemType
from .config import FIELDS, INTEGER_FIELDS, Condition, Config, Redaction, Rule, parse_config, read_config
from .fields import RecordFields
from .redact import REDACTED, Redactors

#: Rule attributes read through a function, not getattr: the container id is derived from the cgroup path.
_DERIVED = {"container_id": rule_container_id}

__all__ = ["RuleSet", "Verdict", "RuleReport", "REDACTED", "EVENT_OF_TYPE"]

log = logging.getLogger(__name__)

#: Which Sysmon event's rules judge a record type (a Linux exec is a process create, as in Sysmon for Linux).
EVENT_OF_TYPE: dict[int, str] = {
    int(ItemType.ProcessCreate): "ProcessCreate",
    int(ItemType.ProcessExec): "ProcessCreate",
    int(ItemType.ProcessExit): "ProcessTerminate",
    int(ItemType.ImageLoad): "ImageLoad",  # Sysmon's event 7
}

# A rule's conditions each get a key (rule index << _SHIFT | position): one sortable int per condition, so the
# first match in document order is a min() and its name a lookup.
_SHIFT = 16
_NO_HIT = 1 << 62


class Verdict(NamedTuple):
    """What a RuleSet says about one event: ``keep`` it or not; ``rule``/``rule_name``: the rule that decided
    (the including rule for a kept event, the excluding one for an excluded event; None when no rule did);
    ``unknown``: the Sysmon field whose absence left the verdict undecided (the event is then kept).
    (A tuple: made once per event on the hot path.)"""

    keep: bool
    rule: Rule | None = None
    rule_name: str | None = None
    unknown: str | None = None


_KEEP = Verdict(True)
_NOT_INCLUDED = Verdict(False)


@dataclass(frozen=True)
class RuleReport:
    """One line of ``etwmon rules check``: a rule and whether etwmon applies it (and if not, why)."""

    rule: Rule
    supported: bool
    reason: str | None
    description: str


# --- conditions ------------------------------------------------------------------------------------------------


def _basename(value: str) -> str:
    return value[max(value.rfind("/"), value.rfind("\\")) + 1:]


def _values_of(condition: Condition) -> list[str]:
    return [v.lower() for v in condition.value.split(";") if v]


def _predicate(condition: Condition) -> Callable[[str], bool]:
    """``condition`` as a test of a field value already lower-cased (Sysmon compares without case)."""
    kind, value = condition.condition, condition.value.lower()
    many = _values_of(condition) if kind.endswith((" any", " all")) else []
    if kind == "is":
        return value.__eq__
    if kind == "is not":
        return value.__ne__
    if kind == "is any":
        return frozenset(many).__contains__
    if kind == "contains":
        return lambda v: value in v
    if kind == "contains any":
        return lambda v: any(x in v for x in many)
    if kind == "contains all":
        return lambda v: all(x in v for x in many)
    if kind == "excludes":
        return lambda v: value not in v
    if kind == "excludes any":  # "does not contain one or more of the values"
        return lambda v: not all(x in v for x in many)
    if kind == "excludes all":  # "does not contain any of the values"
        return lambda v: not any(x in v for x in many)
    if kind == "begin with":
        return lambda v: v.startswith(value)
    if kind == "not begin with":
        return lambda v: not v.startswith(value)
    if kind == "end with":
        return lambda v: v.endswith(value)
    if kind == "not end with":
        return lambda v: not v.endswith(value)
    if kind in ("less than", "more than"):
        if condition.field in INTEGER_FIELDS:
            limit = int(value.strip())
            if kind == "less than":
                return lambda v: int(v) < limit
            return lambda v: int(v) > limit
        if kind == "less than":
            return lambda v: v < value
        return lambda v: v > value
    if kind == "image":  # a full path, or only the image name: "bash" matches /usr/bin/bash
        return lambda v: v == value or _basename(v) == value
    raise AssertionError(kind)  # config.py admits only CONDITIONS


class _FieldIndex:
    """All OR'ed conditions of one side on one field, so a config of hundreds of rules costs a few C calls per
    event: equalities, image names and ``end with /name`` by dict, all prefixes (all suffixes) by one anchored
    regex, substrings by one Aho-Corasick pass, the rest in document order with an early stop once an earlier
    match is known. Keys are compared so the first rule in document order wins. With ``multi`` (the AND-rule
    gates) it collects every match of the look-up kinds instead, with prefixes and suffixes by dict per length."""

    __slots__ = ("multi", "eq", "base", "tail", "prefix", "suffix", "starts", "ends", "contains", "other",
                 "automaton", "memo")

    def __init__(self, multi: bool = False) -> None:
        self.multi = multi  # gate mode: every number that matches (hits), not the smallest (match)
        self.eq: dict[str, int] = {}
        self.base: dict[str, int] = {}
        # "end with" a separator and one name (``/bash``, ``\\cmd.exe``): exactly the text from the last separator on
        self.tail: dict[str, int] = {}
        self.prefix: dict[int, dict[str, int]] | tuple = {}
        self.suffix: dict[int, dict[str, int]] | tuple = {}
        self.contains: list[tuple[int, str]] = []
        self.other: list[tuple[int, Callable[[str], bool]]] = []
        self.starts: tuple | None = None  # (regex of all prefixes in key order, their keys)
        self.ends: tuple | None = None  # the same for suffixes, reversed
        self.automaton = None
        # value -> its answer (``first``'s key, or ``all_hits``' numbers), for recent values of at most _MEMO_CHARS:
        # the answer depends on the value alone, and images, directories, users and parents recur.
        self.memo: dict[str, Any] = {}

    def _put(self, table: dict, value: str, key: int) -> None:
        if self.multi:
            table.setdefault(value, []).append(key)
        elif key < table.get(value, _NO_HIT):
            table[value] = key

    def add(self, condition: Condition, key: int) -> None:
        kind, value = condition.condition, condition.value.lower()
        if kind == "is":
            self._put(self.eq, value, key)
        elif kind == "is any":
            for v in _values_of(condition):
                self._put(self.eq, v, key)
        elif kind == "image":
            self._put(self.eq, value, key)
            if value == _basename(value):
                self._put(self.base, value, key)
        elif kind == "begin with":
            self._put(self.prefix.setdefault(len(value), {}), value, key)
        elif kind == "end with" and value[:1] in ("/", "\\") and _basename(value) == value[1:]:
            self._put(self.tail, value, key)
        elif kind == "end with" and value:
            self._put(self.suffix.setdefault(len(value), {}), value, key)
        elif kind == "contains":
            self.contains.append((key, value))
        elif kind == "contains any":
            self.contains.extend((key, v) for v in _values_of(condition))
        else:
            self.other.append((key, _predicate(condition)))

    def finish(self) -> None:
        if not self.multi:
            self.starts = _ordered_alternation(self.prefix)
            self.ends = _ordered_alternation(self.suffix, reverse=True)
            self.prefix, self.suffix = {}, {}
        self.prefix = tuple(sorted(self.prefix.items()))
        self.suffix = tuple(sorted(self.suffix.items()))
        self.contains.sort()
        self.other.sort(key=lambda item: item[0])
        self.automaton = _automaton(self.contains)
        if self.automaton is not None:
            self.contains = []

    def _remember(self, v: str, answer: Any) -> Any:
        if len(v) <= _MEMO_CHARS:
            memo = self.memo
            if len(memo) >= _MEMO_ITEMS:  # (values come from untrusted records: the memory stays bounded)
                memo.clear()
            memo[v] = answer
        return answer

    def first(self, v: str) -> int:
        """The smallest key of a condition ``v`` satisfies, or _NO_HIT (remembered; callers look in ``memo``
        first, a hit costs no Python frame)."""
        return self._remember(v, self.match(v, _NO_HIT))

    def all_hits(self, v: str) -> frozenset[int]:
        """Gate mode: every number whose condition ``v`` satisfies (remembered, as ``first``)."""
        found: set[int] = set()
        self.hits(v, found)
        return self._remember(v, frozenset(found))

    def hits(self, v: str, out: set[int]) -> None:
        """Gate mode: add every number whose condition ``v`` satisfies to ``out`` (look-up kinds only)."""
        found = self.eq.get(v)
        if found:
            out.update(found)
        if self.base or self.tail:
            cut = max(v.rfind("/"), v.rfind("\\"))
            found = self.base.get(v[cut + 1:])
            if found:
                out.update(found)
            found = self.tail.get(v[cut:]) if cut >= 0 else None
            if found:
                out.update(found)
        for length, table in self.prefix:
            found = table.get(v[:length])
            if found:
                out.update(found)
        for length, table in self.suffix:
            found = table.get(v[-length:])
            if found:
                out.update(found)

    def match(self, v: str, best: int) -> int:
        """The smallest key of a condition that ``v`` satisfies, if smaller than ``best``; else ``best``."""
        hit = self.eq.get(v)
        if hit is not None and hit < best:
            best = hit
        if self.base or self.tail:
            cut = max(v.rfind("/"), v.rfind("\\"))
            hit = self.base.get(v[cut + 1:])
            if hit is not None and hit < best:
                best = hit
            if cut >= 0:
                hit = self.tail.get(v[cut:])
                if hit is not None and hit < best:
                    best = hit
        if self.starts is not None:
            regex, keys = self.starts
            found = regex(v)
            if found is not None:
                hit = keys[found.group()]
                if hit < best:
                    best = hit
        if self.ends is not None:
            regex, keys = self.ends
            found = regex(v[::-1])
            if found is not None:
                hit = keys[found.group()]
                if hit < best:
                    best = hit
        automaton = self.automaton
        if automaton is not None:
            for _, hit in automaton.iter(v):
                if hit < best:
                    best = hit
        for key, sub in self.contains:
            if key >= best:
                break
            if sub in v:
                best = key
                break
        for key, test in self.other:
            if key >= best:
                break
            if test(v):
                best = key
                break
        return best


def _ordered_alternation(tables: dict[int, dict[str, int]], reverse: bool = False) -> tuple | None:
    """One anchored regex ``p1|p2|...`` over every prefix (or reversed suffix), in key order: a backtracking
    match takes the first alternative that fits, so what it matched is the earliest rule's value; one C call
    instead of a slice and a look-up per distinct length."""
    entries = sorted((key, value[::-1] if reverse else value) for table in tables.values()
                     for value, key in table.items())
    if not entries:
        return None
    # No groups: a group in front of each literal defeats the engine's first-character skip (25x slower); the
    # matched text itself says which alternative it was.
    pattern = "|".join(re.escape(value) for _, value in entries)
    return re.compile(pattern, re.DOTALL).match, {value: key for key, value in entries}


#: A field index remembers its answers for this many values (then starts again), of at most this many characters.
_MEMO_ITEMS, _MEMO_CHARS = 2048, 256

#: From this many substrings on one field, one Aho-Corasick pass (pyahocorasick, the ``rules`` extra) beats a
#: loop of ``in`` tests.
_AUTOMATON_FROM = 8


def _automaton(contains: list[tuple[int, str]]):
    """An Aho-Corasick automaton mapping each substring to its smallest key, or None when a loop is as good (few
    substrings, an empty one, or pyahocorasick missing: then the loop, slower on big configurations)."""
    if len(contains) < _AUTOMATON_FROM or any(not sub for _, sub in contains):
        return None
    try:
        import ahocorasick
    except ImportError:
        return None
    automaton = ahocorasick.Automaton()
    best: dict[str, int] = {}
    for key, sub in contains:
        if key < best.get(sub, _NO_HIT):
            best[sub] = key
    for sub, key in best.items():
        automaton.add_word(sub, key)
    automaton.make_automaton()
    return automaton


class _Gates:
    """Which compound rules can still be true for an event: each AND rule registers one of its fields (all of
    that field's conditions are look-up kinds), and only rules whose gate fired, or whose gate field is unknown,
    are evaluated whole. Saves evaluating every AND rule of a big configuration on every event."""

    KINDS = frozenset({"is", "is any", "image", "begin with", "end with"})

    def __init__(self) -> None:
        self.fields: dict[str, _FieldIndex] = {}
        self.members: dict[str, list[int]] = {}  # gate field → its compounds (all candidates when it is unknown)
        self.always: list[int] = []  # compounds without a usable gate

    def add(self, compound: "_Compound", number: int) -> None:
        for name, conditions in compound.conditions_by_field.items():
            if all(c.condition in self.KINDS and c.value for c in conditions):
                index = self.fields.setdefault(name, _FieldIndex(multi=True))
                for condition in conditions:
                    index.add(condition, number)
                self.members.setdefault(name, []).append(number)
                return
        self.always.append(number)

    def finish(self) -> None:
        for index in self.fields.values():
            index.finish()
        self.fields = sorted(self.fields.items())

    def candidates(self, values: dict[str, str | None]) -> tuple[set[int], list[int]]:
        """(compounds that may be true, compounds whose gate field is unknown: at best unknown themselves)."""
        fired = set(self.always)
        gated_unknown: list[int] = []
        for name, index in self.fields:
            v = values[name]
            if v is None:
                gated_unknown += self.members[name]
            else:
                found = index.memo.get(v)
                fired |= index.all_hits(v) if found is None else found
        return fired, gated_unknown


class _Compound:
    """A rule that is not a plain OR of conditions (an AND rule, or one holding a nested rule), evaluated
    whole with Kleene logic. Conditions on one field are OR'ed first, as Sysmon always does."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.and_ = rule.relation == "and"
        self.conditions_by_field: dict[str, list[Condition]] = {}
        self.nested: list[_Compound] = []
        for item in rule.items:
            if isinstance(item, Rule):
                self.nested.append(_Compound(item))
            else:
                self.conditions_by_field.setdefault(item.field, []).append(item)
        self.fields = [(name, [_predicate(c) for c in conditions])
                       for name, conditions in self.conditions_by_field.items()]
        if not self.and_ or self.nested:
            self.conditions_by_field = {}  # only a plain AND of conditions can be gated by one of its fields

    def fields_used(self) -> set[str]:
        used = {name for name, _ in self.fields}
        for sub in self.nested:
            used |= sub.fields_used()
        return used

    def evaluate(self, values: dict[str, str | None]) -> bool | None:
        unknown = False
        for name, tests in self.fields:
            v = values[name]
            if v is None:
                unknown = True
                continue
            result = any(test(v) for test in tests)
            if result != self.and_:
                return result  # a false part of an AND, a true part of an OR: decided
        for sub in self.nested:
            result = sub.evaluate(values)
            if result is None:
                unknown = True
            elif result != self.and_:
                return result
        return None if unknown else self.and_

    def unknown_field(self, values: dict[str, str | None]) -> str | None:
        for name, _ in self.fields:
            if values[name] is None:
                return name
        for sub in self.nested:
            name = sub.unknown_field(values)
            if name:
                return name
        return None


class _Side:
    """The include or the exclude rules of one event type: their names, and the rules that are not a plain OR of
    conditions. The plain ones go into the event type's shared per-field indexes, with keys from ``key_base``."""

    def __init__(self, present: bool, rules: Iterable[Rule], key_base: int,
                 indexes: dict[str, _FieldIndex]) -> None:
        self.present = present
        self.compounds: list[tuple[int, _Compound]] = []
        self.names: dict[int, tuple[Rule, str | None]] = {}
        self.fields: set[str] = set()  # fields its plain rules read
        for rule in rules:
            base = key_base | rule.index << _SHIFT
            if rule.relation == "or" and all(isinstance(item, Condition) for item in rule.items):
                for position, condition in enumerate(rule.items):
                    key = base | position
                    indexes.setdefault(condition.field, _FieldIndex()).add(condition, key)
                    self.fields.add(condition.field)
                    self.names[key] = (rule, condition.name or rule.name)
            else:
                compound = _Compound(rule)
                self.compounds.append((base, compound))
                first_named = next((c.name for c in rule.items if isinstance(c, Condition) and c.name), None)
                self.names[base] = (rule, rule.name or first_named)
        self.compounds.sort(key=lambda item: item[0])
        self.gates = _Gates()
        for number, (_, compound) in enumerate(self.compounds):
            self.gates.add(compound, number)
        self.gates.finish()

    def fields_used(self) -> set[str]:
        used = set(self.fields)
        for _, compound in self.compounds:
            used |= compound.fields_used()
        return used

    def finish(self, values: dict[str, str | None], best: int, unknown: str | None) -> tuple[int, str | None]:
        """Given the plain rules' first match ``best`` (or _NO_HIT) and a field they left unknown: (key of the
        first rule of this side that matches, or _NO_HIT; a field left unknown, or None)."""
        compounds = self.compounds
        if not compounds:
            return best, unknown
        fired, gated_unknown = self.gates.candidates(values)
        for number in sorted(fired):
            key, compound = compounds[number]
            if key >= best:
                break
            result = compound.evaluate(values)
            if result:
                return key, unknown
            if result is None and unknown is None:
                unknown = compound.unknown_field(values)
        if unknown is None and best == _NO_HIT:
            # These cannot be true; one that is unknown (not false) makes the side unknown. Once the side is
            # unknown, or true, they change nothing and are not evaluated.
            for number in sorted(gated_unknown):
                compound = compounds[number][1]
                if compound.evaluate(values) is None:
                    unknown = compound.unknown_field(values)
                    break
        return best, unknown


#: Include keys sort after every exclude key: one pass over a field's index finds the first exclude rule that
#: matches (which wins) or else the first include rule.
_INCLUDE_BASE = 1 << 50


class _EventRules:
    """Include and exclude sides of one Sysmon event type, one index per field for both, and the fields they
    read."""

    def __init__(self, event: str, config: Config, rules: list[Rule]) -> None:
        indexes: dict[str, _FieldIndex] = {}

        def side(onmatch: str, key_base: int) -> _Side:
            return _Side((event, onmatch) in config.blocks, (r for r in rules if r.onmatch == onmatch), key_base,
                         indexes)

        self.exclude = side("exclude", 0)
        self.include = side("include", _INCLUDE_BASE)
        for index in indexes.values():
            index.finish()
        self.indexes = [(name, index, name in self.exclude.fields, name in self.include.fields)
                        for name, index in sorted(indexes.items())]
        attributes = FIELDS[event]
        used = self.include.fields_used() | self.exclude.fields_used()
        self.fields = tuple((name, attributes[name]) for name in sorted(used))
        self.record_fields = RecordFields(event, sorted(used))

    def values(self, event: object) -> dict[str, str | None]:
        values: dict[str, str | None] = {}
        for name, attribute in self.fields:
            value = _DERIVED[attribute](event) if attribute in _DERIVED else getattr(event, attribute, None)
            if value is None:
                values[name] = None
            elif type(value) is str:
                values[name] = value.lower()
            else:
                values[name] = str(value).lower()
        return values

    def decide(self, values: dict[str, str | None]) -> Verdict:
        best = _NO_HIT
        exclude_unknown = include_unknown = None
        for name, index, excludes, includes in self.indexes:
            v = values[name]
            if v is None:
                if excludes and exclude_unknown is None:
                    exclude_unknown = name
                if includes and include_unknown is None:
                    include_unknown = name
                continue
            hit = index.memo.get(v)
            if hit is None:
                hit = index.first(v)
            if hit < best:
                best = hit
        exclude = self.exclude
        unknown = None
        if exclude.present:
            key, unknown = exclude.finish(values, best if best < _INCLUDE_BASE else _NO_HIT, exclude_unknown)
            if key != _NO_HIT:
                rule, name = exclude.names[key]
                return Verdict(False, rule, name)
        include = self.include
        if not include.present:
            return Verdict(True, unknown=unknown) if unknown else _KEEP
        key, include_unknown = include.finish(values, best, include_unknown)
        if key == _NO_HIT:
            if include_unknown is None:
                return _NOT_INCLUDED  # no include rule matched: definite, whatever the excludes did not know
            return Verdict(True, unknown=include_unknown)
        rule, name = include.names[key]
        return Verdict(True, rule, name, unknown)


# --- the rule set ----------------------------------------------------------------------------------------------


class RuleSet:
    """A compiled Sysmon configuration: ``RuleSet.load(path)`` or ``RuleSet.from_xml(text)``.

    ``decide(event)`` says whether a ProcessCreate/ProcessExec (Sysmon's ProcessCreate) or ProcessExit (Sysmon's
    ProcessTerminate) event is kept and which rule names it; ``redact(text)`` rewrites a command line.
    Everything it cannot apply is in ``ignored`` (one line each, also logged once at load) and ``report()``.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.source = config.source
        self.rules: tuple[Rule, ...] = tuple(config.rules)
        self._events: dict[str, _EventRules | None] = {}
        for event in FIELDS:
            usable = [r for r in self.rules if r.event == event and r.ignored is None]
            present = any(key[0] == event for key in config.blocks)
            self._events[event] = _EventRules(event, config, usable) if present else None
        self._redactors = Redactors(config.redactions, config.source)
        self.redactions: tuple[Redaction, ...] = tuple(config.redactions)
        self.ignored: tuple[str, ...] = tuple(self._ignored_lines())
        for line in self.ignored:
            log.warning("%s: ignored: %s", self.source, line)

    @classmethod
    def load(cls, path: Union[str, "os.PathLike[str]"]) -> "RuleSet":
        """Read and compile a configuration file; RuleConfigError says why it was refused (nothing changes)."""
        name = os.fspath(path)
        return cls(parse_config(read_config(name), name))

    @classmethod
    def from_xml(cls, text: Union[str, bytes], source: str = "<config>") -> "RuleSet":
        return cls(parse_config(text, source))

    def _ignored_lines(self) -> Iterable[str]:
        for line in self.config.ignored:
            yield line
        for rule in self.rules:
            if rule.ignored and rule.event in FIELDS:
                yield f"rule {rule.label}: {rule.ignored}"

    # -- applying ------------------------------------------------------------------------------------------------

    def applies_to(self, item_type: int) -> bool:
        """True if events of this record type are judged by rules (else they pass, or follow their process)."""
        event = EVENT_OF_TYPE.get(item_type)
        return event is not None and self._events[event] is not None

    def decide(self, event: object) -> Verdict:
        """Keep or drop one process event, and the rule that decided (see Verdict)."""
        event_type = EVENT_OF_TYPE.get(int(getattr(event, "type", 0)))
        rules = self._events.get(event_type) if event_type else None
        if rules is None:
            return _KEEP
        return rules.decide(rules.values(event))

    def decide_record(self, record: Any) -> Verdict:
        """``decide`` for one encoded ProcessCreate/ProcessExec/ProcessExit record, read where it lies (only the
        fields the rules use are decoded). RecordFormatError when the record does not follow the wire format."""
        if type(record) is not bytes:
            record = bytes(record)  # (a memoryview or bytearray: slices must decode)
        event_type = EVENT_OF_TYPE.get(record[0] | record[1] << 8)
        rules = self._events.get(event_type) if event_type else None
        if rules is None:
            return _KEEP
        return rules.decide(rules.record_fields.values(record))

    @property
    def redacts(self) -> bool:
        return bool(self._redactors)

    def redact(self, text: str) -> tuple[str, list[Redaction]]:
        """``text`` with every redaction applied, and the redactions that changed it (a text ending with
        TRUNCATION_MARKER is redacted from where a match could have begun before the cut: docs/rules.md)."""
        return self._redactors.text(text)

    def redact_record(self, record: Any) -> tuple[Any, list[Redaction]]:
        """One encoded process record with its command line and ParentCommandLine redacted (the same object
        when nothing changed), and the redactions that changed it. RecordFormatError if it cannot be read."""
        return self._redactors.record(record)

    # -- reporting -----------------------------------------------------------------------------------------------

    def report(self) -> list[RuleReport]:
        """Every rule of events 1, 5 and 7 (and one entry per ignored block of other types), in document order."""
        out = []
        for rule in self.rules:
            out.append(RuleReport(rule, rule.ignored is None, rule.ignored, describe(rule)))
        return out

    def __repr__(self) -> str:
        used = sum(1 for r in self.rules if r.ignored is None)
        return (f"<RuleSet {self.source!r}: {used} rules applied, {len(self.rules) - used} ignored, "
                f"{len(self.redactions)} redactions>")


def describe(item: Union[Rule, Condition]) -> str:
    """A rule or condition as one readable line: ``Image end with '/bash' or CommandLine contains 'x'``."""
    if isinstance(item, Condition):
        return f"{item.field} {item.condition} {item.value!r}"
    joiner = f" {item.relation} "
    return joiner.join(describe(part) if isinstance(part, Condition) else f"({describe(part)})"
                       for part in item.items)
