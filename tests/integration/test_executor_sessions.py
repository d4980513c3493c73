"""What the executor saves per request (make bench) without giving up what it guarantees:
statements come from asyncpg's statement cache, a governed read skips the pool's reset round
trip, everything else is reset, and the statement timeout holds on every pooled connection.
Real PostgreSQL (pgserver)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from app.errors import RequestTimeout
from app.executor import CleanSessions, Executor, connection_settings
from app.facts import Output, QueryFacts

pytestmark = pytest.mark.integration

READ = "SELECT id, status FROM orders WHERE id = $1"
READ_FACTS = QueryFacts(
    fingerprint="sha256:read", kind="select", tables_read=("public.orders",),
    outputs=(Output("id", ("public.orders.id",), "direct"),
             Output("status", ("public.orders.status",), "direct")),
    param_count=1,
)


def with_executor(dsn: str, body: Callable[[Executor, asyncpg.Pool], Awaitable[Any]],
                  timeout_ms: int = 5000) -> Any:
    """Run ``body`` with an executor on a one-connection pool set up as the gateway's is."""

    async def run() -> Any:
        sessions = CleanSessions()
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=1, server_settings=connection_settings(timeout_ms),
            init=sessions.forget, reset=sessions.reset,
        )
        try:
            return await body(Executor(pool, sessions), pool)
        finally:
            await pool.close()

    return asyncio.run(run())


async def last_query(admin_dsn: str, pid: int) -> str:
    admin = await asyncpg.connect(admin_dsn)
    try:
        return str(await admin.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid))
    finally:
        await admin.close()


def test_a_repeated_statement_is_prepared_once_per_connection(postgres):
    async def body(executor: Executor, pool: asyncpg.Pool) -> list[Any]:
        for key in (31, 32, 33):
            result = await executor.run(executor.target(READ), [key], READ_FACTS, 10)
            assert [r[0] for r in result.rows] == [key]
        async with pool.acquire() as conn:
            return list(await conn.fetch(
                "SELECT name, prepare_time FROM pg_prepared_statements WHERE statement = $1",
                READ,
            ))

    prepared = with_executor(postgres.owner_dsn, body)
    # One server-side statement served all three requests (asyncpg's public prepare()
    # would have parsed it three times).
    assert len(prepared) == 1


def test_a_read_skips_the_reset_and_anything_else_is_reset(postgres):
    async def body(executor: Executor, pool: asyncpg.Pool) -> tuple[str, str, str]:
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
        after_plain_use = await last_query(postgres.admin_dsn, pid)
        await executor.run(executor.target(READ), [31], READ_FACTS, 10)
        after_read = await last_query(postgres.admin_dsn, pid)
        async with pool.acquire() as conn:
            # Session state left by a use outside the executor's reads is reset on release.
            await conn.execute("SET application_name = 'dirty'")
        async with pool.acquire() as conn:
            name = str(await conn.fetchval("SHOW application_name"))
        return after_plain_use, after_read, name

    after_plain_use, after_read, name = with_executor(postgres.owner_dsn, body)
    assert "RESET ALL" in after_plain_use
    # The backend's last statement is the read's COMMIT: no reset round trip followed.
    assert "RESET ALL" not in after_read
    assert name != "dirty"


def test_a_failed_read_is_reset(postgres):
    async def body(executor: Executor, pool: asyncpg.Pool) -> str:
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
        with pytest.raises(Exception):  # noqa: B017 - any refusal; the reset is the point
            await executor.run(
                executor.target("SELECT id, status FROM orders WHERE id = $1 / 0"), [31],
                READ_FACTS, 10)
        return await last_query(postgres.admin_dsn, pid)

    assert "RESET ALL" in with_executor(postgres.owner_dsn, body)


def test_the_statement_timeout_holds_on_pooled_connections(postgres):
    facts = QueryFacts(fingerprint="sha256:sleep", kind="select",
                       outputs=(Output("pg_sleep", (), "computed"),))

    async def body(executor: Executor, pool: asyncpg.Pool) -> None:
        for _ in range(2):  # the second time on a connection released without a reset
            with pytest.raises(RequestTimeout):
                await executor.run(executor.target("SELECT pg_sleep(2)"), [], facts, 10)

    with_executor(postgres.owner_dsn, body, timeout_ms=200)


def test_a_statement_invalidated_by_a_schema_change_is_prepared_again(postgres, admin_db):
    admin_db.execute("DROP TABLE IF EXISTS cache_probe CASCADE")
    admin_db.execute("CREATE TABLE cache_probe (id integer PRIMARY KEY, label text)")
    admin_db.execute("INSERT INTO cache_probe VALUES (1, 'one')")
    admin_db.execute("GRANT SELECT ON cache_probe TO querygate_owner")
    sql = "SELECT * FROM cache_probe"
    facts = QueryFacts(fingerprint="sha256:probe", kind="select",
                       outputs=(Output("id", (), "computed"), Output("label", (), "computed")))

    async def body(executor: Executor, pool: asyncpg.Pool) -> list[Any]:
        first = await executor.run(executor.target(sql), [], facts, 10)
        # The cached statement's result type changes under it.
        admin = await asyncpg.connect(postgres.admin_dsn.replace("/postgres?", "/appdb?"))
        try:
            await admin.execute("ALTER TABLE cache_probe ALTER COLUMN label TYPE varchar(10)")
        finally:
            await admin.close()
        second = await executor.run(executor.target(sql), [], facts, 10)
        return [first.columns, second.columns, second.rows]

    try:
        first, second, rows = with_executor(postgres.owner_dsn, body)
    finally:
        admin_db.execute("DROP TABLE IF EXISTS cache_probe CASCADE")
    assert [c.type for c in first] == ["int4", "text"]
    assert [c.type for c in second] == ["int4", "varchar"]
    assert [tuple(r) for r in rows] == [(1, "one")]
