"""Who is asking: verify the bearer token and turn its claims into an Identity.

Minimal version: one configured public key (PEM), PyJWT with an explicit algorithm list,
issuer, audience, expiry and a size limit. Dev tokens are signed with a local Ed25519 key
that only exists in dev mode, never in prod.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from app.config import ConfigError, Settings
from app.errors import Unauthenticated

AuthKind = Literal["jwt"]


@dataclass(frozen=True, slots=True)
class Identity:
    """A verified caller, as the policy sees it."""

    sub: str
    groups: tuple[str, ...]
    issuer: str
    auth: AuthKind = "jwt"
    email: str | None = None
    on_behalf_of: Identity | None = None
    attributes: dict[str, str] = field(default_factory=dict)

    def to_input(self) -> dict[str, Any]:
        """The ``identity`` object of the OPA input."""
        return {
            "sub": self.sub,
            "groups": list(self.groups),
            "issuer": self.issuer,
            "auth": self.auth,
            "email": self.email,
            "on_behalf_of": self.on_behalf_of.to_input() if self.on_behalf_of else None,
            "attributes": dict(self.attributes),
        }


def _load_public_key(settings: Settings) -> bytes:
    if settings.jwt_public_key is not None:
        return settings.jwt_public_key.get_secret_value().encode()
    if settings.jwt_public_key_file is not None:
        try:
            return settings.jwt_public_key_file.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"QUERYGATE_JWT_PUBLIC_KEY_FILE: cannot read {settings.jwt_public_key_file}: "
                f"{exc.strerror}"
            ) from exc
    if settings.dev_mode:
        return public_pem(load_or_create_dev_key(settings.dev_signing_key_file))
    raise ConfigError("QUERYGATE_JWT_PUBLIC_KEY or QUERYGATE_JWT_PUBLIC_KEY_FILE is required")


class Authenticator:
    """Verifies ``Authorization: Bearer`` tokens against the configured key."""

    def __init__(self, settings: Settings) -> None:
        pem = _load_public_key(settings)
        try:
            self._key = serialization.load_pem_public_key(pem)
        except ValueError as exc:
            raise ConfigError(
                "QUERYGATE_JWT_PUBLIC_KEY(_FILE): not a PEM public key"
            ) from exc
        self._algorithms = list(settings.jwt_algorithms)
        self._issuer = settings.jwt_issuer
        self._audience = settings.jwt_audience
        self._leeway = settings.jwt_leeway_s
        self._max_bytes = settings.max_token_bytes

    def authenticate(self, authorization: str | None) -> Identity:
        """Return the verified identity, or raise Unauthenticated with a stable code."""
        if not authorization:
            raise Unauthenticated("missing_token", "an Authorization: Bearer token is required")
        if len(authorization) > self._max_bytes:
            raise Unauthenticated("invalid_token", "the token is larger than allowed")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing_token", "an Authorization: Bearer token is required")
        try:
            claims = jwt.decode(
                token.strip(),
                self._key,  # type: ignore[arg-type]
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token_expired", "the token has expired") from exc
        except jwt.InvalidTokenError as exc:
            # PyJWT's messages name the failed check (issuer, audience, signature) without
            # echoing the token, so they are safe to return.
            raise Unauthenticated("invalid_token", f"the token is not valid: {exc}") from exc
        return identity_from_claims(claims)


def identity_from_claims(claims: dict[str, Any]) -> Identity:
    """Map verified claims to an Identity; odd claim types are refused, not coerced."""
    sub = claims.get("sub")
    groups = claims.get("groups", [])
    email = claims.get("email")
    if not isinstance(sub, str) or not sub:
        raise Unauthenticated("invalid_token", "the token's sub claim must be a string")
    if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
        raise Unauthenticated("invalid_token", "the token's groups claim must be a string list")
    if email is not None and not isinstance(email, str):
        raise Unauthenticated("invalid_token", "the token's email claim must be a string")
    return Identity(sub=sub, groups=tuple(groups), issuer=str(claims["iss"]), email=email)


# --- dev tokens --------------------------------------------------------------------------


def load_or_create_dev_key(path: Path) -> Ed25519PrivateKey:
    """The dev signing key, created (0600) on first use."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"QUERYGATE_DEV_SIGNING_KEY_FILE: {path} is not an Ed25519 key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path.touch(mode=0o600)
    path.write_bytes(pem)
    return key


def public_pem(key: Ed25519PrivateKey) -> bytes:
    """The PEM public half of a dev key."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def mint_dev_token(
    settings: Settings,
    sub: str,
    groups: list[str],
    ttl_s: int = 8 * 3600,
    email: str | None = None,
) -> str:
    """Sign a token with the dev key; refused outside dev mode (and so never in prod)."""
    if not settings.dev_mode:
        raise ConfigError("dev tokens need QUERYGATE_DEV_MODE=true (never in prod)")
    if settings.environment == "prod":  # unreachable through Settings; kept as a backstop
        raise ConfigError("dev tokens are never minted for QUERYGATE_ENVIRONMENT=prod")
    key = load_or_create_dev_key(settings.dev_signing_key_file)
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": sub,
        "groups": groups,
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
    }
    if email:
        claims["email"] = email
    return jwt.encode(claims, key, algorithm="EdDSA")
