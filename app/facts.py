"""What the query does: typed, schema-resolved facts extracted with sqlglot.

The extractor is an allow-list. It models a statement only when it can account for every
table, column and function in it against the real catalog; anything else raises a
GatewayError with a stable code, before policy is asked and before anything runs:

- ``sql_parse_error`` (400): sqlglot cannot parse the text.
- ``sql_too_complex`` (400): nesting deeper than the parser can safely walk.
- ``multiple_statements`` (403): more than one statement in the text.
- ``unsupported_statement`` (403): a statement kind we do not model (SET, DO, COPY, …).
- ``unsupported_construct`` (403): a construct inside a modelled statement that we refuse to
  guess about (whole-row references, table functions, writable CTEs, SELECT … INTO, …).
- ``unknown_object`` (422): a table or column that does not resolve in the catalog.
- ``function_denied`` (403): a function that reads files, settings, other servers, …

Writes and DDL are analysed by building a synthetic SELECT over the same tables (the SET
values, WHERE and RETURNING of an UPDATE become the projections and filter of a SELECT), so
one resolver — sqlglot's qualifier plus our own scope walk — validates everything. The
synthetic tree is for analysis only; the original SQL text is what runs.
"""

from __future__ import annotations

import hashlib
import logging
import re
import traceback
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import OptimizeError, ParseError, SqlglotError, TokenError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers
from sqlglot.optimizer.qualify import qualify
from sqlglot.optimizer.scope import Scope, traverse_scope
from sqlglot.schema import MappingSchema
from sqlglot.tokens import TokenType  # type: ignore[attr-defined]

from app import grammar, introspection
from app.catalog import Catalog, Relation
from app.errors import BadRequest, Forbidden, GatewayError, Unprocessable

log = logging.getLogger("querygate.facts")
_DIALECT = Dialect.get_or_raise("postgres")


class _NoSqlText(logging.Filter):
    """Drops every record of sqlglot's logger: they quote the statement, literals included
    ("'UPDATE … WHERE ssn = …' contains unsupported syntax. Falling back to parsing as a
    'Command'", "Invalid JSON path syntax …", a rendered subquery), and each condition they
    report reaches the caller as one of the extractor's error codes anyway."""

    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _keep_sql_out_of_logs() -> None:
    """Install the filter on the ``sqlglot`` logger once (idempotent: extractors are built in
    every app and CLI run, and by tests many times)."""
    sqlglot_log = logging.getLogger("sqlglot")
    if not any(isinstance(f, _NoSqlText) for f in sqlglot_log.filters):
        sqlglot_log.addFilter(_NoSqlText())

Kind = Literal["select", "insert", "update", "delete", "merge", "ddl"]
Derivation = Literal["direct", "expression", "aggregate"]
_RANK: dict[str, int] = {"direct": 0, "expression": 1, "aggregate": 2}


@dataclass(frozen=True, slots=True)
class Output:
    """One output column: its name, the base columns it is computed from, and how."""

    name: str
    sources: tuple[str, ...]
    derivation: Derivation
    # The wire type name when the output is a base column passed through unchanged.
    type: str | None = None

    def to_input(self) -> dict[str, Any]:
        return {"name": self.name, "sources": list(self.sources), "derivation": self.derivation}


@dataclass(frozen=True, slots=True)
class DdlFacts:
    """What a DDL statement changes."""

    operation: str
    object_type: str
    targets: tuple[str, ...]
    actions: tuple[str, ...] = ()

    def to_input(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "object_type": self.object_type,
            "targets": list(self.targets),
            "actions": list(self.actions),
        }


@dataclass(frozen=True, slots=True)
class QueryFacts:
    """Everything policy may know about one statement; the ``query`` part of the OPA input."""

    fingerprint: str
    kind: Kind
    tables_read: tuple[str, ...] = ()
    tables_write: tuple[str, ...] = ()
    columns_read: tuple[str, ...] = ()
    columns_predicate: tuple[str, ...] = ()
    columns_write: tuple[str, ...] = ()
    # Predicate columns whose only use is an equality join key (`a.x = b.y`).
    columns_join_equality: tuple[str, ...] = ()
    # Write lineage: target column → the base columns whose values are written into it.
    write_sources: tuple[tuple[str, tuple[str, ...]], ...] = ()
    outputs: tuple[Output, ...] = ()
    functions: tuple[str, ...] = ()
    has_where: bool = False
    where_trivially_true: bool = False
    limit: int | None = None
    param_count: int = 0
    ddl: DdlFacts | None = None
    catalog_version: int = 0
    # Reads only system catalogs (app/introspection.py): its relations and functions come
    # from PostgreSQL's parse tree; no column of it is the resolver's, none is masked.
    introspection: bool = False
    # The parameters (numbers) a catalog query's ``current_setting`` reads: each value is
    # checked against the readable settings once bound (introspection.check_setting_parameters).
    setting_params: tuple[int, ...] = ()
    _input: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_input(self) -> dict[str, Any]:
        """The JSON-ready ``query`` object (built once; facts are cached and shared)."""
        if not self._input:
            self._input.update(
                {
                    "fingerprint": self.fingerprint,
                    "kind": self.kind,
                    "tables": {"read": list(self.tables_read), "write": list(self.tables_write)},
                    "columns": {
                        "read": list(self.columns_read),
                        "predicate": list(self.columns_predicate),
                        "join_equality": list(self.columns_join_equality),
                        "write": list(self.columns_write),
                        "write_sources": {c: list(s) for c, s in self.write_sources},
                    },
                    "outputs": [o.to_input() for o in self.outputs],
                    "functions": list(self.functions),
                    "has_where": self.has_where,
                    "where_trivially_true": self.where_trivially_true,
                    "limit": self.limit,
                    "param_count": self.param_count,
                    "ddl": self.ddl.to_input() if self.ddl else None,
                    "catalog_version": self.catalog_version,
                    "introspection": self.introspection,
                }
            )
        return self._input


# --- functions ---------------------------------------------------------------------------

# Never allowed, whatever policy says: they read files, large objects, other servers or
# settings, sleep, signal backends, or run/dump queries and tables given by name.
DENIED_FUNCTION_PATTERNS = (
    re.compile(r"^pg_(read|stat)_(binary_)?file$"),
    re.compile(r"^pg_ls_"),
    re.compile(r"^lo_"),
    re.compile(r"^(be_)?lo_"),
    re.compile(r"^dblink"),
    re.compile(r"^postgres_fdw"),
    re.compile(r"^(current_setting|set_config|pg_reload_conf|pg_rotate_logfile)$"),
    re.compile(r"^pg_(terminate|cancel)_backend$"),
    re.compile(r"^pg_sleep"),
    re.compile(r"^pg_advisory"),
    re.compile(r"^pg_(start|stop)_backup$|^pg_backup_|^pg_switch_wal$|^pg_create_"),
    re.compile(r"^pg_(logical|replication)_"),
    re.compile(r"^(query|table|cursor|schema|database)_to_xml"),
    re.compile(r"^(query|table|cursor|schema|database)_to_xmlschema$"),
    re.compile(r"^ts_(stat|rewrite)$"),
    re.compile(r"^(xpath_table|crosstab|connectby)"),
    re.compile(r"^pg_notify$|^pg_listening_channels$"),
    re.compile(r"^pg_(get|describe)_"),
    re.compile(r"^txid_|^pg_current_xact_id|^pg_export_snapshot$"),
    re.compile(r"^(nextval|setval|currval|lastval)$"),
    re.compile(r"^lo(read|write|open|close|seek|tell|creat|unlink|_)"),
    re.compile(r"^pg_(show_all_settings|show_all_file_settings|hba_file_rules|ident_file_mappings)$"),
    re.compile(r"^pg_(current_logfile|log_backend_memory_contexts|sequence_last_value)$"),
    re.compile(r"^pg_(read|write)_server_files?$|^pg_(file_settings|config|settings)$"),
    re.compile(r"^pg_(try_)?advisory"),
    re.compile(r"^(inet_server_|inet_client_)"),
    re.compile(r"^(copy|pg_file_|pg_logdir_ls|pg_execute_server_program)"),
)

