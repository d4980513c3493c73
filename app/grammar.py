"""PostgreSQL's reading of the text: libpg_query's parser, before sqlglot reads anything.

sqlglot is a model of PostgreSQL's grammar, and a model is slightly wrong where it matters
most: it reads ``SELECT 1é`` as ``SELECT 1 AS é`` (PostgreSQL: trailing junk), ``0o17`` as
``0 AS o17``, ``1_000`` as ``1 AS _000`` and ``LISTEN x`` as an alias. So the text that will
run is first read by PostgreSQL's own parser (libpg_query, PostgreSQL 18's grammar, through
the BSD-licensed ``postgast`` binding), and the two readings must agree:

- ``read(sql)`` → ``PgReading``: the statements (kind, output names, DDL object) and the
  tokens (kind + byte span) as PostgreSQL sees them. Text PostgreSQL cannot read is refused.
- ``single_statement(reading)``: exactly one statement, of a kind the gateway models.
- ``check_agreement(reading, sql, trees)``: sqlglot's trees say the same (statement kind,
  output names, DDL object, and every literal, parameter and identifier token the same
  span); else ``grammar_mismatch``.
- ``schema_qualifiers(sql)`` / ``rewrite_schemas(sql, mapping)``: the exact byte spans of
  the schema qualifiers of relation references, and a rewrite of exactly those bytes.

Errors raised (all GatewayError)::

    BadRequest      400 sql_parse_error        NUL, lone surrogate, PostgreSQL syntax error,
                                               junk after a parameter (PostgreSQL 16), no statement
    BadRequest      400 sql_too_complex        nesting beyond what the parser safely returns
    PayloadTooLarge 413 sql_too_large          over ``max_bytes``
    Forbidden       403 multiple_statements    PostgreSQL sees more than one statement
    Forbidden       403 unsupported_statement  a statement kind the gateway does not model
    Forbidden       403 grammar_mismatch       PostgreSQL and sqlglot read the text differently
    Forbidden       403 unsupported_construct  a database-qualified name, a U& qualifier; a
                                               ?, :name or %s placeholder PostgreSQL stumbles on
    RuntimeError                               rewrite_schemas' own check failed (a bug: 500)

Messages never quote the text: PostgreSQL's syntax errors do (``at or near "1é"``), and
the quoted fragment may be a literal; only the position and a generic description are kept.

The parse tree comes from libpg_query's JSON output (``pg_query_parse``, declared by
``postgast.native``), not postgast's protobuf one: the protobuf decoder gives up at 100
levels, which real queries reach, and the JSON one is faster. Both writers recurse in C, so
a tree deep enough overflows the C stack and kills the process (``1+1+…`` 40 000 terms):
``_check_depth`` bounds the depth from the tokens before the parser is called. (libpg_query's
error ``cursorpos`` counts characters, not bytes as postgast's docstring says; tokens and
tree locations count bytes.)
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, NoReturn

import orjson
import postgast
from postgast import native, pg_query_pb2
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType  # type: ignore[attr-defined]

from app.errors import BadRequest, Forbidden, PayloadTooLarge

_DIALECT = Dialect.get_or_raise("postgres")
_NAMEDATALEN = 64
# An upper bound of the parse tree's depth, in tokens (see _check_depth). libpg_query's JSON
# writer overflows an 8 MiB stack beyond ~40 000 levels; sqlglot's side refuses trees deeper
# than 200 levels anyway, so this only has to be far below the one and far above the other.
MAX_TOKEN_DEPTH = 8000

# Characters the scanner returns as themselves have no name of their own ("\x08" is 8).
_TOKEN_NAMES: dict[int, str] = {n: f"ASCII_{n}" for n in range(256)} | {
    v: k for k, v in pg_query_pb2.Token.items()
}
_STMT_NAMES: dict[str, str] = {
    f.message_type.name: f.name for f in pg_query_pb2.Node.DESCRIPTOR.oneofs_by_name["node"].fields
}
_OPEN = frozenset({"ASCII_40", "ASCII_91"})
_CLOSE = frozenset({"ASCII_41", "ASCII_93"})
_COMMENTS = frozenset({"SQL_COMMENT", "C_COMMENT"})
_SET_OPERATIONS = frozenset({"UNION", "INTERSECT", "EXCEPT"})
_NOT_A_NAME = frozenset({"Op", "ICONST", "FCONST", "PARAM", "SCONST", "TYPECAST"})
# PostgreSQL 16's lexer: ``$n`` followed by an identifier character is "trailing junk after
# parameter". libpg_query 18 reads ``$1é`` as ``$1 AS é``, PostgreSQL 16 refuses it (and
# quotes half of the ``é`` in its message, which asyncpg cannot decode).
_IDENT_START = re.compile(rb"[A-Za-z0-9_\x80-\xff]")


class Token(NamedTuple):
    """One token of PostgreSQL's scanner: its kind and byte span (end exclusive)."""

    kind: str  # libpg_query's token name: "IDENT", "SELECT", "ICONST", "ASCII_40" (a "("), …
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class PgStatement:
    """What PostgreSQL's parse tree says about one statement."""

    kind: str  # the tree's node kind: "select_stmt", "insert_stmt", "listen_stmt", …
    # The outputs a SELECT (its leftmost arm), VALUES or RETURNING list gives, each its
    # explicit name (AS …) or None; None for statements without outputs.
    outputs: tuple[str | None, ...] | None = None
    object_kind: str | None = None  # DDL: "table", "index", "view", "materialized view", …
    temporary: bool = False  # creates a temporary relation
    into: bool = False  # SELECT … INTO


