"""Hypothesis profiles for the fuzz suite, and the real DNS server some fuzzers talk to."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fuzz import profiles
from tests.support.dns_server import DnsServer

profiles.register()


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer().start()
    yield server
    server.stop()