# Operators sqlglot models as functions: not calls PostgreSQL would resolve by name.
_NOT_FUNCTIONS = (exp.Cast, exp.TryCast, exp.Paren, exp.Exists, exp.Connector)
# Arguments kept as they are when a call is rendered for its name: they decide which
# spelling sqlglot picks (a JSON path, a unit) and can never render as a call themselves.
_NAME_SHAPING = (exp.Literal, exp.Var, exp.DataType, exp.Identifier, exp.Null, exp.Boolean,
                 exp.Star, exp.JSONPath)
# Stands in for every other argument: not an identifier PostgreSQL would call.
_ARGUMENT = "__querygate_argument__"


def function_name(node: exp.Func) -> str:
    """The PostgreSQL name of a function call, lower-case ("" for operators sqlglot models
    as functions, such as AND or ->>); schema-qualified unless pg_catalog.

    A pure function of the node: the name is read from the node rendered with its
    arguments replaced by a placeholder, so an operator (`x ->> 'a'`, `x ~ 'a'`) never takes
    the name of a call on its left and one class can be a call in one statement and an
    operator in the next (`json_extract_path_text(x, 'a')` and `x ->> 'a'`).
    """
    if isinstance(node, exp.Anonymous):
        name = node.name.lower()
        parent = node.parent
        if isinstance(parent, exp.Dot) and parent.expression is node:
            schema = parent.this.name.lower() if isinstance(parent.this, exp.Expr) else ""
            if schema and schema != "pg_catalog":
                return f"{schema}.{name}"
        return name
    shell = type(node)(**{key: _placeholder(value) for key, value in node.args.items()})
    try:
        rendered = _DIALECT.generate(shell, copy=False)  # the shell is ours: no copy
    except Exception as exc:  # a generator that needs the real arguments: refuse, never guess
        raise _deny(f"the function {type(node).__name__} could not be analysed") from exc
    # Binary operators (a ->> b) do not look like calls and get ""; function-style ones
    # (power(a, b), json_extract_path_text(a, 'b')) keep their name.
    match = _CALL.match(rendered)
    name = match.group(1).lower() if match else ""
    return "" if name == _ARGUMENT else name


def _placeholder(value: Any) -> Any:
    """An argument for the name-only copy of a call: a fresh copy or the placeholder."""
    if isinstance(value, list):
        return [_placeholder(item) for item in value]
    if not isinstance(value, exp.Expr):
        return value
    if isinstance(value, _NAME_SHAPING) and value.find(exp.Func, exp.Query) is None:
        return value.copy()
    return exp.column(_ARGUMENT)


_CALL = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\(|$)")


def check_function(name: str) -> None:
    """Raise function_denied for a function no policy may allow."""
    bare = name.rsplit(".", 1)[-1]
    for pattern in DENIED_FUNCTION_PATTERNS:
        if pattern.search(bare):
            raise Forbidden(
                "function_denied",
                f"function {name}() is never allowed through the gateway",
                function=name,
            )


# --- extraction --------------------------------------------------------------------------

_UNICODE_IDENT = re.compile(r"""u&["']""", re.IGNORECASE)
_MAX_DEPTH = 200

_WRITE_NODES = (exp.Insert, exp.Update, exp.Delete, exp.Merge)
_DDL_NODES = (exp.Create, exp.Drop, exp.Alter, exp.TruncateTable)
# DDL the gateway can resolve exactly: the object kinds whose targets live in the catalog.
_DDL_OBJECTS: dict[str, frozenset[str]] = {
    "create": frozenset({"table", "index"}),
    "alter": frozenset({"table"}),
    "drop": frozenset({"table", "view"}),
    "truncate": frozenset({"table"}),
}


def _deny(message: str, **extra: Any) -> Forbidden:
    return Forbidden("unsupported_construct", message, **extra)


def _unknown(message: str, **extra: Any) -> Unprocessable:
    return Unprocessable("unknown_object", message, **extra)


@dataclass(slots=True)
class _Col:
    """Lineage of one value: base columns and the most mixing derivation on the way."""

    sources: frozenset[str]
    derivation: Derivation
    type: str | None = None


@dataclass(slots=True)
class _Analysis:
    tables_read: set[str] = field(default_factory=set)
    columns_read: set[str] = field(default_factory=set)
    columns_predicate: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    outputs: list[Output] = field(default_factory=list)
    equality_uses: set[str] = field(default_factory=set)
    other_uses: set[str] = field(default_factory=set)

    @property
    def join_equality_only(self) -> set[str]:
        """Predicate columns used only as `col = col` join keys."""
        return self.equality_uses - self.other_uses


def _max_derivation(*items: str) -> Derivation:
    best = max(items, key=lambda d: _RANK[d], default="direct")
    return best  # type: ignore[return-value]


