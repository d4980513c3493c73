"""The HTTP contract as a client sees it: the OpenAPI document, /docs, and /v1/catalog."""

from __future__ import annotations

import pytest

from app.config import load_settings
from tests.conftest import Gateway

pytestmark = pytest.mark.integration


def _own_gateway(base_settings, **overrides):
    # Stopped with this module, not at the end of the session: a gateway left running keeps
    # refreshing its catalog and profile views while later modules run DDL.
    gateway = Gateway(load_settings(**{**base_settings, **overrides})).start()
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def dev_gateway(base_settings):
    yield from _own_gateway(base_settings, environment="dev")


@pytest.fixture(scope="module")
def prod_gateway(base_settings):
    yield from _own_gateway(base_settings, environment="prod",
                            mask_hmac_key="prod-test-key-0123456789")


def test_the_document_has_bodies_answers_errors_and_the_bearer_scheme(gateway):
    doc = gateway.client.get("/openapi.json").json()
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": "A token of a trusted issuer (docs/identity.md).",
    }
    schemas = doc["components"]["schemas"]
    for name in ("QueryRequest", "QueryAnswer", "ApprovalHeld", "ApprovalOut", "ErrorBody",
                 "ExplainAnswer", "CallerCatalogAnswer", "StreamHeader", "StreamEnd",
                 "StreamError"):
        assert name in schemas, name
    query = doc["paths"]["/v1/query"]["post"]
    assert query["security"] == [{"bearer": []}]
    assert query["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/QueryRequest"}
    assert set(query["responses"]) >= {"200", "202", "401", "403", "422", "503"}
    assert "application/x-ndjson" in query["responses"]["200"]["content"]
    assert query["responses"]["403"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorBody"}
    for path in ("/v1/explain", "/v1/catalog", "/v1/approvals", "/v1/approvals/{approval_id}",
                 "/v1/approvals/{approval_id}/approve", "/v1/approvals/{approval_id}/reject"):
        operations = doc["paths"][path]
        assert all(op["security"] == [{"bearer": []}] for op in operations.values()), path
    assert "security" not in doc["paths"]["/healthz"]["get"]


def test_docs_only_in_dev(gateway, dev_gateway):
    assert dev_gateway.client.get("/docs").status_code == 200
    assert gateway.client.get("/docs").status_code == 404


def test_the_document_needs_a_token_in_prod(prod_gateway, keys):
    refused = prod_gateway.client.get("/openapi.json")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "missing_token"
    answer = prod_gateway.client.get("/openapi.json", headers=keys.headers("alice", ["analysts"]))
    assert answer.status_code == 200
    assert "/v1/query" in answer.json()["paths"]


def _columns(body):
    return {f"{t['table']}.{c['name']}": c["mask"] for t in body["tables"] for c in t["columns"]}


def test_the_catalog_shows_alice_the_mask_she_gets(gateway, alice):
    answer = gateway.client.get("/v1/catalog", headers=alice)
    assert answer.status_code == 200, answer.text
    columns = _columns(answer.json())
    assert columns["public.customers.email"] == "email"
    assert columns["public.customers.id"] is None
    # The same mask a query gets.
    rows = gateway.query("SELECT email FROM customers WHERE id = 1", alice).json()
    assert rows["decision"]["masked"] == {"email": "email"}


def test_the_catalog_shows_pat_the_column_unmasked(gateway, keys):
    answer = gateway.client.get("/v1/catalog", headers=keys.headers("pat", ["pii_readers"]))
    assert answer.status_code == 200, answer.text
    assert _columns(answer.json())["public.customers.email"] is None


def test_the_catalog_needs_a_caller(gateway):
    refused = gateway.client.get("/v1/catalog")
    assert refused.status_code == 401


def test_query_is_served_by_the_lean_front_and_still_documented(gateway, alice, caplog):
    """POST /v1/query skips FastAPI's stack (app/http/front.py, docs/benchmarks.md): the
    front serves it with the same ids, metrics and error shape; FastAPI documents it."""
    from app.http.front import Front

    front = gateway.server.config.loaded_app
    while not isinstance(front, Front):  # uvicorn's wrappers of the ASGI app
        front = front.app
    assert "post" in gateway.client.get("/openapi.json").json()["paths"]["/v1/query"]
    answer = gateway.query("SELECT id FROM orders WHERE id = 1", alice)
    assert answer.status_code == 200 and answer.json()["rows"] == [[1]]
    assert answer.headers["x-request-id"]
    refused = gateway.query("SELECT 1; SELECT 2", alice, path="/v1/query?x=1")
    assert refused.status_code >= 400 and refused.json()["request_id"] == \
        refused.headers["x-request-id"]
    wrong = gateway.client.get("/v1/query", headers=alice)
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    metrics = gateway.client.get("/metrics").text
    assert 'querygate_requests_total{code="ok",decision="allow",route="/v1/query"}' in metrics

    # A bug in the handler: the one 500 shape, logged by where it happened, never what.
    import app.http.query as module

    real = module.pipeline.query

    async def broken(*args, **kwargs):
        raise RuntimeError("secret 766-16-2186")

    module.pipeline.query = broken
    try:
        with caplog.at_level("ERROR"):
            crashed = gateway.query("SELECT id FROM orders WHERE id = 1", alice)
    finally:
        module.pipeline.query = real
    assert crashed.status_code == 500 and crashed.json()["error"]["code"] == "internal_error"
    assert "766-16-2186" not in crashed.text and "766-16-2186" not in caplog.text
    assert "unexpected RuntimeError" in caplog.text
