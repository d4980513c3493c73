"""Masking enforced by PostgreSQL (app/profiles.py, docs/masking.md).

The gateway's model of SQL is always slightly wrong, so these tests attack exactly where the
model and PostgreSQL disagree, and check that the database leaves nothing to leak: literal
leak queries, differential oracles (a true and a false guess must get identical answers),
a facts extractor that reports nothing at all, escapes from the profile's role, the
PostgreSQL pitfalls (PUBLIC grants, row security through views, cached statements) and the
life cycle of the views when the schema changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import subprocess
import sys
from typing import Any

import asyncpg
import pytest

from app import profiles
from app.facts import FactsExtractor, QueryFacts
from app.http import app as http_app
from tests.integration.test_masking import VECTORS, leaks

pytestmark = pytest.mark.integration

SENSITIVE = ("email", "ssn", "card_number")


@pytest.fixture(scope="module")
def raw_values(db) -> dict[str, set[str]]:
    rows = db.fetch("SELECT email, ssn, card_number FROM customers")
    return {name: {r[name] for r in rows} for name in SENSITIVE}


@pytest.fixture(scope="module")
def first(db) -> dict[str, Any]:
    return dict(db.fetch("SELECT id, email, ssn, card_number FROM customers WHERE id = 1")[0])


def _raw_in(text: str, raw: dict[str, set[str]]) -> list[str]:
    return [v for values in raw.values() for v in values if v in text]


# --- the literal leaks of the issue ---------------------------------------------------------

LEAKS = [
    # PostgreSQL reads the later CTE `orders`; the facts said public.orders.status.
    "WITH RECURSIVE a AS (SELECT id, status FROM orders), orders AS "
    "(SELECT id, ssn AS status FROM customers) SELECT id, status FROM a",
    # Unaliased outputs named differently by the resolver and by PostgreSQL.
    "SELECT t.substring FROM (SELECT substr(country, 1, 2), ssn AS substring FROM customers) t",
    "SELECT t.substr FROM (SELECT substr(country, 1, 2), ssn AS substr FROM customers) t",
    "SELECT t.btrim FROM (SELECT btrim(country), ssn AS btrim FROM customers) t",
    "SELECT t.now FROM (SELECT now(), ssn AS now FROM customers) t",
    "SELECT t.strpos FROM (SELECT strpos(country, 'D'), ssn AS strpos FROM customers) t",
    "SELECT t.o17 FROM (SELECT 0o17, ssn AS o17 FROM customers) t",
    # The schema-qualified spellings BI tools emit.
    'SELECT "public"."customers"."ssn" FROM "public"."customers"',
    "SELECT c.email FROM public . customers c",
    "TABLE public.customers",
]


@pytest.mark.parametrize("sql", LEAKS)
def test_the_literal_leaks_return_masked_values(gateway, alice, raw_values, sql):
    response = gateway.query(sql, alice)
    assert response.status_code < 500, response.text
    assert not _raw_in(response.text, raw_values), sql


def test_most_literal_leaks_are_served_masked(gateway, alice):
    served = [sql for sql in LEAKS if gateway.query(sql, alice).status_code == 200]
    assert len(served) >= 5, served


def test_cte_forward_reference_cannot_launder_through_a_write(make_gateway, keys, db, raw_values):
    gw = make_gateway(environment="dev")
    dana = keys.headers("dana", ["dba"])
    sql = (
        "INSERT INTO orders (id, customer_id, amount_cents, status, created_at) "
        "WITH RECURSIVE a AS (SELECT customer_id, status FROM orders), orders AS "
        "(SELECT id AS customer_id, ssn AS status FROM customers) "
        "SELECT 900000 + customer_id, customer_id, 0, status, now() FROM a WHERE customer_id < 4"
    )
    try:
        response = gw.query(sql, dana)
        assert response.status_code in (200, 403), response.text
        stored = {r["status"] for r in db.fetch("SELECT status FROM orders WHERE id >= 900000")}
        assert not stored & raw_values["ssn"]
    finally:
        db.execute("DELETE FROM orders WHERE id >= 900000")


# --- differential oracles -------------------------------------------------------------------


def _answer(response) -> tuple[int, Any]:
    body = response.json()
    if response.status_code == 200:
        return 200, (body["columns"], body["rows"])
    return response.status_code, body["error"]["code"]


def _oracles(first: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    ssn, email = first["ssn"], first["email"]
    below = ssn[:-1] + chr(ord(ssn[-1]) - 1)
    above = ssn[:-1] + chr(ord(ssn[-1]) + 1)
    wrong = "999" if not ssn.startswith("999") else "111"
    return [
        # One bit per row: LIKE on a prefix inside CASE.
        ("SELECT CASE WHEN ssn LIKE $1 THEN 'x' END AS b FROM customers WHERE id = 1",
         ssn[:3] + "%", wrong + "%"),
        ("SELECT id FROM customers WHERE id = 1 AND email LIKE $1", email[:4] + "%", "zzzz%"),
        # Sort position against a marker just below or above the true value.
        ("SELECT id FROM (SELECT 1 AS id, ssn AS s FROM customers WHERE id = 1 "
         "UNION ALL SELECT 2, $1::text) u ORDER BY s", below, above),
        # Membership: INTERSECT, EXCEPT and DISTINCT with the true or a false value.
        ("SELECT count(*) AS n FROM (SELECT ssn FROM customers WHERE id = 1 "
         "INTERSECT SELECT $1::text) x", ssn, below),
        ("SELECT count(*) AS n FROM (SELECT ssn FROM customers WHERE id = 1 "
         "EXCEPT SELECT $1::text) x", ssn, below),
        ("SELECT count(DISTINCT s) AS n FROM (SELECT ssn AS s FROM customers WHERE id = 1 "
         "UNION ALL SELECT $1::text) x", ssn, below),
        # Error or success: division by zero and sqrt of a negative on a true prefix (built on
        # the row, so PostgreSQL cannot fold it at plan time).
        ("SELECT CASE WHEN substr(ssn, 1, 3) = $1 THEN 1 / (id - id) ELSE 0 END AS v "
         "FROM customers WHERE id = 1", ssn[:3], wrong),
        ("SELECT CASE WHEN substr(card_number, 1, 4) = $1 THEN sqrt(-id) ELSE 0 END AS v "
         "FROM customers WHERE id = 1", first["card_number"][:4], "0000"),
    ]


def _assert_no_oracle(gw, headers, first) -> None:
    for sql, true_guess, false_guess in _oracles(first):
        truth = gw.query(sql, headers, [true_guess])
        lie = gw.query(sql, headers, [false_guess])
        assert truth.status_code == 200, (sql, truth.text)
        assert _answer(truth) == _answer(lie), sql


def test_a_true_and_a_false_guess_get_identical_answers(gateway, alice, first):
    _assert_no_oracle(gateway, alice, first)


def test_pii_readers_see_the_difference(gateway, keys, first):
    # The oracles are real: for a caller who may see raw values they do tell the truth.
    pat = keys.headers("pat", ["pii_readers"])
    sql, true_guess, false_guess = _oracles(first)[3]
    assert _answer(gateway.query(sql, pat, [true_guess])) != _answer(
        gateway.query(sql, pat, [false_guess])
    )


# --- defence in depth: an extractor that reports nothing -----------------------------------


class NullFacts(FactsExtractor):
    """The real extractor's answer with every table, column and source removed."""

    def extract(self, sql: str, catalog: Any) -> QueryFacts:
        facts = super().extract(sql, catalog)
        return dataclasses.replace(
            facts, tables_read=(), tables_write=(), columns_read=(), columns_predicate=(),
            columns_write=(), columns_join_equality=(), write_sources=(),
            outputs=tuple(
                dataclasses.replace(o, sources=(), derivation="direct", type=None)
                for o in facts.outputs
            ),
            _input={},
        )


