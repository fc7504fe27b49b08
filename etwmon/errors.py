"""The one exception family of etwmon: every error the library raises on purpose is an ``etwmon.Error``."""

from __future__ import annotations

__all__ = ["Error", "BufferTooSmall", "RecordFormatError", "SourceUnavailable", "SourceError", "RulesError",
           "RuleConfigError", "ServiceUnavailable", "ServiceRefused", "ProtocolError", "RecordingFormatError"]


class Error(Exception):
    """Base class of every error etwmon raises on purpose."""


class BufferTooSmall(Error, ValueError):
    """``readinto`` was given a buffer that cannot hold even the next record.

    Nothing was consumed; call again with a buffer of at least ``needed`` bytes.
    """

    def __init__(self, needed: int, size: int | None = None) -> None:
        self.needed = needed
        self.size = size
        have = "" if size is None else f" (the buffer has {size})"
        super().__init__(f"buffer too small: the next record needs {needed} bytes{have}")


class RecordFormatError(Error, ValueError):
    """A record or a buffer of records does not follow the wire format; ``offset`` says where."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(message if offset is None else f"at offset {offset}: {message}")


class SourceUnavailable(Error):
    """A kernel event source cannot work here; the message says why and what to do instead."""


class SourceError(Error):
    """The source thread of a Monitor failed; the original exception is ``__cause__``."""


class RulesError(Error):
    """Rules cannot be used here (e.g. the ``rules`` extra, defusedxml, is not installed)."""


class RuleConfigError(RulesError, ValueError):
    """A rules configuration was refused: unreadable, too big, not well-formed, hostile (DTDs, entities) or not
    a valid Sysmon configuration. The message names the file and line; nothing was started."""


class ServiceUnavailable(SourceUnavailable):
    """No etwmon service answers at the socket path (none there, or a stale socket); the message says which."""


class ServiceRefused(Error, PermissionError):
    """The etwmon service (or the socket's permissions) refused this client; ``code`` is the reason's short
    name (``not-allowed``, ``too-many-clients``, ``version``, ``bad-hello``, ``permission``)."""

    def __init__(self, message: str, code: str = "") -> None:
        self.code = code
        super().__init__(message)


class ProtocolError(Error):
    """A peer broke the service protocol (docs/service.md): a bad frame, length or message."""


class RecordingFormatError(Error, ValueError):
    """A file is not an etwmon recording (``etwmon record``), or of a format version this reader does not know;
    one line says which."""
