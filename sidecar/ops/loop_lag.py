"""Event-loop lag: how late a timer fires, the delay every connection shares.

One process, one loop: a full garbage collection over a million cached verdicts (~0.6 s,
tests/bench memory scenario) or a slow hook stalls every tunnel at once, and nothing else
shows it. A timer that measures how late it wakes makes the stall visible as a metric,
and a long one as one log line (at most one a minute).
"""

from __future__ import annotations

import asyncio
import logging
import time

from sidecar.metrics import Metrics

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 0.5  # two wake-ups a second: negligible cost, catches stalls >= 10 ms
WARN_OVER = 1.0  # a stall this long is felt by every federation request in flight
WARN_INTERVAL = 60.0  # at most one warning a minute, however often it stalls


async def watch_loop_lag(metrics: Metrics, interval: float = SAMPLE_INTERVAL) -> None:
    """Sample forever (cancel to stop)."""
    loop = asyncio.get_running_loop()
    last_warning = float("-inf")
    while True:
        started = loop.time()
        await asyncio.sleep(interval)
        lag = max(loop.time() - started - interval, 0.0)
        metrics.event_loop_lag_seconds.observe(lag)
        now = time.monotonic()
        if lag >= WARN_OVER and now - last_warning >= WARN_INTERVAL:
            last_warning = now
            log.warning(
                "the event loop stalled %.1f s: every connection waited that long "
                "(CPU starved, process paused, or a full GC of a large cache); "
                "see tombstone_event_loop_lag_seconds",
                lag,
            )
