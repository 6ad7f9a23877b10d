"""The shared-socket DNS transport against a real UDP peer that behaves badly on purpose.

The peer is a resolver we script (a fake *remote*, not a fake sidecar part): it records
the source port of every query and can send stray and forged replies before the true one.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from dnslib import QTYPE, RCODE, RR, TXT, A, DNSRecord

from sidecar.dns.client import DnsClient, Nameserver
from sidecar.dns.transport import UdpTransport, question_wire
from sidecar.metrics import Metrics
from tests.support.dns_server import DnsServer, set_receive_buffer

Script = Callable[[DNSRecord], list[bytes]]

# Receive buffer of the scripted resolver: a whole burst waits in it before the resolver's
# thread reads the first query. The kernel's default (~208 KB) held 256 small datagrams
# here and fewer where a datagram costs more buffer; a 300-query burst lost some and they
# timed out at the asker on a loaded CI machine. 4 MiB holds thousands.
RESOLVER_BUFFER_BYTES = 4 * 1024 * 1024
BURST = 300  # queries sent at once, more than the kernel's default buffer holds
BURST_PER_SOCKET = 25  # then a socket is replaced: a burst moves through many source ports
ARRIVAL_DEADLINE = 30.0  # seconds for queries to reach a local server: only "it did not hang"
POLL = 0.01


class ScriptedResolver:
    """A UDP resolver on loopback whose replies to each query come from a script."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.ports: Counter[int] = Counter()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        set_receive_buffer(self.sock, RESOLVER_BUFFER_BYTES)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            self.ports[peer[1]] += 1
            for packet in self.script(DNSRecord.parse(data)):
                try:
                    self.sock.sendto(packet, peer)
                except OSError:  # closed by the test meanwhile
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def resolver_for() -> Iterator[Callable[[Script], ScriptedResolver]]:
    made: list[ScriptedResolver] = []

    def make(script: Script) -> ScriptedResolver:
        made.append(ScriptedResolver(script))
        return made[-1]

    yield make
    for resolver in made:
        resolver.close()


def nxdomain(request: DNSRecord) -> list[bytes]:
    reply = request.reply()
    reply.header.rcode = RCODE.NXDOMAIN
    return [bytes(reply.pack())]


def wire_name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\x00"


def test_a_burst_of_queries_shares_a_few_sockets_and_moves_their_ports(
    resolver_for: Callable[[Script], ScriptedResolver],
) -> None:
    resolver = resolver_for(nxdomain)  # its buffer holds the whole burst (RESOLVER_BUFFER_BYTES)
    transport = UdpTransport(sockets=4, queries_per_socket=BURST_PER_SOCKET)
    questions = [question_wire(wire_name(f"n{i}.burst.test"), QTYPE.TXT) for i in range(BURST)]

    async def burst() -> list[bytes]:
        try:
            return await asyncio.gather(
                *(transport.exchange("127.0.0.1", resolver.port, q, False, 5.0) for q in questions)
            )
        finally:
            transport.close()

    replies = asyncio.run(burst())

    assert len(replies) == BURST
    for question, reply in zip(questions, replies, strict=True):
        parsed = DNSRecord.parse(reply)
        assert parsed.header.rcode == RCODE.NXDOMAIN
        assert reply[12 : 12 + len(question)] == question  # each got the reply to its own question
    # at most BURST_PER_SOCKET queries from one source port: at least BURST / that ports
    assert len(resolver.ports) >= BURST // BURST_PER_SOCKET, resolver.ports
    assert max(resolver.ports.values()) <= BURST_PER_SOCKET, resolver.ports


def test_stray_and_forged_replies_are_ignored_until_the_true_one_arrives(
    resolver_for: Callable[[Script], ScriptedResolver],
) -> None:
    def hostile(request: DNSRecord) -> list[bytes]:
        true = request.reply()
        true.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT("the true answer"), ttl=60))
        other_question = DNSRecord.question("forged.test", "TXT")
        forged = other_question.reply()
        forged.header.id = request.header.id  # right ID, wrong question
        forged.add_answer(RR("forged.test", QTYPE.TXT, rdata=TXT("v=matrix;gone"), ttl=60))
        wrong_id = request.reply()
        wrong_id.header.id = (request.header.id + 1) % 65536  # right question, wrong ID
        wrong_id.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT("v=matrix;gone"), ttl=60))
        not_a_reply = bytearray(wrong_id.pack())
        not_a_reply[0:2] = request.header.id.to_bytes(2, "big")
        not_a_reply[2] &= 0x7F  # QR clear: a query, not an answer
        return [
            bytes(forged.pack()),
            bytes(wrong_id.pack()),
            bytes(not_a_reply),
            b"\x00" * 5,
            bytes(true.pack()),
        ]

    resolver = resolver_for(hostile)
    client = DnsClient((Nameserver("127.0.0.1", resolver.port),), timeout=2.0, metrics=Metrics())

    async def ask() -> list[str]:
        try:
            answer = await client.query("victim.test.", "TXT")
        finally:
            client.close()
        assert answer.outcome == "ok", answer
        return [b"".join(r.strings).decode() for r in answer.records]  # type: ignore[attr-defined]

    assert asyncio.run(ask()) == ["the true answer"]


