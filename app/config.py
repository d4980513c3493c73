"""The one settings object, read from ``QUERYGATE_*`` environment variables.

Built in the app factory (never at import) so tests and ``querygate dev`` can build their
own. Invalid or conflicting values stop start-up with a message that names the variable.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "QUERYGATE_"

Environment = Literal["dev", "staging", "prod"]

# Asymmetric algorithms only: a shared HMAC secret would let every verifier mint tokens, and
# accepting HS* beside a public key is the classic key-confusion attack.
ALLOWED_JWT_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

_PLACEHOLDERS = ("changeme", "change-me", "replace-me", "your-key-here", "xxx", "todo")


class ConfigError(Exception):
    """Settings that cannot start a gateway; the message names the variable."""


def _env(field: str) -> str:
    return ENV_PREFIX + field.upper()


# QUERYGATE_* variables that are not settings of this class: each is read by something else.
# Any other name that is neither a setting nor a secret's _FILE stops start-up
# (load_settings), since a misspelled variable would otherwise be ignored without a word.
# (QUERYGATE_DATABASE_URL, _SCHEMAS, _MASK_REDACT_TOKEN and _AUDIT_KAFKA_TOPIC are also read
# by `querygate db` and `querygate audit verify`, but they are settings here too.)
OTHER_VARIABLES: dict[str, str] = {
    "QUERYGATE_OPA_BIN": "the opa binary of `querygate dev` and the tests (app/devstack.py)",
    "QUERYGATE_KAFKA_LIBS": "the Kafka jars of the test broker (app/devstack.py)",
    "QUERYGATE_KUSTOMIZE_BIN": "the kustomize binary of tests/deploy (Makefile)",
    "QUERYGATE_DB_ADMIN_URL": "a DBA's DSN for `querygate db init` (app/cli.py)",
    "QUERYGATE_CHROMIUM": "the browser of the console's browser tests (tests/browser)",
    "QUERYGATE_CHROMEDRIVER": "its driver (tests/browser)",
    "QUERYGATE_CONSOLE_SCREENSHOTS": "where the browser tests save their screenshots",
    # What an application next to a sidecar reads (deploy/k8s/base/deployment.yaml), and
    # `querygate mcp` (app/cli.py, docs/agents.md).
    "QUERYGATE_URL": "where the application (or the MCP bridge) reaches the gateway",
    "QUERYGATE_TOKEN_FILE": "the application's (or the MCP bridge's) bearer token",
}


def _prefixed_environ() -> dict[str, str]:
    # Upper-cased, as pydantic-settings matches names without regard to case.
    return {k.upper(): v for k, v in os.environ.items() if k.upper().startswith(ENV_PREFIX)}


class Settings(BaseSettings):
    """Everything the gateway can be told, with safe defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Arguments, then variables, then secret files; no .env file.
        return init_settings, env_settings, _SecretFiles(settings_cls)

    # The default is the strictest environment: a gateway deployed without saying where it
    # runs is treated as production.
    environment: Environment = "prod"
    dev_mode: bool = False

    # Every secret (SecretStr) setting may come from a file instead of its variable:
    # QUERYGATE_<NAME>_FILE=/path, or a file named QUERYGATE_<NAME> in this directory (a mounted
    # Secret). One source per secret: two of them are an error.
    secrets_dir: Path | None = None
    database_url: SecretStr | None = None
    db_pool_min: int = Field(1, ge=0, le=100)
    db_pool_max: int = Field(10, ge=1, le=500)
    db_connect_timeout_ms: int = Field(5000, ge=100, le=120_000)
    schemas: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["public"])
    catalog_refresh_s: float = Field(60.0, ge=1.0, le=86_400.0)
    admin_groups: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["querygate-admins"]
    )

    opa_url: str = "http://127.0.0.1:8181"
    opa_decision_path: str = "querygate/decision"
    opa_timeout_ms: int = Field(500, ge=1, le=60_000)
    # Decisions policy marks cacheable (``cache_ttl_s``) are reused for the same input, bundle
    # revision and catalog version (docs/decision-contract.md): at most this many, for at most
    # this long whatever the policy says. 0 entries turns the cache off.
    decision_cache_entries: int = Field(10_000, ge=0, le=1_000_000)
    decision_cache_max_ttl_s: int = Field(300, ge=1, le=86_400)

    jwt_public_key: SecretStr | None = None
    jwt_public_key_file: Path | None = None
    jwt_algorithms: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["RS256", "ES256", "EdDSA"]
    )
    jwt_issuer: str = "querygate-dev"
    jwt_audience: str = "querygate"
    jwt_leeway_s: int = Field(30, ge=0, le=300)
    max_token_bytes: int = Field(8192, ge=256, le=65_536)
    # Verified tokens are remembered (by their exact text) for at most this many seconds and
    # never past their exp, so a repeated token skips the signature check (docs/identity.md).
    # A rotated-out key or a changed trust configuration still takes effect at once. 0 = off.
    auth_cache_ttl_s: int = Field(30, ge=0, le=300)
    auth_cache_size: int = Field(4096, ge=0, le=100_000)
    dev_signing_key_file: Path = Path(".querygate/dev/signing-key.pem")

    max_sql_bytes: int = Field(65_536, ge=64, le=10_000_000)
    max_request_bytes: int = Field(1_048_576, ge=1024, le=100_000_000)
    max_params: int = Field(1000, ge=0, le=65_535)
    max_rows: int = Field(1000, ge=1, le=10_000_000)
    statement_timeout_ms: int = Field(5000, ge=1, le=3_600_000)
    # Deadlines and limits per caller (README, Settings). The end-to-end deadline of a request
    # (default: the statement timeout + 1 s), then of a whole NDJSON stream; how long a
    # statement waits for a free database connection.
    request_timeout_ms: int | None = Field(None, ge=100, le=3_600_000)
    stream_timeout_ms: int = Field(300_000, ge=100, le=86_400_000)
    pool_acquire_timeout_ms: int = Field(2000, ge=10, le=600_000)
    max_response_bytes: int = Field(32 << 20, ge=1024, le=1 << 40)
    # Per identity (issuer, sub), per process; 0 turns the limit off.
    max_concurrent_per_identity: int = Field(4, ge=0, le=10_000)
    rate_limit_per_s: float = Field(50.0, ge=0, le=1_000_000)
    rate_limit_burst: int = Field(100, ge=1, le=1_000_000)
    # The PostgreSQL wire protocol (docs/pgwire.md): off unless a port is set (0: any free
    # port). TLS for SSLRequest from a certificate and key; outside dev mode a password (the
    # token) is taken only over TLS.
    pg_host: str = "127.0.0.1"
    pg_port: int | None = Field(None, ge=0, le=65_535)
    pg_tls_cert_file: Path | None = None
    pg_tls_key_file: Path | None = None
    pg_max_connections: int = Field(200, ge=1, le=100_000)
    pg_max_connections_per_identity: int = Field(20, ge=1, le=100_000)
    pg_startup_timeout_ms: int = Field(10_000, ge=100, le=600_000)
    # Connections still in their startup (not yet authenticated) at once: a client that
    # opens connections and never authenticates holds at most these, never every slot of
    # pg_max_connections for the startup timeout.
    pg_max_startups: int = Field(32, ge=1, le=100_000)
    # A session that holds a database connection (in a transaction) and sends nothing for
    # this long is ended, so it cannot keep a pooled connection from everyone else.
    pg_idle_in_transaction_timeout_s: float = Field(60.0, ge=0.1, le=86_400.0)
    # /healthz fails when the event loop was blocked longer than this (app/liveness.py).
    liveness_max_loop_lag_ms: int = Field(2000, ge=100, le=600_000)
    # How long `querygate serve` lets in-flight requests finish on SIGTERM before cancelling.
    shutdown_timeout_ms: int = Field(10_000, ge=0, le=600_000)

    @property
    def request_timeout_s(self) -> float:
        """The end-to-end deadline of a request, in seconds."""
        ms = self.request_timeout_ms
        return (self.statement_timeout_ms + 1000 if ms is None else ms) / 1000

    @property
    def stream_timeout_s(self) -> float:
        """The end-to-end deadline of an NDJSON stream (never shorter than a request's)."""
        return max(self.stream_timeout_ms / 1000, self.request_timeout_s)

    @model_validator(mode="after")
    def _pg_tls_pair(self) -> Settings:
        if (self.pg_tls_cert_file is None) != (self.pg_tls_key_file is None):
            raise ValueError(
                f"{_env('pg_tls_cert_file')} and {_env('pg_tls_key_file')} go together"
            )
        return self

    @model_validator(mode="after")
    def _deadlines_consistent(self) -> Settings:
        timeout = self.request_timeout_s * 1000
        if self.request_timeout_ms is not None and timeout <= self.statement_timeout_ms:
            # The statement timeout ends a slow statement cleanly on the server; a request
            # deadline below it would cut every slow statement by closing its connection.
            raise ValueError(
                f"{_env('request_timeout_ms')} must be greater than {_env('statement_timeout_ms')}"
            )
        return self

    # Identity (docs/identity.md). Issuers trusted besides the static key above, each with its
    # own JWKS (or OIDC discovery) and audience — typically the IdP and the cluster.
    class TrustedIssuer(BaseModel):
        """One entry of QUERYGATE_JWT_ISSUERS."""

        model_config = ConfigDict(extra="forbid", frozen=True)

        issuer: str = Field(min_length=1)
        audience: str = Field("querygate", min_length=1)
        jwks_url: str | None = None
        # Find jwks_uri in <issuer>/.well-known/openid-configuration instead of jwks_url.
        discovery: bool = False
        kind: Literal["jwt", "k8s_sa"] = "jwt"
        algorithms: list[str] | None = None
        groups_claims: list[str] | None = None
        roles_claims: list[str] | None = None
        email_claim: str | None = None

        @model_validator(mode="after")
        def _one_key_source(self) -> Settings.TrustedIssuer:
            if (self.jwks_url is not None) == self.discovery:
                raise ValueError("set exactly one of jwks_url and discovery: true")
            bad = [alg for alg in self.algorithms or [] if alg not in ALLOWED_JWT_ALGORITHMS]
            if bad or self.algorithms == []:
                raise ValueError(
                    f"algorithms {bad} are not allowed; choose from {sorted(ALLOWED_JWT_ALGORITHMS)}"
                )
            return self

    jwt_issuers: Annotated[list[Settings.TrustedIssuer], NoDecode] = Field(default_factory=list)
    # Dotted claim paths (realm_access.roles); the values of every path are merged.
    jwt_groups_claims: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["groups"])
    jwt_roles_claims: Annotated[list[str], NoDecode] = Field(default_factory=list)
    jwt_email_claim: str = Field("email", min_length=1)
    # A token that names an environment must name this one; required for jwt issuers if set.
    jwt_environment_claim: str = Field("environment", min_length=1)
    jwt_require_environment: bool = False
    # JWKS fetches: a total deadline per fetch, a periodic refresh, and a floor between
    # fetches so a stream of unknown kids cannot turn the gateway against the IdP.
    jwks_timeout_ms: int = Field(2000, ge=50, le=30_000)
    jwks_refresh_s: float = Field(300.0, ge=1.0, le=86_400.0)
    jwks_min_refresh_s: float = Field(10.0, ge=0.1, le=3600.0)
    # Mesh mTLS: the proxy's client-certificate header is believed only from these peers.
    mtls_trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list)
    mtls_trust_domains: Annotated[list[str], NoDecode] = Field(default_factory=list)
    mtls_header: str = Field("x-forwarded-client-cert", pattern=r"^[A-Za-z0-9-]+$")

    @field_validator("jwt_issuers", mode="before")
    @classmethod
    def _issuers_json(cls, value: object) -> object:
        # Decoded here (NoDecode) so a typo is an error naming the variable, not a parse crash.
        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else []
            except ValueError as exc:
                raise ValueError(f"not valid JSON: {exc}") from exc
        return value

    @field_validator(
        "jwt_groups_claims", "jwt_roles_claims", "mtls_trusted_proxies", "mtls_trust_domains",
        mode="before",
    )
    @classmethod
    def _split_identity_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("mtls_trusted_proxies")
    @classmethod
    def _trusted_proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=True)
            except ValueError as exc:
                raise ValueError(f"{entry!r} is not an address or a CIDR with zero host bits") from exc
        return value

    @field_validator("mtls_trust_domains")
    @classmethod
    def _trust_domains(cls, value: list[str]) -> list[str]:
        for domain in value:
            if not domain or domain != domain.lower() or not all(
                c.isalnum() or c in ".-_" for c in domain
            ):
                raise ValueError(f"{domain!r} is not a SPIFFE trust domain (lower-case, no scheme)")
        return value

    def fetch_url_problem(self, url: str) -> str | None:
        """Why a JWKS/discovery URL may not be fetched here, or None when it may."""
        parts = urlsplit(url)
        if not parts.hostname or parts.scheme not in ("https", "http"):
            return "must be an https:// URL"
        if parts.scheme == "https" or self.dev_mode:
            return None
        # Plain http only where nobody can tamper with the keys in transit: loopback (tests, a
        # local key proxy), and never in prod.
        host = parts.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback and self.environment != "prod":
            return None
        return "http:// is allowed only in dev mode, or to a loopback address outside prod"

    @model_validator(mode="after")
    def _identity_consistent(self) -> Settings:
        name = _env("jwt_issuers")
        seen: set[str] = set()
        for i, entry in enumerate(self.jwt_issuers):
            url = entry.jwks_url if entry.jwks_url is not None else entry.issuer
            problem = self.fetch_url_problem(url)
            if problem:
                what = "jwks_url" if entry.jwks_url is not None else "issuer (used for discovery)"
                raise ValueError(f"{name}[{i}].{what}: {problem}")
            if entry.issuer in seen:
                raise ValueError(f"{name}: issuer {entry.issuer!r} is listed twice")
            seen.add(entry.issuer)
        static_key = self.jwt_public_key is not None or self.jwt_public_key_file is not None
        if (static_key or self.dev_mode) and self.jwt_issuer in seen:
            raise ValueError(
                f"{_env('jwt_issuer')} {self.jwt_issuer!r} (the static/dev key) is also in {name}"
            )
        if self.mtls_trusted_proxies and not self.mtls_trust_domains:
            raise ValueError(
                f"{_env('mtls_trust_domains')} is required with {_env('mtls_trusted_proxies')}"
            )
        if not self.dev_mode and any(
            ipaddress.ip_network(p).prefixlen == 0 for p in self.mtls_trusted_proxies
        ):
            raise ValueError(f"{_env('mtls_trusted_proxies')}: trusting every address is dev-only")
        return self

    # Masking: the key of the deterministic `hash` strategy (HMAC-SHA-256). Required in prod,
    # where a missing key would make hashes reproducible by anyone who has the code.
    mask_hmac_key: SecretStr | None = None
    mask_redact_token: str = Field(
        "[REDACTED]", min_length=1, max_length=64, pattern=r"^[^'\\\x00]+$"
    )  # a placeholder shown, not a secret; it becomes a literal in the masking views
    # Masking profiles (docs/masking.md): how long the caller's masking_profile decision is
    # reused (it depends on the identity, the catalog and the bundle revision only), and how
    # many profiles (a role, views and a pool each) may be open at once.
    profile_cache_ttl_s: float = Field(30.0, ge=0, le=3600)
    # The role DDL runs as (SET LOCAL ROLE) when the decision names no db_role: the owner of
    # the exposed tables. The login role is a member WITH SET TRUE, INHERIT FALSE, so it can
    # act as the owner for a migration but owns nothing itself (checked in prod).
    ddl_role: str | None = Field(None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    max_profiles: int = Field(64, ge=1, le=1000)
    profile_pool_max: int = Field(10, ge=1, le=500)
    stream_batch_rows: int = Field(500, ge=1, le=100_000)

    # Audit trail (docs/audit.md). Every event is appended to a local spool (fsynced) before
    # the response goes out, then shipped in order to the sink. Without a spool directory a
    # temporary one is used and deleted at shutdown: set it wherever the trail matters.
    audit_sink: Literal["file", "stdout", "kafka"] = "file"
    audit_spool_dir: Path | None = None
    # The file sink's JSONL file; default <spool dir>/audit.jsonl.
    audit_file: Path | None = None
    # Names this gateway in every event and keys its Kafka messages; default: the id the
    # spool recorded when it was created (<hostname>-<random>). A restart with the same
    # spool directory (and id) continues the hash chain.
    audit_instance_id: str | None = Field(None, pattern=r"^[A-Za-z0-9._:-]{1,128}$")
    audit_spool_max_bytes: int = Field(1 << 30, ge=64 * 1024, le=1 << 40)
    audit_segment_bytes: int = Field(16 << 20, ge=4096, le=1 << 30)
    # When the spool can accept nothing, queries are refused (503 audit_unavailable); true
    # lets them run unaudited instead, and is refused in prod.
    audit_fail_open: bool = False
    audit_drain_timeout_s: float = Field(5.0, ge=0.0, le=300.0)
    audit_kafka_bootstrap: str | None = None
    audit_kafka_topic: str = Field("querygate.audit", pattern=r"^[A-Za-z0-9._-]{1,249}$")
    audit_kafka_timeout_ms: int = Field(30_000, ge=1000, le=600_000)
    audit_kafka_linger_ms: int = Field(5, ge=0, le=1000)
    # Record batches are compressed (events are JSON: ~5x smaller). gzip needs nothing
    # beyond the standard library; lz4, snappy and zstd need their codec installed.
    audit_kafka_compression: Literal["gzip", "lz4", "snappy", "zstd", "none"] = "gzip"
    audit_kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    audit_kafka_sasl_mechanism: Literal[
        "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    audit_kafka_sasl_username: str | None = None
    audit_kafka_sasl_password: SecretStr | None = None
    # OAUTHBEARER: a file holding the access token, read again for every authentication so a
    # token a sidecar or the kubelet rotates keeps working.
    audit_kafka_sasl_oauth_token_file: Path | None = None
    audit_kafka_ssl_cafile: Path | None = None
    # GET /metrics (Prometheus text format, unauthenticated: counts and timings only).
    metrics_enabled: bool = True
    # OpenTelemetry traces (app/tracing.py; the otel extra), exported over OTLP/HTTP as the
    # standard OTEL_EXPORTER_OTLP_* variables say.
    otel_enabled: bool = False
    otel_service_name: str = "querygate"
    # Serve /metrics on this port instead (on QUERYGATE_HOST; with several workers, each on
    # the first free port from here), so a NetworkPolicy can open it to Prometheus alone.
    metrics_port: int | None = Field(None, ge=0, le=65535)

    @model_validator(mode="after")
    def _audit_consistent(self) -> Settings:
        if self.audit_sink == "kafka" and not self.audit_kafka_bootstrap:
            raise ValueError(
                f"{_env('audit_kafka_bootstrap')} is required with {_env('audit_sink')}=kafka"
            )
        if self.audit_fail_open and self.environment == "prod":
            raise ValueError(f"{_env('audit_fail_open')} cannot be used with "
                             f"{_env('environment')}=prod")
        if self.audit_sink == "kafka" and self.audit_kafka_compression not in ("gzip", "none"):
            from aiokafka import codec

            if not getattr(codec, f"has_{self.audit_kafka_compression}")():
                raise ValueError(f"{_env('audit_kafka_compression')}="
                                 f"{self.audit_kafka_compression} needs its codec installed")
        sasl = self.audit_kafka_security_protocol.startswith("SASL_")
        if sasl != (self.audit_kafka_sasl_mechanism is not None):
            raise ValueError(f"{_env('audit_kafka_sasl_mechanism')} is required with, and only "
                             f"with, {_env('audit_kafka_security_protocol')}=SASL_*")
        oauth = self.audit_kafka_sasl_mechanism == "OAUTHBEARER"
        if oauth != (self.audit_kafka_sasl_oauth_token_file is not None):
            raise ValueError(f"{_env('audit_kafka_sasl_oauth_token_file')} is required with, "
                             f"and only with, {_env('audit_kafka_sasl_mechanism')}=OAUTHBEARER")
        if sasl and not oauth and (
            not self.audit_kafka_sasl_username or self.audit_kafka_sasl_password is None
        ):
            raise ValueError(f"{_env('audit_kafka_sasl_username')} and "
                             f"{_env('audit_kafka_sasl_password')} are required with SASL "
                             "PLAIN and SCRAM")
        return self

    # Approvals: a Slack-compatible webhook told when one is requested and decided.
    approval_webhook_url: str | None = None

    # The console (`querygate console`, docs/console.md): one per cluster, a reader of the
    # audit index it fills from the audit stream; it acts only through the gateway's API.
    # The index: a database (or schema) no caller of the gateway can read.
    console_database_url: SecretStr | None = None
    console_host: str = "127.0.0.1"
    console_port: int = Field(8081, ge=0, le=65_535)
    # Where users reach the console (links in approval notifications, the OIDC redirect).
    console_public_url: str | None = None
    # The gateway's HTTP API, called with the signed-in user's own token (approvals).
    console_gateway_url: str = "http://127.0.0.1:8080"
    # What the index reads: the file sink's JSONL file, or the Kafka topic
    # (QUERYGATE_AUDIT_KAFKA_BOOTSTRAP / _TOPIC).
    console_source: Literal["file", "kafka"] = "file"
    console_audit_file: Path | None = None
    console_ingest_batch: int = Field(500, ge=1, le=100_000)
    console_ingest_poll_ms: int = Field(500, ge=10, le=60_000)
    # The issuer whose subjects are the console's users: "only their own events" means the
    # events of identity (sub, this issuer). Default: QUERYGATE_JWT_ISSUER.
    console_audit_issuer: str | None = None
    # OPA rule that says what a user may see: {"scope": "all"} or {"scope": "own"}.
    console_opa_path: str = Field("querygate/console/access", pattern=r"^[A-Za-z0-9_/]+$")
    console_session_ttl_s: int = Field(8 * 3600, ge=60, le=7 * 86_400)
    # OIDC sign-in (authorization code + PKCE): the issuer's discovery document names its
    # endpoints; groups come from the ID token or userinfo (QUERYGATE_JWT_GROUPS_CLAIMS).
    console_oidc_issuer: str | None = None
    console_oidc_client_id: str | None = None
    console_oidc_client_secret: SecretStr | None = None
    console_oidc_scopes: str = "openid profile groups"
    # `querygate dev` only: the dev OIDC provider's port (app/console/devidp.py).
    console_dev_idp_port: int | None = Field(None, ge=0, le=65_535)

    @model_validator(mode="after")
    def _console_consistent(self) -> Settings:
        if (self.console_oidc_issuer is None) != (self.console_oidc_client_id is None):
            raise ValueError(f"{_env('console_oidc_issuer')} and {_env('console_oidc_client_id')} "
                             "go together")
        if self.console_dev_idp_port is not None and not self.dev_mode:
            raise ValueError(f"{_env('console_dev_idp_port')} needs {_env('dev_mode')}=true")
        for name in ("console_public_url", "console_gateway_url", "console_oidc_issuer"):
            value = getattr(self, name)
            if value is not None:
                parts = urlsplit(value)
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    raise ValueError(f"{_env(name)} must be an http(s) URL")
        if self.environment == "prod" and self.console_oidc_issuer is not None:
            if urlsplit(self.console_oidc_issuer).scheme != "https":
                raise ValueError(f"{_env('console_oidc_issuer')} must be https in prod")
        return self

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65_535)
    # `querygate serve` worker processes on the one port. Each has its own audit spool and
    # chain (docs/audit.md), pools, caches and per-caller limits (README).
    workers: int = Field(1, ge=1, le=64)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("schemas", "jwt_algorithms", "admin_groups", mode="before")
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _algorithms(cls, value: list[str]) -> list[str]:
        bad = [alg for alg in value if alg not in ALLOWED_JWT_ALGORITHMS]
        if bad:
            raise ValueError(
                f"algorithms {bad} are not allowed; choose from {sorted(ALLOWED_JWT_ALGORITHMS)}"
            )
        if not value:
            raise ValueError("at least one algorithm is required")
        return value

    @field_validator("schemas")
    @classmethod
    def _schemas(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one schema is required")
        return value

    @field_validator("opa_url")
    @classmethod
    def _opa_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL such as http://127.0.0.1:8181")
        return value.rstrip("/")

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and urlsplit(value.get_secret_value()).scheme not in (
            "postgres",
            "postgresql",
        ):
            raise ValueError("must be a postgresql:// DSN")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.dev_mode and self.environment == "prod":
            raise ValueError(
                f"{_env('dev_mode')} cannot be used with {_env('environment')}=prod"
            )
        if self.jwt_public_key is not None and self.jwt_public_key_file is not None:
            raise ValueError(
                f"set only one of {_env('jwt_public_key')} and {_env('jwt_public_key_file')}"
            )
        if self.jwt_public_key is not None:
            lowered = self.jwt_public_key.get_secret_value().strip().lower()
            if not lowered or any(lowered == p or lowered.startswith(p) for p in _PLACEHOLDERS):
                raise ValueError(f"{_env('jwt_public_key')} is a placeholder, not a key")
        if self.mask_hmac_key is not None:
            key = self.mask_hmac_key.get_secret_value()
            if len(key) < 16 or any(key.lower().startswith(p) for p in _PLACEHOLDERS):
                raise ValueError(f"{_env('mask_hmac_key')} must be a real secret of 16+ characters")
        if self.db_pool_min > self.db_pool_max:
            raise ValueError(f"{_env('db_pool_min')} must not exceed {_env('db_pool_max')}")
        if self.max_request_bytes < self.max_sql_bytes:
            raise ValueError(
                f"{_env('max_request_bytes')} must be at least {_env('max_sql_bytes')}"
            )
        return self

    @property
    def database_name(self) -> str:
        """The database name as policy sees it (from the DSN path)."""
        if self.database_url is None:
            return ""
        return urlsplit(self.database_url.get_secret_value()).path.lstrip("/") or "postgres"

    def require_serving(self) -> None:
        """Check what serving needs beyond what a CLI helper does."""
        if self.database_url is None:
            raise ConfigError(f"{_env('database_url')} is required")
        if self.environment == "prod" and self.mask_hmac_key is None:
            raise ConfigError(f"{_env('mask_hmac_key')} is required in prod")
        if self.workers > 1 and self.mask_hmac_key is None:
            # Without it each process draws its own key, and the key is stored in the database
            # and derives the profiles' passwords: the workers would undo each other's.
            raise ConfigError(f"{_env('mask_hmac_key')} is required with {_env('workers')} > 1")
        if (
            self.jwt_public_key is None
            and self.jwt_public_key_file is None
            and not self.jwt_issuers
            and not self.dev_mode
        ):
            raise ConfigError(
                f"{_env('jwt_public_key')}, {_env('jwt_public_key_file')} or {_env('jwt_issuers')} "
                f"is required (only {_env('dev_mode')} may fall back to the dev signing key)"
            )


def secret_fields() -> dict[str, str | None]:
    """Each secret setting and its ``*_FILE`` variable (None where a setting has that name)."""
    fields = Settings.model_fields
    return {
        name: None if f"{name}_file" in fields else _env(name) + "_FILE"
        for name, field in fields.items()
        if SecretStr in (field.annotation, *get_args(field.annotation))
    }


class _SecretFiles(PydanticBaseSettingsSource):
    """Secret settings read from ``QUERYGATE_<NAME>_FILE`` or the secrets directory."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads every secret at once

    def __call__(self) -> dict[str, Any]:
        given = self.settings_sources_data.get("InitSettingsSource", {})
        variables = self.settings_sources_data.get("EnvSettingsSource", {})
        environ = _prefixed_environ()
        secrets = secret_fields()
        in_dir = self._directory(given.get("secrets_dir", variables.get("secrets_dir")), secrets)
        values: dict[str, Any] = {}
        for name, file_var in secrets.items():
            if name in given:
                continue  # arguments (tests, `querygate dev`) win, as over variables
            found = [_env(name)] if name in variables else []
            paths = []
            if file_var is not None and file_var in environ:
                found.append(file_var)
                paths.append((file_var, Path(environ[file_var])))
            if name in in_dir:
                found.append(str(in_dir[name]))
                paths.append((_env("secrets_dir"), in_dir[name]))
            if len(found) > 1:
                raise ConfigError(f"{_env(name)} is given more than once: set only one of "
                                  + " and ".join(found))
            if paths:
                values[name] = _read_secret(*paths[0])
        return values

    @staticmethod
    def _directory(value: object, secrets: dict[str, str | None]) -> dict[str, Path]:
        if value is None or value == "":
            return {}
        directory = Path(str(value))
        if not directory.is_dir():
            raise ConfigError(f"{_env('secrets_dir')}: {directory} is not a directory")
        wanted = {_env(name): name for name in secrets}
        found: dict[str, Path] = {}
        for entry in sorted(directory.iterdir()):
            if entry.name.startswith("."):
                continue  # a mounted Secret's ..data and timestamped directories
            name = wanted.get(entry.name.upper())
            if name is None:
                # A misspelled file would be ignored as silently as a misspelled variable.
                hint = difflib.get_close_matches(entry.name.upper(), wanted, n=1)
                raise ConfigError(
                    f"{_env('secrets_dir')}: {entry.name} in {directory} is not a secret setting"
                    + (f" (did you mean {hint[0]}?)" if hint else f"; expected {sorted(wanted)}")
                )
            found[name] = entry
        return found


def _read_secret(variable: str, path: Path) -> str:
    try:
        # Surrounding whitespace (the newline `echo` leaves) is never part of the secret.
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{variable}: {path} is not UTF-8 text") from None
    if not value:
        raise ConfigError(f"{variable}: {path} is empty")
    return value


def unknown_variables(environ: dict[str, str] | None = None) -> list[str]:
    """One message per ``QUERYGATE_*`` variable nothing reads, with a "did you mean" hint."""
    names = set(_prefixed_environ() if environ is None else (k.upper() for k in environ))
    secrets = secret_fields()
    known = {_env(name) for name in Settings.model_fields} | set(OTHER_VARIABLES) | {
        file_var for file_var in secrets.values() if file_var is not None
    }
    suffixes = {name.removeprefix(ENV_PREFIX): name for name in known}
    problems = []
    for name in sorted(names - known):
        if not name.startswith(ENV_PREFIX):
            continue
        base = name.removesuffix("_FILE").removeprefix(ENV_PREFIX).lower()
        if name.endswith("_FILE") and base in Settings.model_fields:
            problems.append(f"{name}: {_env(base)} is not a secret; only "
                            f"{', '.join(_env(s) for s in secrets)} can be read from a file")
            continue
        # Compared without the prefix, which every name shares.
        hint = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), suffixes, n=1)
        problems.append(f"{name} is not a setting"
                        + (f" (did you mean {suffixes[hint[0]]}?)" if hint else ""))
    return problems


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus overrides; errors name the variable."""
    unknown = unknown_variables()
    if unknown:
        raise ConfigError("unknown variables: " + "; ".join(unknown))
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(part) for part in err["loc"])
            name = _env(loc) if loc else "settings"
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{name}: {msg}")
        raise ConfigError("invalid settings: " + "; ".join(lines)) from exc
