"""The HTTP surface: parse the request, call the stages in order, render one error shape.

``create_app(settings)`` is the factory; the lifespan owns every client (PostgreSQL pool,
OPA client, catalog refresher) and routes reach them through ``request.app.state.gateway``.
Data moves forward only: identity → facts → policy → executor; no stage calls back here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import decimal
import logging
import secrets
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import grammar, masking
from app import profiles as masking_profiles
from app.approvals import Approval, ApprovalStore, Notifier, validate_comment
from app.audit import AuditLog, RequestAudit
from app.catalog import Catalog, introspect
from app.config import ConfigError, Settings
from app.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    GatewayTimeout,
    Internal,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
    Unavailable,
    Unprocessable,
)
from app.executor import CleanSessions, Executor, Result, Target, connection_settings
from app.facts import FactsExtractor, QueryFacts
from app.identity import Authenticator, Identity
from app.limits import CallerLimits, Slot
from app.liveness import Heartbeat
from app.metrics import CONTENT_TYPE_LATEST, REQUEST_ID, Metrics, MetricsMiddleware, StageClock
from app.policy import Decision, PolicyClient
from app.profiles import ProfileDecisions, Profiles, ProfileSpec, quote_ident

log = logging.getLogger("querygate.api")


class QueryRequest(BaseModel):
    """The body of /v1/query and /v1/explain."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sql: str = Field(min_length=1)
    params: list[JsonValue] = Field(default_factory=list)
    # The approval this re-submission uses (from a 202 answer to the same request).
    approval_id: str | None = Field(default=None, max_length=64)


def _json_default(value: Any) -> Any:
    if isinstance(value, decimal.Decimal):
        # A string keeps every digit; a float would not.
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, dt.timedelta):
        return str(value)
    return str(value)


