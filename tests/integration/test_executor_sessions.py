"""What the executor saves per request (make bench) without giving up what it guarantees:
statements come from asyncpg's statement cache, a governed read skips the pool's reset round
trip, a committed write carries it in its COMMIT, everything else is reset, the statement
timeout holds on every pooled connection, and on a session read only by default a read
costs one round trip, its answer whole and capped as through a cursor. Real PostgreSQL
(pgserver)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from app.errors import Forbidden, GatewayError, RequestTimeout
from app.executor import CleanSessions, Executor, connection_settings
from app.facts import Output, QueryFacts
from app.pgwire import messages as m
from app.results import encode_row

pytestmark = pytest.mark.integration

READ = "SELECT id, status FROM orders WHERE id = $1"
READ_FACTS = QueryFacts(
    fingerprint="sha256:read", kind="select", tables_read=("public.orders",),
    outputs=(Output("id", ("public.orders.id",), "direct"),
             Output("status", ("public.orders.status",), "direct")),
    param_count=1,
)


@pytest.fixture(params=[True, False], ids=["read-only-sessions", "read-write-sessions"])
def read_only(request: pytest.FixtureRequest) -> bool:
    """Sessions read only by default (a profile's pool: reads in one round trip) or not."""
    return bool(request.param)


def with_executor(dsn: str, body: Callable[[Executor, asyncpg.Pool], Awaitable[Any]],
                  timeout_ms: int = 5000, read_only: bool = True) -> Any:
    """Run ``body`` with an executor on a one-connection pool set up as the gateway's are
    (as a masking profile's, read only by default, unless ``read_only`` is False)."""

    async def run() -> Any:
        sessions = CleanSessions()
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=1,
            server_settings=connection_settings(timeout_ms, read_only=read_only),
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


def test_a_repeated_statement_is_prepared_once_per_connection(postgres, read_only):
    async def body(executor: Executor, pool: asyncpg.Pool) -> list[Any]:
        for key in (31, 32, 33):
            result = await executor.run(executor.target(READ), [key], READ_FACTS, 10)
            assert [r[0] for r in result.rows] == [key]
        async with pool.acquire() as conn:
            return list(await conn.fetch(
                "SELECT name, prepare_time FROM pg_prepared_statements WHERE statement = $1",
                READ,
            ))

    prepared = with_executor(postgres.owner_dsn, body, read_only=read_only)
    # One server-side statement served all three requests (asyncpg's public prepare()
    # would have parsed it three times).
    assert len(prepared) == 1


def test_a_read_skips_the_reset_and_anything_else_is_reset(postgres, read_only):
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

    after_plain_use, after_read, name = with_executor(postgres.owner_dsn, body, read_only=read_only)
    assert "RESET ALL" in after_plain_use
    # The backend's last statement is the read's (or its COMMIT): no reset round trip followed.
    assert "RESET ALL" not in after_read
    assert name != "dirty"


def test_a_failed_read_is_reset(postgres, read_only):
    async def body(executor: Executor, pool: asyncpg.Pool) -> str:
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
        with pytest.raises(Exception):  # noqa: B017 - any refusal; the reset is the point
            await executor.run(
                executor.target("SELECT id, status FROM orders WHERE id = $1 / 0"), [31],
                READ_FACTS, 10)
        return await last_query(postgres.admin_dsn, pid)

    assert "RESET ALL" in with_executor(postgres.owner_dsn, body, read_only=read_only)


def test_the_statement_timeout_holds_on_pooled_connections(postgres, read_only):
    facts = QueryFacts(fingerprint="sha256:sleep", kind="select",
                       outputs=(Output("pg_sleep", (), "computed"),))

    async def body(executor: Executor, pool: asyncpg.Pool) -> None:
        for _ in range(2):  # the second time on a connection released without a reset
            with pytest.raises(RequestTimeout):
                await executor.run(executor.target("SELECT pg_sleep(2)"), [], facts, 10)

    with_executor(postgres.owner_dsn, body, timeout_ms=200, read_only=read_only)


def test_a_statement_invalidated_by_a_schema_change_is_prepared_again(postgres, read_only, admin_db):
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
        first, second, rows = with_executor(postgres.owner_dsn, body, read_only=read_only)
    finally:
        admin_db.execute("DROP TABLE IF EXISTS cache_probe CASCADE")
    assert [c.type for c in first] == ["int4", "text"]
    assert [c.type for c in second] == ["int4", "varchar"]
    assert [tuple(r) for r in rows] == [(1, "one")]


SERIES = "SELECT g FROM generate_series(1, $1::int) g"
SERIES_FACTS = QueryFacts(fingerprint="sha256:series", kind="select",
                          outputs=(Output("g", (), "expression"),), param_count=1)


def began(sent: list[tuple[str, str]]) -> list[str]:
    """The BEGINs among what the client sent."""
    return [text for kind, text in sent if kind == "Q" and text.startswith("BEGIN")]


@pytest.mark.parametrize(
    ("rows", "max_rows", "one_trip"),
    [
        (10, 100, True),  # all of it in the first batch
        (15, 100, True),
        # Exactly a batch: the portal is suspended, as the server looks for a 17th row only
        # when asked for one; read again through a cursor, as with more rows.
        (16, 100, False),
        (17, 100, False),
        (100, 10, True),  # max_rows + 1 rows tell `truncated`
        (100, 15, True),
        (100, 16, False),
        (6000, 5000, False),
        (6000, 10000, False),
    ],
)
def test_a_read_comes_back_whole_and_in_order_in_one_round_trip_or_through_a_cursor(
    wire, rows, max_rows, one_trip
):
    async def body(executor: Executor, pool: asyncpg.Pool) -> tuple[Any, list[Any]]:
        await executor.run(executor.target(SERIES), [1], SERIES_FACTS, 10)  # prepared
        with wire.recording() as sent:
            result = await executor.run(executor.target(SERIES), [rows], SERIES_FACTS, max_rows)
        return result, sent

    result, sent = with_executor(wire.dsn, body)
    expected = list(range(1, min(rows, max_rows) + 1))
    assert [r[0] for r in result.rows] == expected
    assert result.truncated is (rows > max_rows)
    assert result.truncated_reason == ("max_rows" if rows > max_rows else None)
    if one_trip:
        assert [kind for kind, _ in sent] == ["B", "E", "S"], sent
    else:
        # The first batch, then the whole read again in a READ ONLY transaction.
        assert sent[:3] == [("B", ""), ("E", ""), ("S", "")], sent
        assert began(sent) == ["BEGIN READ ONLY;"], sent
        assert sent[-1] == ("Q", "COMMIT;"), sent


@pytest.mark.parametrize(("max_bytes", "one_trip"), [(40, True), (200, False)])
def test_the_byte_cap_holds_in_one_round_trip_and_through_a_cursor(wire, max_bytes, one_trip):
    async def body(executor: Executor, pool: asyncpg.Pool) -> tuple[Any, list[Any]]:
        await executor.run(executor.target(SERIES), [1], SERIES_FACTS, 10)
        with wire.recording() as sent:
            result = await executor.run(executor.target(SERIES), [1000], SERIES_FACTS, 500,
                                        encode=encode_row, max_bytes=max_bytes)
        return result, sent

    result, sent = with_executor(wire.dsn, body)
    encoded = [encode_row([g]) for g in range(1, 1001)]
    fits = next(n for n in range(1001) if sum(map(len, encoded[: n + 1])) > max_bytes)
    assert result.rows == encoded[:fits]
    assert result.truncated and result.truncated_reason == "response_bytes"
    assert bool(began(sent)) is not one_trip, sent


def test_a_read_that_changes_the_sessions_default_is_reset(wire):
    """The one round trip marks a session clean only while it is read only by default: a
    statement that turned the default off (here set_config(), which the gateway denies, as
    if the extractor had missed it) leaves a session that is reset before its next use."""
    facts = QueryFacts(fingerprint="sha256:set", kind="select",
                       outputs=(Output("set_config", (), "expression"),))
    sql = "SELECT set_config('default_transaction_read_only', 'off', false)"

    async def body(executor: Executor, pool: asyncpg.Pool) -> tuple[list[Any], list[Any], str]:
        with wire.recording() as changed:
            await executor.run(executor.target(sql), [], facts, 10)
        with wire.recording() as next_read:
            await executor.run(executor.target(SERIES), [3], SERIES_FACTS, 10)
        async with pool.acquire() as conn:
            default = str(await conn.fetchval("SHOW default_transaction_read_only"))
        return changed, next_read, default

    changed, next_read, default = with_executor(wire.dsn, body)
    assert changed[-1][0] == "Q" and "RESET ALL" in changed[-1][1], changed
    assert default == "on"
    # Reset to read only by default, the session reads in one round trip again.
    assert not began(next_read), next_read


WRITE_FACTS = QueryFacts(fingerprint="sha256:write", kind="update",
                         tables_write=("public.session_probe",), param_count=1)


@pytest.fixture
def session_probe(admin_db: Any) -> Any:
    """A table whose trigger leaves session state behind (a setting and an advisory lock),
    as a trigger the gateway never sees may; a deferred check fails a COMMIT on demand."""
    admin_db.execute("DROP TABLE IF EXISTS session_probe CASCADE")
    admin_db.execute("CREATE TABLE session_probe (id integer PRIMARY KEY, n integer)")
    admin_db.execute("INSERT INTO session_probe SELECT g, 0 FROM generate_series(1, 5) g")
    admin_db.execute(
        "CREATE FUNCTION session_probe_dirty() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "PERFORM set_config('application_name', 'dirty', false); "
        "PERFORM pg_advisory_lock(4242); RETURN NEW; END $$")
    admin_db.execute("CREATE TRIGGER dirty AFTER UPDATE ON session_probe "
                     "FOR EACH ROW EXECUTE FUNCTION session_probe_dirty()")
    # A deferred constraint: an UPDATE that breaks it fails at COMMIT, not before.
    admin_db.execute(
        "CREATE FUNCTION session_probe_check() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF NEW.n < 0 THEN RAISE EXCEPTION 'negative'; END IF; RETURN NULL; END $$")
    admin_db.execute("CREATE CONSTRAINT TRIGGER nonnegative AFTER UPDATE ON session_probe "
                     "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
                     "EXECUTE FUNCTION session_probe_check()")
    admin_db.execute("GRANT SELECT, UPDATE ON session_probe TO querygate")
    yield
    admin_db.execute("DROP TABLE IF EXISTS session_probe CASCADE")
    admin_db.execute("DROP FUNCTION IF EXISTS session_probe_dirty(), session_probe_check()")


async def left_behind(conn: asyncpg.Connection) -> tuple[str, int]:
    """What session_probe's trigger leaves: application_name, and advisory locks held."""
    return (str(await conn.fetchval("SHOW application_name")),
            await conn.fetchval("SELECT count(*) FROM pg_locks "
                                "WHERE locktype = 'advisory' AND pid = pg_backend_pid()"))


def test_a_committed_write_carries_the_reset_in_its_commit(wire, session_probe):
    """A write's COMMIT and the pool's reset go in one Query message (one round trip, not
    two), and the session it leaves is as clean as the pool's reset would have left it: the
    trigger's setting and advisory lock are gone before the next use."""
    sql = "UPDATE session_probe SET n = n + 1 WHERE id = $1"

    async def body(executor: Executor, pool: asyncpg.Pool) -> tuple[Any, list[Any], Any]:
        with wire.recording() as sent:
            result = await executor.run(executor.target(sql), [1], WRITE_FACTS, 10)
        async with pool.acquire() as conn:
            state = (*await left_behind(conn),
                     str(await conn.fetchval("SHOW default_transaction_read_only")))
        return result, sent, state

    result, sent, (name, locks, read_only) = with_executor(wire.dsn, body)
    assert result.rows_affected == 1
    queries = [text for kind, text in sent if kind == "Q"]
    assert queries[0] == "BEGIN READ WRITE", sent
    # The last message: the COMMIT with asyncpg's reset behind it; nothing after it.
    assert queries[-1].startswith("COMMIT;") and "RESET ALL" in queries[-1], sent
    assert sent[-1][0] == "Q" and sent[-1][1] == queries[-1], sent
    assert sum("RESET ALL" in q for q in queries) == 1, sent
    assert name != "dirty" and locks == 0 and read_only == "on"


def test_a_write_whose_commit_fails_is_reset_by_the_pool(wire, session_probe):
    """A COMMIT that fails (a deferred constraint) skips the rest of its message: the pool
    then resets the session in full, with its own round trip."""
    sql = "UPDATE session_probe SET n = -1 WHERE id = $1"

    async def body(executor: Executor, pool: asyncpg.Pool) -> tuple[list[Any], str, int]:
        with wire.recording() as sent:
            with pytest.raises(Exception, match="raise_exception"):
                await executor.run(executor.target(sql), [2], WRITE_FACTS, 10)
        async with pool.acquire() as conn:
            name = str(await conn.fetchval("SHOW application_name"))
            n = int(await conn.fetchval("SELECT n FROM session_probe WHERE id = 2"))
        return sent, name, n

    sent, name, n = with_executor(wire.dsn, body)
    queries = [text for kind, text in sent if kind == "Q"]
    assert queries[-2].startswith("COMMIT;"), sent
    assert queries[-1].startswith("SELECT pg_advisory_unlock_all()"), sent  # the pool's own
    assert name != "dirty" and n == 0


# A write's first flight: BEGIN READ WRITE (Parse, Bind, Execute), then the statement's
# Bind, Execute and the one Sync.
FLIGHT = [("P", "BEGIN READ WRITE"), ("B", ""), ("E", ""), ("B", ""), ("E", ""), ("S", "")]


@pytest.mark.parametrize("read_only", [True, False], ids=["read-only-sessions",
                                                          "read-write-sessions"])
def test_a_prepared_write_sends_its_begin_in_the_statements_flight(wire, session_probe, read_only):
    """A write's BEGIN READ WRITE goes out with its Bind and Execute, and one Sync: two
    round trips with the COMMIT. The first time, the statement is not prepared yet, and its
    Parse would take a snapshot before the BEGIN (which then fails): the BEGIN is a Query of
    its own, and the statement is prepared inside the transaction. Either way the write
    commits, and the trigger's session state is gone before the next use."""
    sql = "UPDATE session_probe SET n = n + 1 WHERE id = $1"

    async def body(executor: Executor, pool: asyncpg.Pool) -> Any:
        with wire.recording() as first:
            one = await executor.run(executor.target(sql), [3], WRITE_FACTS, 10)
        with wire.recording() as second:
            two = await executor.run(executor.target(sql), [3], WRITE_FACTS, 10)
        async with pool.acquire() as conn:
            state = (*await left_behind(conn), conn.is_in_transaction(),
                     await conn.fetchval("SELECT n FROM session_probe WHERE id = 3"))
        return one, first, two, second, state

    one, first, two, second, state = with_executor(wire.dsn, body, read_only=read_only)
    assert one.rows_affected == 1 and two.rows_affected == 1
    assert first[0] == ("Q", "BEGIN READ WRITE") and first[1][0] == "P", first
    assert second[:6] == FLIGHT, second
    assert [kind for kind, _ in second[6:]] == ["Q"], second
    assert second[6][1].startswith("COMMIT;\n") and "RESET ALL" in second[6][1], second
    name, locks, in_transaction, n = state
    assert name != "dirty" and locks == 0 and not in_transaction and n == 2


def test_a_write_past_its_blast_radius_in_one_flight_rolls_back(wire, session_probe):
    """The statement ran in the flight's transaction: the row count is over the limit, and
    the ROLLBACK undoes it, as with a BEGIN of its own."""
    sql = "UPDATE session_probe SET n = n + 1 WHERE id <= $1"
    facts = QueryFacts(fingerprint="sha256:radius", kind="update",
                       tables_write=("public.session_probe",), param_count=1)

    async def body(executor: Executor, pool: asyncpg.Pool) -> Any:
        await executor.run(executor.target(sql), [0], facts, 10, max_rows_affected=2)
        with wire.recording() as sent:
            with pytest.raises(Forbidden) as refused:
                await executor.run(executor.target(sql), [4], facts, 10, max_rows_affected=2)
        async with pool.acquire() as conn:
            total = await conn.fetchval("SELECT sum(n) FROM session_probe")
        return refused.value, sent, total

    refused, sent, total = with_executor(wire.dsn, body)
    assert refused.code == "blast_radius_exceeded" and refused.extra["rows_affected"] == 4
    assert sent[:6] == FLIGHT, sent
    assert sent[6] == ("Q", "ROLLBACK"), sent
    assert total == 0


@pytest.mark.parametrize(
    ("sql", "bad", "before_rollback", "code"),
    [
        # The statement fails after the flight's BEGIN: the transaction is aborted.
        ("UPDATE session_probe SET n = n + 10 / ($1 - 777) WHERE id = 4", 777, FLIGHT,
         "database_error"),
        # asyncpg refuses an argument its codec cannot encode (an int4 out of range) only
        # when the call starts, after the flight's BEGIN went out alone: with no Sync behind
        # it, the session would wait in a transaction.
        ("UPDATE session_probe SET n = $1 WHERE id = 4", 2**40, FLIGHT[:3], "invalid_parameters"),
    ],
    ids=["fails-on-the-server", "cannot-be-encoded"],
)
def test_a_write_that_fails_in_its_flight_rolls_back_and_leaves_a_usable_session(
    wire, session_probe, sql, bad, before_rollback, code
):
    """Either way a ROLLBACK Query ends the transaction, the caller gets the error (without
    the value), and the session serves the next write."""
    async def body(executor: Executor, pool: asyncpg.Pool) -> Any:
        await executor.run(executor.target(sql), [782], WRITE_FACTS, 10)  # prepared
        with wire.recording() as sent:
            with pytest.raises(GatewayError) as failed:
                await executor.run(executor.target(sql), [bad], WRITE_FACTS, 10)
        after = await executor.run(executor.target(sql), [787], WRITE_FACTS, 10)
        async with pool.acquire() as conn:
            n = await conn.fetchval("SELECT n FROM session_probe WHERE id = 4")
        return failed.value, sent, after, n

    failed, sent, after, n = with_executor(wire.dsn, body)
    assert failed.code == code, failed.body("r")
    assert str(bad) not in str(failed.body("r"))
    assert sent[: len(before_rollback)] == before_rollback, sent
    assert sent[len(before_rollback)] == ("Q", "ROLLBACK"), sent
    assert after.rows_affected == 1
    # 0 + 10/5, then + 10/10; or set to 782, then 787: the bad one changed nothing.
    assert n in (3, 787)


SLOW_WRITE = "UPDATE session_probe SET n = n + (SELECT 1 FROM pg_sleep($2::float8)) WHERE id = $1"
SLOW_FACTS = QueryFacts(fingerprint="sha256:slow", kind="update",
                        tables_write=("public.session_probe",), param_count=2)


@pytest.mark.parametrize("cached", [False, True], ids=["own-begin", "in-the-flight"])
def test_a_write_cut_by_its_deadline_is_a_timeout_and_changes_nothing(postgres, session_probe,
                                                                       cached):
    """The watchdog closes the connection under the write: the answer is 504 request_timeout
    (not the 503 of a lost database, which asyncpg's ConnectionDoesNotExistError would map
    to), and nothing was committed."""

    async def body(executor: Executor, pool: asyncpg.Pool) -> Any:
        if cached:
            await executor.run(executor.target(SLOW_WRITE), [2, 0], SLOW_FACTS, 10)
        loop = asyncio.get_running_loop()
        with pytest.raises(GatewayError) as cut:
            await executor.run(executor.target(SLOW_WRITE), [1, 0.6], SLOW_FACTS, 10,
                               deadline=loop.time() + 0.2)
        await asyncio.sleep(0.8)  # the backend's statement is over, its client long gone
        async with pool.acquire() as conn:
            n = await conn.fetchval("SELECT n FROM session_probe WHERE id = 1")
        return cut.value, n

    cut, n = with_executor(postgres.app_dsn, body)
    assert (cut.code, cut.status) == ("request_timeout", 504), cut.body("r")
    assert n == 0


def test_a_cancelled_write_is_rolled_back_by_the_executor(wire, session_probe):
    """A caller that goes away mid-flight cancels the request's task: the executor waits for
    asyncpg's cancellation, sees the transaction the flight began, and rolls it back itself,
    so the pool gets a session outside any transaction (it would roll back one all the same,
    and log an error for it)."""

    async def body(executor: Executor, pool: asyncpg.Pool) -> Any:
        complaints: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: complaints.append(ctx))
        await executor.run(executor.target(SLOW_WRITE), [2, 0], SLOW_FACTS, 10)
        with wire.recording() as sent:
            task = asyncio.create_task(
                executor.run(executor.target(SLOW_WRITE), [1, 0.5], SLOW_FACTS, 10))
            await asyncio.sleep(0.15)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        async with pool.acquire() as conn:
            n = await conn.fetchval("SELECT n FROM session_probe WHERE id = 1")
        return sent, n, complaints

    sent, n, complaints = with_executor(wire.dsn, body)
    assert sent[:6] == FLIGHT, sent
    assert ("Q", "ROLLBACK") in sent[6:], sent
    assert n == 0
    assert not complaints, complaints


