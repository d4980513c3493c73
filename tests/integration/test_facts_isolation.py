"""One caller's statement never changes how the gateway judges another's: facts are a pure
function of the SQL text and the catalog (tests/integration/test_facts_order.py for the
whole corpus)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_an_operator_is_not_named_after_an_earlier_callers_function(gateway, keys, alice):
    # The first caller's statement is refused: current_setting() reads server settings.
    mallory = keys.headers("mallory", ["analysts"])
    refused = gateway.query("SELECT current_setting('server_version') ->> 'a' AS v", mallory)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "function_denied"

    # A second caller's ->> is an operator, not a call of current_setting().
    for sql in ("""SELECT '{"a": 1}'::jsonb ->> 'a' AS v""",
                "SELECT status::jsonb ->> 'a' AS v FROM orders WHERE false"):
        allowed = gateway.query(sql, alice)
        assert allowed.status_code == 200, (sql, allowed.text)
    assert gateway.query("""SELECT '{"a": 1}'::jsonb ->> 'a' AS v""", alice).json()["rows"] == [["1"]]