@dataclass(frozen=True, slots=True)
class PgReading:
    """PostgreSQL's reading of a text: its statements and its tokens."""

    statements: tuple[PgStatement, ...]
    tokens: tuple[Token, ...]

    @property
    def kinds(self) -> tuple[str, ...]:
        """The node kind of each statement."""
        return tuple(s.kind for s in self.statements)


# --- reading ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def read(sql: str, max_bytes: int | None = None) -> PgReading:
    """PostgreSQL's reading of ``sql``, or a GatewayError when PostgreSQL cannot read it.

    A pure function of the text, answered from a bounded cache: the wire protocol reads a
    statement at every Parse, and clients parse the same few texts again and again (an
    error is not cached; it is raised again).
    """
    _, tokens, tree = _parse(sql, max_bytes)
    return PgReading(tuple(_statement(s) for s in tree.get("stmts", ())), tokens)


def parse_tree(sql: str) -> dict[str, Any]:
    """PostgreSQL's parse tree of ``sql`` (libpg_query's JSON), for a text ``read`` accepted."""
    return _parse(sql, None)[2]


def mentions_system_schema(sql: str, reading: PgReading) -> bool:
    """Whether a name in the text could be a system catalog's (``pg_…``, information_schema):
    a token test, so most statements are not parsed twice."""
    raw = sql.encode()
    for token in reading.tokens:
        if token.kind == "IDENT":
            text = raw[token.start:token.end].lower().strip(b'"')
            if text.startswith(b"pg_") or text == b"information_schema":
                return True
    return False


def statement_tree(sql: str) -> dict[str, Any]:
    """The node of the first statement of ``sql`` in PostgreSQL's parse tree (libpg_query's
    JSON: C field names, ``{"A_Const": {"sval": {"sval": …}}}`` for constants)."""
    _, _, tree = _parse(sql, None)
    ((_, body),) = tree["stmts"][0]["stmt"].items()
    return body  # type: ignore[no-any-return]


def single_statement(reading: PgReading) -> PgStatement:
    """The one statement of ``reading``, if it is of a kind the gateway models."""
    if not reading.statements:
        raise BadRequest("sql_parse_error", "the SQL text holds no statement")
    if len(reading.statements) > 1:
        raise Forbidden(
            "multiple_statements",
            f"exactly one statement per request is allowed; found {len(reading.statements)}",
        )
    statement = reading.statements[0]
    if statement.kind not in MODELLED_KINDS:
        label = statement.kind.removesuffix("_stmt").replace("_", " ").upper()
        raise Forbidden(
            "unsupported_statement", f"statement kind {label} is not supported by the gateway"
        )
    return statement


def _parse(sql: str, max_bytes: int | None) -> tuple[bytes, tuple[Token, ...], dict[str, Any]]:
    if "\x00" in sql:
        # libpg_query reads a C string: it would stop at the NUL and read a shorter text.
        raise BadRequest("sql_parse_error", "the SQL text contains a NUL character")
    try:
        raw = sql.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(
            "sql_parse_error", "the SQL text is not valid Unicode (a lone surrogate)"
        ) from exc
    if max_bytes is not None and len(raw) > max_bytes:
        raise PayloadTooLarge("sql_too_large", f"the SQL text is larger than {max_bytes} bytes")
    try:
        scanned = postgast.scan(sql)
    except postgast.PgQueryError as exc:
        raise _syntax_error(exc.message, exc.cursorpos) from exc
    except UnicodeDecodeError as exc:
        raise BadRequest("sql_parse_error", "PostgreSQL cannot read the SQL") from exc
    names, new = _TOKEN_NAMES, tuple.__new__  # the hot loop: ~0.6 µs a token
    tokens = tuple([new(Token, (names.get(t.token, "?"), t.start, t.end)) for t in scanned.tokens])
    _check_depth(tokens)
    _check_parameters(raw, tokens)
    result = native.lib.pg_query_parse(raw)
    try:
        if result.error:
            error = result.error.contents
            message = error.message.decode("utf-8", "replace") if error.message else ""
            # cursorpos counts characters (PostgreSQL converts it), from 1; tokens count bytes.
            at = len(sql[: error.cursorpos - 1].encode("utf-8")) if error.cursorpos > 0 else len(raw)
            if _foreign_placeholder(raw, tokens, at):
                raise Forbidden(
                    "unsupported_construct",
                    "only PostgreSQL $n parameters are supported (not ?, :name or %s)",
                )
            raise _syntax_error(message, error.cursorpos)
        text = result.parse_tree
    finally:
        native.lib.pg_query_free_parse_result(result)
    try:
        tree = orjson.loads(text)
    except orjson.JSONDecodeError as exc:  # deeper than orjson's 1024 levels
        raise BadRequest("sql_too_complex", "the SQL nests too deeply") from exc
    return raw, tokens, tree


