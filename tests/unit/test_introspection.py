"""Catalog introspection (app/introspection.py): what a catalog query may read and call, and
how it is pointed at the views of what the caller may see."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app import grammar, introspection
from app.errors import Forbidden

POLICY_DATA = Path(__file__).parents[2] / "rego" / "querygate" / "config" / "data.json"
TARGET = introspection.CATALOG_SCHEMA


def test_every_relation_policy_lists_has_a_filtered_view():
    """Policy can only narrow the relations the gateway has a view of."""
    listed = json.loads(POLICY_DATA.read_text())["catalog"]["relations"]
    for name in listed:
        schema, relation = name.split(".")
        views = (introspection.INFORMATION_VIEWS if schema == "information_schema"
                 else introspection.CATALOG_VIEWS)
        assert relation in views, name


def test_a_catalog_without_a_view_is_refused():
    tree = grammar.parse_tree("SELECT * FROM pg_catalog.pg_init_privs")
    with pytest.raises(Forbidden) as caught:
        introspection.relations(tree)
    assert caught.value.code == "catalog_relation_denied"


@pytest.mark.parametrize("sql, expected", [
    ("SELECT relname FROM pg_catalog.pg_class",
     f'SELECT relname FROM "{TARGET}".pg_class'),
    ("SELECT relname FROM pg_class c",
     f'SELECT relname FROM "{TARGET}".pg_class c'),
    ('SELECT 1 FROM "pg_class", PG_CATALOG.pg_type',
     f'SELECT 1 FROM "{TARGET}"."pg_class", "{TARGET}".pg_type'),
    # SQLAlchemy's three-part column references follow their relation.
    ("SELECT pg_catalog.pg_class.oid FROM pg_catalog.pg_class",
     f'SELECT "{TARGET}".pg_class.oid FROM "{TARGET}".pg_class'),
    ("SELECT (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid) FROM pg_class c",
     f'SELECT (SELECT count(*) FROM "{TARGET}".pg_attribute a WHERE a.attrelid = c.oid) '
     f'FROM "{TARGET}".pg_class c'),
    # information_schema filters by privilege itself; casts and functions are not relations.
    ("SELECT table_name FROM information_schema.tables "
     "WHERE 'pg_catalog.pg_class'::regclass > 0 AND pg_catalog.pg_table_is_visible(0)",
     "SELECT table_name FROM information_schema.tables "
     "WHERE 'pg_catalog.pg_class'::regclass > 0 AND pg_catalog.pg_table_is_visible(0)"),
])
def test_rewrite_catalog(sql, expected):
    assert grammar.rewrite_catalog(sql, TARGET) == expected


@pytest.mark.parametrize("sql, expected", [
    # The functions that read the catalogs unfiltered, given an id, call the filtered ones.
    ("SELECT pg_get_viewdef(c.oid), PG_CATALOG.format_type(t.oid, NULL) FROM pg_class c, "
     "pg_type t",
     f'SELECT "{TARGET}".pg_get_viewdef(c.oid), "{TARGET}".format_type(t.oid, NULL) '
     f'FROM "{TARGET}".pg_class c, "{TARGET}".pg_type t'),
    ('SELECT "obj_description"(16384, \'pg_class\'), d FROM pg_am, '
     "LATERAL pg_catalog.pg_get_userbyid(10) d",
     f'SELECT "{TARGET}"."obj_description"(16384, \'pg_class\'), d FROM "{TARGET}".pg_am, '
     f'LATERAL "{TARGET}".pg_get_userbyid(10) d'),
    # Others keep their names.
    ("SELECT pg_catalog.pg_table_is_visible(oid), quote_ident(relname) FROM pg_class",
     f'SELECT pg_catalog.pg_table_is_visible(oid), quote_ident(relname) FROM "{TARGET}".pg_class'),
])
def test_rewrite_catalog_functions(sql, expected):
    assert grammar.rewrite_catalog(sql, TARGET, introspection.GUARDED_FUNCTIONS) == expected


def test_rewrite_catalog_points_information_schema_at_its_filtered_views():
    info = introspection.INFORMATION_SCHEMA
    sql = ("SELECT information_schema.tables.table_name FROM information_schema.tables "
           "JOIN pg_namespace n ON n.nspname = table_schema")
    assert grammar.rewrite_catalog(sql, TARGET, frozenset(), info) == (
        f'SELECT "{info}".tables.table_name FROM "{info}".tables '
        f'JOIN "{TARGET}".pg_namespace n ON n.nspname = table_schema')


def test_every_filtered_function_is_one_policy_lists():
    listed = set(json.loads(POLICY_DATA.read_text())["functions"]["catalog"])
    assert introspection.GUARDED_FUNCTIONS <= listed


def test_a_unicode_escaped_function_name_is_refused():
    with pytest.raises(Forbidden):
        grammar.rewrite_catalog('SELECT U&"pg_get_viewdef"(1) FROM pg_class', TARGET,
                                introspection.GUARDED_FUNCTIONS)


@pytest.mark.parametrize("sql, numbers", [
    ("SELECT current_setting('server_version') FROM pg_class", ()),
    ("SELECT pg_catalog.current_setting('TimeZone'::text) FROM pg_class", ()),
    ("SELECT current_setting($2::varchar) FROM pg_class WHERE oid = $1", (2,)),
])
def test_setting_reads_that_are_allowed(sql, numbers):
    assert introspection.setting_reads(grammar.parse_tree(sql)) == numbers


@pytest.mark.parametrize("sql", [
    "SELECT current_setting('data_directory') FROM pg_class",
    "SELECT current_setting('server_version', true) FROM pg_class",
    "SELECT current_setting($1::varchar(6)) FROM pg_class",
    "SELECT current_setting($1::bpchar) FROM pg_class",
    "SELECT current_setting(lower('TIMEZONE')) FROM pg_class",
    "SELECT current_setting('server_' || 'version') FROM pg_class",
])
def test_setting_reads_that_are_refused(sql):
    with pytest.raises(Forbidden) as caught:
        introspection.setting_reads(grammar.parse_tree(sql))
    assert caught.value.code == "function_denied"


@pytest.mark.parametrize("value, allowed", [
    ("TimeZone", True), ("server_version", True), (None, True),
    ("\\x" + b"search_path".hex(), True),  # a binary text parameter
    ("data_directory", False), ("querygate.approval", False),
    ("\\x" + b"data_directory".hex(), False), ("\\xzz", False), (7, False),
])
def test_setting_parameters(value, allowed):
    if allowed:
        introspection.check_setting_parameters((1,), [value])
    else:
        with pytest.raises(Forbidden):
            introspection.check_setting_parameters((1,), [value])
    with pytest.raises(Forbidden):  # a number past the parameters given
        introspection.check_setting_parameters((2,), [value])


def test_every_decompiler_a_catalog_query_may_call_is_guarded():
    """A decompiler is exempt from the never-allowed list in a catalog query only, where it
    is called in querygate_catalog; one that takes an object id and is not guarded would
    read the unfiltered catalogs. pg_get_keywords takes none."""
    alternatives = re.search(r"\^pg_get_\(([^)]*)\)", introspection.DECOMPILERS.pattern)
    assert alternatives is not None
    names = ["pg_get_" + name for name in alternatives.group(1).split("|")]
    names += [part.strip("^$") for part in introspection.DECOMPILERS.pattern.split("|")
              if part.startswith("^pg_") and "(" not in part]
    assert "pg_describe_object" in names and "pg_get_function_sqlbody" in names, names
    assert all(introspection.DECOMPILERS.match(name) for name in names)
    assert set(names) - {"pg_get_keywords"} <= introspection.GUARDED_FUNCTIONS


@pytest.mark.parametrize("sql, relations", [
    # No relation at all, but a guarded function: a catalog query (psql's \d+ of a view).
    ("SELECT pg_catalog.pg_get_viewdef('16749'::pg_catalog.oid, true)", ()),
    ("SELECT pg_table_size(1::oid), pg_size_pretty(1::bigint)", ()),
    ("SELECT t.d FROM generate_series(1, 3) g, LATERAL pg_get_viewdef(g::oid) t(d)", ()),
    # Nothing guarded, or the guarded schema named directly: not a catalog query.
    ("SELECT 1", None),
    ("SELECT * FROM pg_get_keywords()", None),
    ("SELECT querygate_catalog.pg_get_viewdef(1::oid)", None),
    ("SELECT pg_get_functiondef(1::oid)", None),
    # A table of the caller's besides: not a catalog query either.
    ("SELECT pg_get_viewdef(1::oid) FROM customers", None),
])
def test_a_query_without_relations_is_a_catalog_query_only_with_a_guarded_function(
        sql, relations):
    assert introspection.relations(grammar.parse_tree(sql)) == relations
