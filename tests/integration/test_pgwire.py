"""The PostgreSQL wire protocol (issue 17), with real clients: psql, psycopg, asyncpg.

Each test connects to a real gateway (OPA, PostgreSQL, the audit spool) the way a person or
a service would: the user name is the token's subject, the password is the token.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from app.devstack import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pg(make_gateway, tmp_path_factory) -> Iterator[Any]:
    spool = tmp_path_factory.mktemp("pgwire-spool")
    gateway = make_gateway(pg_port=free_port(), dev_mode=True, audit_spool_dir=str(spool))
    yield gateway


def dsn(pg: Any, token: str, user: str, **extra: str) -> str:
    parts = {"host": "127.0.0.1", "port": str(pg.settings.pg_port), "dbname": "appdb",
             "user": user, "password": token, "sslmode": "disable", **extra}
    return " ".join(f"{k}='{v}'" for k, v in parts.items())


def test_psql_reads_masked_rows(pg, keys):
    token = keys.token("alice", ["analysts"])
    env = {**os.environ, "PGPASSWORD": token}
    result = subprocess.run(
        ["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p",
         str(pg.settings.pg_port), "-U", "alice", "-d", "appdb", "-c",
         "SELECT id, email FROM customers WHERE id = 1"],
        env={**env, "PGSSLMODE": "disable"}, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stderr
    ident, email = result.stdout.strip().split("|")
    assert ident == "1"
    assert "@" not in email or "*" in email or len(email) == 64, email


def test_psycopg_text_and_params(pg, keys):
    token = keys.token("alice", ["analysts"])
    with psycopg.connect(dsn(pg, token, "alice")) as conn:
        rows = conn.execute("SELECT id, full_name FROM customers WHERE id = %s", (2,)).fetchall()
        assert rows and rows[0][0] == 2
        assert conn.execute("SHOW DateStyle").fetchone()[0]


def test_asyncpg_binary(pg, keys):
    token = keys.token("alice", ["analysts"])

    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.settings.pg_port, user="alice",
                                     password=token, database="appdb", ssl=False)
        try:
            return await conn.fetch("SELECT id, full_name, created_at FROM customers WHERE id = $1", 3)
        finally:
            await conn.close()

    rows = asyncio.run(run())
    assert rows[0]["id"] == 3


def test_a_denied_statement_is_42501_and_nothing_runs(pg, keys, db):
    token = keys.token("alice", ["analysts"])
    with psycopg.connect(dsn(pg, token, "alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as caught:
            conn.execute("DROP TABLE orders")
        assert "policy_denied" in str(caught.value)
    assert db.table_exists("orders")


def test_a_wrong_user_or_token_is_refused(pg, keys):
    token = keys.token("alice", ["analysts"])
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(dsn(pg, token, "bob"))
    assert "subject" in str(caught.value)
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(dsn(pg, "not-a-token", "alice"))
    assert "password authentication failed" in str(caught.value)


CONNECT_TIME = ["SELECT version()", "SELECT current_schema()", "SELECT current_database()",
                "SELECT current_user", "SELECT pg_backend_pid()"]


@pytest.mark.parametrize("sql", CONNECT_TIME)
def test_what_drivers_ask_on_connect_works_on_the_wire_and_over_http(pg, keys, sql):
    """Allowed by policy (functions.session in data.json), on both channels."""
    token = keys.token("alice", ["analysts"])
    with psycopg.connect(dsn(pg, token, "alice"), autocommit=True) as conn:
        assert conn.execute(sql).fetchone()[0] is not None
    response = pg.query(sql, {"authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    assert response.json()["row_count"] == 1


def _psql(pg: Any, token: str, *commands: str) -> subprocess.CompletedProcess[str]:
    args = ["psql", "-X", "-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose", "-h", "127.0.0.1",
            "-p", str(pg.settings.pg_port), "-U", "alice", "-d", "appdb"]
    for command in commands:
        args += ["-c", command]
    return subprocess.run(args, env={**os.environ, "PGPASSWORD": token, "PGSSLMODE": "disable"},
                          capture_output=True, text=True, timeout=30)


def test_psql_describes_tables_from_the_catalogs(pg, keys):
    """psql's \\dt and \\d: catalog introspection, decided by policy (catalog.relations)."""
    token = keys.token("alice", ["analysts"])
    listed = _psql(pg, token, "\\d customers", "\\dt", "\\dv", "\\dn")
    assert listed.returncode == 0, listed.stderr
    # What PostgreSQL shows the caller's masking profile: its views of the tables.
    assert "customers | view" in listed.stdout, listed.stdout
    for column in ("id", "full_name", "email", "ssn", "card_number", "created_at"):
        assert column in listed.stdout, listed.stdout


def test_type_lookups_and_information_schema(pg, keys):
    token = keys.token("alice", ["analysts"])
    with psycopg.connect(dsn(pg, token, "alice"), autocommit=True) as conn:
        assert conn.execute("SELECT typname FROM pg_catalog.pg_type WHERE oid = %s",
                            (23,)).fetchone() == ("int4",)
        assert conn.execute("SELECT oid FROM pg_type WHERE typname = 'text'").fetchone() == (25,)
        columns = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'customers'"
        ).fetchall()
        assert columns  # the profile's views, as PostgreSQL shows them to its role
    over_http = pg.query("SELECT typname FROM pg_catalog.pg_type WHERE oid = $1",
                         {"authorization": f"Bearer {token}"}, [23])
    assert over_http.status_code == 200, over_http.text
    assert over_http.json()["rows"] == [["int4"]]


@pytest.mark.parametrize("sql", [
    "SELECT * FROM pg_catalog.pg_statistic",
    "SELECT most_common_vals FROM pg_stats WHERE tablename = 'customers'",
    "SELECT rolpassword FROM pg_authid",
    "SELECT query FROM pg_stat_activity",
    "SELECT setting FROM pg_settings WHERE name = 'data_directory'",
    "SELECT c.relname, x.ssn FROM pg_class c, customers x",  # mixed: not introspection
    "SELECT pg_catalog.pg_read_file('/etc/passwd') FROM pg_class",
    "SELECT query_to_xml('select ssn from customers', true, true, '') FROM pg_class",
])
def test_values_credentials_and_activity_are_never_read_from_the_catalogs(pg, keys, sql):
    token = keys.token("alice", ["analysts"])
    with psycopg.connect(dsn(pg, token, "alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(sql)
    assert caught.value.sqlstate in ("42501", "42P01"), caught.value
