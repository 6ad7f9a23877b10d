"""Graceful shutdown at the end of the grace: connections still open are closed quietly."""

from __future__ import annotations

import signal
from collections.abc import Callable

from tests.integration.conftest import LIVE_IP
from tests.support.dns_server import Zone
from tests.support.sidecar_process import Sidecar
from tests.support.tls_upstream import TestCA, Upstream


def test_connections_open_at_the_end_of_the_grace_are_closed_with_one_line(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    live_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    """Three tunnels outlive a 1 s grace: exit 0, one WARNING that says how many were
    closed, and no ERROR line or traceback per connection."""
    sidecar = sidecar_factory("--shutdown-grace", "1s")
    name = unique("lingering")
    zone.add(name, "A", LIVE_IP)
    tunnels = []
    for _ in range(3):
        reply = sidecar.connect(f"{name}:{live_upstream.port}")
        assert reply.status == 200 and reply.sock is not None
        tunnels.append(ca.client_context().wrap_socket(reply.sock, server_hostname=name))
    assert sidecar.process.proc is not None
    sidecar.process.proc.send_signal(signal.SIGTERM)
    assert sidecar.process.proc.wait(timeout=15) == 0
    for tls in tunnels:
        tls.close()
    log = sidecar.log()
    assert "closing 3 connection(s) still open after 1s" in log
    assert " ERROR " not in log and "Traceback" not in log, log[-3000:]
