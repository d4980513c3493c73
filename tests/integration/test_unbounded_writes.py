"""WHEREs that bound nothing in PostgreSQL's semantics are refused as unbounded_write
(docs/approvals.md, "How a WHERE is judged unbounded"), and the table is left unchanged."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def _orders_digest(db) -> str:
    return db.fetchval("SELECT md5(string_agg(id || ':' || status, ',' ORDER BY id)) FROM orders")


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE orders SET status = 'void' WHERE true::boolean",
        "UPDATE orders SET status = 'void' WHERE (SELECT true)",
        "UPDATE orders SET status = 'void' WHERE id IS NOT NULL",
        "UPDATE orders SET status = 'void' WHERE id IN (id)",
        "UPDATE orders SET status = 'void' WHERE id <> 0 OR id = 0",
        "DELETE FROM orders WHERE id <> 0 OR id = 0",
        "DELETE FROM orders WHERE (SELECT true FROM customers LIMIT 1)",
        "DELETE FROM orders WHERE current_user = current_user",
    ],
)
def test_writes_whose_where_bounds_nothing_are_refused(gateway, dana, db, sql):
    before = _orders_digest(db)
    response = gateway.query(sql, dana)
    assert response.status_code == 403, response.text
    rules = {r["rule"] for r in response.json()["error"]["reasons"]}
    assert "unbounded_write" in rules
    assert _orders_digest(db) == before


def test_a_bounded_write_still_runs(gateway, dana, db):
    status = db.fetchval("SELECT status FROM orders WHERE id = 11")
    response = gateway.query("UPDATE orders SET status = $1 WHERE id = 11 AND id IS NOT NULL",
                             dana, [status])
    assert response.status_code == 200, response.text
    assert db.fetchval("SELECT status FROM orders WHERE id = 11") == status
