"""Acceptance for the governed path: real OPA + real PostgreSQL, HTTP in and out."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_allowed_select_returns_rows_and_decision(gateway, alice, db):
    response = gateway.query(
        "SELECT id, full_name, country FROM customers WHERE id <= $1 ORDER BY id", alice, [3]
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert [c["name"] for c in body["columns"]] == ["id", "full_name", "country"]
    assert body["columns"][0]["type"] == "int4"
    expected = db.fetch("SELECT id, full_name, country FROM customers WHERE id <= 3 ORDER BY id")
    assert body["rows"] == [list(r) for r in expected]
    assert body["row_count"] == 3 and body["truncated"] is False
    assert body["decision"]["id"]
    assert {r["rule"] for r in body["decision"]["reasons"]} == {"reader_group_select"}
    assert response.headers["x-request-id"]


def test_drop_table_as_alice_is_denied_and_table_survives(gateway, alice, db):
    response = gateway.query("DROP TABLE orders", alice)
    assert response.status_code == 403
    body = response.json()
    assert body["error"]["code"] == "policy_denied"
    rules = {r["rule"] for r in body["error"]["reasons"]}
    assert "ddl_forbidden_in_environment" in rules
    assert body["decision_id"]
    assert db.table_exists("orders")
    assert db.fetchval("SELECT count(*) FROM orders") == 6000


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1; DROP TABLE orders",
        "SELECT id FROM customers; CREATE TABLE pwned (a int)",
        "SELECT 1;\n-- harmless\nDELETE FROM orders",
        "SELECT $$;$$; DROP TABLE orders",
    ],
)
def test_multiple_statements_are_denied_and_nothing_runs(gateway, dana, db, sql):
    # dana may write and is still refused: the rule is one statement per request.
    response = gateway.query(sql, dana)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "multiple_statements"
    assert db.table_exists("orders")
    assert not db.table_exists("pwned")
    assert db.fetchval("SELECT count(*) FROM orders") == 6000


def test_explain_decides_but_never_executes(gateway, dana, db):
    before = db.fetchval("SELECT status FROM orders WHERE id = 7")
    response = gateway.query("UPDATE orders SET status = 'x' WHERE id = 7", dana, path="/v1/explain")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["decision"]["allow"] is True
    assert body["facts"]["kind"] == "update"
    assert body["facts"]["tables"]["write"] == ["public.orders"]
    assert body["facts"]["columns"]["write"] == ["public.orders.status"]
    assert db.fetchval("SELECT status FROM orders WHERE id = 7") == before


def test_write_by_dba_runs_and_reports_rows_affected(gateway, dana, db):
    response = gateway.query(
        "UPDATE orders SET status = $1 WHERE id = $2", dana, ["paid", 11]
    )
    assert response.status_code == 200, response.text
    assert response.json()["rows_affected"] == 1
    assert db.fetchval("SELECT status FROM orders WHERE id = 11") == "paid"


def test_write_by_reader_is_denied_and_data_unchanged(gateway, alice, db):
    before = db.fetch("SELECT * FROM orders WHERE id = 12")
    response = gateway.query("UPDATE orders SET status = 'refunded' WHERE id = 12", alice)
    assert response.status_code == 403
    assert "write_requires_writer_group" in {
        r["rule"] for r in response.json()["error"]["reasons"]
    }
    assert db.fetch("SELECT * FROM orders WHERE id = 12") == before


def test_parameters_are_bound_never_interpolated(gateway, alice, db):
    hostile = "x' OR '1'='1'; DROP TABLE orders; --"
    response = gateway.query("SELECT id FROM customers WHERE full_name = $1", alice, [hostile])
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == []
    assert db.table_exists("orders")


def test_parameter_count_must_match(gateway, alice):
    response = gateway.query("SELECT id FROM customers WHERE id = $1", alice, [])
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_parameters"


def test_parameter_of_wrong_type_is_a_clear_422(gateway, alice):
    response = gateway.query("SELECT id FROM customers WHERE id = $1", alice, ["not a number"])
    assert response.status_code == 422
    body = response.json()
    assert body["error"]["code"] == "invalid_parameters"
    assert "$1" in body["error"]["message"]


def test_row_cap_sets_truncated(make_gateway, alice):
    capped = make_gateway(max_rows=5)
    response = capped.query("SELECT id FROM orders ORDER BY id", alice)
    body = response.json()
    assert response.status_code == 200
    assert body["row_count"] == 5 and body["truncated"] is True
    assert [r[0] for r in body["rows"]] == [1, 2, 3, 4, 5]


def test_statement_timeout_cancels_long_queries(make_gateway, alice):
    slow = make_gateway(statement_timeout_ms=200)
    response = slow.query(
        "SELECT count(*) FROM orders a, orders b, orders c WHERE a.id + b.id + c.id < 0", alice
    )
    assert response.status_code == 408, response.text
    assert response.json()["error"]["code"] == "statement_timeout"


def test_database_errors_are_4xx_with_the_condition_name(gateway, alice, postgres):
    response = gateway.query("SELECT id / (id - id) FROM customers", alice)
    assert response.status_code == 422
    body = response.json()
    assert body["error"]["code"] == "database_error"
    assert body["error"]["sqlstate"] == "22012"
    # Data errors are named by their condition, never quoted (docs/errors.md).
    assert body["error"]["message"].startswith("division_by_zero")
    assert postgres.app_dsn not in response.text


def test_unknown_table_is_422_before_policy(gateway, alice):
    response = gateway.query("SELECT * FROM no_such_table", alice)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "unknown_object"


def test_unparseable_sql_is_400(gateway, alice):
    response = gateway.query("SELEC id FROM", alice)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "sql_parse_error"


def test_healthz_and_readyz(gateway):
    assert gateway.client.get("/healthz").json() == {"status": "ok"}
    ready = gateway.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"opa": "ok", "database": "ok", "audit": "ok"}
