"""The audit trail: every decision, execution, approval step and authentication failure.

Each event is sealed into a per-instance hash chain, durably appended to a local spool
(group-committed ``fdatasync``) before the response goes out, and shipped in order to the
sink by a background task. The decision path never waits on Kafka: only on the spool.

::

    RequestAudit ─► AuditLog.record(event)    request path: seal, append, await the fsync
                       │
                       ▼
                    Spool        segment files, one writer, disk quota, crash recovery
                       │         (only fsynced lines are ever read for shipping)
                       ▼
                    Shipper ─► KafkaSink | FileSink | StdoutSink
                       │         acknowledged → shipped.json; shipped segments deleted
                       ▼
    Verifier        checks a copy of the trail (file or topic): gaps, reordering, edits

With several worker processes (``QUERYGATE_WORKERS``) each claims a spool of its own, and so
a chain of its own (``claim_spool``): worker slot 0 is the configured directory itself, as a
single process uses it, slot *i* is its ``worker-<i>/``.

Errors (internal; the request path turns them into 503 ``audit_unavailable``)::

    AuditError
     ├── SpoolFull       the quota or the disk cannot take the event: nothing is appended
     └── SinkError       a delivery failed (how many lines got through is carried);
                         the shipper backs off and resends from the spool

The event schema is ``querygate.audit/v1`` (docs/audit.md, docs/audit-event.schema.json).
Events never hold result values, bound parameter values, SQL literals or secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import fcntl
import functools
import hashlib
import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import orjson
import postgast
from postgast.pg_query_pb2 import Token

from app import tracing
from app.config import ConfigError, Settings
from app.errors import GatewayError, Unauthenticated, Unavailable
from app.ids import new_id
from app.metrics import Metrics, StageClock

if TYPE_CHECKING:
    from app.approvals import Approval
    from app.facts import QueryFacts
    from app.identity import Identity
    from app.policy import Decision

log = logging.getLogger("querygate.audit")

SCHEMA = "querygate.audit/v1"
# prev_hash of the first event of a chain.
GENESIS = "sha256:" + "0" * 64
SEGMENT_DIGITS = 20
_SHIP_LINGER_S = 0.05
# Event-loop turns the spool writer lets run for more events before a batch, at most and
# in a row with none (Spool.run_writer).
LINGER_TURNS = 20
LINGER_IDLE_TURNS = 6
_MARKER_EVERY_S = 0.1
_MAX_BACKOFF_S = 2.0


# --- canonical form and the hash chain ----------------------------------------------------


def canonical(event: Mapping[str, Any]) -> bytes:
    """The bytes that are hashed and shipped: orjson, keys sorted at every level, no spaces."""
    return orjson.dumps(event, option=orjson.OPT_SORT_KEYS)


def event_hash(event: Mapping[str, Any]) -> str:
    """sha256 of the canonical form of the event without its ``hash`` field."""
    body = {k: v for k, v in event.items() if k != "hash"}
    return "sha256:" + hashlib.sha256(canonical(body)).hexdigest()


# --- redacted SQL -------------------------------------------------------------------------

# What PostgreSQL's own scanner (libpg_query's, through postgast) reads as a literal: every
# string form ('…', E'…', U&'…', N'…' after its NCHAR, $$…$$, $tag$…$tag$, each piece of a
# 'a' 'b' continuation), bit and hex strings (B'…', X'…') and every number (0x1F, 0o17,
# 0b101, 1_000, 1.5e10, .5). $1 is PARAM, never a literal.
_SQL_LITERALS = frozenset(
    Token.Value(kind) for kind in ("SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST")
)
_SQL_COMMENTS = frozenset({Token.Value("SQL_COMMENT"), Token.Value("C_COMMENT")})
_NCHAR = Token.Value("NCHAR")
_MAX_RESCANS = 8


# A pure function of the text, and services repeat their statements: the same LRU idea as
# the facts cache (bounded: 512 texts of at most QUERYGATE_MAX_SQL_BYTES each).
@functools.lru_cache(maxsize=512)
def redact_sql(sql: str) -> str | None:
    """The SQL text with every literal replaced by ``?`` and comments dropped.

    Literals are what PostgreSQL's scanner says they are. Layout, keywords, operators and
    identifiers are kept; ``$1`` placeholders stay. From the point where the scanner gives up
    (an unterminated quote, trailing junk after a number) the rest of the text is one
    ``?``; text that cannot be scanned at all gives None: the event then carries no SQL
    rather than unredacted SQL.
    """
    try:
        sql.encode("utf-8")
    except UnicodeError:  # a lone surrogate: not text PostgreSQL could receive
        return None
    text, truncated = sql, False
    for _ in range(_MAX_RESCANS):
        try:
            tokens = postgast.scan(text).tokens
        except postgast.PgQueryError as exc:
            # A 1-based byte offset of the token the scanner refused: rescan what precedes it.
            data = text.encode("utf-8")
            position = exc.cursorpos - 1
            if not 0 <= position < len(data):
                return None
            text, truncated = data[:position].decode("utf-8", errors="ignore"), True
            continue
        redacted = _redact_tokens(text.encode("utf-8"), tokens)
        return f"{redacted.rstrip()} ?".strip() if truncated else redacted.strip()
    return None


def _redact_tokens(data: bytes, tokens: Iterable[Any]) -> str:
    """Rebuild the text from scanner tokens (byte offsets into ``data``): literals become
    ``?``, whitespace between tokens stays, a comment becomes one space."""
    out: list[str] = []
    pos = 0
    for token in tokens:
        kind = token.token
        if kind in _SQL_COMMENTS:
            continue  # part of the gap before the next token
        gap = data[pos : token.start]
        out.append(gap.decode("utf-8", errors="replace") if not gap.strip() else " ")
        if kind in _SQL_LITERALS:
            out.append("?")
        elif kind != _NCHAR:  # N'…': the N and its string are one literal, one "?"
            out.append(data[token.start : token.end].decode("utf-8", errors="replace"))
        pos = token.end
    return "".join(out)


# --- errors -------------------------------------------------------------------------------


class AuditError(Exception):
    """Something the audit trail could not do."""


class SpoolFull(AuditError):
    """The spool cannot take the event (``reason``: quota, disk or closed)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class SpoolInUse(ConfigError):
    """The spool directory is locked by another process (another gateway, or worker)."""


class SinkError(AuditError):
    """A delivery failed after ``delivered`` lines of the batch got through, in order."""

    def __init__(self, message: str, delivered: int = 0, kind: str = "error") -> None:
        super().__init__(message)
        self.delivered = delivered
        self.kind = kind


# --- the spool ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    line: bytes
    seq: int
    hash: str
    future: asyncio.Future[None]


def _retrieve(future: asyncio.Future[None]) -> None:
    # A request cancelled while waiting never reads its future: read it here, quietly.
    if not future.cancelled():
        future.exception()


class Durable:
    """An appended event's durability: await it (any number of times) for the fsync, or
    503 ``audit_unavailable``; leaving it unawaited is harmless. A request cancelled while
    awaiting leaves the event in the spool (the wait is shielded). Awaiting first wakes the
    writer for an event appended without ``wake``."""

    __slots__ = ("_result", "_spool")

    def __init__(self, result: asyncio.Future[None], spool: Spool | None) -> None:
        self._result = result
        self._spool = spool

    def __await__(self) -> Generator[Any, None, None]:
        if self._spool is not None:
            self._spool.wake()
            self._spool = None
        return asyncio.shield(self._result).__await__()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _parse_line(line: bytes) -> dict[str, Any] | None:
    """A sealed event whose hash checks out, or None."""
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("seq"), int):
        return None
    if event.get("hash") != event_hash(event):
        return None
    return event


