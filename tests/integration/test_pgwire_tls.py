"""TLS on the wire protocol (issue 17): SSLRequest answered with TLS from the configured
certificate; outside dev mode a token is taken only over TLS; sslmode=disable works in dev
mode on loopback (tests/integration/test_pgwire.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from app.devstack import free_port

pytestmark = pytest.mark.integration


def self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
            ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_pg(make_gateway, tmp_path_factory) -> Iterator[Any]:
    cert, key = self_signed(tmp_path_factory.mktemp("pg-tls"))
    # Not dev mode: the token is a password only over TLS.
    yield make_gateway(pg_port=free_port(), pg_tls_cert_file=str(cert),
                       pg_tls_key_file=str(key)), cert


def _conninfo(pg: Any, token: str, **extra: str) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": pg.settings.pg_port, "dbname": "appdb",
            "user": "alice", "password": token, **extra}


def test_psycopg_over_verified_tls(tls_pg, keys):
    pg, cert = tls_pg
    token = keys.token("alice", ["analysts"])
    with psycopg.connect(**_conninfo(pg, token, sslmode="verify-full",
                                     sslrootcert=str(cert))) as conn:
        assert conn.pgconn.ssl_in_use
        email = conn.execute("SELECT email FROM customers WHERE id = 1").fetchone()[0]
        assert "*" in email


def test_asyncpg_over_tls(tls_pg, keys):
    pg, cert = tls_pg
    token = keys.token("alice", ["analysts"])
    context = ssl.create_default_context(cafile=str(cert))

    async def run() -> int:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.settings.pg_port, user="alice",
                                     password=token, database="appdb", ssl=context)
        try:
            return int(await conn.fetchval("SELECT id FROM customers WHERE id = $1", 2))
        finally:
            await conn.close()

    assert asyncio.run(run()) == 2


def test_without_tls_the_token_is_not_even_asked_for(tls_pg, keys):
    pg, _ = tls_pg
    token = keys.token("alice", ["analysts"])
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(**_conninfo(pg, token, sslmode="disable"))
    assert "tls_required" in str(caught.value)


def test_an_expired_token_is_refused_at_startup(tls_pg, keys):
    pg, _cert = tls_pg
    token = keys.token("alice", ["analysts"], exp=1_000_000_000)
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(**_conninfo(pg, token, sslmode="require"))
    assert "token_expired" in str(caught.value)