class FactsExtractor:
    """Turns SQL text into QueryFacts against a catalog, with a bounded LRU cache."""

    def __init__(self, max_sql_bytes: int, cache_size: int = 4096) -> None:
        _keep_sql_out_of_logs()
        self._max_sql_bytes = max_sql_bytes
        self._cache: OrderedDict[tuple[str, int], QueryFacts] = OrderedDict()
        self._cache_size = cache_size
        self._schemas: dict[int, MappingSchema] = {}

    def extract(self, sql: str, catalog: Catalog) -> QueryFacts:
        """Facts for ``sql``, from the cache when the same text met the same catalog."""
        key = (sql, catalog.version)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        facts = self._extract(sql, catalog)
        self._cache[key] = facts
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return facts

    def clear(self) -> None:
        """Forget cached facts (the per-catalog schema is kept)."""
        self._cache.clear()

    def _schema(self, catalog: Catalog) -> MappingSchema:
        schema = self._schemas.get(catalog.version)
        if schema is None:
            # Types are irrelevant to resolution and PostgreSQL type names sqlglot cannot
            # parse would only add failure modes.
            mapping: dict[str, object] = {
                s: {t: dict.fromkeys(rel.columns, "unknown") for t, rel in tables.items()}
                for s, tables in catalog.relations.items()
            }
            schema = MappingSchema(mapping, dialect=_DIALECT, normalize=False)
            self._schemas = {catalog.version: schema}
        return schema

    def _extract(self, sql: str, catalog: Catalog) -> QueryFacts:
        # PostgreSQL's own parser reads the text first (size, NUL, syntax, one statement of
        # a kind we model); sqlglot's reading must then agree with it (app/grammar.py).
        reading = grammar.read(sql, max_bytes=self._max_sql_bytes)
        grammar.single_statement(reading)
        if grammar.mentions_system_schema(sql, reading):
            facts = _introspection(sql, catalog)
            if facts is not None:
                return facts
        if _UNICODE_IDENT.search(sql):
            raise _deny("unicode-escaped identifiers and strings (U&…) are not supported")
        _check_nesting(sql)
        try:
            statements = [s for s in _DIALECT.parse(sql) if s is not None]
        except (ParseError, TokenError) as exc:
            raise BadRequest("sql_parse_error", f"the SQL could not be parsed: {exc}") from exc
        except RecursionError as exc:
            raise BadRequest("sql_too_complex", "the SQL is nested too deeply") from exc
        except SqlglotError as exc:
            raise BadRequest("sql_parse_error", f"the SQL could not be parsed: {exc}") from exc
        except (TypeError, ValueError, AttributeError, IndexError, KeyError, AssertionError) as exc:
            # sqlglot's parser raises internal errors on some malformed input (found by the
            # property tests: "0?" is a TypeError); any of them means "cannot parse".
            log.info("parser failure %s on %d bytes", type(exc).__name__, len(sql))
            raise BadRequest("sql_parse_error", "the SQL could not be parsed") from exc
        grammar.check_agreement(reading, sql, statements)
        if not statements:
            raise BadRequest("sql_parse_error", "the SQL text holds no statement")
        if len(statements) > 1:
            raise Forbidden(
                "multiple_statements",
                f"exactly one statement per request is allowed; found {len(statements)}",
            )
        tree = statements[0]
        try:
            _check_depth(tree)
            return self._facts(sql, tree, catalog)
        except GatewayError:
            raise
        except RecursionError as exc:
            raise BadRequest("sql_too_complex", "the SQL is nested too deeply") from exc
        except OptimizeError as exc:
            raise _unknown(f"the query does not resolve against the catalog: {exc}") from exc
        except SqlglotError as exc:
            raise _deny(f"the query could not be analysed: {exc}") from exc
        except (TypeError, ValueError, AttributeError, IndexError, KeyError, AssertionError) as exc:
            # A shape the walker (or sqlglot's qualifier, which asserts on some positional
            # ORDER BY/GROUP BY forms) does not expect: refuse (fail closed) and leave a trace.
            # The type and where it was raised, never the message: messages can quote SQL.
            log.warning("facts analysis failure %s at %s", type(exc).__name__, _origin(exc))
            raise _deny("the query could not be analysed") from exc

    # --- per statement kind ------------------------------------------------------------

    def _facts(self, sql: str, tree: exp.Expr, catalog: Catalog) -> QueryFacts:
        tree = normalize_identifiers(tree, dialect=_DIALECT)
        _lift_parenthesised_modifiers(tree)
        while isinstance(tree, exp.Subquery) and not tree.alias and isinstance(tree.this, exp.Query):
            # `(SELECT …)` as a whole statement is that SELECT.
            tree = tree.this
            tree.pop()
        params = _check_placeholders(tree)
        fingerprint = _fingerprint(sql)
        common: dict[str, Any] = {
            "fingerprint": fingerprint,
            "param_count": params,
            "catalog_version": catalog.version,
        }
        if isinstance(tree, exp.Query):
            return self._select(tree, catalog, common)
        if isinstance(tree, exp.Insert):
            return self._insert(tree, catalog, common)
        if isinstance(tree, exp.Update):
            return self._update(tree, catalog, common)
        if isinstance(tree, exp.Delete):
            return self._delete(tree, catalog, common)
        if isinstance(tree, _DDL_NODES):
            return self._ddl(tree, catalog, common)
        label = tree.name.split()[0].upper() if isinstance(tree, exp.Command) else tree.key
        raise Forbidden(
            "unsupported_statement",
            f"statement kind {label or tree.key!s} is not supported by the gateway",
        )

    def _select(self, tree: exp.Query, catalog: Catalog, common: dict[str, Any]) -> QueryFacts:
        _reject_select_extras(tree)
        where = tree.args.get("where") if isinstance(tree, exp.Select) else None
        trivially_true = _trivially_true(where)
        limit = _limit(tree)
        has_where = where is not None
        # The parsed tree is ours alone: the qualifier may rewrite it in place.
        analysis = self._analyse(tree, catalog)
        return QueryFacts(
            kind="select",
            tables_read=tuple(sorted(analysis.tables_read)),
            columns_read=tuple(sorted(analysis.columns_read)),
            columns_predicate=tuple(sorted(analysis.columns_predicate)),
            columns_join_equality=tuple(sorted(analysis.join_equality_only)),
            outputs=tuple(analysis.outputs),
            functions=tuple(sorted(analysis.functions)),
            has_where=has_where,
            where_trivially_true=trivially_true,
            limit=limit,
            **common,
        )

    def _target(self, table: exp.Expr, catalog: Catalog) -> Relation:
        if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
            raise _deny("the target of a write must be a plain table")
        relation = catalog.resolve(table.name, table.db or None)
        if relation is None:
            raise _unknown(f"table {_display(table)} does not exist", object=_display(table))
        if relation.kind not in ("table", "partitioned_table"):
            raise _deny(f"{relation.qualified} is a {relation.kind}; writes go to tables only")
        return relation

    def _write_facts(
        self,
        kind: Kind,
        target: Relation,
        written: Iterable[str],
        reads: list[tuple[exp.Select, list[str] | None]],
        returning: exp.Select | None,
        where: exp.Expr | None,
        catalog: Catalog,
        common: dict[str, Any],
    ) -> QueryFacts:
        """Facts of a write; ``reads`` pairs each analysed SELECT with the target column each
        of its projections is written to (None: it only reads)."""
        merged = _Analysis()
        # target column → what flows into it (write lineage).
        flows: dict[str, tuple[set[str], Derivation]] = {}
        for select, into in reads:
            part = self._analyse(select, catalog)
            merged.tables_read |= part.tables_read
            merged.columns_read |= part.columns_read
            merged.columns_predicate |= part.columns_predicate
            merged.equality_uses |= part.equality_uses
            merged.other_uses |= part.other_uses
            merged.functions |= part.functions
            if into is not None:
                for column, output in zip(into, part.outputs, strict=False):
                    sources, derivation = flows.get(column, (set(), "direct"))
                    flows[column] = (
                        sources | set(output.sources),
                        _max_derivation(derivation, output.derivation),
                    )
        outputs: tuple[Output, ...] = ()
        if returning is not None:
            part = self._analyse(returning, catalog)
            merged.columns_read |= part.columns_read
            merged.functions |= part.functions
            outputs = tuple(_returned(o, target, flows) for o in part.outputs)
        columns_write = []
        for column in written:
            if column not in target.columns:
                raise _unknown(
                    f"column {target.qualified}.{column} does not exist",
                    object=f"{target.qualified}.{column}",
                )
            columns_write.append(f"{target.qualified}.{column}")
        return QueryFacts(
            kind=kind,
            tables_read=tuple(sorted(merged.tables_read)),
            tables_write=(target.qualified,),
            columns_read=tuple(sorted(merged.columns_read)),
            columns_predicate=tuple(sorted(merged.columns_predicate)),
            columns_join_equality=tuple(sorted(merged.join_equality_only)),
            columns_write=tuple(sorted(set(columns_write))),
            write_sources=tuple(
                (f"{target.qualified}.{column}", tuple(sorted(sources)))
                for column, (sources, _) in sorted(flows.items()) if sources
            ),
            outputs=outputs,
            functions=tuple(sorted(merged.functions)),
            has_where=where is not None,
            where_trivially_true=_trivially_true(where),
            **common,
        )

    def _insert(self, tree: exp.Insert, catalog: Catalog, common: dict[str, Any]) -> QueryFacts:
        _reject_with_writes(tree)
        schema_node = tree.this
        columns: list[str]
        if isinstance(schema_node, exp.Schema):
            table = schema_node.this
            columns = [c.name for c in schema_node.expressions]
        else:
            table = schema_node
            columns = []
        target = self._target(table, catalog)
        if not columns:
            columns = list(target.columns)
        alias = table.alias or target.name
        reads: list[tuple[exp.Select, list[str] | None]] = []
        source = tree.expression
        if isinstance(source, exp.Values):
            rows = [row.expressions for row in source.expressions]
            values = [e.copy() for row in rows for e in row]
            into = [columns[i] for row in rows for i in range(len(row)) if i < len(columns)]
            reads.append((exp.Select(expressions=values or [exp.null()]), into))
        elif isinstance(source, exp.Query):
            _reject_select_extras(source)
            reads.append((source.copy(), list(columns)))  # type: ignore[arg-type]
        elif source is not None:
            raise _deny("INSERT source must be VALUES or a query")
        conflict = tree.args.get("conflict")
        if conflict is not None:
            action = conflict.args.get("action")
            set_columns = [eq.this.name for eq in conflict.args.get("expressions") or []]
            columns.extend(set_columns)
            sets = [eq.expression.copy() for eq in conflict.args.get("expressions") or []]
            update_where = conflict.args.get("where")
            if sets or update_where is not None:
                # DO UPDATE's SET and WHERE see the target row and the proposed one (excluded).
                excluded = exp.to_table(target.qualified).as_("excluded")
                condition = update_where.this if isinstance(update_where, exp.Where) else update_where
                reads.append((_synthetic(sets, table, alias, [excluded], condition), set_columns))
            # The conflict target's expressions and its WHERE see only the target table.
            keys = [
                (k.this if isinstance(k, exp.Ordered) else k).copy()
                for k in conflict.args.get("conflict_keys") or []
            ]
            for key in keys:
                name = key.name if isinstance(key, (exp.Identifier, exp.Column)) else None
                if name is not None and name not in target.columns:
                    raise _unknown(f"column {target.qualified}.{name} does not exist")
            keys = [k for k in keys if not isinstance(k, (exp.Identifier, exp.Column))]
            conditions = [
                c.this if isinstance(c, exp.Where) else c
                for c in (conflict.args.get("index_predicate"),)
                if c is not None
            ]
            if keys or conditions:
                condition = exp.and_(*[c.copy() for c in conditions]) if conditions else None
                reads.append((_synthetic(keys, table, alias, [], condition), None))
            if not sets and action is not None and "NOTHING" not in str(action).upper():
                raise _deny("unsupported ON CONFLICT action")
        returning = _returning(tree, table, alias, [])
        return self._write_facts(
            "insert", target, columns, reads, returning, None, catalog, common
        )

    def _update(self, tree: exp.Update, catalog: Catalog, common: dict[str, Any]) -> QueryFacts:
        _reject_with_writes(tree)
        table = tree.this
        target = self._target(table, catalog)
        alias = table.alias or target.name
        extra = _from_tables(tree.args.get("from_")) + _join_tables(tree.args.get("joins"))
        where = tree.args.get("where")
        written = []
        values = []
        for eq in tree.expressions:
            if not isinstance(eq, exp.EQ) or not isinstance(eq.this, exp.Column):
                raise _deny("SET must assign plain columns")
            if eq.this.table and eq.this.table != alias:
                raise _deny("SET columns must belong to the updated table")
            written.append(eq.this.name)
            values.append(eq.expression.copy())
        read = _synthetic(values, table, alias, extra, where.this if where else None)
        returning = _returning(tree, table, alias, extra)
        return self._write_facts(
            "update", target, written, [(read, written)], returning, where, catalog, common
        )

    def _delete(self, tree: exp.Delete, catalog: Catalog, common: dict[str, Any]) -> QueryFacts:
        _reject_with_writes(tree)
        table = tree.this
        target = self._target(table, catalog)
        alias = table.alias or target.name
        extra = [t.copy() for t in tree.args.get("using") or []]
        where = tree.args.get("where")
        read = _synthetic([exp.null()], table, alias, extra, where.this if where else None)
        returning = _returning(tree, table, alias, extra)
        return self._write_facts(
            "delete", target, [], [(read, None)], returning, where, catalog, common
        )

    def _ddl(self, tree: exp.Expr, catalog: Catalog, common: dict[str, Any]) -> QueryFacts:
        kind = str(tree.args.get("kind") or "").lower()
        actions: tuple[str, ...] = ()
        if isinstance(tree, exp.TruncateTable):
            operation, kind = "truncate", "table"
            tables = list(tree.expressions)
        elif isinstance(tree, exp.Drop):
            operation = "drop"
            tables = list(tree.args.get("tables") or [tree.this])
        elif isinstance(tree, exp.Alter):
            operation = "alter"
            tables = [tree.this]
            # "drop" for any DROP COLUMN/CONSTRAINT: guardrails treat those as destructive.
            actions = tuple(_alter_action(a) for a in tree.args.get("actions") or [])
        else:
            operation = "create"
            _check_ddl_kind(operation, kind)
            if tree.args.get("expression") is not None:
                raise _deny("CREATE … AS a query is not supported; create, then INSERT … SELECT")
            properties = tree.args.get("properties")
            if properties is not None and any(
                isinstance(p, exp.TemporaryProperty) for p in properties.expressions
            ):
                # Temporary tables outlive the request on a pooled connection.
                raise _deny("temporary tables are not supported through the gateway")
            target = tree.this
            tables = [target.this if isinstance(target, exp.Schema) else target]
            if isinstance(target, exp.Index):
                tables = [target.args["table"]] if target.args.get("table") else []
        if tree.args.get("cascade") or str(tree.args.get("option") or "").lower() == "cascade":
            # CASCADE reaches objects that are not named: policy must see it.
            actions = (*actions, "cascade")
        _check_ddl_kind(operation, kind)
        targets = []
        for table in tables:
            if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier):
                raise _deny(f"cannot determine the target of this {operation}")
            relation = catalog.resolve(table.name, table.db or None)
            if relation is not None:
                if operation == "create" and kind != "index":
                    raise Unprocessable(
                        "object_exists", f"{relation.qualified} already exists",
                        object=relation.qualified,
                    )
                if kind in ("table", "index") and relation.kind == "view":
                    raise _deny(f"{relation.qualified} is a view, not a table")
                targets.append(relation.qualified)
            elif operation == "create" and kind != "index":
                schema = table.db or catalog.schemas[0]
                if schema not in catalog.schemas:
                    raise _unknown(f"schema {schema} is not visible through the gateway")
                targets.append(f"{schema}.{table.name}")
            else:
                raise _unknown(f"{_display(table)} does not exist", object=_display(table))
        # Expressions inside DDL (DEFAULT, CHECK, index expressions, USING) run later with the
        # gateway's privileges, and REFERENCES/LIKE/INHERITS name other relations: both are
        # checked like a query's.
        target_nodes = {id(t) for t in tables}
        reads = set()
        for node in tree.find_all(exp.Table):
            if id(node) in target_nodes:
                continue
            if isinstance(tree, exp.Alter) and isinstance(node.parent, (exp.AlterRename, exp.Drop)):
                continue  # a new name, or a constraint being dropped: not a relation read
            if not isinstance(node.this, exp.Identifier):
                raise _deny("table functions are not supported")
            relation = catalog.resolve(node.name, node.db or None)
            if relation is None:
                raise _unknown(f"{_display(node)} does not exist", object=_display(node))
            reads.add(relation.qualified)
        functions = set()
        for func in tree.find_all(exp.Func):
            if isinstance(func, _NOT_FUNCTIONS):
                continue
            name = function_name(func)
            if name:
                check_function(name)
                functions.add(name)
        return QueryFacts(
            kind="ddl",
            tables_read=tuple(sorted(reads)),
            tables_write=tuple(targets),
            functions=tuple(sorted(functions)),
            ddl=DdlFacts(operation, kind, tuple(targets), actions),
            **common,
        )

    # --- the resolver --------------------------------------------------------------------

    def _analyse(self, tree: exp.Query, catalog: Catalog) -> _Analysis:
        """Resolve ``tree`` (which the caller hands over: it is rewritten in place)."""
        _qualify_tables(tree, catalog)
        schema = self._schema(catalog)
        try:
            qualified = qualify(
                tree,
                schema=schema,
                dialect=_DIALECT,
                validate_qualify_columns=True,
                expand_stars=True,
                quote_identifiers=False,
                identify=False,
            )
            return _Resolver(catalog).run(qualified)
        finally:
            _forget_lookups(schema)


