"""Filling the audit index from the audit stream, from the stored offset, batch by batch.

Sources:

- ``file:<path>`` — the file sink's JSONL file (``make run``). The offset is the byte offset
  after the last indexed line; only whole lines (ending in a newline) are read, so a line
  the sink is still writing waits for the next poll.
- ``kafka:<topic>`` — the topic (one partition per instance key; the offset of each
  partition is stored as ``kafka:<topic>:<partition>``).

Each batch and its offset are one transaction (index.ingest_batch), so a crash or SIGKILL
at any point loses nothing and adds nothing twice: the next start resumes at the stored
offset, and events already held are recognised by their key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from app.console import index

log = logging.getLogger("querygate.console.ingest")


@dataclass
class IngestStatus:
    """What the ingester has done since it started (for /readyz and the health page)."""

    source: str
    offset: int = 0
    inserted: int = 0
    duplicates: int = 0
    breaks: int = 0
    error: str | None = None
    caught_up: bool = False


def read_lines(path: Path, offset: int, limit: int) -> tuple[list[tuple[int, bytes]], int]:
    """Up to ``limit`` whole lines of ``path`` from byte ``offset``, and the offset after them."""
    lines: list[tuple[int, bytes]] = []
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return lines, offset
    with f:
        f.seek(offset)
        position = offset
        while len(lines) < limit:
            raw = f.readline()
            if not raw.endswith(b"\n"):
                break  # end of file, or a line still being written
            if raw.strip():
                lines.append((position, raw))
            position += len(raw)
    return lines, position


class FileIngester:
    """Tails the JSONL file into the index."""

    def __init__(self, pool: asyncpg.Pool, path: Path, batch: int, poll_s: float) -> None:
        self.pool = pool
        self.path = path
        self.batch = batch
        self.poll_s = poll_s
        self.status = IngestStatus(source=f"file:{path}")

    async def step(self) -> int:
        """Index the next batch; how many lines it read (0 when caught up)."""
        async with self.pool.acquire() as conn:
            offset = await index.stored_offset(conn, self.status.source)
            size = await asyncio.to_thread(_size, self.path)
            if size is not None and size < offset:
                # The file was replaced or truncated under us: never silently re-read it.
                raise RuntimeError(
                    f"{self.path} is shorter ({size} bytes) than the indexed offset {offset}"
                )
            lines, next_offset = await asyncio.to_thread(read_lines, self.path, offset, self.batch)
            if next_offset == offset:
                self.status.offset = offset
                return 0
            result = await index.ingest(conn, self.status.source, lines, next_offset)
        self.status.offset = next_offset
        self.status.inserted += result.inserted
        self.status.duplicates += result.duplicates
        self.status.breaks += len(result.breaks)
        for instance, chain, seq, kind in result.breaks:
            log.warning("audit chain break: %s at instance %s chain %s seq %s",
                        kind, instance, chain, seq)
        return len(lines)

    async def run_once(self) -> None:
        """Index everything there is now, then return."""
        while await self.step():
            pass
        self.status.caught_up = True

    async def run(self) -> None:
        """Follow the file for ever; an error is reported and retried, never fatal."""
        while True:
            try:
                read = await self.step()
                self.status.error = None
            except (OSError, asyncpg.PostgresError, RuntimeError) as exc:
                self.status.error = f"{type(exc).__name__}: {exc}"
                log.error("audit index ingestion failed: %s", self.status.error)
                read = 0
            if read == 0:
                self.status.caught_up = self.status.error is None
                await asyncio.sleep(self.poll_s)


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


class KafkaIngester:
    """Consumes the audit topic into the index, each partition from its stored offset."""

    def __init__(self, pool: asyncpg.Pool, bootstrap: str, topic: str, batch: int,
                 poll_s: float, **config: Any) -> None:
        self.pool = pool
        self.bootstrap = bootstrap
        self.topic = topic
        self.batch = batch
        self.poll_s = poll_s
        self.config = config
        self.status = IngestStatus(source=f"kafka:{topic}")

    @contextlib.asynccontextmanager
    async def _consumer(self) -> AsyncIterator[Any]:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None,
            auto_offset_reset="earliest", **self.config,
        )
        await consumer.start()
        try:
            yield consumer
        finally:
            await consumer.stop()

    async def run(self, once: bool = False) -> None:
        """Follow the topic (``once``: until every partition's end as it was at start). When
        following, an error is reported and the consumer started again from the stored
        offsets; never fatal."""
        if once:
            await self._consume(once=True)
            return
        while True:
            try:
                await self._consume(once=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # aiokafka's errors have no common base worth naming
                self.status.error = f"{type(exc).__name__}: {exc}"
                self.status.caught_up = False
                log.error("audit index ingestion failed: %s", self.status.error)
                await asyncio.sleep(max(self.poll_s, 1.0))

    async def _consume(self, once: bool) -> None:
        from aiokafka import TopicPartition

        partitions = await self._partitions()
        async with self._consumer() as consumer:
            tps = [TopicPartition(self.topic, p) for p in partitions]
            consumer.assign(tps)
            async with self.pool.acquire() as conn:
                for tp in tps:
                    offset = await index.stored_offset(conn, self._source(tp.partition))
                    consumer.seek(tp, offset)
            ends = await consumer.end_offsets(tps) if once else {}
            while True:
                batch = await consumer.getmany(*tps, timeout_ms=int(self.poll_s * 1000),
                                               max_records=self.batch)
                for tp, records in batch.items():
                    if not records:
                        continue
                    lines = [(r.offset, r.value) for r in records]
                    async with self.pool.acquire() as conn:
                        result = await index.ingest(
                            conn, self._source(tp.partition), lines, records[-1].offset + 1
                        )
                    self.status.inserted += result.inserted
                    self.status.duplicates += result.duplicates
                    self.status.breaks += len(result.breaks)
                    self.status.offset = records[-1].offset + 1
                self.status.error = None
                if once:
                    positions = [await consumer.position(tp) for tp in tps]
                    if all(p >= ends[tp] for p, tp in zip(positions, tps, strict=True)):
                        self.status.caught_up = True
                        return
                if not batch:
                    self.status.caught_up = True

    async def _partitions(self) -> list[int]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, **self.config)
        try:
            await admin.start()
            described = await admin.describe_topics([self.topic])
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        if not described or described[0].get("error_code", 0) != 0:
            raise RuntimeError(f"topic {self.topic!r} does not exist")
        return sorted(p["partition"] for p in described[0].get("partitions", []))

    def _source(self, partition: int) -> str:
        return f"{self.status.source}:{partition}"
