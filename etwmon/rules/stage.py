"""The rules stage: a Sink between the source (after the identity stage) and the ring.

It keeps or drops each record by its RuleSet before the record takes ring space, writes the including rule's
name into kept events, redacts command lines (re-encoding the record, so no reader ever sees the secret), and
makes thread and image-load records follow their process's verdict. It counts everything it decides.
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any

from ..errors import RecordFormatError
from ..records import TAG_ORDER, ExtensionTag, ItemType, block_fields, pack_field, with_packed
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
#: Judged records whose verdict is their own, not their process's (an excluded image load leaves its process in).
_OWN_VERDICT = (_EXIT, _IMAGE_LOAD)


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
                                      "followers_dropped", "redacted", "unredactable", "unreadable", "forgotten"), 0)
        self._unknown_fields: dict[str, int] = {}
        self._warned_unknown: set[str] = set()
        self._judged = {t for t in (_CREATE, _EXEC, _EXIT, _IMAGE_LOAD) if rules.applies_to(t)}
        # Rules on the parent's command line or user need them in each create and exec: the identity stage then
        # adds them record by record (the kernel's records carry ParentImage, and User is named from the uid).
        self.batch_creates = not any(r.ignored is None and (_uses(r, "ParentCommandLine") or _uses(r, "ParentUser"))
                                     for r in rules.rules)
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
        if type(record) is not bytes:
            record = bytes(record)  # (a memoryview or bytearray from the source: read once, as bytes)
        item = record[0] | record[1] << 8
        try:
            verdict = self.rules.decide_record(record)
        except RecordFormatError as exc:
            return self._unreadable(exc)
        counts["evaluated"] += 1
        pid = _U32.unpack_from(record, 16)[0]
        if item == _EXIT:
            self._excluded.pop(pid, None)
        if not verdict.keep:
            self._count_rule(verdict, 1)
            if verdict.rule is None:
                counts["not_included"] += 1
            else:
                counts["excluded"] += 1
            if item not in _OWN_VERDICT:
                self._remember_excluded(pid)
            return None
        counts["kept"] += 1
        if verdict.unknown:
            self._count_unknown(verdict)
        if verdict.rule is not None:
            self._count_rule(verdict, 0)
        if item not in _OWN_VERDICT:
            self._excluded.pop(pid, None)
        if self.rules.redacts:
            # Redaction first: whatever is cut later (a record grown past 64 KiB) can only hide redacted text.
            try:
                record, applied = self.rules.redact_record(record)
            except RecordFormatError as exc:
                # Judged, but a text field redaction must read is not UTF-16: dropped rather than passed on.
                counts["unredactable"] += 1
                if counts["unredactable"] == 1:
                    log.error("a record whose command line cannot be redacted was dropped (counted as "
                              "unredactable): %s", exc)
                return None
            if applied:
                counts["redacted"] += 1
                for redaction in applied:
                    self._redaction_counts[self._redaction_index[id(redaction)]] += 1
        if verdict.rule_name is not None:
            record = with_rule_name(record, verdict.rule_name)
        return record

    def _unreadable(self, exc: Exception) -> None:
        # Not judged means not redacted either: the record goes no further, counted and said once.
        counts = self._counts
        counts["unreadable"] += 1
        if counts["unreadable"] == 1:
            log.error("a record the rules cannot read was dropped (counted as unreadable): %s", exc)
        return None

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


def with_rule_name(record: Any, name: str) -> bytes:
    """``record`` (a process record) with RuleName set in its extension block, where the block's order puts it."""
    flags, fields = block_fields(record, packed=True)
    named = pack_field(_RULE_NAME, name.encode("utf-16-le", "surrogatepass"))
    out = []
    for tag, field in fields:
        if tag == _RULE_NAME:
            continue
        if named is not None and _ORDER.get(tag, len(_ORDER)) > _ORDER[_RULE_NAME]:
            out.append(named)
            named = None
        out.append(field)
    if named is not None:
        out.append(named)
    return with_packed(record, flags, out)


_RULE_NAME = int(ExtensionTag.RuleName)
_ORDER = {tag: position for position, tag in enumerate(TAG_ORDER)}


def _uses(rule: Any, field: str) -> bool:
    return any(_uses(item, field) if hasattr(item, "items") else item.field == field for item in rule.items)