def render(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialise with orjson (datetimes, UUIDs, Decimals handled)."""
    return Response(
        orjson.dumps(content, default=_json_default, option=orjson.OPT_NON_STR_KEYS),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


@dataclass(slots=True)
class Gateway:
    """Everything the request path needs; built and torn down by the lifespan."""

    settings: Settings
    authenticator: Authenticator
    extractor: FactsExtractor
    policy: PolicyClient
    mask_key: bytes = b""
    notifier: Notifier = field(default_factory=lambda: Notifier(None))
    approvals: ApprovalStore | None = None
    pool: asyncpg.Pool | None = None
    catalog: Catalog | None = None
    executor: Executor | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    audit: AuditLog | None = None
    profiles: Profiles | None = None
    profile_decisions: ProfileDecisions = field(default_factory=lambda: ProfileDecisions(30.0))
    limits: CallerLimits = field(default_factory=lambda: CallerLimits(0, 1, 0))
    heartbeat: Heartbeat = field(default_factory=lambda: Heartbeat(2.0))

    async def connect(self) -> None:
        """Open the pool and read the catalog; failures leave the gateway not ready."""
        settings = self.settings
        assert settings.database_url is not None
        search_path = ", ".join(['"pg_catalog"', *(f'"{s}"' for s in settings.schemas), '"pg_temp"'])
        sessions = CleanSessions()
        self.pool = await asyncpg.create_pool(
            settings.database_url.get_secret_value(),
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            timeout=settings.db_connect_timeout_ms / 1000,
            # Resolution in the extractor assumes exactly this search path.
            server_settings={
                "search_path": search_path,
                "application_name": "querygate",
                **connection_settings(settings.statement_timeout_ms),
            },
            init=sessions.forget,
            reset=sessions.reset,
        )
        await self._check_login_role()
        await self._check_database()
        self.approvals = ApprovalStore(self.pool)
        await self.approvals.migrate()
        self.executor = Executor(
            self.pool, sessions, acquire_timeout_s=settings.pool_acquire_timeout_ms / 1000,
            timeout_s=settings.request_timeout_s,
        )
        self.profiles = Profiles(
            self.pool,
            settings.database_url.get_secret_value(),
            tuple(settings.schemas),
            self.mask_key,
            settings.mask_redact_token,
            {"application_name": "querygate", **connection_settings(settings.statement_timeout_ms)},
            settings.profile_pool_max,
            settings.max_profiles,
            settings.db_connect_timeout_ms / 1000,
            init=sessions.forget,
            reset=sessions.reset,
        )
        await self.profiles.migrate()
        self.profile_decisions = ProfileDecisions(settings.profile_cache_ttl_s)
        await self.refresh_catalog()

    async def _check_login_role(self) -> None:
        """In prod, refuse a login role that policy could not contain."""
        assert self.pool is not None
        row = await self.pool.fetchrow(
            "SELECT rolsuper, rolbypassrls FROM pg_catalog.pg_roles WHERE rolname = current_user"
        )
        risky = bool(row and (row["rolsuper"] or row["rolbypassrls"]))
        if risky and self.settings.environment == "prod":
            await self.pool.close()
            self.pool = None
            raise ConfigError(
                "QUERYGATE_DATABASE_URL: the gateway's login role is a superuser or bypasses row "
                "security; in prod it must be an ordinary role (SET LOCAL ROLE and RLS rely on it)"
            )
        if risky:
            log.warning("the gateway's login role is a superuser or bypasses RLS (allowed outside prod)")

    async def _check_database(self) -> None:
        """Masking is enforced by the database: refuse to serve where it could not be."""
        assert self.pool is not None
        schemas = tuple(self.settings.schemas)
        prod = self.settings.environment == "prod"
        problems: list[str] = []
        async with self.pool.acquire() as conn:
            version = int(await conn.fetchval("SHOW server_version_num"))
            if not await masking_profiles.initialised(conn):
                problems.append(
                    "the database has not been initialised for masking: run `querygate db init` "
                    "as a DBA (docs/masking.md)"
                )
            else:
                grants = await masking_profiles.public_grants(conn, schemas)
                if grants:
                    problems.append(
                        "PUBLIC holds privileges on exposed objects, so every masking profile "
                        "would too; revoke them: " + "; ".join(grants)
                    )
                owned = await masking_profiles.owned_exposed_tables(conn, schemas) if prod else []
                if owned:
                    problems.append(
                        "the gateway's login role owns exposed relations (an owner bypasses row "
                        "security and can change their privileges): " + ", ".join(owned)
                    )
                if not problems:
                    await masking_profiles.store_key(conn, self.mask_key)
        outdated = masking_profiles.server_version_problem(version)
        if outdated and prod:
            problems.append(outdated)
        elif outdated:
            log.warning("%s; allowed outside prod", outdated)
        if problems:
            await self.pool.close()
            self.pool = None
            raise ConfigError("QUERYGATE_DATABASE_URL: " + " | ".join(problems))

    async def target_for(
        self, identity: Identity, facts: QueryFacts, decision: Decision, sql: str
    ) -> tuple[Target, Decision]:
        """Where the statement runs, and the decision with the masks the database enforces.

        DDL changes objects rather than reading values, and needs the privileges of their
        owner: it runs on the login role's pool (SET LOCAL ROLE the decision's db_role), after
        the profile views of its tables are dropped so PostgreSQL lets it change them. Every
        other statement runs under a masking profile chosen from the identity by policy; the
        decision may only add masks to it.
        """
        assert self.executor is not None and self.profiles is not None
        catalog = self.catalog
        if catalog is None:
            raise Unavailable("database_unavailable", "the catalog has not been read yet")
        profile_masks = await self.profile_masks(identity, catalog, decision.bundle_revision)
        masks = {**decision.masks, **profile_masks}
        if facts.kind == "ddl":
            tables = facts.ddl.targets if facts.ddl is not None else ()
            # DDL runs as the tables' owner, outside every profile: an expression of it that
            # reads a column (ALTER … TYPE … USING ssn, GENERATED ALWAYS AS (ssn), a CHECK
            # that fails on some ssn) would copy or test raw values the caller sees masked.
            copied = sorted(
                f"{table}.{column}"
                for table in tables
                for column in grammar.column_references(sql)
                if f"{table}.{column}" in masks
            )
            # Classification follows names: renaming a masked column, or a table holding
            # one, could move its values out of their class for every reader.
            renamed = sorted(
                f"{table}.{column}" if column else table
                for kind, column in grammar.renames(sql)
                for table in tables
                if (column and f"{table}.{column}" in masks)
                or (kind != "column" and any(m.startswith(f"{table}.") for m in masks))
            )
            if copied or renamed:
                raise Forbidden(
                    "ddl_masked_column",
                    "DDL that reads or renames what is masked for you is refused: "
                    + ", ".join(copied + renamed),
                    columns=copied + renamed,
                    decision_id=decision.id,
                )
            store = self.profiles
            # CREATE makes an unqualified object in the first schema of the path, which must
            # be the configured one the facts resolved it to, not pg_catalog. (The facts
            # refuse unqualified names that pg_catalog shadows, so nothing else resolves
            # differently.)
            ddl_path = ", ".join(
                quote_ident(s) for s in (*self.settings.schemas, "pg_catalog", "pg_temp")
            )

            # Only DDL that PostgreSQL refuses under a dependent view drops the views (a
            # wrong guess here fails closed: the DDL errors, nothing leaks).
            destructive = facts.ddl is not None and (
                facts.ddl.operation == "drop" or {"drop", "alter_type"} & set(facts.ddl.actions)
            )

            async def drop_views(conn: asyncpg.Connection) -> None:
                if destructive:
                    await store.drop_views_of(conn, tables)
                await conn.execute(f"SET LOCAL search_path TO {ddl_path}")

            role = decision.db_role or self.settings.ddl_role
            base = self.executor.target(sql, role)
            return Target(base.pool, sql, role, prelude=drop_views), decision
        spec = ProfileSpec.of(masks, decision.db_role)
        if spec.masked and (only := grammar.only_relations(sql)):
            raise Forbidden(
                "unsupported_construct",
                "ONLY is not supported for callers with masked columns (their views of a "
                "parent table include its children): " + ", ".join(only),
                decision_id=decision.id,
            )
        profile = await self.profiles.get(spec, catalog)
        text = grammar.rewrite_schemas(sql, profile.schema_map) if profile.schema_map else sql
        enforced = dataclasses.replace(decision, masks=masks)
        return Target(profile.pool, text, None, frozenset(masks)), enforced

    async def profile_masks(
        self, identity: Identity, catalog: Catalog, revision: str | None
    ) -> dict[str, str]:
        """The caller's masking_profile masks (cached per identity and catalog version)."""
        identity_input = identity.to_input()
        key = orjson.dumps(
            [identity_input, self.settings.environment, catalog.version],
            option=orjson.OPT_SORT_KEYS,
        )
        cached = self.profile_decisions.get(key, revision)
        if cached is not None:
            return cached
        masks, answered = await self.policy.masking_profile({
            "identity": identity_input,
            "environment": self.settings.environment,
            "database": {"name": self.settings.database_name},
            "columns": catalog.columns(),
            "classification": catalog.classes,
        })
        self.profile_decisions.put(key, masks, answered)
        return masks

    async def refresh_catalog(self) -> Catalog:
        """Re-read the catalog; the version (and so the facts cache key) moves on change."""
        if self.pool is None:
            raise Unavailable("database_unavailable", "the database is not connected")
        before = self.catalog
        async with self.pool.acquire() as conn:
            self.catalog = await introspect(conn, tuple(self.settings.schemas), self.catalog)
            if self.profiles is not None:
                await self.profiles.check(conn, self.catalog)
        if before is not None and self.catalog.version != before.version and self.audit:
            # A schema change seen by the gateway, whoever made it.
            with contextlib.suppress(Unavailable):
                await self.audit.record(self.audit.event("catalog_changed", catalog={
                    "version_before": before.version, "version_after": self.catalog.version,
                    "relations": sum(len(t) for t in self.catalog.relations.values()),
                }), gate=False)
        return self.catalog

    async def maintain(self) -> None:
        """Keep trying to connect, then keep the catalog fresh."""
        while True:
            try:
                if self.pool is None:
                    await self.connect()
                else:
                    await self.refresh_catalog()
            except asyncio.CancelledError:
                raise
            except ConfigError as exc:
                log.error("%s", exc)
            except Exception as exc:
                log.warning("database maintenance failed: %s", type(exc).__name__)
            await asyncio.sleep(self.settings.catalog_refresh_s if self.pool is not None else 1.0)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.policy.close()
        await self.notifier.close()
        if self.profiles is not None:
            await self.profiles.close()
        await self.authenticator.close()
        if self.pool is not None:
            await close_pool(self.pool)
        if self.audit is not None:
            # Last: whatever the shutdown recorded is flushed and, if the sink answers, shipped.
            await self.audit.close()


