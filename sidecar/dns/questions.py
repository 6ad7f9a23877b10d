"""The questions asked about a server name, all in flight at once.

TXT (the `v=matrix;gone` record), SRV at `_matrix-fed._tcp` and `_matrix._tcp`, and
A/AAAA, concurrently; the answers go to the judge's pure checks (judge/signals.py), which
turn them into a report. An IP literal or a `.invalid` name is not asked about at all.
"""

from __future__ import annotations

import asyncio

from sidecar.dns.client import DnsClient
from sidecar.judge import signals
from sidecar.judge.signals import SRV_PREFIXES, DnsReport, SignalCheck


async def evaluate(client: DnsClient, name: str) -> DnsReport:
    """Run every DNS signal for the normalized `name` concurrently."""
    known = signals.literal_report(name)
    if known is not None:
        return known
    txt, srv_fed, srv_legacy, a, aaaa = await asyncio.gather(
        client.query(name, "TXT"),
        client.query(f"{SRV_PREFIXES[0]}.{name}", "SRV"),
        client.query(f"{SRV_PREFIXES[1]}.{name}", "SRV"),
        client.query(name, "A"),
        client.query(name, "AAAA"),
    )
    return signals.report(
        name,
        txt=txt,
        srv_fed=srv_fed,
        srv_legacy=srv_legacy,
        a=a,
        aaaa=aaaa,
        require_dnssec=client.require_dnssec,
    )


async def resolve_addresses(client: DnsClient, name: str) -> tuple[tuple[str, ...], SignalCheck]:
    """A and AAAA only: what `name` resolves to now, for a live name whose addresses expired."""
    a, aaaa = await asyncio.gather(client.query(name, "A"), client.query(name, "AAAA"))
    return signals.addresses_of(name, a, aaaa)


class DnsQuestions:
    """The policy's view of DNS: a name's report, from one resolver (replaceable on a
    reconfiguration; in-flight questions finish on the old one)."""

    def __init__(self, client: DnsClient) -> None:
        self.client = client

    @property
    def nameservers(self) -> list[str]:
        return self.client.nameservers

    async def evaluate(self, name: str) -> DnsReport:
        return await evaluate(self.client, name)
