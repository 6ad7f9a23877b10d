"""The one place that wires the sidecar together: `Sidecar`, built from `Settings`.

Every collaborator is made here, complete, and handed to the others through their
constructors: the resolver, the address book, the store, the breaker, the prober, the
lifter and the policy that uses them. The proxy (proxy/) asks this object for decisions
and tells it what it saw; the ops API (ops/) calls the `OpsBackend` methods below. Nothing
here imports mitmproxy: the same object serves `run` and `mitmdump -s addons/tombstone.py`.

The judge fails open, the guard fails closed: a DNS failure is an undecided verdict that
forwards, but every dial goes through `checked_address` (the address classifier) and
every gone verdict is enforced by the caller through `suppress`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from sidecar.config.options import ConfigError, Settings
from sidecar.dns.address_book import AddressBook
from sidecar.dns.client import DnsClient
from sidecar.dns.questions import DnsQuestions
from sidecar.judge.breaker import Breaker, Gate
from sidecar.judge.policy import Gone, Policy
from sidecar.judge.ports import FoundAddresses
from sidecar.judge.room_servers import RoomServers, Unreadable
from sidecar.judge.ttl import TtlBounds
from sidecar.judge.verdicts import Entry, State, Verdict
from sidecar.metrics import Metrics
from sidecar.ops.backend import Listed, Readiness, Resurrections, Unavailable
from sidecar.ops.loop_lag import watch_loop_lag
from sidecar.ops.server import OpsServer
from sidecar.remote.addresses import AddressPolicy
from sidecar.remote.identity import FILE_NAME as KEYS_FILE
from sidecar.remote.identity import KeyBook, KeyFetcher
from sidecar.remote.probe import Prober, ProbeResult
from sidecar.store.base import VerdictStore, default_state_dir
from sidecar.store.open import open_store
from sidecar.synapse.admin import AdminEndpoint, SynapseAdmin
from sidecar.synapse.lifting import Lifter, is_hold

log = logging.getLogger("sidecar.addon")

LIST_POLL_SECONDS = 2.0  # how soon an edited --deny-file/--allow-file takes effect
# Names of a room judged in the background at once (--prejudge-room). Each cold decision
# asks 5 DNS questions, so 16 hold at most 80 of the DNS client's 256 query slots: live
# decisions keep the rest and never queue behind a room's thousands of names.
PREJUDGE_CONCURRENCY = 16


class Sidecar:
    """The running sidecar: its collaborators, its lifecycle and its decisions."""

    def __init__(
        self, settings: Settings, metrics: Metrics | None = None, on_gone: Gone | None = None
    ) -> None:
        """Build everything from `settings` (ConfigError names a bad setting). Nothing is
        started: `start` loads the store and opens the ops listener. `on_gone` hears each
        name that starts to suppress (the proxy ends the tunnels open to it)."""
        self.metrics = metrics = metrics if metrics is not None else Metrics()
        self.settings = settings
        self.dns = _dns_client(settings, metrics)
        self.store: VerdictStore = open_store(settings.store, settings.state_dir, metrics)
        self.addresses = _address_policy(settings)
        self.address_book = AddressBook(
            self.dns, metrics, max_stale=settings.dns_max_stale, maxsize=settings.cache_size
        )
        self.gone_ttl = settings.gone_lifetime
        self.breaker = Breaker(settings.breaker, metrics)
        self.prober = self._make_prober(settings)
        self.lifter = Lifter(
            metrics,
            _key_book(settings),
            fetcher=self._make_fetcher(settings),
            admin=_synapse_admin(settings, metrics),
            store=self.store,
            hold_reborn=settings.hold_reborn,
            poll_interval=settings.synapse_admin_poll,
        )
        self._on_gone = on_gone
        self.policy = self._make_policy(settings)
        metrics.watch_verdicts(self._verdict_counts)
        self.loaded = asyncio.Event()  # stored verdicts are in the cache: decisions may start
        self.is_running = False  # the proxy listens (set by the proxy once it is bound)
        self.draining = False  # shutting down: /readyz says so, open tunnels finish
        self.ops: OpsServer | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._list_stamp: tuple[float, ...] = ()
        self._lists_asked = asyncio.Event()  # SIGHUP: reload now, not at the next poll
        self._prejudging = asyncio.Semaphore(PREJUDGE_CONCURRENCY)  # shared by every room
        if not settings.enforce:
            log.warning("shadow mode (--no-enforce): verdicts are counted, nothing is suppressed")

    def _make_policy(self, settings: Settings) -> Policy:
        return Policy(
            DnsQuestions(self.dns),
            addresses=self.address_book,
            store=self.store,
            metrics=self.metrics,
            ttl=settings.verdict_ttl,
            cache_size=settings.cache_size,
            deny=settings.deny,
            allow=settings.allow,
            prober=self.prober,
            lift_guard=self.lifter.guard,
            on_lifted=self.lifter.lifted,
            on_gone=self._gone,
        )

    def _gone(self, verdict: Verdict) -> None:
        """A name starts to suppress: what the proxy holds open to it ends (not in shadow
        mode, which suppresses nothing)."""
        if self._on_gone is not None and self.settings.enforce:
            self._on_gone(verdict)

    def _make_prober(self, settings: Settings) -> Prober | None:
        if not settings.probe:
            return None
        return Prober(
            settings.probing,
            self.metrics,
            self.addresses,
            self.addresses_of,
            dns=self.dns,
            gone=self._judged_gone,
        )

    def _judged_gone(self, host: str) -> bool:
        """A cached verdict that suppresses `host` (enforcing or not: a probe is ours)."""
        entry = self.policy.cached(host)
        return entry is not None and entry.verdict.suppresses

    def _make_fetcher(self, settings: Settings) -> KeyFetcher:
        context = ssl.create_default_context()
        if settings.upstream_ca:
            context.load_verify_locations(settings.upstream_ca)
        return KeyFetcher(
            context,
            settings.probe_timeout,
            self.addresses_of,
            self.allowed_address,
            sni_for=self._route_sni,
        )

    def _route_sni(self, name: str, target: tuple[str, int]) -> str:
        """The SNI for `name`'s keys at `target`: the delegated host its last probe found
        there (well-known delegation), else the one its recorded keys were fetched with
        (a lift long after the probe), else the name itself."""
        route = self.prober.route_of(name) if self.prober is not None else None
        if route is not None and route.target == target:
            return route.sni
        record = self.lifter.book.records.get(name)
        if record is not None and record.target == target and record.sni:
            return record.sni
        return name

    def reconfigure(self, settings: Settings) -> None:
        """New settings while running (mitmproxy `--set`): the policy and what it holds (the
        verdict cache, resized if `--cache-size` changed; ops-API marks; re-checks in
        flight), the store, the key book and the lifter's holds are kept."""
        previous = self.settings
        dns = _dns_client(settings, self.metrics)
        self.dns.close()  # lookups in flight on it finish first
        self.dns = dns
        self.address_book.dns = dns
        self.address_book.max_stale = settings.dns_max_stale
        self.addresses = _address_policy(settings)
        self.gone_ttl = settings.gone_lifetime
        self.breaker.settings = settings.breaker
        old_prober, self.prober = self.prober, self._make_prober(settings)
        if old_prober is not None:
            self._spawn(old_prober.close())
        self.lifter.fetcher = self._make_fetcher(settings)
        self.lifter.admin = _synapse_admin(settings, self.metrics)
        self.lifter.hold_reborn = settings.hold_reborn
        self.lifter.poll_interval = settings.synapse_admin_poll
        self.address_book.resize(settings.cache_size)
        self.policy.cache.resize(settings.cache_size)
        self.policy.use_questions(DnsQuestions(dns))
        self.policy.prober = self.prober
        self.policy.ttl = settings.verdict_ttl
        self.policy.allow = settings.allow
        self.policy.set_deny(settings.deny)
        self.settings = settings
        if not settings.enforce and previous.enforce:
            log.warning("shadow mode (--no-enforce): verdicts are counted, nothing is suppressed")

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Load the stored verdicts, then start the background work and the ops listener
        (OSError when its port cannot be bound: without it the sidecar is unobservable)."""
        for verdict in await self.store.start(self._accept_remote, self._forget_remote):
            self.policy.accept(verdict, quiet=True)
        self.lifter.book.load()
        # The loaded verdicts live long; keep them out of the cyclic GC's full collections,
        # which otherwise stall the event loop ~80 ms per 100k objects (tests/bench).
        gc.collect()
        gc.freeze()
        self.loaded.set()
        self._spawn(self.lifter.poll_synapse(lambda: self.policy))
        self._list_stamp = self._list_files_stamp()
        self._spawn(self._watch_list_files())
        self._spawn(watch_loop_lag(self.metrics))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_lists)
        if self.settings.ops_listen is not None:
            self.ops = OpsServer(self)
            await self.ops.start(self.settings.ops_listen)

    def _accept_remote(self, verdict: Verdict) -> None:
        self.policy.accept(verdict)  # the policy of now: a reconfiguration may replace it

    def _forget_remote(self, name: str) -> None:
        self.policy.accept_forget(name)

    async def close(self) -> None:
        self.is_running = False
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.lifter.close()
        if self.ops is not None:
            await self.ops.stop()
            self.ops = None
        if self.prober is not None:
            await self.prober.close()
        self.dns.close()
        await self.store.close()

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- decisions (called by the proxy's hooks) ----------------------------------------

    async def decide(self, name: str) -> Entry:
        """The verdict for `name`: cached, else judged now (never before the stored
        verdicts are back)."""
        if not self.loaded.is_set():
            await self.loaded.wait()
        entry = self.policy.cached(name)
        return entry if entry is not None else await self.policy.decide(name)

    def suppress(self, entry: Entry, stage: str) -> bool:
        """Count a gone verdict; True when it must be enforced (not in shadow mode)."""
        verdict = entry.verdict
        if not verdict.suppresses:
            return False
        signal_name = str(verdict.signal)
        if not self.settings.enforce:
            self.metrics.would_suppress.labels(signal_name, stage).inc()
            return False
        entry.suppressed_count += 1
        self.metrics.suppressed.labels(signal_name, stage).inc()
        return True

    def forward(self, entry: Entry, stage: str) -> None:
        self.metrics.forwarded_by_stage[stage].inc()
        if entry.verdict.state is State.UNDECIDED:
            self.metrics.undecided.labels(stage).inc()

    def breaker_verdict(self, key: str) -> Verdict | None:
        """The unreachable verdict of an open breaker for `host:port`, else None."""
        if self.breaker.gate(key) is Gate.OPEN:
            return self.breaker.verdict(key)
        return None

    async def dial_addresses(self, host: str) -> FoundAddresses:
        """Where to connect for `host` now: its addresses within their own DNS TTL."""
        if not self.loaded.is_set():
            await self.loaded.wait()
        return await self.policy.dial_addresses(host)

    async def addresses_of(self, host: str) -> tuple[str, ...]:
        return (await self.dial_addresses(host)).addresses

    def allowed_address(self, addresses: tuple[str, ...]) -> str | None:
        address, _ = self.addresses.choose(addresses)
        return address

    async def checked_address(self, host: str) -> tuple[str | None, list[str], FoundAddresses]:
        """An address of `host` the address policy allows, within its DNS TTL; else None
        and the addresses it refused (counted in tombstone_blocked_address_total)."""
        found = await self.dial_addresses(host)
        address, refused = self.addresses.choose(found.addresses)
        if address is None and refused:
            self.metrics.blocked_address.inc()
        return address, refused, found

    def probe(self, name: str, seen: tuple[str, int], verdict: Verdict) -> None:
        """First sight of a live name, on connection target `seen`: learn in the background
        whether it answers 410, asking where Synapse would (remote/probe.py). Pass-through
        only: intercept mode reads the same 410s and keys in Synapse's own responses, and
        its probes were 960 needless request sets to 1,000 servers (tests/scale). An
        expiring 410 is re-checked in both modes (the policy's rechecker)."""
        prober = self.prober
        if self.settings.mode != "passthrough" or prober is None:
            return
        if verdict.state is State.ALIVE and prober.due(name):
            prober.schedule(name, seen, self._probed)

    def _probed(self, name: str, result: ProbeResult) -> None:
        if result.outcome == "gone":
            self.policy.learn_gone(name, result.lifetime, result.detail)
            return
        log.debug("probe of %s: %s", name, result.detail)
        route = result.route
        if route is not None and result.body:  # its key request answered: its identity now
            self.lifter.observe_keys(name, result.body, route.target, route.sni)

    def observe_keys(self, name: str, body: bytes, target: tuple[str, int]) -> None:
        """Intercept mode: the signing keys a live server published to Synapse."""
        entry = self.policy.cached(name)
        if entry is not None and entry.verdict.state is State.ALIVE:
            self.lifter.observe_keys(name, body, target)

    def prejudge_room(self, room: str, read: Callable[[], str], skip: frozenset[str]) -> None:
        """Intercept mode: a send_join answer passed. Judge the servers of the room in the
        background, so the fan-out after the join meets cached verdicts. `read` decodes the
        body (blocking: it runs in a thread); `skip` names servers not to judge."""
        if self.settings.prejudge_room:
            self._spawn(self._prejudge_room(room, read, skip))

    async def _prejudge_room(
        self, room: str, read: Callable[[], str], skip: frozenset[str]
    ) -> None:
        """Fails open: whatever goes wrong here, no request waited for it."""
        try:
            await self._prejudge(room, read, skip)
        except Exception:  # a bug must not go unnoticed; it affected no request
            log.exception("judging the servers of room %s in the background failed", room)

    async def _prejudge(self, room: str, read: Callable[[], str], skip: frozenset[str]) -> None:
        """Parse in slices (the event loop runs between them), then judge the names not
        cached, PREJUDGE_CONCURRENCY at a time across all rooms, DNS only: the same cold
        decision a first request makes, shared with it when both ask at once."""
        rooms, names = self.metrics.prejudge_rooms, self.metrics.prejudge_names
        try:
            servers = RoomServers(await asyncio.to_thread(read), skip)
            for _ in servers.slices():
                await asyncio.sleep(0)
        except Unreadable as e:
            rooms.labels("unreadable").inc()
            log.info("not judging the servers of room %s: %s", room, e)
            return
        rooms.labels("capped" if servers.capped else "read").inc()
        names.labels("invalid").inc(servers.invalid)
        names.labels("taken").inc(len(servers.names))
        log.info(
            "judging %d servers of room %s in the background%s",
            len(servers.names),
            room,
            " (the first ones: the room names more)" if servers.capped else "",
        )
        pending = iter(servers.names)

        def known(name: str) -> bool:  # without starting a re-check of an expired verdict
            return self.policy.is_listed(name) or self.policy.cache.get(name) is not None

        async def worker() -> None:
            for name in pending:
                if not known(name):
                    async with self._prejudging:
                        if not known(name):
                            await self.decide(name)
                            names.labels("judged").inc()
                            continue
                names.labels("cached").inc()

        await asyncio.gather(
            *(worker() for _ in range(min(PREJUDGE_CONCURRENCY, len(servers.names))))
        )

    def _verdict_counts(self) -> list[tuple[tuple[str, str], int]]:
        counts = self.policy.counts()
        open_breakers = len(self.breaker.open_verdicts())
        if open_breakers:
            counts.append(((State.UNREACHABLE.value, State.UNREACHABLE.value), open_breakers))
        return counts

    # -- operator lists ----------------------------------------------------------------

    def reload_lists(self) -> None:
        """Re-read --deny-file/--allow-file now (SIGHUP). The watcher does the work: off the
        event loop, one reload at a time; a bad file changes nothing."""
        self._lists_asked.set()

    async def _reload_lists(self, confirming: bool) -> bool:
        """Read the lists in a thread, apply them in slices (Policy.replace_deny); one INFO
        line. True when the deny file was emptied and needs confirming at the next poll."""
        settings, policy = self.settings, self.policy
        try:
            lists = await asyncio.to_thread(settings.read_lists)
        except ValueError as e:
            log.error("not reloading the operator lists: %s; keeping the previous lists", e)
            return False
        if self.settings is not settings or self.policy is not policy:
            return False  # reconfigured meanwhile: that configuration has the lists
        emptied = bool(settings.deny_file) and lists.deny_file_names == 0
        if emptied and policy.deny_count() > len(settings.deny_flags) and not confirming:
            # A rewrite caught halfway (truncated, not yet written) must not lift every deny.
            log.warning(
                "%s lists no names now; keeping the %d denied names until it is still empty "
                "at the next check in %gs (to avoid this pause, replace the file atomically: "
                "write a new file, then rename it over the old one)",
                settings.deny_file,
                policy.deny_count(),
                LIST_POLL_SECONDS,
            )
            return True
        policy.allow = lists.allow
        await policy.replace_deny(lists.deny, f"; allow list: {len(lists.allow)} (reloaded)")
        return False

    def _list_files_stamp(self) -> tuple[float, ...]:
        stamps = []
        for path in (self.settings.deny_file, self.settings.allow_file):
            try:
                stamps.append(os.stat(path).st_mtime if path else 0.0)
            except OSError:
                stamps.append(-1.0)
        return tuple(stamps)

    async def _watch_list_files(self) -> None:
        """Reload the operator lists when a file changes (polled), on SIGHUP, and once more
        to confirm a deny file that was emptied."""
        confirming = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._lists_asked.wait(), LIST_POLL_SECONDS)
            asked = self._lists_asked.is_set()
            self._lists_asked.clear()
            stamp = self._list_files_stamp()
            if not (asked or confirming or stamp != self._list_stamp):
                continue
            self._list_stamp = stamp
            try:
                confirming = await self._reload_lists(confirming)
            except Exception:  # a bug must not end the watcher: the next change tries again
                log.exception("reloading the operator lists failed; keeping what was applied")
                confirming = False

    # -- the ops API (OpsBackend) -------------------------------------------------------

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    @property
    def ops_token(self) -> str | None:
        return self.settings.ops_token

    def readiness(self) -> Readiness:
        ready = self.is_running and self.loaded.is_set()
        health = self.store.health()
        return Readiness(
            status="draining" if self.draining else "ready" if ready else "starting",
            proxy_running=self.is_running,
            enforce=self.settings.enforce,
            nameservers=self.dns.nameservers,
            verdicts_cached=len(self.policy.cache),
            store={"kind": health.store, "up": health.up, "detail": health.detail},
            dns=self.dns.health(),
        )

    def entries(self) -> list[Entry]:
        """Every verdict: names (policy) and open breakers (host:port)."""
        return [*self.policy.entries(), *(Entry(v) for v in self.breaker.open_verdicts())]

    def verdict(self, name: str) -> Entry | None:
        return self.policy.cached(name)

    def mark_gone(self, name: str, ttl: float, comment: str) -> Entry:
        return self.policy.mark_gone(name, ttl, comment)

    async def recheck(self, name: str) -> tuple[Entry, bool]:
        policy = self.policy
        if policy.is_listed(name):
            raise Listed(
                f"{name} is on --deny/--deny-file; remove it there (the file is reloaded on change)"
            )
        current = policy.cached(name)
        released = self.lifter.release(name, current.verdict if current is not None else None)
        try:
            entry = await policy.recheck(name)
        finally:
            self.lifter.release_done(name)
        return entry, released

    def resurrections(self) -> Resurrections:
        book = self.lifter.book
        # Released elsewhere (shared store): no longer held here either.
        held = [
            n
            for n in sorted(book.held)
            if (e := self.policy.cached(n)) is not None and is_hold(e.verdict)
        ]
        return Resurrections(list(book.resurrections), held)

    def synapse(self) -> dict[str, Any]:
        admin = self.lifter.admin
        if admin is None:
            raise Unavailable("no --synapse-admin-url configured")
        view = self.lifter.view
        return {
            "url": str(admin.endpoint),
            "state": admin.state,
            "detail": admin.detail,
            "polled_at": view.polled_at,
            "destinations": view.destinations,
            "truncated": view.truncated,
            "backing_off_gone": list(view.backing_off_gone),
        }


