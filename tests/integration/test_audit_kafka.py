"""The audit stream into a real Kafka broker, through gateway processes under load.

Kafka is a KRaft node started from the jars `make kafka` fetched from Maven Central; the
gateways are `querygate serve` processes (real OPA, real PostgreSQL). Clients use aiohttp
with keep-alive and 8-12 concurrent tasks, so the 2-core machine spends its time in the
gateway rather than in the load generator.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import pytest

from app.audit import read_topic, verify_topic
from app.cli import main
from app.devstack import GatewayProcess, KafkaBroker, start_gateway
from tests.integration.test_audit import event_validator

pytestmark = pytest.mark.integration

QUERY = "SELECT id, country FROM customers WHERE id = $1"
# Every tenth query binds a string no event may contain.
PARAM_QUERY = "SELECT id FROM customers WHERE country = $1"


@dataclass
class Load:
    """What a load run saw: statuses, the request ids answered 200, when each came back."""

    statuses: Counter[int | str] = field(default_factory=Counter)
    ok_ids: list[str] = field(default_factory=list)
    answered_at: list[tuple[float, int | str]] = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    elapsed: float = 0.0


async def _load(url: str, headers: dict[str, str], count: int | None = None,
                until: threading.Event | None = None, concurrency: int = 12,
                pause: float = 0.0) -> Load:
    """``count`` queries (or until ``until`` is set) from ``concurrency`` keep-alive tasks."""
    result = Load()
    issued = 0
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(base_url=url, timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as http:

        async def worker() -> None:
            nonlocal issued
            while (count is None or issued < count) and not (until and until.is_set()):
                n = issued
                issued += 1
                if n % 10 == 0:
                    needle = f"bound-{uuid.uuid4().hex}"
                    result.params.append(needle)
                    body = {"sql": PARAM_QUERY, "params": [needle]}
                else:
                    body = {"sql": QUERY, "params": [n % 500 + 1]}
                try:
                    async with http.post("/v1/query", json=body, headers=headers) as response:
                        await response.read()
                        status: int | str = response.status
                        if status == 200:
                            result.ok_ids.append(response.headers["x-request-id"])
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = type(exc).__name__
                result.statuses[status] += 1
                result.answered_at.append((time.monotonic(), status))
                if pause:
                    await asyncio.sleep(pause)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.elapsed = time.monotonic() - started
    return result


class Background:
    """A load run in a thread until ``stop()``."""

    def __init__(self, url: str, headers: dict[str, str], **kwargs: Any) -> None:
        self.until = threading.Event()
        self.result: Load | None = None

        def run() -> None:
            self.result = asyncio.run(_load(url, headers, until=self.until, **kwargs))

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def stop(self) -> Load:
        self.until.set()
        self.thread.join(timeout=60)
        assert self.result is not None
        return self.result


def _gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(querygate_audit_\w+)\{[^}]*\} (\S+)$", text, re.M)
    }


def _wait_shipped(url: str, timeout_s: float = 90) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        state = _gauges(url)
        if state["querygate_audit_last_sequence"] == state["querygate_audit_shipped_sequence"]:
            return state
        assert time.monotonic() < deadline, f"the spool did not drain: {state}"
        time.sleep(0.2)


def _topic_events(kafka: KafkaBroker, topic: str) -> list[dict[str, Any]]:
    async def read() -> list[dict[str, Any]]:
        return [orjson.loads(value) async for _, _, value in read_topic(kafka.bootstrap, topic)]

    return asyncio.run(read())


def _verify(kafka: KafkaBroker, topic: str) -> dict[str, Any]:
    verifier = asyncio.run(verify_topic(kafka.bootstrap, topic))
    assert verifier.ok, verifier.summary()
    [chain] = verifier.report()["chains"]
    return chain


@pytest.fixture(scope="module")
def serve(serve_settings, kafka, tmp_path_factory):
    """Start `querygate serve` processes with a Kafka audit sink; all stopped at the end."""
    started: list[GatewayProcess] = []

    def start(topic: str, instance: str, spool: Path | None = None, **extra: str) -> GatewayProcess:
        tmp = tmp_path_factory.mktemp(instance)
        settings = {
            **serve_settings,
            "audit_sink": "kafka",
            "audit_kafka_bootstrap": kafka.bootstrap,
            "audit_kafka_topic": topic,
            "audit_spool_dir": str(spool or tmp / "spool"),
            "audit_instance_id": instance,
            **extra,
        }
        gateway = start_gateway(settings, tmp / "gateway.log")
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


@pytest.fixture(scope="module")
def load_run(serve, kafka, alice):
    """Acceptance 1's run: 10,000 queries through one gateway, then a clean stop."""
    topic = "audit-load"
    kafka.create_topic(topic)
    gateway = serve(topic, "gw-load")
    result = asyncio.run(_load(gateway.url, alice, count=10_000, concurrency=12))
    started = time.monotonic()
    state = _wait_shipped(gateway.url)
    drained = time.monotonic() - started
    gateway.stop()
    events = _topic_events(kafka, topic)
    # Figures for the record (pytest -s).
    print(
        f"\naudit load: {result.statuses[200]} queries in {result.elapsed:.1f} s "
        f"({result.statuses[200] / result.elapsed:.0f}/s, {len(events) / result.elapsed:.0f} "
        f"events/s); spool drained {drained:.2f} s after the last answer; "
        f"last seq {state['querygate_audit_last_sequence']:.0f}"
    )
    return topic, result, events


