"""Sign-in for the console: sessions, CSRF, the dev sign-in and OIDC (code + PKCE).

- **Sessions** live in this process's memory (one console per cluster, one replica): the
  browser holds only an opaque random id in an HttpOnly, SameSite=Lax cookie (Secure, and
  ``__Host-`` prefixed, unless the console is served over http on loopback in dev mode).
  The session keeps the user's token for the gateway's API; it is never written anywhere.
  Signing in replaces the session id (no fixation); signing out forgets it.
- **CSRF**: every session has a random token; every POST must carry it in the form field
  ``csrf`` (compared in constant time) and, when the browser sends one, an ``Origin`` equal
  to the console's own. A forged post is refused with 403 ``csrf_failed``.
- **Dev sign-in** (``make run`` only): the demo identities, each signed in with a dev token
  from app/identity.py's dev issuer. Refused (404 ``dev_signin_disabled``) outside dev mode.
- **OIDC**: the authorization code flow with PKCE (S256), state and nonce, through authlib's
  OAuth 2 helpers (the authorization URL, PKCE challenge, random values); the code is
  exchanged with httpx, and the ID token verified with joserfc (authlib's JOSE successor)
  against the issuer's JWKS: signature, ``iss``, ``aud``, ``exp``, ``nonce``. Groups come
  from the ID token's claims (QUERYGATE_JWT_GROUPS_CLAIMS), else from userinfo. The access
  token is what the console sends to the gateway on the user's behalf.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.parameters import prepare_grant_uri
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from app.config import Settings
from app.errors import BadRequest, Forbidden, NotFound, Unauthenticated, Unavailable
from app.identity import claim

MAX_SESSIONS = 10_000
# Asymmetric only (no HS*: a shared secret would let the console mint what it verifies).
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384"]
LOGIN_TTL_S = 600


@dataclass
class User:
    """Who is signed in: the identity the pages are scoped to and the token for the API."""

    sub: str
    groups: tuple[str, ...]
    issuer: str
    token: str
    via: str  # "dev" or "oidc"


@dataclass
class Session:
    id: str
    csrf: str
    expires: float
    user: User | None = None
    login: dict[str, str] = field(default_factory=dict)  # OIDC state, nonce, verifier


class Sessions:
    """Sessions in memory, bounded in number and lifetime."""

    def __init__(self, ttl_s: int) -> None:
        self.ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}

    def get(self, session_id: str | None) -> Session | None:
        if not session_id or len(session_id) > 100:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if session.expires < time.time():
            self._sessions.pop(session_id, None)
            return None
        return session

    def new(self, user: User | None = None, ttl_s: int | None = None) -> Session:
        if len(self._sessions) >= MAX_SESSIONS:
            self._expire()
        if len(self._sessions) >= MAX_SESSIONS:
            # Never an unbounded store: sign-ins not yet finished go first (anyone can start
            # one), the oldest first; a signed-in user only when nothing else is left.
            by_age = sorted(self._sessions, key=lambda k: self._sessions[k].expires)
            unfinished = [k for k in by_age if self._sessions[k].user is None]
            for key in (unfinished or by_age)[:100]:
                del self._sessions[key]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32),
                          time.time() + (ttl_s or self.ttl_s), user)
        self._sessions[session.id] = session
        return session

    def drop(self, session: Session) -> None:
        self._sessions.pop(session.id, None)

    def _expire(self) -> None:
        now = time.time()
        for key in [k for k, s in self._sessions.items() if s.expires < now]:
            del self._sessions[key]


def cookie_policy(settings: Settings, public_url: str) -> tuple[str, bool]:
    """The session cookie's name and whether it is Secure."""
    parts = urlsplit(public_url)
    loopback_dev = (settings.dev_mode and parts.scheme == "http"
                    and parts.hostname in ("127.0.0.1", "localhost", "::1"))
    if not loopback_dev and parts.scheme != "https":
        raise_config(f"QUERYGATE_CONSOLE_PUBLIC_URL must be https (it is {public_url}); only dev "
                     "mode on loopback may use http")
    return ("qg_console" if loopback_dev else "__Host-qg_console"), not loopback_dev


def raise_config(message: str) -> None:
    from app.config import ConfigError

    raise ConfigError(message)


def check_csrf(session: Session | None, form_token: str | None, origin: str | None,
               own_origin: str) -> None:
    """Refuse a POST without this session's CSRF token, or from another origin."""
    if origin is not None and origin != own_origin:
        raise Forbidden("csrf_failed", "the form was not sent from this console")
    if session is None or not form_token or not secrets.compare_digest(
        form_token.encode(), session.csrf.encode()
    ):
        raise Forbidden("csrf_failed", "the form's CSRF token is missing or wrong; reload the page")


def dev_user(settings: Settings, sub: str, identities: dict[str, list[str]]) -> User:
    """A demo identity with a dev token; only in dev mode."""
    from app.identity import mint_dev_token

    if not settings.dev_mode:
        raise NotFound("dev_signin_disabled", "dev sign-in exists only in dev mode")
    if sub not in identities:
        raise BadRequest("invalid_request", "not a demo identity")
    token = mint_dev_token(settings, sub, identities[sub], ttl_s=settings.console_session_ttl_s)
    return User(sub, tuple(identities[sub]), audit_issuer(settings), token, "dev")