@pytest.fixture(scope="module")
def blind_gateway(make_gateway):
    patch = pytest.MonkeyPatch()
    patch.setattr(http_app, "FactsExtractor", NullFacts)
    try:
        yield make_gateway()
    finally:
        patch.undo()


def test_the_blind_extractor_really_is_blind(blind_gateway, alice):
    body = blind_gateway.query("SELECT email FROM customers WHERE id = 1", alice,
                               path="/v1/explain").json()
    assert body["facts"]["columns"]["read"] == []
    assert body["decision"]["masks"] == {}


@pytest.mark.parametrize("sql", VECTORS + LEAKS)
def test_without_lineage_the_masking_corpus_leaks_nothing(blind_gateway, alice, raw_values, sql):
    response = blind_gateway.query(sql, alice)
    if response.status_code == 200:
        assert not leaks(response.json(), raw_values), sql
    assert not _raw_in(response.text, raw_values), sql


def test_without_lineage_most_of_the_corpus_is_served(blind_gateway, alice):
    served = [sql for sql in VECTORS if blind_gateway.query(sql, alice).status_code == 200]
    assert len(served) >= 45


def test_without_lineage_the_oracles_tell_nothing(blind_gateway, alice, first):
    _assert_no_oracle(blind_gateway, alice, first)


