"""The JWKS key source against a real identity provider on loopback (tests/conftest.py):
caching by kid, rate-limited refresh, single flight, timeouts, and what a broken or hostile
endpoint cannot make the gateway do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from app.config import load_settings
from app.errors import Unauthenticated
from app.identity import Authenticator, JwksKeys
from tests.conftest import IdentityProvider, SigningKey, forge_hs256, unsigned

TIMEOUT_MS = 300
# What "returns within the timeout" allows for scheduling on a busy shared machine.
MARGIN_S = 0.7


@contextlib.asynccontextmanager
async def started(idp: IdentityProvider, discovery: bool = False, **overrides: Any
                  ) -> AsyncIterator[Authenticator]:
    entry: dict[str, Any] = {"issuer": idp.issuer}
    entry |= {"discovery": True} if discovery else {"jwks_url": idp.jwks_url}
    settings = load_settings(
        **{
            "environment": "staging",
            "jwt_issuers": [entry],
            "jwt_algorithms": ["RS256", "ES256", "EdDSA"],
            "jwks_timeout_ms": TIMEOUT_MS,
            "jwks_min_refresh_s": 0.1,
            **overrides,
        }
    )
    auth = Authenticator(settings)
    await auth.start()
    try:
        yield auth
    finally:
        await auth.close()


def jwks(auth: Authenticator, idp: IdentityProvider) -> JwksKeys:
    source = auth.issuers[idp.issuer].keys
    assert isinstance(source, JwksKeys)
    return source


async def refused(auth: Authenticator, token: str, code: str = "invalid_token") -> str:
    with pytest.raises(Unauthenticated) as caught:
        await auth.verify_token(token)
    assert caught.value.code == code, caught.value.message
    return caught.value.message


@pytest.fixture
def idp(make_idp) -> IdentityProvider:
    return make_idp()


async def test_keys_of_every_type_verify_and_a_known_kid_costs_no_fetch(idp):
    rsa_key, ec_key, ed_key = SigningKey("rsa"), SigningKey("ec", "EC"), SigningKey("ed", "OKP")
    idp.publish(rsa_key, ec_key, ed_key)
    async with started(idp, discovery=True) as auth:
        assert idp.requests == ["/.well-known/openid-configuration", "/jwks.json"]
        for key in (rsa_key, ec_key, ed_key):
            for _ in range(5):
                assert (await auth.verify_token(idp.token(key, "alice", ["analysts"]))).sub == "alice"
        assert idp.jwks_requests() == 1


async def test_unknown_kids_refresh_at_most_once_per_interval(idp):
    idp.publish(SigningKey("k1"))
    stranger = SigningKey("k1")  # same kid, other key: a forgery
    async with started(idp, jwks_min_refresh_s=30) as auth:
        assert idp.jwks_requests() == 1
        for i in range(20):
            await refused(auth, idp.token(SigningKey(f"made-up-{i}"), "mallory"), "invalid_token")
        await refused(auth, idp.token(stranger, "mallory"))
        # Start-up fetched; nothing a caller sent made it fetch again within 30 s.
        assert idp.jwks_requests() == 1


async def test_a_new_key_is_picked_up_without_restart_and_a_removed_one_dropped(idp):
    k1, k2 = SigningKey("k1"), SigningKey("k2")
    idp.publish(k1)
    async with started(idp) as auth:
        await asyncio.sleep(0.15)
        idp.publish(k2)
        assert (await auth.verify_token(idp.token(k2, "alice"))).sub == "alice"
        assert jwks(auth, idp).kids == {"k2"}
        await refused(auth, idp.token(k1, "alice"))


async def test_alg_none_and_hmac_tokens_never_cause_a_fetch(idp):
    key = SigningKey("k1")
    idp.publish(key)
    async with started(idp) as auth:
        await asyncio.sleep(0.15)  # a fetch would be allowed now, if anything asked for one
        claims = idp.claims("mallory", ["dba"])
        await refused(auth, unsigned(claims, "unknown-kid"))
        await refused(auth, forge_hs256(claims, json.dumps(key.jwk()).encode(), "unknown-kid"))
        assert idp.jwks_requests() == 1


async def test_concurrent_unknown_kids_share_one_fetch_bounded_by_the_timeout(idp):
    idp.publish(SigningKey("k1"))
    async with started(idp) as auth:
        await asyncio.sleep(0.15)
        idp.mode = "hang"
        tokens = [idp.token(SigningKey(f"new-{i}"), "alice") for i in range(10)]
        began = time.monotonic()
        results = await asyncio.gather(
            *(auth.verify_token(t) for t in tokens), return_exceptions=True
        )
        elapsed = time.monotonic() - began
        assert all(isinstance(r, Unauthenticated) for r in results)
        assert elapsed < TIMEOUT_MS / 1000 + MARGIN_S
        assert idp.jwks_requests() == 2  # start-up, then one shared refresh
        idp.release.set()


async def test_endpoint_down_cached_keys_verify_unknown_refused_nothing_hangs(idp, caplog):
    key = SigningKey("k1")
    idp.publish(key)
    async with started(idp) as auth:
        for mode in ("error", "hang", "stopped"):
            if mode == "stopped":
                idp.stop()
            else:
                idp.mode = mode
            await asyncio.sleep(0.15)
            began = time.monotonic()
            assert (await auth.verify_token(idp.token(key, "alice"))).sub == "alice"
            with caplog.at_level(logging.WARNING, logger="querygate.identity"):
                await refused(auth, idp.token(SigningKey("k2"), "alice"))
            assert time.monotonic() - began < TIMEOUT_MS / 1000 + MARGIN_S, mode
            assert jwks(auth, idp).kids == {"k1"}
        assert any("keeping 1 cached keys" in r.getMessage() for r in caplog.records)


async def test_start_up_with_a_hanging_endpoint_is_bounded(idp):
    idp.mode = "hang"
    began = time.monotonic()
    async with started(idp) as auth:
        assert time.monotonic() - began < TIMEOUT_MS / 1000 + MARGIN_S
        await refused(auth, idp.token(SigningKey("k1"), "alice"))
    idp.release.set()


async def test_a_discovery_document_for_another_issuer_is_refused(make_idp):
    idp = make_idp()
    key = SigningKey("k1")
    idp.publish(key)
    idp.routes["/.well-known/openid-configuration"] = (
        200, json.dumps({"issuer": "https://other.example", "jwks_uri": idp.jwks_url}).encode(), {}
    )
    async with started(idp, discovery=True) as auth:
        await refused(auth, idp.token(key, "alice"))
        assert idp.jwks_requests() == 0


async def test_a_discovered_plain_http_jwks_elsewhere_is_refused(idp, make_idp):
    key = SigningKey("k1")
    idp.publish(key)
    idp.routes["/.well-known/openid-configuration"] = (
        200, json.dumps({"issuer": idp.issuer, "jwks_uri": "http://keys.example/jwks"}).encode(), {}
    )
    async with started(idp, discovery=True) as auth:
        await refused(auth, idp.token(key, "alice"))


async def test_redirects_are_not_followed(idp, make_idp):
    attacker = make_idp()
    key = SigningKey("k1")
    attacker.publish(key)
    idp.routes["/jwks.json"] = (302, b"", {"location": attacker.jwks_url})
    async with started(idp) as auth:
        await refused(auth, idp.token(key, "alice"))
    assert attacker.requests == []


async def test_an_oversize_or_malformed_key_set_keeps_the_keys_we_have(idp):
    key = SigningKey("k1")
    idp.publish(key)
    async with started(idp) as auth:
        for body in (b'{"keys": [' + b" " * 1_100_000 + b"]}", b"<html>", b'{"keys": {}}'):
            idp.routes["/jwks.json"] = (200, body, {})
            await asyncio.sleep(0.15)
            await refused(auth, idp.token(SigningKey("k2"), "alice"))
            assert (await auth.verify_token(idp.token(key, "alice"))).sub == "alice"


async def test_periodic_refresh_drops_a_key_that_left_the_jwks(idp):
    k1, k2 = SigningKey("k1"), SigningKey("k2")
    idp.publish(k1, k2)
    async with started(idp, jwks_refresh_s=1.0) as auth:
        assert (await auth.verify_token(idp.token(k1, "alice"))).sub == "alice"
        idp.publish(k2)
        # Polled: the refresher runs on its own clock and signals nothing.
        for _ in range(50):
            if "k1" not in jwks(auth, idp).kids:
                break
            await asyncio.sleep(0.1)
        await refused(auth, idp.token(k1, "alice"))
        assert (await auth.verify_token(idp.token(k2, "alice"))).sub == "alice"


async def test_a_service_account_token_from_the_cluster_issuer(make_idp):
    cluster = make_idp(issuer="https://kubernetes.default.svc.cluster.local",
                       jwks_path="/openid/v1/jwks")
    key = SigningKey("sa-key")
    cluster.publish(key)
    entry = {"issuer": cluster.issuer, "jwks_url": cluster.jwks_url, "kind": "k8s_sa"}
    settings = load_settings(environment="staging", jwt_issuers=[entry], jwks_timeout_ms=TIMEOUT_MS)
    auth = Authenticator(settings)
    await auth.start()
    try:
        identity = await auth.verify_token(cluster.sa_token(key, "shop", "checkout"))
        assert (identity.sub, identity.auth) == ("system:serviceaccount:shop:checkout", "k8s_sa")
        assert identity.attributes["pod"] == "checkout-7d9f"
        # The cluster's audience is querygate; a token for the API server is not for us.
        await refused(auth, cluster.sa_token(key, "shop", "checkout", aud="https://kubernetes.default.svc"))
    finally:
        await auth.close()


# --- the verified-token cache (QUERYGATE_AUTH_CACHE_*) -------------------------------------

@pytest.fixture
def signature_checks(monkeypatch) -> list[str]:
    """Every full verification (jwt.decode with a key) the authenticator performs."""
    import jwt

    calls: list[str] = []
    real = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


async def test_a_verified_token_is_remembered_until_its_key_leaves_the_key_set(
    idp, signature_checks
):
    old, new = SigningKey("old"), SigningKey("new")
    idp.publish(old, new)
    async with started(idp) as auth:
        token = idp.token(old, "alice", ["analysts"])
        for _ in range(3):
            assert (await auth.verify_token(token)).groups == ("analysts",)
        assert len(signature_checks) == 1
        # The IdP rotates the old key out; once the gateway's key set has it, a remembered
        # token signed with that key is refused at once, not when its entry would expire.
        idp.publish(new)
        await jwks(auth, idp).refresh()
        await refused(auth, token)
        fresh = idp.token(new, "alice", ["analysts"])
        assert (await auth.verify_token(fresh)).sub == "alice"


async def test_a_remembered_token_is_verified_again_after_the_ttl_or_its_exp(
    idp, signature_checks, monkeypatch
):
    key = SigningKey("k")
    idp.publish(key)
    clock = [time.time()]
    monkeypatch.setattr("app.identity.time.time", lambda: clock[0])
    async with started(idp, auth_cache_ttl_s=10) as auth:
        long_lived = idp.token(key, "alice", ["analysts"])  # exp in 600 s
        short_lived = idp.token(key, "bob", ["analysts"], exp=int(clock[0]) + 3)
        for token in (long_lived, short_lived, long_lived, short_lived):
            await auth.verify_token(token)
        assert len(signature_checks) == 2
        clock[0] += 4  # past bob's exp, within the TTL
        await auth.verify_token(long_lived)
        assert len(signature_checks) == 2
        # bob's entry is gone: verified in full again (PyJWT's own clock still accepts it).
        await auth.verify_token(short_lived)
        assert len(signature_checks) == 3
        clock[0] += 7  # past the TTL of alice's entry
        await auth.verify_token(long_lived)
        assert len(signature_checks) == 4


async def test_the_cache_can_be_turned_off(idp, signature_checks):
    key = SigningKey("k")
    idp.publish(key)
    async with started(idp, auth_cache_ttl_s=0) as auth:
        token = idp.token(key, "alice", ["analysts"])
        for _ in range(3):
            await auth.verify_token(token)
        assert len(signature_checks) == 3


async def test_refusals_are_never_remembered(idp, signature_checks):
    key, stranger = SigningKey("k"), SigningKey("stranger")
    idp.publish(key)
    async with started(idp) as auth:
        forged = idp.token(stranger, "mallory", ["dba"], header={"kid": key.kid})
        for _ in range(2):
            await refused(auth, forged)
        assert len(signature_checks) == 2