def _check_depth(tokens: Sequence[Token]) -> None:
    """Refuse a text whose parse tree could be deep enough to overflow the C parser's stack.

    A node's ancestors consumed tokens on its path: the tokens before it in each enclosing
    bracket, counted from the last comma at that level (list items are siblings, not
    ancestors), plus every UNION/INTERSECT/EXCEPT of the level (their arms hold commas).
    Nesting that grows the parser's own stack (prefix operators, brackets) is bounded at
    10 000 by the parser; left-deep chains (``a+b+…``, ``ISNULL ISNULL …``, joins, set
    operations) are not, and are what this bounds.
    """
    items = [0]
    setops = [0]
    total = 0
    for token in tokens:
        kind = token.kind
        if kind in _COMMENTS:
            continue
        if kind in _CLOSE:
            if len(items) > 1:
                total -= items.pop() + setops.pop()
            continue
        if kind == "ASCII_44":
            total -= items[-1]
            items[-1] = 0
            continue
        items[-1] += 1
        total += 1
        if kind in _SET_OPERATIONS:
            setops[-1] += 1
            total += 1
        if total > MAX_TOKEN_DEPTH:
            raise BadRequest("sql_too_complex", "the SQL nests or chains too deeply to be parsed")
        if kind in _OPEN:
            items.append(0)
            setops.append(0)


def _check_parameters(raw: bytes, tokens: Sequence[Token]) -> None:
    """Refuse what PostgreSQL 16's lexer refuses and libpg_query 18 reads: ``$1x``, ``$1_0``."""
    for token in tokens:
        if token.kind == "PARAM" and _IDENT_START.match(raw, token.end):
            raise BadRequest(
                "sql_parse_error",
                "PostgreSQL cannot parse the SQL: trailing junk after parameter at position "
                f"{_char_position(raw, token.start)}",
            )


def _foreign_placeholder(raw: bytes, tokens: Sequence[Token], error: int) -> bool:
    """Whether PostgreSQL stumbled on another driver's placeholder (``?``, ``:name``, ``%s``).

    Said so, rather than "syntax error", to tell the client what to use instead.
    """
    at = next((i for i, t in enumerate(tokens) if t.start >= error), len(tokens))
    for i in (at - 1, at):
        if not 0 <= i < len(tokens):
            continue
        token = tokens[i]
        text = raw[token.start:token.end]
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        adjacent = following is not None and following.start == token.end
        if text == b"?":
            return True
        if adjacent and following is not None and (
            (text == b":" and following.kind not in _NOT_A_NAME
             and not following.kind.startswith("ASCII_"))
            or (text == b"%" and raw[following.start:following.end] in (b"s", b"("))
        ):
            return True
    return False


def _syntax_error(message: str, cursorpos: int) -> BadRequest:
    """PostgreSQL's error without the fragment of the text it quotes."""
    if message.startswith(("memory exhausted", "stack depth limit exceeded")):
        return BadRequest("sql_too_complex", "the SQL nests too deeply for PostgreSQL's parser")
    head = message.split(" at or near ", 1)[0]
    if not re.fullmatch(r"[A-Za-z0-9 ,()/*_-]+", head):
        head = "syntax error"  # the message might quote the text some other way
    where = f" at position {cursorpos}" if cursorpos > 0 else ""  # in characters, from 1
    return BadRequest("sql_parse_error", f"PostgreSQL cannot parse the SQL: {head}{where}")


def _char_position(raw: bytes, byte_offset: int) -> int:
    """1-based character position of a byte offset, as people count."""
    return len(raw[:byte_offset].decode("utf-8", "ignore")) + 1


