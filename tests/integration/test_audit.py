"""The audit trail through a real gateway (real OPA, real PostgreSQL), file sink.

Every decision, execution outcome, approval step, authentication failure and admin action
is on record before its answer; events carry who, what and how long, never values.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from jsonschema import Draft202012Validator

from app.audit import verify_file
from app.devstack import free_port

pytestmark = pytest.mark.integration

STAGES = {"auth", "facts", "policy", "database", "masking"}
SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "audit-event.schema.json"


def event_validator() -> Draft202012Validator:
    """Validates events against docs/audit-event.schema.json (the schema is itself checked)."""
    schema = json.loads(SCHEMA.read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def spool_state(client: httpx.Client) -> dict[str, float]:
    """The audit gauges of /metrics, by name."""
    text = client.get("/metrics").text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(querygate_audit_\w+)\{[^}]*\} (\S+)$", text, re.M)
    }


def wait_shipped(client: httpx.Client, timeout_s: float = 20) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        state = spool_state(client)
        if state["querygate_audit_last_sequence"] == state["querygate_audit_shipped_sequence"]:
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


class Trail:
    """A gateway whose audit file the test reads."""

    def __init__(self, gateway: Any, spool: Path) -> None:
        self.gateway = gateway
        self.spool = spool

    def events(self) -> list[dict[str, Any]]:
        wait_shipped(self.gateway.client)
        path = self.spool / "audit.jsonl"
        return [orjson.loads(line) for line in path.read_bytes().splitlines()]

    def of(self, response: httpx.Response) -> list[dict[str, Any]]:
        """The events of one request, in order."""
        rid = response.headers["x-request-id"]
        return [e for e in self.events() if (e.get("request") or {}).get("id") == rid]


@pytest.fixture(scope="module")
def trail(make_gateway, tmp_path_factory) -> Trail:
    spool = tmp_path_factory.mktemp("audit") / "spool"
    gateway = make_gateway(audit_spool_dir=str(spool), audit_instance_id="gw-it",
                           admin_groups=["security"])
    return Trail(gateway, spool)


@pytest.fixture(scope="module")
def pat(keys):
    return keys.headers("pat", ["pii_readers"])


@pytest.fixture(scope="module")
def sec(keys):
    return keys.headers("sec", ["security"])


def test_an_allowed_query_has_its_decision_then_its_outcome(trail, alice):
    response = trail.gateway.query(
        "SELECT id, email FROM customers WHERE id < $1 AND country <> 'XX'", alice, [5]
    )
    assert response.status_code == 200, response.text
    decision, execution = trail.of(response)
    assert decision["type"] == "decision" and execution["type"] == "execution"
    assert execution["seq"] == decision["seq"] + 1
    assert decision["identity"]["sub"] == "alice"
    assert decision["identity"]["groups"] == ["analysts"]
    assert decision["request"]["source_ip"] == "127.0.0.1"
    assert decision["environment"] == "staging"
    assert decision["decision"]["outcome"] == "allow"
    assert decision["decision"]["id"] == response.json()["decision"]["id"]
    assert "bundle_revision" in decision["decision"]
    assert decision["decision"]["masks"]["public.customers.email"] == "email"
    assert decision["query"]["sql"] == (
        "SELECT id, email FROM customers WHERE id < $1 AND country <> ?"
    )
    assert decision["query"]["fingerprint"].startswith("sha256:")
    assert decision["query"]["tables"]["read"] == ["public.customers"]
    run = execution["execution"]
    assert run["outcome"] == "ok"
    assert run["rows_returned"] == 4 and run["truncated"] is False
    assert run["masked_columns"] == {"email": "email"}
    assert STAGES <= set(execution["durations_us"])
    assert execution["decision"]["id"] == decision["decision"]["id"]


def test_denials_and_refusals_are_on_record(trail, alice):
    denied = trail.gateway.query("DELETE FROM orders WHERE id = 1", alice)
    assert denied.status_code == 403
    [event] = trail.of(denied)
    assert event["decision"]["outcome"] == "deny"
    assert (event["decision"]["by"], event["decision"]["code"]) == ("policy", "policy_denied")
    assert "write_requires_writer_group" in {r["rule"] for r in event["decision"]["reasons"]}
    unknown = trail.gateway.query("SELECT nope FROM customers WHERE id = 'x'", alice)
    assert unknown.status_code == 422
    [event] = trail.of(unknown)
    assert (event["decision"]["outcome"], event["decision"]["by"]) == ("deny", "gateway")
    assert event["decision"]["code"] == unknown.json()["error"]["code"]
    assert event["query"]["sql"] == "SELECT nope FROM customers WHERE id = ?"


def test_an_authentication_failure_is_recorded_without_the_token(trail):
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2lnbmF0dXJl"
    response = trail.gateway.query("SELECT 1", {"authorization": f"Bearer {token}"})
    assert response.status_code == 401
    [event] = trail.of(response)
    assert event["type"] == "auth_failure"
    assert event["auth_failure"]["code"] == response.json()["error"]["code"]
    assert event["identity"] is None
    assert token not in orjson.dumps(event).decode()


def test_explain_is_a_decision_that_ran_nothing(trail, alice):
    response = trail.gateway.query("SELECT id FROM customers WHERE id = 1", alice,
                                   path="/v1/explain")
    assert response.status_code == 200
    [event] = trail.of(response)
    assert event["decision"]["explain"] is True and event["decision"]["outcome"] == "allow"


def test_a_stream_records_its_outcome_when_it_ends(trail, alice):
    response = trail.gateway.client.post(
        "/v1/query", json={"sql": "SELECT id, email FROM customers WHERE id <= 30"},
        headers={**alice, "accept": "application/x-ndjson"},
    )
    assert response.status_code == 200
    _, execution = trail.of(response)
    assert execution["execution"]["streamed"] is True
    assert execution["execution"]["rows_returned"] == 30
    assert execution["execution"]["masked_columns"] == {"email": "email"}


def test_the_approval_lifecycle_is_audited(trail, dana, sec):
    sql = "UPDATE customers SET full_name = full_name || '?' WHERE id = $1"
    held = trail.gateway.query(sql, dana, [151])
    assert held.status_code == 202, held.text
    approval_id = held.json()["approval"]["id"]
    decision, requested = trail.of(held)
    assert decision["decision"]["outcome"] == "approval_required"
    assert (requested["type"], requested["approval"]["step"]) == ("approval", "requested")
    assert requested["approval"]["id"] == approval_id
    assert requested["query"]["sql"] == "UPDATE customers SET full_name = full_name || ? WHERE id = $1"
    refused = trail.gateway.client.post(f"/v1/approvals/{approval_id}/approve", headers=dana)
    assert refused.status_code == 403
    [event] = trail.of(refused)
    assert (event["approval"]["step"], event["approval"]["code"]) == ("approve_refused", "self_approval")
    approved = trail.gateway.client.post(f"/v1/approvals/{approval_id}/approve", headers=sec,
                                         json={"comment": "ticket 42"})
    assert approved.status_code == 200
    [event] = trail.of(approved)
    assert event["approval"]["step"] == "approved" and event["identity"]["sub"] == "sec"
    assert event["approval"]["comment"] == "ticket 42"
    used = trail.gateway.client.post(
        "/v1/query", json={"sql": sql, "params": [151], "approval_id": approval_id}, headers=dana
    )
    assert used.status_code == 200, used.text
    steps = [(e["type"], (e.get("approval") or {}).get("step")) for e in trail.of(used)]
    assert steps == [("decision", None), ("approval", "used"), ("execution", None)]


def test_admin_actions_and_schema_changes_are_audited(trail, sec, alice, db):
    refused = trail.gateway.client.post("/v1/admin/catalog/refresh", headers=alice)
    assert refused.status_code == 403
    [event] = trail.of(refused)
    assert (event["admin"]["action"], event["admin"]["outcome"]) == ("catalog_refresh", "refused")
    db.execute("CREATE TABLE IF NOT EXISTS audit_schema_probe (id integer PRIMARY KEY)")
    try:
        refreshed = trail.gateway.client.post("/v1/admin/catalog/refresh", headers=sec)
        assert refreshed.status_code == 200
        [event] = trail.of(refreshed)
        assert (event["admin"]["action"], event["admin"]["outcome"]) == ("catalog_refresh", "ok")
        changed = [e for e in trail.events() if e["type"] == "catalog_changed"]
        assert changed and changed[-1]["catalog"]["version_after"] == refreshed.json()["version"]
    finally:
        db.execute("DROP TABLE IF EXISTS audit_schema_probe CASCADE")


def test_no_event_holds_result_values_parameters_or_literals(trail, alice, pat, dana, sec, db):
    """Acceptance 6: the demo's sensitive values, bound parameters and SQL literals never
    appear in the trail, whoever read them and however."""
    db.execute("CREATE TABLE IF NOT EXISTS audit_secrets (id integer PRIMARY KEY, note text)")
    assert trail.gateway.client.post("/v1/admin/catalog/refresh", headers=sec).status_code == 200
    needles = [f"param-secret-{uuid.uuid4().hex}" for _ in range(3)]
    literal = f"literal-secret-{uuid.uuid4().hex}"
    sensitive = "SELECT id, email, ssn, card_number FROM customers WHERE id <= $1"
    for who in (pat, alice):
        assert trail.gateway.query(sensitive, who, [200]).status_code == 200
        streamed = trail.gateway.client.post(
            "/v1/query", json={"sql": sensitive, "params": [200]},
            headers={**who, "accept": "application/x-ndjson"},
        )
        assert streamed.status_code == 200
    raw = trail.gateway.query(sensitive, pat, [200]).json()["rows"]
    assert "@" in raw[0][1] and "*" not in raw[0][2]  # pat really saw the raw values
    assert trail.gateway.query(
        "SELECT id FROM customers WHERE country = $1", alice, [needles[0]]
    ).status_code == 200
    assert trail.gateway.query(
        f"SELECT id FROM customers WHERE country = '{literal}'", alice
    ).status_code == 200
    for i, needle in enumerate(needles[1:]):
        written = trail.gateway.query(
            "INSERT INTO audit_secrets (id, note) VALUES ($1, $2)", dana, [i + 1, needle]
        )
        assert written.status_code == 200, written.text
    # A real SSN as a bound parameter of a refused query, and of a served one (a predicate
    # on a masked column compares masked values: docs/masking.md §4).
    denied = trail.gateway.query("DELETE FROM customers WHERE ssn = $1", alice, [raw[0][2]])
    assert denied.status_code == 403
    served = trail.gateway.query("SELECT id FROM customers WHERE ssn = $1", alice, [raw[0][2]])
    assert served.status_code == 200 and served.json()["rows"] == []
    events = trail.events()
    text = (trail.spool / "audit.jsonl").read_text()
    assert len(events) > 20
    values = {v for row in db.fetch("SELECT email, ssn, card_number FROM customers") for v in row}
    leaked = sorted(v for v in values if v in text)
    assert not leaked, leaked[:5]
    for needle in [*needles, literal]:
        assert needle not in text
    db.execute("DROP TABLE IF EXISTS audit_secrets CASCADE")


def test_every_event_matches_the_documented_schema(trail):
    validator = event_validator()
    events = trail.events()
    assert {e["type"] for e in events} >= {
        "lifecycle", "decision", "execution", "approval", "auth_failure", "admin",
        "catalog_changed",
    }
    for event in events:
        errors = sorted(validator.iter_errors(event), key=str)
        assert not errors, (event["type"], [e.message for e in errors[:3]])


def test_the_trail_of_the_run_verifies(trail):
    trail.events()
    verifier = verify_file(trail.spool / "audit.jsonl")
    assert verifier.ok, verifier.summary()
    assert verifier.report()["chains"][0]["duplicates"] == 0


def test_a_full_spool_refuses_queries_and_runs_nothing(make_gateway, tmp_path, dana, db):
    """Acceptance 4: Kafka unreachable, the spool reaches its quota: 503 audit_unavailable,
    and no statement runs without its decision on record."""
    db.execute("CREATE TABLE IF NOT EXISTS audit_quota (id integer PRIMARY KEY)")
    db.execute("TRUNCATE audit_quota")
    gateway = make_gateway(
        audit_spool_dir=str(tmp_path / "spool"), audit_sink="kafka",
        audit_kafka_bootstrap=f"127.0.0.1:{free_port()}", audit_spool_max_bytes=64 * 1024,
        audit_drain_timeout_s=0,
    )
    codes = []
    for i in range(200):
        response = gateway.query("INSERT INTO audit_quota (id) VALUES ($1)", dana, [i])
        codes.append(response.status_code)
        if response.status_code == 503:
            assert response.json()["error"]["code"] == "audit_unavailable"
            if codes.count(503) >= 5:
                break
    ran = codes.count(200)
    assert ran > 5 and codes.count(503) == 5, codes
    assert set(codes) == {200, 503}
    assert db.fetchval("SELECT count(*) FROM audit_quota") == ran
    ready = gateway.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["error"]["checks"]["audit"].startswith("spool full")
    state = spool_state(gateway.client)
    assert state["querygate_audit_spool_bytes"] <= 64 * 1024
    assert state["querygate_audit_sink_up"] == 0
    db.execute("DROP TABLE audit_quota CASCADE")


class SlowSpool:
    """Wraps a gateway's spool writer: each write takes ``delay`` s (a slow disk), notes when
    batches holding a decision became durable, and fails every write while ``failing``."""

    def __init__(self, gateway: Any, delay: float) -> None:
        self.spool = _app_state(gateway).gateway.audit.spool
        self.write = self.spool._write_sync
        self.delay = delay
        self.failing = False
        self.decisions_durable: list[float] = []
        self.batches: list[bytes] = []
        self.spool._write_sync = self._write

    def _write(self, data: bytes, roll_to: int) -> Any:
        time.sleep(self.delay)
        if self.failing:
            raise OSError(errno.EIO, "Input/output error")
        result = self.write(data, roll_to)
        self.batches.append(data)
        if b'"type":"decision"' in data:
            self.decisions_durable.append(time.time())
        return result


def _app_state(gateway: Any) -> Any:
    app = gateway.server.config.loaded_app
    while not hasattr(app, "state"):  # uvicorn's wrappers of the ASGI app
        app = app.app
    return app.state


def test_a_read_runs_while_its_decision_is_written_and_a_write_waits_for_it(
    make_gateway, tmp_path, alice, dana, db
):
    gateway = make_gateway(audit_spool_dir=str(tmp_path / "spool"))
    slow = SlowSpool(gateway, delay=0.3)
    read = gateway.query("SELECT current_timestamp AS t", alice)
    assert read.status_code == 200, read.text
    started = dt.datetime.fromisoformat(read.json()["rows"][0][0]).timestamp()
    # The statement began before its decision was durable; the answer waited for it. The
    # decision and the outcome took one fsync.
    assert started < slow.decisions_durable[-1]
    rid = read.headers["x-request-id"].encode()
    [batch] = [b for b in slow.batches if rid in b]
    assert batch.count(rid) == 2 and b'"type":"execution"' in batch
    status = db.fetchval("SELECT status FROM orders WHERE id = 23")
    write = gateway.query("UPDATE orders SET status = $1 WHERE id = 23 "
                          "RETURNING current_timestamp AS t", dana, [status])
    assert write.status_code == 200, write.text
    started = dt.datetime.fromisoformat(write.json()["rows"][0][0]).timestamp()
    assert started > slow.decisions_durable[-1]  # a write runs once it is on record

    # The spool cannot write the read's decision: the answer is an error, with no row.
    slow.failing = True
    failed = gateway.query("SELECT id, email FROM customers WHERE id = 1", alice)
    assert failed.status_code == 503, failed.text
    assert failed.json()["error"]["code"] == "audit_unavailable"
    assert "rows" not in failed.json() and "@" not in failed.text
    slow.failing = False
