"""A security review of the wire protocol front end: each test is an attack by a caller with
bad intentions, and what the gateway must answer (docs/pgwire.md, DESIGN.md's threat model).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from app.devstack import free_port
from app.pgwire import messages as m
from tests.integration.test_pgwire_protocol import Raw, kinds, sqlstate

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg(make_gateway, tmp_path_factory) -> Iterator[Any]:
    spool = tmp_path_factory.mktemp("pgwire-attacks-spool")
    yield make_gateway(pg_port=free_port(), dev_mode=True, audit_spool_dir=str(spool),
                       pg_idle_in_transaction_timeout_s=2)


@pytest.fixture(scope="module")
def slow(make_gateway, tmp_path_factory) -> Iterator[Any]:
    """A gateway whose callers may send two requests a second beyond a burst of three."""
    spool = tmp_path_factory.mktemp("pgwire-attacks-rate-spool")
    yield make_gateway(pg_port=free_port(), dev_mode=True, audit_spool_dir=str(spool),
                       rate_limit_per_s=2.0, rate_limit_burst=3)


def events(pg: Any, sub: str) -> list[dict[str, Any]]:
    path = Path(pg.settings.audit_spool_dir) / "audit.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if (e.get("identity") or {}).get("sub") == sub]


def connect(pg: Any, token: str, user: str, **options: Any) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=pg.settings.pg_port, dbname="appdb",
                           user=user, password=token, sslmode="disable", **options)


def errors(out: list[tuple[str, bytes]]) -> list[str]:
    return [sqlstate(p) for k, p in out if k == "E"]


# --- transactions ------------------------------------------------------------------------------


def test_a_portal_of_a_committed_transaction_is_an_error_not_an_internal_failure(pg, keys):
    """Bind a portal in a transaction, COMMIT it with a simple Query, then Execute the portal:
    PostgreSQL answers 34000 (the portal died with its transaction) and the session goes on.
    The gateway kept the portal (only Sync outside a transaction clears them) and its
    Execute reached ``_relay`` with no connection: an AssertionError, FATAL XX000."""
    raw = Raw(pg, keys.token("alice", ["analysts"]), "alice")
    try:
        raw.send(m.query("BEGIN"))
        raw.until("Z")
        raw.send(m.parse("", "SELECT id FROM customers ORDER BY id"),
                 m.bind("p", "", (), (), ()), m.execute("p", 1), m.sync())
        assert raw.until("Z")[-1][1] == b"T"
        raw.send(m.query("COMMIT"))
        assert raw.until("Z")[-1][1] == b"I"
        raw.send(m.execute("p", 1), m.sync())
        out = raw.until("Z")
        assert errors(out) == ["34000"], out
        raw.send(m.query("SELECT 1 FROM customers WHERE id = 1"))
        assert kinds(raw.until("Z")) == "TDCZ"
    finally:
        raw.close()


def test_rollback_to_a_savepoint_cannot_clear_a_gateway_refusal(pg, keys, db):
    """After a refusal only ROLLBACK ends the transaction (docs/pgwire.md): COMMIT never
    applies half of it. Parse and Describe were still served in the aborted transaction, and
    a Describe whose text PostgreSQL fails puts the connection in its own error state; then
    ROLLBACK TO SAVEPOINT is forwarded, clears the abort, and COMMIT applies the statements
    before the refused one."""
    db.execute("UPDATE orders SET status = 'before-review' WHERE id = 7")
    raw = Raw(pg, keys.token("wendy", ["dba"]), "wendy")
    try:
        raw.send(m.query("BEGIN"))
        raw.until("Z")
        raw.send(m.query("UPDATE orders SET status = 'half-applied' WHERE id = 7"))
        raw.until("Z")
        raw.send(m.query("SAVEPOINT s"))
        raw.until("Z")
        raw.send(m.query("DROP TABLE orders"))  # refused by the gateway
        out = raw.until("Z")
        assert errors(out) == ["42501"] and out[-1][1] == b"E", out
        # PostgreSQL fails this at Parse ('x' is no integer): its own error, on the connection.
        raw.send(m.parse("bad", "SELECT id + 'x' FROM orders"), m.describe("S", "bad"),
                 m.sync())
        raw.until("Z")
        raw.send(m.query("ROLLBACK TO SAVEPOINT s"))
        raw.until("Z")
        raw.send(m.query("COMMIT"))
        raw.until("Z")
    finally:
        raw.close()
    assert db.fetchval("SELECT status FROM orders WHERE id = 7") == "before-review"


def aborted(pg: Any, keys: Any) -> Raw:
    """alice's session in a transaction a gateway refusal aborted (status E)."""
    raw = Raw(pg, keys.token("alice", ["analysts"]), "alice")
    raw.send(m.query("BEGIN"))
    raw.until("Z")
    raw.send(m.query("SELECT * FROM pg_catalog.pg_authid"))
    assert raw.until("Z")[-1][1] == b"E"
    return raw


