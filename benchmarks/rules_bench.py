"""Rules: what a Sysmon configuration of ~500 rules costs per event.

Two figures, both per event and measured in one process with the garbage collector off:
- evaluation: ``RuleSet.decide`` on ProcessCreate events that carry every field (image, parent image, user, ...
  as the identity stage provides them), against the same call with a one-rule configuration;
- the stage: records pushed through ``RulesStage`` into a sink that keeps them, against the same records pushed
  into that sink directly (a mixed stream: create, exec, exit and thread records), i.e. what rules add between
  the source and the ring, decoding included.
"""

from __future__ import annotations

import dataclasses
import logging
import random

from common import progress, summary, target, timed as _timed
from etwmon.records import (
    ProcessExec, encode_process_create, encode_process_exec, encode_process_exit, encode_thread_create,
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


@dataclasses.dataclass(frozen=True)
class EnrichedExec(ProcessExec):
    """A ProcessExec with the fields the identity stage adds (what rules read when they are there)."""

    image: str | None = None
    parent_image: str | None = None
    parent_command_line: str | None = None
    current_directory: str | None = None
    user: str | None = None
    rule_name: str | None = None


def make_config(rng: random.Random) -> str:
    """A ~500-rule configuration in Sysmon's format, shaped like the big public ones (our own rules)."""
    include, exclude, terminate = [], [], []
    for i in range(110):
        include.append(f'<Image condition="end with">/{rng.choice(_BINARIES)}{i}</Image>')
    for i in range(80):
        include.append(f'<CommandLine condition="contains" name="technique_{i}">marker-{i}-</CommandLine>')
    for i in range(40):
        include.append(f'<ParentImage condition="image">{rng.choice(_BINARIES)}-{i}</ParentImage>')
    for i in range(40):
        include.append(f'<Image condition="is">{rng.choice(_DIRS)}/tool-{i}</Image>')
    for i in range(20):
        include.append(f'<CommandLine condition="begin with">{rng.choice(_DIRS)}/start-{i}</CommandLine>')
    for i in range(20):
        include.append(f'<Rule groupRelation="and" name="pair_{i}"><Image condition="end with">/'
                       f'{rng.choice(_BINARIES)}</Image><CommandLine condition="contains">flag-{i}</CommandLine>'
                       '</Rule>')
    for i in range(60):
        exclude.append(f'<Image condition="is">{rng.choice(_DIRS)}/noise-{i}</Image>')
    for i in range(30):
        exclude.append(f'<CommandLine condition="contains">quiet-{i}</CommandLine>')
    for i in range(30):
        exclude.append(f'<ParentImage condition="is">/usr/lib/helper-{i}</ParentImage>')
    for i in range(10):
        exclude.append(f'<ParentCommandLine condition="contains">parent-quiet-{i}</ParentCommandLine>')
    for i in range(20):
        exclude.append(f'<Rule groupRelation="and"><User condition="is">svc-{i}</User>'
                       f'<CurrentDirectory condition="begin with">/var/lib/svc-{i}</CurrentDirectory></Rule>')
    for i in range(40):
        terminate.append(f'<Image condition="begin with">/opt/watched-{i}/</Image>')
    return (f'<Sysmon schemaversion="4.90"><EventFiltering><RuleGroup name="bench" groupRelation="or">'
            f'<ProcessCreate onmatch="include">{"".join(include)}</ProcessCreate></RuleGroup>'
            f'<RuleGroup name="" groupRelation="or"><ProcessCreate onmatch="exclude">{"".join(exclude)}'
            f'</ProcessCreate></RuleGroup><RuleGroup name="" groupRelation="or">'
            f'<ProcessTerminate onmatch="include">{"".join(terminate)}</ProcessTerminate></RuleGroup>'
            f'</EventFiltering></Sysmon>')


_SMALL = ('<Sysmon schemaversion="4.90"><EventFiltering><RuleGroup groupRelation="or">'
          '<ProcessCreate onmatch="include"><Image condition="end with">/never</Image></ProcessCreate>'
          '</RuleGroup></EventFiltering></Sysmon>')


def make_events(rng: random.Random, count: int) -> list[EnrichedExec]:
    events = []
    for i in range(count):
        name = rng.choice(_BINARIES)
        image = f"{rng.choice(_DIRS)}/{name}"
        line = " ".join([image] + rng.sample(_WORDS, rng.randint(1, 6)))
        if i % 10 == 0:  # one in ten is included by a CommandLine rule somewhere in the list
            line += f" marker-{rng.randrange(80)}-"
        events.append(EnrichedExec(filetime_now(), 1000 + i, 1, 1, 1, line, image=image,
                                   parent_image=f"/usr/bin/{rng.choice(_BINARIES)}",
                                   parent_command_line="/bin/bash -l", current_directory="/home/user",
                                   user="user"))
    return events


def make_stream(rng: random.Random, count: int) -> list[bytes]:
    """Create, exec, two thread records and an exit per process: the mix a busy Linux host sends."""
    records: list[bytes] = []
    t = filetime_now()
    for i in range(count // 5):
        pid = 10_000 + i
        line = f"{rng.choice(_DIRS)}/{rng.choice(_BINARIES)} " + " ".join(rng.sample(_WORDS, 3))
        records += [encode_process_create(t, pid, 1, 1, 1, "/bin/bash -l"),
                    encode_process_exec(t, pid, 1, pid, pid, line),
                    encode_thread_create(t, pid + 500_000, pid), encode_thread_exit(t, pid + 500_000, pid, 0),
                    encode_process_exit(t, pid, 0)]
    return records


class _Keep:
    def __init__(self) -> None:
        self.kept: list = []
        self.push = self.kept.append

    def push_lost(self, count: int) -> None:
        pass

    def notify(self) -> None:
        pass


def run(quick: bool = False) -> dict:
    # The stream's records carry no image (no identity stage here): the stage says so once per run; not news here.
    logging.getLogger("etwmon.rules").setLevel(logging.ERROR)
    rng = random.Random(16)
    config = make_config(rng)
    rules = RuleSet.from_xml(config, "<bench>")
    small = RuleSet.from_xml(_SMALL, "<bench-small>")
    applied = sum(r.ignored is None for r in rules.rules)
    events = make_events(rng, 2_000 if quick else 10_000)
    stream = make_stream(rng, 10_000 if quick else 50_000)
    repeats = 3 if quick else 7
    progress(f"rules: {applied} rules ({len(config) // 1024} KiB of XML), {len(events):,} events, "
             f"{len(stream):,} stream records, {repeats} repeats")

    kept = sum(rules.decide(e).keep for e in events)
    decide_us, small_us, stage_us, plain_us, added_us = [], [], [], [], []
    for rep in range(repeats):
        progress(f"rules: repeat {rep + 1}/{repeats}")
        decide = rules.decide
        decide_small = small.decide
        decide_us.append(_timed(lambda: [decide(e) for e in events]) / len(events) * 1e6)
        small_us.append(_timed(lambda: [decide_small(e) for e in events]) / len(events) * 1e6)
        plain = _Keep()
        t_plain = _timed(lambda: [plain.push(r) for r in stream])
        sink = _Keep()
        stage = RulesStage(sink, rules)
        t_stage = _timed(lambda: [stage.push(r) for r in stream])
        plain_us.append(t_plain / len(stream) * 1e6)
        stage_us.append(t_stage / len(stream) * 1e6)
        added_us.append((t_stage - t_plain) / len(stream) * 1e6)

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
        "targets": targets,
    }
