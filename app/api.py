"""The HTTP surface: parse the request, call the stages in order, render one error shape.

``create_app(settings)`` is the factory; the lifespan owns every client (PostgreSQL pool,
OPA client, catalog refresher) and routes reach them through ``request.app.state.gateway``.
Data moves forward only: identity → facts → policy → executor; no stage calls back here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import decimal
import logging
import secrets
import time
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

from app import masking
from app.approvals import Approval, ApprovalStore, Notifier, validate_comment
from app.audit import AuditLog, RequestAudit
from app.catalog import Catalog, introspect
from app.config import ConfigError, Settings
from app.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    Internal,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
    Unavailable,
    Unprocessable,
)
from app.executor import CleanSessions, Executor, Result, connection_settings
from app.facts import FactsExtractor, QueryFacts
from app.identity import Authenticator, Identity
from app.metrics import CONTENT_TYPE_LATEST, REQUEST_ID, Metrics, MetricsMiddleware, StageClock
from app.policy import Decision, PolicyClient

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
        self.approvals = ApprovalStore(self.pool)
        await self.approvals.migrate()
        self.executor = Executor(self.pool, sessions)
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

    async def refresh_catalog(self) -> Catalog:
        """Re-read the catalog; the version (and so the facts cache key) moves on change."""
        if self.pool is None:
            raise Unavailable("database_unavailable", "the database is not connected")
        before = self.catalog
        async with self.pool.acquire() as conn:
            self.catalog = await introspect(conn, tuple(self.settings.schemas), self.catalog)
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
        await self.authenticator.close()
        if self.pool is not None:
            await self.pool.close()
        if self.audit is not None:
            # Last: whatever the shutdown recorded is flushed and, if the sink answers, shipped.
            await self.audit.close()


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


def _result_body(result: Result, decision: Decision, plan: masking.MaskPlan) -> dict[str, Any]:
    return {
        "columns": [{"name": c.name, "type": c.type} for c in result.columns],
        "rows": result.rows,
        "row_count": len(result.rows),
        "rows_affected": result.rows_affected,
        "truncated": result.truncated,
        "decision": _decision_body(decision, plan),
    }


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
) -> AsyncIterator[bytes]:
    """Header line, one JSON array per row, then a summary (or error) line."""
    rows = 0
    try:
        yield orjson.dumps(
            {
                "columns": [{"name": c.name, "type": c.type} for c in first.columns],
                "decision": _decision_body(decision, first),
            },
            default=_json_default,
        ) + b"\n"
        async for batch in batches:
            rows += len(batch)
            yield b"".join(
                orjson.dumps(row, default=_json_default) + b"\n" for row in batch
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
        )
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
        return render(exc.body(_request_id(request)), exc.status)

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
        log.exception("unexpected error (request %s)", _request_id(request))
        error = Internal("internal_error", "an unexpected error occurred; it has been logged")
        request.state.error_code = error.code
        return render(error.body(_request_id(request)), error.status)

    @app.post("/v1/query")
    async def query(request: Request) -> Response:
        """Decide and, if allowed, run the statement; each step is audited before it shows."""
        audit = _audit(request)
        try:
            return await _query(request, audit)
        except asyncio.CancelledError:
            audit.aborted()
            raise
        except Exception as exc:
            # A refusal is answered only once it is on record (or it becomes a 503).
            await audit.refused(exc)
            raise

    async def _query(request: Request, audit: RequestAudit) -> Response:
        ev = await evaluate(request, audit)
        gateway, identity, body, facts, decision = (
            ev.gateway, ev.identity, ev.body, ev.facts, ev.decision
        )
        _enforce(decision, facts)
        assert gateway.executor is not None and gateway.approvals is not None
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
        # Durable before anything runs: when the spool cannot take it, nothing runs.
        await audit.decided("allow", gate=True)
        if ev.approval is not None:
            # After policy said yes with the approval in its input, and before anything runs:
            # the one conditional UPDATE that makes an approval single-use.
            await gateway.approvals.claim(ev.approval, list(body.params))
            await _approval_event(gateway, audit, ev.approval, "used", identity.sub, gate=True)
        plans: list[masking.MaskPlan] = []  # the last is the one applied (run may retry)

        def planner(columns: tuple[Any, ...]) -> masking.MaskPlan:
            with audit.clock.timer("masking"):
                plan = masking.plan(
                    facts, decision, columns, gateway.mask_key, settings.mask_redact_token
                )
            timed = _TimedPlan(plan.maskers, plan.columns, plan.masked, audit.clock)
            plans.append(timed)
            return timed

        started = time.perf_counter()
        if _wants_ndjson(request):
            # Streams are not capped by QUERYGATE_MAX_ROWS (that is the JSON mode's memory
            # bound); the policy's own max_rows still holds.
            batches = gateway.executor.stream(
                body.sql, body.params, facts, decision.max_rows, planner,
                settings.stream_batch_rows, db_role=decision.db_role,
            )
            first = await anext(batches)  # errors before the first row are plain errors
            return StreamingResponse(
                _ndjson(first, batches, decision, ev.request_id, audit, started),
                media_type=NDJSON,
            )
        limit = settings.max_rows if decision.max_rows is None else min(
            settings.max_rows, decision.max_rows
        )
        try:
            result = await gateway.executor.run(
                body.sql, body.params, facts, limit, planner,
                db_role=decision.db_role, max_rows_affected=decision.max_rows_affected,
            )
        finally:
            _database_time(audit.clock, started)
        try:
            await audit.executed(
                outcome="ok", rows_returned=len(result.rows), rows_affected=result.rows_affected,
                truncated=result.truncated, masked=plans[-1].masked,
            )
        except GatewayError:
            # The statement ran (its allow decision is on record): answer it all the same.
            log.error("the outcome of request %s could not be audited", ev.request_id)
        return render(_result_body(result, decision, plans[-1]))

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
        mine = approval.requester.get("sub") == identity.sub
        if not mine and not set(identity.groups) & set(approval.approver_groups):
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
        if (approval.requester.get("issuer"), approval.requester.get("sub")) == (
            approver.issuer, approver.sub
        ):
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
    async def healthz() -> Response:
        """The process is alive."""
        return render({"status": "ok"})

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
