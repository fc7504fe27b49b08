"""Fleet: ship a host's records to NATS JetStream and read every host's back (docs/fleet.md)."""

from .consume import *  # noqa: F401,F403
from .consume import __all__  # noqa: F401
