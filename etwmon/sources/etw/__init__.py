"""The ``etw`` source (Windows, administrator): process, thread and image-load events from ETW (docs/windows.md)."""

from .source import *  # noqa: F401,F403
from .source import __all__  # noqa: F401
