"""Decision round trip to a real OPA, two clients on the same input, OPA process and run:
the gateway's PolicyClient (DecisionTransport) and a keep-alive httpx client
(opa-python-client's aiohttp client was the third until it was dropped as a dependency;
docs/benchmarks.md keeps its figures). Wall time per call and this process's CPU per call: the
gateway's CPU is what bounds its throughput.

    .venv/bin/python bench/opa_decision_bench.py [N]
"""

from __future__ import annotations

import statistics
import sys
import time

import httpx
import orjson
import uvloop

from app.devstack import start_opa
from app.policy import PolicyClient, parse_decision

INPUT = {
    "identity": {"sub": "alice", "groups": ["analysts"], "issuer": "bench", "auth": "jwt",
                 "email": None, "on_behalf_of": None, "attributes": {}},
    "environment": "staging",
    "request": {"id": "bench", "source_ip": "127.0.0.1", "time": "2026-11-21T10:00:00Z"},
    "database": {"name": "appdb"},
    "query": {
        "fingerprint": "sha256:x", "kind": "select",
        "tables": {"read": ["public.customers"], "write": []},
        "columns": {"read": ["public.customers.email", "public.customers.id"],
                    "predicate": ["public.customers.id"], "write": []},
        "outputs": [{"name": "email", "sources": ["public.customers.email"],
                     "derivation": "direct"}],
        "functions": ["lower"], "has_where": True, "where_trivially_true": False, "limit": 1,
        "param_count": 1, "ddl": None, "catalog_version": 1,
    },
    "approval": None,
}


def report(name: str, samples: list[float], cpu_s: float) -> None:
    samples.sort()
    p = lambda q: samples[int(q * (len(samples) - 1))] * 1000  # noqa: E731
    print(f"{name:<30} p50 {p(0.5):7.3f} ms   p95 {p(0.95):7.3f} ms   "
          f"mean {statistics.mean(samples) * 1000:7.3f} ms   "
          f"client CPU {cpu_s / len(samples) * 1e6:5.0f} µs/call")


async def run(url: str, n: int) -> None:
    gateway_client = PolicyClient(url, "querygate/decision", timeout_ms=2000)
    httpx_client = httpx.AsyncClient(timeout=2, limits=httpx.Limits(max_keepalive_connections=8))

    async def via_httpx() -> object:
        response = await httpx_client.post(
            f"{url}/v1/data/querygate/decision", content=orjson.dumps({"input": INPUT}),
            headers={"content-type": "application/json"},
        )
        return parse_decision(orjson.loads(response.content)["result"], "x")

    try:
        for _ in range(200):  # warm every connection pool and OPA
            await gateway_client.decide(INPUT)
            await via_httpx()
        for label, call in (
            ("PolicyClient (hot path)", lambda: gateway_client.decide(INPUT)),
            ("httpx keep-alive", via_httpx),
        ):
            samples = []
            cpu = time.process_time()
            for _ in range(n):
                start = time.perf_counter()
                await call()
                samples.append(time.perf_counter() - start)
            report(label, samples, time.process_time() - cpu)
    finally:
        await gateway_client.close()
        await httpx_client.aclose()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    opa = start_opa()
    try:
        uvloop.run(run(opa.url, n))  # the gateway's event loop
    finally:
        opa.stop()


if __name__ == "__main__":
    main()
