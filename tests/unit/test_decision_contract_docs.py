"""docs/decision-contract.md documents every field of the decision input the gateway sends
and of the decision it accepts (issue 20). A field added to the input
(``policy.decision_input``) or read from the decision (``policy.parse_decision``) without
its row here fails this test."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from app import policy
from app.catalog import Catalog
from app.facts import QueryFacts
from app.identity import Identity

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "decision-contract.md").read_text()
ROWS = set(re.findall(r"^\|\s*`([a-z_.]+)`", DOC, re.MULTILINE))
HEADINGS = set(re.findall(r"^###\s+`([a-z_]+)`", DOC, re.MULTILINE))


def _input() -> dict:
    identity = Identity(sub="s", groups=("g",), issuer="i")
    facts = QueryFacts(fingerprint="f", kind="select")
    return policy.decision_input(identity, facts, Catalog(schemas=("public",), relations={}),
                                 environment="dev", database="d", request_id="r",
                                 source_ip="127.0.0.1")


def test_every_input_section_and_field_is_documented():
    document = _input()
    for section, value in document.items():
        assert section in HEADINGS, f"### `{section}` is missing"
        if isinstance(value, dict):
            for name, inner in value.items():
                if isinstance(inner, dict) and inner and section == "query":
                    for sub in inner:
                        assert f"{name}.{sub}" in ROWS or name in ROWS, f"{section}.{name}.{sub}"
                elif section != "classification":
                    assert name in ROWS, f"{section}.{name} has no row"


def test_every_decision_field_the_gateway_reads_is_documented():
    tree = ast.parse(Path(policy.__file__).read_text())
    parse = next(n for n in ast.walk(tree)
                 if isinstance(n, ast.FunctionDef) and n.name == "parse_decision")
    read = {node.args[0].value for node in ast.walk(parse)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "get"
            and getattr(node.func.value, "id", None) == "result"
            and node.args and isinstance(node.args[0], ast.Constant)}
    assert {"allow", "max_rows"} <= read  # the scan works
    assert read <= ROWS, f"decision fields without a row: {sorted(read - ROWS)}"


def test_nothing_is_left_reserved():
    assert "Reserved for" not in DOC and "reserved" not in DOC.lower().replace(
        "reserved word", ""), "the approval fields are implemented"
