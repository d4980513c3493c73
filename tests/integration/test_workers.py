"""`querygate serve` with QUERYGATE_WORKERS=2 on real OPA and PostgreSQL.

Each worker process claims an audit spool of its own and seals its own chain; both ship to
the one file sink, and `querygate audit verify` checks every chain in it. A keep-alive
connection stays with the worker that accepted it, and /metrics names that worker's audit
instance: so the test finds a connection to each worker and sends queries through both.
"""

from __future__ import annotations

import time

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.audit import verify_file
from app.devstack import start_gateway

pytestmark = pytest.mark.integration

QUERY = {"sql": "SELECT id, country FROM customers WHERE id = $1", "params": [7]}


def _instance(client: httpx.Client) -> str:
    """The audit instance of the worker that serves this connection."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        if family.name == "querygate_audit_last_sequence":
            return str(family.samples[0].labels["instance"])
    raise AssertionError("no querygate_audit_last_sequence in /metrics")


def test_two_workers_have_an_audit_chain_each_and_both_serve(serve_settings, keys, tmp_path):
    spool = tmp_path / "spool"
    gateway = start_gateway(
        serve_settings | {"workers": "2", "audit_spool_dir": str(spool),
                          "audit_instance_id": "gw-workers", "mask_hmac_key": "w" * 32},
        tmp_path / "gateway.log",
    )
    headers = keys.headers("alice", ["analysts"])
    clients: dict[str, httpx.Client] = {}
    spare: list[httpx.Client] = []
    try:
        # The second worker may still be starting when the first answers /readyz.
        deadline = time.monotonic() + 20
        while len(clients) < 2 and time.monotonic() < deadline:
            client = httpx.Client(base_url=gateway.url, timeout=10)
            if client.get("/readyz").status_code == 200:
                clients.setdefault(_instance(client), client)
            if client not in clients.values():
                spare.append(client)
        assert sorted(clients) == ["gw-workers", "gw-workers-w1"], (
            f"found {sorted(clients)}: {(tmp_path / 'gateway.log').read_text()[-2000:]}"
        )
        for client in clients.values():
            for _ in range(5):
                response = client.post("/v1/query", json=QUERY, headers=headers)
                assert response.status_code == 200, response.text
                assert response.json()["rows"] == [[7, response.json()["rows"][0][1]]]
    finally:
        for client in [*clients.values(), *spare]:
            client.close()
        gateway.stop()
    assert gateway.process.returncode == 0
    # Worker slot 0 is the directory itself, slot 1 its worker-1/.
    assert (spool / "state.json").exists() and (spool / "worker-1" / "state.json").exists()
    verifier = verify_file(spool / "audit.jsonl")
    assert verifier.ok, verifier.summary()
    chains = {c["instance"]: c for c in verifier.report()["chains"]}
    assert sorted(chains) == ["gw-workers", "gw-workers-w1"]
    assert chains["gw-workers"]["chain"] != chains["gw-workers-w1"]["chain"]
    events = [orjson.loads(line) for line in (spool / "audit.jsonl").read_bytes().splitlines()]
    for instance in chains:
        mine = [e for e in events if e["instance"] == instance]
        assert sum(e["type"] == "execution" for e in mine) == 5
        actions = [e["lifecycle"]["action"] for e in mine if e["type"] == "lifecycle"]
        assert actions == ["started", "stopped"], actions


# Long enough that only a cancel ends it within seconds (108 million joined rows: ~8 s here).
SLOW = ("SELECT count(*) FROM orders a, orders b, customers c WHERE c.id < 4 "
        "AND a.amount_cents + b.amount_cents >= 0 AND a.status <> b.status || a.status")


def test_a_cancel_reaches_its_session_whichever_worker_it_lands_on(serve_settings, keys,
                                                                   tmp_path):
    """psql's ^C (libpq's PQcancel) sends a CancelRequest on a connection of its own, which
    the kernel hands to either worker; the session it names lives in one of them. Every
    cancel ends its statement, not one in two: a worker passes a key it does not know to
    the other (app/pgwire/server.py CancelPeers)."""
    import threading

    import psycopg

    from app.devstack import free_port

    pg_port = free_port()
    gateway = start_gateway(
        serve_settings | {"workers": "2", "audit_spool_dir": str(tmp_path / "spool"),
                          "mask_hmac_key": "w" * 32, "pg_port": str(pg_port),
                          "dev_mode": "true"},
        tmp_path / "gateway.log",
    )
    token = keys.token("alice", ["analysts"])
    outcomes: list[tuple[float, str]] = []
    try:
        for _ in range(8):
            conn = psycopg.connect(host="127.0.0.1", port=pg_port, dbname="appdb", user="alice",
                                   password=token, sslmode="disable", autocommit=True)
            try:
                timer = threading.Timer(0.8, conn.cancel_safe)
                started = time.monotonic()
                timer.start()
                try:
                    conn.execute(SLOW).fetchall()
                    outcome = "finished"
                except psycopg.Error as exc:
                    outcome = f"{exc.sqlstate} {exc}"
                outcomes.append((time.monotonic() - started, outcome))
                timer.join()
            finally:
                conn.close()
    finally:
        gateway.stop()
    log = (tmp_path / "gateway.log").read_text()[-2000:]
    for took, outcome in outcomes:
        assert outcome.startswith("57014") and "client's request" in outcome, (outcomes, log)
        assert took < 5, (outcomes, log)
