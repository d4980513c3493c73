"""What a governed read costs on the wire: one round trip (issue #16).

Counted by ``Wire`` (tests/integration/wire.py), a pass-through on PostgreSQL's socket
between a real gateway and the real server, which reads the messages the gateway sends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.wire import Wire, round_trips

pytestmark = pytest.mark.integration

READ = "SELECT id, email FROM customers WHERE id = $1"


@pytest.fixture(scope="module")
def wired(postgres, make_gateway) -> Iterator[tuple[Wire, Any]]:
    """A gateway whose every connection goes through a ``Wire``; one connection per
    profile, so a repeated statement finds itself prepared, and no catalog refresh."""
    wire = Wire(postgres.app_dsn)
    gateway = make_gateway(database_url=wire.dsn, profile_pool_max=1, catalog_refresh_s=3600)
    yield wire, gateway
    gateway.stop()
    wire.close()


def test_a_masked_read_costs_one_round_trip(wired, alice, db):
    """A read under a masking profile, once its profile's pool is open and the statement is
    in the connection's cache: Bind, Execute, Sync, and nothing else, not even the pool's
    reset after it. Before issue #16 the same read cost four round trips on the wire:
    ``BEGIN READ ONLY``, Bind (+Sync, of the cursor's portal), Execute (+Sync), ``COMMIT``.
    """
    wire, gateway = wired
    first = gateway.query(READ, alice, [3])
    assert first.status_code == 200, first.text
    with wire.recording() as sent:
        response = gateway.query(READ, alice, [3])
    assert response.status_code == 200, response.text
    body = response.json()
    raw = db.fetchval("SELECT email FROM customers WHERE id = 3")
    assert body["rows"][0][0] == 3 and body["rows"][0][1] != raw  # the database masked it
    assert body["decision"]["masked"]
    assert [kind for kind, _ in sent] == ["B", "E", "S"], sent
    assert round_trips(sent) == 1


def test_a_write_runs_in_a_read_write_transaction_in_two_round_trips(wired, dana, db):
    """Sessions that run callers' statements are read only by default, so a write says READ
    WRITE in its own BEGIN. The BEGIN goes out in the flight of the statement's Bind and
    Execute, without a Sync of its own, and the COMMIT carries the pool's reset: two round
    trips, where it took four (BEGIN and the reset were a round trip each)."""
    wire, gateway = wired
    before = db.fetchval("SELECT status FROM orders WHERE id = 33")
    sql = "UPDATE orders SET status = $1 WHERE id = 33"
    try:
        assert gateway.query(sql, dana, ["warmup"]).status_code == 200
        with wire.recording() as sent:
            response = gateway.query(sql, dana, ["round-trip"])
        assert response.status_code == 200, response.text
        assert response.json()["rows_affected"] == 1  # the statement's tag, not the BEGIN's
        assert db.fetchval("SELECT status FROM orders WHERE id = 33") == "round-trip"
        # One flight: BEGIN READ WRITE (Parse, Bind, Execute), the statement's Bind and
        # Execute, one Sync. Then COMMIT with the reset.
        assert sent[:6] == [("P", "BEGIN READ WRITE"), ("B", ""), ("E", ""),
                            ("B", ""), ("E", ""), ("S", "")], sent
        queries = [text for kind, text in sent if kind == "Q"]
        assert len(queries) == 1 and queries[0].startswith("COMMIT;\n"), sent
        assert queries[0].endswith("RESET ALL;"), sent
        assert round_trips(sent) == 2, sent
    finally:
        db.execute(f"UPDATE orders SET status = '{before}' WHERE id = 33")


def test_a_read_on_the_wire_protocol_costs_one_round_trip(postgres, make_gateway, keys):
    """psql's simple Query of a masked read, on a pooled connection already open: Parse,
    Bind, Describe, Execute and Sync in one write, and no reset when it goes back (issue 17:
    before, four round trips: the portal's open, its Execute, the Sync and the reset)."""
    import psycopg

    from app.devstack import free_port

    wire = Wire(postgres.app_dsn)
    gateway = make_gateway(database_url=wire.dsn, profile_pool_max=1, catalog_refresh_s=3600,
                           pg_port=free_port(), dev_mode=True)
    token = keys.token("alice", ["analysts"])
    try:
        with psycopg.connect(host="127.0.0.1", port=gateway.settings.pg_port, dbname="appdb",
                             user="alice", password=token, sslmode="disable",
                             autocommit=True) as conn:
            sql = "SELECT id, email FROM customers WHERE id = 3"
            conn.execute(sql, prepare=False).fetchall()
            with wire.recording() as sent:
                rows = conn.execute(sql, prepare=False).fetchall()
        assert rows and rows[0][0] == 3 and "*" in rows[0][1]
        assert [kind for kind, _ in sent] == ["P", "B", "D", "E", "S"], sent
        assert round_trips(sent) == 1
    finally:
        gateway.stop()
        wire.close()
