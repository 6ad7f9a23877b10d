"""Experiment for `mitmdump -s`: the sidecar's own addon, refusing by closing unanswered.

Same decisions as `tombstone-sidecar run` (it is the same `TombstoneAddon`), but a CONNECT
to a gone server is closed without an HTTP answer (`flow.kill()`, which mitmproxy 11 turns
into a plain FIN) instead of being answered 502. Scenario 5 measures what that changes in
Synapse: the same client answers and backoff, and no CRITICAL traceback per refusal.
"""

from __future__ import annotations

from mitmproxy import http

from sidecar.addon import TombstoneAddon
from sidecar.answers import SIGNAL_HEADER


class CloseUnanswered(TombstoneAddon):
    async def http_connect(self, flow: http.HTTPFlow) -> None:
        await super().http_connect(flow)
        if flow.response is not None and SIGNAL_HEADER in flow.response.headers:
            flow.response = None
            flow.kill()


addons = [CloseUnanswered()]
