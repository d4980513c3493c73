"""Approvals end to end: held, approved by someone else, used once, bound to the request."""

from __future__ import annotations

import http.server
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import ClassVar

import httpx
import pytest

from tests.conftest import SigningKey, bearer

pytestmark = pytest.mark.integration

SQL = "UPDATE customers SET full_name = full_name || '!' WHERE id = $1"


def _request(gateway, headers, params, sql=SQL):
    response = gateway.query(sql, headers, params)
    assert response.status_code == 202, response.text
    return response.json()["approval"]


def _approve(gateway, approval_id, headers, verdict="approve"):
    return gateway.client.post(f"/v1/approvals/{approval_id}/{verdict}", headers=headers,
                               json={"comment": "looks fine"})


def _submit(gateway, headers, params, approval_id, sql=SQL):
    return gateway.client.post(
        "/v1/query", json={"sql": sql, "params": params, "approval_id": approval_id},
        headers=headers,
    )


def _name(db, cid):
    return db.fetchval("SELECT full_name FROM customers WHERE id = $1", cid)


@pytest.fixture(scope="module")
def sec(keys):
    return keys.headers("sec", ["security"])


def test_happy_path(gateway, dana, sec, db):
    before = _name(db, 101)
    approval = _request(gateway, dana, [101])
    assert _name(db, 101) == before
    listed = gateway.client.get("/v1/approvals", params={"status": "pending"}, headers=sec).json()
    assert approval["id"] in {a["id"] for a in listed["approvals"]}
    decided = _approve(gateway, approval["id"], sec)
    assert decided.status_code == 200, decided.text
    assert decided.json()["approval"]["status"] == "approved"
    assert decided.json()["approval"]["decided_by"] == "sec"
    response = _submit(gateway, dana, [101], approval["id"])
    assert response.status_code == 200, response.text
    assert response.json()["rows_affected"] == 1
    assert _name(db, 101) == before + "!"
    shown = gateway.client.get(f"/v1/approvals/{approval['id']}", headers=dana).json()
    assert shown["approval"]["status"] == "used" and shown["approval"]["used_at"]


def test_self_approval_is_refused(gateway, dana):
    approval = _request(gateway, dana, [102])
    response = _approve(gateway, approval["id"], dana)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "self_approval"


def test_non_approver_is_refused(gateway, dana, alice):
    approval = _request(gateway, dana, [103])
    response = _approve(gateway, approval["id"], alice)
    assert response.status_code == 403
    body = response.json()["error"]
    assert body["code"] == "approver_denied"
    assert body["reasons"][0]["rule"] == "not_an_approver"


def test_rejected_approval_cannot_be_used(gateway, dana, sec, db):
    before = _name(db, 104)
    approval = _request(gateway, dana, [104])
    assert _approve(gateway, approval["id"], sec, "reject").json()["approval"]["status"] == "rejected"
    response = _submit(gateway, dana, [104], approval["id"])
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "approval_not_usable"
    assert _name(db, 104) == before


def test_second_use_is_refused(gateway, dana, sec, db):
    before = _name(db, 105)
    approval = _request(gateway, dana, [105])
    _approve(gateway, approval["id"], sec)
    assert _submit(gateway, dana, [105], approval["id"]).status_code == 200
    again = _submit(gateway, dana, [105], approval["id"])
    assert again.status_code == 403
    assert again.json()["error"]["code"] == "approval_not_usable"
    assert _name(db, 105) == before + "!"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("sql", "approval_mismatch"),
        ("params", "approval_mismatch"),
        ("requester", "approval_mismatch"),
    ],
)
def test_approval_is_bound_to_the_request(gateway, dana, sec, keys, db, change, expected):
    before = _name(db, 106)
    approval = _request(gateway, dana, [106])
    _approve(gateway, approval["id"], sec)
    if change == "sql":
        response = _submit(gateway, dana, [106], approval["id"],
                           sql=SQL.replace("'!'", "'?'"))
    elif change == "params":
        response = _submit(gateway, dana, [107], approval["id"])
    else:
        other_dba = keys.headers("dan", ["dba"])
        response = _submit(gateway, other_dba, [106], approval["id"])
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == expected
    assert _name(db, 106) == before
    assert _name(db, 107) == db.fetchval("SELECT full_name FROM customers WHERE id = 107")


