"""Scenario 3: Synapse's backoff after a suppressed request, from its `destinations` table.

- Profile, directory (join by alias) and invite requests ignore backoff and write no
  backoff row (they ran in scenario 1): every such user action costs one decision at
  the sidecar, answered locally.
- A join by room ID via a dead server (make_join) writes `retry_interval` = 600000 ms
  (Synapse's `destination_min_retry_interval`, 10 min; doubled per further failure up to
  `destination_max_retry_interval`, 7 days). While it runs, the next join by room ID is
  refused by Synapse itself: nothing reaches the sidecar.
- A room shared with dead servers (`#shared:live.test` has a `@bob` on a server of each
  tombstone kind, `member-*.test`): each message makes Synapse's federation sender send
  a transaction to every server in the room. To a suppressed server it fails, is retried
  (here 2 retries; 10 by default, see world.FEDERATION), and the destination backs off
  10 min: later messages do not try it again. Live servers in the room keep receiving every message.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.e2e.actions import delta, join, send_text, suppressed
from tests.e2e.world import MEMBER_TOMBSTONES, TOMBSTONES, Tombstone, World

MIN_RETRY_MS = 600_000  # Synapse's default destination_min_retry_interval (10m)


def backoff(world: World, name: str) -> int | None:
    assert world.synapse is not None
    row = world.synapse.destinations().get(name)
    return None if row is None else row.get("retry_interval")


@pytest.mark.parametrize("tombstone", TOMBSTONES, ids=lambda t: t.signal)
def test_join_by_room_id_backs_off_for_ten_minutes(
    tombstone: Tombstone,
    world: World,
    client: httpx.Client,
    record: Callable[[str, str], None],
) -> None:
    assert world.synapse is not None and world.sidecar is not None
    dead_before = world.dead_connections()
    # Scenario 1's profile, alias and invite requests (if they ran) left no backoff.
    assert not backoff(world, tombstone.name), world.synapse.destinations().get(tombstone.name)

    first = join(client, tombstone.room_id, via=tombstone.name)
    row = world.synapse.wait_for_destination(tombstone.name)
    assert row is not None, world.synapse.destinations()
    record(f"s3 {tombstone.signal}", f"{first}; destinations row {row}")
    assert first.status == 502 and first.seconds < 1.0, first
    assert row["retry_interval"] == MIN_RETRY_MS, row
    assert row["failure_ts"] is not None and row["retry_last_ts"] is not None, row

    before = suppressed(world.sidecar)
    again = join(client, tombstone.room_id, via=tombstone.name)
    record(f"s3 {tombstone.signal}", f"second {again} (in backoff)")
    assert again.status == 502 and again.seconds < 1.0, again
    assert delta(suppressed(world.sidecar), before) == {}, "Synapse tried again in backoff"
    assert world.new_dead_connections(dead_before) == {}


def test_transactions_to_dead_servers_in_a_shared_room_back_off(
    world: World,
    client: httpx.Client,
    record: Callable[[str, str], None],
) -> None:
    assert world.synapse is not None and world.sidecar is not None
    dead_before = world.dead_connections()
    joined = join(client, "#shared:live.test")
    assert joined.status == 200, joined
    room_id = joined.body["room_id"]
    live_sends = next(u for u in world.live_upstreams if u.port == 8448)

    names = [t.name for t in MEMBER_TOMBSTONES]
    assert not any(backoff(world, n) for n in names), world.synapse.destinations()
    before = suppressed(world.sidecar)
    sent = send_text(client, room_id, "hello, is anyone still there?")
    assert sent.status == 200, sent
    rows = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = world.synapse.destinations()
        if all((rows.get(n) or {}).get("retry_interval") for n in names):
            break
        time.sleep(0.2)
    attempts = delta(suppressed(world.sidecar), before)
    record("s3 shared room", f"first message: suppressed CONNECTs {attempts}")
    for name in names:
        record("s3 shared room", f"{name}: {rows.get(name)}")
        assert (rows.get(name) or {}).get("retry_interval") == MIN_RETRY_MS, rows.get(name)
    assert set(attempts) == {t.signal for t in MEMBER_TOMBSTONES}, attempts

    before = suppressed(world.sidecar)
    requests_before = len(live_sends.requests)
    for n in range(3):
        assert send_text(client, room_id, f"message {n}").status == 200
    time.sleep(2)
    quiet = delta(suppressed(world.sidecar), before)
    record("s3 shared room", f"3 more messages while backing off: suppressed increase {quiet}")
    assert quiet == {}, "Synapse contacted a backed-off destination"
    transactions = [
        r for r in live_sends.requests[requests_before:] if "/federation/v1/send/" in r.path
    ]
    assert transactions, "the live server in the room got no transaction"
    assert world.new_dead_connections(dead_before) == {}
