"""Shared fixtures: real PostgreSQL (pgserver), real OPA, and gateways on loopback.

Integration tests talk to the real services started here; nothing is faked. Fixtures wait
until each service answers before handing it out.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from app.api import create_app
from app.config import Settings, load_settings
from app.devstack import OpaProcess, Postgres, free_port, start_opa, start_postgres

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
ISSUER = "https://idp.test"
AUDIENCE = "querygate"


class Keys:
    """An RSA key pair standing in for the identity provider's signing key."""

    def __init__(self) -> None:
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.public_pem = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def token(self, sub: str, groups: list[str], **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "sub": sub, "groups": groups, "iss": ISSUER, "aud": AUDIENCE,
            "iat": now, "nbf": now, "exp": now + 600,
        }
        body.update(claims)
        return jwt.encode(body, self.private, algorithm="RS256")

    def headers(self, sub: str, groups: list[str], **claims: Any) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(sub, groups, **claims)}"}


class Database:
    """Direct access to the test database, to check what really happened."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.dsn)
            try:
                return await conn.fetch(sql, *args)
            finally:
                await conn.close()

        return asyncio.run(run())

    def fetchval(self, sql: str, *args: Any) -> Any:
        rows = self.fetch(sql, *args)
        return rows[0][0] if rows else None

    def execute(self, sql: str) -> None:
        async def run() -> None:
            conn = await asyncpg.connect(self.dsn)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(run())

    def table_exists(self, name: str) -> bool:
        return bool(self.fetchval("SELECT to_regclass($1) IS NOT NULL", name))


class Gateway:
    """A real uvicorn server running the app in a thread, on a free loopback port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port,
            log_level="warning", lifespan="on", access_log=False,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def start(self) -> Gateway:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def query(self, sql: str, headers: dict[str, str], params: list[Any] | None = None,
              path: str = "/v1/query") -> httpx.Response:
        body: dict[str, Any] = {"sql": sql}
        if params is not None:
            body["params"] = params
        return self.client.post(path, json=body, headers=headers)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    pg = start_postgres(tmp_path_factory.mktemp("pg"))
    yield pg
    pg.stop()


@pytest.fixture(scope="session")
def db(postgres: Postgres) -> Database:
    return Database(postgres.app_dsn)


@pytest.fixture(scope="session")
def opa() -> Iterator[OpaProcess]:
    process = start_opa()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys()


@pytest.fixture(scope="session")
def base_settings(postgres: Postgres, opa: OpaProcess, keys: Keys) -> dict[str, Any]:
    return {
        "environment": "staging",
        "database_url": postgres.app_dsn,
        "opa_url": opa.url,
        "jwt_public_key": keys.public_pem,
        "jwt_issuer": ISSUER,
        "jwt_audience": AUDIENCE,
        "jwt_algorithms": ["RS256"],
        "opa_timeout_ms": 2000,
    }


@pytest.fixture(scope="session")
def make_gateway(base_settings: dict[str, Any]) -> Iterator[Callable[..., Gateway]]:
    """Start gateways with settings overrides; all are stopped at the end of the session."""
    started: list[Gateway] = []

    def make(**overrides: Any) -> Gateway:
        gateway = Gateway(load_settings(**{**base_settings, **overrides})).start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="session")
def gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway()


@pytest.fixture(scope="session")
def alice(keys: Keys) -> dict[str, str]:
    return keys.headers("alice", ["analysts"])


@pytest.fixture(scope="session")
def dana(keys: Keys) -> dict[str, str]:
    return keys.headers("dana", ["dba"])