def test_parse_and_describe_in_an_aborted_transaction_are_refused(pg, keys):
    """PostgreSQL answers every message but ROLLBACK with 25P02 in an aborted transaction;
    the gateway parsed, decided (an `explain` on record) and described on the connection."""
    raw = aborted(pg, keys)
    try:
        raw.send(m.parse("q", "SELECT email FROM customers"), m.describe("S", "q"), m.sync())
        out = raw.until("Z")
        assert errors(out) == ["25P02"], kinds(out)
        raw.send(m.query("ROLLBACK"))
        raw.until("Z")
    finally:
        raw.close()


# --- starving others ---------------------------------------------------------------------------


def test_a_client_that_stops_reading_cannot_hold_a_transaction_past_its_timeout(pg, keys):
    """QUERYGATE_PG_IDLE_IN_TRANSACTION_TIMEOUT_S bounds only the wait for the next message.
    A client in a transaction that pipelines queries and never reads their answers leaves the
    session blocked in ``writer.drain()`` (no timeout there), holding a pooled connection of
    its profile for as long as it likes: twenty such sessions of one caller (the per-identity
    limit) take a profile's pool from everyone else who shares it."""
    token = keys.token("wendy", ["dba"])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", pg.settings.pg_port))
    raw = Raw.__new__(Raw)
    raw.sock, raw.buf = sock, b""
    raw.send(m.startup({"user": "wendy", "database": "appdb"}))
    assert raw.recv()[0] == "R"
    raw.send(m.password(token))
    raw.until("Z")
    try:
        raw.send(m.query("BEGIN"))
        raw.until("Z")
        count = 120
        raw.send(*[m.query("SELECT repeat('x', 200000) FROM orders WHERE id = 1")] * count)
        time.sleep(pg.settings.pg_idle_in_transaction_timeout_s * 4)
        completed, ended = 0, False
        try:
            while completed < count:
                kind, _ = raw.recv()
                if kind == "C":
                    completed += 1
                if kind == "E":
                    ended = True
                    break
        except (EOFError, OSError):
            ended = True
        # The session should have been ended, not served in full once the client came back.
        assert ended, f"all {completed} answers served after a stall of 4 timeouts"
    finally:
        raw.close()


def test_parse_is_rate_limited_like_every_other_request(slow, keys):
    """Each Parse runs the extractor (sqlglot, on the event loop) and an unknown column is a
    durable audit refusal, but Parse never passes ``pipeline.admit``: a caller over its rate
    keeps the gateway parsing and the audit spool writing as fast as it can send."""
    raw = Raw(slow, keys.token("alice", ["analysts"]), "alice")
    try:
        frames = []
        for i in range(40):
            frames += [m.parse("", f"SELECT nope_{i} FROM customers"), m.sync()]
        raw.send(*frames)
        states = []
        for _ in range(40):
            states += errors(raw.until("Z"))
        assert "53400" in states, states  # rate_limited
    finally:
        raw.close()


# --- the audit ---------------------------------------------------------------------------------


def test_a_refused_set_role_is_on_record(pg, keys):
    """A caller trying to change role, session authorization or search path is refused with
    42501 setting_not_allowed, and nothing of it reaches the audit trail: on HTTP the same
    statement is a deny decision on record."""
    raw = Raw(pg, keys.token("setter", ["analysts"]), "setter")
    try:
        for text in ("SET role = postgres", "SET search_path = public",
                     "SET session_authorization = postgres"):
            raw.send(m.query(text))
            out = raw.until("Z")
            assert errors(out) == ["42501"], out
    finally:
        raw.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        mine = events(pg, "setter")
        if any(e["type"] == "session" and e["session"]["step"] == "end" for e in mine):
            break
        time.sleep(0.05)
    recorded = [e for e in mine if "setting_not_allowed" in json.dumps(e)]
    assert len(recorded) >= 3, [e["type"] for e in mine]


