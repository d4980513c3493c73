"""Every setting is documented (issue 20): its variable, `QUERYGATE_<NAME>`, appears in the
README or docs/ (the tables there drop the prefix: a row's first cell names it, or a
`NAME` / `OTHER` pair). Adding a setting without its documentation fails here."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _documented() -> set[str]:
    names: set[str] = set()
    for path in DOCS:
        text = path.read_text()
        names |= set(re.findall(r"QUERYGATE_([A-Z0-9_]+)", text))
        for row in re.findall(r"^\|([^|\n]+)\|", text, re.MULTILINE):
            names |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", row))
    return names


def test_every_setting_is_documented():
    documented = _documented()
    missing = sorted(f"QUERYGATE_{name.upper()}" for name in Settings.model_fields
                     if name.upper() not in documented)
    assert not missing, f"document these settings (README or docs/): {missing}"


def test_the_check_sees_a_setting_that_is_not_documented():
    assert "NOT_A_SETTING_ANYWHERE" not in _documented()
    assert "DB_POOL_MIN" in _documented() and "PG_MAX_STARTUPS" in _documented()