# --- who sees what ------------------------------------------------------------------------


def test_formats_for_the_analyst_and_raw_values_for_pii_readers(gateway, alice, keys, first):
    sql = "SELECT email, ssn, card_number FROM customers WHERE id = 1"
    masked = gateway.query(sql, alice).json()
    email, ssn, card = first["email"], first["ssn"], first["card_number"]
    assert masked["rows"] == [[
        email[0] + "***@" + email.rsplit("@", 1)[1],
        "*" * (len(ssn) - 4) + ssn[-4:],
        "*" * (len(card) - 4) + card[-4:],
    ]]
    assert masked["decision"]["masked"] == {"email": "email", "ssn": "partial",
                                            "card_number": "pan"}
    # pii_readers see the pii classes in the clear; a card number is pci, masked still.
    raw = gateway.query(sql, keys.headers("pat", ["pii_readers"])).json()
    assert raw["rows"] == [[email, ssn, "*" * (len(card) - 4) + card[-4:]]]


def test_hash_is_the_keyed_hmac_computed_in_the_database(make_gateway, keys, first):
    gw = make_gateway(mask_hmac_key="k1" * 16)
    sec = keys.headers("sec", ["security"])
    body = gw.query("SELECT email FROM customers WHERE id = 1", sec).json()
    expected = hmac.new(b"k1" * 16, first["email"].encode(), hashlib.sha256).hexdigest()
    assert body["rows"] == [[expected]]


def test_a_predicate_on_a_masked_column_compares_masked_values(gateway, alice, first):
    raw = gateway.query("SELECT id FROM customers WHERE ssn = $1", alice, [first["ssn"]])
    assert raw.status_code == 200, raw.text
    assert raw.json()["rows"] == []
    assert raw.json()["notices"][0]["code"] == "masked_predicate"
    shown = "*" * (len(first["ssn"]) - 4) + first["ssn"][-4:]
    matched = gateway.query("SELECT id FROM customers WHERE ssn = $1 AND id = 1", alice, [shown])
    assert matched.json()["rows"] == [[1]]


def test_tpch_style_analytics_are_still_served(gateway, alice):
    queries = [
        "SELECT c.country, count(*) AS orders, sum(o.amount_cents) AS revenue "
        "FROM customers c JOIN orders o ON o.customer_id = c.id "
        "GROUP BY c.country ORDER BY revenue DESC LIMIT 5",
        "WITH big AS (SELECT customer_id, sum(amount_cents) AS total FROM orders "
        "GROUP BY customer_id HAVING sum(amount_cents) > 100000) "
        "SELECT c.id, c.email, b.total FROM big b JOIN customers c ON c.id = b.customer_id "
        "ORDER BY b.total DESC LIMIT 3",
        "SELECT o.status, avg(o.amount_cents) FROM orders o WHERE o.customer_id IN "
        "(SELECT id FROM customers WHERE country = 'DE') GROUP BY o.status",
        "SELECT id, (SELECT count(*) FROM orders o WHERE o.customer_id = c.id) AS n "
        "FROM customers c WHERE EXISTS (SELECT 1 FROM orders o WHERE o.customer_id = c.id) "
        "ORDER BY n DESC, id LIMIT 5",
        "SELECT date_trunc('month', created_at) AS m, count(*) FROM orders "
        "GROUP BY 1 ORDER BY 1 LIMIT 3",
    ]
    for sql in queries:
        response = gateway.query(sql, alice)
        assert response.status_code == 200, (sql, response.text)
        assert response.json()["rows"], sql