class Spool:
    """Segment files of sealed events in one directory, owned by one process.

    ``segments/<first seq>.jsonl`` hold the events (one canonical JSON line each);
    ``shipped.json`` says how far the sink has acknowledged; ``state.json`` names the
    instance and its chain. A ``lock`` file (flock) keeps a second process out.
    """

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        segment_bytes: int,
        instance_id: str | None = None,
    ) -> None:
        self.directory = directory
        self.segment_dir = directory / "segments"
        self.max_bytes = max_bytes
        # Shipped space comes back a segment at a time: keep segments small beside the quota.
        self.segment_bytes = max(4096, min(segment_bytes, max_bytes // 8))
        # Events that precede execution are refused this much earlier than outcome events,
        # so a statement that ran can still have its outcome recorded.
        self.headroom = max(min(max_bytes // 16, 4 << 20), 8192)
        self._configured_id = instance_id
        self.instance = ""
        self.chain = ""
        # Chain head: the last sealed event, and the last durable one.
        self.seq = 0
        self.head_hash = GENESIS
        self.durable_seq = 0
        self.durable_hash = GENESIS
        self.shipped_seq = 0
        self.shipped_hash = GENESIS
        self.shipped_pos: tuple[int, int] = (0, 0)
        self.oldest_unshipped: float | None = None
        self.recovered_events = 0
        self.torn_bytes = 0
        self.disk_error: str | None = None
        # A gate event was refused for the quota and nothing has been freed since.
        self.quota_refused = False
        self._sizes: dict[int, int] = {}
        self._segment = 0
        self._fd = -1
        self._lock_fd = -1
        self._pending: list[_Pending] = []
        self._pending_bytes = 0
        self._inflight_bytes = 0
        # After a failed write the segment may hold a half batch past its accounted size:
        # the next batch goes to a fresh segment, and readers stop at the accounted size.
        self._force_roll = False
        self._wake = asyncio.Event()
        self.durable_changed = asyncio.Event()
        self.shipped_changed = asyncio.Event()
        self._closing = False
        self._marker_saved_at = 0.0
        self._marker_dirty = False

    # -- opening and recovery --

    def open(self) -> None:
        """Lock the directory, read the instance, recover the chain head; blocking I/O."""
        self.segment_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise SpoolInUse(
                f"QUERYGATE_AUDIT_SPOOL_DIR: {self.directory} is in use by another gateway "
                "process (one spool per process)"
            ) from None
        try:
            self._recover()
        except BaseException:
            self.release()
            raise

    def _recover(self) -> None:
        segments = sorted(
            int(p.stem) for p in self.segment_dir.glob("*.jsonl") if p.stem.isdigit()
        )
        marker = self._read_marker()
        if marker is not None:
            self.shipped_seq = marker["seq"]
            self.shipped_hash = marker["hash"]
            self.shipped_pos = (marker["segment"], marker["offset"])
            self.seq, self.head_hash = self.shipped_seq, self.shipped_hash
        for first in reversed(segments):
            last = self._recover_segment(first)
            if last is not None:
                self.seq, self.head_hash = last["seq"], last["hash"]
                break
        self._sizes = {
            first: (self.segment_dir / self._name(first)).stat().st_size
            for first in segments
            if (self.segment_dir / self._name(first)).exists()
        }
        self._adopt_instance()
        self.durable_seq, self.durable_hash = self.seq, self.head_hash
        self.recovered_events = self.seq - self.shipped_seq
        self._open_segment(self.seq + 1)

    def _name(self, first: int) -> str:
        return f"{first:0{SEGMENT_DIGITS}d}.jsonl"

    def _read_marker(self) -> dict[str, Any] | None:
        path = self.directory / "shipped.json"
        try:
            marker = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            # Resending from the start is safe (verify counts exact duplicates); skipping is not.
            log.warning("audit spool: unreadable shipped.json (%s); reshipping the spool", exc)
            return None
        if not all(isinstance(marker.get(k), int) for k in ("seq", "segment", "offset")):
            return None
        return dict(marker)

    def _recover_segment(self, first: int) -> dict[str, Any] | None:
        """Drop a torn tail (a write cut by a crash); return the last good event, if any."""
        path = self.segment_dir / self._name(first)
        data = path.read_bytes()
        # A last line without its newline was cut mid-write.
        end = len(data) if data.endswith(b"\n") else data.rfind(b"\n") + 1
        last = None
        while end > 0:
            start = data.rfind(b"\n", 0, end - 1) + 1
            last = _parse_line(data[start : end - 1])
            if last is not None:
                break
            end = start
        if end < len(data):
            self.torn_bytes += len(data) - end
            log.warning("audit spool: dropped a torn tail of %d bytes in %s", len(data) - end,
                        path.name)
            with path.open("r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        if end == 0:
            path.unlink()
            return None
        return last

    def _adopt_instance(self) -> None:
        state_path = self.directory / "state.json"
        state: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, orjson.JSONDecodeError):
            state = orjson.loads(state_path.read_bytes())
        recorded = state.get("instance") if isinstance(state.get("instance"), str) else None
        wanted = self._configured_id or recorded
        if recorded is not None and wanted == recorded and isinstance(state.get("chain"), str):
            self.instance, self.chain = recorded, state["chain"]
            return
        if recorded is not None and self.seq > self.shipped_seq:
            raise ConfigError(
                f"QUERYGATE_AUDIT_INSTANCE_ID: the spool {self.directory} holds "
                f"{self.seq - self.shipped_seq} unshipped events of instance {recorded!r}; "
                "start that instance to ship them, or use another spool directory"
            )
        # A new instance, or a new id on a fully shipped spool: a new chain from genesis.
        for first in list(self._sizes):
            (self.segment_dir / self._name(first)).unlink()
        self._sizes.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / "shipped.json").unlink()
        self.instance = wanted or f"{socket.gethostname()}-{secrets.token_hex(3)}"
        self.chain = uuid.uuid4().hex
        self.seq, self.head_hash = 0, GENESIS
        self.shipped_seq, self.shipped_hash, self.shipped_pos = 0, GENESIS, (0, 0)
        _write_atomic(state_path, canonical({
            "instance": self.instance, "chain": self.chain,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }))

    def _open_segment(self, first: int) -> None:
        path = self.segment_dir / self._name(first)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._segment = first
        self._sizes[first] = os.fstat(self._fd).st_size
        _fsync_dir(self.segment_dir)

    # -- appending --

    @property
    def size(self) -> int:
        """Bytes on disk plus bytes being or waiting to be written."""
        return sum(self._sizes.values()) + self._pending_bytes + self._inflight_bytes

    def append(self, event: dict[str, Any], gate: bool, wake: bool = True) -> asyncio.Future[None]:
        """Seal ``event`` into the chain and queue it; the future resolves once it is fsynced.

        Synchronous up to the queueing, so events are chained in the order this is called
        and a cancelled caller cannot un-append its event. ``gate`` events (those that
        allow something to happen) are refused ``headroom`` bytes before the quota. Without
        ``wake`` the writer is not woken for it: it goes with the next batch (``wake()``).
        """
        if self._closing:
            raise SpoolFull("closed", "the audit spool is closed")
        seq = self.seq + 1
        event["instance"] = self.instance
        event["chain"] = self.chain
        event["seq"] = seq
        event["prev_hash"] = self.head_hash
        digest = "sha256:" + hashlib.sha256(canonical(event)).hexdigest()
        event["hash"] = digest
        line = canonical(event) + b"\n"
        limit = self.max_bytes - (self.headroom if gate else 0)
        if self.size + len(line) > limit:
            self.quota_refused = self.quota_refused or gate
            raise SpoolFull(
                "quota", f"the audit spool is full ({self.size} of {self.max_bytes} bytes)"
            )
        if gate:
            self.quota_refused = False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self.seq, self.head_hash = seq, digest
        self._pending.append(_Pending(line, seq, digest, future))
        self._pending_bytes += len(line)
        if wake:
            self._wake.set()
        return future

    def wake(self) -> None:
        """Have the writer sync what is queued."""
        self._wake.set()

    async def run_writer(self) -> None:
        """Write and fsync whatever is queued, one batch per fsync (group commit).

        Before it takes a batch, the writer lets the event loop run up to ``LINGER_TURNS``
        more times, and stops after ``LINGER_IDLE_TURNS`` turns in a row in which nothing
        was appended: requests that were about to append join the batch. An fsync here
        takes ~0.1 ms, less than the gap between two events at 16 clients, so without the
        wait nearly every event had an fsync, and a hand-off to the writer thread and back,
        of its own: 7.2 context switches a write, against 3.3 with it (docs/benchmarks.md).
        A turn with nothing else ready costs microseconds, and nothing waits on a timer.
        """
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            idle = 0
            for _ in range(LINGER_TURNS):
                queued = len(self._pending)
                await asyncio.sleep(0)
                idle = 0 if len(self._pending) > queued else idle + 1
                if idle == LINGER_IDLE_TURNS:
                    break
            batch, self._pending = self._pending, []
            data = b"".join(p.line for p in batch)
            self._pending_bytes -= len(data)
            self._inflight_bytes = len(data)
            roll = self._force_roll or (self._sizes[self._segment] > 0 and (
                self._sizes[self._segment] + len(data) > self.segment_bytes
            ))
            try:
                new_fd, size = await loop.run_in_executor(
                    None, self._write_sync, data, batch[0].seq if roll else 0
                )
            except Exception as exc:
                # A disk error, or a bug: either way these events are not durable. Fail them
                # (the requests get 503) rather than leave them waiting.
                self._inflight_bytes = 0
                if not isinstance(exc, OSError):
                    log.exception("audit spool writer failed")
                    exc = OSError(errno.EIO, f"{type(exc).__name__}: {exc}")
                self._write_failed(batch, exc)
                continue
            self._inflight_bytes = 0
            if new_fd is not None:
                os.close(self._fd)
                self._fd, self._segment = new_fd, batch[0].seq
            self._sizes[self._segment] = size
            self.disk_error = None
            self._force_roll = False
            self.durable_seq, self.durable_hash = batch[-1].seq, batch[-1].hash
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_result(None)
            self.durable_changed.set()

    def _write_sync(self, data: bytes, roll_to: int) -> tuple[int | None, int]:
        """In a worker thread: roll the segment if asked, append ``data``, fdatasync."""
        fd, new_fd = self._fd, None
        if roll_to:
            path = self.segment_dir / self._name(roll_to)
            # Same name as the current segment: it holds nothing acknowledged (size 0).
            truncate = os.O_TRUNC if roll_to == self._segment else 0
            new_fd = fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | truncate, 0o600)
            _fsync_dir(self.segment_dir)
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fdatasync(fd)
        except OSError:
            # Leave no half batch behind: the chain resumes from the last durable event.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            if new_fd is not None:
                os.close(new_fd)
            raise
        return new_fd, start + len(data)

    def _write_failed(self, batch: list[_Pending], exc: OSError) -> None:
        self.disk_error = f"{errno.errorcode.get(exc.errno or 0, 'EIO')}: {exc.strerror}"
        self._force_roll = True
        log.error("audit spool write failed: %s", self.disk_error)
        error = SpoolFull("disk", f"the audit spool cannot write: {self.disk_error}")
        # Everything sealed after the durable head is void: fail it all and rewind the chain.
        failed, self._pending = batch + self._pending, []
        self._pending_bytes = 0
        self.seq, self.head_hash = self.durable_seq, self.durable_hash
        for pending in failed:
            if not pending.future.done():
                pending.future.set_exception(error)

    # -- reading for the shipper --

    def resume_position(self) -> tuple[int, int]:
        """Where shipping continues: the marker, if its segment is still there."""
        segment, offset = self.shipped_pos
        if segment in self._sizes:
            return segment, offset
        later = [s for s in sorted(self._sizes) if s > segment]
        return (later[0], 0) if later else (self._segment, 0)

    def read(
        self, pos: tuple[int, int], max_bytes: int
    ) -> tuple[list[bytes], tuple[int, int], tuple[int, int]]:
        """Complete durable lines from ``pos`` on (about ``max_bytes``), all from one
        segment: (lines without newlines, where they start, where they end)."""
        segment, offset = pos
        while True:
            if segment not in self._sizes:
                later = [s for s in sorted(self._sizes) if s > segment]
                if not later:
                    return [], (segment, offset), (segment, offset)
                segment, offset = later[0], 0
                continue
            limit = self._durable_size() if segment == self._segment else self._sizes[segment]
            if offset < limit:
                with (self.segment_dir / self._name(segment)).open("rb") as f:
                    f.seek(offset)
                    data = f.read(min(limit - offset, max_bytes))
                    cut = data.rfind(b"\n") + 1
                    if cut == 0:  # one line longer than max_bytes
                        data += f.read(limit - offset - len(data))
                        cut = data.rfind(b"\n") + 1
                return data[:cut].splitlines(), (segment, offset), (segment, offset + cut)
            later = [s for s in sorted(self._sizes) if s > segment]
            if segment == self._segment or not later:
                return [], (segment, offset), (segment, offset)
            segment, offset = later[0], 0

    def _durable_size(self) -> int:
        # The writer updates the size only after the fsync of the batch.
        return self._sizes[self._segment]

    def shipped(self, pos: tuple[int, int], seq: int, digest: str) -> None:
        """The sink acknowledged everything up to ``seq`` (ending at ``pos``)."""
        self.shipped_seq, self.shipped_hash, self.shipped_pos = seq, digest, pos
        self._marker_dirty = True
        self.shipped_changed.set()

    @property
    def marker_dirty(self) -> bool:
        return self._marker_dirty

    async def save_marker(self, force: bool = False) -> None:
        """Persist the shipped position (at most every 100 ms), then drop shipped segments."""
        now = time.monotonic()
        if not self._marker_dirty or (not force and now - self._marker_saved_at < _MARKER_EVERY_S):
            return
        segment, offset = self.shipped_pos
        marker = canonical({"seq": self.shipped_seq, "hash": self.shipped_hash,
                            "segment": segment, "offset": offset})
        self._marker_dirty = False
        self._marker_saved_at = now
        await asyncio.get_running_loop().run_in_executor(
            None, _write_atomic, self.directory / "shipped.json", marker
        )
        # Only after the marker is durable: segments wholly before it are no longer needed.
        for first in sorted(self._sizes):
            if first >= segment or first == self._segment:
                break
            with contextlib.suppress(FileNotFoundError):
                (self.segment_dir / self._name(first)).unlink()
            del self._sizes[first]
            self.quota_refused = False

    # -- closing --

    async def close(self) -> None:
        """Refuse new events, let the writer finish, release the lock."""
        self._closing = True
        self._wake.set()

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = -1

    def accepting(self) -> tuple[bool, str]:
        """Can a gate event be appended now? (for /readyz)."""
        if self.disk_error is not None:
            return False, f"spool cannot write: {self.disk_error}"
        if self.quota_refused or self.size + self.headroom >= self.max_bytes:
            return False, f"spool full ({self.size} of {self.max_bytes} bytes)"
        return True, "ok"


# --- sinks --------------------------------------------------------------------------------


def worker_spool(directory: Path, instance_id: str | None, slot: int) -> tuple[Path, str | None]:
    """The spool directory and configured instance id of worker ``slot``.

    Slot 0 is what a single process uses, so going from one worker to several (or back)
    keeps the first chain. Slot *i* is ``<directory>/worker-<i>``, with ``<id>-w<i>`` when
    an id is configured; without one, each spool records an id of its own.
    """
    if slot == 0:
        return directory, instance_id
    return directory / f"worker-{slot}", None if instance_id is None else f"{instance_id}-w{slot}"


def claim_spool(directory: Path, slots: int, max_bytes: int, segment_bytes: int,
                instance_id: str | None = None) -> Spool:
    """Open the first of ``slots`` worker spools no other process holds; blocking I/O.

    Workers are not numbered by the server that starts them: the ``flock`` of each spool
    decides, so a worker started again after a crash takes the slot (and continues the
    chain) its predecessor left.
    """
    for slot in range(slots):
        path, wanted = worker_spool(directory, instance_id, slot)
        spool = Spool(path, max_bytes, segment_bytes, wanted)
        try:
            spool.open()
        except SpoolInUse:
            if slot == slots - 1:
                raise
            continue
        return spool
    raise ValueError("slots must be at least 1")


class Sink(Protocol):
    """Where shipped events go; ``send`` delivers all lines in order or raises SinkError."""

    name: str

    async def start(self) -> None: ...

    async def send(self, lines: list[bytes]) -> None: ...

    async def close(self) -> None: ...


class FileSink:
    """Appends each event as a line to a JSONL file, fsynced before it counts as shipped.

    Worker processes share one file: each batch is appended under an ``flock`` of it, so
    batches never interleave and a failed one is cut back to where it began.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"file {path}"
        self._fd = -1

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    async def send(self, lines: list[bytes]) -> None:
        data = b"\n".join(lines) + b"\n"
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._append, data)
        except OSError as exc:
            raise SinkError(f"cannot append to {self.path}: {exc.strerror}", kind="os") from exc

    def _append(self, data: bytes) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            start = os.fstat(self._fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
                os.fdatasync(self._fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                raise
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class StdoutSink:
    """One event per line on standard output (for a log collector that tails the process)."""

    name = "stdout"

    async def start(self) -> None:
        return None

    async def send(self, lines: list[bytes]) -> None:
        try:
            sys.stdout.buffer.write(b"\n".join(lines) + b"\n")
            sys.stdout.buffer.flush()
        except (OSError, ValueError) as exc:
            raise SinkError(f"cannot write to stdout: {exc}", kind="os") from exc

    async def close(self) -> None:
        return None


def kafka_security(s: Settings) -> dict[str, Any]:
    """aiokafka's security options from ``QUERYGATE_AUDIT_KAFKA_*``: the sink's, those of
    ``querygate audit verify --kafka`` and the console's consumer (the same topic, so the
    same settings)."""
    config: dict[str, Any] = {"security_protocol": s.audit_kafka_security_protocol}
    if s.audit_kafka_security_protocol in ("SSL", "SASL_SSL"):
        from aiokafka.helpers import create_ssl_context

        cafile = str(s.audit_kafka_ssl_cafile) if s.audit_kafka_ssl_cafile else None
        config["ssl_context"] = create_ssl_context(cafile=cafile)
    mechanism = s.audit_kafka_sasl_mechanism
    if mechanism == "OAUTHBEARER":
        assert s.audit_kafka_sasl_oauth_token_file is not None
        config["sasl_mechanism"] = mechanism
        config["sasl_oauth_token_provider"] = _token_provider(s.audit_kafka_sasl_oauth_token_file)
    elif mechanism is not None:
        assert s.audit_kafka_sasl_password is not None
        config["sasl_mechanism"] = mechanism
        config["sasl_plain_username"] = s.audit_kafka_sasl_username
        config["sasl_plain_password"] = s.audit_kafka_sasl_password.get_secret_value()
    return config


def _token_provider(path: Path) -> Any:
    from aiokafka.abc import AbstractTokenProvider

    class FileToken(AbstractTokenProvider):  # type: ignore[misc]
        """The token in ``path``, read for every authentication (it may have rotated)."""

        async def token(self) -> str:
            text = await asyncio.to_thread(path.read_text)
            return text.strip()

    return FileToken()


class KafkaSink:
    """An idempotent aiokafka producer (acks=all) keyed by instance id, so one instance's
    events land in one partition in the order they were sent."""

    def __init__(self, settings: Settings, instance: str, metrics: Metrics) -> None:
        assert settings.audit_kafka_bootstrap is not None
        self.settings = settings
        self.topic = settings.audit_kafka_topic
        self.key = instance.encode()
        self.instance = instance
        self.metrics = metrics
        self.name = f"kafka {settings.audit_kafka_bootstrap} topic {self.topic}"
        self._producer: Any = None

    async def start(self) -> None:
        # Connecting is the shipper's job: a broker that is down must not stop start-up.
        return None

    def _config(self) -> dict[str, Any]:
        s = self.settings
        config: dict[str, Any] = {
            "bootstrap_servers": s.audit_kafka_bootstrap,
            "client_id": f"querygate-{self.instance}",
            "acks": "all",
            "enable_idempotence": True,
            "linger_ms": s.audit_kafka_linger_ms,
            "max_batch_size": 512 * 1024,
            "max_request_size": 1024 * 1024,
            "request_timeout_ms": s.audit_kafka_timeout_ms,
            "retry_backoff_ms": 100,
            "compression_type": None if s.audit_kafka_compression == "none"
            else s.audit_kafka_compression,
            **kafka_security(s),
        }
        return config

    async def _connect(self) -> Any:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(**self._config())
        try:
            await producer.start()
        except BaseException as exc:
            # Cancellation too (close() with no drain time left cancels a connect in progress):
            # a producer that is never stopped keeps its sockets and tasks until GC.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)
            if not isinstance(exc, Exception):
                raise
            raise SinkError(f"cannot connect to Kafka: {type(exc).__name__}: {exc}",
                            kind=type(exc).__name__) from exc
        log.info("audit: connected to %s", self.name)
        return producer

    async def send(self, lines: list[bytes]) -> None:
        if self._producer is None:
            self._producer = await self._connect()
        producer = self._producer
        futures: list[asyncio.Future[Any]] = []
        error: BaseException | None = None
        try:
            for line in lines:
                futures.append(await producer.send(self.topic, value=line, key=self.key))
        except Exception as exc:
            error = exc
        delivered = 0
        for future in futures:
            try:
                await future
            except Exception as exc:
                error = error or exc
                break
            delivered += 1
        if error is not None or delivered < len(lines):
            # A fresh producer next time: whatever state the old one had is not trusted.
            await self._reset()
            kind = type(error).__name__ if error else "incomplete"
            raise SinkError(f"Kafka delivery failed: {kind}: {error}", delivered, kind)

    async def _reset(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5)

    async def close(self) -> None:
        await self._reset()


def make_sink(settings: Settings, instance: str, file_path: Path, metrics: Metrics) -> Sink:
    if settings.audit_sink == "kafka":
        return KafkaSink(settings, instance, metrics)
    if settings.audit_sink == "stdout":
        return StdoutSink()
    return FileSink(file_path)


# --- the shipper --------------------------------------------------------------------------


class Shipper:
    """Moves durable spool lines to the sink, in order, resending until acknowledged."""

    def __init__(self, spool: Spool, sink: Sink, metrics: Metrics, batch_bytes: int = 1 << 20):
        self.spool = spool
        self.sink = sink
        self.metrics = metrics
        self.batch_bytes = batch_bytes
        self.up = True
        self.last_error: str | None = None
        self._warned_at = 0.0

    async def run(self) -> None:
        """Ship forever; a bug in one round is logged and the round starts over."""
        while True:
            try:
                await self._run()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.up, self.last_error = False, "internal error (see the log)"
                log.exception("audit shipper failed; restarting from the last shipped event")
                await asyncio.sleep(1.0)

    async def _run(self) -> None:
        spool = self.spool
        pos = spool.resume_position()
        backoff = 0.1
        while True:
            lines, start, end = spool.read(pos, self.batch_bytes)
            if not lines:
                spool.oldest_unshipped = None
                spool.durable_changed.clear()
                lines, start, end = spool.read(pos, self.batch_bytes)
                if not lines:
                    pos = end
                    if spool.marker_dirty:
                        # Idle: save the marker once things settle, not after every batch.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(spool.durable_changed.wait(), _MARKER_EVERY_S)
                        if not spool.durable_changed.is_set():
                            await spool.save_marker(force=True)
                    else:
                        await spool.durable_changed.wait()
                    continue
            # A marker older than the data (a crash between send and save) resends lines:
            # exact duplicates, which verify reports and tolerates. Never skip forward.
            offsets = []
            at = start[1]
            for line in lines:
                at += len(line) + 1
                offsets.append(at)
            events = _Events(lines)
            if not (events.first_fresh(spool.shipped_seq) and events.parses(len(lines) - 1)
                    and all(line[:1] == b"{" and line[-1:] == b"}" for line in lines)):
                # Resumed behind the marker, or a line that is not whole: read every line.
                # The common case, a batch after the last shipped one, parses only the lines
                # it needs (seq, hash and time of the first and the last acknowledged).
                kept: list[tuple[bytes, int]] = []
                for i, (line, offset) in enumerate(zip(lines, offsets, strict=True)):
                    try:
                        fresh = events.fresh(i, spool.shipped_seq)
                    except orjson.JSONDecodeError:
                        # Only a write that failed half-way (never acknowledged) leaves this.
                        log.error("audit spool: skipping an unreadable line in segment %d",
                                  end[0])
                        continue
                    if fresh:
                        kept.append((line, offset))
                lines = [k[0] for k in kept]
                offsets = [k[1] for k in kept]
                events = _Events(lines)
            if not lines:
                pos = end
                continue
            spool.oldest_unshipped = _epoch(events[0].get("time"))
            sent = 0
            while sent < len(lines):
                try:
                    await self.sink.send(lines[sent:])
                    delivered = len(lines) - sent
                except Exception as exc:
                    if not isinstance(exc, SinkError):
                        log.exception("audit: unexpected error from the sink")
                        exc = SinkError(str(exc), 0, type(exc).__name__)
                    delivered = exc.delivered
                    self.up = False
                    self.last_error = str(exc)
                    if isinstance(self.sink, KafkaSink):
                        self.metrics.kafka_send_errors.labels(exc.kind).inc()
                    if time.monotonic() - self._warned_at > 30:
                        # An outage is logged when it starts and every 30 s, not per retry.
                        self._warned_at = time.monotonic()
                        log.warning("audit: %s; retrying (%d events waiting in the spool)",
                                    exc, spool.durable_seq - spool.shipped_seq)
                if delivered:
                    sent += delivered
                    last = events[sent - 1]
                    spool.shipped((end[0], offsets[sent - 1]), last["seq"], last["hash"])
                    self.metrics.audit_shipped.inc(delivered)
                    if sent < len(lines):
                        spool.oldest_unshipped = _epoch(events[sent].get("time"))
                if sent < len(lines):
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _MAX_BACKOFF_S)
            if not self.up:
                log.warning("audit: %s reachable again; the spool is draining", self.sink.name)
            self.up, self.last_error, backoff, self._warned_at = True, None, 0.1, 0.0
            pos = end
            await spool.save_marker()
            if sum(len(line) for line in lines) < self.batch_bytes // 2:
                # Not a backlog: let the next batch gather for a moment rather than ship
                # (a sink round trip, a file sink's fsync) after every spool sync. The
                # events are durable in the spool meanwhile.
                await asyncio.sleep(_SHIP_LINGER_S)


class _Events:
    """The events of spool lines, parsed when first asked for."""

    __slots__ = ("_lines", "_parsed")

    def __init__(self, lines: list[bytes]) -> None:
        self._lines = lines
        self._parsed: dict[int, dict[str, Any]] = {}

    def __getitem__(self, i: int) -> dict[str, Any]:
        event = self._parsed.get(i)
        if event is None:
            event = self._parsed[i] = orjson.loads(self._lines[i])
        return event

    def parses(self, i: int) -> bool:
        """Line ``i`` is an event (the last one acknowledged is read for its seq and hash)."""
        try:
            return isinstance(self[i], dict)
        except orjson.JSONDecodeError:
            return False

    def first_fresh(self, shipped_seq: int) -> bool:
        try:
            return self.fresh(0, shipped_seq)
        except orjson.JSONDecodeError:
            return False

    def fresh(self, i: int, shipped_seq: int) -> bool:
        """Line ``i`` comes after what was shipped (False for a line that is no event)."""
        if i >= len(self._lines):
            return False
        event = self[i]
        return isinstance(event, dict) and bool(event.get("seq", 0) > shipped_seq)


def _epoch(timestamp: Any) -> float:
    try:
        return dt.datetime.fromisoformat(timestamp).timestamp()
    except (TypeError, ValueError):
        return time.time()


# --- the audit log the gateway owns -------------------------------------------------------


class AuditLog:
    """The spool, its writer and its shipper; ``record`` is all the request path uses."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._temporary: Path | None = None
        self.spool: Spool | None = None
        self.sink: Sink | None = None
        self.shipper: Shipper | None = None
        self.file_path: Path | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def instance(self) -> str:
        return self.spool.instance if self.spool else ""

    async def start(self) -> None:
        """Open (and recover) the spool, start the writer and the shipper."""
        s = self.settings
        directory = s.audit_spool_dir
        if directory is None:
            self._temporary = Path(tempfile.mkdtemp(prefix="querygate-audit-"))
            directory = self._temporary / "spool"
            level = logging.ERROR if s.environment == "prod" else logging.WARNING
            log.log(level, "QUERYGATE_AUDIT_SPOOL_DIR is not set: the audit spool is the "
                    "temporary %s, deleted at shutdown; unshipped events do not survive a crash",
                    directory)
        # One file for every worker (FileSink appends under a lock), chains told apart by
        # instance: `querygate audit verify` checks them all in one pass.
        self.file_path = s.audit_file or (directory / "audit.jsonl")
        # A temporary spool is this process's alone: there is nothing to share a slot with.
        slots = 1 if self._temporary is not None else s.workers
        spool = await asyncio.get_running_loop().run_in_executor(
            None, claim_spool, directory, slots, s.audit_spool_max_bytes,
            s.audit_segment_bytes, s.audit_instance_id,
        )
        self.spool = spool
        self.sink = make_sink(s, spool.instance, self.file_path, self.metrics)
        await self.sink.start()
        self.shipper = Shipper(spool, self.sink, self.metrics)
        self._tasks = [
            asyncio.create_task(spool.run_writer(), name="audit-writer"),
            asyncio.create_task(self.shipper.run(), name="audit-shipper"),
        ]
        self.metrics.watch_spool(self.status)
        log.info("audit: instance %s, chain %s, spool %s (%d events to ship), sink %s",
                 spool.instance, spool.chain, directory, spool.recovered_events, self.sink.name)
        await self.record(self.event("lifecycle", lifecycle={
            "action": "started", "sink": s.audit_sink,
            "recovered_unshipped": spool.recovered_events, "torn_bytes": spool.torn_bytes,
        }), gate=False)

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        """A new, unsealed event of ``type_`` with the common fields."""
        return {
            "schema": SCHEMA,
            "type": type_,
            "id": new_id(),
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
            "environment": self.settings.environment,
            **fields,
        }

    async def record(self, event: dict[str, Any], *, gate: bool) -> None:
        """Append durably; raise 503 ``audit_unavailable`` if the spool cannot take it.

        ``gate``: the event allows something to happen next (a statement to run, an
        approval to be created or used); those are refused before the quota's headroom.
        With QUERYGATE_AUDIT_FAIL_OPEN (never in prod) a refusal is logged instead.
        """
        await self.append(event, gate=gate)

    def append(self, event: dict[str, Any], *, gate: bool, wake: bool = True) -> Durable:
        """Seal and queue ``event`` now; await the result for it to be durable.

        Raises 503 ``audit_unavailable`` at once when the spool cannot take it, and the
        awaitable raises it when the write fails. ``record`` is both in one. Without
        ``wake``, the write waits for the next event appended, or for the awaiting, so two
        events of a request can share one fsync.
        """
        kind = str(event.get("type"))
        started = time.perf_counter()
        result: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        result.add_done_callback(_retrieve)
        try:
            if self.spool is None:
                raise SpoolFull("closed", "the audit spool is not open")
            future = self.spool.append(event, gate, wake)
        except SpoolFull as exc:
            self._refused(kind, exc)
            result.set_result(None)  # fail-open: logged, not recorded
            return Durable(result, None)

        def settle(done: asyncio.Future[None]) -> None:
            if result.done():
                return
            if done.cancelled():
                result.set_exception(Unavailable("audit_unavailable", "the audit write was cancelled"))
                return
            exc = done.exception()
            if isinstance(exc, SpoolFull):
                try:
                    self._refused(kind, exc)
                except Unavailable as refused:
                    result.set_exception(refused)
                    return
                result.set_result(None)
            elif exc is not None:
                result.set_exception(exc)
            else:
                self.metrics.child(self.metrics.audit_events, kind).inc()
                self.metrics.audit_append_seconds.observe(time.perf_counter() - started)
                result.set_result(None)

        future.add_done_callback(settle)
        return Durable(result, None if wake else self.spool)

    def _refused(self, kind: str, exc: SpoolFull) -> None:
        self.metrics.audit_refused.labels(exc.reason).inc()
        if self.settings.audit_fail_open:
            log.error("audit event %s NOT recorded (fail-open): %s", kind, exc)
            return
        raise Unavailable(
            "audit_unavailable",
            "the audit trail cannot record this request, so it is refused: " + str(exc),
        ) from exc

    def record_nowait(self, event: dict[str, Any]) -> None:
        """Append without waiting (a stream cut short): best effort, never raises."""
        if self.spool is None:
            return
        try:
            self.spool.append(event, gate=False)
            self.metrics.audit_events.labels(str(event.get("type"))).inc()
        except SpoolFull as exc:
            self.metrics.audit_refused.labels(exc.reason).inc()
            log.error("audit event %s NOT recorded: %s", event.get("type"), exc)

    def status(self) -> dict[str, Any]:
        """Spool and sink state for /metrics and /readyz."""
        spool = self.spool
        if spool is None:
            return {}
        oldest = spool.oldest_unshipped
        return {
            "instance": spool.instance,
            "chain": spool.chain,
            "depth": spool.durable_seq - spool.shipped_seq,
            "bytes": spool.size,
            "limit_bytes": spool.max_bytes,
            "oldest_age_s": max(0.0, time.time() - oldest) if oldest is not None else 0.0,
            "last_seq": spool.durable_seq,
            "shipped_seq": spool.shipped_seq,
            "sink": self.sink.name if self.sink else None,
            "sink_up": 1 if self.shipper is None or self.shipper.up else 0,
            "sink_error": self.shipper.last_error if self.shipper else None,
        }

    def ready(self) -> tuple[bool, str]:
        """Ready while the spool accepts events; a sink outage alone is not unreadiness."""
        if self.spool is None:
            return False, "audit spool not open"
        ok, detail = self.spool.accepting()
        if ok and self.shipper is not None and not self.shipper.up:
            return True, f"ok (sink unreachable, spooling: {self.shipper.last_error})"
        return ok, detail

    async def close(self) -> None:
        """Record the stop, flush the spool, give the shipper a moment to drain, stop."""
        spool = self.spool
        if spool is None:
            return
        with contextlib.suppress(Unavailable):
            await self.record(self.event("lifecycle", lifecycle={"action": "stopped"}),
                              gate=False)
        await spool.close()
        writer, shipper = self._tasks
        try:
            await writer
        except Exception:
            log.exception("audit spool writer failed")

        async def drained() -> None:
            while spool.shipped_seq < spool.durable_seq:
                spool.shipped_changed.clear()
                await spool.shipped_changed.wait()

        if self.shipper is not None and self.shipper.up:
            # A sink that is down will not come back in time: the next start ships the rest.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drained(), self.settings.audit_drain_timeout_s)
        shipper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await shipper
        await spool.save_marker(force=True)
        if spool.shipped_seq < spool.durable_seq:
            log.warning("audit: %d events left in the spool %s; they are shipped at the next "
                        "start", spool.durable_seq - spool.shipped_seq, spool.directory)
        if self.sink is not None:
            await self.sink.close()
        spool.release()
        self.spool = None
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)


