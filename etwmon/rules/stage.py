"""The rules stage: a Sink between the source (after the identity stage) and the ring.

It keeps or drops each record by its RuleSet before the record takes ring space, writes the including rule's
name into kept events, redacts command lines (re-encoding the record, so no reader ever sees the secret), and
makes thread and image-load records follow their process's verdict. It counts everything it decides.
"""

from __future__ import annotations

import dataclasses
import logging
import struct
import threading
from typing import Any

from ..errors import RecordFormatError
from ..records import Event, ItemType, parse
from ..sources.base import Sink
from .engine import RuleSet, Verdict

__all__ = ["RulesStage", "MAX_TRACKED_PROCESSES"]

log = logging.getLogger(__name__)

#: Excluded processes remembered so their threads are dropped too. Past this the oldest are forgotten: their
#: later thread events then pass (shown, never hidden) and are counted as ``forgotten``.
MAX_TRACKED_PROCESSES = 1 << 16

_CREATE, _EXEC, _EXIT = int(ItemType.ProcessCreate), int(ItemType.ProcessExec), int(ItemType.ProcessExit)
_THREAD_CREATE, _THREAD_EXIT, _IMAGE_LOAD = (int(ItemType.ThreadCreate), int(ItemType.ThreadExit),
                                             int(ItemType.ImageLoad))
_U32 = struct.Struct("<I")
_TYPE = struct.Struct("<h")
#: Where each follower record keeps its ProcessId (ThreadCreateInfo/ThreadExitInfo: after ThreadId).
_PID_OFFSET = {_THREAD_CREATE: 20, _THREAD_EXIT: 20, _IMAGE_LOAD: 16, _EXIT: 16}
_REDACTED_FIELDS = ("command_line", "parent_command_line")
#: Judged records whose verdict is their own, not their process's (an excluded image load leaves its process in).
_OWN_VERDICT = (ItemType.ProcessExit, ItemType.ImageLoad)


