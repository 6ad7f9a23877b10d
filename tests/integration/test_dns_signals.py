"""DNS signals and the policy in-process, against the real DNS server on loopback.

In-process is clearer here: each test shapes the DNS answers (oversized, malformed, lying,
slow) and reads the resulting report or verdict directly. The resolver, sockets and
packets are all real.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from dnslib import QTYPE, RR, TXT, DNSRecord

from sidecar.app import standalone_policy
from sidecar.dns.client import MAX_TRIES_IN_FLIGHT, DnsClient, Nameserver
from sidecar.dns.questions import evaluate
from sidecar.judge.policy import Policy
from sidecar.judge.signals import SRV_PREFIXES, Finding, Signal
from sidecar.judge.ttl import TtlBounds
from sidecar.judge.verdicts import State
from sidecar.metrics import Metrics
from tests.support.dns_server import DnsServer, Zone

RECHECK_WAIT = 30.0  # seconds a background re-check may take here: only "it did not hang"
POLL = 0.01


@pytest.fixture
def client(dns_server: DnsServer) -> DnsClient:
    return DnsClient((Nameserver("127.0.0.1", dns_server.port),), timeout=1.0, metrics=Metrics())


def policy_for(client: DnsClient) -> Policy:
    return standalone_policy(client, Metrics(), ttl=TtlBounds(300, 86400), cache_size=1000)


def test_tombstone_among_an_oversized_txt_set_is_found_over_tcp(
    client: DnsClient,
    dns_server: DnsServer,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = unique("bigtxt")
    for i in range(40):
        zone.add(name, "TXT", f"site-verification-{i}=" + "x" * 180)
    zone.add(name, "TXT", "v=matrix;gone")
    zone.add(name, "A", "192.0.2.1")
    report = asyncio.run(evaluate(client, name))
    assert report.gone is not None and report.gone.signal is Signal.DNS_TXT_GONE
    assert dns_server.query_count(name, "TXT", transport="tcp") == 1  # truncated UDP, then TCP


def test_malformed_txt_answer_is_not_evidence(
    client: DnsClient,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = unique("garbage")
    zone.add(name, "A", "192.0.2.1")
    zone.add_raw(
        name,
        "TXT",
        lambda request: bytes(request.header.id.to_bytes(2, "big")) + b"\x81\x80garbage",
    )
    report = asyncio.run(evaluate(client, name))
    txt = next(c for c in report.checks if c.signal is Signal.DNS_TXT_GONE)
    assert txt.finding is Finding.UNKNOWN
    assert report.gone is None
    verdict = policy_for(client).judge(report)
    assert verdict.state is State.UNDECIDED  # fail open: no evidence either way


def test_answer_for_another_name_is_ignored(
    client: DnsClient,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    """A reply whose question is not ours (a spoofing attempt) is dropped: timeout, not gone."""
    name = unique("liar")
    zone.add(name, "A", "192.0.2.1")

    def lie(request: DNSRecord) -> bytes:
        forged = DNSRecord.question("other.example", "TXT")
        forged.header.id = request.header.id
        reply = forged.reply()
        reply.add_answer(RR("other.example", QTYPE.TXT, rdata=TXT("v=matrix;gone"), ttl=60))
        return bytes(reply.pack())

    zone.add_raw(name, "TXT", lie)
    report = asyncio.run(evaluate(client, name))
    assert report.gone is None
    assert policy_for(client).judge(report).state is State.UNDECIDED


def test_invalid_utf8_and_non_matrix_txt_records_are_clear(
    client: DnsClient,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = unique("bytes")
    zone.add(name, "A", "192.0.2.1")
    zone.add_raw(
        name, "TXT", lambda request: _txt_reply(request, [b"\xff\xfe v=matrix", b"v=spf1 -all"])
    )
    report = asyncio.run(evaluate(client, name))
    txt = next(c for c in report.checks if c.signal is Signal.DNS_TXT_GONE)
    assert txt.finding is Finding.CLEAR
    assert policy_for(client).judge(report).state is State.ALIVE


def _txt_reply(request: DNSRecord, records: list[bytes]) -> bytes:
    reply = request.reply()
    for text in records:
        reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT([text]), ttl=60))
    return bytes(reply.pack())


def test_cname_loop_is_not_evidence(
    client: DnsClient,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = unique("loop")
    zone.add(name, "CNAME", f"b.{name}")
    zone.add(f"b.{name}", "CNAME", name)
    report = asyncio.run(evaluate(client, name))
    assert report.gone is None
    verdict = policy_for(client).judge(report)
    assert verdict.state is State.UNDECIDED
    assert "CNAME chain is too long" in verdict.evidence


def test_nxdomain_ttl_is_the_smaller_of_soa_ttl_and_minimum_then_clamped(
    client: DnsClient,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    short, long = unique("nx-short"), unique("nx-long")
    zone.nxdomain(short, soa_minimum=3600, soa_ttl=60)
    zone.nxdomain(long, soa_minimum=10**6, soa_ttl=10**6)
    policy = policy_for(client)
    verdict = policy.judge(asyncio.run(evaluate(client, short)))
    assert (verdict.state, verdict.signal, verdict.ttl) == (State.GONE, "nxdomain", 300)
    verdict = policy.judge(asyncio.run(evaluate(client, long)))
    assert verdict.ttl == 86400


def test_srv_with_a_dot_among_real_targets_is_not_gone(
    client: DnsClient,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = unique("mixed-srv")
    zone.add(name, "A", "192.0.2.1")
    zone.add(f"_matrix-fed._tcp.{name}", "SRV", ["0 0 0 .", "10 0 8448 fed.example.org"])
    report = asyncio.run(evaluate(client, name))
    assert report.gone is None
    assert policy_for(client).judge(report).state is State.ALIVE


def test_fed_srv_wins_over_legacy_srv(
    client: DnsClient,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    """Synapse uses `_matrix._tcp` only when `_matrix-fed._tcp` has nothing."""
    name = unique("both-srv")
    zone.add(name, "A", "192.0.2.1")
    zone.add(f"_matrix-fed._tcp.{name}", "SRV", "10 0 8448 fed.example.org")
    zone.add(f"_matrix._tcp.{name}", "SRV", "0 0 0 .")
    assert asyncio.run(evaluate(client, name)).gone is None


def test_concurrent_decisions_share_one_lookup(
    client: DnsClient,
    dns_server: DnsServer,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = unique("flight")
    zone.add(name, "A", "192.0.2.1")
    zone.delay(0.1)
    policy = policy_for(client)

    async def many() -> list[State]:
        entries = await asyncio.gather(*(policy.decide(name) for _ in range(200)))
        return [e.verdict.state for e in entries]

    try:
        states = asyncio.run(many())
    finally:
        zone.delay(0)
    assert states == [State.ALIVE] * 200
    assert dns_server.query_count(name) == 3  # TXT, A, AAAA
    assert dns_server.query_count(f"_matrix-fed._tcp.{name}") == 1
    assert dns_server.query_count(f"_matrix._tcp.{name}") == 1


def test_failed_recheck_keeps_the_last_verdict(
    client: DnsClient,
    zone: Zone,
    unique: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A gone verdict past its TTL stays while DNS fails, rather than failing open at once.

    Read once the re-check has failed (its fail-open warning is logged as the result is
    stored), not a fixed 0.3 s later: on a loaded machine the re-check could still be
    under way then, and the test would have shown nothing."""
    now = [1000.0]
    name = unique("keep")
    zone.add(name, "TXT", "v=matrix;gone")
    policy = standalone_policy(
        client, Metrics(), ttl=TtlBounds(60, 60), cache_size=10, clock=lambda: now[0]
    )
    failed = f"DNS could not answer for {name} "

    async def scenario() -> tuple[State, State]:
        first = (await policy.decide(name)).verdict.state
        zone.servfail(name)
        now[0] += 61  # expired: the next decision starts a background re-check
        policy.cached(name)
        for _ in range(int(RECHECK_WAIT / POLL)):
            if any(r.getMessage().startswith(failed) for r in caplog.records):
                break
            await asyncio.sleep(POLL)
        assert any(r.getMessage().startswith(failed) for r in caplog.records), caplog.text
        entry = policy.cached(name)
        assert entry is not None
        return first, entry.verdict.state

    assert asyncio.run(scenario()) == (State.GONE, State.GONE)


