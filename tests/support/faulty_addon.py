"""mitmdump script for the fail-closed tests: the real addon with one decision raising.

`SIDECAR_TEST_FAULT` names the decision inside a hook (`_connect`, `_clienthello`,
`_request`, `_server_connect`, `_next_layer`); it raises as any bug there would, and the
hook around it must refuse. Nothing else of the addon is changed.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from sidecar.proxy.addon import TombstoneAddon
from sidecar.proxy.admission import Admission

FAULT = os.environ["SIDECAR_TEST_FAULT"]


class InjectedFault(RuntimeError):
    pass


def _raise(*_args: Any, **_kwargs: Any) -> None:
    raise InjectedFault(f"injected fault in {FAULT}")


async def _raise_async(*_args: Any, **_kwargs: Any) -> None:
    raise InjectedFault(f"injected fault in {FAULT}")


addon = TombstoneAddon()
original = getattr(addon, FAULT)
setattr(addon, FAULT, _raise_async if inspect.iscoroutinefunction(original) else _raise)
addons = [Admission(addon.metrics), addon]  # as addons/tombstone.py loads them