def test_ten_thousand_queries_arrive_in_order_and_verify(load_run, kafka):
    topic, result, events = load_run
    assert result.statuses == {200: 10_000}
    # A decision and an outcome per query, plus the start and stop of the gateway.
    assert len(events) == 20_002
    assert [e["seq"] for e in events] == list(range(1, 20_003))
    chain = _verify(kafka, topic)
    assert (chain["events"], chain["duplicates"], chain["instance"]) == (20_002, 0, "gw-load")
    on_record = Counter(e["request"]["id"] for e in events if e.get("request"))
    assert all(on_record[rid] == 2 for rid in result.ok_ids)
    assert main(["audit", "verify", "--kafka", kafka.bootstrap, "--topic", topic]) == 0
    validator = event_validator()
    for event in events[::10]:
        assert not list(validator.iter_errors(event)), event


def test_no_bound_parameter_reaches_the_topic(load_run):
    _, result, events = load_run
    text = b"\n".join(orjson.dumps(e) for e in events).decode()
    assert len(result.params) == 1000
    # One pass for every needle (they share a prefix) instead of a thousand scans.
    assert not set(re.findall(r"bound-[0-9a-f]{32}", text)) & set(result.params)
    assert "bound-" not in text
    assert {e["query"]["sql"] for e in events if e["type"] == "decision"} == {QUERY, PARAM_QUERY}


def test_a_tampered_copy_is_caught_in_a_file_and_in_a_topic(load_run, kafka, tmp_path, capsys):
    """Acceptance 5: one edited, deleted or swapped event is reported."""
    _, _, events = load_run
    lines = [orjson.dumps(e, option=orjson.OPT_SORT_KEYS) for e in events[:300]]
    copy = tmp_path / "copy.jsonl"

    def verify(mutated: list[bytes]) -> tuple[int, str]:
        copy.write_bytes(b"\n".join(mutated) + b"\n")
        code = main(["audit", "verify", str(copy)])
        return code, capsys.readouterr().out

    assert verify(lines)[0] == 0
    edited = list(lines)
    at = next(i for i in range(100, 300) if b'"rows_returned":1,' in lines[i])
    edited[at] = edited[at].replace(b'"rows_returned":1,', b'"rows_returned":0,')
    code, out = verify(edited)
    assert code == 1 and f"edited (hash does not match content): seq {at + 1}" in out
    deleted = lines[:150] + lines[151:]
    code, out = verify(deleted)
    assert code == 1 and "missing events: 151" in out
    swapped = list(lines)
    swapped[200], swapped[201] = swapped[201], swapped[200]
    code, out = verify(swapped)
    assert code == 1 and "out of order" in out

    async def produce(topic: str, values: list[bytes]) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
        try:
            await producer.start()
            for value in values:
                await producer.send_and_wait(topic, value, key=b"gw-load")
        finally:
            await producer.stop()

    kafka.create_topic("audit-copy-good")
    kafka.create_topic("audit-copy-edited")
    asyncio.run(produce("audit-copy-good", lines))
    asyncio.run(produce("audit-copy-edited", edited))
    assert main(["audit", "verify", "--kafka", kafka.bootstrap, "--topic", "audit-copy-good"]) == 0
    capsys.readouterr()
    assert main(["audit", "verify", "--kafka", kafka.bootstrap, "--topic",
                 "audit-copy-edited"]) == 1
    assert "edited" in capsys.readouterr().out


