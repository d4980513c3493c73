"""A development OpenID provider for ``make run`` and the tests: dev mode only.

It grows the dev issuer (app/identity.py) the endpoints of the authorization code flow, so
the console's OIDC sign-in runs for real, on loopback, against something the stack starts:

- ``/.well-known/openid-configuration``, ``/jwks.json`` (this process's ID-token key, a
  P-256 key drawn at start: ES256, as RFC 9864 retires the generic EdDSA identifier)
- ``/authorize``: a public client must send PKCE (S256), a state and a nonce, and the one
  registered redirect URI; the page lists the demo identities to sign in as
- ``/token``: the code once, within 60 s, for the client and redirect URI it was issued to,
  and only with the verifier whose S256 is the challenge; answers an ID token (audience: the
  console's client id, with the nonce and the groups) and an access token for the gateway
  (the dev issuer's token, as ``querygate token`` mints)
- ``/userinfo``: sub and groups for that access token

Refused outside dev mode (``create_dev_idp`` raises ConfigError), as dev tokens are.
"""

from __future__ import annotations

import base64
import hashlib
import html
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from joserfc.jwk import ECKey

from app.config import ConfigError, Settings
from app.demo import DEMO_IDENTITIES
from app.identity import mint_dev_token

CODE_TTL_S = 60
ID_TOKEN_TTL_S = 600


@dataclass
class _Grant:
    sub: str
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str
    expires: float


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


