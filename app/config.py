"""The one settings object, read from ``QUERYGATE_*`` environment variables.

Built in the app factory (never at import) so tests and ``querygate dev`` can build their
own. Invalid or conflicting values stop start-up with a message that names the variable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
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
    dev_signing_key_file: Path = Path(".querygate/dev/signing-key.pem")

    max_sql_bytes: int = Field(65_536, ge=64, le=10_000_000)
    max_request_bytes: int = Field(1_048_576, ge=1024, le=100_000_000)
    max_params: int = Field(1000, ge=0, le=65_535)
    max_rows: int = Field(1000, ge=1, le=10_000_000)
    statement_timeout_ms: int = Field(5000, ge=1, le=3_600_000)

    # Masking: the key of the deterministic `hash` strategy (HMAC-SHA-256). Required in prod,
    # where a missing key would make hashes reproducible by anyone who has the code.
    mask_hmac_key: SecretStr | None = None
    mask_redact_token: str = "[REDACTED]"
    stream_batch_rows: int = Field(500, ge=1, le=100_000)

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
            and not self.dev_mode
        ):
            raise ConfigError(
                f"{_env('jwt_public_key')} or {_env('jwt_public_key_file')} is required "
                f"(only {_env('dev_mode')} may fall back to the dev signing key)"
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
