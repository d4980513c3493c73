"""Identity through a real gateway (uvicorn, real OPA, real PostgreSQL) against real identity
providers on loopback: JWKS rotation, token attacks, Kubernetes service accounts, on-behalf-of
with a policy that requires the person, mesh mTLS from trusted proxies only, and a JWKS
endpoint that is down.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jwt
import pytest

from app.devstack import OpaProcess, start_opa
from tests.conftest import (
    FIXTURES,
    Gateway,
    IdentityProvider,
    Keys,
    SigningKey,
    bearer,
    forge_hs256,
    unsigned,
)

pytestmark = pytest.mark.integration

SELECT = "SELECT id FROM customers WHERE id < 3"
CLUSTER = "https://kubernetes.default.svc.cluster.local"
SPIFFE = "spiffe://cluster.local/ns/shop/sa/checkout"
XFCC = f'By=spiffe://cluster.local/ns/db/sa/querygate;Hash=1f2e;Subject="CN=checkout,O=Shop";URI={SPIFFE}'
# What "returns within the timeout" allows for a busy shared machine.
MARGIN_S = 1.0


def explain(gateway: Gateway, headers: dict[str, str]) -> httpx.Response:
    return gateway.query(SELECT, headers, path="/v1/explain")


def identity_of(gateway: Gateway, headers: dict[str, str]) -> dict[str, Any]:
    response = explain(gateway, headers)
    assert response.status_code == 200, response.text
    identity: dict[str, Any] = response.json()["identity"]
    return identity


def assert_refused(response: httpx.Response, code: str) -> dict[str, Any]:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert body["error"]["code"] == code, body
    assert set(body) == {"error", "request_id"}
    return body


def issuers(idp: IdentityProvider, cluster: IdentityProvider) -> list[dict[str, Any]]:
    return [
        {"issuer": idp.issuer, "discovery": True, "groups_claims": ["groups", "realm_access.roles"]},
        {"issuer": cluster.issuer, "jwks_url": cluster.jwks_url, "kind": "k8s_sa"},
    ]


@pytest.fixture(scope="module")
def signing() -> SigningKey:
    return SigningKey("idp-2026-01")


@pytest.fixture(scope="module")
def sa_signing() -> SigningKey:
    return SigningKey("cluster-sa-1")


@pytest.fixture(scope="module")
def idp(make_idp: Callable[..., IdentityProvider], signing: SigningKey) -> IdentityProvider:
    provider = make_idp()
    provider.publish(signing)
    return provider


@pytest.fixture(scope="module")
def cluster(make_idp: Callable[..., IdentityProvider], sa_signing: SigningKey) -> IdentityProvider:
    provider = make_idp(issuer=CLUSTER, jwks_path="/openid/v1/jwks")
    provider.publish(sa_signing)
    return provider


@pytest.fixture(scope="module")
def jwks_gateway(make_gateway, idp, cluster) -> Gateway:
    return make_gateway(jwt_issuers=issuers(idp, cluster), jwks_min_refresh_s=0.2)


# --- 1. rotation ---------------------------------------------------------------------------


def test_rotation_new_key_accepted_old_key_refused_once_gone(make_gateway, make_idp):
    idp = make_idp()
    old, new = SigningKey("2026-01"), SigningKey("2026-02")
    idp.publish(old)
    gateway = make_gateway(
        jwt_issuers=[{"issuer": idp.issuer, "discovery": True}],
        jwks_refresh_s=1.0, jwks_min_refresh_s=0.2,
    )
    assert identity_of(gateway, bearer(idp.token(old, "alice", ["analysts"])))["sub"] == "alice"
    # The IdP starts publishing the next key beside the current one.
    idp.publish(old, new)
    time.sleep(0.25)
    assert identity_of(gateway, bearer(idp.token(new, "alice", ["analysts"])))["sub"] == "alice"
    assert identity_of(gateway, bearer(idp.token(old, "bob", ["analysts"])))["sub"] == "bob"
    # The old key leaves the JWKS; the periodic refresh drops it, no restart.
    idp.publish(new)
    old_token = idp.token(old, "alice", ["analysts"])
    deadline = time.monotonic() + 5
    while explain(gateway, bearer(old_token)).status_code == 200:
        assert time.monotonic() < deadline, "the old key is still accepted"
        time.sleep(0.2)
    body = assert_refused(explain(gateway, bearer(old_token)), "invalid_token")
    assert "kid" in body["error"]["message"]
    assert identity_of(gateway, bearer(idp.token(new, "alice", ["analysts"])))["sub"] == "alice"


# --- 2. attacks ----------------------------------------------------------------------------


def _attacks(idp: IdentityProvider, signing: SigningKey, attacker: IdentityProvider
             ) -> dict[str, tuple[str, str]]:
    """name -> (token, expected code)."""
    now = int(time.time())
    rogue = attacker.keys[0]
    claims = idp.claims("mallory", ["dba"])
    return {
        "alg_none": (unsigned(claims, signing.kid), "invalid_token"),
        "hs256_with_the_rsa_public_key": (
            forge_hs256(claims, signing.public_pem(), signing.kid), "invalid_token"
        ),
        "hs256_with_the_jwk_as_secret": (
            forge_hs256(claims, str(signing.jwk()).encode(), signing.kid), "invalid_token"
        ),
        "wrong_key_same_kid": (SigningKey(signing.kid).sign(claims), "invalid_token"),
        "expired": (
            idp.token(signing, "mallory", ["dba"], exp=now - 3600, iat=now - 7200, nbf=now - 7200),
            "token_expired",
        ),
        "nbf_in_the_future": (idp.token(signing, "mallory", ["dba"], nbf=now + 3600), "invalid_token"),
        "iat_in_the_future": (idp.token(signing, "mallory", ["dba"], iat=now + 3600), "invalid_token"),
        "wrong_iss": (idp.token(signing, "mallory", ["dba"], iss="https://evil.example"), "invalid_token"),
        "wrong_aud": (idp.token(signing, "mallory", ["dba"], aud="another-service"), "invalid_token"),
        "no_exp": (idp.token(signing, "mallory", ["dba"], exp=None), "invalid_token"),
        "unknown_kid_pointing_nowhere": (
            SigningKey("kid-that-exists-nowhere").sign(claims), "invalid_token"
        ),
        "jku_to_attacker_jwks": (
            rogue.sign(claims, jku=attacker.jwks_url), "invalid_token"
        ),
        "x5u_to_attacker": (rogue.sign(claims, x5u=attacker.url + "/cert.pem"), "invalid_token"),
        "jku_with_a_trusted_kid": (
            SigningKey(signing.kid).sign(claims, jku=attacker.jwks_url), "invalid_token"
        ),
        "embedded_jwk": (rogue.sign(claims, jwk=rogue.jwk()), "invalid_token"),
        "kid_path_traversal": (
            rogue.sign(claims, kid="../../../../../../dev/null"), "invalid_token"
        ),
        "kid_sql": (rogue.sign(claims, kid="x' UNION SELECT 'secret' --"), "invalid_token"),
        "kid_traversal_on_a_trusted_key": (
            signing.sign(claims, kid=f"../{signing.kid}"), "invalid_token"
        ),
        "kid_oversize": (rogue.sign(claims, kid="k" * 5000), "invalid_token"),
        "another_environment": (
            idp.token(signing, "mallory", ["dba"], environment="prod"), "token_wrong_environment"
        ),
        "groups_not_a_list": (idp.token(signing, "mallory", "dba"), "invalid_token"),
    }


ATTACKS = [
    "alg_none", "hs256_with_the_rsa_public_key", "hs256_with_the_jwk_as_secret",
    "wrong_key_same_kid", "expired", "nbf_in_the_future", "iat_in_the_future", "wrong_iss",
    "wrong_aud", "no_exp", "unknown_kid_pointing_nowhere", "jku_to_attacker_jwks",
    "x5u_to_attacker", "jku_with_a_trusted_kid", "embedded_jwk", "kid_path_traversal", "kid_sql",
    "kid_traversal_on_a_trusted_key", "kid_oversize", "another_environment", "groups_not_a_list",
]


@pytest.fixture(scope="module")
def attacker(make_idp: Callable[..., IdentityProvider]) -> IdentityProvider:
    provider = make_idp()
    provider.publish(SigningKey("attacker-kid"))
    return provider


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_is_refused(jwks_gateway, idp, signing, attacker, attack):
    token, code = _attacks(idp, signing, attacker)[attack]
    body = assert_refused(explain(jwks_gateway, bearer(token)), code)
    # Nothing of the token comes back.
    assert token.split(".")[1] not in body["error"]["message"]
    # Keys come only from the configured issuer: the attacker's server is never asked.
    assert attacker.requests == []
    # The genuine token still works after each attempt.
    assert identity_of(jwks_gateway, bearer(idp.token(signing, "alice", ["analysts"])))["sub"] == "alice"


def test_attack_list_is_complete(idp, signing, attacker):
    assert sorted(_attacks(idp, signing, attacker)) == sorted(ATTACKS)


def test_a_one_megabyte_token_is_refused_fast_with_a_json_error(jwks_gateway, idp, signing):
    fetches = idp.jwks_requests()
    huge = "Bearer " + "A" * 1_048_576
    began = time.monotonic()
    response = explain(jwks_gateway, {"authorization": huge})
    elapsed = time.monotonic() - began
    # uvicorn's httptools parser lets the header through; the gateway's own size check
    # refuses it before splitting, decoding, verifying or fetching anything.
    body = assert_refused(response, "invalid_token")
    assert "larger" in body["error"]["message"]
    assert elapsed < 2.0
    assert idp.jwks_requests() == fetches
    # The same through the on-behalf-of header.
    ok = bearer(idp.token(signing, "svc"))
    assert_refused(explain(jwks_gateway, {**ok, "x-querygate-on-behalf-of": huge}), "invalid_token")


def test_roles_claim_paths_are_mapped(jwks_gateway, idp, signing):
    token = idp.token(signing, "alice", ["analysts"], realm_access={"roles": ["support"]},
                      email="alice@example.com")
    identity = identity_of(jwks_gateway, bearer(token))
    assert identity["groups"] == ["analysts", "support"]
    assert (identity["issuer"], identity["auth"]) == (idp.issuer, "jwt")
    assert identity["email"] == "alice@example.com"


def test_the_static_key_still_works_beside_jwks(jwks_gateway, keys: Keys):
    assert identity_of(jwks_gateway, keys.headers("alice", ["analysts"]))["issuer"] == "https://idp.test"


# --- 3. service accounts and on behalf of --------------------------------------------------


def test_a_service_account_token_is_the_service_identity(jwks_gateway, cluster, sa_signing):
    identity = identity_of(jwks_gateway, bearer(cluster.sa_token(sa_signing, "analytics", "reporter")))
    assert identity == {
        "sub": "system:serviceaccount:analytics:reporter",
        "groups": ["system:serviceaccounts", "system:serviceaccounts:analytics"],
        "roles": [],
        "issuer": CLUSTER,
        "auth": "k8s_sa",
        "email": None,
        "on_behalf_of": None,
        "attributes": {
            "namespace": "analytics", "service_account": "reporter",
            "service_account_uid": "0d4c-sa-uid", "pod": "reporter-7d9f", "pod_uid": "5e1a-pod-uid",
        },
    }


def test_a_service_account_token_with_a_forged_sub_is_refused(jwks_gateway, cluster, sa_signing):
    claims = jwt.decode(cluster.sa_token(sa_signing, "analytics", "reporter"),
                        options={"verify_signature": False})
    token = sa_signing.sign({**claims, "sub": "system:serviceaccount:kube-system:admin"})
    assert_refused(explain(jwks_gateway, bearer(token)), "invalid_token")


@pytest.fixture(scope="module")
def obo_opa() -> Iterator[OpaProcess]:
    process = start_opa([FIXTURES / "policies" / "obo"])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def obo_gateway(make_gateway, obo_opa, idp, cluster) -> Gateway:
    return make_gateway(opa_url=obo_opa.url, jwt_issuers=issuers(idp, cluster))


def test_on_behalf_of_policy_sees_service_and_person(obo_gateway, idp, signing, cluster, sa_signing):
    headers = {
        **bearer(cluster.sa_token(sa_signing, "analytics", "reporter")),
        "x-querygate-on-behalf-of": f"Bearer {idp.token(signing, 'alice', ['analysts'])}",
    }
    response = explain(obo_gateway, headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["identity"]["sub"] == "system:serviceaccount:analytics:reporter"
    assert body["identity"]["on_behalf_of"]["sub"] == "alice"
    assert body["identity"]["on_behalf_of"]["auth"] == "jwt"
    assert body["decision"]["allow"] is True
    ran = obo_gateway.query(SELECT, headers)
    assert ran.status_code == 200, ran.text
    assert ran.json()["rows"] == [[1], [2]]


def test_on_behalf_of_policy_denies_without_the_person(obo_gateway, cluster, sa_signing, make_idp):
    service = bearer(cluster.sa_token(sa_signing, "analytics", "reporter"))
    response = obo_gateway.query(SELECT, service)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["reasons"] == [
        {"rule": "person_required", "message": "a service may query only on behalf of a person"}
    ]
    # Another service is not a person.
    other = cluster.sa_token(sa_signing, "analytics", "batch")
    response = obo_gateway.query(SELECT, {**service, "x-querygate-on-behalf-of": f"Bearer {other}"})
    assert response.status_code == 403, response.text


def test_an_unverifiable_person_is_a_401_not_a_missing_person(obo_gateway, cluster, sa_signing, idp):
    service = bearer(cluster.sa_token(sa_signing, "analytics", "reporter"))
    forged = SigningKey("idp-2026-01").sign(idp.claims("alice", ["analysts"]))
    body = assert_refused(
        obo_gateway.query(SELECT, {**service, "x-querygate-on-behalf-of": f"Bearer {forged}"}),
        "invalid_token",
    )
    assert body["error"]["message"].startswith("X-Querygate-On-Behalf-Of")


# --- 4. mesh mTLS --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh_gateways(make_gateway) -> tuple[Gateway, Gateway]:
    trusted = make_gateway(mtls_trusted_proxies=["127.0.0.1/32"], mtls_trust_domains=["cluster.local"])
    other = make_gateway(mtls_trusted_proxies=["10.0.0.0/8"], mtls_trust_domains=["cluster.local"])
    return trusted, other


def test_client_cert_header_from_a_trusted_proxy_is_the_identity(mesh_gateways):
    trusted, _ = mesh_gateways
    identity = identity_of(trusted, {"x-forwarded-client-cert": XFCC})
    assert (identity["sub"], identity["auth"], identity["issuer"]) == (
        SPIFFE, "mtls", "spiffe://cluster.local"
    )
    assert identity["attributes"]["namespace"] == "shop"


def test_client_cert_header_from_anyone_else_is_ignored_and_logged(mesh_gateways, alice, caplog):
    _, other = mesh_gateways
    with caplog.at_level(logging.WARNING, logger="querygate.identity"):
        assert_refused(explain(other, {"x-forwarded-client-cert": XFCC}), "missing_token")
        identity = identity_of(other, {**alice, "x-forwarded-client-cert": XFCC})
    assert identity["sub"] == "alice" and "mtls_spiffe_id" not in identity["attributes"]
    assert any("untrusted peer 127.0.0.1" in r.getMessage() for r in caplog.records)


def test_a_token_through_a_trusted_proxy_keeps_the_mesh_peer(mesh_gateways, alice):
    trusted, _ = mesh_gateways
    identity = identity_of(trusted, {**alice, "x-forwarded-client-cert": XFCC})
    assert (identity["sub"], identity["auth"]) == ("alice", "jwt")
    assert identity["attributes"]["mtls_spiffe_id"] == SPIFFE


def test_a_certificate_from_another_trust_domain_is_refused(mesh_gateways, alice):
    trusted, _ = mesh_gateways
    foreign = "URI=spiffe://evil.local/ns/shop/sa/checkout"
    assert_refused(explain(trusted, {**alice, "x-forwarded-client-cert": foreign}),
                   "invalid_client_certificate")


# --- 5. JWKS endpoint down -----------------------------------------------------------------


def test_jwks_down_cached_keys_verify_unknown_refused_within_the_timeout(make_gateway, make_idp):
    idp = make_idp()
    key = SigningKey("k1")
    idp.publish(key)
    timeout_s = 0.3
    gateway = make_gateway(
        jwt_issuers=[{"issuer": idp.issuer, "discovery": True}],
        jwks_timeout_ms=int(timeout_s * 1000), jwks_min_refresh_s=0.2,
    )
    known = bearer(idp.token(key, "alice", ["analysts"]))
    for mode in ("hang", "error", "stopped"):
        if mode == "stopped":
            idp.stop()
        else:
            idp.mode = mode
        time.sleep(0.25)  # past the refresh floor, so an unknown kid does try the endpoint
        began = time.monotonic()
        assert identity_of(gateway, known)["sub"] == "alice"
        assert time.monotonic() - began < MARGIN_S, mode

        def unknown(token: str) -> tuple[int, float]:
            with httpx.Client(base_url=gateway.url, timeout=30) as client:
                started = time.monotonic()
                response = client.post("/v1/explain", json={"sql": SELECT}, headers=bearer(token))
                return response.status_code, time.monotonic() - started

        new_keys = [idp.token(SigningKey(f"new-{i}"), "alice", ["analysts"]) for i in range(4)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(unknown, new_keys))
        assert [status for status, _ in results] == [401] * 4, mode
        assert max(took for _, took in results) < timeout_s + MARGIN_S, (mode, results)
        assert identity_of(gateway, known)["sub"] == "alice"
    idp.release.set()


def test_start_up_with_jwks_down_is_bounded_and_recovers(make_gateway, make_idp):
    idp = make_idp()
    key = SigningKey("k1")
    idp.publish(key)
    idp.mode = "hang"
    began = time.monotonic()
    gateway = make_gateway(
        jwt_issuers=[{"issuer": idp.issuer, "jwks_url": idp.jwks_url}],
        jwks_timeout_ms=300, jwks_min_refresh_s=0.2,
    )
    assert time.monotonic() - began < 0.3 + 5.0  # gateway start-up itself takes a moment
    token = bearer(idp.token(key, "alice", ["analysts"]))
    assert_refused(explain(gateway, token), "invalid_token")
    idp.release.set()
    idp.mode = "ok"
    time.sleep(0.25)
    assert identity_of(gateway, token)["sub"] == "alice"


def test_dev_style_tokens_are_not_accepted_by_a_non_dev_gateway(jwks_gateway):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    now = int(time.time())
    dev = jwt.encode(
        {"sub": "alice", "groups": ["dba"], "iss": "querygate-dev", "aud": "querygate",
         "iat": now, "exp": now + 60},
        Ed25519PrivateKey.generate(), algorithm="EdDSA",
    )
    assert_refused(explain(jwks_gateway, bearer(dev)), "invalid_token")