def _statement(raw_stmt: dict[str, Any]) -> PgStatement:
    ((name, body),) = raw_stmt["stmt"].items()
    kind = _STMT_NAMES.get(name, name)
    if kind == "select_stmt":
        leftmost = _leftmost(body)
        if "valuesLists" in leftmost:
            first = leftmost["valuesLists"][0]["List"].get("items", ())
            outputs: tuple[str | None, ...] = (None,) * len(first)
        else:
            outputs = tuple(t["ResTarget"].get("name") for t in leftmost.get("targetList", ()))
        into = "intoClause" in body or "intoClause" in leftmost
        temporary = into and _temporary((body.get("intoClause") or leftmost["intoClause"])["rel"])
        return PgStatement(kind, outputs, into=into, temporary=temporary)
    if kind in ("insert_stmt", "update_stmt", "delete_stmt", "merge_stmt"):
        returning = body.get("returningClause", {}).get("exprs", ())
        return PgStatement(kind, tuple(t["ResTarget"].get("name") for t in returning))
    if kind == "create_stmt":
        return PgStatement(kind, object_kind="table", temporary=_temporary(body["relation"]))
    if kind == "create_table_as_stmt":
        rel = body.get("into", {}).get("rel", {})
        return PgStatement(kind, object_kind=_object(body.get("objtype")), temporary=_temporary(rel))
    if kind == "view_stmt":
        return PgStatement(kind, object_kind="view", temporary=_temporary(body.get("view", {})))
    if kind == "index_stmt":
        return PgStatement(kind, object_kind="index")
    if kind == "truncate_stmt":
        return PgStatement(kind, object_kind="table")
    if kind == "drop_stmt":
        return PgStatement(kind, object_kind=_object(body.get("removeType")))
    if kind == "alter_table_stmt":
        return PgStatement(kind, object_kind=_object(body.get("objtype")))
    if kind == "rename_stmt":
        target = body.get("renameType")
        if target in ("OBJECT_COLUMN", "OBJECT_TABCONSTRAINT", "OBJECT_TRIGGER", "OBJECT_POLICY",
                      "OBJECT_RULE"):
            target = body.get("relationType")  # RENAME COLUMN … of a table, a view, …
        return PgStatement(kind, object_kind=_object(target))
    return PgStatement(kind)


def _leftmost(select: dict[str, Any]) -> dict[str, Any]:
    while select.get("op", "SETOP_NONE") != "SETOP_NONE":
        select = select["larg"]
    return select


def _temporary(rel: dict[str, Any]) -> bool:
    return bool(rel.get("relpersistence") == "t")


def _object(objtype: str | None) -> str | None:
    if objtype is None:
        return None
    name = objtype.removeprefix("OBJECT_")
    return {"MATVIEW": "materialized view"}.get(name, name.lower().replace("_", " "))


# --- agreement with sqlglot ------------------------------------------------------------------

# The statement kinds the gateway models; any other is unsupported_statement before sqlglot runs.
MODELLED_KINDS: frozenset[str] = frozenset({
    "select_stmt", "insert_stmt", "update_stmt", "delete_stmt", "merge_stmt",
    "create_stmt", "create_table_as_stmt", "index_stmt", "view_stmt",
    "alter_table_stmt", "rename_stmt", "drop_stmt", "truncate_stmt",
})
_STRING_TYPES = frozenset({
    TokenType.STRING, TokenType.BYTE_STRING, TokenType.NATIONAL_STRING,
    TokenType.HEREDOC_STRING, TokenType.RAW_STRING, TokenType.UNICODE_STRING,
})
_LITERAL_TYPES = _STRING_TYPES | {TokenType.NUMBER, TokenType.BIT_STRING, TokenType.HEX_STRING}
_PG_LITERALS = frozenset({"ICONST", "FCONST", "PARAM", "SCONST", "USCONST", "BCONST", "XCONST"})
_CHECKED = _PG_LITERALS | {"IDENT", "UIDENT"}


def check_agreement(reading: PgReading, sql: str, trees: Sequence[exp.Expr]) -> None:
    """Refuse (``grammar_mismatch``) when sqlglot's ``trees`` read ``sql`` unlike PostgreSQL."""
    if len(trees) != len(reading.statements):
        _mismatch(f"PostgreSQL sees {len(reading.statements)} statement(s), the gateway {len(trees)}")
    for statement, tree in zip(reading.statements, trees, strict=True):
        if isinstance(tree, exp.Command):
            continue  # sqlglot does not claim to understand it; the extractor refuses it
        expected = _sqlglot_kinds(tree)
        if statement.kind not in expected:
            _mismatch(f"PostgreSQL reads {statement.kind}, the gateway {tree.key}")
        outputs = _sqlglot_outputs(tree)
        if statement.outputs is not None and outputs is not None and outputs != statement.outputs:
            _mismatch("the outputs differ (count or names)")
        if statement.object_kind is not None and statement.object_kind != _sqlglot_object(tree):
            _mismatch(f"PostgreSQL reads a {statement.object_kind}, the gateway does not")
        if statement.temporary and isinstance(tree, exp.Create) and not _sqlglot_temporary(tree):
            _mismatch("PostgreSQL reads a temporary relation, the gateway does not")
        if statement.into != _sqlglot_into(tree):
            _mismatch("PostgreSQL and the gateway disagree on SELECT … INTO")
    _check_tokens(reading, sql)


