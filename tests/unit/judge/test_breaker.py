"""sidecar.judge.breaker: the `unreachable` breaker, walked through its life by a set clock.

The integration test (tests/integration/test_hardening.py) shows a real refusing port
opening it; here every boundary is exact: open at the Nth failure, half-open at the end
of the back-off and not a moment before, one trial at a time, a lost trial retried after
TRIAL_SECONDS, the back-off doubling to its ceiling, closing on success, and the guard
that opens no breaker while most destinations fail (and clears as the window moves on).
"""

from __future__ import annotations

import pytest

from sidecar.judge.breaker import (
    GUARD_MIN_DESTINATIONS,
    GUARD_WINDOW_SECONDS,
    TRIAL_SECONDS,
    Breaker,
    BreakerSettings,
    Gate,
)
from sidecar.judge.signals import Signal
from sidecar.judge.verdicts import State
from sidecar.metrics import Metrics
from tests.unit.clock import FakeClock

FAILURES = 3
MINIMUM = 10.0  # seconds open after the Nth failure
MAXIMUM = 35.0  # not a power-of-two multiple of MINIMUM, so the cap is visible
MAX_SHARE = 0.5
KEY = "down.example:8448"
# Far from 0: a trial never started is stored as 0, and "now - 0" must not look recent.
START = 1_700_000_000.0
TICK = 0.001  # "a moment": the smallest step any boundary below is checked with


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def breaker(clock: FakeClock, metrics: Metrics) -> Breaker:
    return Breaker(BreakerSettings(FAILURES, MINIMUM, MAXIMUM, MAX_SHARE), metrics, clock)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def changes(metrics: Metrics, source: str, target: str) -> float:
    return sample(metrics, "tombstone_verdict_changes_total", **{"from": source, "to": target})


def fail(breaker: Breaker, times: int, key: str = KEY) -> None:
    for i in range(times):
        breaker.failure(key, f"connection refused ({i + 1})")


def open_breaker(breaker: Breaker) -> None:
    fail(breaker, FAILURES)
    assert breaker.gate(KEY) is Gate.OPEN


def test_stays_closed_below_the_failure_count(breaker: Breaker, metrics: Metrics) -> None:
    fail(breaker, FAILURES - 1)
    assert breaker.gate(KEY) is Gate.CLOSED
    assert breaker.verdict(KEY) is None
    assert breaker.open_verdicts() == []
    assert changes(metrics, "none", "unreachable") == 0


def test_opens_at_the_nth_consecutive_failure_with_an_unreachable_verdict(
    breaker: Breaker, clock: FakeClock, metrics: Metrics
) -> None:
    fail(breaker, FAILURES)
    assert breaker.gate(KEY) is Gate.OPEN
    verdict = breaker.verdict(KEY)
    assert verdict is not None
    assert (verdict.destination, verdict.state, verdict.signal) == (
        KEY,
        State.UNREACHABLE,
        Signal.UNREACHABLE,
    )
    assert (verdict.observed_at, verdict.expires_at) == (START, START + MINIMUM)
    assert verdict.evidence == f"{FAILURES} connect failures in a row, last: connection refused (3)"
    assert breaker.open_verdicts() == [verdict]
    assert changes(metrics, "none", "unreachable") == 1


def test_a_success_resets_the_count_of_consecutive_failures(breaker: Breaker) -> None:
    fail(breaker, FAILURES - 1)
    breaker.success(KEY)
    fail(breaker, FAILURES - 1)
    assert breaker.gate(KEY) is Gate.CLOSED
    fail(breaker, 1)
    assert breaker.gate(KEY) is Gate.OPEN


def test_each_destination_counts_its_own_failures(breaker: Breaker) -> None:
    other = "other.example:8448"
    fail(breaker, FAILURES - 1)
    fail(breaker, FAILURES - 1, key=other)
    assert breaker.gate(KEY) is Gate.CLOSED
    assert breaker.gate(other) is Gate.CLOSED


