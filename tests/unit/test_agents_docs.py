"""docs/agents.md and the decision contract stay true to the code: the tools, the agent
policy's rules and data, the bridge's flags, the audit schema's tool names, and the
configuration examples parse."""

from __future__ import annotations

import json
import re
from pathlib import Path

from app.cli import build_parser
from app.mcp import tools

REPO = Path(__file__).resolve().parents[2]
AGENTS = (REPO / "docs" / "agents.md").read_text()
CONTRACT = (REPO / "docs" / "decision-contract.md").read_text()
CONFIG = json.loads((REPO / "rego" / "querygate" / "config" / "data.json").read_text())


def test_every_tool_is_in_the_tools_table():
    table = {m for m in re.findall(r"^\| `([a-z_]+)` \|", AGENTS, re.MULTILINE)}
    assert set(tools.NAMES) <= table


def test_every_agent_setting_is_documented_in_both_places():
    for key in CONFIG["agents"]:
        assert f"agents.{key}" in AGENTS, key
        assert f"`agents.{key}`" in CONTRACT, key


def test_every_rule_of_the_agent_policy_is_documented():
    rego = (REPO / "rego" / "querygate" / "agents.rego").read_text()
    rules = set(re.findall(r'"rule": "([a-z_]+)"', rego))
    assert rules
    for rule in rules:
        assert f"`{rule}`" in AGENTS and f"`{rule}`" in CONTRACT, rule


def test_the_contract_names_the_agent_and_the_budget():
    assert "| `agent` | object or null |" in CONTRACT
    assert "| `rows_per_hour` |" in CONTRACT and "row_budget_exhausted" in CONTRACT


def test_the_bridges_flags_are_documented():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    bridge = sub.choices["mcp"]  # type: ignore[attr-defined]
    for action in bridge._actions:
        for flag in action.option_strings:
            if flag.startswith("--") and flag != "--help":
                assert flag in AGENTS, flag


def test_the_audit_schema_names_the_tools():
    schema = json.loads((REPO / "docs" / "audit-event.schema.json").read_text())
    request = schema["properties"]["request"]["properties"]
    assert set(request["tool"]["enum"]) == set(tools.NAMES) | {None}
    assert "mcp" in request["channel"]["enum"]


def test_the_configuration_examples_are_json():
    blocks = re.findall(r"```json\n(.*?)```", AGENTS, re.DOTALL)
    assert len(blocks) >= 5
    for block in blocks:
        json.loads(block)
