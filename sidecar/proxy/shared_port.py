"""One proxy port served by several sidecar processes: mitmproxy's regular mode + SO_REUSEPORT.

A sidecar process uses one core (mitmproxy is asyncio, Python holds the GIL). Where one
core is not enough — a central egress Deployment in front of many Synapse workers — run
several processes with `--reuse-port` on the same `--listen` address: the kernel spreads
new connections across them, each keeps its own tunnels, and `--store redis` shares
verdicts so a name is judged once for all. Beside one Synapse process (the sidecar
case) one sidecar process is enough: Synapse's own process is single-core too.

mitmproxy picks a server class per proxy mode; this module registers a mode that is
`regular` in every respect (mitmproxy's own layers check `isinstance(mode, RegularMode)`)
except that its listening socket is opened with SO_REUSEPORT.
"""

from __future__ import annotations

import asyncio

from mitmproxy.proxy import layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layer import Layer
from mitmproxy.proxy.mode_servers import AsyncioServerInstance
from mitmproxy.proxy.mode_specs import RegularMode


class SharedportMode(RegularMode):
    """An HTTP(S) proxy whose port other processes may listen on too (spec `sharedport@PORT`)."""

    description = "HTTP(S) proxy (port shared with SO_REUSEPORT)"


class SharedPortInstance(AsyncioServerInstance[SharedportMode]):
    def make_top_layer(self, context: Context) -> Layer:
        return layers.modes.HttpProxy(context)

    async def listen(self, host: str, port: int) -> list[asyncio.Server]:  # type: ignore[override]
        return [await asyncio.start_server(self.handle_stream, host, port, reuse_port=True)]


def mode_spec(port: int, reuse_port: bool) -> str:
    """The mitmproxy `--mode` spec for the proxy listener."""
    return f"{SharedportMode.type_name if reuse_port else 'regular'}@{port}"
