"""Settings' sections: each component takes its part of the settings as it is."""

from __future__ import annotations

from sidecar.config.options import Settings
from sidecar.judge.breaker import BreakerSettings
from sidecar.judge.ttl import TtlBounds
from sidecar.remote.probe import ProbeSettings

RAW = {
    "min_ttl": "10m",
    "max_ttl": "2h",
    "gone_ttl": "2d",
    "min_gone_ttl": "1h",
    "max_gone_ttl": "30d",
    "breaker_failures": "7",
    "breaker_min": "15s",
    "breaker_max": "10m",
    "breaker_max_share": "0.4",
    "probe_timeout": "4s",
    "probe_concurrency": "9",
    "probe_interval": "2h",
    "upstream_ca": "",
}


def test_the_sections_carry_exactly_the_options_they_are_named_for() -> None:
    settings = Settings.from_raw(RAW)
    assert settings.verdict_ttl == TtlBounds(600, 7200)
    assert settings.gone_lifetime == TtlBounds(3600, 30 * 86400, default=2 * 86400)
    assert settings.breaker == BreakerSettings(7, 15, 600, 0.4)
    assert settings.probing == ProbeSettings(
        timeout=4, concurrency=9, interval=7200, ttl=settings.gone_lifetime, ca_file=None
    )


def test_a_section_is_built_once_per_settings() -> None:
    settings = Settings.from_raw(RAW)
    assert settings.probing is settings.probing
    assert settings.probing.ttl is settings.gone_lifetime
