"""Facts are a pure function of (SQL text, catalog): what was extracted before changes nothing.

The statements are the facts corpus (tests/corpus/*.yaml) and 2,500 statements of
PostgreSQL's own regression SQL (tests/fixtures/pg_regress/), against the corpus catalog.
The reference is every statement extracted alone, by a fresh extractor, in a fresh process;
the same statements are then extracted in shuffled orders in other fresh processes (one
extractor each, so its cache and any module state accumulate) and in this process
(backwards, then a shuffled sample again after ``clear()``). Every statement must give the
same facts, or the same error code and message, every time.
"""

from __future__ import annotations

import base64
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import postgast
import pytest
import yaml

from app.catalog import Catalog
from app.errors import GatewayError
from app.facts import FactsExtractor
from tests.integration.test_corpus import CORPUS, corpus_catalog  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REGRESS = REPO / "tests" / "fixtures" / "pg_regress" / "statements.sql"
SEEDS = (1, 2)


def _statements() -> list[str]:
    sql = [case["sql"] for path in sorted(CORPUS.glob("*.yaml"))
           for case in yaml.safe_load(path.read_text()) or []]
    return sql + [s.strip() for s in postgast.split(REGRESS.read_text())]


def _outcome(extractor: FactsExtractor, sql: str, catalog: Catalog) -> Any:
    """The facts, or the error's code and message: what a caller can observe."""
    try:
        return extractor.extract(sql, catalog).to_input()
    except GatewayError as exc:
        return {"error": exc.code, "message": exc.message}
    except Exception as exc:  # a crash is a 500 in production: report it, do not hide it
        return {"crash": f"{type(exc).__name__}: {exc}"}


def run(statements: list[str], catalog: Catalog, order: list[int] | None = None,
        extractor: FactsExtractor | None = None) -> list[Any]:
    """Outcomes by statement index. Without an order, each statement alone with an extractor
    of its own; with one, all of them on one extractor, in that order."""
    if order is None:
        return [_outcome(FactsExtractor(max_sql_bytes=1_000_000), sql, catalog) for sql in statements]
    shared = extractor or FactsExtractor(max_sql_bytes=1_000_000)
    outcomes: list[Any] = [None] * len(statements)
    for index in order:
        outcomes[index] = _outcome(shared, statements[index], catalog)
    return outcomes


def worker() -> None:
    """Child process: read (catalog, seed) from stdin, write the outcomes to stdout."""
    job = pickle.loads(base64.b64decode(sys.stdin.buffer.read()))  # our own parent's bytes
    statements = _statements()
    order: list[int] | None = None
    if job["seed"] is not None:
        order = list(range(len(statements)))
        random.Random(job["seed"]).shuffle(order)
    sys.stdout.write(json.dumps(run(statements, job["catalog"], order)))


def _in_fresh_process(catalog: Catalog, seed: int | None) -> list[Any]:
    job = base64.b64encode(pickle.dumps({"catalog": catalog, "seed": seed}))
    done = subprocess.run(
        [sys.executable, "-c", "from tests.integration.test_facts_order import worker; worker()"],
        input=job, capture_output=True, cwd=REPO, check=True, timeout=300,
    )
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _differences(statements: list[str], expected: list[Any], actual: list[Any],
                 indices: list[int] | None = None) -> list[str]:
    return [
        f"{statements[i][:120]!r}: {json.dumps(actual[i])[:300]} != {json.dumps(expected[i])[:300]}"
        for i in (indices if indices is not None else range(len(statements)))
        if actual[i] != expected[i]
    ]


def test_facts_do_not_depend_on_what_was_extracted_before(corpus_catalog):  # noqa: F811
    statements = _statements()
    assert len(statements) >= 2_000 + 150
    reference = _in_fresh_process(corpus_catalog, None)
    crashes = [f"{statements[i][:120]!r}: {o['crash']}" for i, o in enumerate(reference)
               if "crash" in o]
    assert not crashes, "\n".join(crashes[:20])

    for seed in SEEDS:
        shuffled = _in_fresh_process(corpus_catalog, seed)
        problems = _differences(statements, reference, shuffled)
        assert not problems, f"seed {seed}: {len(problems)} differ\n" + "\n".join(problems[:20])

    # And in this process, on one extractor: backwards, then (a sample, for time) shuffled
    # again after clear().
    extractor = FactsExtractor(max_sql_bytes=1_000_000)
    backwards = run(statements, corpus_catalog, list(reversed(range(len(statements)))), extractor)
    problems = _differences(statements, reference, backwards)
    assert not problems, f"reversed: {len(problems)} differ\n" + "\n".join(problems[:20])
    extractor.clear()
    sample = random.Random(4).sample(range(len(statements)), 600)
    again = run(statements, corpus_catalog, sample, extractor)
    problems = _differences(statements, reference, again, sample)
    assert not problems, f"after clear(): {len(problems)} differ\n" + "\n".join(problems[:20])