def test_a_statement_cached_for_a_raw_reader_is_masked_for_the_analyst(gateway, alice, keys,
                                                                        first):
    sql = "SELECT email FROM customers WHERE id = $1"
    pat = keys.headers("pat", ["pii_readers"])
    for _ in range(3):
        assert gateway.query(sql, pat, [1]).json()["rows"] == [[first["email"]]]
        assert gateway.query(sql, alice, [1]).json()["rows"] != [[first["email"]]]


# --- a statement cannot leave its profile ----------------------------------------------------


def _profile_dsn(postgres, role: str) -> str:
    return postgres.app_dsn.replace("querygate@", f"{role}@", 1)


async def _as_role(postgres, profile, statements: list[str]) -> list[str]:
    """What PostgreSQL says to each statement run as the profile's role, with its search
    path (trust authentication in the test cluster)."""
    conn = await asyncpg.connect(_profile_dsn(postgres, profile.spec.role),
                                 server_settings={"search_path": profile.search_path})
    outcomes = []
    try:
        for sql in statements:
            try:
                await conn.fetch(sql)
                outcomes.append("ok")
            except asyncpg.PostgresError as exc:
                outcomes.append(exc.sqlstate)
    finally:
        await conn.close()
    return outcomes


def _alice_profile(gateway, alice):
    assert gateway.query("SELECT id FROM customers WHERE id = 1", alice).status_code == 200
    store = gateway.server.config.app.state.gateway.profiles
    found = [p for p in store._profiles.values() if p.spec.masked]
    assert found
    return found[0]


def test_the_profile_role_cannot_switch_or_reach_the_tables(gateway, alice, postgres):
    import asyncio

    profile = _alice_profile(gateway, alice)
    outcomes = asyncio.run(_as_role(postgres, profile, [
        "SET ROLE querygate",
        "SELECT set_config('role', 'querygate', true)",
        "SET ROLE querygate_mask_owner",
        "RESET ROLE",
        "SELECT email FROM public.customers LIMIT 1",
        "SET search_path = public",
        "SELECT email FROM customers LIMIT 1",
        "SELECT * FROM querygate_mask.hmac_key",
        "SELECT * FROM querygate_internal.approvals",
    ]))
    assert outcomes == ["42501", "42501", "42501", "ok", "42501", "ok", "42501", "42501", "42501"]


def test_system_columns_are_not_reachable_through_the_views(gateway, alice, postgres):
    import asyncio

    profile = _alice_profile(gateway, alice)
    outcomes = asyncio.run(_as_role(postgres, profile, [
        "SELECT ctid FROM customers LIMIT 1",
        "SELECT xmin FROM customers LIMIT 1",
        "SELECT tableoid FROM customers LIMIT 1",
    ]))
    assert outcomes == ["42703", "42703", "42703"]


def test_switching_role_inside_a_statement_is_refused(gateway, alice):
    for sql in [
        "SELECT set_config('role', 'querygate', true), email FROM customers LIMIT 1",
        "SELECT set_config('search_path', 'public', true), email FROM customers LIMIT 1",
    ]:
        response = gateway.query(sql, alice)
        assert response.status_code == 403, response.text


# --- PostgreSQL pitfalls -------------------------------------------------------------------


def _serve_refuses(serve_settings, tmp_path, **overrides: str) -> str:
    """`querygate serve` with these settings must stop at start-up; its stderr."""
    settings = {**serve_settings, "port": "0", "audit_spool_dir": str(tmp_path), **overrides}
    env = {f"QUERYGATE_{k.upper()}": v for k, v in settings.items()} | {"PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve"], env=env,
                            capture_output=True, timeout=60, text=True)
    assert result.returncode != 0, result.stderr
    return result.stderr


def test_a_public_grant_on_an_exposed_table_stops_start_up(admin_db, serve_settings, tmp_path):
    import asyncio

    admin_db.execute("GRANT SELECT ON orders TO PUBLIC")
    try:
        async def found() -> list[str]:
            conn = await asyncpg.connect(admin_db.dsn)
            try:
                return await profiles.public_grants(conn, ("public",))
            finally:
                await conn.close()

        assert asyncio.run(found()) == ["SELECT ON TABLE public.orders"]
        stderr = _serve_refuses(serve_settings, tmp_path)
        assert "SELECT ON TABLE public.orders" in stderr
    finally:
        admin_db.execute("REVOKE SELECT ON orders FROM PUBLIC")


