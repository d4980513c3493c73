"""The wire protocol with more real clients (issue 17, acceptance 2 and 3): pgjdbc, SQLAlchemy
and pgbench, each against a real gateway as a person or a service would run it.

- **pgjdbc**: tools/pgjdbc/PgjdbcClient.java, compiled by `make pgjdbc` against the driver
  pinned in tools/pgjdbc/pom.xml, run once for the module; its tab-separated lines are the
  outcomes of its scenarios (prepared reads, a denial, a blast radius in a transaction).
- **SQLAlchemy** ``create_engine("postgresql+psycopg://…")``: connects (with the dialect's
  defaults too: its hstore lookup in pg_type is catalog introspection), runs Core queries
  and reflects a table (its table-options query calls ``current_setting($n)`` with the name
  bound as a parameter: checked against the readable settings once bound).
- **pgbench** (Debian's postgresql-client, `make pg-client`): point SELECTs with ``-M simple``,
  ``extended`` and ``prepared``, 8 clients for 10 s each, no failed transaction.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from app.devstack import REPO_ROOT, free_port

pytestmark = pytest.mark.integration

SENSITIVE = ("email", "ssn", "card_number")
PGBENCH_SECONDS = 10  # the 10 s, 8 clients, each mode
PGBENCH_CLIENTS = 8


@pytest.fixture(scope="module")
def pg(make_gateway, tmp_path_factory) -> Iterator[Any]:
    spool = tmp_path_factory.mktemp("pgwire-clients-spool")
    yield make_gateway(pg_port=free_port(), dev_mode=True, audit_spool_dir=str(spool))


@pytest.fixture(scope="module")
def raw(db) -> set[str]:
    """Every raw sensitive value of the demo customers, to be found nowhere in a result."""
    rows = db.fetch("SELECT email, ssn, card_number FROM customers")
    return {str(r[name]) for r in rows for name in SENSITIVE}


# --- pgjdbc ---------------------------------------------------------------------------------


def pgjdbc_classpath() -> str:
    """The compiled client and the driver's jars (`make pgjdbc` builds them when missing)."""
    built = subprocess.run(["make", "-s", "pgjdbc"], cwd=REPO_ROOT, capture_output=True,
                           text=True, check=False)
    assert built.returncode == 0, f"`make pgjdbc` failed: {(built.stdout + built.stderr)[-2000:]}"
    version = re.search(r"<pgjdbc\.version>([^<]+)</pgjdbc\.version>",
                        (REPO_ROOT / "tools" / "pgjdbc" / "pom.xml").read_text())
    assert version is not None
    tool = REPO_ROOT / ".tools" / "pgjdbc" / version.group(1)
    source = hashlib.sha256((REPO_ROOT / "tools" / "pgjdbc" / "PgjdbcClient.java").read_bytes())
    return f"{tool / ('classes-' + source.hexdigest()[:12])}:{tool / 'libs'}/*"


