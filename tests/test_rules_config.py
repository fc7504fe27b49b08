"""Reading configurations: hostile, malformed, oversized or unsafe files are refused with a clear error naming the
file and line, and nothing is started (no Monitor, no `tail`)."""

from __future__ import annotations

import builtins
import os
import stat
import subprocess
import sys

import pytest

pytest.importorskip("defusedxml")

from etwmon import Monitor  # noqa: E402
from etwmon.errors import RuleConfigError, RulesError  # noqa: E402
from etwmon.rules import MAX_CONFIG_BYTES, RuleSet  # noqa: E402

GOOD = ('<Sysmon schemaversion="4.90"><EventFiltering><RuleGroup name="" groupRelation="or">'
        '<ProcessCreate onmatch="include"><CommandLine condition="contains">x</CommandLine></ProcessCreate>'
        '</RuleGroup></EventFiltering></Sysmon>')

BILLION_LAUGHS = '''<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<Sysmon schemaversion="4.90"><EventFiltering><ProcessCreate onmatch="include">
<CommandLine condition="contains">&lol4;</CommandLine></ProcessCreate></EventFiltering></Sysmon>'''

EXTERNAL_ENTITY = '''<?xml version="1.0"?>
<!DOCTYPE Sysmon [<!ENTITY secret SYSTEM "file:///etc/passwd">]>
<Sysmon schemaversion="4.90"><EventFiltering><ProcessCreate onmatch="include">
<CommandLine condition="contains">&secret;</CommandLine></ProcessCreate></EventFiltering></Sysmon>'''

EXTERNAL_DTD = '''<?xml version="1.0"?>
<!DOCTYPE Sysmon SYSTEM "http://127.0.0.1:9/sysmon.dtd">
<Sysmon schemaversion="4.90"><EventFiltering/></Sysmon>'''


def body(text: str) -> str:
    return f'<Sysmon schemaversion="4.90"><EventFiltering>{text}</EventFiltering></Sysmon>'


# (configuration, words the error must contain)
REFUSED = [
    (BILLION_LAUGHS, ["DOCTYPE", "entities"]),
    (EXTERNAL_ENTITY, ["DOCTYPE"]),
    (EXTERNAL_DTD, ["DOCTYPE"]),
    ('<Sysmon schemaversion="4.90"><EventFiltering><ProcessCreate onmatch="include">', ["line 1",
                                                                                        "not well-formed"]),
    ("<Sysmon>\n<EventFiltering>\n</Sysmon>", ["line 3", "not well-formed"]),
    ("", ["not well-formed"]),
    ("<NotSysmon/>", ["root element must be <Sysmon>"]),
    (body('<ProcessCreate onmatch="include">\n<Image condition="starts with">x</Image></ProcessCreate>'),
     ["line 2", "unknown condition 'starts with'", "begin with"]),
    (body('<ProcessCreate onmatch="include"><Imagepath>x</Imagepath></ProcessCreate>'),
     ["ProcessCreate has no field 'Imagepath'", "Image"]),
    (body('<ProcessTerminate onmatch="include"><CommandLine>x</CommandLine></ProcessTerminate>'),
     ["ProcessTerminate has no field 'CommandLine'"]),
    (body('<ProcessCreat onmatch="include"/>'), ["unknown event type <ProcessCreat>"]),
    (body('<ProcessCreate onmatch="maybe"/>'), ["onmatch", "'maybe'"]),
    (body('<ProcessCreate/>'), ["onmatch", "None"]),
    (body('<RuleGroup groupRelation="xor"><ProcessCreate onmatch="include"/></RuleGroup>'),
     ["groupRelation", "'xor'"]),
    (body('<ProcessCreate onmatch="include"><Rule groupRelation="and"/></ProcessCreate>'), ["empty <Rule>"]),
    (body('<ProcessCreate onmatch="include"><Rule><Rule><Image>x</Image></Rule></Rule></ProcessCreate>'),
     ["<Rule> may not contain a <Rule>"]),
    (body('<ProcessCreate onmatch="include"><Image condition="is any">;;</Image></ProcessCreate>'),
     ["needs a ;-separated list"]),
    (body('<ProcessCreate onmatch="include"><ProcessId condition="less than">abc</ProcessId></ProcessCreate>'),
     ["ProcessId is a number"]),
    (body('<ProcessCreate onmatch="include"><Image><x/></Image></ProcessCreate>'), ["may not contain elements"]),
    (body('') + '<Redaction><Redact>(unclosed</Redact></Redaction>', ["well-formed"]),
    ('<Sysmon><EventFiltering/><Redaction><Redact>(unclosed</Redact></Redaction></Sysmon>',
     ["line 1", "not a pattern RE2 can match", "missing )"]),
    ('<Sysmon><EventFiltering/><Redaction><Redact>(\\w)\\1</Redact></Redaction></Sysmon>',
     ["line 1", "RE2", "backreferences"]),
    ('<Sysmon><EventFiltering/><Redaction><Redact>pw=(?!x)\\w+</Redact></Redaction></Sysmon>',
     ["line 1", "RE2", "lookarounds"]),
    ('<Sysmon><EventFiltering/><Redaction><Redact></Redact></Redaction></Sysmon>', ["empty <Redact>"]),
    ('<Sysmon><EventFiltering/><Redaction><Mask>x</Mask></Redaction></Sysmon>', ["<Redact> elements"]),
    ('<Sysmon><EventFiltering/><EventFiltering/></Sysmon>', ["more than one <EventFiltering>"]),
    ("<Sysmon>" + "<a>" * 20 + "</a>" * 20 + "</Sysmon>", ["nested more than"]),
]


