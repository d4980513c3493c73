"""What the pages ask of the index: every query bounded, parameterised, and scoped.

A ``Scope`` is what policy said the reader may see (rego/querygate/console.rego): every
event, or only the events of their own identity (as the caller, or as the person an agent
acted for). Every query here takes one, so no page can forget it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg
import orjson

from app.console.index import BREAKING as _BREAKING
from app.console.index import TOUCH_SECTIONS, touch_items
from app.errors import BadRequest

PAGE_SIZE = 50
CHANNELS = ("http", "pgwire", "mcp")
TYPES = ("decision", "execution", "approval", "auth_failure", "session", "admin",
         "catalog_changed", "lifecycle")


@dataclass(frozen=True, slots=True)
class Scope:
    """All events, or only those of (sub, issuer)."""

    kind: Literal["all", "own"]
    sub: str
    issuer: str

    def where(self, args: list[Any]) -> str:
        if self.kind == "all":
            return "TRUE"
        args.extend([self.sub, self.issuer])
        a, b = len(args) - 1, len(args)
        return f"((sub = ${a} AND issuer = ${b}) OR (obo_sub = ${a} AND obo_issuer = ${b}))"


@dataclass(frozen=True, slots=True)
class Filters:
    """The timeline's filters, validated (a bad value is a 400 ``invalid_filter``)."""

    identity: str | None = None
    group: str | None = None
    channel: str | None = None
    table: str | None = None
    column: str | None = None
    decision: str | None = None
    rule: str | None = None
    code: str | None = None
    type: str | None = None
    approval: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    @classmethod
    def parse(cls, params: dict[str, str]) -> Filters:
        def text(name: str) -> str | None:
            value = (params.get(name) or "").strip()
            if len(value) > 200:
                raise BadRequest("invalid_filter", f"{name} is longer than 200 characters")
            return value or None

        channel, kind = text("channel"), text("type")
        if channel is not None and channel not in CHANNELS:
            raise BadRequest("invalid_filter", f"channel must be one of {', '.join(CHANNELS)}")
        if kind is not None and kind not in TYPES:
            raise BadRequest("invalid_filter", f"type must be one of {', '.join(TYPES)}")
        return cls(
            identity=text("identity"), group=text("group"), channel=channel,
            table=_qualified(text("table")), column=_qualified(text("column")),
            decision=text("decision"), rule=text("rule"), code=text("code"), type=kind,
            approval=text("approval"),
            since=parse_time(text("since"), "since"), until=parse_time(text("until"), "until"),
        )

    def query_string(self) -> dict[str, str]:
        out = {}
        for name in ("identity", "group", "channel", "table", "column", "decision", "rule",
                     "code", "type", "approval"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.isoformat()
        return out


def _qualified(name: str | None) -> str | None:
    # The audit names tables and columns schema-qualified; "customers" means public.customers.
    if name is None or "." in name:
        return name
    return f"public.{name}"


def parse_time(value: str | None, name: str) -> dt.datetime | None:
    """An ISO 8601 time (a date, or a datetime-local without zone, is UTC)."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest("invalid_filter", f"{name} is not an ISO 8601 time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def encode_cursor(row: asyncpg.Record) -> str:
    raw = orjson.dumps([row["time"].isoformat(), row["instance"], row["chain"], row["seq"]])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[dt.datetime, str, str, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        when, instance, chain, seq = orjson.loads(raw)
        if not (isinstance(instance, str) and isinstance(chain, str) and isinstance(seq, int)):
            raise ValueError
        return dt.datetime.fromisoformat(when), instance, chain, seq
    except (ValueError, TypeError, binascii.Error, orjson.JSONDecodeError):
        raise BadRequest("invalid_cursor", "the cursor is not one this console gave") from None


_LIST_COLUMNS = ("instance, chain, seq, time, type, sub, obo_sub, channel, outcome, code, rules, "
                 "tables, sql, verified, approval_id")


# Each filter and its condition ($? is its parameter); the GIN indexes serve the arrays.
_FILTER_CLAUSES = (
    ("identity", "(sub = $? OR obo_sub = $?)"),
    ("group", "groups @> ARRAY[$?]::text[]"),
    ("channel", "channel = $?"),
    ("table", "tables @> ARRAY[$?]::text[]"),
    ("column", "columns @> ARRAY[$?]::text[]"),
    ("decision", "outcome = $?"),
    ("rule", "rules @> ARRAY[$?]::text[]"),
    ("code", "code = $?"),
    ("type", "type = $?"),
    ("approval", "approval_id = $?"),
    ("since", "time >= $?"),
    ("until", "time < $?"),
)


@dataclass
class Page:
    rows: list[asyncpg.Record]
    next_cursor: str | None


async def timeline(conn: asyncpg.Connection, scope: Scope, filters: Filters,
                   cursor: str | None, limit: int = PAGE_SIZE) -> Page:
    """One page of events, newest first, after ``cursor``."""
    args: list[Any] = []
    where = [scope.where(args)]

    def add(clause: str, value: Any) -> None:
        args.append(value)
        where.append(clause.replace("$?", f"${len(args)}"))

    for name, clause in _FILTER_CLAUSES:
        value = getattr(filters, name)
        if value is not None:
            add(clause, value)
    if cursor:
        when, instance, chain, seq = decode_cursor(cursor)
        args.extend([when, instance, chain, seq])
        n = len(args)
        where.append(f"(time, instance, chain, seq) < (${n - 3}, ${n - 2}, ${n - 1}, ${n})")
    args.append(limit + 1)
    rows = await conn.fetch(
        f"SELECT {_LIST_COLUMNS} FROM events WHERE {' AND '.join(where)} "
        f"ORDER BY time DESC, instance DESC, chain DESC, seq DESC LIMIT ${len(args)}",
        *args,
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, encode_cursor(rows[-1]) if more and rows else None)


@dataclass
class Detail:
    event: dict[str, Any]
    row: asyncpg.Record
    breaks: list[asyncpg.Record]
    chain: asyncpg.Record | None
    previous: int | None
    next: int | None
    related: list[asyncpg.Record] = field(default_factory=list)
    chain_verified_through: int | None = None


async def event_detail(conn: asyncpg.Connection, scope: Scope, instance: str, chain: str,
                       seq: int) -> Detail | None:
    """One event with its place in the chain, or None when absent or not the reader's."""
    args: list[Any] = [instance, chain, seq]
    row = await conn.fetchrow(
        f"SELECT * FROM events WHERE instance = $1 AND chain = $2 AND seq = $3 "
        f"AND {scope.where(args)}", *args,
    )
    if row is None:
        return None
    breaks = await conn.fetch(
        "SELECT kind, detail, seen_at FROM breaks WHERE instance = $1 AND chain = $2 AND "
        "seq = $3 ORDER BY id", instance, chain, seq,
    )
    state = await conn.fetchrow(
        "SELECT * FROM chains WHERE instance = $1 AND chain = $2", instance, chain
    )
    neighbours = await conn.fetchrow(
        "SELECT (SELECT max(seq) FROM events WHERE instance = $1 AND chain = $2 AND seq < $3) "
        "AS prev, (SELECT min(seq) FROM events WHERE instance = $1 AND chain = $2 AND seq > $3) "
        "AS next", instance, chain, seq,
    )
    related: list[asyncpg.Record] = []
    if row["request_id"]:
        rargs: list[Any] = [row["request_id"], instance, chain, seq]
        related = await conn.fetch(
            f"SELECT {_LIST_COLUMNS} FROM events WHERE request_id = $1 AND NOT (instance = $2 "
            f"AND chain = $3 AND seq = $4) AND {scope.where(rargs)} ORDER BY time LIMIT 20",
            *rargs,
        )
    return Detail(
        event=orjson.loads(row["body"]), row=row, breaks=breaks, chain=state,
        previous=neighbours["prev"], next=neighbours["next"], related=related,
        chain_verified_through=state["verified_seq"] if state else None,
    )


async def decisions_by_id(conn: asyncpg.Connection, ids: list[str]) -> dict[str, dict[str, Any]]:
    """The decision event of each decision id (the facts an approval was asked for)."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (decision_id) decision_id, body FROM events "
        "WHERE type = 'decision' AND decision_id = ANY($1::text[]) ORDER BY decision_id, time",
        ids,
    )
    return {r["decision_id"]: orjson.loads(r["body"]) for r in rows}


def _full_days(since: dt.datetime | None,
               until: dt.datetime | None) -> tuple[dt.date | None, dt.date | None]:
    """The whole UTC days inside [since, until): [first, last) (None: unbounded)."""
    first = last = None
    if since is not None:
        start = since.astimezone(dt.UTC)
        first = start.date() if start.time() == dt.time(0) else start.date() + dt.timedelta(1)
    if until is not None:
        last = until.astimezone(dt.UTC).date()
    return first, last


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(0), dt.UTC)


def _whose(scope: Scope, who: str, match: str, since: dt.datetime | None,
           until: dt.datetime | None) -> tuple[list[Any], list[str]]:
    """The parameters and conditions for ``who``'s events ($1) in scope and period."""
    args: list[Any] = [who]
    where = [match, scope.where(args)]
    for bound, op in ((since, ">="), (until, "<")):
        if bound is not None:
            args.append(bound)
            where.append(f"time {op} ${len(args)}")
    return args, where


async def _touched_events(conn: asyncpg.Connection, scope: Scope, who: str,
                          since: dt.datetime | None, until: dt.datetime | None,
                          into: dict[str, dict[str, list[Any]]]) -> None:
    """The events themselves, for a period shorter than a day at either end of the range."""
    args, where = _whose(scope, who, "(sub = $1 OR obo_sub = $1)", since, until)
    where += ["type = 'decision'", "outcome IN ('allow', 'deny')", "NOT explain"]
    rows = await conn.fetch(
        "SELECT type, explain, outcome, code, rules, tables_read, tables_written, columns_read, "
        f"columns_written, masks, time FROM events WHERE {' AND '.join(where)} LIMIT 200000",
        *args,
    )
    for row in rows:
        for section, name in touch_items(row):
            _add(into, section, name, 1, row["time"])


def _add(into: dict[str, dict[str, list[Any]]], section: str, name: str, n: int,
         last: dt.datetime) -> None:
    entry = into[section].setdefault(name, [0, last])
    entry[0] += n
    entry[1] = max(entry[1], last)


async def touched(conn: asyncpg.Connection, scope: Scope, who: str,
                  since: dt.datetime | None, until: dt.datetime | None) -> dict[str, Any]:
    """What ``who`` (as caller or as the person an agent acted for) touched in [since, until).

    Whole UTC days come from the daily roll-up the ingester keeps (index.touch_daily); the
    part of a day at either end of the range, from the events."""
    totals: dict[str, dict[str, list[Any]]] = {section: {} for section in TOUCH_SECTIONS}
    own_only = scope.kind == "own"
    if not own_only or who == scope.sub:
        first, last = _full_days(since, until)
        if first is not None and last is not None and first >= last:
            await _touched_events(conn, scope, who, since, until, totals)
        else:
            args: list[Any] = [who]
            where = ["who = $1"]
            if own_only:
                args.append(scope.issuer)
                where.append(f"issuer = ${len(args)}")
            for day, op in ((first, ">="), (last, "<")):
                if day is not None:
                    args.append(day)
                    where.append(f"day {op} ${len(args)}")
            for row in await conn.fetch(
                "SELECT section, name, sum(n) AS n, max(last) AS last FROM touch_daily "
                f"WHERE {' AND '.join(where)} GROUP BY section, name", *args,
            ):
                _add(totals, row["section"], row["name"], int(row["n"]), row["last"])
            if since is not None and first is not None and since < _midnight(first):
                await _touched_events(conn, scope, who, since, _midnight(first), totals)
            if until is not None and last is not None and _midnight(last) < until:
                await _touched_events(conn, scope, who, _midnight(last), until, totals)
    sections = {
        section: [{"name": name, "count": n, "last": when.isoformat()}
                  for name, (n, when) in sorted(totals[section].items())]
        for section in TOUCH_SECTIONS
    }
    sections["denials_by_rule"] = [
        {"rule": d["name"], "count": d["count"], "last": d["last"]}
        for d in sorted(sections["denials_by_rule"], key=lambda d: (-d["count"], d["name"]))
    ]
    args, where = _whose(scope, who, "(sub = $1 OR obo_sub = $1 OR requester_sub = $1)",
                         since, until)
    where.append("type = 'approval'")
    approvals = await conn.fetch(
        "SELECT approval_id, outcome, time, tables, body->'approval'->>'reason' AS reason, "
        f"instance, chain, seq FROM events WHERE {' AND '.join(where)} "
        "ORDER BY time LIMIT 1000", *args,
    )
    return {
        "identity": who,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
        **sections,
        "approvals": [{"approval_id": r["approval_id"], "step": r["outcome"],
                       "time": r["time"].isoformat(), "tables": list(r["tables"]),
                       "reason": r["reason"],
                       "event": f"{r['instance']}/{r['chain']}/{r['seq']}"} for r in approvals],
    }




async def chain_health(conn: asyncpg.Connection, instance: str | None = None,
                       chain: str | None = None) -> list[dict[str, Any]]:
    """Per chain: events, the last seq verified (complete and unbroken from 1), gaps, breaks."""
    args: list[Any] = []
    where = of_e = "TRUE"
    if instance is not None and chain is not None:
        args = [instance, chain]
        where = "instance = $1 AND chain = $2"
        of_e = "e.instance = $1 AND e.chain = $2"
    chains = await conn.fetch(
        f"SELECT * FROM chains WHERE {where} ORDER BY instance, last_time DESC", *args
    )
    # Every seq up to a chain's verified seq is held, so gaps are looked for above it only.
    gaps = await conn.fetch(
        "SELECT instance, chain, prev + 1 AS first, seq - 1 AS last FROM (SELECT e.instance, "
        "e.chain, e.seq, lag(e.seq, 1, greatest(c.verified_seq - 1, 0)) OVER (PARTITION BY "
        "e.instance, e.chain ORDER BY e.seq) AS prev FROM events e JOIN chains c "
        f"USING (instance, chain) WHERE e.seq >= c.verified_seq AND {of_e}) s "
        "WHERE seq > prev + 1 ORDER BY instance, chain, first LIMIT 10000", *args,
    )
    breaks = await conn.fetch(
        f"SELECT instance, chain, seq, kind, detail, seen_at FROM breaks WHERE {where} "
        "ORDER BY id LIMIT 10000", *args,
    )
    out = []
    for c in chains:
        key = (c["instance"], c["chain"])
        chain_gaps = [(g["first"], g["last"]) for g in gaps if (g["instance"], g["chain"]) == key]
        chain_breaks = [dict(b) for b in breaks if (b["instance"], b["chain"]) == key]
        verified = c["verified_seq"]
        bad = [b["seq"] for b in chain_breaks if b["kind"] in _BREAKING and b["seq"] is not None]
        out.append({
            "instance": c["instance"], "chain": c["chain"], "events": c["events"],
            "last_seq": c["last_seq"], "duplicates": c["duplicates"],
            "first_time": c["first_time"], "last_time": c["last_time"],
            "last_verified_seq": verified, "gaps": chain_gaps, "breaks": chain_breaks,
            "ok": not chain_gaps and not bad,
        })
    return out


async def malformed(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Lines of the source that were not sealed events at all."""
    return list(await conn.fetch(
        "SELECT source, source_offset, detail, seen_at FROM breaks WHERE kind = 'malformed' "
        "ORDER BY id LIMIT 100"
    ))
