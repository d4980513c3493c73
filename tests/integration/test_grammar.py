"""PostgreSQL's grammar first: texts sqlglot misreads are refused before they reach the server.

`SELECT 1é` or `SELECT $1é` sent to PostgreSQL 16 comes back as an error whose message holds
half of the `é` (invalid UTF-8), on which asyncpg hangs; `0o17` and `1_000` are one number to
PostgreSQL and a number plus an alias to sqlglot. Each must be a quick 4xx with a stable
code, and the gateway must answer normally afterwards.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.integration

REFUSED = [
    ("SELECT 1é", 400, "sql_parse_error"),
    ("SELECT 1.5é", 400, "sql_parse_error"),
    ("SELECT 0x1Fé", 400, "sql_parse_error"),
    ("SELECT $1é", 400, "sql_parse_error"),
    ("SELECT $1x", 400, "sql_parse_error"),
    ("SELECT id FROM customers WHERE id = $1é", 400, "sql_parse_error"),
    ("SELECT 0o17", 403, "grammar_mismatch"),
    ("SELECT 1_000", 403, "grammar_mismatch"),
    ("SELECT 0x1F", 403, "grammar_mismatch"),
    ("SELECT id FROM customers LIMIT 0x10", 403, "grammar_mismatch"),
    ("LISTEN x", 403, "unsupported_statement"),
    ("NOTIFY x, 'y'", 403, "unsupported_statement"),
    ("SELECT 1\x00", 400, "sql_parse_error"),
    ("SELECT 1\x00; DROP TABLE orders", 400, "sql_parse_error"),
    ("SELECT 1; LISTEN x", 403, "multiple_statements"),
]


@pytest.mark.parametrize(("sql", "status", "code"), REFUSED)
def test_misread_texts_are_refused_quickly(gateway, alice, db, sql, status, code):
    started = time.monotonic()
    response = gateway.query(sql, alice, [1] if "$1" in sql else None)
    elapsed = time.monotonic() - started
    assert (response.status_code, response.json()["error"]["code"]) == (status, code), response.text
    assert elapsed < 2, elapsed
    # The refusal never quotes the text (the multibyte character, the misread literal).
    assert "é" not in response.json()["error"]["message"]
    assert db.table_exists("orders")


def test_the_gateway_answers_normally_afterwards(gateway, alice):
    for sql, _, _ in REFUSED:
        gateway.query(sql, alice, [1] if "$1" in sql else None)
    started = time.monotonic()
    response = gateway.query("SELECT 1", alice)
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 2
    response = gateway.query("SELECT id FROM customers WHERE id = $1", alice, [1])
    assert response.status_code == 200, response.text
