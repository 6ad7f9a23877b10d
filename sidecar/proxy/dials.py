"""The last gate before dialling, and what each dial teaches the unreachable breaker.

`server_connect` never dials a gone SNI and never an unchecked address: a tunnel's checked
address, a pinned request's, or one chosen here through the address classifier. Each dial
then counts for its `host:port` as a success (TCP, or in intercept mode the TLS handshake)
or a failure, under `--connect-timeout`, which mitmproxy itself lacks (mitmproxy#1095).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re

from mitmproxy import connection, tls
from mitmproxy.proxy import server_hooks

from sidecar.app import Sidecar
from sidecar.judge.names import InvalidName, normalize_host
from sidecar.proxy import answers
from sidecar.proxy.connections import Connections, Dial
from sidecar.proxy.empty_connect import EMPTY_HOST

log = logging.getLogger("sidecar.addon")

_ERRNO_KINDS = {
    errno.ECONNREFUSED: "refused",
    errno.EHOSTUNREACH: "unreachable",
    errno.ENETUNREACH: "unreachable",
    errno.ETIMEDOUT: "timeout",
}


class DialGate:
    """`server_connect` and the connection outcome hooks for one sidecar."""

    def __init__(self, sidecar: Sidecar, connections: Connections) -> None:
        self.sidecar = sidecar
        self.connections = connections

    async def server_connect(self, data: server_hooks.ServerConnectionHookData) -> None:
        """Last gate before dialling: never a gone SNI, never an unchecked address."""
        if data.server.address is None:
            return
        connections, sidecar = self.connections, self.sidecar
        if connections.refused.get(data.client):
            data.server.error = "refused: an earlier decision on this connection failed"
            return
        tunnel = connections.tunnels.get(data.client)
        if tunnel is not None and tunnel.doomed is not None:
            data.server.error = answers.gone_message(tunnel.doomed)
            return
        raw_host, port = data.server.address
        if raw_host == EMPTY_HOST or (tunnel is not None and tunnel.empty):
            data.server.error = "CONNECT :0 names no host: nothing is dialled"
            return
        named = connections.upstream_names.get(data.client, {}).get((raw_host, port))
        if named is not None:  # a request already pinned to its checked address
            data.server.sni = named
            self._start(data.server, f"{named}:{port}")
            return
        try:
            host = normalize_host(raw_host)
        except InvalidName as e:
            data.server.error = f"invalid upstream host: {e}"
            return
        if tunnel is not None and tunnel.address and (host, port) == (tunnel.host, tunnel.port):
            late = sidecar.policy.cached(host)  # judged gone since the CONNECT (a probe, a peer)?
            if late is not None and sidecar.suppress(late, "tls"):
                data.server.error = answers.gone_message(late.verdict)
                return
            data.server.address = (tunnel.address, port)
        else:
            entry = await sidecar.decide(host)
            if entry.verdict.suppresses and sidecar.settings.enforce:
                # Never dial a gone host, whatever asked for it (intercept mode answers
                # requests before this; this is the last gate, not a second counter).
                data.server.error = answers.gone_message(entry.verdict)
                return
            address, refused, found = await sidecar.checked_address(host)
            if address is None:
                if refused:
                    data.server.error = answers.blocked_message(host, refused)
                else:
                    data.server.error = answers.no_address_reason(host, found)
                return
            data.server.address = (address, port)
        self._start(data.server, f"{host}:{port}")

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        dial = self.connections.dials.pop(data.server, None)
        if dial is None:
            return
        if dial.timer is not None:
            dial.timer.cancel()
        if self.sidecar.settings.mode == "intercept":
            self.connections.handshaking[data.server] = dial.key  # TLS decides (tls_*_server)
        else:
            self.sidecar.breaker.success(dial.key)

    def tls_established_server(self, data: tls.TlsData) -> None:
        key = self.connections.handshaking.pop(data.conn, None)  # type: ignore[call-overload]
        if key is not None:
            self.sidecar.breaker.success(key)

    def tls_failed_server(self, data: tls.TlsData) -> None:
        key = self.connections.handshaking.pop(data.conn, None)  # type: ignore[call-overload]
        if key is not None:
            self.sidecar.metrics.upstream_errors.labels("tls").inc()
            self.sidecar.breaker.failure(key, f"TLS handshake failed: {data.conn.error}")

    def server_connect_error(self, data: server_hooks.ServerConnectionHookData) -> None:
        dial = self.connections.dials.pop(data.server, None)
        if dial is None:
            return  # refused by us before dialling: not the upstream's failure
        if dial.timer is not None:
            dial.timer.cancel()
        timeout = self.sidecar.settings.connect_timeout
        if dial.timed_out:
            kind, error = "timeout", f"no connection within {timeout:g}s"
            data.server.error = f"connect to {dial.key} timed out after {timeout:g}s"
        else:
            error = str(data.server.error or "unknown error")
            kind = error_kind(error)
        self.sidecar.metrics.upstream_errors.labels(kind).inc()
        log.debug("%s", data.server.error if dial.timed_out else f"connect to {dial.key}: {error}")
        self.sidecar.breaker.failure(dial.key, error)

    def _start(self, server: connection.Server, key: str) -> None:
        """Remember what this attempt counts for; arm --connect-timeout.

        mitmproxy has no connect timeout (mitmproxy#1095). This hook runs inside the task
        that will dial, so cancelling that task at the deadline is mitmproxy's own path for
        an abandoned connect: it records the error and fires server_connect_error.
        """
        dial = self.connections.dials[server] = Dial(key)
        task = asyncio.current_task()
        if task is not None:
            dial.timer = asyncio.get_running_loop().call_later(
                self.sidecar.settings.connect_timeout, _abandon, server, dial, task
            )


def _abandon(server: connection.Server, dial: Dial, task: asyncio.Task[object]) -> None:
    if server.timestamp_tcp_setup is None and server.error is None and not task.done():
        dial.timed_out = True
        task.cancel()


def error_kind(error: str) -> str:
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