def test_row_security_holds_through_the_profiles(make_gateway, keys, db):
    # The views' owner is neither the table's owner nor exempt from row security, so the
    # table's policies hold for masked and raw profiles alike (the login role owns the demo
    # tables, and an owner would bypass them).
    gw = make_gateway(admin_groups=["security"])
    db.execute(
        "DROP TABLE IF EXISTS rls_probe CASCADE; "
        "CREATE TABLE rls_probe (id int, tenant text, contact_email text); "
        "INSERT INTO rls_probe VALUES (1, 'a', 'a@example.com'), (2, 'b', 'b@example.com'); "
        "ALTER TABLE rls_probe ENABLE ROW LEVEL SECURITY; "
        "CREATE POLICY only_a ON rls_probe USING (tenant = 'a')"
    )
    try:
        sec = keys.headers("sec", ["security"])
        assert gw.client.post("/v1/admin/catalog/refresh", headers=sec).status_code == 200
        alice = keys.headers("alice", ["analysts"])
        pat = keys.headers("pat", ["pii_readers"])
        assert gw.query("SELECT contact_email FROM rls_probe", alice).json()["rows"] == [
            ["a***@example.com"]
        ]
        assert gw.query("SELECT contact_email FROM rls_probe", pat).json()["rows"] == [
            ["a@example.com"]
        ]
    finally:
        db.execute("DROP TABLE IF EXISTS rls_probe CASCADE")


def test_prod_refuses_a_login_role_that_owns_an_exposed_table(admin_db, serve_settings, postgres,
                                                              tmp_path):
    # An owner bypasses row security and can grant itself anything on its tables.
    admin_db.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'qg_owning_login') "
        "THEN CREATE ROLE qg_owning_login LOGIN; END IF; END $$; "
        "GRANT CREATE ON SCHEMA public TO qg_owning_login; "
        "SET ROLE qg_owning_login; CREATE TABLE IF NOT EXISTS owned_probe (id int); RESET ROLE"
    )
    try:
        stderr = _serve_refuses(
            serve_settings, tmp_path, environment="prod", mask_hmac_key="prod-test-key-0123456789",
            database_url=postgres.app_dsn.replace("querygate@", "qg_owning_login@"),
        )
        assert "owns exposed relations" in stderr and "public.owned_probe" in stderr
    finally:
        admin_db.execute("DROP TABLE IF EXISTS owned_probe CASCADE")


# --- the views follow the schema -----------------------------------------------------------


def test_db_init_is_idempotent(postgres, admin_db):
    for _ in range(2):
        result = subprocess.run(
            [sys.executable, "-m", "app.cli", "db", "init", "--dsn", admin_db.dsn,
             "--login-role", "querygate", "--schemas", "public"],
            capture_output=True, timeout=60, text=True,
        )
        assert result.returncode == 0, result.stderr
        assert "ready for login role querygate" in result.stdout


