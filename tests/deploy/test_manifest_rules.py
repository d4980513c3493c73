"""deploy/policy/ (Rego, evaluated by the real opa) passes every shipped layout and catches a
deliberately broken copy of one."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.manifests import LAYOUTS, render, violations

BROKEN = Path(__file__).resolve().parent / "fixtures" / "broken"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_shipped_layouts_break_no_rule(layout):
    assert violations(render(LAYOUTS[layout])) == []


def test_a_broken_copy_is_caught():
    found = {(v["rule"], v["object"], v["message"]) for v in violations(render(BROKEN))}
    expected = {
        ("run_as_root", f"Deployment/orders-app container {name}", "runAsUser must not be 0")
        for name in ("app", "opa", "querygate")
    } | {
        ("missing_probe", "Deployment/orders-app container app", "readinessProbe is required"),
        ("image_not_pinned", "Deployment/orders-app container app",
         "image registry.example.com/orders-app:latest must have a digest or an exact version "
         "tag (not latest)"),
    }
    assert found == expected
