"""The fields a rule set reads, taken straight from an encoded record: the fixed struct, the command line and the
extension block's fields, each decoded only when a rule needs it, so judging a record builds no Event.

The values are exactly what ``parse`` would put in the Event's attributes (lower-cased, as rules compare them):
the same checks on Size and CommandLineLength, the same block rules (a block of another version is no block, a
field running past the block ends it, a later field of the same tag wins, a GUID that is not 16 bytes is unknown).
"""

from __future__ import annotations

import struct
from typing import Any, Iterable

from .._native import fields as _c_fields
from ..containers import container_id_from_cgroup
from ..errors import RecordFormatError
from ..events import _C_RULES, _utf16
from ..records import EXTENSION_VERSION, MAX_FILETIME, ExtensionTag, guid_text
from ..users import user_name

__all__ = ["RecordFields"]

_U32 = struct.Struct("<I")
_BLOCK_HEADER = struct.Struct("<HHI")
_TLV = struct.Struct("<HH")

#: Per Sysmon event: field → where a record keeps it: ("u32", offset), ("command_line", None) or (tag, kind).
#: A field the record type cannot carry (User of a ProcessExit) is always unknown, as the Event's attribute is.
_WHERE: dict[str, dict[str, tuple[Any, Any]]] = {
    "ProcessCreate": {
        "ProcessId": ("u32", 16), "ParentProcessId": ("u32", 20), "CommandLine": ("command_line", None),
        "ProcessGuid": (int(ExtensionTag.ProcessGuid), "guid"),
        "ParentProcessGuid": (int(ExtensionTag.ParentProcessGuid), "guid"),
        "Image": (int(ExtensionTag.Image), "text"), "CurrentDirectory": (int(ExtensionTag.CurrentDirectory), "text"),
        "User": (int(ExtensionTag.User), "text"), "ParentImage": (int(ExtensionTag.ParentImage), "text"),
        "ParentCommandLine": (int(ExtensionTag.ParentCommandLine), "text"),
        "ParentUser": (int(ExtensionTag.ParentUser), "text"),
        "Hashes": (int(ExtensionTag.Hashes), "text"), "Cgroup": (int(ExtensionTag.Cgroup), "text"),
        "ContainerId": ("container_id", None),
        "PidNamespace": (int(ExtensionTag.PidNamespace), "u32"),
        "NamespacePid": (int(ExtensionTag.NamespacePid), "u32"),
        "MountNamespace": (int(ExtensionTag.MountNamespace), "u32"),
        "ImageDevice": (int(ExtensionTag.ExeDevice), "u32"), "ImageInode": (int(ExtensionTag.ExeInode), "u64"),
    },
    "ProcessTerminate": {
        "ProcessId": ("u32", 16), "ProcessGuid": (int(ExtensionTag.ProcessGuid), "guid"),
        "Image": (int(ExtensionTag.Image), "text"), "User": (None, None),
    },
    "ImageLoad": {  # Image: the process's executable; ImageLoaded: the loaded file (ImageFileName, whole in tag 25)
        "ProcessId": ("u32", 16), "ProcessGuid": (int(ExtensionTag.ProcessGuid), "guid"),
        "Image": (int(ExtensionTag.Image), "text"), "ImageLoaded": ("image_loaded", None),
        "ImageDevice": (int(ExtensionTag.ExeDevice), "u32"), "ImageInode": (int(ExtensionTag.ExeInode), "u64"),
        "Hashes": (int(ExtensionTag.Hashes), "text"),  # the loaded file's
    },
}
#: Where an ImageLoad record's block starts (sizeof ImageLoadInfo), and its ImageFileName (WCHAR[301]).
_IMAGE_BASE, _IMAGE_NAME_AT, _IMAGE_NAME_END = 640, 32, 32 + 2 * 301


#: Internal keys for the texts ContainerId is derived from and the uid User is named from (not Sysmon field
#: names, so they never clash).
_CONTAINER, _CGROUP, _UID = "\0container_id", "\0cgroup", "\0uid"


def _container_of(values: dict[str, str | None], container_key: str, cgroup_key: str) -> str | None:
    """ContainerId as rules see it (etwmon.containers.rule_container_id): the record's id, else the one its
    cgroup path names, "" when the cgroup is known and names none, None when nothing says where it ran."""
    known, cgroup = values.get(container_key), values.get(cgroup_key)
    values.pop(_CONTAINER, None)
    values.pop(_CGROUP, None)
    if known is not None:
        return known
    if cgroup is None:
        return None
    found = container_id_from_cgroup(cgroup)
    return "" if found is None else found.lower()


