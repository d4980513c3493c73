"""Catalog introspection: a query that reads only PostgreSQL's system catalogs.

psql's ``\\d``, JDBC's ``DatabaseMetaData``, SQLAlchemy's reflection, DBeaver's navigator
and asyncpg's and JDBC's type lookups read ``pg_catalog`` and ``information_schema``. Their
facts are not the resolver's (sqlglot knows the configured schemas' tables only, and these
queries use operators and casts of their own): they come from PostgreSQL's parse tree
itself, which names every relation a statement reads (``RangeVar``) and every function it
calls. A statement is introspection when every relation it reads is a system relation;
mixed with a user table, it is not, and goes the ordinary way (where the system relation
is unknown, and refused).

What may be read is policy's (``catalog.relations`` in data.json, the ``query.introspection``
fact, docs/pgwire.md); what never may, whatever policy says, is here: the catalogs that
hold values (``pg_statistic``, ``pg_stats``: most common values of every column),
credentials (``pg_authid``, ``pg_shadow``, ``pg_user_mapping``), other sessions' queries
(``pg_stat_activity``) and settings. Functions are checked as in any query
(``facts.check_function``), then by policy's allow-list.

An unqualified name is a ``pg_catalog`` relation when it starts with ``pg_``: ``pg_catalog``
comes first on every search path the gateway sets, so a name it holds resolves there. A
``pg_`` name that is not a system relation is not on policy's list either, and refused.
"""

from __future__ import annotations

import re
from typing import Any

from app import grammar
from app.errors import Forbidden

SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})

# Never readable through the gateway.
NEVER = re.compile(
    r"^pg_catalog\.(pg_statistic|pg_statistic_ext_data|pg_stats.*|pg_authid|pg_shadow|pg_user_mappings?|"
    r"pg_largeobject.*|pg_stat_.*|pg_statio_.*|pg_settings|pg_file_settings|"
    r"pg_hba_file_rules|pg_ident_file_mappings|pg_db_role_setting|pg_subscription.*|"
    r"pg_replication.*|pg_prepared_xacts|pg_locks|pg_backend_memory_contexts|"
    r"pg_shmem_allocations|pg_config|pg_roles_with_passwords)$"
    r"|^information_schema\.(user_mappings?|user_mapping_options)$"
)


# The catalog's decompilers, which the gateway refuses in any other query (``pg_get_…``):
# they turn a catalog's expression trees and definitions back into SQL text, the metadata
# psql's \d shows; a definition is no value.
DECOMPILERS = re.compile(
    r"^pg_get_(expr|constraintdef|indexdef|viewdef|triggerdef|ruledef|partkeydef|"
    r"partition_constraintdef|statisticsobjdef_columns|function_arguments|"
    r"function_identity_arguments|function_result|userbyid|keywords|serial_sequence)$"
)


def relations(tree: dict[str, Any]) -> tuple[str, ...] | None:
    """The system relations a SELECT reads, or None unless it reads only such relations."""
    ((name, body),) = tree["stmts"][0]["stmt"].items()
    if name != "SelectStmt" or body.get("withClause") or "intoClause" in body:
        return None
    found: set[str] = set()
    for node in grammar.walk(body):
        if "withClause" in node.get("SelectStmt", {}):
            return None  # a CTE's name could shadow a catalog's
        var = node.get("RangeVar")
        if var is None:
            continue
        schema, relname = var.get("schemaname"), str(var.get("relname", ""))
        if schema is None:
            if not relname.startswith("pg_"):
                return None
            schema = "pg_catalog"
        if schema not in SYSTEM_SCHEMAS or var.get("catalogname"):
            return None
        found.add(f"{schema}.{relname}")
    if not found:
        return None
    never = sorted(r for r in found if NEVER.match(r))
    if never:
        raise Forbidden(
            "catalog_relation_denied",
            "these system catalogs hold values, credentials or other sessions' activity and "
            "are never read through the gateway: " + ", ".join(never),
            tables=never,
        )
    return tuple(sorted(found))


def functions(tree: dict[str, Any]) -> tuple[str, ...]:
    """The functions a statement calls, by their last name (``pg_catalog.`` is implied)."""
    names = set()
    for node in grammar.walk(tree):
        call = node.get("FuncCall")
        if call is None:
            continue
        parts = [p.get("String", {}).get("sval", "") for p in call.get("funcname", ())]
        schema = parts[-2] if len(parts) > 1 else None
        name = parts[-1].lower()
        names.add(name if schema in (None, "pg_catalog") else f"{schema}.{name}")
    return tuple(sorted(names))


def parameters(tree: dict[str, Any]) -> int:
    return max((int(n["ParamRef"].get("number", 0)) for n in grammar.walk(tree)
                if "ParamRef" in n), default=0)