# sqlglot's MappingSchema memoises lookups keyed by the Table nodes of the statement being
# qualified, and holds on to them (and through their parents to the whole tree) for as long
# as the catalog version lives: state that grows with every distinct statement ever seen.
_SCHEMA_MEMOS = ("_normalized_table_cache", "_find_cache", "_normalized_name_cache")


def _forget_lookups(schema: MappingSchema) -> None:
    """Empty the schema's per-lookup memos, so that nothing of one statement outlives it."""
    for name in _SCHEMA_MEMOS:
        memo = getattr(schema, name, None)
        if isinstance(memo, dict):
            memo.clear()


class _Resolver:
    """Walks qualified scopes bottom-up, computing lineage for every projection."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.analysis = _Analysis()
        self.outputs: dict[int, list[tuple[str, _Col]]] = {}
        self.scopes: dict[int, Scope] = {}

    def run(self, tree: exp.Expr) -> _Analysis:
        scopes = traverse_scope(tree)
        for scope in scopes:
            self.scopes[id(scope.expression)] = scope
        for scope in scopes:
            self._scope(scope)
        root = scopes[-1]
        self.analysis.outputs = [
            Output(name, tuple(sorted(col.sources)), col.derivation,
                   col.type if col.derivation == "direct" else None)
            for name, col in self.outputs[id(root.expression)]
        ]
        for whole in tree.find_all(exp.TableColumn):
            raise _deny(
                f"whole-row reference {whole.name!r} is not supported; name the columns"
            )
        for node in tree.find_all(exp.Func):
            if isinstance(node, _NOT_FUNCTIONS):
                continue
            name = function_name(node)
            if name:
                check_function(name)
                self.analysis.functions.add(name)
        for star in tree.find_all(exp.Star):
            if not isinstance(star.parent, exp.Count):
                raise _deny("unexpanded * (only count(*) is allowed)")
        return self.analysis

    def _scope(self, scope: Scope) -> None:
        node = scope.expression
        if isinstance(node, exp.SetOperation):
            # A branch may be parenthesised (`(SELECT …) UNION SELECT …`, as SQLAlchemy
            # writes it) or a nested set operation (`a UNION (b INTERSECT c)`).
            left = self._query_outputs(node.left)
            right = self._query_outputs(node.right)
            if len(left) != len(right):
                raise _deny("set operation branches have different column counts")
            merged = [
                (name, _Col(a.sources | b.sources, _max_derivation(a.derivation, b.derivation),
                            a.type if a.type == b.type else None))
                for (name, a), (_, b) in zip(left, right, strict=True)
            ]
            if _is_recursive_cte(node):
                # Recursion can move any column into any other, any number of times (the
                # recursive member was resolved against the anchor only): every output may
                # carry every source. Over-approximate rather than iterate to a fixpoint.
                everything = frozenset().union(*(col.sources for _, col in merged))
                worst = _max_derivation(*(col.derivation for _, col in merged))
                merged = [(name, _Col(everything, worst)) for name, _ in merged]
            self.outputs[id(node)] = merged
            if scope.is_subquery and _in_predicate(
                node, scope.parent.expression if scope.parent else None
            ):
                # `x IN (SELECT ssn … UNION …)` filters by everything the branches output,
                # as a filtering SELECT does (_scope_select).
                for _, col in merged:
                    self._as_predicate(col)
            return
        if isinstance(node, exp.Lateral) and isinstance(node.this, exp.Subquery):
            # A LATERAL subquery is a derived table that may see earlier FROM items.
            self.outputs[id(node)] = self.outputs[id(node.this.this)]
            return
        if not isinstance(node, exp.Select):
            raise _deny(f"unsupported query form {node.key}")
        self._scope_select(scope, node)

    def _scope_select(self, scope: Scope, node: exp.Expr) -> None:
        if not isinstance(node, exp.Select):
            raise _deny(f"unsupported query form {node.key}")
        for source in scope.sources.values():
            if isinstance(source, exp.Table):
                self._check_table(source)
        for column in scope.columns:
            col = self._column(scope, column)
            self.analysis.columns_read |= col.sources
            if _in_predicate(column, node):
                self.analysis.columns_predicate |= col.sources
                # Only `a.x = b.y` between two columns is a join key; anything else (a
                # literal, LIKE, <, a function) can probe the value.
                parent = column.parent
                if self._join_key(scope, parent):
                    self.analysis.equality_uses |= col.sources
                else:
                    self.analysis.other_uses |= col.sources
        outputs = []
        for projection in node.selects:
            outputs.append((_output_name(projection), self._expr(scope, projection.unalias())))
        self.outputs[id(node)] = outputs
        self._output_references(node, outputs)
        # A subquery used as a filter (IN, EXISTS, comparison) decides which rows appear:
        # everything it outputs is a predicate of the enclosing query.
        if scope.is_subquery and _in_predicate(node, scope.parent.expression if scope.parent else None):
            for _, col in outputs:
                self.analysis.columns_predicate |= col.sources
                self.analysis.other_uses |= col.sources

    def _output_references(self, node: exp.Select, outputs: list[tuple[str, _Col]]) -> None:
        """ORDER BY / GROUP BY / DISTINCT ON may name an output by position (ORDER BY 1) or by
        its alias (ORDER BY x): those sort or group by the output's sources."""
        items: list[exp.Expr] = []
        for clause in ("order", "group"):
            container = node.args.get(clause)
            if container is not None:
                items.extend(container.expressions)
        distinct = node.args.get("distinct")
        on = distinct.args.get("on") if isinstance(distinct, exp.Distinct) else None
        if on is not None:
            items.extend(on.expressions if isinstance(on, exp.Tuple) else [on])
        aliases = {
            projection.alias: col
            for projection, (_, col) in zip(node.selects, outputs, strict=True)
            if isinstance(projection, exp.Alias)
        }
        for item in items:
            item = item.this if isinstance(item, exp.Ordered) else item
            if isinstance(item, exp.Literal) and item.is_int:
                position = int(item.this)
                if 1 <= position <= len(outputs):
                    self._as_predicate(outputs[position - 1][1])
                continue
            for column in _walk_scope(item):
                if isinstance(column, exp.Column) and not column.table and column.name in aliases:
                    self._as_predicate(aliases[column.name])

    def _as_predicate(self, col: _Col) -> None:
        self.analysis.columns_predicate |= col.sources
        self.analysis.other_uses |= col.sources

    def _join_key(self, scope: Scope, node: exp.Expr | None) -> bool:
        """`a.x = b.y` where both sides carry a base column unchanged: an equality join.

        A side that is a constant behind a derived column (`JOIN (SELECT '078-05-1120' AS s)
        x ON c.ssn = x.s`) is a probe, not a join key.
        """
        if not (
            isinstance(node, exp.EQ)
            and isinstance(node.left, exp.Column)
            and isinstance(node.right, exp.Column)
        ):
            return False
        for side in (node.left, node.right):
            try:
                col = self._column(scope, side)
            except GatewayError:
                return False  # not provably a join key: treat it as a probe
            if col.derivation != "direct" or not col.sources:
                return False
        return True

    def _check_table(self, table: exp.Table) -> None:
        if not isinstance(table.this, exp.Identifier):
            raise _deny("table functions are not supported", object=table.sql("postgres"))
        relation = self.catalog.resolve(table.name, table.db or None)
        if relation is None:
            raise _unknown(f"table {_display(table)} does not exist", object=_display(table))
        self.analysis.tables_read.add(relation.qualified)

    def _source(self, scope: Scope, name: str) -> exp.Table | Scope | None:
        current: Scope | None = scope
        while current is not None:
            source = current.sources.get(name)
            if source is not None:
                return source  # type: ignore[no-any-return]
            current = current.parent
        return None

    def _column(self, scope: Scope, column: exp.Column) -> _Col:
        if not column.table:
            if self._source(scope, column.name) is not None:
                raise _deny(
                    f"whole-row reference {column.name!r} is not supported; name the columns"
                )
            raise _unknown(f"column {column.name} does not resolve", object=column.name)
        source = self._source(scope, column.table)
        if source is None:
            raise _unknown(f"{column.table}.{column.name} does not resolve")
        if isinstance(source, exp.Table):
            relation = self.catalog.resolve(source.name, source.db or None)
            if relation is None or column.name not in relation.columns:
                target = f"{relation.qualified if relation else _display(source)}.{column.name}"
                raise _unknown(f"column {target} does not exist", object=target)
            return _Col(
                frozenset({f"{relation.qualified}.{column.name}"}),
                "direct",
                relation.columns[column.name],
            )
        outputs = self.outputs.get(id(source.expression))
        if outputs is None:
            # The recursive member of a CTE refers to itself: its anchor defines the columns.
            anchor = source.expression
            while isinstance(anchor, (exp.SetOperation, exp.Subquery)):
                anchor = anchor.left if isinstance(anchor, exp.SetOperation) else anchor.this
            outputs = self.outputs.get(id(anchor))
        for name, col in outputs or []:
            if name == column.name:
                return col
        raise _unknown(f"column {column.table}.{column.name} does not resolve")

    def _expr(self, scope: Scope, node: exp.Expr) -> _Col:
        if isinstance(node, exp.Column):
            return self._column(scope, node)
        if isinstance(node, exp.Subquery):
            inner = self._query_outputs(node)
            if len(inner) == 1:
                return inner[0][1]
        sources: set[str] = set()
        derivation: Derivation = "expression"
        for child in _walk_scope(node):
            if isinstance(child, exp.Column):
                col = self._column(scope, child)
                sources |= col.sources
                derivation = _max_derivation(derivation, col.derivation)
            elif isinstance(child, (exp.AggFunc, exp.Window)):
                derivation = "aggregate"
            elif isinstance(child, exp.Query) and child is not node:
                # A subquery inside an expression ((SELECT ssn …)::text, x IN (SELECT …)):
                # everything it outputs flows into this value.
                for _, col in self._query_outputs(child):
                    sources |= col.sources
                    derivation = _max_derivation(derivation, col.derivation)
        return _Col(frozenset(sources), derivation)

    def _query_outputs(self, node: exp.Expr) -> list[tuple[str, _Col]]:
        """The outputs of a (possibly parenthesised) query node; refuse if never analysed."""
        while isinstance(node, (exp.Subquery, exp.Paren)) and isinstance(node.this, exp.Expr):
            node = node.this
        outputs = self.outputs.get(id(node))
        if outputs is None:
            # Fail closed: a query whose lineage we did not compute must not pass as "none".
            raise _deny("a subquery could not be analysed")
        return outputs