def _mismatch(detail: str) -> NoReturn:
    raise Forbidden(
        "grammar_mismatch",
        f"PostgreSQL and the gateway's parser read this text differently ({detail})",
    )


def _unwrap(tree: exp.Expr) -> exp.Expr:
    while isinstance(tree, (exp.Subquery, exp.Paren)) and isinstance(tree.this, exp.Expr):
        tree = tree.this
    return tree


def _sqlglot_kinds(tree: exp.Expr) -> frozenset[str]:
    tree = _unwrap(tree)
    if isinstance(tree, (exp.Select, exp.SetOperation, exp.Values)):
        return frozenset({"select_stmt"})
    for node, kind in ((exp.Insert, "insert_stmt"), (exp.Update, "update_stmt"),
                       (exp.Delete, "delete_stmt"), (exp.Merge, "merge_stmt"),
                       (exp.Drop, "drop_stmt"), (exp.TruncateTable, "truncate_stmt")):
        if isinstance(tree, node):
            return frozenset({kind})
    if isinstance(tree, exp.Alter):
        return frozenset({"alter_table_stmt", "rename_stmt"})
    if isinstance(tree, exp.Create):
        kind = str(tree.args.get("kind") or "").upper()
        if kind == "TABLE":
            return frozenset({"create_table_as_stmt" if tree.args.get("expression") else "create_stmt"})
        if kind == "INDEX":
            return frozenset({"index_stmt"})
        if kind == "VIEW":
            return frozenset({"view_stmt", "create_table_as_stmt"})
    return frozenset()


def _sqlglot_outputs(tree: exp.Expr) -> tuple[str | None, ...] | None:
    tree = _unwrap(tree)
    if isinstance(tree, (exp.Select, exp.SetOperation, exp.Values)):
        while isinstance(tree, exp.SetOperation):
            tree = _unwrap(tree.left)
        if isinstance(tree, exp.Values):
            first = tree.expressions[0] if tree.expressions else None
            return (None,) * (len(first.expressions) if isinstance(first, exp.Tuple) else 1)
        if not isinstance(tree, exp.Select):
            return None
        projections = tree.expressions
    elif isinstance(tree, (exp.Insert, exp.Update, exp.Delete)):
        returning = tree.args.get("returning")
        projections = returning.expressions if isinstance(returning, exp.Returning) else []
    else:
        return None
    return tuple(_alias(p) for p in projections)


def _alias(projection: exp.Expr) -> str | None:
    if not isinstance(projection, exp.Alias):
        return None
    identifier = projection.args.get("alias")
    if not isinstance(identifier, exp.Identifier):
        return projection.alias or None
    name = identifier.this if identifier.quoted else _fold(identifier.this)
    return _truncate(name)


def _sqlglot_object(tree: exp.Expr) -> str | None:
    if isinstance(tree, exp.TruncateTable):
        return "table"
    kind = str(tree.args.get("kind") or "").lower()
    if kind == "view":
        properties = tree.args.get("properties")
        materialized = bool(tree.args.get("materialized")) or (
            properties is not None
            and any(isinstance(p, exp.MaterializedProperty) for p in properties.expressions)
        )
        return "materialized view" if materialized else "view"
    return kind or None


def _sqlglot_into(tree: exp.Expr) -> bool:
    tree = _unwrap(tree)
    while isinstance(tree, exp.SetOperation):
        if tree.args.get("into"):
            return True
        tree = _unwrap(tree.left)
    return bool(tree.args.get("into"))


def _sqlglot_temporary(tree: exp.Expr) -> bool:
    properties = tree.args.get("properties")
    return properties is not None and any(
        isinstance(p, exp.TemporaryProperty) for p in properties.expressions
    )


