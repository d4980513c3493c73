"""What every router of the HTTP front end shares: one renderer, one error shape, the
request's id, audit context and caller, and the body read within its limits."""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import pipeline
from app.audit import RequestAudit
from app.config import Settings
from app.errors import (
    BadRequest,
    Forbidden,
    GatewayError,
    Internal,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthenticated,
    Unprocessable,
)
from app.gateway import Gateway
from app.http.models import QueryRequest
from app.identity import Identity
from app.ids import new_id
from app.metrics import REQUEST_ID, StageClock
from app.pipeline import Budget, Meta, Statement
from app.results import json_default

log = logging.getLogger("querygate.http")

NDJSON = "application/x-ndjson"


def render(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Serialise with orjson (datetimes, UUIDs, Decimals handled)."""
    return Response(
        orjson.dumps(content, default=json_default, option=orjson.OPT_NON_STR_KEYS),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


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
        request_id = new_id()
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


def request_id(request: Request) -> str:
    return getattr(request.state, "request_id", "") or new_id()


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def source_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def audit_for(request: Request) -> RequestAudit:
    """This request's audit context (the audit log is the lifespan's); the metrics
    middleware reads its label from the request state."""
    gateway = gateway_of(request)
    assert gateway.audit is not None
    audit = RequestAudit(
        log=gateway.audit,
        request_id=request_id(request),
        source_ip=source_ip(request),
        method=request.method,
        path=request.url.path,
        clock=StageClock(gateway.metrics),
    )
    request.state.audit = audit
    return audit


def meta_for(request: Request, budget: Budget, stream: bool = False) -> Meta:
    return Meta(request_id(request), source_ip(request), budget, "http", stream)


def wants_ndjson(request: Request) -> bool:
    return NDJSON in request.headers.get("accept", "")


async def authenticate(request: Request, gateway: Gateway, audit: RequestAudit) -> Identity:
    """The verified caller; a refusal is audited before the 401 goes out."""
    try:
        with audit.clock.timer("auth"):
            identity = await gateway.authenticator.authenticate(
                request.headers, source_ip(request)
            )
    except Unauthenticated as exc:
        await audit.auth_failed(exc)
        raise
    audit.identity = identity
    return identity


@dataclass(frozen=True, slots=True)
class Call:
    """A governed request under way: its gateway, audit context, budget and caller."""

    gateway: Gateway
    audit: RequestAudit
    budget: Budget
    identity: Identity


@contextlib.asynccontextmanager
async def governed(request: Request, *, explain: bool = False) -> AsyncIterator[Call]:
    """Authenticate (before the body) and admit the caller, all under ``pipeline.guard``:
    bounded by the request's deadline, and every refusal audited before it is answered."""
    gateway = gateway_of(request)
    audit = audit_for(request)
    audit.explain = explain
    budget = Budget.start(gateway.settings)
    async with pipeline.guard(audit, budget):
        identity = await authenticate(request, gateway, audit)
        pipeline.admit(gateway, identity)  # before the body: 429 rate_limited
        yield Call(gateway, audit, budget, identity)


async def require_admin(
    request: Request, gateway: Gateway, audit: RequestAudit, action: str
) -> Identity:
    """The verified caller, who must be in an admin group (a refusal is audited)."""
    identity = await authenticate(request, gateway, audit)
    if not set(identity.groups) & set(gateway.settings.admin_groups):
        error = Forbidden("admin_required", "this endpoint needs an admin group")
        await audit.admin(action, "refused", code=error.code)
        raise error
    return identity


async def read_json(request: Request, settings: Settings) -> Any:
    """The body as JSON, read within the size limit (invalid_json, payload_too_large)."""
    declared = request.headers.get("content-length")
    too_large = PayloadTooLarge(
        "payload_too_large", f"the request body is larger than {settings.max_request_bytes} bytes"
    )
    if declared is not None and declared.isdigit() and int(declared) > settings.max_request_bytes:
        raise too_large
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > settings.max_request_bytes:
            raise too_large
        chunks.append(chunk)
    try:
        return orjson.loads(b"".join(chunks))
    except orjson.JSONDecodeError as exc:
        raise BadRequest("invalid_json", f"the body is not valid JSON: {exc}") from exc


async def read_statement(request: Request, settings: Settings) -> Statement:
    """Read and validate a /v1/query or /v1/explain body; one error shape for every failure."""
    data = await read_json(request, settings)
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
    return Statement(body.sql, body.params, body.approval_id)


async def error_response(request: Request, exc: Exception) -> Response:
    """The answer to an error, in the one shape of docs/errors.md (and its code in the
    request state, for the metrics): every handler of ``install_error_handlers``, and the
    lean /v1/query path (app/http/front.py) in one."""
    error: GatewayError
    if isinstance(exc, GatewayError):
        error = exc
    elif isinstance(exc, RequestValidationError):
        error = Unprocessable("invalid_request", "the request does not match the schema")
    elif isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            error = NotFound("not_found", "no such endpoint")
        elif exc.status_code == 405:
            error = MethodNotAllowed("method_not_allowed", "method not allowed on this endpoint")
        else:
            error = Internal("http_error", str(exc.detail))
            error.status = exc.status_code  # type: ignore[misc]
    else:
        # Where it happened, never what: an exception's message may quote data or SQL.
        log.error(
            "unexpected %s (request %s) at %s", type(exc).__name__, request_id(request),
            " <- ".join(
                f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
                for frame in reversed(traceback.extract_tb(exc.__traceback__))
            )[:2000],
        )
        error = Internal("internal_error", "an unexpected error occurred; it has been logged")
    request.state.error_code = error.code
    # Retry-After of a 429 (TooManyRequests.headers).
    return render(error.body(request_id(request)), error.status, getattr(error, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in the one shape of docs/errors.md."""
    for kind in (GatewayError, RequestValidationError, StarletteHTTPException, Exception):
        app.add_exception_handler(kind, error_response)  # type: ignore[arg-type]