class RecordFields:
    """``RecordFields(event, names).values(record)``: {Sysmon field: lower-cased text or None (unknown)} of one
    encoded record of that Sysmon event (ProcessCreate: a ProcessCreate or ProcessExec record; ProcessTerminate:
    a ProcessExit record; ImageLoad: an ImageLoad record). RecordFormatError when the record does not follow
    the wire format."""

    __slots__ = ("empty", "fixed", "command_line", "texts", "guids", "numbers", "container", "sources", "create",
                 "image_load", "image_loaded", "user", "wanted")

    def __init__(self, event: str, names: Iterable[str]) -> None:
        where = _WHERE[event]
        self.create = event == "ProcessCreate"
        self.image_load = event == "ImageLoad"
        self.image_loaded: str | None = None  # ImageLoaded: ImageFileName, the block's whole path when cut
        self.empty: dict[str, None] = {}
        self.fixed: list[tuple[str, int]] = []
        self.command_line: str | None = None
        self.texts: dict[int, str] = {}  # tag → field, for text fields
        self.guids: dict[int, str] = {}
        self.numbers: dict[int, tuple[str, int]] = {}  # tag → (field, value size)
        self.container: str | None = None  # ContainerId: the record's, else the one its cgroup path names
        for name in names:
            kind, arg = where[name]
            self.empty[name] = None
            if kind == "u32":
                self.fixed.append((name, arg))
            elif kind == "command_line":
                self.command_line = name
            elif kind == "container_id":
                self.container = name
            elif kind == "image_loaded":
                self.image_loaded = self.texts[int(ExtensionTag.ImageLoaded)] = name
            elif arg in ("u32", "u64"):
                self.numbers[kind] = (name, 4 if arg == "u32" else 8)
            elif kind is not None:
                (self.texts if arg == "text" else self.guids)[kind] = name
        # ContainerId is derived from the record's ContainerId and Cgroup texts, read under their field names
        # when rules use those too, else under internal keys.
        self.sources: tuple[str, str] = ("", "")
        # User: the record's, else the name of its Uid (as Event.user gives it), read under an internal key.
        self.user = self.texts.get(int(ExtensionTag.User))
        if self.user is not None:
            self.numbers[int(ExtensionTag.Uid)] = (_UID, 4)
        if self.container is not None:
            self.sources = (self.texts.setdefault(int(ExtensionTag.ContainerId), _CONTAINER),
                            self.texts.setdefault(int(ExtensionTag.Cgroup), _CGROUP))
        # For the block's walk in C: the tags read, each to its value's bytes (``bytes`` of bytes is itself).
        self.wanted = {tag: (tag, bytes) for tag in (*self.texts, *self.guids, *self.numbers)}

    def values(self, record: Any) -> dict[str, str | None]:
        size = record[2] | record[3] << 8
        if self.create:
            if size < 36 or size > len(record):
                raise RecordFormatError(f"a process record of Size {size} in {len(record)} bytes", 0)
            chars = record[32] | record[33] << 8
            base = 40 + 2 * chars
            if base - 6 > size:
                raise RecordFormatError(f"CommandLineLength {chars} runs past the record's Size {size}", 0)
        elif self.image_load:
            if size < _IMAGE_BASE or size > len(record):
                raise RecordFormatError(f"an ImageLoad record of Size {size} in {len(record)} bytes", 0)
            base = _IMAGE_BASE
        else:
            if size < 24 or size > len(record):
                raise RecordFormatError(f"a ProcessExit record of Size {size} in {len(record)} bytes", 0)
            base = 24
        values = dict(self.empty)
        if self.image_loaded is not None:  # as parse gives image_name: up to the first NUL (the block may override)
            name = _utf16(record[_IMAGE_NAME_AT:_IMAGE_NAME_END]).split("\0", 1)[0]
            values[self.image_loaded] = name.lower()
        for name, offset in self.fixed:
            values[name] = str(_U32.unpack_from(record, offset)[0])
        if self.command_line is not None:
            values[self.command_line] = _utf16(record[34:base - 6]).lower()
        if (self.texts or self.guids or self.numbers) and size - base >= 8:
            self._block(record, base, size, values)
        if self.container is not None:
            values[self.container] = _container_of(values, *self.sources)
        if self.user is not None:
            uid = values.pop(_UID, None)
            if values[self.user] is None and uid is not None:
                name = user_name(int(uid))
                values[self.user] = None if name is None else name.lower()
        return values

    def _block(self, record: Any, base: int, end: int, values: dict[str, str | None]) -> None:
        version, length, _ = _BLOCK_HEADER.unpack_from(record, base)
        if version != EXTENSION_VERSION or length < 8 or base + length > end:
            return
        texts, guids = self.texts, self.guids
        if _c_fields is not None:
            # The walk in C, when every known field keeps its rule (sizes as below, text of even length); else
            # (None) the walk below says what a field that breaks one means here.
            found = _c_fields(record, base + 8, base + length, self.wanted, _C_RULES, MAX_FILETIME)
            if found is not None:
                numbers = self.numbers
                for tag, raw in found.items():
                    name = texts.get(tag)
                    if name is not None:
                        values[name] = _utf16(raw).lower()
                    elif tag in guids:
                        values[guids[tag]] = guid_text(raw).lower()
                    else:
                        values[numbers[tag][0]] = str(int.from_bytes(raw, "little"))
                return
        pos, stop = base + 8, base + length - 4
        unpack = _TLV.unpack_from
        while pos <= stop:
            tag, n = unpack(record, pos)
            pos += 4
            name = texts.get(tag)
            if name is not None:
                if pos + n > stop + 4:
                    break  # runs past the block: the block ends here
                if n & 1:
                    raise RecordFormatError(f"extension field {tag} of odd length {n} is not UTF-16", pos)
                values[name] = _utf16(record[pos:pos + n]).lower()
            elif tag in guids and n == 16 and pos + n <= stop + 4:  # a GUID; another length is unknown
                values[guids[tag]] = guid_text(record[pos:pos + n]).lower()
            elif tag in self.numbers and pos + n <= stop + 4:
                field, width = self.numbers[tag]
                if n == width:  # another size is unknown
                    values[field] = str(int.from_bytes(record[pos:pos + n], "little"))
            pos += n