def test_a_refused_argument_behind_a_failed_begin_is_bounded(wire, session_probe, monkeypatch):
    """The flight's head failed on the server (here swapped for one that always fails, as a
    cancel request landing on the BEGIN would), and asyncpg refused the argument: the
    server now skips everything until a Sync, the ROLLBACK Query too. It waits a bounded
    time, the connection is closed, and the caller gets the parameter error, not a wait
    until the deadline."""
    from app import executor as executor_module

    sql = "UPDATE session_probe SET n = $1 WHERE id = 4"
    parse = m.parse("", "BEGIN READ WRITE")
    assert executor_module._BEGIN_READ_WRITE.startswith(parse)
    failing = m.parse("", "SELECT 1/0") + executor_module._BEGIN_READ_WRITE[len(parse):]

    async def body(executor: Executor, pool: asyncpg.Pool) -> Any:
        await executor.run(executor.target(sql), [1], WRITE_FACTS, 10)  # prepared
        monkeypatch.setattr(executor_module, "_BEGIN_READ_WRITE", failing)
        monkeypatch.setattr(executor_module, "_ROLLBACK_TIMEOUT_S", 0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(GatewayError) as refused:
            await executor.run(executor.target(sql), [2**40], WRITE_FACTS, 10,
                               deadline=started + 5)
        took = loop.time() - started
        monkeypatch.undo()
        after = await executor.run(executor.target(sql), [3], WRITE_FACTS, 10)
        return refused.value, took, after

    refused, took, after = with_executor(wire.dsn, body)
    assert refused.code == "invalid_parameters", refused.body("r")
    assert took < 2, took
    assert after.rows_affected == 1
