"""Scenario 7: a live server Synapse cannot reach, behind the sidecar in pass-through.

Nothing is gone here: the names are live in DNS, but one resolves to an address that
refuses (RST), one only into a blocked range (the sidecar's address guard refuses to
dial it). Alone, Synapse logs an ordinary failed connection for each; behind a proxy,
any non-200 answer to its CONNECT becomes a CRITICAL `ProxyConnectError` traceback
(tests/e2e/test_s5_synapse_log.py). With the default `--refusal close` the sidecar's
answer is the one Synapse would have had alone: the connection ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.e2e.actions import profile
from tests.e2e.world import DEAD_REFUSE_IP, World
from tests.support.synapse_server import count_critical

BLOCKED_IP = "10.77.0.1"  # RFC 1918: the sidecar's guard refuses it (only 127/8 is allowed)
PROFILES = 3  # requests per name; Synapse asks again each time (no backoff for profile)


def test_unreachable_live_servers_leave_synapse_log_free_of_critical_lines(
    world: World, client: httpx.Client, record: Callable[[str, str], None]
) -> None:
    assert world.synapse is not None and world.sidecar is not None
    sidecar = world.sidecar
    refusing, blocked = "refusing-live.test", "private-live.test"
    world.zone.add(refusing, "A", DEAD_REFUSE_IP, ttl=300)
    world.zone.add(blocked, "A", BLOCKED_IP, ttl=300)
    mark = world.synapse.log_mark()
    errors_before = sidecar.metric("tombstone_upstream_errors_total", kind="refused")
    blocked_before = sidecar.metric("tombstone_blocked_address_total")
    outcomes = [
        profile(client, f"@someone:{name}") for name in (refusing, blocked) for _ in range(PROFILES)
    ]
    time.sleep(0.5)
    counts = count_critical(world.synapse.log_since(mark))
    refused = sidecar.metric("tombstone_upstream_errors_total", kind="refused") - errors_before
    guarded = sidecar.metric("tombstone_blocked_address_total") - blocked_before
    for outcome in outcomes:
        record("s7 unreachable live servers", str(outcome))
    record(
        "s7 unreachable live servers",
        f"{refused:.0f} refused dials, {guarded:.0f} blocked CONNECTs -> Synapse log {counts}",
    )
    assert all(o.status >= 400 for o in outcomes), outcomes  # none reached: an error, no hang
    assert refused >= 1 and guarded >= 1
    assert counts["critical"] == counts["traceback"] == counts["proxy_connect_error"] == 0
