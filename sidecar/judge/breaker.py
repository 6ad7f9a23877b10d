"""The `unreachable` breaker: stop dialling a `host:port` that keeps failing to connect.

After `--breaker-failures` consecutive connect failures (refused, timed out, no address)
the breaker opens: connections to that `host:port` are answered locally for
`--breaker-min`, doubling on each failed trial up to `--breaker-max`. When the time is up
one trial connection goes through (half-open); success closes the breaker, failure opens
it again for longer.

The guard (Envoy's max ejection percent): when more than `--breaker-max-share` of the
distinct destinations tried in the last GUARD_WINDOW_SECONDS failed, the fault is most
likely ours (network, resolver, egress policy), so no new breaker opens until the share
drops again. Our own network blinking must never cut off live servers.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from cachetools import LRUCache

from sidecar.judge.signals import Signal
from sidecar.judge.verdicts import State, Verdict
from sidecar.metrics import Metrics

log = logging.getLogger("sidecar.breaker")

GUARD_WINDOW_SECONDS = 300.0  # "the last minutes" over which the failure share is measured
GUARD_MIN_DESTINATIONS = 10  # below this many distinct destinations a share means little
TRIAL_SECONDS = 60.0  # a trial that never reported back (client left) is retried after this
MAX_TRACKED = 100_000  # host:port pairs with failure history kept (least recent dropped)


class Gate(StrEnum):
    CLOSED = "closed"  # dial
    TRIAL = "trial"  # half-open: this connection is the one trial
    OPEN = "open"  # answer locally


@dataclass(slots=True)
class _Track:
    failures: int = 0  # consecutive
    opened_at: float = 0.0
    open_until: float = 0.0  # 0: closed
    backoff: float = 0.0  # length of the current/last open period
    trial_started: float = 0.0  # when the half-open trial began; 0 when none runs
    last_error: str = ""


@dataclass(frozen=True)
class BreakerSettings:
    failures: int
    minimum: float
    maximum: float
    max_share: float


class Breaker:
    def __init__(
        self, settings: BreakerSettings, metrics: Metrics, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings
        self._metrics = metrics
        self._clock = clock
        self._tracks: LRUCache[str, _Track] = LRUCache(MAX_TRACKED)
        # Each destination's latest outcome in the guard window, oldest first, and how many
        # of them are failures: updated in O(1) per connection.
        self._recent: OrderedDict[str, tuple[float, bool]] = OrderedDict()
        self._failing = 0
        self.guard_tripped = False
        metrics.breaker_guard.set(0)

    # -- decisions --------------------------------------------------------------------------

    def gate(self, key: str) -> Gate:
        """Whether a connection to `key` (host:port) may be dialled now."""
        track = self._tracks.get(key)
        if track is None or not track.open_until:
            return Gate.CLOSED
        now = self._clock()
        if now < track.open_until or now - track.trial_started < TRIAL_SECONDS:
            return Gate.OPEN
        track.trial_started = now  # this connection is the trial; a lost one is retried
        return Gate.TRIAL

    def verdict(self, key: str) -> Verdict | None:
        """The `unreachable` verdict for an open breaker, in the shape every verdict has."""
        track = self._tracks.get(key)
        if track is None or not track.open_until:
            return None
        evidence = f"{track.failures} connect failures in a row, last: {track.last_error}"
        return Verdict(
            key, State.UNREACHABLE, Signal.UNREACHABLE, evidence, track.opened_at, track.open_until
        )

    def open_verdicts(self) -> list[Verdict]:
        return [v for key in list(self._tracks.keys()) if (v := self.verdict(key)) is not None]

    # -- outcomes ---------------------------------------------------------------------------

    def success(self, key: str) -> None:
        self._observe(key, failed=False)
        track = self._tracks.get(key)
        if track is None:
            return
        if track.open_until:
            log.info("%s reachable again; breaker closed", key)
            self._metrics.verdict_changes.labels(State.UNREACHABLE, State.ALIVE).inc()
        del self._tracks[key]

    def failure(self, key: str, error: str) -> None:
        self._observe(key, failed=True)
        now = self._clock()
        track = self._tracks.get(key)
        if track is None:
            track = self._tracks[key] = _Track()
        track.failures += 1
        track.last_error = error[:200]
        if track.open_until:  # a failed trial: open again, for longer
            track.trial_started = 0.0
            track.backoff = min(track.backoff * 2, self.settings.maximum)
            track.opened_at, track.open_until = now, now + track.backoff
            return
        if track.failures < self.settings.failures:
            return
        if self.guard_tripped:
            return  # our own fault, probably: do not judge the world by it
        track.backoff = self.settings.minimum
        track.opened_at, track.open_until = now, now + track.backoff
        self._metrics.verdict_changes.labels("none", State.UNREACHABLE).inc()
        log.info(
            "%s unreachable (%d connect failures in a row, last: %s); not dialled for %.0fs",
            key,
            track.failures,
            track.last_error,
            track.backoff,
        )

    def _observe(self, key: str, failed: bool) -> None:
        """Keep the guard's window of recent outcomes and re-evaluate the guard."""
        now = self._clock()
        previous = self._recent.pop(key, None)
        if previous is not None and previous[1]:
            self._failing -= 1
        self._recent[key] = (now, failed)
        self._failing += failed
        horizon = now - GUARD_WINDOW_SECONDS
        while self._recent:
            oldest, (seen, was_failed) = next(iter(self._recent.items()))
            if seen >= horizon and len(self._recent) <= MAX_TRACKED:
                break
            del self._recent[oldest]
            self._failing -= was_failed
        tried = len(self._recent)
        share = self._failing / tried if tried else 0.0
        tripped = tried >= GUARD_MIN_DESTINATIONS and share > self.settings.max_share
        if tripped != self.guard_tripped:
            self.guard_tripped = tripped
            self._metrics.breaker_guard.set(1 if tripped else 0)
            if tripped:
                log.warning(
                    "%.0f%% of the %d destinations tried in the last %.0f minutes failed "
                    "to connect: the fault is probably on our side (network, resolver, "
                    "egress policy); opening no new unreachable breakers until it clears",
                    share * 100,
                    tried,
                    GUARD_WINDOW_SECONDS / 60,
                )
            else:
                log.info(
                    "connect failures back to %.0f%% of destinations; breakers may open again",
                    share * 100,
                )
