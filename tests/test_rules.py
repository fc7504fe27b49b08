"""Sysmon rule semantics, table-driven against Sysmon's documentation: every condition, include/exclude,
RuleGroup/Rule relations, rule names, unknown fields and what etwmon ignores (docs/rules.md)."""

from __future__ import annotations

import dataclasses

import pytest

from etwmon.errors import RuleConfigError

pytest.importorskip("defusedxml")

from etwmon.records import ProcessExec, ProcessExit, ProcessCreate, filetime_now  # noqa: E402
from etwmon.rules import RuleSet  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Exit(ProcessExit):
    """A ProcessExit with a user (which the record type cannot carry: rules must treat it as unknown there)."""

    user: str | None = None


def ev(command_line: str = "/usr/bin/true", pid: int = 100, parent_pid: int = 1, **fields) -> ProcessExec:
    """A ProcessExec with the fields the identity stage adds (left out: unknown)."""
    return ProcessExec(filetime_now(), pid, parent_pid, parent_pid, parent_pid, command_line, **fields)


def rules(body: str) -> RuleSet:
    return RuleSet.from_xml(f'<Sysmon schemaversion="4.90"><EventFiltering>{body}</EventFiltering></Sysmon>')


def include(*filters: str, relation: str = "or", name: str = "") -> RuleSet:
    return rules(f'<RuleGroup name="{name}" groupRelation="{relation}"><ProcessCreate onmatch="include">'
                 f'{"".join(filters)}</ProcessCreate></RuleGroup>')


# --- every condition ------------------------------------------------------------------------------------------

# (condition, value in the config, field value of the event, Sysmon says it matches)
CONDITIONS = [
    ("is", "/usr/bin/ssh", "/usr/bin/ssh", True),
    ("is", "/USR/bin/SSH", "/usr/bin/ssh", True),  # case-insensitive
    ("is", "/usr/bin/ssh", "/usr/bin/sshd", False),
    ("is not", "/usr/bin/ssh", "/usr/bin/sshd", True),
    ("is not", "/usr/bin/ssh", "/usr/bin/SSH", False),
    ("is any", "/bin/a;/usr/bin/ssh;/bin/b", "/usr/bin/SSH", True),
    ("is any", "/bin/a;/bin/b", "/usr/bin/ssh", False),
    ("contains", "bin/ss", "/usr/bin/ssh", True),
    ("contains", "BIN/SS", "/usr/bin/ssh", True),
    ("contains", "sbin", "/usr/bin/ssh", False),
    ("contains any", "nope;bin/s;zzz", "/usr/bin/ssh", True),
    ("contains any", "nope;zzz", "/usr/bin/ssh", False),
    ("contains all", "usr;ssh", "/usr/bin/ssh", True),
    ("contains all", "usr;sftp", "/usr/bin/ssh", False),
    ("excludes", "sftp", "/usr/bin/ssh", True),
    ("excludes", "SSH", "/usr/bin/ssh", False),
    ("excludes any", "usr;sftp", "/usr/bin/ssh", True),  # does not contain one or more of the values
    ("excludes any", "usr;ssh", "/usr/bin/ssh", False),
    ("excludes all", "sftp;scp", "/usr/bin/ssh", True),  # contains none of the values
    ("excludes all", "sftp;ssh", "/usr/bin/ssh", False),
    ("begin with", "/usr/", "/usr/bin/ssh", True),
    ("begin with", "/USR/BIN", "/usr/bin/ssh", True),
    ("begin with", "/bin/", "/usr/bin/ssh", False),
    ("not begin with", "/bin/", "/usr/bin/ssh", True),
    ("not begin with", "/usr/", "/usr/bin/ssh", False),
    ("end with", "/ssh", "/usr/bin/ssh", True),
    ("end with", "in/SSH", "/usr/bin/ssh", True),
    ("end with", "/ssh", "/usr/bin/sshd", False),
    ("end with", "/ssh", "/usr/bin/xssh", False),  # a path tail is the whole name after the separator
    ("end with", "\\ssh", "/usr/bin/ssh", False),  # the separator is part of the text
    ("not end with", "/sshd", "/usr/bin/ssh", True),
    ("not end with", "/ssh", "/usr/bin/ssh", False),
    ("less than", "/usr/bin/t", "/usr/bin/ssh", True),  # lexicographical
    ("less than", "/usr/bin/a", "/usr/bin/ssh", False),
    ("more than", "/usr/bin/a", "/usr/bin/ssh", True),
    ("more than", "/usr/bin/ssh", "/usr/bin/ssh", False),
    ("image", "ssh", "/usr/bin/ssh", True),  # only the image name
    ("image", "SSH", "/usr/bin/ssh", True),
    ("image", "/usr/bin/ssh", "/usr/bin/ssh", True),  # or the full path
    ("image", "sh", "/usr/bin/ssh", False),
    ("image", "ssh", "c:\\windows\\ssh", True),  # either separator
]


