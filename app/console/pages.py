"""The reading pages: timeline, event detail, "what did X touch" (+ CSV/JSON), chain health."""

from __future__ import annotations

import csv
import io
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from app.console import queries
from app.console.web import console_of, reader, render
from app.errors import BadRequest, Forbidden, NotFound

router = APIRouter()

_NAME_LIMIT = 200


@router.get("/healthz")
async def healthz() -> Response:
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """Ready when the index answers and the ingester has no standing error."""
    console = console_of(request)
    try:
        async with console.pool.acquire(timeout=2) as conn:
            await conn.fetchval("SELECT 1")
    except Exception:
        return JSONResponse({"status": "not ready", "index": "unreachable"}, status_code=503)
    status = console.ingester.status
    if status.error is not None:
        return JSONResponse({"status": "not ready", "ingest": status.error}, status_code=503)
    return JSONResponse({"status": "ready", "source": status.source, "offset": status.offset})


@router.get("/")
async def home() -> Response:
    return RedirectResponse("/events", status_code=303)


@router.get("/events")
async def events(request: Request) -> Response:
    """The timeline, newest first, filtered; an htmx request gets the results only."""
    who = await reader(request)
    params = dict(request.query_params)
    filters = queries.Filters.parse(params)
    cursor = params.get("cursor") or None
    async with who.console.pool.acquire() as conn:
        page = await queries.timeline(conn, who.scope, filters, cursor)
    template = "events_results.html" if request.headers.get("hx-request") else "events.html"
    return render(request, template, page=page, filters=filters,
                  query=filters.query_string(), scope=who.scope,
                  channels=queries.CHANNELS, types=queries.TYPES)


def _name(value: str, what: str) -> str:
    if not value or len(value) > _NAME_LIMIT:
        raise BadRequest("invalid_request", f"{what} is not valid")
    return value


@router.get("/events/{instance}/{chain}/{seq}")
async def event(request: Request, instance: str, chain: str,
                seq: Annotated[int, Path(ge=1, le=2**63 - 1)]) -> Response:
    """One event: what it says, and its place in the chain."""
    who = await reader(request)
    async with who.console.pool.acquire() as conn:
        detail = await queries.event_detail(
            conn, who.scope, _name(instance, "instance"), _name(chain, "chain"), seq
        )
    if detail is None:
        raise NotFound("event_not_found", "no such event, or not one you may see")
    return render(request, "event.html", d=detail, e=detail.event,
                  pretty=orjson.dumps(detail.event, option=orjson.OPT_INDENT_2).decode())


async def _touched(request: Request) -> tuple[dict[str, Any], dict[str, str]]:
    who = await reader(request)
    params = dict(request.query_params)
    identity = (params.get("identity") or "").strip() or who.user.sub
    _name(identity, "identity")
    since = queries.parse_time((params.get("since") or "").strip() or None, "since")
    until = queries.parse_time((params.get("until") or "").strip() or None, "until")
    async with who.console.pool.acquire() as conn:
        report = await queries.touched(conn, who.scope, identity, since, until)
    query = {"identity": identity}
    if since:
        query["since"] = since.isoformat()
    if until:
        query["until"] = until.isoformat()
    return report, query


@router.get("/touch")
async def touch(request: Request) -> Response:
    """What an identity (or an agent acting for it) read, wrote, had masked, was denied."""
    report, query = await _touched(request)
    return render(request, "touch.html", r=report, query=query)


@router.get("/touch.json")
async def touch_json(request: Request) -> Response:
    report, _ = await _touched(request)
    return Response(orjson.dumps(report, option=orjson.OPT_INDENT_2),
                    media_type="application/json",
                    headers={"content-disposition": 'attachment; filename="touched.json"'})


@router.get("/touch.csv")
async def touch_csv(request: Request) -> Response:
    report, _ = await _touched(request)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["identity", "section", "name", "count", "last"])
    for section in ("tables_read", "tables_written", "columns_read", "columns_written",
                    "masked_columns"):
        for item in report[section]:
            writer.writerow([report["identity"], section, item["name"], item["count"], item["last"]])
    for item in report["denials_by_rule"]:
        writer.writerow([report["identity"], "denials_by_rule", item["rule"], item["count"],
                         item["last"]])
    for item in report["approvals"]:
        writer.writerow([report["identity"], f"approval_{item['step']}", item["approval_id"], 1,
                         item["time"]])
    return Response(out.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"content-disposition": 'attachment; filename="touched.csv"'})


@router.get("/health")
async def health(request: Request) -> Response:
    """Per chain: the last verified seq, gaps and breaks; the ingester's progress."""
    who = await reader(request)
    if who.scope.kind != "all":
        raise Forbidden("console_denied", "chain health is for audit readers")
    async with who.console.pool.acquire() as conn:
        chains = await queries.chain_health(conn)
        malformed = await queries.malformed(conn)
    return render(request, "health.html", chains=chains, malformed=malformed,
                  ingest=who.console.ingester.status)