def test_schema_changes_reach_the_profiles(make_gateway, keys, db, postgres):
    gw = make_gateway(environment="dev", admin_groups=["security"])
    alice = keys.headers("alice", ["analysts"])
    dana = keys.headers("dana", ["dba"])
    sec = keys.headers("sec", ["security"])

    def refresh() -> None:
        assert gw.client.post("/v1/admin/catalog/refresh", headers=sec).status_code == 200

    db.execute("DROP TABLE IF EXISTS probe_t CASCADE")
    try:
        # A new table, made through the gateway: its sensitive column is masked at once.
        created = gw.query("CREATE TABLE probe_t (id int PRIMARY KEY, label text)", dana)
        assert created.status_code == 200, created.text
        db.execute("INSERT INTO probe_t VALUES (1, 'one')")
        assert gw.query("SELECT id, label FROM probe_t", alice).json()["rows"] == [[1, "one"]]
        # A new sensitive column, added outside the gateway, is masked from its first read.
        db.execute("ALTER TABLE probe_t ADD COLUMN contact_email text DEFAULT 'ada@example.com'")
        refresh()
        body = gw.query("SELECT contact_email FROM probe_t", alice).json()
        assert body["rows"] == [["a***@example.com"]], body
        # PostgreSQL refuses to drop a column a view depends on; through the gateway the
        # DDL drops the profiles' views first, and they come back without the column.
        with pytest.raises(Exception, match="depend"):
            db.execute("ALTER TABLE probe_t DROP COLUMN label")
        dropped = gw.query("ALTER TABLE probe_t DROP COLUMN label", dana)
        assert dropped.status_code == 200, dropped.text
        body = gw.query("SELECT * FROM probe_t", alice).json()
        assert [c["name"] for c in body["columns"]] == ["id", "contact_email"], body
        # A rename outside the gateway: the view keeps the old name until the next refresh.
        db.execute("ALTER TABLE probe_t RENAME COLUMN contact_email TO owner_email")
        refresh()
        body = gw.query("SELECT owner_email FROM probe_t", alice).json()
        assert body["rows"] == [["a***@example.com"]], body
        # A retype outside the gateway: `querygate db sync --drop-views` first, then the
        # migration; masked callers are refused (never served raw) until the views are back.
        with pytest.raises(Exception, match="used by a view"):
            db.execute("ALTER TABLE probe_t ALTER COLUMN id TYPE bigint")
        env = {"QUERYGATE_DATABASE_URL": postgres.app_dsn, "PATH": "/usr/bin:/bin"}
        sync = subprocess.run([sys.executable, "-m", "app.cli", "db", "sync", "--drop-views"],
                              env=env, capture_output=True, timeout=60, text=True)
        assert sync.returncode == 0, sync.stderr
        db.execute("ALTER TABLE probe_t ALTER COLUMN id TYPE bigint")
        refused = gw.query("SELECT owner_email FROM probe_t", alice)
        assert refused.status_code == 403, refused.text
        refresh()
        body = gw.query("SELECT id, owner_email FROM probe_t", alice).json()
        assert body["columns"][0]["type"] == "int8"
        assert body["rows"] == [[1, "a***@example.com"]], body
        # And `db sync` alone brings the recorded profiles back in line.
        sync = subprocess.run([sys.executable, "-m", "app.cli", "db", "sync"],
                              env=env, capture_output=True, timeout=60, text=True)
        assert sync.returncode == 0, sync.stderr
        assert "match the catalog" in sync.stdout
    finally:
        db.execute("DROP TABLE IF EXISTS probe_t CASCADE")


def test_partitions_and_inheritance_children_are_masked_too(make_gateway, keys, db):
    gw = make_gateway(admin_groups=["security"])
    db.execute(
        "DROP TABLE IF EXISTS part_probe CASCADE; DROP TABLE IF EXISTS inh_probe CASCADE; "
        "CREATE TABLE part_probe (id int, contact_email text) PARTITION BY RANGE (id); "
        "CREATE TABLE part_probe_1 PARTITION OF part_probe FOR VALUES FROM (0) TO (10); "
        "INSERT INTO part_probe VALUES (1, 'ada@example.com'); "
        "CREATE TABLE inh_probe (id int, contact_email text); "
        "CREATE TABLE inh_probe_child () INHERITS (inh_probe); "
        "INSERT INTO inh_probe_child VALUES (2, 'bob@example.com')"
    )
    try:
        sec = keys.headers("sec", ["security"])
        assert gw.client.post("/v1/admin/catalog/refresh", headers=sec).status_code == 200
        alice = keys.headers("alice", ["analysts"])
        for sql, expected in [
            ("SELECT contact_email FROM part_probe", [["a***@example.com"]]),
            ("SELECT contact_email FROM part_probe_1", [["a***@example.com"]]),
            ("SELECT contact_email FROM inh_probe", [["b***@example.com"]]),
            ("SELECT contact_email FROM inh_probe_child", [["b***@example.com"]]),
        ]:
            response = gw.query(sql, alice)
            assert response.status_code == 200, (sql, response.text)
            assert response.json()["rows"] == expected, sql
        # A view cannot leave out a parent's children, so ONLY would silently mean "and its
        # children" for a masked caller: refused instead. A raw caller reads the table.
        only = gw.query("SELECT contact_email FROM ONLY inh_probe", alice)
        assert only.status_code == 403, only.text
        assert only.json()["error"]["code"] == "unsupported_construct"
        assert "ONLY" in only.json()["error"]["message"]
    finally:
        db.execute("DROP TABLE IF EXISTS part_probe CASCADE; DROP TABLE IF EXISTS inh_probe CASCADE")


