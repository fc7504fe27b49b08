"""Recordings (``etwmon record``): a file of readinto chunks behind a versioned header, replayed through the
Reader protocol (``open_recording``), shown as one self-contained HTML page (``report``), exported as Parquet,
JSON lines or a Chrome/Perfetto trace (``export``). The format is documented in docs/recording.md."""

from .format import FORMAT_VERSION, RecordingFormatError
from .reader import RecordingReader, open_recording
from .writer import RecordingWriter

__all__ = ["FORMAT_VERSION", "RecordingFormatError", "RecordingReader", "RecordingWriter", "open_recording"]
