"""Liveness that can fail: a heartbeat on the event loop, and what /healthz makes of it.

/healthz is answered by the event loop it reports on. A loop that is blocked (a CPU-bound
call, a synchronous library waiting on a socket) cannot answer at all, and Kubernetes'
probe fails by its own ``timeoutSeconds``. The heartbeat covers what the probe cannot see
that way: a task that sleeps ``interval_s`` and measures how late it wakes up. A wake-up
more than ``max_lag_s`` late is a stall, and /healthz reports it (503) for ``window_s``
after the loop recovers, so the probe that queued up during the stall and the next ones
fail too, and a loop that keeps stalling (each stall shorter than the probe's timeout) is
restarted rather than passed. A heartbeat that stopped beating (its task died, or the
loop is still blocked when a request is somehow answered) is reported the same way.

A separate thread serving liveness would answer while the loop is blocked, but all it
could say is "blocked"; the probe's timeout already says that.

The decisions are pure (``beat`` and ``problem`` take the time); ``run`` is the task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class Heartbeat:
    """Measures the event loop's lag; ``problem()`` is None while it is healthy."""

    def __init__(
        self,
        max_lag_s: float,
        interval_s: float = 0.1,
        window_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_lag_s = max_lag_s
        self.interval_s = interval_s
        self.window_s = 5 * max_lag_s if window_s is None else window_s
        self._clock = clock
        self.last: float | None = None
        self._due: float | None = None
        self.stalled_at: float | None = None
        self.stall_s = 0.0

    def expect(self, now: float) -> None:
        """The next beat is due ``interval_s`` after ``now``."""
        self._due = now + self.interval_s

    def beat(self, now: float) -> None:
        """A beat at ``now``; more than ``max_lag_s`` past its due time is a stall."""
        if self._due is not None and now - self._due > self.max_lag_s:
            self.stalled_at = now
            self.stall_s = now - self._due + self.interval_s
        self.last = now

    def problem(self, now: float | None = None) -> str | None:
        """Why the loop is not live, or None."""
        now = self._clock() if now is None else now
        if self.last is None:
            return None  # not started yet (start-up is the readiness probe's business)
        silent = now - self.last
        if silent > self.max_lag_s + self.interval_s:
            return f"the event loop has not run its heartbeat for {silent:.1f} s"
        if self.stalled_at is not None and now - self.stalled_at <= self.window_s:
            return (f"the event loop was blocked for {self.stall_s:.1f} s, "
                    f"{now - self.stalled_at:.1f} s ago")
        return None

    async def run(self) -> None:
        """Beat until cancelled."""
        self.beat(self._clock())
        while True:
            self.expect(self._clock())
            await asyncio.sleep(self.interval_s)
            self.beat(self._clock())
