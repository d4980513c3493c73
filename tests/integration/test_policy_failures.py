"""Fail closed: every way OPA can fail to give a usable decision is a 503, and nothing runs.

Each case uses a real OPA process: stopped, slow (a policy that burns CPU), answering a
malformed decision, or answering nothing (undefined).
"""

from __future__ import annotations

import pytest

from app.devstack import start_opa
from tests.conftest import FIXTURES

pytestmark = pytest.mark.integration

WRITE = "UPDATE orders SET status = 'tampered' WHERE id = 21"


def _unchanged(db) -> bool:
    return db.fetchval("SELECT status FROM orders WHERE id = 21") != "tampered"


def _assert_fails_closed(gateway, dana, db) -> None:
    response = gateway.query(WRITE, dana)
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"]["code"] == "policy_unavailable"
    assert body["error"]["message"]
    assert _unchanged(db)
    ready = gateway.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["error"]["code"] == "not_ready"


def test_opa_stopped(make_gateway, dana, db):
    opa = start_opa()
    gateway = make_gateway(opa_url=opa.url)
    assert gateway.client.get("/readyz").status_code == 200
    opa.stop()
    _assert_fails_closed(gateway, dana, db)


def test_opa_slower_than_timeout(make_gateway, dana, db):
    opa = start_opa([FIXTURES / "policies" / "slow"])
    try:
        gateway = make_gateway(opa_url=opa.url, opa_timeout_ms=150)
        _assert_fails_closed(gateway, dana, db)
        assert "in time" in gateway.query(WRITE, dana).json()["error"]["message"]
    finally:
        opa.stop()


@pytest.mark.parametrize("policy", ["malformed", "undefined"])
def test_opa_answers_without_a_usable_decision(make_gateway, dana, db, policy):
    opa = start_opa([FIXTURES / "policies" / policy])
    try:
        gateway = make_gateway(opa_url=opa.url)
        _assert_fails_closed(gateway, dana, db)
    finally:
        opa.stop()


def test_opa_url_pointing_nowhere(make_gateway, dana, db):
    from app.devstack import free_port

    gateway = make_gateway(opa_url=f"http://127.0.0.1:{free_port()}")
    _assert_fails_closed(gateway, dana, db)
