"""Facts are a pure function of (SQL text, catalog): no statement changes another's facts.

An operator sqlglot models as a function (`->>`, `~`, `@>`, `&&`, `@@`, `COLLATE`) used to be
named once per class after the first node seen, so `current_setting(…) ->> 'a'` made every
later `->>` a call of current_setting(). The order-independence property over the whole
corpus and PostgreSQL's regression SQL is tests/integration/test_facts_order.py.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import postgast
import pytest

from app.errors import GatewayError
from app.facts import FactsExtractor
from tests.unit.test_facts_properties import CATALOG

REGRESS = Path(__file__).resolve().parents[1] / "fixtures" / "pg_regress" / "statements.sql"


def _functions(extractor: FactsExtractor, sql: str) -> list[str]:
    return list(extractor.extract(sql, CATALOG).functions)


def test_a_denied_call_on_the_left_of_an_operator_does_not_name_the_operator():
    extractor = FactsExtractor(max_sql_bytes=100_000)
    with pytest.raises(GatewayError) as denied:
        extractor.extract("SELECT current_setting('server_version') ->> 'a'", CATALOG)
    assert denied.value.code == "function_denied"
    # The same extractor, and a fresh one: ->> is an operator, not current_setting().
    for fresh in (extractor, FactsExtractor(max_sql_bytes=100_000)):
        assert _functions(fresh, """SELECT '{"a":1}'::jsonb ->> 'a'""") == []


@pytest.mark.parametrize(
    ("first", "then", "functions"),
    [
        ("SELECT upper(email) ~ 'a' FROM customers", "SELECT email ~ 'a' FROM customers", []),
        ("SELECT lower(email) COLLATE \"C\" FROM customers",
         "SELECT email COLLATE \"C\" FROM customers", []),
        ("SELECT to_tsvector(email) @@ to_tsquery('a') FROM customers",
         "SELECT email::tsvector @@ 'a'::tsquery FROM customers", []),
        ("SELECT array_agg(id) @> ARRAY[1] FROM customers",
         "SELECT ARRAY[id] && ARRAY[1] FROM customers", []),
        ("SELECT '[1]'::jsonb @> '[1]'::jsonb", "SELECT ARRAY[1] @> ARRAY[1]", []),
        # One class, two spellings: a call in one statement, an operator in the next.
        ("SELECT json_extract_path_text(email::json, 'a') FROM customers",
         "SELECT email::json ->> 'a' FROM customers", []),
        ("SELECT email::json ->> 'a' FROM customers",
         "SELECT json_extract_path_text(email::json, 'a') FROM customers",
         ["json_extract_path_text"]),
        ("SELECT email::json -> 'a' FROM customers",
         "SELECT json_extract_path(email::json, 'a', 'b') FROM customers", ["json_extract_path"]),
        ("SELECT current_timestamp", "SELECT power(id, 2) FROM customers", ["power"]),
    ],
)
def test_function_names_come_from_each_node(first, then, functions):
    alone = _functions(FactsExtractor(max_sql_bytes=100_000), then)
    extractor = FactsExtractor(max_sql_bytes=100_000)
    try:
        extractor.extract(first, CATALOG)
    except GatewayError:
        pass
    assert _functions(extractor, then) == alone == functions


def _outcome(extractor: FactsExtractor, sql: str) -> object:
    try:
        return extractor.extract(sql, CATALOG).to_input()
    except GatewayError as exc:
        return (exc.code, exc.message)


def test_regression_sql_gives_the_same_facts_forwards_and_backwards():
    """The in-process half of the property, without a database: PostgreSQL's regression
    statements (against this module's small catalog) on one extractor, in file order, then
    reversed and shuffled on fresh ones."""
    statements = [s.strip() for s in postgast.split(REGRESS.read_text())]
    assert len(statements) >= 2_000
    forwards = FactsExtractor(max_sql_bytes=100_000)
    expected = [_outcome(forwards, sql) for sql in statements]
    for order in (list(reversed(range(len(statements)))),
                  random.Random(7).sample(range(len(statements)), len(statements))):
        extractor = FactsExtractor(max_sql_bytes=100_000)
        actual = {i: _outcome(extractor, statements[i]) for i in order}
        differ = [statements[i][:100] for i in range(len(statements)) if actual[i] != expected[i]]
        assert not differ, differ[:10]


def test_nothing_of_a_statement_outlives_its_extraction():
    """sqlglot's MappingSchema memoises lookups keyed by (and holding) the statement's Table
    nodes; the extractor's per-catalog schema must not accumulate them."""
    extractor = FactsExtractor(max_sql_bytes=100_000, cache_size=1)
    for i in range(50):
        extractor.extract(f"SELECT c{i}.email FROM customers c{i} JOIN orders o{i} "
                          f"ON o{i}.customer_id = c{i}.id", CATALOG)
    schema = extractor._schema(CATALOG)
    assert not any(getattr(schema, name) for name in
                   ("_normalized_table_cache", "_find_cache", "_normalized_name_cache"))


# --- logs carry no SQL text -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        # sqlglot: "'…' contains unsupported syntax. Falling back to parsing as a 'Command'."
        "DO $$ BEGIN PERFORM '078-05-1120'; END $$",
        "EXPLAIN SELECT id FROM customers WHERE ssn = '078-05-1120'",
        "CREATE RULE r AS ON INSERT TO orders DO INSTEAD SELECT '078-05-1120'",
    ],
)
def test_no_log_record_carries_the_sql(sql, caplog):
    caplog.set_level(logging.DEBUG)
    extractor = FactsExtractor(max_sql_bytes=100_000)
    try:
        extractor.extract(sql, CATALOG)
    except GatewayError:
        pass
    for record in caplog.records:
        assert "078-05-1120" not in record.getMessage(), record.name