def test_expired_approval_is_refused(make_gateway, opa_with_config, dana, sec, db):
    opa = opa_with_config(guardrails={"approval_ttl_s": 1})
    gateway = make_gateway(opa_url=opa.url)
    before = _name(db, 108)
    approval = _request(gateway, dana, [108])
    assert _approve(gateway, approval["id"], sec).status_code == 200
    time.sleep(1.5)
    response = _submit(gateway, dana, [108], approval["id"])
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "approval_expired"
    assert _name(db, 108) == before
    late = _request(gateway, dana, [108])
    time.sleep(1.5)
    refused = _approve(gateway, late["id"], sec)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "approval_not_pending"


def test_concurrent_submissions_execute_exactly_once(gateway, dana, sec, db):
    before = _name(db, 110)
    approval = _request(gateway, dana, [110])
    _approve(gateway, approval["id"], sec)
    body = {"sql": SQL, "params": [110], "approval_id": approval["id"]}

    def submit(_):
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            return client.post("/v1/query", json=body, headers=dana).status_code

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(submit, range(8)))
    assert statuses.count(200) == 1, statuses
    assert statuses.count(403) == 7, statuses
    assert _name(db, 110) == before + "!"


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict]] = []

    def do_POST(self):
        length = int(self.headers["content-length"])
        _Hook.received.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_webhook_is_told_and_a_dead_webhook_never_blocks(make_gateway, dana, sec):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gateway = make_gateway(
            approval_webhook_url=f"http://127.0.0.1:{server.server_address[1]}/hook"
        )
        approval = _request(gateway, dana, [111])
        _approve(gateway, approval["id"], sec)
        deadline = time.monotonic() + 5
        while len(_Hook.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        texts = [m["text"] for m in _Hook.received]
        assert any(approval["id"] in t and "requested" in t for t in texts)
        assert any(approval["id"] in t and "approved by sec" in t for t in texts)
    finally:
        server.shutdown()
        server.server_close()
    # Nothing listens there any more: the request path does not care.
    dead = make_gateway(approval_webhook_url=f"http://127.0.0.1:{server.server_address[1]}/x")
    started = time.monotonic()
    _request(dead, dana, [112])
    assert time.monotonic() - started < 2


def test_streamed_resubmission_leaves_the_approval_unused(gateway, dana, sec, db):
    before = _name(db, 121)
    approval = _request(gateway, dana, [121])
    _approve(gateway, approval["id"], sec)
    streamed = gateway.client.post(
        "/v1/query", json={"sql": SQL, "params": [121], "approval_id": approval["id"]},
        headers={**dana, "accept": "application/x-ndjson"},
    )
    assert streamed.status_code == 422, streamed.text
    assert streamed.json()["error"]["code"] == "stream_unsupported"
    assert _name(db, 121) == before
    shown = gateway.client.get(f"/v1/approvals/{approval['id']}", headers=dana).json()
    assert shown["approval"]["status"] == "approved" and shown["approval"]["used_at"] is None
    response = _submit(gateway, dana, [121], approval["id"])
    assert response.status_code == 200, response.text
    assert response.json()["rows_affected"] == 1
    assert _name(db, 121) == before + "!"


def test_same_sub_from_another_issuer_is_another_requester(make_gateway, make_idp, dana, sec, db):
    signing = SigningKey("other-issuer-1")
    other = make_idp()
    other.publish(signing)
    gateway = make_gateway(jwt_issuers=[{"issuer": other.issuer, "jwks_url": other.jwks_url}])
    # Not in an approver group, so only being the requester could show it the approval.
    impostor = bearer(other.token(signing, "dana", ["analysts"]))
    assert gateway.query("SELECT 1", impostor).status_code == 200  # a trusted issuer
    before = _name(db, 122)
    approval = _request(gateway, dana, [122])
    assert gateway.client.get(f"/v1/approvals/{approval['id']}", headers=dana).status_code == 200
    shown = gateway.client.get(f"/v1/approvals/{approval['id']}", headers=impostor)
    assert shown.status_code == 404, shown.text
    assert shown.json()["error"]["code"] == "approval_not_found"
    listed = gateway.client.get("/v1/approvals", headers=impostor).json()["approvals"]
    assert approval["id"] not in {a["id"] for a in listed}
    _approve(gateway, approval["id"], sec)
    used = _submit(gateway, impostor, [122], approval["id"])
    assert used.status_code == 403, used.text
    assert used.json()["error"]["code"] == "approval_mismatch"
    assert _name(db, 122) == before
    shown = gateway.client.get(f"/v1/approvals/{approval['id']}", headers=dana).json()
    assert shown["approval"]["status"] == "approved"
