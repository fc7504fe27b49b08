"""Fleet credentials and connections: ``FleetAuth`` and ``load_auth`` (from an owner-only file or the
environment, so no secret needs to be in argv), and the nats-py connection both sides make with them."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .wire import FleetError, _describe_url, _nats

__all__ = ["FleetAuth", "load_auth", "AUTH_ENV"]

log = logging.getLogger(__name__)

#: The environment variables (and the names in an auth file) that hold credentials and TLS settings.
AUTH_ENV = {
    "user": "ETWMON_NATS_USER",
    "password": "ETWMON_NATS_PASSWORD",
    "token": "ETWMON_NATS_TOKEN",
    "nkey_seed_file": "ETWMON_NATS_NKEY_SEED_FILE",
    "creds_file": "ETWMON_NATS_CREDS_FILE",
    "tls_ca": "ETWMON_NATS_TLS_CA",
    "tls_cert": "ETWMON_NATS_TLS_CERT",
    "tls_key": "ETWMON_NATS_TLS_KEY",
}
ENV_AUTH_FILE = "ETWMON_NATS_AUTH_FILE"


@dataclass(frozen=True)
class FleetAuth:
    """How to authenticate to NATS: any of user/password, token, an nkey seed file, a credentials (.creds) file,
    and TLS (a CA file to trust; a client certificate and key). Built by ``load_auth`` from a file or the
    environment so no secret ever needs to be in argv."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    nkey_seed_file: str | None = None
    creds_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def connect_options(self, url: str) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``."""
        opts: dict[str, Any] = {}
        if self.user is not None:
            opts["user"] = self.user
            opts["password"] = self.password or ""
        if self.token is not None:
            opts["token"] = self.token
        if self.nkey_seed_file or self.creds_file:
            import importlib.util

            if importlib.util.find_spec("nkeys") is None:  # nats-py signs the server's nonce with it
                raise FleetError("nkey and credentials-file authentication need the nkeys package: "
                                 "pip install 'etwmon[nats]'")
            if self.nkey_seed_file:
                opts["nkeys_seed"] = self.nkey_seed_file
            if self.creds_file:
                opts["user_credentials"] = self.creds_file
        if self.tls_ca or self.tls_cert or url.startswith("tls://"):
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            opts["tls"] = context
        return opts


def _read_auth_file(path: str) -> dict[str, str]:
    """``NAME=value`` lines (the AUTH_ENV names; ``#`` comments), from a file only its owner can read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise FleetError(f"cannot open the NATS auth file {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "r", encoding="utf-8") as f:
        info = os.fstat(f.fileno())
        if hasattr(os, "geteuid"):
            if not stat.S_ISREG(info.st_mode):
                raise FleetError(f"the NATS auth file {path} is not a regular file")
            if info.st_uid not in (0, os.geteuid()):
                raise FleetError(f"the NATS auth file {path} belongs to uid {info.st_uid}, not to this user or root")
            if info.st_mode & 0o077:
                raise FleetError(f"the NATS auth file {path} holds secrets but others may read or write it "
                                 f"(mode {stat.S_IMODE(info.st_mode):04o}): chmod 600 {path}")
        text = f.read()
    values: dict[str, str] = {}
    known = set(AUTH_ENV.values())
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or name not in known:
            raise FleetError(f"{path} line {number}: expected NAME=value with NAME one of {', '.join(sorted(known))}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values


def load_auth(environ: Mapping[str, str] | None = None, path: str | None = None) -> FleetAuth:
    """Credentials from the auth file ``path`` (or ``$ETWMON_NATS_AUTH_FILE``), then the AUTH_ENV variables
    for what the file does not set."""
    environ = os.environ if environ is None else environ
    path = path or environ.get(ENV_AUTH_FILE) or None
    values = _read_auth_file(path) if path else {}
    chosen = {key: values.get(name, environ.get(name) or None) for key, name in AUTH_ENV.items()}
    return FleetAuth(**chosen)


async def _connect(url: str | Sequence[str], auth: FleetAuth | None, name: str,
                   on_error: Callable[[Exception], None] | None = None, connect_timeout: float = 2.0,
                   reconnect_wait: float = 0.5, on_disconnect: Callable[[], None] | None = None,
                   on_reconnect: Callable[[], None] | None = None, stop: asyncio.Event | None = None,
                   give_up_after: float | None = None):
    """A nats-py connection that reconnects forever (None if ``stop`` is set first), or ``FleetError`` at once
    when the server refuses the credentials (nats-py would retry those forever too), or when no server answered
    within ``give_up_after`` seconds."""
    nats = _nats()
    servers = [url] if isinstance(url, str) else list(url)
    refused: list[Exception] = []
    done = asyncio.get_running_loop().create_future()
    said: set[str] = set()
    reasons: set[str] = set()

    async def error_cb(exc: Exception) -> None:
        text = str(exc)
        if re.search(r"authorization violation|authentication", text, re.IGNORECASE):
            refused.append(exc)
            if not done.done():
                done.set_result(None)
            return
        if refused:  # the server closes a refused connection: its reset is the refusal's echo, not news
            return
        if len(reasons) < 5:
            reasons.add(text or type(exc).__name__)
        if on_error is not None:
            on_error(exc)
        elif text not in said:  # once each: a server that is away would repeat it every reconnect
            said.add(text)
            log.warning("nats: %s", text or type(exc).__name__)

    async def disconnected_cb() -> None:
        if on_disconnect is not None:
            on_disconnect()

    async def reconnected_cb() -> None:
        if on_reconnect is not None:
            on_reconnect()

    options = (auth or FleetAuth()).connect_options(servers[0])
    task = asyncio.ensure_future(nats.connect(
        servers, name=name, error_cb=error_cb, disconnected_cb=disconnected_cb, reconnected_cb=reconnected_cb,
        allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=reconnect_wait,
        connect_timeout=connect_timeout, **options))
    waits = [task, done] + ([asyncio.ensure_future(stop.wait())] if stop is not None else [])
    await asyncio.wait(waits, timeout=give_up_after, return_when=asyncio.FIRST_COMPLETED)
    if not task.done():  # stopped, or gave up, while still trying to reach the server
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        for w in waits[1:]:
            w.cancel()
        if not refused and stop is not None and stop.is_set():
            return None
        if not refused:
            why = "; ".join(sorted(reasons)) or "no answer"
            raise FleetError(f"cannot reach {', '.join(map(_describe_url, servers))} within {give_up_after:.0f} s "
                             f"({why})") from None
    if refused:
        task.cancel()
        try:
            nc = await task
        except BaseException:
            nc = None
        if nc is not None:
            await nc.close()
        raise FleetError(f"{', '.join(map(_describe_url, servers))} refused the credentials ({refused[0]}): "
                         "check the user/password, token, nkey or creds file") from None
    for w in waits[1:]:
        w.cancel()
    return task.result()
