"""The addresses the sidecar dials for a live name, each set kept exactly its A/AAAA TTL.

A verdict (gone / alive, and its evidence) lives long: its lifetime is clamped to
`--min-ttl` and it is served stale while a re-check runs, because a tombstone changes
rarely and every re-check asks five questions. Addresses are different: Synapse alone
resolves at every connection, so a server that renumbers (failover, a new VPS, dynamic
DNS) is reached at its new address as soon as its old record expires. The sidecar does
the same: an address set is dialled only within its own TTL (no lower clamp); an expired
set is asked again (A and AAAA only, one query pair per name however many connections
wait) before anything is dialled.

Only when that query fails (timeout, SERVFAIL: no evidence) is the last set served stale,
as RFC 8767 describes: for `STALE_ANSWER_SECONDS` at a time before DNS is asked again,
and never longer than `max_stale` after the set expired; after that the name fails as it
would for Synapse alone (no address, a 502). Address sets are never persisted or shared:
after a restart, or for a verdict learned from another sidecar, the first connection asks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TLRUCache

from sidecar.dns import questions
from sidecar.dns.client import DnsClient
from sidecar.judge import signals
from sidecar.judge.caches import resized
from sidecar.judge.names import is_ip_literal
from sidecar.judge.signals import Finding
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.addresses")

# RFC 8767 §4 recommends 30 s for a stale answer: long enough not to hammer a failing
# resolver per connection, short enough to pick up the first working answer.
STALE_ANSWER_SECONDS = 30.0
# A set without a usable TTL (never the case for a real A/AAAA answer): ask again at once.
NO_TTL_SECONDS = 0.0


@dataclass(frozen=True, slots=True)
class AddressSet:
    """What one name resolved to, and until when it may be dialled.

    `known` is False when DNS could not say (then `addresses` is empty and `detail` says
    why); an empty set with `known` True is DNS's own answer: no A or AAAA records.
    """

    name: str
    addresses: tuple[str, ...]
    expires_at: float
    known: bool = True
    detail: str = ""


@dataclass(slots=True)
class _Slot:
    """The last good (DNS-answered) set for a name, and until when a stale serve may go on
    before DNS is asked again."""

    last: AddressSet
    retry_at: float = 0.0


class AddressBook:
    """TTL-exact address sets per name, resolved on demand with single flight."""

    def __init__(
        self,
        dns: DnsClient,
        metrics: Metrics,
        *,
        max_stale: float,
        maxsize: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dns = dns
        self.max_stale = max_stale
        self._metrics = metrics
        self._clock = clock
        self._slots: TLRUCache[str, _Slot] = TLRUCache(
            maxsize=maxsize, ttu=self._drop_at, timer=clock
        )
        self._inflight: dict[str, asyncio.Future[AddressSet]] = {}

    def _drop_at(self, _name: str, slot: _Slot, _now: float) -> float:
        return slot.last.expires_at + self.max_stale

    def resize(self, maxsize: int) -> None:
        """Hold at most `maxsize` names from now on, keeping the sets held."""
        if maxsize != self._slots.maxsize:
            self._slots = resized(self._slots, maxsize, self._drop_at, self._clock)

    def record(self, name: str, addresses: tuple[str, ...], check: signals.SignalCheck) -> None:
        """Keep what a full DNS evaluation learned (the A/AAAA answers it asked anyway)."""
        if check.finding is Finding.UNKNOWN:
            return  # nothing learned; a last good set stays as it is
        self._slots[name] = _Slot(self._set(name, addresses, check))

    def fresh(self, name: str) -> AddressSet | None:
        """The set for `name` if it may be dialled now without asking DNS (no I/O)."""
        if is_ip_literal(name):
            return AddressSet(name, (name,), math.inf)
        slot = self._slots.get(name)
        if slot is None:
            return None
        now = self._clock()
        if now < slot.last.expires_at:
            return slot.last
        if now < slot.retry_at and now < slot.last.expires_at + self.max_stale:
            return self._stale(slot.last)
        return None

    async def resolve(self, name: str) -> AddressSet:
        """The set to dial for `name`: fresh, else asked again (A/AAAA, single flight)."""
        known = self.fresh(name)
        if known is not None:
            return known
        future = self._inflight.get(name)
        if future is None:
            future = asyncio.ensure_future(self._refresh(name))
            self._inflight[name] = future
            future.add_done_callback(lambda _: self._inflight.pop(name, None))
        return await asyncio.shield(future)

    async def _refresh(self, name: str) -> AddressSet:
        addresses, check = await questions.resolve_addresses(self.dns, name)
        now = self._clock()
        if check.finding is not Finding.UNKNOWN:
            current = self._set(name, addresses, check)
            self._slots[name] = _Slot(current)
            self._metrics.address_refreshes.labels("fresh").inc()
            return current
        slot = self._slots.get(name)
        if slot is not None and now < slot.last.expires_at + self.max_stale:
            # RFC 8767: serve the last answer, and ask again only after a short while.
            slot.retry_at = now + STALE_ANSWER_SECONDS
            self._metrics.address_refreshes.labels("stale").inc()
            return self._stale(slot.last)
        self._metrics.address_refreshes.labels("failed").inc()
        return AddressSet(name, (), now, known=False, detail=check.detail)

    def _set(self, name: str, addresses: tuple[str, ...], check: signals.SignalCheck) -> AddressSet:
        ttl = check.ttl if check.ttl is not None else NO_TTL_SECONDS
        return AddressSet(name, addresses, self._clock() + ttl)

    def _stale(self, last: AddressSet) -> AddressSet:
        """The last set, served past its TTL: counted per connection that dials it."""
        self._metrics.stale_addresses.inc()
        return last
