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

from mitmproxy import connection, http, tls
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import layer
from mitmproxy.proxy.layers import TCPLayer
from mitmproxy.proxy.layers.tls import ClientTLSLayer, ServerTLSLayer, parse_client_hello

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

    async def next_layer(self, nextlayer: layer.NextLayer) -> None:
        if is_empty_host_connect(nextlayer):
            self._empty_connect(nextlayer)
        elif self.sidecar.settings.mode == "passthrough":
            await self._pass_through(nextlayer)

    def _empty_connect(self, nextlayer: layer.NextLayer) -> None:
        """`CONNECT :0` (Synapse's request for an SRV target "."). Intercept mode accepts
        it under a placeholder host that is never dialled, so that each request inside is
        answered by its destination; pass-through closes it like any refusal instead of
        mitmproxy's own 400, which Synapse would log as a CRITICAL traceback."""
        settings = self.sidecar.settings
        if settings.mode == "intercept":
            if accept_empty_host(nextlayer):
                return
        elif settings.refusal != "close" or not settings.enforce:
            return
        refuse_connection(nextlayer)
        self.sidecar.metrics.invalid_input.labels("connect").inc()

    async def _pass_through(self, nextlayer: layer.NextLayer) -> None:
        """Pass-through: judge the SNI here, where the whole ClientHello is first seen, and
        relay the tunnel as plain TCP at once.

        Left to mitmproxy's NextLayer addon, a ClientHello gets a TLS stack; judged later at
        `tls_clienthello`, an ignored connection keeps both TLS layers as empty wrappers that
        every byte of the tunnel passes through for as long as it lives (pooled keep-alive
        requests: 59 against bare mitmdump's 53 µs of proxy CPU each; relayed as TCP from
        here, 49 µs: `python -m tests.bench --only passthrough`). Under `run` NextLayer has
        chosen already (its stack is dropped); under mitmdump this script's hook runs first.
        A ClientHello split over several reads is left to the TLS stack and judged at
        `tls_clienthello`, as before.
        """
        chosen = nextlayer.layer
        context = nextlayer.context
        if chosen is None:
            data = nextlayer.data_client()
            if context.server.address is None or not starts_like_tls_record(data):
                return  # not a TLS tunnel after a CONNECT: not ours to decide here
        elif not (
            isinstance(chosen, ServerTLSLayer) and isinstance(chosen.child_layer, ClientTLSLayer)
        ):
            return
        try:
            hello = parse_client_hello(nextlayer.data_client())
        except ValueError:
            return  # not a ClientHello mitmproxy can read: its TLS layer refuses it
        if hello is None:
            return  # not all here yet: the TLS layer waits for the rest (tls_clienthello)
        await self._judge_sni(context.client, hello.sni)
        if chosen is not None:
            for index, registered in enumerate(context.layers):
                if registered is chosen:  # the TLS stack registered itself: it is not used
                    del context.layers[index:]
                    break
        nextlayer.layer = TCPLayer(context, ignore=True)

    def refuse_early(self, host: str, port: int) -> bool:
        """From a CONNECT's first bytes (admission.py): True, counted as a refusal at
        `connect`, when it would be refused by closing without waiting for anything: a
        cached gone name, pass-through, enforcing, `--refusal close`. Anything else (a
        name not cached, a live one, another refusal or mode) goes through `connect`.

        The same verdict, the same counters and the same close as `connect` gives it,
        minus mitmproxy's HTTP layer, flow and hooks: the refusal costs a fraction of the
        CPU (tests/bench, scenario 1). `port` is not judged: a gone name is gone on any.
        """
        sidecar = self.sidecar
        settings = sidecar.settings
        if (
            settings.refusal != "close"
            or settings.mode != "passthrough"
            or not settings.enforce
            or not sidecar.loaded.is_set()
        ):
            return False
        started = time.perf_counter()
        try:
            name = normalize_host(host)
        except InvalidName:
            return False  # connect answers 400 and counts it
        entry = sidecar.policy.cached(name)
        if entry is None or not sidecar.suppress(entry, "connect"):
            return False
        sidecar.metrics.decision_by_stage["connect"].observe(time.perf_counter() - started)
        return True

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
            failed = await self._pin_address(tunnel)
            if failed is not None:
                self._fail(flow, failed)
                return
            broken = sidecar.breaker_verdict(tunnel.key)
            if broken is not None and sidecar.suppress(Entry(broken), "connect"):
                self._refuse(flow, broken)
                return
            sidecar.forward(entry, "connect")
            if sidecar.settings.mode == "passthrough":
                self.connections.forwarding(host, flow.client_conn)
            sidecar.probe(host, (host, tunnel.port), entry.verdict)
            if sidecar.settings.mode == "passthrough" and sidecar.settings.refusal == "close":
                flow.response = established(flow)
        finally:
            metrics.decision_by_stage["connect"].observe(time.perf_counter() - started)

    async def clienthello(self, data: tls.ClientHelloData) -> None:
        # pass-through: TLS stays end to end; intercept: mitmproxy terminates it with our CA
        intercept = self.sidecar.settings.mode == "intercept"
        data.ignore_connection = not intercept
        sni = data.client_hello.sni
        if not intercept:
            await self._judge_sni(data.context.client, sni)
        elif sni:  # each request inside is judged by its own destination
            try:
                name = normalize_host(sni)
            except InvalidName as e:
                self._malformed_sni(sni, e)
                return
            tunnel = self.connections.tunnels.get(data.context.client)
            if tunnel is not None and tunnel.empty:
                tunnel.sni = name  # CONNECT :0: the server Synapse meant

    async def _judge_sni(self, client: connection.Client, sni: str | None) -> None:
        """Pass-through: the server the ClientHello names. A gone one dooms the tunnel
        (server_connect refuses to dial it); a live one is counted and probed."""
        if not sni:
            return
        sidecar = self.sidecar
        tunnels = self.connections.tunnels
        tunnel = tunnels.get(client)
        started = time.perf_counter()
        try:
            name = normalize_host(sni)
        except InvalidName as e:
            self._malformed_sni(sni, e)
            return
        if tunnel is not None and name == tunnel.host:
            return  # judged at CONNECT already
        entry = await sidecar.decide(name)
        if sidecar.suppress(entry, "tls"):
            if tunnel is None:
                tunnel = tunnels[client] = Tunnel(name, 0)
            tunnel.doomed = entry.verdict  # not even intercepted: server_connect refuses
        else:
            sidecar.forward(entry, "tls")
            self.connections.forwarding(name, client)
            target = (tunnel.host, tunnel.port) if tunnel is not None else (name, SNI_DEFAULT_PORT)
            sidecar.probe(name, target, entry.verdict)
        sidecar.metrics.decision_by_stage["tls"].observe(time.perf_counter() - started)

    def _malformed_sni(self, sni: str, error: InvalidName) -> None:
        self.sidecar.metrics.invalid_input.labels("sni").inc()
        log.debug("ignoring malformed SNI %r: %s", sni[:100], error)

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

    def _fail(self, flow: http.HTTPFlow, answer: http.Response) -> None:
        """A CONNECT the sidecar cannot complete although nothing is gone (every address
        blocked, no address at all): `--refusal close` closes it, as a failed connect looks
        to a client without a proxy; `status` answers with `answer` (a 403 or 502 and JSON).
        The guard holds either way: nothing is dialled (tombstone_blocked_address_total and
        tombstone_upstream_errors_total{kind="resolve"} count them)."""
        if self.sidecar.settings.refusal == "close":
            flow.kill()
        else:
            flow.response = answer

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


def established(flow: http.HTTPFlow) -> http.Response:
    """mitmproxy's own `200 Connection established`, given before it would dial.

    With `connection_strategy=eager` (mitmdump's default) mitmproxy dials the CONNECT
    target before answering and turns a failed dial (refused, reset, timed out, refused by
    dials.py) into `502 Bad Gateway`, which Synapse logs as a CRITICAL `ProxyConnectError`
    traceback where, alone, it would have logged a failed connection. Answered here, the
    dial waits for the tunnel's first bytes (as with `lazy`, what `run` sets) and its
    failure closes the tunnel; the same bytes as mitmproxy's answer (no headers).
    """
    now = time.time()
    return http.Response(
        flow.request.data.http_version,
        200,
        b"Connection established",
        http.Headers(),
        b"",
        None,
        now,
        now,
    )