def test_rollback_is_still_parsed_in_an_aborted_transaction(pg, keys):
    """What the fix of Parse in an aborted transaction must keep: ROLLBACK by the extended
    protocol (asyncpg, JDBC) ends it."""
    raw = aborted(pg, keys)
    try:
        raw.send(m.parse("", "ROLLBACK"), m.bind("", "", (), (), ()), m.execute("", 0),
                 m.sync())
        out = raw.until("Z")
        assert not errors(out) and out[-1][1] == b"I", out
    finally:
        raw.close()


# --- connections that never authenticate, a database that stops answering -------------------


@pytest.fixture(scope="module")
def guarded(make_gateway, tmp_path_factory) -> Iterator[Any]:
    """Two startups at once at most; a message is answered within ~2.5 s (the statement
    timeout plus a second, plus the dispatch's second)."""
    spool = tmp_path_factory.mktemp("pgwire-attacks-guarded-spool")
    yield make_gateway(pg_port=free_port(), dev_mode=True, audit_spool_dir=str(spool),
                       pg_max_startups=2, pg_startup_timeout_ms=20_000,
                       statement_timeout_ms=500, stream_timeout_ms=1000)


def test_connections_that_never_authenticate_cannot_starve_the_others(guarded, keys):
    """A slowloris: connections that send nothing wait out the startup timeout. Past
    QUERYGATE_PG_MAX_STARTUPS the next one is refused at once (53300), and once one of them
    goes, a real client connects while the other still hangs."""
    port = guarded.settings.pg_port
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    try:
        time.sleep(0.3)  # both are in their startup
        third = socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            third.sendall(m.startup({"user": "alice", "database": "appdb"}))
            answer = third.recv(4096)
        finally:
            third.close()
        assert answer[:1] == b"E" and b"53300" in answer and b"MAX_STARTUPS" in answer, answer
        silent.pop().close()
        time.sleep(0.3)
        with connect(guarded, keys.token("alice", ["analysts"]), "alice") as conn:
            assert conn.execute("SELECT 1 FROM orders LIMIT 1").fetchone() == (1,)
    finally:
        for sock in silent:
            sock.close()


def test_a_database_that_stops_answering_is_a_timeout_not_a_hang(guarded, keys):
    """The PostgreSQL backend serving a transaction is stopped (SIGSTOP): COMMIT, which has
    no statement deadline of its own on the gateway side, is answered 57014 request_timeout
    within the stream deadline, the connection is dropped, and the session goes on."""
    raw = Raw(guarded, keys.token("alice", ["analysts"]), "alice")
    pid = None
    try:
        raw.send(m.query("BEGIN"))
        raw.until("Z")
        raw.send(m.query("SELECT pg_backend_pid()"))
        out = raw.until("Z")
        (row,) = [p for k, p in out if k == "D"]
        pid = int(row[6:].decode())  # one column: count (2), length (4), the text
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        raw.send(m.query("COMMIT"))
        out = raw.until("Z")
        waited = time.monotonic() - started
        assert errors(out) == ["57014"], out
        assert b"request_timeout" in b"".join(p for _, p in out), out
        assert 1.0 < waited < 6.0, waited
        raw.send(m.query("SELECT 1 FROM orders LIMIT 1"))
        out = raw.until("Z")
        assert not errors(out) and [p for k, p in out if k == "D"], out
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGCONT)
        raw.close()


def test_a_cancelled_connection_never_serves_another_session(pg, keys, db):
    """A CancelRequest travels on a connection of its own and reaches PostgreSQL some time
    later; had the session's connection gone back to the pool meanwhile, it would cancel
    another session's statement there. A connection a cancel was asked for is dropped when
    its session lets it go, never pooled."""
    with connect(pg, keys.token("alice", ["analysts"]), "alice") as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]  # in a transaction
        conn.cancel_safe()  # nothing runs: PostgreSQL ignores it
        conn.commit()       # the session lets its connection go
        deadline = time.monotonic() + 5
        while db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
            assert time.monotonic() < deadline, "the cancelled connection went back to the pool"
            time.sleep(0.05)
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] != pid


