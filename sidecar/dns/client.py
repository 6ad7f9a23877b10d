"""One DNS query, classified: the only place the sidecar talks to a resolver.

Each query ends in one `DnsAnswer` whose `outcome` says what DNS *proved*: records exist
(`ok`), the name exists without this type (`nodata`), the name does not exist
(`nxdomain`), or nothing could be learned (`timeout`, `servfail`, `refused` — every resolver
answered REFUSED, usually one that does not recurse for us —, `error`). Only the first
three are evidence; the rest fail open upstream of here.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
from cachetools import TTLCache

from sidecar.dns.transport import UdpTransport, is_truncated, query_wire, question_wire
from sidecar.judge.dns_answer import DnsAnswer
from sidecar.metrics import Metrics

MAX_CONCURRENT_QUERIES = 256  # a storm of new names waits its turn instead of flooding
DEFAULT_NEGATIVE_TTL = 300  # RFC 2308 fallback when a negative answer carries no SOA
PER_TRY_TIMEOUT = 2.0  # one lost UDP packet costs this much, not the whole lifetime
REFUSED = "answered REFUSED"  # how _classify words a REFUSED reply
MAX_TRIES_IN_FLIGHT = 4  # tries of one query still listening (5 s / 2 s per try needs 3)


@dataclass(frozen=True, slots=True)
class Nameserver:
    """A resolver address from `--nameserver IP[:PORT]`."""

    address: str
    port: int = 53

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


class BothEnds:
    """At most `slots` holders at once; freed slots go in turn to the newest waiter and
    to the oldest.

    In a join storm thousands of new names wait for DNS at once (10,000 names: 40,000
    questions, MAX_CONCURRENT_QUERIES in flight). First come, first served, a server first
    met meanwhile waited for the whole backlog (its first question 800th of 800 in
    tests/integration/test_join_storm.py; 3.4 s at p50 at 10,000 names, 1,000 CONNECTs
    open). Newest first alone, the oldest waited for the whole storm (p99 33 s against
    FIFO's 11 s): long enough for Synapse to give up on the connection and back off a
    live server. Taking turns, a new name is asked about within a few freed slots, and
    the oldest waits at most about twice what first come, first served makes it wait.
    """

    def __init__(self, slots: int) -> None:
        self._free = slots
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._newest_next = True

    async def acquire(self) -> None:
        if self._free > 0:  # never with waiters: a freed slot goes to a waiter first
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # given a slot as it was cancelled: pass it on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self._waiters:
            newest, self._newest_next = self._newest_next, not self._newest_next
            waiter = self._waiters.pop() if newest else self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()


class UnreadableReply(Exception):
    """A reply that is not a DNS message we can read."""


# The answers a probe's discovery may take from the policy's questions a moment earlier
# instead of asking again (remote/discovery.py: the SRV pair of a name just judged), and
# for how long at most (never longer than the record's own TTL). Nothing else reads them.
RECENT_TYPES = frozenset({"SRV"})
# A probe may start long after its name's judgment: behind a join storm, 8 slots shared
# with blackholed servers that hold one for two 10 s timeouts (N = 1,000: minutes; with
# 30 s here, 5,905 queries instead of 5,005). Never longer than the record's TTL.
RECENT_SECONDS = 3600.0
MAX_RECENT = 20_000  # bounded: two SRV answers for each of a 10,000-name storm


class DnsClient:
    """Asks the configured resolvers (or the system's), never caching: the verdict cache does
    (the one exception: `query(..., recent=True)`, below).

    Like a stub resolver: each query goes to the nameservers in turn, a new try every
    `PER_TRY_TIMEOUT` while earlier tries keep listening, the whole query bounded by
    `timeout`; a nameserver that answers garbage or SERVFAIL/REFUSED is dropped for that
    query; a truncated reply is asked again over TCP.
    """

    def __init__(
        self,
        nameservers: tuple[Nameserver, ...],
        timeout: float,
        metrics: Metrics,
        require_dnssec: bool = False,
    ) -> None:
        if not nameservers:
            nameservers = system_nameservers()
        self._nameservers = nameservers
        self._transport = UdpTransport()
        self.require_dnssec = require_dnssec
        self._slots = BothEnds(MAX_CONCURRENT_QUERIES)
        self._metrics = metrics
        self.timeout = timeout
        self._recent: TTLCache[tuple[str, str], tuple[float, DnsAnswer]] = TTLCache(
            MAX_RECENT, RECENT_SECONDS
        )
        self.last_answer: float | None = None  # time.monotonic() of the last usable answer
        self.failures_in_a_row = 0  # queries with no usable answer since then

    @property
    def nameservers(self) -> list[str]:
        return [str(ns) for ns in self._nameservers]

    def health(self) -> dict[str, object]:
        """For `/readyz`: whether the resolvers answer (`unused` before the first query)."""
        failing = self.failures_in_a_row > 0
        age = None if self.last_answer is None else time.monotonic() - self.last_answer
        return {
            "state": "failing" if failing else "unused" if age is None else "answering",
            "failures_in_a_row": self.failures_in_a_row,
            "last_answer_seconds_ago": None if age is None else round(age, 1),
        }

    def close(self) -> None:
        """Close the sockets as soon as the queries in flight on them are done."""
        self._transport.close()

    async def query(self, name: str, rrtype: str, recent: bool = False) -> DnsAnswer:
        """Send one query for the absolute `name` and classify the outcome. `recent`: an
        answer (evidence, within its TTL) to the same question asked in the last
        RECENT_SECONDS will do (the probe's SRV pair right after the policy asked it: two
        questions fewer per probed name). Every answer of RECENT_TYPES is kept for that."""
        key = (name, rrtype)
        now = time.monotonic()
        if recent:
            kept = self._recent.get(key)
            if kept is not None and kept[0] > now:
                return kept[1]
        async with self._slots:
            with self._metrics.dns_query_seconds.time():  # not the wait for a slot
                answer = await self._query(name, rrtype)
        self._metrics.dns_queries.labels(rrtype, answer.outcome).inc()
        if answer.is_evidence:
            self.last_answer, self.failures_in_a_row = time.monotonic(), 0
        else:
            self.failures_in_a_row += 1
        if rrtype in RECENT_TYPES and answer.is_evidence and answer.ttl:
            self._recent[key] = (now + min(answer.ttl, RECENT_SECONDS), answer)
        return answer

    async def _query(self, name: str, rrtype: str) -> DnsAnswer:
        try:
            qname = dns.name.from_text(name)
            question = question_wire(qname.to_digestable(), dns.rdatatype.from_text(rrtype))
        except dns.exception.DNSException as e:
            return DnsAnswer(name, rrtype, "error", detail=f"cannot form a query name: {e}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        usable = list(self._nameservers)
        failures: list[str] = []
        # Every try keeps listening until the query's deadline: a resolver that always
        # answers in 2-5 s still gives a verdict within --dns-timeout 5 s. A try that has
        # no answer after PER_TRY_TIMEOUT only makes the next one start (the next
        # nameserver, or the same one again), it is not abandoned.
        tries: dict[asyncio.Future[dns.message.Message], Nameserver] = {}
        turn = 0
        try:
            while usable or tries:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return self._timed_out(name, rrtype)
                if usable and len(tries) < MAX_TRIES_IN_FLIGHT:
                    ns = usable[turn % len(usable)]
                    turn += 1
                    tries[asyncio.ensure_future(self._exchange(ns, question, remaining))] = ns
                done, _ = await asyncio.wait(
                    tries,
                    timeout=min(PER_TRY_TIMEOUT, remaining),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for attempt in done:
                    ns = tries.pop(attempt)
                    try:
                        response = attempt.result()
                    except TimeoutError:
                        continue  # this try reached the query's deadline
                    except (OSError, EOFError) as e:
                        failure = f"{ns}: {e or type(e).__name__}"
                    except UnreadableReply as e:
                        failure = f"{ns} sent an unreadable reply: {e}"
                    else:
                        answer, failure = _classify(name, rrtype, response)
                        if answer is not None:
                            return answer
                        failure = f"{ns} {failure}"
                    if ns in usable:  # dropped for this query, with its other tries
                        usable.remove(ns)
                        failures.append(failure)
                    for other in [t for t, n in tries.items() if n == ns]:
                        other.cancel()
                        del tries[other]
        finally:
            for attempt in tries:
                attempt.cancel()
        refused = bool(failures) and all(f.endswith(REFUSED) for f in failures)
        return DnsAnswer(
            name,
            rrtype,
            "refused" if refused else "servfail",
            detail=f"no usable answer: {'; '.join(failures)}"[:200],
        )

    async def _exchange(
        self, ns: Nameserver, question: bytes, seconds: float
    ) -> dns.message.Message:
        """One try: UDP, and TCP again if the reply was truncated."""
        wire = await self._transport.exchange(
            ns.address, ns.port, question, self.require_dnssec, seconds
        )
        if not is_truncated(wire):
            try:
                return dns.message.from_wire(wire)
            except Exception as e:  # dnspython raises more than DNSException on garbage
                raise UnreadableReply(_first_line(e)) from None
        qid = int.from_bytes(wire[:2], "big")
        query = dns.message.from_wire(query_wire(qid, question, self.require_dnssec))
        try:
            return await dns.asyncquery.tcp(query, ns.address, seconds, ns.port)
        except dns.exception.Timeout:
            raise TimeoutError from None
        except (OSError, EOFError):
            raise
        except Exception as e:
            raise UnreadableReply(f"over TCP: {_first_line(e)}") from None

    def _timed_out(self, name: str, rrtype: str) -> DnsAnswer:
        return DnsAnswer(name, rrtype, "timeout", detail=f"no answer within {self.timeout:g}s")


def system_nameservers() -> tuple[Nameserver, ...]:
    """The resolvers in /etc/resolv.conf (what the system would ask)."""
    try:
        resolver = dns.resolver.Resolver(configure=True)
    except dns.resolver.NoResolverConfiguration as e:
        raise ValueError(f"no usable /etc/resolv.conf ({e}); give --nameserver") from None
    found = tuple(
        Nameserver(ns, resolver.port) if isinstance(ns, str) else Nameserver(ns.address, ns.port)
        for ns in resolver.nameservers
        if isinstance(ns, str | dns.nameserver.Do53Nameserver)
    )
    if not found:
        raise ValueError("no nameserver in /etc/resolv.conf; give --nameserver")
    return found


def _classify(
    name: str, rrtype: str, response: dns.message.Message
) -> tuple[DnsAnswer | None, str]:
    """What one reply proves: an answer, or (None, why this nameserver is no good)."""
    if not isinstance(response, dns.message.QueryMessage):
        return None, "answered with something other than a query reply"
    rcode = response.rcode()
    if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
        if rcode == dns.rcode.YXDOMAIN:
            return DnsAnswer(name, rrtype, "error", detail="YXDOMAIN"), ""
        return None, f"answered {dns.rcode.to_text(rcode)}"
    try:
        chain = response.resolve_chaining()  # follows CNAMEs to the RRset asked for
    except dns.exception.DNSException as e:
        return None, f"answered inconsistently: {_first_line(e)}"
    validated = _validated(response)
    if rcode == dns.rcode.NXDOMAIN:
        return DnsAnswer(
            name, rrtype, "nxdomain", ttl=_negative_ttl(response), authenticated=validated
        ), ""
    if chain.answer is None:
        return DnsAnswer(
            name, rrtype, "nodata", ttl=_negative_ttl(response), authenticated=validated
        ), ""
    # Every record is kept: the reply's size (at most 64 KiB) bounds them, and a cut would
    # make a verdict depend on record order (a tombstone TXT, or a real SRV target, after
    # the cut). Only the addresses kept per name are capped (sidecar.judge.signals).
    records = tuple(chain.answer)
    return DnsAnswer(
        name, rrtype, "ok", records=records, ttl=chain.answer.ttl, authenticated=validated
    ), ""


def _negative_ttl(response: dns.message.Message | None) -> int:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM) seconds."""
    if response is None:
        return DEFAULT_NEGATIVE_TTL
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return int(min(rrset.ttl, rrset[0].minimum))
    return DEFAULT_NEGATIVE_TTL


def _validated(response: dns.message.Message | None) -> bool:
    return response is not None and bool(response.flags & dns.flags.AD)


def _first_line(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]
