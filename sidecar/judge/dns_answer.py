"""What one DNS question returned, as the judge reads it: pure data, no resolver.

The resolver (sidecar/dns/client.py) produces these; the signal checks (signals.py) read
them. Keeping the type here lets the judging core stay free of network code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Outcome = Literal["ok", "nodata", "nxdomain", "timeout", "servfail", "refused", "error"]
EVIDENCE: frozenset[Outcome] = frozenset({"ok", "nodata", "nxdomain"})
MAX_ADDRESSES = 64  # addresses kept per A or AAAA answer: the sidecar dials one of them


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
