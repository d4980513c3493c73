"""The wire protocol's rules that real clients depend on (issue 17), checked with psycopg and
asyncpg and, where a client would hide it, with the gateway's own protocol codec on a raw
socket: pipelining, errors until Sync, transactions, the blast radius, approvals, limits.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

from app.devstack import free_port
from app.pgwire import messages as m

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg(make_gateway, tmp_path_factory) -> Iterator[Any]:
    spool = tmp_path_factory.mktemp("pgwire-protocol-spool")
    yield make_gateway(pg_port=free_port(), dev_mode=True, audit_spool_dir=str(spool),
                       pg_idle_in_transaction_timeout_s=3)


def connect(pg: Any, token: str, user: str, **options: Any) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=pg.settings.pg_port, dbname="appdb",
                           user=user, password=token, sslmode="disable", **options)


def trail(pg: Any, sub: str, count: int) -> list[dict[str, Any]]:
    """The audit events of one subject, once the file sink (audit.jsonl) has ``count``."""
    path = Path(pg.settings.audit_spool_dir) / "audit.jsonl"
    mine: list[dict[str, Any]] = []
    for _ in range(200):
        lines = path.read_text().splitlines() if path.exists() else []
        mine = [e for e in map(json.loads, lines) if (e.get("identity") or {}).get("sub") == sub]
        if len(mine) >= count:
            return mine
        time.sleep(0.05)
    raise AssertionError(mine)


class Raw:
    """A client on a bare socket: the gateway's codec, its frontend encoders, nothing else."""

    def __init__(self, pg: Any, token: str, user: str, **params: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", pg.settings.pg_port), timeout=10)
        self.buf = b""
        self.send(m.startup({"user": user, "database": "appdb", **params}))
        kind, _ = self.recv()
        assert kind == "R"
        self.send(m.password(token))
        self.until("Z")

    def send(self, *frames: bytes) -> None:
        self.sock.sendall(b"".join(frames))

    def recv(self) -> tuple[str, bytes]:
        while len(self.buf) < 5 or len(self.buf) < 1 + struct.unpack_from("!I", self.buf, 1)[0]:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed; buffered {self.buf!r}")
            self.buf += chunk
        length = struct.unpack_from("!I", self.buf, 1)[0]
        kind, payload = chr(self.buf[0]), self.buf[5:1 + length]
        self.buf = self.buf[1 + length:]
        return kind, payload

    def until(self, last: str) -> list[tuple[str, bytes]]:
        out = []
        while True:
            kind, payload = self.recv()
            out.append((kind, payload))
            if kind == last:
                return out

    def close(self) -> None:
        with_suppress(lambda: self.sock.sendall(m.terminate()))
        self.sock.close()


def with_suppress(call: Any) -> None:
    try:
        call()
    except OSError:
        pass


def kinds(messages: list[tuple[str, bytes]]) -> str:
    return "".join(k for k, _ in messages)


def sqlstate(payload: bytes) -> str:
    return m.parse_error_fields(payload)["C"]


@pytest.fixture
def alice(keys) -> str:
    return keys.token("alice", ["analysts"])


@pytest.fixture
def writer(keys) -> str:
    return keys.token("wendy", ["dba"])


# --- the extended protocol ------------------------------------------------------------------


def test_pipelined_parse_bind_execute_with_a_row_limit_suspends_the_portal(pg, alice):
    raw = Raw(pg, alice, "alice")
    try:
        raw.send(
            m.parse("s1", "SELECT id FROM customers WHERE id <= $1 ORDER BY id"),
            m.bind("p1", "s1", (0,), (b"5",), ()),
            m.describe("P", "p1"),
            m.execute("p1", 2),
            m.execute("p1", 2),
            m.execute("p1", 0),
            m.sync(),
        )
        out = raw.until("Z")
        assert kinds(out) == "12TDDsDDsDCZ", kinds(out)
        ids = [m.parse_data_row(p)[0] for k, p in out if k == "D"]
        assert ids == [b"1", b"2", b"3", b"4", b"5"]
        assert m.parse_command_complete(out[-2][1]) == "SELECT 1"
        assert out[-1][1] == b"I"
    finally:
        raw.close()


def test_after_an_error_everything_until_sync_is_discarded(pg, alice, db):
    raw = Raw(pg, alice, "alice")
    try:
        raw.send(
            m.parse("", "SELECT no_such_column FROM customers"),
            m.bind("", "", (), (), ()),
            m.execute("", 0),
            m.parse("", "SELECT 1"),
            m.bind("", "", (), (), ()),
            m.execute("", 0),
            m.sync(),
            m.query("SELECT count(*) FROM orders"),
        )
        first = raw.until("Z")
        assert kinds(first) == "EZ", kinds(first)
        second = raw.until("Z")
        assert kinds(second) == "TDCZ", kinds(second)
    finally:
        raw.close()


def test_named_statements_stay_valid_across_pooled_connections(pg, alice, keys):
    """Each Bind parses the governed text anew on whichever connection serves it: a named
    statement keeps working while other sessions take the pool's connections in between."""
    token_b = keys.token("bob", ["analysts"])

    async def run() -> list[int]:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.settings.pg_port, user="alice",
                                     password=alice, database="appdb", ssl=False)
        other = await asyncpg.connect(host="127.0.0.1", port=pg.settings.pg_port, user="bob",
                                      password=token_b, database="appdb", ssl=False)
        try:
            statement = await conn.prepare("SELECT id FROM customers WHERE id = $1")
            out = []
            for key in range(1, 6):
                await other.fetch("SELECT id FROM customers WHERE id = $1", key)
                out.append(await statement.fetchval(key))
            return out
        finally:
            await conn.close()
            await other.close()

    assert asyncio.run(run()) == [1, 2, 3, 4, 5]