# --- one request's audit context ----------------------------------------------------------

Outcome = Literal["allow", "deny", "approval_required", "error"]


def identity_json(identity: Identity | None) -> dict[str, Any] | None:
    """Who: never the token, never the e-mail address."""
    if identity is None:
        return None
    return {
        "sub": identity.sub,
        "issuer": identity.issuer,
        "auth": identity.auth,
        "groups": list(identity.groups),
        "roles": list(identity.roles),
        "attributes": dict(identity.attributes),
        "on_behalf_of": identity_json(identity.on_behalf_of),
    }


def query_json(sql: str | None, facts: QueryFacts | None) -> dict[str, Any] | None:
    """What: fingerprint, kind, objects and the SQL with literals replaced; never values."""
    if sql is None and facts is None:
        return None
    out: dict[str, Any] = {"sql": redact_sql(sql) if sql is not None else None}
    if facts is not None:
        out.update({
            "fingerprint": facts.fingerprint,
            "kind": facts.kind,
            "tables": {"read": list(facts.tables_read), "write": list(facts.tables_write)},
            "columns": {"read": list(facts.columns_read), "write": list(facts.columns_write)},
            "functions": list(facts.functions),
            "param_count": facts.param_count,
            "catalog_version": facts.catalog_version,
        })
    return out


