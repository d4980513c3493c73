"""What a statement gives back: its columns (as the server describes them) and its rows.

Its own module so that the executor, masking and every front end can share these types
without importing each other.
"""

from __future__ import annotations

import datetime as dt
import decimal
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Column:
    """One output column: its name and the type name the answer reports."""

    name: str
    type: str


@dataclass(frozen=True, slots=True)
class Result:
    """A whole (JSON-mode) answer: masked rows, counts and why rows are missing."""

    columns: tuple[Column, ...]
    rows: list[Any]
    truncated: bool
    status: str
    rows_affected: int | None
    # Why rows are missing: "max_rows" or "response_bytes" (None when nothing is).
    truncated_reason: str | None = None
    # The outputs the answer masks (name → strategy), whoever masked them.
    masked: dict[str, str] = field(default_factory=dict)
    # Time spent masking, for the request's stage clock (the rest is the database's).
    masking_s: float = 0.0


def json_default(value: Any) -> Any:
    """How a value orjson does not know is written in an answer."""
    if isinstance(value, decimal.Decimal):
        # A string keeps every digit; a float would not.
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "\\x" + bytes(value).hex()
    if isinstance(value, dt.timedelta):
        return str(value)
    return str(value)


def encode_row(row: Any) -> bytes:
    """One row as a JSON array (encoded as it arrives, to count the answer's bytes)."""
    return orjson.dumps(row, default=json_default)
