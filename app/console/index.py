"""The audit index: every event of the stream, once, in PostgreSQL, with its chain status.

Schema ``querygate_audit`` in a database of its own (``make run``: ``querygate_audit``,
owned by the console's role, CONNECT revoked from PUBLIC), so no caller of the gateway — its
login role, its masking profiles, any application role — can read it.

Exactly once: an event's key is (instance, chain, seq). A batch of source lines is written
in one transaction together with the source offset after its last line, so a crash (even
SIGKILL) either kept the batch and its offset or neither; the next start resumes at the
stored offset and an event seen again is recognised by its key (``ON CONFLICT DO NOTHING``).

The chain is checked as events arrive, with ``app.audit``'s own ``event_hash`` and
``GENESIS`` (the same definition ``querygate audit verify`` uses): an event whose hash does
not match its content is ``edited``; one whose ``prev_hash`` is not the hash of the event
before it is ``broken_link``; a seq already held with another hash is ``conflict``; an
event older than one already held is ``reordered``. Gaps (missing seqs) are read off the
index itself (``queries.chain_health``), so a late event that fills one closes it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from app.audit import GENESIS, event_hash

SCHEMA = "querygate_audit"

MIGRATIONS: tuple[str, ...] = (
    f"""
    CREATE TABLE {SCHEMA}.events (
        instance        text NOT NULL,
        chain           text NOT NULL,
        seq             bigint NOT NULL,
        hash            text NOT NULL,
        prev_hash       text NOT NULL,
        time            timestamptz NOT NULL,
        type            text NOT NULL,
        sub             text,
        issuer          text,
        obo_sub         text,
        obo_issuer      text,
        groups          text[] NOT NULL DEFAULT '{{}}',
        channel         text,
        request_id      text,
        outcome         text,
        code            text,
        rules           text[] NOT NULL DEFAULT '{{}}',
        tables          text[] NOT NULL DEFAULT '{{}}',
        tables_read     text[] NOT NULL DEFAULT '{{}}',
        tables_written  text[] NOT NULL DEFAULT '{{}}',
        columns_read    text[] NOT NULL DEFAULT '{{}}',
        columns_written text[] NOT NULL DEFAULT '{{}}',
        columns         text[] NOT NULL DEFAULT '{{}}',
        masks           text[] NOT NULL DEFAULT '{{}}',
        decision_id     text,
        approval_id     text,
        requester_sub   text,
        explain         boolean NOT NULL DEFAULT false,
        sql             text,
        verified        text NOT NULL,
        -- json, not jsonb: the line as the stream held it (jsonb refuses an escaped NUL, and an
        -- event is evidence: it is kept byte for byte, not normalised).
        body            json NOT NULL,
        source          text NOT NULL,
        source_offset   bigint NOT NULL,
        PRIMARY KEY (instance, chain, seq)
    );
    CREATE INDEX events_time ON {SCHEMA}.events (time DESC, instance DESC, chain DESC, seq DESC);
    CREATE INDEX events_sub_time ON {SCHEMA}.events (sub, time DESC);
    CREATE INDEX events_obo_time ON {SCHEMA}.events (obo_sub, time DESC) WHERE obo_sub IS NOT NULL;
    CREATE INDEX events_request ON {SCHEMA}.events (request_id) WHERE request_id IS NOT NULL;
    CREATE INDEX events_requester ON {SCHEMA}.events (requester_sub, time DESC)
        WHERE requester_sub IS NOT NULL;
    CREATE INDEX events_decision ON {SCHEMA}.events (decision_id) WHERE decision_id IS NOT NULL;
    CREATE INDEX events_approval ON {SCHEMA}.events (approval_id) WHERE approval_id IS NOT NULL;
    CREATE INDEX events_tables ON {SCHEMA}.events USING gin (tables);
    CREATE INDEX events_columns ON {SCHEMA}.events USING gin (columns);
    CREATE INDEX events_groups ON {SCHEMA}.events USING gin (groups);
    CREATE INDEX events_rules ON {SCHEMA}.events USING gin (rules);
    CREATE TABLE {SCHEMA}.chains (
        instance    text NOT NULL,
        chain       text NOT NULL,
        last_seq    bigint NOT NULL,
        last_hash   text NOT NULL,
        -- Every seq from 1 to here is held, unedited and linked: kept up to date by each
        -- batch, lowered by a break found later (a conflict at a held seq).
        verified_seq bigint NOT NULL DEFAULT 0,
        events      bigint NOT NULL,
        duplicates  bigint NOT NULL DEFAULT 0,
        first_time  timestamptz,
        last_time   timestamptz,
        PRIMARY KEY (instance, chain)
    );
    CREATE TABLE {SCHEMA}.breaks (
        id            bigserial PRIMARY KEY,
        instance      text,
        chain         text,
        seq           bigint,
        kind          text NOT NULL CHECK (kind IN
                          ('edited', 'broken_link', 'conflict', 'reordered', 'malformed')),
        detail        text NOT NULL,
        source        text NOT NULL,
        source_offset bigint NOT NULL,
        seen_at       timestamptz NOT NULL DEFAULT now(),
        UNIQUE (source, source_offset, kind)
    );
    CREATE INDEX breaks_seq ON {SCHEMA}.breaks (instance, chain, seq);
    -- "What did X touch", per identity (as caller and as the person an agent acted for) and
    -- UTC day: allowed statements per table/column read or written and masked column, and
    -- denials per rule. Filled in the transaction that indexes the events.
    CREATE TABLE {SCHEMA}.touch_daily (
        who         text NOT NULL,
        issuer      text NOT NULL,
        day         date NOT NULL,
        section     text NOT NULL,
        name        text NOT NULL,
        n           bigint NOT NULL,
        last        timestamptz NOT NULL,
        PRIMARY KEY (who, day, section, name, issuer)
    );
    CREATE TABLE {SCHEMA}.offsets (
        source      text PRIMARY KEY,
        position    bigint NOT NULL,
        updated_at  timestamptz NOT NULL DEFAULT now()
    );
    """,
)

# The pool's connections see only this schema (and pg_catalog).
SERVER_SETTINGS = {"search_path": f"{SCHEMA}, pg_catalog", "application_name": "querygate-console"}


async def migrate(conn: asyncpg.Connection) -> None:
    """Create or move the index schema forward, under an advisory lock (idempotent)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('querygate_audit_migrate'))")
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        await conn.execute(f"REVOKE ALL ON SCHEMA {SCHEMA} FROM PUBLIC")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (version integer NOT NULL)"
        )
        version = await conn.fetchval(f"SELECT max(version) FROM {SCHEMA}.schema_version") or 0
        for number, statement in enumerate(MIGRATIONS[version:], version + 1):
            await conn.execute(statement)
            await conn.execute(f"INSERT INTO {SCHEMA}.schema_version VALUES ($1)", number)