def _one(condition: str, value: str, image: str, wrapped: bool) -> bool:
    element = f'<Image condition="{condition}">{value}</Image>'
    if wrapped:  # the same condition evaluated whole, inside an AND rule with a condition that always holds
        element = f'<Rule groupRelation="and">{element}<ProcessId condition="more than">0</ProcessId></Rule>'
    return include(element).decide(ev(image=image)).keep


@pytest.mark.parametrize("wrapped", [False, True], ids=["indexed", "in-and-rule"])
@pytest.mark.parametrize("condition,value,image,expected", CONDITIONS)
def test_each_condition(condition, value, image, expected, wrapped):
    assert _one(condition, value, image, wrapped) is expected


def test_every_documented_condition_is_in_the_table():
    from etwmon.rules import CONDITIONS as known

    assert {row[0] for row in CONDITIONS} == known


def test_condition_names_are_compared_without_case_and_is_is_the_default():
    assert include('<Image condition="End With">/ssh</Image>').decide(ev(image="/usr/bin/ssh")).keep
    assert include('<Image>/usr/bin/ssh</Image>').decide(ev(image="/usr/bin/SSH")).keep
    assert not include('<Image>/usr/bin/ssh</Image>').decide(ev(image="/usr/bin/ssh2")).keep


@pytest.mark.parametrize("condition,limit,pid,expected", [
    ("less than", "100", 99, True), ("less than", "100", 100, False), ("less than", "100", 1000, False),
    ("more than", "100", 1000, True), ("more than", "100", 99, False),
])
def test_integer_fields_compare_as_numbers(condition, limit, pid, expected):
    # Lexicographically "1000" < "99"; ProcessId is a number, so etwmon compares numbers.
    ruleset = include(f'<ProcessId condition="{condition}">{limit}</ProcessId>')
    assert ruleset.decide(ev(pid=pid)).keep is expected


@pytest.mark.parametrize("automaton", [True, False], ids=["aho-corasick", "loop"])
def test_many_rules_of_one_kind_still_find_the_right_one(automaton, monkeypatch):
    from etwmon.rules import engine

    if automaton:
        pytest.importorskip("ahocorasick")
    else:
        monkeypatch.setattr(engine, "_AUTOMATON_FROM", 10**9)
    # Enough substrings, prefixes and suffixes to take the indexed paths (alternations, Aho-Corasick).
    filters = [f'<CommandLine condition="contains" name="c{i}">word{i}x</CommandLine>' for i in range(30)]
    filters += [f'<Image condition="begin with" name="b{i}">/opt/p{i}/</Image>' for i in range(30)]
    filters += [f'<Image condition="end with" name="e{i}">.ext{i}</Image>' for i in range(30)]
    filters += [f'<ParentImage condition="end with" name="t{i}">/tool{i}</ParentImage>' for i in range(30)]
    ruleset = include(*filters)

    def judge(command_line="run", image="/x", parent_image="/bin/sh"):
        return ruleset.decide(ev(command_line, image=image, parent_image=parent_image))

    assert judge("run word17x now").rule_name == "c17"
    assert judge("run word17 now").keep is False
    assert judge(image="/opt/p23/bin/x").rule_name == "b23"
    assert judge(image="/opt/p2/x.ext29").rule_name == "b2"  # the earlier rule names it
    assert judge(image="/srv/x.ext29").rule_name == "e29"
    assert judge(parent_image="/usr/bin/tool7").rule_name == "t7"
    assert judge(parent_image="/usr/bin/mytool7").keep is False
    assert judge("word3x word1x").rule_name == "c1"  # document order, not position in the text