@pytest.mark.parametrize("text,words", REFUSED, ids=range(len(REFUSED)))
def test_refused_with_a_clear_error(text, words):
    with pytest.raises(RuleConfigError) as caught:
        RuleSet.from_xml(text, "my.xml")
    message = str(caught.value)
    assert message.startswith("my.xml")
    for word in words:
        assert word in message, message


def test_billion_laughs_is_refused_before_any_expansion(tmp_path):
    # Nine levels would be 10^9 "lol"s: refused at the DOCTYPE, so this returns at once with little memory.
    deep = BILLION_LAUGHS.replace("]>", "".join(
        f' <!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">\n' for i in range(5, 10)) + "]>").replace("&lol4;", "&lol9;")
    with pytest.raises(RuleConfigError, match="DOCTYPE"):
        RuleSet.from_xml(deep)


def test_plain_redaction_patterns_load():
    ok = RuleSet.from_xml('<Sysmon><EventFiltering/><Redaction><Redact>(--password[= ])(\\S+)</Redact>'
                          '<Redact>token=[A-Za-z0-9]{8,64}</Redact></Redaction></Sysmon>')
    assert len(ok.redactions) == 2


def test_good_config_loads_from_a_file(tmp_path):
    path = tmp_path / "sysmon.xml"
    path.write_text(GOOD)
    path.chmod(0o644)
    assert RuleSet.load(path).rules[0].items[0].value == "x"