class RulesStage:
    """``RulesStage(sink, rules)`` is itself a Sink: push records into it and it pushes what the rules keep
    into ``sink``. ``replace(rules)`` swaps the RuleSet (thread-safe; counters start again for the new set);
    ``stats()`` is a plain dict for Monitor.stats."""

    def __init__(self, sink: Sink, rules: RuleSet) -> None:
        self._sink = sink
        self.push_lost = sink.push_lost
        self.notify = sink.notify
        self._excluded: dict[int, None] = {}  # pids whose process was excluded (insertion order: oldest first)
        self._lock = threading.Lock()
        self._install(rules)

    def _install(self, rules: RuleSet) -> None:
        self.rules = rules
        self._rule_counts: dict[int, list[int]] = {}  # rule index → [matched, excluded]
        self._redaction_counts = [0] * len(rules.redactions)
        self._redaction_index = {id(r): i for i, r in enumerate(rules.redactions)}
        self._counts = dict.fromkeys(("evaluated", "kept", "excluded", "not_included", "undecided",
                                      "followers_dropped", "redacted", "unredactable", "unreadable", "forgotten",
                                      "unnamed"), 0)
        self._unknown_fields: dict[str, int] = {}
        self._warned_unknown: set[str] = set()
        self._judged = {t for t in (_CREATE, _EXEC, _EXIT, _IMAGE_LOAD) if rules.applies_to(t)}
        if rules.redacts:
            self._judged |= {_CREATE, _EXEC}

    def replace(self, rules: RuleSet) -> None:
        """Use ``rules`` from the next record on. Processes excluded under the old rules stay excluded (their
        verdict was made when they started)."""
        with self._lock:
            self._install(rules)

    # -- the hot path ------------------------------------------------------------------------------------------

    def push(self, record: Any) -> None:
        item = _TYPE.unpack_from(record, 0)[0]
        if item not in self._judged:
            offset = _PID_OFFSET.get(item)
            if offset is not None and self._excluded:
                pid = _U32.unpack_from(record, offset)[0]
                if item == _EXIT:
                    self._excluded.pop(pid, None)
                elif pid in self._excluded:
                    self._counts["followers_dropped"] += 1
                    return
            self._sink.push(record)
            return
        with self._lock:
            out = self._judge(record)
        if out is not None:
            self._sink.push(out)

    def _judge(self, record: Any) -> Any:
        counts = self._counts
        try:
            event = next(parse(record))
        except RecordFormatError as exc:
            # Not judged means not redacted either: the record goes no further, counted and said once.
            counts["unreadable"] += 1
            if counts["unreadable"] == 1:
                log.error("a record the rules cannot read was dropped (counted as unreadable): %s", exc)
            return None
        counts["evaluated"] += 1
        verdict = self.rules.decide(event)
        pid = event.pid
        if event.type == ItemType.ProcessExit:
            self._excluded.pop(pid, None)
        if not verdict.keep:
            self._count_rule(verdict, 1)
            if verdict.rule is None:
                counts["not_included"] += 1
            else:
                counts["excluded"] += 1
            if event.type not in _OWN_VERDICT:
                self._remember_excluded(pid)
            return None
        counts["kept"] += 1
        if verdict.unknown:
            self._count_unknown(verdict)
        if verdict.rule is not None:
            self._count_rule(verdict, 0)
        if event.type not in _OWN_VERDICT:
            self._excluded.pop(pid, None)
        changes: dict[str, Any] = {}
        if verdict.rule_name is not None:
            if "rule_name" in _field_names(event):
                changes["rule_name"] = verdict.rule_name
            else:
                counts["unnamed"] += 1
        if self.rules.redacts:
            names = _field_names(event)
            for attribute in _REDACTED_FIELDS:
                text = getattr(event, attribute, None)
                if not text:
                    continue
                new, applied = self.rules.redact(text)
                if applied:
                    if attribute not in names:
                        # The record carries this text but this build cannot rewrite it: drop the record
                        # rather than let the secret through (counted; never silent).
                        log.error("cannot redact %s of this record type; dropped", attribute)
                        counts["unredactable"] += 1
                        return None
                    changes[attribute] = new
                    for redaction in applied:
                        self._redaction_counts[self._redaction_index[id(redaction)]] += 1
            if any(a in changes for a in _REDACTED_FIELDS):
                counts["redacted"] += 1
        if not changes:
            return record
        return dataclasses.replace(event, **changes).encode()

    def _remember_excluded(self, pid: int) -> None:
        excluded = self._excluded
        excluded.pop(pid, None)
        excluded[pid] = None
        if len(excluded) > MAX_TRACKED_PROCESSES:
            del excluded[next(iter(excluded))]
            self._counts["forgotten"] += 1

    def _count_rule(self, verdict: Verdict, column: int) -> None:
        if verdict.rule is None:
            return
        counts = self._rule_counts.get(verdict.rule.index)
        if counts is None:
            counts = self._rule_counts[verdict.rule.index] = [0, 0]
        counts[column] += 1

    def _count_unknown(self, verdict: Verdict) -> None:
        field = verdict.unknown
        self._counts["undecided"] += 1
        self._unknown_fields[field] = self._unknown_fields.get(field, 0) + 1
        if field not in self._warned_unknown:
            self._warned_unknown.add(field)
            users = [r.label for r in self.rules.rules if r.ignored is None and _uses(r, field)]
            more = f" and {len(users) - 5} more" if len(users) > 5 else ""
            log.warning("the source does not know %s for some events, so the rules on it cannot judge them; "
                        "such events are kept and counted as undecided (rules: %s%s)", field,
                        "; ".join(users[:5]), more)

    # -- state ---------------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Counters since the current RuleSet was installed: totals, undecided events per unknown field, and per
        rule (those that decided something) matched/excluded, per redaction the records it changed."""
        with self._lock:
            rules = []
            for rule in self.rules.rules:
                counts = self._rule_counts.get(rule.index)
                if counts:
                    rules.append({"rule": rule.label, "name": rule.name, "matched": counts[0],
                                  "excluded": counts[1]})
            redactions = [{"redaction": r.name or f"line {r.line}", "redacted": n}
                          for r, n in zip(self.rules.redactions, self._redaction_counts)]
            return {**self._counts, "source": self.rules.source, "unknown_fields": dict(self._unknown_fields),
                    "rules": rules, "redactions": redactions}


def _field_names(event: Event) -> frozenset[str]:
    names = _FIELDS_CACHE.get(type(event))
    if names is None:
        names = _FIELDS_CACHE[type(event)] = frozenset(f.name for f in dataclasses.fields(event))
    return names


_FIELDS_CACHE: dict[type, frozenset[str]] = {}


def _uses(rule: Any, field: str) -> bool:
    return any(_uses(item, field) if hasattr(item, "items") else item.field == field for item in rule.items)
