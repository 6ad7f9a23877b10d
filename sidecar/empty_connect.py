"""`CONNECT :0`: what Synapse sends for a server whose SRV target is "." (decidedly gone).

Synapse 1.163 turns the SRV target "." into an empty host and port 0 and asks the proxy
for `CONNECT :0`. mitmproxy rejects that request line with its own 400 before any addon
hook sees a flow, and Synapse logs every non-200 answer to a CONNECT as a CRITICAL
traceback (tests/e2e/test_s5). The only place the sidecar can act first is the layer
decision, where the client's first bytes are visible: there it closes the connection
without a byte, as it refuses any gone destination with `--refusal close`.
"""

from __future__ import annotations

from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers.modes import HttpProxy

EMPTY_HOST_CONNECT = b"CONNECT :"  # a CONNECT whose authority has no host at all


def is_empty_host_connect(nextlayer: layer.NextLayer) -> bool:
    """The proxy connection's first request is a CONNECT to an empty host."""
    layers = nextlayer.context.layers
    depth = len(layers) - (1 if _chosen_already(nextlayer) else 0)
    return (
        depth == 1
        and isinstance(layers[0], HttpProxy)
        and nextlayer.data_client().startswith(EMPTY_HOST_CONNECT)
    )


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
