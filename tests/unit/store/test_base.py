"""sidecar.store.base: what every store shares (the rate-limited warning about bad records)."""

from __future__ import annotations

import logging

import pytest

from sidecar.store.base import RateLimitedWarning
from tests.unit.clock import FakeClock


def test_rate_limited_warning_logs_once_per_interval_with_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(0.0)
    warning = RateLimitedWarning(60.0, clock)
    with caplog.at_level(logging.WARNING, logger="sidecar.store"):
        assert warning.warn("%d bad (%s)", "first")
        assert not any(warning.warn("%d bad (%s)", "more") for _ in range(5))
        clock.advance(60.0)
        assert warning.warn("%d bad (%s)", "later")
    assert [r.getMessage() for r in caplog.records] == ["1 bad (first)", "6 bad (later)"]


def test_the_interval_is_measured_from_the_last_logged_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Held-back warnings do not push the next one out: a steady trickle still logs once
    per interval, each line counting everything since the last."""
    clock = FakeClock(0.0)
    warning = RateLimitedWarning(60.0, clock)
    with caplog.at_level(logging.WARNING, logger="sidecar.store"):
        logged = []
        for _ in range(12):  # one bad record every 15 s for three minutes
            logged.append(warning.warn("%d bad"))
            clock.advance(15.0)
    assert logged == [True, False, False, False] * 3
    assert [r.getMessage() for r in caplog.records] == ["1 bad", "4 bad", "4 bad"]
