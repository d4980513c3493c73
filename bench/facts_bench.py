"""Facts extraction time, cold and cached, for a simple query, a join+CTE and a 200-line query.

Cold = a fresh extractor per call (parse, qualify, lineage); cached = the LRU hit the hot
path takes for a repeated statement. Uses the demo catalog (no database needed).

    .venv/bin/python bench/facts_bench.py
"""

from __future__ import annotations

import statistics
import time

from app.catalog import build_catalog
from app.facts import FactsExtractor

COLUMNS = {
    "customers": [("id", "int4"), ("full_name", "text"), ("email", "text"), ("ssn", "text"),
                  ("card_number", "text"), ("country", "text"), ("created_at", "timestamptz")],
    "orders": [("id", "int4"), ("customer_id", "int4"), ("amount_cents", "int8"),
               ("status", "text"), ("created_at", "timestamptz")],
}
CATALOG = build_catalog(
    ("public",),
    [("public", t, "r", c, ty) for t, cols in COLUMNS.items() for c, ty in cols],
    frozenset(),
    1,
)

SIMPLE = "SELECT id, email FROM customers WHERE id = $1"
JOIN_CTE = """
WITH recent AS (
    SELECT customer_id, sum(amount_cents) AS total, count(*) AS n
    FROM orders WHERE created_at > now() - interval '30 days' GROUP BY customer_id
)
SELECT c.id, c.full_name, lower(c.email) AS email, r.total, r.n
FROM customers c JOIN recent r ON r.customer_id = c.id
WHERE c.country = $1 ORDER BY r.total DESC LIMIT 50
"""


def long_query(lines: int = 200) -> str:
    """A 200-line report: many projections, a CTE chain, a UNION and nested filters."""
    parts = ["WITH"]
    for i in range(8):
        source = "orders" if i == 0 else f"step{i - 1}"
        cols = "customer_id, amount_cents, status"
        parts.append(f"step{i} AS (")
        parts.append(f"    SELECT {cols}")
        parts.append(f"    FROM {source}")
        parts.append(f"    WHERE amount_cents > {i * 10}")
        parts.append(f"      AND status <> 'void{i}'")
        parts.append("),")
    parts[-1] = ")"
    parts.append("SELECT")
    projections = []
    while len(parts) + len(projections) < lines - 12:
        n = len(projections)
        projections.append(
            f"    coalesce(sum(CASE WHEN s.status = 's{n}' THEN s.amount_cents END), 0) AS m{n}"
        )
    parts.append(",\n".join(projections))
    parts += [
        "FROM step7 s",
        "JOIN customers c ON c.id = s.customer_id",
        "WHERE c.country IN ('DE', 'FR', 'GB')",
        "  AND c.id IN (SELECT customer_id FROM orders WHERE amount_cents > 1000)",
        "GROUP BY c.country",
        "UNION ALL",
        "SELECT " + ", ".join(f"{n}" for n in range(len(projections))),
        "FROM customers WHERE false",
    ]
    return "\n".join(parts)


def measure(sql: str, rounds: int) -> tuple[float, float]:
    """Median microseconds (cold, cached)."""
    cold = []
    extractor = FactsExtractor(max_sql_bytes=1_000_000)
    extractor.extract(sql, CATALOG)  # warm the per-catalog schema, as a running gateway has
    for _ in range(rounds):
        extractor.clear()
        start = time.perf_counter()
        extractor.extract(sql, CATALOG)
        cold.append(time.perf_counter() - start)
    extractor.extract(sql, CATALOG)
    cached = []
    for _ in range(rounds * 20):
        start = time.perf_counter()
        extractor.extract(sql, CATALOG)
        cached.append(time.perf_counter() - start)
    return statistics.median(cold) * 1e6, statistics.median(cached) * 1e6


def main() -> None:
    long = long_query()
    print(f"{'query':<14}{'lines':>6}{'cold µs (p50)':>16}{'cached µs (p50)':>18}")
    for name, sql, rounds in (("simple", SIMPLE, 200), ("join+cte", JOIN_CTE, 100),
                              ("200-line", long, 20)):
        cold, cached = measure(sql, rounds)
        print(f"{name:<14}{sql.strip().count(chr(10)) + 1:>6}{cold:>16.1f}{cached:>18.2f}")


if __name__ == "__main__":
    main()
