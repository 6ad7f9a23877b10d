"""Real parts for integration tests: a DNS server, TLS upstreams and sidecar processes.

Address plan (all loopback): 127.0.0.2 is the live remote homeserver, 127.0.0.3 the dead
one; both listen on the same port, so a name's A record alone decides which one a
connection would reach. The dead one must never see a connection.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.dns_server import DnsServer, Zone
from tests.support.sidecar_process import Sidecar
from tests.support.tls_upstream import TestCA, Upstream

LIVE_IP = "127.0.0.2"
DEAD_IP = "127.0.0.3"
# --refusal status: these tests read the sidecar's answer (status, headers, JSON body);
# the default, close, is tested on its own in test_passthrough.py.
# --no-probe: a probe would send its own requests to the test upstreams and muddle their
# counts; probing has its own tests in test_probe.py.
BASE_ARGS = ("--allow-address", "127.0.0.0/8", "--refusal", "status", "--no-probe")

_counter = itertools.count()


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DnsServer]:
    server = DnsServer().start()
    yield server
    server.stop()


@pytest.fixture
def zone(dns_server: DnsServer) -> Zone:
    return dns_server.zone


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCA]:
    authority = TestCA(tmp_path_factory.mktemp("ca"))
    yield authority
    authority.cleanup()


@pytest.fixture(scope="session")
def live_upstream(ca: TestCA) -> Iterator[Upstream]:
    upstream = Upstream(ca, ["*.hs.test"], host=LIVE_IP).start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def _dead_upstream(ca: TestCA, live_upstream: Upstream) -> Iterator[Upstream]:
    upstream = Upstream(
        ca, ["*.hs.test"], host=DEAD_IP, port=live_upstream.port, status=410
    ).start()
    yield upstream
    upstream.stop()


@pytest.fixture
def dead_upstream(_dead_upstream: Upstream) -> Iterator[Upstream]:
    """The decommissioned server: every test starts it at zero and it must stay there."""
    _dead_upstream.reset()
    yield _dead_upstream


@pytest.fixture
def unique() -> Callable[[str], str]:
    """A fresh server name per call, so cached verdicts never leak between tests."""

    def make(prefix: str) -> str:
        return f"{prefix}-{next(_counter)}.hs.test"

    return make


@pytest.fixture
def sidecar_factory(
    dns_server: DnsServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Sidecar]]:
    """Start sidecars with extra arguments; stopped (and logs shown on failure) after the test."""
    started: list[Sidecar] = []

    def start(
        *args: str, env: dict[str, str] | None = None, proxy_port: int | None = None
    ) -> Sidecar:
        sidecar = Sidecar(
            dns_server.port, [*BASE_ARGS, *args], env=env, log_dir=tmp_path, proxy_port=proxy_port
        )
        started.append(sidecar)
        return sidecar.start()

    yield start
    for sidecar in started:
        sidecar.stop()
    _attach_logs(request, started)


@pytest.fixture(scope="module")
def shared_sidecar(
    dns_server: DnsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Sidecar]:
    sidecar = Sidecar(
        dns_server.port,
        [*BASE_ARGS, "--deny", "denied.test"],
        log_dir=tmp_path_factory.mktemp("sidecar"),
    ).start()
    yield sidecar
    sidecar.stop()


@pytest.fixture
def sidecar(shared_sidecar: Sidecar, request: pytest.FixtureRequest) -> Iterator[Sidecar]:
    """The module's sidecar process (default options, `denied.test` on the deny list)."""
    yield shared_sidecar
    _attach_logs(request, [shared_sidecar])


def _attach_logs(request: pytest.FixtureRequest, sidecars: list[Sidecar]) -> None:
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for sidecar in sidecars:
            report.sections.append((f"sidecar {sidecar.proxy_port} log", sidecar.log()[-20000:]))