# --- the simple protocol --------------------------------------------------------------------


def test_several_statements_in_one_query_none_runs_if_one_is_refused(pg, keys, db):
    before = db.fetchval("SELECT status FROM orders WHERE id = 1")
    raw = Raw(pg, keys.token("batcher", ["dba"]), "batcher")
    try:
        raw.send(m.query("UPDATE orders SET status = 'pgwire-batch' WHERE id = 1; DROP TABLE orders"))
        out = raw.until("Z")
        assert kinds(out) == "EZ", kinds(out)
        error = m.parse_error_fields(out[0][1])
        assert error["C"] == "42501"
        assert "policy_denied" in error["M"]
    finally:
        raw.close()
    assert db.fetchval("SELECT status FROM orders WHERE id = 1") == before
    assert db.table_exists("orders")
    batch = trail(pg, "batcher", 5)  # session start, allow, deny, batch_refused, end
    outcomes = [(e["type"], (e.get("decision") or {}).get("outcome"),
                 (e.get("execution") or {}).get("code")) for e in batch if e["type"] != "session"]
    # The UPDATE allowed and on record as not run; the DROP denied; nothing executed.
    assert ("execution", None, "batch_refused") in outcomes, outcomes
    assert any(t == "decision" and o == "deny" for t, o, _ in outcomes), outcomes


def test_several_statements_run_in_one_transaction(pg, writer, db):
    raw = Raw(pg, writer, "wendy")
    try:
        raw.send(m.query("UPDATE orders SET status = 'pgwire-two' WHERE id = 2; "
                         "SELECT status FROM orders WHERE id = 2"))
        out = raw.until("Z")
        assert kinds(out) == "CTDCZ", kinds(out)
        assert m.parse_data_row(out[2][1]) == [b"pgwire-two"]
        assert out[-1][1] == b"I"
    finally:
        raw.close()
    assert db.fetchval("SELECT status FROM orders WHERE id = 2") == "pgwire-two"


# --- transactions ---------------------------------------------------------------------------


