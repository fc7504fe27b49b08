"""``etwmon rules check``: what of a configuration etwmon applies, what it ignores and why, rule by rule."""

from __future__ import annotations

from typing import Any

from .engine import RuleSet, describe

__all__ = ["check_records", "check_lines"]


def check_records(rules: RuleSet) -> list[dict[str, Any]]:
    """One dict per rule, per ignored element and per redaction, in document order (``--json``)."""
    out: list[dict[str, Any]] = []
    for report in rules.report():
        rule = report.rule
        out.append({"kind": "rule", "event": rule.event, "onmatch": rule.onmatch, "line": rule.line,
                    "name": rule.name, "relation": rule.relation, "applied": report.supported,
                    "reason": report.reason, "conditions": report.description})
    for line in rules.config.ignored:
        out.append({"kind": "ignored", "applied": False, "reason": line})
    for redaction in rules.redactions:
        out.append({"kind": "redaction", "line": redaction.line, "name": redaction.name,
                    "pattern": redaction.pattern, "applied": True})
    return out


def check_lines(rules: RuleSet) -> list[str]:
    """The text report: a summary line, then one line per rule, ignored element and redaction."""
    reports = rules.report()
    applied = sum(r.supported for r in reports)
    lines = [f"{rules.source}: schema {rules.config.schema_version or '?'}, {len(reports)} rules for "
             f"ProcessCreate/ProcessTerminate: {applied} applied, {len(reports) - applied} ignored; "
             f"{len(rules.config.ignored)} other elements ignored; {len(rules.redactions)} redactions"]
    for report in reports:
        rule = report.rule
        head = f"{'applied' if report.supported else 'IGNORED'}  {rule.label}: {describe(rule)}"
        lines.append(head if report.supported else f"{head}  -- {report.reason}")
    for line in rules.config.ignored:
        lines.append(f"IGNORED  {line}")
    for redaction in rules.redactions:
        named = f"{redaction.name!r} " if redaction.name else ""
        lines.append(f"redacts  {named}(line {redaction.line}): {redaction.pattern!r} -> *** in command lines")
    return lines
