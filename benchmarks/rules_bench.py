"""Rules: what a Sysmon configuration of ~500 rules costs per event.

Figures per event, measured in one process with the garbage collector off:
- evaluation: ``RuleSet.decide`` on ProcessCreate events that carry every field (image, parent image, user, ...
  as the identity stage provides them), against the same call with a one-rule configuration;
- the stage: records pushed through ``RulesStage`` into a sink that keeps them, against the same records pushed
  into that sink directly (a mixed stream: create, exec, exit and thread records, each with the extension block
  the identity stage writes), i.e. what rules add between the source and the ring, reading the records included;
- the same with two ``<Redact>`` patterns added to the configuration.
"""

from __future__ import annotations

import dataclasses
import logging
import random

from common import progress, summary, target, timed as _timed
from etwmon.records import (
    Details, ProcessExec, encode_process_create, encode_process_exec, encode_process_exit, encode_thread_create,
    encode_thread_exit, filetime_now,
)
from etwmon.rules import RuleSet, RulesStage

_BINARIES = ["bash", "sh", "python3", "curl", "wget", "ssh", "sshd", "cron", "systemd", "sudo", "git", "make",
             "gcc", "cc1", "ld", "tar", "gzip", "find", "grep", "sed", "awk", "perl", "node", "java", "docker",
             "containerd-shim", "runc", "kubelet", "nginx", "postgres", "redis-server", "apt-get", "dpkg", "ls",
             "cat", "ps", "top", "nc", "socat", "base64", "openssl", "mount", "useradd", "passwd", "crontab",
             "journalctl", "systemctl", "ip", "iptables", "tcpdump"]
_DIRS = ["/usr/bin", "/bin", "/usr/sbin", "/usr/local/bin", "/opt/app/bin", "/tmp", "/home/user/.local/bin"]
_WORDS = ["--verbose", "-c", "-la", "install", "status", "--user", "/etc/passwd", "http://example.org/x",
          "-o", "out.txt", "--password=secret", "base64", "-d", "start", "--now", "run", "-it", "alpine", "sh"]


#: The configuration's rules, shaped like the big public configurations (our own rules): (block, how many, the
#: filter for the i-th one; ``b``/``d``: a random binary name / directory).
_RULES = [
    ("include", 110, '<Image condition="end with">/{b}{i}</Image>'),
    ("include", 80, '<CommandLine condition="contains" name="technique_{i}">marker-{i}-</CommandLine>'),
    ("include", 40, '<ParentImage condition="image">{b}-{i}</ParentImage>'),
    ("include", 40, '<Image condition="is">{d}/tool-{i}</Image>'),
    ("include", 20, '<CommandLine condition="begin with">{d}/start-{i}</CommandLine>'),
    ("include", 20, '<Rule groupRelation="and" name="pair_{i}"><Image condition="end with">/{b}</Image>'
                    '<CommandLine condition="contains">flag-{i}</CommandLine></Rule>'),
    ("exclude", 60, '<Image condition="is">{d}/noise-{i}</Image>'),
    ("exclude", 30, '<CommandLine condition="contains">quiet-{i}</CommandLine>'),
    ("exclude", 30, '<ParentImage condition="is">/usr/lib/helper-{i}</ParentImage>'),
    ("exclude", 10, '<ParentCommandLine condition="contains">parent-quiet-{i}</ParentCommandLine>'),
    ("exclude", 20, '<Rule groupRelation="and"><User condition="is">svc-{i}</User>'
                    '<CurrentDirectory condition="begin with">/var/lib/svc-{i}</CurrentDirectory></Rule>'),
    ("terminate", 40, '<Image condition="begin with">/opt/watched-{i}/</Image>'),
]


def make_config(rng: random.Random, redactions: str = "") -> str:
    """A ~500-rule configuration in Sysmon's format (``redactions``: <Redact> elements to add)."""
    blocks: dict[str, list[str]] = {"include": [], "exclude": [], "terminate": []}
    for block, count, template in _RULES:
        blocks[block] += [template.format(i=i, b=rng.choice(_BINARIES), d=rng.choice(_DIRS)) for i in range(count)]
    redaction = f"<Redaction>{redactions}</Redaction>" if redactions else ""
    return (f'<Sysmon schemaversion="4.90"><EventFiltering><RuleGroup name="bench" groupRelation="or">'
            f'<ProcessCreate onmatch="include">{"".join(blocks["include"])}</ProcessCreate></RuleGroup>'
            f'<RuleGroup name="" groupRelation="or"><ProcessCreate onmatch="exclude">{"".join(blocks["exclude"])}'
            f'</ProcessCreate></RuleGroup><RuleGroup name="" groupRelation="or">'
            f'<ProcessTerminate onmatch="include">{"".join(blocks["terminate"])}</ProcessTerminate></RuleGroup>'
            f'</EventFiltering>{redaction}</Sysmon>')


#: Two redactions of the kind docs/rules.md shows, for the redacting figure.
_REDACTIONS = r"<Redact>--password[= ](\S+)</Redact><Redact>Bearer [A-Za-z0-9._-]+</Redact>"


_SMALL = ('<Sysmon schemaversion="4.90"><EventFiltering><RuleGroup groupRelation="or">'
          '<ProcessCreate onmatch="include"><Image condition="end with">/never</Image></ProcessCreate>'
          '</RuleGroup></EventFiltering></Sysmon>')


