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

from app.config import Settings, load_settings
from app.devstack import OpaProcess, Postgres, free_port, start_opa, start_postgres
from app.http import create_app
from tests.integration.wire import Wire

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
            # As `querygate serve`: the peer address is the TCP peer, never X-Forwarded-For.
            proxy_headers=False,
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
    # As the tables' owner: tests create, change and check tables as an application would.
    return Database(postgres.owner_dsn)


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
        "ddl_role": "querygate_owner",
        # The limits per caller are off for tests of other things, which send many requests
        # (some at once) as one identity; tests/integration/test_limits.py turns them on.
        "rate_limit_per_s": 0,
        "max_concurrent_per_identity": 0,
    }


@pytest.fixture(scope="session")
def serve_settings(base_settings: dict[str, Any]) -> dict[str, str]:
    """base_settings as the QUERYGATE_* strings a `querygate serve` process reads."""
    return {
        key: ",".join(value) if isinstance(value, list) else str(value)
        for key, value in base_settings.items()
    } | {"log_level": "warning"}


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


@pytest.fixture
def wire(postgres: Postgres) -> Iterator[Wire]:
    """A pass-through to PostgreSQL that records what its clients send (``wire.dsn``)."""
    passthrough = Wire(postgres.app_dsn)
    yield passthrough
    passthrough.close()


# --- identity: a real OIDC/JWKS provider on loopback (tests/*/test_identity*.py) -------------
# Appended after the fixtures above, hence the late imports.

import base64  # noqa: E402
import hashlib  # noqa: E402
import hmac  # noqa: E402
import json  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

from cryptography.hazmat.primitives.asymmetric import ec, ed25519  # noqa: E402


