"""querygate_client against a live gateway (issue 18, acceptance 6): JSON and NDJSON
queries, explain, catalog, the approval round trip, and errors raised as typed exceptions
chosen by the gateway's code."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.devstack import free_port
from querygate_client import (
    ApprovalPending,
    AsyncClient,
    Client,
    QueryResult,
    TokenFile,
    errors,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def as_(gateway, keys):
    opened: list[Client] = []

    def make(sub: str, groups: list[str], **claims) -> Client:
        client = Client(gateway.url, keys.token(sub, groups, **claims), timeout=30)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


def test_query_returns_typed_rows_with_the_masks(as_):
    result = as_("alice", ["analysts"]).query(
        "SELECT id, email FROM customers WHERE id <= $1 ORDER BY id", [3])
    assert isinstance(result, QueryResult)
    assert [c.name for c in result.columns] == ["id", "email"]
    assert [row[0] for row in result.rows] == [1, 2, 3]
    assert result.masked == {"email": "email"} and result.decision_id
    assert result.truncated is False


def test_ndjson_rows_arrive_as_an_iterator(as_):
    client = as_("alice", ["analysts"])
    with client.stream("SELECT id, email FROM customers WHERE id <= $1 ORDER BY id",
                       [40]) as rows:
        assert rows.columns == ["id", "email"] and rows.masked == {"email": "email"}
        seen = [row[0] for row in rows]
    assert seen == list(range(1, 41))
    assert rows.complete is True and rows.state.row_count == 40


async def test_the_async_client_queries_streams_and_explains(gateway, keys):
    async with AsyncClient(gateway.url, keys.token("alice", ["analysts"])) as client:
        result = await client.query("SELECT id FROM customers WHERE id = $1", [5])
        assert isinstance(result, QueryResult) and result.rows == [[5]]
        async with client.stream("SELECT id FROM customers WHERE id <= 12 ORDER BY id") as rows:
            assert [r[0] async for r in rows] == list(range(1, 13))
        assert rows.complete
        explained = await client.explain("SELECT email FROM customers WHERE id = 1")
        assert explained.allow and explained.decision["masks"]["public.customers.email"]
        catalog = await client.catalog()
        assert "public.customers" in {t.table for t in catalog.tables}
        with pytest.raises(errors.PolicyDenied):
            await client.query("DELETE FROM orders WHERE id = 1")


def test_a_stream_cut_by_the_gateway_raises_its_typed_error(make_gateway, keys):
    small = make_gateway(max_response_bytes=4000)
    with Client(small.url, keys.token("alice", ["analysts"])) as client, \
            client.stream("SELECT id, email FROM customers ORDER BY id") as rows:
        seen = []
        with pytest.raises(errors.PayloadTooLarge) as cut:
            for row in rows:
                seen.append(row)
    assert cut.value.code == "response_too_large" and seen
    assert rows.complete is False


def test_explain_and_catalog(as_):
    client = as_("alice", ["analysts"])
    explained = client.explain("SELECT email FROM customers WHERE id = $1", [1])
    assert explained.allow is True
    assert explained.facts["tables"]["read"] == ["public.customers"]
    tables = {t.table: t for t in client.catalog().tables}
    masks = {c["name"]: c["mask"] for c in tables["public.customers"].columns}
    assert masks["email"] == "email"


def test_the_approval_round_trip(as_):
    dana, sec = as_("dana", ["dba"]), as_("sec", ["security"])
    sql = "UPDATE customers SET full_name = full_name WHERE id = $1"
    pending = dana.request_approval(sql, [9])
    assert isinstance(pending, ApprovalPending) and pending.approval.status == "pending"
    approval_id = pending.approval.id
    assert approval_id in {a.id for a in sec.approvals("pending")}
    # Polling returns once it is decided (or at its timeout, as it stands).
    assert dana.wait_for_approval(approval_id, timeout_s=0.2, interval_s=0.1).status == "pending"
    assert sec.approve(approval_id, comment="looks fine").status == "approved"
    assert dana.wait_for_approval(approval_id, timeout_s=5, interval_s=0.1).status == "approved"
    ran = dana.query(sql, [9], approval_id=approval_id)
    assert isinstance(ran, QueryResult) and ran.rows_affected == 1
    with pytest.raises(errors.ApprovalNotAccepted) as used:
        dana.query(sql, [9], approval_id=approval_id)
    assert used.value.code.startswith("approval_")
    rejected = dana.request_approval(sql, [10])
    assert sec.reject(rejected.approval.id).status == "rejected"
    assert dana.approval(rejected.approval.id).status == "rejected"
    with pytest.raises(errors.Forbidden) as self_approval:
        dana.approve(dana.request_approval(sql, [11]).approval.id)
    assert self_approval.value.code == "self_approval"


def test_errors_are_typed_by_code(as_, gateway, keys):
    alice = as_("alice", ["analysts"])
    with pytest.raises(errors.PolicyDenied) as denied:
        alice.query("DROP TABLE orders")
    assert denied.value.status == 403 and denied.value.decision_id
    assert "ddl_forbidden_in_environment" in {r["rule"] for r in denied.value.reasons}
    with pytest.raises(errors.Unprocessable) as unknown:
        alice.query("SELECT nope FROM customers")
    assert unknown.value.code == "unknown_object" and unknown.value.request_id
    with pytest.raises(errors.BadRequest):
        alice.query("SELEC 1")
    with pytest.raises(errors.NotFound) as missing:
        alice.approval("00000000-0000-0000-0000-000000000000")
    assert missing.value.code == "approval_not_found"
    now = int(time.time())
    expired = Client(gateway.url, keys.token("alice", ["analysts"], iat=now - 7200,
                                             nbf=now - 7200, exp=now - 3600))
    with expired, pytest.raises(errors.TokenExpired):
        expired.query("SELECT 1")
    with Client(f"http://127.0.0.1:{free_port()}", "x", timeout=2) as nowhere, \
            pytest.raises(errors.TransportError):
        nowhere.query("SELECT 1")


def test_rate_limits_are_typed_with_their_retry_after(make_gateway, keys):
    limited = make_gateway(rate_limit_per_s=0.01, rate_limit_burst=1)
    with Client(limited.url, keys.token("alice", ["analysts"])) as client:
        client.query("SELECT 1")
        with pytest.raises(errors.RateLimited) as refused:
            client.query("SELECT 1")
    assert refused.value.status == 429 and refused.value.retry_after_s >= 1


def test_a_token_file_is_read_again_when_it_changes(gateway, keys, tmp_path):
    path = tmp_path / "token"
    path.write_text(keys.token("alice", ["analysts"]))
    with Client(gateway.url, TokenFile(path)) as client:
        assert isinstance(client.query("SELECT 1"), QueryResult)
        path.write_text("not-a-token")
        with pytest.raises(errors.Unauthenticated):
            client.query("SELECT 1")


def test_importing_the_client_never_touches_a_users_app_package(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "__init__.py").write_text("MINE = True\n")
    check = ("import sys, app, querygate_client; assert app.MINE; "
             "assert not [m for m in sys.modules if m.startswith('app.')], sys.modules; "
             "print(querygate_client.Client.__module__)")
    out = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "querygate_client.client"
