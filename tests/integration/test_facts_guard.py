"""The extractor as a guard: statements PostgreSQL accepts but the gateway does not model are
denied before anything runs, and the server cross-check catches a stale catalog."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def devgw(make_gateway):
    # dev environment: the policy would allow dana's DDL, so any refusal below is the
    # extractor's allow-list, not policy.
    return make_gateway(environment="dev", admin_groups=["security"])


def _order(db, oid: int):
    return db.fetch("SELECT * FROM orders WHERE id = $1", oid)


# Each statement is valid PostgreSQL; each would change something if it ran.
UNMODELLED = [
    ("DO $$ BEGIN DELETE FROM orders WHERE id = 41; END $$", "unsupported_statement"),
    ("EXPLAIN ANALYZE DELETE FROM orders WHERE id = 41", "unsupported_statement"),
    ("PREPARE wipe AS DELETE FROM orders WHERE id = 41", "unsupported_statement"),
    ("COPY (SELECT ssn FROM customers) TO STDOUT", "unsupported_statement"),
    ("SET ROLE postgres", "unsupported_statement"),
    ("SET search_path = pg_catalog", "unsupported_statement"),
    ("RESET ALL", "unsupported_statement"),
    ("LISTEN audit_channel", "unsupported_statement"),
    ("NOTIFY audit_channel, 'x'", "unsupported_statement"),
    ("VACUUM orders", "unsupported_statement"),
    ("GRANT ALL ON orders TO PUBLIC", "unsupported_statement"),
    ("ALTER TABLE orders OWNER TO postgres", "unsupported_statement"),
    ("CREATE SCHEMA evil", "unsupported_statement"),
    ("CREATE FUNCTION evil() RETURNS int LANGUAGE sql AS 'SELECT 1'", "unsupported_statement"),
    ("CREATE TABLE evil AS SELECT * FROM customers", "unsupported_construct"),
    ("CREATE TEMP TABLE evil (a int)", "unsupported_construct"),
    ("CREATE VIEW evil AS SELECT ssn FROM customers", "unsupported_statement"),
    ("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE", "unsupported_statement"),
    ("DISCARD ALL", "unsupported_statement"),
    ("BEGIN", "unsupported_statement"),
    ("CALL evil()", "unsupported_statement"),
    ("MERGE INTO orders o USING customers c ON o.customer_id = c.id "
     "WHEN MATCHED THEN DELETE", "unsupported_statement"),
]


@pytest.mark.parametrize(("sql", "code"), UNMODELLED)
def test_unmodelled_statements_are_denied_not_executed(devgw, keys, db, sql, code):
    dana = keys.headers("dana", ["dba"])
    before = _order(db, 41)
    owner = db.fetchval("SELECT tableowner FROM pg_tables WHERE tablename = 'orders'")
    response = devgw.query(sql, dana)
    assert response.status_code in (400, 403), response.text
    assert response.json()["error"]["code"] in (code, "sql_parse_error")
    assert _order(db, 41) == before
    assert not db.table_exists("evil")
    assert not db.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = 'evil'")
    assert not db.fetchval("SELECT 1 FROM pg_proc WHERE proname = 'evil'")
    assert db.fetchval("SELECT tableowner FROM pg_tables WHERE tablename = 'orders'") == owner


def test_deep_nesting_is_a_clean_400(gateway, alice):
    sql = "SELECT " + "(" * 3000 + "1" + ")" * 3000
    response = gateway.query(sql, alice)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "sql_too_complex"


def test_other_schemas_are_invisible(gateway, alice, db):
    db.execute("CREATE SCHEMA IF NOT EXISTS hidden; "
               "CREATE TABLE IF NOT EXISTS hidden.vault (id int, payload text)")
    for sql in ("SELECT * FROM hidden.vault", "SELECT id FROM hidden.vault, pg_class"):
        response = gateway.query(sql, alice)
        assert response.status_code == 422, (sql, response.text)
        assert response.json()["error"]["code"] == "unknown_object"
    # The system catalogs are introspection, decided by policy (docs/pgwire.md); those
    # that hold credentials are never read.
    response = gateway.query("SELECT * FROM pg_catalog.pg_authid", alice)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "catalog_relation_denied"


def test_catalog_refresh_needs_an_admin(devgw, alice):
    response = devgw.client.post("/v1/admin/catalog/refresh", headers=alice)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "admin_required"


def test_cross_check_denies_a_query_on_a_drifted_table(make_gateway, opa_with_config, keys, db):
    # A caller without masks reads the table itself (a masked caller reads its profile's
    # view, which PostgreSQL keeps from drifting: docs/masking.md, schema changes).
    opa = opa_with_config(masking={"unmasked_groups": {"pii": ["pii_readers"],
                                                       "pci": ["pii_readers"]}})
    devgw = make_gateway(environment="dev", admin_groups=["security"], opa_url=opa.url)
    sec = keys.headers("sec", ["security"])
    alice = keys.headers("pat", ["pii_readers"])
    db.execute("DROP TABLE IF EXISTS drift CASCADE; CREATE TABLE drift (a integer); "
               "INSERT INTO drift VALUES (1)")
    assert devgw.client.post("/v1/admin/catalog/refresh", headers=sec).json()["changed"] is True
    assert devgw.query("SELECT * FROM drift", alice).json()["rows"] == [[1]]

    # A column added after the catalog was read: the server reports two outputs, the facts one.
    db.execute("ALTER TABLE drift ADD COLUMN b text DEFAULT 'new'")
    response = devgw.query("SELECT * FROM drift", alice)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "facts_mismatch"

    refreshed = devgw.client.post("/v1/admin/catalog/refresh", headers=sec).json()
    assert refreshed["changed"] is True
    response = devgw.query("SELECT * FROM drift", alice)
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == [[1, "new"]]

    # A column retyped behind the catalog's back: same name, another type.
    db.execute("ALTER TABLE drift ALTER COLUMN a TYPE text")
    response = devgw.query("SELECT a FROM drift", alice)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "facts_mismatch"


def test_explain_command_shows_facts_and_decision(gateway, keys, capsys):
    from app.cli import main

    token = keys.token("alice", ["analysts"])
    code = main(["explain", "--url", gateway.url, "--token", token,
                 "--sql", "SELECT lower(email) AS e FROM customers WHERE id = $1",
                 "--params", "[1]"])
    assert code == 0
    import json

    shown = json.loads(capsys.readouterr().out)
    assert shown["facts"]["outputs"] == [
        {"name": "e", "sources": ["public.customers.email"], "derivation": "expression"}
    ]
    assert shown["facts"]["columns"]["predicate"] == ["public.customers.id"]
    assert shown["decision"]["allow"] is True
