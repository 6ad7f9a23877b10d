"""SRV answers kept for discovery (DnsClient `recent=True`), against the real test DNS
server: only a caller that asks for them takes them, never past the record's TTL, and
the policy's own questions always go out."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from sidecar.dns.client import DnsClient, Nameserver
from sidecar.dns.questions import evaluate
from sidecar.metrics import Metrics
from tests.support.dns_server import DnsServer, Zone

SHORT_TTL = 1  # seconds: the kept answer must not outlive it


def test_discovery_takes_the_srv_pair_the_judgment_just_asked(
    dns_server: DnsServer, zone: Zone, unique: Callable[[str], str]
) -> None:
    name = unique("recent")
    zone.add(name, "A", "127.0.0.2")
    zone.add(f"_matrix-fed._tcp.{name}", "SRV", f"10 0 8448 {name}", ttl=SHORT_TTL)
    question = f"_matrix-fed._tcp.{name}"

    async def run() -> tuple[int, int, int, int]:
        client = DnsClient((Nameserver("127.0.0.1", dns_server.port),), 2.0, Metrics())
        try:
            await evaluate(client, name)  # the policy's questions
            judged = dns_server.query_count(question, "SRV")
            await client.query(question, "SRV", recent=True)  # discovery: taken, not asked
            taken = dns_server.query_count(question, "SRV")
            await client.query(question, "SRV")  # anyone else: asked
            asked = dns_server.query_count(question, "SRV")
            await asyncio.sleep(SHORT_TTL + 0.2)
            await client.query(question, "SRV", recent=True)  # past its TTL: asked
            return judged, taken, asked, dns_server.query_count(question, "SRV")
        finally:
            client.close()

    assert asyncio.run(run()) == (1, 1, 2, 3)
