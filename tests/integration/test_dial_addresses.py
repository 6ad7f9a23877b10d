"""Live servers are dialled where DNS says they are now, as Synapse alone would dial them.

A verdict (gone or alive) lives long; the addresses of a live name live exactly their own
A/AAAA TTL (sidecar/address_book.py). A server that renumbers is followed as soon as its
old record expires: in one process, across a restart with a state dir, and across two
sidecars sharing Redis. When the resolver fails, the last addresses are served for at
most --dns-max-stale, then the name fails like it would for Synapse alone.

Address plan: 127.0.0.2 is where the live server was, 127.0.0.4 where it moved (same port).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests.integration.conftest import LIVE_IP
from tests.support.dns_server import DnsServer, Zone
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer
from tests.support.sidecar_process import Sidecar
from tests.support.tls_upstream import TestCA, Upstream

MOVED_IP = "127.0.0.4"


@pytest.fixture(scope="module")
def moved_upstream(ca: TestCA, live_upstream: Upstream) -> Iterator[Upstream]:
    upstream = Upstream(ca, ["*.hs.test"], host=MOVED_IP, port=live_upstream.port).start()
    yield upstream
    upstream.stop()


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def publish_live(zone: Zone, name: str, address: str, a_ttl: int = 1) -> None:
    """A live server whose tombstone evidence lasts an hour and whose A record `a_ttl`."""
    zone.add(name, "A", address, ttl=a_ttl)
    zone.add(name, "TXT", "v=matrix;alive", ttl=3600)
    zone.nodata(f"_matrix-fed._tcp.{name}", soa_minimum=3600)
    zone.nodata(f"_matrix._tcp.{name}", soa_minimum=3600)


def move(zone: Zone, name: str, address: str, a_ttl: int = 1) -> None:
    zone.remove(name, "A")
    zone.add(name, "A", address, ttl=a_ttl)


def get(sidecar: Sidecar, name: str, port: int, ca: TestCA) -> int:
    status, _, _ = sidecar.https_get(f"{name}:{port}", name, ca.client_context(), "/moved")
    return status


def hits(upstream: Upstream) -> int:
    return sum(1 for r in upstream.requests if r.path == "/moved")


def test_a_renumbered_server_is_followed_once_its_a_record_expires(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    moved_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory()
    name = unique("renumbered")
    publish_live(zone, name, LIVE_IP)
    before_old, before_new = hits(live_upstream), hits(moved_upstream)
    assert get(sidecar, name, live_upstream.port, ca) == 200
    assert (hits(live_upstream), hits(moved_upstream)) == (before_old + 1, before_new)

    move(zone, name, MOVED_IP)
    time.sleep(2)  # the old A record (TTL 1 s) has expired; the verdict (1 h) has not
    for _ in range(2):
        assert get(sidecar, name, live_upstream.port, ca) == 200
    assert (hits(live_upstream), hits(moved_upstream)) == (before_old + 1, before_new + 2)
    # Only the addresses were asked again, not the whole signal set.
    assert sidecar.metric("tombstone_address_refreshes_total", outcome="fresh") >= 1
    assert sidecar.metric("tombstone_verdict_changes_total", **{"from": "none", "to": "alive"}) >= 1


def test_a_restart_never_dials_addresses_from_the_state_file(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    moved_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory()  # its own --state-dir, kept across the restart
    name = unique("restarted")
    publish_live(zone, name, LIVE_IP)
    assert get(sidecar, name, live_upstream.port, ca) == 200
    before_old, before_new = hits(live_upstream), hits(moved_upstream)

    sidecar.stop()  # the alive verdict is in the state file
    move(zone, name, MOVED_IP)
    time.sleep(2)
    sidecar.restart()
    assert get(sidecar, name, live_upstream.port, ca) == 200
    assert (hits(live_upstream), hits(moved_upstream)) == (before_old, before_new + 1)


def test_a_verdict_shared_through_redis_brings_no_addresses(
    sidecar_factory: Callable[..., Sidecar],
    redis: RedisServer,
    dns_server: DnsServer,
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    moved_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    one = sidecar_factory("--store", redis.url)
    two = sidecar_factory("--store", redis.url)
    name = unique("shared")
    publish_live(zone, name, LIVE_IP)
    assert get(one, name, live_upstream.port, ca) == 200
    assert wait_until(lambda: name.encode() in redis.command("KEYS", "*" + name), timeout=10)
    before_old, before_new = hits(live_upstream), hits(moved_upstream)

    move(zone, name, MOVED_IP)
    time.sleep(2)
    assert get(two, name, live_upstream.port, ca) == 200  # the verdict from Redis, A from DNS
    assert get(one, name, live_upstream.port, ca) == 200  # its own A record expired
    assert (hits(live_upstream), hits(moved_upstream)) == (before_old, before_new + 2)
    assert dns_server.query_count(name, "TXT") == 1  # two judged nothing: Redis's verdict


def test_a_resolver_outage_serves_the_last_addresses_within_the_bound_then_fails(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory("--dns-max-stale", "3s")
    name = unique("outage")
    publish_live(zone, name, LIVE_IP)
    assert get(sidecar, name, live_upstream.port, ca) == 200
    resolved_at = time.monotonic()
    before = hits(live_upstream)

    zone.servfail(name)  # the resolver fails for this name (every type)
    time.sleep(1.5)  # the A record (TTL 1 s) expired; within the 3 s stale bound
    assert get(sidecar, name, live_upstream.port, ca) == 200
    assert hits(live_upstream) == before + 1
    assert sidecar.metric("tombstone_address_refreshes_total", outcome="stale") == 1
    assert sidecar.metric("tombstone_stale_addresses_total") >= 1

    time.sleep(max(0.0, resolved_at + 1 + 3 + 0.5 - time.monotonic()))  # past TTL + bound
    reply = sidecar.connect(f"{name}:{live_upstream.port}")
    assert reply.status == 502, reply
    assert "DNS did not answer" in str(reply.json()["error"])
    assert hits(live_upstream) == before + 1  # nothing dialled from an address too old
    assert sidecar.metric("tombstone_address_refreshes_total", outcome="failed") >= 1


def test_a_busy_name_asks_a_and_aaaa_by_their_ttl_and_the_signal_set_by_the_verdicts(
    sidecar_factory: Callable[..., Sidecar],
    dns_server: DnsServer,
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """The closing-note figure, scaled down: A TTL 1 s, TXT and SRV 3600 s, a connection
    every ~0.3 s for ~4 s. TXT and SRV are asked once (the verdict lasts), A/AAAA again
    after each expiry, never per connection."""
    sidecar = sidecar_factory("--min-ttl", "1s")
    name = unique("busy")
    publish_live(zone, name, LIVE_IP)
    connections = 0
    started = time.monotonic()
    while time.monotonic() - started < 4.0:
        assert get(sidecar, name, live_upstream.port, ca) == 200
        connections += 1
        time.sleep(0.3)
    assert dns_server.query_count(name, "TXT") == 1
    assert dns_server.query_count(f"_matrix-fed._tcp.{name}", "SRV") == 1
    a_queries = dns_server.query_count(name, "A")
    assert 3 <= a_queries <= 6, a_queries  # once per expired second, not per connection
    assert a_queries < connections
    assert dns_server.query_count(name, "AAAA") == a_queries


def test_a_name_that_vanishes_at_an_address_refresh_is_judged_again_at_once(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """The alive verdict lasts an hour, but the A/AAAA refresh sees the name gone
    (NXDOMAIN): that connection fails like Synapse's would, and the verdict is judged again
    at once rather than in an hour, so the next one is refused as `nxdomain`."""
    sidecar = sidecar_factory()
    name = unique("vanishing")
    publish_live(zone, name, LIVE_IP)
    assert get(sidecar, name, live_upstream.port, ca) == 200
    before = live_upstream.connections

    zone.remove(name)
    zone.nxdomain(name, soa_minimum=600)
    time.sleep(2)  # the A record (TTL 1 s) has expired
    first = sidecar.connect(f"{name}:{live_upstream.port}")
    assert first.status == 502 and "has no A or AAAA records" in str(first.json()["error"])
    assert wait_until(
        lambda: (
            sidecar.connect(f"{name}:{live_upstream.port}").headers.get("x-tombstone-signal")
            == "nxdomain"
        ),
        timeout=10,
    )
    assert live_upstream.connections == before