class SigningKey:
    """One signing key of a test identity provider, with the kid it is published under."""

    def __init__(self, kid: str, kind: str = "RSA") -> None:
        self.kid = kid
        self.private: Any
        if kind == "RSA":
            self.private, self.alg = rsa.generate_private_key(65537, 2048), "RS256"
            self._jwk_alg = jwt.algorithms.RSAAlgorithm
        elif kind == "EC":
            self.private, self.alg = ec.generate_private_key(ec.SECP256R1()), "ES256"
            self._jwk_alg = jwt.algorithms.ECAlgorithm
        else:
            self.private, self.alg = ed25519.Ed25519PrivateKey.generate(), "EdDSA"
            self._jwk_alg = jwt.algorithms.OKPAlgorithm

    def jwk(self, **extra: Any) -> dict[str, Any]:
        """The public JWK as an IdP publishes it."""
        jwk = self._jwk_alg.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.alg, **extra}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **header})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge_hs256(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """An HS256 token whose HMAC secret is `secret` — PyJWT refuses to make one with a PEM."""
    signing_input = (
        b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
        + "."
        + b64url(json.dumps(claims).encode())
    )
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def unsigned(claims: dict[str, Any], kid: str) -> str:
    """An `alg: none` token."""
    header = b64url(json.dumps({"alg": "none", "typ": "JWT", "kid": kid}).encode())
    return f"{header}.{b64url(json.dumps(claims).encode())}."


class IdentityProvider:
    """A real OIDC issuer on 127.0.0.1 serving discovery and a JWKS the test can rotate.

    ``mode``: ``ok`` answers; ``hang`` accepts and answers nothing until stopped (or
    released); ``error`` answers 503. ``routes`` overrides any path with (status, body).
    ``requests`` lists every path asked for, so tests can count fetches.
    """

    def __init__(self, issuer: str | None = None, jwks_path: str = "/jwks.json") -> None:
        self.keys: list[SigningKey] = []
        self.requests: list[str] = []
        self.mode = "ok"
        self.routes: dict[str, tuple[int, bytes, dict[str, str]]] = {}
        self.jwks_path = jwks_path
        self.release = threading.Event()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                provider.requests.append(self.path)
                if provider.mode == "hang":
                    provider.release.wait(30)
                    return
                status, body, headers = provider.answer(self.path)
                self.send_response(status)
                for name, value in {"content-type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.issuer = issuer or self.url
        self.jwks_url = self.url + jwks_path
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.running = True

    def answer(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        if path in self.routes:
            return self.routes[path]
        if self.mode == "error":
            return 503, b'{"error": "down"}', {}
        if path == "/.well-known/openid-configuration":
            doc = {"issuer": self.issuer, "jwks_uri": self.jwks_url}
            return 200, json.dumps(doc).encode(), {}
        if path == self.jwks_path:
            return 200, json.dumps({"keys": [k.jwk() for k in self.keys]}).encode(), {}
        return 404, b"{}", {}

    def publish(self, *keys: SigningKey) -> None:
        """Replace the published key set (a rotation step)."""
        self.keys = list(keys)

    def jwks_requests(self) -> int:
        return self.requests.count(self.jwks_path)

    def claims(self, sub: str, groups: list[str] | None = None, **claims: Any) -> dict[str, Any]:
        now = int(time.time())
        body: dict[str, Any] = {
            "sub": sub, "iss": self.issuer, "aud": AUDIENCE, "iat": now, "nbf": now,
            "exp": now + 600,
        }
        if groups is not None:
            body["groups"] = groups
        body.update(claims)
        return {k: v for k, v in body.items() if v is not None}

    def token(self, key: SigningKey, sub: str, groups: list[str] | None = None,
              header: dict[str, Any] | None = None, **claims: Any) -> str:
        return key.sign(self.claims(sub, groups, **claims), **(header or {}))

    def sa_token(self, key: SigningKey, namespace: str, name: str, **claims: Any) -> str:
        """A Kubernetes projected service-account token as the API server mints it."""
        return self.token(
            key, f"system:serviceaccount:{namespace}:{name}",
            **{"kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": name, "uid": "0d4c-sa-uid"},
                "pod": {"name": f"{name}-7d9f", "uid": "5e1a-pod-uid"},
            }},
            **claims,
        )

    def stop(self) -> None:
        if self.running:
            self.running = False
            self.release.set()
            self.server.shutdown()
            self.server.server_close()


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="session")
def make_idp() -> Iterator[Callable[..., IdentityProvider]]:
    """Start identity providers on loopback; all are stopped at the end of the session."""
    started: list[IdentityProvider] = []

    def make(**kwargs: Any) -> IdentityProvider:
        provider = IdentityProvider(**kwargs)
        started.append(provider)
        return provider

    yield make
    for provider in started:
        provider.stop()


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(
            out.get(key), dict) else value
    return out


@pytest.fixture(scope="session")
def opa_with_config(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., OpaProcess]]:
    """Start a real OPA on a copy of rego/ whose data.json has these overrides merged in."""
    import json
    import shutil

    started: list[OpaProcess] = []

    def start(**overrides: Any) -> OpaProcess:
        copy = tmp_path_factory.mktemp("rego") / "rego"
        shutil.copytree(REPO / "rego", copy)
        data_file = copy / "querygate" / "config" / "data.json"
        data_file.write_text(json.dumps(_merge(json.loads(data_file.read_text()), overrides)))
        process = start_opa([copy])
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="session")
def admin_db(postgres: Postgres) -> Database:
    """The demo database as the cluster's superuser (roles, grants)."""
    return Database(postgres.admin_dsn.replace("/postgres?", "/appdb?"))


# --- audit: a real Kafka broker (tests/integration/test_audit*.py) ---------------------------

from app.devstack import KafkaBroker, start_kafka  # noqa: E402


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """One KRaft Kafka node on free loopback ports (jars from `make kafka`), answering.

    Tests may ``stop()`` and ``start()`` it (same ports, same data) and must leave it running.
    """
    broker = start_kafka(tmp_path_factory.mktemp("kafka"))
    yield broker
    broker.stop()