def _check_tokens(reading: PgReading, sql: str) -> None:
    """Every literal, parameter and identifier token has the same span in both readings.

    This is what catches ``0o17`` read as ``0 AS o17`` (PostgreSQL: one ICONST; sqlglot: a
    NUMBER and a VAR) and ``0x1F`` read as a bit string. Beyond those, no token of either
    reading may fall where the other sees only a comment or whitespace, and every literal
    sqlglot sees lies inside one of PostgreSQL's. One sweep over both token lists.
    """
    try:
        theirs = _DIALECT.tokenize(sql)
    except (SqlglotError, TypeError, ValueError):
        _mismatch("the gateway cannot tokenise it")
    ours = _merged(reading.tokens)
    if not sql.isascii():
        to_char = _char_offsets(sql)
        ours = [(kind, to_char(start), to_char(end)) for kind, start, end in ours]
    count = len(theirs)
    i = 0
    seen = -1  # theirs[: seen + 1] each overlap a token of ours
    for kind, start, end in ours:
        while i < count and theirs[i].end < start:  # sqlglot's ends are inclusive
            if i > seen:
                _mismatch(f"PostgreSQL sees no token at character {theirs[i].start + 1}")
            i += 1
        k = i
        while k < count and theirs[k].start < end:
            token = theirs[k]
            if token.token_type in _LITERAL_TYPES and (
                kind not in _PG_LITERALS or token.start < start or token.end >= end
            ):
                _mismatch(f"a literal PostgreSQL does not see at character {token.start + 1}")
            k += 1
        if k == i:
            _mismatch(f"the gateway skips the token at character {start + 1}")
        seen = k - 1
        if kind in _CHECKED:
            covering = theirs[i:k]
            # PostgreSQL joins 'a'<newline>'b' into one constant; sqlglot reads two, joined.
            gaps = kind in ("SCONST", "USCONST")
            if not _tiles(covering, start, end, gaps) or not _same_kind(kind, sql[start:end], covering):
                _mismatch(f"a {kind.lower()} is read as something else at character {start + 1}")
        i = k - 1  # a multi-word token of sqlglot's ("ORDER BY") reaches into our next one
    if seen + 1 < count:
        _mismatch(f"PostgreSQL sees no token at character {theirs[seen + 1].start + 1}")


def _merged(tokens: Sequence[Token]) -> list[tuple[str, int, int]]:
    """Tokens without comments; N'…' (NCHAR then SCONST) as one SCONST, as sqlglot sees it."""
    out: list[tuple[str, int, int]] = []
    for kind, start, end in tokens:
        if kind in _COMMENTS:
            continue
        if kind == "SCONST" and out and out[-1][0] == "NCHAR" and out[-1][2] == start:
            out[-1] = ("SCONST", out[-1][1], end)
        else:
            out.append((kind, start, end))
    return out


def _tiles(covering: Sequence[Any], start: int, end: int, gaps: bool) -> bool:
    position = start
    for token in covering:
        if token.start != position and not (gaps and token.start > position):
            return False
        position = token.end + 1  # sqlglot's ends are inclusive
    return covering[0].start == start and position == end


def _same_kind(kind: str, text: str, covering: Sequence[Any]) -> bool:
    types = [t.token_type for t in covering]
    if kind in ("ICONST", "FCONST"):
        return types == [TokenType.NUMBER] or (
            text.startswith(".") and types == [TokenType.DOT, TokenType.NUMBER]
        )
    if kind == "PARAM":
        return types == [TokenType.PARAMETER, TokenType.NUMBER]
    if kind in ("SCONST", "USCONST"):
        return all(t in _STRING_TYPES for t in types)
    if kind == "BCONST":
        return types == [TokenType.BIT_STRING]
    if kind == "XCONST":
        return types == [TokenType.HEX_STRING]
    return len(types) == 1 and types[0] not in _LITERAL_TYPES  # an identifier


def _char_offsets(sql: str) -> Any:
    """A function from byte offsets (UTF-8) to character offsets of ``sql``."""
    if sql.isascii():
        return lambda offset: offset
    starts: list[int] = []  # byte offset of each non-ASCII character
    extra: list[int] = []  # bytes beyond one, for it and every one before
    total = 0
    for match in re.finditer(r"[^\x00-\x7f]", sql):
        starts.append(match.start() + total)
        total += len(match.group().encode()) - 1
        extra.append(total)

    def to_char(offset: int) -> int:
        k = bisect.bisect_left(starts, offset)
        return offset - (extra[k - 1] if k else 0)

    return to_char


# --- schema qualifiers -----------------------------------------------------------------------


def schema_qualifiers(sql: str) -> list[tuple[int, int, str]]:
    """(start, end, schema) of every schema qualifier (see ``_schema_qualifiers``)."""
    return list(_schema_qualifiers(sql))


