"""Translate asyncpg and PostgreSQL errors into GatewayErrors that carry no values.

A PostgreSQL error can quote the data it failed on: ``invalid input syntax for type integer:
"766-16-2186"``, a unique violation's DETAIL ``Key (email)=(x@y) already exists``, a
``RAISE EXCEPTION '%', ssn``; asyncpg's own encoding errors quote a bound parameter
(``invalid input for query argument $1: 1099511627776 (value out of int32 range)``). The
GatewayError made here is what the caller, the audit trail and the logs see, so a server
message is passed on only where it cannot hold a value, and DETAIL, HINT, CONTEXT and the
internal query never are::

    asyncpg / PostgreSQL error                      GatewayError
    ──────────────────────────────────────────────  ──────────────────────────────────────────
    asyncpg cannot encode bound parameter $N        422 invalid_parameters   $N and its type
    57014 query_canceled (statement_timeout)        408 statement_timeout    fixed text
    57014 query_canceled (a CancelRequest)          408 query_cancelled      fixed text
    08xxx, 57Pxx (connection lost, shutdown)        503 database_unavailable fixed text
    25006 read_only_sql_transaction                 403 read_only_violation  + message if safe
    42501 insufficient_privilege                    403 database_permission_denied + message
    class 22 data exception, 23 integrity           422 database_error       condition name,
      constraint violation                                                   fixed text, and the
                                                                             column, table,
                                                                             constraint or type
    class 42 located in the statement text          422 database_error       primary message
    0A 21 24 25 26 2B 2D 34 3B 40 53 54 55 with a   422 database_error       primary message
      message of words only
    anything else: RAISE, 2F 38 39 P0 XX …, an      422 database_error       condition name and
      error inside a function or dynamic SQL                                 fixed text

Class 42 messages name identifiers, not data, when the parser raised them about the
caller's own SQL (then PostgreSQL gives a position and no context); the same codes raised
while executing (``ssn::regclass``, ``full_name::tsquery``, dynamic SQL in a function) quote
data, carry no position or carry a context, and are withheld. ``sqlstate`` is always in the
error's extra fields, so a caller can still tell the conditions apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Final

import asyncpg

from app.errors import (
    Forbidden,
    GatewayError,
    RequestTimeout,
    Unavailable,
    Unprocessable,
)

# PostgreSQL's errcodes appendix (src/backend/utils/errcodes.txt of PostgreSQL 16, the codes
# PostgreSQL 17 added marked): SQLSTATE -> condition name. asyncpg's exception classes carry
# the same codes; tests/unit/test_dberrors.py checks the table against both.
CONDITIONS: Final[Mapping[str, str]] = {
    # Class 00 - Successful Completion
    "00000": "successful_completion",
    # Class 01 - Warning
    "01000": "warning",
    "0100C": "dynamic_result_sets_returned",
    "01008": "implicit_zero_bit_padding",
    "01003": "null_value_eliminated_in_set_function",
    "01007": "privilege_not_granted",
    "01006": "privilege_not_revoked",
    "01004": "string_data_right_truncation",
    "01P01": "deprecated_feature",
    # Class 02 - No Data (this is also a warning class per the SQL standard)
    "02000": "no_data",
    "02001": "no_additional_dynamic_result_sets_returned",
    # Class 03 - SQL Statement Not Yet Complete
    "03000": "sql_statement_not_yet_complete",
    # Class 08 - Connection Exception
    "08000": "connection_exception",
    "08003": "connection_does_not_exist",
    "08006": "connection_failure",
    "08001": "sqlclient_unable_to_establish_sqlconnection",
    "08004": "sqlserver_rejected_establishment_of_sqlconnection",
    "08007": "transaction_resolution_unknown",
    "08P01": "protocol_violation",
    # Class 09 - Triggered Action Exception
    "09000": "triggered_action_exception",
    # Class 0A - Feature Not Supported
    "0A000": "feature_not_supported",
    # Class 0B - Invalid Transaction Initiation
    "0B000": "invalid_transaction_initiation",
    # Class 0F - Locator Exception
    "0F000": "locator_exception",
    "0F001": "invalid_locator_specification",
    # Class 0L - Invalid Grantor
    "0L000": "invalid_grantor",
    "0LP01": "invalid_grant_operation",
    # Class 0P - Invalid Role Specification
    "0P000": "invalid_role_specification",
    # Class 0Z - Diagnostics Exception
    "0Z000": "diagnostics_exception",
    "0Z002": "stacked_diagnostics_accessed_without_active_handler",
    # Class 10 - XQuery Error (PostgreSQL 17)
    "10608": "invalid_argument_for_xquery",
    # Class 20 - Case Not Found
    "20000": "case_not_found",
    # Class 21 - Cardinality Violation
    "21000": "cardinality_violation",
    # Class 22 - Data Exception
    "22000": "data_exception",
    "2202E": "array_subscript_error",
    "22021": "character_not_in_repertoire",
    "22008": "datetime_field_overflow",
    "22012": "division_by_zero",
    "22005": "error_in_assignment",
    "2200B": "escape_character_conflict",
    "22022": "indicator_overflow",
    "22015": "interval_field_overflow",
    "2201E": "invalid_argument_for_logarithm",
    "22014": "invalid_argument_for_ntile_function",
    "22016": "invalid_argument_for_nth_value_function",
    "2201F": "invalid_argument_for_power_function",
    "2201G": "invalid_argument_for_width_bucket_function",
    "22018": "invalid_character_value_for_cast",
    "22007": "invalid_datetime_format",
    "22019": "invalid_escape_character",
    "2200D": "invalid_escape_octet",
    "22025": "invalid_escape_sequence",
    "22P06": "nonstandard_use_of_escape_character",
    "22010": "invalid_indicator_parameter_value",
    "22023": "invalid_parameter_value",
    "22013": "invalid_preceding_or_following_size",
    "2201B": "invalid_regular_expression",
    "2201W": "invalid_row_count_in_limit_clause",
    "2201X": "invalid_row_count_in_result_offset_clause",
    "2202H": "invalid_tablesample_argument",
    "2202G": "invalid_tablesample_repeat",
    "22009": "invalid_time_zone_displacement_value",
    "2200C": "invalid_use_of_escape_character",
    "2200G": "most_specific_type_mismatch",
    "22004": "null_value_not_allowed",
    "22002": "null_value_no_indicator_parameter",
    "22003": "numeric_value_out_of_range",
    "2200H": "sequence_generator_limit_exceeded",
    "22026": "string_data_length_mismatch",
    "22001": "string_data_right_truncation",
    "22011": "substring_error",
    "22027": "trim_error",
    "22024": "unterminated_c_string",
    "2200F": "zero_length_character_string",
    "22P01": "floating_point_exception",
    "22P02": "invalid_text_representation",
    "22P03": "invalid_binary_representation",
    "22P04": "bad_copy_file_format",
    "22P05": "untranslatable_character",
    "2200L": "not_an_xml_document",
    "2200M": "invalid_xml_document",
    "2200N": "invalid_xml_content",
    "2200S": "invalid_xml_comment",
    "2200T": "invalid_xml_processing_instruction",
    "22030": "duplicate_json_object_key_value",
    "22031": "invalid_argument_for_sql_json_datetime_function",
    "22032": "invalid_json_text",
    "22033": "invalid_sql_json_subscript",
    "22034": "more_than_one_sql_json_item",
    "22035": "no_sql_json_item",
    "22036": "non_numeric_sql_json_item",
    "22037": "non_unique_keys_in_a_json_object",
    "22038": "singleton_sql_json_item_required",
    "22039": "sql_json_array_not_found",
    "2203A": "sql_json_member_not_found",
    "2203B": "sql_json_number_not_found",
    "2203C": "sql_json_object_not_found",
    "2203D": "too_many_json_array_elements",
    "2203E": "too_many_json_object_members",
    "2203F": "sql_json_scalar_required",
    "2203G": "sql_json_item_cannot_be_cast_to_target_type",
    # Class 23 - Integrity Constraint Violation
    "23000": "integrity_constraint_violation",
    "23001": "restrict_violation",
    "23502": "not_null_violation",
    "23503": "foreign_key_violation",
    "23505": "unique_violation",
    "23514": "check_violation",
    "23P01": "exclusion_violation",
    # Class 24 - Invalid Cursor State
    "24000": "invalid_cursor_state",
    # Class 25 - Invalid Transaction State
    "25000": "invalid_transaction_state",
    "25001": "active_sql_transaction",
    "25002": "branch_transaction_already_active",
    "25008": "held_cursor_requires_same_isolation_level",
    "25003": "inappropriate_access_mode_for_branch_transaction",
    "25004": "inappropriate_isolation_level_for_branch_transaction",
    "25005": "no_active_sql_transaction_for_branch_transaction",
    "25006": "read_only_sql_transaction",
    "25007": "schema_and_data_statement_mixing_not_supported",
    "25P01": "no_active_sql_transaction",
    "25P02": "in_failed_sql_transaction",
    "25P03": "idle_in_transaction_session_timeout",
    "25P04": "transaction_timeout",  # PostgreSQL 17
    # Class 26 - Invalid SQL Statement Name
    "26000": "invalid_sql_statement_name",
    # Class 27 - Triggered Data Change Violation
    "27000": "triggered_data_change_violation",
    # Class 28 - Invalid Authorization Specification
    "28000": "invalid_authorization_specification",
    "28P01": "invalid_password",
    # Class 2B - Dependent Privilege Descriptors Still Exist
    "2B000": "dependent_privilege_descriptors_still_exist",
    "2BP01": "dependent_objects_still_exist",
    # Class 2D - Invalid Transaction Termination
    "2D000": "invalid_transaction_termination",
    # Class 2F - SQL Routine Exception
    "2F000": "sql_routine_exception",
    "2F005": "function_executed_no_return_statement",
    "2F002": "modifying_sql_data_not_permitted",
    "2F003": "prohibited_sql_statement_attempted",
    "2F004": "reading_sql_data_not_permitted",
    # Class 34 - Invalid Cursor Name
    "34000": "invalid_cursor_name",
    # Class 38 - External Routine Exception
    "38000": "external_routine_exception",
    "38001": "containing_sql_not_permitted",
    "38002": "modifying_sql_data_not_permitted",
    "38003": "prohibited_sql_statement_attempted",
    "38004": "reading_sql_data_not_permitted",
    # Class 39 - External Routine Invocation Exception
    "39000": "external_routine_invocation_exception",
    "39001": "invalid_sqlstate_returned",
    "39004": "null_value_not_allowed",
    "39P01": "trigger_protocol_violated",
    "39P02": "srf_protocol_violated",
    "39P03": "event_trigger_protocol_violated",
    # Class 3B - Savepoint Exception
    "3B000": "savepoint_exception",
    "3B001": "invalid_savepoint_specification",
    # Class 3D - Invalid Catalog Name
    "3D000": "invalid_catalog_name",
    # Class 3F - Invalid Schema Name
    "3F000": "invalid_schema_name",
    # Class 40 - Transaction Rollback
    "40000": "transaction_rollback",
    "40002": "transaction_integrity_constraint_violation",
    "40001": "serialization_failure",
    "40003": "statement_completion_unknown",
    "40P01": "deadlock_detected",
    # Class 42 - Syntax Error or Access Rule Violation
    "42000": "syntax_error_or_access_rule_violation",
    "42601": "syntax_error",
    "42501": "insufficient_privilege",
    "42846": "cannot_coerce",
    "42803": "grouping_error",
    "42P20": "windowing_error",
    "42P19": "invalid_recursion",
    "42830": "invalid_foreign_key",
    "42602": "invalid_name",
    "42622": "name_too_long",
    "42939": "reserved_name",
    "42804": "datatype_mismatch",
    "42P18": "indeterminate_datatype",
    "42P21": "collation_mismatch",
    "42P22": "indeterminate_collation",
    "42809": "wrong_object_type",
    "428C9": "generated_always",
    "42703": "undefined_column",
    "42883": "undefined_function",
    "42P01": "undefined_table",
    "42P02": "undefined_parameter",
    "42704": "undefined_object",
    "42701": "duplicate_column",
    "42P03": "duplicate_cursor",
    "42P04": "duplicate_database",
    "42723": "duplicate_function",
    "42P05": "duplicate_prepared_statement",
    "42P06": "duplicate_schema",
    "42P07": "duplicate_table",
    "42712": "duplicate_alias",
    "42710": "duplicate_object",
    "42702": "ambiguous_column",
    "42725": "ambiguous_function",
    "42P08": "ambiguous_parameter",
    "42P09": "ambiguous_alias",
    "42P10": "invalid_column_reference",
    "42611": "invalid_column_definition",
    "42P11": "invalid_cursor_definition",
    "42P12": "invalid_database_definition",
    "42P13": "invalid_function_definition",
    "42P14": "invalid_prepared_statement_definition",
    "42P15": "invalid_schema_definition",
    "42P16": "invalid_table_definition",
    "42P17": "invalid_object_definition",
    # Class 44 - WITH CHECK OPTION Violation
    "44000": "with_check_option_violation",
    # Class 53 - Insufficient Resources
    "53000": "insufficient_resources",
    "53100": "disk_full",
    "53200": "out_of_memory",
    "53300": "too_many_connections",
    "53400": "configuration_limit_exceeded",
    # Class 54 - Program Limit Exceeded
    "54000": "program_limit_exceeded",
    "54001": "statement_too_complex",
    "54011": "too_many_columns",
    "54023": "too_many_arguments",
    # Class 55 - Object Not In Prerequisite State
    "55000": "object_not_in_prerequisite_state",
    "55006": "object_in_use",
    "55P02": "cant_change_runtime_param",
    "55P03": "lock_not_available",
    "55P04": "unsafe_new_enum_value_usage",
    # Class 57 - Operator Intervention
    "57000": "operator_intervention",
    "57014": "query_canceled",
    "57P01": "admin_shutdown",
    "57P02": "crash_shutdown",
    "57P03": "cannot_connect_now",
    "57P04": "database_dropped",
    "57P05": "idle_session_timeout",
    # Class 58 - System Error (errors external to PostgreSQL itself)
    "58000": "system_error",
    "58030": "io_error",
    "58P01": "undefined_file",
    "58P02": "duplicate_file",
    "58P03": "file_name_too_long",  # PostgreSQL 17
    # Class 72 - Snapshot Failure
    "72000": "snapshot_too_old",
    # Class F0 - Configuration File Error
    "F0000": "config_file_error",
    "F0001": "lock_file_exists",
    # Class HV - Foreign Data Wrapper Error (SQL/MED)
    "HV000": "fdw_error",
    "HV005": "fdw_column_name_not_found",
    "HV002": "fdw_dynamic_parameter_value_needed",
    "HV010": "fdw_function_sequence_error",
    "HV021": "fdw_inconsistent_descriptor_information",
    "HV024": "fdw_invalid_attribute_value",
    "HV007": "fdw_invalid_column_name",
    "HV008": "fdw_invalid_column_number",
    "HV004": "fdw_invalid_data_type",
    "HV006": "fdw_invalid_data_type_descriptors",
    "HV091": "fdw_invalid_descriptor_field_identifier",
    "HV00B": "fdw_invalid_handle",
    "HV00C": "fdw_invalid_option_index",
    "HV00D": "fdw_invalid_option_name",
    "HV090": "fdw_invalid_string_length_or_buffer_length",
    "HV00A": "fdw_invalid_string_format",
    "HV009": "fdw_invalid_use_of_null_pointer",
    "HV014": "fdw_too_many_handles",
    "HV001": "fdw_out_of_memory",
    "HV00P": "fdw_no_schemas",
    "HV00J": "fdw_option_name_not_found",
    "HV00K": "fdw_reply_handle",
    "HV00Q": "fdw_schema_not_found",
    "HV00R": "fdw_table_not_found",
    "HV00L": "fdw_unable_to_create_execution",
    "HV00M": "fdw_unable_to_create_reply",
    "HV00N": "fdw_unable_to_establish_connection",
    # Class P0 - PL/pgSQL Error
    "P0000": "plpgsql_error",
    "P0001": "raise_exception",
    "P0002": "no_data_found",
    "P0003": "too_many_rows",
    "P0004": "assert_failure",
    # Class XX - Internal Error
    "XX000": "internal_error",
    "XX001": "data_corrupted",
    "XX002": "index_corrupted",
}

# Classes whose messages are about the statement, the transaction or the server's limits,
# never about a datum: their primary message is shown when it is words only (no quote, no
# digit, no colon), which leaves out any that name an object or a number.
_STATEMENT_CLASSES: Final = frozenset(
    {"0A", "0B", "21", "24", "25", "26", "2B", "2D", "34", "3B", "40", "53", "54", "55"}
)
_WORDS_ONLY: Final = re.compile(r"[A-Za-z][A-Za-z ,.\-/]*")
# How asyncpg words an encoding failure of a bound parameter (protocol/prepared_stmt.pyx):
# "invalid input for query argument $1: <repr of the value> (<why>)" as its DataError (the
# 22000 class), or "query argument $1: …" re-raised from a codec's InterfaceError.
_ARGUMENT: Final = re.compile(r"(?:invalid input for )?query argument \$(\d+)\b")
# PL/pgSQL RAISE and ASSERT: any SQLSTATE, any message, any COLUMN/TABLE/… field.
_RAISED: Final = frozenset({"exec_stmt_raise", "exec_stmt_assert"})

# The parameter types of the statement being bound in this context (see expect_parameters).
_EXPECTED: ContextVar[tuple[str, ...]] = ContextVar("querygate_parameter_types", default=())


def condition_name(sqlstate: str) -> str:
    """The condition name of a SQLSTATE, else of its class, else ``unknown_condition``."""
    return CONDITIONS.get(sqlstate) or CONDITIONS.get(sqlstate[:2] + "000") or "unknown_condition"


def expect_parameters(types: Sequence[str]) -> None:
    """Note the parameter types of the statement about to be bound in this context.

    asyncpg encodes parameters inside ``cursor()``/``fetch()``, and its error names the
    position only; this lets ``translate`` name the type expected there as well.
    """
    _EXPECTED.set(tuple(types))


def translate(exc: BaseException, parameter_types: Sequence[str] | None = None) -> GatewayError:
    """The GatewayError for an asyncpg or PostgreSQL error; its message holds no value.

    ``parameter_types`` names the statement's parameter types (by default those noted by
    ``expect_parameters``), for an encoding error of a bound parameter.
    """
    position = _argument_position(exc)
    if position is not None:
        types = _EXPECTED.get() if parameter_types is None else tuple(parameter_types)
        return parameter_error(position, types[position - 1] if position <= len(types) else None)
    if not isinstance(exc, asyncpg.PostgresError):
        return Unavailable("database_unavailable", "the database is unreachable")
    sqlstate = str(getattr(exc, "sqlstate", None) or "")
    extra = {"sqlstate": sqlstate}
    if sqlstate == "57014":
        if getattr(exc, "message", "") == "canceling statement due to user request":
            # PostgreSQL's fixed text for a CancelRequest (psql's ^C, a driver's cancel,
            # pg_cancel_backend); for the timeout it says "due to statement timeout".
            return RequestTimeout(
                "query_cancelled", "the statement was cancelled at the client's request", **extra
            )
        return RequestTimeout(
            "statement_timeout", "the statement was cancelled by the statement timeout", **extra
        )
    if sqlstate.startswith(("08", "57P")):
        return Unavailable("database_unavailable", "the database connection failed", **extra)
    message = server_message(exc)
    if sqlstate == "25006":
        return Forbidden("read_only_violation", f"refused by the database: {message}", **extra)
    if sqlstate == "42501":
        return Forbidden("database_permission_denied", f"refused by the database: {message}",
                         **extra)
    return Unprocessable("database_error", message, **extra)


def parameter_error(position: int, type_name: str | None) -> Unprocessable:
    """422 invalid_parameters for parameter ``$position``: its position and type, never its value."""
    if type_name is None:
        return Unprocessable("invalid_parameters", f"parameter ${position} does not fit its type")
    return Unprocessable("invalid_parameters", f"parameter ${position} is not a valid {type_name}")


def server_message(exc: asyncpg.PostgresError) -> str:
    """What to show of a server error: its primary message where that cannot hold a value,
    else its condition name and a fixed text (with the fields that name objects)."""
    sqlstate = str(getattr(exc, "sqlstate", None) or "")
    condition = condition_name(sqlstate)
    primary = str(getattr(exc, "message", None) or "")
    if _raised(exc):
        # RAISE chooses the code, the message and every field: nothing of it is shown.
        return f"{condition}: raised by a function; its message is withheld as it may hold values"
    if sqlstate.startswith("22"):
        return f"{condition}: the database rejected a value{_objects(exc)}; values are not shown"
    if sqlstate.startswith("23"):
        return (f"{condition}: the statement violates an integrity constraint{_objects(exc)}; "
                "values are not shown")
    if _names_only(exc, sqlstate, primary):
        return primary
    return (f"{condition}: the database refused the statement{_objects(exc)}; its message is "
            "withheld as it may hold values")


@dataclass(frozen=True, slots=True)
class Notice:
    """A server notice or warning with nothing of its text: what may be passed on."""

    severity: str
    sqlstate: str
    condition: str
    message: str


_SEVERITIES: Final = frozenset({"WARNING", "NOTICE", "INFO", "LOG", "DEBUG"})


def notice(message: Any) -> Notice:
    """The value-free form of an asyncpg notice (a ``PostgresLogMessage``).

    A notice's text is as free as an error's (``RAISE NOTICE '%', ssn``), and no notice is
    worth the risk: its severity, SQLSTATE and condition name, and a fixed text.
    """
    severity = str(getattr(message, "severity_en", None) or getattr(message, "severity", None)
                   or "NOTICE").upper()
    if severity.startswith("DEBUG"):
        severity = "DEBUG"
    if severity not in _SEVERITIES:
        severity = "NOTICE"
    sqlstate = str(getattr(message, "sqlstate", None) or "00000")
    condition = condition_name(sqlstate)
    return Notice(
        severity=severity,
        sqlstate=sqlstate,
        condition=condition,
        message=f"{condition}: the database sent a {severity.lower()}; its text is withheld as "
                "it may hold values",
    )


def _argument_position(exc: BaseException) -> int | None:
    """The parameter asyncpg could not encode, when ``exc`` is that (client-side) error."""
    if isinstance(exc, asyncpg.PostgresError):
        # asyncpg raises its encoding errors as the 22000 PostgresError class, but without
        # the severity every error from the server carries.
        if getattr(exc, "severity", None) is not None:
            return None
    elif not isinstance(exc, asyncpg.InterfaceError):
        return None
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else ""
    match = _ARGUMENT.match(text)
    return int(match.group(1)) if match else None


def _raised(exc: asyncpg.PostgresError) -> bool:
    return getattr(exc, "server_source_function", None) in _RAISED


def _names_only(exc: asyncpg.PostgresError, sqlstate: str, primary: str) -> bool:
    """Whether the primary message provably names identifiers or the statement, not data."""
    if not primary:
        return False
    if getattr(exc, "context", None) or getattr(exc, "internal_query", None):
        # Raised inside a function, a trigger or dynamic SQL: about text the caller did not
        # write, which may have been built from data.
        return False
    if sqlstate == "42501":
        # Privilege errors name the object refused (table, column, schema, role).
        return True
    if sqlstate.startswith("42"):
        # Parse analysis of the caller's SQL sets the position; the same codes raised while
        # executing (a datum cast to regclass or tsquery) do not.
        return bool(getattr(exc, "position", None))
    return sqlstate[:2] in _STATEMENT_CLASSES and _WORDS_ONLY.fullmatch(primary) is not None


def _objects(exc: asyncpg.PostgresError) -> str:
    """The objects PostgreSQL's error fields name (identifiers from the catalog)."""
    parts = []
    column, table = getattr(exc, "column_name", None), getattr(exc, "table_name", None)
    schema = getattr(exc, "schema_name", None)
    if column:
        parts.append(f"column {_quoted(column)}")
    if table:
        parts.append(f"table {_quoted(schema) + '.' if schema else ''}{_quoted(table)}")
    elif schema:
        parts.append(f"schema {_quoted(schema)}")
    for label, field in (("constraint", "constraint_name"), ("type", "data_type_name")):
        value = getattr(exc, field, None)
        if value:
            parts.append(f"{label} {_quoted(value)}")
    return f" ({', '.join(parts)})" if parts else ""


def _quoted(identifier: Any) -> str:
    return '"' + str(identifier).replace('"', '""') + '"'