def test_copy_is_refused(gateway, alice):
    for sql in ("COPY customers TO STDOUT", "COPY (SELECT ssn FROM customers) TO STDOUT"):
        response = gateway.query(sql, alice)
        assert response.status_code == 403, response.text


@pytest.mark.parametrize("sql", [
    "ALTER TABLE customers ALTER COLUMN country TYPE text USING ssn",
    "ALTER TABLE customers ADD COLUMN nickname text GENERATED ALWAYS AS (ssn) STORED",
    "ALTER TABLE customers ADD CONSTRAINT probe CHECK (ssn NOT LIKE '1%')",
    "CREATE INDEX probe_idx ON customers ((substr(card_number, 1, 1))) WHERE email LIKE 'a%'",
    "ALTER TABLE customers RENAME COLUMN ssn TO notes",
    "ALTER TABLE customers RENAME TO people_archive",
])
def test_ddl_cannot_copy_or_test_masked_values(make_gateway, keys, db, sql):
    # DDL runs as the tables' owner, outside every profile: its expressions must not read
    # what the caller sees masked (the write-laundering rule, for schema changes).
    gw = make_gateway(environment="dev")
    dana = keys.headers("dana", ["dba"])
    before = db.fetch("SELECT column_name, data_type FROM information_schema.columns "
                      "WHERE table_name = 'customers' ORDER BY ordinal_position")
    response = gw.query(sql, dana)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "ddl_masked_column"
    after = db.fetch("SELECT column_name, data_type FROM information_schema.columns "
                     "WHERE table_name = 'customers' ORDER BY ordinal_position")
    assert before == after


def test_ddl_on_columns_the_caller_may_see_still_runs(make_gateway, keys, db):
    gw = make_gateway(environment="dev")
    dana = keys.headers("dana", ["dba"])
    try:
        response = gw.query("ALTER TABLE orders ADD CONSTRAINT probe_amount "
                            "CHECK (amount_cents < 1000000000)", dana)
        assert response.status_code == 200, response.text
    finally:
        db.execute("ALTER TABLE orders DROP CONSTRAINT IF EXISTS probe_amount")


def test_a_raw_caller_runs_as_a_profile_role_not_the_login_role(make_gateway, opa_with_config,
                                                                keys, postgres, first):
    import asyncio

    opa = opa_with_config(masking={"unmasked_groups": {"pii": ["pii_readers"],
                                                       "pci": ["pii_readers"]}})
    gw = make_gateway(opa_url=opa.url)
    pat = keys.headers("pat", ["pii_readers"])
    body = gw.query("SELECT email, card_number FROM customers WHERE id = 1", pat).json()
    assert body["rows"] == [[first["email"], first["card_number"]]]
    store = gw.server.config.app.state.gateway.profiles
    raw = [p for p in store._profiles.values() if not p.spec.masked]
    assert len(raw) == 1 and raw[0].spec.role.startswith("qg_p_")
    # It has querygate_raw's privileges but cannot become it, nor the login role.
    outcomes = asyncio.run(_as_role(postgres, raw[0], [
        "SELECT email FROM customers LIMIT 1",
        "SET ROLE querygate_raw",
        "SET ROLE querygate",
        "SELECT * FROM querygate_internal.approvals",
    ]))
    assert outcomes == ["ok", "42501", "42501", "42501"]


def test_a_table_dropped_behind_the_gateways_back_does_not_stop_its_profiles(make_gateway, keys,
                                                                             db):
    """The gateway's catalog still lists a table someone dropped since its last refresh: a
    profile prepared from it would fail (42P01), so the catalog is read again first."""
    db.execute("DROP TABLE IF EXISTS gone_t CASCADE")
    db.execute("CREATE TABLE gone_t (id int PRIMARY KEY, contact_email text)")
    try:
        gw = make_gateway()  # its catalog lists gone_t
        db.execute("DROP TABLE gone_t CASCADE")
        answer = gw.query("SELECT id, email FROM customers WHERE id = 1",
                          keys.headers("alice", ["analysts"]))
        assert answer.status_code == 200, answer.text
        assert "@" in answer.json()["rows"][0][1] and "***" in answer.json()["rows"][0][1]
    finally:
        db.execute("DROP TABLE IF EXISTS gone_t CASCADE")