def test_a_10_mb_config_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "big.xml"
    with open(path, "w") as f:
        f.write('<Sysmon schemaversion="4.90"><EventFiltering><ProcessCreate onmatch="include">')
        line = '<CommandLine condition="contains">padding-padding-padding-padding</CommandLine>\n'
        f.write(line * (10_000_000 // len(line)))
        f.write("</ProcessCreate></EventFiltering></Sysmon>")
    path.chmod(0o644)
    assert path.stat().st_size > 10_000_000 > MAX_CONFIG_BYTES
    with pytest.raises(RuleConfigError, match="more than the"):
        RuleSet.load(path)
    with pytest.raises(RuleConfigError, match="more than the"):
        RuleSet.from_xml(path.read_bytes())


def test_a_world_writable_config_is_refused(tmp_path):
    path = tmp_path / "sysmon.xml"
    path.write_text(GOOD)
    path.chmod(0o666)
    with pytest.raises(RuleConfigError, match="anyone may write it"):
        RuleSet.load(path)


def config_in(directory, mode: int = 0o644, uid: int | None = None, name: str = "sysmon.xml"):
    """A good configuration file in ``directory`` with ``mode`` (and owner ``uid``)."""
    path = directory / name
    path.write_text(GOOD)
    path.chmod(mode)
    if uid is not None:
        os.chown(path, uid, uid)
    return path


def subdir(parent, name: str, mode: int, uid: int | None = None):
    path = parent / name
    path.mkdir()
    path.chmod(mode)  # (chmod: the umask does not apply, the sticky bit stays)
    if uid is not None:
        os.chown(path, uid, uid)
    return path


NOBODY = 65534


def test_a_symlink_in_a_world_writable_directory_is_not_followed(tmp_path):
    target = config_in(tmp_path, name="real.xml")
    link = subdir(tmp_path, "shared", 0o1777) / "sysmon.xml"
    link.symlink_to(target)
    with pytest.raises(RuleConfigError, match="symlink"):
        RuleSet.load(link)
    (subdir(tmp_path, "private", 0o755) / "sysmon.xml").symlink_to(target)
    assert RuleSet.load(tmp_path / "private" / "sysmon.xml").rules  # elsewhere a symlinked configuration is fine


def test_a_root_owned_config_in_a_sticky_directory_loads_and_the_tmp_case_is_documented(tmp_path):
    """/tmp: anyone may add names, nobody may remove or rename another's file: a file of root's (or yours) there
    cannot be swapped."""
    assert RuleSet.load(config_in(subdir(tmp_path, "sticky", 0o1777))).rules


def test_a_config_writable_by_its_group_or_in_a_directory_others_may_write_is_refused(tmp_path):
    with pytest.raises(RuleConfigError, match="its group may write it"):
        RuleSet.load(config_in(tmp_path, 0o664))
    with pytest.raises(RuleConfigError, match="writable by others"):
        RuleSet.load(config_in(subdir(tmp_path, "group", 0o775)))
    with pytest.raises(RuleConfigError, match="writable by others"):  # any directory above it counts
        RuleSet.load(config_in(subdir(subdir(tmp_path, "open", 0o777), "inner", 0o755)))


def test_a_symlink_to_a_config_in_an_unsafe_place_is_refused(tmp_path):
    target = config_in(subdir(tmp_path, "open", 0o777))
    link = subdir(tmp_path, "mine", 0o755) / "sysmon.xml"
    link.symlink_to(target)
    with pytest.raises(RuleConfigError, match="writable by others"):
        RuleSet.load(link)


@pytest.mark.root
def test_a_config_owned_by_someone_else_in_a_world_writable_directory_is_refused(tmp_path):
    with pytest.raises(RuleConfigError, match=f"owned by uid {NOBODY}"):
        RuleSet.load(config_in(subdir(tmp_path, "shared", 0o1777), uid=NOBODY))


@pytest.mark.root
def test_a_config_owned_by_another_user_is_refused_even_in_a_private_directory(tmp_path):
    """The file is nobody's (0644, in nobody's 0755 directory): nobody could rewrite it before the next SIGHUP."""
    home = subdir(tmp_path, "home", 0o755, uid=NOBODY)
    path = config_in(home, uid=NOBODY)
    with pytest.raises(RuleConfigError, match=f"owned by uid {NOBODY}"):
        RuleSet.load(path)
    os.chown(path, 0, 0)  # root's file, but in nobody's directory: nobody could replace it
    with pytest.raises(RuleConfigError, match=f"home: it is owned by uid {NOBODY}"):
        RuleSet.load(path)
    nobody_sticky = subdir(tmp_path, "their-tmp", 0o1777, uid=NOBODY)  # sticky, but its owner may remove anything
    with pytest.raises(RuleConfigError, match=f"owned by uid {NOBODY}"):
        RuleSet.load(config_in(nobody_sticky))


def test_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "fifo.xml"
    os.mkfifo(fifo)
    with pytest.raises(RuleConfigError, match="not a regular file"):
        RuleSet.load(fifo)  # returns at once: opened without blocking, refused by its type
    with pytest.raises(RuleConfigError, match="not a regular file"):
        RuleSet.load(tmp_path)
    with pytest.raises(RuleConfigError, match="cannot open"):
        RuleSet.load(tmp_path / "missing.xml")


def test_without_defusedxml_the_error_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_defusedxml(name, *args, **kwargs):
        if name.startswith("defusedxml"):
            raise ImportError("No module named 'defusedxml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_defusedxml)
    with pytest.raises(RulesError, match=r"etwmon\[rules\]") as caught:
        RuleSet.from_xml(GOOD)
    assert not isinstance(caught.value, RuleConfigError)


def test_a_refused_config_starts_no_monitor(tmp_path):
    path = tmp_path / "bad.xml"
    path.write_text(BILLION_LAUGHS)
    path.chmod(0o644)
    with pytest.raises(RuleConfigError):
        Monitor(source="procfs", rules=path)  # raised in the constructor: no source was opened


def test_tail_with_a_refused_config_exits_2_before_watching(tmp_path):
    path = tmp_path / "bad.xml"
    path.write_text(EXTERNAL_ENTITY)
    path.chmod(0o644)
    proc = subprocess.run([sys.executable, "-m", "etwmon", "tail", "--source", "procfs", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--config" in proc.stderr and "DOCTYPE" in proc.stderr
    assert "watching" not in proc.stderr and proc.stdout == ""


def test_rules_check_lists_applied_and_ignored_rules_per_rule(tmp_path):
    path = tmp_path / "sysmon.xml"
    path.write_text('<Sysmon schemaversion="4.90">\n<HashAlgorithms>sha256</HashAlgorithms>\n<EventFiltering>\n'
                    '<RuleGroup name="grp" groupRelation="or">\n<ProcessCreate onmatch="include">\n'
                    '<Image condition="image" name="shells">bash</Image>\n'
                    '<IntegrityLevel condition="is" name="bad hash">High</IntegrityLevel>\n'
                    '</ProcessCreate>\n</RuleGroup>\n<DnsQuery onmatch="exclude"/>\n</EventFiltering>\n'
                    '<Redaction><Redact name="pw">--password=(\\S+)</Redact></Redaction>\n</Sysmon>\n')
    path.chmod(0o644)
    proc = subprocess.run([sys.executable, "-m", "etwmon", "rules", "check", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "2 rules for ProcessCreate/ProcessTerminate: 1 applied, 1 ignored" in lines[0]
    assert any(line.startswith("applied") and "'shells'" in line and "line 6" in line for line in lines)
    assert any(line.startswith("IGNORED") and "'bad hash'" in line and "integrity levels" in line for line in lines)
    assert any(line.startswith("IGNORED") and "DnsQuery" in line for line in lines)
    assert not any("HashAlgorithms" in line for line in lines)  # applied: the hashes are computed
    assert any(line.startswith("redacts") and "'pw'" in line for line in lines)
    assert proc.stderr == ""  # said once, in the report
    as_json = subprocess.run([sys.executable, "-m", "etwmon", "rules", "check", "--json", str(path)],
                             capture_output=True, text=True, timeout=60)
    import json

    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [(r["kind"], r["applied"]) for r in records] == [("rule", True), ("rule", False), ("ignored", False),
                                                           ("redaction", True)]
    path.write_text(BILLION_LAUGHS)
    refused = subprocess.run([sys.executable, "-m", "etwmon", "rules", "check", str(path)], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "DOCTYPE" in refused.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_ship_loads_its_config_before_anything_and_tail_from_refuses_one(tmp_path):
    path = tmp_path / "bad.xml"
    path.write_text(BILLION_LAUGHS)
    path.chmod(0o644)
    ship = subprocess.run([sys.executable, "-m", "etwmon", "ship", "--to", "nats://127.0.0.1:1", "--source",
                           "procfs", "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert ship.returncode == 2 and "DOCTYPE" in ship.stderr and "shipping" not in ship.stderr
    good = tmp_path / "good.xml"
    good.write_text(GOOD)
    good.chmod(0o644)
    remote = subprocess.run([sys.executable, "-m", "etwmon", "tail", "--from", "nats://127.0.0.1:1", "--config",
                             str(good)], capture_output=True, text=True, timeout=60)
    assert remote.returncode == 2 and "ship --config" in remote.stderr
