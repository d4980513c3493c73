"""The console's audit index on real PostgreSQL: exactly once across a SIGKILL, chain breaks,
and nobody but the console can read it (issue 19, acceptance 3)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from app.audit import GENESIS, canonical, event_hash, verify_file
from app.console import index
from app.console.ingest import FileIngester
from app.devstack import APP_ROLE, Postgres, admin_database_dsn, prepare_console_database
from tests.conftest import REPO

pytestmark = pytest.mark.integration

_numbers = itertools.count()


def sealed(n: int, instance: str = "gw-test", chain: str | None = None,
           subs: tuple[str, ...] = ("alice", "dana", "sam")) -> list[dict[str, Any]]:
    """``n`` decision events sealed into one chain exactly as app/audit.py seals them."""
    chain = chain or uuid.uuid4().hex
    events, prev = [], GENESIS
    for seq in range(1, n + 1):
        sub = subs[seq % len(subs)]
        event: dict[str, Any] = {
            "schema": "querygate.audit/v1", "type": "decision", "id": str(uuid.uuid4()),
            "time": f"2026-11-21T10:{(seq // 60) % 60:02d}:{seq % 60:02d}.000000+00:00",
            "environment": "staging", "instance": instance, "chain": chain, "seq": seq,
            "prev_hash": prev,
            "request": {"id": str(uuid.uuid4()), "source_ip": "127.0.0.1", "method": "POST",
                        "path": "/v1/query", "channel": "http"},
            "identity": {"sub": sub, "issuer": "querygate-dev", "auth": "jwt",
                         "groups": ["analysts"], "roles": [], "attributes": {},
                         "on_behalf_of": None},
            "decision": {"outcome": "allow", "by": "policy", "code": None, "explain": False,
                         "id": str(uuid.uuid4()), "cached": False, "bundle_revision": None,
                         "policy_allow": True,
                         "reasons": [{"rule": "reader_group_select", "message": "readers"}],
                         "masks": {"public.customers.email": "email"},
                         "require_approval": None, "max_rows": None,
                         "max_rows_affected": None, "db_role": None},
            "query": {"sql": "SELECT id, email FROM customers WHERE id < $1",
                      "fingerprint": "sha256:" + "1" * 64, "kind": "select",
                      "tables": {"read": ["public.customers"], "write": []},
                      "columns": {"read": ["public.customers.email", "public.customers.id"],
                                  "write": []},
                      "functions": [], "param_count": 1, "catalog_version": 1},
            "durations_us": {"auth": 1, "facts": 2, "policy": 3},
        }
        event["hash"] = event_hash(event)
        prev = event["hash"]
        events.append(event)
    return events


def write_jsonl(path: Path, events: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(canonical(e) + b"\n" for e in events))


@pytest.fixture
def index_dsn(postgres: Postgres) -> Iterator[str]:
    """A fresh index database, owned by the console's role, for one test."""
    name = f"qg_index_{os.getpid()}_{next(_numbers)}"
    yield prepare_console_database(postgres.admin_dsn, name)

    async def drop() -> None:
        conn = await asyncpg.connect(postgres.admin_dsn)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(dsn, server_settings=index.SERVER_SETTINGS)
        try:
            return await conn.fetch(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def chain_health(dsn: str) -> list[dict[str, Any]]:
    """What the chain health page shows, per chain."""
    from app.console import queries

    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(dsn, server_settings=index.SERVER_SETTINGS)
        try:
            return await queries.chain_health(conn)
        finally:
            await conn.close()

    return asyncio.run(run())


def count(dsn: str) -> int:
    try:
        return int(fetch(dsn, "SELECT count(*) FROM events")[0][0])
    except asyncpg.UndefinedTableError:
        return 0  # not migrated yet


def _ingest_process(dsn: str, source: Path, batch: int) -> subprocess.Popen[bytes]:
    """`querygate console ingest --once` in a process of its own; its output in <source>.log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUERYGATE_")}
    env.update({
        "QUERYGATE_CONSOLE_DATABASE_URL": dsn,
        "QUERYGATE_CONSOLE_AUDIT_FILE": str(source),
        "QUERYGATE_CONSOLE_INGEST_BATCH": str(batch),
        "QUERYGATE_LOG_LEVEL": "warning",
    })
    with source.with_suffix(".log").open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "app.cli", "console", "ingest", "--once"],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )


def test_ten_thousand_events_exactly_once_across_a_sigkill(index_dsn, tmp_path):
    events = sealed(10_000)
    source = tmp_path / "audit.jsonl"
    write_jsonl(source, events)

    first = _ingest_process(index_dsn, source, batch=40)
    deadline = time.monotonic() + 60
    while count(index_dsn) < 1000:
        assert first.poll() is None, source.with_suffix(".log").read_text()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert first.returncode == -signal.SIGKILL
    midway = count(index_dsn)
    assert 1000 <= midway < 10_000, "the kill must land mid-way"
    # What the killed process committed is whole: its stored offset is right after its rows.
    offset = fetch(index_dsn, "SELECT position FROM offsets")[0][0]
    assert source.read_bytes()[:offset].count(b"\n") == midway

    second = _ingest_process(index_dsn, source, batch=500)
    assert second.wait(120) == 0, source.with_suffix(".log").read_text()[-2000:]

    ids = [row["id"] for row in fetch(index_dsn, "SELECT body->>'id' AS id FROM events")]
    assert len(ids) == 10_000 and set(ids) == {e["id"] for e in events}
    seqs = [r[0] for r in fetch(index_dsn, "SELECT seq FROM events ORDER BY seq")]
    assert seqs == list(range(1, 10_001))
    assert fetch(index_dsn, "SELECT count(*) FROM breaks")[0][0] == 0
    assert not fetch(index_dsn, "SELECT * FROM events WHERE verified <> 'ok'")
    chain = fetch(index_dsn, "SELECT * FROM chains")[0]
    assert (chain["last_seq"], chain["events"], chain["last_hash"], chain["verified_seq"]) == (
        10_000, 10_000, events[-1]["hash"], 10_000)
    assert fetch(index_dsn, "SELECT position FROM offsets")[0][0] == source.stat().st_size

    # Read again from the start (a lost offset, a resend): recognised, nothing added twice.
    fetch(index_dsn, "DELETE FROM offsets")
    again = _ingest_process(index_dsn, source, batch=1000)
    assert again.wait(120) == 0
    assert count(index_dsn) == 10_000
    assert fetch(index_dsn, "SELECT duplicates FROM chains")[0][0] == 10_000
    assert fetch(index_dsn, "SELECT count(*) FROM breaks")[0][0] == 0


async def _ingest(dsn: str, source: Path, batch: int = 7) -> FileIngester:
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2,
                                     server_settings=index.SERVER_SETTINGS)
    try:
        async with pool.acquire() as conn:
            await index.migrate(conn)
        ingester = FileIngester(pool, source, batch, 0.05)
        await ingester.run_once()
        return ingester
    finally:
        await pool.close()


def test_an_edited_event_a_relinked_edit_and_a_gap_show_as_breaks(index_dsn, tmp_path):
    events = sealed(60, instance="gw-edit")
    events[19]["identity"]["sub"] = "mallory"  # edited in place: its hash no longer fits
    forged = events[29]
    forged["query"]["sql"] = "SELECT 1"
    forged["hash"] = event_hash(forged)  # hash recomputed: the next event's link breaks
    del events[39]  # seq 40 removed
    source = tmp_path / "audit.jsonl"
    write_jsonl(source, events)

    asyncio.run(_ingest(index_dsn, source))

    breaks = {(r["kind"], r["seq"]) for r in fetch(
        index_dsn, "SELECT kind, seq FROM breaks WHERE instance = 'gw-edit'")}
    assert breaks == {("edited", 20), ("broken_link", 31)}
    verified = dict(fetch(index_dsn, "SELECT seq, verified FROM events WHERE verified <> 'ok'"))
    assert verified == {20: "edited", 31: "broken_link"}
    # The same judgement as `querygate audit verify` of the same file.
    report = verify_file(source).report()["chains"][0]
    assert report["edited"] == [20] and report["broken_links"] == [31]
    assert report["gaps"] == [(40, 40)]

    (chain,) = chain_health(index_dsn)
    assert chain["instance"] == "gw-edit"
    assert chain["gaps"] == [(40, 40)]
    assert chain["last_verified_seq"] == 19
    assert {(b["kind"], b["seq"]) for b in chain["breaks"]} == breaks


def test_a_torn_line_waits_and_a_malformed_line_is_a_break(index_dsn, tmp_path):
    events = sealed(5, instance="gw-torn")
    source = tmp_path / "audit.jsonl"
    data = b"".join(canonical(e) + b"\n" for e in events[:3]) + b"not json\n"
    source.write_bytes(data + canonical(events[3])[:40])  # the sink is mid-write

    ingester = asyncio.run(_ingest(index_dsn, source))
    assert count(index_dsn) == 3
    assert ingester.status.offset == len(data)
    assert [r["kind"] for r in fetch(index_dsn, "SELECT kind FROM breaks")] == ["malformed"]

    source.write_bytes(data + canonical(events[3]) + b"\n" + canonical(events[4]) + b"\n")
    asyncio.run(_ingest(index_dsn, source))
    assert count(index_dsn) == 5
    assert fetch(index_dsn, "SELECT count(*) FROM breaks")[0][0] == 1


def test_no_caller_of_the_gateway_can_read_the_index(index_dsn, postgres):
    name = index_dsn.split("@/", 1)[1].split("?", 1)[0]
    fetch(index_dsn, "SELECT 1")  # the console's role can

    async def connect_as(role: str) -> None:
        dsn = admin_database_dsn(postgres.app_dsn.replace(f"{APP_ROLE}@", f"{role}@"), name)
        conn = await asyncpg.connect(dsn)
        await conn.close()

    # The gateway's login role (whose masking profiles are its members) and any other role.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        asyncio.run(connect_as(APP_ROLE))

    async def other_role() -> None:
        admin = await asyncpg.connect(postgres.admin_dsn)
        try:
            await admin.execute("DROP ROLE IF EXISTS qg_some_app; CREATE ROLE qg_some_app LOGIN")
        finally:
            await admin.close()

    asyncio.run(other_role())
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        asyncio.run(connect_as("qg_some_app"))


def test_the_index_is_not_reachable_through_the_gateway(gateway, alice):
    response = gateway.query("SELECT seq FROM querygate_audit.events", alice)
    assert response.status_code in (403, 422), response.text
    assert "seq" not in response.json().get("columns", [])
    assert orjson.loads(response.content)["error"]["code"] in ("unknown_table", "unknown_object",
                                                               "schema_not_allowed")


def test_kafka_topic_ingestion_resumes_from_the_stored_offsets(index_dsn, kafka):
    """The console's Kafka source: each partition from its stored offset; a resend of events
    already indexed (a producer retry) is recognised, not added."""
    from aiokafka import AIOKafkaProducer

    from app.console.ingest import KafkaIngester

    topic = f"console-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=2)
    first, second = sealed(600, instance="gw-a"), sealed(400, instance="gw-b")

    async def produce(events: list[dict[str, Any]]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all",
                                    enable_idempotence=True)
        await producer.start()
        try:
            for event in events:
                await producer.send(topic, canonical(event), key=event["instance"].encode(),
                                    partition=0 if event["instance"] == "gw-a" else 1)
            await producer.flush()
        finally:
            await producer.stop()

    async def ingest() -> KafkaIngester:
        pool = await asyncpg.create_pool(index_dsn, min_size=1, max_size=2,
                                         server_settings=index.SERVER_SETTINGS)
        try:
            async with pool.acquire() as conn:
                await index.migrate(conn)
            ingester = KafkaIngester(pool, kafka.bootstrap, topic, 128, 0.2)
            await asyncio.wait_for(ingester.run(once=True), 60)
            return ingester
        finally:
            await pool.close()

    asyncio.run(produce(first[:400] + second[:250]))
    asyncio.run(ingest())
    assert count(index_dsn) == 650
    offsets = dict(fetch(index_dsn, "SELECT source, position FROM offsets"))
    assert offsets == {f"kafka:{topic}:0": 400, f"kafka:{topic}:1": 250}

    # More events, and 50 of the indexed ones sent again.
    asyncio.run(produce(first[350:] + second[250:]))
    ingester = asyncio.run(ingest())
    assert ingester.status.inserted == 350 and ingester.status.duplicates == 50
    assert count(index_dsn) == 1000
    assert fetch(index_dsn, "SELECT count(*) FROM breaks")[0][0] == 0
    chains = {r["instance"]: (r["last_seq"], r["events"]) for r in fetch(
        index_dsn, "SELECT instance, last_seq, events FROM chains")}
    assert chains == {"gw-a": (600, 600), "gw-b": (400, 400)}


def test_what_did_x_touch_from_the_daily_roll_up_equals_the_events(index_dsn, tmp_path):
    """The roll-up (whole days) plus the events (the part-days at the ends) give exactly what
    counting the events themselves gives, for any period; and re-reading adds nothing."""
    import datetime as dt

    from app.console import queries
    from bench.console_bench import synthetic_events

    events = synthetic_events(3000, instances=2, days=6, seed=7)
    source = tmp_path / "audit.jsonl"
    write_jsonl(source, events)
    asyncio.run(_ingest(index_dsn, source, batch=300))

    async def both(who: str, since: dt.datetime | None, until: dt.datetime | None,
                   scope: queries.Scope) -> tuple[dict[str, Any], dict[str, Any]]:
        conn = await asyncpg.connect(index_dsn, server_settings=index.SERVER_SETTINGS)
        try:
            fast = await queries.touched(conn, scope, who, since, until)
            slow: dict[str, dict[str, list[Any]]] = {s: {} for s in index.TOUCH_SECTIONS}
            if scope.kind == "all" or who == scope.sub:
                await queries._touched_events(conn, scope, who, since, until, slow)
            return fast, slow
        finally:
            await conn.close()

    end = max(dt.datetime.fromisoformat(e["time"]) for e in events)
    start = min(dt.datetime.fromisoformat(e["time"]) for e in events)
    midnight = dt.datetime.combine(start.date() + dt.timedelta(2), dt.time(0), dt.UTC)
    everyone = queries.Scope("all", "sec", "querygate-dev")
    own = queries.Scope("own", "alice", "querygate-dev")
    periods = [(None, None), (start + dt.timedelta(hours=5), end - dt.timedelta(hours=7)),
               (midnight, midnight + dt.timedelta(days=2)),
               (midnight + dt.timedelta(hours=3), midnight + dt.timedelta(hours=9)),
               (None, midnight + dt.timedelta(minutes=1)), (midnight, None)]
    for scope in (everyone, own):
        for since, until in periods:
            fast, slow = asyncio.run(both("alice", since, until, scope))
            for section in index.TOUCH_SECTIONS:
                key = "rule" if section == "denials_by_rule" else "name"
                got = {d[key]: d["count"] for d in fast[section]}
                assert got == {k: v[0] for k, v in slow[section].items()}, (section, since, until)
            assert fast["tables_read"], (since, until)  # the periods are not empty
    # alice may ask about herself only; anyone else's report is empty for her.
    assert not asyncio.run(both("dana", None, None, own))[0]["tables_read"]
    before = fetch(index_dsn, "SELECT sum(n) FROM touch_daily")[0][0]
    fetch(index_dsn, "DELETE FROM offsets")
    asyncio.run(_ingest(index_dsn, source, batch=1000))
    assert fetch(index_dsn, "SELECT sum(n) FROM touch_daily")[0][0] == before


def test_an_event_with_a_nul_in_a_claim_is_indexed_and_kept_byte_for_byte(index_dsn, tmp_path):
    events = sealed(3, instance="gw-nul", subs=("a\x00b",))
    source = tmp_path / "audit.jsonl"
    write_jsonl(source, events)
    asyncio.run(_ingest(index_dsn, source))
    rows = fetch(index_dsn, "SELECT sub, verified, body::text AS body FROM events ORDER BY seq")
    assert [(r["sub"], r["verified"]) for r in rows] == [("a\ufffdb", "ok")] * 3
    assert [r["body"].encode() for r in rows] == [canonical(e) for e in events]
    assert fetch(index_dsn, "SELECT count(*) FROM breaks")[0][0] == 0


def test_an_event_postgresql_cannot_index_is_a_break_and_the_rest_go_on(index_dsn, tmp_path):
    import random
    import string

    events = sealed(12, instance="gw-long")
    rng = random.Random(5)
    # A subject too long for a btree entry, even compressed: refused by the index.
    events[4]["identity"]["sub"] = "".join(rng.choices(string.ascii_letters, k=12_000))
    events[4]["hash"] = event_hash(events[4])
    source = tmp_path / "audit.jsonl"
    write_jsonl(source, events)
    ingester = asyncio.run(_ingest(index_dsn, source, batch=5))
    assert count(index_dsn) == 11 and ingester.status.offset == source.stat().st_size
    [(kind, detail, offset)] = fetch(index_dsn, "SELECT kind, detail, source_offset FROM breaks")
    assert kind == "malformed" and detail.startswith("cannot be indexed: SQLSTATE 54")
    assert offset == len(b"".join(canonical(e) + b"\n" for e in events[:4]))
    (chain,) = chain_health(index_dsn)
    assert chain["gaps"] == [(5, 5)] and chain["last_verified_seq"] == 4
