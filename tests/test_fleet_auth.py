"""NATS nkey and credentials-file (JWT) logins against a real nats-server configured with them: a host ships
and a reader reads back with each, and a wrong key is refused with one clear error.

The keys are made here with ``nkeys``; the operator, account and user JWTs are signed here too (the NATS JWT v2
format: base64url header and claims, an Ed25519 signature by the issuer's nkey), so no ``nsc`` is needed."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import REQUIRE_ROOT

try:
    import nats  # noqa: F401
    import nkeys
except ImportError:
    if REQUIRE_ROOT:
        raise
    pytest.skip("nats-py and nkeys are not installed (pip install 'etwmon[nats]')", allow_module_level=True)

from etwmon.fleet import FleetAuth, FleetConsumer, FleetError, load_auth  # noqa: E402

from .nats_servers import NatsServer  # noqa: E402
from .test_fleet import Collector, CounterSource, ShipperThread  # noqa: E402


def new_key(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(secrets.token_bytes(32), prefix))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign_jwt(issuer: nkeys.KeyPair, subject: str, name: str, nats_claims: dict) -> str:
    """A NATS v2 JWT of ``subject`` issued (signed) by ``issuer``."""
    claims = {"iat": int(time.time()), "iss": issuer.public_key.decode(), "name": name, "sub": subject,
              "nats": {**nats_claims, "version": 2}}
    # jti: the token's unique id, a base32 hash of the claims without it (the server does not check how it is made)
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()) \
        .rstrip(b"=").decode()
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = issuer.sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{_b64(signature)}"


def write_private(path: Path, text: str) -> str:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return str(path)


def creds_file(path: Path, user_jwt: str, user: nkeys.KeyPair) -> str:
    """A .creds file as nsc writes one."""
    return write_private(path, f"""-----BEGIN NATS USER JWT-----
{user_jwt}
------END NATS USER JWT------

************************* IMPORTANT *************************
NKEY Seed printed below can be used to sign and prove identity.
NKEYs are sensitive and should be treated as secrets.

-----BEGIN USER NKEY SEED-----
{user.seed.decode()}
------END USER NKEY SEED------

