"""/v1/approvals: list, read, approve and reject (policy decides who may decide)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from app import pipeline
from app.approvals import Approval, validate_comment
from app.audit import RequestAudit
from app.errors import BadRequest, Forbidden, GatewayError, NotFound, Unavailable, Unprocessable
from app.gateway import Gateway
from app.http import models
from app.http.common import audit_for, authenticate, gateway_of, render
from app.http.openapi import answers
from app.identity import Identity

router = APIRouter()


async def _approval_for(
    request: Request, approval_id: str, audit: RequestAudit
) -> tuple[Gateway, Identity, Approval]:
    gateway = gateway_of(request)
    identity = await authenticate(request, gateway, audit)
    if gateway.approvals is None:
        raise Unavailable("database_unavailable", "the database is not connected")
    return gateway, identity, await gateway.approvals.get(approval_id)


@router.get("/v1/approvals", responses=answers(models.ApprovalList, "Approvals"))
async def list_approvals(request: Request, status: str | None = None) -> Response:
    """Your own requests and those awaiting one of your groups."""
    gateway = gateway_of(request)
    identity = await authenticate(request, gateway, audit_for(request))
    if gateway.approvals is None:
        raise Unavailable("database_unavailable", "the database is not connected")
    approvals = await gateway.approvals.visible_to(identity, status)
    return render({"approvals": [a.to_json() for a in approvals]})


@router.get("/v1/approvals/{approval_id}", responses=answers(models.ApprovalOne, "The approval"))
async def get_approval(request: Request, approval_id: str) -> Response:
    """One approval, to its requester and to whoever may decide it."""
    _, identity, approval = await _approval_for(request, approval_id, audit_for(request))
    if not approval.requested_by(identity) and not set(identity.groups) & set(approval.approver_groups):
        raise NotFound("approval_not_found", "no such approval")
    return render({"approval": approval.to_json()})


async def _decide(request: Request, approval_id: str, verdict: str) -> Response:
    audit = audit_for(request)
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
            "environment": gateway.settings.environment,
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
    await pipeline.approval_event(gateway, audit, decided, decided.status, approver.sub)
    return render({"approval": decided.to_json()})


@router.post("/v1/approvals/{approval_id}/approve", responses=answers(models.ApprovalOne, "Approved"))
async def approve(request: Request, approval_id: str) -> Response:
    """Approve a pending request (policy decides who may; never the requester)."""
    return await _decide(request, approval_id, "approve")


@router.post("/v1/approvals/{approval_id}/reject", responses=answers(models.ApprovalOne, "Rejected"))
async def reject(request: Request, approval_id: str) -> Response:
    """Reject a pending request."""
    return await _decide(request, approval_id, "reject")
