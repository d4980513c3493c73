"""Deadlines everywhere (issue 14): no caller can stall the gateway, its pools or its shutdown.

Real PostgreSQL (pgserver), real OPA, gateways on loopback (in a thread, or as `querygate
serve` processes where a signal or the process itself is what is measured).
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from app.devstack import start_gateway
from app.errors import GatewayTimeout, Unavailable
from app.executor import CleanSessions, Executor, _Watchdog, connection_settings
from app.facts import Output, QueryFacts

pytestmark = pytest.mark.integration

SLEEP_FACTS = QueryFacts(fingerprint="sha256:sleep", kind="select",
                         outputs=(Output("pg_sleep", (), "computed"),))
ONE_FACTS = QueryFacts(fingerprint="sha256:one", kind="select",
                       outputs=(Output("one", (), "computed"),))
# Text PostgreSQL refuses as trailing junk after a number or a parameter. The gateway refuses
# it before PostgreSQL sees it (app/grammar.py); the deadline would end it if it did not.
TRAILING_JUNK = [
    ("SELECT 1é", None),
    ("SELECT $1é", [1]),
    ("SELECT 1ü FROM customers", None),
]


def audited(spool: Path, request_id: str, timeout_s: float = 10) -> list[dict[str, Any]]:
    """The audit events of one request, once the file sink has them."""
    deadline = time.monotonic() + timeout_s
    path = spool / "audit.jsonl"
    while True:
        events = [json.loads(line) for line in path.read_text().splitlines()] \
            if path.exists() else []
        mine = [e for e in events if (e.get("request") or {}).get("id") == request_id]
        if any(e["type"] == "execution" for e in mine) or time.monotonic() > deadline:
            return mine
        time.sleep(0.1)


async def _backends(admin_dsn: str, pids: list[int]) -> set[int]:
    admin = await asyncpg.connect(admin_dsn)
    try:
        rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE pid = ANY($1)", pids)
        return {row["pid"] for row in rows}
    finally:
        await admin.close()


@pytest.mark.parametrize(("sql", "params"), TRAILING_JUNK)
def test_trailing_junk_is_refused_within_the_deadline(gateway, alice, sql, params):
    started = time.monotonic()
    response = gateway.query(sql, alice, params)
    took = time.monotonic() - started
    assert 400 <= response.status_code < 500, response.text
    assert took < gateway.settings.request_timeout_s


def test_a_storm_of_trailing_junk_leaves_others_served(make_gateway, keys):
    gateway = make_gateway()
    alice = keys.headers("alice", ["analysts"])

    def junk(n: int) -> int:
        sql, params = TRAILING_JUNK[n % len(TRAILING_JUNK)]
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            body: dict[str, Any] = {"sql": sql, **({"params": params} if params else {})}
            return client.post("/v1/query", json=body, headers=alice).status_code

    with ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(junk, range(10)))
    assert all(400 <= s < 500 for s in statuses), statuses
    started = time.monotonic()
    answer = gateway.query("SELECT 1", keys.headers("bob", ["analysts"]))
    assert answer.status_code == 200 and answer.json()["rows"] == [[1]]
    assert time.monotonic() - started < 1.0
    assert gateway.client.get("/readyz").status_code == 200
    assert gateway.client.get("/healthz").status_code == 200


def test_a_call_past_its_deadline_is_cut_and_its_connection_replaced(postgres):
    """The executor alone, whatever the grammar check: the server holds the statement (as a
    wedged protocol would), the call returns at its deadline, and the connection it used is
    terminated (its backend goes) and replaced, never handed out again."""

    async def body() -> tuple[float, int, int, set[int]]:
        sessions = CleanSessions()
        pool = await asyncpg.create_pool(
            postgres.app_dsn, min_size=1, max_size=1,
            server_settings=connection_settings(3000), init=sessions.forget,
            reset=sessions.reset,
        )
        try:
            executor = Executor(pool, sessions, acquire_timeout_s=1.0)
            async with pool.acquire() as conn:
                before = conn.get_server_pid()
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(GatewayTimeout) as cut:
                await executor.run(executor.target("SELECT pg_sleep(10)"), [], SLEEP_FACTS,
                                   10, deadline=started + 0.5)
            took = loop.time() - started
            assert cut.value.code == "request_timeout" and cut.value.status == 504
            result = await executor.run(executor.target("SELECT 1 AS one"), [], ONE_FACTS,
                                        10)
            assert result.rows == [[1]]
            async with pool.acquire() as conn:
                after = conn.get_server_pid()
            # The old backend ends once its statement does (statement_timeout, 3 s): its
            # client is gone, so it exits instead of waiting for the next command.
            for _ in range(100):
                alive = await _backends(postgres.admin_dsn, [before])
                if not alive:
                    break
                await asyncio.sleep(0.1)
            return took, before, after, alive
        finally:
            await pool.close()

    took, before, after, alive = asyncio.run(body())
    assert 0.45 < took < 0.8, took
    assert after != before
    assert alive == set()


def test_waiting_for_a_connection_is_bounded(postgres):
    async def body() -> tuple[Unavailable, float]:
        pool = await asyncpg.create_pool(postgres.app_dsn, min_size=1, max_size=1,
                                         server_settings=connection_settings(3000))
        try:
            executor = Executor(pool, acquire_timeout_s=0.3)
            holder = asyncio.create_task(executor.run(
                executor.target("SELECT pg_sleep(1)"), [], SLEEP_FACTS, 10))
            await asyncio.sleep(0.2)
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(Unavailable) as refused:
                await executor.run(executor.target("SELECT 1 AS one"), [], ONE_FACTS, 10)
            took = loop.time() - started
            await holder  # the holder was not disturbed
            return refused.value, took
        finally:
            await pool.close()

    refused, took = asyncio.run(body())
    assert refused.code == "pool_exhausted" and refused.status == 503
    assert took < 0.6, took


def test_a_pool_held_past_its_deadlines_is_wedged(postgres):
    """What /healthz checks: every connection of a pool still open past its deadline (the
    watchdog failed, or could not run). Simulated with a watchdog whose timer is cancelled."""

    async def body() -> tuple[int, int]:
        pool = await asyncpg.create_pool(postgres.app_dsn, min_size=1, max_size=1)
        try:
            executor = Executor(pool)
            async with pool.acquire() as conn:
                loop = asyncio.get_running_loop()
                dog = _Watchdog(conn, loop.time() + 60)
                dog.cancel()
                executor._held[dog] = pool
                healthy = executor.wedged_pools()
                dog.deadline = loop.time() - 5
                wedged = executor.wedged_pools()
                del executor._held[dog]
            return healthy, wedged
        finally:
            await pool.close()

    assert asyncio.run(body()) == (0, 1)


def test_a_stream_past_its_deadline_ends_with_request_timeout(make_gateway, keys, tmp_path):
    gateway = make_gateway(statement_timeout_ms=2000, request_timeout_ms=2500,
                           stream_timeout_ms=3000, stream_batch_rows=50,
                           audit_spool_dir=str(tmp_path / "spool"))
    headers = {**keys.headers("alice", ["analysts"]), "accept": "application/x-ndjson"}
    # Every row costs eight scans of orders: the 6,000 take about twenty seconds to fetch on
    # the 2-core machine (one scan each was under three on a quiet one), each batch of 50
    # well within the statement timeout.
    sql = ("SELECT a.id, (SELECT count(*) FROM orders b JOIN customers c ON c.id <= 8 "
           "WHERE b.customer_id <> a.id) AS n FROM orders a")
    started = time.monotonic()
    with gateway.client.stream("POST", "/v1/query", json={"sql": sql}, headers=headers) as answer:
        assert answer.status_code == 200
        lines = [json.loads(line) for line in answer.iter_lines()]
    took = time.monotonic() - started
    last = lines[-1]
    assert last["complete"] is False and last["error"]["code"] == "request_timeout", last
    assert last["row_count"] == len(lines) - 2 > 0
    assert 2.9 < took < 4.5, took
    execution = audited(tmp_path / "spool", answer.headers["x-request-id"])[-1]["execution"]
    assert (execution["outcome"], execution["code"]) == ("error", "request_timeout")
    assert execution["rows_returned"] == last["row_count"] and execution["streamed"] is True
    assert gateway.query("SELECT 1", keys.headers("alice", ["analysts"])).status_code == 200


def _event_loop_of(gateway: Any) -> asyncio.AbstractEventLoop:
    loop: asyncio.AbstractEventLoop = gateway.server.servers[0].get_loop()
    return loop


def test_a_wedged_event_loop_fails_healthz(make_gateway):
    gateway = make_gateway(liveness_max_loop_lag_ms=500)  # reported for 2.5 s after
    assert gateway.client.get("/healthz").status_code == 200

    async def wedge() -> None:
        time.sleep(3)  # noqa: ASYNC251 - the point: a blocking call on the event loop

    blocked = asyncio.run_coroutine_threadsafe(wedge(), _event_loop_of(gateway))
    time.sleep(0.2)
    # What Kubernetes' probe sees while the loop is blocked: no answer within its timeout.
    with pytest.raises(httpx.TimeoutException):
        httpx.get(f"{gateway.url}/healthz", timeout=1.0)
    blocked.result(timeout=10)
    # And once it runs again: the stall is reported, so the probes right after fail too.
    after = gateway.client.get("/healthz")
    assert after.status_code == 503, after.text
    error = after.json()["error"]
    assert error["code"] == "not_live"
    assert "event loop" in error["checks"]["event_loop"]
    assert error["checks"]["database_pools"] == "ok"
    deadline = time.monotonic() + 10
    while gateway.client.get("/healthz").status_code != 200:
        assert time.monotonic() < deadline, "healthz did not recover"
        time.sleep(0.2)
    assert gateway.client.get("/readyz").status_code == 200


def test_shutdown_is_bounded_whatever_is_in_flight(serve_settings, keys, tmp_path):
    gateway = start_gateway(
        serve_settings | {"statement_timeout_ms": "8000", "shutdown_timeout_ms": "1000",
                          "audit_drain_timeout_s": "1"},
        tmp_path / "gateway.log",
    )
    alice = keys.headers("alice", ["analysts"])
    outcomes: list[str] = []

    def slow() -> None:
        try:
            with httpx.Client(base_url=gateway.url, timeout=60) as client:
                outcomes.append(str(client.post(
                    "/v1/query", json={"sql": "SELECT count(*) FROM orders a, orders b, orders c"},
                    headers=alice).status_code))
        except httpx.HTTPError as exc:
            outcomes.append(type(exc).__name__)

    def stalled_stream() -> None:
        # Reads the header, then stops reading: its send will wait on a full socket.
        try:
            with httpx.Client(base_url=gateway.url, timeout=60) as client, client.stream(
                "POST", "/v1/query", headers={**alice, "accept": "application/x-ndjson"},
                json={"sql": "SELECT repeat('x', 100000) FROM orders"},
            ) as response:
                next(response.iter_bytes())
                time.sleep(30)
        except httpx.HTTPError as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=slow, daemon=True) for _ in range(3)]
    threads.append(threading.Thread(target=stalled_stream, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # all four in flight
    started = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    try:
        gateway.process.wait(timeout=20)
    finally:
        gateway.stop()
    took = time.monotonic() - started
    print(f"\nshutdown with 3 slow statements and a stalled stream in flight: {took:.1f} s")
    assert took < 10, took
    assert gateway.process.returncode is not None
