"""DNS answers that lie, abuse or are plain broken, through a real resolver and real UDP.

Each example serves one hand-built reply (TXT, SRV or A) from the loopback DNS server,
mutated byte-wise (flips, truncation, junk inserted or appended, forged record counts),
with TTLs at the edges (0, 2**31-1, 2**32-1). `signals.evaluate` must return a report,
within its timeout, and `Policy.judge` must never call the name gone by a TXT tombstone
the packet cannot carry.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import time
from dataclasses import dataclass
from typing import cast

import pytest
from dnslib import CNAME, QTYPE, RR, SRV, TXT, A, DNSRecord
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sidecar.app import standalone_policy
from sidecar.dns.client import DnsClient, Nameserver
from sidecar.dns.questions import evaluate
from sidecar.judge.dns_answer import MAX_ADDRESSES
from sidecar.judge.policy import UNDECIDED_RETRY_SECONDS
from sidecar.judge.signals import DnsReport, Finding, Signal
from sidecar.judge.tombstone_txt import find_tombstone, join_strings
from sidecar.judge.ttl import TtlBounds
from sidecar.judge.verdicts import State
from sidecar.metrics import Metrics
from tests.fuzz.profiles import examples
from tests.support.dns_server import DnsServer

# DnsClient lifetime per query. Most byte-mutated replies no longer parse: the resolver drops
# them and waits the whole lifetime, which sets the pace of the test (loopback answers take
# ~1 ms). Honest replies get a generous lifetime, so a busy CI machine cannot make their exact
# expectations flaky; mangled ones have no exact expectation and get a short one.
HONEST_TIMEOUT = 1.0
MANGLED_TIMEOUT = 0.15
BOUNDS = TtlBounds(300, 86400)
TTLS = st.one_of(
    st.sampled_from([0, 1, 300, 2**31 - 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1)
)
_names = itertools.count()


OTHER = "evil.example."  # an owner name that is not the one asked about
THIRD = "third.example."  # the owner in a loop: on no chain from the name asked about


@dataclass(frozen=True)
class Reply:
    """What to answer for one query, before mutation."""

    rrtype: str  # "TXT", "SRV" or "A"
    records: tuple[object, ...]  # TXT: tuples of byte strings; SRV: (prio, weight, port, target)
    ttl: int
    # Whose records they are: "self" (the name asked), "other" (a mismatched name), "cname"
    # (the name is a CNAME to OTHER, which owns them) or "loop" (the name and OTHER are
    # CNAMEs of each other; THIRD owns the records).
    owner: str = "self"

    def tombstone(self) -> bool:
        """Whether the honest packet carries a tombstone (decoded as the sidecar does)."""
        if self.rrtype != "TXT":
            return False
        texts = [join_strings(strings) for strings in self.records]  # type: ignore[arg-type]
        return find_tombstone(texts) is not None

    def build(self, request: DNSRecord) -> bytes:
        reply = request.reply()
        qname = request.q.qname
        owner = qname
        if self.owner in ("cname", "loop"):
            reply.add_answer(RR(qname, QTYPE.CNAME, rdata=CNAME(OTHER), ttl=self.ttl))
        if self.owner == "loop":
            reply.add_answer(RR(OTHER, QTYPE.CNAME, rdata=CNAME(str(qname)), ttl=self.ttl))
        if self.owner in ("other", "cname"):
            owner = OTHER
        if self.owner == "loop":
            owner = THIRD
        for record in self.records:
            if self.rrtype == "TXT":
                rdata: object = TXT(list(record))  # type: ignore[call-overload]
            elif self.rrtype == "SRV":
                prio, weight, port, target = cast(tuple[int, int, int, str], record)
                rdata = SRV(prio, weight, port, target)
            else:
                rdata = A(str(record))
            reply.add_answer(RR(owner, getattr(QTYPE, self.rrtype), rdata=rdata, ttl=self.ttl))
        return bytes(reply.pack())


@dataclass(frozen=True)
class Mutation:
    kind: str  # flip, truncate, insert, append, counts
    where: float  # position as a fraction of the packet (or of the part after the question)
    data: bytes
    anywhere: bool  # False: keep the header ID and the question intact (so it is not dropped)

    def apply(self, packet: bytes, question_end: int) -> bytes:
        start = 0 if self.anywhere else question_end
        span = max(len(packet) - start, 1)
        at = min(start + int(self.where * span), len(packet))
        if self.kind == "flip" and at < len(packet):
            return packet[:at] + bytes([packet[at] ^ (self.data[0] | 1)]) + packet[at + 1 :]
        if self.kind == "truncate":
            return packet[:at]
        if self.kind == "insert":
            return packet[:at] + self.data + packet[at:]
        if self.kind == "append":
            return packet + self.data
        if self.kind == "counts":  # QD/AN/NS/AR counts at bytes 4..11
            index = 4 + 2 * (self.data[0] % 4)
            return packet[:index] + self.data[1:3].ljust(2, b"\xff") + packet[index + 2 :]
        return packet


txt_records = st.lists(
    st.lists(
        st.one_of(
            st.binary(max_size=255),
            st.sampled_from(
                [b"v=spf1 -all", b"v=matrix;gone", b"V = Matrix ; GONE", b"v=ma", b"trix;gone"]
            ),
        ),
        min_size=1,
        max_size=3,
    ).map(tuple),
    max_size=30,
)
srv_targets = st.one_of(
    st.sampled_from([".", "x.invalid.", "fed.example.org.", "a.b.invalid."]),
    st.from_regex(r"[a-z0-9-]{1,20}(\.[a-z0-9-]{1,20}){0,3}\.", fullmatch=True),
)
srv_records = st.lists(
    st.tuples(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 65535), srv_targets),
    max_size=20,
)
a_records = st.lists(st.ip_addresses(v=4).map(str), max_size=300)

owners = st.sampled_from(["self", "self", "other", "cname", "loop"])
replies = st.one_of(
    st.builds(Reply, st.just("TXT"), txt_records.map(tuple), TTLS, owners),
    st.builds(Reply, st.just("SRV"), srv_records.map(tuple), TTLS, owners),
    st.builds(Reply, st.just("A"), a_records.map(tuple), TTLS, owners),
)
# Some examples serve the structured reply as built (weird but well-formed: what a lying
# server sends); the others mangle its bytes (what a broken one sends).
mutations = st.lists(
    st.builds(
        Mutation,
        st.sampled_from(["flip", "flip", "flip", "truncate", "insert", "append", "counts"]),
        st.floats(0, 1),
        st.binary(min_size=1, max_size=40),
        st.sampled_from([False, False, False, True]),
    ),
    max_size=5,
)


@pytest.fixture(scope="module")
def nameserver(dns_server: DnsServer) -> Nameserver:
    return Nameserver("127.0.0.1", dns_server.port)


def serve(dns_server: DnsServer, reply: Reply, changes: list[Mutation]) -> tuple[str, list[bytes]]:
    """Register the mutated reply for a fresh name; returns the name and the packets sent."""
    name = f"fz-{next(_names)}.hs.test"  # no 'm' anywhere: a TXT of this name cannot say matrix
    owner = f"_matrix-fed._tcp.{name}" if reply.rrtype == "SRV" else name
    sent: list[bytes] = []

    def handler(request: DNSRecord) -> bytes:
        packet = reply.build(request)
        question_end = 12 + sum(len(label) + 1 for label in request.q.qname.label) + 1 + 4
        for change in changes:
            packet = change.apply(packet, question_end)
        sent.append(packet)
        return packet

    zone = dns_server.zone
    # The name exists (NXDOMAIN stays out of the picture): with an address, unless the
    # address is what the mangled reply is about.
    if reply.rrtype == "A":
        zone.nodata(name)
    else:
        zone.add(name, "A", "192.0.2.1")
    zone.add_raw(owner, reply.rrtype, handler)
    return name, sent


def judge(nameserver: Nameserver, name: str, timeout: float) -> tuple[DnsReport, float]:
    async def run() -> DnsReport:
        client = DnsClient((nameserver,), timeout=timeout, metrics=Metrics())
        return await evaluate(client, name)

    started = time.monotonic()
    report = asyncio.run(run())
    return report, time.monotonic() - started


@settings(max_examples=examples(ci=35, deep=600), deadline=None)
@given(replies, mutations)
@example(Reply("TXT", ((b"v=matrix;gone",),), 0), [])
@example(Reply("TXT", ((b"v=matrix;gone",),), 60, owner="other"), [])
@example(Reply("TXT", ((b"v=matrix;gone",),), 60, owner="loop"), [])
@example(Reply("TXT", ((b"v=matrix;gone",),), 60, owner="cname"), [])
@example(Reply("SRV", ((0, 0, 0, "."),), 60, owner="other"), [])
@example(Reply("TXT", ((b"v=ma", b"trix;gone"),), 2**31 - 1), [])
@example(Reply("TXT", ((b"v=spf1 -all",),), 2**32 - 1), [])
@example(Reply("SRV", ((0, 0, 0, "."),), 60), [])
@example(Reply("A", tuple(f"192.0.2.{i}" for i in range(200)), 60), [])
@example(Reply("A", ("192.0.2.1",), 60), [Mutation("counts", 0, b"\x01\xff\xff", False)])
@example(Reply("TXT", ((b"x" * 255,) * 3,) * 30, 60), [Mutation("truncate", 0.5, b"\x00", False)])
def test_mutated_answers_never_raise_hang_or_invent_a_tombstone(
    dns_server: DnsServer, nameserver: Nameserver, reply: Reply, changes: list[Mutation]
) -> None:
    name, sent = serve(dns_server, reply, changes)
    timeout = MANGLED_TIMEOUT if changes else HONEST_TIMEOUT
    report, took = judge(nameserver, name, timeout)

    # Bounded: all five queries run at once, each within its lifetime (a TCP retry included).
    assert took < timeout + 2.0, f"evaluate took {took:.2f}s with a {timeout}s lifetime"
    assert report.name == name and len(report.checks) == 4
    assert len(report.addresses) <= 2 * MAX_ADDRESSES
    assert all(str(ipaddress.ip_address(a)) == a for a in report.addresses)

    client = DnsClient((nameserver,), timeout=timeout, metrics=Metrics())
    verdict = standalone_policy(client, Metrics(), ttl=BOUNDS, cache_size=10).judge(report)
    lifetime = verdict.expires_at - verdict.observed_at
    if verdict.state is State.UNDECIDED:
        assert lifetime == UNDECIDED_RETRY_SECONDS
    else:
        assert BOUNDS.minimum <= lifetime <= BOUNDS.maximum, lifetime

    txt = next(c for c in report.checks if c.signal is Signal.DNS_TXT_GONE)
    could_say_matrix = any(b"m" in packet.lower() for packet in sent)  # what went on the wire
    if reply.rrtype != "TXT" or not could_say_matrix:
        assert txt.finding is not Finding.GONE, txt
        assert verdict.signal != Signal.DNS_TXT_GONE, verdict

    if not changes and reply.owner in ("other", "loop"):  # records of a name not asked about
        assert report.gone is None, report
        if reply.rrtype == "A":
            assert not report.addresses, report
    if not changes and reply.owner == "self":  # the harness itself must see what it serves
        if reply.rrtype == "TXT":
            expected = Finding.GONE if reply.tombstone() else Finding.CLEAR
            assert txt.finding is expected, (reply, txt)
        if reply.rrtype == "SRV" and reply.records:
            srv_dot = next(c for c in report.checks if c.signal is Signal.DNS_SRV_DOT)
            all_dot = all(r[3] == "." for r in reply.records)  # type: ignore[index]
            assert (srv_dot.finding is Finding.GONE) == all_dot, (reply, srv_dot)
        if reply.rrtype == "A" and reply.records:
            assert report.addresses and set(report.addresses) <= set(reply.records)
