"""Enforce: run the original SQL text on PostgreSQL with asyncpg, inside limits.

- Always the extended protocol (prepare, then fetch through a cursor): one statement only,
  parameters bound by the server, never interpolated into the text.
- Reads run in a READ ONLY transaction, so a write the extractor missed still fails.
- ``statement_timeout`` is a setting of every pool connection (``connection_settings``), not
  a ``SET LOCAL`` per transaction: one round trip less per request (make bench), and no
  statement can change it, since SET and set_config() never pass the extractor and the pool's
  RESET ALL on release restores it. Results are capped at max_rows + 1 rows to report
  ``truncated`` without reading the rest.
- PostgreSQL errors become 4xx GatewayErrors carrying the server's message and SQLSTATE,
  never the DSN or a stack trace.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import ipaddress
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from app.errors import (
    Forbidden,
    GatewayError,
    RequestTimeout,
    Unavailable,
    Unprocessable,
)
from app.facts import QueryFacts


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str


@dataclass(frozen=True, slots=True)
class Result:
    columns: tuple[Column, ...]
    rows: list[tuple[Any, ...]]
    truncated: bool
    status: str
    rows_affected: int | None


def _server_error(exc: asyncpg.PostgresError) -> GatewayError:
    sqlstate = getattr(exc, "sqlstate", None) or ""
    message = getattr(exc, "message", None) or str(exc)
    extra = {"sqlstate": sqlstate}
    if sqlstate == "57014":
        return RequestTimeout(
            "statement_timeout", "the statement was cancelled by the statement timeout", **extra
        )
    if sqlstate == "25006":
        return Forbidden("read_only_violation", f"refused by the database: {message}", **extra)
    if sqlstate.startswith("42501") or sqlstate == "42501":
        return Forbidden("database_permission_denied", f"refused by the database: {message}", **extra)
    if sqlstate.startswith("08") or sqlstate.startswith("57P"):
        return Unavailable("database_unavailable", "the database connection failed", **extra)
    return Unprocessable("database_error", message, **extra)


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
    bound = []
    for position, (value, typ) in enumerate(zip(params, types, strict=True), start=1):
        try:
            bound.append(_convert(value, typ.name))
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise Unprocessable(
                "invalid_parameters",
                f"parameter ${position} is not a valid {typ.name}: {exc}",
            ) from exc
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


Planner = Callable[[tuple[Column, ...]], Any]


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


def connection_settings(statement_timeout_ms: int) -> dict[str, str]:
    """Server settings every connection of the executor's pool must be opened with."""
    return {"statement_timeout": str(int(statement_timeout_ms))}


