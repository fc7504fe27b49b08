"""Reading a Sysmon XML configuration safely into plain rule objects (no evaluation here).

The file is read with a size cap, parsed by defusedxml (no DTD, no entities, no external references: billion
laughs and XXE are refused, not expanded) and checked against Sysmon's schema as far as etwmon applies it:
unknown conditions, fields or event types are errors naming the line; what is valid Sysmon but cannot be
evaluated by etwmon (other event types, fields such as Hashes) is kept with the reason it is ignored.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field, replace
from typing import Union

from ..errors import RuleConfigError, RulesError

__all__ = [
    "MAX_CONFIG_BYTES", "CONDITIONS", "FIELDS", "UNSUPPORTED_FIELDS", "SYSMON_EVENTS", "Condition", "Rule",
    "Redaction", "Config", "read_config", "parse_config",
]

#: Largest configuration accepted. Big public configurations are a few hundred KiB; a cap keeps a wrong or hostile
#: file (a log, /dev/zero through a symlink, a 10 MB blob) from being read and parsed at all.
MAX_CONFIG_BYTES = 4 << 20
_MAX_DEPTH = 8  # Sysmon > EventFiltering > RuleGroup > ProcessCreate > Rule > Image is 6 deep

#: Sysmon's conditions (compared without case, spaces collapsed). Lists (the "any"/"all" forms) are ;-separated.
CONDITIONS = frozenset({
    "is", "is not", "is any", "contains", "contains any", "contains all", "excludes", "excludes any",
    "excludes all", "begin with", "not begin with", "end with", "not end with", "less than", "more than", "image",
})

#: The event types etwmon applies (Sysmon events 1, 5 and 7) → {Sysmon field: Event attribute}. Attributes are read
#: with getattr(event, name, None): None means the source does not know the field for this event.
FIELDS: dict[str, dict[str, str]] = {
    "ProcessCreate": {
        "ProcessGuid": "process_guid", "ProcessId": "pid", "Image": "image", "CommandLine": "command_line",
        "CurrentDirectory": "current_directory", "User": "user", "ParentProcessGuid": "parent_process_guid",
        "ParentProcessId": "parent_pid", "ParentImage": "parent_image",
        "ParentCommandLine": "parent_command_line", "ParentUser": "parent_user", "Hashes": "hashes",
        # etwmon's own (not Sysmon's): where the process ran and which file (docs/identity.md, docs/rules.md)
        "Cgroup": "cgroup", "ContainerId": "container_id", "PidNamespace": "pid_ns", "NamespacePid": "ns_pid",
        "MountNamespace": "mnt_ns", "ImageDevice": "exe_device", "ImageInode": "exe_inode",
    },
    "ProcessTerminate": {
        "ProcessGuid": "process_guid", "ProcessId": "pid", "Image": "image", "User": "user",
    },
    "ImageLoad": {  # Image: the process's executable; ImageLoaded: the file mapped
        "ProcessGuid": "process_guid", "ProcessId": "pid", "Image": "image", "ImageLoaded": "image_name",
        # etwmon's own, as for ProcessCreate: which file was loaded, whatever its path says
        "ImageDevice": "exe_device", "ImageInode": "exe_inode", "Hashes": "hashes",  # Hashes: the loaded file's
    },
}
#: Integer fields: "less than"/"more than" compare them as numbers.
INTEGER_FIELDS = frozenset({"ProcessId", "ParentProcessId", "PidNamespace", "NamespacePid", "MountNamespace",
                            "ImageDevice", "ImageInode"})

#: Sysmon fields of events 1, 5 and 7 that etwmon can never evaluate, and why.
_EVERY_EVENT = {
    "UtcTime": "etwmon does not filter on time",
    "RuleName": "RuleName is an output of rules, not an input",
}
#: The fields Sysmon reads from a Windows PE version resource (events 1 and 7).
_WINDOWS_FILE_INFO = dict.fromkeys(("FileVersion", "Description", "Product", "Company", "OriginalFileName"),
                                   "a Windows PE version resource that etwmon does not read")
_NO_SIGNATURE = "Linux libraries carry no Authenticode signature"
UNSUPPORTED_FIELDS: dict[str, dict[str, str]] = {
    "ProcessCreate": {
        **_EVERY_EVENT, **_WINDOWS_FILE_INFO,
        "LogonGuid": "Windows logon sessions have no etwmon equivalent",
        "LogonId": "Windows logon sessions have no etwmon equivalent",
        "TerminalSessionId": "Windows terminal sessions have no etwmon equivalent",
        "IntegrityLevel": "Windows integrity levels have no etwmon equivalent",
    },
    "ProcessTerminate": dict(_EVERY_EVENT),
    "ImageLoad": {
        **_EVERY_EVENT, **_WINDOWS_FILE_INFO,
        "Signed": _NO_SIGNATURE, "Signature": _NO_SIGNATURE, "SignatureStatus": _NO_SIGNATURE,
        "User": "etwmon's ImageLoad records carry no user",
    },
}

#: Every event type Sysmon filters; the ones not in FIELDS are valid but ignored by etwmon.
SYSMON_EVENTS = frozenset({
    "ProcessCreate", "FileCreateTime", "NetworkConnect", "ProcessTerminate", "DriverLoad", "ImageLoad",
    "CreateRemoteThread", "RawAccessRead", "ProcessAccess", "FileCreate", "RegistryEvent", "FileCreateStreamHash",
    "PipeEvent", "WmiEvent", "DnsQuery", "FileDelete", "ClipboardChange", "ProcessTampering", "FileDeleteDetected",
    "FileBlockExecutable", "FileBlockShredding", "FileExecutableDetected",
})


@dataclass(frozen=True)
class Condition:
    """One filter element, e.g. ``<Image condition="end with">/bash</Image>``."""

    field: str
    condition: str
    value: str
    name: str | None
    line: int
    #: Why etwmon cannot evaluate it (None: it can).
    ignored: str | None = None


@dataclass(frozen=True)
class Rule:
    """A top-level item of an event block: a ``<Rule>`` or, in a RuleGroup, its filters (one rule each when the
    group's relation is "or", one rule of them all when it is "and")."""

    event: str
    onmatch: str  # "include" or "exclude"
    relation: str  # "and" or "or": how its items combine (conditions on one field are always OR'ed)
    items: tuple[Union[Condition, "Rule"], ...]
    name: str | None
    line: int
    #: Document order over the whole configuration: the first matching rule names the event.
    index: int = 0
    ignored: str | None = None

    @property
    def label(self) -> str:
        """How reports name it: its name, the event block and the line."""
        named = f"{self.name!r} " if self.name else ""
        return f"{named}({self.event} {self.onmatch}, line {self.line})"


@dataclass(frozen=True)
class Redaction:
    """An etwmon extension: a regular expression whose matches (or, if it has groups, whose groups) in command
    lines become ``***`` before the record reaches the ring."""

    pattern: str
    name: str | None
    line: int


@dataclass
class Config:
    """A parsed configuration: the rules (all of them, ignored ones with their reason), the event blocks seen per
    (event, onmatch) (an empty include block matters: it logs nothing), redactions and ignored settings."""

    source: str
    schema_version: str | None = None
    rules: list[Rule] = field(default_factory=list)
    blocks: dict[tuple[str, str], int] = field(default_factory=dict)
    redactions: list[Redaction] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    #: ``<HashAlgorithms>``: the hashes asked for, as etwmon.hashes reads them ("md5,sha256"); None when absent.
    hash_algorithms: str | None = None


# --- reading ---------------------------------------------------------------------------------------------------


def read_config(path: str | os.PathLike) -> bytes:
    """The bytes of a configuration file, refused (RuleConfigError) when it is not a regular file, is bigger than
    MAX_CONFIG_BYTES, or could be changed by anyone but root and the caller: whoever can rewrite the rules can
    hide processes or unmask secrets. As sshd's StrictModes: the file and every directory above it must be owned
    by root or the caller and not writable by group or others (a sticky directory such as /tmp excepted, where
    a symlink is not followed); see ``etwmon.safedir.open_trusted``."""
    name = os.fspath(path)
    if hasattr(os, "geteuid"):
        from ..safedir import SafeDirError, open_trusted  # (POSIX only)

        try:
            fd = open_trusted(name)
        except SafeDirError as exc:
            raise RuleConfigError(f"{name}: {exc}") from None
    else:  # Windows: the ACLs are not read here; the file is only required to be a regular one below
        try:
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise RuleConfigError(f"{name}: cannot open: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise RuleConfigError(f"{name}: not a regular file")
        if info.st_size > MAX_CONFIG_BYTES:
            raise RuleConfigError(f"{name}: {info.st_size} bytes, more than the {MAX_CONFIG_BYTES} a "
                                  "configuration may have")
        chunks, size = [], 0
        while size <= MAX_CONFIG_BYTES:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_CONFIG_BYTES:
            raise RuleConfigError(f"{name}: more than the {MAX_CONFIG_BYTES} bytes a configuration may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


# --- XML → a small tree with line numbers ---------------------------------------------------------------------


@dataclass
class _Node:
    tag: str
    attrs: dict[str, str]
    line: int
    children: list["_Node"] = field(default_factory=list)
    text: list[str] = field(default_factory=list)


def _xml_tree(data: bytes, source: str) -> _Node:
    try:
        import defusedxml
        import defusedxml.sax
        from xml.sax import SAXParseException
        from xml.sax.handler import ContentHandler
    except ImportError:
        raise RulesError("reading Sysmon configurations needs defusedxml: pip install 'etwmon[rules]' (in a clone: pip install -e '.[rules]')") from None

    class Builder(ContentHandler):
        def __init__(self) -> None:
            super().__init__()
            self.stack: list[_Node] = []
            self.root: _Node | None = None
            self.locator = None

        def setDocumentLocator(self, locator) -> None:
            self.locator = locator

        def startElement(self, name, attrs) -> None:
            line = self.locator.getLineNumber() if self.locator else 0
            if len(self.stack) >= _MAX_DEPTH:
                raise RuleConfigError(f"{source}, line {line}: elements nested more than {_MAX_DEPTH} deep")
            node = _Node(name, {k: attrs[k] for k in attrs.getNames()}, line)
            if self.stack:
                self.stack[-1].children.append(node)
            else:
                self.root = node
            self.stack.append(node)

        def endElement(self, name) -> None:
            self.stack.pop()

        def characters(self, content) -> None:
            if self.stack:
                self.stack[-1].text.append(content)

    builder = Builder()
    try:
        # forbid_dtd: a Sysmon configuration has no DOCTYPE, and every entity trick (billion laughs, external
        # entities, parameter entities) needs one.
        defusedxml.sax.parseString(data, builder, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DTDForbidden:
        raise RuleConfigError(f"{source}: has a DOCTYPE; DTDs and entities are refused (a Sysmon configuration "
                              "needs none)") from None
    except defusedxml.EntitiesForbidden as exc:
        raise RuleConfigError(f"{source}: declares entities ({exc.name}); entities are refused") from None
    except defusedxml.ExternalReferenceForbidden:
        raise RuleConfigError(f"{source}: refers to an external resource; refused") from None
    except SAXParseException as exc:
        raise RuleConfigError(f"{source}, line {exc.getLineNumber()}: not well-formed XML: "
                              f"{exc.getMessage()}") from None
    if builder.root is None:
        raise RuleConfigError(f"{source}: empty document")
    return builder.root


# --- the tree → rules ------------------------------------------------------------------------------------------


def _relation(node: _Node, source: str, default: str) -> str:
    value = node.attrs.get("groupRelation")
    if value is None:
        return default
    relation = value.strip().lower()
    if relation not in ("and", "or"):
        raise RuleConfigError(f"{source}, line {node.line}: groupRelation must be \"and\" or \"or\", "
                              f"not {value!r}")
    return relation


def _name(node: _Node) -> str | None:
    name = node.attrs.get("name")
    return name if name and name.strip() else None


def _condition(node: _Node, event: str, source: str) -> Condition:
    where = f"{source}, line {node.line}"
    if node.children:
        raise RuleConfigError(f"{where}: <{node.tag}> is a filter and may not contain elements")
    raw = node.attrs.get("condition", "is")
    condition = " ".join(raw.lower().split())
    if condition not in CONDITIONS:
        raise RuleConfigError(f"{where}: unknown condition {raw!r} on {node.tag}; Sysmon's conditions are "
                              + ", ".join(sorted(CONDITIONS)))
    value = "".join(node.text)
    ignored = None
    if event in FIELDS:
        if node.tag in UNSUPPORTED_FIELDS[event]:
            ignored = f"field {node.tag}: {UNSUPPORTED_FIELDS[event][node.tag]}"
        elif node.tag not in FIELDS[event]:
            known = sorted(FIELDS[event]) + sorted(UNSUPPORTED_FIELDS[event])
            raise RuleConfigError(f"{where}: {event} has no field {node.tag!r}; its fields are "
                                  + ", ".join(known))
        else:
            if condition.endswith((" any", " all")) and not [v for v in value.split(";") if v]:
                raise RuleConfigError(f"{where}: {condition!r} needs a ;-separated list of values")
            if condition in ("less than", "more than") and node.tag in INTEGER_FIELDS:
                try:
                    int(value.strip())
                except ValueError:
                    raise RuleConfigError(f"{where}: {node.tag} is a number; {condition!r} needs a number, "
                                          f"not {value!r}") from None
    return Condition(node.tag, condition, value, _name(node), node.line, ignored)


def _block(node: _Node, group: _Node | None, config: Config, source: str) -> None:
    event = node.tag
    where = f"{source}, line {node.line}"
    if event not in SYSMON_EVENTS:
        raise RuleConfigError(f"{where}: unknown event type <{event}>; Sysmon's are "
                              + ", ".join(sorted(SYSMON_EVENTS)))
    raw = node.attrs.get("onmatch")
    onmatch = (raw or "").strip().lower()
    if onmatch not in ("include", "exclude"):
        raise RuleConfigError(f"{where}: <{event}> needs onmatch=\"include\" or \"exclude\", not {raw!r}")
    ignored = None if event in FIELDS else f"event type {event}: etwmon applies ProcessCreate, " \
                                              "ProcessTerminate and ImageLoad rules only"
    # Outside any RuleGroup Sysmon OR's everything ("the rules about rules"); a RuleGroup without groupRelation
    # AND's, as Sysmon documents for RuleGroup and Rule alike.
    relation = "or" if group is None else _relation(group, source, "and")
    group_name = _name(group) if group is not None else None
    config.blocks[(event, onmatch)] = config.blocks.get((event, onmatch), 0) + 1
    if ignored:
        config.ignored.append(f"line {node.line}: <{event} onmatch=\"{onmatch}\">: {ignored}")

    def make(items: tuple, relation: str, name: str | None, line: int) -> Rule:
        reason = ignored
        if reason is None and relation == "and":
            # A conjunction missing a part would match more than it says: ignore it whole.
            reason = next((c.ignored for c in items if isinstance(c, Condition) and c.ignored), None)
            reason = reason or next((r.ignored for r in items if isinstance(r, Rule) and r.ignored), None)
        elif reason is None and all(isinstance(c, Condition) and c.ignored for c in items):
            reason = items[0].ignored
        return Rule(event, onmatch, relation, items, name, line, 0, reason)

    loose: list[Union[Condition, Rule]] = []
    for child in node.children:
        if child.tag == "Rule":
            if any(grand.tag == "Rule" for grand in child.children):
                raise RuleConfigError(f"{source}, line {child.line}: a <Rule> may not contain a <Rule>")
            conditions = tuple(_condition(c, event, source) for c in child.children)
            if not conditions:
                raise RuleConfigError(f"{source}, line {child.line}: an empty <Rule> matches nothing; remove it")
            rule_relation = _relation(child, source, "and")
            if rule_relation == "or" and ignored is None:
                # Only the conditions etwmon can evaluate take part; the others are reported.
                usable = tuple(c for c in conditions if not c.ignored) or conditions
                for c in conditions:
                    if c.ignored and usable is not conditions:
                        config.ignored.append(f"line {c.line}: {c.field} in <Rule> (line {child.line}): "
                                              f"{c.ignored}")
                conditions = usable
            loose.append(make(conditions, rule_relation, _name(child) or group_name, child.line))
        else:
            loose.append(_condition(child, event, source))
    def append(rule: Rule) -> None:  # numbered as appended: document order over the whole configuration
        config.rules.append(replace(rule, index=len(config.rules)))

    if relation == "and" and len(loose) > 1:
        append(make(tuple(loose), "and", group_name, node.line))
        return
    for item in loose:
        append(item if isinstance(item, Rule) else make((item,), "or", item.name or group_name, item.line))


def _hash_algorithms(node, config: Config, source: str) -> None:
    """``<HashAlgorithms>md5,sha256,IMPHASH</HashAlgorithms>``: what etwmon computes is kept, the rest noted."""
    from ..hashes import parse_algorithms

    try:
        names, skipped = parse_algorithms("".join(node.text), strict=False)
    except ValueError as exc:
        raise RuleConfigError(f"{source}, line {node.line}: <HashAlgorithms>: {exc}") from None
    config.hash_algorithms = ",".join(names) or None
    config.ignored += [f"line {node.line}: <HashAlgorithms> {why}" for why in skipped]


def parse_config(data: bytes | str, source: str = "<config>") -> Config:
    """A configuration from its XML text; RuleConfigError (naming ``source`` and the line) if it is refused."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if len(data) > MAX_CONFIG_BYTES:
        raise RuleConfigError(f"{source}: {len(data)} bytes, more than the {MAX_CONFIG_BYTES} a configuration "
                              "may have")
    root = _xml_tree(data, source)
    if root.tag != "Sysmon":
        raise RuleConfigError(f"{source}, line {root.line}: the root element must be <Sysmon>, not <{root.tag}>")
    config = Config(source, root.attrs.get("schemaversion"))
    filtering = 0
    for child in root.children:
        if child.tag == "EventFiltering":
            filtering += 1
            if filtering > 1:
                raise RuleConfigError(f"{source}, line {child.line}: more than one <EventFiltering>")
            for item in child.children:
                if item.tag == "RuleGroup":
                    for block in item.children:
                        _block(block, item, config, source)
                else:
                    _block(item, None, config, source)
        elif child.tag == "Redaction":
            for item in child.children:
                if item.tag != "Redact":
                    raise RuleConfigError(f"{source}, line {item.line}: <Redaction> holds <Redact> elements, "
                                          f"not <{item.tag}>")
                config.redactions.append(Redaction("".join(item.text), _name(item), item.line))
        elif child.tag == "HashAlgorithms":
            _hash_algorithms(child, config, source)
        else:
            config.ignored.append(f"line {child.line}: <{child.tag}>: a Sysmon setting etwmon has no use for")
    return config
