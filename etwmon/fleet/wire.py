"""The fleet's wire contract, shared by the shipper and the consumer: the stream and its subjects, the message
headers, host ids, and the one error the fleet raises.

Each host publishes the bytes of its Monitor's ``readinto`` batches, unchanged, to its own subject
``etwmon.<host>.events`` on one stream. Headers say who sent the batch and where it sits in that host's run
(``Etwmon-Run``/``Etwmon-Seq``) and how many events the run has accounted for so far (``Etwmon-Total``), so a
consumer can tell a duplicate from a gap and give the size of a gap exactly. ``Nats-Msg-Id`` makes a retried
publish stored once.
"""

from __future__ import annotations

import re
import socket
import uuid
from datetime import datetime, timedelta, timezone
from typing import Sequence

from ..errors import Error

__all__ = [
    "FleetError", "subject_for", "default_host_id", "check_host_id", "parse_since", "parse_duration",
    "DEFAULT_STREAM", "SUBJECT_PATTERN",
]

#: The stream every host publishes to, and the subjects it holds (one per host).
DEFAULT_STREAM = "ETWMON"
SUBJECT_PATTERN = "etwmon.*.events"
DEFAULT_MAX_AGE = 7 * 86_400.0  # seconds
DEFAULT_MAX_BYTES = 1 << 30
#: How long JetStream remembers a Nats-Msg-Id: a publish retried within it is stored once.
DUPLICATE_WINDOW = 120.0

# Message headers (values are ASCII; times are FILETIME integers in decimal).
H_MSG_ID = "Nats-Msg-Id"
H_HOST = "Etwmon-Host"
H_BOOT = "Etwmon-Boot"  # the kernel's boot id: pids and times belong to one boot
H_RUN = "Etwmon-Run"  # this run of the shipper: a new run starts its sequence at 1
H_SOURCE = "Etwmon-Source"
H_SEQ = "Etwmon-Seq"  # batch sequence within the run, from 1, no gaps
H_COUNT = "Etwmon-Count"  # records in the body
H_TOTAL = "Etwmon-Total"  # events accounted for in the run up to this batch: records + counts reported lost
H_FIRST = "Etwmon-First-Time"
H_LAST = "Etwmon-Last-Time"

_HOST_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class FleetError(Error):
    """The fleet cannot work: nats-py missing, the server refused the credentials or a subject, bad options."""


def _nats():
    try:
        import nats  # noqa: F401
        import nats.errors  # noqa: F401
        import nats.js.api  # noqa: F401
        import nats.js.errors  # noqa: F401
    except ImportError as exc:
        raise FleetError("the fleet needs nats-py: pip install 'etwmon[nats]' (in a clone: pip install -e '.[nats]')" + f" ({exc})") from None
    return nats


# --- names -------------------------------------------------------------------------------------------------


def check_host_id(host: str) -> str:
    """``host`` if it can be one subject token (letters, digits, ``_``, ``-``), else ``FleetError``."""
    if not isinstance(host, str) or not _HOST_ID.fullmatch(host):
        raise FleetError(f"host id {host!r} must be 1-128 letters, digits, '_' or '-' (it is a NATS subject "
                         "token: no dots, spaces or wildcards)")
    return host


def default_host_id() -> str:
    """The hostname, with each character a subject token cannot hold (dots of a FQDN) made ``_``."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:128]
    return name or "localhost"


def subject_for(host: str) -> str:
    """``etwmon.<host>.events``: the one subject a host publishes to (so permissions can pin it)."""
    return f"etwmon.{check_host_id(host)}.events"


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:  # not Linux: one id per run stands in for the boot
        return uuid.uuid4().hex


_RELATIVE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_duration(text: str) -> float:
    """``30s``, ``10m``, ``2h``, ``7d`` or plain seconds → seconds; ``ValueError`` otherwise."""
    match = _RELATIVE.fullmatch(text)
    if match:
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a duration such as 3600, 90m, 12h or 7d, not {text!r}") from None
    if not value > 0:
        raise ValueError(f"a duration must be more than 0, not {text!r}")
    return value


def parse_since(text: str, now: datetime | None = None) -> datetime | None:
    """``--since``: ``all`` (None: everything the stream holds), an ISO-8601 time (UTC when it names no zone)
    or an age such as ``30s``, ``10m``, ``2h``, ``1d``. ``ValueError`` otherwise."""
    if text.strip().lower() == "all":
        return None
    if _RELATIVE.fullmatch(text):
        return (now or datetime.now(timezone.utc)) - timedelta(seconds=parse_duration(text))
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since takes 'all', an ISO-8601 time (2026-12-01T09:30:00Z) or an age (10m, 2h, 1d), "
                         f"not {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _describe_url(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//", url)  # never repeat a password given in the URL


def describe_servers(url: str | Sequence[str]) -> str:
    """The server URL(s) as a person reads them: comma-separated, any password left out."""
    return ", ".join(map(_describe_url, [url] if isinstance(url, str) else list(url)))


_SCHEMES = ("nats", "tls")


def check_server_url(url: str) -> str:
    """``url`` if it names a NATS server (``nats://HOST[:PORT]`` or ``tls://HOST[:PORT]``), else ``FleetError``:
    another scheme would only fail later, as a DNS or protocol error."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        ok = parts.scheme.lower() in _SCHEMES and bool(parts.hostname) and url.lower().startswith(
            tuple(f"{s}://" for s in _SCHEMES))
        parts.port  # noqa: B018 (raises ValueError on a port that is not a number in range)
    except ValueError:
        ok = False
    if not ok:
        raise FleetError(f"{_describe_url(url)!r} is not a NATS server URL: give nats://HOST:PORT "
                         "(or tls://HOST:PORT)")
    return url


def no_jetstream(exc: BaseException) -> bool:
    """True when ``exc`` (from a JetStream API call) means nothing answers the JetStream API at all: the server
    runs without JetStream. A JetStream that is there but busy (a cluster electing) answers with an error code."""
    errors = _nats().js.errors
    return isinstance(exc, errors.ServiceUnavailableError) and exc.err_code is None and not exc.description


def no_jetstream_error(url: str | Sequence[str]) -> FleetError:
    return FleetError(f"{describe_servers(url)} has no JetStream, which keeps the fleet's batches: turn it on in "
                      'the server\'s configuration (Debian: /etc/nats-server.conf), e.g. listen: "0.0.0.0:4222" '
                      'and jetstream { store_dir: "/var/lib/nats" }, then restart nats-server (docs/fleet.md)')


#: The record times a consumer accepts: from FILETIME 0 (1601-01-01) to the start of year 9999, so that every
#: time shown, in any zone, is a date Python (and JSON readers) can hold.
MIN_FILETIME = 0
MAX_FILETIME = 252_455_616_000_000_000  # 9999-01-01T00:00:00Z