def _details(rng: random.Random, pid: int, image: str) -> Details:
    """What the identity stage writes into a process record's extension block."""
    return Details(process_guid=f"{{6f1c0000-{pid & 0xFFFF:04x}-0000-0000-000000000001}}",
                   parent_process_guid="{6f1c0000-0001-0000-0000-000000000001}", uid=1000, image=image,
                   current_directory="/home/user", user="user", parent_image=f"/usr/bin/{rng.choice(_BINARIES)}",
                   parent_user="user", parent_command_line="/bin/bash -l", start_filetime=filetime_now())


def _command_line(rng: random.Random, image: str, i: int) -> str:
    line = " ".join([image] + rng.sample(_WORDS, rng.randint(1, 6)))
    if i % 10 == 0:  # one in ten is included by a CommandLine rule somewhere in the list
        line += f" marker-{rng.randrange(80)}-"
    return line


def make_events(rng: random.Random, count: int) -> list[ProcessExec]:
    events = []
    for i in range(count):
        image = f"{rng.choice(_DIRS)}/{rng.choice(_BINARIES)}"
        details = dataclasses.asdict(_details(rng, 1000 + i, image))
        del details["flags"], details["lifetime"]
        events.append(ProcessExec(filetime_now(), 1000 + i, 1, 1, 1, _command_line(rng, image, i), **details))
    return events


def make_stream(rng: random.Random, count: int) -> list[bytes]:
    """Create, exec, two thread records and an exit per process: the mix a busy Linux host sends, each record
    with the extension block the identity stage (on by default) gives it."""
    records: list[bytes] = []
    t = filetime_now()
    for i in range(count // 5):
        pid = 10_000 + i
        image = f"{rng.choice(_DIRS)}/{rng.choice(_BINARIES)}"
        details = _details(rng, pid, image)
        thread = Details(process_guid=details.process_guid)
        records += [encode_process_create(t, pid, 1, 1, 1, "/bin/bash -l", dataclasses.replace(details,
                                                                                               image="/bin/bash")),
                    encode_process_exec(t, pid, 1, pid, pid, _command_line(rng, image, i), details),
                    encode_thread_create(t, pid + 500_000, pid, thread),
                    encode_thread_exit(t, pid + 500_000, pid, 0, thread),
                    encode_process_exit(t, pid, 0, Details(process_guid=details.process_guid, image=image))]
    return records


class _Keep:
    def __init__(self) -> None:
        self.kept: list = []
        self.push = self.kept.append

    def push_lost(self, count: int) -> None:
        pass

    def notify(self) -> None:
        pass


def _stage_added_us(rules: RuleSet, stream: list[bytes]) -> tuple[float, float, float]:
    """(µs per record through a RulesStage, µs per record into the plain sink, the difference)."""
    plain = _Keep()
    t_plain = _timed(lambda: [plain.push(r) for r in stream])
    stage = RulesStage(_Keep(), rules)
    t_stage = _timed(lambda: [stage.push(r) for r in stream])
    return t_stage / len(stream) * 1e6, t_plain / len(stream) * 1e6, (t_stage - t_plain) / len(stream) * 1e6


def run(quick: bool = False) -> dict:
    logging.getLogger("etwmon.rules").setLevel(logging.ERROR)
    rng = random.Random(16)
    config = make_config(rng)
    rules = RuleSet.from_xml(config, "<bench>")
    redacting = RuleSet.from_xml(make_config(random.Random(16), _REDACTIONS), "<bench-redacting>")
    small = RuleSet.from_xml(_SMALL, "<bench-small>")
    applied = sum(r.ignored is None for r in rules.rules)
    events = make_events(rng, 2_000 if quick else 10_000)
    stream = make_stream(rng, 10_000 if quick else 50_000)
    repeats = 3 if quick else 7
    progress(f"rules: {applied} rules ({len(config) // 1024} KiB of XML), {len(events):,} events, "
             f"{len(stream):,} stream records, {repeats} repeats")

    kept = sum(rules.decide(e).keep for e in events)
    decide_us, small_us, stage_us, plain_us, added_us, redacting_us = [], [], [], [], [], []
    for rep in range(repeats):
        progress(f"rules: repeat {rep + 1}/{repeats}")
        decide = rules.decide
        decide_small = small.decide
        decide_us.append(_timed(lambda: [decide(e) for e in events]) / len(events) * 1e6)
        small_us.append(_timed(lambda: [decide_small(e) for e in events]) / len(events) * 1e6)
        through, plain, added = _stage_added_us(rules, stream)
        stage_us.append(through)
        plain_us.append(plain)
        added_us.append(added)
        redacting_us.append(_stage_added_us(redacting, stream)[2])

    decide_stat = summary(decide_us)
    targets = [target("rules", "evaluation per process event, ~500 rules", decide_stat["median"], 2.0, "us",
                      higher_is_better=False),
               target("rules", "stage added per record (mixed stream, decoding included)",
                      summary(added_us)["median"], 2.0, "us", higher_is_better=False)]
    return {
        "status": "ok",
        "params": {"rules": applied, "config_bytes": len(config), "events": len(events),
                   "events_kept": kept, "stream_records": len(stream), "repeats": repeats,
                   "stream_mix": "per process: ProcessCreate, ProcessExec, ThreadCreate, ThreadExit, ProcessExit"},
        "decide_us": decide_stat,
        "decide_one_rule_us": summary(small_us),
        "stage_us": summary(stage_us),
        "plain_sink_us": summary(plain_us),
        "stage_added_us": summary(added_us),
        "stage_redacting_added_us": summary(redacting_us),
        "targets": targets,
    }
