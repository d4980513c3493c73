"""What the sync and async clients share: requests as plain values, answers parsed here.

Neither client does anything but I/O; every request is built and every answer read by the
functions of this module, so both behave the same by construction.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from querygate_client.errors import QuerygateError, error_from
from querygate_client.models import (
    Approval,
    ApprovalPending,
    Catalog,
    CatalogTable,
    Explanation,
    QueryResult,
)

NDJSON = "application/x-ndjson"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
TokenSource = str | Callable[[], str]


class TokenFile:
    """A bearer token read from a file, read again whenever the file changes (its inode,
    size or modification time), so a projected or rotated token keeps working."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""

    def __call__(self) -> str:
        try:
            st = self.path.stat()
        except OSError as exc:
            raise QuerygateError("token_file_unreadable",
                                 f"cannot read the token file {self.path}: {exc.strerror}") from exc
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            try:
                token = self.path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise QuerygateError("token_file_unreadable",
                                     f"cannot read the token file {self.path}: {exc.strerror}"
                                     ) from exc
            self._token, self._stamp = token, stamp
        return self._token


class BearerAuth(httpx.Auth):
    """``Authorization: Bearer`` from a token or a token source, asked on every request
    (and an ``X-Querygate-On-Behalf-Of`` token for the person an agent acts for)."""

    def __init__(self, token: TokenSource, on_behalf_of: TokenSource | None = None) -> None:
        self._token = token
        self._on_behalf_of = on_behalf_of

    @staticmethod
    def _read(source: TokenSource) -> str:
        return source if isinstance(source, str) else source()

    def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        request.headers["Authorization"] = f"Bearer {self._read(self._token)}"
        if self._on_behalf_of is not None:
            request.headers["X-Querygate-On-Behalf-Of"] = (
                f"Bearer {self._read(self._on_behalf_of)}")
        yield request


@dataclass(frozen=True, slots=True)
class Call:
    """One request to the gateway, as plain values."""

    method: str
    path: str
    json: Any = None
    accept: str = "application/json"


def statement(sql: str, params: list[Any] | None, approval_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"sql": sql, "params": list(params or [])}
    if approval_id is not None:
        body["approval_id"] = approval_id
    return body


def query_call(sql: str, params: list[Any] | None, approval_id: str | None,
               stream: bool = False) -> Call:
    return Call("POST", "/v1/query", statement(sql, params, approval_id),
                NDJSON if stream else "application/json")


def explain_call(sql: str, params: list[Any] | None) -> Call:
    return Call("POST", "/v1/explain", statement(sql, params, None))


def decide_call(approval_id: str, verdict: str, comment: str | None) -> Call:
    return Call("POST", f"/v1/approvals/{_segment(approval_id)}/{verdict}",
                {"comment": comment} if comment is not None else None)


def approval_call(approval_id: str) -> Call:
    return Call("GET", f"/v1/approvals/{_segment(approval_id)}")


def _segment(value: str) -> str:
    # An id is one path segment; anything that could leave it is refused here.
    if not value or any(c in value for c in "/?#%") or value in (".", ".."):
        raise QuerygateError("invalid_request", "an approval id is one path segment")
    return value


def translate(exc: httpx.HTTPError) -> QuerygateError:
    """An httpx failure as the client's own error (the cause kept)."""
    from querygate_client.errors import TransportError

    error = TransportError("transport_error", f"the gateway could not be reached: {type(exc).__name__}")
    error.__cause__ = exc
    return error


def body_of(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def check(response: httpx.Response) -> Any:
    """The JSON body of a success, or the typed error of anything else."""
    body = body_of(response)
    if response.status_code >= 400 or body is None:
        raise error_from(response.status_code, body)
    return body


def query_answer(response: httpx.Response) -> QueryResult | ApprovalPending:
    body = check(response)
    if response.status_code == 202:
        return ApprovalPending(Approval.from_json(body["approval"]), body.get("decision_id"))
    return QueryResult.from_json(body)


def explanation(response: httpx.Response) -> Explanation:
    body = check(response)
    return Explanation(body["facts"], body["decision"], body["identity"])


def catalog(response: httpx.Response) -> Catalog:
    body = check(response)
    return Catalog(body["version"], [CatalogTable(t["table"], t["columns"]) for t in body["tables"]])


def approval(response: httpx.Response) -> Approval:
    return Approval.from_json(check(response)["approval"])


def approvals(response: httpx.Response) -> list[Approval]:
    return [Approval.from_json(a) for a in check(response)["approvals"]]


class StreamState:
    """An NDJSON answer read line by line: the header, the rows, then its end line."""

    def __init__(self) -> None:
        self.header: dict[str, Any] | None = None
        self.row_count: int | None = None
        self.complete = False

    def line(self, raw: bytes | str) -> list[Any] | None:
        """A row, or None for the header and the end line; an error line raises."""
        import json

        if not raw.strip():
            return None
        value = json.loads(raw)
        if isinstance(value, list):
            return value
        if self.header is None:
            self.header = value
            return None
        if "error" in value:
            raise error_from(None, value)
        self.row_count = value.get("row_count")
        self.complete = bool(value.get("complete"))
        return None

    @property
    def columns(self) -> list[str]:
        return [c["name"] for c in (self.header or {}).get("columns", [])]

    @property
    def masked(self) -> dict[str, str]:
        return dict(((self.header or {}).get("decision") or {}).get("masked") or {})
