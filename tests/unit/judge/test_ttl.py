"""sidecar.judge.ttl: one clamp for DNS TTLs and 410 lifetimes."""

from __future__ import annotations

from sidecar.judge.ttl import TtlBounds


def test_a_stated_lifetime_is_clamped_into_the_operators_range() -> None:
    bounds = TtlBounds(300, 86400)
    assert bounds.clamp(5) == 300
    assert bounds.clamp(3600) == 3600
    assert bounds.clamp(10**9) == 86400


def test_a_missing_dns_ttl_counts_as_the_longest_allowed() -> None:
    assert TtlBounds(300, 86400).clamp(None) == 86400


def test_a_missing_410_lifetime_takes_the_default_clamped() -> None:
    assert TtlBounds(3600, 30 * 86400, default=86400).clamp(None) == 86400
    # A default outside the range (flags that disagree) still lands inside it.
    assert TtlBounds(3600, 7200, default=86400).clamp(None) == 7200
