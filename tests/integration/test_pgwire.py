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


# --- the catalogs as the caller may see them (app/introspection.py) ------------------------


@pytest.fixture(scope="module")
def hidden_table(db) -> Iterator[str]:
    """A schema and a table no profile role has a privilege on, with a comment."""
    db.execute("CREATE SCHEMA IF NOT EXISTS payroll_hidden; "
               "CREATE TABLE IF NOT EXISTS payroll_hidden.salaries_2026 (emp int, amount int); "
               "COMMENT ON TABLE payroll_hidden.salaries_2026 IS 'board eyes only'")
    yield "salaries_2026"
    db.execute("DROP SCHEMA payroll_hidden CASCADE")


CATALOG_PROBES = {
    "pg_class": "SELECT relname FROM pg_catalog.pg_class",
    "pg_class unqualified": "SELECT relname FROM pg_class",
    "pg_namespace": "SELECT nspname FROM pg_namespace",
    "pg_attribute": "SELECT c.relname || '.' || a.attname FROM pg_catalog.pg_attribute a "
                    "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid",
    "pg_description": "SELECT description FROM pg_catalog.pg_description",
    "pg_tables": "SELECT schemaname || '.' || tablename FROM pg_catalog.pg_tables",
    "pg_type": "SELECT typname FROM pg_catalog.pg_type",
    "pg_roles": "SELECT rolname FROM pg_catalog.pg_roles",
    "pg_proc": "SELECT proname FROM pg_catalog.pg_proc",
}


@pytest.mark.parametrize("probe", sorted(CATALOG_PROBES))
def test_catalog_rows_are_what_the_callers_role_may_see(pg, keys, db, hidden_table, probe):
    """PostgreSQL shows every role every name, column, comment and role of the database;
    through the gateway a catalog query reads views that keep the system's rows and what the
    caller's profile may use: not a schema or table it has no privilege on, not the
    gateway's own schemas (masking functions, its key, its records), not other roles."""
    sql = CATALOG_PROBES[probe]
    direct = {r[0] for r in db.fetch(sql)}
    # The probe would find them all directly (what a profile role would see unfiltered).
    hidden = {name for name in direct if name and (
        "salaries_2026" in name or "payroll_hidden" in name or name == "board eyes only"
        or name.startswith("querygate_") or name in ("hmac_key", "profiles", "email", "pan")
        or name.startswith("qg_p_")
    )}
    assert hidden, (probe, sorted(direct)[:20])
    token = keys.token("alice", ["analysts"])
    with psycopg.connect(dsn(pg, token, "alice"), autocommit=True) as conn:
        seen = {r[0] for r in conn.execute(sql).fetchall()}
        role = conn.execute("SELECT current_user").fetchone()[0]
    assert seen, probe
    leaked = sorted(seen & hidden - {role})
    assert not leaked, (probe, leaked)
    if probe in ("pg_class", "pg_class unqualified"):
        # What the caller reads is listed: its profile's views, and the system catalogs.
        assert {"customers", "orders", "pg_class", "tables"} <= seen, sorted(seen)
    if probe == "pg_roles":
        assert seen == {role}, seen


def test_catalog_rows_are_filtered_over_http_too(pg, keys, db, hidden_table):
    token = keys.token("alice", ["analysts"])
    response = pg.query("SELECT relname FROM pg_catalog.pg_class WHERE relname = $1",
                        {"authorization": f"Bearer {token}"}, [hidden_table])
    assert response.status_code == 200, response.text
    assert response.json()["rows"] == []
    assert db.fetchval("SELECT count(*) FROM pg_catalog.pg_class WHERE relname = $1",
                       hidden_table) == 1


def test_a_leaky_condition_never_sees_a_filtered_row(pg, keys, hidden_table):
    """The views are security barriers: a condition of the caller's that could raise with a
    row's value (a cast of relname) runs only on rows the filter kept, so the hidden name is
    in no error either."""
    token = keys.token("alice", ["analysts"])
    with psycopg.connect(dsn(pg, token, "alice"), autocommit=True) as conn:
        for sql in ("SELECT relname FROM pg_class WHERE relname = 'salaries_2026' "
                    "AND (relname::text)::int > 0",
                    "SELECT count(*) FROM pg_class WHERE relname::text LIKE 'salaries%'"):
            try:
                rows = conn.execute(sql).fetchall()
            except psycopg.Error as exc:
                assert "salaries" not in str(exc), exc
            else:
                assert rows in ([], [(0,)]), rows


