"""``Client`` and ``AsyncClient``: the gateway's HTTP API over httpx, sync and async.

Both only send the requests ``_core`` builds and hand its parsers the answers; errors are
the typed exceptions of ``querygate_client.errors``, chosen by the gateway's stable code.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import httpx

from querygate_client import _core
from querygate_client._core import BearerAuth, Call, StreamState, TokenSource
from querygate_client.errors import QuerygateError
from querygate_client.models import Approval, ApprovalPending, Catalog, Explanation, QueryResult

POLL_INTERVAL_S = 1.0


def _settled(approval: Approval) -> bool:
    return approval.status != "pending"


class Client:
    """A synchronous client of one gateway (``base_url``) for one caller (``token``: a
    string, or a callable such as ``TokenFile`` asked before every request)."""

    def __init__(self, base_url: str, token: TokenSource, *, on_behalf_of: TokenSource | None = None,
                 timeout: httpx.Timeout | float = _core.DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url, auth=BearerAuth(token, on_behalf_of),
                                  timeout=timeout, transport=transport,
                                  headers={"user-agent": "querygate-client"})

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: Call) -> httpx.Response:
        try:
            return self._http.request(call.method, call.path, json=call.json,
                                      headers={"accept": call.accept})
        except httpx.HTTPError as exc:
            raise _core.translate(exc) from exc

    def query(self, sql: str, params: list[Any] | None = None, *,
              approval_id: str | None = None) -> QueryResult | ApprovalPending:
        """Run one statement: its rows, or ``ApprovalPending`` when it needs an approval."""
        return _core.query_answer(self._send(_core.query_call(sql, params, approval_id)))

    def request_approval(self, sql: str, params: list[Any] | None = None) -> ApprovalPending:
        """Send a statement that policy holds for an approval; anything else is an error."""
        answer = self.query(sql, params)
        if not isinstance(answer, ApprovalPending):
            raise QuerygateError("approval_not_required", "the statement ran without one")
        return answer

    @contextlib.contextmanager
    def stream(self, sql: str, params: list[Any] | None = None) -> Iterator[RowIterator]:
        """The rows as NDJSON, one list per row, read as they arrive."""
        call = _core.query_call(sql, params, None, stream=True)
        try:
            with self._http.stream(call.method, call.path, json=call.json,
                                   headers={"accept": call.accept}) as response:
                if response.status_code != 200:
                    response.read()
                    _core.check(response)
                yield RowIterator(response.iter_lines())
        except httpx.HTTPError as exc:
            raise _core.translate(exc) from exc

    def explain(self, sql: str, params: list[Any] | None = None) -> Explanation:
        """The facts and the decision; nothing is run."""
        return _core.explanation(self._send(_core.explain_call(sql, params)))

    def catalog(self) -> Catalog:
        """The tables and columns this caller may read, with their masks."""
        return _core.catalog(self._send(Call("GET", "/v1/catalog")))

    def approval(self, approval_id: str) -> Approval:
        """One approval, as it stands now."""
        return _core.approval(self._send(_core.approval_call(approval_id)))

    def approvals(self, status: str | None = None) -> list[Approval]:
        """Your own requests and those awaiting one of your groups."""
        path = "/v1/approvals" + (f"?status={quote(status)}" if status else "")
        return _core.approvals(self._send(Call("GET", path)))

    def approve(self, approval_id: str, comment: str | None = None) -> Approval:
        return _core.approval(self._send(_core.decide_call(approval_id, "approve", comment)))

    def reject(self, approval_id: str, comment: str | None = None) -> Approval:
        return _core.approval(self._send(_core.decide_call(approval_id, "reject", comment)))

    def wait_for_approval(self, approval_id: str, timeout_s: float = 300.0,
                          interval_s: float = POLL_INTERVAL_S) -> Approval:
        """Poll until the approval is no longer pending (or ``timeout_s``: it is returned
        as it stands)."""
        deadline = time.monotonic() + timeout_s
        while True:
            approval = self.approval(approval_id)
            if _settled(approval) or time.monotonic() >= deadline:
                return approval
            time.sleep(interval_s)


class _Rows:
    """What both row iterators say about their stream, read off its ``StreamState``."""

    state: StreamState

    @property
    def columns(self) -> list[str]:
        return self.state.columns

    @property
    def masked(self) -> dict[str, str]:
        return self.state.masked

    @property
    def complete(self) -> bool:
        return self.state.complete


class RowIterator(_Rows):
    """The rows of an NDJSON answer; ``columns`` and ``masked`` once the header is read,
    ``complete`` and ``row_count`` at the end. A cut stream raises its typed error."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines = lines
        self.state = StreamState()
        for raw in lines:  # the header line comes first
            self.state.line(raw)
            if self.state.header is not None:
                break

    def __iter__(self) -> Iterator[list[Any]]:
        for raw in self._lines:
            row = self.state.line(raw)
            if row is not None:
                yield row