def _returned(
    output: Output, target: Relation, flows: dict[str, tuple[set[str], Derivation]]
) -> Output:
    """A RETURNING output shows the *new* value: add what was written into its columns."""
    sources = set(output.sources)
    derivation: Derivation = output.derivation
    for column, (written, how) in flows.items():
        if f"{target.qualified}.{column}" in output.sources:
            sources |= written
            derivation = _max_derivation(derivation, how)
    if sources == set(output.sources):
        return output
    return Output(output.name, tuple(sorted(sources)), derivation, None)


def _output_name(projection: exp.Expr) -> str:
    """The column name PostgreSQL reports: the alias, else one derived from the expression."""
    name = projection.alias_or_name
    # sqlglot's qualifier names unaliased expressions _col_N; PostgreSQL does otherwise.
    if not re.fullmatch(r"_col_\d+", name):
        return name
    # A scalar subquery carries the generated name itself; other expressions in an Alias.
    node = projection.this if isinstance(projection, exp.Alias) else projection
    return _figure_name(node) or "?column?"


def _figure_name(node: exp.Expr) -> str | None:
    """PostgreSQL's FigureColname, for the shapes that matter: columns, casts, calls, subqueries."""
    while isinstance(node, exp.Paren):
        node = node.this
    if isinstance(node, exp.Column):
        return node.name
    if isinstance(node, exp.Cast):
        return _figure_name(node.this) or node.to.sql(dialect="postgres").lower()
    if isinstance(node, exp.Subquery):
        inner = node.this
        while isinstance(inner, exp.Subquery):
            inner = inner.this
        if isinstance(inner, exp.Select) and inner.selects:
            return _output_name(inner.selects[0])
        return None
    if isinstance(node, exp.Case):
        return "case"
    if isinstance(node, exp.Window):
        return _figure_name(node.this)
    if isinstance(node, exp.Func):
        return function_name(node) or None
    return None