def test_a_refusal_in_a_transaction_aborts_it_and_commit_applies_nothing(pg, writer, db):
    db.execute("UPDATE orders SET status = 'before-tx' WHERE id = 3")
    with connect(pg, writer, "wendy") as conn:
        conn.execute("UPDATE orders SET status = 'half-tx' WHERE id = 3")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE orders")
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1 FROM orders WHERE id = 3")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.commit()  # answered ROLLBACK
    assert db.fetchval("SELECT status FROM orders WHERE id = 3") == "before-tx"


def test_begin_commit_and_savepoints_with_the_status_they_give(pg, writer, db):
    raw = Raw(pg, writer, "wendy")
    try:
        raw.send(m.query("BEGIN"))
        assert raw.until("Z")[-1][1] == b"T"
        raw.send(m.query("SAVEPOINT a"))
        assert raw.until("Z")[-1][1] == b"T"
        raw.send(m.query("UPDATE orders SET status = 'sp-kept' WHERE id = 4"))
        assert raw.until("Z")[-1][1] == b"T"
        raw.send(m.query("SAVEPOINT b"))
        raw.until("Z")
        raw.send(m.query("UPDATE orders SET status = 'sp-undone' WHERE id = 4"))
        raw.until("Z")
        raw.send(m.query("ROLLBACK TO SAVEPOINT b"))
        assert raw.until("Z")[-1][1] == b"T"
        raw.send(m.query("COMMIT"))
        out = raw.until("Z")
        assert m.parse_command_complete(out[0][1]) == "COMMIT"
        assert out[-1][1] == b"I"
    finally:
        raw.close()
    assert db.fetchval("SELECT status FROM orders WHERE id = 4") == "sp-kept"


def test_writes_after_a_session_set_in_a_transaction_and_in_autocommit(pg, writer, db):
    """The session's SETs are replayed on the connection a write takes, inside its BEGIN: a
    SET before BEGIN READ WRITE in one Query is a query of its implicit transaction, after
    which PostgreSQL refuses to change the mode (25001). pgjdbc sends DateStyle, TimeZone and
    extra_float_digits at startup, so every write of a JDBC client met it."""
    with connect(pg, writer, "wendy", autocommit=True) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        with conn.transaction():
            conn.execute("UPDATE orders SET status = 'set-tx' WHERE id = 5")
            assert conn.execute("SHOW TimeZone").fetchone() == ("UTC",)
        conn.execute("UPDATE orders SET status = 'set-auto' WHERE id = 6")
    assert db.fetchval("SELECT status FROM orders WHERE id = 5") == "set-tx"
    assert db.fetchval("SELECT status FROM orders WHERE id = 6") == "set-auto"


def test_the_blast_radius_rolls_back_inside_a_transaction_too(pg, writer, db):
    before = db.fetchval("SELECT count(*) FROM orders WHERE status = 'blast'")
    with connect(pg, writer, "wendy") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
            conn.execute("UPDATE orders SET status = 'blast' WHERE id <= 1500")
        assert "blast_radius_exceeded" in str(caught.value)
        conn.rollback()
    assert db.fetchval("SELECT count(*) FROM orders WHERE status = 'blast'") == before