def test_a_30_second_kafka_outage_under_load_loses_nothing(serve, kafka, alice):
    """Acceptance 2: queries keep being answered while Kafka is down; the spool grows, then
    drains in order when it is back; verify explains any duplicate."""
    topic = "audit-outage"
    kafka.create_topic(topic)
    gateway = serve(topic, "gw-outage", audit_kafka_timeout_ms="5000")
    load = Background(gateway.url, alice, concurrency=8, pause=0.02)
    try:
        time.sleep(3)
        kafka.stop()
        down = time.monotonic()
        time.sleep(10)
        # The sink is reported down once a delivery has failed (the producer's timeout is
        # 5 s, and a loaded machine adds to it): watch for it through the outage.
        during = _gauges(gateway.url)
        while during["querygate_audit_sink_up"] != 0 and time.monotonic() - down < 27:
            time.sleep(0.5)
            during = _gauges(gateway.url)
        time.sleep(max(0.0, 30 - (time.monotonic() - down)))
        kafka.start()
        up = time.monotonic()
        time.sleep(3)
    finally:
        if kafka.process is None:
            kafka.start()
        result = load.stop()
    assert during["querygate_audit_spool_events"] > 100
    assert during["querygate_audit_sink_up"] == 0
    assert during["querygate_audit_spool_oldest_age_seconds"] > 5
    state = _wait_shipped(gateway.url)
    assert state["querygate_audit_sink_up"] == 1
    metrics = httpx.get(f"{gateway.url}/metrics").text
    assert re.search(r"^querygate_audit_kafka_send_errors_total\{[^}]+\} [1-9]", metrics, re.M)
    gateway.stop()
    while_down = Counter(status for at, status in result.answered_at if down < at < up)
    assert set(while_down) == {200} and while_down[200] > 500, while_down
    assert set(result.statuses) == {200}
    chain = _verify(kafka, topic)
    events = _topic_events(kafka, topic)
    assert chain["events"] == max(e["seq"] for e in events) == 2 * result.statuses[200] + 2
    on_record = {e["request"]["id"] for e in events if e.get("request")}
    assert set(result.ok_ids) <= on_record


def test_sigkill_mid_load_then_restart_ships_the_spool(serve, kafka, alice, tmp_path):
    """Acceptance 3: the gateway dies with events spooled but not shipped; its successor on
    the same spool (same instance id) ships them first and continues the chain. Every
    request answered 200 before the kill has its decision and its outcome on record (reads
    run while their decision is written, and answer only once it is durable)."""
    topic = "audit-crash"
    kafka.create_topic(topic)
    spool = tmp_path / "spool"
    first = serve(topic, "gw-crash", spool)
    load = Background(first.url, alice, concurrency=16)
    try:
        time.sleep(2)
        kafka.stop()  # from here on the spool only grows
        time.sleep(3)
        first.process.kill()
        first.process.wait()
    finally:
        before = load.stop()
        kafka.start()
    marker = orjson.loads((spool / "shipped.json").read_bytes())
    segments = sorted((spool / "segments").glob("*.jsonl"))
    # The kill may cut a write: its torn tail was never durable, nor answered, and the
    # successor drops it (Spool.recover). The last whole line is the last event written.
    data = segments[-1].read_bytes()
    last = orjson.loads(data[:data.rfind(b"\n") + 1].splitlines()[-1])
    assert last["seq"] > marker["seq"] + 100, (marker, last["seq"])
    second = serve(topic, "gw-crash", spool)
    after = asyncio.run(_load(second.url, alice, count=500, concurrency=8))
    _wait_shipped(second.url)
    second.stop()
    chain = _verify(kafka, topic)
    events = _topic_events(kafka, topic)
    assert chain["instance"] == "gw-crash" and chain["first_seq"] == 1
    assert chain["last_seq"] == max(e["seq"] for e in events) > last["seq"]
    restarted = [e for e in events if e["type"] == "lifecycle"
                 and e["lifecycle"]["action"] == "started" and e["seq"] > 1]
    assert restarted and restarted[0]["lifecycle"]["recovered_unshipped"] >= last["seq"] - marker["seq"]
    on_record = {e["request"]["id"] for e in events if e.get("request")}
    assert set(before.ok_ids) | set(after.ok_ids) <= on_record
    for kind in ("decision", "execution"):
        recorded = {e["request"]["id"] for e in events if e["type"] == kind}
        assert not set(before.ok_ids) - recorded, kind
    assert after.statuses == {200: 500}
