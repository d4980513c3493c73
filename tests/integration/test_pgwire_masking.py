"""The masking and leak corpora over the wire protocol: 0 raw values, as over HTTP (issue 17).

Every vector of tests/integration/test_masking.py and test_masking_db.py goes through a real
gateway's wire endpoint twice: psycopg in text format and asyncpg in binary, the format in
which a relay that forgot a mask would pass PostgreSQL's bytes straight through. Each cell
that comes back, and every error and notice text, is searched for a raw value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest

from app.devstack import free_port
from tests.integration.test_masking import VECTORS
from tests.integration.test_masking_db import LEAKS

pytestmark = pytest.mark.integration

SENSITIVE = ("email", "ssn", "card_number")
CORPUS = VECTORS + LEAKS
# SQLSTATEs a refusal of a vector may carry: policy (42501), masking refusals (42501, 22023),
# an unsupported construct (42501), and what PostgreSQL itself refuses (42xxx).
REFUSED = ("42", "22023", "0A000")


@pytest.fixture(scope="module")
def pg(make_gateway) -> Iterator[Any]:
    yield make_gateway(pg_port=free_port(), dev_mode=True)


@pytest.fixture(scope="module")
def raw(db) -> set[str]:
    rows = db.fetch("SELECT email, ssn, card_number FROM customers")
    return {str(r[name]) for r in rows for name in SENSITIVE}


def _leaks(texts: list[str], raw: set[str]) -> list[str]:
    found = []
    for text in texts:
        if text in raw or (len(text) > 20 and any(v in text for v in raw)):
            found.append(text[:60])
    return found


def _cells(value: Any) -> Iterator[str]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _cells(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _cells(item)
    elif isinstance(value, asyncpg.Record):
        yield from _cells(list(value.values()))
    elif value is not None:
        yield value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@pytest.fixture(scope="module")
def text_results(pg, keys) -> dict[str, tuple[list[str], str | None]]:
    """Each vector through psycopg (text format): its cells, or its SQLSTATE."""
    token = keys.token("alice", ["analysts"])
    out: dict[str, tuple[list[str], str | None]] = {}
    with psycopg.connect(host="127.0.0.1", port=pg.settings.pg_port, dbname="appdb",
                         user="alice", password=token, sslmode="disable",
                         autocommit=True) as conn:
        for sql in CORPUS:
            try:
                rows = conn.execute(sql.replace("%", "%%")).fetchall()
                out[sql] = (list(_cells(rows)), None)
            except psycopg.Error as exc:
                out[sql] = ([str(exc)], exc.sqlstate)
    return out


@pytest.fixture(scope="module")
def binary_results(pg, keys) -> dict[str, tuple[list[str], str | None]]:
    """Each vector through asyncpg (binary format, extended protocol)."""
    token = keys.token("alice", ["analysts"])

    async def run() -> dict[str, tuple[list[str], str | None]]:
        out: dict[str, tuple[list[str], str | None]] = {}
        conn = await asyncpg.connect(host="127.0.0.1", port=pg.settings.pg_port, user="alice",
                                     password=token, database="appdb", ssl=False)
        try:
            for sql in CORPUS:
                try:
                    rows = await conn.fetch(sql)
                    out[sql] = (list(_cells(rows)), None)
                except asyncpg.PostgresError as exc:
                    out[sql] = ([str(exc), str(exc.detail or "")], exc.sqlstate)
        finally:
            await conn.close()
        return out

    return asyncio.run(run())


@pytest.mark.parametrize("results", ["text_results", "binary_results"])
@pytest.mark.parametrize("sql", CORPUS)
def test_no_raw_value_in_either_format(request, results, raw, sql):
    texts, state = request.getfixturevalue(results)[sql]
    assert not _leaks(texts, raw), sql
    if state is not None:
        assert state.startswith(REFUSED), (sql, state, texts)


def test_most_vectors_are_served_masked_not_refused(text_results, binary_results):
    served_text = [s for s, (_, state) in text_results.items() if state is None]
    served_binary = [s for s, (_, state) in binary_results.items() if state is None]
    assert len(served_text) >= 45, len(served_text)
    assert len(served_binary) >= 45, len(served_binary)