@pytest.fixture(scope="module")
def jdbc(pg, keys, db) -> dict[str, list[list[str]]]:
    """PgjdbcClient's lines by scenario, and the count of orders it tried to change."""
    before = db.fetchval("SELECT count(*) FROM orders WHERE status = 'x'")
    env = {**os.environ, "QG_READER_TOKEN": keys.token("alice", ["analysts"]),
           "QG_WRITER_TOKEN": keys.token("wendy", ["dba"])}
    ran = subprocess.run(["java", "-cp", pgjdbc_classpath(), "PgjdbcClient",
                          str(pg.settings.pg_port)],
                         env=env, capture_output=True, text=True, timeout=60, check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    out: dict[str, list[list[str]]] = {"_unchanged": [[str(before)]]}
    for line in ran.stdout.splitlines():
        scenario, *fields = line.split("\t")
        out.setdefault(scenario, []).append(fields)
    assert "done" in out, ran.stdout + ran.stderr
    return out


def test_pgjdbc_connects_with_a_token(jdbc):
    assert "connect" in jdbc and jdbc["connect"][0][0] == "version", jdbc.get("connect")


def test_pgjdbc_database_metadata_shows_what_the_caller_may_see(jdbc):
    """DatabaseMetaData (DBeaver's and DataGrip's navigators): catalog queries, decided by
    policy, answered from the catalog views (app/introspection.py)."""
    rows = jdbc["metadata"]
    assert rows[-1] == ["done"], rows
    schemas = {f[1] for f in rows if f[0] == "schema"}
    tables = {f[1].split(".", 1)[1] for f in rows if f[0] == "table"}
    columns = {f[1] for f in rows if f[0] == "column"}
    assert {"customers", "orders"} <= tables, rows
    assert {"id", "email", "ssn", "card_number"} <= columns, rows
    # Nothing of the gateway's own: its masking schema, its records, its catalog views.
    assert not {s for s in schemas if s.startswith("querygate_")}, schemas
    assert not {"hmac_key", "profiles"} & tables, tables
    # The caller reads its profile's views: no key or index of a base table it cannot use.
    assert [f for f in rows if f[0] == "indexes"] == [["indexes", "0"]], rows


def test_pgjdbc_prepared_statements_get_masked_values(jdbc, raw):
    rows = jdbc["prepared"]
    assert rows[-1] == ["server_prepared", "true"], rows  # past prepareThreshold: a named statement
    cells = [fields[1:] for fields in rows if fields[0] == "row"]
    assert [int(c[0]) for c in cells] == list(range(1, 8)), rows
    for _, email, ssn, card in cells:
        for value in (email, ssn, card):
            assert value not in raw, (value, cells)
    assert jdbc["count"][0][0] == "value" and int(jdbc["count"][0][1]) > 0, jdbc["count"]


def test_pgjdbc_sees_a_denial_as_sqlstate_42501(jdbc, db):
    (fields,) = jdbc["denial"]
    assert fields[:2] == ["error", "42501"], fields
    assert "policy_denied" in fields[2], fields
    assert jdbc["after_denial"] == [["value", "1"]]
    assert db.table_exists("orders")


def test_pgjdbc_transaction_over_the_blast_radius_rolls_back(jdbc, db):
    (fields,) = jdbc["blast"]
    assert fields[:2] == ["error", "42501"], fields
    assert "blast_radius_exceeded" in fields[2], fields
    assert jdbc["rollback"] == [["ok"]]
    before = int(jdbc["_unchanged"][0][0])
    assert jdbc["after_rollback"] == [["count", str(before)]]
    assert db.fetchval("SELECT count(*) FROM orders WHERE status = 'x'") == before


# --- SQLAlchemy -----------------------------------------------------------------------------


def sqlalchemy_url(pg: Any, token: str) -> sa.URL:
    return sa.URL.create("postgresql+psycopg", username="alice", password=token,
                         host="127.0.0.1", port=pg.settings.pg_port, database="appdb",
                         query={"sslmode": "disable", "application_name": "querygate-sqlalchemy"})


@pytest.fixture(scope="module")
def engine(pg, keys) -> Iterator[sa.Engine]:
    # use_native_hstore=False: no hstore lookup on connect (the defaults are tested below).
    engine = sa.create_engine(sqlalchemy_url(pg, keys.token("alice", ["analysts"])),
                              pool_size=2, use_native_hstore=False)
    yield engine
    engine.dispose()


def test_sqlalchemy_connects_and_runs_core_queries_masked(engine, raw):
    customers = sa.table("customers", sa.column("id"), sa.column("email"), sa.column("ssn"))
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(customers.c.id, customers.c.email, customers.c.ssn)
            .where(customers.c.id.in_([1, 2, 3])).order_by(customers.c.id)
        ).all()
        assert [r.id for r in rows] == [1, 2, 3]
        assert not {r.email for r in rows} & raw and not {r.ssn for r in rows} & raw
        text = conn.execute(sa.text("SELECT count(*) FROM orders WHERE id <= :n"), {"n": 10})
        assert text.scalar_one() == 10


def test_sqlalchemy_connects_with_the_dialects_defaults(pg, keys):
    engine = sa.create_engine(sqlalchemy_url(pg, keys.token("alice", ["analysts"])))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_sqlalchemy_reflects_a_table(engine):
    table = sa.Table("customers", sa.MetaData(), autoload_with=engine)
    assert {"id", "email", "ssn"} <= set(table.columns.keys())


# --- pgbench --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_point_selects_with_no_failed_transaction(pg, keys, tmp_path: Path, mode):
    script = tmp_path / "point-select.sql"
    script.write_text("\\set id random(1, 100)\nSELECT id, email FROM customers WHERE id = :id;\n")
    env = {**os.environ, "PGPASSWORD": keys.token("alice", ["analysts"]), "PGSSLMODE": "disable"}
    ran = subprocess.run(
        ["pgbench", "-n", "-M", mode, "-c", str(PGBENCH_CLIENTS), "-j", "2",
         "-T", str(PGBENCH_SECONDS), "-f", str(script),
         "-h", "127.0.0.1", "-p", str(pg.settings.pg_port), "-U", "alice", "appdb"],
        env=env, capture_output=True, text=True, timeout=PGBENCH_SECONDS + 30, check=False,
    )
    report = ran.stdout + ran.stderr
    assert ran.returncode == 0, report
    processed = re.search(r"number of transactions actually processed: (\d+)", report)
    failed = re.search(r"number of failed transactions: (\d+)", report)
    assert processed and failed, report
    assert failed.group(1) == "0", report
    assert int(processed.group(1)) >= PGBENCH_CLIENTS * PGBENCH_SECONDS, report
