"""Scenario 4: repeated requests to tombstoned names cost DNS queries per TTL, not per request.

The sidecar asks its own DNS server (127.0.0.1:5353); Synapse asks the world's resolver
(127.0.0.1:53) for its SRV lookups. Both serve the same zone, so each one's queries are
counted apart: the sidecar's are bounded by the verdict's TTL; Synapse's own SRV lookups
are reported for comparison (they are Synapse's, and no proxy can change them).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
import pytest

from tests.e2e.actions import delta, join, profile, suppressed
from tests.e2e.world import DEAD_410_IP, TOMBSTONES, Tombstone, World, publish
from tests.support.dns_server import DnsServer

ROUNDS = 10
QUERIES_PER_CHECK = 5  # TXT, SRV _matrix-fed._tcp, SRV _matrix._tcp, A, AAAA


def about(dns: DnsServer, name: str) -> int:
    return sum(1 for q in dns.query_log if q.name == name or q.name.endswith("." + name))


@pytest.mark.parametrize("tombstone", TOMBSTONES, ids=lambda t: t.signal)
def test_repeated_requests_do_not_repeat_dns_queries(
    tombstone: Tombstone,
    world: World,
    client: httpx.Client,
    record: Callable[[str, str], None],
) -> None:
    assert world.sidecar is not None and world.sidecar_dns and world.dns
    dead_before = world.dead_connections()
    sidecar_before = about(world.sidecar_dns, tombstone.name)
    synapse_before = about(world.dns, tombstone.name)
    counted_before = suppressed(world.sidecar)

    for _ in range(ROUNDS):
        assert profile(client, tombstone.user).status == 502
        assert join(client, tombstone.alias).status == 502

    sidecar_queries = about(world.sidecar_dns, tombstone.name) - sidecar_before
    synapse_queries = about(world.dns, tombstone.name) - synapse_before
    decisions = delta(suppressed(world.sidecar), counted_before).get(tombstone.signal, 0)
    record(
        f"s4 {tombstone.signal}",
        f"{2 * ROUNDS} client requests -> {decisions:.0f} suppressed CONNECTs, "
        f"{sidecar_queries} sidecar DNS queries, {synapse_queries} Synapse DNS queries",
    )
    # At most one evaluation (none if scenario 1 already cached the verdict, TTL 300 s).
    assert sidecar_queries <= QUERIES_PER_CHECK
    assert world.new_dead_connections(dead_before) == {}


def test_queries_follow_the_ttl_not_the_request_rate(
    world: World, client: httpx.Client, record: Callable[[str, str], None]
) -> None:
    """A tombstone with a 2 s TTL (the sidecar runs with --min-ttl 1s here), asked for 6 s."""
    assert world.sidecar is not None and world.sidecar_dns and world.dns
    dead_before = world.dead_connections()
    ttl, duration = 2, 6.0
    tombstone = Tombstone("short-ttl.test", "dns_txt_gone", DEAD_410_IP)
    publish(world.zone, tombstone, ttl=ttl)
    counted_before = suppressed(world.sidecar)
    started = time.monotonic()
    requests = 0
    while time.monotonic() - started < duration:
        assert profile(client, tombstone.user).status == 502
        requests += 1
    elapsed = time.monotonic() - started
    time.sleep(0.5)  # a background re-check may still be in flight

    queries = about(world.sidecar_dns, tombstone.name)
    synapse_queries = about(world.dns, tombstone.name)
    decisions = delta(suppressed(world.sidecar), counted_before).get("dns_txt_gone", 0)
    checks = queries / QUERIES_PER_CHECK
    record(
        "s4 ttl 2s",
        f"{requests} profile requests in {elapsed:.1f} s -> {decisions:.0f} suppressed CONNECTs, "
        f"{queries} sidecar DNS queries ({checks:.1f} checks), {synapse_queries} Synapse queries",
    )
    assert decisions >= requests  # every request was judged ...
    most = QUERIES_PER_CHECK * (2 + int(elapsed / ttl))  # first check, one per TTL, one late
    assert QUERIES_PER_CHECK * 2 <= queries <= most  # ... with DNS asked once per TTL
    assert world.new_dead_connections(dead_before) == {}
