"""The recording file format (docs/recording.md): a header, then self-delimiting, checksummed, compressed chunks of
records in the wire format, exactly as ``readinto`` returns them, then an end chunk when the recorder closed it.

All integers little-endian::

    header   8s  MAGIC (b"\\x89ETWREC\\n": binary, and a text-mode transfer that mangles line ends shows at once)
             H   FORMAT_VERSION
             H   flags (0)
             I   length of the JSON that follows
             ..  JSON (UTF-8): format_version, etwmon_version, host, boot_id, source, start_time, start_filetime,
                 compression, filter (what the recorder kept: everything, or a command's process tree, rules)
             I   CRC-32 of the JSON
    chunk    4s  kind: b"RECS" (records) or b"END." (the recorder's summary, JSON, last)
             I   stored length (the bytes that follow this 20-byte chunk header)
             I   raw length (after decompression)
             I   records in it (RECS) / 0 (END.)
             I   CRC-32 of the 12 bytes of lengths and count, then of the stored bytes

A RECS chunk holds whole records only (zlib-compressed), so any prefix of whole chunks is a valid recording: a file
cut by a crash or a full disk reads back to its last whole chunk, and the reader says where it stopped and why.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO

from ..errors import RecordingFormatError

__all__ = ["MAGIC", "FORMAT_VERSION", "CHUNK_HEADER", "RECS", "END", "COMPRESSION", "RecordingFormatError",
           "encode_header", "read_header", "encode_chunk", "ChunkHeader", "read_chunk_header", "decompress",
           "MAX_HEADER_JSON", "MAX_CHUNK_RAW"]

MAGIC = b"\x89ETWREC\n"
FORMAT_VERSION = 1
COMPRESSION = "zlib"
RECS, END = b"RECS", b"END."
_PREFIX = struct.Struct("<8sHHI")
_CRC = struct.Struct("<I")
CHUNK_HEADER = struct.Struct("<4sIIII")
_SIZES = struct.Struct("<III")
#: Limits a reader holds a file to (a hostile file cannot make it allocate more).
MAX_HEADER_JSON = 1 << 20
MAX_CHUNK_RAW = 64 << 20
#: zlib level: 6 compresses the records about as well as 9 at a third of the CPU (docs/recording.md has figures).
ZLIB_LEVEL = 6


def encode_header(fields: dict[str, Any]) -> bytes:
    """The file header for ``fields`` (JSON-able; format_version and compression are set here)."""
    body = json.dumps({**fields, "format_version": FORMAT_VERSION, "compression": COMPRESSION},
                      ensure_ascii=True, separators=(",", ":"), sort_keys=True).encode("ascii")
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(body)) + body + _CRC.pack(zlib.crc32(body))


def read_header(stream: BinaryIO, name: str = "the file") -> tuple[dict[str, Any], int]:
    """(the header's fields, its length in bytes) of the recording ``stream`` is at the start of; raises
    RecordingFormatError naming ``name`` when it is not one."""
    prefix = stream.read(_PREFIX.size)
    if len(prefix) < len(MAGIC) or prefix[:len(MAGIC)] != MAGIC:
        raise RecordingFormatError(f"{name} is not an etwmon recording (no recording header)")
    if len(prefix) < _PREFIX.size:
        raise RecordingFormatError(f"{name} is an etwmon recording cut inside its header: nothing to read")
    _, version, _, length = _PREFIX.unpack(prefix)
    if version != FORMAT_VERSION:
        raise RecordingFormatError(f"{name} is an etwmon recording of format version {version}; this etwmon "
                                   f"reads version {FORMAT_VERSION}")
    if length > MAX_HEADER_JSON:
        raise RecordingFormatError(f"{name}: recording header of {length} bytes is too large")
    body = stream.read(length)
    crc = stream.read(_CRC.size)
    if len(body) < length or len(crc) < _CRC.size:
        raise RecordingFormatError(f"{name} is an etwmon recording cut inside its header: nothing to read")
    if _CRC.unpack(crc)[0] != zlib.crc32(body):
        raise RecordingFormatError(f"{name}: the recording header fails its checksum")
    try:
        fields = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise RecordingFormatError(f"{name}: the recording header is not valid JSON") from None
    if not isinstance(fields, dict):
        raise RecordingFormatError(f"{name}: the recording header is not a JSON object")
    if fields.get("compression") != COMPRESSION:
        raise RecordingFormatError(f"{name}: unknown compression {fields.get('compression')!r}")
    return fields, _PREFIX.size + length + _CRC.size


def encode_chunk(kind: bytes, raw: bytes, records: int = 0) -> bytes:
    """One chunk: ``raw`` (whole records for RECS, JSON for END.) compressed, behind its checksummed header."""
    stored = zlib.compress(raw, ZLIB_LEVEL)
    sizes = _SIZES.pack(len(stored), len(raw), records)
    return CHUNK_HEADER.pack(kind, len(stored), len(raw), records, zlib.crc32(stored, zlib.crc32(sizes))) + stored


@dataclass(frozen=True)
class ChunkHeader:
    kind: bytes
    stored: int
    raw: int
    records: int
    crc: int

    def check(self, stored: bytes) -> bool:
        """True when ``stored`` (the chunk's bytes) matches the checksum."""
        return zlib.crc32(stored, zlib.crc32(_SIZES.pack(self.stored, self.raw, self.records))) == self.crc


def read_chunk_header(data: bytes) -> ChunkHeader:
    return ChunkHeader(*CHUNK_HEADER.unpack(data))


def decompress(header: ChunkHeader, stored: bytes) -> bytes:
    """The raw bytes of a chunk whose checksum was checked; raises RecordingFormatError if they do not inflate
    to the length the header gives."""
    try:
        inflater = zlib.decompressobj()
        raw = inflater.decompress(stored, header.raw)
    except zlib.error as exc:
        raise RecordingFormatError(f"a chunk does not decompress: {exc}") from None
    if len(raw) != header.raw or inflater.unconsumed_tail:
        raise RecordingFormatError(f"a chunk decompresses to {len(raw)} bytes, its header says {header.raw}")
    return raw