# --- include / exclude --------------------------------------------------------------------------------------

def test_no_block_for_an_event_type_logs_everything():
    assert rules('<RuleGroup groupRelation="or"><ProcessTerminate onmatch="include"/></RuleGroup>') \
        .decide(ev()).keep


def test_an_empty_include_block_logs_nothing_and_an_empty_exclude_block_everything():
    assert not rules('<ProcessCreate onmatch="include"/>').decide(ev()).keep
    assert rules('<ProcessCreate onmatch="exclude"/>').decide(ev()).keep


def test_exclude_wins_over_include():
    ruleset = rules('<ProcessCreate onmatch="include"><CommandLine condition="contains">ssh</CommandLine>'
                    '</ProcessCreate><ProcessCreate onmatch="exclude"><ParentImage condition="is">/bin/cron'
                    '</ParentImage></ProcessCreate>')
    assert ruleset.decide(ev("ssh host", parent_image="/bin/bash")).keep
    verdict = ruleset.decide(ev("ssh host", parent_image="/bin/cron"))
    assert not verdict.keep and verdict.rule.onmatch == "exclude"
    assert not ruleset.decide(ev("ls", parent_image="/bin/bash")).keep  # not included


def test_only_exclude_rules_keep_what_they_do_not_match():
    ruleset = rules('<ProcessCreate onmatch="exclude"><Image condition="image">cron</Image></ProcessCreate>')
    assert ruleset.decide(ev(image="/usr/sbin/sshd")).keep
    assert not ruleset.decide(ev(image="/usr/sbin/cron")).keep


# --- relations --------------------------------------------------------------------------------------------

SSH_FROM_CRON = ('<Image condition="end with">/ssh</Image>', '<ParentImage condition="image">cron</ParentImage>')


@pytest.mark.parametrize("image,parent,legacy_or,group_and", [
    ("/usr/bin/ssh", "/usr/sbin/cron", True, True),
    ("/usr/bin/ssh", "/bin/bash", True, False),
    ("/bin/ls", "/usr/sbin/cron", True, False),
    ("/bin/ls", "/bin/bash", False, False),
])
def test_different_fields_or_outside_a_rulegroup_and_in_an_and_group(image, parent, legacy_or, group_and):
    event = ev(image=image, parent_image=parent)
    legacy = rules(f'<ProcessCreate onmatch="include">{"".join(SSH_FROM_CRON)}</ProcessCreate>')
    assert legacy.decide(event).keep is legacy_or
    assert include(*SSH_FROM_CRON, relation="or").decide(event).keep is legacy_or
    assert include(*SSH_FROM_CRON, relation="and").decide(event).keep is group_and
    default = rules(f'<RuleGroup><ProcessCreate onmatch="include">{"".join(SSH_FROM_CRON)}</ProcessCreate>'
                    '</RuleGroup>')
    assert default.decide(event).keep is group_and  # RuleGroup's documented default is "and"
    rule = include(f'<Rule groupRelation="and">{"".join(SSH_FROM_CRON)}</Rule>')
    assert rule.decide(event).keep is group_and
    rule_default = include(f'<Rule>{"".join(SSH_FROM_CRON)}</Rule>')
    assert rule_default.decide(event).keep is group_and
    rule_or = include(f'<Rule groupRelation="or">{"".join(SSH_FROM_CRON)}</Rule>')
    assert rule_or.decide(event).keep is legacy_or


def test_conditions_on_one_field_are_ored_also_in_an_and_group():
    ruleset = include('<Image condition="end with">/ssh</Image>', '<Image condition="end with">/scp</Image>',
                      '<User condition="is">root</User>', relation="and")
    assert ruleset.decide(ev(image="/usr/bin/scp", user="root")).keep
    assert ruleset.decide(ev(image="/usr/bin/ssh", user="root")).keep
    assert not ruleset.decide(ev(image="/usr/bin/ssh", user="alice")).keep
    assert not ruleset.decide(ev(image="/usr/bin/ls", user="root")).keep


