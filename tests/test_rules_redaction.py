"""Redaction: user patterns through RE2 (linear time, refused with file and line when RE2 cannot express them), and
secrets that straddle a cut (the 32 K command-line cut, the ~4 K ParentCommandLine cut, a kernel that read only a
prefix of argv) never reach a record or an output, not even in part (docs/rules.md, "Redaction at a cut")."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
import time

import pytest

pytest.importorskip("defusedxml")
re2 = pytest.importorskip("re2")

from etwmon import formats, parse  # noqa: E402
from etwmon import records as R  # noqa: E402
from etwmon.errors import RuleConfigError  # noqa: E402
from etwmon.identity import IdentityStage  # noqa: E402
from etwmon.rules import RuleSet, RulesStage  # noqa: E402
from etwmon.rules.redact import prefix_pattern  # noqa: E402

from .helpers import ListSink  # noqa: E402

KEY = r"AKIA[0-9A-Z]{16}"
PASSWORD = r"--password[= ](\S+)"


def redactions(*patterns: str) -> RuleSet:
    body = "".join(f"<Redact>{p}</Redact>" for p in patterns)
    return RuleSet.from_xml(f'<Sysmon schemaversion="4.90">\n<Redaction>\n{body}</Redaction></Sysmon>', "red.xml")


# --- RE2 -------------------------------------------------------------------------------------------------------


def test_patterns_run_on_re2():
    rules = redactions(PASSWORD)
    (redactor,) = rules._redactors.redactors
    assert type(redactor.regex).__module__.startswith("re2")
    assert rules.redact("x --password=hunter2 y")[0] == "x --password=*** y"


@pytest.mark.parametrize("pattern, line, redacted", [
    ("(a|aa)+", "a" * 32_000 + "!", "a" * 31_999 + "***!"),  # (its group is redacted: the last a)
    (r".*--password[= ](\S+)", "x " * 16_000 + "--passwordX", None),
])
def test_catastrophic_patterns_take_linear_time(pattern, line, redacted):
    """Both patterns backtrack (exponentially, quadratically) in Python's re; RE2 scans once. Work per input
    character stays flat when the input doubles (loosely: a quadratic engine would show 2x, this allows 1.5x of
    slack on top of linear under load)."""
    rules = redactions(pattern)

    def per_char(text: str) -> float:
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            rules.redact(text)
            best = min(best, time.perf_counter() - t0)
        return best / len(text)

    assert rules.redact(line)[0] == (redacted or line)
    short, long_ = per_char(line), per_char(line * 2)
    assert long_ < 3 * short, (short, long_)


@pytest.mark.parametrize("pattern, why", [(r"(a)\1", "backreference"), (r"pass(?=word)", "lookaround"),
                                          (r"(?<!x)y", "lookaround"), (r"a{,3}", "{0,n}"),
                                          (r"[[:alpha:]]+=x", "Python's re"), ("a[", "RE2")])
def test_what_re2_cannot_express_is_refused_with_file_and_line(pattern, why):
    with pytest.raises(RuleConfigError, match=r"red\.xml, line 3: .*") as caught:
        redactions(pattern)
    assert why.split()[0] in str(caught.value) or why in ("backreference", "lookaround")


def test_nested_repetitions_are_no_longer_refused_they_are_linear():
    rules = redactions(r"tok=((\w+\s?)*)")
    assert rules.redact("a tok=aa bb cc")[0] == "a tok=***"


def test_undecodable_bytes_survive_redaction_exactly():
    line = "prog \udcff\udc80 --password=s\udcfecret tail \udc81"
    new, applied = redactions(PASSWORD).redact(line)
    assert applied and new == "prog \udcff\udc80 --password=*** tail \udc81"


# --- the prefix closure ----------------------------------------------------------------------------------------

PATTERNS = [KEY, PASSWORD, r"tok_[a-z0-9]+", r"(?i)bearer\s+[a-z0-9._-]{8,}", r"x(?:ab|cd)*y", r"\bpw=\w+\b",
            r"^secret:[^ ]{3,5}$", r"(?:k1|key)=(v+|w)", r"a.{2}b", r"[^\s]{4}Z"]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_prefix_pattern_matches_every_prefix_of_every_match_and_only_prefixes(pattern):
    rng = random.Random(pattern)
    alphabet = "AKIAZ09xyabcdkevwtoq_-=: tokenBEARERpw\t" + "XYZ0123456789"
    prefixes = re2.compile(f"(?:{prefix_pattern(pattern)})")
    full = re2.compile(pattern)
    found = 0
    samples = [
        "AKIA" + "".join(rng.choice("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(16)),
        "--password=hunter2", "tok_ab12", "Bearer abcdefgh.ij", "xabcdaby", "pw=word", "secret:abcd",
        "key=vvv", "k1=w", "aXYb", "abcdZ",
    ] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    for text in samples:
        for match in full.finditer(text):
            whole = match.group()
            found += 1
            for end in range(len(whole) + 1):
                assert prefixes.fullmatch(whole[:end]), (pattern, whole, end)
    assert found
    # And not everything: a text that no match can begin with is not a prefix.
    assert not prefixes.fullmatch(" \u2603 ")


# --- secrets at a cut --------------------------------------------------------------------------------------------

SECRET_CHARS = re.compile("[0-9A-Z]")  # the filler below is lower case, the secrets upper case and digits


def key(rng: random.Random) -> str:
    return "AKIA" + "".join(rng.choice("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(16))


def outputs(record: bytes, ecs: bool) -> list[str]:
    """Everything a reader can get from one record: its text (both encodings of the raw bytes), the text line,
    JSON and (``ecs``: it splits argv with shlex, slow on 32 K) ECS of its event."""
    (event,) = list(parse(record))
    raw = record.decode("utf-16-le", "replace")
    return [raw, record[1:].decode("utf-16-le", "replace"), record.decode("latin-1"), formats.format_event(event),
            formats.json_line(event)] + ([formats.ecs_line(event)] if ecs else [])


def assert_no_secret(record: bytes, secret: str, ecs: bool = True) -> None:
    """Not one character of ``secret`` in the record's command-line fields, and none of its 4-character pieces
    anywhere a reader looks (raw bytes in any alignment, text, JSON, ECS)."""
    (event,) = list(parse(record))
    for field in (event.command_line, event.parent_command_line or ""):
        assert not SECRET_CHARS.search(field.replace(R.TRUNCATION_MARKER, "")), field[-80:]
    pieces = {secret[i:i + 4] for i in range(len(secret) - 3) if SECRET_CHARS.search(secret[i:i + 4])}
    for text in outputs(record, ecs):
        assert not [p for p in pieces if p in text]


_COMPILED: dict[tuple[str, ...], RuleSet] = {}


def stage_for(*patterns: str) -> tuple[RulesStage, ListSink]:
    if patterns not in _COMPILED:
        _COMPILED[patterns] = redactions(*patterns)
    sink = ListSink()
    return RulesStage(sink, _COMPILED[patterns]), sink


def offsets_around(cut: int, width: int = 40) -> range:
    return range(cut - width, cut + 8)


@pytest.mark.parametrize("pattern", [KEY, PASSWORD])
def test_a_secret_at_the_command_line_cut_never_leaks(pattern):
    rng = random.Random(1)
    cut = R.MAX_COMMAND_LINE - len(R.TRUNCATION_MARKER)
    for offset in offsets_around(cut):
        secret = key(rng) if pattern == KEY else "--password=" + key(rng)[4:]
        filler = "x" * offset
        line = filler + secret + " y" * 40
        stage, sink = stage_for(pattern)
        stage.push(R.encode_process_exec(R.filetime_now(), 10, 1, 10, 10, line))
        (record,) = sink.records
        (event,) = list(parse(record))
        assert event.command_line.endswith(R.TRUNCATION_MARKER)
        assert_no_secret(record, secret, ecs=offset % 8 == 0)
        if offset + len(secret) <= cut:  # whole before the cut: redacted as usual, the text around kept
            assert event.command_line.startswith(filler)


def test_a_secret_at_the_parent_command_line_cut_never_leaks():
    """A 32 K command line and a 32 K ParentCommandLine do not both fit: the parent's is cut to ~4 K."""
    rng = random.Random(2)
    probe = R.encode_process_exec(R.filetime_now(), 10, 1, 10, 10, "x" * 40_000,
                                  R.Details(parent_command_line="y" * 40_000, image="/usr/bin/x"))
    (event,) = list(parse(probe))
    cut = len(event.parent_command_line) - len(R.TRUNCATION_MARKER)
    assert 3_000 < cut < 5_000
    for offset in offsets_around(cut):
        secret = key(rng)
        parent = "y" * offset + secret + " z" * 100
        record = R.encode_process_exec(R.filetime_now(), 10, 1, 10, 10, "x" * 40_000,
                                       R.Details(parent_command_line=parent, image="/usr/bin/x"))
        stage, sink = stage_for(KEY)
        stage.push(record)
        (out,) = sink.records
        assert_no_secret(out, secret, ecs=offset % 8 == 0)
        (event,) = list(parse(out))
        assert event.parent_command_line.endswith(R.TRUNCATION_MARKER) and event.image == "/usr/bin/x"


