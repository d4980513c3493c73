"""Enforce: run the original SQL text on PostgreSQL with asyncpg, inside limits.

- Always the extended protocol (prepare, then Bind and Execute): one statement only,
  parameters bound by the server, never interpolated into the text.
- A read never runs where it could write, so a write the extractor missed still fails. A
  JSON read on a session that is read only by default (a masking profile's pool,
  ``connection_settings(read_only=True)``) costs one round trip once its statement is
  cached: Bind, Execute of at most FIRST_BATCH_ROWS rows, Sync, in PostgreSQL's implicit
  transaction, with no pool reset after it (``CleanSessions``). When more rows remain than
  came and the answer wants them, it runs again through a cursor; so do streams, reads on
  other sessions, and reads that need SET LOCAL ROLE or a prelude, in a READ ONLY
  transaction (BEGIN, Bind, Execute per batch, COMMIT). Writes and DDL run in
  ``BEGIN READ WRITE`` … COMMIT, rolled back past their blast radius; a write whose
  statement is cached sends its BEGIN in the flight of its Bind and Execute
  (``_begin_bind_execute``), two round trips with the COMMIT.
- ``statement_timeout`` is a setting of every pool connection (``connection_settings``), not
  a ``SET LOCAL`` per transaction: one round trip less per request (make bench), and no
  statement can change it, since SET and set_config() never pass the extractor and the pool's
  RESET ALL on release restores it. Results are capped at max_rows + 1 rows to report
  ``truncated`` without reading the rest.
- PostgreSQL errors become GatewayErrors (app/dberrors.py) carrying the SQLSTATE and no
  value, never the DSN or a stack trace.
- Every use of a connection has a deadline (the request's): a timer of the event loop
  terminates the connection if it is still in use then (``_Watchdog``), which wakes any call
  waiting on it, whatever task awaits it; asyncpg's pool replaces a terminated connection,
  so a wedged call never holds one past the deadline nor returns it usable. Waiting for a
  free connection is bounded too (``pool_exhausted``).
- Rows are fetched in batches sized by the widest row seen so far (about ``BATCH_BYTES``),
  so huge rows are never many in memory at once, and a JSON answer stops adding rows at its
  byte cap (``truncated_reason: response_bytes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import ipaddress
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from app import dberrors, masking
from app.errors import (
    Forbidden,
    GatewayError,
    GatewayTimeout,
    Unavailable,
    Unprocessable,
)
from app.facts import QueryFacts
from app.pgwire import messages as wire
from app.results import Column, Result


@dataclass(slots=True)
class StreamHead:
    """The first item of a stream: the server's columns as the answer reports them.

    ``masking_s`` grows as the stream's batches are masked (the request's stage clock).
    """

    columns: tuple[Column, ...]
    masked: dict[str, str]
    masking_s: float = 0.0


def _undecodable(exc: Exception) -> GatewayError:
    # asyncpg's codecs raise Python errors that quote the value (`year 11000 is out of
    # range`); the answer and, with `from None` at the raise, any logged traceback do not.
    return Unprocessable(
        "result_not_representable",
        f"a result value could not be represented ({type(exc).__name__}); values are not shown",
    )


def _server_error(exc: asyncpg.PostgresError) -> GatewayError:
    # app/dberrors.py owns the translation, and keeps values out of it.
    return dberrors.translate(exc)


_INT_TYPES = {"int2", "int4", "int8", "oid"}
_FLOAT_TYPES = {"float4", "float8"}
_TEXT_TYPES = {"text", "varchar", "bpchar", "name", "citext"}


def bind_params(params: Sequence[Any], types: Sequence[Any]) -> list[Any]:
    """Convert JSON parameter values to what asyncpg's codec for each parameter type wants."""
    if len(params) != len(types):
        raise Unprocessable(
            "invalid_parameters",
            f"the statement expects {len(types)} parameters; {len(params)} were given",
        )
    # For asyncpg's own encoding errors, raised later: they name the position only.
    dberrors.expect_parameters([typ.name for typ in types])
    bound = []
    for position, (value, typ) in enumerate(zip(params, types, strict=True), start=1):
        try:
            bound.append(_convert(value, typ.name))
        except (TypeError, ValueError, ArithmeticError) as exc:
            # Position and type only: the reason often quotes the value.
            raise dberrors.parameter_error(position, typ.name) from exc
    return bound


