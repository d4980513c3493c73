"""The decision transport (app/policy.py) against a scripted HTTP peer on loopback.

Real OPA is in the integration tests; this peer lets each answer be exactly what a broken or
restarted OPA might send: chunked bodies, closed keep-alive connections, garbage, oversize
answers. Every failure must become ``policy_unavailable``; nothing may be guessed.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from app.errors import Unavailable
from app.policy import DecisionTransport, PolicyClient

DECISION = {"allow": True, "reasons": [{"rule": "r", "message": "m"}], "masks": {},
            "require_approval": None, "max_rows": None}
Answer = Callable[[int, bytes], bytes | None]


def json_answer(body: Any, status: str = "200 OK", extra: str = "") -> bytes:
    data = orjson.dumps(body)
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def chunked_answer(body: Any) -> bytes:
    data = orjson.dumps(body)
    half = len(data) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (data[:half], data[half:]))
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"


class Peer:
    """Answers each request with ``answer(request number, request bytes)``; None = hang up."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                reply = self.answer(len(self.requests), request)
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def peer(answer: Answer) -> AsyncIterator[tuple[Peer, str]]:
    p = Peer(answer)
    server = await asyncio.start_server(p.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield p, f"http://127.0.0.1:{port}"
    finally:
        for writer in p.writers:
            writer.close()
        server.close()


async def unavailable(client: PolicyClient) -> str:
    with pytest.raises(Unavailable) as caught:
        await client.decide({"query": {}})
    assert caught.value.code == "policy_unavailable"
    return caught.value.message


async def test_decisions_reuse_one_keep_alive_connection_and_send_the_input():
    async with peer(lambda n, _: json_answer({"result": DECISION, "decision_id": f"d{n}"})) as (
        p, url
    ):
        client = PolicyClient(url, "querygate/decision", timeout_ms=1000)
        try:
            ids = [(await client.decide({"n": i})).id for i in range(5)]
        finally:
            await client.close()
    assert ids == ["d1", "d2", "d3", "d4", "d5"]
    assert p.connections == 1
    first = p.requests[0]
    assert first.startswith(b"POST /v1/data/querygate/decision?provenance=true HTTP/1.1\r\n")
    assert first.endswith(orjson.dumps({"input": {"n": 0}}))


async def test_a_chunked_answer_is_read_whole():
    async with peer(lambda n, _: chunked_answer({"result": DECISION})) as (_, url):
        client = PolicyClient(url, "querygate/decision", timeout_ms=1000)
        try:
            assert (await client.decide({})).allow is True
            assert (await client.decide({})).reasons[0].rule == "r"
        finally:
            await client.close()


async def test_a_keep_alive_connection_closed_while_idle_is_replaced_transparently():
    async with peer(lambda n, _: json_answer({"result": DECISION})) as (p, url):
        client = PolicyClient(url, "querygate/decision", timeout_ms=1000)
        try:
            await client.decide({})
            # OPA's idle timeout (or a restart) closes the pooled connection.
            for writer in p.writers:
                writer.close()
            await asyncio.sleep(0.05)
            assert (await client.decide({})).allow is True
        finally:
            await client.close()
    assert p.connections == 2


async def test_connection_close_answers_are_not_reused():
    answer = json_answer({"result": DECISION}, extra="Connection: close\r\n")
    async with peer(lambda n, _: answer) as (p, url):
        client = PolicyClient(url, "querygate/decision", timeout_ms=1000)
        try:
            for _ in range(3):
                assert (await client.decide({})).allow is True
        finally:
            await client.close()
    assert p.connections == 3


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (json_answer({"code": "internal_error"}, "500 Internal Server Error"), "answered 500"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnope!", "invalid JSON"),
        (b"SMTP ready\r\n\r\n", "unreadably"),
        (json_answer({"result": {"allow": "yes"}}), "allow must be a boolean"),
        (json_answer({}), "no decision"),
        (json_answer({"result": DECISION, "pad": "x" * (5 << 20)}), "unreadably"),
        (None, "unreachable"),  # the peer hangs up before answering, on a fresh connection
    ],
)
async def test_every_bad_answer_is_policy_unavailable(reply, message):
    async with peer(lambda n, _: reply) as (_, url):
        client = PolicyClient(url, "querygate/decision", timeout_ms=2000)
        try:
            assert message in await unavailable(client)
        finally:
            await client.close()


async def test_a_peer_that_never_answers_times_out_and_its_connection_is_dropped():
    writers: list[asyncio.StreamWriter] = []

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read(65536)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    client = PolicyClient(url, "querygate/decision", timeout_ms=200)
    try:
        assert "in time" in await unavailable(client)
        assert client._transport._idle == []  # a half-used connection is never reused
    finally:
        await client.close()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_nothing_listening_is_unreachable():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()
    client = PolicyClient(url, "querygate/decision", timeout_ms=500)
    try:
        assert "unreachable" in await unavailable(client)
    finally:
        await client.close()


def test_the_transport_keeps_a_path_prefix_of_the_opa_url():
    transport = DecisionTransport("http://opa.internal:8181/opa/")
    assert transport._prefix == "/opa"
    assert transport._host_header == b"opa.internal:8181"
