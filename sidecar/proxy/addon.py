"""The mitmproxy addon: the sidecar's lifecycle and its decision hooks, nothing else.

mitmproxy calls the hooks; each hands its work to a small class — `TunnelGate` (CONNECT,
TLS ClientHello), `RequestGate` (each HTTP request, each response), `DialGate` (the last
gate before dialling, and what each dial teaches the breaker) — over one `Sidecar`
(app.py), which holds the verdicts and every collaborator.

The guard fails closed: each hook that lets something through (a tunnel, a request, a
dial) is a thin wrapper that refuses on any exception of the decision inside it —
otherwise mitmproxy would log "Addon error", answer the CONNECT 200 and dial the raw name
itself, past the address check. The judge fails open inside (a DNS failure is an
undecided verdict, never an exception and never a refusal).
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

from mitmproxy import connection, ctx, exceptions, http, tls
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy import layer, server_hooks
from mitmproxy.utils import human

from sidecar import __version__
from sidecar.app import Sidecar
from sidecar.config.options import (
    ADDON_OPTIONS,
    BY_NAME,
    MITMPROXY,
    ConfigError,
    Option,
    RawOptions,
    Settings,
)
from sidecar.judge.verdicts import Verdict
from sidecar.metrics import Metrics
from sidecar.proxy import answers
from sidecar.proxy.connections import LOCAL_ANSWER, Connections, end_connection
from sidecar.proxy.dials import DialGate
from sidecar.proxy.empty_connect import refuse_connection
from sidecar.proxy.requests import RequestGate
from sidecar.proxy.tunnels import TunnelGate

log = logging.getLogger("sidecar.addon")

HOOK_ERROR_LOG_INTERVAL = 60.0  # a failing hook logs one ERROR line a minute, not per connection


def _mitm_type(option: Option) -> type:
    if option.flag:
        return bool
    if option.repeatable:
        return Sequence[str]  # type: ignore[return-value,unused-ignore]
    return str


class TombstoneAddon:
    """Suppresses traffic to decommissioned Matrix servers; see the module docstring."""

    def __init__(self, settings: Settings | None = None) -> None:
        """`settings`: given by `tombstone-sidecar run`, which has validated them already;
        None under `mitmdump -s addons/tombstone.py`, where the `tombstone_*` options are
        declared here and read in `configure`."""
        self.metrics = Metrics()
        self.given = settings
        self.sidecar: Sidecar | None = None
        self.connections = Connections()
        self.tunnels: TunnelGate | None = None
        self.requests: RequestGate | None = None
        self.dials: DialGate | None = None
        self.active_clients = 0
        self.idle = asyncio.Event()  # set whenever the last client connection closes
        self.fatal: str | None = None  # why the sidecar had to stop, for the CLI's exit message
        self._hook_errors_logged: dict[str, float] = {}

    # -- lifecycle ---------------------------------------------------------------------

    def load(self, loader: Loader) -> None:
        if self.given is not None:
            return  # `run`: the settings arrive whole, not as mitmproxy options
        for option in ADDON_OPTIONS:
            default = list(option.default) if option.repeatable else option.default
            loader.add_option(option.mitm, _mitm_type(option), default, option.help)

    def configure(self, updated: set[str]) -> None:
        if self.given is not None:
            if self.sidecar is None:
                self.apply(self.given)
            return
        if self.sidecar is not None and not any(o.mitm in updated for o in ADDON_OPTIONS):
            return
        raw = {o.name: getattr(ctx.options, o.mitm) for o in ADDON_OPTIONS}
        try:
            settings = Settings.from_raw(RawOptions(raw, fallback=MITMPROXY))
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
        self.apply(settings)

    def apply(self, settings: Settings) -> None:
        """Build the sidecar, or reconfigure the one running (the verdict cache survives)."""
        try:
            if self.sidecar is None:
                self.sidecar = Sidecar(settings, self.metrics, on_gone=self._gone)
                self.tunnels = TunnelGate(self.sidecar, self.connections)
                self.requests = RequestGate(self.sidecar, self.connections)
                self.dials = DialGate(self.sidecar, self.connections)
            else:
                self.sidecar.reconfigure(settings)
        except ConfigError as e:  # a value only the sidecar can judge (a nameserver, ...)
            where = BY_NAME[e.option].mitm if self.given is None else e.where
            raise exceptions.OptionsError(f"{where}: {e.problem}") from None

    async def running(self) -> None:
        sidecar = self.sidecar
        assert sidecar is not None
        try:
            await sidecar.start()
        except OSError as e:
            # Without its ops listener the sidecar would be unobservable and never ready.
            self.fatal = str(e)
            log.error("%s; stopping", e)
            ctx.master.shutdown()
            return
        sidecar.is_running = True
        self._log_listening(sidecar.settings)

    def _log_listening(self, settings: Settings) -> None:
        """The start-up line, written once the proxy port is bound (mitmproxy binds before
        `running`), with the addresses it really listens on."""
        proxyserver = ctx.master.addons.get("proxyserver")
        bound = sorted(
            {
                human.format_address(address)
                for server in getattr(proxyserver, "servers", ())
                for address in server.listen_addrs
            }
        )
        where = ", ".join(f"http://{b}" for b in bound) or "no address"
        enforcing = "enforcing" if settings.enforce else "shadow mode (--no-enforce)"
        log.info(
            "tombstone-sidecar %s: proxy listening on %s (%s), %s",
            __version__,
            where,
            settings.mode,
            enforcing,
        )

    async def done(self) -> None:
        if self.sidecar is not None:
            await self.sidecar.close()

    @property
    def draining(self) -> bool:
        return self.sidecar is not None and self.sidecar.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        if self.sidecar is not None:
            self.sidecar.draining = value

    # -- connections -------------------------------------------------------------------

    def client_connected(self, client: connection.Client) -> None:
        self.active_clients += 1
        self.idle.clear()

    def client_disconnected(self, client: connection.Client) -> None:
        self.connections.disconnected(client)
        self.active_clients -= 1
        if self.active_clients <= 0:
            self.idle.set()

    def _gone(self, verdict: Verdict) -> None:
        """End the pass-through tunnels open to a name just judged gone: Synapse pools idle
        federation connections for 2 minutes, and its next request in one would reach the
        gone server after the verdict (tests/scale at 300 servers: 16 requests to 410
        servers 60-65 s after their verdict). One DEBUG line per verdict, not per tunnel."""
        clients = self.connections.take_forwarded(verdict.destination)
        for client in clients:
            end_connection(client, f"{verdict.destination} is gone")
        if clients:
            self.metrics.tunnels_ended.inc(len(clients))
            log.debug("%s: ended %d open tunnels", verdict.destination, len(clients))

    # -- decision points: fail closed --------------------------------------------------

    async def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if self.tunnels is None:
            return
        try:
            await self.tunnels.next_layer(nextlayer)
        except Exception as e:
            self._hook_failed("next_layer", e)
            refuse_connection(nextlayer)

    def refuse_early(self, host: str, port: int) -> bool:
        """Admission asks, from a CONNECT's first bytes: refuse it now? (TunnelGate).
        Not a hook: an exception reaches Admission, which refuses (fail closed)."""
        tunnels = self.tunnels
        return tunnels is not None and tunnels.refuse_early(host, port)

    async def http_connect(self, flow: http.HTTPFlow) -> None:
        try:
            assert self.tunnels is not None, "not configured"
            await self.tunnels.connect(flow)
        except Exception as e:
            self._hook_failed("http_connect", e)
            if self.sidecar is not None and self.sidecar.settings.refusal == "close":
                flow.kill()  # refused all the same, without a status Synapse logs as CRITICAL
            else:
                flow.response = answers.internal_error("CONNECT")

    async def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        try:
            assert self.tunnels is not None, "not configured"
            await self.tunnels.clienthello(data)
        except Exception as e:
            self._hook_failed("tls_clienthello", e)
            self.connections.refused[data.context.client] = True  # server_connect: no dial
            data.ignore_connection = True

    async def requestheaders(self, flow: http.HTTPFlow) -> None:
        try:
            assert self.requests is not None, "not configured"
            await self.requests.request(flow)
        except Exception as e:
            self._hook_failed("requestheaders", e)
            flow.response = answers.internal_error("request")
            flow.metadata[LOCAL_ANSWER] = True

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        try:
            assert self.dials is not None, "not configured"
            await self.dials.server_connect(data)
        except Exception as e:
            self._hook_failed("server_connect", e)
            self.connections.dials.pop(data.server, None)
            data.server.error = "refused: internal error in tombstone-sidecar (see its log)"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A send_join answer streams through a copy (intercept mode); fails open."""
        if self.requests is None:
            return
        try:
            self.requests.response_headers(flow)
        except Exception as e:
            self._hook_failed("responseheaders", e)

    def response(self, flow: http.HTTPFlow) -> None:
        """Passive 410 learning; it fails open: nothing was let through here."""
        if self.requests is None:
            return
        try:
            self.requests.response(flow)
        except Exception as e:
            self._hook_failed("response", e)

    # -- what each dial teaches (no decision: nothing to refuse) ----------------------

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        if self.dials is not None:
            self.dials.server_connected(data)

    def tls_established_server(self, data: tls.TlsData) -> None:
        if self.dials is not None:
            self.dials.tls_established_server(data)

    def tls_failed_server(self, data: tls.TlsData) -> None:
        if self.dials is not None:
            self.dials.tls_failed_server(data)

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        if self.dials is not None:
            self.dials.server_connect_error(data)

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
            hook,
            type(error).__name__,
            str(error)[:200].replace("\n", " "),
            where,
        )
        log.debug("%s failure", hook, exc_info=error)
