"""Identity without the network: claim mapping, service accounts, mTLS headers, on-behalf-of,
environment binding and the identity settings. Keys are static PEMs here; JWKS behaviour is in
test_identity_jwks.py, the whole path through a gateway in tests/integration/test_identity.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import jwt
import pytest
from starlette.datastructures import Headers

from app.config import ConfigError, load_settings
from app.errors import Unauthenticated
from app.identity import (
    Authenticator,
    ClaimsMapping,
    Identity,
    _parse_jwks,
    claim,
    identity_from_claims,
    mint_dev_token,
    parse_client_cert_header,
    spiffe_identity,
)
from tests.conftest import AUDIENCE, ISSUER, SigningKey

SPIFFE = "spiffe://cluster.local/ns/shop/sa/checkout"
XFCC = (
    'By=spiffe://cluster.local/ns/db/sa/querygate;Hash=abc123;Subject="CN=checkout,O=Shop, Inc.";'
    f"URI={SPIFFE}"
)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey("static")


def settings_for(key: SigningKey, **overrides: Any):
    return load_settings(
        **{
            "environment": "staging",
            "jwt_public_key": key.public_pem().decode(),
            "jwt_issuer": ISSUER,
            "jwt_audience": AUDIENCE,
            "jwt_algorithms": ["RS256"],
            **overrides,
        }
    )


def token(key: SigningKey, sub: str = "alice", **claims: Any) -> str:
    now = int(time.time())
    body = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, **claims}
    return key.sign({k: v for k, v in body.items() if v is not None})


async def authenticate(auth: Authenticator, peer: str | None = "127.0.0.1", **headers: str) -> Identity:
    raw = {name.replace("_", "-"): value for name, value in headers.items()}
    return await auth.authenticate(Headers(raw), peer)


async def refused(auth: Authenticator, code: str, peer: str | None = "127.0.0.1", **headers: str) -> str:
    with pytest.raises(Unauthenticated) as caught:
        await authenticate(auth, peer, **headers)
    assert caught.value.code == code, caught.value.message
    assert caught.value.status == 401
    return caught.value.message


# --- claims --------------------------------------------------------------------------------


def test_claim_paths_are_dotted_and_a_literal_key_wins():
    claims = {"realm_access": {"roles": ["r1"]}, "https://example.com/groups": ["g"]}
    assert claim(claims, "realm_access.roles") == ["r1"]
    assert claim(claims, "https://example.com/groups") == ["g"]
    assert claim(claims, "realm_access.missing") is None
    assert claim({"a": "not-a-dict"}, "a.b") is None


def test_groups_roles_and_email_follow_the_configured_paths():
    claims = {
        "sub": "alice", "iss": ISSUER, "groups": ["analysts", "support"],
        "realm_access": {"roles": ["reader", "analysts"]},
        "profile": {"mail": "alice@example.com"},
    }
    mapping = ClaimsMapping(
        groups=("groups", "realm_access.roles"), roles=("realm_access.roles",), email="profile.mail"
    )
    identity = identity_from_claims(claims, "jwt", mapping)
    assert identity.groups == ("analysts", "support", "reader")  # merged, duplicates once
    assert identity.roles == ("reader", "analysts")
    assert identity.email == "alice@example.com"
    assert identity.to_input() == {
        "sub": "alice", "groups": ["analysts", "support", "reader"],
        "roles": ["reader", "analysts"], "issuer": ISSUER, "auth": "jwt",
        "email": "alice@example.com", "on_behalf_of": None, "attributes": {},
    }


@pytest.mark.parametrize(
    "claims",
    [
        {"sub": ""},
        {"sub": 7},
        {"sub": "a", "groups": "analysts"},
        {"sub": "a", "groups": ["analysts", 3]},
        {"sub": "a", "email": ["a@b"]},
    ],
)
def test_odd_claim_types_are_refused_not_coerced(claims):
    with pytest.raises(Unauthenticated) as caught:
        identity_from_claims({"iss": ISSUER, **claims})
    assert caught.value.code == "invalid_token"


def sa_claims(namespace: str = "shop", name: str = "checkout", **extra: Any) -> dict[str, Any]:
    return {
        "sub": f"system:serviceaccount:{namespace}:{name}", "iss": "https://k8s",
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": "sa-uid"},
            "pod": {"name": "checkout-1", "uid": "pod-uid"},
            "node": {"name": "node-a", "uid": "node-uid"},
        },
        **extra,
    }


def test_a_service_account_token_maps_to_the_service_identity():
    identity = identity_from_claims(sa_claims(), "k8s_sa")
    assert identity.sub == "system:serviceaccount:shop:checkout"
    assert identity.auth == "k8s_sa"
    assert identity.groups == ("system:serviceaccounts", "system:serviceaccounts:shop")
    assert identity.attributes == {
        "namespace": "shop", "service_account": "checkout", "service_account_uid": "sa-uid",
        "pod": "checkout-1", "pod_uid": "pod-uid", "node": "node-a",
    }


@pytest.mark.parametrize(
    "claims",
    [
        sa_claims(sub="system:serviceaccount:kube-system:admin"),  # sub and claim disagree
        {"sub": "system:serviceaccount:shop:checkout", "iss": "https://k8s"},  # no kubernetes.io
        sa_claims() | {"kubernetes.io": {"namespace": "shop"}},
        sa_claims() | {"kubernetes.io": "shop"},
    ],
)
def test_a_service_account_token_must_be_consistent(claims):
    with pytest.raises(Unauthenticated, match="service-account") as caught:
        identity_from_claims(claims, "k8s_sa")
    assert caught.value.code == "invalid_token"


# --- bearer tokens with the static key -------------------------------------------------------


async def test_static_key_mode_still_verifies(key):
    auth = Authenticator(settings_for(key))
    identity = await authenticate(auth, authorization=f"Bearer {token(key, groups=['analysts'])}")
    assert (identity.sub, identity.groups, identity.auth) == ("alice", ("analysts",), "jwt")


async def test_missing_and_malformed_authorization(key):
    auth = Authenticator(settings_for(key))
    await refused(auth, "missing_token")
    await refused(auth, "missing_token", authorization="")
    await refused(auth, "missing_token", authorization="Basic YWxpY2U6cHc=")
    await refused(auth, "missing_token", authorization="Bearer ")
    await refused(auth, "invalid_token", authorization="Bearer not.a.jwt")
    await refused(auth, "invalid_token", authorization="Bearer " + "a" * 9000)


async def test_two_authorization_headers_are_refused(key):
    auth = Authenticator(settings_for(key))
    good = f"Bearer {token(key)}"
    headers = Headers(raw=[(b"authorization", good.encode()), (b"authorization", good.encode())])
    with pytest.raises(Unauthenticated, match="more than one"):
        await auth.authenticate(headers, "127.0.0.1")


async def test_a_refusal_is_logged_with_its_reason_and_no_token(key, caplog):
    auth = Authenticator(settings_for(key))
    bad = token(key, aud="someone-else")
    with caplog.at_level(logging.INFO, logger="querygate.identity"):
        await refused(auth, "invalid_token", authorization=f"Bearer {bad}")
    [record] = [r for r in caplog.records if r.name == "querygate.identity"]
    assert record.auth_code == "invalid_token"
    assert "audience" in record.reason.lower()
    assert bad not in record.getMessage()
    assert bad.split(".")[1] not in record.getMessage()


# --- environment -------------------------------------------------------------------------


async def test_a_token_for_another_environment_is_refused(key):
    auth = Authenticator(settings_for(key))
    await authenticate(auth, authorization=f"Bearer {token(key, environment='staging')}")
    await authenticate(auth, authorization=f"Bearer {token(key)}")  # no claim: not required
    message = await refused(
        auth, "token_wrong_environment", authorization=f"Bearer {token(key, environment='prod')}"
    )
    assert "staging" in message


async def test_the_environment_claim_name_and_requirement_are_configurable(key):
    auth = Authenticator(
        settings_for(key, jwt_environment_claim="qg.env", jwt_require_environment=True)
    )
    await authenticate(auth, authorization=f"Bearer {token(key, qg={'env': 'staging'})}")
    await refused(auth, "token_wrong_environment", authorization=f"Bearer {token(key)}")
    await refused(
        auth, "token_wrong_environment", authorization=f"Bearer {token(key, qg={'env': 'dev'})}"
    )


def test_dev_tokens_carry_their_environment_and_verify_only_there(tmp_path):
    dev = load_settings(
        environment="dev", dev_mode=True, dev_signing_key_file=tmp_path / "k.pem"
    )
    minted = mint_dev_token(dev, "alice", ["analysts"])
    assert jwt.decode(minted, options={"verify_signature": False})["environment"] == "dev"
    staging = load_settings(
        environment="staging", dev_mode=True, dev_signing_key_file=tmp_path / "k.pem"
    )
    with pytest.raises(Unauthenticated) as caught:
        asyncio.run(Authenticator(staging).verify_token(minted))
    assert caught.value.code == "token_wrong_environment"
    with pytest.raises(ConfigError):
        load_settings(environment="prod", dev_mode=True)


# --- on behalf of --------------------------------------------------------------------------


async def test_on_behalf_of_carries_the_person_under_the_service(key):
    auth = Authenticator(settings_for(key))
    identity = await authenticate(
        auth,
        authorization=f"Bearer {token(key, 'reporting-svc', groups=['services'])}",
        x_querygate_on_behalf_of=f"Bearer {token(key, 'alice', groups=['analysts'])}",
    )
    assert identity.sub == "reporting-svc"
    assert identity.on_behalf_of is not None and identity.on_behalf_of.sub == "alice"
    rendered = identity.to_input()
    assert rendered["on_behalf_of"]["groups"] == ["analysts"]
    assert rendered["on_behalf_of"]["on_behalf_of"] is None


async def test_on_behalf_of_is_verified_like_any_token(key):
    auth = Authenticator(settings_for(key))
    service = f"Bearer {token(key, 'svc')}"
    expired = token(key, "alice", exp=int(time.time()) - 3600, iat=int(time.time()) - 7200)
    message = await refused(
        auth, "token_expired", authorization=service, x_querygate_on_behalf_of=f"Bearer {expired}"
    )
    assert message.startswith("X-Querygate-On-Behalf-Of")
    await refused(auth, "invalid_token", authorization=service, x_querygate_on_behalf_of="alice")
    forged = SigningKey("static").sign(jwt.decode(token(key), options={"verify_signature": False}))
    await refused(
        auth, "invalid_token", authorization=service, x_querygate_on_behalf_of=f"Bearer {forged}"
    )


async def test_on_behalf_of_without_a_service_is_refused(key):
    auth = Authenticator(settings_for(key))
    await refused(auth, "missing_token", x_querygate_on_behalf_of=f"Bearer {token(key)}")


# --- mesh mTLS -----------------------------------------------------------------------------


def test_the_client_cert_header_parses_quotes_escapes_and_hops():
    elements = parse_client_cert_header(
        'By=spiffe://a/x;URI=spiffe://a/first,'
        'By=spiffe://a/y;Subject="CN=a,b;c=\\"d\\"";URI=spiffe://a/one;URI=https://other;DNS=x'
    )
    assert len(elements) == 2
    assert elements[1]["subject"] == ['CN=a,b;c="d"']
    assert elements[1]["uri"] == ["spiffe://a/one", "https://other"]
    for bad in ['Subject="unterminated', "URI", "=value"]:
        with pytest.raises(ValueError):
            parse_client_cert_header(bad)


@pytest.mark.parametrize(
    "uri",
    [
        "spiffe://evil.local/ns/shop/sa/checkout",  # untrusted trust domain
        "spiffe://cluster.local",  # no workload path
        "spiffe://cluster.local/",
        "spiffe://cluster.local/ns/../sa/x",
        "spiffe://cluster.local/ns//sa/x",
        "spiffe://cluster.local:443/ns/a/sa/b",
        "spiffe://user@cluster.local/ns/a/sa/b",
        "spiffe://cluster.local/ns/a%2Fb/sa/c",
        "spiffe://cluster.local/ns/a/sa/b?x=1",
        "https://cluster.local/ns/a/sa/b",
    ],
)
def test_odd_spiffe_ids_are_refused(uri):
    with pytest.raises(Unauthenticated) as caught:
        spiffe_identity(uri, frozenset({"cluster.local"}))
    assert caught.value.code == "invalid_client_certificate"


def mesh_settings(key: SigningKey, proxies: str = "127.0.0.1/32, 10.0.0.0/8"):
    return settings_for(key, mtls_trusted_proxies=proxies, mtls_trust_domains="cluster.local")


async def test_mtls_identity_from_a_trusted_proxy(key):
    auth = Authenticator(mesh_settings(key))
    identity = await authenticate(auth, "10.1.2.3", x_forwarded_client_cert=XFCC)
    assert identity.to_input() == {
        "sub": SPIFFE, "groups": [], "roles": [], "issuer": "spiffe://cluster.local",
        "auth": "mtls", "email": None, "on_behalf_of": None,
        "attributes": {
            "spiffe_id": SPIFFE, "trust_domain": "cluster.local",
            "namespace": "shop", "service_account": "checkout",
        },
    }
    # IPv4-mapped IPv6 is the same peer.
    assert (await authenticate(auth, "::ffff:127.0.0.1", x_forwarded_client_cert=XFCC)).sub == SPIFFE


async def test_mtls_header_from_anyone_else_is_ignored_and_logged(key, caplog):
    auth = Authenticator(mesh_settings(key, proxies="10.0.0.0/8"))
    with caplog.at_level(logging.WARNING, logger="querygate.identity"):
        await refused(auth, "missing_token", "127.0.0.1", x_forwarded_client_cert=XFCC)
        await refused(auth, "missing_token", None, x_forwarded_client_cert=XFCC)
    assert any("untrusted peer 127.0.0.1" in r.getMessage() for r in caplog.records)
    identity = await authenticate(
        auth, "127.0.0.1", authorization=f"Bearer {token(key)}", x_forwarded_client_cert=XFCC
    )
    assert identity.sub == "alice" and "mtls_spiffe_id" not in identity.attributes


async def test_a_bearer_token_wins_over_mtls_and_keeps_the_peer_visible(key):
    auth = Authenticator(mesh_settings(key))
    identity = await authenticate(
        auth, "127.0.0.1",
        authorization=f"Bearer {token(key, 'reporting-svc')}",
        x_forwarded_client_cert=XFCC,
        x_querygate_on_behalf_of=f"Bearer {token(key, 'alice')}",
    )
    assert (identity.sub, identity.auth) == ("reporting-svc", "jwt")
    assert identity.attributes["mtls_spiffe_id"] == SPIFFE
    assert identity.on_behalf_of is not None and identity.on_behalf_of.sub == "alice"
    # Without a token the mesh identity is the service, and may act for a person.
    identity = await authenticate(
        auth, "127.0.0.1",
        x_forwarded_client_cert=XFCC,
        x_querygate_on_behalf_of=f"Bearer {token(key, 'alice')}",
    )
    assert identity.auth == "mtls" and identity.on_behalf_of is not None


async def test_only_the_nearest_hop_counts(key):
    auth = Authenticator(mesh_settings(key))
    # A client-supplied element first, then the one the proxy appended: the proxy's wins.
    spoofed = f"URI=spiffe://cluster.local/ns/kube-system/sa/admin,{XFCC}"
    assert (await authenticate(auth, x_forwarded_client_cert=spoofed)).sub == SPIFFE


@pytest.mark.parametrize(
    "value",
    [
        'Subject="CN=unterminated',
        "Hash=abc",  # no URI
        f"URI={SPIFFE};URI=spiffe://cluster.local/ns/other/sa/x",  # two SPIFFE IDs
        "URI=spiffe://evil.local/ns/shop/sa/checkout",
        "URI=" + "a" * 20_000,
    ],
)
async def test_an_unusable_certificate_from_a_trusted_proxy_is_refused(key, value):
    auth = Authenticator(mesh_settings(key))
    await refused(
        auth, "invalid_client_certificate",
        authorization=f"Bearer {token(key)}", x_forwarded_client_cert=value,
    )


# --- JWKS parsing --------------------------------------------------------------------------


def test_only_usable_public_signature_keys_are_taken_from_a_jwks():
    good, ec_key, ed_key, dup = (
        SigningKey("good"), SigningKey("ec", "EC"), SigningKey("ed", "OKP"), SigningKey("dup")
    )
    private = jwt.algorithms.RSAAlgorithm.to_jwk(SigningKey("x").private, as_dict=True)
    keys = _parse_jwks(
        {
            "keys": [
                good.jwk(), ec_key.jwk(), ed_key.jwk(),
                {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
                good.jwk(kid="enc", use="enc"),
                good.jwk(kid="hs", alg="HS256"),
                good.jwk(kid="ps", alg="PS512"),  # an algorithm not allowed here
                {**private, "kid": "private"},
                {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
                good.jwk(kid="k" * 300),
                "not-a-key",
                dup.jwk(), SigningKey("dup").jwk(),
            ]
        },
        frozenset({"RS256", "ES256", "EdDSA"}),
    )
    assert sorted(keys) == ["ec", "ed", "good"]
    assert keys["good"].fits("RS256") and not keys["good"].fits("ES256")
    assert keys["ec"].fits("ES256") and not keys["ec"].fits("ES384")
    assert keys["ed"].fits("EdDSA") and not keys["ed"].fits("RS256")


# --- settings ------------------------------------------------------------------------------


JWKS = "https://idp.example/jwks.json"


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"jwt_issuers": "[not json"}, "QUERYGATE_JWT_ISSUERS"),
        ({"jwt_issuers": '[{"issuer": "a"}]'}, "QUERYGATE_JWT_ISSUERS"),
        ({"jwt_issuers": [{"issuer": "a", "jwks_url": JWKS, "discovery": True}]},
         "QUERYGATE_JWT_ISSUERS"),
        ({"jwt_issuers": [{"issuer": "a", "jwks_url": JWKS, "algorithms": ["HS256"]}]},
         "QUERYGATE_JWT_ISSUERS"),
        ({"jwt_issuers": [{"issuer": "a", "jwks_url": JWKS, "algorithms": ["none"]}]},
         "QUERYGATE_JWT_ISSUERS"),
        ({"jwt_issuers": [{"issuer": "a", "jwks_url": JWKS, "kind": "saml"}]},
         "QUERYGATE_JWT_ISSUERS"),
        ({"jwt_issuers": [{"issuer": "a", "jwks_url": JWKS, "audiences": ["x"]}]},
         "QUERYGATE_JWT_ISSUERS"),
        ({"jwt_issuers": [{"issuer": "a", "jwks_url": "http://idp.example/jwks"}]},
         "QUERYGATE_JWT_ISSUERS[0].jwks_url"),
        ({"jwt_issuers": [{"issuer": "http://idp.example", "discovery": True}]},
         "QUERYGATE_JWT_ISSUERS[0].issuer"),
        ({"jwt_issuers": [{"issuer": "a", "jwks_url": "file:///etc/keys"}]},
         "QUERYGATE_JWT_ISSUERS[0].jwks_url"),
        ({"environment": "prod", "jwt_issuers": [{"issuer": "a", "jwks_url": "http://127.0.0.1/j"}]},
         "QUERYGATE_JWT_ISSUERS[0].jwks_url"),
        ({"jwt_issuers": [{"issuer": "a", "jwks_url": JWKS}, {"issuer": "a", "jwks_url": JWKS}]},
         "QUERYGATE_JWT_ISSUERS"),
        ({"jwt_public_key": "-----BEGIN PUBLIC KEY-----", "jwt_issuer": "a",
          "jwt_issuers": [{"issuer": "a", "jwks_url": JWKS}]}, "QUERYGATE_JWT_ISSUER"),
        ({"jwks_timeout_ms": 0}, "QUERYGATE_JWKS_TIMEOUT_MS"),
        ({"jwks_min_refresh_s": 0}, "QUERYGATE_JWKS_MIN_REFRESH_S"),
        ({"mtls_trusted_proxies": "10.0.0.0/8"}, "QUERYGATE_MTLS_TRUST_DOMAINS"),
        ({"mtls_trusted_proxies": "10.0.0.1/8", "mtls_trust_domains": "a"},
         "QUERYGATE_MTLS_TRUSTED_PROXIES"),
        ({"mtls_trusted_proxies": "proxy.local", "mtls_trust_domains": "a"},
         "QUERYGATE_MTLS_TRUSTED_PROXIES"),
        ({"mtls_trusted_proxies": "0.0.0.0/0", "mtls_trust_domains": "a"},
         "QUERYGATE_MTLS_TRUSTED_PROXIES"),
        ({"mtls_trusted_proxies": "10.0.0.0/8", "mtls_trust_domains": "spiffe://a"},
         "QUERYGATE_MTLS_TRUST_DOMAINS"),
        ({"mtls_header": "x-client cert"}, "QUERYGATE_MTLS_HEADER"),
    ],
)
def test_invalid_identity_settings_name_the_variable(overrides, named):
    with pytest.raises(ConfigError) as caught:
        load_settings(**{"environment": "staging", **overrides})
    assert named in str(caught.value)


def test_identity_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv(
        "QUERYGATE_JWT_ISSUERS",
        '[{"issuer": "https://idp.example", "discovery": true},'
        ' {"issuer": "https://kubernetes.default.svc", "jwks_url": "https://10.0.0.1/openid/v1/jwks",'
        '  "kind": "k8s_sa", "algorithms": ["RS256"]}]',
    )
    monkeypatch.setenv("QUERYGATE_JWT_GROUPS_CLAIMS", "groups, realm_access.roles")
    monkeypatch.setenv("QUERYGATE_MTLS_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8")
    monkeypatch.setenv("QUERYGATE_MTLS_TRUST_DOMAINS", "cluster.local")
    settings = load_settings(environment="prod", mask_hmac_key="a-real-secret-0123456789")
    assert [i.kind for i in settings.jwt_issuers] == ["jwt", "k8s_sa"]
    assert settings.jwt_groups_claims == ["groups", "realm_access.roles"]
    assert settings.mtls_trusted_proxies == ["127.0.0.1", "10.0.0.0/8"]
    # Issuers alone are enough to serve: no static key needed.
    load_settings(
        database_url="postgresql://h/db", environment="prod", mask_hmac_key="a-real-secret-0123456789"
    ).require_serving()
    auth = Authenticator(settings)
    assert set(auth.issuers) == {"https://idp.example", "https://kubernetes.default.svc"}


def test_plain_http_key_urls_are_for_dev_mode_and_loopback_only():
    issuer = [{"issuer": "a", "jwks_url": "http://keycloak:8080/certs"}]
    load_settings(environment="dev", dev_mode=True, jwt_issuers=issuer)
    load_settings(environment="staging", jwt_issuers=[{"issuer": "a", "jwks_url": "http://[::1]:9/j"}])
    load_settings(environment="staging", jwt_issuers=[{"issuer": "http://localhost:9", "discovery": True}])


def test_without_any_key_source_nothing_starts():
    with pytest.raises(ConfigError, match="QUERYGATE_JWT_ISSUERS"):
        load_settings(environment="staging", database_url="postgresql://h/db").require_serving()
    with pytest.raises(ConfigError, match="QUERYGATE_JWT_ISSUERS"):
        Authenticator(load_settings(environment="staging"))