def create_dev_idp(settings: Settings) -> FastAPI:
    """The provider at QUERYGATE_CONSOLE_OIDC_ISSUER, for the console's client only."""
    if not settings.dev_mode or settings.environment == "prod":
        raise ConfigError("the dev OIDC provider needs QUERYGATE_DEV_MODE=true (never in prod)")
    if settings.console_oidc_issuer is None or settings.console_oidc_client_id is None:
        raise ConfigError("the dev OIDC provider needs QUERYGATE_CONSOLE_OIDC_ISSUER and _CLIENT_ID")
    issuer = settings.console_oidc_issuer.rstrip("/")
    client_id = settings.console_oidc_client_id
    secret = settings.console_oidc_client_secret
    client_secret = secret.get_secret_value() if secret is not None else None
    public_url = (settings.console_public_url
                  or f"http://{settings.console_host}:{settings.console_port}").rstrip("/")
    redirect_uri = f"{public_url}/auth/callback"
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk = ECKey.import_key(pem).as_dict()
    kid = hashlib.sha256(pem).hexdigest()[:16]
    jwk.update({"kid": kid, "alg": "ES256", "use": "sig"})
    grants: dict[str, _Grant] = {}
    access: dict[str, str] = {}  # access token -> sub (for userinfo)

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers["content-security-policy"] = (
            f"default-src 'none'; style-src 'self'; form-action 'self' {public_url}; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["cache-control"] = "no-store"
        return response

    @app.get("/.well-known/openid-configuration")
    async def discovery() -> Response:
        return JSONResponse({
            "issuer": issuer,
            "authorization_endpoint": f"{issuer}/authorize",
            "token_endpoint": f"{issuer}/token",
            "userinfo_endpoint": f"{issuer}/userinfo",
            "jwks_uri": f"{issuer}/jwks.json",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_post", "none"],
            "scopes_supported": ["openid", "profile", "groups"],
            "claims_supported": ["sub", "groups", "nonce"],
        })

    @app.get("/jwks.json")
    async def jwks() -> Response:
        return JSONResponse({"keys": [jwk]})

    def _check(params: dict[str, str]) -> str | None:
        if params.get("client_id") != client_id:
            return "unknown client"
        if params.get("redirect_uri") != redirect_uri:
            return "redirect_uri is not the registered one"
        if params.get("response_type") != "code":
            return "only response_type=code"
        if "openid" not in (params.get("scope") or "").split():
            return "scope must include openid"
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            return "PKCE with S256 is required"
        if not params.get("state") or not params.get("nonce"):
            return "state and nonce are required"
        return None

    @app.get("/authorize")
    async def authorize(request: Request) -> Response:
        params = dict(request.query_params)
        problem = _check(params)
        if problem is not None:
            return HTMLResponse(f"<h1>invalid_request</h1><p>{html.escape(problem)}</p>", 400)
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in params.items()
            if k in ("client_id", "redirect_uri", "response_type", "scope", "state", "nonce",
                     "code_challenge", "code_challenge_method")
        )
        buttons = "".join(
            f'<button type="submit" name="sub" value="{html.escape(sub)}" id="idp-{html.escape(sub)}">'
            f'{html.escape(sub)} ({html.escape(", ".join(groups))})</button><br>'
            for sub, groups in DEMO_IDENTITIES.items()
        )
        return HTMLResponse(
            "<!doctype html><html lang=en><head><meta charset=utf-8><title>querygate dev IdP"
            "</title></head><body><h1>querygate dev identity provider</h1>"
            "<p>Sign in to the console as a demo identity (dev mode only).</p>"
            f'<form method="post" action="/authorize">{hidden}{buttons}</form></body></html>'
        )

    @app.post("/authorize")
    async def authorize_post(request: Request) -> Response:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        problem = _check(form)
        sub = form.get("sub", "")
        if problem is not None or sub not in DEMO_IDENTITIES:
            return HTMLResponse("<h1>invalid_request</h1>", 400)
        code = secrets.token_urlsafe(32)
        grants[code] = _Grant(sub, client_id, redirect_uri, form["code_challenge"],
                              form["nonce"], time.time() + CODE_TTL_S)
        query = urlencode({"code": code, "state": form["state"]})
        return RedirectResponse(f"{redirect_uri}?{query}", status_code=303)

    @app.post("/token")
    async def token(request: Request) -> Response:
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        if form.get("grant_type") != "authorization_code":
            return _error(400, "unsupported_grant_type", "only authorization_code")
        if form.get("client_id") != client_id or (
            client_secret is not None
            and not secrets.compare_digest((form.get("client_secret") or "").encode(),
                                           client_secret.encode())
        ):
            return _error(401, "invalid_client", "unknown client or wrong secret")
        grant = grants.pop(form.get("code") or "", None)  # a code works once
        if grant is None or grant.expires < time.time():
            return _error(400, "invalid_grant", "unknown, used or expired code")
        if form.get("redirect_uri") != grant.redirect_uri:
            return _error(400, "invalid_grant", "redirect_uri differs")
        verifier = form.get("code_verifier") or ""
        if not 43 <= len(verifier) <= 128 or not secrets.compare_digest(
            _s256(verifier), grant.challenge
        ):
            return _error(400, "invalid_grant", "the PKCE verifier does not match")
        groups = DEMO_IDENTITIES[grant.sub]
        now = int(time.time())
        id_token = jwt.encode(
            {"iss": issuer, "aud": client_id, "sub": grant.sub, "groups": groups,
             "nonce": grant.nonce, "iat": now, "exp": now + ID_TOKEN_TTL_S},
            key, algorithm="ES256", headers={"kid": kid},
        )
        access_token = mint_dev_token(settings, grant.sub, groups,
                                      ttl_s=settings.console_session_ttl_s)
        access[access_token] = grant.sub
        return JSONResponse({"token_type": "Bearer", "access_token": access_token,
                             "id_token": id_token, "expires_in": settings.console_session_ttl_s})

    @app.get("/userinfo")
    async def userinfo(request: Request) -> Response:
        auth = request.headers.get("authorization", "")
        sub = access.get(auth.removeprefix("Bearer ").strip())
        if sub is None:
            return _error(401, "invalid_token", "unknown access token")
        return JSONResponse({"sub": sub, "groups": DEMO_IDENTITIES[sub]})

    return app
