"""docs/pgwire.md stays true to the code: the parameters a client may SET, the settings of
the listener, and the SQLSTATEs it names."""

from __future__ import annotations

import re
from pathlib import Path

from app.config import Settings
from app.errors import SQLSTATES
from app.pgwire.session import SETTABLE

DOC = (Path(__file__).resolve().parents[2] / "docs" / "pgwire.md").read_text()


def test_the_settable_parameters_are_the_sessions():
    block = DOC.split("<!-- settable:")[1].split("<!-- /settable -->")[0]
    listed = set(re.findall(r"`([a-z_]+)`", block.split("-->", 1)[1]))
    # QUERYGATE_STATEMENT_TIMEOUT_MS is named in the list as statement_timeout's cap.
    assert listed - {"QUERYGATE_STATEMENT_TIMEOUT_MS"} == set(SETTABLE)


def test_every_listener_setting_is_in_the_limits_table():
    names = {f"QUERYGATE_{name.upper()}" for name in Settings.model_fields if name.startswith("pg_")}
    assert names, "no pg_ settings"
    missing = sorted(n for n in names if f"`{n}`" not in DOC)
    assert not missing, missing


def test_the_sqlstates_it_names_are_the_codes():
    assert SQLSTATES["approval_required"] == "QG001" and "QG001" in DOC
    assert SQLSTATES["tls_required"] == "28000" and "28000 `tls_required`" in " ".join(DOC.split())
    assert SQLSTATES["token_expired"] == "28P01"