def test_a_prefix_the_kernel_cut_and_the_join_quoted_is_redacted_to_the_cut():
    """The bpf source joins argv with shlex quoting, so a cut inside a quoted argument ends with its quote."""
    rng = random.Random(3)
    for keep in range(0, 20):
        secret = key(rng)
        line = R.command_line_from_argv(["/bin/tool", "x$" + secret[:keep]]) + R.TRUNCATION_MARKER
        stage, sink = stage_for(KEY)
        stage.push(R.encode_process_exec(R.filetime_now(), 10, 1, 10, 10, line))
        (record,) = sink.records
        (event,) = list(parse(record))
        assert not SECRET_CHARS.search(event.command_line.replace(R.TRUNCATION_MARKER, "")), event.command_line
        assert event.command_line.startswith("/bin/tool ")


def test_an_uncut_text_keeps_a_partial_match_at_its_end():
    """Only a cut text is redacted from where a match could begin: a whole one ending in 'AKIA12' is not."""
    assert redactions(KEY).redact("see AKIA12")[0] == "see AKIA12"
    assert redactions(KEY).redact("see AKIA12" + R.TRUNCATION_MARKER)[0] == "see ***" + R.TRUNCATION_MARKER


def test_through_identity_and_rules_a_parents_secret_never_reaches_a_child_record():
    """The pipeline as Monitor builds it: the identity stage gives each child its parent's command line (cut
    to fit), the rules stage redacts it."""
    rng = random.Random(4)
    rules = redactions(KEY)

    def run(parent_line: str) -> list[bytes]:
        sink = ListSink()
        stage = IdentityStage(RulesStage(sink, rules), b"h" * 16)
        t = R.filetime_now()
        stage.push(R.encode_process_create(t, 500, 1, 1, 1, "sh", R.Details(start_filetime=t)))
        stage.push(R.encode_process_exec(t + 1, 500, 1, 500, 500, parent_line))
        stage.push(R.encode_process_create(t + 2, 501, 500, 500, 500, "x" * 40_000,
                                           R.Details(start_filetime=t + 2)))
        return sink.records

    child = list(parse(run("y" * 20_000)[-1]))[0]
    cut = len(child.parent_command_line) - len(R.TRUNCATION_MARKER)
    assert 3_000 < cut < 5_000
    for offset in offsets_around(cut):
        secret = key(rng)
        records = run("y" * offset + secret + " z" * 5_000)
        for record in records:
            assert_no_secret(record, secret, ecs=offset % 8 == 0)
        child = list(parse(records[-1]))[0]
        assert child.parent_command_line.endswith(R.TRUNCATION_MARKER)


