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
import traceback
import weakref
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import layer, server_hooks
from mitmproxy.utils import human
from prometheus_client import CollectorRegistry

from sidecar import __version__
from sidecar.config.options import (
    ADDON_OPTIONS,
    MITMPROXY,
    ConfigError,
    Option,
    RawOptions,
    Settings,
)
from sidecar.dns.address_book import AddressSet
from sidecar.dns.client import DnsClient
from sidecar.judge import gone_http, request_classes
from sidecar.judge.breaker import Breaker, BreakerSettings, Gate
from sidecar.judge.gone_http import GoneTtl
from sidecar.judge.names import InvalidName, is_ip_literal, normalize_host, parse_authority
from sidecar.judge.policy import Policy, TtlBounds
from sidecar.judge.verdicts import Entry, State, Verdict
from sidecar.metrics import Metrics
from sidecar.ops.backend import Listed, Readiness, Resurrections, Unavailable
from sidecar.ops.loop_lag import watch_loop_lag
from sidecar.ops.server import OpsServer
from sidecar.proxy import answers, xmatrix
from sidecar.proxy.empty_connect import (
    EMPTY_HOST,
    accept_empty_host,
    is_empty_host_connect,
    refuse_connection,
)
from sidecar.proxy.xmatrix import XMatrixError
from sidecar.remote.addresses import AddressPolicy
from sidecar.remote.identity import FILE_NAME as KEYS_FILE
from sidecar.remote.identity import KEY_PATH, KeyBook, KeyFetcher
from sidecar.remote.probe import Prober, ProbeResult, ProbeSettings
from sidecar.store.base import default_state_dir
from sidecar.store.open import open_store
from sidecar.synapse.admin import AdminEndpoint, SynapseAdmin
from sidecar.synapse.lifting import Lifter, is_hold

log = logging.getLogger("sidecar.addon")

LOCAL_ANSWER = "tombstone_local_answer"  # flow.metadata key: answered here, learn nothing
LIST_POLL_SECONDS = 2.0  # how soon an edited --deny-file/--allow-file takes effect
HOOK_ERROR_LOG_INTERVAL = 60.0  # a failing hook logs one ERROR line a minute, not per connection