@pytest.mark.parametrize(("ttl", "expected"), [(0, 300), (2**31 - 1, 86400)])
def test_extreme_ttls_are_clamped(
    client: DnsClient, zone: Zone, unique: Callable[[str], str], ttl: int, expected: int
) -> None:
    name = unique(f"ttl{ttl}")
    zone.add(name, "TXT", "v=matrix;gone", ttl=ttl)
    verdict = policy_for(client).judge(asyncio.run(evaluate(client, name)))
    assert (verdict.state, verdict.ttl) == (State.GONE, expected)


def test_a_flood_of_new_names_is_judged_with_one_query_set_each(
    dns_server: DnsServer,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    """600 new names at once (3000 questions, at most 256 in flight): every one judged,
    with one question set each.

    Counted where the questions are asked (the client's query count) and where they
    arrive (the DNS server). The server in this process answers 256 waiting questions at
    the pace the machine allows: on a loaded one an answer can take longer than a try
    (PER_TRY_TIMEOUT, 2 s), and the client then sends that question again, as it should
    (139 queries more than questions, 2 of 2 runs with 6 CPU hogs on 2 cores). Only
    such slow questions may be sent more than once.
    """
    names = [unique("flood") for _ in range(600)]
    for name in names:
        zone.add(name, "A", "192.0.2.1")
    metrics = Metrics()
    client = DnsClient((Nameserver("127.0.0.1", dns_server.port),), timeout=10.0, metrics=metrics)
    policy = policy_for(client)

    async def flood() -> list[State]:
        entries = await asyncio.gather(*(policy.decide(n) for n in names))
        return [e.verdict.state for e in entries]

    assert asyncio.run(flood()) == [State.ALIVE] * 600
    questions = 600 * 5  # TXT, two SRV, A, AAAA
    asked = sum(
        sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "tombstone_dns_queries_total"
    )
    assert asked == questions  # one question set per name, no second decision
    asked_about = {*names, *(f"{p}.{n}" for n in names for p in SRV_PREFIXES)}
    received = [q for q in dns_server.queries if q[0] in asked_about]
    assert len(set(received)) == questions  # every question reached the server
    # Sent again only after a try's worth of waiting (so never while every answer comes
    # within 1 s, as on an idle machine), and then at most MAX_TRIES_IN_FLIGHT tries in all.
    seconds = "tombstone_dns_query_seconds"
    answered = metrics.registry.get_sample_value(f"{seconds}_count")
    fast = metrics.registry.get_sample_value(f"{seconds}_bucket", {"le": "1.0"})
    assert answered == questions and fast is not None
    slow = answered - fast
    assert len(received) - questions <= slow * (MAX_TRIES_IN_FLIGHT - 1), (
        len(received),
        slow,
    )
