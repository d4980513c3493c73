"""What exists: the tables, views and columns of the configured schemas, read from PostgreSQL.

The catalog is an immutable snapshot with a version number; the facts cache is keyed by
that version, so a refresh that changes anything makes every cached fact stale at once.
Only the configured schemas are visible. Relation names of ``pg_catalog`` are kept too,
because PostgreSQL searches ``pg_catalog`` before the configured schemas: an unqualified
name that exists there must not be resolved to a user table of the same name.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal

RelationKind = Literal["table", "view", "materialized_view", "partitioned_table", "foreign_table"]

_RELKINDS: dict[str, RelationKind] = {
    "r": "table",
    "v": "view",
    "m": "materialized_view",
    "p": "partitioned_table",
    "f": "foreign_table",
}

CATALOG_SQL = """
SELECT n.nspname AS schema, c.relname AS name, c.relkind::text AS relkind,
       a.attname AS column, coalesce(bt.typname, t.typname)::text AS type
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
-- A domain travels on the wire as its base type, which is what the cross-check compares.
LEFT JOIN pg_catalog.pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
WHERE n.nspname = ANY($1::text[]) AND c.relkind IN ('r', 'v', 'm', 'p', 'f')
ORDER BY n.nspname, c.relname, a.attnum
"""

SHADOW_SQL = """
SELECT c.relname FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pg_catalog'
"""


# Automatic classification by column name, so sensitive data is masked without anyone having
# to configure it. Matched against the lower-cased name split into words (a_b, aB → a b);
# the first rule that matches wins. Policy data can reclassify or mark a column "public".
_CLASS_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("secret.password", re.compile(r"\b(password|passwd|pwd|passphrase|pass_?hash)\b")),
    ("secret.token", re.compile(r"\b(token|secret|api_?key|private_?key|access_?key|otp|salt)\b")),
    ("pii.ssn", re.compile(r"\b(ssn|social_?security(_?number)?|national_?id|tax_?id|sin)\b")),
    ("pci.pan", re.compile(r"\b(card_?(number|no|num)?|pan|cc_?(number|num)?|credit_?card)\b")),
    ("pci.cvv", re.compile(r"\b(cvv|cvc|cvv2|card_?verification)\b")),
    ("pii.iban", re.compile(r"\b(iban|account_?number|bank_?account|routing_?number)\b")),
    ("pii.email", re.compile(r"\b(e_?mail|email_?address)\b")),
    ("pii.phone", re.compile(r"\b(phone|phone_?number|mobile|msisdn|telephone|tel|fax)\b")),
    ("pii.dob", re.compile(r"\b(dob|date_?of_?birth|birth_?date|birthday)\b")),
    ("pii.passport", re.compile(r"\b(passport|passport_?number|driver_?license|licence_?number)\b")),
)


def classify_column(name: str) -> str | None:
    """The class a column name clearly announces, or None."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()
    words = re.sub(r"[^a-z0-9]+", "_", words)
    spaced = words.replace("_", " ")
    for cls, pattern in _CLASS_RULES:
        # Try both forms: "card_number" matches card_?number, "phone number" matches \bphone\b.
        if pattern.search(words) or pattern.search(spaced):
            return cls
    return None


@dataclass(frozen=True, slots=True)
class Relation:
    """A table or view: its kind and its columns in attribute order, name → wire type name."""

    schema: str
    name: str
    kind: RelationKind
    columns: dict[str, str]

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class Catalog:
    """An immutable snapshot of the visible relations, nested by schema."""

    schemas: tuple[str, ...]
    relations: dict[str, dict[str, Relation]]
    shadowed: frozenset[str] = frozenset()
    version: int = 0
    digest: str = field(default="")
    # "schema.table.column" → class, for columns whose names announce what they hold.
    classes: dict[str, str] = field(default_factory=dict)

    def resolve(self, name: str, schema: str | None) -> Relation | None:
        """Resolve a table name as PostgreSQL would with our fixed search_path."""
        if schema is not None:
            return self.relations.get(schema, {}).get(name)
        if name in self.shadowed:
            # pg_catalog comes first in the search path: this name is a system relation.
            return None
        for candidate in self.schemas:
            relation = self.relations.get(candidate, {}).get(name)
            if relation is not None:
                return relation
        return None

    def columns(self) -> list[str]:
        """Every visible column as ``schema.table.column`` (what a masking profile covers)."""
        return [
            f"{schema}.{name}.{column}"
            for schema, tables in self.relations.items()
            for name, relation in tables.items()
            for column in relation.columns
        ]

    def sqlglot_schema(self) -> dict[str, dict[str, dict[str, str]]]:
        """The nested mapping sqlglot's qualifier wants: schema → table → column → type."""
        return {
            schema: {name: dict(rel.columns) for name, rel in tables.items()}
            for schema, tables in self.relations.items()
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "digest": self.digest,
            "schemas": {
                schema: {
                    name: {"kind": rel.kind, "columns": rel.columns}
                    for name, rel in tables.items()
                }
                for schema, tables in self.relations.items()
            },
        }


def build_catalog(
    schemas: tuple[str, ...],
    rows: list[tuple[str, str, str, str, str]],
    shadowed: frozenset[str],
    version: int,
) -> Catalog:
    """Assemble a snapshot from introspection rows (schema, name, relkind, column, type)."""
    relations: dict[str, dict[str, Relation]] = {schema: {} for schema in schemas}
    for schema, name, relkind, column, typ in rows:
        tables = relations.setdefault(schema, {})
        relation = tables.get(name)
        if relation is None:
            relation = Relation(schema, name, _RELKINDS[relkind], {})
            tables[name] = relation
        relation.columns[column] = typ
    digest = hashlib.sha256(
        repr(sorted((r[0], r[1], r[3], r[4]) for r in rows)).encode()
    ).hexdigest()[:16]
    classes = {}
    for schema, tables in relations.items():
        for name, relation in tables.items():
            for column in relation.columns:
                cls = classify_column(column)
                if cls is not None:
                    classes[f"{schema}.{name}.{column}"] = cls
    return Catalog(schemas, relations, shadowed, version, digest, classes)


async def introspect(conn: Any, schemas: tuple[str, ...], previous: Catalog | None) -> Catalog:
    """Read the catalog; the version only moves when something changed."""
    rows = [tuple(r) for r in await conn.fetch(CATALOG_SQL, list(schemas))]
    shadowed = frozenset(r[0] for r in await conn.fetch(SHADOW_SQL))
    fresh = build_catalog(schemas, rows, shadowed, (previous.version + 1) if previous else 1)  # type: ignore[arg-type]
    if previous is not None and previous.digest == fresh.digest:
        return previous
    return fresh