def test_an_and_rule_beside_single_filters_in_an_or_group():
    ruleset = include('<CommandLine condition="contains">timeout</CommandLine>',
                      '<Rule groupRelation="and" name="ping out"><Image condition="image">ping</Image>'
                      '<CommandLine condition="contains">example.org</CommandLine></Rule>')
    assert ruleset.decide(ev("timeout 5", image="/bin/timeout")).keep
    assert ruleset.decide(ev("ping example.org", image="/bin/ping")).rule_name == "ping out"
    assert not ruleset.decide(ev("ping localhost", image="/bin/ping")).keep
    assert not ruleset.decide(ev("curl example.org", image="/bin/curl")).keep


def test_exec_is_a_process_create_and_exit_is_process_terminate():
    ruleset = rules('<ProcessCreate onmatch="include"><CommandLine condition="contains">keep</CommandLine>'
                    '</ProcessCreate><ProcessTerminate onmatch="exclude"><ProcessId condition="is">7</ProcessId>'
                    '</ProcessTerminate>')
    plain = ProcessCreate(filetime_now(), 5, 1, 1, 1, "keep me")
    assert ruleset.decide(plain).keep and ruleset.decide(ev("keep me")).keep
    assert not ruleset.decide(ev("drop me")).keep
    assert ruleset.decide(Exit(filetime_now(), 8, 0)).keep
    assert not ruleset.decide(Exit(filetime_now(), 7, 0)).keep


def test_process_terminate_fields():
    ruleset = rules('<ProcessTerminate onmatch="include"><Image condition="image">sshd</Image>'
                    '</ProcessTerminate>')
    assert ruleset.decide(Exit(filetime_now(), 8, 0, image="/usr/sbin/sshd")).keep
    assert not ruleset.decide(Exit(filetime_now(), 8, 0, image="/usr/sbin/cron")).keep


# --- names ------------------------------------------------------------------------------------------------

def test_rule_name_comes_from_the_filter_then_the_rule_then_the_group():
    ruleset = include('<CommandLine condition="contains" name="filter name">alpha</CommandLine>',
                      '<CommandLine condition="contains">beta</CommandLine>',
                      '<Rule name="rule name"><CommandLine condition="contains">gamma</CommandLine>'
                      '<ProcessId condition="more than">0</ProcessId></Rule>',
                      '<Rule><CommandLine condition="contains">delta</CommandLine></Rule>',
                      name="group name")
    assert ruleset.decide(ev("alpha")).rule_name == "filter name"
    assert ruleset.decide(ev("beta")).rule_name == "group name"
    assert ruleset.decide(ev("gamma")).rule_name == "rule name"
    assert ruleset.decide(ev("delta")).rule_name == "group name"
    assert include('<CommandLine condition="contains">x</CommandLine>').decide(ev("x")).rule_name is None


def test_the_first_matching_rule_in_document_order_names_the_event():
    ruleset = rules('<RuleGroup groupRelation="or"><ProcessCreate onmatch="include">'
                    '<Image condition="end with" name="first">/ssh</Image></ProcessCreate></RuleGroup>'
                    '<RuleGroup groupRelation="or"><ProcessCreate onmatch="include">'
                    '<Image condition="is" name="second">/usr/bin/ssh</Image>'
                    '<Image condition="image" name="third">ssh</Image></ProcessCreate></RuleGroup>')
    assert ruleset.decide(ev(image="/usr/bin/ssh")).rule_name == "first"
    assert ruleset.decide(ev(image="/opt/ssh")).rule_name == "first"


# --- unknown fields ----------------------------------------------------------------------------------------

def test_a_field_the_source_does_not_know_is_unknown_and_the_event_kept():
    ruleset = include('<Image condition="image">ssh</Image>')
    verdict = ruleset.decide(ev())  # no image: the source does not know it
    assert verdict.keep and verdict.unknown == "Image" and verdict.rule is None
    assert not ruleset.decide(ev(image="/bin/ls")).keep
    assert ruleset.decide(ev(image="/bin/ssh")).unknown is None


def test_unknown_never_hides_an_event_but_a_definite_no_still_drops_it():
    ruleset = rules('<ProcessCreate onmatch="include"><CommandLine condition="contains" name="in">ssh'
                    '</CommandLine></ProcessCreate><ProcessCreate onmatch="exclude"><User condition="is">svc'
                    '</User></ProcessCreate>')
    kept = ruleset.decide(ev("ssh host"))  # included; the exclude cannot judge it: kept, undecided
    assert kept.keep and kept.rule_name == "in" and kept.unknown == "User"
    assert not ruleset.decide(ev("ls")).keep  # not included, whatever the exclude would have said
    assert not ruleset.decide(ev("ssh host", user="svc")).keep


