"""The wire protocol with more real clients (issue 17, acceptance 2 and 3), each against a
real gateway as a person or a service would run it.

- **pgjdbc**: tools/pgjdbc/PgjdbcClient.java, compiled by `make pgjdbc` against the driver
  pinned in tools/pgjdbc/pom.xml, run once for the module; its tab-separated lines are the
  outcomes of its scenarios (prepared reads, a denial, a blast radius in a transaction).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from app.devstack import REPO_ROOT, free_port

pytestmark = pytest.mark.integration

SENSITIVE = ("email", "ssn", "card_number")


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
    return f"{tool / 'classes'}:{tool / 'libs'}/*"


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
