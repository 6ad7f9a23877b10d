"""`CONNECT :0`: what Synapse sends for a server whose SRV target is "." (decidedly gone).

Synapse 1.163 turns the SRV target "." into an empty host and port 0 and asks the proxy
for `CONNECT :0`. mitmproxy rejects that request line with its own 400 before any addon
hook sees a flow, and Synapse logs every non-200 answer to a CONNECT as a CRITICAL
traceback (tests/e2e/test_s5). The only place the sidecar can act first is the layer
decision, where the client's first bytes are visible. Pass-through closes the connection
there without a byte, as it refuses any gone destination with `--refusal close`.

Intercept mode can do better: the server Synapse meant is named again inside the tunnel
(TLS SNI, Host, X-Matrix destination), so each request can be answered by its class with
the reason (`410 M_SERVER_DECOMMISSIONED ... dns_srv_dot` for an invite, in milliseconds,
instead of ~3.3 s of retries ending in "Can't connect"). There the request line is
rewritten to name `EMPTY_HOST`, a placeholder under `.invalid` (RFC 6761: never resolves)
that mitmproxy accepts and the addon recognises and never dials.
"""

from __future__ import annotations

from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.modes import HttpProxy

EMPTY_HOST_CONNECT = b"CONNECT :"  # a CONNECT whose authority has no host at all
EMPTY_HOST = "no-host.tombstone-sidecar.invalid"  # what `CONNECT :0` is accepted as
EMPTY_PORT = 443  # mitmproxy refuses port 0 in a CONNECT; nothing is dialled either way
EMPTY_AUTHORITY = f"{EMPTY_HOST}:{EMPTY_PORT}".encode()


def is_empty_host_connect(nextlayer: layer.NextLayer) -> bool:
    """The proxy connection's first request is a CONNECT to an empty host."""
    layers = nextlayer.context.layers
    depth = len(layers) - (1 if _chosen_already(nextlayer) else 0)
    return (
        depth == 1
        and isinstance(layers[0], HttpProxy)
        and nextlayer.data_client().startswith(EMPTY_HOST_CONNECT)
    )


def accept_empty_host(nextlayer: layer.NextLayer) -> bool:
    """Rewrite `CONNECT :0` to `CONNECT EMPTY_HOST:EMPTY_PORT` in the bytes the next layer
    will read; False (nothing changed) if the first event does not hold the whole target."""
    for event in nextlayer.events:
        if isinstance(event, events.DataReceived) and event.connection == nextlayer.context.client:
            data = event.data
            end = data.find(b" ", len(EMPTY_HOST_CONNECT))
            if not data.startswith(EMPTY_HOST_CONNECT) or end < 0:
                return False
            event.data = b"CONNECT " + EMPTY_AUTHORITY + data[end:]
            return True
    return False


def refuse_connection(nextlayer: layer.NextLayer) -> None:
    """Replace whatever layer was chosen (mitmproxy's NextLayer may have run first) with
    one that closes the client connection."""
    if _chosen_already(nextlayer):
        nextlayer.context.layers.pop()  # the unused layer registered itself there
    nextlayer.layer = CloseClient(nextlayer.context)


def _chosen_already(nextlayer: layer.NextLayer) -> bool:
    layers = nextlayer.context.layers
    return nextlayer.layer is not None and bool(layers) and layers[-1] is nextlayer.layer


class CloseClient(layer.Layer):
    """A layer that closes the client connection at once, answering nothing."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, events.Start):
            yield commands.CloseConnection(self.context.client)
