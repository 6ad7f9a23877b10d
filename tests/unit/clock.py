"""A clock a test sets by hand, for the `clock=` seam of every time-driven sidecar part.

The breaker, the caches, the address book and the rate-limited warnings all read time
through a `Callable[[], float]` they are given; with this one a test walks through an
hour of back-offs and expiries in microseconds, and every boundary is exact (no sleeps,
no tolerance for a slow machine).
"""

from __future__ import annotations


class FakeClock:
    """A settable time source: call it for the time, set `now` or `advance` it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