@pytest.mark.parametrize("sql, params", [
    ("SELECT current_setting('data_directory') FROM pg_class LIMIT 1", ()),
    ("SELECT current_setting($1) FROM pg_class LIMIT 1", ("data_directory",)),
    ("SELECT current_setting($1::varchar(6)) FROM pg_class LIMIT 1", ("server_version",)),
    ("SELECT current_setting('server_version', true) FROM pg_class LIMIT 1", ()),
    ("SELECT current_setting(lower($1)) FROM pg_class LIMIT 1", ("SEARCH_PATH",)),
    ("SELECT current_setting($1) FROM pg_class LIMIT 1", ("querygate.approval",)),
])
def test_current_setting_reads_only_what_show_may(pg, keys, sql, params):
    token = keys.token("alice", ["analysts"])
    with psycopg.connect(dsn(pg, token, "alice"), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(sql.replace("$1", "%s"), params or None)
    assert caught.value.sqlstate == "42501", caught.value
    over_http = pg.query(sql, {"authorization": f"Bearer {token}"}, list(params))
    assert over_http.status_code == 403, over_http.text
    assert over_http.json()["error"]["code"] == "function_denied"


def test_current_setting_of_a_readable_setting_works(pg, keys):
    """What SQLAlchemy's reflection asks: the name bound as a parameter, in text and binary."""
    token = keys.token("alice", ["analysts"])
    sql = "SELECT current_setting($1::varchar) FROM pg_catalog.pg_class LIMIT 1"
    with psycopg.connect(dsn(pg, token, "alice"), autocommit=True) as conn:
        wire = sql.replace("$1", "%s")
        assert conn.execute(wire, ("default_table_access_method",)).fetchone() == ("heap",)
        assert conn.execute(wire, ("server_version",), binary=True).fetchone()[0]

    async def with_asyncpg() -> Any:
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.settings.pg_port, user="alice",
                                     password=token, database="appdb", ssl=False)
        try:
            return await conn.fetchval(sql, "TimeZone")
        finally:
            await conn.close()

    assert asyncio.run(with_asyncpg())
    over_http = pg.query(sql, {"authorization": f"Bearer {token}"}, ["search_path"])
    assert over_http.status_code == 200, over_http.text


# --- a row budget on the wire ------------------------------------------------------------


@pytest.fixture(scope="module")
def budget_wire(make_gateway, tmp_path_factory) -> Iterator[Any]:
    """A gateway whose policy gives wire callers an agent's budget of 5 rows an hour (the
    shipped one gives it to MCP callers only): a policy may, and the wire must count it."""
    import json
    import shutil
    from pathlib import Path

    from app.devstack import start_opa

    policy = tmp_path_factory.mktemp("wire-budget-policy") / "rego"
    shutil.copytree(Path(__file__).resolve().parents[2] / "rego", policy)
    agents = policy / "querygate" / "agents.rego"
    agents.write_text(agents.read_text().replace(
        'is_agent if input.request.channel == "mcp"',
        'is_agent if input.request.channel == "mcp"\n\nis_agent if input.request.channel == "pgwire"'))
    data = policy / "querygate" / "config" / "data.json"
    config = json.loads(data.read_text())
    config["agents"]["rows_per_hour"] = 5
    data.write_text(json.dumps(config))
    opa = start_opa([policy])
    yield make_gateway(opa_url=opa.url, pg_port=free_port(), dev_mode=True)
    opa.stop()


def test_a_failed_statement_on_the_wire_gives_its_row_budget_back(budget_wire, keys):
    """A statement that fails in PostgreSQL took a reservation of every row left; what
    reached the client counts (none here), the rest goes back. Before, only a completed
    statement settled its reservation, so three failures spent the whole hour's budget."""
    token = keys.token("bob", ["analysts"])
    with psycopg.connect(dsn(budget_wire, token, "bob"), autocommit=True) as conn:
        for _ in range(3):
            with pytest.raises(psycopg.Error) as failed:
                conn.execute("SELECT 1 / (id - id) FROM customers").fetchall()
            assert failed.value.sqlstate == "22012", failed.value
        rows = conn.execute("SELECT id FROM customers ORDER BY id LIMIT 5").fetchall()
        assert len(rows) == 5
        # The budget holds: those five were the hour's.
        with pytest.raises(psycopg.Error) as spent:
            conn.execute("SELECT id FROM customers LIMIT 1").fetchall()
    assert "row_budget_exhausted" in str(spent.value), spent.value
