"""The decision: is this destination gone? Operator lists, cached verdicts, then DNS.

`cached()` is the hot path (no I/O, a few dictionary probes); `decide()` adds the lookup
for a name not seen yet — the shared store if there is one, then DNS — shared by every
concurrent caller (single flight). Expired verdicts keep answering while one background
re-check runs. Every new verdict is handed to the store behind the cache; verdicts from
the store (at start, or from other sidecars) come in through `accept`. Verdict changes
are logged here, once each, never per request.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable, Iterator

from sidecar.judge.ports import Addresses, FoundAddresses, Questions, Rechecker, SharedVerdicts
from sidecar.judge.signals import DnsReport, Finding, Signal
from sidecar.judge.ttl import TtlBounds
from sidecar.judge.verdicts import Entry, State, Verdict, VerdictCache
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.policy")

UNDECIDED_RETRY_SECONDS = 30.0  # ask a failing resolver again after this, not per request
OPERATOR_TTL_SECONDS = 10 * 365 * 86400.0  # deny-list verdicts last as long as the list says so
DNS_FAILURE_LOG_INTERVAL = 60.0  # one warning a minute while the resolver fails, not one per name
# Deny-list changes are applied in slices, yielding to the event loop between them: one
# name costs ~2 µs to add (300,000 in 0.56 s with the GC paused), so a slice of 2,000
# holds the loop ~3-5 ms (measured median 2.6 ms, worst 16 ms), the scale of one GIL
# switch interval. tests/integration/test_deny_reload.py prints the CONNECT latencies.
DENY_SLICE = 2000
# Names taken off the deny list are judged again at most this many a second. Each costs ~5
# DNS queries (issue 14: 25,000 for 5,000 names, all at once, in 8.5 s): 50 a second is
# ~250 queries a second, a small share of one resolver replica, and 5,000 removed names
# are re-checked in 100 s. A request for a removed name meanwhile is judged at once as usual.
DELIST_RECHECKS_PER_SECOND = 50.0

# Before a suppressing verdict is lifted (name, old, new alive): evidence to hold it, or None.
LiftGuard = Callable[[str, Verdict, Verdict], Awaitable[str | None]]
# After a suppressing verdict was replaced by an alive one: (old, new).
Lifted = Callable[[Verdict, Verdict], None]
# After a name that did not suppress was judged gone (any signal, any source): the verdict.
Gone = Callable[[Verdict], None]


class Policy:
    """Verdicts for destinations, from operator lists, the cache and DNS signals."""

    def __init__(
        self,
        questions: Questions,
        *,
        addresses: Addresses,
        store: SharedVerdicts,
        metrics: Metrics,
        ttl: TtlBounds,
        cache_size: int,
        deny: frozenset[str] = frozenset(),
        allow: frozenset[str] = frozenset(),
        prober: Rechecker | None = None,
        lift_guard: LiftGuard | None = None,
        on_lifted: Lifted | None = None,
        on_gone: Gone | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`questions` asks DNS about a name; `addresses` keeps where live names are dialled
        (their own A/AAAA TTL, never the verdict's); `prober` re-checks a 410 before it is
        lifted (None: probes off); `lift_guard` is the resurrection check and `on_lifted`
        Synapse's reset (synapse/lifting.py); `on_gone` hears each name that starts to
        suppress (the proxy ends its open tunnels)."""
        self.questions = questions
        self.addresses = addresses
        self.store = store
        self.prober = prober
        self.lift_guard = lift_guard
        self.on_lifted = on_lifted
        self.on_gone = on_gone
        self.ttl = ttl
        self.cache = VerdictCache(cache_size, clock)
        self._clock = clock
        self._metrics = metrics
        self._inflight: dict[str, asyncio.Future[Entry]] = {}
        self._last_dns_warning = -DNS_FAILURE_LOG_INTERVAL
        self.allow = allow
        self._operator: dict[str, Entry] = {}  # the static deny lists (flags, files)
        self._manual: dict[str, Entry] = {}  # marked gone through the ops API: stored, shared
        self._lifting: dict[str, Verdict] = {}  # what a re-check forgot, until it is judged
        self._delisting: set[asyncio.Future[None]] = set()  # re-checks of names off the deny list
        self._delisted: dict[str, Verdict] = {}  # off the deny list, waiting for a re-check
        self._delist_worker: asyncio.Future[None] | None = None
        self._deny_generation = 0  # a newer deny list stops an older one being applied
        self._afresh: set[str] = set()  # being re-checked: DNS decides, not the store's copy
        self.set_deny(deny)

    def set_deny(self, names: frozenset[str]) -> None:
        """Replace the operator deny list at once (at start, on a config change); one
        summary line, each name at DEBUG."""
        changes = self._apply_deny(names)
        for _ in changes:
            pass

    async def replace_deny(self, names: frozenset[str], note: str = "") -> None:
        """Replace the deny list in slices of DENY_SLICE names, yielding to the event loop
        between them (a file reload: 300,000 names at once stalled CONNECTs 11.8 s).

        The cyclic GC is paused meanwhile and the new entries frozen after (as at start,
        addon.running): adding 300,000 entries otherwise set off a dozen collections of
        100-425 ms each (2 busy cores), the very stalls the slices are there to avoid.
        """
        collecting = gc.isenabled()
        gc.disable()
        try:
            for _ in self._apply_deny(names, note):
                await asyncio.sleep(0)
        finally:
            if collecting:
                gc.freeze()  # long-lived: keep them out of later full collections
                gc.enable()

    def deny_count(self) -> int:
        return len(self._operator)

    def _apply_deny(self, names: frozenset[str], note: str = "") -> Iterator[None]:
        """Add and remove names slice by slice (yielding between slices), then log one
        summary line and queue the removed names for a re-check (DELIST_RECHECKS_PER_SECOND).
        Stops early if a newer list arrives meanwhile: that one is applied against
        whatever this one had done, so the newest list always wins."""
        self._deny_generation += 1
        generation = self._deny_generation
        current = self._operator
        added = list(names - current.keys())
        removed = list(current.keys() - names)
        for start in range(0, len(added), DENY_SLICE):
            if start:
                yield
                if generation != self._deny_generation:
                    return
            now = self._clock()
            for name in added[start : start + DENY_SLICE]:
                verdict = Verdict(
                    name,
                    State.GONE,
                    Signal.OPERATOR,
                    "on the operator deny list",
                    now,
                    now + OPERATOR_TTL_SECONDS,
                )
                current[name] = Entry(verdict)
                log.debug("%s gone (operator: on the deny list)", name)
                if self.on_gone is not None:
                    self.on_gone(verdict)
            self._metrics.verdict_changes.labels("none", State.GONE).inc(
                len(added[start : start + DENY_SLICE])
            )
        try:
            asyncio.get_running_loop()
            running = True
        except RuntimeError:  # no loop (configured before start): the next request asks
            running = False
        for start in range(0, len(removed), DENY_SLICE):
            if start or added:
                yield
                if generation != self._deny_generation:
                    return
            for name in removed[start : start + DENY_SLICE]:
                entry = current.pop(name, None)
                if entry is None:
                    continue
                if running:
                    self._delisted[name] = entry.verdict
                    log.debug("%s removed from the deny list; DNS will judge it again", name)
                else:
                    log.debug("%s removed from the deny list; DNS decides again", name)
            if not running:
                self._metrics.verdict_changes.labels(State.GONE, "none").inc(
                    len(removed[start : start + DENY_SLICE])
                )
        if added or removed or note:
            queued = len(self._delisted)
            recheck = (
                (
                    f"; re-checking {queued} removed names in DNS at up to "
                    f"{DELIST_RECHECKS_PER_SECOND:g} a second"
                )
                if queued
                else ""
            )
            log.info(
                "deny list: +%d -%d, %d total%s%s",
                len(added),
                len(removed),
                len(current),
                note,
                recheck,
            )
        if self._delisted and (self._delist_worker is None or self._delist_worker.done()):
            self._delist_worker = asyncio.ensure_future(self._drain_delisted())

    async def _drain_delisted(self) -> None:
        """Re-check names taken off the deny list, DELIST_RECHECKS_PER_SECOND at most."""
        interval = 1.0 / DELIST_RECHECKS_PER_SECOND
        while self._delisted:
            name = next(iter(self._delisted))
            was = self._delisted.pop(name)
            if name in self._operator:  # back on the list before its turn came
                continue
            task = asyncio.ensure_future(self._recheck_delisted(name, was))
            self._delisting.add(task)
            task.add_done_callback(self._delisting.discard)
            await asyncio.sleep(interval)

    def counts(self) -> list[tuple[tuple[str, str], int]]:
        tally = dict(self.cache.counts())
        operator = len(self._operator) + len(self._manual)
        if operator:
            key = (State.GONE.value, Signal.OPERATOR.value)
            tally[key] = tally.get(key, 0) + operator
        return sorted(tally.items())

    def entries(self) -> list[Entry]:
        """Every current verdict: operator lists first, then the cache."""
        return [*self._operator.values(), *self._manual.values(), *self.cache]

    def is_listed(self, name: str) -> bool:
        """True when `name` is on a static deny list (only a config change lifts it)."""
        return name in self._operator

    def cached(self, name: str) -> Entry | None:
        """The verdict if one is known now (no I/O); starts a re-check if it has expired."""
        if name not in self.allow:
            operator = self._operator.get(name) or self._manual.get(name)
            if operator is not None:
                if operator.verdict.expires_at > self._clock():
                    return operator
                self._manual.pop(name, None)
        entry = self.cache.get(name)
        if entry is None:
            return None
        now = self._clock()
        if (
            now >= entry.verdict.expires_at
            and now >= entry.next_refresh
            and name not in self._inflight
        ):
            entry.next_refresh = now + UNDECIDED_RETRY_SECONDS
            self._lookup(name)
        return entry

    async def decide(self, name: str) -> Entry:
        """The verdict for `name`, asking DNS if nothing is cached (one lookup per name)."""
        entry = self.cached(name)
        if entry is not None:
            return entry
        return await asyncio.shield(self._lookup(name))

    async def recheck(self, name: str) -> Entry:
        """Forget what is known about `name` (here and in the store) and judge it afresh."""
        previous = self._manual.pop(name, None) or self.cache.get(name)
        return await self._judge_afresh(name, previous.verdict if previous else None)

    async def _recheck_delisted(self, name: str, was: Verdict) -> None:
        """A name left the deny list: judge it now, as the lift of the operator's verdict.

        Now, not at its next request: Synapse may be backing the name off and not ask for
        days. As a lift, it gets the resurrection check and Synapse's reset (synapse/lifting.py).
        """
        try:
            await self._judge_afresh(name, was)
        except Exception:  # fail open: the next request asks again
            log.exception("checking %s after it left the deny list failed", name)

    async def _judge_afresh(self, name: str, was: Verdict | None) -> Entry:
        """Drop the cached verdict (here and in the store) and ask DNS now, never the
        store's copy (its forget is written behind); a suppressing `was` makes it a lift."""
        self.cache.forget(name)
        self.store.forget(name)
        if was is not None and was.suppresses:
            self._lifting[name] = was
        self._afresh.add(name)
        try:
            return await self.decide(name)
        finally:
            self._lifting.pop(name, None)
            self._afresh.discard(name)

    def forget(self, name: str) -> None:
        self.cache.forget(name)
        self._manual.pop(name, None)

    def use_questions(self, questions: Questions) -> None:
        """A reconfigured resolver: verdicts ask the new one from now on."""
        self.questions = questions

    async def dial_addresses(self, name: str) -> FoundAddresses:
        """Where to connect for `name` now: its addresses within their own TTL, else asked
        again (A/AAAA). A name that no longer exists there is judged again at once."""
        found = await self.addresses.resolve(name)
        if found.known and not found.addresses and name not in self._inflight:
            entry = self.cache.get(name)
            if entry is not None and entry.verdict.state is State.ALIVE:
                self._lookup(name)  # NXDOMAIN or no data now: the verdict may change
        return found

    def mark_gone(self, name: str, ttl: float, comment: str) -> Entry:
        """An operator's verdict through the ops API: stored and shared like any other."""
        now = self._clock()
        evidence = comment or "marked gone by an operator"
        verdict = Verdict(name, State.GONE, Signal.OPERATOR, evidence, now, now + ttl)
        previous = self._manual.get(name) or self.cache.get(name)
        entry = self._manual[name] = Entry(verdict, previous.suppressed_count if previous else 0)
        self.cache.forget(name)
        self.store.save(verdict)
        self._changed(previous.verdict if previous else None, verdict)
        return entry

    def accept(self, verdict: Verdict, quiet: bool = False) -> None:
        """A verdict from the store (`quiet` at start: one summary line, not one per name)
        or from another sidecar; never saved back."""
        if (
            verdict.expires_at + self.cache.grace <= self._clock()
            or verdict.state is State.UNDECIDED
        ):
            return
        name = verdict.destination
        current = self._manual.get(name) or self.cache.get(name)
        if current is not None and current.verdict.observed_at > verdict.observed_at:
            return  # ours is newer
        if verdict.signal == Signal.OPERATOR:
            self.cache.forget(name)
            self._manual[name] = Entry(verdict, current.suppressed_count if current else 0)
        else:
            self._manual.pop(name, None)
            self.cache.put(verdict)
        if not quiet:
            self._changed(current.verdict if current else None, verdict)

    def accept_forget(self, name: str) -> None:
        """Another sidecar forgot `name` (an operator asked for a re-check)."""
        if name in self._manual or name in self.cache:
            self.forget(name)
            log.info("%s forgotten by another sidecar; it will be checked again", name)

    def _lookup(self, name: str) -> asyncio.Future[Entry]:
        future = self._inflight.get(name)
        if future is None:
            future = asyncio.ensure_future(self._evaluate(name))
            self._inflight[name] = future
            future.add_done_callback(lambda _: self._inflight.pop(name, None))
        return future

    async def _evaluate(self, name: str) -> Entry:
        # A forgotten name is judged afresh: the store may still hold what was just
        # forgotten (its forget is written behind).
        shared = None if name in self._afresh else await self.store.fetch(name)
        if shared is not None and shared.expires_at > self._clock():
            self.accept(shared)
            entry = self.cache.get(name) or self._manual.get(name)
            if entry is not None:
                return entry
        previous = self.cache.get(name)
        was = previous.verdict if previous is not None else self._lifting.pop(name, None)
        try:
            report = await self.questions.evaluate(name)
            self.addresses.record(name, report.addresses, report.address_check)
            verdict = self.judge(report)
            if verdict.state is State.UNDECIDED:  # the proxy forwards it: say so, rarely
                self._warn_dns_failure(name, verdict.evidence.split("; ")[0] or "unknown")
            if (  # expired, or forgotten by DELETE / resume-early: DNS cannot lift a 410
                was is not None
                and was.signal == Signal.HTTP_410
                and verdict.state is State.ALIVE
                and self.prober is not None
            ):
                verdict = await self._recheck_http(name, verdict)
            if (
                was is not None
                and was.suppresses
                and verdict.state is State.ALIVE
                and self.lift_guard is not None
            ):
                hold = await self.lift_guard(name, was, verdict)
                if hold is not None:
                    return self.mark_gone(name, OPERATOR_TTL_SECONDS, hold)
        except Exception as e:  # a bug here must not become a tombstone: fail open
            log.exception("checking %s failed; forwarding it without a verdict", name)
            now = self._clock()
            verdict = Verdict(
                name,
                State.UNDECIDED,
                None,
                f"internal error: {e}",
                now,
                now + UNDECIDED_RETRY_SECONDS,
            )
        return self._store(verdict, was)

    async def _recheck_http(self, name: str, alive: Verdict) -> Verdict:
        """A 410 verdict up for lifting, DNS clean: ask the server again before lifting it."""
        assert self.prober is not None
        result = await self.prober.probe(name, None)
        now = self._clock()
        if result.outcome == "gone":
            return Verdict(
                name, State.GONE, Signal.HTTP_410, result.detail, now, now + result.lifetime
            )
        if result.outcome == "failed":  # no evidence either way: keep the 410 (fail open later)
            return Verdict(
                name,
                State.UNDECIDED,
                None,
                f"re-check failed: {result.detail}",
                now,
                now + UNDECIDED_RETRY_SECONDS,
            )
        return alive

    def learn_gone(self, name: str, lifetime: float, evidence: str) -> None:
        """A 410 Gone from the server itself (a probe, or a response in intercept mode)."""
        if name in self.allow:
            return
        current = self.cache.get(name)
        if (
            current is not None
            and current.verdict.suppresses
            and current.verdict.signal != Signal.HTTP_410
        ):
            return  # already gone for a DNS or operator reason; that verdict stands
        now = self._clock()
        self._store(Verdict(name, State.GONE, Signal.HTTP_410, evidence, now, now + lifetime))

    def judge(self, report: DnsReport) -> Verdict:
        """Any positive evidence is gone; all clear is alive; anything else is undecided.

        The allow list overrides only a gone finding: an allowed name still needs its
        addresses, so a DNS failure leaves it undecided like any other.
        """
        now = self._clock()
        name = report.name
        gone = report.gone
        allowed = name in self.allow
        if gone is not None and not allowed:
            expires = now + self.ttl.clamp(gone.ttl)
            return Verdict(name, State.GONE, gone.signal, gone.detail, now, expires)
        addresses_known = report.address_check.finding is not Finding.UNKNOWN
        if addresses_known and (allowed or report.complete):
            evidence = "no tombstone in DNS"
            if allowed:
                evidence = "on the operator allow list" + (
                    f"; DNS says {gone.signal}" if gone else ""
                )
            expires = now + self.ttl.clamp(report.alive_ttl or self.ttl.minimum)
            return Verdict(name, State.ALIVE, None, evidence, now, expires)
        failed = [c for c in (*report.checks, report.address_check) if c.finding is Finding.UNKNOWN]
        why = "; ".join(dict.fromkeys(c.detail for c in failed))  # each failure once
        return Verdict(name, State.UNDECIDED, None, why, now, now + UNDECIDED_RETRY_SECONDS)

    def _store(self, verdict: Verdict, was: Verdict | None = None) -> Entry:
        """Cache (and save) `verdict`; `was` is what it replaces when a re-check forgot it."""
        previous = self.cache.get(verdict.destination)
        if (
            previous is not None
            and verdict.state is State.UNDECIDED
            and previous.verdict.state is not State.UNDECIDED
        ):
            # A failed re-check keeps the last real verdict until its stale grace runs out.
            previous.next_refresh = self._clock() + UNDECIDED_RETRY_SECONDS
            return previous
        entry = self.cache.put(verdict)
        old = previous.verdict if previous is not None else was
        if verdict.state is not State.UNDECIDED:
            self.store.save(verdict)
        self._changed(old, verdict)
        return entry

    def _changed(self, old: Verdict | None, new: Verdict) -> None:
        old_state = old.state if old is not None else None
        if new.state is State.UNDECIDED or old_state == new.state:
            return
        if old_state is State.UNDECIDED:
            old_state = None
        self._metrics.verdict_changes.labels(old_state or "none", new.state).inc()
        if old is not None and old.suppresses and new.state is State.ALIVE and self.on_lifted:
            self.on_lifted(old, new)
        if new.suppresses and not (old is not None and old.suppresses) and self.on_gone:
            self.on_gone(new)
        if new.state is State.ALIVE and old_state is None:
            log.debug("%s", new.describe())
        elif new.state is State.ALIVE:
            log.info("%s (was %s: %s)", new.describe(), old_state, old.signal if old else "")
        else:
            log.info("%s", new.describe())

    def _warn_dns_failure(self, name: str, detail: str) -> None:
        now = time.monotonic()
        if now - self._last_dns_warning >= DNS_FAILURE_LOG_INTERVAL:
            self._last_dns_warning = now
            log.warning(
                "DNS could not answer for %s (%s) via %s; forwarding such names without a "
                "verdict (fail open). Check the resolver; this repeats at most once a minute.",
                name,
                detail,
                ", ".join(self.questions.nameservers) or "the system resolver",
            )
