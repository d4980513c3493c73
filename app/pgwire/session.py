"""One client's session on the wire: every statement governed by the pipeline, run on a
pooled PostgreSQL connection of the caller's masking profile, its rows relayed.

What the session does itself, and why:

- **Statements** go through ``pipeline.authorize`` one by one (facts, OPA, masking profile,
  guardrails, the allow durable in the audit trail), then run on a connection logged in as
  the profile's role, so the masks are PostgreSQL's (docs/masking.md). A simple Query with
  several statements is decided in full first: if one is refused, none runs.
- **Rows** are relayed as PostgreSQL framed them (``BackendConnection.read_rows``), in the
  format the client asked for. Only an output the database cannot mask (one computed from a
  masked column: the policy's ``derived_mask``) is decoded and masked here, in text format;
  such an output asked for in binary is refused, never sent raw.
- **Errors** from PostgreSQL are passed on by SQLSTATE with the value-free message of
  app/dberrors.py (a constraint's DETAIL names the row's values; it never reaches the client).
- **Transactions**: outside one, each statement runs on a connection taken for it and
  given back at Sync (writes in ``BEGIN READ WRITE`` … ``COMMIT``, with the blast radius
  checked before the commit); reads in the implicit transaction of a session read only by
  default. ``BEGIN`` pins the connection of the transaction's first statement; every
  statement of the transaction must run under the same profile. A refusal inside a
  transaction aborts it (25P02 until ROLLBACK), so COMMIT never applies half of it.
- **Session state** the client may set (SET of an allow-listed parameter) is checked by
  PostgreSQL, kept here and replayed on every connection the session takes; nothing of it
  outlives the connection's use (the pool's reset). Named prepared statements are the
  session's: each Bind parses the statement's governed text anew on whichever connection
  serves it, so they stay valid across pooled connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import postgast

from app import dberrors, grammar, introspection, masking, pipeline, tracing
from app.audit import RequestAudit
from app.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    GatewayTimeout,
    Unavailable,
)
from app.executor import Target, cross_check
from app.identity import Identity
from app.ids import new_id
from app.metrics import StageClock
from app.pgwire import messages as m
from app.pgwire.backend import BackendConnection, BackendError, BackendPool
from app.pipeline import Authorized, Held, Meta, Statement
from app.results import Column

if TYPE_CHECKING:
    from app.pgwire.server import PgServer

log = logging.getLogger("querygate.pgwire")

_U32 = struct.Struct("!I")
_I16 = struct.Struct("!h")
_D, _T, _n, _C, _s, _E, _N, _Z, _t, _ONE, _TWO, _THREE = (
    ord(c) for c in "DTnCsENZt123"
)
TEXT_OID = 25

# Parameters a client may SET, and what SHOW may read (app/introspection.py, where
# ``current_setting`` in a catalog query is held to the same list).
SETTABLE = introspection.SETTABLE
SHOWABLE = introspection.READABLE_SETTINGS
# ParameterStatus names (PostgreSQL's spelling) of the reported parameters.
REPORTED: dict[str, str] = {
    "application_name": "application_name", "client_encoding": "client_encoding",
    "datestyle": "DateStyle", "timezone": "TimeZone", "intervalstyle": "IntervalStyle",
}
# Kept by the session, not replayed on its connections: the gateway's own application_name
# is what PostgreSQL sees (the client's is in the audit trail).
_NOT_REPLAYED = frozenset({"application_name"})
# ``SET querygate.approval = '<id>'``: the next statement runs under that approval.
APPROVAL_SETTING = "querygate.approval"


class WireError(GatewayError):
    """A protocol-level refusal with an explicit SQLSTATE (no HTTP twin)."""

    status = 400

    def __init__(self, code: str, message: str, sqlstate: str, **extra: Any) -> None:
        super().__init__(code, message, sqlstate=sqlstate, **extra)


def _aborted() -> WireError:
    return WireError("transaction_aborted", sqlstate="25P02",
                     message="current transaction is aborted, commands "
                     "ignored until end of transaction block")


def error_message(exc: GatewayError, severity: str = "ERROR") -> bytes:
    """The ErrorResponse for a GatewayError: its SQLSTATE, message and, for a policy
    refusal, the rules in DETAIL (never a value: the messages are the gateway's own)."""
    detail = None
    reasons = exc.extra.get("reasons")
    if reasons:
        detail = "; ".join(f"{r.get('rule', '?')}: {r.get('message', '')}" for r in reasons)
    elif exc.extra.get("decision_id"):
        detail = None
    hint = exc.extra.get("hint")
    message = f"querygate: {exc.message} ({exc.code})"
    if exc.extra.get("decision_id"):
        message += f" [decision {exc.extra['decision_id']}]"
    return m.error_response(m.error_fields(severity, exc.sqlstate, message, detail,
                                           hint if isinstance(hint, str) else None))


def backend_error(fields: dict[str, str]) -> GatewayError:
    """A PostgreSQL ErrorResponse as a GatewayError whose text holds no value."""
    return dberrors.translate(asyncpg.PostgresError.new(fields))


@dataclass(slots=True)
class _Prepared:
    """A statement the client parsed: its text and what the session does with it."""

    sql: str
    oids: tuple[int, ...]
    local: grammar.PgStatement | None  # SET, SHOW, BEGIN, …: the session answers them
    empty: bool = False  # no statement at all (only comments, or nothing)


@dataclass(slots=True)
class _Portal:
    statement: _Prepared
    result_formats: tuple[int, ...]
    params: tuple[bytes | None, ...] = ()
    name: str = ""  # the client's, and the same on the connection
    # A governed portal: its request, authorization and state on the connection.
    audit: RequestAudit | None = None
    budget: pipeline.Budget | None = None
    auth: Authorized | None = None
    description: bytes | None = None  # RowDescription or NoData
    plan: masking.MaskPlan | None = None  # what is masked, and what only the gateway can
    mask_here: bool = False  # outputs the database could not mask: decoded and masked here
    executing: bool = False  # its Execute (and Sync) went with its Bind: one round trip
    sent: int = 0
    done: bool = False
    truncated: bool = False
    tag: str | None = None


@dataclass(slots=True)
class _Transaction:
    """An explicit transaction: BEGIN's text, the statements that must follow it on the
    connection once the first governed statement takes one, and whether it was aborted."""

    begin: str
    read_only: bool | None
    pending: list[str] = field(default_factory=list)
    aborted: bool = False


class Session:
    """A client connection after its startup: reads messages, answers them, until Terminate."""

    _ids = itertools.count(1)

    def __init__(
        self, server: PgServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
        identity: Identity, peer: str | None, settings: dict[str, str], tls: bool = False,
    ) -> None:
        self.server = server
        self.gateway = server.gateway
        self.reader = reader
        self.writer = writer
        self.identity = identity
        self.peer = peer
        self.id = f"pg-{server.instance}-{next(self._ids)}"
        self.settings = settings  # lower-case name -> value, applied on every connection
        self.statements: dict[str, _Prepared] = {}
        self.portals: dict[str, _Portal] = {}
        self.tx: _Transaction | None = None
        self.backend: BackendConnection | None = None
        self.pool: BackendPool | None = None
        self.role: str | None = None
        self.skipping = False  # after an error in the extended protocol, until Sync
        self.commit_at_sync = False  # an autocommit write's BEGIN READ WRITE, to end at Sync
        self.rollback_at_sync = False
        self.approval: str | None = None  # SET querygate.approval = '<id>'
        self.out: list[bytes] = []
        self.tls = tls
        self.setup: str | None = None  # the set-up query of a connection just taken
        self.clean = False  # the connection may go back without its reset (_connection)
        self.count = 0  # statements sent: simple-protocol statements, extended portals
        self.began = time.monotonic()
        self.started = False
        self.flushes = 0  # how often ``out`` went to the client (a portal's rows since: _run)

    # -- the loop ---------------------------------------------------------------------------

    async def start(self) -> None:
        """The session's start on record, before the client is told it may begin: a start
        the audit cannot take refuses the connection (FATAL audit_unavailable)."""
        audit, _, _ = self._request("startup")
        await audit.session("start", tls=self.tls)
        self.started = True

    async def run(self) -> None:
        settings = self.gateway.settings
        idle = settings.pg_idle_in_transaction_timeout_s
        # A message is at most as large as an HTTP body may be (a Bind's parameters).
        limit = settings.max_request_bytes
        try:
            while True:
                try:
                    if self.tx is not None or self.backend is not None:
                        # A client that stops reading holds the connection as surely as
                        # one that stops writing: the write is bounded too.
                        async with asyncio.timeout(idle):
                            await self._flush()
                            kind, payload = await m.read_message(self.reader, limit)
                    else:
                        await self._flush()
                        kind, payload = await m.read_message(self.reader, limit)
                except TimeoutError:
                    self.out.append(m.error_response(m.error_fields(
                        "FATAL", "25P03", "querygate: terminating connection due to idle-in-"
                        "transaction timeout (QUERYGATE_PG_IDLE_IN_TRANSACTION_TIMEOUT_S)")))
                    return
                message = m.parse_frontend(kind, payload)
                if isinstance(message, m.Terminate):
                    return
                await self._dispatch(message)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(idle):
                    await self._flush()

    async def close(self) -> None:
        """Give back (or drop) the connection the session holds; the end on record."""
        await self._release(drop=self.backend is not None and self.backend.status != b"I")
        for portal in self.portals.values():
            self._end_portal(portal)
        self.portals.clear()
        if self.started:
            self.started = False
            audit, _, _ = self._request("startup")
            with contextlib.suppress(GatewayError):
                await audit.session("end", statements=self.count,
                                    duration_ms=round((time.monotonic() - self.began) * 1000, 3))

    async def cancel(self) -> None:
        """A CancelRequest with this session's key: cancel what its connection runs."""
        backend = self.backend
        if backend is not None and not backend.closed:
            backend.cancelled = True  # before the first await: _release then drops it
            with contextlib.suppress(OSError, TimeoutError):
                await backend.cancel()

    async def _flush(self) -> None:
        if self.out:
            self.writer.write(b"".join(self.out))
            self.out.clear()
            self.flushes += 1
        await self.writer.drain()

    async def _dispatch(self, message: m.FrontendMessage) -> None:
        """Answer one message, within a bound: every wait on PostgreSQL (a statement has its
        own, tighter deadline; a COMMIT, a Describe, a SET's check) ends by the stream
        deadline. Past it the connection's state is unknown: it is dropped."""
        try:
            async with asyncio.timeout(self.gateway.settings.stream_timeout_s + 1.0):
                await self._handle(message)
        except TimeoutError:
            if self.backend is not None:
                self.backend.terminate()
                await self._release(drop=True)
            self._error(GatewayTimeout("request_timeout", "the database did not answer in time "
                                       "(QUERYGATE_STREAM_TIMEOUT_MS)"))
            if isinstance(message, (m.Query, m.Sync)):
                self.out.append(m.ready_for_query(self._status()))
            else:
                self.skipping = True

    async def _handle(self, message: m.FrontendMessage) -> None:
        if isinstance(message, m.Query):
            await self._simple(message.sql)
            self.out.append(m.ready_for_query(self._status()))
            return
        if isinstance(message, m.Sync):
            await self._sync()
            return
        if isinstance(message, m.Flush):
            return  # the loop flushes before it reads
        if self.skipping:
            return
        try:
            if isinstance(message, m.Parse):
                await self._parse(message)
            elif isinstance(message, m.Bind):
                await self._bind(message)
            elif isinstance(message, m.Describe):
                await self._describe(message)
            elif isinstance(message, m.Execute):
                await self._execute(message)
            elif isinstance(message, m.Close):
                await self._close(message)
            else:
                raise WireError("protocol_violation", sqlstate="08P01",
                                message=f"unexpected message {type(message).__name__} (COPY is not "
                                "supported by the gateway)")
        except GatewayError as exc:
            self._error(exc)
            self.skipping = True

    def _status(self) -> bytes:
        if self.tx is not None:
            return b"E" if self.tx.aborted else b"T"
        return b"I"

    def _error(self, exc: GatewayError) -> None:
        self.out.append(error_message(exc))
        if self.tx is not None:
            # A refusal inside a transaction aborts it: COMMIT will not apply half of it.
            self.tx.aborted = True

    # -- requests ---------------------------------------------------------------------------

    def _request(self, method: str) -> tuple[RequestAudit, pipeline.Budget, Meta]:
        gateway = self.gateway
        assert gateway.audit is not None
        request_id = new_id()
        audit = RequestAudit(log=gateway.audit, request_id=request_id, source_ip=self.peer,
                             method=method, path=self.id, clock=StageClock(gateway.metrics),
                             identity=self.identity, channel="pgwire",
                             application_name=self.settings.get("application_name"))
        budget = pipeline.Budget.start(gateway.settings)
        return audit, budget, Meta(request_id, self.peer, budget, "pgwire")

    async def _authorize(self, sql: str, params: Sequence[Any], method: str
                         ) -> tuple[RequestAudit, pipeline.Budget, Authorized]:
        """Govern one statement; refused, its refusal is on record when this raises."""
        self.count += 1
        audit, budget, meta = self._request(method)
        # A span of its own, current while it is decided (OPA's traceparent), ended with its
        # last audit event (RequestAudit._ended).
        audit.clock.span = tracing.statement_span("pgwire")
        approval, self.approval = self.approval, None
        with tracing.current(audit.clock.span):
            return await self._authorize_traced(sql, params, audit, budget, meta, approval)

    async def _authorize_traced(self, sql: str, params: Sequence[Any], audit: RequestAudit,
                                budget: pipeline.Budget, meta: Meta, approval: Any
                                ) -> tuple[RequestAudit, pipeline.Budget, Authorized]:
        async with pipeline.guard(audit, budget):
            pipeline.admit(self.gateway, self.identity)
            # A read runs while its decision is written; its answer waits (finished).
            outcome = await pipeline.authorize(self.gateway, audit, self.identity,
                                               Statement(sql, tuple(params), approval), meta,
                                               overlap_reads=True)
            if isinstance(outcome, Held):
                budget.release()
                raise _held(outcome)
            budget.hand_off()  # the slot is the portal's until it ends
        return audit, budget, outcome

    # -- the simple protocol ----------------------------------------------------------------

    async def _simple(self, text: str) -> None:
        self.skipping = False
        try:
            parts = await self._split(text)
        except GatewayError as exc:
            self._error(exc)
            return
        if not parts:
            self.out.append(m.empty_query_response())
            return
        governed = [p for p in parts if p.local is None]
        if self.tx is not None and self.tx.aborted:
            if any(not _ends_transaction(p.local) for p in parts):
                self._error(_aborted())
                return
        authorized: list[tuple[RequestAudit, pipeline.Budget, Authorized]] = []
        try:
            # Decided in full first: one refused, none runs (each refusal is on record, and
            # the statements decided before it are recorded as not run).
            for part in governed:
                authorized.append(await self._authorize(part.sql, (), "simple"))
                if len(authorized) > 1:
                    # The statements run one after the other: the first one's slot is the
                    # batch's (a batch longer than the caller's cap is not refused for it).
                    _free(authorized[-1][1])
        except GatewayError as exc:
            for audit, budget, _ in authorized:
                with contextlib.suppress(GatewayError):
                    await audit.executed(outcome="error", code="batch_refused", rows_returned=0)
                _free(budget)
            self._error(exc)
            return
        queue = iter(authorized)
        implicit = self.tx is None and len(governed) > 1
        if implicit:
            # Several statements in one Query are one transaction, as in PostgreSQL.
            writes = any(_writes(auth) for _, _, auth in authorized)
            self.tx = _Transaction("BEGIN READ WRITE" if writes else "BEGIN", writes or None)
        try:
            for part in parts:
                if part.local is not None:
                    if implicit and _is_transaction(part.local):
                        raise WireError("unsupported_statement", sqlstate="0A000",
                                        message="transaction control inside a multi-statement query "
                                        "is not supported by the gateway; send it on its own")
                    await self._local(part, describe=True)
                    continue
                audit, budget, auth = next(queue)
                portal = _Portal(part, (), audit=audit, budget=budget, auth=auth)
                try:
                    await self._run(portal, describe=True, max_rows=0)
                finally:
                    await self._sync_backend()
        except GatewayError as exc:
            self._error(exc)
            for audit, budget, _ in queue:
                with contextlib.suppress(GatewayError):
                    await audit.executed(outcome="error", code="batch_refused", rows_returned=0)
                _free(budget)
        finally:
            if implicit and self.tx is not None:
                aborted = self.tx.aborted
                self.tx = None
                await self._end_transaction("ROLLBACK" if aborted else "COMMIT", quiet=True)
            elif self.tx is None:
                await self._finish_autocommit()

    async def _split(self, text: str) -> list[_Prepared]:
        reading = await self._read(text, "simple")
        if not reading.statements:
            return []
        pieces = [text] if len(reading.statements) == 1 else postgast.split(text)
        if len(pieces) != len(reading.statements):
            raise BadRequest("sql_parse_error", "the statements of the query could not be "
                             "separated the way PostgreSQL reads them")
        return [
            _Prepared(piece, (), statement if statement.kind in _LOCAL else None)
            for piece, statement in zip(pieces, reading.statements, strict=True)
        ]

    # -- the extended protocol --------------------------------------------------------------

    async def _facts(self, sql: str) -> None:
        catalog = self.gateway.catalog
        if catalog is None:
            raise Unavailable("database_unavailable", "the catalog has not been read yet")
        try:
            self.gateway.extractor.extract(sql, catalog)
        except GatewayError as exc:
            audit, _, _ = self._request("extended")
            audit.sql = sql
            await audit.refused(exc)
            raise

    async def _read(self, sql: str, method: str) -> grammar.PgReading:
        """PostgreSQL's reading of a text; one it cannot read is refused, and on record."""
        try:
            return grammar.read(sql, self.gateway.settings.max_sql_bytes)
        except GatewayError as exc:
            audit, _, _ = self._request(method)
            audit.sql = sql
            await audit.refused(exc)
            raise

    async def _parse(self, message: m.Parse) -> None:
        # Parse reads the text (and its facts) and may write a refusal: under the caller's
        # rate, as every request is.
        try:
            pipeline.admit(self.gateway, self.identity)
        except GatewayError as exc:
            audit, _, _ = self._request("extended")
            audit.sql = message.sql
            await audit.refused(exc)
            raise
        if message.name and message.name in self.statements:
            raise WireError("duplicate_statement", sqlstate="42P05",
                            message=f"prepared statement {message.name!r} already exists")
        reading = await self._read(message.sql, "extended")
        if len(reading.statements) > 1:
            raise WireError("multiple_statements", sqlstate="42601",
                            message="cannot insert multiple commands into a prepared statement")
        local = None
        if reading.statements and reading.statements[0].kind in _LOCAL:
            local = reading.statements[0]
        if reading.statements and self.tx is not None and self.tx.aborted and \
                not _ends_transaction(local):
            # As PostgreSQL: only what ends the transaction is parsed in an aborted one.
            raise _aborted()
        if local is None and reading.statements:
            # What PostgreSQL refuses at Parse (an unknown table or column) is refused here
            # too; the decision waits for Bind, when the parameters are known.
            await self._facts(message.sql)
        self.statements[message.name] = _Prepared(message.sql, message.param_oids, local,
                                                  not reading.statements)
        self.out.append(m.parse_complete())

    async def _bind(self, message: m.Bind) -> None:
        statement = self.statements.get(message.statement)
        if statement is None:
            raise WireError("unknown_statement", sqlstate="26000",
                            message=f"prepared statement {message.statement!r} does not exist")
        if message.portal and message.portal in self.portals:
            raise WireError("duplicate_cursor", sqlstate="42P03",
                            message=f"portal {message.portal!r} already exists")
        old = self.portals.pop(message.portal, None)
        if old is not None:
            self._end_portal(old)
        if self.tx is not None and self.tx.aborted and not (
            statement.local is not None and _ends_transaction(statement.local)
        ):
            raise _aborted()
        portal = _Portal(statement, message.result_formats, message.params, message.portal)
        if statement.local is None and not statement.empty:
            params = _params_for_policy(message.param_formats, message.params)
            portal.audit, portal.budget, portal.auth = await self._authorize(
                statement.sql, params, "extended")
            try:
                await self._open(portal, message.param_formats)
            except GatewayError as exc:
                await self._failed(portal, exc)
                raise
        self.portals[message.portal] = portal
        self.out.append(m.bind_complete())

    async def _describe(self, message: m.Describe) -> None:
        if message.kind == "P":
            portal = self.portals.get(message.name)
            if portal is None:
                raise WireError("unknown_portal", sqlstate="34000",
                                message=f"portal {message.name!r} does not exist")
            if portal.statement.local is not None:
                self.out.append(_local_description(portal.statement.local))
            else:
                self.out.append(portal.description or m.no_data())
            return
        statement = self.statements.get(message.name)
        if statement is None:
            raise WireError("unknown_statement", sqlstate="26000",
                            message=f"prepared statement {message.name!r} does not exist")
        if statement.local is not None or statement.empty:
            self.out.append(m.parameter_description(statement.oids))
            self.out.append(_local_description(statement.local))
            return
        if self.tx is not None and self.tx.aborted:
            # Described on the transaction's connection: nothing may reach it now.
            raise _aborted()
        await self._describe_statement(statement)

    async def _execute(self, message: m.Execute) -> None:
        portal = self.portals.get(message.portal)
        if portal is None:
            raise WireError("unknown_portal", sqlstate="34000",
                            message=f"portal {message.portal!r} does not exist")
        if portal.statement.local is not None:
            if portal.done:
                self.out.append(m.command_complete(portal.tag or ""))
                return
            portal.done = True
            await self._local(portal.statement, describe=False)
            return
        if portal.done:
            if portal.tag is None:
                raise WireError("portal_failed", sqlstate="55000",
                                message=f"portal {message.portal!r} cannot be run: it failed")
            self.out.append(m.command_complete(portal.tag))
            return
        if portal.auth is None:  # an empty statement
            self.out.append(m.empty_query_response())
            return
        await self._run(portal, describe=False, max_rows=max(0, message.max_rows))

    async def _close(self, message: m.Close) -> None:
        if message.kind == "S":
            self.statements.pop(message.name, None)
        else:
            portal = self.portals.pop(message.name, None)
            if portal is not None:
                if portal.auth is not None and not portal.done and self.backend is not None:
                    self.backend.send(m.close("P", message.name), m.FLUSH)
                    await self._expect(_THREE)
                self._end_portal(portal)
        self.out.append(m.close_complete())

    async def _sync_backend(self) -> None:
        backend = self.backend
        if backend is None:
            return
        if backend.closed:
            await self._release(drop=True)
            return
        try:
            async with asyncio.timeout(self.gateway.settings.request_timeout_s):
                if not backend.pending:  # a one-round-trip read sent its Sync already
                    backend.send(m.SYNC)
                await self._until_ready()
        except (TimeoutError, OSError, ConnectionError):
            backend.terminate()
            await self._release(drop=True)
            if self.tx is not None:
                self.tx.aborted = True
            self.out.append(error_message(Unavailable("database_unavailable",
                                                      "the database connection failed")))

    async def _sync(self) -> None:
        self.skipping = False
        await self._sync_backend()
        if self.tx is None:
            for portal in self.portals.values():
                self._end_portal(portal)
            self.portals.clear()
            await self._finish_autocommit()
        self.out.append(m.ready_for_query(self._status()))

    # -- running on PostgreSQL ----------------------------------------------------------------

    async def _connection(self, auth: Authorized) -> BackendConnection:
        """The connection for this statement: the transaction's, or one taken for it."""
        role = auth.target.profile
        if role is None:
            raise Forbidden("unsupported_statement", "DDL is not served on the wire protocol "
                            "yet; use POST /v1/query", decision_id=auth.decision.id)
        if self.backend is not None:
            self.clean = False  # a second statement on it
            if role != self.role:
                raise Forbidden(
                    "profile_changed",
                    "this statement runs under another masking profile than the statements "
                    "before it in this transaction; run it in a transaction of its own",
                    decision_id=auth.decision.id,
                )
            return self.backend
        pool, conn = await self.server.checkout(role)
        self.backend, self.pool, self.role = conn, pool, role
        setup = []
        if self.tx is not None:
            setup.append(self.tx.begin + _read_write(self.tx, auth))
        elif _writes(auth):
            setup.append("BEGIN READ WRITE")
            self.commit_at_sync = True
        applied = {k: v for k, v in self.settings.items() if k not in _NOT_REPLAYED}
        if applied:
            # The session's SETs, on this connection (its reset undoes them when it goes back).
            # After BEGIN: a query before it in the same Query string would start the implicit
            # transaction, whose mode BEGIN READ WRITE may then no longer set (25001).
            setup.append("SELECT " + ", ".join(
                f"pg_catalog.set_config({_literal(k)}, {_literal(v)}, false)"
                for k, v in applied.items()))
        if self.tx is not None:
            setup.extend(self.tx.pending)
            self.tx.pending.clear()
        # Sent with the statement's own messages, in the same write: no round trip of its own.
        self.setup = "; ".join(setup) or None
        # A read alone on this connection, in a session read only by default, with nothing
        # of the session's set on it, leaves no state behind (its implicit transaction and
        # portal end at its Sync; set_config, advisory locks, LISTEN and PREPARE never pass
        # the gateway): it goes back without the pool's reset, a round trip less
        # (executor.CleanSessions does the same for HTTP).
        self.clean = not setup and _reads(auth)
        return conn

    async def _drain_setup(self) -> None:
        """The answers to the connection's set-up query, sent ahead of the statement."""
        conn = self.backend
        assert conn is not None
        error = None
        while True:
            kind, payload = await conn.read()
            if kind == _E and error is None:
                error = backend_error(m.parse_error_fields(payload))
            elif kind == _Z:
                break
        if error is not None:
            conn.terminate()
            await self._release(drop=True)
            raise error

    async def _open(self, portal: _Portal, param_formats: tuple[int, ...] = (),
                    run: int | None = None) -> None:
        """Parse the governed text, bind and describe the portal on the connection.

        With ``run`` (a row limit, 0: all), a read also executes, and the Sync follows, in
        the same write: one round trip. Its rows wait in the socket's buffer while the
        description is checked against the facts and planned for masking, and are relayed
        only then; a read runs in a session read only by default, so one the checks then
        refuse has changed nothing.
        """
        auth = portal.auth
        assert auth is not None
        conn = await self._connection(auth)
        name = portal.name
        # Outputs only the gateway can mask come in text, whatever the client asked for: a
        # masked value is text, whose binary form is its text.
        here = masking.masked_here(auth.facts, auth.decision, auth.target.masked)
        asked = _formats(portal.result_formats, len(auth.facts.outputs))
        formats = tuple(0 if i in here else f for i, f in enumerate(asked)) if here else \
            portal.result_formats
        setup, self.setup = self.setup, None
        conn.send(
            *([m.query(setup)] if setup else []),
            m.parse("", auth.target.sql, portal.statement.oids),
            m.bind(name, "", param_formats, portal.params, formats),
            m.describe("P", name),
            *((m.execute(name, run), m.SYNC) if run is not None else (m.FLUSH,)),
        )
        portal.executing = run is not None
        if setup:
            await self._drain_setup()
        await self._expect(_ONE)
        await self._expect(_TWO)
        kind, payload = await self._next()
        if kind == _T:
            fields, plan = await self._described(payload, auth.facts, auth.rules, auth.target)
            masked = {i for i, _ in plan.maskers}
            if masked != set(here):  # the facts said otherwise: never send a raw value
                raise Forbidden("facts_mismatch", "the outputs to mask differ from the facts'",
                                decision_id=auth.decision.id)
            if masked:
                fields = tuple(dataclasses.replace(f, format=asked[i]) if i in masked else f
                               for i, f in enumerate(fields))
            portal.plan, portal.mask_here = plan, bool(masked)
            portal.description = m.row_description(fields)
        elif kind == _n:
            portal.description = m.no_data()
        else:
            raise self._unexpected(kind)

    async def _described(
        self, payload: bytes, facts: Any, rules: masking.Rules, target: Target,
    ) -> tuple[tuple[m.Field, ...], masking.MaskPlan]:
        """The server's columns, checked against the facts (``cross_check``), and the
        masking plan; outputs masked here are text (the rest as the server gave them)."""
        fields = m.parse_row_description(payload)
        columns = tuple([Column(f.name, await self.server.type_name(f.type_oid)) for f in fields])
        cross_check(facts, columns, target.masked)
        plan = rules.for_columns(facts, columns)
        here = {i for i, _ in plan.maskers}
        if here:
            fields = tuple(dataclasses.replace(f, type_oid=TEXT_OID, type_size=-1, type_mod=-1)
                           if i in here else f for i, f in enumerate(fields))
        return fields, plan

    async def _describe_statement(self, statement: _Prepared) -> None:
        """ParameterDescription and RowDescription of a statement, by the connection its
        first Bind would use (the profile decides the output types of masked columns)."""
        audit, budget, meta = self._request("extended")
        audit.explain = True  # a decision on record, nothing executed
        audit.clock.span = tracing.statement_span("pgwire")
        with tracing.current(audit.clock.span):
            await self._describe_governed(statement, audit, budget, meta)

    async def _describe_governed(self, statement: _Prepared, audit: RequestAudit,
                                 budget: pipeline.Budget, meta: Meta) -> None:
        gateway = self.gateway
        async with pipeline.guard(audit, budget):
            pipeline.admit(gateway, self.identity)
            catalog = gateway.catalog
            if catalog is None:
                raise Unavailable("database_unavailable", "the catalog has not been read yet")
            facts = gateway.extractor.extract(statement.sql, catalog)
            ev = await pipeline.evaluate(gateway, audit, self.identity,
                                         Statement(statement.sql, (None,) * facts.param_count),
                                         meta)
            pipeline.enforce(ev.decision, ev.facts)
            target, enforced = await gateway.target_for(self.identity, ev.facts, ev.decision,
                                                        statement.sql)
            await audit.decided("allow", gate=False)
        rules = masking.Rules(enforced, gateway.mask_key, gateway.settings.mask_redact_token,
                              target.masked)
        if target.profile is None:
            raise Forbidden("unsupported_statement", "DDL is not served on the wire protocol "
                            "yet; use POST /v1/query", decision_id=enforced.id)
        if self.backend is not None:
            if target.profile != self.role:
                raise Forbidden("profile_changed", "this statement runs under another masking "
                                "profile than the statements before it in this transaction")
            await self._describe_on(self.backend, statement, target, ev.facts, rules)
            return
        pool, conn = await self.server.checkout(target.profile)
        try:
            await self._describe_on(conn, statement, target, ev.facts, rules)
        finally:
            conn.send(m.SYNC)
            try:
                while conn.pending:
                    await conn.read()
            except Exception:
                pool.discard(conn)
            else:
                await pool.release(conn)

    async def _describe_on(self, conn: BackendConnection, statement: _Prepared, target: Target,
                           facts: Any, rules: masking.Rules) -> None:
        conn.send(m.parse("", target.sql, statement.oids), m.describe("S", ""), m.FLUSH)
        while True:
            kind, payload = await conn.read()
            if kind == _E:
                raise backend_error(m.parse_error_fields(payload))
            if kind == _t:
                self.out.append(m.parameter_description(m.parse_parameter_description(payload)))
            elif kind == _T:
                fields, _ = await self._described(payload, facts, rules, target)
                self.out.append(m.row_description(fields))
                return
            elif kind == _n:
                self.out.append(m.no_data())
                return

    async def _run(self, portal: _Portal, *, describe: bool, max_rows: int) -> None:
        """Execute a governed portal (opened here for a simple Query), relaying its rows."""
        auth, audit, budget = portal.auth, portal.audit, portal.budget
        assert auth is not None and audit is not None and budget is not None
        # What the client has not been sent yet of this portal is withdrawn if it fails: rows
        # whose decision or outcome did not become durable, RETURNING rows of a write the
        # blast radius rolled back. (A flush of its rows waited for its decision first.)
        mark = (self.flushes, len(self.out))
        try:
            async with pipeline.within(budget.stream_at):
                if portal.description is None:
                    cap = auth.max_rows
                    one_trip = _reads(auth) and self.tx is None and self.backend is None
                    await self._open(portal, run=(cap or 0) if one_trip else None)
                if describe and portal.description is not None:
                    if portal.description[0] != _n:
                        self.out.append(portal.description)
                await self._relay(portal, max_rows)
        except GatewayError as exc:
            if self.flushes == mark[0]:
                del self.out[mark[1]:]
            if exc.code == "request_timeout" and self.backend is not None:
                # Past the deadline the connection's state is unknown: it goes.
                self.backend.terminate()
                await self._release(drop=True)
            await self._failed(portal, exc)
            raise
        except (OSError, ConnectionError) as exc:
            if self.flushes == mark[0]:
                del self.out[mark[1]:]
            error = Unavailable("database_unavailable", "the database connection failed")
            await self._release(drop=True)
            await self._failed(portal, error)
            raise error from exc

    async def _relay(self, portal: _Portal, max_rows: int) -> None:
        auth, conn = portal.auth, self.backend
        assert auth is not None and conn is not None
        name = portal.name
        cap = auth.max_rows
        want = max_rows
        if cap is not None:
            left = cap - portal.sent
            want = left if want == 0 else min(want, left)
        if portal.executing:
            portal.executing = False  # its Execute went with its Bind
        elif cap is not None and want <= 0:
            await self._truncate(portal, conn, name)
            return
        else:
            conn.send(m.execute(name, want), m.FLUSH)
        plan = portal.plan if portal.mask_here else None
        # A write's rows (RETURNING) wait for its blast radius, known at its CommandComplete
        # only: none is flushed before, and those past the limit (its check will fail) are
        # not kept.
        limit = auth.max_rows_affected if _writes(auth) else None
        while True:
            rows = await conn.read_rows()
            if rows:
                portal.sent += _count_rows(rows)
                if limit is not None:
                    if portal.sent <= limit:
                        self.out.append(rows if plan is None else _masked(rows, plan))
                    continue
                self.out.append(rows if plan is None else _masked(rows, plan))
                if sum(len(b) for b in self.out) > 256 * 1024:
                    if auth.durable is not None:
                        await auth.durable  # no row before its decision is durable
                    await self._flush()
                continue
            kind, payload = await self._next()
            if kind == _C:
                tag = m.parse_command_complete(payload)
                await self._completed(portal, tag)
                return
            if kind == _s:
                if limit is not None:
                    # PostgreSQL ran the write to its end; how many rows it changed, which
                    # the blast radius bounds, only its CommandComplete says.
                    self.rollback_at_sync = True
                    raise Forbidden(
                        "unsupported_construct",
                        "a write's rows (RETURNING) cannot be fetched in parts, by an Execute "
                        "with a row limit or past policy's max_rows: its blast radius is "
                        "known only at its end; it was rolled back",
                    )
                if cap is not None and portal.sent >= cap:
                    await self._truncate(portal, conn, name)
                    return
                if auth.durable is not None:
                    await auth.durable  # these rows go out now: their decision first
                self.out.append(m.portal_suspended())
                return
            if kind == _E:
                raise backend_error(m.parse_error_fields(payload))
            if kind == ord("I"):
                self.out.append(m.empty_query_response())
                return
            raise self._unexpected(kind)

    async def _completed(self, portal: _Portal, tag: str) -> None:
        auth, audit = portal.auth, portal.audit
        assert auth is not None and audit is not None
        affected = _affected(tag, auth)
        limit = auth.max_rows_affected
        if affected is not None and limit is not None and affected > limit:
            self.rollback_at_sync = True
            raise Forbidden(
                "blast_radius_exceeded",
                f"the statement affected {affected} rows, more than the {limit} allowed; it "
                "was rolled back", rows_affected=affected, max_rows_affected=limit,
            )
        portal.done, portal.tag = True, tag
        self.out.append(m.command_complete(tag))
        await pipeline.finished(self.gateway, audit, auth.facts, rows_returned=portal.sent,
                                rows_affected=affected, truncated=portal.truncated,
                                masked=portal.plan.masked if portal.plan is not None else {},
                                decision_durable=auth.durable, allowance=auth.allowance)
        self._end_portal(portal)

    async def _truncate(self, portal: _Portal, conn: BackendConnection, name: str) -> None:
        """The policy's row cap reached: the portal ends there, as if it had no more rows."""
        auth = portal.auth
        assert auth is not None
        if not conn.pending:  # else a Sync is on its way, which ends the portal anyway
            conn.send(m.close("P", name), m.FLUSH)
            await self._expect(_THREE)
        portal.truncated = True
        self.out.append(m.notice_response(m.error_fields(
            "NOTICE", "01000", f"querygate: the answer was cut at {auth.max_rows} rows by "
            "policy (max_rows)")))
        await self._completed(portal, f"SELECT {portal.sent}")

    async def _failed(self, portal: _Portal, exc: GatewayError) -> None:
        audit = portal.audit
        if audit is not None:
            await audit.refused(exc)
        if self.tx is None:
            self.rollback_at_sync = True
        portal.done, portal.tag = True, None
        self._end_portal(portal)

    def _end_portal(self, portal: _Portal) -> None:
        if portal.budget is not None:
            _free(portal.budget)
            portal.budget = None
        if portal.auth is not None and portal.auth.allowance is not None:
            # A row budget's reservation: what reached the client counts, the rest goes back
            # (a completed portal settled it already; a failed or abandoned one, here).
            portal.auth.allowance.settle(portal.sent)
        if portal.audit is not None and portal.auth is not None and not portal.done:
            portal.audit.aborted(rows_returned=portal.sent)
            portal.auth = None

    async def _finish_autocommit(self) -> None:
        """Outside a transaction: end an autocommit write, give the connection back."""
        if self.backend is None:
            return
        if self.commit_at_sync or self.rollback_at_sync:
            end = "ROLLBACK" if self.rollback_at_sync else "COMMIT"
            self.commit_at_sync = self.rollback_at_sync = False
            if self.backend.status != b"I":
                try:
                    await self.backend.simple(end)
                except Exception:
                    await self._release(drop=True)
                    return
        await self._release()

    async def _release(self, drop: bool = False) -> None:
        conn, pool, clean = self.backend, self.pool, self.clean
        self.backend = self.pool = self.role = None
        self.commit_at_sync = self.rollback_at_sync = self.clean = False
        if conn is None or pool is None:
            return
        if drop or conn.pending or conn.cancelled:
            pool.discard(conn)
        else:
            await pool.release(conn, reset=not (clean and conn.status == b"I"))

    async def _next(self) -> tuple[int, bytes]:
        assert self.backend is not None
        while True:
            kind, payload = await self.backend.read()
            if kind == _N:
                self.out.append(_notice(payload))
                continue
            if kind == ord("S"):
                continue  # the gateway reports the session's own parameters
            return kind, payload

    async def _expect(self, want: int) -> None:
        kind, payload = await self._next()
        if kind == _E:
            raise backend_error(m.parse_error_fields(payload))
        if kind != want:
            raise self._unexpected(kind)

    async def _until_ready(self) -> None:
        assert self.backend is not None
        while self.backend.pending:
            kind, payload = await self._next()
            if kind == _E:
                self._error(backend_error(m.parse_error_fields(payload)))

    def _unexpected(self, kind: int) -> GatewayError:
        log.error("unexpected backend message %r in session %s", chr(kind), self.id)
        if self.backend is not None:
            self.backend.terminate()
        return Unavailable("database_unavailable", "the database connection failed")

    # -- what the session answers itself -------------------------------------------------------

    async def _local(self, statement: _Prepared, describe: bool) -> None:
        """A statement the session answers itself, under the caller's rate like any other; a
        refusal is on record as a decision (by the gateway), what it did as a ``session``
        event naming the command (never a value)."""
        audit, budget, _ = self._request("simple" if describe else "extended")
        audit.sql = statement.sql
        async with pipeline.guard(audit, budget):
            pipeline.admit(self.gateway, self.identity)
            await self._answer_local(statement, describe)
        command = " ".join(statement.sql.split()[:1]).upper()
        audit.session_command(command)

    async def _answer_local(self, statement: _Prepared, describe: bool) -> None:
        node = statement.local
        assert node is not None
        tree = grammar.statement_tree(statement.sql)
        if node.kind == "transaction_stmt":
            await self._transaction(statement.sql, tree)
        elif node.kind == "variable_set_stmt":
            await self._set(tree)
        elif node.kind == "variable_show_stmt":
            await self._show(tree, describe)
        elif node.kind == "deallocate_stmt":
            # The session's named statements are its own (each Bind parses anew).
            if tree.get("isall"):
                self.statements = {k: v for k, v in self.statements.items() if not k}
                self.out.append(m.command_complete("DEALLOCATE ALL"))
            else:
                name = str(tree.get("name", ""))
                if self.statements.pop(name, None) is None:
                    raise WireError("unknown_statement", sqlstate="26000",
                                    message=f"prepared statement {name!r} does not exist")
                self.out.append(m.command_complete("DEALLOCATE"))
        elif node.kind == "discard_stmt":
            if self.tx is not None:
                raise WireError("active_sql_transaction", sqlstate="25001",
                                message="DISCARD ALL cannot run inside a transaction block")
            self.settings.clear()
            self.statements.clear()
            self.out.append(m.command_complete("DISCARD ALL"))

    async def _transaction(self, sql: str, tree: dict[str, Any]) -> None:
        kind = tree.get("kind", "")
        if kind in ("TRANS_STMT_BEGIN", "TRANS_STMT_START"):
            if self.tx is not None:
                self.out.append(m.notice_response(m.error_fields(
                    "WARNING", "25001", "there is already a transaction in progress")))
            else:
                self.tx = _Transaction(_begin(tree), _read_only(tree))
                await self._release()
            self.out.append(m.command_complete("BEGIN" if kind == "TRANS_STMT_BEGIN"
                                               else "START TRANSACTION"))
        elif kind in ("TRANS_STMT_COMMIT", "TRANS_STMT_ROLLBACK"):
            if self.tx is None:
                self.out.append(m.notice_response(m.error_fields(
                    "WARNING", "25P01", "there is no transaction in progress")))
                self.out.append(m.command_complete("COMMIT" if kind == "TRANS_STMT_COMMIT"
                                                   else "ROLLBACK"))
                return
            aborted = self.tx.aborted
            self.tx = None
            end = "COMMIT" if kind == "TRANS_STMT_COMMIT" and not aborted else "ROLLBACK"
            await self._end_transaction(end)
        elif kind in ("TRANS_STMT_SAVEPOINT", "TRANS_STMT_RELEASE", "TRANS_STMT_ROLLBACK_TO"):
            if self.tx is None:
                raise WireError("no_active_sql_transaction", sqlstate="25P01",
                                message=f"{sql.split()[0].upper()} can only be used in transaction blocks")
            if self.backend is None:
                if self.tx.aborted:
                    raise _aborted()
                self.tx.pending.append(sql)
                tag = {"TRANS_STMT_SAVEPOINT": "SAVEPOINT", "TRANS_STMT_RELEASE": "RELEASE"
                       }.get(kind, "ROLLBACK")
                self.out.append(m.command_complete(tag))
                return
            if self.tx.aborted and self.backend.status != b"E":
                # Refused by the gateway, not failed in the database: only ROLLBACK ends it.
                raise _aborted()
            out = await self._forward(sql)
            if self.backend is not None and self.backend.status == b"T":
                self.tx.aborted = False
            self.out.extend(out)
        else:
            raise WireError("unsupported_statement", sqlstate="0A000",
                            message="prepared transactions are not supported by the gateway")

    async def _end_transaction(self, end: str, quiet: bool = False) -> None:
        # A transaction's portals end with it, as in PostgreSQL.
        for portal in self.portals.values():
            self._end_portal(portal)
        self.portals.clear()
        if self.backend is None:
            if not quiet:
                self.out.append(m.command_complete(end))
            return
        try:
            out = await self._forward(end)
        except GatewayError:
            await self._release(drop=True)
            raise
        if not quiet:
            self.out.extend(out)
        await self._release()

    async def _forward(self, sql: str) -> list[bytes]:
        assert self.backend is not None
        self.clean = False
        try:
            answer = await self.backend.simple(sql)
        except Exception as exc:
            raise _translated(exc) from None
        return [m._msg(bytes([k]), p) for k, p in answer if k == _C]

    async def _set(self, tree: dict[str, Any]) -> None:
        kind = tree.get("kind", "")
        name = str(tree.get("name", "")).lower()
        if kind == "VAR_RESET_ALL":
            for key in list(self.settings):
                self._reset(key)
            self.out.append(m.command_complete("RESET"))
            return
        if tree.get("is_local") or kind in ("VAR_SET_MULTI",):
            raise WireError("unsupported_statement", sqlstate="0A000",
                            message="SET LOCAL and SET TRANSACTION/SESSION CHARACTERISTICS are not "
                            "supported by the gateway; give the options to BEGIN")
        if name == APPROVAL_SETTING and kind == "VAR_SET_VALUE" and not self.tx:
            # The approval the next statement uses (pipeline.Statement.approval_id): once.
            self.approval = _set_value(tree)
            self.out.append(m.command_complete("SET"))
            return
        if name not in SETTABLE:
            raise Forbidden("setting_not_allowed",
                            f"parameter {name!r} cannot be set through the gateway "
                            "(docs/pgwire.md lists those that can)")
        if kind in ("VAR_RESET", "VAR_SET_DEFAULT"):
            self._reset(name)
            self.out.append(m.command_complete("RESET" if kind == "VAR_RESET" else "SET"))
            return
        value = _set_value(tree)
        if name == "client_encoding":
            if value.lower().replace("-", "") not in ("utf8", "unicode"):
                raise WireError("invalid_parameters", sqlstate="22023",
                                message="the gateway speaks UTF8 only (client_encoding)")
            self.out.append(m.command_complete("SET"))
            return
        self.settings[name] = await self.server.check_setting(name, value)
        if self.backend is not None and name not in _NOT_REPLAYED:
            await self._forward(f"SELECT pg_catalog.set_config({_literal(name)}, "
                                f"{_literal(self.settings[name])}, false)")
        if name in REPORTED:
            self.out.append(m.parameter_status(REPORTED[name], self.settings[name]))
        self.out.append(m.command_complete("SET"))

    def _reset(self, name: str) -> None:
        self.settings.pop(name, None)
        if name in REPORTED and name in self.server.defaults:
            self.out.append(m.parameter_status(REPORTED[name], self.server.defaults[name]))

    async def _show(self, tree: dict[str, Any], describe: bool) -> None:
        name = str(tree.get("name", "")).lower()
        if name == "transaction isolation level":
            name = "transaction_isolation"
        if name not in SHOWABLE:
            raise Forbidden("setting_not_allowed",
                            f"parameter {name!r} cannot be shown through the gateway")
        if name in self.settings:
            value = self.settings[name]
        elif name in ("transaction_isolation", "transaction_read_only") and self.backend:
            rows = await self.backend.simple(f"SHOW {name}")
            value = next((m.parse_data_row(p)[0] or b"").decode() for k, p in rows if k == _D)
        else:
            value = await self.server.show(name)
        if describe:
            self.out.append(m.row_description([m.Field(name, type_oid=TEXT_OID)]))
        self.out.append(m.data_row([value.encode()]))
        self.out.append(m.command_complete("SHOW"))


# --- helpers ----------------------------------------------------------------------------------

_LOCAL = frozenset({"transaction_stmt", "variable_set_stmt", "variable_show_stmt",
                    "discard_stmt", "deallocate_stmt"})


def _is_transaction(node: grammar.PgStatement) -> bool:
    return node.kind == "transaction_stmt"


def _ends_transaction(node: grammar.PgStatement | None) -> bool:
    # Only ROLLBACK (or COMMIT, which then rolls back) leaves an aborted transaction; ROLLBACK
    # TO a savepoint does where the database failed it (checked where it is answered).
    return node is not None and node.kind == "transaction_stmt"


_ISOLATION = frozenset({"serializable", "repeatable read", "read committed", "read uncommitted"})


def _begin(tree: dict[str, Any]) -> str:
    """The client's BEGIN, rebuilt from PostgreSQL's reading of it (never its text)."""
    parts = ["BEGIN"]
    for option in tree.get("options", ()):
        elem = option.get("DefElem", {})
        name, const = elem.get("defname"), elem.get("arg", {}).get("A_Const", {})
        flag = bool(const.get("ival", {}).get("ival", 0))
        if name == "transaction_isolation":
            level = str(const.get("sval", {}).get("sval", "")).lower()
            if level not in _ISOLATION:
                raise WireError("invalid_parameters", sqlstate="22023", message="unknown isolation level")
            parts.append(f"ISOLATION LEVEL {level.upper()}")
        elif name == "transaction_read_only":
            parts.append("READ ONLY" if flag else "READ WRITE")
        elif name == "transaction_deferrable":
            parts.append("DEFERRABLE" if flag else "NOT DEFERRABLE")
    return " ".join(parts)


def _read_only(tree: dict[str, Any]) -> bool | None:
    for option in tree.get("options", ()):
        elem = option.get("DefElem", {})
        if elem.get("defname") == "transaction_read_only":
            return bool(elem.get("arg", {}).get("A_Const", {}).get("ival", {}).get("ival", 0))
    return None


def _read_write(tx: _Transaction, auth: Authorized) -> str:
    # Profile sessions are read only by default: a transaction whose first statement writes
    # is READ WRITE, unless its BEGIN said READ ONLY (the write then fails in the database).
    if tx.read_only is None and _writes(auth):
        return " READ WRITE"
    return ""


def _reads(auth: Authorized) -> bool:
    return auth.facts.kind == "select" and not auth.facts.tables_write


def _writes(auth: Authorized) -> bool:
    return auth.facts.kind in ("insert", "update", "delete", "merge") or bool(
        auth.facts.tables_write)


def _set_value(tree: dict[str, Any]) -> str:
    parts = []
    for arg in tree.get("args", ()):
        const = arg.get("A_Const")
        if const is None:
            raise WireError("unsupported_statement", sqlstate="0A000",
                            message="only constant values can be SET through the gateway")
        for key in ("sval", "ival", "fval", "boolval"):
            if key in const:
                inner = const[key]
                value = inner.get(key, 0 if key == "ival" else "") if isinstance(inner, dict) else inner
                parts.append(str(value).lower() if key == "boolval" else str(value))
                break
        else:
            parts.append("")
    return ", ".join(parts)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _params_for_policy(formats: Sequence[int], params: Sequence[bytes | None]) -> list[Any]:
    """Parameters as the pipeline records them for approvals: text as text, binary as hex."""
    out: list[Any] = []
    for index, value in enumerate(params):
        fmt = formats[0] if len(formats) == 1 else (formats[index] if formats else 0)
        if value is None:
            out.append(None)
        elif fmt == 1:
            out.append("\\x" + value.hex())
        else:
            out.append(value.decode(errors="replace"))
    return out


def _formats(asked: Sequence[int], columns: int) -> tuple[int, ...]:
    """Bind's result formats, one per column (none: all text; one: all that one)."""
    if not asked:
        return (0,) * columns
    if len(asked) == 1:
        return (asked[0],) * columns
    return tuple(asked)


def _count_rows(rows: bytes) -> int:
    count, pos, size = 0, 0, len(rows)
    unpack = _U32.unpack_from
    while pos < size:
        (length,) = unpack(rows, pos + 1)
        pos += 1 + length
        count += 1
    return count


def _masked(rows: bytes, plan: Any) -> bytes:
    """Text DataRows with the gateway's maskers applied to their columns."""
    out = []
    pos, size = 0, len(rows)
    while pos < size:
        (length,) = _U32.unpack_from(rows, pos + 1)
        values = m.parse_data_row(rows[pos + 5:pos + 1 + length])
        for index, masker in plan.maskers:
            raw = values[index]
            masked = masker(None if raw is None else raw.decode())
            values[index] = None if masked is None else str(masked).encode()
        out.append(m.data_row(values))
        pos += 1 + length
    return b"".join(out)


def _notice(payload: bytes) -> bytes:
    """A server notice, passed on without its text (it may hold values: dberrors.notice)."""
    fields = m.parse_error_fields(payload)
    severity = fields.get("V") or fields.get("S") or "NOTICE"
    sqlstate = fields.get("C", "00000")
    condition = dberrors.condition_name(sqlstate)
    return m.notice_response(m.error_fields(
        severity, sqlstate, f"{condition}: the database sent a {severity.lower()}; its text is "
        "withheld as it may hold values"))


def _local_description(node: grammar.PgStatement | None) -> bytes:
    if node is not None and node.kind == "variable_show_stmt":
        return m.row_description([m.Field("setting", type_oid=TEXT_OID)])
    return m.no_data()


def _affected(tag: str, auth: Authorized) -> int | None:
    if auth.facts.kind not in ("insert", "update", "delete", "merge"):
        return None
    last = tag.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else None


def _translated(exc: BaseException) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, BackendError):
        return backend_error(dict(exc.fields))
    return Unavailable("database_unavailable", "the database connection failed")


def _free(budget: pipeline.Budget) -> None:
    slot = budget.slot
    if slot is not None:
        slot.release()
        budget.slot = None


def _held(outcome: Held) -> WireError:
    approval = outcome.approval
    return WireError("approval_required", sqlstate="QG001",
                     message=f"the statement needs an approval: {approval.reason}",
        hint=f"approval {approval.id} was requested; once it is approved, run "
        f"SET querygate.approval = '{approval.id}' and then the same statement",
        decision_id=outcome.decision.id, approval_id=approval.id,
    )