def standalone_policy(
    dns: DnsClient,
    metrics: Metrics,
    *,
    ttl: TtlBounds,
    cache_size: int,
    max_stale: float = 3600.0,
    clock: Callable[[], float] = time.time,
    deny: frozenset[str] = frozenset(),
    allow: frozenset[str] = frozenset(),
) -> Policy:
    """A policy over one resolver, alone: its own address book, verdicts in memory, no
    prober and no lifting. `check` judges one name with it, and the tests judge with it."""
    book = AddressBook(dns, metrics, max_stale=max_stale, maxsize=cache_size, clock=clock)
    return Policy(
        DnsQuestions(dns),
        addresses=book,
        store=VerdictStore(metrics),
        metrics=metrics,
        ttl=ttl,
        cache_size=cache_size,
        deny=deny,
        allow=allow,
        clock=clock,
    )


# -- building blocks from settings -------------------------------------------------------


def _dns_client(settings: Settings, metrics: Metrics) -> DnsClient:
    try:
        return DnsClient(
            settings.nameservers, settings.dns_timeout, metrics, settings.require_dnssec
        )
    except ValueError as e:
        raise ConfigError("nameserver", str(e)) from None


def _address_policy(settings: Settings) -> AddressPolicy:
    return AddressPolicy.default(
        settings.allow_addresses, own=(settings.listen, settings.ops_listen)
    )


def _key_book(settings: Settings) -> KeyBook:
    if settings.store == "memory":
        return KeyBook(None)
    return KeyBook(Path(settings.state_dir or default_state_dir()) / KEYS_FILE)


def _synapse_admin(settings: Settings, metrics: Metrics) -> SynapseAdmin | None:
    if not (settings.synapse_admin_url and settings.synapse_admin_token):
        return None
    endpoint = AdminEndpoint.parse(settings.synapse_admin_url)
    return SynapseAdmin(endpoint, settings.synapse_admin_token, metrics)