@dataclass(slots=True)
class Tunnel:
    """What the sidecar decided for one client connection's CONNECT."""

    host: str
    port: int
    address: str | None = None  # the checked address to dial (DNS-rebinding safe)
    doomed: Verdict | None = None  # set when the SNI names a gone server: never dial
    empty: bool = False  # `CONNECT :0` accepted in intercept mode: nothing is ever dialled
    sni: str | None = None  # for an empty tunnel: the server name the client meant

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
        # Clients on which a decision hook failed: nothing is dialled for them (fail closed).
        self.refused: MutableMapping[connection.Client, bool] = weakref.WeakKeyDictionary()
        self._hook_errors_logged: dict[str, float] = {}
        self.upstream_names: MutableMapping[connection.Client, dict[tuple[str, int], str]] = (
            weakref.WeakKeyDictionary()
        )
        self.gone_ttl = GoneTtl(86400, 86400, 90 * 86400)  # until configure; MSC4188
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
        self._lists_asked = asyncio.Event()  # SIGHUP: reload now, not at the next poll

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
            settings = Settings.from_raw(RawOptions(raw, fallback=MITMPROXY))
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
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
                max_stale=settings.dns_max_stale,
                deny=settings.deny,
                allow=settings.allow,
                store=self.policy.store if self.policy is not None else None,
            )
        else:
            self.policy.use_dns(dns)
            self.policy.addresses.max_stale = settings.dns_max_stale
            self.policy.ttl, self.policy.allow = ttl, settings.allow
            self.policy.set_deny(settings.deny)
        self.addresses = AddressPolicy.default(
            settings.allow_addresses, own=(settings.listen, settings.ops_listen)
        )
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
        self._log_listening()

    def _log_listening(self) -> None:
        """The start-up line, written once the proxy port is bound (mitmproxy binds before
        `running`), with the addresses it really listens on."""
        proxyserver = ctx.master.addons.get("proxyserver")
        bound = sorted({human.format_address(address)
                        for server in getattr(proxyserver, "servers", ())
                        for address in server.listen_addrs})  # fmt: skip
        where = ", ".join(f"http://{b}" for b in bound) or "no address"
        enforcing = "enforcing" if self._settings.enforce else "shadow mode (--no-enforce)"
        log.info("tombstone-sidecar %s: proxy listening on %s (%s), %s", __version__, where,
                 self._settings.mode, enforcing)  # fmt: skip

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
        """Re-read --deny-file/--allow-file now (SIGHUP). The watcher does the work: off the
        event loop, one reload at a time; a bad file changes nothing."""
        self._lists_asked.set()

    async def _reload_lists(self, confirming: bool) -> bool:
        """Read the lists in a thread, apply them in slices (Policy.replace_deny); one INFO
        line. True when the deny file was emptied and needs confirming at the next poll."""
        settings, policy = self.settings, self.policy
        if settings is None or policy is None:
            return False
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
                settings.deny_file, policy.deny_count(), LIST_POLL_SECONDS,
            )  # fmt: skip
            return True
        policy.allow = lists.allow
        await policy.replace_deny(lists.deny, f"; allow list: {len(lists.allow)} (reloaded)")
        return False

    def _list_files_stamp(self) -> tuple[float, ...]:
        stamps = []
        for path in (self._settings.deny_file, self._settings.allow_file):
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

    # -- decision points -----------------------------------------------------------------
    #
    # The guard fails closed: each hook that lets something through (a tunnel, a request,
    # a dial) is a thin wrapper that refuses on any exception of the decision inside it —
    # otherwise mitmproxy would log "Addon error", answer the CONNECT 200 and dial the raw
    # name itself, past the address check. The judge fails open inside (a DNS failure is
    # an undecided verdict, never an exception and never a refusal).

    def client_connected(self, client: connection.Client) -> None:
        self.active_clients += 1
        self.idle.clear()

    def client_disconnected(self, client: connection.Client) -> None:
        self.active_clients -= 1
        if self.active_clients <= 0:
            self.idle.set()

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        try:
            self._next_layer(nextlayer)
        except Exception as e:
            self._hook_failed("next_layer", e)
            refuse_connection(nextlayer)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        try:
            await self._connect(flow)
        except Exception as e:
            self._hook_failed("http_connect", e)
            flow.response = answers.internal_error("CONNECT")

    async def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        try:
            await self._clienthello(data)
        except Exception as e:
            self._hook_failed("tls_clienthello", e)
            self.refused[data.context.client] = True  # server_connect will not dial
            data.ignore_connection = True

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            await self._request(flow)
        except Exception as e:
            self._hook_failed("requestheaders", e)
            flow.response = answers.internal_error("request")
            flow.metadata[LOCAL_ANSWER] = True

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        try:
            await self._server_connect(data)
        except Exception as e:
            self._hook_failed("server_connect", e)
            self.dials.pop(data.server, None)
            data.server.error = "refused: internal error in tombstone-sidecar (see its log)"

    def _next_layer(self, nextlayer: layer.NextLayer) -> None:
        """`CONNECT :0` (Synapse's request for an SRV target "."). Intercept mode accepts
        it under a placeholder host that is never dialled, so that each request inside is
        answered by its destination; pass-through closes it like any refusal instead of
        mitmproxy's own 400, which Synapse would log as a CRITICAL traceback."""
        settings = self.settings
        if settings is None or not is_empty_host_connect(nextlayer):
            return
        if settings.mode == "intercept":
            if accept_empty_host(nextlayer):
                return
        elif settings.refusal != "close" or not settings.enforce:
            return
        refuse_connection(nextlayer)
        self.metrics.invalid_input.labels("connect").inc()

    async def _connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return  # already answered (by another addon: 407 from admission, ...)
        started = time.perf_counter()
        if flow.request.host == EMPTY_HOST:
            # CONNECT :0, intercept mode (see _next_layer): accepted, nothing ever dialled.
            self.tunnels[flow.client_conn] = Tunnel(EMPTY_HOST, flow.request.port, empty=True)
            self.metrics.decision_by_stage["connect"].observe(time.perf_counter() - started)
            return
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
            # Nothing is ever dialled for it (see _request: the host it would go to is gone).
            self.metrics.decision_by_stage["connect"].observe(time.perf_counter() - started)
            return
        try:
            if self._suppress(entry, "connect"):
                self._refuse_connect(flow, entry.verdict)
                return
            flow.response = await self._pin_address(tunnel)
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

    async def _clienthello(self, data: tls.ClientHelloData) -> None:
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
        if tunnel is not None and tunnel.empty:
            tunnel.sni = name  # CONNECT :0: the server Synapse meant
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

    async def _request(self, flow: http.HTTPFlow) -> None:
        """Every HTTP request the proxy sees: plain-HTTP proxy requests, and in intercept
        mode each request inside a (pooled) tunnel.

        The rule, for every mode and path: a request is answered here when the host it
        would be sent to is gone, or the server it is for (X-Matrix destination, else
        Host) is gone; the answer names whichever is gone (the server it is for first).
        """
        if flow.response is not None or flow.request.method == "CONNECT":
            return
        tunnel = self.tunnels.get(flow.client_conn)
        started = time.perf_counter()
        try:
            name = self._destination(flow, tunnel)
            host = (
                None if tunnel is not None and tunnel.empty else normalize_host(flow.request.host)
            )
        except (InvalidName, XMatrixError) as e:
            self.metrics.invalid_input.labels("request").inc()
            flow.response = answers.bad_target(str(e))
            flow.metadata[LOCAL_ANSWER] = True
            return
        entry = await self._decide(name)
        if not entry.verdict.suppresses and host is not None and host != name:
            via = await self._decide(host)  # e.g. the delegated federation host is gone
            entry = via if via.verdict.suppresses else entry
        if not entry.verdict.suppresses and tunnel is not None and host is not None:
            broken = self._breaker_verdict(f"{host}:{flow.request.port}")
            entry = Entry(broken) if broken is not None else entry
        if self._suppress(entry, "request"):
            if tunnel is None:  # plain HTTP (URL previews): --suppress-status, as its help says
                flow.response = answers.suppressed(entry.verdict, self._settings.suppress_status)
            else:
                cls = request_classes.classify(flow.request.path)
                status = self._settings.answer_status[cls]
                flow.response = answers.request_refused(entry.verdict, status, cls)
            flow.metadata[LOCAL_ANSWER] = True
        elif host is None:
            # CONNECT :0 and the server it is for is not gone: there is nowhere to send it.
            flow.response = answers.nowhere(name)
            flow.metadata[LOCAL_ANSWER] = True
        else:
            self._forward(entry, "request")
            await self._pin_request(flow, host)
        self.metrics.decision_by_stage["request"].observe(time.perf_counter() - started)

    async def _pin_request(self, flow: http.HTTPFlow, host: str) -> None:
        """Send this request to a checked address of its host (within its DNS TTL).

        mitmproxy pools upstream connections by the request's (host, port), and allows only
        five per address per client; dialling by a different address than the request
        names would open a new connection per request until the tunnel stalls. So the
        request itself names the checked IP (its Host header is kept), and server_connect
        puts the server name back as the TLS SNI for that connection. Plain-HTTP requests
        are pinned the same way, so a blocked address gets the 403 JSON answer.
        """
        if is_ip_literal(host):
            return  # server_connect checks literals itself
        address, refused, found = await self._checked_address(host)
        if address is None:
            if refused:
                flow.response = answers.blocked_address(host, refused)
            else:
                flow.response = answers.unresolvable(host, self._no_address_reason(host, found))
            flow.metadata[LOCAL_ANSWER] = True
            return
        if "host" not in flow.request.headers:
            flow.request.headers["Host"] = flow.request.host_header or host
        names = self.upstream_names.setdefault(flow.client_conn, {})
        names[(address, flow.request.port)] = host
        flow.request.data.host = address

    def response(self, flow: http.HTTPFlow) -> None:
        """Passive 410 learning from real responses, keyed by the request's destination."""
        try:
            self._learn(flow)
        except Exception as e:  # learning fails open: nothing was let through here
            self._hook_failed("response", e)

    def _learn(self, flow: http.HTTPFlow) -> None:
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

    def _destination(self, flow: http.HTTPFlow, tunnel: Tunnel | None = None) -> str:
        """X-Matrix `destination`, else the Host header, else the TLS SNI of a `CONNECT :0`
        tunnel, else the request's host."""
        named = xmatrix.destination(flow.request.headers.get("Authorization"))
        if named is not None:
            return parse_authority(named).host
        host = flow.request.host_header
        if host:
            return parse_authority(host).host
        if tunnel is not None and tunnel.empty:
            if tunnel.sni is None:
                raise InvalidName("CONNECT :0 without a TLS server name or Host header")
            return tunnel.sni
        return normalize_host(flow.request.host)

    async def _server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Last gate before dialling: never a gone SNI, never an unchecked address."""
        if data.server.address is None:
            return
        if self.refused.get(data.client):
            data.server.error = "refused: an earlier decision on this connection failed"
            return
        tunnel = self.tunnels.get(data.client)
        if tunnel is not None and tunnel.doomed is not None:
            data.server.error = answers.gone_message(tunnel.doomed)
            return
        raw_host, port = data.server.address
        if raw_host == EMPTY_HOST or (tunnel is not None and tunnel.empty):
            data.server.error = "CONNECT :0 names no host: nothing is dialled"
            return
        named = self.upstream_names.get(data.client, {}).get((raw_host, port))
        if named is not None:  # a request already pinned to its checked address
            data.server.sni = named
            self._start_dial(data.server, f"{named}:{port}")
            return
        try:
            host = normalize_host(raw_host)
        except InvalidName as e:
            data.server.error = f"invalid upstream host: {e}"
            return
        assert self.policy is not None
        if tunnel is not None and tunnel.address and (host, port) == (tunnel.host, tunnel.port):
            late = self.policy.cached(host)  # judged gone since the CONNECT (a probe, a peer)?
            if late is not None and self._suppress(late, "tls"):
                data.server.error = answers.gone_message(late.verdict)
                return
            data.server.address = (tunnel.address, port)
        else:
            entry = await self._decide(host)
            if entry.verdict.suppresses and self._settings.enforce:
                # Never dial a gone host, whatever asked for it (intercept mode answers
                # requests before this; this is the last gate, not a second counter).
                data.server.error = answers.gone_message(entry.verdict)
                return
            address, refused, found = await self._checked_address(host)
            if address is None:
                if refused:
                    data.server.error = answers.blocked_message(host, refused)
                else:
                    data.server.error = self._no_address_reason(host, found)
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

    # -- the ops API (OpsBackend) -------------------------------------------------------

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics.registry

    @property
    def ops_token(self) -> str | None:
        return self.settings.ops_token if self.settings else None

    def readiness(self) -> Readiness:
        policy = self.policy
        ready = self.is_running and policy is not None and self.loaded.is_set()
        status = "draining" if self.draining else "ready" if ready else "starting"
        store = None
        if policy is not None:
            health = policy.store.health()
            store = {"kind": health.store, "up": health.up, "detail": health.detail}
        return Readiness(
            status=status,
            proxy_running=self.is_running,
            enforce=self.settings.enforce if self.settings else None,
            nameservers=policy.dns.nameservers if policy else [],
            verdicts_cached=len(policy.cache) if policy else 0,
            store=store,
        )

    def _policy(self) -> Policy:
        if self.policy is None:
            raise Unavailable("starting")
        return self.policy

    def entries(self) -> list[Entry]:
        """Every verdict for the ops API: names (policy) and open breakers (host:port)."""
        policy = self._policy()
        assert self.breaker is not None
        return [*policy.entries(), *(Entry(v) for v in self.breaker.open_verdicts())]

    def verdict(self, name: str) -> Entry | None:
        return self._policy().cached(name)

    def mark_gone(self, name: str, ttl: float, comment: str) -> Entry:
        return self._policy().mark_gone(name, ttl, comment)

    async def recheck(self, name: str) -> tuple[Entry, bool]:
        policy = self._policy()
        if policy.is_listed(name):
            raise Listed(f"{name} is on --deny/--deny-file; remove it there "
                         "(the file is reloaded on change)")  # fmt: skip
        lifter = self.lifter
        current = policy.cached(name)
        held = current.verdict if current is not None else None
        released = lifter.release(name, held) if lifter is not None else False
        try:
            entry = await policy.recheck(name)
        finally:
            if lifter is not None:
                lifter.release_done(name)
        return entry, released

    def resurrections(self) -> Resurrections:
        lifter = self.lifter
        if lifter is None:
            return Resurrections([], [])
        held = sorted(lifter.book.held)
        if self.policy is not None:  # released elsewhere (shared store): no longer held here
            policy = self.policy
            held = [n for n in held if (e := policy.cached(n)) is not None and is_hold(e.verdict)]
        return Resurrections(list(lifter.book.resurrections), held)

    def synapse(self) -> dict[str, Any]:
        lifter = self.lifter
        admin = lifter.admin if lifter is not None else None
        if lifter is None or admin is None:
            raise Unavailable("no --synapse-admin-url configured")
        view = lifter.view
        return {
            "url": str(admin.endpoint),
            "state": admin.state,
            "detail": admin.detail,
            "polled_at": view.polled_at,
            "destinations": view.destinations,
            "truncated": view.truncated,
            "backing_off_gone": list(view.backing_off_gone),
        }

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
        return (await self._dial_addresses(host)).addresses

    async def _checked_address(self, host: str) -> tuple[str | None, list[str], AddressSet]:
        """An address of `host` the address policy allows, within its DNS TTL; else None
        and the addresses it refused (counted in tombstone_blocked_address_total)."""
        found = await self._dial_addresses(host)
        address, refused = self.addresses.choose(found.addresses)
        if address is None and refused:
            self.metrics.blocked_address.inc()
        return address, refused, found

    async def _dial_addresses(self, host: str) -> AddressSet:
        """Where to connect for `host` now: its addresses within their own DNS TTL."""
        assert self.policy is not None
        if not self.loaded.is_set():
            await self.loaded.wait()
        return await self.policy.dial_addresses(host)

    def _hook_failed(self, hook: str, error: Exception) -> None:
        """A decision hook raised: counted, and one ERROR line per hook a minute at most
        (a bug hit per connection must not flood the log); the caller refuses."""
        self.metrics.hook_errors.labels(hook).inc()
        now = time.monotonic()
        if now - self._hook_errors_logged.get(hook, -HOOK_ERROR_LOG_INTERVAL) < (
            HOOK_ERROR_LOG_INTERVAL
        ):
            log.debug("%s failed again", hook, exc_info=error)
            return
        self._hook_errors_logged[hook] = now
        frame = traceback.extract_tb(error.__traceback__)[-1:] or None
        where = f" at {Path(frame[0].filename).name}:{frame[0].lineno}" if frame else ""
        log.error(
            "%s failed (%s: %s%s); refused what it was deciding (fail closed). "
            "tombstone_hook_errors_total counts repeats; details at --log-level debug",
            hook, type(error).__name__, str(error)[:200].replace("\n", " "), where,
        )  # fmt: skip
        log.debug("%s failure", hook, exc_info=error)

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

    async def _pin_address(self, tunnel: Tunnel) -> http.Response | None:
        """Choose the address to dial for this tunnel, or the answer that refuses it."""
        address, refused, found = await self._checked_address(tunnel.host)
        if address is not None:
            tunnel.address = address
            return None
        if refused:
            return answers.blocked_address(tunnel.host, refused)
        self.metrics.upstream_errors.labels("resolve").inc()
        if found.known:  # DNS says: no address. Not our failure.
            assert self.breaker is not None
            self.breaker.failure(tunnel.key, "no A or AAAA records")
        return answers.unresolvable(tunnel.host, self._no_address_reason(tunnel.host, found))

    @staticmethod
    def _no_address_reason(host: str, found: AddressSet) -> str:
        if not found.known:
            return f"DNS did not answer for {host}: {found.detail}"
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
