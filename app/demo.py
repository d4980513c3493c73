"""Demo data for ``make run`` and the integration tests: customers and their orders.

Deterministic (seeded) so tests can compare against known rows; a few thousand rows so
queries look realistic without slowing start-up.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

DEMO_IDENTITIES: dict[str, list[str]] = {
    "alice": ["analysts"],
    "sam": ["support"],
    "dana": ["dba"],
    "sec": ["security", "audit_readers"],
    "pat": ["pii_readers"],
}

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS customers (
    id          integer PRIMARY KEY,
    full_name   text NOT NULL,
    email       text NOT NULL,
    ssn         text NOT NULL,
    card_number text NOT NULL,
    country     text NOT NULL,
    created_at  timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id           integer PRIMARY KEY,
    customer_id  integer NOT NULL REFERENCES customers(id),
    amount_cents bigint NOT NULL CHECK (amount_cents >= 0),
    status       text NOT NULL,
    created_at   timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_customer_id ON orders (customer_id);
"""

_FIRST = ["Ada", "Grace", "Linus", "Barbara", "Ken", "Margaret", "Dennis", "Radia", "Alan",
          "Frances", "Edsger", "Hedy", "John", "Katherine", "Tim", "Sophie", "Omar", "Mei",
          "Priya", "Lars", "Amara", "Diego", "Yuki", "Fatima"]
_LAST = ["Lovelace", "Hopper", "Torvalds", "Liskov", "Thompson", "Hamilton", "Ritchie",
         "Perlman", "Turing", "Allen", "Dijkstra", "Lamarr", "McCarthy", "Johnson", "Berners",
         "Wilson", "Haddad", "Chen", "Patel", "Nilsen", "Okafor", "Garcia", "Sato", "Rahman"]
_COUNTRIES = ["DE", "FR", "GB", "US", "NL", "SE", "ES", "IT", "JP", "IN", "BR", "NG"]
_DOMAINS = ["example.com", "mail.example.org", "corp.example.net"]
_STATUSES = ["pending", "paid", "shipped", "delivered", "refunded"]


def _luhn_complete(digits: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 0:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return digits + str((10 - total % 10) % 10)


def demo_rows(
    customers: int = 2000, orders: int = 6000, seed: int = 7
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Deterministic customers and orders."""
    rng = random.Random(seed)
    base = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    customer_rows = []
    for cid in range(1, customers + 1):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        email = f"{first}.{last}{cid}@{rng.choice(_DOMAINS)}".lower()
        ssn = f"{rng.randint(100, 899):03d}-{rng.randint(10, 99):02d}-{rng.randint(1000, 9999):04d}"
        card = _luhn_complete("4" + "".join(str(rng.randint(0, 9)) for _ in range(14)))
        created = base + dt.timedelta(minutes=rng.randint(0, 60 * 24 * 600))
        customer_rows.append(
            (cid, f"{first} {last}", email, ssn, card, rng.choice(_COUNTRIES), created)
        )
    order_rows = []
    for oid in range(1, orders + 1):
        cid = rng.randint(1, customers)
        created = base + dt.timedelta(minutes=rng.randint(0, 60 * 24 * 650))
        order_rows.append(
            (oid, cid, rng.randint(199, 250_000), rng.choice(_STATUSES), created)
        )
    return customer_rows, order_rows


async def load_demo(conn: Any) -> bool:
    """Create and fill the demo tables unless they already hold data; True when loaded."""
    await conn.execute(SCHEMA_SQL)
    if await conn.fetchval("SELECT count(*) FROM customers") > 0:
        return False
    customer_rows, order_rows = demo_rows()
    await conn.copy_records_to_table(
        "customers",
        records=customer_rows,
        columns=["id", "full_name", "email", "ssn", "card_number", "country", "created_at"],
    )
    await conn.copy_records_to_table(
        "orders",
        records=order_rows,
        columns=["id", "customer_id", "amount_cents", "status", "created_at"],
    )
    await conn.execute("ANALYZE customers; ANALYZE orders")
    return True