def _convert(value: Any, type_name: str) -> Any:
    if value is None:
        return None
    if type_name in _INT_TYPES:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError("an integer is required")
        return int(value)
    if type_name in _FLOAT_TYPES:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError("a number is required")
        return float(value)
    if type_name == "numeric":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError("a number is required")
        return decimal.Decimal(str(value))
    if type_name == "bool":
        if not isinstance(value, bool):
            raise TypeError("a boolean is required")
        return value
    if type_name in ("json", "jsonb"):
        import orjson

        return orjson.dumps(value).decode()
    if type_name == "uuid":
        return uuid.UUID(str(value))
    if type_name == "date":
        return dt.date.fromisoformat(str(value))
    if type_name in ("timestamp", "timestamptz"):
        parsed = dt.datetime.fromisoformat(str(value))
        if type_name == "timestamptz" and parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=dt.UTC)
        return parsed
    if type_name in ("inet", "cidr"):
        return ipaddress.ip_interface(str(value)) if "/" in str(value) else ipaddress.ip_address(str(value))
    if type_name in _TEXT_TYPES:
        if not isinstance(value, str):
            raise TypeError("a string is required")
        return value
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        return value
    raise TypeError(f"values of type {type_name} must be given as strings")


Prelude = Callable[[asyncpg.Connection], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Target:
    """Where and as what a statement runs.

    ``pool`` is a masking profile's (app/profiles.py) or, for DDL, the login role's; ``sql``
    is the text PostgreSQL receives (the caller's, or with schema qualifiers pointed at the
    profile's views); ``db_role`` is SET LOCAL on the login pool only (a profile's role
    already has its privileges); ``masked`` names the source columns whose values the
    database masks, whose output types therefore differ from the catalog's; ``prelude``
    runs first inside the transaction (dropping the profile views a DDL would trip over);
    ``profile`` is the masking profile's LOGIN role (None on the login pool), which the
    wire protocol's own connections log in as (``Profiles.session``).
    """

    pool: asyncpg.Pool
    sql: str
    db_role: str | None = None
    masked: frozenset[str] = frozenset()
    prelude: Prelude | None = None
    profile: str | None = None


async def _prepare(conn: asyncpg.Connection, sql: str) -> Any:
    """The statement from the connection's statement cache, prepared on first use.

    asyncpg's public ``prepare()`` bypasses its statement cache: every call parses and
    describes anew and closes the statement later, two round trips and ~13% of the
    gateway's CPU per request (make bench, docs/benchmarks.md). ``fetch()`` and cursors use
    the cache (per connection, LRU, ``statement_cache_size``); ``_prepare(use_cache=True)``
    is its entry point for an explicit statement. A cached statement is safe to share:
    search_path is pinned per connection, privileges are checked at every execution, and a
    schema change invalidates it (``InvalidCachedStatementError``, retried once by ``run``).
    """
    return await conn._prepare(sql, use_cache=True)


def _past_deadline() -> GatewayError:
    return GatewayTimeout(
        "request_timeout",
        "the request ran past its deadline (QUERYGATE_REQUEST_TIMEOUT_MS, or for a stream "
        "QUERYGATE_STREAM_TIMEOUT_MS); its database connection was closed, which rolls back "
        "a write unless its commit had been sent",
    )


class _Watchdog:
    """Terminates a connection still in use at its deadline.

    A timer of the event loop, not a task cancellation: it fires whichever task awaits the
    connection, or none (a stream's generator suspended while the client reads), and asyncpg
    wakes every call pending on a terminated connection. A call that never completes (asyncpg
    waiting forever on a server message it could not decode,
    docs/upstream/asyncpg-utf8-hang.md) ends here.
    """

    __slots__ = ("_timer", "conn", "deadline", "fired")

    def __init__(self, conn: asyncpg.Connection, deadline: float) -> None:
        self.conn = conn
        self.fired = False
        self.deadline = deadline
        self._timer = asyncio.get_running_loop().call_at(deadline, self._fire)

    def arm(self, deadline: float) -> None:
        """Move the deadline (a stream's answer has started: its own deadline applies)."""
        self._timer.cancel()
        self.deadline = deadline
        self._timer = asyncio.get_running_loop().call_at(deadline, self._fire)

    def _fire(self) -> None:
        self.fired = True
        # Closes the socket now; the pool replaces the connection on a later acquire, and
        # the server's statement_timeout ends whatever the backend was still running.
        with contextlib.suppress(asyncpg.InterfaceError):  # lost and given back already
            self.conn.terminate()

    def cancel(self) -> None:
        self._timer.cancel()


def _open(conn: asyncpg.Connection) -> bool:
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # closed, and already given back to its pool
        return False


def connection_settings(statement_timeout_ms: int, *, read_only: bool = False) -> dict[str, str]:
    """Server settings every connection of the executor's pool must be opened with.

    ``read_only``: every transaction the session does not start READ WRITE itself is read
    only (``default_transaction_read_only``), the implicit one of a single statement
    included, so a read the extractor misread (a data-modifying CTE, a function that
    writes) fails even where it runs outside ``BEGIN READ ONLY`` (``Executor.run``'s one
    round trip). The executor starts its writes and DDL with ``BEGIN READ WRITE``.
    """
    settings = {"statement_timeout": str(int(statement_timeout_ms))}
    if read_only:
        settings["default_transaction_read_only"] = "on"
    return settings


def _reads_only(conn: asyncpg.Connection) -> bool:
    """Whether the server says the session is read only by default, right now.

    PostgreSQL (14 and later) reports ``default_transaction_read_only`` at connect and at
    every change (ParameterStatus), so this is the server's word, not the pool's
    configuration. Only such a session runs a read outside an explicit READ ONLY
    transaction; any other (of a pool opened without ``connection_settings(read_only=True)``,
    of a server that does not report the setting, or whose default a statement changed)
    keeps the transaction.
    """
    return getattr(conn.get_settings(), "default_transaction_read_only", None) == "on"


@contextlib.asynccontextmanager
async def _read_write(conn: asyncpg.Connection, reset: bool, begin: bool) -> AsyncIterator[None]:
    """A READ WRITE transaction, whatever the session's default.

    asyncpg's ``transaction()`` can only add READ ONLY to its BEGIN, and a plain BEGIN is
    read only on a session opened with ``connection_settings(read_only=True)``; this costs
    the same round trips (BEGIN, COMMIT, or ROLLBACK after an error). A transaction left
    open all the same (its rollback interrupted) is rolled back when the connection goes
    back: asyncpg's pool runs its own ``Connection._reset()``, which does, before any reset
    given to the pool (``CleanSessions.reset``).

    Without ``begin``, the body's first statement carries the BEGIN in its own flight
    (``_begin_bind_execute``): one round trip less.

    With ``reset``, the COMMIT carries the pool's reset (asyncpg's own reset query, as the
    server's capabilities make it) in the same Query message: one round trip for both,
    where the pool would take a second. PostgreSQL runs the reset only if the COMMIT
    succeeded (an error skips the rest of the message); the caller then marks the session
    clean, and a session whose COMMIT failed is reset by the pool in full.
    """
    if begin:
        await conn.execute("BEGIN READ WRITE")
    try:
        yield
    except BaseException:
        if _open(conn):
            # A flight cancelled before its answers came (the caller went away) still shows
            # the session as it was before its BEGIN: asyncpg's cancellation ends first, as
            # asyncpg's own calls wait for it, and then the session says where it is.
            await conn._protocol._wait_for_cancellation()
        if _open(conn) and conn.is_in_transaction():
            await conn.execute("ROLLBACK")
        raise
    await conn.execute(f"COMMIT;\n{conn.get_reset_query()}" if reset else "COMMIT")


def _transaction(conn: asyncpg.Connection, readonly: bool, reset: bool,
                 begin: bool = True) -> contextlib.AbstractAsyncContextManager[Any]:
    # READ ONLY through asyncpg's own transaction, which also knows how to leave a stream's
    # transaction to the pool when its generator is closed after the connection went back.
    return conn.transaction(readonly=True) if readonly else _read_write(conn, reset, begin)


# Parse, Bind and Execute of BEGIN READ WRITE on the unnamed statement and portal, and no
# Sync: the head of a write's flight (_begin_bind_execute).
_BEGIN_READ_WRITE = wire.parse("", "BEGIN READ WRITE") + wire.bind("", "") + wire.execute()


_ROLLBACK_TIMEOUT_S = 1.0


async def _begin_bind_execute(
    conn: asyncpg.Connection, statement: Any, args: list[Any]
) -> tuple[list[Any], bytes | None, bool]:
    """``BEGIN READ WRITE``, then the statement's Bind, Execute and Sync, in one flight.

    A write needs its own transaction (its blast radius is checked before the COMMIT), and
    asyncpg sends each call's messages and waits: BEGIN was a round trip of its own. Here
    the BEGIN's extended-protocol messages go out first, without a Sync, and asyncpg's
    Bind, Execute and Sync right behind them on the same socket, before anything else can
    (no await in between). PostgreSQL runs them in order: a BEGIN that fails skips the
    statement (everything up to the Sync is skipped after an error); a statement that fails
    leaves the transaction aborted, and the caller's ROLLBACK ends it. asyncpg reads the
    answers as one Bind/Execute's (it skips the BEGIN's ParseComplete and BindComplete, and
    keeps the last command tag, the statement's), and its ReadyForQuery says the session is
    now in a transaction. Returns what ``_bind_execute`` does; every row (a write runs to
    completion).

    One case is handled here: asyncpg refusing the call before its messages went out (an
    argument its codec cannot encode, say an int4 out of range), which ``queries_count``
    shows, since asyncpg counts a query once it is sent. The BEGIN is then on the server
    with no Sync behind it; a simple Query's ``ROLLBACK`` ends it (asyncpg skips the BEGIN's
    answers until that query's ReadyForQuery), and a session that cannot take even that is
    closed.
    """
    async def flight(protocol: Any) -> tuple[list[Any], bytes | None, bool]:
        # A cancelled earlier call must be over before anything is sent, as asyncpg's own
        # calls wait for it first.
        await protocol._wait_for_cancellation()
        sent = protocol.queries_count
        conn._transport.write(_BEGIN_READ_WRITE)
        try:
            return await protocol.bind_execute(  # type: ignore[no-any-return]
                statement._state, args, "", 0, True, None
            )
        except BaseException:
            if protocol.queries_count == sent and _open(conn):
                try:
                    # Bounded: a BEGIN that failed (say, a cancel request landing on it)
                    # makes the server skip everything up to a Sync, this Query too.
                    await conn.execute("ROLLBACK", timeout=_ROLLBACK_TIMEOUT_S)
                except Exception:
                    conn.terminate()
            raise

    return await statement._PreparedStatement__do_execute(flight)  # type: ignore[no-any-return]


class CleanSessions:
    """The pool's reset: skip it for a session whose last use was a governed read.

    asyncpg resets every connection it takes back (advisory unlock, CLOSE ALL, UNLISTEN,
    RESET ALL): a round trip per request. A SELECT the executor ran read only, in a READ
    ONLY transaction or in the implicit transaction of one round trip on a session read only
    by default (over at its Sync, with its unnamed portal), cannot have left session state
    behind: SET, LISTEN, DECLARE, PREPARE and temporary tables never pass the extractor,
    set_config() and advisory locks are denied by the gateway whatever policy allows, and
    SET LOCAL ROLE ends with the transaction. The one round trip marks a session only if it
    is still read only by default and outside a transaction afterwards. A committed write
    is marked too, as its COMMIT carried the reset itself (``_read_write``). Every other use
    (approvals, the catalog, a failed statement) is reset by the pool in full.
    Marks are by backend pid, consumed at release; a new connection clears its pid's mark.
    """

    def __init__(self) -> None:
        self._pids: set[int] = set()

    def mark(self, conn: asyncpg.Connection) -> None:
        self._pids.add(conn.get_server_pid())

    async def forget(self, conn: asyncpg.Connection) -> None:
        self._pids.discard(conn.get_server_pid())

    async def reset(self, conn: asyncpg.Connection) -> None:
        pid = conn.get_server_pid()
        if pid in self._pids:
            self._pids.discard(pid)
            return
        await conn.reset()


class Executor:
    """Runs governed statements on a pool opened with ``connection_settings`` (and, for the
    cheap release of reads, ``CleanSessions`` as its reset)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        sessions: CleanSessions | None = None,
        *,
        acquire_timeout_s: float = 2.0,
        timeout_s: float = 30.0,
    ) -> None:
        self._pool = pool
        self._sessions = sessions
        # The wait for a free connection, and the deadline of a call given none.
        self._acquire_timeout_s = acquire_timeout_s
        self._timeout_s = timeout_s
        # The connections in use now, with their deadlines (wedged_pools).
        self._held: dict[_Watchdog, asyncpg.Pool] = {}

    def wedged_pools(self, grace_s: float = 1.0) -> int:
        """How many pools have every connection in use past its deadline (for /healthz).

        The watchdog terminates a connection at its deadline, so one still open well past
        it means the bound itself failed, or the event loop is too blocked to run timers.
        """
        now = asyncio.get_running_loop().time()
        overdue: dict[asyncpg.Pool, int] = {}
        for watchdog, pool in self._held.items():
            if now > watchdog.deadline + grace_s and not watchdog.fired and _open(watchdog.conn):
                overdue[pool] = overdue.get(pool, 0) + 1
        return sum(1 for pool, n in overdue.items() if n >= pool.get_max_size())

    def target(self, sql: str, db_role: str | None = None) -> Target:
        """The login role's pool: DDL, and callers of code that predates profiles."""
        return Target(self._pool, sql, db_role)

    @contextlib.asynccontextmanager
    async def _connection(
        self, target: Target, deadline: float | None
    ) -> AsyncIterator[tuple[asyncpg.Connection, _Watchdog]]:
        """A connection of ``target.pool``, watched, with the database's errors translated.

        ``deadline`` (the event loop's clock; default ``timeout_s`` from now) bounds the
        wait for a connection and, through the watchdog, every call made on it.
        """
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self._timeout_s
        wait = min(self._acquire_timeout_s, deadline - loop.time())
        if wait <= 0:
            raise _past_deadline()
        watchdog: _Watchdog | None = None
        try:
            async with target.pool.acquire(timeout=wait) as conn:
                watchdog = _Watchdog(conn, deadline)
                self._held[watchdog] = target.pool
                try:
                    yield conn, watchdog
                except asyncpg.InvalidCachedStatementError:
                    # Unlike fetch(), the cursor path leaves the stale statement cached.
                    await conn.reload_schema_state()
                    raise
                finally:
                    # Before the connection goes back: the timer must never fire on it once
                    # another request holds it.
                    watchdog.cancel()
                    del self._held[watchdog]
        except (GatewayError, asyncpg.InvalidCachedStatementError):
            raise
        except asyncpg.PostgresError as exc:
            if watchdog is not None and watchdog.fired:
                # A call cut off by the deadline (asyncpg raises ConnectionDoesNotExistError,
                # class 08, for a call in flight on a terminated connection).
                raise _past_deadline() from None
            raise _server_error(exc) from exc
        except (OSError, asyncpg.InterfaceError, TimeoutError) as exc:
            if watchdog is not None and watchdog.fired:
                # Whatever the interrupted call raised (connection closed in the middle of
                # an operation, or the rollback after it), the cause is the deadline.
                raise _past_deadline() from None
            if watchdog is None and isinstance(exc, TimeoutError):
                if wait < self._acquire_timeout_s:
                    raise _past_deadline() from None
                raise Unavailable(
                    "pool_exhausted",
                    f"no database connection became free within {wait * 1000:.0f} ms "
                    "(QUERYGATE_POOL_ACQUIRE_TIMEOUT_MS); retry later",
                ) from None
            raise Unavailable("database_unavailable", "the database is unreachable") from exc

    @contextlib.asynccontextmanager
    async def _in_transaction(
        self, conn: asyncpg.Connection, target: Target, facts: QueryFacts,
        *, deferred: bool = False,
    ) -> AsyncIterator[tuple[Any, tuple[Column, ...]]]:
        """``target.sql`` prepared and cross-checked in a transaction: READ ONLY for a read,
        READ WRITE otherwise; ``prelude`` and ``db_role`` take effect in it.

        ``deferred`` (a write with neither): the statement is prepared and checked first,
        and the caller's ``_begin_bind_execute`` carries the BEGIN.
        """
        readonly = _reads(facts)
        assert not deferred or (not readonly and _one_trip(target))
        checked = await _checked(conn, target, facts) if deferred else None
        async with _transaction(conn, readonly, self._sessions is not None, not deferred):
            if target.prelude is not None:
                await target.prelude(conn)
            if target.db_role is not None:
                # Least privilege in the database as well: the decision's role, for this
                # transaction only. The name was validated as a plain identifier.
                await conn.execute(f'SET LOCAL ROLE "{target.db_role}"')
            yield checked if checked is not None else await _checked(conn, target, facts)
        if self._sessions is not None:
            # Committed: a read left nothing to reset (CleanSessions), and a write's COMMIT
            # carried the reset (_read_write).
            self._sessions.mark(conn)

    async def run(
        self,
        target: Target,
        params: Sequence[Any],
        facts: QueryFacts,
        max_rows: int,
        masks: masking.Rules | None = None,
        max_rows_affected: int | None = None,
        *,
        deadline: float | None = None,
        encode: Callable[[Any], bytes] | None = None,
        max_bytes: int | None = None,
    ) -> Result:
        """Execute ``sql`` as analysed in ``facts``; at most ``max_rows`` rows come back.

        The masking plan is made from ``masks`` and the server's columns before anything
        executes; it may refuse (raise), and then nothing has run. A write that affects
        more than ``max_rows_affected`` rows is rolled back. With ``encode``, the rows come
        back encoded, and no more of them than fit in ``max_bytes``. ``deadline`` is the
        event loop's time by which everything is over (a connection in use then is closed).
        """
        for attempt in (1, 2):
            try:
                return await self._run(target, params, facts, max_rows, masks,
                                       max_rows_affected, deadline, _Answer(
                                           max_rows, encode, max_bytes))
            except asyncpg.InvalidCachedStatementError as exc:
                # A schema change invalidated the cached statement: its transaction (explicit
                # or implicit) rolled back, so nothing ran, and _connection dropped the
                # cache. Prepare afresh, once.
                if attempt == 2:
                    raise _server_error(exc) from exc
        raise AssertionError("unreachable")

    async def _run(
        self,
        target: Target,
        params: Sequence[Any],
        facts: QueryFacts,
        max_rows: int,
        masks: masking.Rules | None,
        max_rows_affected: int | None,
        deadline: float | None,
        answer: _Answer,
    ) -> Result:
        writes = facts.kind in ("insert", "update", "delete", "merge")
        rows: list[Any] = []
        clock = _MaskClock()
        try:
            async with self._connection(target, deadline) as (conn, _):
                if _reads(facts) and _one_trip(target) and _reads_only(conn):
                    read = await self._read_once(conn, target, params, facts, masks, answer, clock)
                    if read is not None:
                        return read
                    # More rows than the first batch, and the answer wants them. The portal
                    # closed with the implicit transaction, so the read runs again from the
                    # start, through a cursor in a READ ONLY transaction: safe, as a read
                    # cannot write, and the answer is the second run's alone (one snapshot).
                    answer = answer.restarted()
                # A write's BEGIN goes in the flight of its Bind and Execute, once its
                # statement is prepared.
                deferred = writes and _one_trip(target) and _prepared(conn, target.sql)
                async with self._in_transaction(
                    conn, target, facts, deferred=deferred
                ) as (statement, columns):
                    mask = clock.plan(masks, facts, columns)
                    args = bind_params(params, statement.get_parameters())
                    if columns and not writes:
                        # Masked (and encoded) batch by batch: besides the answer, which stops
                        # at its caps, at most one batch of rows is held.
                        async with contextlib.aclosing(
                            _batches(statement, args, max_rows + 1, max_rows + 1)
                        ) as batches:
                            async for batch in batches:
                                if not answer.add(clock.apply(mask, batch)):
                                    break
                        status = statement.get_statusmsg() or ""
                    else:
                        # A write runs to completion whatever is fetched; fetching it all
                        # gives the status that says how many rows it touched.
                        rows, tag, _ = await (
                            _begin_bind_execute(conn, statement, args) if deferred
                            else _bind_execute(statement, args, 0)
                        )
                        status = tag.decode() if tag else ""
                    affected = _affected(status, facts)
                    if (
                        writes
                        and max_rows_affected is not None
                        and affected is not None
                        and affected > max_rows_affected
                    ):
                        # Raised inside the transaction: it rolls back.
                        raise Forbidden(
                            "blast_radius_exceeded",
                            f"the statement affected {affected} rows, more than the "
                            f"{max_rows_affected} allowed; it was rolled back",
                            rows_affected=affected,
                            max_rows_affected=max_rows_affected,
                        )
        except (GatewayError, asyncpg.InvalidCachedStatementError):
            raise
        except asyncpg.PostgresError as exc:
            raise _server_error(exc) from exc
        except (ValueError, ArithmeticError) as exc:
            raise _undecodable(exc) from None
        if rows:
            # A write's RETURNING rows, masked once its blast radius was checked.
            answer.add(clock.apply(mask, rows[: max_rows + 1]))
        return _result(mask, answer, status, affected, clock)

    async def _read_once(
        self,
        conn: asyncpg.Connection,
        target: Target,
        params: Sequence[Any],
        facts: QueryFacts,
        masks: masking.Rules | None,
        answer: _Answer,
        clock: _MaskClock,
    ) -> Result | None:
        """A read in one round trip, or None when its answer wants more rows than came.

        Bind, Execute of at most FIRST_BATCH_ROWS rows (max_rows + 1 if fewer, which is
        enough to tell ``truncated``) and Sync, in the implicit transaction of a session
        that is read only by default (``_reads_only``): a write the extractor missed still
        fails, and the transaction and its portal end at the Sync. The statement comes from
        the cache and is cross-checked and planned for masking before anything executes.
        """
        statement, columns = await _checked(conn, target, facts)
        mask = clock.plan(masks, facts, columns)
        args = bind_params(params, statement.get_parameters())
        limit = min(answer.limit + 1, FIRST_BATCH_ROWS)
        rows, status, completed = await _bind_execute(statement, args, limit)
        if answer.add(clock.apply(mask, rows)) and not completed:
            return None
        if self._sessions is not None and _reads_only(conn) and not conn.is_in_transaction():
            # A read, its transaction over: nothing to reset (CleanSessions). A session whose
            # default the statement changed (a function's SET) is reset, and its next read
            # takes the READ ONLY transaction.
            self._sessions.mark(conn)
        return _result(mask, answer, status.decode() if status else "", None, clock)

    async def stream(
        self,
        target: Target,
        params: Sequence[Any],
        facts: QueryFacts,
        max_rows: int | None,
        masks: masking.Rules | None,
        batch_rows: int,
        *,
        deadline: float | None = None,
        stream_deadline: float | None = None,
    ) -> AsyncIterator[Any]:
        """Yield a ``StreamHead``, then batches of masked rows, through a server-side cursor.

        Memory stays bounded by ``batch_rows`` (fewer for wide rows); the connection is held
        until the generator is exhausted or closed (a client that disconnects closes it),
        and closed at ``deadline`` until the head is out, at ``stream_deadline`` after. The
        cursor is a named portal, which lives only in an explicit (READ ONLY) transaction.
        """
        if facts.kind != "select":
            # Writes are answered whole, where the blast radius can be checked before commit.
            raise Unprocessable("stream_unsupported", "only queries can be streamed; drop the "
                                "application/x-ndjson Accept header for writes")
        try:
            async with (
                self._connection(target, deadline) as (conn, dog),
                self._in_transaction(conn, target, facts) as (statement, columns),
            ):
                clock = _MaskClock()
                mask = clock.plan(masks, facts, columns)
                args = bind_params(params, statement.get_parameters())
                head = StreamHead(mask.columns, mask.masked, clock.seconds)
                yield head
                if stream_deadline is not None:
                    dog.arm(stream_deadline)
                async for batch in _batches(statement, args, batch_rows, max_rows):
                    masked = clock.apply(mask, batch)
                    head.masking_s = clock.seconds
                    yield masked
        except GatewayError:
            raise
        except asyncpg.PostgresError as exc:
            raise _server_error(exc) from exc
        except (ValueError, ArithmeticError) as exc:
            raise _undecodable(exc) from None


def _reads(facts: QueryFacts) -> bool:
    """Whether the facts say the statement only reads (it then runs where it cannot write)."""
    return facts.kind == "select" and not facts.tables_write


def _prepared(conn: asyncpg.Connection, sql: str) -> bool:
    """Whether ``_prepare`` would take ``sql`` from the connection's cache, sending nothing.

    A statement prepared now is parsed in a transaction of its own that asyncpg leaves open
    (Parse, Describe and Flush, no Sync), and the parse takes a snapshot: a BEGIN READ WRITE
    after it fails ("transaction read-write mode must be set before any query"). So only
    a cached statement may be prepared before the BEGIN (``_begin_bind_execute``); any
    other is prepared inside the transaction, after a BEGIN of its own. The key is
    asyncpg's, as ``Connection._get_statement`` looks it up for ``_prepare``.
    """
    key = (sql, conn._protocol.get_record_class(), False)
    return bool(conn._stmt_cache.has(key))


def _one_trip(target: Target) -> bool:
    # SET LOCAL ROLE and a prelude need a transaction of their own.
    return target.prelude is None and target.db_role is None


async def _checked(
    conn: asyncpg.Connection, target: Target, facts: QueryFacts
) -> tuple[Any, tuple[Column, ...]]:
    """The statement (from the cache) and its columns, which must agree with the facts."""
    statement = await _prepare(conn, target.sql)
    columns = tuple(Column(attr.name, attr.type.name) for attr in statement.get_attributes())
    cross_check(facts, columns, target.masked)
    return statement, columns


async def _bind_execute(
    statement: Any, args: list[Any], limit: int
) -> tuple[list[Any], bytes | None, bool]:
    """Bind, Execute of at most ``limit`` rows, Sync: one round trip, one write to the socket.

    The rows, the command tag (None if the portal was suspended) and whether the portal
    completed. asyncpg does this for ``PreparedStatement.fetch()`` in the private
    ``__bind_execute``, which keeps only the rows; this is its body with the rest kept.
    ``__do_execute`` drops asyncpg's caches when a schema change outdated their types, as
    for fetch(). No timeout: the watchdog bounds the call, as every other.
    """
    return await statement._PreparedStatement__do_execute(  # type: ignore[no-any-return]
        lambda protocol: protocol.bind_execute(statement._state, args, "", limit, True, None)
    )


def _result(
    mask: masking.MaskPlan, answer: _Answer, status: str, affected: int | None, clock: _MaskClock
) -> Result:
    return Result(
        columns=mask.columns,
        rows=answer.rows,
        truncated=answer.cut is not None,
        status=status,
        rows_affected=affected,
        truncated_reason=answer.cut,
        masked=mask.masked,
        masking_s=clock.seconds,
    )


class _MaskClock:
    """Masks, and counts the time spent masking (the request's ``masking`` stage)."""

    __slots__ = ("seconds",)

    def __init__(self) -> None:
        self.seconds = 0.0

    def plan(
        self, masks: masking.Rules | None, facts: QueryFacts, columns: tuple[Column, ...]
    ) -> masking.MaskPlan:
        if masks is None:
            return masking.unmasked(columns)
        started = time.perf_counter()
        try:
            return masks.for_columns(facts, columns)
        finally:
            self.seconds += time.perf_counter() - started

    def apply(self, plan: masking.MaskPlan, rows: Sequence[Any]) -> list[list[Any]]:
        started = time.perf_counter()
        try:
            return plan.apply_all(rows)
        finally:
            self.seconds += time.perf_counter() - started


class _Answer:
    """The rows of a JSON answer: up to ``limit`` rows, and (encoded) up to ``max_bytes``."""

    __slots__ = ("cut", "encode", "limit", "max_bytes", "rows", "size")

    def __init__(
        self, limit: int, encode: Callable[[Any], bytes] | None, max_bytes: int | None
    ) -> None:
        self.limit = limit
        self.encode = encode
        self.max_bytes = max_bytes
        self.rows: list[Any] = []
        self.size = 0
        self.cut: str | None = None  # "max_rows" or "response_bytes" once a cap is reached

    def restarted(self) -> _Answer:
        """An empty answer with the same caps (the read runs again from its first row)."""
        return _Answer(self.limit, self.encode, self.max_bytes)

    def add(self, rows: Sequence[Any]) -> bool:
        """Add masked rows; False once a cap is reached (no more are wanted)."""
        for row in rows:
            if len(self.rows) >= self.limit:
                self.cut = "max_rows"
                return False
            if self.encode is not None:
                data = self.encode(row)
                if self.max_bytes is not None and self.size + len(data) > self.max_bytes:
                    self.cut = "response_bytes"
                    return False
                self.size += len(data)
                row = data
            self.rows.append(row)
        return True


# A batch is sized to hold about BATCH_BYTES, judged by the widest row of the batch before
# (FIRST_BATCH_ROWS first, when nothing is known): `SELECT repeat('x', 500000) …` fetches two
# rows at a time, not the 500 MB of a fixed batch of a thousand.
BATCH_BYTES = 1 << 20
FIRST_BATCH_ROWS = 16


def _width(batch: Sequence[Any]) -> int:
    """The widest of up to nine rows sampled from ``batch``, in bytes (an estimate)."""
    widest = 1
    for row in batch[:: max(1, len(batch) // 8)]:
        size = 0
        for value in row:
            if isinstance(value, (str, bytes, bytearray)):
                size += len(value)
            elif isinstance(value, (list, tuple)):
                size += 8 * len(value)
            else:
                size += 8
        widest = max(widest, size)
    return widest


async def _batches(
    statement: Any, args: list[Any], batch_rows: int, max_rows: int | None
) -> AsyncGenerator[list[Any], None]:
    cursor = await statement.cursor(*args)
    remaining = max_rows
    size = min(batch_rows, FIRST_BATCH_ROWS)
    while remaining is None or remaining > 0:
        want = size if remaining is None else min(size, remaining)
        batch = await cursor.fetch(want)
        if not batch:
            return
        if remaining is not None:
            remaining -= len(batch)
        yield batch
        if len(batch) < want:
            return
        size = max(1, min(batch_rows, BATCH_BYTES // _width(batch)))


def cross_check(
    facts: QueryFacts, columns: Sequence[Column], masked: frozenset[str] = frozenset()
) -> None:
    """The server's view of the prepared statement must agree with the facts.

    A disagreement means the catalog is stale (a column was added or retyped) or the parser
    saw something other than what PostgreSQL will run; either way the facts policy decided
    on are not the query's, so it must not run. Names and types are compared where the facts
    know them for certain: outputs that pass a base column through unchanged (a column the
    database masks keeps its name but may change its type, to text).
    """
    if facts.introspection:
        return  # the facts describe no output: every relation read is a system catalog
    if len(columns) != len(facts.outputs):
        raise Forbidden(
            "facts_mismatch",
            f"the database reports {len(columns)} output columns where the facts have "
            f"{len(facts.outputs)}; the catalog may be stale",
        )
    for position, (column, output) in enumerate(zip(columns, facts.outputs, strict=True), 1):
        if output.derivation != "direct":
            continue
        typed = output.type is not None and not masked.intersection(output.sources)
        if column.name != output.name or (typed and column.type != output.type):
            raise Forbidden(
                "facts_mismatch",
                f"output {position} is {column.name} ({column.type}) on the server but "
                f"{output.name} ({output.type}) in the facts; the catalog may be stale",
            )


def _affected(status: str, facts: QueryFacts) -> int | None:
    if facts.kind not in ("insert", "update", "delete", "merge"):
        return None
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else None