def test_an_autocommit_write_over_the_blast_radius_is_rolled_back(pg, writer, db):
    with connect(pg, writer, "wendy", autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
            conn.execute("UPDATE orders SET status = 'blast2' WHERE id <= 1500")
        assert "blast_radius_exceeded" in str(caught.value)
        assert conn.execute("SELECT count(*) FROM orders WHERE status = 'blast2'").fetchone() == (0,)


def test_an_idle_transaction_is_ended_by_its_timeout(pg, writer):
    raw = Raw(pg, writer, "wendy")
    try:
        raw.send(m.query("BEGIN"))
        raw.until("Z")
        raw.send(m.query("SELECT 1 FROM orders WHERE id = 1"))
        raw.until("Z")
        kind, payload = raw.recv()  # after pg_idle_in_transaction_timeout_s
        assert kind == "E" and sqlstate(payload) == "25P03"
    finally:
        raw.close()


# --- session settings -----------------------------------------------------------------------


def test_set_show_reset_of_allowed_parameters_and_refusal_of_others(pg, alice):
    with connect(pg, alice, "alice", autocommit=True) as conn:
        conn.execute("SET DateStyle = 'German'")
        assert conn.execute("SHOW DateStyle").fetchone()[0].startswith("German")
        created = conn.execute("SELECT created_at::date::text FROM customers WHERE id = 1").fetchone()
        assert "." in created[0]  # German style applies on the connection the read took
        conn.execute("RESET DateStyle")
        assert conn.execute("SHOW DateStyle").fetchone()[0].startswith("ISO")
        conn.execute("SET statement_timeout = '1s'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SET statement_timeout = 0")
        for forbidden in ("SET search_path = pg_temp", "SET role = postgres",
                          "SET session_authorization = postgres", "SHOW ALL"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(forbidden)


def test_startup_options_are_never_forwarded(pg, alice):
    sock = socket.create_connection(("127.0.0.1", pg.settings.pg_port), timeout=10)
    raw = Raw.__new__(Raw)
    raw.sock, raw.buf = sock, b""
    try:
        raw.send(m.startup({"user": "alice", "database": "appdb",
                            "options": "-c role=postgres -c search_path=pg_temp",
                            "search_path": "pg_temp"}))
        assert raw.recv()[0] == "R"
        raw.send(m.password(alice))
        welcome = raw.until("Z")
        warnings = [m.parse_error_fields(p)["M"] for k, p in welcome if k == "N"]
        assert any("options" in w and "search_path" in w for w in warnings), welcome
        raw.send(m.query("SHOW search_path"))
        out = raw.until("Z")
        assert [m.parse_data_row(p)[0] for k, p in out if k == "D"] == [b"public"]
        raw.send(m.query("SELECT email FROM customers WHERE id = 1"))
        out = raw.until("Z")
        email = next(m.parse_data_row(p)[0] for k, p in out if k == "D")
        assert b"@" not in email or b"*" in email, email
    finally:
        raw.close()


# --- approvals ------------------------------------------------------------------------------


def test_an_approval_required_statement_names_its_approval_in_the_hint(pg, keys):
    dana = keys.token("dana", ["dba"])
    raw = Raw(pg, dana, "dana")
    try:
        raw.send(m.query("UPDATE customers SET full_name = 'X' WHERE id = 9"))
        out = raw.until("Z")
        assert kinds(out) == "EZ", kinds(out)
        error = m.parse_error_fields(out[0][1])
        assert error["C"] == "QG001", error
        assert "SET querygate.approval" in error["H"], error
    finally:
        raw.close()


# --- limits and bad input -------------------------------------------------------------------


def test_bad_input_closes_that_connection_and_the_others_keep_serving(pg, alice):
    good = Raw(pg, alice, "alice")
    try:
        for garbage in (b"\x00\x00\x00\x03", struct.pack("!I", 1 << 30) + b"x" * 16,
                        struct.pack("!II", 8, 1234)):
            sock = socket.create_connection(("127.0.0.1", pg.settings.pg_port), timeout=10)
            sock.sendall(garbage)
            data = sock.recv(4096)
            assert data[:1] in (b"E", b""), data
            sock.close()
        bad = Raw(pg, alice, "alice")
        bad.send(b"Q" + struct.pack("!I", (64 << 20) + 4))  # over the message limit
        kind, payload = bad.recv()
        assert kind == "E" and sqlstate(payload) == "08P01"
        bad.sock.close()
        good.send(m.query("SELECT 1 FROM customers WHERE id = 1"))
        assert kinds(good.until("Z")) == "TDCZ"
    finally:
        good.close()


def test_a_long_token_password_up_to_the_stated_limit(pg, keys):
    # QUERYGATE_MAX_TOKEN_BYTES (8192), as over HTTP: far beyond libpq's 1000-byte default.
    token = keys.token("alice", ["analysts"], padding="x" * 5000)
    assert 7000 < len(token) <= 8192
    with connect(pg, token, "alice") as conn:
        assert conn.execute("SELECT 1 FROM customers WHERE id = 1").fetchone() == (1,)
    too_long = keys.token("alice", ["analysts"], padding="x" * 9000)
    with pytest.raises(psycopg.OperationalError):
        connect(pg, too_long, "alice")


def test_gssenc_is_refused_cleanly(pg, alice):
    sock = socket.create_connection(("127.0.0.1", pg.settings.pg_port), timeout=10)
    try:
        sock.sendall(m.gssenc_request())
        assert sock.recv(1) == b"N"
    finally:
        sock.close()


def test_cancel_request_cancels_the_running_statement(pg, alice):
    async def run() -> str:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.settings.pg_port, user="alice",
                                     password=alice, database="appdb", ssl=False)
        try:
            task = asyncio.create_task(conn.fetch(
                "SELECT count(*) FROM customers a, customers b, customers c, customers d"))
            await asyncio.sleep(0.5)
            task.cancel()  # asyncpg sends a CancelRequest on its own connection
            try:
                await task
            except asyncio.CancelledError:
                pass
            return str(await conn.fetchval("SELECT 1 FROM customers WHERE id = 1"))
        finally:
            await conn.close()

    assert asyncio.run(run()) == "1"


def test_every_statement_and_the_session_are_on_record(pg, keys):
    token = keys.token("auditee", ["analysts"])
    with connect(pg, token, "auditee", autocommit=True, application_name="auditor-test") as conn:
        conn.execute("SELECT id FROM customers WHERE id = 7").fetchall()
    mine = trail(pg, "auditee", 4)
    assert [e["type"] for e in mine] == ["session", "decision", "execution", "session"], mine
    assert [e["session"]["step"] for e in (mine[0], mine[-1])] == ["start", "end"]
    assert mine[-1]["session"]["statements"] == 1
    assert len({e["request"]["path"] for e in mine}) == 1
    for event in mine:
        assert event["request"]["channel"] == "pgwire"
        assert event["request"]["path"].startswith("pg-")
        assert event["request"]["source_ip"] == "127.0.0.1"
        assert event["request"]["application_name"] == "auditor-test"


def test_deallocate_and_discard_all(pg, alice):
    raw = Raw(pg, alice, "alice")
    try:
        raw.send(m.parse("s1", "SELECT id FROM customers WHERE id = $1"), m.sync())
        assert kinds(raw.until("Z")) == "1Z"
        raw.send(m.query("DEALLOCATE s1"))
        assert kinds(raw.until("Z")) == "CZ"
        raw.send(m.bind("", "s1", (0,), (b"1",), ()), m.sync())
        out = raw.until("Z")
        assert kinds(out) == "EZ" and sqlstate(out[0][1]) == "26000"
        raw.send(m.parse("s2", "SELECT 1"), m.query("SET DateStyle = 'German'"))
        raw.until("Z")
        raw.send(m.query("DISCARD ALL"))
        raw.until("Z")
        raw.send(m.query("SHOW DateStyle"))
        assert not m.parse_data_row(raw.until("Z")[1][1])[0].startswith(b"German")
    finally:
        raw.close()


def test_a_batch_longer_than_the_concurrency_cap_runs(make_gateway, keys):
    """Statements of one Query run one after the other: the caller's cap of concurrent
    statements (4 by default) holds for the session, not for each statement of a batch."""
    gateway = make_gateway(pg_port=free_port(), dev_mode=True, max_concurrent_per_identity=2)
    raw = Raw(gateway, keys.token("alice", ["analysts"]), "alice")
    try:
        raw.send(m.query("; ".join(f"SELECT id FROM customers WHERE id = {i}" for i in range(1, 6))))
        out = raw.until("Z")
        assert kinds(out) == "TDC" * 5 + "Z", kinds(out)
    finally:
        raw.close()