def test_a_closed_resolver_port_is_a_failure_not_a_wait(
    resolver_for: Callable[[Script], ScriptedResolver],
) -> None:
    resolver = resolver_for(nxdomain)
    resolver.close()  # nothing listens there now: the kernel answers ICMP port unreachable
    client = DnsClient((Nameserver("127.0.0.1", resolver.port),), timeout=30.0, metrics=Metrics())

    async def ask() -> tuple[str, str]:
        try:
            answer = await client.query("anything.test.", "A")
        finally:
            client.close()
        return answer.outcome, answer.detail

    outcome, detail = asyncio.run(ask())
    assert outcome == "servfail"  # not "timeout": the 30 s lifetime was not waited out
    assert "refused" in detail.lower(), detail


def test_a_second_nameserver_answers_when_the_first_refuses(
    resolver_for: Callable[[Script], ScriptedResolver],
) -> None:
    def refuse(request: DNSRecord) -> list[bytes]:
        reply = request.reply()
        reply.header.rcode = RCODE.REFUSED
        return [bytes(reply.pack())]

    def answer(request: DNSRecord) -> list[bytes]:
        reply = request.reply()
        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A("192.0.2.7"), ttl=60))
        return [bytes(reply.pack())]

    first, second = resolver_for(refuse), resolver_for(answer)
    client = DnsClient(
        (Nameserver("127.0.0.1", first.port), Nameserver("127.0.0.1", second.port)),
        timeout=2.0,
        metrics=Metrics(),
    )

    async def ask() -> list[str]:
        try:
            result = await client.query("two.test.", "A")
        finally:
            client.close()
        assert result.outcome == "ok", result
        return [str(r) for r in result.records]

    assert asyncio.run(ask()) == ["192.0.2.7"]
    assert sum(first.ports.values()) == 1 and sum(second.ports.values()) == 1


def test_a_resolver_that_refuses_is_reported_as_refused_not_servfail(
    resolver_for: Callable[[Script], ScriptedResolver],
) -> None:
    """A resolver that will not recurse for us answers REFUSED: the outcome (and the
    `tombstone_dns_queries_total{result}` label) says so, with the nameserver named."""

    def refuse(request: DNSRecord) -> list[bytes]:
        reply = request.reply()
        reply.header.rcode = RCODE.REFUSED
        return [bytes(reply.pack())]

    resolver = resolver_for(refuse)
    metrics = Metrics()
    client = DnsClient((Nameserver("127.0.0.1", resolver.port),), timeout=2.0, metrics=metrics)

    async def ask() -> tuple[str, str]:
        try:
            answer = await client.query("refused.test.", "TXT")
        finally:
            client.close()
        return answer.outcome, answer.detail

    outcome, detail = asyncio.run(ask())
    assert outcome == "refused", detail
    assert f"127.0.0.1:{resolver.port} answered REFUSED" in detail
    labels = {"rrtype": "TXT", "result": "refused"}
    assert metrics.registry.get_sample_value("tombstone_dns_queries_total", labels) == 1


def test_replies_waiting_together_are_all_read_in_one_event_loop_turn() -> None:
    """A join storm keeps hundreds of queries in flight while the event loop is busy with
    thousands of connections: replies pile up in the sockets' buffers between two turns of
    the loop. All of them must be taken at the next turn. Read one per socket per turn (as
    asyncio's datagram transport does), 256 replies on 4 sockets took 64 turns; at 10,000
    new names (tests/bench/storm.py) a turn lasted ~40 ms, replies waited over the 2 s
    per-try timeout and 59 names had their questions asked twice.

    Counted in loop turns, never timed: every query is sent, the DNS server holds its
    replies until it has received every query (a fixed 0.2 s delay once let the first
    replies out before the last queries arrived on a loaded machine), the loop is then held
    until the server has sent every reply, and a callback that re-arms itself counts the
    turns until every reply is in.
    """
    count = 256
    with DnsServer(timed_delay=True, udp_buffer_bytes=RESOLVER_BUFFER_BYTES) as dns:
        dns.hold_replies()
        transport = UdpTransport()
        questions = [question_wire(wire_name(f"n{i}.turns.test"), QTYPE.A) for i in range(count)]

        async def storm() -> int:
            loop = asyncio.get_running_loop()
            tasks = [
                asyncio.ensure_future(transport.exchange("127.0.0.1", dns.port, q, False, 10.0))
                for q in questions
            ]
            for _ in range(int(ARRIVAL_DEADLINE / POLL)):  # every query sent and received
                if dns.query_count() >= count:
                    break
                await asyncio.sleep(POLL)
            assert dns.query_count() == count, "the DNS server did not receive every query"
            dns.release_replies()
            while dns.in_flight:  # hold the loop: the replies wait in the socket buffers
                threading.Event().wait(0.01)
            turns = 0

            def tick() -> None:
                nonlocal turns
                turns += 1
                loop.call_soon(tick)

            loop.call_soon(tick)
            replies = await asyncio.gather(*tasks)
            assert all(DNSRecord.parse(r).header.rcode == RCODE.NXDOMAIN for r in replies)
            return turns

        try:
            turns = asyncio.run(storm())
        finally:
            transport.close()
    assert dns.peak_in_flight == count
    # Read at once, the replies wake their queries one turn later: a few turns in all.
    assert turns <= 4, f"{count} waiting replies took {turns} event-loop turns to read"