# The enforcement step asks these of every statement a masked caller runs: a pure function
# of the text, so answered from a bounded cache rather than parsed again (make bench).
@functools.lru_cache(maxsize=4096)
def _schema_qualifiers(sql: str) -> tuple[tuple[int, int, str], ...]:
    """(start, end, schema) of every schema qualifier PostgreSQL's tree reports, by byte span.

    A qualifier is the schema of a relation reference (every RangeVar: FROM, JOIN, subqueries,
    CTEs, write targets, USING, ``TABLE t``, ``ONLY t``, DDL) or of a three-part column
    reference (``schema.table.column``). Spans are in the UTF-8 encoding of ``sql`` and cover
    the identifier token exactly, quotes included. Names PostgreSQL's tree holds as plain
    name lists (DROP's, function and type names) are not relation references and are not
    reported. A database-qualified name (``db.schema.table``, ``db.schema.table.column``)
    or a ``U&"…"`` qualifier is refused: it could not be rewritten safely.
    """
    raw, tokens, tree = _parse(sql, None)
    by_start = {t.start: t for t in tokens}
    found: dict[int, tuple[int, int, str]] = {}
    for node in walk(tree):
        if "relpersistence" in node and "relname" in node:  # a RangeVar
            if "catalogname" in node:
                raise _unqualifiable("a database-qualified relation name (db.schema.table)")
            schema = node.get("schemaname")
        elif "ColumnRef" in node:
            fields = node["ColumnRef"].get("fields", ())
            if len(fields) > 3:
                raise _unqualifiable("a database-qualified column reference (db.schema.table.column)")
            if len(fields) < 3:
                continue
            schema = fields[0].get("String", {}).get("sval")
            node = node["ColumnRef"]
            if schema is None:
                raise _unqualifiable("a column reference whose qualifier is not a name")
        else:
            continue
        if schema is None:
            continue
        location = node.get("location", -1)
        token = by_start.get(location)
        if token is None:
            raise _unqualifiable("a schema-qualified name whose position PostgreSQL does not report")
        if token.kind == "UIDENT":
            raise _unqualifiable('a U&"…" schema qualifier')
        if _identifier(raw[token.start:token.end].decode("utf-8")) != schema:
            # The token at the reported position does not spell the schema: never guess.
            _mismatch("a schema qualifier is not where PostgreSQL reports it")
        span = (token.start, token.end, schema)
        if found.setdefault(token.start, span) != span:
            _mismatch("two schema qualifiers at one position")
    return tuple(sorted(found.values()))


def rewrite_schemas(sql: str, mapping: Mapping[str, str]) -> str:
    """``sql`` with each schema qualifier named in ``mapping`` replaced (``_rewrite``)."""
    return _rewrite(sql, tuple(sorted(mapping.items())))


@functools.lru_cache(maxsize=4096)
def _rewrite(sql: str, items: tuple[tuple[str, str], ...]) -> str:
    """``sql`` with each schema qualifier named in ``mapping`` replaced by its value, quoted.

    Keys are schema names as PostgreSQL folds them (``Public`` and ``public`` are ``public``;
    ``"Public"`` is ``Public``); every byte outside the replaced qualifiers is left as it is.
    """
    mapping = dict(items)
    for value in mapping.values():
        _check_schema_name(value)
    qualifiers = schema_qualifiers(sql)
    raw = sql.encode("utf-8")
    parts: list[bytes] = []
    position = 0
    replaced = False
    for start, end, schema in qualifiers:
        target = mapping.get(schema)
        if target is None:
            continue
        parts += [raw[position:start], _quote(target).encode("utf-8")]
        position = end
        replaced = True
    if not replaced:
        return sql
    parts.append(raw[position:])
    text = b"".join(parts).decode("utf-8")
    # The rewritten text must read back as the same references, each pointing where asked.
    again = [schema for _, _, schema in schema_qualifiers(text)]
    if again != [mapping.get(schema, schema) for _, _, schema in qualifiers]:
        raise RuntimeError("rewrite_schemas: the rewritten text does not read back as intended")
    return text


def rewrite_catalog(sql: str, target: str, functions: frozenset[str] = frozenset(),
                    information: str = "information_schema") -> str:
    """A catalog query (app/introspection.py) pointed at ``target``'s views of the catalogs.

    Every ``pg_catalog`` qualifier (of a relation or a three-part column reference) becomes
    ``target``, and an unqualified relation (a ``pg_…`` name, which ``pg_catalog`` holds) is
    qualified with it; so is a call of one of ``functions`` (unqualified or ``pg_catalog.``),
    which ``target`` holds filtered. Read back, every relation must be ``target``'s or
    ``information``'s (information_schema's views are pointed there), and every call of
    ``functions`` ``target``'s.
    """
    return _rewrite_catalog(sql, target, functions, information)


