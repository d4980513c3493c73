"""The one settings object, read from ``QUERYGATE_*`` environment variables.

Built in the app factory (never at import) so tests and ``querygate dev`` can build their
own. Invalid or conflicting values stop start-up with a message that names the variable.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Literal
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
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

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


class Settings(BaseSettings):
    """Everything the gateway can be told, with safe defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, validate_default=True
    )

    # The default is the strictest environment: a gateway deployed without saying where it
    # runs is treated as production.
    environment: Environment = "prod"
    dev_mode: bool = False

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
    mask_redact_token: str = "[REDACTED]"  # noqa: S105 - a placeholder shown, not a secret
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
    audit_kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = (
        "PLAINTEXT"
    )
    audit_kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    audit_kafka_sasl_username: str | None = None
    audit_kafka_sasl_password: SecretStr | None = None
    audit_kafka_ssl_cafile: Path | None = None
    # GET /metrics (Prometheus text format, unauthenticated: counts and timings only).
    metrics_enabled: bool = True

    @model_validator(mode="after")
    def _audit_consistent(self) -> Settings:
        if self.audit_sink == "kafka" and not self.audit_kafka_bootstrap:
            raise ValueError(
                f"{_env('audit_kafka_bootstrap')} is required with {_env('audit_sink')}=kafka"
            )
        if self.audit_fail_open and self.environment == "prod":
            raise ValueError(f"{_env('audit_fail_open')} cannot be used with "
                             f"{_env('environment')}=prod")
        sasl = self.audit_kafka_security_protocol.startswith("SASL_")
        if sasl != (self.audit_kafka_sasl_mechanism is not None):
            raise ValueError(f"{_env('audit_kafka_sasl_mechanism')} is required with, and only "
                             f"with, {_env('audit_kafka_security_protocol')}=SASL_*")
        if sasl and (not self.audit_kafka_sasl_username or self.audit_kafka_sasl_password is None):
            raise ValueError(f"{_env('audit_kafka_sasl_username')} and "
                             f"{_env('audit_kafka_sasl_password')} are required with SASL")
        return self

    # Approvals: a Slack-compatible webhook told when one is requested and decided.
    approval_webhook_url: str | None = None

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65_535)
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


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment plus overrides; errors name the variable."""
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
