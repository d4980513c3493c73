"""What exists: the tables, views and columns of the configured schemas, read from PostgreSQL.

The catalog is an immutable snapshot with a version number; the facts cache is keyed by
that version, so a refresh that changes anything makes every cached fact stale at once.
Only the configured schemas are visible. Relation names of ``pg_catalog`` are kept too,
because PostgreSQL searches ``pg_catalog`` before the configured schemas: an unqualified
name that exists there must not be resolved to a user table of the same name.
"""

from __future__ import annotations

import hashlib
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
    return Catalog(schemas, relations, shadowed, version, digest)


async def introspect(conn: Any, schemas: tuple[str, ...], previous: Catalog | None) -> Catalog:
    """Read the catalog; the version only moves when something changed."""
    rows = [tuple(r) for r in await conn.fetch(CATALOG_SQL, list(schemas))]
    shadowed = frozenset(r[0] for r in await conn.fetch(SHADOW_SQL))
    fresh = build_catalog(schemas, rows, shadowed, (previous.version + 1) if previous else 1)  # type: ignore[arg-type]
    if previous is not None and previous.digest == fresh.digest:
        return previous
    return fresh
