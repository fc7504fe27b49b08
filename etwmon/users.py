"""The name of a user id, looked up once per uid and kept (a bounded cache): records carry the uid, the kernel's
fact at the event; its name comes from the user database of the machine that shows or judges the record, where it
is shown or judged (``Event.user``, ``etwmon tail``, the rules' User conditions), not per record at capture."""

from __future__ import annotations

import functools

try:
    import pwd
except ImportError:  # pragma: no cover - Windows: its records carry User already (the account), no uid
    pwd = None  # type: ignore[assignment]

__all__ = ["user_name", "MAX_CACHED_USERS"]

#: Uids whose name (or lack of one) is kept; past this the least recently used is looked up again when next asked.
MAX_CACHED_USERS = 1024


@functools.lru_cache(maxsize=MAX_CACHED_USERS)
def user_name(uid: int) -> str | None:
    """The name of ``uid`` in the user database, None when it has none (the number is all there is). A name
    given to a uid after its first lookup is seen once the uid has left the cache."""
    if pwd is None:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError, ValueError):
        return None