# --- live: the kernel's cut, the record's cut, the parent's cut ------------------------------------------------

CHILD = "import subprocess, sys; subprocess.run([sys.argv[1], sys.argv[2] + 'c', 'z' * 40000], check=True)"


def _live_run(tag: str, commands: list[list[str]], until) -> tuple[bytes, list]:
    """Run ``commands`` under a Monitor redacting KEY, draining it as they run (the machine's other processes
    fill the ring too); (every byte read, the events of ``tag``, and the Monitor's drop count)."""
    from etwmon import Monitor

    raw = bytearray()
    buf = bytearray(1 << 20)
    events: list = []

    def drain() -> None:
        while n := monitor.readinto(buf):
            nonlocal raw
            raw += buf[:n]
            events.extend(e for e in parse(bytes(buf[:n])) if tag in getattr(e, "command_line", ""))

    with Monitor(rules=redactions(KEY), max_items=100_000, max_bytes=256 << 20) as monitor:
        time.sleep(0.3)
        for argv in commands:
            subprocess.run(argv, check=True)
            drain()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not until(events):
            monitor.wait(0.5)
            drain()
        assert monitor.stats.dropped == 0 and monitor.stats.lost == 0
    return bytes(raw), events


@pytest.mark.root
def test_live_a_secret_around_every_cut_never_reaches_a_reader():
    """The whole path (source, identity, rules, ring): a key in argv around the kernel's 32 KiB read limit and the
    record's 32 K cut, and in a parent's argv around the ~4 K cut of a child's ParentCommandLine."""
    true, python = shutil.which("true"), sys.executable
    rng = random.Random(5)
    tag = "etwmonrd" + "".join(rng.choice("abcdefghij") for _ in range(8))
    parent = [python, "-c", CHILD, true, tag]
    # Where the child's ParentCommandLine is cut, measured on a run without a secret.
    _, events = _live_run(tag, [parent + ["y" * 40_000]], lambda ev: any((tag + "c") in e.command_line
                                                                          for e in ev))
    child = next(e for e in events if (tag + "c") in e.command_line)
    assert child.parent_command_line.endswith(R.TRUNCATION_MARKER), child.parent_command_line[-40:]
    cut = len(child.parent_command_line) - len(R.TRUNCATION_MARKER) - child.parent_command_line.index("yyyy")
    secrets, commands = [], []
    for offset in range(32_700, 32_800, 9):  # argv bytes: the record keeps ~32,735 characters, the kernel 32,768
        secret = key(rng)
        secrets.append(secret)
        commands.append([true, tag, "x" * (offset - len(true) - len(tag) - 2) + secret + "x" * 60])
    for offset in range(cut - 30, cut + 6, 3):
        secret = key(rng)
        secrets.append(secret)
        commands.append(parent + ["y" * offset + secret + "y" * 40_000])
    raw, events = _live_run(tag, commands, lambda ev: sum((tag + "c") in e.command_line for e in ev) >= 12
                            and sum(e.command_line.startswith(true) for e in ev) >= 12 + 12)
    assert sum((tag + "c") in e.command_line for e in events) >= 12, "children not seen"
    texts = [raw.decode("utf-16-le", "replace"), raw[1:].decode("utf-16-le", "replace"), raw.decode("latin-1")]
    texts += [formats.format_event(e) for e in events] + [formats.json_line(e) for e in events]
    for secret in secrets:
        pieces = {secret[i:i + 4] for i in range(len(secret) - 3)}
        assert not [(p, secret) for p in pieces for text in texts if p in text]
    for event in events:
        for field in (event.command_line, event.parent_command_line or ""):
            after = field.split(tag, 1)[-1] if tag in field else ""  # (the program and its code come before)
            assert not SECRET_CHARS.search(after.replace(R.TRUNCATION_MARKER, "")), after[-60:]
