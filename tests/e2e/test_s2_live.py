"""Scenario 2: the same actions against live servers work through the sidecar.

A plain name (live.test:8448), an SRV-delegated name (_matrix-fed._tcp.srv.test ->
fed.srv.test:8449) and a well-known-delegated name (wk.test -> fed.wk.test:8451). The
join is a real room-version-10 join: Synapse verifies the remote's signatures, content
hashes and event IDs of every state event, so any change to the bytes in the tunnel
would fail it. The remote sees exactly the connection Synapse would make without a proxy
(port, TLS SNI, Host), per docs/design.md §2's table.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.e2e.actions import delta, invite, join, profile, suppressed, verdict
from tests.e2e.world import LIVE_IP, LIVES, Live, World

# how Synapse reaches each: (port, TLS SNI, Host header)
EXPECTED_ROUTE = {
    "live.test": (8448, "live.test", "live.test"),
    "srv.test": (8449, "srv.test", "srv.test"),
    "wk.test": (8451, "fed.wk.test", "fed.wk.test:8451"),
}


@pytest.mark.parametrize("live", LIVES, ids=lambda lv: lv.how)
def test_actions_on_a_live_server_pass_through(
    live: Live,
    world: World,
    client: httpx.Client,
    invite_room: str,
    record: Callable[[str, str], None],
) -> None:
    assert world.sidecar is not None
    dead_before = world.dead_connections()
    before = suppressed(world.sidecar)
    forwarded_before = world.sidecar.metric("tombstone_forwarded_total", stage="connect")
    seen_before = {u.port: len(u.requests) for u in world.live_upstreams}

    outcomes = [
        profile(client, f"@carol:{live.name}"),
        join(client, f"#lobby:{live.name}"),
        invite(client, invite_room, f"@carol:{live.name}"),
    ]
    for outcome in outcomes:
        record(f"s2 {live.how} ({live.name})", str(outcome))

    profile_out, join_out, invite_out = outcomes
    assert profile_out.status == 200 and profile_out.body == {
        "displayname": f"Carol of {live.name}"
    }, profile_out
    assert join_out.status == 200 and join_out.body["room_id"] == f"!lobby:{live.name}", join_out
    assert invite_out.status == 200, invite_out
    for outcome in outcomes:
        assert outcome.seconds < 5, outcome

    port, sni, host = EXPECTED_ROUTE[live.name]
    upstream = next(u for u in world.live_upstreams if u.port == port)
    new = upstream.requests[seen_before[port] :]
    paths = [r.path.split("?")[0] for r in new]
    assert any(p.startswith("/_matrix/federation/v1/query/profile") for p in paths), paths
    assert any(p.startswith("/_matrix/federation/v1/make_join/") for p in paths), paths
    assert any(p.startswith("/_matrix/federation/v2/send_join/") for p in paths), paths
    assert any(p.startswith("/_matrix/federation/v2/invite/") for p in paths), paths
    for request in new:
        assert (request.sni, request.headers.get("host")) == (sni, host), request
        assert upstream.host == LIVE_IP

    assert delta(suppressed(world.sidecar), before) == {}
    forwarded = world.sidecar.metric("tombstone_forwarded_total", stage="connect")
    assert forwarded > forwarded_before
    assert verdict(world.sidecar, live.name).get("state") == "alive"
    assert world.new_dead_connections(dead_before) == {}
