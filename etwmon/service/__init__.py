"""The etwmon service: ``etwmon serve`` owns the one kernel source (the book's driver) and serves its records on
a Unix socket (its device); ``etwmon.connect()`` reads them with the Monitor's API (docs/service.md)."""

from .client import Connection, ConnectionStats, connect
from .protocol import VERSION as PROTOCOL_VERSION
from .server import DEFAULT_SOCKET, ENV_SOCKET, Server, ServerLimits, default_socket

__all__ = ["Connection", "ConnectionStats", "connect", "Server", "ServerLimits", "DEFAULT_SOCKET", "ENV_SOCKET",
           "default_socket", "PROTOCOL_VERSION"]
