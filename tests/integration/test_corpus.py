"""The facts corpus: ordinary and adversarial SQL, each with expected facts or a denial code.

Every case runs against the catalog of a real PostgreSQL database (the demo tables plus
tests/corpus/schema.sql). A case's `facts` is a subset match: only the keys it names are
compared, each exactly (for
nested objects such as `columns`, the sub-keys it names). A case's `deny` is the expected GatewayError code.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml

from app.catalog import Catalog, introspect
from app.demo import SCHEMA_SQL
from app.errors import GatewayError
from app.facts import FactsExtractor

pytestmark = pytest.mark.integration

CORPUS = Path(__file__).resolve().parent.parent / "corpus"


def _cases() -> list[Any]:
    cases = []
    for path in sorted(CORPUS.glob("*.yaml")):
        for case in yaml.safe_load(path.read_text()) or []:
            cases.append(pytest.param(case, id=f"{path.stem}:{case['id']}"))
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def corpus_catalog(postgres) -> Catalog:
    async def build() -> Catalog:
        admin = await asyncpg.connect(postgres.admin_dsn)
        try:
            if not await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = 'corpus'"):
                await admin.execute("CREATE DATABASE corpus OWNER querygate")
        finally:
            await admin.close()
        dsn = postgres.app_dsn.replace("/appdb?", "/corpus?")
        conn = await asyncpg.connect(dsn)
        try:
            if not await conn.fetchval("SELECT to_regclass('customers') IS NOT NULL"):
                await conn.execute(SCHEMA_SQL)
                await conn.execute((CORPUS / "schema.sql").read_text())
            return await introspect(conn, ("public",), None)
        finally:
            await conn.close()

    return asyncio.run(build())


def test_corpus_is_large_enough():
    assert len(CASES) >= 150


def _check(case, catalog) -> None:
    extractor = FactsExtractor(max_sql_bytes=1_000_000)
    if "deny" in case:
        with pytest.raises(GatewayError) as caught:
            extractor.extract(case["sql"], catalog)
        assert caught.value.code == case["deny"], caught.value.message
        return
    facts = extractor.extract(case["sql"], catalog).to_input()
    for key, expected in case["facts"].items():
        actual = facts[key]
        if isinstance(expected, dict) and isinstance(actual, dict):
            # Nested objects (tables, columns, ddl) compare the keys the case names.
            actual = {k: actual.get(k) for k in expected}
        assert actual == expected, f"{key}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("case", CASES)
def test_case(case, corpus_catalog):
    if "known_gap" not in case:
        _check(case, corpus_catalog)
        return
    # A case the extractor gets wrong today: it must still fail, so that fixing it forces
    # the mark to go (and the expectation to be enforced from then on).
    try:
        _check(case, corpus_catalog)
    except (AssertionError, GatewayError, pytest.fail.Exception):
        pytest.xfail(case["known_gap"])
    pytest.fail(f"known gap now behaves as expected; remove known_gap: {case['known_gap']}")