# --- rows and the audit trail ------------------------------------------------------------------


@pytest.mark.parametrize("max_rows", [1, 0])
def test_no_row_reaches_the_client_before_its_decision_is_durable(
    make_gateway, tmp_path, keys, max_rows
):
    """A read runs while its decision is written; its rows wait for it. When the spool cannot
    write it, the client gets audit_unavailable and no row: neither rows an Execute with a
    row limit left suspended (max_rows=1), nor rows already gathered for a CommandComplete
    whose outcome could not be recorded (max_rows=0)."""
    from tests.integration.test_audit import SlowSpool

    gateway = make_gateway(pg_port=free_port(), dev_mode=True,
                           audit_spool_dir=str(tmp_path / "spool"))
    raw = Raw(gateway, keys.token("alice", ["analysts"]), "alice")
    try:
        slow = SlowSpool(gateway, delay=0.05)
        slow.failing = True
        raw.send(m.parse("", "SELECT id, email FROM customers ORDER BY id", ()),
                 m.bind("", "", (), (), ()), m.describe("P", ""), m.execute("", max_rows),
                 m.sync())
        out = raw.until("Z")
        assert "D" not in kinds(out), out
        assert b"audit_unavailable" in b"".join(p for _, p in out), out
        assert errors(out) == ["58030"], out
    finally:
        raw.close()


@pytest.mark.parametrize("in_transaction", [False, True])
def test_returning_rows_of_a_write_the_blast_radius_rolled_back_never_reach_the_client(
    pg, keys, db, in_transaction
):
    """A write's RETURNING rows are relayed as PostgreSQL sends them, and flushed every
    256 KiB once the decision is durable; the blast radius is checked at CommandComplete.
    A failing portal withdrew only what was gathered before its first flush, so the rows of
    a write it rolled back reached the client in full chunks, then the 42501."""
    before = db.fetchval("SELECT count(*) FROM orders WHERE status = 'blast-returning'")
    raw = Raw(pg, keys.token("wendy", ["dba"]), "wendy")
    try:
        if in_transaction:
            raw.send(m.query("BEGIN READ WRITE"))
            raw.until("Z")
        raw.send(m.query("UPDATE orders SET status = 'blast-returning' WHERE id <= 1500 "
                         "RETURNING id, repeat(status, 100) AS padding"))
        out = raw.until("Z")
        assert errors(out) == ["42501"], [k for k, _ in out][:5]
        assert b"blast_radius_exceeded" in b"".join(p for k, p in out if k == "E")
        assert "D" not in kinds(out), f"{kinds(out).count('D')} rows of a rolled back write"
        if in_transaction:
            raw.send(m.query("ROLLBACK"))
            raw.until("Z")
    finally:
        raw.close()
    assert db.fetchval("SELECT count(*) FROM orders WHERE status = 'blast-returning'") == before


@pytest.mark.parametrize("in_transaction", [False, True])
def test_a_write_suspended_by_a_row_limit_cannot_commit_past_the_blast_radius(
    pg, keys, db, in_transaction
):
    """PostgreSQL runs a write with RETURNING to its end at its first Execute and hands its
    rows out in chunks; the gateway checks the blast radius at CommandComplete. An Execute
    with a row limit, then a Sync, ended the portal suspended: the check never ran, and the
    1500 rows (limit 1000) were committed. Such an Execute of a write is refused now."""
    before = db.fetchval("SELECT count(*) FROM orders WHERE status = 'blast-suspended'")
    raw = Raw(pg, keys.token("wendy", ["dba"]), "wendy")
    try:
        if in_transaction:
            raw.send(m.query("BEGIN READ WRITE"))
            raw.until("Z")
        raw.send(m.parse("", "UPDATE orders SET status = 'blast-suspended' WHERE id <= 1500 "
                         "RETURNING id", ()),
                 m.bind("", "", (), (), ()), m.execute("", 1), m.sync())
        out = raw.until("Z")
        assert errors(out) == ["42501"] and "D" not in kinds(out), kinds(out)
        if in_transaction:
            raw.send(m.query("COMMIT"))
            raw.until("Z")
    finally:
        raw.close()
    after = db.fetchval("SELECT count(*) FROM orders WHERE status = 'blast-suspended'")
    assert after == before, f"{after - before} rows changed; the client saw {kinds(out)}"
