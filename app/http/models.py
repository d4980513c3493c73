"""The HTTP contract: request and response bodies as Pydantic models.

Requests are validated with them. Responses are rendered with orjson straight from the
pipeline's values (no per-request validation of row payloads on the hot path); the models
document their shape in /openapi.json, and the schemathesis test holds the two together.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, JsonValue


class QueryRequest(BaseModel):
    """The body of /v1/query and /v1/explain."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sql: str = Field(min_length=1, description="Exactly one SQL statement; $1… placeholders.")
    params: list[JsonValue] = Field(
        default_factory=list, description="Values bound to $1, $2, … (never interpolated)."
    )
    # The approval this re-submission uses (from a 202 answer to the same request).
    approval_id: str | None = Field(
        default=None, max_length=64,
        description="The approval this re-submission uses (from a 202 answer to it).",
    )