@functools.lru_cache(maxsize=1024)
def _rewrite_catalog(sql: str, target: str, functions: frozenset[str], information: str) -> str:
    _check_schema_name(target)
    _check_schema_name(information)
    raw, tokens, tree = _parse(sql, None)
    by_start = {t.start: t for t in tokens}
    edits: dict[int, tuple[int, str]] = {}  # start -> (end, replacement)
    for node in walk(tree):
        if "relpersistence" in node and "relname" in node and node.get("schemaname") is None:
            token = by_start.get(node.get("location", -1))
            if token is None or _identifier(raw[token.start:token.end].decode("utf-8")) != (
                node["relname"]
            ):
                _mismatch("a relation name is not where PostgreSQL reports it")
            edits[token.start] = (token.start, _quote(target) + ".")
        call = node.get("FuncCall")
        if call is None:
            continue
        parts = [p.get("String", {}).get("sval") for p in call.get("funcname", ())]
        if not parts or not isinstance(parts[-1], str) or parts[-1] not in functions:
            continue
        if parts[:-1] not in ([], ["pg_catalog"]):
            continue
        token = by_start.get(call.get("location", -1))
        if token is None or token.kind == "UIDENT" or _identifier(
            raw[token.start:token.end].decode("utf-8")
        ) != parts[0]:
            _mismatch("a function name is not where PostgreSQL reports it")
        if len(parts) == 1:
            edits[token.start] = (token.start, _quote(target) + ".")
        else:
            edits[token.start] = (token.end, _quote(target))
    out: list[bytes] = []
    position = 0
    for start in sorted(edits):
        end, replacement = edits[start]
        out += [raw[position:start], replacement.encode("utf-8")]
        position = end
    out.append(raw[position:])
    mapping = {"pg_catalog": target}
    if information != "information_schema":
        mapping["information_schema"] = information
    text = rewrite_schemas(b"".join(out).decode("utf-8"), mapping)
    _, _, again = _parse(text, None)
    for node in walk(again):
        if "relpersistence" in node and "relname" in node and node.get("schemaname") not in (
            target, information
        ):
            raise RuntimeError("rewrite_catalog: a relation is not pointed at the catalog views")
        call = node.get("FuncCall")
        if call is not None:
            parts = [p.get("String", {}).get("sval") for p in call.get("funcname", ())]
            if parts and parts[-1] in functions and parts[:-1] in ([], ["pg_catalog"]):
                raise RuntimeError("rewrite_catalog: a function is not pointed at the catalog's")
    return text


def only_relations(sql: str) -> list[str]:
    """The relation references written with ``ONLY`` (no inheritance children), as written.

    A masked caller reads views, and a view of a parent includes its children's rows: ONLY
    cannot mean for it what it means for PostgreSQL, so the gateway refuses it there.
    """
    return list(_only_relations(sql))


@functools.lru_cache(maxsize=4096)
def _only_relations(sql: str) -> tuple[str, ...]:
    _, _, tree = _parse(sql, None)
    return tuple(sorted(
        ".".join(p for p in (node.get("schemaname"), node["relname"]) if p)
        for node in walk(tree)
        if "relpersistence" in node and "relname" in node and not node.get("inh", False)
    ))


def column_references(sql: str) -> frozenset[str]:
    """The column names (last part of every column reference) the statement's expressions
    read: a DDL's ``USING``, ``GENERATED … AS``, ``CHECK`` or index expression, say."""
    _, _, tree = _parse(sql, None)
    names = set()
    for node in walk(tree):
        fields = node.get("ColumnRef", {}).get("fields") if "ColumnRef" in node else None
        if fields:
            last = fields[-1].get("String", {}).get("sval")
            if isinstance(last, str):
                names.add(last)
    return frozenset(names)


def renames(sql: str) -> list[tuple[str, str | None]]:
    """What the statement renames: ``("column", old name)``, or ``(object kind, None)`` for
    a table, view or other object (classification follows names, so a rename can move a
    value out of its class)."""
    _, _, tree = _parse(sql, None)
    found: list[tuple[str, str | None]] = []
    for node in walk(tree):
        stmt = node.get("RenameStmt")
        if isinstance(stmt, dict):
            kind = str(stmt.get("renameType", "")).removeprefix("OBJECT_").lower()
            found.append((kind, stmt.get("subname") if kind == "column" else None))
    return found


def walk(tree: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object of the tree, without recursion (trees may be deep)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))


def _unqualifiable(what: str) -> Forbidden:
    return Forbidden("unsupported_construct", f"{what} is not supported through the gateway")


def _fold(name: str) -> str:
    """PostgreSQL's case folding of an unquoted identifier (ASCII only, in UTF-8)."""
    return name.translate(_ASCII_LOWER)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _truncate(name: str) -> str:
    """PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes, at a character boundary."""
    raw = name.encode("utf-8")
    if len(raw) < _NAMEDATALEN:
        return name
    return raw[: _NAMEDATALEN - 1].decode("utf-8", "ignore")


def _identifier(text: str) -> str:
    """The name an identifier token (quoted or not, or an unreserved keyword) spells."""
    if text.startswith('"'):
        return _truncate(text[1:-1].replace('""', '"'))
    return _truncate(_fold(text))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _check_schema_name(name: str) -> None:
    if not name or "\x00" in name:
        raise ValueError(f"not a schema name: {name!r}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise ValueError(f"not a schema name: {name!r}") from exc
    if size >= _NAMEDATALEN:
        # PostgreSQL would truncate it and name another schema.
        raise ValueError(f"schema name longer than {_NAMEDATALEN - 1} bytes: {name!r}")