def test_kleene_logic_in_an_and_rule():
    ruleset = include('<Rule groupRelation="and"><Image condition="image">ssh</Image>'
                      '<CommandLine condition="contains">prod</CommandLine></Rule>')
    assert not ruleset.decide(ev("ssh dev")).keep  # unknown AND false = false
    unknown = ruleset.decide(ev("ssh prod"))  # unknown AND true = unknown: kept
    assert unknown.keep and unknown.unknown == "Image"
    assert ruleset.decide(ev("ssh prod", image="/bin/ssh")).unknown is None


# --- what etwmon ignores ------------------------------------------------------------------------------------

def test_a_field_etwmon_cannot_evaluate_is_reported_and_never_matches():
    ruleset = include('<FileVersion condition="contains">1.0</FileVersion>',
                      '<CommandLine condition="contains">ssh</CommandLine>')
    assert any("FileVersion" in line and "line" in line for line in ruleset.ignored)
    assert ruleset.decide(ev("ssh")).keep
    assert not ruleset.decide(ev("ls")).keep  # the FileVersion rule is not a match (nor undecided)
    assert [r.supported for r in ruleset.report()] == [False, True]


def test_an_and_rule_with_an_unevaluable_part_is_ignored_whole():
    ruleset = include('<Rule groupRelation="and" name="needs level"><CommandLine condition="contains">ssh'
                      '</CommandLine><IntegrityLevel>High</IntegrityLevel></Rule>')
    assert any("'needs level'" in line and "IntegrityLevel" in line for line in ruleset.ignored)
    assert not ruleset.decide(ev("ssh")).keep  # not widened to "contains ssh"


def test_an_or_rule_keeps_its_evaluable_conditions():
    ruleset = include('<Rule groupRelation="or" name="r"><Company>x</Company>'
                      '<CommandLine condition="contains">ssh</CommandLine></Rule>')
    assert ruleset.decide(ev("ssh")).rule_name == "r"
    assert any("Company" in line for line in ruleset.ignored)


def test_other_event_types_and_settings_are_reported_and_ignored():
    ruleset = RuleSet.from_xml('<Sysmon schemaversion="4.90"><CheckRevocation/><EventFiltering>'
                               '<RuleGroup groupRelation="or"><NetworkConnect onmatch="include"><DestinationPort>'
                               '443</DestinationPort></NetworkConnect></RuleGroup></EventFiltering></Sysmon>')
    assert any("NetworkConnect" in line for line in ruleset.ignored)
    assert any("CheckRevocation" in line for line in ruleset.ignored)
    assert ruleset.decide(ev()).keep


def test_hash_algorithms_are_read_and_imphash_is_left_out_with_its_reason():
    ruleset = RuleSet.from_xml('<Sysmon schemaversion="4.90"><HashAlgorithms>SHA256,md5,IMPHASH</HashAlgorithms>'
                               '<EventFiltering/></Sysmon>')
    assert ruleset.config.hash_algorithms == "MD5,SHA256"  # Sysmon's order
    assert any("IMPHASH" in line and "PE" in line for line in ruleset.ignored)
    with pytest.raises(RuleConfigError, match="line 1.*HashAlgorithms.*crc32"):
        RuleSet.from_xml('<Sysmon schemaversion="4.90"><HashAlgorithms>crc32</HashAlgorithms></Sysmon>')


def test_hashes_are_a_field_rules_match():
    digest = "C79BF44242829108E323378531F4AC839513CA1FBA45EFD6583643526E1E9FD2"
    ruleset = include(f'<Hashes condition="contains" name="known bad">SHA256={digest.lower()}</Hashes>')
    assert ruleset.decide(ev(hashes=f"MD5=00,SHA256={digest}")).rule_name == "known bad"  # no case, as Sysmon
    assert not ruleset.decide(ev(hashes="SHA256=" + "0" * 64)).keep
    assert ruleset.decide(ev()).unknown == "Hashes"  # not hashed: unknown, never a silent miss


