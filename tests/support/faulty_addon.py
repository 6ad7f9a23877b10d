"""mitmdump script for the fail-closed tests: the real addon with one decision raising.

`SIDECAR_TEST_FAULT` names the decision a hook hands its work to (`TunnelGate.connect`,
`TunnelGate.clienthello`, `TunnelGate.next_layer`, `TunnelGate.refuse_early`,
`RequestGate.request`, `DialGate.server_connect`); it raises as any bug there would, and
the hook around it must refuse. Nothing else of the addon is changed.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from sidecar.proxy.addon import TombstoneAddon
from sidecar.proxy.admission import Admission
from sidecar.proxy.dials import DialGate
from sidecar.proxy.requests import RequestGate
from sidecar.proxy.tunnels import TunnelGate

FAULT = os.environ["SIDECAR_TEST_FAULT"]
GATES: dict[str, type] = {
    "TunnelGate": TunnelGate,
    "RequestGate": RequestGate,
    "DialGate": DialGate,
}


class InjectedFault(RuntimeError):
    pass


def _raise(*_args: Any, **_kwargs: Any) -> None:
    raise InjectedFault(f"injected fault in {FAULT}")


async def _raise_async(*_args: Any, **_kwargs: Any) -> None:
    raise InjectedFault(f"injected fault in {FAULT}")


gate_name, _, method = FAULT.partition(".")
gate = GATES[gate_name]
original = getattr(gate, method)
setattr(gate, method, _raise_async if inspect.iscoroutinefunction(original) else _raise)
addon = TombstoneAddon()
# as addons/tombstone.py loads them
addons = [Admission(addon.metrics, refuse_early=addon.refuse_early), addon]
