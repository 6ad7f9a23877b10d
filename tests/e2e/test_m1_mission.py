"""The mission figure (issue 8, scenario 7): what reaches decommissioned servers during a
stretch of simulated user activity, with the sidecar enforcing and with it only watching
(`--no-enforce`: Synapse on its own, through a plain pass-through proxy), and how long a
user waits for the profile of someone on a blackholed server.

Each mode gets a fresh Synapse (so no backoff or well-known cache carries over) doing the
same activity for SIDECAR_TEST_MISSION_SECONDS (default 15): profile lookups and joins by
alias for a user and a room on each tombstoned server, and messages in a room that has a
member on each of them. The figures go to the e2e measurements table.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from tests.e2e.actions import create_room, join, profile, send_text
from tests.e2e.intercept import start_behind
from tests.e2e.world import TOMBSTONES, World

MISSION_SECONDS = float(os.environ.get("SIDECAR_TEST_MISSION_SECONDS", "15"))
BLACKHOLED = next(t for t in TOMBSTONES if t.signal == "dns_srv_dot")  # A -> the blackhole


@pytest.mark.parametrize("mode", ["enforce", "shadow"])
def test_m1_traffic_reaching_dead_servers_with_and_without_the_sidecar(
    mode: str, world: World, record: Callable[[str, str], None]
) -> None:
    args = ["--no-enforce"] if mode == "shadow" else []
    behind = start_behind(world, f"mission-{mode}", args)
    dead_before = world.dead_connections()
    with behind.synapse.client(behind.account, timeout=60) as client:
        first = profile(client, BLACKHOLED.user)  # nothing cached yet: the full wait
        room = join(client, world.live.add_shared_room(f"mission-{mode}"))
        assert room.status == 200, room
        own_room = create_room(client)
        actions = 1
        statuses: dict[int, int] = {}
        stop = time.monotonic() + MISSION_SECONDS
        while time.monotonic() < stop:
            for tombstone in TOMBSTONES:
                for outcome in (profile(client, tombstone.user), join(client, tombstone.alias)):
                    statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
                    actions += 1
            sent = send_text(client, room.body["room_id"], "still there?")
            assert sent.status == 200, sent
            actions += 1
        assert own_room
    reached = world.new_dead_connections(dead_before)
    contacts = ", ".join(f"{count} {what}" for what, count in reached.items()) or "nothing"
    record(
        f"m1 {mode}",
        f"{actions} user actions in {MISSION_SECONDS:.0f} s -> reached dead servers: "
        f"{contacts}; first profile on the blackholed {BLACKHOLED.name}: "
        f"{first.status} in {first.seconds * 1000:.0f} ms; answers {statuses}",
    )
    if mode == "enforce":
        assert reached == {}
        assert first.seconds < 1.0, first
    else:  # Synapse alone: the dead servers are contacted, the user waits for a timeout
        assert sum(reached.values()) > 0, reached
        assert first.seconds > 5.0, first
