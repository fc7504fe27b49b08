"""Fleet: ship a host's records to NATS JetStream (``Shipper``) and read every host's back (``FleetConsumer``),
with nothing lost silently on the way.

Each host publishes the bytes of its Monitor's ``readinto`` batches, unchanged, to its own subject
``etwmon.<host>.events`` on one stream. Headers say who sent the batch and where it sits in that host's run
(``Etwmon-Run``/``Etwmon-Seq``) and how many events the run has accounted for so far (``Etwmon-Total``), so a
consumer can tell a duplicate from a gap and give the size of a gap exactly, as a RecordsLost event of that
host. ``Nats-Msg-Id`` makes a retried publish stored once. Everything a message claims is checked: a consumer
counts and reports a bad message with the host it claims and goes on.

nats-py is an optional dependency (``pip install 'etwmon[nats]'``). Usage and server configuration:
docs/fleet.md.

One room per idea: ``wire`` (the stream, subjects, headers and host ids: the contract both sides share), ``auth``
(credentials and the connection made with them), ``ship`` (``Shipper``) and ``consume`` (``FleetConsumer``, its
checks of every message, and ``FleetReader``, the consumer on a thread behind the reader contract).
"""

from .auth import AUTH_ENV, ENV_AUTH_FILE, FleetAuth, load_auth  # noqa: F401 (names of the module this was)
from .consume import FleetConsumer, FleetNotice, FleetReader, HostBatch, HostStats
from .ship import Shipper, ShipperStats
from .wire import (  # noqa: F401 (the header names and limits stay reachable here, as before the split)
    DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES, DEFAULT_STREAM, DUPLICATE_WINDOW, H_BOOT, H_COUNT, H_FIRST, H_HOST, H_LAST,
    H_MSG_ID, H_RUN, H_SEQ, H_SOURCE, H_TOTAL, SUBJECT_PATTERN, FleetError, check_host_id, default_host_id,
    parse_duration, parse_since, subject_for,
)

__all__ = [
    "FleetError", "FleetAuth", "load_auth", "Shipper", "ShipperStats", "FleetConsumer", "HostBatch", "FleetReader",
    "FleetNotice", "HostStats", "subject_for", "default_host_id", "check_host_id", "parse_since", "parse_duration",
    "DEFAULT_STREAM", "SUBJECT_PATTERN", "AUTH_ENV",
]