@dataclass
class RequestAudit:
    """What one request has established so far, and the events it records."""

    log: AuditLog
    request_id: str
    source_ip: str | None
    method: str
    path: str
    clock: StageClock
    identity: Identity | None = None
    sql: str | None = None
    facts: QueryFacts | None = None
    decision: Decision | None = None
    explain: bool = False
    decision_recorded: bool = False
    outcome: str | None = None
    execution_recorded: bool = False
    auth_recorded: bool = False
    # The request's outcome as the metrics count it (allow, deny, …): the front end's
    # metrics read it, this class writes nothing but audit events.
    label: str | None = None
    started: float = field(default_factory=time.perf_counter)
    # http, pgwire or mcp (pipeline.Channel); pgwire's method is the protocol ("simple" or
    # "extended") and its path the session's id.
    channel: str = "http"
    application_name: str | None = None  # pgwire: the client's, as it set it
    tool: str | None = None  # mcp: the tool called
    agent: dict[str, Any] | None = None  # mcp: the agent (policy.agent_input)

    def _request(self) -> dict[str, Any]:
        request: dict[str, Any] = {"id": self.request_id, "source_ip": self.source_ip,
                                   "method": self.method, "path": self.path,
                                   "channel": self.channel}
        if self.channel == "pgwire":
            request["application_name"] = self.application_name
        elif self.channel == "mcp":
            request["tool"] = self.tool
            request["agent"] = self.agent
        return request

    def _event(self, type_: str, **fields: Any) -> dict[str, Any]:
        return self.log.event(type_, request=self._request(),
                              identity=identity_json(self.identity), **fields)

    def _label(self, outcome: str) -> None:
        self.label = outcome

    def _ended(self, outcome: str) -> None:
        # A wire statement's trace span ends with its last event (app/tracing.py).
        if self.clock.span is not None:
            tracing.end(self.clock.span, **{"querygate.outcome": outcome,
                                            "querygate.request_id": self.request_id})
            self.clock.span = None

    async def auth_failed(self, exc: GatewayError) -> None:
        """An authentication failure: the code and our own message, never the token."""
        self.auth_recorded = True
        self._label("none")
        try:
            await self.log.record(
                self._event("auth_failure", auth_failure={"code": exc.code,
                                                          "message": exc.message}),
                gate=False,
            )
        except Unavailable:
            # The 401 stands: an unauthenticated caller is refused either way.
            log.error("auth failure of request %s could not be audited", self.request_id)

    def decided(
        self, outcome: Outcome, *, gate: bool, by: str = "policy", code: str | None = None,
        wake: bool = True,
    ) -> Durable:
        """The decision event, sealed into the chain now (503 ``audit_unavailable`` at once
        if the spool cannot take it); await the result for it to be durable (``wake``:
        ``AuditLog.append``). An allowed write awaits it before it runs."""
        decision = self.decision
        body: dict[str, Any] = {"outcome": outcome, "by": by, "code": code,
                                "explain": self.explain}
        if decision is not None:
            body.update({
                "id": decision.id,
                # From the gateway's cache: ``id`` is the decision OPA made then.
                "cached": decision.cached,
                "bundle_revision": getattr(decision, "bundle_revision", None),
                "policy_allow": decision.allow,
                "reasons": decision.reasons_json(),
                "masks": dict(decision.masks),
                "require_approval": (
                    {"approver_groups": decision.require_approval.get("approver_groups"),
                     "ttl_s": decision.require_approval.get("ttl_s")}
                    if decision.require_approval else None
                ),
                "max_rows": decision.max_rows,
                "max_rows_affected": decision.max_rows_affected,
                "db_role": decision.db_role,
            })
        self.decision_recorded = True
        self.outcome = outcome
        self._label(outcome)
        if outcome != "allow" or self.explain:
            self._ended(outcome)  # nothing runs after it
        return self.log.append(
            self._event("decision", decision=body, query=query_json(self.sql, self.facts),
                        durations_us=dict(self.clock.durations_us)),
            gate=gate, wake=wake,
        )

    def _execution(self, outcome: str, code: str | None, rows_returned: int | None,
                   rows_affected: int | None, truncated: bool | None, streamed: bool,
                   masked: Mapping[str, str] | None) -> dict[str, Any]:
        self.execution_recorded = True
        self._ended(outcome)
        durations = dict(self.clock.durations_us)
        durations["total"] = int((time.perf_counter() - self.started) * 1_000_000)
        return self._event(
            "execution",
            decision={"id": self.decision.id if self.decision else None},
            query=(
                {"fingerprint": self.facts.fingerprint, "kind": self.facts.kind}
                if self.facts else None
            ),
            execution={
                "outcome": outcome, "code": code, "rows_returned": rows_returned,
                "rows_affected": rows_affected, "truncated": truncated, "streamed": streamed,
                "masked_columns": dict(masked or {}),
            },
            durations_us=durations,
        )

    def executed(
        self,
        *,
        outcome: Literal["ok", "error"],
        code: str | None = None,
        rows_returned: int | None = None,
        rows_affected: int | None = None,
        truncated: bool | None = None,
        streamed: bool = False,
        masked: Mapping[str, str] | None = None,
    ) -> Durable:
        """What running the statement did: counts, flags, durations; never a value. Sealed
        now; await the result for it to be durable."""
        return self.log.append(
            self._execution(outcome, code, rows_returned, rows_affected, truncated, streamed,
                            masked),
            gate=False,
        )

    def restart(self) -> None:
        """The request starts over (its cached decision went stale): what was
        decided and run is on record; what follows is recorded afresh."""
        self.facts = None
        self.decision = None
        self.decision_recorded = False
        self.outcome = None
        self.execution_recorded = False
        self.label = None

    def aborted(self, rows_returned: int | None = None, streamed: bool = False) -> None:
        """An allowed statement whose request was cancelled: queued, not awaited."""
        if self.execution_recorded or self.outcome != "allow" or self.explain:
            return
        self.log.record_nowait(
            self._execution("aborted", None, rows_returned, None, None, streamed, None)
        )

    async def refused(self, exc: BaseException) -> None:
        """The request ends in an error: record the refusal (or the failed execution)."""
        code = exc.code if isinstance(exc, GatewayError) else "internal_error"
        if code == "audit_unavailable" or self.auth_recorded or isinstance(exc, Unauthenticated):
            return
        if not self.decision_recorded:
            status = exc.status if isinstance(exc, GatewayError) else 500
            outcome: Outcome = "deny" if 400 <= status < 500 else "error"
            by = "policy" if code in ("policy_denied", "approval_not_accepted") else "gateway"
            await self.decided(outcome, gate=False, by=by, code=code)
        elif not self.execution_recorded and self.outcome == "allow" and not self.explain:
            await self.executed(outcome="error", code=code)

    async def approval(self, step: str, approval: Approval, *, gate: bool = False,
                       code: str | None = None, comment: str | None = None) -> None:
        """One approval lifecycle step: requested, approved, rejected, used, or refused."""
        await self.log.record(self._event("approval", approval={
            "step": step,
            "code": code,
            "id": approval.id,
            "status": approval.status,
            "requester": {"sub": approval.requester.get("sub"),
                          "issuer": approval.requester.get("issuer")},
            "approver_groups": list(approval.approver_groups),
            "reason": approval.reason,
            "fingerprint": approval.fingerprint,
            "tables": list(approval.tables),
            "decision_id": approval.decision_id,
            "expires_at": approval.expires_at.isoformat(),
            "comment": comment,
        }, query=query_json(approval.sql, None)), gate=gate)

    async def session(self, step: str, **detail: Any) -> None:
        """A wire-protocol session's start or end (its id is the request's path)."""
        await self.log.record(self._event("session", session={"step": step, **detail}),
                              gate=False)

    def session_command(self, command: str) -> None:
        """A statement the session answered itself, by its first word: queued, not awaited
        (its refusals are decisions, awaited as every refusal is)."""
        self.log.record_nowait(self._event("session", session={"step": "command",
                                                                "command": command}))

    async def admin(self, action: str, outcome: str, detail: Mapping[str, Any] | None = None,
                    code: str | None = None) -> None:
        """An administrative action (catalog refresh or listing), allowed or refused."""
        self._label("allow" if outcome == "ok" else "deny")
        await self.log.record(self._event("admin", admin={
            "action": action, "outcome": outcome, "code": code, "detail": dict(detail or {}),
        }), gate=False)