*************************************************************
""")


UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
             "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}


@pytest.fixture
def nkey_server(tmp_path):
    """Two users known by their nkeys: a host and a reader (plain authorization block, no accounts)."""
    host, reader = new_key(nkeys.PREFIX_BYTE_USER), new_key(nkeys.PREFIX_BYTE_USER)
    extra = ("authorization { users: [ { nkey: %s }, { nkey: %s } ] }"
             % (host.public_key.decode(), reader.public_key.decode()))
    server = NatsServer(tmp_path, extra=extra).start()
    keys = {"host": write_private(tmp_path / "host.nk", host.seed.decode() + "\n"),
            "reader": write_private(tmp_path / "reader.nk", reader.seed.decode() + "\n"),
            "stranger": write_private(tmp_path / "stranger.nk",
                                      new_key(nkeys.PREFIX_BYTE_USER).seed.decode() + "\n")}
    yield server, keys
    server.stop(signal.SIGKILL)


@pytest.fixture
def operator_server(tmp_path):
    """Operator mode: an operator JWT, one account with JetStream (preloaded in a memory resolver), and users
    signed by the account, logging in with .creds files. A user signed by another account's key is refused."""
    operator = new_key(nkeys.PREFIX_BYTE_OPERATOR)
    account, system = new_key(nkeys.PREFIX_BYTE_ACCOUNT), new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    op_pub = operator.public_key.decode()
    operator_jwt = sign_jwt(operator, op_pub, "etwmon-op", {"type": "operator",
                                                            "system_account": system.public_key.decode()})
    account_jwt = sign_jwt(operator, account.public_key.decode(), "fleet",
                           {"type": "account", "limits": UNLIMITED, "default_permissions": {"pub": {}, "sub": {}}})
    system_jwt = sign_jwt(operator, system.public_key.decode(), "SYS",
                          {"type": "account", "limits": {**UNLIMITED, "mem_storage": 0, "disk_storage": 0,
                                                         "streams": 0, "consumer": 0},
                           "default_permissions": {"pub": {}, "sub": {}}})
    creds = {}
    for name in ("host", "reader"):
        user = new_key(nkeys.PREFIX_BYTE_USER)
        user_jwt = sign_jwt(account, user.public_key.decode(), name,
                            {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
        creds[name] = creds_file(tmp_path / f"{name}.creds", user_jwt, user)
    rogue_account = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
    rogue = new_key(nkeys.PREFIX_BYTE_USER)
    rogue_jwt = sign_jwt(rogue_account, rogue.public_key.decode(), "rogue",
                         {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
    creds["rogue"] = creds_file(tmp_path / "rogue.creds", rogue_jwt, rogue)
    (tmp_path / "operator.jwt").write_text(operator_jwt)
    extra = (f'operator: "{tmp_path / "operator.jwt"}"\nsystem_account: {system.public_key.decode()}\n'
             f"resolver: MEMORY\nresolver_preload: {{\n  {account.public_key.decode()}: \"{account_jwt}\"\n"
             f"  {system.public_key.decode()}: \"{system_jwt}\"\n}}\n")
    server = NatsServer(tmp_path, extra=extra).start()
    yield server, creds
    server.stop(signal.SIGKILL)


def opened(consumer: FleetConsumer, timeout: float = 30.0) -> FleetConsumer:
    """``consumer`` opened once the shipper has made the stream (it does so just after logging in)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return consumer.open()
        except FleetError as exc:
            if "no stream" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # a consumer that could not open may be opened again


def ship_and_read_back(url: str, host_auth: FleetAuth, reader_auth: FleetAuth) -> None:
    shipper = ShipperThread(url, "h1", CounterSource(total=50, rate=0), auth=host_auth)
    try:
        with opened(FleetConsumer(url, since="all", auth=reader_auth)) as consumer:
            col = Collector(consumer)
            col.until(lambda c: len(c.tids.get("h1", [])) >= 50)
    finally:
        shipper.stop()
    assert col.tids["h1"] == list(range(50)) and not col.notices


@pytest.fixture(params=["nkey", "creds"])
def login(request):
    """(server, {who: FleetAuth}) for nkey logins and for creds-file logins: ``host`` and ``reader`` are known to
    the server, ``refused`` is not (an nkey it was never told of; a user of an account the operator never signed)."""
    if request.param == "nkey":
        server, seeds = request.getfixturevalue("nkey_server")
        auths = {who: FleetAuth(nkey_seed_file=seeds[key]) for who, key in
                 (("host", "host"), ("reader", "reader"), ("refused", "stranger"))}
    else:
        server, creds = request.getfixturevalue("operator_server")
        auths = {who: FleetAuth(creds_file=creds[key]) for who, key in
                 (("host", "host"), ("reader", "reader"), ("refused", "rogue"))}
    return server, auths


def test_logins_ship_and_read_back(login):
    server, auths = login
    ship_and_read_back(server.url, auths["host"], auths["reader"])


def test_credentials_the_server_does_not_trust_are_refused_in_one_clear_error(login):
    server, auths = login
    with pytest.raises(FleetError, match="refused the credentials"):
        FleetConsumer(server.url, auth=auths["refused"], connect_wait=10).open()


def test_cli_ship_logs_in_with_the_creds_file_its_auth_file_names(tmp_path, operator_server):
    from .helpers import Watch, clean_env, etwmon_argv

    server, creds = operator_server
    auth_file = write_private(tmp_path / "auth", f"ETWMON_NATS_CREDS_FILE={creds['host']}\n")
    env = clean_env(PYTHONPATH=str(Path(__file__).resolve().parent.parent), ETWMON_NATS_AUTH_FILE=auth_file)
    with Watch(etwmon_argv("ship", "--source", "procfs", "--host-id", "h1", "--to", server.url), env=env) as ship:
        ship.wait_err(lambda l: b"shipping to" in l, timeout=60, what="the shipping line")
        with opened(FleetConsumer(server.url, since="all", auth=FleetAuth(creds_file=creds["reader"]))) as consumer:
            col = Collector(consumer)
            # procfs sees what runs long enough for a poll: a process of ours, in case nothing else starts meanwhile
            col.until(lambda c: any(host == "h1" for host, _ in c.others), timeout=60,
                      step=lambda: subprocess.run(["sleep", "0.5"], check=True))
        assert ship.stop() == 0, ship.stderr