def test_container_fields_are_an_etwmon_extension_derived_from_the_cgroup():
    cid = "ab" * 32
    ruleset = include('<ContainerId condition="is" name="that one">' + cid + '</ContainerId>',
                      '<PidNamespace condition="more than">4026531836</PidNamespace>')
    assert ruleset.decide(ev(cgroup=f"/system.slice/docker-{cid}.scope")).rule_name == "that one"
    assert not ruleset.decide(ev(cgroup="/user.slice", pid_ns=4026531836)).keep
    assert ruleset.decide(ev(cgroup="/user.slice", pid_ns=4026532000)).keep
    assert ruleset.decide(ev(pid_ns=4026531836)).unknown == "ContainerId"  # no cgroup known: undecided


def test_container_and_file_fields_are_read_from_the_record_as_from_the_event():
    cid = "cd" * 32
    filters = [f'<ContainerId condition="is" name="c">{cid}</ContainerId>',
               '<Cgroup condition="contains" name="g">kubepods</Cgroup>',
               '<ImageInode condition="is" name="i">4242</ImageInode>',
               '<NamespacePid condition="less than" name="n">3</NamespacePid>',
               '<Hashes condition="contains" name="h">SHA256=AB</Hashes>']
    events = [ev(cgroup=f"/system.slice/docker-{cid}.scope"), ev(cgroup=f"/kubepods/pod1/{cid}"),
              ev(cgroup="/kubepods/besteffort"), ev(cgroup="/user.slice"), ev(exe_inode=4242), ev(ns_pid=1),
              ev(ns_pid=7, pid_ns=4026532000), ev(hashes="MD5=00,SHA256=ABCD"), ev(container_id=cid), ev()]
    for one in filters + ["".join(filters)]:
        ruleset = include(one)
        for event in events:
            assert ruleset.decide_record(event.encode()) == ruleset.decide(event), (one, event)


def test_ignored_rules_are_logged_once_at_load(caplog):
    with caplog.at_level("WARNING", logger="etwmon.rules"):
        include('<Product condition="contains" name="h">x</Product>')
    assert [r.getMessage() for r in caplog.records if "Product" in r.getMessage()].__len__() == 1


# --- the compiled evaluation agrees with a plain reading of the rules --------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from etwmon.rules import CONDITIONS as ALL_CONDITIONS  # noqa: E402
from etwmon.rules.engine import _predicate  # noqa: E402

FIELD_ATTRS = {"Image": "image", "CommandLine": "command_line", "User": "user"}
# A tiny alphabet, so that rule values and event values often meet (and cases differ: "B" vs "b").
PIECES = ["/", "a", "B", "b"]
text = st.lists(st.sampled_from(PIECES), min_size=0, max_size=4).map("".join)
# The kinds with indexed paths (look-ups, alternations, Aho-Corasick, path tails) come up most.
kinds = st.one_of(st.sampled_from(["is", "is any", "image", "begin with", "end with", "contains", "contains any"]),
                  st.sampled_from(sorted(ALL_CONDITIONS)))
condition = st.tuples(st.sampled_from(sorted(FIELD_ATTRS)), kinds,
                      st.lists(st.lists(st.sampled_from(PIECES), min_size=1, max_size=3).map("".join),
                               min_size=1, max_size=3))
rule = st.one_of(condition.map(lambda c: [c]), st.lists(condition, min_size=2, max_size=3))
side = st.integers(0, 24).flatmap(lambda n: st.lists(rule, min_size=n, max_size=n))


def _xml(rules_, onmatch: str) -> str:
    out = []
    for n, conditions in enumerate(rules_):
        parts = []
        for field, kind, values in conditions:
            value = ";".join(values) if kind.endswith((" any", " all")) else values[0]
            parts.append(f'<{field} condition="{kind}">{value}</{field}>')
        if len(parts) == 1:
            out.append(parts[0].replace(" condition=", f' name="{onmatch}{n}" condition=', 1))
        else:
            out.append(f'<Rule groupRelation="and" name="{onmatch}{n}">{"".join(parts)}</Rule>')
    return f'<ProcessCreate onmatch="{onmatch}">{"".join(out)}</ProcessCreate>'


