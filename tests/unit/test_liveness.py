"""The event-loop heartbeat behind /healthz (app/liveness.py), on a fake clock and a real loop."""

from __future__ import annotations

import asyncio
import time

from app.liveness import Heartbeat


def test_beats_on_time_are_healthy():
    beat = Heartbeat(max_lag_s=1.0, interval_s=0.1)
    assert beat.problem(0.0) is None  # not started: readiness is another probe's business
    now = 0.0
    for _ in range(50):
        beat.expect(now)
        now += 0.15  # a little late is not a stall
        beat.beat(now)
    assert beat.problem(now) is None


def test_a_late_beat_is_a_stall_reported_for_the_window():
    beat = Heartbeat(max_lag_s=1.0, interval_s=0.1, window_s=5.0)
    beat.beat(0.0)
    beat.expect(0.0)
    beat.beat(3.1)  # the loop was blocked for about three seconds
    problem = beat.problem(3.2)
    assert problem is not None and "blocked for 3.1 s" in problem
    # Beating again on time, the stall is still reported until the window has passed.
    now = 3.1
    while now < 8.0:
        beat.expect(now)
        now += 0.1
        beat.beat(now)
        assert (beat.problem(now) is None) == (now - 3.1 > 5.0)
    assert beat.problem(now + 0.05) is None


def test_a_heartbeat_that_stopped_is_reported():
    beat = Heartbeat(max_lag_s=1.0, interval_s=0.1)
    beat.beat(10.0)
    assert beat.problem(10.5) is None
    problem = beat.problem(13.0)
    assert problem is not None and "has not run its heartbeat for 3.0 s" in problem


def test_the_task_sees_a_blocked_loop():
    async def main() -> tuple[str | None, str | None, str | None]:
        beat = Heartbeat(max_lag_s=0.2, interval_s=0.02, window_s=60)
        task = asyncio.create_task(beat.run())
        await asyncio.sleep(0.1)
        before = beat.problem()
        time.sleep(0.5)  # noqa: ASYNC251 - the point: no beat can run meanwhile
        blocked = beat.problem()
        await asyncio.sleep(0.1)
        task.cancel()
        return before, blocked, beat.problem()

    before, blocked, after = asyncio.run(main())
    assert before is None
    assert blocked is not None and "has not run its heartbeat" in blocked
    assert after is not None and "was blocked for 0.5 s" in after