# --- one event as the index holds it --------------------------------------------------------


def _strings(value: Any) -> list[str]:
    return [_clean(v) for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return _clean(value) if isinstance(value, str) else None


def _clean(value: str) -> str:
    # PostgreSQL's text cannot hold NUL; a claim or name with one is still indexed.
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _time(value: Any) -> dt.datetime:
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None:
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    return dt.datetime.fromtimestamp(0, dt.UTC)


def columns_of(event: dict[str, Any]) -> dict[str, Any]:
    """The indexed columns of one event (everything else stays in ``body``)."""
    identity = _dict(event.get("identity"))
    obo = _dict(identity.get("on_behalf_of"))
    request = _dict(event.get("request"))
    decision = _dict(event.get("decision"))
    query = _dict(event.get("query"))
    tables = _dict(query.get("tables"))
    columns = _dict(query.get("columns"))
    approval = _dict(event.get("approval"))
    kind = event.get("type")
    detail = _dict(event.get(kind)) if isinstance(kind, str) else {}
    if kind == "decision":
        outcome, code = decision.get("outcome"), decision.get("code")
    elif kind == "approval":
        outcome, code = approval.get("step"), approval.get("code")
    elif kind == "session":
        outcome, code = detail.get("step"), None
    elif kind == "lifecycle":
        outcome, code = detail.get("action"), None
    else:  # execution, admin, auth_failure
        outcome, code = detail.get("outcome"), detail.get("code")
    read, written = _strings(tables.get("read")), _strings(tables.get("write"))
    cols_read, cols_written = _strings(columns.get("read")), _strings(columns.get("write"))
    approval_id = _str(approval.get("id")) or _str(_dict(event.get("approval_ref")).get("id"))
    return {
        "time": _time(event.get("time")),
        "type": _clean(str(kind)),
        "sub": _str(identity.get("sub")),
        "issuer": _str(identity.get("issuer")),
        "obo_sub": _str(obo.get("sub")),
        "obo_issuer": _str(obo.get("issuer")),
        "groups": _strings(identity.get("groups")),
        "channel": _str(request.get("channel")),
        "request_id": _str(request.get("id")),
        "outcome": _str(outcome),
        "code": _str(code),
        "rules": sorted({_clean(r["rule"]) for r in decision.get("reasons") or []
                         if isinstance(r, dict) and isinstance(r.get("rule"), str)}),
        "tables": sorted(set(read) | set(written) | set(_strings(approval.get("tables")))),
        "tables_read": read,
        "tables_written": written,
        "columns_read": cols_read,
        "columns_written": cols_written,
        "columns": sorted(set(cols_read) | set(cols_written)),
        "masks": sorted(_clean(k) for k in _dict(decision.get("masks")) if isinstance(k, str)),
        "decision_id": _str(decision.get("id")) or _str(approval.get("decision_id")),
        "approval_id": approval_id,
        "requester_sub": _str(_dict(approval.get("requester")).get("sub")),
        "explain": decision.get("explain") is True,
        "sql": _str(query.get("sql")),
    }


# --- ingesting a batch ----------------------------------------------------------------------


@dataclass
class _Chain:
    last_seq: int
    last_hash: str
    verified_seq: int = 0
    events: int = 0
    duplicates: int = 0
    first_time: dt.datetime | None = None
    last_time: dt.datetime | None = None
    dirty: bool = False


@dataclass
class BatchResult:
    """What one batch did to the index."""

    inserted: int = 0
    duplicates: int = 0
    breaks: list[tuple[str | None, str | None, int | None, str]] = field(default_factory=list)


_EVENT_COLUMNS = (
    "instance", "chain", "seq", "hash", "prev_hash", "time", "type", "sub", "issuer", "obo_sub",
    "obo_issuer", "groups", "channel", "request_id", "outcome", "code", "rules", "tables",
    "tables_read", "tables_written", "columns_read", "columns_written", "columns", "masks",
    "decision_id", "approval_id", "requester_sub", "explain", "sql", "verified", "body",
    "source", "source_offset",
)
_FIELDS = _EVENT_COLUMNS[5:_EVENT_COLUMNS.index("verified")]
_INSERT = (
    f"INSERT INTO {SCHEMA}.events ({', '.join(_EVENT_COLUMNS)}) VALUES "
    f"({', '.join(f'${i}' for i in range(1, len(_EVENT_COLUMNS) + 1))}) "
    "ON CONFLICT (instance, chain, seq) DO NOTHING"
)


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        event = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not (
        isinstance(event, dict)
        and isinstance(event.get("instance"), str)
        and isinstance(event.get("chain"), str)
        and isinstance(event.get("seq"), int)
        and not isinstance(event.get("seq"), bool)
        and event["seq"] >= 1
        and isinstance(event.get("prev_hash"), str)
        and isinstance(event.get("hash"), str)
    ):
        return None
    return event


async def ingest_batch(
    conn: asyncpg.Connection, source: str, lines: list[tuple[int, bytes]], next_offset: int
) -> BatchResult:
    """Index ``lines`` (each with its offset in the source) and store ``next_offset``, in one
    transaction. Safe to repeat: events already held are recognised, not added again."""
    result = BatchResult()
    async with conn.transaction():
        parsed = [(offset, raw, _parse(raw)) for offset, raw in lines]
        keys = {(e["instance"], e["chain"]) for _, _, e in parsed if e is not None}
        chains: dict[tuple[str, str], _Chain] = {}
        held: dict[tuple[str, str, int], str] = {}
        for instance, chain in keys:
            row = await conn.fetchrow(
                f"SELECT * FROM {SCHEMA}.chains WHERE instance = $1 AND chain = $2 FOR UPDATE",
                instance, chain,
            )
            if row is not None:
                chains[(instance, chain)] = _Chain(
                    row["last_seq"], row["last_hash"], row["verified_seq"], row["events"],
                    row["duplicates"], row["first_time"], row["last_time"],
                )
            seqs = [e["seq"] for _, _, e in parsed
                    if e is not None and (e["instance"], e["chain"]) == (instance, chain)]
            for found in await conn.fetch(
                f"SELECT seq, hash FROM {SCHEMA}.events "
                "WHERE instance = $1 AND chain = $2 AND seq = ANY($3::bigint[])",
                instance, chain, seqs,
            ):
                held[(instance, chain, found["seq"])] = found["hash"]
        rows: list[tuple[Any, ...]] = []
        breaks: list[tuple[Any, ...]] = []
        for offset, raw, event in parsed:
            if event is None:
                breaks.append((None, None, None, "malformed", "not a sealed audit event",
                               source, offset))
                continue
            key = (event["instance"], event["chain"])
            seq = event["seq"]
            stored = event["hash"]
            edited = event_hash(event) != stored
            seen = held.get((*key, seq))
            if seen is not None:
                if seen == stored and not edited:
                    result.duplicates += 1
                    state = chains.get(key)
                    if state is not None:
                        state.duplicates += 1
                        state.dirty = True
                else:
                    breaks.append((*key, seq, "conflict",
                                   "another event with this seq is already held", source, offset))
                    state = chains.get(key)
                    if state is not None and state.verified_seq >= seq:
                        state.verified_seq = seq - 1
                        state.dirty = True
                continue
            state = chains.get(key)
            verified = "ok"
            if edited:
                verified = "edited"
                breaks.append((*key, seq, "edited", "the stored hash does not match the content",
                               source, offset))
            if state is None or seq > state.last_seq:
                expected = GENESIS if seq == 1 else (
                    state.last_hash if state is not None and seq == state.last_seq + 1 else None
                )
                if expected is not None and event["prev_hash"] != expected:
                    verified = "broken_link" if verified == "ok" else verified
                    breaks.append((*key, seq, "broken_link",
                                   "prev_hash is not the hash of the event before it",
                                   source, offset))
            else:
                verified = "reordered" if verified == "ok" else verified
                breaks.append((*key, seq, "reordered",
                               f"arrived after seq {state.last_seq}", source, offset))
            fields = columns_of(event)
            if state is None:
                state = chains[key] = _Chain(seq, stored)
            if seq > state.last_seq or state.events == 0:
                state.last_seq, state.last_hash = seq, stored
            state.events += 1
            state.dirty = True
            when = fields["time"]
            state.first_time = when if state.first_time is None else min(state.first_time, when)
            state.last_time = when if state.last_time is None else max(state.last_time, when)
            held[(*key, seq)] = stored
            rows.append((
                *key, seq, stored, event["prev_hash"],
                *(fields[c] for c in _FIELDS),
                verified, raw.decode("utf-8", "replace").strip(), source, offset,
            ))
        if rows:
            await conn.executemany(_INSERT, rows)
            await _roll_up(conn, rows)
        result.inserted = len(rows)
        if breaks:
            await conn.executemany(
                f"INSERT INTO {SCHEMA}.breaks (instance, chain, seq, kind, detail, source, "
                "source_offset) VALUES ($1, $2, $3, $4, $5, $6, $7) "
                "ON CONFLICT (source, source_offset, kind) DO NOTHING",
                breaks,
            )
        result.breaks = [(b[0], b[1], b[2], b[3]) for b in breaks]
        for (instance, chain), state in chains.items():
            if not state.dirty:
                continue
            state.verified_seq = await _verified_through(conn, instance, chain, state.verified_seq)
            await conn.execute(
                f"INSERT INTO {SCHEMA}.chains (instance, chain, last_seq, last_hash, "
                "verified_seq, events, duplicates, first_time, last_time) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) "
                "ON CONFLICT (instance, chain) DO UPDATE SET last_seq = EXCLUDED.last_seq, "
                "last_hash = EXCLUDED.last_hash, verified_seq = EXCLUDED.verified_seq, "
                "events = EXCLUDED.events, duplicates = EXCLUDED.duplicates, "
                "first_time = EXCLUDED.first_time, last_time = EXCLUDED.last_time",
                instance, chain, state.last_seq, state.last_hash, state.verified_seq,
                state.events, state.duplicates, state.first_time, state.last_time,
            )
        await _store_offset(conn, source, next_offset)
    return result


TOUCH_SECTIONS = ("tables_read", "tables_written", "columns_read", "columns_written",
                  "masked_columns", "denials_by_rule")
_COLUMN = {name: i for i, name in enumerate(_EVENT_COLUMNS)}


def touch_items(row: dict[str, Any] | asyncpg.Record) -> list[tuple[str, str]]:
    """The (section, name) pairs one indexed event adds to "what did X touch"."""
    if row["type"] != "decision" or row["explain"]:
        return []
    if row["outcome"] == "allow":
        return [(section, name) for section, column in (
            ("tables_read", "tables_read"), ("tables_written", "tables_written"),
            ("columns_read", "columns_read"), ("columns_written", "columns_written"),
            ("masked_columns", "masks")) for name in row[column]]
    if row["outcome"] == "deny":
        return [("denials_by_rule", rule) for rule in (row["rules"] or [row["code"] or "denied"])]
    return []


async def _roll_up(conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
    """Add newly indexed events to touch_daily (duplicates never reach here)."""
    totals: dict[tuple[str, str, dt.date, str, str], list[Any]] = {}
    for values in rows:
        row = {name: values[i] for name, i in _COLUMN.items()}
        items = touch_items(row)
        if not items:
            continue
        whos = {(row["sub"], row["issuer"]), (row["obo_sub"], row["obo_issuer"])}
        day = row["time"].astimezone(dt.UTC).date()
        for who, issuer in whos:
            if who is None or issuer is None:
                continue
            for section, name in items:
                entry = totals.setdefault((who, issuer, day, section, name), [0, row["time"]])
                entry[0] += 1
                entry[1] = max(entry[1], row["time"])
    if totals:
        await conn.executemany(
            f"INSERT INTO {SCHEMA}.touch_daily (who, issuer, day, section, name, n, last) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (who, day, section, name, issuer) "
            f"DO UPDATE SET n = {SCHEMA}.touch_daily.n + EXCLUDED.n, "
            f"last = greatest({SCHEMA}.touch_daily.last, EXCLUDED.last)",
            [(*key, n, last) for key, (n, last) in totals.items()],
        )


# The breaks that stop a chain being verified past them (a malformed line has no seq).
BREAKING = ("edited", "broken_link", "conflict", "reordered")


async def _verified_through(conn: asyncpg.Connection, instance: str, chain: str,
                            verified: int) -> int:
    """Move the verified seq forward over held, unbroken events that follow it."""
    while True:
        rows = await conn.fetch(
            f"SELECT e.seq, e.verified = 'ok' AND NOT EXISTS (SELECT 1 FROM {SCHEMA}.breaks b "
            "WHERE b.instance = e.instance AND b.chain = e.chain AND b.seq = e.seq "
            "AND b.kind = ANY($4::text[])) AS good "
            f"FROM {SCHEMA}.events e WHERE e.instance = $1 AND e.chain = $2 AND e.seq > $3 "
            "ORDER BY e.seq LIMIT 1000",
            instance, chain, verified, list(BREAKING),
        )
        for row in rows:
            if row["seq"] != verified + 1 or not row["good"]:
                return verified
            verified = row["seq"]
        if len(rows) < 1000:
            return verified


# What PostgreSQL says of a value it cannot hold (too long for an index, bad text):
# the line's fault, not the database's, so it must not stop the lines after it.
_UNINDEXABLE = (asyncpg.DataError, asyncpg.ProgramLimitExceededError)


async def ingest(conn: asyncpg.Connection, source: str, lines: list[tuple[int, bytes]],
                 next_offset: int) -> BatchResult:
    """``ingest_batch``, except that a batch PostgreSQL refuses for a value in it is taken
    line by line, and a line it refuses alone is recorded as a break (``malformed``, with
    the SQLSTATE) and passed: one odd event never stops the index."""
    try:
        return await ingest_batch(conn, source, lines, next_offset)
    except _UNINDEXABLE as exc:
        if len(lines) == 1:
            async with conn.transaction():
                await conn.execute(
                    f"INSERT INTO {SCHEMA}.breaks (instance, chain, seq, kind, detail, source, "
                    "source_offset) VALUES (NULL, NULL, NULL, 'malformed', $1, $2, $3) "
                    "ON CONFLICT (source, source_offset, kind) DO NOTHING",
                    f"cannot be indexed: SQLSTATE {exc.sqlstate}", source, lines[0][0],
                )
                await _store_offset(conn, source, next_offset)
            return BatchResult(breaks=[(None, None, None, "malformed")])
    total = BatchResult()
    for i, line in enumerate(lines):
        end = lines[i + 1][0] if i + 1 < len(lines) else next_offset
        part = await ingest(conn, source, [line], end)
        total.inserted += part.inserted
        total.duplicates += part.duplicates
        total.breaks += part.breaks
    return total


async def _store_offset(conn: asyncpg.Connection, source: str, position: int) -> None:
    await conn.execute(
        f"INSERT INTO {SCHEMA}.offsets (source, position, updated_at) VALUES ($1, $2, now()) "
        "ON CONFLICT (source) DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
        source, position,
    )


async def stored_offset(conn: asyncpg.Connection, source: str) -> int:
    """Where ingestion of ``source`` resumes (0 the first time)."""
    value = await conn.fetchval(f"SELECT position FROM {SCHEMA}.offsets WHERE source = $1", source)
    return int(value or 0)
