"""One DNS query, classified: the only place the sidecar talks to a resolver.

Each query ends in one `DnsAnswer` whose `outcome` says what DNS *proved*: records exist
(`ok`), the name exists without this type (`nodata`), the name does not exist
(`nxdomain`), or nothing could be learned (`timeout`, `servfail`, `error`). Only the first
three are evidence; the rest fail open upstream of here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Literal

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from sidecar.metrics import Metrics

Outcome = Literal["ok", "nodata", "nxdomain", "timeout", "servfail", "error"]
EVIDENCE: frozenset[Outcome] = frozenset({"ok", "nodata", "nxdomain"})

MAX_CONCURRENT_QUERIES = 256  # a storm of new names waits its turn instead of flooding
MAX_RECORDS = 64  # a bigger RRset is abuse, not a tombstone; keep only this many
DEFAULT_NEGATIVE_TTL = 300  # RFC 2308 fallback when a negative answer carries no SOA


@dataclass(frozen=True, slots=True)
class Nameserver:
    """A resolver address from `--nameserver IP[:PORT]`."""

    address: str
    port: int = 53

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """The classified result of one query (records as dnspython rdata objects)."""

    name: str
    rrtype: str
    outcome: Outcome
    records: tuple[object, ...] = ()
    ttl: int | None = None  # positive: RRset TTL; negative: min(SOA TTL, SOA minimum)
    detail: str = ""
    authenticated: bool = False  # the resolver set AD: it validated this answer (DNSSEC)

    @property
    def is_evidence(self) -> bool:
        return self.outcome in EVIDENCE


class DnsClient:
    """Asks one configured resolver (or the system's), never caching: the verdict cache does."""

    def __init__(
        self,
        nameservers: tuple[Nameserver, ...],
        timeout: float,
        metrics: Metrics,
        require_dnssec: bool = False,
    ) -> None:
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        except dns.resolver.NoResolverConfiguration as e:
            raise ValueError(f"no usable /etc/resolv.conf ({e}); give --nameserver") from None
        if nameservers:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ns.address, ns.port) for ns in nameservers
            ]
        self._resolver.cache = None
        self.require_dnssec = require_dnssec
        if require_dnssec:  # ask for validation (RFC 6840 §5.7): DO bit, and AD in the query
            self._resolver.use_edns(0, dns.flags.DO, 1232)
            self._resolver.flags = dns.flags.RD | dns.flags.AD
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_QUERIES)
        self._resolver.lifetime = timeout
        self._resolver.timeout = min(timeout, 2.0)  # per-try; lifetime bounds the whole query
        self._metrics = metrics
        self.timeout = timeout

    @property
    def nameservers(self) -> list[str]:
        return [str(ns) for ns in self._resolver.nameservers]

    async def query(self, name: str, rrtype: str) -> DnsAnswer:
        """Send one query for the absolute `name` and classify the outcome."""
        async with self._slots:
            started = time.perf_counter()
            answer = await self._query(name, rrtype)
        self._metrics.dns_query_seconds.observe(time.perf_counter() - started)
        self._metrics.dns_queries.labels(rrtype, answer.outcome).inc()
        return answer

    async def _query(self, name: str, rrtype: str) -> DnsAnswer:
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as e:
            return DnsAnswer(name, rrtype, "error", detail=f"cannot form a query name: {e}")
        try:
            result = await self._resolver.resolve(
                qname, rrtype, raise_on_no_answer=False, search=False
            )
        except dns.resolver.NXDOMAIN as e:
            response = _nx_response(e)
            return DnsAnswer(name, rrtype, "nxdomain", ttl=_negative_ttl(response),
                             authenticated=_validated(response))  # fmt: skip
        except dns.resolver.LifetimeTimeout:
            return DnsAnswer(name, rrtype, "timeout", detail=f"no answer within {self.timeout:g}s")
        except dns.resolver.NoNameservers as e:
            return DnsAnswer(name, rrtype, "servfail", detail=_first_line(e))
        except dns.exception.DNSException as e:
            return DnsAnswer(name, rrtype, "error", detail=_first_line(e))
        validated = _validated(result.response)
        if result.rrset is None:
            ttl = _negative_ttl(result.response)
            return DnsAnswer(name, rrtype, "nodata", ttl=ttl, authenticated=validated)
        records = tuple(result.rrset)[:MAX_RECORDS]
        return DnsAnswer(name, rrtype, "ok", records=records, ttl=result.rrset.ttl,
                         authenticated=validated)  # fmt: skip


def _nx_response(error: dns.resolver.NXDOMAIN) -> dns.message.Message | None:
    try:
        qnames = error.qnames()
        return error.response(qnames[0]) if qnames else None
    except (KeyError, IndexError, AttributeError):
        return None


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
