"""A reader cannot write, even by smuggling a write into a read."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from app.errors import Forbidden
from app.executor import Executor
from app.facts import QueryFacts

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


def test_read_only_transaction_refuses_a_write_the_facts_missed(postgres, db):
    # Defence in depth: even if the extractor called a write a read, the READ ONLY
    # transaction makes PostgreSQL refuse it.
    before = db.fetchval("SELECT status FROM orders WHERE id = 32")
    facts = QueryFacts(fingerprint="sha256:test", kind="select")

    async def run() -> None:
        pool = await asyncpg.create_pool(postgres.app_dsn, min_size=1, max_size=1)
        try:
            executor = Executor(pool)
            await executor.run(
                executor.target("UPDATE orders SET status = 'x' WHERE id = 32"), [], facts, 10,
            )
        finally:
            await pool.close()

    with pytest.raises(Forbidden) as caught:
        asyncio.run(run())
    assert caught.value.code == "read_only_violation"
    assert db.fetchval("SELECT status FROM orders WHERE id = 32") == before