class AsyncClient:
    """The asynchronous twin of ``Client``."""

    def __init__(self, base_url: str, token: TokenSource, *, on_behalf_of: TokenSource | None = None,
                 timeout: httpx.Timeout | float = _core.DEFAULT_TIMEOUT,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, auth=BearerAuth(token, on_behalf_of),
                                       timeout=timeout, transport=transport,
                                       headers={"user-agent": "querygate-client"})

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: Call) -> httpx.Response:
        try:
            return await self._http.request(call.method, call.path, json=call.json,
                                            headers={"accept": call.accept})
        except httpx.HTTPError as exc:
            raise _core.translate(exc) from exc

    async def query(self, sql: str, params: list[Any] | None = None, *,
                    approval_id: str | None = None) -> QueryResult | ApprovalPending:
        """Run one statement: its rows, or ``ApprovalPending`` when it needs an approval."""
        return _core.query_answer(await self._send(_core.query_call(sql, params, approval_id)))

    async def request_approval(self, sql: str, params: list[Any] | None = None) -> ApprovalPending:
        answer = await self.query(sql, params)
        if not isinstance(answer, ApprovalPending):
            raise QuerygateError("approval_not_required", "the statement ran without one")
        return answer

    @contextlib.asynccontextmanager
    async def stream(self, sql: str, params: list[Any] | None = None
                     ) -> AsyncIterator[AsyncRowIterator]:
        """The rows as NDJSON, one list per row, read as they arrive."""
        call = _core.query_call(sql, params, None, stream=True)
        try:
            async with self._http.stream(call.method, call.path, json=call.json,
                                         headers={"accept": call.accept}) as response:
                if response.status_code != 200:
                    await response.aread()
                    _core.check(response)
                rows = AsyncRowIterator(response.aiter_lines())
                await rows.start()
                yield rows
        except httpx.HTTPError as exc:
            raise _core.translate(exc) from exc

    async def explain(self, sql: str, params: list[Any] | None = None) -> Explanation:
        return _core.explanation(await self._send(_core.explain_call(sql, params)))

    async def catalog(self) -> Catalog:
        return _core.catalog(await self._send(Call("GET", "/v1/catalog")))

    async def approval(self, approval_id: str) -> Approval:
        return _core.approval(await self._send(_core.approval_call(approval_id)))

    async def approvals(self, status: str | None = None) -> list[Approval]:
        path = "/v1/approvals" + (f"?status={quote(status)}" if status else "")
        return _core.approvals(await self._send(Call("GET", path)))

    async def approve(self, approval_id: str, comment: str | None = None) -> Approval:
        return _core.approval(await self._send(_core.decide_call(approval_id, "approve", comment)))

    async def reject(self, approval_id: str, comment: str | None = None) -> Approval:
        return _core.approval(await self._send(_core.decide_call(approval_id, "reject", comment)))

    async def wait_for_approval(self, approval_id: str, timeout_s: float = 300.0,
                                interval_s: float = POLL_INTERVAL_S) -> Approval:
        deadline = time.monotonic() + timeout_s
        while True:
            approval = await self.approval(approval_id)
            if _settled(approval) or time.monotonic() >= deadline:
                return approval
            await asyncio.sleep(interval_s)


class AsyncRowIterator(_Rows):
    """The asynchronous twin of ``RowIterator``."""

    def __init__(self, lines: AsyncIterator[str]) -> None:
        self._lines = lines
        self.state = StreamState()

    async def start(self) -> None:
        async for raw in self._lines:
            self.state.line(raw)
            if self.state.header is not None:
                return

    def __aiter__(self) -> AsyncIterator[list[Any]]:
        return self._rows()

    async def _rows(self) -> AsyncIterator[list[Any]]:
        async for raw in self._lines:
            row = self.state.line(raw)
            if row is not None:
                yield row