def _is_recursive_cte(node: exp.Expr) -> bool:
    cte = node.parent
    while isinstance(cte, (exp.Subquery, exp.Paren)):
        cte = cte.parent
    return (
        isinstance(cte, exp.CTE)
        and isinstance(cte.parent, exp.With)
        and bool(cte.parent.args.get("recursive"))
    )


def _walk_scope(node: exp.Expr) -> Iterator[exp.Expr]:
    """Yield nodes of one scope, stopping at (but yielding) nested queries."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        if isinstance(current, exp.Query) and current is not node:
            continue
        stack.extend(current.iter_expressions())


def _in_predicate(node: exp.Expr, root: exp.Expr | None) -> bool:
    """Whether ``node`` sits in a clause of ``root`` that decides which rows appear."""
    child = node
    parent = node.parent
    while parent is not None and parent is not root:
        if isinstance(
            parent,
            (exp.Where, exp.Having, exp.Group, exp.Order, exp.Qualify, exp.Limit, exp.Offset,
             exp.Fetch),
        ):
            # LIMIT/OFFSET included: a subquery there turns a value into a row count.
            return True
        if isinstance(parent, exp.Window) and child is not parent.this:
            return True
        if isinstance(parent, exp.Join) and child is not parent.this:
            return True
        if isinstance(parent, exp.Distinct) and child is parent.args.get("on"):
            return True
        child, parent = parent, parent.parent
    if parent is root and root is not None and isinstance(root, exp.Select):
        return child.arg_key in (
            "where", "having", "group", "order", "qualify", "joins", "limit", "offset"
        )
    return False


# --- helpers -----------------------------------------------------------------------------


def _origin(exc: BaseException) -> str:
    """``module.py:line`` of the frame that raised ``exc``: a trace without its message."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return "?"
    return f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}"


def _display(table: exp.Table) -> str:
    return f"{table.db}.{table.name}" if table.db else table.name


_MAX_PAREN_DEPTH = 64
_MAX_BRACKET_DEPTH = 4
_MAX_BRACKETS = 256


def _check_nesting(sql: str) -> None:
    """Refuse bracket nesting sqlglot's parser handles exponentially (``ARRAY[`` 22 deep takes
    a minute), by counting tokens before parsing: linear time, whatever the text."""
    try:
        tokens = _DIALECT.tokenize(sql)
    except (TokenError, TypeError, ValueError) as exc:
        raise BadRequest("sql_parse_error", "the SQL could not be tokenised") from exc
    paren = bracket = brackets = 0
    for token in tokens:
        kind = token.token_type
        if kind == TokenType.L_PAREN:
            paren += 1
            if paren > _MAX_PAREN_DEPTH:
                raise BadRequest("sql_too_complex", f"parentheses nest deeper than {_MAX_PAREN_DEPTH}")
        elif kind == TokenType.R_PAREN:
            paren -= 1
        elif kind == TokenType.L_BRACKET:
            bracket += 1
            brackets += 1
            if bracket > _MAX_BRACKET_DEPTH or brackets > _MAX_BRACKETS:
                raise BadRequest("sql_too_complex", "array brackets nest too deeply or too often")
        elif kind == TokenType.R_BRACKET:
            bracket -= 1


def _alter_action(action: exp.Expr) -> str:
    """A stable name for an ALTER TABLE action; "drop" and "alter_type" destroy data."""
    if isinstance(action, exp.Drop):
        return "drop"
    if isinstance(action, exp.AlterColumn) and action.args.get("dtype") is not None:
        # A type change rewrites every value (ALTER … TYPE integer USING 0 erases the column).
        return "alter_type"
    return action.key


