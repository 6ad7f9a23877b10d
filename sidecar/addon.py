"""The mitmproxy addon: decision points at CONNECT, TLS ClientHello and server connect.

Pass-through mode (the default): the CONNECT target is judged first; a gone target is
answered at once and nothing is dialled. Otherwise the sidecar resolves the target itself,
refuses blocked address ranges, and remembers the address it checked for this tunnel. The
ClientHello's SNI is judged next (it names the server behind an SRV delegation); the tunnel
then passes through untouched, and `server_connect` dials the remembered address, or
refuses to dial at all when the SNI turned out to be gone. This needs mitmproxy's
`connection_strategy=lazy`, so that nothing is dialled before the SNI has been seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import re
import signal
import ssl
import time
import weakref
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import layer, server_hooks

from sidecar import answers, gone_http, request_classes, xmatrix
from sidecar.addresses import AddressPolicy
from sidecar.breaker import Breaker, BreakerSettings, Gate
from sidecar.dns_client import DnsClient
from sidecar.empty_connect import is_empty_host_connect, refuse_connection
from sidecar.gone_http import GoneTtl
from sidecar.identity import FILE_NAME as KEYS_FILE
from sidecar.identity import KEY_PATH, KeyBook, KeyFetcher
from sidecar.lifting import Lifter
from sidecar.loop_lag import watch_loop_lag
from sidecar.metrics import Metrics
from sidecar.names import InvalidName, is_ip_literal, normalize_host, parse_authority
from sidecar.ops_server import OpsServer
from sidecar.options import ADDON_OPTIONS, ConfigError, Option, Settings
from sidecar.policy import Policy, TtlBounds
from sidecar.probe import Prober, ProbeResult, ProbeSettings
from sidecar.store import default_state_dir, open_store
from sidecar.synapse_admin import AdminEndpoint, SynapseAdmin
from sidecar.verdicts import Entry, State, Verdict
from sidecar.xmatrix import XMatrixError

log = logging.getLogger("sidecar.addon")

LOCAL_ANSWER = "tombstone_local_answer"  # flow.metadata key: answered here, learn nothing
LIST_POLL_SECONDS = 2.0  # how soon an edited --deny-file/--allow-file takes effect


@dataclass(slots=True)
class Tunnel:
    """What the sidecar decided for one client connection's CONNECT."""

    host: str
    port: int
    address: str | None = None  # the checked address to dial (DNS-rebinding safe)
    doomed: Verdict | None = None  # set when the SNI names a gone server: never dial

    @property
    def key(self) -> str:
        """The unreachable breaker's key: `host:port` as the client asked for it."""
        return f"{self.host}:{self.port}"


@dataclass(slots=True)
class Dial:
    """One upstream connection attempt: what it counts for, and its deadline."""

    key: str
    timer: asyncio.TimerHandle | None = None
    timed_out: bool = False


def _mitm_type(option: Option) -> type:
    if option.flag:
        return bool
    if option.repeatable:
        return Sequence[str]  # type: ignore[return-value,unused-ignore]
    return str