# Shutdown waits this long for a pool's connections to come back, then terminates them all.
POOL_CLOSE_TIMEOUT_S = 5.0


async def close_pool(pool: asyncpg.Pool, timeout_s: float = POOL_CLOSE_TIMEOUT_S) -> None:
    """Close ``pool`` gracefully within ``timeout_s``, else terminate its connections."""
    try:
        # asyncpg's close() waits for every connection to be released, however long.
        await asyncio.wait_for(pool.close(), timeout_s)
    except Exception:
        pool.terminate()


class RequestIdMiddleware:
    """Give every request an id (or keep a sane caller-supplied one) and echo it back."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[..., Awaitable[Any]],
        send: Callable[..., Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        # Every log line written while serving this request carries its id.
        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "") or str(uuid.uuid4())


def _audit(request: Request) -> RequestAudit:
    """This request's audit context (the audit log is the lifespan's)."""
    gateway = _gateway(request)
    assert gateway.audit is not None
    return RequestAudit(
        log=gateway.audit,
        request_id=_request_id(request),
        source_ip=request.client.host if request.client else None,
        method=request.method,
        path=request.url.path,
        state=request.state,
        clock=StageClock(gateway.metrics),
    )


async def _authenticate(request: Request, gateway: Gateway, audit: RequestAudit) -> Identity:
    """The verified caller; a refusal is audited before the 401 goes out."""
    try:
        with audit.clock.timer("auth"):
            identity = await gateway.authenticator.authenticate(
                request.headers, request.client.host if request.client else None
            )
    except Unauthenticated as exc:
        await audit.auth_failed(exc)
        raise
    audit.identity = identity
    return identity


async def _require_admin(
    request: Request, gateway: Gateway, audit: RequestAudit, action: str
) -> Identity:
    """The verified caller, who must be in an admin group (a refusal is audited)."""
    identity = await _authenticate(request, gateway, audit)
    if not set(identity.groups) & set(gateway.settings.admin_groups):
        error = Forbidden("admin_required", "this endpoint needs an admin group")
        await audit.admin(action, "refused", code=error.code)
        raise error
    return identity


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def read_query(request: Request, settings: Settings) -> QueryRequest:
    """Read and validate the body within the size limit; one error shape for every failure."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_request_bytes:
        raise PayloadTooLarge(
            "payload_too_large", f"the request body is larger than {settings.max_request_bytes} bytes"
        )
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_request_bytes:
            raise PayloadTooLarge(
                "payload_too_large",
                f"the request body is larger than {settings.max_request_bytes} bytes",
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest("invalid_json", f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise Unprocessable("invalid_request", "the body must be a JSON object")
    sql = data.get("sql")
    if isinstance(sql, str) and len(sql.encode()) > settings.max_sql_bytes:
        raise PayloadTooLarge(
            "sql_too_large", f"the SQL text is larger than {settings.max_sql_bytes} bytes"
        )
    try:
        body = QueryRequest.model_validate(data)
    except ValidationError as exc:
        problems = [
            {"field": ".".join(str(p) for p in err["loc"]) or "body", "problem": err["msg"]}
            for err in exc.errors()
        ]
        raise Unprocessable(
            "invalid_request", "the request body does not match the schema", problems=problems
        ) from exc
    if len(body.params) > settings.max_params:
        raise Unprocessable("invalid_parameters", f"at most {settings.max_params} parameters")
    return body


def build_input(
    gateway: Gateway,
    identity: Identity,
    facts: QueryFacts,
    catalog: Catalog,
    request: Request,
    request_id: str,
    approval: Approval | None = None,
) -> dict[str, Any]:
    """The OPA input document (docs/decision-contract.md)."""
    return {
        "identity": identity.to_input(),
        "environment": gateway.settings.environment,
        "request": {
            "id": request_id,
            "source_ip": request.client.host if request.client else None,
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        },
        "database": {"name": gateway.settings.database_name},
        "query": facts.to_input(),
        # Classes the catalog gave columns by their names; policy data may override them.
        "classification": {
            col: catalog.classes[col]
            for col in (*facts.columns_read, *facts.columns_write)
            if col in catalog.classes
        },
        "approval": approval.to_policy_input() if approval else None,
    }


@dataclass(frozen=True, slots=True)
class Evaluation:
    """Who asked what, and what policy said: the front half of /v1/query and /v1/explain."""

    gateway: Gateway
    identity: Identity
    body: QueryRequest
    facts: QueryFacts
    decision: Decision
    request_id: str
    approval: Approval | None


async def evaluate(request: Request, audit: RequestAudit) -> Evaluation:
    """Who, what, decide — nothing executed; what is learnt is kept in ``audit``."""
    gateway = _gateway(request)
    request_id = _request_id(request)
    identity = await _authenticate(request, gateway, audit)
    gateway.limits.admit((identity.issuer, identity.sub))  # before any work: 429 rate_limited
    body = await read_query(request, gateway.settings)
    audit.sql = body.sql
    catalog = gateway.catalog
    if catalog is None or gateway.approvals is None:
        raise Unavailable("database_unavailable", "the catalog has not been read yet")
    with audit.clock.timer("facts"):
        facts = gateway.extractor.extract(body.sql, catalog)
    audit.facts = facts
    if len(body.params) != facts.param_count:
        raise Unprocessable(
            "invalid_parameters",
            f"the statement uses {facts.param_count} parameters; {len(body.params)} were given",
        )
    approval = None
    if body.approval_id is not None:
        # Bound to requester, SQL text, parameters and environment, or refused here.
        approval = await gateway.approvals.verify(
            body.approval_id, identity, gateway.settings.environment, body.sql, body.params
        )
    try:
        with audit.clock.timer("policy"):
            decision = await gateway.policy.decide(
                build_input(gateway, identity, facts, catalog, request, request_id, approval)
            )
    except Unavailable:
        gateway.metrics.opa_errors.inc()
        raise
    audit.decision = decision
    return Evaluation(gateway, identity, body, facts, decision, request_id, approval)


async def _approval_event(
    gateway: Gateway, audit: RequestAudit, approval: Approval, event: str, actor: str,
    gate: bool = False,
) -> None:
    """Audit (and, with a webhook, announce) an approval lifecycle step; never parameter values."""
    await audit.approval(event, approval, gate=gate, comment=approval.comment)
    if event in ("requested", "approved", "rejected"):
        gateway.notifier.notify(
            f"querygate approval {approval.id} {event} by {actor}: "
            f"{approval.reason} (requester {approval.requester.get('sub')}, "
            f"environment {approval.environment}, tables {', '.join(approval.tables)})"
        )


def _enforce(decision: Decision, facts: QueryFacts) -> None:
    # The caller audits the refusal (RequestAudit.refused) before it is answered.
    if not decision.allow:
        raise Forbidden(
            "policy_denied",
            "; ".join(r.message for r in decision.reasons) or "denied by policy",
            reasons=decision.reasons_json(),
            decision_id=decision.id,
        )
    masking.check_predicates(facts, decision)


def _decision_body(decision: Decision, plan: masking.MaskPlan) -> dict[str, Any]:
    # Names the masked outputs and their strategies; never a value.
    return {"id": decision.id, "reasons": decision.reasons_json(), "masked": plan.masked}


def _notices(facts: QueryFacts, decision: Decision) -> list[dict[str, str]]:
    """What the caller should know to read the answer right (never a value)."""
    compared = sorted(c for c in facts.columns_predicate if c in decision.masks)
    if not compared:
        return []
    return [{
        "code": "masked_predicate",
        "message": "these columns are masked, so filters, joins, grouping and sorting on them "
        "compared masked values, not the real ones: " + ", ".join(compared),
    }]


def _result_body(
    result: Result, decision: Decision, plan: masking.MaskPlan, facts: QueryFacts
) -> dict[str, Any]:
    notices = _notices(facts, decision)
    return {
        **({"notices": notices} if notices else {}),
        "columns": [{"name": c.name, "type": c.type} for c in result.columns],
        # Encoded by the executor as they came (_encode_row), to count the answer's bytes.
        "rows": [orjson.Fragment(r) if isinstance(r, bytes) else r for r in result.rows],
        "row_count": len(result.rows),
        "rows_affected": result.rows_affected,
        "truncated": result.truncated,
        "truncated_reason": result.truncated_reason,
        "decision": _decision_body(decision, plan),
    }


def _encode_row(row: Any) -> bytes:
    return orjson.dumps(row, default=_json_default)


# The request's own bound fires this long after its deadline. The executor closes a
# connection still in use at the deadline itself (and answers request_timeout), so a
# database call is always ended there; this ends whatever else is still waiting.
_BACKSTOP_S = 0.25


@dataclass(slots=True)
class _Budget:
    """A /v1/query's deadlines (event loop clock) and the caller's statement slot."""

    at: float
    stream_at: float
    slot: Slot | None = None

    @classmethod
    def start(cls, settings: Settings) -> _Budget:
        now = asyncio.get_running_loop().time()
        return cls(now + settings.request_timeout_s, now + settings.stream_timeout_s)

    def hand_off(self) -> Slot | None:
        """The slot, for a stream to release when it ends."""
        if self.slot is not None:
            self.slot.handed_off = True
        return self.slot

    def release(self) -> None:
        if self.slot is not None and not self.slot.handed_off:
            self.slot.release()


@contextlib.asynccontextmanager
async def _within(deadline: float) -> AsyncIterator[None]:
    """Bound the request's handling by its deadline: past it, 504 request_timeout."""
    try:
        async with asyncio.timeout_at(deadline + _BACKSTOP_S) as scope:
            yield
    except TimeoutError:
        if not scope.expired():
            raise
        raise GatewayTimeout(
            "request_timeout",
            "the request ran past its deadline (QUERYGATE_REQUEST_TIMEOUT_MS)",
        ) from None


class _BoundedStream(StreamingResponse):
    """An NDJSON answer that ends by its deadline and then frees the caller's slot.

    The executor closes the database connection at the deadline and the stream's last line
    says so; this bound is for a client that stopped reading, whose send would otherwise
    wait forever: the HTTP connection is dropped.
    """

    def __init__(self, content: AsyncIterator[bytes], deadline: float, slot: Slot | None) -> None:
        super().__init__(content, media_type=NDJSON)
        self.deadline = deadline
        self.slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with asyncio.timeout_at(self.deadline + _BACKSTOP_S):
                await super().__call__(scope, receive, send)
        except TimeoutError:
            log.warning("an NDJSON stream was dropped at its deadline: the client stopped reading")
        finally:
            if self.slot is not None:
                self.slot.release()


NDJSON = "application/x-ndjson"


def _wants_ndjson(request: Request) -> bool:
    return NDJSON in request.headers.get("accept", "")


@dataclass(frozen=True, slots=True)
class _TimedPlan(masking.MaskPlan):
    """A masking plan that adds the time it spends masking to the request's stage clock."""

    clock: StageClock | None = None

    def apply_all(self, rows: Any) -> list[list[Any]]:
        started = time.perf_counter()
        try:
            return masking.MaskPlan.apply_all(self, rows)
        finally:
            if self.clock is not None:
                self.clock.add("masking", time.perf_counter() - started)


def _database_time(clock: StageClock, started: float) -> None:
    """The executor's time less the masking done inside it."""
    total = time.perf_counter() - started
    clock.add("database", max(0.0, total - clock.durations_us.get("masking", 0) / 1_000_000))


async def _ndjson(
    first: masking.MaskPlan,
    batches: AsyncIterator[Any],
    decision: Decision,
    request_id: str,
    audit: RequestAudit,
    started: float,
    notices: list[dict[str, str]],
    max_bytes: int,
) -> AsyncIterator[bytes]:
    """Header line, one JSON array per row, then a summary (or error) line.

    The rows' lines stop at ``max_bytes``: the last line is then ``response_too_large``.
    """
    rows = 0
    size = 0
    try:
        yield orjson.dumps(
            {
                "columns": [{"name": c.name, "type": c.type} for c in first.columns],
                "decision": _decision_body(decision, first),
                **({"notices": notices} if notices else {}),
            },
            default=_json_default,
        ) + b"\n"
        async for batch in batches:
            lines = []
            for row in batch:
                line = orjson.dumps(row, default=_json_default) + b"\n"
                size += len(line)
                if size > max_bytes:
                    break
                lines.append(line)
            rows += len(lines)
            if lines:
                yield b"".join(lines)
            if size > max_bytes:
                raise PayloadTooLarge(
                    "response_too_large",
                    f"the answer is larger than {max_bytes} bytes "
                    f"(QUERYGATE_MAX_RESPONSE_BYTES); the rows after the first {rows} were "
                    "not sent",
                )
        _database_time(audit.clock, started)
        try:
            await audit.executed(outcome="ok", rows_returned=rows, streamed=True,
                                 masked=first.masked)
        except GatewayError:
            log.error("the outcome of request %s could not be audited", request_id)
        yield orjson.dumps({"row_count": rows, "complete": True}) + b"\n"
    except GatewayError as exc:
        if not audit.execution_recorded:
            with contextlib.suppress(GatewayError):
                await audit.executed(outcome="error", code=exc.code, rows_returned=rows,
                                     streamed=True, masked=first.masked)
        # Headers are gone: the error becomes the last line, and the stream says it is cut.
        yield orjson.dumps({**exc.body(request_id), "row_count": rows, "complete": False}) + b"\n"
    finally:
        # A client that went away: the outcome is queued without waiting (it cannot await).
        audit.aborted(rows_returned=rows, streamed=True)
        await batches.aclose()  # type: ignore[attr-defined]


def create_app(settings: Settings) -> FastAPI:
    """Build the application; nothing connects until the lifespan starts."""
    settings.require_serving()
    authenticator = Authenticator(settings)
    if settings.mask_hmac_key is not None:
        mask_key = settings.mask_hmac_key.get_secret_value().encode()
    else:
        # Only outside prod (require_serving checked): hashes are stable for this process only.
        log.warning("QUERYGATE_MASK_HMAC_KEY is not set: hash masks change on restart")
        mask_key = secrets.token_bytes(32)
    gateway_metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = Gateway(
            mask_key=mask_key,
            settings=settings,
            authenticator=authenticator,
            extractor=FactsExtractor(settings.max_sql_bytes),
            policy=PolicyClient(
                settings.opa_url, settings.opa_decision_path, settings.opa_timeout_ms
            ),
            metrics=gateway_metrics,
            limits=CallerLimits(settings.rate_limit_per_s, settings.rate_limit_burst,
                                settings.max_concurrent_per_identity),
            heartbeat=Heartbeat(settings.liveness_max_loop_lag_ms / 1000),
        )
        cap = settings.max_concurrent_per_identity
        if cap == 0 or cap >= min(settings.db_pool_max, settings.profile_pool_max):
            log.warning("QUERYGATE_MAX_CONCURRENT_PER_IDENTITY (%s) is not below the pool sizes: "
                        "one caller can hold every database connection", cap)
        # First: nothing is served that could not be audited. A spool that cannot be opened
        # (locked by another process, unwritable) stops start-up.
        audit = AuditLog(settings, gateway_metrics)
        await audit.start()
        gateway.audit = audit
        # The first JWKS fetch (bounded by QUERYGATE_JWKS_TIMEOUT_MS) happens before serving.
        await authenticator.start()
        gateway.notifier = Notifier(settings.approval_webhook_url)
        try:
            await gateway.connect()
        except ConfigError:
            # A misconfiguration is not a passing outage: refuse to start.
            await gateway.close()
            raise
        except Exception as exc:
            log.warning("database not reachable at start-up: %s", type(exc).__name__)
        gateway.tasks.append(asyncio.create_task(gateway.maintain()))
        gateway.tasks.append(asyncio.create_task(gateway.heartbeat.run()))
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(
        title="querygate",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_middleware(MetricsMiddleware, metrics=gateway_metrics)  # type: ignore[arg-type]
    app.add_middleware(RequestIdMiddleware)  # type: ignore[arg-type]

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        request.state.error_code = exc.code
        # Retry-After of a 429 (TooManyRequests.headers).
        return render(exc.body(_request_id(request)), exc.status, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        error = Unprocessable("invalid_request", "the request does not match the schema")
        request.state.error_code = error.code
        return render(error.body(_request_id(request)), error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error: GatewayError
        if exc.status_code == 404:
            error = NotFound("not_found", "no such endpoint")
        elif exc.status_code == 405:
            error = MethodNotAllowed("method_not_allowed", "method not allowed on this endpoint")
        else:
            error = Internal("http_error", str(exc.detail))
            error.status = exc.status_code  # type: ignore[misc]
        request.state.error_code = error.code
        return render(error.body(_request_id(request)), error.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # Where it happened, never what: an exception's message may quote data or SQL.
        log.error(
            "unexpected %s (request %s) at %s", type(exc).__name__, _request_id(request),
            " <- ".join(
                f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
                for frame in reversed(traceback.extract_tb(exc.__traceback__))
            )[:2000],
        )
        error = Internal("internal_error", "an unexpected error occurred; it has been logged")
        request.state.error_code = error.code
        return render(error.body(_request_id(request)), error.status)

    @app.post("/v1/query")
    async def query(request: Request) -> Response:
        """Decide and, if allowed, run the statement; each step is audited before it shows."""
        audit = _audit(request)
        budget = _Budget.start(settings)
        try:
            async with _within(budget.at):
                return await _query(request, audit, budget)
        except asyncio.CancelledError:
            audit.aborted()
            raise
        except Exception as exc:
            # A refusal is answered only once it is on record (or it becomes a 503).
            await audit.refused(exc)
            raise
        finally:
            budget.release()  # unless a stream took the slot over

    async def _query(request: Request, audit: RequestAudit, budget: _Budget) -> Response:
        ev = await evaluate(request, audit)
        gateway, identity, body, facts, decision = (
            ev.gateway, ev.identity, ev.body, ev.facts, ev.decision
        )
        _enforce(decision, facts)
        assert gateway.executor is not None and gateway.approvals is not None
        # Where it runs, and every refusal of that step (a profile PostgreSQL cannot prepare,
        # ONLY for a masked caller, DDL reading masked columns), before an approval is asked
        # for a statement that could never run, and before the allow is on record.
        target, enforced = await gateway.target_for(identity, facts, decision, body.sql)
        if decision.require_approval is not None:
            if ev.approval is not None:
                raise Forbidden(
                    "approval_not_accepted",
                    "the policy still requires an approval for this request",
                    decision_id=decision.id,
                )
            # On record before the approval exists: a spool that cannot take it creates nothing.
            await audit.decided("approval_required", gate=True)
            approval = await gateway.approvals.create(
                identity, settings.environment, body.sql, list(body.params), facts.fingerprint,
                decision.require_approval, decision.id,
            )
            await _approval_event(gateway, audit, approval, "requested", identity.sub, gate=True)
            return render(
                {"approval": approval.to_json(), "decision_id": decision.id}, status=202
            )
        # One of the caller's slots from here to the end of the answer (pool fairness);
        # refused (429 too_many_concurrent) before the allow is on record.
        budget.slot = gateway.limits.slot((identity.issuer, identity.sub))
        # Durable before anything runs: when the spool cannot take it, nothing runs.
        await audit.decided("allow", gate=True)
        if ev.approval is not None:
            if _wants_ndjson(request) and facts.kind != "select":
                # The stream would refuse the write only after the claim, using the approval
                # up for nothing: refuse it first, as Executor.stream does.
                raise Unprocessable("stream_unsupported", "only queries can be streamed; drop the "
                                    "application/x-ndjson Accept header for writes")
            # After policy said yes with the approval in its input, and before anything runs:
            # the one conditional UPDATE that makes an approval single-use.
            await gateway.approvals.claim(ev.approval, list(body.params))
            await _approval_event(gateway, audit, ev.approval, "used", identity.sub, gate=True)
        plans: list[masking.MaskPlan] = []  # the last is the one applied (run may retry)

        def planner(columns: tuple[Any, ...]) -> masking.MaskPlan:
            with audit.clock.timer("masking"):
                plan = masking.plan(
                    facts, enforced, columns, gateway.mask_key, settings.mask_redact_token,
                    target.masked,
                )
            timed = _TimedPlan(plan.maskers, plan.columns, plan.masked, audit.clock)
            plans.append(timed)
            return timed

        started = time.perf_counter()
        if _wants_ndjson(request):
            # Streams are not capped by QUERYGATE_MAX_ROWS (that is the JSON mode's memory
            # bound); the policy's own max_rows still holds.
            batches = gateway.executor.stream(
                target, body.params, facts, decision.max_rows, planner, settings.stream_batch_rows,
                deadline=budget.at, stream_deadline=budget.stream_at,
            )
            first = await anext(batches)  # errors before the first row are plain errors
            return _BoundedStream(
                _ndjson(first, batches, enforced, ev.request_id, audit, started,
                        _notices(facts, enforced), settings.max_response_bytes),
                budget.stream_at, budget.hand_off(),
            )
        limit = settings.max_rows if decision.max_rows is None else min(
            settings.max_rows, decision.max_rows
        )
        try:
            result = await gateway.executor.run(
                target, body.params, facts, limit, planner,
                max_rows_affected=decision.max_rows_affected, deadline=budget.at,
                encode=_encode_row, max_bytes=settings.max_response_bytes,
            )
        finally:
            _database_time(audit.clock, started)
        if facts.kind == "ddl":
            # The profiles' views of the changed tables may have been dropped for the DDL:
            # every recorded profile's come back from the new catalog now, for the other
            # replicas too, which would otherwise wait for their next refresh.
            catalog = await gateway.refresh_catalog()
            assert gateway.profiles is not None
            await gateway.profiles.resync_recorded(catalog)
        try:
            await audit.executed(
                outcome="ok", rows_returned=len(result.rows), rows_affected=result.rows_affected,
                truncated=result.truncated, masked=plans[-1].masked,
            )
        except GatewayError:
            # The statement ran (its allow decision is on record): answer it all the same.
            log.error("the outcome of request %s could not be audited", ev.request_id)
        return render(_result_body(result, enforced, plans[-1], facts))

    async def _approval_for(
        request: Request, approval_id: str, audit: RequestAudit
    ) -> tuple[Gateway, Identity, Approval]:
        gateway = _gateway(request)
        identity = await _authenticate(request, gateway, audit)
        if gateway.approvals is None:
            raise Unavailable("database_unavailable", "the database is not connected")
        return gateway, identity, await gateway.approvals.get(approval_id)

    @app.get("/v1/approvals")
    async def list_approvals(request: Request, status: str | None = None) -> Response:
        """Your own requests and those awaiting one of your groups."""
        gateway = _gateway(request)
        identity = await _authenticate(request, gateway, _audit(request))
        if gateway.approvals is None:
            raise Unavailable("database_unavailable", "the database is not connected")
        approvals = await gateway.approvals.visible_to(identity, status)
        return render({"approvals": [a.to_json() for a in approvals]})

    @app.get("/v1/approvals/{approval_id}")
    async def get_approval(request: Request, approval_id: str) -> Response:
        """One approval, to its requester and to whoever may decide it."""
        _, identity, approval = await _approval_for(request, approval_id, _audit(request))
        if not approval.requested_by(identity) and not set(identity.groups) & set(approval.approver_groups):
            raise NotFound("approval_not_found", "no such approval")
        return render({"approval": approval.to_json()})

    async def _decide(request: Request, approval_id: str, verdict: str) -> Response:
        audit = _audit(request)
        gateway, approver, approval = await _approval_for(request, approval_id, audit)
        try:
            return await _decide_approval(request, gateway, audit, approver, approval, verdict)
        except GatewayError as exc:
            if exc.code != "audit_unavailable":
                # A refused approval or rejection is a lifecycle step too.
                await audit.approval(f"{verdict}_refused", approval, code=exc.code)
            raise

    async def _decide_approval(
        request: Request, gateway: Gateway, audit: RequestAudit, approver: Identity,
        approval: Approval, verdict: str,
    ) -> Response:
        assert gateway.approvals is not None
        comment = None
        raw = await request.body()
        if raw:
            try:
                payload = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise BadRequest("invalid_json", f"the body is not valid JSON: {exc}") from exc
            if not isinstance(payload, dict) or set(payload) - {"comment"}:
                raise Unprocessable("invalid_request", 'the body may only hold {"comment": …}')
            comment = validate_comment(payload.get("comment"))
        # Never the requester, whatever the policy says.
        if approval.requested_by(approver):
            raise Forbidden("self_approval", "requesters cannot decide their own approvals")
        allowed, reasons = await gateway.policy.approver_decide(
            {
                "identity": approver.to_input(),
                "environment": settings.environment,
                "approval": approval.to_policy_input(),
                "verdict": verdict,
            }
        )
        if not allowed:
            raise Forbidden(
                "approver_denied",
                "; ".join(r.message for r in reasons) or "not an approver",
                reasons=[r.to_json() for r in reasons],
            )
        decided = await gateway.approvals.decide(
            approval, approver, "approved" if verdict == "approve" else "rejected", comment
        )
        await _approval_event(gateway, audit, decided, decided.status, approver.sub)
        return render({"approval": decided.to_json()})

    @app.post("/v1/approvals/{approval_id}/approve")
    async def approve(request: Request, approval_id: str) -> Response:
        """Approve a pending request (policy decides who may; never the requester)."""
        return await _decide(request, approval_id, "approve")

    @app.post("/v1/approvals/{approval_id}/reject")
    async def reject(request: Request, approval_id: str) -> Response:
        """Reject a pending request."""
        return await _decide(request, approval_id, "reject")

    @app.post("/v1/explain")
    async def explain(request: Request) -> Response:
        """The facts and the decision for a statement; nothing is executed."""
        audit = _audit(request)
        audit.explain = True
        try:
            async with _within(_Budget.start(settings).at):
                ev = await evaluate(request, audit)
        except Exception as exc:
            await audit.refused(exc)
            raise
        identity, facts, decision = ev.identity, ev.facts, ev.decision
        await audit.decided(
            "deny" if not decision.allow
            else "approval_required" if decision.require_approval is not None else "allow",
            gate=False,
        )
        return render(
            {
                "identity": identity.to_input(),
                "facts": facts.to_input(),
                "decision": {
                    "id": decision.id,
                    "allow": decision.allow,
                    "reasons": decision.reasons_json(),
                    "masks": decision.masks,
                    "derived_mask": decision.derived_mask,
                    "masked_predicates_allowed": list(decision.masked_predicates_allowed),
                    "require_approval": decision.require_approval,
                    "max_rows": decision.max_rows,
                    "max_rows_affected": decision.max_rows_affected,
                    "db_role": decision.db_role,
                },
            }
        )

    @app.post("/v1/admin/catalog/refresh")
    async def refresh_catalog(request: Request) -> Response:
        """Re-read the catalog now (admin groups only); cached facts go stale with it."""
        gateway = _gateway(request)
        audit = _audit(request)
        identity = await _require_admin(request, gateway, audit, "catalog_refresh")
        before = gateway.catalog.version if gateway.catalog else 0
        catalog = await gateway.refresh_catalog()
        log.info("catalog refreshed by %s: version %s -> %s", identity.sub, before, catalog.version)
        await audit.admin("catalog_refresh", "ok", {
            "version_before": before, "version_after": catalog.version,
        })
        return render(
            {
                "version": catalog.version,
                "changed": catalog.version != before,
                "relations": sum(len(t) for t in catalog.relations.values()),
            }
        )

    @app.get("/v1/admin/catalog")
    async def catalog_listing(request: Request) -> Response:
        """Every visible column with its class and where the class came from (admin only)."""
        gateway = _gateway(request)
        audit = _audit(request)
        await _require_admin(request, gateway, audit, "catalog_read")
        catalog = gateway.catalog
        if catalog is None:
            raise Unavailable("database_unavailable", "the catalog has not been read yet")
        await audit.admin("catalog_read", "ok", {"version": catalog.version})
        configured = await gateway.policy.data("querygate/config/classification")
        overrides = configured if isinstance(configured, dict) else {}
        columns = []
        for schema, tables in catalog.relations.items():
            for name, relation in tables.items():
                for column, type_name in relation.columns.items():
                    qualified = f"{schema}.{name}.{column}"
                    if qualified in overrides:
                        cls, source = overrides[qualified], "policy data"
                    elif qualified in catalog.classes:
                        cls, source = catalog.classes[qualified], "column name"
                    else:
                        cls, source = None, None
                    columns.append({"column": qualified, "type": type_name,
                                    "relation_kind": relation.kind, "class": cls,
                                    "class_source": source})
        return render({"version": catalog.version, "columns": columns})

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        """The process is alive: its event loop runs, and no pool is wedged (app/liveness.py)."""
        gateway = _gateway(request)
        loop_problem = gateway.heartbeat.problem()
        wedged = gateway.executor.wedged_pools() if gateway.executor is not None else 0
        if loop_problem is None and not wedged:
            return render({"status": "ok"})
        checks = {
            "event_loop": loop_problem or "ok",
            "database_pools": f"{wedged} pool(s) with every connection in use past its "
            "deadline" if wedged else "ok",
        }
        error = Unavailable("not_live", "the gateway is not live", checks=checks)
        return render(error.body(_request_id(request)), error.status)

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        """OPA answers with a well-formed decision and the database answers."""
        gateway = _gateway(request)
        checks: dict[str, str] = {}
        ok, detail = await gateway.policy.ready()
        checks["opa"] = detail
        db_ok = False
        if gateway.pool is None or gateway.catalog is None:
            checks["database"] = "not connected"
        else:
            try:
                async with gateway.pool.acquire(timeout=settings.db_connect_timeout_ms / 1000) as conn:
                    await conn.fetchval("SELECT 1")
                db_ok = True
                checks["database"] = "ok"
            except Exception as exc:
                checks["database"] = f"unreachable: {type(exc).__name__}"
        # The spool must accept events; a sink outage alone only grows the spool.
        audit_ok, checks["audit"] = (
            gateway.audit.ready() if gateway.audit else (False, "audit log not started")
        )
        ready = ok and db_ok and audit_ok
        if not ready:
            error = Unavailable("not_ready", "the gateway is not ready", checks=checks)
            return render(error.body(_request_id(request)), error.status)
        return render({"status": "ready", "checks": checks})

    if settings.metrics_enabled:

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            """Prometheus text exposition (docs/audit.md lists the series)."""
            return Response(gateway_metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