def _kleene_rule(rule_, values):
    by_field: dict = {}
    for item in rule_.items:
        by_field.setdefault(item.field, []).append(item)
    results = []
    for field, items in by_field.items():
        v = values[field]
        results.append(None if v is None else any(_predicate(c)(v.lower()) for c in items))
    if rule_.relation == "and":
        return False if False in results else (None if None in results else True)
    return True if True in results else (None if None in results else False)


def _reference(ruleset, values):
    """Sysmon's semantics read straight off the rule list, no indexes."""
    def side_(onmatch):
        first, unknown = None, False
        for r in ruleset.rules:
            if r.onmatch != onmatch:
                continue
            result = _kleene_rule(r, values)
            if result and first is None:
                first = r
            unknown = unknown or result is None
        return first, unknown

    ex, ex_unknown = side_("exclude")
    if ex is not None:
        return False, ex.name, False
    if ("ProcessCreate", "include") not in ruleset.config.blocks:
        return True, None, ex_unknown
    inc, inc_unknown = side_("include")
    if inc is None:
        return (True, None, True) if inc_unknown else (False, None, False)
    return True, inc.name, ex_unknown


@settings(max_examples=120, deadline=None)
@given(side, side, st.fixed_dictionaries({f: st.one_of(st.none(), text) for f in FIELD_ATTRS}))
def test_compiled_rules_agree_with_a_plain_reading(includes, excludes, values):
    from unittest import mock

    from etwmon.rules import engine

    blocks = (_xml(includes, "include") if includes else "") + (_xml(excludes, "exclude") if excludes else "")
    with mock.patch.object(engine, "_AUTOMATON_FROM", 2):  # Aho-Corasick from two substrings on, to test it too
        ruleset = rules(f'<RuleGroup groupRelation="or">{blocks}</RuleGroup>')
    event = ev(values["CommandLine"] or "", **{FIELD_ATTRS[f]: v for f, v in values.items() if f != "CommandLine"})
    if values["CommandLine"] is None:
        event = dataclasses.replace(event, command_line=None)
    verdict = ruleset.decide(event)
    keep, name, unknown = _reference(ruleset, values)
    assert (verdict.keep, verdict.rule_name, verdict.unknown is not None) == (keep, name, unknown)


def test_remembered_answers_give_the_verdicts_a_fresh_rule_set_gives_and_stay_bounded():
    # A field index remembers its answer per value (images, parents and users recur): the second time an event
    # is judged it must get the verdict a rule set that remembers nothing gives, and hostile streams of distinct
    # or huge values must not grow the memory.
    import random

    from etwmon.rules import engine

    body = ('<Image condition="end with" name="sh">/sh</Image><Image condition="is">/usr/bin/x</Image>'
            '<CommandLine condition="contains any" name="c">curl;wget</CommandLine>'
            '<ParentImage condition="image" name="p">bash</ParentImage>'
            '<Rule groupRelation="and" name="pair"><Image condition="end with">/python3</Image>'
            '<CommandLine condition="contains">-c</CommandLine></Rule>')
    xml = (f'<RuleGroup name="" groupRelation="or"><ProcessCreate onmatch="include">{body}</ProcessCreate>'
           '</RuleGroup><RuleGroup name="" groupRelation="or"><ProcessCreate onmatch="exclude">'
           '<CommandLine condition="contains">--quiet</CommandLine></ProcessCreate></RuleGroup>')
    rng = random.Random(3)
    images = ["/bin/sh", "/usr/bin/x", "/usr/bin/python3", "/opt/y", "/usr/bin/bash", None]
    lines = ["python3 -c 1", "curl x", "ls --quiet", "a", "wget -c --quiet", ""]
    events = [ev(rng.choice(lines), image=rng.choice(images), parent_image=rng.choice(images)) for _ in range(600)]
    remembering = rules(xml)
    for event in events + events:
        assert remembering.decide(event) == rules(xml).decide(event), event
    index = next(i for name, i, _, _ in remembering._events["ProcessCreate"].indexes if name == "Image")
    assert 0 < len(index.memo) <= len(images)
    for n in range(engine._MEMO_ITEMS * 2 + 7):
        remembering.decide(ev(image=f"/tmp/{n}"))
        assert len(index.memo) <= engine._MEMO_ITEMS
    index.memo.clear()
    remembering.decide(ev(image="/" + "x" * engine._MEMO_CHARS + "/sh"))
    assert not index.memo  # too long to keep
