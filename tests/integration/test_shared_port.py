"""Several sidecar processes on one port (`--reuse-port`): the kernel spreads connections.

Real processes, real sockets: two sidecars bind the same loopback port, CONNECTs from
fresh connections land on both, and each answers with the same verdict.
"""

from __future__ import annotations

from collections.abc import Callable

from tests.support.dns_server import DnsServer
from tests.support.procs import ManagedProcess
from tests.support.sidecar_process import Sidecar

CONNECTIONS = 60  # each a new TCP connection, so the kernel picks a listener every time


def test_two_processes_share_one_port_and_both_serve(
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    first = sidecar_factory("--reuse-port", "--deny", "gone.hs.test")
    second = sidecar_factory("--reuse-port", "--deny", "gone.hs.test", proxy_port=first.proxy_port)

    statuses = [first.connect("gone.hs.test:8448").status for _ in range(CONNECTIONS)]

    assert statuses == [502] * CONNECTIONS
    counts = [
        s.metric("tombstone_suppressed_total", signal="operator", stage="connect")
        for s in (first, second)
    ]
    assert sum(counts) == CONNECTIONS
    assert all(count > 0 for count in counts), counts  # both processes took connections

    assert first.stop() == 0  # one process leaves (SIGTERM drain): the port stays served
    assert second.connect("gone.hs.test:8448").status == 502


def test_without_reuse_port_a_second_process_on_the_port_says_why_and_exits(
    sidecar_factory: Callable[..., Sidecar], dns_server: DnsServer
) -> None:
    first = sidecar_factory("--deny", "gone.hs.test")
    second = Sidecar(dns_server.port, ["--no-probe"], proxy_port=first.proxy_port)
    with ManagedProcess(second.argv) as process:
        assert process.proc is not None
        assert process.proc.wait(timeout=30) != 0
        assert "address already in use" in process.log_text()
    assert first.connect("gone.hs.test:8448").status == 502  # the first one is untouched
