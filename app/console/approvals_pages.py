"""The approvals inbox and an approval's page; deciding goes through the gateway's API.

The console never decides: it posts to ``/v1/approvals/{id}/approve|reject`` with the
signed-in user's own token, so the gateway's rules (policy's approver decision, never the
requester) hold exactly as for any other client, and its refusals are shown by their codes.
The SQL shown is redacted (app/audit.py ``redact_sql``, the form the audit holds): an
approval stores the text byte for byte, literals included, and a page must show no value.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from app.audit import redact_sql
from app.console import queries
from app.console.auth import check_csrf
from app.console.signin import form_of
from app.console.web import Reader, error_page, reader, render
from app.errors import BadRequest, Unprocessable

router = APIRouter()


def gateway_said(request: Request, status: int, error: dict[str, Any]) -> Response:
    """The gateway's refusal, shown with its own status and code (docs/errors.md)."""
    return error_page(request, status, str(error.get("code", "gateway_error")),
                      str(error.get("message", "the gateway refused")))


def _approval_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise BadRequest("invalid_request", "not an approval id") from None


def _shown(approval: dict[str, Any]) -> dict[str, Any]:
    """The approval as a page may show it: the SQL redacted, never parameter values."""
    shown = dict(approval)
    shown["sql"] = redact_sql(approval.get("sql") or "") or "(not shown: unreadable SQL)"
    shown.pop("params_sha256", None)
    return shown


async def _facts(who: Reader, approvals: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = [a["decision_id"] for a in approvals if isinstance(a.get("decision_id"), str)]
    if not ids:
        return {}
    async with who.console.pool.acquire() as conn:
        return await queries.decisions_by_id(conn, ids)


@router.get("/approvals")
async def inbox_page(request: Request) -> Response:
    await reader(request)
    return render(request, "approvals.html")


@router.get("/approvals/inbox")
async def inbox(request: Request) -> Response:
    """Pending requests awaiting one of my groups (htmx polls this: it updates live)."""
    who = await reader(request)
    answer = await who.console.api.pending(who.user)
    if answer.error is not None:
        return render(request, "approvals_inbox.html", approvals=[], facts={},
                      error=answer.error)
    mine = set(who.user.groups)
    pending = [
        _shown(a) for a in answer.body.get("approvals", [])
        if isinstance(a, dict) and a.get("status") == "pending"
        and mine & set((a.get("awaiting") or {}).get("approver_groups") or [])
        and (a.get("requester") or {}).get("sub") != who.user.sub
    ]
    return render(request, "approvals_inbox.html", approvals=pending,
                  facts=await _facts(who, pending), error=None)


@router.get("/approvals/{approval_id}")
async def approval_page(request: Request, approval_id: str) -> Response:
    """One approval (the page approval notifications link to)."""
    who = await reader(request)
    approval_id = _approval_id(approval_id)
    answer = await who.console.api.get(who.user, approval_id)
    if answer.error is not None:
        return gateway_said(request, answer.status, answer.error)
    approval = _shown(answer.body.get("approval") or {})
    facts = await _facts(who, [approval])
    async with who.console.pool.acquire() as conn:
        trail = await queries.timeline(
            conn, who.scope, queries.Filters(type="approval", approval=approval_id), None
        )
    return render(request, "approval.html", a=approval,
                  decision=facts.get(approval.get("decision_id") or ""),
                  trail=trail.rows, decided=request.query_params.get("decided"))


async def _decide(request: Request, approval_id: str,
                  verdict: Literal["approve", "reject"]) -> Response:
    who = await reader(request)
    form = await form_of(request)
    check_csrf(who.session, form.get("csrf"), request.headers.get("origin"), who.console.origin)
    approval_id = _approval_id(approval_id)
    comment = (form.get("comment") or "").strip() or None
    if comment is not None and len(comment) > 2000:
        raise Unprocessable("invalid_request", "the comment is longer than 2000 characters")
    answer = await who.console.api.decide(who.user, approval_id, verdict, comment)
    if answer.error is not None:
        return gateway_said(request, answer.status, answer.error)
    status = (answer.body.get("approval") or {}).get("status", "")
    return RedirectResponse(f"/approvals/{approval_id}?decided={status}", status_code=303)


@router.post("/approvals/{approval_id}/approve")
async def approve(request: Request, approval_id: str) -> Response:
    return await _decide(request, approval_id, "approve")


@router.post("/approvals/{approval_id}/reject")
async def reject(request: Request, approval_id: str) -> Response:
    return await _decide(request, approval_id, "reject")
