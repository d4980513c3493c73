"""`querygate explain --policy-dir`: what a policy change decides, before it ships.

Facts come from the gateway's extractor against a real catalog (the test database, or the
demo schema in a throwaway embedded PostgreSQL); `opa eval` decides with the Rego on disk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from app.cli import main
from tests.deploy.manifests import REPO

UPDATE = "UPDATE orders SET status = 'paid' WHERE id = 1"


def explain(capsys, *args: str) -> tuple[int, dict]:
    code = main(["explain", *args])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture
def against_test_database(postgres, monkeypatch):
    for name in list(os.environ):
        if name.startswith("QUERYGATE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("QUERYGATE_DATABASE_URL", postgres.app_dsn)
    monkeypatch.setenv("QUERYGATE_ENVIRONMENT", "staging")


@pytest.mark.integration
def test_a_policy_change_shows_its_effect(tmp_path, capsys, against_test_database):
    code, shipped = explain(capsys, "--policy-dir", str(REPO / "rego"), "--as", "alice", "--sql", UPDATE)
    assert code == 0
    assert shipped["catalog"] == "database (QUERYGATE_DATABASE_URL)"
    assert shipped["facts"]["tables"]["write"] == ["public.orders"]
    assert shipped["gateway_would"]["outcome"] == "deny"
    assert "write_requires_writer_group" in {r["rule"] for r in shipped["gateway_would"]["reasons"]}

    # The change under review: analysts become a writer group.
    changed = tmp_path / "rego"
    shutil.copytree(REPO / "rego", changed)
    data_file = changed / "querygate" / "config" / "data.json"
    data = json.loads(data_file.read_text())
    data["writer_groups"].append("analysts")
    data_file.write_text(json.dumps(data))
    code, proposed = explain(capsys, "--policy-dir", str(changed), "--as", "alice", "--sql", UPDATE)
    assert code == 0
    assert proposed["gateway_would"]["outcome"] == "allow"
    assert proposed["facts"] == shipped["facts"]


@pytest.mark.integration
def test_groups_and_environment_are_the_authors_to_choose(capsys, against_test_database):
    code, shown = explain(capsys, "--policy-dir", str(REPO / "rego"), "--as", "svc-report",
                          "--groups", "analysts", "--environment", "prod",
                          "--sql", "SELECT id FROM customers WHERE id = 1")
    assert code == 0
    assert shown["identity"]["sub"] == "svc-report" and shown["identity"]["groups"] == ["analysts"]
    assert shown["environment"] == "prod"
    assert shown["gateway_would"]["status"] == 200


@pytest.mark.integration
def test_a_malformed_decision_is_shown_as_the_gateway_would_treat_it(capsys, against_test_database):
    code, shown = explain(capsys, "--policy-dir", str(REPO / "tests/fixtures/policies/malformed"),
                          "--as", "alice", "--sql", "SELECT id FROM customers")
    assert code == 1
    assert shown["gateway_would"]["status"] == 503
    assert shown["gateway_would"]["code"] == "policy_unavailable"


@pytest.mark.integration
def test_sql_the_gateway_refuses_never_reaches_policy(capsys, against_test_database):
    code, shown = explain(capsys, "--policy-dir", str(REPO / "rego"), "--as", "alice",
                          "--sql", "SELECT * FROM no_such_table")
    assert code == 1
    assert shown["refused_by_gateway"]["code"] == "unknown_object"
    assert "decision" not in shown


def test_without_a_database_the_demo_schema_is_used():
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUERYGATE_")}
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "explain", "--policy-dir", str(REPO / "rego"), "--as", "alice",
         "--environment", "staging", "--sql", "SELECT id, email FROM customers WHERE id = 1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["catalog"] == "demo schema (throwaway embedded PostgreSQL)"
    assert shown["gateway_would"] == {
        "status": 200, "outcome": "allow", "masks": {"public.customers.email": "email"},
        "reasons": [{"rule": "reader_group_select", "message": "reader groups may run read-only selects"}],
    }