# --- verification -------------------------------------------------------------------------


@dataclass
class ChainReport:
    """What verify found for one instance's chain."""

    instance: str
    chain: str
    hashes: dict[int, str] = field(default_factory=dict, repr=False)
    prevs: dict[int, str] = field(default_factory=dict, repr=False)
    max_seq: int = 0
    duplicates: int = 0
    edited: list[int] = field(default_factory=list)
    conflicts: list[int] = field(default_factory=list)
    reordered: list[int] = field(default_factory=list)

    def gaps(self) -> list[tuple[int, int]]:
        out = []
        expected = 1
        for seq in sorted(self.hashes):
            if seq > expected:
                out.append((expected, seq - 1))
            expected = seq + 1
        return out

    def broken_links(self) -> list[int]:
        out = []
        for seq, prev in sorted(self.prevs.items()):
            expected = GENESIS if seq == 1 else self.hashes.get(seq - 1)
            if expected is not None and prev != expected:
                out.append(seq)
        return out

    def problems(self, allow_partial_start: bool = False) -> list[str]:
        found = []
        gaps = self.gaps()
        if gaps and gaps[0][0] == 1 and allow_partial_start:
            gaps = gaps[1:]
        if gaps:
            found.append(f"missing events: {_ranges(gaps)}")
        if self.reordered:
            found.append(f"out of order: seq {_few(self.reordered)} arrived after a later one")
        if self.edited:
            found.append(f"edited (hash does not match content): seq {_few(self.edited)}")
        links = self.broken_links()
        if links:
            found.append(f"chain broken (prev_hash differs from the previous event's hash): "
                         f"seq {_few(links)}")
        if self.conflicts:
            found.append(f"two different events with the same seq: {_few(self.conflicts)}")
        return found

    def to_json(self, allow_partial_start: bool = False) -> dict[str, Any]:
        seqs = sorted(self.hashes)
        return {
            "instance": self.instance, "chain": self.chain, "events": len(seqs),
            "first_seq": seqs[0] if seqs else None, "last_seq": seqs[-1] if seqs else None,
            "duplicates": self.duplicates, "gaps": self.gaps(), "reordered": self.reordered,
            "edited": self.edited, "broken_links": self.broken_links(),
            "conflicts": self.conflicts,
            "problems": self.problems(allow_partial_start),
        }


