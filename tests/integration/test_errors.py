"""Every error has one JSON shape with a stable code and the right status (docs/errors.md)."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import AUDIENCE, ISSUER

pytestmark = pytest.mark.integration


def _assert_shape(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error", "request_id"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in response.text
    return body


def _bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def test_missing_token(gateway):
    _assert_shape(gateway.query("SELECT 1", {}), 401, "missing_token")


def test_not_a_bearer_token(gateway):
    _assert_shape(gateway.query("SELECT 1", {"authorization": "Basic YWxpY2U6cHc="}), 401,
                  "missing_token")


def test_expired_token(gateway, keys):
    now = int(time.time())
    token = keys.token("alice", ["analysts"], iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    _assert_shape(gateway.query("SELECT 1", _bearer(token)), 401, "token_expired")


def test_token_signed_with_another_key(gateway):
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    token = jwt.encode(
        {"sub": "alice", "groups": ["analysts"], "iss": ISSUER, "aud": AUDIENCE,
         "iat": now, "exp": now + 60},
        other, algorithm="RS256",
    )
    _assert_shape(gateway.query("SELECT 1", _bearer(token)), 401, "invalid_token")


@pytest.mark.parametrize("claims", [{"iss": "https://evil.test"}, {"aud": "someone-else"}])
def test_wrong_issuer_or_audience(gateway, keys, claims):
    token = keys.token("alice", ["analysts"], **claims)
    _assert_shape(gateway.query("SELECT 1", _bearer(token)), 401, "invalid_token")


def test_unsigned_token(gateway):
    now = int(time.time())
    token = jwt.encode({"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "iat": now,
                        "exp": now + 60}, None, algorithm="none")
    _assert_shape(gateway.query("SELECT 1", _bearer(token)), 401, "invalid_token")


def test_groups_claim_of_wrong_type(gateway, keys):
    token = keys.token("alice", "analysts")  # a string, not a list
    _assert_shape(gateway.query("SELECT 1", _bearer(token)), 401, "invalid_token")


def test_malformed_json(gateway, alice):
    response = gateway.client.post("/v1/query", content=b'{"sql": "SELECT 1"', headers=alice)
    _assert_shape(response, 400, "invalid_json")


@pytest.mark.parametrize(
    "body",
    [{}, {"sql": 5}, {"sql": ""}, {"sql": "SELECT 1", "params": "x"},
     {"sql": "SELECT 1", "unexpected": True}, []],
)
def test_body_not_matching_schema(gateway, alice, body):
    response = gateway.client.post("/v1/query", json=body, headers=alice)
    _assert_shape(response, 422, "invalid_request")


def test_sql_over_limit(make_gateway, alice):
    small = make_gateway(max_sql_bytes=1024)
    sql = "SELECT id FROM customers WHERE id IN (" + ",".join(["1"] * 600) + ")"
    _assert_shape(small.query(sql, alice), 413, "sql_too_large")


def test_body_over_limit(make_gateway, alice):
    small = make_gateway(max_sql_bytes=1024, max_request_bytes=2048)
    response = small.query("SELECT 1", alice, params=["x" * 4096])
    _assert_shape(response, 413, "payload_too_large")


def test_unknown_route_and_method(gateway, alice):
    _assert_shape(gateway.client.get("/v1/nope", headers=alice), 404, "not_found")
    _assert_shape(gateway.client.get("/v1/query", headers=alice), 405, "method_not_allowed")


def test_auth_is_checked_before_the_body(gateway):
    # An anonymous caller learns nothing about the body's validity.
    response = gateway.client.post("/v1/query", content=b"not json")
    _assert_shape(response, 401, "missing_token")
