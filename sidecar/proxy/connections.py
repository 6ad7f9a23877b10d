"""What the sidecar remembers per client and per upstream connection, for as long as
mitmproxy keeps the connection object (weak keys: nothing outlives its connection)."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import MutableMapping
from dataclasses import dataclass, field

from mitmproxy import connection

from sidecar.judge.verdicts import Verdict

LOCAL_ANSWER = "tombstone_local_answer"  # flow.metadata key: answered here, learn nothing


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
