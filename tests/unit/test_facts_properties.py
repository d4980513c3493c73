"""Property: for any text, extraction returns facts or raises the gateway's own error type.

Hypothesis feeds arbitrary text, SQL-shaped token soup, and mutations of real queries; an
exception that is not a GatewayError (a sqlglot internal error, a RecursionError, a
KeyError in our walker) would become a 500 in production and fails the test.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.catalog import build_catalog
from app.errors import GatewayError
from app.facts import FactsExtractor, QueryFacts

_COLUMNS = {
    "customers": ["id", "full_name", "email", "ssn", "card_number", "country", "created_at"],
    "orders": ["id", "customer_id", "amount_cents", "status", "created_at"],
}
CATALOG = build_catalog(
    ("public",),
    [("public", t, "r", c, "text") for t, cols in _COLUMNS.items() for c in cols],
    frozenset({"pg_class", "pg_authid"}),
    1,
)

SEEDS = [
    "SELECT c.email AS e FROM customers c JOIN orders o ON o.customer_id = c.id WHERE c.id = $1",
    "WITH t AS (SELECT ssn FROM customers) SELECT upper(ssn) FROM t UNION SELECT status FROM orders",
    "UPDATE orders SET status = 'x' WHERE id IN (SELECT id FROM customers) RETURNING *",
    "INSERT INTO orders (id, customer_id) SELECT id, id FROM customers ON CONFLICT DO NOTHING",
    "DELETE FROM orders o USING customers c WHERE c.id = o.customer_id RETURNING o.id",
    "SELECT count(*), country FROM customers GROUP BY 2 HAVING count(*) > 1 ORDER BY 1 DESC",
    "SELECT email, row_number() OVER (PARTITION BY country ORDER BY id) FROM customers",
    "SELECT * FROM customers, LATERAL (SELECT amount_cents FROM orders WHERE customer_id = customers.id) x",
]
TOKENS = [
    "SELECT", "FROM", "WHERE", "customers", "orders", "c", "o", "id", "email", "*", ",", "(", ")",
    "=", "AND", "OR", "NOT", "JOIN", "ON", "WITH", "AS", "UNION", "1", "'x'", "$1", "?", ";",
    "--", "/*", "*/", "$$", "LATERAL", "UPDATE", "SET", "DELETE", "INSERT", "INTO", "VALUES",
    "RETURNING", "GROUP BY", "ORDER BY", "LIMIT", "count(*)", "lower(", "::text", "DROP", "TABLE",
    "c.*", "OVER", "PARTITION BY", "EXISTS", "IN", "CASE", "WHEN", "THEN", "END", "NULL",
]

EXTRACTOR = FactsExtractor(max_sql_bytes=100_000)


def _check(sql: str) -> None:
    try:
        facts = EXTRACTOR.extract(sql, CATALOG)
    except GatewayError as exc:
        assert exc.code and exc.status in (400, 403, 413, 422)
        return
    assert isinstance(facts, QueryFacts)
    facts.to_input()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_any_text(sql):
    _check(sql)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=40).map(" ".join))
def test_token_soup(sql):
    _check(sql)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SEEDS),
    st.integers(min_value=0, max_value=200),
    st.integers(min_value=0, max_value=30),
    st.sampled_from([*TOKENS, ""]),
)
def test_mutated_queries(seed, position, length, insert):
    position = min(position, len(seed))
    _check(seed[:position] + f" {insert} " + seed[position + length:])
