"""Sysmon-style rules: load a Sysmon XML configuration safely and apply its ProcessCreate (event 1),
ProcessTerminate (event 5) and ImageLoad (event 7) rules between the source and the ring, with command-line
redaction.

    rules = RuleSet.load("sysmon.xml")        # RuleConfigError (file, line, why) if refused: nothing started
    with Monitor(rules=rules) as mon: ...     # or Monitor(rules="sysmon.xml"); mon.set_rules(new) to reload
    mon.stats.rules                           # per-rule matched/excluded, redactions, undecided events

Reading needs defusedxml (``pip install 'etwmon[rules]'``). Semantics and choices: docs/rules.md.
"""

from ..errors import RuleConfigError, RulesError
from .config import CONDITIONS, FIELDS, MAX_CONFIG_BYTES, UNSUPPORTED_FIELDS, Condition, Redaction, Rule
from .engine import REDACTED, RuleReport, RuleSet, Verdict, describe
from .stage import RulesStage

__all__ = [
    "RuleSet", "RulesStage", "Verdict", "RuleReport", "Rule", "Condition", "Redaction", "RuleConfigError",
    "RulesError", "CONDITIONS", "FIELDS", "UNSUPPORTED_FIELDS", "MAX_CONFIG_BYTES", "REDACTED", "describe",
]
