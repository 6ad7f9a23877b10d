"""Scenario 1: a user reaches for a server on each tombstone signal; the dead never hear.

Profile query, join by alias and invite, from a real Synapse through the real sidecar.
The dead remotes (410, refusing, blackholing) must see zero connection attempts (SYNs
counted on the world's loopback), Synapse must answer the client fast, and the sidecar
must count each suppression under the right signal.

What really happens per signal (Synapse 1.163):
- `dns_txt_gone`, `nxdomain`: CONNECT name:443 (well-known) and then name:8448 are
  both suppressed, each counted under the name's signal.
- `invalid_tld` (SRV to `old.srv-invalid.invalid`): CONNECT srv-invalid.test:443, then
  CONNECT old.srv-invalid.invalid:8448; both suppressed as `invalid_tld`.
- `dns_srv_dot`: only the well-known CONNECT names the server. Synapse then sends
  `CONNECT :0` (Twisted reads the root target as an empty name), which mitmproxy
  rejects with 400 before any addon runs: nothing is dialled, but the sidecar cannot
  count it. So `dns_srv_dot` counts once per hour per name (Synapse caches the failed
  well-known fetch for an hour), not once per request.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

from tests.e2e.actions import delta, invite, join, profile, suppressed, verdict
from tests.e2e.world import TOMBSTONES, Tombstone, World

FAST = 1.0  # seconds: profile and join answers (measured: tens of milliseconds)
# Synapse itself retries an invite whose connection fails 3 more times, 0.5/1/2 s apart
# (x0.8-1.4 jitter): that is Synapse's schedule, not a remote's timeout.
INVITE_BOUND = 8.0


@pytest.mark.parametrize("tombstone", TOMBSTONES, ids=lambda t: t.signal)
def test_actions_on_a_tombstoned_server_are_answered_locally(
    tombstone: Tombstone,
    world: World,
    client: httpx.Client,
    invite_room: str,
    record: Callable[[str, str], None],
) -> None:
    assert world.sidecar is not None
    dead_before = world.dead_connections()
    before = suppressed(world.sidecar)

    outcomes = [
        profile(client, tombstone.user),
        join(client, tombstone.alias),
        invite(client, invite_room, tombstone.user),
    ]

    for outcome in outcomes:
        record(f"s1 {tombstone.signal}", str(outcome))
    assert world.new_dead_connections(dead_before) == {}
    for outcome in outcomes:
        # Synapse's generic answer to a failed connection (docs/design.md §2).
        assert outcome.status == 502, outcome
    profile_out, join_out, invite_out = outcomes
    assert profile_out.seconds < FAST, profile_out
    assert join_out.seconds < FAST, join_out
    assert invite_out.seconds < INVITE_BOUND, invite_out

    counted = delta(suppressed(world.sidecar), before)
    record(f"s1 {tombstone.signal}", f"tombstone_suppressed_total increase {counted}")
    assert set(counted) <= {tombstone.signal}, f"suppressed under another signal: {counted}"
    found = verdict(world.sidecar, tombstone.name)
    assert found.get("state") == "gone" and found.get("signal") == tombstone.signal, found
    if tombstone.signal == "dns_srv_dot":
        # Only the well-known CONNECT names the server (module docstring).
        assert suppressed(world.sidecar).get("dns_srv_dot", 0) >= 1
    else:
        # At least one CONNECT per action: profile, the alias lookup, each invite attempt.
        assert counted.get(tombstone.signal, 0) >= len(outcomes), counted
