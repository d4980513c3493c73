"""Who is asking: verify the caller and turn what was verified into an Identity.

Every source ends in the same frozen ``Identity`` (the ``identity`` object of the OPA input,
docs/identity.md):

- **Bearer JWTs** from trusted issuers. Each issuer has exactly one key source: the static
  PEM key (``QUERYGATE_JWT_PUBLIC_KEY[_FILE]``), the dev key (dev mode only, never prod), or
  a JWKS per entry of ``QUERYGATE_JWT_ISSUERS`` — fetched from ``jwks_url`` or found by OIDC
  discovery. Kubernetes projected service-account tokens are JWTs from the cluster's issuer
  (``kind: k8s_sa``) and become ``system:serviceaccount:<ns>:<name>``.
- **Mesh mTLS**: the SPIFFE ID in the proxy's client-certificate header, believed only when
  the TCP peer is a trusted proxy.
- **On behalf of**: a second bearer token, in ``X-Querygate-On-Behalf-Of``, naming the person
  a service acts for.

Failures::

    Unauthenticated (401, app/errors.py)   the only error raised to callers
     ├── missing_token                       no service identity at all
     ├── invalid_token                       anything wrong with a token
     ├── token_expired                       exp in the past beyond the leeway
     ├── token_wrong_environment             the token names another environment
     └── invalid_client_certificate          a trusted proxy forwarded an unusable certificate
    _FetchError (internal)                   a JWKS/discovery fetch failed; logged, never raised

The hot path does no I/O when the token's ``kid`` is cached. Keys are fetched at start,
every ``QUERYGATE_JWKS_REFRESH_S``, and on an unknown ``kid`` at most once per
``QUERYGATE_JWKS_MIN_REFRESH_S``; no fetch is awaited longer than ``QUERYGATE_JWKS_TIMEOUT_MS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from app.config import ConfigError, Settings
from app.errors import Unauthenticated

log = logging.getLogger("querygate.identity")

AuthKind = Literal["jwt", "k8s_sa", "mtls"]
IssuerKind = Literal["jwt", "k8s_sa"]
PublicKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey
_PUBLIC_KEY_TYPES = (RSAPublicKey, EllipticCurvePublicKey, Ed25519PublicKey, Ed448PublicKey)

ON_BEHALF_OF_HEADER = "x-querygate-on-behalf-of"
# Bounds on attacker-controlled input, checked before anything is parsed.
MAX_KID_CHARS = 256
MAX_CLIENT_CERT_HEADER_BYTES = 16_384
# A key set larger than this is not a key set; stop reading instead of buffering it.
MAX_JWKS_BYTES = 1_048_576
# Elliptic curves by the algorithm that must use them (RFC 7518 §3.4).
_EC_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}
_SPIFFE_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


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
    roles: tuple[str, ...] = ()

    def to_input(self) -> dict[str, Any]:
        """The ``identity`` object of the OPA input."""
        return {
            "sub": self.sub,
            "groups": list(self.groups),
            "roles": list(self.roles),
            "issuer": self.issuer,
            "auth": self.auth,
            "email": self.email,
            "on_behalf_of": self.on_behalf_of.to_input() if self.on_behalf_of else None,
            "attributes": dict(self.attributes),
        }


class HeaderSource(Protocol):
    """The request headers (Starlette's ``Headers`` fits); repeated headers stay visible."""

    def getlist(self, key: str) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key that may verify tokens; ``alg`` is the JWK's own, when it names one."""

    key: PublicKey
    kid: str | None = None
    alg: str | None = None

    def fits(self, alg: str) -> bool:
        """Whether a token claiming ``alg`` may be verified with this key at all."""
        if self.alg is not None and self.alg != alg:
            return False
        if isinstance(self.key, RSAPublicKey):
            return alg[:2] in ("RS", "PS")
        if isinstance(self.key, EllipticCurvePublicKey):
            return _EC_CURVES.get(alg) == self.key.curve.name
        return alg == "EdDSA"


@dataclass(frozen=True, slots=True)
class ClaimsMapping:
    """Where an issuer puts groups, roles and email: dotted claim paths."""

    groups: tuple[str, ...]
    roles: tuple[str, ...]
    email: str


class KeySource(Protocol):
    """Finds the key for a token's ``kid``, or raises Unauthenticated."""

    async def get(self, kid: str | None) -> VerificationKey: ...


@dataclass(frozen=True, slots=True)
class TrustedIssuer:
    """One issuer whose tokens are accepted: its audience, algorithms, keys and claim paths."""

    name: str
    audience: str
    kind: IssuerKind
    algorithms: frozenset[str]
    claims: ClaimsMapping
    keys: KeySource


class StaticKey:
    """One configured key (PEM or dev); the token's ``kid`` does not matter."""

    def __init__(self, key: VerificationKey) -> None:
        self._key = key

    async def get(self, kid: str | None) -> VerificationKey:
        return self._key


class _FetchError(Exception):
    """A JWKS or discovery fetch failed; the message names why, never a key."""


class JwksKeys:
    """The keys of one issuer's JWKS, cached by ``kid``.

    A refresh replaces the whole set, so a key that left the JWKS stops verifying at the
    next refresh. A failed refresh keeps the keys we have: tokens signed with them still
    verify while the endpoint is down, and unknown keys are refused.
    """

    def __init__(
        self,
        issuer: str,
        jwks_url: str | None,
        settings: Settings,
        algorithms: frozenset[str],
        client: Callable[[], httpx.AsyncClient],
    ) -> None:
        self._issuer = issuer
        self._discovery = jwks_url is None
        self._jwks_url = jwks_url
        self._settings = settings
        self._algorithms = algorithms
        self._client = client
        self._timeout_s = settings.jwks_timeout_ms / 1000
        self._min_interval_s = settings.jwks_min_refresh_s
        self._keys: dict[str, VerificationKey] = {}
        self._last_attempt = -math.inf
        self._inflight: asyncio.Task[None] | None = None

    @property
    def kids(self) -> frozenset[str]:
        """The key ids currently cached."""
        return frozenset(self._keys)

    async def get(self, kid: str | None) -> VerificationKey:
        if kid is None:
            # With several keys in play a token must say which one signed it; guessing by
            # trying each key would make every bad token cost one verification per key.
            raise Unauthenticated("invalid_token", "the token has no kid header")
        key = self._keys.get(kid)
        if key is None:
            await self._refresh_for_unknown_kid()
            key = self._keys.get(kid)
        if key is None:
            raise Unauthenticated("invalid_token", "the token's signing key (kid) is not known")
        return key

    async def refresh(self) -> None:
        """Fetch the key set now, or join the fetch already under way; never raises."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.create_task(self._fetch())
        # Shielded: a caller that goes away must not cancel the fetch others are waiting on.
        await asyncio.shield(self._inflight)

    async def _refresh_for_unknown_kid(self) -> None:
        fetching = self._inflight is not None and not self._inflight.done()
        if not fetching and time.monotonic() - self._last_attempt < self._min_interval_s:
            # A stream of made-up kids must not turn the gateway into a load generator
            # against the IdP, nor make each bad request wait for a fetch.
            return
        await self.refresh()

    async def _fetch(self) -> None:
        # Counted at the start, so a failing endpoint is retried no faster than a working one.
        self._last_attempt = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout_s):
                if self._jwks_url is None:
                    self._jwks_url = await self._discover()
                keys = _parse_jwks(await self._get_json(self._jwks_url), self._algorithms)
        except Exception as exc:
            # Broad on purpose: whatever went wrong, the answer is the same — keep the keys we
            # have and refuse unknown ones — and the request path must never see a fetch error.
            if isinstance(exc, _FetchError):
                reason = str(exc)
            elif isinstance(exc, TimeoutError):
                reason = f"no answer within {self._settings.jwks_timeout_ms} ms"
            elif isinstance(exc, httpx.HTTPError):
                reason = type(exc).__name__
            else:
                log.exception("JWKS fetch for issuer %s failed unexpectedly", self._issuer)
                reason = type(exc).__name__
            log.warning(
                "JWKS fetch for issuer %s failed: %s; keeping %d cached keys",
                self._issuer, reason, len(self._keys),
                extra={"issuer": self._issuer, "reason": reason},
            )
            if self._discovery:
                # The document may have moved with the failure; ask discovery again next time.
                self._jwks_url = None
            return
        if set(keys) != set(self._keys):
            log.info(
                "JWKS for issuer %s: %d keys (kids %s)", self._issuer, len(keys), sorted(keys),
                extra={"issuer": self._issuer},
            )
        self._keys = keys

    async def _discover(self) -> str:
        url = self._issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await self._get_json(url)
        if not isinstance(document, dict):
            raise _FetchError("the discovery document is not a JSON object")
        # OIDC Discovery §4.3: the document must name the issuer it was fetched for, or an
        # attacker who controls one issuer's document could point at another's keys.
        if document.get("issuer") != self._issuer:
            raise _FetchError("the discovery document names another issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise _FetchError("the discovery document has no jwks_uri")
        problem = self._settings.fetch_url_problem(jwks_uri)
        if problem:
            raise _FetchError(f"the discovered jwks_uri is refused: {problem}")
        return jwks_uri

    async def _get_json(self, url: str) -> Any:
        body = bytearray()
        async with self._client().stream(
            "GET", url, headers={"accept": "application/json"}
        ) as response:
            if response.status_code != 200:
                raise _FetchError(f"{url} answered HTTP {response.status_code}")
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise _FetchError(f"{url} sent more than {MAX_JWKS_BYTES} bytes")
        try:
            return json.loads(body)
        except ValueError as exc:
            raise _FetchError(f"{url} did not send JSON") from exc


def _parse_jwks(document: Any, algorithms: frozenset[str]) -> dict[str, VerificationKey]:
    """Usable signature keys by kid; keys we may not use are skipped, never guessed at."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _FetchError("the JWKS is not a JSON object with a keys list")
    keys: dict[str, VerificationKey] = {}
    ambiguous: set[str] = set()
    for jwk in document["keys"]:
        if not isinstance(jwk, dict):
            continue
        kid, alg = jwk.get("kid"), jwk.get("alg")
        if not isinstance(kid, str) or not kid or len(kid) > MAX_KID_CHARS:
            continue
        # Never a symmetric (oct) key: with it, anyone holding the JWKS could sign tokens.
        if jwk.get("kty") not in ("RSA", "EC", "OKP") or jwk.get("use", "sig") != "sig":
            continue
        if alg is not None and alg not in algorithms:
            continue
        try:
            key = jwt.PyJWK(jwk).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        if not isinstance(key, _PUBLIC_KEY_TYPES):
            continue  # a private key published by mistake is not ours to use
        if kid in keys:
            ambiguous.add(kid)
        keys[kid] = VerificationKey(key, kid, alg if isinstance(alg, str) else None)
    # Two keys under one kid: which one signed is unknowable, so neither is trusted.
    for kid in ambiguous:
        del keys[kid]
    return keys


# --- claims -> Identity --------------------------------------------------------------------


def claim(claims: dict[str, Any], path: str) -> Any:
    """The value at a dotted path (``realm_access.roles``); a literal key wins over a path."""
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _strings(claims: dict[str, Any], paths: Sequence[str], what: str) -> tuple[str, ...]:
    found: dict[str, None] = {}  # ordered set: the token's order, duplicates merged
    for path in paths:
        value = claim(claims, path)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise Unauthenticated("invalid_token", f"the token's {what} claim must be a string list")
        found.update(dict.fromkeys(value))
    return tuple(found)


def identity_from_claims(
    claims: dict[str, Any],
    issuer_kind: IssuerKind = "jwt",
    mapping: ClaimsMapping | None = None,
) -> Identity:
    """Map verified claims to an Identity; odd claim types are refused, not coerced."""
    mapping = mapping or ClaimsMapping(groups=("groups",), roles=(), email="email")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise Unauthenticated("invalid_token", "the token's sub claim must be a string")
    issuer = str(claims["iss"])
    if issuer_kind == "k8s_sa":
        return _service_account(claims, sub, issuer)
    email = claim(claims, mapping.email)
    if email is not None and not isinstance(email, str):
        raise Unauthenticated("invalid_token", "the token's email claim must be a string")
    identity = Identity(
        sub=sub,
        groups=_strings(claims, mapping.groups, "groups"),
        roles=_strings(claims, mapping.roles, "roles"),
        issuer=issuer,
        auth="jwt",
        email=email,
        attributes=_client(claims),
    )
    act = claims.get("act")
    if act is None:
        return identity
    # Token exchange (RFC 8693 §4.1): the token is the person's (sub, groups), issued to an
    # actor that acts for them (act.sub; the outermost act is the current actor). The caller
    # is the actor, the person is on_behalf_of: as with X-Querygate-On-Behalf-Of.
    actor = act.get("sub") if isinstance(act, dict) else None
    if not isinstance(actor, str) or not actor or len(actor) > 256:
        raise Unauthenticated("invalid_token", "the token's act claim must name its actor (sub)")
    return Identity(
        sub=actor, groups=(), issuer=issuer, auth="jwt",
        attributes={**identity.attributes, "delegation": "token_exchange"},
        on_behalf_of=replace(identity, attributes={}),
    )


def _client(claims: dict[str, Any]) -> dict[str, str]:
    """The OAuth client the token was issued to (RFC 9068 ``client_id``, else OIDC ``azp``):
    an agent's name in the decision input (``request.agent``, docs/agents.md)."""
    for name in ("client_id", "azp"):
        value = claims.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or not value or len(value) > 256:
            raise Unauthenticated("invalid_token", f"the token's {name} claim must be a short string")
        return {"client_id": value}
    return {}


def _service_account(claims: dict[str, Any], sub: str, issuer: str) -> Identity:
    """A Kubernetes projected service-account token: the sub and the kubernetes.io claim agree."""
    k8s = claims.get("kubernetes.io")
    if not isinstance(k8s, dict):
        k8s = {}
    sa, pod, node = (k8s.get(part) for part in ("serviceaccount", "pod", "node"))
    namespace = k8s.get("namespace")
    name = sa.get("name") if isinstance(sa, dict) else None
    if not isinstance(namespace, str) or not isinstance(name, str) or not namespace or not name:
        raise Unauthenticated(
            "invalid_token", "a service-account token needs kubernetes.io namespace and serviceaccount"
        )
    # Both are signed, but a token whose two names disagree was not minted by a kubelet.
    if sub != f"system:serviceaccount:{namespace}:{name}":
        raise Unauthenticated("invalid_token", "the service-account token's sub and claims disagree")
    attributes = {"namespace": namespace, "service_account": name}
    for key, source, part in (
        ("service_account_uid", sa, "uid"),
        ("pod", pod, "name"),
        ("pod_uid", pod, "uid"),
        ("node", node, "name"),
    ):
        value = source.get(part) if isinstance(source, dict) else None
        if isinstance(value, str) and value:
            attributes[key] = value
    return Identity(
        sub=sub,
        # The groups Kubernetes itself gives every service account, so policy can grant on a
        # namespace the way RBAC does.
        groups=("system:serviceaccounts", f"system:serviceaccounts:{namespace}"),
        issuer=issuer,
        auth="k8s_sa",
        attributes=attributes,
    )


# --- mesh mTLS -----------------------------------------------------------------------------


def parse_client_cert_header(value: str) -> list[dict[str, list[str]]]:
    """Envoy's ``x-forwarded-client-cert``: elements split by ``,``, pairs by ``;``.

    Values may be double-quoted (with ``\\"`` escapes) to carry ``,;=``. Keys are lower-cased;
    a key may repeat (several ``URI`` SANs), so each maps to a list. Raises ValueError.
    """
    elements: list[dict[str, list[str]]] = []
    pairs: dict[str, list[str]] = {}
    key: list[str] = []
    val: list[str] = []
    in_key, quoted, i = True, False, 0

    def end_pair() -> None:
        name = "".join(key).strip().lower()
        if in_key:
            if name:
                raise ValueError("a field without '='")
        elif not name:
            raise ValueError("a value without a key")
        else:
            pairs.setdefault(name, []).append("".join(val))
        key.clear()
        val.clear()

    while i < len(value):
        char = value[i]
        if quoted:
            if char == "\\" and i + 1 < len(value):
                val.append(value[i + 1])
                i += 1
            elif char == '"':
                quoted = False
            else:
                val.append(char)
        elif char == '"' and not in_key:
            quoted = True
        elif char == "=" and in_key:
            in_key = False
        elif char in ";,":
            end_pair()
            in_key = True
            if char == ",":
                elements.append(pairs)
                pairs = {}
        else:
            (key if in_key else val).append(char)
        i += 1
    if quoted:
        raise ValueError("an unterminated quoted value")
    end_pair()
    elements.append(pairs)
    return [element for element in elements if element]


def spiffe_identity(uri: str, trust_domains: frozenset[str]) -> Identity:
    """The mTLS Identity for a SPIFFE ID (spiffe://<trust domain>/<path>)."""
    scheme, sep, rest = uri.partition("://")
    domain, _, path = rest.partition("/")
    segments = path.split("/")
    if (
        scheme != "spiffe"
        or not sep
        or domain not in trust_domains
        or not path
        or any(not s or s in (".", "..") or not set(s) <= _SPIFFE_PATH_CHARS for s in segments)
    ):
        raise Unauthenticated(
            "invalid_client_certificate",
            "the client certificate's SPIFFE ID is malformed or from an untrusted trust domain",
        )
    attributes = {"spiffe_id": uri, "trust_domain": domain}
    # Istio/SPIRE convention for Kubernetes workloads: /ns/<namespace>/sa/<service account>.
    if len(segments) == 4 and segments[0] == "ns" and segments[2] == "sa":
        attributes |= {"namespace": segments[1], "service_account": segments[3]}
    return Identity(
        sub=uri, groups=(), issuer=f"spiffe://{domain}", auth="mtls", attributes=attributes
    )


# --- the authenticator -----------------------------------------------------------------------


def _load_public_key(settings: Settings) -> bytes | None:
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
    return None


def _static_key(pem: bytes) -> VerificationKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise ConfigError("QUERYGATE_JWT_PUBLIC_KEY(_FILE): not a PEM public key") from exc
    if not isinstance(key, _PUBLIC_KEY_TYPES):
        raise ConfigError("QUERYGATE_JWT_PUBLIC_KEY(_FILE): not an RSA, EC or EdDSA public key")
    return VerificationKey(key)


@dataclass(slots=True)
class _Verified:
    """A token that passed every check, and what must still hold for it to pass again."""

    identity: Identity
    issuer: TrustedIssuer
    kid: str | None
    key: VerificationKey
    exp: float
    until: float


class _VerifiedTokens:
    """A bounded LRU of verified tokens, keyed by the token's exact text.

    Only successes are kept, and only until the earlier of their exp and ``ttl_s`` from
    now; nbf is not re-checked because a token is cached only after it passed nbf. Signature,
    issuer, audience, algorithm and environment checks depend on nothing but the text and
    the configuration, which is fixed for the process; the key is re-checked on every hit.
    """

    def __init__(self, size: int, ttl_s: int) -> None:
        self._size = size if ttl_s > 0 else 0
        self._ttl = float(ttl_s)
        self._entries: OrderedDict[str, _Verified] = OrderedDict()

    def get(self, token: str) -> _Verified | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        if time.time() >= entry.until:
            del self._entries[token]
            return None
        self._entries.move_to_end(token)
        return entry

    def put(self, token: str, entry: _Verified) -> None:
        if not self._size:
            return
        entry.until = min(entry.exp, time.time() + self._ttl)
        self._entries[token] = entry
        self._entries.move_to_end(token)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class Authenticator:
    """Verifies callers: bearer tokens, on-behalf-of tokens and mesh client certificates."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._leeway = settings.jwt_leeway_s
        self._max_bytes = settings.max_token_bytes
        self._environment = settings.environment
        self._environment_claim = settings.jwt_environment_claim
        self._require_environment = settings.jwt_require_environment
        self._refresh_s = settings.jwks_refresh_s
        self._proxies = tuple(ipaddress.ip_network(p) for p in settings.mtls_trusted_proxies)
        self._trust_domains = frozenset(settings.mtls_trust_domains)
        self._client_cert_header = settings.mtls_header.lower()
        self._http: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._cache = _VerifiedTokens(settings.auth_cache_size, settings.auth_cache_ttl_s)
        default_claims = ClaimsMapping(
            groups=tuple(settings.jwt_groups_claims),
            roles=tuple(settings.jwt_roles_claims),
            email=settings.jwt_email_claim,
        )
        self._issuers: dict[str, TrustedIssuer] = {}
        pem = _load_public_key(settings)
        if pem is not None:
            self._issuers[settings.jwt_issuer] = TrustedIssuer(
                name=settings.jwt_issuer,
                audience=settings.jwt_audience,
                kind="jwt",
                algorithms=frozenset(settings.jwt_algorithms),
                claims=default_claims,
                keys=StaticKey(_static_key(pem)),
            )
        for entry in settings.jwt_issuers:
            algorithms = frozenset(entry.algorithms or settings.jwt_algorithms)
            self._issuers[entry.issuer] = TrustedIssuer(
                name=entry.issuer,
                audience=entry.audience,
                kind=entry.kind,
                algorithms=algorithms,
                claims=ClaimsMapping(
                    # An issuer's own paths replace the defaults; [] means "none here".
                    groups=default_claims.groups
                    if entry.groups_claims is None
                    else tuple(entry.groups_claims),
                    roles=default_claims.roles
                    if entry.roles_claims is None
                    else tuple(entry.roles_claims),
                    email=entry.email_claim or default_claims.email,
                ),
                keys=JwksKeys(entry.issuer, entry.jwks_url, settings, algorithms, self._client),
            )
        if not self._issuers:
            raise ConfigError(
                "QUERYGATE_JWT_PUBLIC_KEY, QUERYGATE_JWT_PUBLIC_KEY_FILE or QUERYGATE_JWT_ISSUERS "
                "is required"
            )

    @property
    def issuers(self) -> dict[str, TrustedIssuer]:
        """The trusted issuers by ``iss``."""
        return dict(self._issuers)

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            timeout = self._settings.jwks_timeout_ms / 1000
            # Redirects are not followed: the configured (or discovered) URL is the one trusted.
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(timeout), follow_redirects=False,
                headers={"user-agent": "querygate"},
            )
        return self._http

    def _jwks(self) -> list[JwksKeys]:
        return [i.keys for i in self._issuers.values() if isinstance(i.keys, JwksKeys)]

    async def start(self) -> None:
        """Fetch every JWKS once (each bounded by the timeout), then keep them fresh."""
        sources = self._jwks()
        if sources:
            await asyncio.gather(*(source.refresh() for source in sources))
            self._task = asyncio.create_task(self._keep_fresh(sources))

    async def _keep_fresh(self, sources: list[JwksKeys]) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await asyncio.gather(*(source.refresh() for source in sources))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("JWKS refresh failed unexpectedly; retrying at the next interval")

    async def close(self) -> None:
        """Stop the refresher and close the HTTP client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def authenticate(self, headers: HeaderSource, peer: str | None = None) -> Identity:
        """The verified caller of one request, or Unauthenticated with a stable code.

        ``peer`` is the TCP peer address (never a forwarded one): it decides whether the
        client-certificate header is believed.
        """
        try:
            return await self._authenticate(headers, peer)
        except Unauthenticated as exc:
            # Until the audit stream lands, a refusal is one structured line: the code and
            # our own message, never token contents.
            log.info(
                "authentication refused: %s: %s", exc.code, exc.message,
                extra={"auth_code": exc.code, "reason": exc.message, "peer": peer},
            )
            raise

    async def _authenticate(self, headers: HeaderSource, peer: str | None) -> Identity:
        mesh = self._mesh_identity(headers, peer)
        authorization = _one_header(headers, "authorization")
        if authorization:
            service = await self._bearer(authorization)
            if mesh is not None:
                # The token names the caller; the mesh peer that carried it stays visible so
                # policy can require both.
                service = replace(
                    service, attributes={**service.attributes, "mtls_spiffe_id": mesh.sub}
                )
        elif mesh is not None:
            service = mesh
        else:
            raise Unauthenticated("missing_token", "an Authorization: Bearer token is required")
        person_header = _one_header(headers, ON_BEHALF_OF_HEADER)
        if person_header is not None and service.on_behalf_of is not None:
            # A token-exchange token names its person already: a second one is ambiguous.
            raise Unauthenticated("invalid_token", "X-Querygate-On-Behalf-Of with a token "
                                  "that acts for someone already (act claim)")
        if person_header is not None:
            try:
                person = await self._bearer(person_header)
            except Unauthenticated as exc:
                code = "invalid_token" if exc.code == "missing_token" else exc.code
                raise Unauthenticated(code, f"X-Querygate-On-Behalf-Of: {exc.message}") from exc
            service = replace(service, on_behalf_of=person)
        return service

    async def _bearer(self, value: str) -> Identity:
        # Size first: an oversize header is refused before it is split, decoded or verified.
        if len(value) > self._max_bytes:
            raise Unauthenticated("invalid_token", "the token is larger than allowed")
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("missing_token", "an Authorization: Bearer token is required")
        return await self.verify_token(token.strip())

    async def verify_token(self, token: str) -> Identity:
        """Verify one JWT against its issuer's keys and map it to an Identity."""
        if len(token) > self._max_bytes:
            raise Unauthenticated("invalid_token", "the token is larger than allowed")
        hit = self._cache.get(token)
        # A hit counts only while the key that verified it is still the issuer's key for
        # that kid: a key rotated out of the JWKS ends its tokens' hits at once.
        if hit is not None and await hit.issuer.keys.get(hit.kid) is hit.key:
            return hit.identity
        identity, entry = await self._verify(token)
        self._cache.put(token, entry)
        return identity

    async def _verify(self, token: str) -> tuple[Identity, _Verified]:
        try:
            unverified = jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Unauthenticated("invalid_token", f"the token is malformed: {exc}") from exc
        header, payload = unverified["header"], unverified["payload"]
        iss = payload.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise Unauthenticated("invalid_token", "the token's issuer is not trusted")
        # The algorithm is checked before any key is looked up, so `alg: none` or HS256
        # tokens never cause a JWKS fetch.
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise Unauthenticated("invalid_token", "the token's algorithm is not allowed")
        # Only kid selects a key. jku, x5u, jwk and x5c are never read: keys come from the
        # issuer's configured source, not from the token.
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
            raise Unauthenticated("invalid_token", "the token's kid header is malformed")
        key = await issuer.keys.get(kid)
        if not key.fits(alg):
            raise Unauthenticated("invalid_token", "the token's algorithm does not fit its key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                issuer=issuer.name,
                audience=issuer.audience,
                leeway=self._leeway,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise Unauthenticated("token_expired", "the token has expired") from exc
        except jwt.InvalidTokenError as exc:
            # PyJWT's messages name the failed check (issuer, audience, signature, nbf)
            # without echoing the token, so they are safe to return.
            raise Unauthenticated("invalid_token", f"the token is not valid: {exc}") from exc
        self._check_environment(claims, issuer)
        identity = identity_from_claims(claims, issuer.kind, issuer.claims)
        return identity, _Verified(identity, issuer, kid, key, float(claims["exp"]), 0.0)

    def _check_environment(self, claims: dict[str, Any], issuer: TrustedIssuer) -> None:
        value = claim(claims, self._environment_claim)
        if value is None:
            # Service-account tokens are bound by their cluster's issuer and audience instead.
            if self._require_environment and issuer.kind == "jwt":
                raise Unauthenticated(
                    "token_wrong_environment",
                    f"the token names no environment; this gateway serves {self._environment}",
                )
            return
        if value != self._environment:
            raise Unauthenticated(
                "token_wrong_environment",
                f"the token is for another environment; this gateway serves {self._environment}",
            )

    def _mesh_identity(self, headers: HeaderSource, peer: str | None) -> Identity | None:
        values = headers.getlist(self._client_cert_header)
        if not values:
            return None
        if not self._trusted_peer(peer):
            # Anyone can send the header; only a proxy that terminated the mTLS may vouch.
            log.warning(
                "ignored %s from untrusted peer %s", self._client_cert_header, peer,
                extra={"peer": peer, "reason": "untrusted_peer"},
            )
            return None
        raw = ",".join(values)
        if len(raw) > MAX_CLIENT_CERT_HEADER_BYTES:
            raise Unauthenticated("invalid_client_certificate", "the client-certificate header is too large")
        try:
            elements = parse_client_cert_header(raw)
        except ValueError as exc:
            raise Unauthenticated(
                "invalid_client_certificate", f"the client-certificate header is malformed: {exc}"
            ) from exc
        if not elements:
            raise Unauthenticated("invalid_client_certificate", "the client-certificate header is empty")
        # The last element is the one the nearest (trusted) proxy added; earlier ones came
        # from further hops and are not what it verified.
        uris = [u for u in elements[-1].get("uri", []) if u.startswith("spiffe://")]
        if len(uris) != 1:
            raise Unauthenticated(
                "invalid_client_certificate", "the client certificate must carry exactly one SPIFFE ID"
            )
        return spiffe_identity(uris[0], self._trust_domains)

    def _trusted_peer(self, peer: str | None) -> bool:
        if not peer or not self._proxies:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._proxies)


def _one_header(headers: HeaderSource, name: str) -> str | None:
    values = headers.getlist(name)
    if len(values) > 1:
        # Two credentials in one request: which one a proxy or the app would read differs.
        raise Unauthenticated("invalid_token", f"more than one {name} header")
    return values[0] if values else None


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
        # Bound to the environment it was minted for, so it cannot be replayed elsewhere.
        settings.jwt_environment_claim: settings.environment,
    }
    if email:
        claims["email"] = email
    return jwt.encode(claims, key, algorithm="EdDSA")