def _check_ddl_kind(operation: str, kind: str) -> None:
    if kind not in _DDL_OBJECTS.get(operation, frozenset()):
        raise Forbidden(
            "unsupported_statement",
            f"{operation.upper()} {kind.upper() or '?'} is not supported by the gateway",
        )


def _check_depth(tree: exp.Expr) -> None:
    """Refuse trees deeper than we are willing to walk recursively."""
    stack: list[tuple[exp.Expr, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_DEPTH:
            raise BadRequest("sql_too_complex", f"the SQL nests deeper than {_MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in node.iter_expressions())


def _check_placeholders(tree: exp.Expr) -> int:
    """PostgreSQL's $n parameters only; return how many the statement expects."""
    highest = 0
    for node in tree.find_all(exp.Placeholder, exp.Parameter):
        if isinstance(node, exp.Placeholder):
            raise _deny("only PostgreSQL $n parameters are supported (not ?, :name or %s)")
        value = node.this
        if not (isinstance(value, exp.Literal) and value.this.isdigit()):
            raise _deny("only PostgreSQL $n parameters are supported")
        number = int(value.this)
        if number < 1:
            raise _deny("parameters are numbered from $1")
        highest = max(highest, number)
    return highest


_LITERAL_TOKENS = frozenset({TokenType.NUMBER, TokenType.STRING, TokenType.NATIONAL_STRING,
                             TokenType.HEREDOC_STRING, TokenType.BIT_STRING, TokenType.HEX_STRING,
                             TokenType.BYTE_STRING})


def _introspection(sql: str, catalog: Catalog) -> QueryFacts | None:
    """Facts of a query of system catalogs only (app/introspection.py), else None."""
    tree = grammar.parse_tree(sql)
    tables = introspection.relations(tree)
    if tables is None:
        return None
    names = introspection.functions(tree)
    settings = introspection.setting_reads(tree)  # checks every current_setting call
    for name in names:
        if not introspection.DECOMPILERS.match(name) and name != introspection.SETTING_READER:
            check_function(name)
    return QueryFacts(
        fingerprint=_fingerprint(sql), kind="select", tables_read=tables, functions=names,
        param_count=introspection.parameters(tree), catalog_version=catalog.version,
        introspection=True, setting_params=settings,
    )


def _fingerprint(sql: str) -> str:
    """sha256 of the token stream with literals replaced and case, spacing and comments
    folded, so statements that differ only in values or layout share a fingerprint."""
    parts = []
    previous = None
    for token in _DIALECT.tokenize(sql):
        if token.token_type in _LITERAL_TOKENS and previous != TokenType.PARAMETER:
            # ($1 is PARAMETER then NUMBER: its number is the parameter, not a value.)
            parts.append("?")
        elif token.token_type in (TokenType.IDENTIFIER,):
            parts.append(f'"{token.text}"')  # quoted: case matters
        else:
            parts.append(token.text.lower())
        previous = token.token_type
    return "sha256:" + hashlib.sha256(" ".join(parts).encode()).hexdigest()


def _reject_select_extras(tree: exp.Expr) -> None:
    for select in tree.find_all(exp.Query):
        if select.args.get("into") is not None:
            raise _deny("SELECT … INTO creates a table; use CREATE TABLE through policy")
        if select.args.get("locks"):
            raise _deny("locking clauses (FOR UPDATE/SHARE) are not supported")
    _reject_with_writes(tree)


# What PostgreSQL applies to a parenthesised query when written after it.
_TRAILING_MODIFIERS = ("order", "limit", "offset", "locks")


def _lift_parenthesised_modifiers(tree: exp.Expr) -> None:
    """Move ORDER BY / LIMIT / OFFSET / FETCH / FOR UPDATE written after a parenthesised query
    into that query, as PostgreSQL's grammar does (insertSelectOptions): sqlglot leaves them
    on the parentheses, where neither the qualifier nor the scope walk reads them, so
    `((SELECT id FROM customers) ORDER BY ssn LIMIT 1)` would hide a predicate column."""
    for wrapper in list(tree.find_all(exp.Subquery)):  # outermost first: nested parentheses
        inner = wrapper.this
        if not isinstance(inner, exp.Query):
            continue
        for key in _TRAILING_MODIFIERS:
            value = wrapper.args.get(key)
            if not value:
                continue
            if inner.args.get(key):
                # PostgreSQL: "multiple ORDER BY clauses not allowed" (and LIMIT, OFFSET, …).
                raise BadRequest(
                    "sql_parse_error", f"multiple {key.upper()} clauses are not allowed"
                )
            wrapper.set(key, None)
            inner.set(key, value)


def _reject_with_writes(tree: exp.Expr) -> None:
    """Data-modifying statements nested anywhere (a writable CTE) are refused, and so is a
    WITH in front of a write (its CTEs would not be analysed)."""
    for node in tree.find_all(*_WRITE_NODES, *_DDL_NODES, exp.Command):
        if node is not tree:
            raise _deny("data-modifying statements inside a query (writable CTEs) are refused")
    if isinstance(tree, _WRITE_NODES) and tree.args.get("with_") is not None:
        raise _deny("WITH in front of INSERT/UPDATE/DELETE is not supported")
    for cast in tree.find_all(exp.Cast, exp.TryCast):
        if cast.to.sql(dialect="postgres").lower().startswith("reg"):
            # 'hidden.vault'::regclass resolves any relation (or role, type, function) by
            # name, outside the catalog the gateway governs.
            raise _deny("casts to object-identifier types (regclass, regproc, …) are refused")


def _qualify_tables(tree: exp.Expr, catalog: Catalog) -> None:
    """Give every catalog table its schema, as PostgreSQL's search_path would; CTEs stay."""
    for table in list(tree.find_all(exp.Table)):
        if not isinstance(table.this, exp.Identifier):
            raise _deny("table functions are not supported", object=table.sql("postgres"))
        if table.args.get("catalog") is not None:
            raise _unknown(f"cross-database reference {table.sql('postgres')} is not supported")
        if table.db or _is_cte_reference(table):
            continue
        relation = catalog.resolve(table.name, None)
        if relation is None:
            raise _unknown(f"table {table.name} does not exist", object=table.name)
        table.set("db", exp.to_identifier(relation.schema))
    for node in tree.find_all(exp.Unnest, exp.Lateral):
        if isinstance(node, exp.Lateral) and isinstance(node.this, exp.Subquery):
            continue
        raise _deny("table functions (unnest, LATERAL function calls) are not supported")


def _is_cte_reference(table: exp.Table) -> bool:
    """Whether an unqualified name refers to a CTE visible at this point (PostgreSQL rules)."""
    child: exp.Expr = table
    parent = table.parent
    while parent is not None:
        with_ = parent.args.get("with_") if isinstance(parent, exp.Query) else None
        if isinstance(parent, exp.With):
            with_ = parent
        if isinstance(with_, exp.With):
            ctes = with_.expressions
            recursive = bool(with_.args.get("recursive"))
            inside = next((i for i, cte in enumerate(ctes) if child is cte), None)
            # Non-recursive: a CTE sees only the ones defined before it; recursive: all.
            visible = ctes if recursive or inside is None else ctes[:inside]
            if any(cte.alias_or_name == table.name for cte in visible):
                return True
        child, parent = parent, parent.parent
    return False


def _from_tables(from_: exp.Expr | None) -> list[exp.Expr]:
    if from_ is None:
        return []
    return [from_.this.copy()]


def _join_tables(joins: list[exp.Expr] | None) -> list[exp.Expr]:
    return [j.copy() for j in joins or []]


def _synthetic(
    projections: list[exp.Expr],
    table: exp.Table,
    alias: str,
    extra: list[exp.Expr],
    where: exp.Expr | None,
) -> exp.Select:
    """SELECT projections FROM target AS alias, extra… WHERE where — for analysis only."""
    target = table.copy()
    target.set("alias", exp.TableAlias(this=exp.to_identifier(alias)))
    select = exp.Select(expressions=projections or [exp.null()])
    select.set("from_", exp.From(this=target))
    joins = [j if isinstance(j, exp.Join) else exp.Join(this=j) for j in extra]
    if joins:
        select.set("joins", joins)
    if where is not None:
        select.set("where", exp.Where(this=where.copy()))
    return select


def _returning(
    tree: exp.Expr, table: exp.Table, alias: str, extra: list[exp.Expr]
) -> exp.Select | None:
    returning = tree.args.get("returning")
    if returning is None:
        return None
    projections = [e.copy() for e in returning.expressions]
    return _synthetic(projections, table, alias, [e.copy() for e in extra], None)


def _limit(tree: exp.Expr) -> int | None:
    limit = tree.args.get("limit") or tree.args.get("fetch")
    if limit is None:
        return None
    value = limit.args.get("expression") or limit.args.get("count")
    if isinstance(value, exp.Literal) and value.is_int:
        return int(value.this)
    return None


def _trivially_true(where: exp.Expr | None) -> bool:
    """A WHERE that bounds nothing: it may keep every row, or it cannot tell rows apart.

    Syntactic and conservative (docs/approvals.md, "How a WHERE is judged unbounded"): a
    condition is unbounded when it reads no column (a constant, a cast of one, `$1`, a
    subquery that reads no column, `current_user = 'x'`: the same value for every row), an
    `x = x`-style identity, `x IS NOT NULL` (the catalog does not know which columns are NOT
    NULL), `x IN (…, x, …)`, or an OR whose branches cover every case (`id <> 0 OR id = 0`,
    `a OR NOT a`); AND is unbounded only if both sides are.
    """
    if where is None:
        return False
    condition = where.this if isinstance(where, exp.Where) else where
    return _always_true(condition)


def _strip(node: exp.Expr | None) -> exp.Expr | None:
    while isinstance(node, exp.Paren):
        node = node.this
    return node


def _same(left: exp.Expr | None, right: exp.Expr | None) -> bool:
    """Equal expressions, where `orders.id` and `id` count as the same column."""
    left, right = _strip(left), _strip(right)
    if left is None or right is None:
        return False
    if isinstance(left, exp.Column) and isinstance(right, exp.Column):
        return left.name == right.name and (
            not left.table or not right.table or left.table == right.table
        )
    return left == right


def _row_independent(node: exp.Expr) -> bool:
    """Reads no column, not even in a subquery: one value for the whole statement, so the
    condition keeps every row or none (`true::boolean`, `(SELECT true)`, `$1`, `now() > …`)."""
    return node.find(exp.Column) is None


# The orders a comparison admits between its two sides; NOT takes the complement.
_ORDERS = frozenset("<=>")
_ADMITS: dict[type[exp.Expr], frozenset[str]] = {
    exp.EQ: frozenset("="), exp.NEQ: frozenset("<>"), exp.LT: frozenset("<"),
    exp.LTE: frozenset("<="), exp.GT: frozenset(">"), exp.GTE: frozenset(">="),
}
_MIRROR = str.maketrans("<>", "><")


def _comparison(node: exp.Expr) -> tuple[exp.Expr, exp.Expr, frozenset[str]] | None:
    """(left, right, the orders between them it admits) for `a op b` and `NOT a op b`."""
    negated = False
    current = _strip(node)
    while isinstance(current, exp.Not):
        negated = not negated
        current = _strip(current.this)
    if not isinstance(current, exp.Binary):
        return None
    admits = _ADMITS.get(type(current))
    if admits is None:
        return None
    return current.left, current.right, _ORDERS - admits if negated else admits


def _disjuncts(node: exp.Expr) -> list[exp.Expr]:
    node = _strip(node) or node
    if isinstance(node, exp.Or):
        return _disjuncts(node.left) + _disjuncts(node.right)
    return [node]


def _complementary(disjuncts: list[exp.Expr]) -> bool:
    """Branches that together admit every case: `id <> 0 OR id = 0`, `x < $1 OR x >= $1`,
    `0 > id OR id >= 0`, `a OR NOT a` (NULLs aside, which only ever keep fewer rows)."""
    covered: list[tuple[exp.Expr, exp.Expr, set[str]]] = []
    for branch in disjuncts:
        found = _comparison(branch)
        if found is None:
            continue
        left, right, admits = found
        for seen_left, seen_right, seen in covered:
            if _same(left, seen_left) and _same(right, seen_right):
                seen |= admits
            elif _same(left, seen_right) and _same(right, seen_left):
                seen |= set("".join(sorted(admits)).translate(_MIRROR))
            else:
                continue
            if seen >= _ORDERS:
                return True
            break
        else:
            covered.append((left, right, set(admits)))
    for branch in disjuncts:
        stripped = _strip(branch)
        if isinstance(stripped, exp.Not) and any(
            other is not branch and _same(other, stripped.this) for other in disjuncts
        ):
            return True
    return False


def _always_false(node: exp.Expr) -> bool:
    """May be false (not NULL) for every row: the complement of _always_true, for NOT."""
    node = _strip(node) or node
    if _row_independent(node):
        return True
    if isinstance(node, exp.Or):
        return _always_false(node.left) and _always_false(node.right)
    if isinstance(node, exp.And):
        return _always_false(node.left) or _always_false(node.right)
    if isinstance(node, (exp.NEQ, exp.LT, exp.GT)) and _same(node.left, node.right):
        return True
    if isinstance(node, exp.Is):
        tested, negated = node.expression, bool(node.args.get("negate"))
        if isinstance(tested, exp.Null):
            # `x IS NULL` is false for every row when x is NOT NULL, which the catalog cannot
            # tell: so `x IS NOT NULL` counts as keeping every row.
            return not negated
        if isinstance(tested, exp.Boolean):
            if tested.this != negated:  # IS TRUE, IS NOT FALSE
                return _always_false(node.this)
            return _always_true(node.this)
    if isinstance(node, exp.Not):
        return _always_true(node.this)
    return False


def _always_true(node: exp.Expr) -> bool:
    """May keep every row (conservatively: when in doubt between "bounds" and "does not
    bound", the answer is "does not bound")."""
    node = _strip(node) or node
    if _row_independent(node):
        return True
    if isinstance(node, exp.Or):
        branches = _disjuncts(node)
        return any(_always_true(branch) for branch in branches) or _complementary(branches)
    if isinstance(node, exp.And):
        return _always_true(node.left) and _always_true(node.right)
    if isinstance(node, exp.Not):
        return _always_false(node.this)
    if isinstance(node, (exp.EQ, exp.GTE, exp.LTE, exp.NullSafeEQ)) and _same(node.left, node.right):
        return True
    if isinstance(node, exp.Between) and _same(node.this, node.args.get("low")) and _same(
        node.this, node.args.get("high")
    ):
        return True
    if isinstance(node, exp.In) and any(_same(node.this, item) for item in node.expressions):
        return True
    if isinstance(node, exp.Is):
        tested, negated = node.expression, bool(node.args.get("negate"))
        if isinstance(tested, exp.Null):
            return negated  # `x IS NOT NULL`: see _always_false
        if isinstance(tested, exp.Boolean):
            if tested.this != negated:  # IS TRUE, IS NOT FALSE
                return _always_true(node.this)
            return _always_false(node.this)
    # `x::boolean`: what is cast decides.
    if isinstance(node, (exp.Cast, exp.TryCast)) and node.to.is_type(exp.DataType.Type.BOOLEAN):
        return _always_true(node.this)
    return False