def _few(values: list[int], limit: int = 10) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" … ({len(values)} in all)" if len(values) > limit else "")


def _ranges(gaps: list[tuple[int, int]], limit: int = 10) -> str:
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in gaps[:limit])
    return shown + (f" … ({len(gaps)} gaps)" if len(gaps) > limit else "")


class Verifier:
    """Feed it a copy of the trail in stored order; it reports gaps, reordering and edits.

    Exact duplicates (a resend after a crash or a lost acknowledgement) are counted, not
    failed. Each (instance, chain) is checked on its own.
    """

    def __init__(self, allow_partial_start: bool = False) -> None:
        self.allow_partial_start = allow_partial_start
        self.chains: dict[tuple[str, str], ChainReport] = {}
        self.malformed: list[str] = []
        self.lines = 0

    def feed(self, raw: bytes, where: str) -> None:
        self.lines += 1
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.malformed.append(where)
            return
        if not (
            isinstance(event, dict)
            and isinstance(event.get("instance"), str)
            and isinstance(event.get("chain"), str)
            and isinstance(event.get("seq"), int)
            and isinstance(event.get("prev_hash"), str)
            and isinstance(event.get("hash"), str)
        ):
            self.malformed.append(where)
            return
        key = (event["instance"], event["chain"])
        chain = self.chains.get(key)
        if chain is None:
            chain = self.chains[key] = ChainReport(*key)
        seq, stored = event["seq"], event["hash"]
        edited = event_hash(event) != stored
        if seq in chain.hashes:
            if chain.hashes[seq] == stored and not edited:
                chain.duplicates += 1
            else:
                chain.conflicts.append(seq)
            return
        if edited:
            chain.edited.append(seq)
        if seq < chain.max_seq:
            chain.reordered.append(seq)
        chain.hashes[seq] = stored
        chain.prevs[seq] = event["prev_hash"]
        chain.max_seq = max(chain.max_seq, seq)

    @property
    def ok(self) -> bool:
        return not self.malformed and self.lines > 0 and not any(
            c.problems(self.allow_partial_start) for c in self.chains.values()
        )

    def report(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "lines": self.lines,
            "malformed": self.malformed[:100],
            "chains": [c.to_json(self.allow_partial_start) for c in self.chains.values()],
        }

    def summary(self) -> str:
        out = []
        for chain in self.chains.values():
            info = chain.to_json(self.allow_partial_start)
            problems = info["problems"]
            out.append(
                f"instance {chain.instance} chain {chain.chain[:12]}: {info['events']} events, "
                f"seq {info['first_seq']}..{info['last_seq']}, {chain.duplicates} exact "
                f"duplicates — {'OK' if not problems else 'FAILED'}"
            )
            out.extend(f"  - {p}" for p in problems)
        if self.malformed:
            out.append(f"malformed lines: {', '.join(self.malformed[:10])}")
        if self.lines == 0:
            out.append("no events")
        out.append("verify: " + ("passed" if self.ok else "FAILED"))
        return "\n".join(out)


