"""DNS answers at the edges: a slow resolver still gives verdicts, and a big TXT RRset is
judged whole, whatever order its records come in."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from tests.integration.conftest import DEAD_IP, LIVE_IP
from tests.support.dns_server import Zone
from tests.support.sidecar_process import Sidecar
from tests.support.tls_upstream import Upstream


def test_a_resolver_answering_in_three_seconds_still_gives_a_verdict(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """Each try waits 2 s before the next starts, but keeps listening until --dns-timeout
    (5 s): a reply after 3 s is an answer, not a timeout (the name is not undecided)."""
    sidecar = sidecar_factory("--dns-timeout", "5s")  # the default (the harness sets 2s)
    gone, live = unique("slowgone"), unique("slowlive")
    zone.add(gone, "TXT", "v=matrix;gone")
    zone.add(gone, "A", DEAD_IP)
    zone.add(live, "A", LIVE_IP)
    zone.delay(3.0)
    try:
        started = time.monotonic()
        reply = sidecar.connect(f"{gone}:{dead_upstream.port}")
        took = time.monotonic() - started
        opened = sidecar.connect(f"{live}:{dead_upstream.port}")
    finally:
        zone.delay(0.0)
    assert reply.status == 502 and reply.headers["x-tombstone-signal"] == "dns_txt_gone", reply
    assert took >= 3.0, took  # the delay was in force; the 502 shows it still gave a verdict
    assert opened.status == 200, opened
    assert dead_upstream.connections == 0
    assert sidecar.metric("tombstone_undecided_total", stage="connect") == 0
    status, body = sidecar.ops(f"/v1/verdicts/{live}")
    assert status == 200 and json.loads(body)["state"] == "alive", body


def test_a_tombstone_after_many_txt_records_is_found(
    sidecar: Sidecar,
    zone: Zone,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """100 TXT records (SPF, site verifications ...) with the tombstone last: the reply's
    size bounds the RRset, there is no cut that would make the verdict depend on order."""
    name = unique("manytxt")
    zone.add(name, "A", DEAD_IP)
    for i in range(100):
        zone.add(name, "TXT", f"site-verification={i:04d}")
    zone.add(name, "TXT", "v=matrix;gone")
    reply = sidecar.connect(f"{name}:{dead_upstream.port}")
    assert reply.status == 502 and reply.headers["x-tombstone-signal"] == "dns_txt_gone", reply
    assert dead_upstream.connections == 0


def test_a_failing_resolver_is_one_warning_and_the_connection_passes(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """Fail open, said once: three names whose SRV lookup SERVFAILs (no verdict) pass to
    their addresses, and the log warns once (at most once a minute)."""
    sidecar = sidecar_factory()
    for _ in range(3):
        name = unique("servfail")
        zone.add(name, "A", LIVE_IP)
        zone.servfail(f"_matrix-fed._tcp.{name}")
        assert sidecar.tunnel_opens(f"{name}:{live_upstream.port}")
    assert sidecar.metric("tombstone_undecided_total", stage="connect") == 3
    assert sidecar.log().count("forwarding such names without a verdict (fail open)") == 1
