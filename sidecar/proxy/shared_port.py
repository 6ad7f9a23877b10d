"""One proxy port served by several sidecar processes: mitmproxy's regular mode + SO_REUSEPORT.

A sidecar process uses one core (mitmproxy is asyncio, Python holds the GIL). Where one
core is not enough — a central egress Deployment in front of many Synapse workers — run
several processes with `--reuse-port` on the same `--listen` address: the kernel spreads
new connections across them, each keeps its own tunnels, and `--store redis` shares
verdicts so a name is judged once for all. Beside one Synapse process (the sidecar
case) one sidecar process is enough: Synapse's own process is single-core too.

mitmproxy picks a server class per proxy mode; this module registers two modes that are
`regular` in every respect (mitmproxy's own layers check `isinstance(mode, RegularMode)`)
but their top layer: `sidecar` (what `run` listens with), and `sharedport`, whose
listening socket is opened with SO_REUSEPORT. Their top layer, FirstBytesProxy, lets
Admission refuse a CONNECT to a cached gone name from the client's first bytes, before
mitmproxy's first layer decision and its hook: 212 against 292 µs of CPU per refusal
decided in the `next_layer` hook, measured side by side on a busy machine
(docs/performance.md). `mitmdump -s addons/tombstone.py` keeps mitmproxy's own modes
and refuses in the hook.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from mitmproxy import ctx
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import CommandGenerator, Layer, NextLayer
from mitmproxy.proxy.layers.modes import HttpProxy
from mitmproxy.proxy.mode_servers import AsyncioServerInstance
from mitmproxy.proxy.mode_specs import RegularMode

from sidecar.proxy.admission import Admission


class SidecarMode(RegularMode):
    """mitmproxy's regular HTTP(S) proxy with the sidecar's first layer (spec `sidecar@PORT`)."""

    description = "HTTP(S) proxy"


class SharedportMode(RegularMode):
    """An HTTP(S) proxy whose port other processes may listen on too (spec `sharedport@PORT`)."""

    description = "HTTP(S) proxy (port shared with SO_REUSEPORT)"


class FirstBytesProxy(HttpProxy):
    """mitmproxy's HTTP proxy layer that first shows the client's first bytes to Admission.

    A CONNECT that Admission refuses from them (a cached gone name under `--refusal close`)
    is closed here, before mitmproxy's first layer decision and its `next_layer` hook (one
    hook task and a dispatch to every addon); every other connection continues exactly as
    in mitmproxy's own regular mode, which this layer then steps out of.
    """

    def __init__(self, context: Context, admission: Admission | None) -> None:
        super().__init__(context)
        self.admission = admission
        self.child = NextLayer(context)

    def _handle_event(self, event: events.Event) -> CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield from self.child.handle_event(event)
            return
        if isinstance(event, events.DataReceived) and event.connection is self.context.client:
            admission = self.admission
            if admission is not None and admission.refuses_first_bytes(
                self.context.client, event.data
            ):
                self._handle_event = self._closed  # type: ignore[method-assign]
                yield commands.CloseConnection(self.context.client)
                return
        self._handle_event = self.child.handle_event  # type: ignore[method-assign]
        yield from self.child.handle_event(event)

    def _closed(self, event: events.Event) -> CommandGenerator[None]:
        yield from ()


def _admission() -> Admission | None:
    found = ctx.master.addons.get("admission")
    return found if isinstance(found, Admission) else None


# asyncio listens with a backlog of 100: a burst of new CONNECTs beyond it (a join of a big
# room opens one per server within seconds) had its SYNs dropped, each costing the client a
# retransmit 1, 3, 7 s later. The kernel's queue is made deeper (capped by
# net.core.somaxconn, 4,096 since Linux 5.4) so the burst waits there, costing no sidecar
# memory: 10,000 CONNECTs at once were answered in 17-21 s instead of 64 s, none timed out
# (1,241-1,480 before). asyncio also accepts up to its backlog argument per wake-up; that
# stays 100: taking 4,096 at once let the storm in faster than it could be read, and
# --max-pending-clients closed 8,976 connections instead of 3,176 (docs/performance.md).
LISTEN_BACKLOG = 4096
ACCEPT_BATCH = 100


class SidecarInstance(AsyncioServerInstance[SidecarMode]):
    def make_top_layer(self, context: Context) -> Layer:
        return FirstBytesProxy(context, _admission())

    async def listen(self, host: str, port: int) -> list[asyncio.Server]:  # type: ignore[override]
        return [await _listen(self.handle_stream, host, port, reuse_port=False)]


class SharedPortInstance(AsyncioServerInstance[SharedportMode]):
    def make_top_layer(self, context: Context) -> Layer:
        return FirstBytesProxy(context, _admission())

    async def listen(self, host: str, port: int) -> list[asyncio.Server]:  # type: ignore[override]
        return [await _listen(self.handle_stream, host, port, reuse_port=True)]


async def _listen(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    host: str,
    port: int,
    reuse_port: bool,
) -> asyncio.Server:
    """The proxy's listening socket(s): mitmproxy's own call, with the kernel's queue deepened
    to LISTEN_BACKLOG after asyncio listened with ACCEPT_BATCH (a second listen() on a
    listening socket only changes its backlog)."""
    server = await asyncio.start_server(
        handle, host, port, backlog=ACCEPT_BATCH, reuse_port=reuse_port
    )
    for listening in server.sockets:
        same = socket.socket(fileno=listening.fileno())
        try:
            same.listen(LISTEN_BACKLOG)
        finally:
            same.detach()  # the descriptor stays asyncio's
    return server


def mode_spec(port: int, reuse_port: bool) -> str:
    """The mitmproxy `--mode` spec for the proxy listener."""
    mode = SharedportMode if reuse_port else SidecarMode
    return f"{mode.type_name}@{port}"