class TombstoneAddon:
    """Suppresses traffic to decommissioned Matrix servers; see the module docstring."""

    def __init__(self) -> None:
        self.metrics = Metrics()
        self.settings: Settings | None = None
        self.policy: Policy | None = None
        self.addresses = AddressPolicy.default()
        self.tunnels: MutableMapping[connection.Client, Tunnel] = weakref.WeakKeyDictionary()
        self.dials: MutableMapping[connection.Server, Dial] = weakref.WeakKeyDictionary()
        self.handshaking: MutableMapping[connection.Server, str] = weakref.WeakKeyDictionary()
        self.upstream_names: MutableMapping[connection.Client, dict[tuple[str, int], str]] = (
            weakref.WeakKeyDictionary()
        )
        self.gone_ttl = GoneTtl(86400, 3600, 30 * 86400)
        self.breaker: Breaker | None = None
        self.prober: Prober | None = None
        self.active_clients = 0
        self.idle = asyncio.Event()  # set whenever the last client connection closes
        self.draining = False
        self.ops: OpsServer | None = None
        self.is_running = False
        self.fatal: str | None = None  # why the sidecar had to stop, for the CLI's exit message
        self.loaded = asyncio.Event()  # stored verdicts are in the cache: decisions may start
        self._watcher: asyncio.Task[None] | None = None
        self.lifter: Lifter | None = None
        self._poller: asyncio.Task[None] | None = None
        self._lag: asyncio.Task[None] | None = None
        self._list_stamp: tuple[float, ...] = ()

    # -- lifecycle ---------------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        for option in ADDON_OPTIONS:
            default = list(option.default) if option.repeatable else option.default
            loader.add_option(option.mitm, _mitm_type(option), default, option.help)

    def configure(self, updated: set[str]) -> None:
        if self.settings is not None and not any(o.mitm in updated for o in ADDON_OPTIONS):
            return
        raw = {o.name: getattr(ctx.options, o.mitm) for o in ADDON_OPTIONS}
        try:
            settings = Settings.from_raw(raw)
        except ConfigError as e:
            raise exceptions.OptionsError(e.for_mitmproxy()) from None
        self.apply(settings)

    def apply(self, settings: Settings) -> None:
        """Build or rebuild the decision machinery; the verdict cache survives list changes."""
        previous = self.settings
        try:
            dns = DnsClient(settings.nameservers, settings.dns_timeout, self.metrics,
                            settings.require_dnssec)  # fmt: skip
        except ValueError as e:
            raise exceptions.OptionsError(f"tombstone_nameserver: {e}") from None
        ttl = TtlBounds(settings.min_ttl, settings.max_ttl)
        if self.policy is not None:
            self.policy.dns.close()  # lookups in flight on it finish first
        if self.policy is None or previous is None or previous.cache_size != settings.cache_size:
            self.policy = Policy(
                dns,
                metrics=self.metrics,
                ttl=ttl,
                cache_size=settings.cache_size,
                deny=settings.deny,
                allow=settings.allow,
                store=self.policy.store if self.policy is not None else None,
            )
        else:
            self.policy.dns, self.policy.ttl, self.policy.allow = dns, ttl, settings.allow
            self.policy.set_deny(settings.deny)
        self.addresses = AddressPolicy.default(settings.allow_addresses)
        breaker = BreakerSettings(settings.breaker_failures, settings.breaker_min,
                                  settings.breaker_max, settings.breaker_max_share)  # fmt: skip
        if self.breaker is None:
            self.breaker = Breaker(breaker, self.metrics)
        else:
            self.breaker.settings = breaker
        self.gone_ttl = GoneTtl(settings.gone_ttl, settings.min_gone_ttl, settings.max_gone_ttl)
        self.prober = self._make_prober(settings) if settings.probe else None
        self.policy.prober = self.prober
        self.lifter = self._make_lifter(settings, self.lifter)
        self.policy.lift_guard = self.lifter.guard
        self.policy.on_lifted = self.lifter.lifted
        self.metrics.watch_verdicts(self._verdict_counts)
        self.settings = settings
        if not settings.enforce and (previous is None or previous.enforce):
            log.warning("shadow mode (--no-enforce): verdicts are counted, nothing is suppressed")

    async def running(self) -> None:
        assert self.settings is not None and self.policy is not None
        store = open_store(self.settings.store, self.settings.state_dir, self.metrics)
        self.policy.store = store
        for verdict in await store.start(self.policy.accept, self.policy.accept_forget):
            self.policy.accept(verdict, quiet=True)
        # The loaded verdicts live long; keep them out of the cyclic GC's full collections,
        # which otherwise stall the event loop ~80 ms per 100k objects (tests/bench).
        assert self.lifter is not None
        self.lifter.store = store
        self.lifter.book.load()
        gc.collect()
        gc.freeze()
        self.loaded.set()
        self._poller = asyncio.create_task(self.lifter.poll_synapse(lambda: self.policy))
        self._list_stamp = self._list_files_stamp()
        self._watcher = asyncio.create_task(self._watch_list_files())
        self._lag = asyncio.create_task(watch_loop_lag(self.metrics))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_lists)
        if self.settings.ops_listen is not None:
            self.ops = OpsServer(self)
            try:
                await self.ops.start(self.settings.ops_listen)
            except OSError as e:
                # Without its ops listener the sidecar would be unobservable and never ready.
                self.fatal = str(e)
                log.error("%s; stopping", e)
                ctx.master.shutdown()
                return
        self.is_running = True

    async def done(self) -> None:
        self.is_running = False
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        if self._lag is not None:
            self._lag.cancel()
            self._lag = None
        if self.lifter is not None:
            await self.lifter.close()
        if self.ops is not None:
            await self.ops.stop()
            self.ops = None
        if self.prober is not None:
            await self.prober.close()
        if self.policy is not None:
            self.policy.dns.close()
            await self.policy.store.close()

    # -- operator lists ----------------------------------------------------------------------

    def reload_lists(self) -> None:
        """Re-read --deny-file/--allow-file (on change or SIGHUP); a bad file changes nothing."""
        if self.settings is None or self.policy is None:
            return
        try:
            deny, allow = self.settings.read_lists()
        except ValueError as e:
            log.error("not reloading the operator lists: %s; keeping the previous lists", e)
            return
        self.policy.allow = allow
        self.policy.set_deny(deny)
        log.info("operator lists reloaded: %d denied, %d allowed", len(deny), len(allow))

    def _list_files_stamp(self) -> tuple[float, ...]:
        stamps = []
        for path in (self._settings.deny_file, self._settings.allow_file):
            try:
                stamps.append(os.stat(path).st_mtime if path else 0.0)
            except OSError:
                stamps.append(-1.0)
        return tuple(stamps)

    async def _watch_list_files(self) -> None:
        while True:
            await asyncio.sleep(LIST_POLL_SECONDS)
            stamp = self._list_files_stamp()
            if stamp != self._list_stamp:
                self._list_stamp = stamp
                self.reload_lists()

    # -- decision points -----------------------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        self.active_clients += 1
        self.idle.clear()

    def client_disconnected(self, client: connection.Client) -> None:
        self.active_clients -= 1
        if self.active_clients <= 0:
            self.idle.set()

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """`CONNECT :0` (Synapse's request for an SRV target "."): closed like any refusal
        instead of mitmproxy's own 400, which Synapse would log as a CRITICAL traceback."""
        settings = self.settings
        if settings is None or settings.refusal != "close" or not settings.enforce:
            return
        if is_empty_host_connect(nextlayer):
            refuse_connection(nextlayer)
            self.metrics.invalid_input.labels("connect").inc()

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return  # already answered (by another addon: 407 from admission, ...)
        started = time.perf_counter()
        try:
            host = normalize_host(flow.request.host)
        except InvalidName as e:
            self.metrics.invalid_input.labels("connect").inc()
            flow.response = answers.bad_target(str(e))
            return
        tunnel = Tunnel(host, flow.request.port)
        self.tunnels[flow.client_conn] = tunnel
        entry = await self._decide(host)
        if self._settings.mode == "intercept" and entry.verdict.suppresses:
            # Accept: every request inside is answered by its request class (a user-facing
            # 410 that names the server, a failover 502), which a refused CONNECT cannot do.
            self.metrics.decision_by_stage["connect"].observe(time.perf_counter() - started)
            return
        try:
            if self._suppress(entry, "connect"):
                self._refuse_connect(flow, entry.verdict)
                return
            flow.response = self._pin_address(tunnel, entry.verdict)
            if flow.response is not None:
                return
            broken = self._breaker_verdict(tunnel.key)
            if broken is not None and self._suppress(Entry(broken), "connect"):
                self._refuse_connect(flow, broken)
                return
            self._forward(entry, "connect")
            self._probe(host, (host, tunnel.port), entry.verdict)
        finally:
            self.metrics.decision_by_stage["connect"].observe(time.perf_counter() - started)

    async def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        # pass-through: TLS stays end to end; intercept: mitmproxy terminates it with our CA
        data.ignore_connection = self._settings.mode == "passthrough"
        sni = data.client_hello.sni
        if not sni:
            return
        tunnel = self.tunnels.get(data.context.client)
        started = time.perf_counter()
        try:
            name = normalize_host(sni)
        except InvalidName as e:
            self.metrics.invalid_input.labels("sni").inc()
            log.debug("ignoring malformed SNI %r: %s", sni[:100], e)
            return
        if tunnel is not None and name == tunnel.host:
            return  # judged at CONNECT already
        if self._settings.mode == "intercept":
            return  # each request inside is judged by its own destination
        entry = await self._decide(name)
        if self._suppress(entry, "tls"):
            if tunnel is None:
                tunnel = self.tunnels[data.context.client] = Tunnel(name, 0)
            tunnel.doomed = entry.verdict
            data.ignore_connection = True  # not even intercepted: server_connect refuses
        else:
            self._forward(entry, "tls")
            target = (tunnel.host, tunnel.port) if tunnel is not None else (name, 8448)
            self._probe(name, target, entry.verdict)
        self.metrics.decision_by_stage["tls"].observe(time.perf_counter() - started)

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Every HTTP request the proxy sees: plain-HTTP proxy requests, and in intercept
        mode each request inside a (pooled) tunnel, judged by its own destination."""
        if flow.response is not None or flow.request.method == "CONNECT":
            return
        started = time.perf_counter()
        try:
            name = self._destination(flow)
        except (InvalidName, XMatrixError) as e:
            self.metrics.invalid_input.labels("request").inc()
            flow.response = answers.bad_target(str(e))
            flow.metadata[LOCAL_ANSWER] = True
            return
        entry = await self._decide(name)
        if not entry.verdict.suppresses and flow.client_conn in self.tunnels:
            broken = self._breaker_verdict(
                f"{normalize_host(flow.request.host)}:{flow.request.port}"
            )
            entry = Entry(broken) if broken is not None else entry
        if self._suppress(entry, "request"):
            cls = request_classes.classify(flow.request.path)
            status = self._settings.answer_status[cls]
            flow.response = answers.request_refused(entry.verdict, status, cls)
            flow.metadata[LOCAL_ANSWER] = True
        else:
            self._forward(entry, "request")
            if flow.client_conn in self.tunnels and self._settings.mode == "intercept":
                await self._pin_request(flow)
        self.metrics.decision_by_stage["request"].observe(time.perf_counter() - started)

    async def _pin_request(self, flow: http.HTTPFlow) -> None:
        """Intercept mode: send this request to the checked address of its host.

        mitmproxy pools upstream connections by the request's (host, port), and allows only
        five per address per client; dialling by a different address than the request
        names would open a new connection per request until the tunnel stalls. So the
        request itself names the checked IP (its Host header is untouched), and
        server_connect puts the server name back as the TLS SNI for that connection.
        """
        host = normalize_host(flow.request.host)
        if is_ip_literal(host):
            return  # server_connect checks literals itself
        target = await self._decide(host)
        address, refused = self.addresses.choose(target.verdict.addresses)
        if address is None:
            if refused:
                self.metrics.blocked_address.inc()
                flow.response = answers.blocked_address(host, refused)
            else:
                reason = self._no_address_reason(host, target.verdict, refused)
                flow.response = answers.unresolvable(host, reason)
            flow.metadata[LOCAL_ANSWER] = True
            return
        names = self.upstream_names.setdefault(flow.client_conn, {})
        names[(address, flow.request.port)] = host
        flow.request.data.host = address

    def response(self, flow: http.HTTPFlow) -> None:
        """Passive 410 learning from real responses, keyed by the request's destination."""
        response = flow.response
        if response is None or flow.metadata.get(LOCAL_ANSWER):
            return
        if response.status_code == 200 and flow.request.path.startswith(KEY_PATH):
            self._observe_keys(flow)
            return
        if not gone_http.is_tombstone(response.status_code, flow.request.path):
            return
        try:
            name = self._destination(flow)
        except (InvalidName, XMatrixError):
            return
        assert self.policy is not None
        seconds = gone_http.lifetime(response.headers, self.gone_ttl)
        where = f"https://{flow.request.host_header or flow.request.host}"
        path = flow.request.path.split("?", 1)[0]
        self.policy.learn_gone(name, seconds, gone_http.evidence(410, path, where, seconds))

    def _observe_keys(self, flow: http.HTTPFlow) -> None:
        """Intercept mode: record the signing keys an alive server published to Synapse."""
        assert self.policy is not None and self.lifter is not None and flow.response is not None
        try:
            name = self._destination(flow)
        except (InvalidName, XMatrixError):
            return
        entry = self.policy.cached(name)
        if entry is not None and entry.verdict.state is State.ALIVE:
            port = flow.request.port
            pinned = self.upstream_names.get(flow.client_conn, {}).get((flow.request.host, port))
            target = (pinned or normalize_host(flow.request.host), port)  # a name, not the IP
            self.lifter.observe_keys(name, flow.response.content or b"", target)

    def _destination(self, flow: http.HTTPFlow) -> str:
        """X-Matrix `destination`, else the Host header, else the request's host."""
        named = xmatrix.destination(flow.request.headers.get("Authorization"))
        if named is not None:
            return parse_authority(named).host
        host = flow.request.host_header
        if host:
            return parse_authority(host).host
        return normalize_host(flow.request.host)

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Last gate before dialling: never a gone SNI, never an unchecked address."""
        if data.server.address is None:
            return
        tunnel = self.tunnels.get(data.client)
        if tunnel is not None and tunnel.doomed is not None:
            data.server.error = answers.gone_message(tunnel.doomed)
            return
        raw_host, port = data.server.address
        named = self.upstream_names.get(data.client, {}).get((raw_host, port))
        if named is not None:  # an intercepted request already pinned to its checked address
            data.server.sni = named
            self._start_dial(data.server, f"{named}:{port}")
            return
        try:
            host = normalize_host(raw_host)
        except InvalidName as e:
            data.server.error = f"invalid upstream host: {e}"
            return
        if tunnel is not None and tunnel.address and (host, port) == (tunnel.host, tunnel.port):
            assert self.policy is not None
            late = self.policy.cached(host)  # judged gone since the CONNECT (a probe, a peer)?
            passthrough = self._settings.mode == "passthrough"  # intercept: per request
            if passthrough and late is not None and self._suppress(late, "tls"):
                data.server.error = answers.gone_message(late.verdict)
                return
            data.server.address = (tunnel.address, port)
        else:
            entry = await self._decide(host)
            address, refused = self.addresses.choose(entry.verdict.addresses)
            if address is None:
                if refused:
                    self.metrics.blocked_address.inc()
                data.server.error = self._no_address_reason(host, entry.verdict, refused)
                return
            data.server.address = (address, port)
        self._start_dial(data.server, f"{host}:{port}")

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        dial = self.dials.pop(data.server, None)
        if dial is None:
            return
        if dial.timer is not None:
            dial.timer.cancel()
        if self._settings.mode == "intercept":
            self.handshaking[data.server] = dial.key  # TLS decides success (tls_*_server)
        else:
            assert self.breaker is not None
            self.breaker.success(dial.key)

    def tls_established_server(self, data: tls.TlsData) -> None:
        key = self.handshaking.pop(data.conn, None)  # type: ignore[call-overload]
        if key is not None:
            assert self.breaker is not None
            self.breaker.success(key)

    def tls_failed_server(self, data: tls.TlsData) -> None:
        key = self.handshaking.pop(data.conn, None)  # type: ignore[call-overload]
        if key is not None:
            assert self.breaker is not None
            self.metrics.upstream_errors.labels("tls").inc()
            self.breaker.failure(key, f"TLS handshake failed: {data.conn.error}")

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        dial = self.dials.pop(data.server, None)
        if dial is None:
            return  # refused by us before dialling: not the upstream's failure
        if dial.timer is not None:
            dial.timer.cancel()
        if dial.timed_out:
            kind, error = "timeout", f"no connection within {self._settings.connect_timeout:g}s"
            data.server.error = (
                f"connect to {dial.key} timed out after {self._settings.connect_timeout:g}s"
            )
        else:
            error = str(data.server.error or "unknown error")
            kind = _error_kind(error)
        self.metrics.upstream_errors.labels(kind).inc()
        log.debug("%s", data.server.error if dial.timed_out else f"connect to {dial.key}: {error}")
        assert self.breaker is not None
        self.breaker.failure(dial.key, error)

    def _start_dial(self, server: connection.Server, key: str) -> None:
        """Remember what this attempt counts for; arm --connect-timeout.

        mitmproxy has no connect timeout (mitmproxy#1095). This hook runs inside the task
        that will dial, so cancelling that task at the deadline is mitmproxy's own path for
        an abandoned connect: it records the error and fires server_connect_error.
        """
        dial = self.dials[server] = Dial(key)
        task = asyncio.current_task()
        if task is not None:
            dial.timer = asyncio.get_running_loop().call_later(
                self._settings.connect_timeout, self._abandon, server, dial, task
            )

    @staticmethod
    def _abandon(server: connection.Server, dial: Dial, task: asyncio.Task[object]) -> None:
        if server.timestamp_tcp_setup is None and server.error is None and not task.done():
            dial.timed_out = True
            task.cancel()

    # -- helpers --------------------------------------------------------------------------

    @property
    def _settings(self) -> Settings:
        # No assertion: mitmproxy's command collector reads every attribute at load time.
        return cast(Settings, self.settings)

    async def _decide(self, name: str) -> Entry:
        assert self.policy is not None
        if not self.loaded.is_set():
            await self.loaded.wait()  # never judge before the stored verdicts are back
        entry = self.policy.cached(name)
        return entry if entry is not None else await self.policy.decide(name)

    def _suppress(self, entry: Entry, stage: str) -> bool:
        """Count a gone verdict; True when it must be enforced (not in shadow mode)."""
        verdict = entry.verdict
        if not verdict.suppresses:
            return False
        signal = str(verdict.signal)
        if not self._settings.enforce:
            self.metrics.would_suppress.labels(signal, stage).inc()
            return False
        entry.suppressed_count += 1
        self.metrics.suppressed.labels(signal, stage).inc()
        return True

    def _forward(self, entry: Entry, stage: str) -> None:
        self.metrics.forwarded_by_stage[stage].inc()
        if entry.verdict.state is State.UNDECIDED:
            self.metrics.undecided.labels(stage).inc()

    def entries(self) -> list[Entry]:
        """Every verdict for the ops API: names (policy) and open breakers (host:port)."""
        assert self.policy is not None and self.breaker is not None
        return [*self.policy.entries(), *(Entry(v) for v in self.breaker.open_verdicts())]

    def _verdict_counts(self) -> list[tuple[tuple[str, str], int]]:
        assert self.policy is not None and self.breaker is not None
        counts = self.policy.counts()
        open_breakers = len(self.breaker.open_verdicts())
        if open_breakers:
            counts.append(((State.UNREACHABLE.value, State.UNREACHABLE.value), open_breakers))
        return counts

    def _make_prober(self, settings: Settings) -> Prober:
        probe = ProbeSettings(
            timeout=settings.probe_timeout,
            concurrency=settings.probe_concurrency,
            interval=settings.probe_interval,
            ttl=self.gone_ttl,
            ca_file=settings.upstream_ca or None,
        )
        return Prober(probe, self.metrics, self.addresses, self._addresses_of)

    def _make_lifter(self, settings: Settings, previous: Lifter | None) -> Lifter:
        """Key checks and the Synapse link; the key book survives a reconfiguration."""
        admin = None
        if settings.synapse_admin_url and settings.synapse_admin_token:
            endpoint = AdminEndpoint.parse(settings.synapse_admin_url)
            admin = SynapseAdmin(endpoint, settings.synapse_admin_token, self.metrics)
        if previous is not None:
            book = previous.book
        elif settings.store == "memory":
            book = KeyBook(None)
        else:
            book = KeyBook(Path(settings.state_dir or default_state_dir()) / KEYS_FILE)
        context = ssl.create_default_context()
        if settings.upstream_ca:
            context.load_verify_locations(settings.upstream_ca)
        fetcher = KeyFetcher(context, settings.probe_timeout, self._addresses_of,
                             self._allowed_address)  # fmt: skip
        if previous is not None:  # a running poller and pending holds keep their Lifter
            previous.fetcher, previous.admin = fetcher, admin
            previous.hold_reborn = settings.hold_reborn
            previous.poll_interval = settings.synapse_admin_poll
            return previous
        return Lifter(self.metrics, book, fetcher=fetcher, admin=admin,
                      hold_reborn=settings.hold_reborn,
                      poll_interval=settings.synapse_admin_poll)  # fmt: skip

    def _allowed_address(self, addresses: tuple[str, ...]) -> str | None:
        address, _ = self.addresses.choose(addresses)
        return address

    async def _addresses_of(self, host: str) -> tuple[str, ...]:
        return (await self._decide(host)).verdict.addresses

    def _probe(self, name: str, target: tuple[str, int], verdict: Verdict) -> None:
        """First sight of a live name: learn in the background whether it answers 410."""
        if self.prober is not None and verdict.state is State.ALIVE and self.prober.due(name):
            self.prober.schedule(name, target, lambda n, r: self._probed(n, r, target))

    def _probed(self, name: str, result: ProbeResult, target: tuple[str, int]) -> None:
        assert self.policy is not None
        if result.outcome == "gone":
            self.policy.learn_gone(name, result.lifetime, result.detail)
            return
        log.debug("probe of %s: %s", name, result.detail)
        if result.outcome == "answered" and self.lifter is not None:
            self.lifter.record_keys(name, target)  # alive: what identity it has now

    def _refuse_connect(self, flow: http.HTTPFlow, verdict: Verdict) -> None:
        """Refuse a CONNECT to a gone destination as --refusal says.

        `close` ends the connection without a byte (mitmproxy kills the flow). Synapse
        treats that exactly like a 502 — same error to the user, same backoff — but a
        non-200 answer makes it log a CRITICAL traceback per refusal (measured in
        tests/e2e/test_s5_synapse_log.py), so closing is the default.
        """
        if self._settings.refusal == "close":
            flow.kill()
        else:
            flow.response = answers.suppressed(verdict, self._settings.suppress_status)

    def _breaker_verdict(self, key: str) -> Verdict | None:
        assert self.breaker is not None
        if self.breaker.gate(key) is Gate.OPEN:
            return self.breaker.verdict(key)
        return None

    def _pin_address(self, tunnel: Tunnel, verdict: Verdict) -> http.Response | None:
        """Choose the address to dial for this tunnel, or the answer that refuses it."""
        address, refused = self.addresses.choose(verdict.addresses)
        if address is not None:
            tunnel.address = address
            return None
        if refused:
            self.metrics.blocked_address.inc()
            return answers.blocked_address(tunnel.host, refused)
        self.metrics.upstream_errors.labels("resolve").inc()
        if verdict.state is not State.UNDECIDED:  # DNS says: no address. Not our failure.
            assert self.breaker is not None
            self.breaker.failure(tunnel.key, "no A or AAAA records")
        return answers.unresolvable(
            tunnel.host, self._no_address_reason(tunnel.host, verdict, refused)
        )

    def _no_address_reason(self, host: str, verdict: Verdict, refused: list[str]) -> str:
        if refused:
            return f"{host} resolves only to blocked addresses: {', '.join(refused[:4])}"
        if verdict.state is State.UNDECIDED:
            return f"DNS did not answer for {host}: {verdict.evidence}"
        return f"{host} has no A or AAAA records"


_ERRNO_KINDS = {
    errno.ECONNREFUSED: "refused",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.ETIMEDOUT: "timeout",
}


def _error_kind(error: str) -> str:
    """A small fixed set of labels for `tombstone_upstream_errors_total{kind}`.

    asyncio reports a failed connect as "[Errno 111] Connect call failed (...)"; the errno
    says what happened, the words do not.
    """
    match = re.match(r"\[Errno (\d+)\]", error)
    if match:
        return _ERRNO_KINDS.get(int(match.group(1)), "other")
    text = error.lower()
    if "refused" in text:
        return "refused"
    if "unreachable" in text or "no route" in text:
        return "unreachable"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    return "other"
