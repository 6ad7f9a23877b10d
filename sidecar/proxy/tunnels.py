"""Decisions for a client's tunnel: the CONNECT target, then the TLS ClientHello's SNI.

Pass-through mode (the default): the CONNECT target is judged first; a gone target is
answered at once and nothing is dialled. Otherwise the sidecar resolves the target itself,
refuses blocked address ranges, and remembers the address it checked for this tunnel. The
ClientHello's SNI is judged next (it names the server behind an SRV delegation); the tunnel
then passes through untouched, and `server_connect` (dials.py) dials the remembered
address, or refuses to dial at all when the SNI turned out to be gone. This needs
mitmproxy's `connection_strategy=lazy`, so that nothing is dialled before the SNI is seen.

Intercept mode accepts a CONNECT to a gone server: each request inside is then answered
by its request class (requests.py), which a refused CONNECT cannot do.
"""

from __future__ import annotations

import logging
import time

from mitmproxy import http, tls
from mitmproxy.proxy import layer

from sidecar.app import Sidecar
from sidecar.judge.names import InvalidName, normalize_host
from sidecar.judge.verdicts import Entry, Verdict
from sidecar.proxy import answers
from sidecar.proxy.connections import Connections, Tunnel
from sidecar.proxy.empty_connect import (
    EMPTY_HOST,
    accept_empty_host,
    is_empty_host_connect,
    refuse_connection,
)

log = logging.getLogger("sidecar.addon")

SNI_DEFAULT_PORT = 8448  # an SNI without a CONNECT names a federation server: probe its port


class TunnelGate:
    """`next_layer`, `http_connect` and `tls_clienthello` for one sidecar."""

    def __init__(self, sidecar: Sidecar, connections: Connections) -> None:
        self.sidecar = sidecar
        self.connections = connections

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """`CONNECT :0` (Synapse's request for an SRV target "."). Intercept mode accepts
        it under a placeholder host that is never dialled, so that each request inside is
        answered by its destination; pass-through closes it like any refusal instead of
        mitmproxy's own 400, which Synapse would log as a CRITICAL traceback."""
        if not is_empty_host_connect(nextlayer):
            return
        settings = self.sidecar.settings
        if settings.mode == "intercept":
            if accept_empty_host(nextlayer):
                return
        elif settings.refusal != "close" or not settings.enforce:
            return
        refuse_connection(nextlayer)
        self.sidecar.metrics.invalid_input.labels("connect").inc()

    async def connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return  # already answered (by another addon: 407 from admission, ...)
        sidecar = self.sidecar
        metrics = sidecar.metrics
        started = time.perf_counter()
        if flow.request.host == EMPTY_HOST:
            # CONNECT :0, intercept mode (see next_layer): accepted, nothing ever dialled.
            tunnel = Tunnel(EMPTY_HOST, flow.request.port, empty=True)
            self.connections.tunnels[flow.client_conn] = tunnel
            metrics.decision_by_stage["connect"].observe(time.perf_counter() - started)
            return
        try:
            host = normalize_host(flow.request.host)
        except InvalidName as e:
            metrics.invalid_input.labels("connect").inc()
            flow.response = answers.bad_target(str(e))
            return
        tunnel = Tunnel(host, flow.request.port)
        self.connections.tunnels[flow.client_conn] = tunnel
        entry = await sidecar.decide(host)
        if sidecar.settings.mode == "intercept" and entry.verdict.suppresses:
            # Accept: every request inside is answered by its request class (a user-facing
            # 410 that names the server, a failover 502), which a refused CONNECT cannot do.
            # Nothing is ever dialled for it (requests.py: the host it would go to is gone).
            metrics.decision_by_stage["connect"].observe(time.perf_counter() - started)
            return
        try:
            if sidecar.suppress(entry, "connect"):
                self._refuse(flow, entry.verdict)
                return
            flow.response = await self._pin_address(tunnel)
            if flow.response is not None:
                return
            broken = sidecar.breaker_verdict(tunnel.key)
            if broken is not None and sidecar.suppress(Entry(broken), "connect"):
                self._refuse(flow, broken)
                return
            sidecar.forward(entry, "connect")
            sidecar.probe(host, (host, tunnel.port), entry.verdict)
        finally:
            metrics.decision_by_stage["connect"].observe(time.perf_counter() - started)

    async def clienthello(self, data: tls.ClientHelloData) -> None:
        sidecar = self.sidecar
        # pass-through: TLS stays end to end; intercept: mitmproxy terminates it with our CA
        intercept = sidecar.settings.mode == "intercept"
        data.ignore_connection = not intercept
        sni = data.client_hello.sni
        if not sni:
            return
        tunnels = self.connections.tunnels
        tunnel = tunnels.get(data.context.client)
        started = time.perf_counter()
        try:
            name = normalize_host(sni)
        except InvalidName as e:
            sidecar.metrics.invalid_input.labels("sni").inc()
            log.debug("ignoring malformed SNI %r: %s", sni[:100], e)
            return
        if tunnel is not None and name == tunnel.host:
            return  # judged at CONNECT already
        if tunnel is not None and tunnel.empty:
            tunnel.sni = name  # CONNECT :0: the server Synapse meant
        if intercept:
            return  # each request inside is judged by its own destination
        entry = await sidecar.decide(name)
        if sidecar.suppress(entry, "tls"):
            if tunnel is None:
                tunnel = tunnels[data.context.client] = Tunnel(name, 0)
            tunnel.doomed = entry.verdict
            data.ignore_connection = True  # not even intercepted: server_connect refuses
        else:
            sidecar.forward(entry, "tls")
            target = (tunnel.host, tunnel.port) if tunnel is not None else (name, SNI_DEFAULT_PORT)
            sidecar.probe(name, target, entry.verdict)
        sidecar.metrics.decision_by_stage["tls"].observe(time.perf_counter() - started)

    def _refuse(self, flow: http.HTTPFlow, verdict: Verdict) -> None:
        """Refuse a CONNECT to a gone destination as --refusal says.

        `close` ends the connection without a byte (mitmproxy kills the flow). Synapse
        treats that exactly like a 502 — same error to the user, same backoff — but a
        non-200 answer makes it log a CRITICAL traceback per refusal (measured in
        tests/e2e/test_s5_synapse_log.py), so closing is the default.
        """
        settings = self.sidecar.settings
        if settings.refusal == "close":
            flow.kill()
        else:
            flow.response = answers.suppressed(verdict, settings.suppress_status)

    async def _pin_address(self, tunnel: Tunnel) -> http.Response | None:
        """Choose the address to dial for this tunnel, or the answer that refuses it."""
        sidecar = self.sidecar
        address, refused, found = await sidecar.checked_address(tunnel.host)
        if address is not None:
            tunnel.address = address
            return None
        if refused:
            return answers.blocked_address(tunnel.host, refused)
        sidecar.metrics.upstream_errors.labels("resolve").inc()
        if found.known:  # DNS says: no address. Not our failure.
            sidecar.breaker.failure(tunnel.key, "no A or AAAA records")
        return answers.unresolvable(tunnel.host, answers.no_address_reason(tunnel.host, found))
