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
from collections.abc import Sequence
from typing import Any

from app import grammar
from app.errors import Forbidden

SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})

# Parameters a client may SET (and give in its startup packet, docs/pgwire.md), by their
# lower-case name. Nothing that changes what a statement reads (search_path, role,
# session_authorization) or how the gateway's checks read it (standard_conforming_strings),
# nor a limit it sets for itself above the gateway's (statement_timeout is checked).
SETTABLE: frozenset[str] = frozenset({
    "application_name", "client_encoding", "datestyle", "timezone", "intervalstyle",
    "extra_float_digits", "bytea_output", "statement_timeout", "lock_timeout",
    "client_min_messages", "lc_monetary", "lc_numeric", "lc_time", "jit",
    "default_transaction_isolation", "idle_in_transaction_session_timeout",
})
# What SHOW, and ``current_setting`` in a catalog query, may read besides those: facts about
# the server and the session's own settings, never about other sessions, files or the
# gateway's context.
READABLE_SETTINGS: frozenset[str] = SETTABLE | frozenset({
    "server_version", "server_version_num", "server_encoding", "integer_datetimes",
    "max_identifier_length", "standard_conforming_strings", "transaction_isolation",
    "transaction_read_only", "default_transaction_read_only", "lc_collate", "lc_ctype",
    "is_superuser", "search_path", "max_connections", "block_size", "in_hot_standby",
    "default_table_access_method",
})
# The one settings reader a catalog query may call (SQLAlchemy's reflection compares a
# table's access method with ``current_setting('default_table_access_method')``).
SETTING_READER = "current_setting"

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
    r"function_identity_arguments|function_result|function_sqlbody|userbyid|keywords|"
    r"serial_sequence)$|^pg_describe_object$"
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
        # No relation at all: a catalog query only when it calls a guarded function (psql's
        # \d+ asks for a view's definition so: SELECT pg_get_viewdef('16749'::oid, true)),
        # which then answers for what the caller's views keep, as in any catalog query.
        return () if GUARDED_FUNCTIONS.intersection(functions(tree)) else None
    never = sorted(r for r in found if NEVER.match(r) or (
        r.startswith("pg_catalog.") and r.split(".", 1)[1] not in CATALOG_VIEWS) or (
        r.startswith("information_schema.") and r.split(".", 1)[1] not in INFORMATION_VIEWS))
    if never:
        raise Forbidden(
            "catalog_relation_denied",
            "these system catalogs hold values, credentials or other sessions' activity, or "
            "have no view of what the caller may see, and are never read through the "
            "gateway: " + ", ".join(never),
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


def setting_reads(tree: dict[str, Any]) -> tuple[int, ...]:
    """Check every ``current_setting`` call: its name a readable setting (a literal in
    ``READABLE_SETTINGS``) or a parameter, whose number is returned for the value bound to
    it to be checked the same way (``check_setting_parameters``). Anything else, a name
    computed by an expression or a second ``missing_ok`` argument included, is refused:
    the gateway must know which setting is read before it runs."""
    numbers: set[int] = set()
    for node in grammar.walk(tree):
        call = node.get("FuncCall")
        if call is None:
            continue
        parts = [p.get("String", {}).get("sval", "") for p in call.get("funcname", ())]
        if parts[-1].lower() != SETTING_READER or parts[:-1] not in ([], ["pg_catalog"]):
            continue
        args = call.get("args", ())
        arg = args[0] if len(args) == 1 else {}
        # ``$1::varchar`` (SQLAlchemy binds it so): a cast to a string type keeps the name
        # (without a length, which would cut it to another one).
        cast = arg.get("TypeCast")
        if (cast is not None and _type_name(cast) in _STRING_TYPES
                and not cast.get("typeName", {}).get("typmods")):
            arg = cast.get("arg", {})
        name = arg.get("A_Const", {}).get("sval", {}).get("sval")
        if isinstance(name, str) and name.lower() in READABLE_SETTINGS:
            continue
        number = arg.get("ParamRef", {}).get("number")
        if number is None:
            raise _setting_refused()
        numbers.add(int(number))
    return tuple(sorted(numbers))


_STRING_TYPES = frozenset({"text", "varchar", "name"})


def _type_name(cast: dict[str, Any]) -> str:
    names = [n.get("String", {}).get("sval", "")
             for n in cast.get("typeName", {}).get("names", ())]
    if (len(names) == 2 and names[0] == "pg_catalog") or len(names) == 1:
        return str(names[-1]).lower()
    return ""


def check_setting_parameters(numbers: tuple[int, ...], params: Sequence[Any]) -> None:
    """Refuse unless each parameter ``current_setting`` reads names a readable setting.

    A NULL reads nothing. A binary parameter is recorded as ``\\x`` and its bytes' hex (text's binary form is
    its UTF-8 bytes); a text one that merely looks so is not a setting name either way.
    """
    for number in numbers:
        if not 0 < number <= len(params):
            raise _setting_refused()
        value = params[number - 1]
        if value is None:
            continue  # current_setting(NULL) is NULL (and a Describe binds no values)
        if isinstance(value, str) and value.startswith("\\x"):
            try:
                value = bytes.fromhex(value[2:]).decode()
            except ValueError:
                pass
        if not isinstance(value, str) or value.lower() not in READABLE_SETTINGS:
            raise _setting_refused()


def _setting_refused() -> Forbidden:
    return Forbidden(
        "function_denied",
        "current_setting reads only the settings SHOW may read (docs/pgwire.md), named by "
        "a literal or a parameter",
        function=SETTING_READER,
    )


def parameters(tree: dict[str, Any]) -> int:
    return max((int(n["ParamRef"].get("number", 0)) for n in grammar.walk(tree)
                if "ParamRef" in n), default=0)


# --- what the caller may see of the catalogs ---------------------------------------------
# PostgreSQL lets every role read every row of pg_class, pg_attribute, pg_proc…: the names,
# columns, definitions and comments of every table, whatever its privileges. A catalog query
# through the gateway reads views of them instead, in ``querygate_catalog``, that keep the
# rows of the system schemas and of what the session's role (the caller's masking profile)
# holds a privilege on: PostgreSQL filters, the gateway only points the names there
# (``grammar.rewrite_catalog``). The views are security barriers, so no condition of the
# caller's runs on a row they drop. information_schema filters by privilege itself.

CATALOG_SCHEMA = "querygate_catalog"
# information_schema's views as the caller may see them: PostgreSQL filters them by
# privilege, but lists a routine anyone may execute (the default) in a schema the role may
# not use, and the gateway's own schemas; these keep the rows of the schemas it may use.
INFORMATION_SCHEMA = "querygate_information_schema"

# A relation of the catalogs is visible when it is the system's, or in a schema the role may
# use and the role may use it too (an index: its table; a sequence: USAGE, SELECT or
# UPDATE). SQL-standard bodies: bound when created, never by the caller's search_path.
_RELATION_VISIBLE = f"""
CREATE OR REPLACE FUNCTION {CATALOG_SCHEMA}.namespace_visible(nsp oid) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
RETURN EXISTS (
    SELECT 1 FROM pg_catalog.pg_namespace n
    WHERE n.oid = nsp AND (
        n.nspname IN ('pg_catalog', 'information_schema')
        OR (n.nspname NOT LIKE 'querygate\\_%' AND pg_catalog.has_schema_privilege(n.oid, 'USAGE'))
    ));
CREATE OR REPLACE FUNCTION {CATALOG_SCHEMA}.relation_visible(rel oid) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
RETURN EXISTS (
    SELECT 1 FROM pg_catalog.pg_class c
    WHERE c.oid = rel AND (
        c.relnamespace IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
        OR {CATALOG_SCHEMA}.namespace_visible(c.relnamespace) AND (
           (c.relkind IN ('r', 'v', 'm', 'p', 'f') AND pg_catalog.has_table_privilege(
            c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER'))
        OR (c.relkind = 'S' AND pg_catalog.has_sequence_privilege(c.oid, 'USAGE, SELECT, UPDATE'))
        OR (c.relkind IN ('i', 'I') AND EXISTS (
            SELECT 1 FROM pg_catalog.pg_index i WHERE i.indexrelid = c.oid
              AND pg_catalog.has_table_privilege(
                  i.indrelid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER'))))
    ));
CREATE OR REPLACE FUNCTION {CATALOG_SCHEMA}.named_visible(nsp name, rel name) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
RETURN EXISTS (
    SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = nsp AND c.relname = rel AND {CATALOG_SCHEMA}.relation_visible(c.oid));
CREATE OR REPLACE FUNCTION {CATALOG_SCHEMA}.schema_visible(nsp name) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
RETURN EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n
               WHERE n.nspname = nsp AND {CATALOG_SCHEMA}.namespace_visible(n.oid));
-- A type: in a visible schema, not the row type of a hidden relation, nor an array of one
-- (a table's array type "_name" has typrelid 0, its element the row type).
CREATE OR REPLACE FUNCTION {CATALOG_SCHEMA}.type_visible(typ oid) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
RETURN EXISTS (
    SELECT 1 FROM pg_catalog.pg_type t
    WHERE t.oid = typ AND {CATALOG_SCHEMA}.namespace_visible(t.typnamespace)
      AND (t.typrelid = 0 OR {CATALOG_SCHEMA}.relation_visible(t.typrelid))
      AND NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_type e WHERE e.oid = t.typelem AND e.typrelid <> 0
          AND NOT {CATALOG_SCHEMA}.relation_visible(e.typrelid)));
CREATE OR REPLACE FUNCTION {CATALOG_SCHEMA}.constraint_visible(con oid) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
RETURN EXISTS (
    SELECT 1 FROM pg_catalog.pg_constraint c
    WHERE c.oid = con AND ((c.conrelid = 0 AND {CATALOG_SCHEMA}.namespace_visible(c.connamespace))
                           OR {CATALOG_SCHEMA}.relation_visible(c.conrelid)));
-- A function: the system's, or in a schema the role may use and one it may execute (its
-- source, prosrc, can hold values).
CREATE OR REPLACE FUNCTION {CATALOG_SCHEMA}.proc_visible(fn oid) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
RETURN EXISTS (
    SELECT 1 FROM pg_catalog.pg_proc p
    WHERE p.oid = fn AND (
        p.pronamespace IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
        OR ({CATALOG_SCHEMA}.namespace_visible(p.pronamespace)
            AND pg_catalog.has_function_privilege(p.oid, 'EXECUTE'))));
-- An object of a catalog (its comment, its definition) is visible with what it is on; one of
-- a kind not listed here only if it is the system's (FirstNormalObjectId is 16384).
CREATE OR REPLACE FUNCTION {CATALOG_SCHEMA}.object_visible(cls oid, obj oid) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
RETURN CASE cls
    WHEN 'pg_catalog.pg_class'::regclass THEN {CATALOG_SCHEMA}.relation_visible(obj)
    WHEN 'pg_catalog.pg_namespace'::regclass THEN {CATALOG_SCHEMA}.namespace_visible(obj)
    WHEN 'pg_catalog.pg_constraint'::regclass THEN {CATALOG_SCHEMA}.constraint_visible(obj)
    WHEN 'pg_catalog.pg_proc'::regclass THEN {CATALOG_SCHEMA}.proc_visible(obj)
    WHEN 'pg_catalog.pg_type'::regclass THEN {CATALOG_SCHEMA}.type_visible(obj)
    WHEN 'pg_catalog.pg_trigger'::regclass THEN EXISTS (SELECT 1 FROM pg_catalog.pg_trigger x
        WHERE x.oid = obj AND {CATALOG_SCHEMA}.relation_visible(x.tgrelid))
    WHEN 'pg_catalog.pg_rewrite'::regclass THEN EXISTS (SELECT 1 FROM pg_catalog.pg_rewrite x
        WHERE x.oid = obj AND {CATALOG_SCHEMA}.relation_visible(x.ev_class))
    WHEN 'pg_catalog.pg_policy'::regclass THEN EXISTS (SELECT 1 FROM pg_catalog.pg_policy x
        WHERE x.oid = obj AND {CATALOG_SCHEMA}.relation_visible(x.polrelid))
    WHEN 'pg_catalog.pg_statistic_ext'::regclass THEN EXISTS (
        SELECT 1 FROM pg_catalog.pg_statistic_ext x
        WHERE x.oid = obj AND {CATALOG_SCHEMA}.relation_visible(x.stxrelid))
    ELSE obj < 16384
END;
-- A role's name: the session's role and those it is a member of, and the owners of what
-- it sees (psql shows a table's, a schema's, a function's owner).
CREATE OR REPLACE FUNCTION {CATALOG_SCHEMA}.role_visible(r oid) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
RETURN EXISTS (SELECT 1 FROM pg_catalog.pg_roles o WHERE o.oid = r) AND (
    pg_catalog.pg_has_role(r, 'MEMBER') OR r = 10
    OR EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.relowner = r
               AND {CATALOG_SCHEMA}.relation_visible(c.oid))
    OR EXISTS (SELECT 1 FROM pg_catalog.pg_namespace n WHERE n.nspowner = r
               AND {CATALOG_SCHEMA}.namespace_visible(n.oid))
    OR EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.proowner = r
               AND {CATALOG_SCHEMA}.namespace_visible(p.pronamespace)));
"""

_V = f"{CATALOG_SCHEMA}.relation_visible"
_N = f"{CATALOG_SCHEMA}.namespace_visible"
_CLASS = "'pg_catalog.pg_class'::regclass"

# Every pg_catalog relation a catalog query may name, with the condition that keeps a row
# (None: every row; what it holds is not about the caller's objects). Policy's list
# (``catalog.relations``) can only narrow this one: a relation not here has no view, and a
# query naming it is refused (``catalog_relation_denied``).
_P = f"{CATALOG_SCHEMA}.proc_visible"
_T = f"{CATALOG_SCHEMA}.type_visible"
CATALOG_VIEWS: dict[str, str | None] = {
    "pg_am": None, "pg_extension": None, "pg_language": None, "pg_publication": None,
    "pg_tablespace": None,
    # Objects in schemas, and those made of them: kept with their schema, function or type.
    "pg_aggregate": f"{_P}(aggfnoid)",
    "pg_cast": f"(castfunc = 0 OR {_P}(castfunc)) AND {_T}(castsource) AND {_T}(casttarget)",
    "pg_collation": f"{_N}(collnamespace)",
    "pg_event_trigger": f"{_P}(evtfoid)",
    "pg_opclass": f"{_N}(opcnamespace)",
    "pg_operator": f"{_N}(oprnamespace) AND (oprcode = 0 OR {_P}(oprcode))",
    "pg_range": f"{_T}(rngtypid)",
    "pg_class": f"{_V}(oid)",
    "pg_namespace": f"{_N}(oid)",
    "pg_attribute": f"{_V}(attrelid)",
    "pg_attrdef": f"{_V}(adrelid)",
    "pg_constraint": f"(conrelid = 0 AND {_N}(connamespace)) OR {_V}(conrelid)",
    "pg_index": f"{_V}(indrelid)",
    "pg_inherits": f"{_V}(inhrelid) AND {_V}(inhparent)",
    "pg_trigger": f"{_V}(tgrelid)",
    "pg_rewrite": f"{_V}(ev_class)",
    "pg_policy": f"{_V}(polrelid)",
    "pg_statistic_ext": f"{_V}(stxrelid)",
    "pg_sequence": f"{_V}(seqrelid)",
    "pg_partitioned_table": f"{_V}(partrelid)",
    "pg_foreign_table": f"{_V}(ftrelid)",
    "pg_publication_rel": f"{_V}(prrelid)",
    "pg_publication_namespace": f"{_N}(pnnspid)",
    "pg_depend": f"(classid <> {_CLASS} OR {_V}(objid)) "
                 f"AND (refclassid <> {_CLASS} OR {_V}(refobjid))",
    "pg_description": f"{CATALOG_SCHEMA}.object_visible(classoid, objoid)",
    "pg_proc": f"{_P}(oid)",
    "pg_type": f"{CATALOG_SCHEMA}.type_visible(oid)",
    "pg_enum": f"EXISTS (SELECT 1 FROM pg_catalog.pg_type t WHERE t.oid = enumtypid "
               f"AND {_N}(t.typnamespace))",
    "pg_roles": "pg_catalog.pg_has_role(oid, 'MEMBER')",
    "pg_user": "pg_catalog.pg_has_role(usesysid, 'MEMBER')",
    "pg_database": "datname = pg_catalog.current_database()",
    "pg_tables": f"{CATALOG_SCHEMA}.named_visible(schemaname, tablename)",
    "pg_views": f"{CATALOG_SCHEMA}.named_visible(schemaname, viewname)",
    "pg_matviews": f"{CATALOG_SCHEMA}.named_visible(schemaname, matviewname)",
    "pg_indexes": f"{CATALOG_SCHEMA}.named_visible(schemaname, indexname)",
    "pg_policies": f"{CATALOG_SCHEMA}.named_visible(schemaname, tablename)",
    # PostgreSQL lists every sequence here (last_value only with a privilege on it).
    "pg_sequences": f"{CATALOG_SCHEMA}.named_visible(schemaname, sequencename)",
}


# The columns of each catalog relation, as this server has them: a view cannot hold a
# pseudo-type column (pg_attribute.attmissingval is anyarray: a value, which it drops).
CATALOG_COLUMNS_SQL = """
SELECT c.relname, array_agg(a.attname::text ORDER BY a.attnum) AS columns
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
WHERE c.relnamespace = 'pg_catalog'::regnamespace AND c.relname = ANY($1::text[])
  AND a.attnum > 0 AND NOT a.attisdropped AND t.typtype <> 'p'
GROUP BY c.relname
"""


# Every information_schema view a catalog query may name, with its columns naming a schema
# (each must be NULL or one the role may use). Policy's list can only narrow this one.
INFORMATION_VIEWS: dict[str, tuple[str, ...]] = {
    "character_sets": (),
    "check_constraints": ("constraint_schema",),
    "columns": ("table_schema",),
    "constraint_column_usage": ("table_schema", "constraint_schema"),
    "domains": ("domain_schema",),
    "element_types": ("object_schema",),
    "key_column_usage": ("table_schema", "constraint_schema"),
    "parameters": ("specific_schema",),
    "referential_constraints": ("constraint_schema", "unique_constraint_schema"),
    "routines": ("specific_schema", "routine_schema"),
    "schemata": ("schema_name",),
    "sequences": ("sequence_schema",),
    "table_constraints": ("constraint_schema", "table_schema"),
    "tables": ("table_schema",),
    "views": ("table_schema",),
}


def _information_views_sql() -> str:
    parts = [f"CREATE SCHEMA {INFORMATION_SCHEMA};"]
    for name, columns in sorted(INFORMATION_VIEWS.items()):
        keep = " AND ".join(
            f"({c} IS NULL OR {CATALOG_SCHEMA}.schema_visible({c}::name))" for c in columns
        )
        parts.append(
            f"CREATE VIEW {INFORMATION_SCHEMA}.{name} WITH (security_barrier) AS "
            f"SELECT * FROM information_schema.{name}" + (f" WHERE {keep};" if keep else ";")
        )
    parts.append(f"GRANT USAGE ON SCHEMA {INFORMATION_SCHEMA} TO PUBLIC;")
    parts.append(f"GRANT SELECT ON ALL TABLES IN SCHEMA {INFORMATION_SCHEMA} TO PUBLIC;")
    return "\n".join(parts)


# The functions of ``functions.catalog`` that, given any object's id (or name), read the
# catalogs unfiltered: a view's, a constraint's or an index's definition (and the literals in
# it), a comment, a type's or a role's name. Every id can be tried (``generate_series``), so
# a catalog query calls these instead (``grammar.rewrite_catalog`` points the names there):
# each answers only for what the views above keep, else NULL (``format_type``: ``???``, as
# for an unknown type; ``pg_get_userbyid``: ``unknown (OID=…)``, as PostgreSQL answers).
# (name, parameters, result, condition; NULL when false).
_O = f"{CATALOG_SCHEMA}.object_visible"
_ROLE = f"{CATALOG_SCHEMA}.role_visible"
_TEXT_REL = f"{_V}(pg_catalog.to_regclass(v))"
CATALOG_FUNCTIONS: tuple[tuple[str, str, str, str], ...] = (
    ("format_type", "typ oid, typmod integer", "text",
     f"typ IS NULL OR {CATALOG_SCHEMA}.type_visible(typ)"),
    ("pg_get_constraintdef", "v oid", "text", f"{CATALOG_SCHEMA}.constraint_visible(v)"),
    ("pg_get_constraintdef", "v oid, pretty boolean", "text",
     f"{CATALOG_SCHEMA}.constraint_visible(v)"),
    ("pg_get_expr", "expr pg_node_tree, rel oid", "text", f"rel = 0 OR {_V}(rel)"),
    ("pg_get_expr", "expr pg_node_tree, rel oid, pretty boolean", "text",
     f"rel = 0 OR {_V}(rel)"),
    ("pg_get_function_arguments", "v oid", "text", f"{CATALOG_SCHEMA}.proc_visible(v)"),
    ("pg_get_function_identity_arguments", "v oid", "text", f"{CATALOG_SCHEMA}.proc_visible(v)"),
    ("pg_get_function_result", "v oid", "text", f"{CATALOG_SCHEMA}.proc_visible(v)"),
    ("pg_get_function_sqlbody", "v oid", "text", f"{CATALOG_SCHEMA}.proc_visible(v)"),
    # psql's \dx+: what an extension's member objects are, by catalog and id.
    ("pg_describe_object", "cls oid, v oid, sub integer", "text", f"{_O}(cls, v)"),
    ("pg_get_indexdef", "v oid", "text", f"{_V}(v)"),
    ("pg_get_indexdef", "v oid, col integer, pretty boolean", "text", f"{_V}(v)"),
    ("pg_get_partition_constraintdef", "v oid", "text", f"{_V}(v)"),
    ("pg_get_partkeydef", "v oid", "text", f"{_V}(v)"),
    ("pg_get_ruledef", "v oid", "text", f"{_O}('pg_catalog.pg_rewrite'::regclass, v)"),
    ("pg_get_ruledef", "v oid, pretty boolean", "text",
     f"{_O}('pg_catalog.pg_rewrite'::regclass, v)"),
    ("pg_get_serial_sequence", "v text, col text", "text", _TEXT_REL),
    ("pg_get_statisticsobjdef_columns", "v oid", "text",
     f"{_O}('pg_catalog.pg_statistic_ext'::regclass, v)"),
    ("pg_get_triggerdef", "v oid", "text", f"{_O}('pg_catalog.pg_trigger'::regclass, v)"),
    ("pg_get_triggerdef", "v oid, pretty boolean", "text",
     f"{_O}('pg_catalog.pg_trigger'::regclass, v)"),
    ("pg_get_userbyid", "v oid", "name", f"{_ROLE}(v)"),
    ("pg_get_viewdef", "v oid", "text", f"{_V}(v)"),
    ("pg_get_viewdef", "v oid, pretty boolean", "text", f"{_V}(v)"),
    ("pg_get_viewdef", "v oid, wrap integer", "text", f"{_V}(v)"),
    ("pg_get_viewdef", "v text", "text", _TEXT_REL),
    ("pg_get_viewdef", "v text, pretty boolean", "text", _TEXT_REL),
    ("pg_partition_root", "v regclass", "regclass",
     f"{_V}(v) AND {_V}(pg_catalog.pg_partition_root(v))"),
    ("pg_relation_size", "v regclass", "bigint", f"{_V}(v)"),
    ("pg_relation_size", "v regclass, fork text", "bigint", f"{_V}(v)"),
    ("pg_table_size", "v regclass", "bigint", f"{_V}(v)"),
    ("pg_indexes_size", "v regclass", "bigint", f"{_V}(v)"),
    ("pg_total_relation_size", "v regclass", "bigint", f"{_V}(v)"),
    # psql's \l+: the size of the database it is connected to only (the views keep no other).
    ("pg_database_size", "v name", "bigint", "v = pg_catalog.current_database()"),
    ("pg_database_size", "v oid", "bigint", "v = (SELECT d.oid FROM pg_catalog.pg_database d "
     "WHERE d.datname = pg_catalog.current_database())"),
    ("shobj_description", "v oid, cat name", "text",
     f"(cat = 'pg_authid' AND {_ROLE}(v)) OR cat = 'pg_tablespace' OR (cat = 'pg_database' "
     "AND v = (SELECT d.oid FROM pg_catalog.pg_database d "
     "WHERE d.datname = pg_catalog.current_database()))"),
)
_OTHERWISE = {"format_type": "'???'",
              "pg_get_userbyid": "('unknown (OID=' || v::text || ')')::name"}
# obj_description and col_description read pg_description: here, its view.
_DESCRIPTIONS = f"""
CREATE FUNCTION {CATALOG_SCHEMA}.obj_description(v oid, cat name) RETURNS text
LANGUAGE sql STABLE
RETURN (SELECT d.description FROM {CATALOG_SCHEMA}.pg_description d
        WHERE d.objoid = v AND d.objsubid = 0 AND d.classoid = (
            SELECT c.oid FROM pg_catalog.pg_class c
            WHERE c.relname = cat AND c.relnamespace = 'pg_catalog'::regnamespace));
CREATE FUNCTION {CATALOG_SCHEMA}.col_description(v oid, col integer) RETURNS text
LANGUAGE sql STABLE
RETURN (SELECT d.description FROM {CATALOG_SCHEMA}.pg_description d
        WHERE d.objoid = v AND d.classoid = 'pg_catalog.pg_class'::regclass
          AND d.objsubid = col);
"""
# What a catalog query calls in querygate_catalog rather than in pg_catalog.
GUARDED_FUNCTIONS: frozenset[str] = frozenset(
    {name for name, *_ in CATALOG_FUNCTIONS} | {"obj_description", "col_description"}
)


def _functions_sql() -> str:
    parts = [_DESCRIPTIONS]
    for name, params, result, condition in CATALOG_FUNCTIONS:
        args = ", ".join(p.split()[0] for p in params.split(", "))
        otherwise = _OTHERWISE.get(name, "NULL")
        parts.append(
            f"CREATE FUNCTION {CATALOG_SCHEMA}.{name}({params}) RETURNS {result} "
            f"LANGUAGE sql STABLE RETURN CASE WHEN {condition} "
            f"THEN pg_catalog.{name}({args}) ELSE {otherwise} END;"
        )
    return "\n".join(parts)


def catalog_views_sql(columns: dict[str, list[str]]) -> str:
    """The statements that (re)create ``querygate_catalog``: its functions, then a view per
    relation of ``CATALOG_VIEWS`` this server has (``columns``: ``CATALOG_COLUMNS_SQL``'s),
    its rows filtered."""
    parts = [_RELATION_VISIBLE]
    for name, keep in sorted(CATALOG_VIEWS.items()):
        if name not in columns:
            continue  # not in this PostgreSQL version: a query naming it fails there
        where = f" WHERE {keep}" if keep else ""
        listed = ", ".join('"' + c.replace('"', '""') + '"' for c in columns[name])
        parts.append(
            f"CREATE VIEW {CATALOG_SCHEMA}.{name} WITH (security_barrier) AS "
            f"SELECT {listed} FROM pg_catalog.{name}{where};"
        )
    parts.append(_functions_sql())
    parts.append(_information_views_sql())
    parts.append(f"GRANT USAGE ON SCHEMA {CATALOG_SCHEMA} TO PUBLIC;")
    parts.append(f"GRANT SELECT ON ALL TABLES IN SCHEMA {CATALOG_SCHEMA} TO PUBLIC;")
    parts.append(f"GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {CATALOG_SCHEMA} TO PUBLIC;")
    return "\n".join(parts)