def test_half_open_exactly_when_the_back_off_ends(breaker: Breaker, clock: FakeClock) -> None:
    open_breaker(breaker)
    clock.advance(MINIMUM - TICK)
    assert breaker.gate(KEY) is Gate.OPEN
    clock.advance(TICK)
    assert breaker.gate(KEY) is Gate.TRIAL


def test_one_trial_at_a_time(breaker: Breaker, clock: FakeClock) -> None:
    """While the trial connection runs, every other connection is still answered locally."""
    open_breaker(breaker)
    clock.advance(MINIMUM)
    assert breaker.gate(KEY) is Gate.TRIAL
    clock.advance(TRIAL_SECONDS / 2)
    assert breaker.gate(KEY) is Gate.OPEN
    assert breaker.verdict(KEY) is not None


def test_a_trial_that_never_reports_is_retried_after_the_trial_timeout(
    breaker: Breaker, clock: FakeClock
) -> None:
    """The client of the trial may leave before connect ends; the breaker must not wait
    for an outcome that never comes."""
    open_breaker(breaker)
    clock.advance(MINIMUM)
    assert breaker.gate(KEY) is Gate.TRIAL
    clock.advance(TRIAL_SECONDS - TICK)
    assert breaker.gate(KEY) is Gate.OPEN
    clock.advance(TICK)
    assert breaker.gate(KEY) is Gate.TRIAL  # the retry is itself the one trial
    assert breaker.gate(KEY) is Gate.OPEN


def test_a_failed_trial_opens_again_for_twice_as_long_up_to_the_maximum(
    breaker: Breaker, clock: FakeClock, metrics: Metrics
) -> None:
    open_breaker(breaker)
    periods = []
    for _ in range(4):
        verdict = breaker.verdict(KEY)
        assert verdict is not None
        periods.append(verdict.expires_at - verdict.observed_at)
        clock.now = verdict.expires_at
        assert breaker.gate(KEY) is Gate.TRIAL
        clock.advance(1.0)  # the trial takes a second to fail
        breaker.failure(KEY, "connection refused (trial)")
        assert breaker.gate(KEY) is Gate.OPEN  # no new trial right after a failed one
    assert periods == [MINIMUM, 2 * MINIMUM, MAXIMUM, MAXIMUM]
    assert changes(metrics, "none", "unreachable") == 1  # one change of verdict, not four


def test_a_failed_trial_reopens_from_the_moment_it_failed(
    breaker: Breaker, clock: FakeClock
) -> None:
    open_breaker(breaker)
    clock.advance(MINIMUM)
    assert breaker.gate(KEY) is Gate.TRIAL
    clock.advance(5.0)
    breaker.failure(KEY, "timed out")
    failed_at = clock.now
    clock.now = failed_at + 2 * MINIMUM - TICK
    assert breaker.gate(KEY) is Gate.OPEN
    clock.now = failed_at + 2 * MINIMUM
    assert breaker.gate(KEY) is Gate.TRIAL


def test_a_successful_trial_closes_the_breaker_and_forgets_the_history(
    breaker: Breaker, clock: FakeClock, metrics: Metrics
) -> None:
    open_breaker(breaker)
    clock.advance(MINIMUM)
    assert breaker.gate(KEY) is Gate.TRIAL
    breaker.success(KEY)
    assert breaker.gate(KEY) is Gate.CLOSED
    assert breaker.verdict(KEY) is None
    assert breaker.open_verdicts() == []
    assert changes(metrics, "unreachable", "alive") == 1
    # A fresh start: the next open takes N failures again, and begins at the minimum.
    fail(breaker, FAILURES - 1)
    assert breaker.gate(KEY) is Gate.CLOSED
    fail(breaker, 1)
    verdict = breaker.verdict(KEY)
    assert verdict is not None
    assert verdict.expires_at - verdict.observed_at == MINIMUM


def test_a_success_on_a_closed_breaker_is_no_verdict_change(
    breaker: Breaker, metrics: Metrics
) -> None:
    breaker.success(KEY)
    fail(breaker, 1)
    breaker.success(KEY)
    assert changes(metrics, "unreachable", "alive") == 0


# --- the guard --------------------------------------------------------------------------------


