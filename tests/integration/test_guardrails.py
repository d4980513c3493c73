"""Guardrails, blast radius and least privilege, against real OPA and PostgreSQL.

Every refusal names the rule that fired, and the database is checked directly afterwards."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import AUDIENCE, ISSUER

pytestmark = pytest.mark.integration


def _orders_digest(db) -> str:
    return db.fetchval("SELECT md5(string_agg(id || ':' || status, ',' ORDER BY id)) FROM orders")


def _rules(response) -> set[str]:
    return {r["rule"] for r in response.json()["error"]["reasons"]}


@pytest.fixture(scope="module")
def prod(make_gateway):
    return make_gateway(environment="prod", mask_hmac_key="prod-test-key-0123456789")


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE FROM orders",
        "DELETE FROM orders WHERE 1 = 1",
        "DELETE FROM orders WHERE true OR id = 5",
        "UPDATE orders SET status = 'void'",
        "UPDATE orders SET status = 'void' WHERE id = id",
        "UPDATE orders SET status = 'void' WHERE (status = status)",
        "UPDATE orders SET status = 'void' WHERE NOT false",
    ],
)
@pytest.mark.parametrize("environment", ["staging", "prod"])
def test_unbounded_writes_are_refused_everywhere(gateway, prod, dana, db, sql, environment):
    target = gateway if environment == "staging" else prod
    before = _orders_digest(db)
    response = target.query(sql, dana)
    assert response.status_code == 403, response.text
    assert "unbounded_write" in _rules(response)
    assert _orders_digest(db) == before


@pytest.mark.parametrize(
    "sql",
    [
        "DROP TABLE orders",
        "TRUNCATE orders",
        "ALTER TABLE orders DROP COLUMN status",
        "DROP TABLE orders CASCADE",
    ],
)
@pytest.mark.parametrize("environment", ["staging", "prod"])
def test_destructive_ddl_is_refused(gateway, prod, keys, db, sql, environment):
    target = gateway if environment == "staging" else prod
    migrator = keys.headers("flyway", ["migrations", "dba"])
    before = _orders_digest(db)
    response = target.query(sql, migrator)
    assert response.status_code == 403, response.text
    assert "destructive_ddl" in _rules(response)
    assert db.table_exists("orders")
    assert db.fetchval(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = 'orders'"
    ) == 5
    assert _orders_digest(db) == before


def test_prod_ddl_only_for_the_migration_identity(prod, dana, keys, db):
    sql = "CREATE INDEX orders_status_idx ON orders (status)"
    refused = prod.query(sql, dana)
    assert refused.status_code == 403
    assert _rules(refused) == {"ddl_requires_migration_identity"}
    assert not db.fetchval("SELECT to_regclass('orders_status_idx') IS NOT NULL")
    migrator = keys.headers("flyway", ["migrations", "dba"])
    allowed = prod.query(sql, migrator)
    assert allowed.status_code == 200, allowed.text
    assert db.fetchval("SELECT to_regclass('orders_status_idx') IS NOT NULL")
    db.execute("DROP INDEX orders_status_idx")


def test_protected_table_in_deny_mode(make_gateway, opa_with_config, dana, db):
    opa = opa_with_config(guardrails={"protected_tables": {"public.orders": "deny"}})
    gateway = make_gateway(opa_url=opa.url)
    before = _orders_digest(db)
    response = gateway.query("UPDATE orders SET status = 'void' WHERE id = 3", dana)
    assert response.status_code == 403
    assert "protected_table" in _rules(response)
    assert _orders_digest(db) == before


def test_protected_table_write_is_held_for_approval(gateway, dana, db):
    before = db.fetchval("SELECT full_name FROM customers WHERE id = 9")
    response = gateway.query("UPDATE customers SET full_name = 'X' WHERE id = 9", dana)
    assert response.status_code == 202, response.text
    approval = response.json()["approval"]
    assert approval["status"] == "pending"
    assert approval["awaiting"] == {"approver_groups": ["security", "dba"]}
    assert approval["tables"] == ["public.customers"]
    assert db.fetchval("SELECT full_name FROM customers WHERE id = 9") == before


def test_blast_radius_rolls_back(gateway, dana, db):
    before = _orders_digest(db)
    response = gateway.query("UPDATE orders SET status = 'void' WHERE id <= 1500", dana)
    assert response.status_code == 403, response.text
    body = response.json()["error"]
    assert body["code"] == "blast_radius_exceeded"
    assert body["rows_affected"] == 1500 and body["max_rows_affected"] == 1000
    assert _orders_digest(db) == before


def test_write_within_blast_radius_commits(gateway, dana, db):
    response = gateway.query("UPDATE orders SET status = 'paid' WHERE id <= 10", dana)
    assert response.status_code == 200, response.text
    assert response.json()["rows_affected"] == 10
    assert db.fetchval("SELECT count(*) FROM orders WHERE id <= 10 AND status = 'paid'") == 10


def test_set_local_role_is_enforced_by_the_database(make_gateway, opa_with_config, alice,
                                                    admin_db):
    admin_db.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'qg_orders_only') "
        "THEN CREATE ROLE qg_orders_only NOLOGIN; END IF; END $$;"
        "GRANT USAGE ON SCHEMA public TO qg_orders_only;"
        "GRANT SELECT ON orders TO qg_orders_only;"
        "GRANT qg_orders_only TO querygate"
    )
    opa = opa_with_config(guardrails={"db_roles": {"analysts": "qg_orders_only"}})
    gateway = make_gateway(opa_url=opa.url)
    explained = gateway.query("SELECT id FROM customers WHERE id = 1", alice, path="/v1/explain")
    assert explained.json()["decision"]["allow"] is True
    assert explained.json()["decision"]["db_role"] == "qg_orders_only"
    # Policy allowed it; the role may not read customers, so the database refuses.
    refused = gateway.query("SELECT id FROM customers WHERE id = 1", alice)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "database_permission_denied"
    assert gateway.query("SELECT id FROM orders WHERE id = 1", alice).json()["rows"] == [[1]]


def test_prod_refuses_a_superuser_login(postgres, opa, keys, tmp_path):
    env = {
        "QUERYGATE_ENVIRONMENT": "prod",
        "QUERYGATE_DATABASE_URL": postgres.admin_dsn,  # the cluster's superuser
        "QUERYGATE_OPA_URL": opa.url,
        "QUERYGATE_JWT_PUBLIC_KEY": keys.public_pem,
        "QUERYGATE_JWT_ISSUER": ISSUER,
        "QUERYGATE_JWT_AUDIENCE": AUDIENCE,
        "QUERYGATE_JWT_ALGORITHMS": "RS256",
        "QUERYGATE_MASK_HMAC_KEY": "prod-test-key-0123456789",
        "QUERYGATE_PORT": "0",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve"], env=env, capture_output=True, timeout=60,
        text=True,
    )
    assert result.returncode != 0
    assert "superuser" in result.stderr