def verify_file(path: Path, allow_partial_start: bool = False) -> Verifier:
    """Verify a JSONL copy of the trail."""
    verifier = Verifier(allow_partial_start)
    with path.open("rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                verifier.feed(line, f"line {number}")
    return verifier


async def read_topic(
    bootstrap: str, topic: str, timeout_s: float = 30.0, **config: Any
) -> AsyncIterator[tuple[int, int, bytes]]:
    """Every record of ``topic`` now, partition by partition in offset order."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **config)
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        described = await asyncio.wait_for(admin.describe_topics([topic]), timeout_s)
    except Exception as exc:
        raise AuditError(f"cannot reach Kafka at {bootstrap}: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    if not described or described[0].get("error_code", 0) != 0:
        raise AuditError(f"topic {topic!r} does not exist")
    partitions = sorted(p["partition"] for p in described[0].get("partitions", []))
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
        auto_offset_reset="earliest", **config,
    )
    try:
        await consumer.start()
    except Exception as exc:
        with contextlib.suppress(Exception):
            await consumer.stop()
        raise AuditError(f"cannot reach Kafka at {bootstrap}: {type(exc).__name__}: {exc}") from exc
    try:
        for partition in partitions:
            tp = TopicPartition(topic, partition)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            deadline = time.monotonic() + timeout_s
            while await consumer.position(tp) < end:
                if time.monotonic() > deadline:
                    raise AuditError(f"timed out reading {topic}[{partition}]")
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=5000)
                for record in batch.get(tp, []):
                    if record.offset >= end:
                        break
                    yield partition, record.offset, record.value
    finally:
        await consumer.stop()


async def verify_topic(
    bootstrap: str, topic: str, allow_partial_start: bool = False, timeout_s: float = 30.0,
    **config: Any,
) -> Verifier:
    """Verify the trail as it stands in a Kafka topic."""
    verifier = Verifier(allow_partial_start)
    async for partition, offset, value in read_topic(bootstrap, topic, timeout_s, **config):
        verifier.feed(value, f"{topic}[{partition}]@{offset}")
    return verifier
