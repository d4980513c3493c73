"""The SQL masking functions give exactly what app/masking.py's strategies give, and never
raise: each strategy is run in PostgreSQL and in Python over the same awkward values."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from app.masking import make_masker
from app.profiles import hmac_pads, mask_expression

pytestmark = pytest.mark.integration

TOKEN = "[REDACTED]"
KEY = b"a test key of some length, 0123456789"

VALUES = [
    "", "a", "ab", "abcd", "abcde", "766-16-2186", "4111 1111 1111 1111", "4111-1111-1111-1111",
    "4111111111111111", "12345678901", "123456789012", "ada@example.com", "a@b", "@example.com",
    "no-at-sign", "x@y@z.example", "  spaced @ odd . tld ", "ünïcödé@exämple.de", "😀😀😀😀😀",
    "line\nbreak@example.com", "quote'\"@example.com", "%_\\", "١٢٣٤٥٦٧٨٩٠١٢٣", None,
]
STRATEGIES = ["redact", "null", "partial", "partial:2:2", "partial:0:0", "partial:3:9", "email",
              "pan", "hash"]


def _in_database(admin_dsn: str, strategy: str) -> list[str | None]:
    expr = mask_expression(strategy, "v", "text", TOKEN)

    async def run() -> list[str | None]:
        conn = await asyncpg.connect(admin_dsn)
        try:
            async with conn.transaction():
                await conn.execute(
                    "CREATE TEMP TABLE k (singleton boolean, ipad bytea, opad bytea) ON COMMIT DROP"
                )
                ipad, opad = hmac_pads(KEY)
                await conn.execute("INSERT INTO k VALUES (true, $1, $2)", ipad, opad)
                # The same expression the views use, against this key instead of the real one.
                sql = expr.replace("querygate_mask.hmac_key", "pg_temp.k")
                rows = await conn.fetch(
                    f"SELECT {sql} AS m FROM unnest($1::text[]) WITH ORDINALITY AS t(v, n) "
                    "ORDER BY n", VALUES,
                )
                return [r["m"] for r in rows]
        finally:
            await conn.close()

    return asyncio.run(run())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sql_and_python_strategies_agree(admin_db, strategy):
    python, _ = make_masker(strategy, "text", KEY, TOKEN)
    assert _in_database(admin_db.dsn, strategy) == [python(v) for v in VALUES]


def test_non_text_columns_keep_their_type_or_become_text(admin_db):
    async def run() -> list[tuple[str, str]]:
        conn = await asyncpg.connect(admin_db.dsn)
        try:
            out = []
            for strategy in ("null", "redact", "partial", "email", "pan"):
                expr = mask_expression(strategy, "v", "timestamptz", TOKEN)
                out.append((strategy, await conn.fetchval(
                    f"SELECT pg_typeof({expr})::text FROM (SELECT now() AS v) t"
                )))
            return out
        finally:
            await conn.close()

    assert asyncio.run(run()) == [
        ("null", "timestamp with time zone"), ("redact", "timestamp with time zone"),
        ("partial", "text"), ("email", "text"), ("pan", "text"),
    ]
