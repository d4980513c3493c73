"""Limits per caller: a token bucket for the request rate, a counter of running statements.

A caller is an identity's ``(issuer, sub)``: the principal that authenticated, so a service
acting on behalf of people is one caller, and the same ``sub`` from two issuers is two.

- **Rate**: every /v1/query and /v1/explain takes a token from the caller's bucket
  (``rate_per_s`` tokens a second, at most ``burst`` saved up); an empty bucket is
  ``429 rate_limited`` with the seconds until the next token in ``Retry-After``.
- **Concurrency**: a statement holds one of the caller's ``max_concurrent`` slots from the
  moment it is allowed until its answer (or stream) ends; one more is ``429
  too_many_concurrent``. A cap below the pool size is what keeps one caller from holding
  every database connection (pool fairness).

- **Rows per hour**: when policy gives a decision a ``rows_per_hour`` cap (the agent
  guardrail, docs/agents.md), the rows an agent received in the last hour count against it.
  A statement reserves what it may return (its row limit, at most what is left) before it
  runs, and gives back what it did not return when it ends; nothing left is ``429
  row_budget_exhausted``. The key is the agent: ``(issuer, client id or sub)``.

All are per process: each gateway process (replica, worker) counts on its own, so N
replicas admit up to N times the limit. Pure: no I/O, the clock is an argument.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from app.errors import TooManyRequests

CallerKey = tuple[str, str]  # (issuer, sub)

# Past this many remembered callers, buckets that have refilled are forgotten (a missing
# bucket is a full one), so a stream of distinct identities cannot grow the table unbounded.
_PRUNE_AT = 10_000


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets per caller; ``rate_per_s`` 0 admits everything."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self._buckets: dict[CallerKey, _Bucket] = {}

    def take(self, key: CallerKey, now: float) -> float:
        """Take a token: 0.0 when admitted, else the seconds until one is available."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= _PRUNE_AT:
                self._prune(now)
            bucket = self._buckets[key] = _Bucket(self.burst, now)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
        bucket.stamp = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = [
            key for key, b in self._buckets.items()
            if b.tokens + (now - b.stamp) * self.rate >= self.burst
        ]
        for key in full:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


class Slot:
    """One running statement of a caller; ``release()`` may be called any number of times."""

    __slots__ = ("_key", "_limiter", "handed_off", "released")

    def __init__(self, limiter: ConcurrencyLimiter | None, key: CallerKey) -> None:
        self._limiter = limiter
        self._key = key
        self.released = False
        # Set when a stream takes the slot over: it is released when the stream ends.
        self.handed_off = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            if self._limiter is not None:
                self._limiter.leave(self._key)


class ConcurrencyLimiter:
    """Running statements per caller; ``limit`` 0 admits everything."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._running: dict[CallerKey, int] = {}

    def enter(self, key: CallerKey) -> Slot | None:
        """A slot, or None when the caller already runs ``limit`` statements."""
        if self.limit <= 0:
            return Slot(None, key)
        running = self._running.get(key, 0)
        if running >= self.limit:
            return None
        self._running[key] = running + 1
        return Slot(self, key)

    def leave(self, key: CallerKey) -> None:
        running = self._running.get(key, 0) - 1
        if running > 0:
            self._running[key] = running
        else:
            self._running.pop(key, None)

    def running(self, key: CallerKey) -> int:
        return self._running.get(key, 0)


# The window of a rows_per_hour budget.
HOUR_S = 3600.0


class Allowance:
    """Rows one statement may return, reserved from its agent's hourly budget; ``settle``
    (once, with the rows it returned) gives the rest back."""

    __slots__ = ("rows", "settled", "stamp")

    def __init__(self, rows: int, stamp: float) -> None:
        self.rows = rows
        self.stamp = stamp
        self.settled = False

    def settle(self, rows_returned: int) -> None:
        if not self.settled:
            self.settled = True
            self.rows = max(0, min(self.rows, rows_returned))


class RowBudget:
    """Rows per agent over a rolling hour: reservations, settled by what was returned."""

    def __init__(self) -> None:
        self._spent: dict[CallerKey, deque[Allowance]] = {}

    def used(self, key: CallerKey, now: float) -> int:
        spent = self._spent.get(key)
        if spent is None:
            return 0
        while spent and spent[0].stamp <= now - HOUR_S:
            spent.popleft()
        if not spent:
            del self._spent[key]
            return 0
        return sum(a.rows for a in spent)

    def reserve(self, key: CallerKey, cap: int, want: int | None, now: float) -> Allowance:
        """Reserve up to ``want`` rows (None: all that is left) of ``cap`` an hour, or
        refuse (429 row_budget_exhausted) when nothing is left."""
        if len(self._spent) >= _PRUNE_AT:
            for old in [k for k, s in self._spent.items() if not s or s[-1].stamp <= now - HOUR_S]:
                del self._spent[old]
        left = cap - self.used(key, now)
        if left <= 0:
            spent = self._spent.get(key)
            retry = HOUR_S - (now - spent[0].stamp) if spent else HOUR_S
            raise TooManyRequests(
                "row_budget_exhausted",
                f"this agent has received its {cap} rows for the hour (the policy's "
                "rows_per_hour); retry later",
                retry_after_s=max(1, math.ceil(retry)),
            )
        allowance = Allowance(left if want is None else min(want, left), now)
        self._spent.setdefault(key, deque()).append(allowance)
        return allowance


class CallerLimits:
    """The gateway's limits per caller, raising the 429s the API answers."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        max_concurrent: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = RateLimiter(rate_per_s, burst)
        self.concurrency = ConcurrencyLimiter(max_concurrent)
        self.rows = RowBudget()
        self._clock = clock

    def admit(self, key: CallerKey) -> None:
        """Take a token for one request, or refuse it (429 rate_limited)."""
        wait = self.rate.take(key, self._clock())
        if wait > 0:
            raise TooManyRequests(
                "rate_limited",
                f"more than {self.rate.rate:g} requests a second (burst {self.rate.burst:g}) "
                "from this caller; retry later",
                retry_after_s=max(1, math.ceil(wait)),
            )

    def slot(self, key: CallerKey) -> Slot:
        """A slot for one running statement, or refuse it (429 too_many_concurrent)."""
        slot = self.concurrency.enter(key)
        if slot is None:
            raise TooManyRequests(
                "too_many_concurrent",
                f"this caller already runs {self.concurrency.limit} statements at once; "
                "retry when one has finished",
                retry_after_s=1,
            )
        return slot

    def allowance(self, key: CallerKey, rows_per_hour: int, want: int | None) -> Allowance:
        """Rows a statement may return under its agent's hourly budget (429
        row_budget_exhausted when none are left)."""
        return self.rows.reserve(key, rows_per_hour, want, self._clock())
