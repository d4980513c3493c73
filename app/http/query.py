"""/v1/query, /v1/explain: translate HTTP to the pipeline and its outcomes back to HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from app import pipeline
from app.errors import GatewayError
from app.http import models
from app.http.common import (
    NDJSON,
    governed,
    meta_for,
    read_statement,
    render,
    wants_ndjson,
)
from app.http.openapi import answers, errors, ok
from app.limits import Slot
from app.pipeline import Held, Rows, Streamed
from app.policy import Decision
from app.results import json_default

log = logging.getLogger("querygate.http")

router = APIRouter()


def decision_body(decision: Decision, masked: dict[str, str]) -> dict[str, Any]:
    # Names the masked outputs and their strategies; never a value.
    return {"id": decision.id, "reasons": decision.reasons_json(), "masked": masked}


def _rows_body(outcome: Rows) -> dict[str, Any]:
    result = outcome.result
    return {
        **({"notices": outcome.notices} if outcome.notices else {}),
        "columns": [{"name": c.name, "type": c.type} for c in result.columns],
        # Encoded by the executor as they came (results.encode_row), to count the bytes.
        "rows": [orjson.Fragment(r) if isinstance(r, bytes) else r for r in result.rows],
        "row_count": len(result.rows),
        "rows_affected": result.rows_affected,
        "truncated": result.truncated,
        "truncated_reason": result.truncated_reason,
        "decision": decision_body(outcome.decision, result.masked),
    }


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
            async with asyncio.timeout_at(self.deadline + pipeline.BACKSTOP_S):
                await super().__call__(scope, receive, send)
        except TimeoutError:
            log.warning("an NDJSON stream was dropped at its deadline: the client stopped reading")
        finally:
            if self.slot is not None:
                self.slot.release()


async def _ndjson(outcome: Streamed, rid: str) -> AsyncIterator[bytes]:
    """Header line, one JSON array per row, then a summary (or error) line."""
    head, rows = outcome.head, outcome.rows
    try:
        yield orjson.dumps(
            {
                "columns": [{"name": c.name, "type": c.type} for c in head.columns],
                "decision": decision_body(outcome.decision, head.masked),
                **({"notices": outcome.notices} if outcome.notices else {}),
            },
            default=json_default,
        ) + b"\n"
        try:
            async with contextlib.aclosing(rows.chunks()) as chunks:
                async for chunk in chunks:
                    yield chunk
        except GatewayError as exc:
            # Headers are gone (and the outcome is on record): the error becomes the last
            # line, and the stream says it is cut.
            yield orjson.dumps({**exc.body(rid), "row_count": rows.rows,
                                "complete": False}) + b"\n"
            return
        yield orjson.dumps({"row_count": rows.rows, "complete": True}) + b"\n"
    finally:
        await rows.aclose()  # a client gone before the rows began, too


@router.post(
    "/v1/query",
    responses={
        **ok(models.QueryAnswer, "The rows"),
        **ok(models.ApprovalHeld, "The statement waits for an approval (docs/approvals.md)", 202),
        **errors(),
    },
)
async def query(request: Request) -> Response:
    """Decide and, if allowed, run the statement; each step is audited before it shows."""
    async with governed(request) as call:
        statement = await read_statement(request, call.gateway.settings)
        meta = meta_for(request, call.budget, stream=wants_ndjson(request))
        outcome = await pipeline.query(call.gateway, call.audit, call.identity, statement, meta)
        if isinstance(outcome, Held):
            return render(
                {"approval": outcome.approval.to_json(), "decision_id": outcome.decision.id},
                status=202,
            )
        if isinstance(outcome, Streamed):
            return _BoundedStream(_ndjson(outcome, meta.request_id), outcome.deadline,
                                  outcome.slot)
        return render(_rows_body(outcome))
    raise AssertionError("unreachable")  # guard re-raises whatever it caught


@router.post("/v1/explain", responses=answers(models.ExplainAnswer, "The facts and the decision"))
async def explain(request: Request) -> Response:
    """The facts and the decision for a statement; nothing is executed."""
    async with governed(request, explain=True) as call:
        statement = await read_statement(request, call.gateway.settings)
        outcome = await pipeline.explain(
            call.gateway, call.audit, call.identity, statement, meta_for(request, call.budget)
        )
        return render({
            "identity": outcome.identity.to_input(),
            "facts": outcome.facts.to_input(),
            "decision": outcome.decision.to_json(),
        })
    raise AssertionError("unreachable")

