"""What the sidecar remembers per client and per upstream connection, for as long as
mitmproxy keeps the connection object (weak keys: nothing outlives its connection)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from mitmproxy import connection, ctx

from sidecar.judge.verdicts import Verdict

LOCAL_ANSWER = "tombstone_local_answer"  # flow.metadata key: answered here, learn nothing
RETRY_CLOSE_SECONDS = 0.1  # a client whose hooks still run is not read yet: close it then


def end_connection(client: connection.Client, why: str) -> None:
    """Close a client connection from outside its layers (a timer, an eviction, a verdict).

    This takes mitmproxy's own path for an inactive connection (ConnectionHandler.
    on_timeout): cancel the task that reads from the client; mitmproxy then closes the
    socket and its server connections and runs client_disconnected. The handler is found by
    client id in the proxyserver addon's registry of live connections (mitmproxy 11 and 12).
    """
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(client.id)
    if handler is None:
        return  # gone already
    io = handler.transports.get(client)
    if io is not None and io.handler is not None:
        io.handler.cancel(why)
    else:  # its client_connected hooks are still running: not reading yet
        asyncio.get_running_loop().call_later(RETRY_CLOSE_SECONDS, end_connection, client, why)


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


@dataclass
class Connections:
    """The per-connection state the hooks share (each hook runs for one connection)."""

    tunnels: MutableMapping[connection.Client, Tunnel] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    # Clients on which a decision hook failed: nothing is dialled for them (fail closed).
    refused: MutableMapping[connection.Client, bool] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    # Requests pinned to a checked address: (address, port) -> the server name it stands for.
    upstream_names: MutableMapping[connection.Client, dict[tuple[str, int], str]] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    dials: MutableMapping[connection.Server, Dial] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    # Intercept mode: upstreams connected, TLS not yet done (TLS decides success).
    handshaking: MutableMapping[connection.Server, str] = field(
        default_factory=weakref.WeakKeyDictionary
    )
    # Pass-through tunnels forwarded, by each name they stand for (the CONNECT host and the
    # SNI): a gone verdict ends them. Emptied as the clients disconnect.
    forwarded: dict[str, weakref.WeakSet[connection.Client]] = field(default_factory=dict)
    forwarded_names: MutableMapping[connection.Client, list[str]] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    def forwarding(self, name: str, client: connection.Client) -> None:
        self.forwarded.setdefault(name, weakref.WeakSet()).add(client)
        self.forwarded_names.setdefault(client, []).append(name)

    def take_forwarded(self, name: str) -> list[connection.Client]:
        """The open tunnels forwarded to `name`, forgotten here (they are about to end)."""
        return list(self.forwarded.pop(name, ()))

    def disconnected(self, client: connection.Client) -> None:
        for name in self.forwarded_names.pop(client, ()):
            clients = self.forwarded.get(name)
            if clients is not None:
                clients.discard(client)
                if not clients:
                    del self.forwarded[name]
