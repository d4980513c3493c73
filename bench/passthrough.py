"""(b) of ``make bench``: the same HTTP request path as querygate, without governance.

FastAPI on uvicorn (uvloop, httptools), asyncpg with the same pool size, orjson responses in
querygate's shape (``columns``, ``rows``, ``row_count``, ``rows_affected``) and the same NDJSON
framing. No authentication, no facts, no policy, no masking, no audit, no transaction
wrapper: what is left is the cost every HTTP-to-PostgreSQL proxy pays, so querygate's ratio
to it is the cost of governance alone. It is part of the benchmark, never of the product.

    .venv/bin/python bench/passthrough.py DSN PORT POOL_SIZE [WORKERS]

With more than one worker uvicorn imports ``app_from_env`` in each worker process; granian
(``load_bench.py --server granian``) serves that same factory:
``granian --interface asgi --factory bench.passthrough:app_from_env``, with the DSN and pool
size in ``BENCH_PASSTHROUGH_DSN`` and ``BENCH_PASSTHROUGH_POOL``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse

NDJSON = "application/x-ndjson"


def _default(value: Any) -> str:
    return str(value)


def create_app(dsn: str, pool_size: int) -> FastAPI:
    pools: list[asyncpg.Pool] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pools.append(await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size))
        yield
        await pools[0].close()

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.post("/v1/query")
    async def query(request: Request) -> Response:
        body = orjson.loads(await request.body())
        sql, params = body["sql"], body.get("params", [])
        if NDJSON in request.headers.get("accept", ""):
            return StreamingResponse(_stream(pools[0], sql, params), media_type=NDJSON)
        async with pools[0].acquire() as conn:
            statement = await conn.prepare(sql)
            rows = await statement.fetch(*params)
            status = statement.get_statusmsg() or ""
            columns = [{"name": a.name, "type": a.type.name} for a in statement.get_attributes()]
        last = status.rsplit(" ", 1)[-1]
        return Response(
            orjson.dumps(
                {"columns": columns, "rows": [tuple(r) for r in rows], "row_count": len(rows),
                 "rows_affected": int(last) if not columns and last.isdigit() else None},
                default=_default,
            ),
            media_type="application/json",
        )

    return app


def app_from_env() -> FastAPI:
    """The app for a server that imports it by name in each worker (uvicorn's, granian's)."""
    return create_app(os.environ["BENCH_PASSTHROUGH_DSN"], int(os.environ["BENCH_PASSTHROUGH_POOL"]))


async def _stream(pool: asyncpg.Pool, sql: str, params: list[Any]) -> AsyncIterator[bytes]:
    async with pool.acquire() as conn, conn.transaction():
        statement = await conn.prepare(sql)
        yield orjson.dumps(
            {"columns": [{"name": a.name, "type": a.type.name} for a in statement.get_attributes()]}
        ) + b"\n"
        cursor = await statement.cursor(*params)
        rows = 0
        while batch := await cursor.fetch(500):
            rows += len(batch)
            yield b"".join(orjson.dumps(tuple(r), default=_default) + b"\n" for r in batch)
    yield orjson.dumps({"row_count": rows, "complete": True}) + b"\n"


def main() -> None:
    dsn, port, pool_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    workers = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    options: dict[str, object] = {
        "host": "127.0.0.1", "port": port, "log_level": "warning", "access_log": False,
        "loop": "uvloop", "http": "httptools", "server_header": False,
    }
    if workers == 1:
        uvicorn.run(create_app(dsn, pool_size), **options)
        return
    os.environ |= {"BENCH_PASSTHROUGH_DSN": dsn, "BENCH_PASSTHROUGH_POOL": str(pool_size)}
    # The workers import the factory by name: from the repository root, not from bench/.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    uvicorn.run("bench.passthrough:app_from_env", factory=True, workers=workers,
                **options)


if __name__ == "__main__":
    main()