def audit_issuer(settings: Settings) -> str:
    """The issuer of the console's users' identities in audit events."""
    return settings.console_audit_issuer or settings.jwt_issuer


class OidcClient:
    """The relying party of the authorization code flow with PKCE."""

    def __init__(self, settings: Settings, redirect_uri: str, http: httpx.AsyncClient) -> None:
        assert settings.console_oidc_issuer is not None
        assert settings.console_oidc_client_id is not None
        self.settings = settings
        self.issuer = settings.console_oidc_issuer.rstrip("/")
        self.client_id = settings.console_oidc_client_id
        secret = settings.console_oidc_client_secret
        self.client_secret = secret.get_secret_value() if secret is not None else None
        self.redirect_uri = redirect_uri
        self.http = http
        self._metadata: dict[str, Any] | None = None

    async def _get(self, url: str, **kwargs: Any) -> Any:
        try:
            response = await self.http.get(url, **kwargs)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise Unavailable("idp_unavailable", "the identity provider cannot be reached") from exc

    async def metadata(self) -> dict[str, Any]:
        if self._metadata is None:
            found = await self._get(f"{self.issuer}/.well-known/openid-configuration")
            if not isinstance(found, dict) or found.get("issuer", "").rstrip("/") != self.issuer:
                raise Unavailable("idp_unavailable", "the issuer's discovery document is wrong")
            self._metadata = found
        return self._metadata

    async def authorization_url(self, session: Session) -> str:
        """Where the browser goes to sign in; state, nonce and verifier stay in the session."""
        metadata = await self.metadata()
        verifier = generate_token(64)
        session.login = {"state": generate_token(32), "nonce": generate_token(32),
                         "verifier": verifier, "started": str(time.time())}
        uri: str = prepare_grant_uri(
            metadata["authorization_endpoint"], self.client_id, "code",
            redirect_uri=self.redirect_uri, scope=self.settings.console_oidc_scopes,
            state=session.login["state"], nonce=session.login["nonce"],
            code_challenge=create_s256_code_challenge(verifier), code_challenge_method="S256",
        )
        return uri

    async def finish(self, session: Session, params: dict[str, str]) -> User:
        """Check the callback, exchange the code, verify the ID token: the signed-in user."""
        login, session.login = session.login, {}
        if "error" in params:
            raise Unauthenticated("signin_refused", "the identity provider refused the sign-in")
        state, code = params.get("state") or "", params.get("code") or ""
        if (not login or not state or not code
                or not secrets.compare_digest(state.encode(), login["state"].encode())
                or time.time() - float(login["started"]) > LOGIN_TTL_S):
            raise Unauthenticated("signin_failed", "the sign-in is not the one this browser began")
        metadata = await self.metadata()
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": self.redirect_uri, "client_id": self.client_id,
                "code_verifier": login["verifier"]}
        if self.client_secret is not None:
            form["client_secret"] = self.client_secret
        try:
            response = await self.http.post(metadata["token_endpoint"], data=form)
            tokens = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise Unavailable("idp_unavailable", "the identity provider cannot be reached") from exc
        if response.status_code != 200 or not isinstance(tokens, dict):
            raise Unauthenticated("signin_failed", "the identity provider refused the code")
        id_token, access_token = tokens.get("id_token"), tokens.get("access_token")
        if not isinstance(id_token, str) or not isinstance(access_token, str):
            raise Unauthenticated("signin_failed", "the identity provider sent no ID token")
        claims = await self._verify(id_token, login["nonce"])
        groups = self._groups(claims)
        if groups is None and metadata.get("userinfo_endpoint"):
            info = await self._get(metadata["userinfo_endpoint"],
                                   headers={"authorization": f"Bearer {access_token}"})
            if isinstance(info, dict) and info.get("sub") == claims["sub"]:
                groups = self._groups(info)
        return User(claims["sub"], tuple(groups or ()), audit_issuer(self.settings),
                    access_token, "oidc")

    async def _verify(self, id_token: str, nonce: str) -> dict[str, Any]:
        metadata = await self.metadata()
        try:
            # Read at every sign-in (they are rare): a rotated key is simply the one in use.
            keys = KeySet.import_key_set(await self._get(metadata["jwks_uri"]))
            token = jwt.decode(id_token, keys, algorithms=ID_TOKEN_ALGORITHMS)
            jwt.JWTClaimsRegistry(
                iss={"essential": True, "value": metadata["issuer"]},
                aud={"essential": True, "value": self.client_id},
                sub={"essential": True},
                exp={"essential": True},
                nonce={"essential": True, "value": nonce},
                leeway=self.settings.jwt_leeway_s,
            ).validate(token.claims)
        except (JoseError, ValueError) as exc:
            raise Unauthenticated("signin_failed", "the ID token does not verify") from exc
        claims = dict(token.claims)
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise Unauthenticated("signin_failed", "the ID token names no subject")
        return claims

    def _groups(self, claims: dict[str, Any]) -> list[str] | None:
        for path in self.settings.jwt_groups_claims:
            value = claim(claims, path)
            if isinstance(value, list):
                return [g for g in value if isinstance(g, str)]
        return None