def destinations(count: int, prefix: str = "d") -> list[str]:
    return [f"{prefix}{i}.example:8448" for i in range(count)]


def test_the_guard_trips_when_most_destinations_fail_and_opens_no_breaker(
    breaker: Breaker, metrics: Metrics
) -> None:
    """Our own network down looks like every destination down: judge nobody by it."""
    for key in destinations(GUARD_MIN_DESTINATIONS):
        fail(breaker, 1, key)
    assert breaker.guard_tripped
    assert sample(metrics, "tombstone_breaker_guard_tripped") == 1
    for key in destinations(GUARD_MIN_DESTINATIONS):
        fail(breaker, FAILURES, key)
        assert breaker.gate(key) is Gate.CLOSED
    assert breaker.open_verdicts() == []
    assert changes(metrics, "none", "unreachable") == 0


def test_the_guard_needs_enough_destinations_to_judge_a_share(breaker: Breaker) -> None:
    keys = destinations(GUARD_MIN_DESTINATIONS - 1)
    for key in keys:
        fail(breaker, FAILURES, key)
    assert not breaker.guard_tripped
    assert all(breaker.gate(key) is Gate.OPEN for key in keys)


def test_the_guard_counts_destinations_not_connections(breaker: Breaker) -> None:
    """One destination failing a thousand times is one failing destination of many."""
    healthy = destinations(GUARD_MIN_DESTINATIONS, prefix="up")
    for key in healthy:
        breaker.success(key)
    fail(breaker, 1000)
    assert not breaker.guard_tripped
    assert breaker.gate(KEY) is Gate.OPEN


def test_the_guard_trips_only_above_the_share(breaker: Breaker) -> None:
    keys = destinations(GUARD_MIN_DESTINATIONS)
    half = len(keys) // 2
    for key in keys[:half]:
        breaker.success(key)
    for key in keys[half:]:
        fail(breaker, 1, key)
    assert not breaker.guard_tripped  # exactly MAX_SHARE failing: not above it
    fail(breaker, 1, "one-more.example:8448")
    assert breaker.guard_tripped


def test_a_failed_trial_reopens_for_longer_while_the_guard_is_tripped(
    breaker: Breaker, clock: FakeClock
) -> None:
    open_breaker(breaker)
    for key in destinations(GUARD_MIN_DESTINATIONS):
        fail(breaker, 1, key)
    assert breaker.guard_tripped
    clock.advance(MINIMUM)
    assert breaker.gate(KEY) is Gate.TRIAL
    breaker.failure(KEY, "still refused")
    verdict = breaker.verdict(KEY)
    assert verdict is not None
    assert verdict.expires_at - verdict.observed_at == 2 * MINIMUM


def test_the_guard_clears_when_destinations_recover(breaker: Breaker, metrics: Metrics) -> None:
    keys = destinations(GUARD_MIN_DESTINATIONS)
    for key in keys:
        fail(breaker, 1, key)
    assert breaker.guard_tripped
    for key in keys:
        breaker.success(key)
    assert not breaker.guard_tripped
    assert sample(metrics, "tombstone_breaker_guard_tripped") == 0
    fail(breaker, FAILURES)  # judged again: the breaker opens
    assert breaker.gate(KEY) is Gate.OPEN


def test_the_guard_forgets_failures_older_than_its_window(
    breaker: Breaker, clock: FakeClock, metrics: Metrics
) -> None:
    """An outage of ours an hour ago says nothing about a server refusing now."""
    for key in destinations(GUARD_MIN_DESTINATIONS):
        fail(breaker, 1, key)
    assert breaker.guard_tripped
    clock.advance(GUARD_WINDOW_SECONDS - TICK)
    fail(breaker, 1)  # the old failures are still in the window: still tripped
    assert breaker.guard_tripped
    clock.advance(TICK * 2)
    fail(breaker, 1)  # now only this destination is in the window
    assert not breaker.guard_tripped
    assert sample(metrics, "tombstone_breaker_guard_tripped") == 0
    fail(breaker, FAILURES - 2)
    assert breaker.gate(KEY) is Gate.OPEN
