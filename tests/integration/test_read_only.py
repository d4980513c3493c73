"""A reader cannot write, even by smuggling a write into a read."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from app.errors import Forbidden
from app.executor import CleanSessions, Executor, connection_settings
from app.facts import Output, QueryFacts

pytestmark = pytest.mark.integration

SMUGGLED = [
    # A data-modifying CTE looks like a SELECT at the top.
    "WITH gone AS (DELETE FROM orders WHERE id = 31 RETURNING id) SELECT id FROM gone",
    "WITH up AS (UPDATE orders SET status = 'x' WHERE id = 31 RETURNING id) SELECT 1",
    "WITH ins AS (INSERT INTO orders VALUES (999999, 1, 1, 'x', now()) RETURNING id) "
    "SELECT * FROM ins",
    # Creating a table from a read.
    "SELECT * INTO stolen FROM customers",
    # Row locks are writes in disguise.
    "SELECT id FROM orders WHERE id = 31 FOR UPDATE",
    # A sequence bump from a read.
    "SELECT nextval('orders_id_seq')",
]


@pytest.mark.parametrize("sql", SMUGGLED)
def test_smuggled_writes_are_denied_and_data_unchanged(gateway, alice, db, sql):
    before = db.fetch("SELECT * FROM orders WHERE id = 31")
    response = gateway.query(sql, alice)
    assert response.status_code in (403, 422), response.text
    assert response.json()["error"]["code"] in (
        "unsupported_construct", "function_denied", "policy_denied", "unknown_object",
    )
    assert db.fetch("SELECT * FROM orders WHERE id = 31") == before
    assert not db.fetchval("SELECT 1 FROM orders WHERE id = 999999")
    assert not db.table_exists("stolen")


def test_read_only_transaction_refuses_a_write_the_facts_missed(db, wire):
    # Defence in depth: even if the extractor called a write a read, the READ ONLY
    # transaction makes PostgreSQL refuse it. A session not read only by default (this
    # pool's, or the login role's) keeps that transaction.
    before = db.fetchval("SELECT status FROM orders WHERE id = 32")
    facts = QueryFacts(fingerprint="sha256:test", kind="select")

    async def run() -> None:
        pool = await asyncpg.create_pool(wire.dsn, min_size=1, max_size=1)
        try:
            executor = Executor(pool)
            await executor.run(
                executor.target("UPDATE orders SET status = 'x' WHERE id = 32"), [], facts, 10,
            )
        finally:
            await pool.close()

    with wire.recording() as sent, pytest.raises(Forbidden) as caught:
        asyncio.run(run())
    assert caught.value.code == "read_only_violation"
    assert ("Q", "BEGIN READ ONLY;") in sent
    assert db.fetchval("SELECT status FROM orders WHERE id = 32") == before


# Writes the facts call reads (as a misreading extractor would), each with its outputs.
MISREAD = [
    ("UPDATE orders SET status = 'x' WHERE id = 32", ()),
    ("WITH gone AS (DELETE FROM orders WHERE id = 32 RETURNING id) SELECT id FROM gone",
     (Output("id", (), "expression"),)),
    # A function that writes.
    ("SELECT nextval('read_only_probe')", (Output("nextval", (), "expression"),)),
]


@pytest.fixture(scope="module")
def probe_sequence(db):
    db.execute("CREATE SEQUENCE IF NOT EXISTS read_only_probe;"
               "GRANT USAGE ON SEQUENCE read_only_probe TO querygate")
    yield "read_only_probe"
    db.execute("DROP SEQUENCE read_only_probe")


@pytest.mark.parametrize(("sql", "outputs"), MISREAD)
def test_a_read_in_one_round_trip_cannot_write_either(db, wire, probe_sequence, sql, outputs):
    """A masking profile's sessions are read only by default, so a read runs outside any
    transaction of its own, in one round trip (Bind, Execute, Sync): PostgreSQL refuses
    the write all the same, in the implicit transaction."""
    before = db.fetch("SELECT * FROM orders WHERE id = 32")
    sequence = db.fetch(f"SELECT last_value, is_called FROM {probe_sequence}")
    facts = QueryFacts(fingerprint="sha256:misread", kind="select", outputs=outputs)

    async def run() -> None:
        sessions = CleanSessions()
        pool = await asyncpg.create_pool(
            wire.dsn, min_size=1, max_size=1,
            server_settings=connection_settings(5000, read_only=True),
            init=sessions.forget, reset=sessions.reset,
        )
        try:
            executor = Executor(pool, sessions)
            await executor.run(executor.target(sql), [], facts, 10)
        finally:
            await pool.close()

    with wire.recording() as sent, pytest.raises(Forbidden) as caught:
        asyncio.run(run())
    assert caught.value.code == "read_only_violation"
    assert not [text for kind, text in sent if kind == "Q" and text.startswith("BEGIN")], sent
    assert db.fetch("SELECT * FROM orders WHERE id = 32") == before
    assert db.fetch(f"SELECT last_value, is_called FROM {probe_sequence}") == sequence
