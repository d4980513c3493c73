"""PostgreSQL's reading of the text (app/grammar.py): read, agreement, schema qualifiers.

No database: libpg_query is PostgreSQL's parser in-process, and the agreement check is
driven through a FactsExtractor over a catalog built from plain values.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import grammar
from app.catalog import build_catalog
from app.errors import GatewayError
from app.facts import FactsExtractor

_COLUMNS = {
    "customers": ["id", "full_name", "email", "ssn", "country"],
    "orders": ["id", "customer_id", "amount_cents", "status"],
}
CATALOG = build_catalog(
    ("public",),
    [("public", t, "r", c, "text") for t, cols in _COLUMNS.items() for c in cols],
    frozenset({"pg_class"}),
    1,
)


def _code(sql: str, **kwargs) -> str:
    with pytest.raises(GatewayError) as caught:
        grammar.read(sql, **kwargs)
    return caught.value.code


def _facts_code(sql: str) -> str:
    with pytest.raises(GatewayError) as caught:
        FactsExtractor(max_sql_bytes=100_000).extract(sql, CATALOG)
    return caught.value.code


# --- read --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "kind"), [
    ("SELECT 1", "select_stmt"),
    ("TABLE customers", "select_stmt"),
    ("VALUES (1, 2)", "select_stmt"),
    ("(SELECT 1) UNION SELECT 2", "select_stmt"),
    ("WITH c AS (SELECT 1) SELECT * FROM c", "select_stmt"),
    ("INSERT INTO t VALUES (1)", "insert_stmt"),
    ("UPDATE t SET a = 1", "update_stmt"),
    ("DELETE FROM t", "delete_stmt"),
    ("MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE", "merge_stmt"),
    ("CREATE TABLE t (a int)", "create_stmt"),
    ("CREATE TABLE t AS SELECT 1", "create_table_as_stmt"),
    ("CREATE INDEX ON t (a)", "index_stmt"),
    ("CREATE VIEW v AS SELECT 1", "view_stmt"),
    ("ALTER TABLE t ADD COLUMN b int", "alter_table_stmt"),
    ("ALTER TABLE t RENAME TO u", "rename_stmt"),
    ("DROP TABLE t", "drop_stmt"),
    ("TRUNCATE t", "truncate_stmt"),
    ("LISTEN x", "listen_stmt"),
    ("NOTIFY x, 'y'", "notify_stmt"),
    ("SET search_path = x", "variable_set_stmt"),
    ("SHOW ALL", "variable_show_stmt"),
    ("EXPLAIN SELECT 1", "explain_stmt"),
    ("DO $$ BEGIN END $$", "do_stmt"),
])
def test_statement_kinds(sql, kind):
    assert grammar.read(sql).kinds == (kind,)


def test_statement_count():
    assert grammar.read("SELECT 1; SELECT 2;; -- x").kinds == ("select_stmt", "select_stmt")
    assert grammar.read("").statements == ()
    assert grammar.read(" ; /* only */ ;").statements == ()


def test_tokens_are_byte_spans():
    sql = "SELECT 'é' AS \"ü\" /* c */ FROM t"
    raw = sql.encode()
    spans = [(t.kind, raw[t.start:t.end].decode()) for t in grammar.read(sql).tokens]
    assert spans == [
        ("SELECT", "SELECT"), ("SCONST", "'é'"), ("AS", "AS"), ("IDENT", '"ü"'),
        ("C_COMMENT", "/* c */"), ("FROM", "FROM"), ("IDENT", "t"),
    ]


@pytest.mark.parametrize(("sql", "outputs"), [
    ("SELECT 1", (None,)),
    ("SELECT a, b AS B, c \"C\", d e FROM t", (None, "b", "C", "e")),
    ("SELECT *, t.* FROM t", (None, None)),
    ("(SELECT 1 AS x, 2) UNION SELECT 3 AS y, 4", ("x", None)),
    ("VALUES (1, 2, 3)", (None, None, None)),
    ("TABLE t", (None,)),
    ("INSERT INTO t VALUES (1) RETURNING a AS x, b", ("x", None)),
    ("DELETE FROM t", ()),
    ("CREATE TABLE t (a int)", None),
])
def test_outputs(sql, outputs):
    assert grammar.read(sql).statements[0].outputs == outputs


@pytest.mark.parametrize(("sql", "object_kind", "temporary", "into"), [
    ("CREATE TEMP TABLE t (a int)", "table", True, False),
    ("CREATE LOCAL TEMPORARY TABLE t (a int)", "table", True, False),
    ("CREATE UNLOGGED TABLE t (a int)", "table", False, False),
    ("CREATE MATERIALIZED VIEW m AS SELECT 1", "materialized view", False, False),
    ("DROP MATERIALIZED VIEW m", "materialized view", False, False),
    ("DROP SEQUENCE s", "sequence", False, False),
    ("ALTER TABLE t RENAME COLUMN a TO b", "table", False, False),
    ("ALTER VIEW v RENAME TO w", "view", False, False),
    ("SELECT 1 INTO TEMP x", None, True, True),
    ("SELECT 1 INTO x UNION SELECT 2", None, False, True),
])
def test_ddl_facts(sql, object_kind, temporary, into):
    statement = grammar.read(sql).statements[0]
    assert (statement.object_kind, statement.temporary, statement.into) == (object_kind, temporary, into)


@pytest.mark.parametrize(("sql", "secret"), [
    ("SELECT 1é", "é"),
    ("SELECT 1secret", "secret"),
    ("SELECT 'secret' FORM t", "secret"),
    ("SELECT 'x' secret 'y'", "secret"),
    ('SELECT "sec""ret', "sec"),
    ("SELECT 'secret", "secret"),
    ("SELECT $$secret", "secret"),
    ("CREATE TABLE a.b.c.secret (x int)", "secret"),  # "improper qualified name: a.b.c.secret"
    ("SELECT 1 /* secret", "secret"),
])
def test_syntax_errors_never_quote_the_text(sql, secret):
    with pytest.raises(GatewayError) as caught:
        grammar.read(sql)
    assert caught.value.code == "sql_parse_error"
    assert caught.value.status == 400
    assert secret not in caught.value.message
    assert '"' not in caught.value.message and "'" not in caught.value.message


def test_syntax_error_position_counts_characters():
    with pytest.raises(GatewayError) as caught:
        grammar.read("SELECT 'ééé' FORM t")
    # FORM is read as an alias; the error is at "t", the 19th character (bytes: 22nd).
    assert caught.value.message.endswith("at position 19")


@pytest.mark.parametrize("sql", [
    "SELECT $1é", "SELECT $1x", "SELECT $1_", "SELECT $1_0", "SELECT $1e", "SELECT $12é2",
    "SELECT 1 WHERE $1é = 1",
])
def test_junk_after_a_parameter_is_refused_as_postgresql_16_does(sql):
    # libpg_query 18 reads $1é as $1 AS é; PostgreSQL 16 refuses it (and its message holds half
    # of the é, which asyncpg cannot decode).
    assert _code(sql) == "sql_parse_error"


@pytest.mark.parametrize("sql", ["SELECT $1", "SELECT $1::int", "SELECT $1 x", "SELECT $1,$2", "SELECT ($1)"])
def test_parameters(sql):
    assert grammar.read(sql).kinds == ("select_stmt",)


@pytest.mark.parametrize("sql", ["SELECT 1é", "SELECT 1.5é", "SELECT 0x1Fé", "SELECT 1e5é", "SELECT 1x"])
def test_junk_after_a_number(sql):
    assert _code(sql) == "sql_parse_error"


def test_nul_and_surrogates_and_size():
    assert _code("SELECT 1\x00; DROP TABLE customers") == "sql_parse_error"
    assert _code("SELECT '\ud800'") == "sql_parse_error"
    assert _code("SELECT 1 -- " + "x" * 100, max_bytes=64) == "sql_too_large"
    # bytes, not characters
    assert _code("SELECT '" + "é" * 40 + "'", max_bytes=64) == "sql_too_large"
    assert grammar.read("SELECT '" + "é" * 20 + "'", max_bytes=64)


@pytest.mark.parametrize("sql", [
    "SELECT " + "+".join(["1"] * 50_000),  # a left-deep chain: libpg_query's writer segfaults
    "SELECT a" + " ISNULL" * 50_000,
    "SELECT 1" + "::int" * 20_000,
    "SELECT * FROM t0" + " JOIN t ON true" * 5_000,
    " UNION ".join(["SELECT a, b"] * 10_000),
    "SELECT " + "NOT " * 20_000 + "true",
    "SELECT " + "(" * 20_000 + "1" + ")" * 20_000,
    "SELECT " + "f(" * 5_000 + "1" + ")" * 5_000,
    "SELECT " + "+".join(["1"] * 600),  # deeper than orjson's 1024 levels
])
def test_deep_trees_are_refused_not_crashed(sql):
    started = time.monotonic()
    assert _code(sql) == "sql_too_complex"
    assert time.monotonic() - started < 2


def test_a_segfault_would_kill_the_process():
    # Run the deepest shapes in a child process with a small stack: a crash shows as a signal.
    code = (
        "import threading; from app import grammar; from app.errors import GatewayError\n"
        "def run():\n"
        "    for sql in ['SELECT ' + '+'.join(['1'] * 4000), 'SELECT a' + ' ISNULL' * 7990,\n"
        "                ' UNION '.join(['SELECT a, b'] * 7990)]:\n"
        "        try: grammar.read(sql)\n"
        "        except GatewayError: pass\n"
        "threading.stack_size(2 * 1024 * 1024)\n"
        "t = threading.Thread(target=run); t.start(); t.join(); print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-500:]


@pytest.mark.parametrize("sql", [
    "SELECT 1 WHERE a IN (" + ",".join(["1"] * 20_000) + ")",
    "VALUES " + ", ".join(["(1, 'x')"] * 5_000),
    "SELECT " + ", ".join(f"c{i}" for i in range(3_000)) + " FROM t",
    "SELECT CASE " + " ".join(f"WHEN a = {i} THEN {i}" for i in range(500)) + " END FROM t",
    "SELECT 1 WHERE " + " AND ".join(["a = 1"] * 1_000),
])
def test_wide_flat_texts_are_read(sql):
    assert grammar.read(sql).kinds == ("select_stmt",)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=120))
def test_any_text_reads_or_is_refused(sql):
    try:
        reading = grammar.read(sql)
    except GatewayError as exc:
        assert exc.status in (400, 403, 413)
        return
    for token in reading.tokens:
        assert 0 <= token.start < token.end <= len(sql.encode())


# --- single_statement --------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "code"), [
    ("", "sql_parse_error"),
    ("-- nothing", "sql_parse_error"),
    ("SELECT 1; SELECT 2", "multiple_statements"),
    ("SELECT 1; LISTEN x", "multiple_statements"),
    ("LISTEN x", "unsupported_statement"),
    ("NOTIFY x", "unsupported_statement"),
    ("SET search_path = pg_catalog", "unsupported_statement"),
    ("SHOW search_path", "unsupported_statement"),
    ("DO $$ BEGIN END $$", "unsupported_statement"),
    ("COPY t TO STDOUT", "unsupported_statement"),
    ("ALTER TABLE t SET SCHEMA s", "unsupported_statement"),
])
def test_single_statement_refusals(sql, code):
    with pytest.raises(GatewayError) as caught:
        grammar.single_statement(grammar.read(sql))
    assert caught.value.code == code


def test_single_statement():
    assert grammar.single_statement(grammar.read("UPDATE t SET a = 1")).kind == "update_stmt"


# --- agreement with sqlglot, through the extractor ---------------------------------------------


@pytest.mark.parametrize(("sql", "code"), [
    # PostgreSQL 16 reads these as one number; sqlglot as a number and an alias, or a bit string.
    ("SELECT 0o17", "grammar_mismatch"),
    ("SELECT 1_000", "grammar_mismatch"),
    ("SELECT 0x1F", "grammar_mismatch"),
    ("SELECT 0b101", "grammar_mismatch"),
    ("SELECT id FROM customers LIMIT 0x10", "grammar_mismatch"),
    ("SELECT id FROM customers WHERE id = 0x10", "grammar_mismatch"),
    ("SELECT email FROM customers WHERE id = $1 OFFSET 0b1", "grammar_mismatch"),
    # PostgreSQL refuses these outright.
    ("SELECT 1é", "sql_parse_error"),
    ("SELECT $1é", "sql_parse_error"),
    ("SELECT email FROM customers WHERE id = $1é", "sql_parse_error"),
    ("SELECT 1\x00", "sql_parse_error"),
    # sqlglot reads LISTEN x as an alias; PostgreSQL as LISTEN.
    ("LISTEN x", "unsupported_statement"),
    ("UNLISTEN *", "unsupported_statement"),
    ("NOTIFY x, 'payload'", "unsupported_statement"),
    ("SELECT 1; LISTEN x", "multiple_statements"),
    # other drivers' placeholders keep their specific code
    ("SELECT id FROM customers WHERE id = ?", "unsupported_construct"),
    ("SELECT id FROM customers WHERE id = :id", "unsupported_construct"),
    ("SELECT id FROM customers WHERE id = %s", "unsupported_construct"),
    ("SELECT id FROM customers WHERE id = %(id)s", "unsupported_construct"),
    ("INSERT INTO orders (id) VALUES (?)", "unsupported_construct"),
])
def test_extractor_refuses_what_the_readings_disagree_on(sql, code):
    assert _facts_code(sql) == code


@pytest.mark.parametrize("sql", [
    "SELECT 1_000.5",
    "SELECT id, 0o17 AS n FROM customers",
    "SELECT id FROM customers WHERE id = 1_000",
    "SELECT id FROM customers WHERE id IN (0o17, 2)",
])
def test_misread_numbers_sqlglot_cannot_parse_are_refused_too(sql):
    assert _facts_code(sql) in ("grammar_mismatch", "sql_parse_error")


@pytest.mark.parametrize("sql", [
    "SELECT 1",
    "SELECT 1.5, .5, 1., 1e5, 12e-5, 00012, -1, $1::int",
    "SELECT email AS \"E\", ssn s FROM customers WHERE id = $1",
    "SELECT 'a'\n'b' AS joined",
    "SELECT N'x', E'\\'', B'101', X'1F', $$d$$, $t$x$t$ FROM customers",
    "SELECT /* a /* nested */ comment */ id -- trailing\nFROM customers",
    "SELECT 'ü' || full_name AS \"é\" FROM customers WHERE country = 'ß'",
    "SELECT c.email FROM public.customers c JOIN orders o ON o.customer_id = c.id ORDER BY 1",
    "(SELECT id FROM customers) UNION (SELECT id FROM orders) ORDER BY 1 LIMIT 10",
    "TABLE customers",
    "UPDATE orders SET status = 'x' WHERE id = $1 RETURNING id AS i, status",
    "INSERT INTO orders (id, customer_id) VALUES ($1, $2) RETURNING *",
    "DELETE FROM orders WHERE id = 1",
])
def test_extractor_reads_what_both_read_alike(sql):
    FactsExtractor(max_sql_bytes=100_000).extract(sql, CATALOG)


def _agree(pg_sql: str, sqlglot_sql: str) -> None:
    """PostgreSQL's reading of one text against sqlglot's of another (to make them differ)."""
    from sqlglot.dialects.dialect import Dialect

    trees = [t for t in Dialect.get_or_raise("postgres").parse(sqlglot_sql) if t is not None]
    grammar.check_agreement(grammar.read(pg_sql), sqlglot_sql, trees)


@pytest.mark.parametrize(("pg_sql", "sqlglot_sql"), [
    ("SELECT 1 AS x", "SELECT 1"),  # output names
    ("SELECT 1, 2", "SELECT 1"),  # output count
    ("DELETE FROM t", "SELECT 1 FROM t"),  # kind
    ("SELECT 1", "SELECT 1; SELECT 2"),  # count
    ("DROP VIEW v", "DROP TABLE v"),  # object
    ("DROP MATERIALIZED VIEW v", "DROP VIEW v"),
    ("CREATE TEMP TABLE t (a int)", "CREATE TABLE t (a int)"),
    ("SELECT 1 INTO t", "SELECT 1 AS t"),
    ("SELECT 0x1F", "SELECT 0x1F"),  # one ICONST; sqlglot: a bit string
    ("SELECT abc", "SELECT 'a'"),  # a literal PostgreSQL does not see
    ("SELECT 1 -- + x", "SELECT 1    + x"),  # tokens PostgreSQL does not see
    ("SELECT 1    + x", "SELECT 1 -- + x"),  # tokens the gateway skips
    ("SELECT 12", "SELECT 1 "),  # a number of another length
    ("SELECT ab", "SELECT a "),  # an identifier of another length
])
def test_check_agreement_refuses(pg_sql, sqlglot_sql):
    with pytest.raises(GatewayError) as caught:
        _agree(pg_sql, sqlglot_sql)
    assert caught.value.code == "grammar_mismatch"
    assert caught.value.status == 403


# --- schema qualifiers -------------------------------------------------------------------------


def _spelled(sql: str) -> list[tuple[str, str]]:
    raw = sql.encode()
    return [(raw[s:e].decode(), name) for s, e, name in grammar.schema_qualifiers(sql)]


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT * FROM public.customers", [("public", "public")]),
    ('SELECT * FROM "public"."customers"', [('"public"', "public")]),
    ('SELECT * FROM "pub""lic".t', [('"pub""lic"', 'pub"lic')]),
    ("SELECT * FROM PUBLIC.t", [("PUBLIC", "public")]),
    ('SELECT * FROM "Public".t', [('"Public"', "Public")]),
    ("SELECT * FROM public /* x */ . customers", [("public", "public")]),
    ("SELECT * FROM public\n  .\n  customers", [("public", "public")]),
    ("SELECT 'ééé', \"ü\" FROM \"schéma\".t", [('"schéma"', "schéma")]),
    ("SELECT * FROM name.t", [("name", "name")]),  # an unreserved keyword as a schema
    ("SELECT * FROM a.t JOIN b.u ON true LEFT JOIN c.v USING (x)", [("a", "a"), ("b", "b"), ("c", "c")]),
    ("SELECT * FROM (SELECT * FROM a.t) s, LATERAL (SELECT * FROM b.u) l", [("a", "a"), ("b", "b")]),
    ("WITH c AS (SELECT * FROM a.t) SELECT * FROM c, b.u", [("a", "a"), ("b", "b")]),
    ("SELECT * FROM ONLY a.t", [("a", "a")]),
    ("TABLE a.t", [("a", "a")]),
    ("SELECT (SELECT 1 FROM a.t) WHERE EXISTS (SELECT FROM b.u)", [("a", "a"), ("b", "b")]),
    ("INSERT INTO a.t SELECT * FROM b.u", [("a", "a"), ("b", "b")]),
    ("UPDATE a.t SET x = 1 FROM b.u WHERE true", [("a", "a"), ("b", "b")]),
    ("DELETE FROM a.t USING b.u", [("a", "a"), ("b", "b")]),
    ("MERGE INTO a.t USING b.u ON true WHEN MATCHED THEN DELETE", [("a", "a"), ("b", "b")]),
    ("CREATE TABLE a.t (x int REFERENCES b.u)", [("a", "a"), ("b", "b")]),
    ("CREATE INDEX ON a.t (x)", [("a", "a")]),
    ("TRUNCATE a.t, b.u", [("a", "a"), ("b", "b")]),
    ("SELECT a.t.x, a.t.* FROM a.t", [("a", "a"), ("a", "a"), ("a", "a")]),
    ("SELECT t.x FROM t WHERE t.y = 1", []),
    ("SELECT public.f(1), 1::public.ty, 'public.t' FROM t -- public.t", []),
])
def test_schema_qualifiers(sql, expected):
    assert _spelled(sql) == expected


def test_schema_qualifier_spans_are_bytes():
    sql = "SELECT 'ééé' FROM public.t"
    [(start, end, name)] = grammar.schema_qualifiers(sql)
    assert (start, end, name) == (21, 27, "public")
    assert sql.encode()[start:end] == b"public"


@pytest.mark.parametrize("sql", [
    "SELECT * FROM db.public.t",
    "SELECT db.public.t.x FROM public.t",
    'SELECT * FROM U&"p\\0075blic".t',
])
def test_unrewritable_qualifiers_are_refused(sql):
    with pytest.raises(GatewayError) as caught:
        grammar.schema_qualifiers(sql)
    assert caught.value.code == "unsupported_construct"


# --- rewrite_schemas ---------------------------------------------------------------------------

MAP = {"public": "qgp_k_public"}


@pytest.mark.parametrize(("sql", "expected"), [
    ("SELECT * FROM public.customers", 'SELECT * FROM "qgp_k_public".customers'),
    ('SELECT * FROM "public"."customers"', 'SELECT * FROM "qgp_k_public"."customers"'),
    ("SELECT * FROM PUBLIC.customers", 'SELECT * FROM "qgp_k_public".customers'),
    ('SELECT * FROM "Public".customers', 'SELECT * FROM "Public".customers'),
    ("SELECT * FROM other.customers", "SELECT * FROM other.customers"),
    ("SELECT * FROM customers", "SELECT * FROM customers"),
    (
        "SELECT 'public.customers', public.customers.ssn /* public.x */ FROM public . customers -- public.y",
        "SELECT 'public.customers', \"qgp_k_public\".customers.ssn /* public.x */ "
        "FROM \"qgp_k_public\" . customers -- public.y",
    ),
    ("SELECT public FROM public.public", 'SELECT public FROM "qgp_k_public".public'),
    ("SELECT 'é' FROM public.t, x.u", "SELECT 'é' FROM \"qgp_k_public\".t, x.u"),
    (
        "WITH c AS (SELECT * FROM public.t) SELECT * FROM c JOIN public.u USING (id)",
        'WITH c AS (SELECT * FROM "qgp_k_public".t) SELECT * FROM c JOIN "qgp_k_public".u USING (id)',
    ),
])
def test_rewrite_schemas(sql, expected):
    assert grammar.rewrite_schemas(sql, MAP) == expected


def test_rewrite_quotes_the_target():
    assert grammar.rewrite_schemas("SELECT * FROM s.t", {"s": 'we"ird'}) == 'SELECT * FROM "we""ird".t'
    assert grammar.rewrite_schemas('SELECT * FROM "pub""lic".t', {'pub"lic': "x"}) == 'SELECT * FROM "x".t'


@pytest.mark.parametrize("target", ["", "a\x00b", "x" * 64, "é" * 32])
def test_rewrite_refuses_names_postgresql_would_not_keep(target):
    with pytest.raises(ValueError):
        grammar.rewrite_schemas("SELECT * FROM s.t", {"s": target})


def test_rewrite_refuses_what_it_cannot_rewrite():
    with pytest.raises(GatewayError) as caught:
        grammar.rewrite_schemas("SELECT * FROM db.public.t", MAP)
    assert caught.value.code == "unsupported_construct"


_SPACE = st.sampled_from([" ", "  ", "\n", "\t", " /* c */ ", " /* a /* b */ */ ", " --x\n"])
_SCHEMA = st.sampled_from(["public", "PUBLIC", "Public", '"public"', '"Public"', "other", '"pu""blic"'])
_TABLE = st.sampled_from(["customers", '"customers"', "public", '"t é"'])
_BEFORE = st.sampled_from(
    ["", "'é' AS x, ", "'public.customers' AS y, ", "$$public.x$$ z, ", "1 AS \"public\", "]
)


@st.composite
def _queries(draw):
    refs = []
    for _ in range(draw(st.integers(1, 3))):
        refs.append(draw(_SCHEMA) + draw(st.sampled_from(["", " "])) + "." + draw(_SPACE) + draw(_TABLE))
    joins = f"{draw(_SPACE)}CROSS JOIN{draw(_SPACE)}".join(refs)
    qualified = f"{draw(_SCHEMA)}.{draw(_TABLE)}.{draw(st.sampled_from(['id', '*']))}"
    column = draw(st.sampled_from(["1", "*", qualified]))
    return f"SELECT{draw(_SPACE)}{draw(_BEFORE)}{column}{draw(_SPACE)}FROM{draw(_SPACE)}{joins}"


_MAPPINGS = st.sampled_from([{"public": "qgp_k_public"}, {"public": "x", "other": 'o"p'}, {"Public": "P"}])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_queries(), _MAPPINGS)
def test_rewrite_changes_only_the_qualifiers(sql, mapping):
    before = grammar.schema_qualifiers(sql)
    out = grammar.rewrite_schemas(sql, mapping)
    after = grammar.schema_qualifiers(out)
    # PostgreSQL reads the same references, each qualified as mapped …
    assert [name for _, _, name in after] == [mapping.get(name, name) for _, _, name in before]
    assert grammar.read(out).tokens != () and len(grammar.read(out).tokens) == len(grammar.read(sql).tokens)
    # … and every byte outside the qualifiers is the original's.
    raw, new = sql.encode(), out.encode()
    kept_old, kept_new, at_old, at_new = [], [], 0, 0
    for (s0, e0, _), (s1, e1, _) in zip(before, after, strict=True):
        kept_old.append(raw[at_old:s0])
        kept_new.append(new[at_new:s1])
        at_old, at_new = e0, e1
    assert [*kept_old, raw[at_old:]] == [*kept_new, new[at_new:]]
    for (s0, e0, name), (s1, e1, _) in zip(before, after, strict=True):
        if name in mapping:
            assert new[s1:e1].decode() == '"' + mapping[name].replace('"', '""') + '"'
        else:
            assert new[s1:e1] == raw[s0:e0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.sampled_from(list("publicé.\"' ()*,;-/\nSELECTFROMt1$")), max_size=60))
def test_rewrite_of_any_text_reads_back_or_is_refused(sql):
    try:
        out = grammar.rewrite_schemas(sql, MAP)
    except GatewayError as exc:
        assert exc.status in (400, 403, 413)
        return
    names = [n for _, _, n in grammar.schema_qualifiers(out)]
    assert "public" not in names
    assert re.sub(r'"qgp_k_public"', "", out).count("qgp_k_public") == 0