class CleanSessions:
    """The pool's reset: skip it for a session whose last use was a governed read.

    asyncpg resets every connection it takes back (advisory unlock, CLOSE ALL, UNLISTEN,
    RESET ALL): a round trip per request. A SELECT the executor ran in a READ ONLY
    transaction cannot have left session state behind: SET, LISTEN, DECLARE, PREPARE and
    temporary tables never pass the extractor, set_config() and advisory locks are denied
    by the gateway whatever policy allows, and SET LOCAL ROLE ends with the transaction.
    Every other use (writes, DDL, approvals, the catalog, a failed read) is reset in full.
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

    def __init__(self, pool: asyncpg.Pool, sessions: CleanSessions | None = None) -> None:
        self._pool = pool
        self._sessions = sessions

    @contextlib.asynccontextmanager
    async def _prepared(
        self, sql: str, facts: QueryFacts, db_role: str | None
    ) -> AsyncIterator[tuple[asyncpg.Connection, Any, tuple[Column, ...]]]:
        """A connection in a transaction with ``sql`` prepared and cross-checked."""
        readonly = facts.kind == "select" and not facts.tables_write
        try:
            async with self._pool.acquire() as conn:
                try:
                    async with conn.transaction(readonly=readonly):
                        if db_role is not None:
                            # Least privilege in the database as well: the decision's role,
                            # for this transaction only. The name was validated as a plain
                            # identifier.
                            await conn.execute(f'SET LOCAL ROLE "{db_role}"')
                        statement = await _prepare(conn, sql)
                        columns = tuple(
                            Column(attr.name, attr.type.name)
                            for attr in statement.get_attributes()
                        )
                        cross_check(facts, columns)
                        yield conn, statement, columns
                except asyncpg.InvalidCachedStatementError:
                    # Unlike fetch(), the cursor path leaves the stale statement cached.
                    await conn.reload_schema_state()
                    raise
                if readonly and self._sessions is not None:
                    # Committed, and it was a read: nothing to reset (CleanSessions).
                    self._sessions.mark(conn)
        except (GatewayError, asyncpg.InvalidCachedStatementError):
            raise
        except asyncpg.PostgresError as exc:
            raise _server_error(exc) from exc
        except (OSError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise Unavailable("database_unavailable", "the database is unreachable") from exc

    async def run(
        self,
        sql: str,
        params: Sequence[Any],
        facts: QueryFacts,
        max_rows: int,
        planner: Planner,
        db_role: str | None = None,
        max_rows_affected: int | None = None,
    ) -> Result:
        """Execute ``sql`` as analysed in ``facts``; at most ``max_rows`` rows come back.

        ``planner`` sees the server's columns before anything executes and returns the
        masking plan; it may refuse (raise), and then nothing has run. A write that affects
        more than ``max_rows_affected`` rows is rolled back.
        """
        for attempt in (1, 2):
            try:
                return await self._run(sql, params, facts, max_rows, planner, db_role,
                                       max_rows_affected)
            except asyncpg.InvalidCachedStatementError as exc:
                # A schema change invalidated the cached statement: the transaction rolled
                # back, so nothing ran, and _prepared dropped the cache. Prepare afresh, once.
                if attempt == 2:
                    raise _server_error(exc) from exc
        raise AssertionError("unreachable")

    async def _run(
        self,
        sql: str,
        params: Sequence[Any],
        facts: QueryFacts,
        max_rows: int,
        planner: Planner,
        db_role: str | None,
        max_rows_affected: int | None,
    ) -> Result:
        writes = facts.kind in ("insert", "update", "delete", "merge")
        try:
            async with self._prepared(sql, facts, db_role) as (_, statement, columns):
                mask = planner(columns)
                args = bind_params(params, statement.get_parameters())
                if columns and not writes:
                    cursor = await statement.cursor(*args)
                    rows = await cursor.fetch(max_rows + 1)
                else:
                    # A write runs to completion whatever is fetched; fetching it all gives
                    # the status that says how many rows it touched.
                    rows = await statement.fetch(*args)
                status = statement.get_statusmsg() or ""
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
        truncated = len(rows) > max_rows
        if truncated:
            rows = rows[:max_rows]
        return Result(
            columns=mask.columns,
            rows=mask.apply_all(rows),
            truncated=truncated,
            status=status,
            rows_affected=affected,
        )

    async def stream(
        self,
        sql: str,
        params: Sequence[Any],
        facts: QueryFacts,
        max_rows: int | None,
        planner: Planner,
        batch_rows: int,
        db_role: str | None = None,
        max_rows_affected: int | None = None,
    ) -> AsyncIterator[Any]:
        """Yield the masking plan, then batches of masked rows, through a server-side cursor.

        Memory stays bounded by ``batch_rows``; the connection is held until the generator
        is exhausted or closed (a client that disconnects closes it).
        """
        if facts.kind != "select":
            # Writes are answered whole, where the blast radius can be checked before commit.
            raise Unprocessable("stream_unsupported", "only queries can be streamed; drop the "
                                "application/x-ndjson Accept header for writes")
        try:
            async with self._prepared(sql, facts, db_role) as (_, statement, columns):
                mask = planner(columns)
                args = bind_params(params, statement.get_parameters())
                yield mask
                sent = 0
                async for batch in _batches(statement, args, batch_rows, max_rows):
                    sent += len(batch)
                    yield mask.apply_all(batch)
        except GatewayError:
            raise
        except asyncpg.PostgresError as exc:
            raise _server_error(exc) from exc


async def _batches(
    statement: Any, args: list[Any], batch_rows: int, max_rows: int | None
) -> AsyncIterator[list[Any]]:
    cursor = await statement.cursor(*args)
    remaining = max_rows
    while remaining is None or remaining > 0:
        size = batch_rows if remaining is None else min(batch_rows, remaining)
        batch = await cursor.fetch(size)
        if not batch:
            return
        if remaining is not None:
            remaining -= len(batch)
        yield batch
        if len(batch) < size:
            return


def cross_check(facts: QueryFacts, columns: Sequence[Column]) -> None:
    """The server's view of the prepared statement must agree with the facts.

    A disagreement means the catalog is stale (a column was added or retyped) or the parser
    saw something other than what PostgreSQL will run; either way the facts policy decided
    on are not the query's, so it must not run. Names and types are compared where the facts
    know them for certain: outputs that pass a base column through unchanged.
    """
    if len(columns) != len(facts.outputs):
        raise Forbidden(
            "facts_mismatch",
            f"the database reports {len(columns)} output columns where the facts have "
            f"{len(facts.outputs)}; the catalog may be stale",
        )
    for position, (column, output) in enumerate(zip(columns, facts.outputs, strict=True), 1):
        if output.derivation != "direct":
            continue
        if column.name != output.name or (output.type is not None and column.type != output.type):
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
