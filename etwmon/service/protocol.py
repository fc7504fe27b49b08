"""The etwmon service protocol, version 1 (docs/service.md): frames on a Unix stream socket.

Every frame is an 8-byte header — kind (u16), flags (u16, 0), payload length (u32), little-endian — and its
payload. Control messages carry a UTF-8 JSON object; a DATA frame carries whole records exactly as
``readinto`` returns them, followed by where each one ends, so the client hands out whole records without
walking them again.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from ..errors import ProtocolError

__all__ = [
    "VERSION", "HEADER", "DATA_PREFIX", "HELLO", "STATS_REQUEST", "BYE", "WELCOME", "DATA", "STATS", "END",
    "REFUSED", "MAX_CLIENT_MESSAGE", "MAX_CONTROL", "frame", "json_frame", "decode_json",
]

VERSION = 1
HEADER = struct.Struct("<HHI")
#: DATA payload: record bytes R, record count K, the count carried by a leading RecordsLost record (0: none),
#: reserved (0); then R bytes of records, then K u32 record ends (offsets from the first record's start).
DATA_PREFIX = struct.Struct("<IIII")

# client -> server
HELLO = 0x01  # JSON: version, max_items, max_bytes, filter (first message, exactly once)
STATS_REQUEST = 0x02  # empty: answered by one STATS frame, in order with the data
BYE = 0x03  # empty: the client is leaving
# server -> client
WELCOME = 0x81  # JSON: version, server, source, lossy, client, max_items, max_bytes, max_frame
DATA = 0x82
STATS = 0x83  # JSON: this client's queue counters and the server's
END = 0x84  # JSON: reason, error (bool): nothing follows
REFUSED = 0x85  # JSON: code, error: nothing follows

#: The largest payload a client may send (a HELLO with its filters); anything longer is a protocol error.
MAX_CLIENT_MESSAGE = 16 * 1024
#: The largest control payload a server sends (JSON); DATA frames are bounded by WELCOME's max_frame.
MAX_CONTROL = 64 * 1024


def frame(kind: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, 0, len(payload)) + payload


def json_frame(kind: int, obj: dict[str, Any]) -> bytes:
    return frame(kind, json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii"))


def decode_json(payload: bytes | memoryview, what: str) -> dict[str, Any]:
    """The JSON object of a control message; ``ProtocolError`` naming ``what`` on anything else."""
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"the {what} message is not UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"the {what} message is not a JSON object")
    return obj
