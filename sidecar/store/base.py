"""Where verdicts live beyond memory: the contract every store keeps, and how one is chosen.

The in-memory cache stays the only thing the request path reads. A store is written
behind it (`save`/`forget` only enqueue) and read at start (`load`), and a shared store
also answers `fetch` for a name this sidecar has not judged yet and pushes other
sidecars' verdicts in through `on_remote`. Every store fails open: when it breaks, the
sidecar keeps serving from memory and says so in `health()` and in metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.judge.verdicts import Verdict
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.store")

RemoteVerdict = Callable[[Verdict], None]
RemoteForget = Callable[[str], None]


@dataclass(frozen=True)
class StoreHealth:
    """What `/readyz` and `tombstone_store_up` report about a store."""

    store: str
    up: bool
    detail: str


class RateLimitedWarning:
    """A warning about outside input at most once per `interval`, counting the ones held
    back, so whoever sends bad records cannot flood the log (the metric counts each)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last = -math.inf
        self._held = 0

    def warn(self, message: str, *args: object, exc_info: bool = False) -> bool:
        """Log `message` % (count, *args) if due; True when it was logged."""
        self._held += 1
        now = self._clock()
        if now - self._last < self.interval:
            return False
        log.warning(message, self._held, *args, exc_info=exc_info)
        self._held, self._last = 0, now
        return True


class VerdictStore:
    """Memory only: the base every store extends, and the store for `--store memory`."""

    kind = "memory"

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._up = metrics.store_up.labels(self.kind)
        self._up.set(1)
        self.up = True
        self.detail = "verdicts are kept in memory only"

    async def start(self, on_remote: RemoteVerdict, on_forget: RemoteForget) -> list[Verdict]:
        """Open the store; return the verdicts it still holds (expired ones dropped)."""
        return []

    def save(self, verdict: Verdict) -> None:
        """Persist or share `verdict` eventually; never blocks, never raises."""

    def forget(self, name: str) -> None:
        """Remove `name` eventually; never blocks, never raises."""

    async def fetch(self, name: str) -> Verdict | None:
        """A verdict another sidecar learned, if the store is shared and answers in time."""
        return None

    def save_keys(self, name: str, record: dict[str, Any]) -> None:
        """Share the signing keys `name` published while alive (sidecar.remote.identity) with the
        other sidecars; never blocks, never raises. Local stores keep them in the key book."""

    async def fetch_keys(self, name: str) -> dict[str, Any] | None:
        """Signing keys another sidecar recorded for `name`, if the store is shared."""
        return None

    async def close(self) -> None:
        """Write what is pending and let go of the store."""

    def health(self) -> StoreHealth:
        return StoreHealth(self.kind, self.up, self.detail)

    def mark(self, up: bool, detail: str) -> None:
        """Record a change of health: one log line per change, the gauge always."""
        was, self.up, self.detail = self.up, up, detail
        self._up.set(1 if up else 0)
        if up != was:
            # WARNING, not ERROR: the sidecar keeps serving (and mitmproxy exits on an ERROR
            # logged during startup).
            (log.info if up else log.warning)(
                "%s store %s: %s", self.kind, "up" if up else "DOWN", detail
            )


class WriteBehindStore(VerdictStore):
    """A store written behind the cache: saves of one name coalesce until the next flush."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(metrics)
        self._pending: dict[str, Verdict | None] = {}  # None = delete
        self._wake = asyncio.Event()

    def save(self, verdict: Verdict) -> None:
        self._pending[verdict.destination] = verdict
        self._wake.set()

    def forget(self, name: str) -> None:
        self._pending[name] = None
        self._wake.set()

    def _take(self) -> dict[str, Verdict | None]:
        batch, self._pending = self._pending, {}
        return batch

    def _put_back(self, batch: dict[str, Verdict | None]) -> None:
        """A failed flush: keep its entries for the next one, newer saves winning."""
        for name, verdict in batch.items():
            self._pending.setdefault(name, verdict)


def default_state_dir() -> str:
    """$XDG_STATE_HOME/tombstone-sidecar, as the XDG base directory spec places state."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "tombstone-sidecar")
