"""Verdicts and their cache: what the sidecar believes about each destination, and until when.

The cache is a cachetools `TLRUCache`: bounded in size (least recently used goes first) and
each entry dropped at its own deadline. That deadline is the verdict's expiry plus a stale
grace: an expired verdict is still served while a re-check runs in the background
(stale-while-revalidate, DESIGN.md §6), so a gone server is never re-contacted in the gap
and live traffic never waits for DNS on a refresh.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cachetools import TLRUCache

STALE_GRACE_SECONDS = 3600.0  # serve an expired verdict this long while re-checks fail


class State(StrEnum):
    GONE = "gone"
    UNREACHABLE = "unreachable"
    ALIVE = "alive"
    # Not a verdict: DNS could not answer. Cached briefly so a broken resolver is not
    # hammered per request; forwarded (fail open); never exported as a verdict.
    UNDECIDED = "undecided"


SUPPRESSING = frozenset({State.GONE, State.UNREACHABLE})


@dataclass(frozen=True, slots=True)
class Verdict:
    """One destination's verdict (DESIGN.md §3): gone or alive, why, and until when.

    No addresses: those live by their own A/AAAA TTL in sidecar.address_book, so a stored
    or shared verdict can never make the sidecar dial an address from another time.
    """

    destination: str
    state: State
    signal: str | None
    evidence: str
    observed_at: float
    expires_at: float

    @property
    def suppresses(self) -> bool:
        return self.state in SUPPRESSING

    @property
    def ttl(self) -> float:
        return self.expires_at - self.observed_at

    def describe(self) -> str:
        """The log form: `example.org gone (dns_txt_gone: TXT ...), ttl 3600s`."""
        if self.state in (State.ALIVE, State.UNDECIDED):
            return f"{self.destination} {self.state} ({self.evidence}), ttl {self.ttl:.0f}s"
        return (
            f"{self.destination} {self.state} ({self.signal}: {self.evidence}), ttl {self.ttl:.0f}s"
        )


def to_record(verdict: Verdict) -> dict[str, Any]:
    """The JSON-ready form shared by the state file, Redis and the ops API."""
    return {
        "destination": verdict.destination,
        "state": verdict.state.value,
        "signal": verdict.signal,
        "evidence": verdict.evidence,
        "observed_at": verdict.observed_at,
        "expires_at": verdict.expires_at,
    }


def from_record(record: Any) -> Verdict:
    """Rebuild a verdict from `to_record` output; ValueError says what is wrong with it.

    An `addresses` field (written by versions before 0.x) is ignored, never dialled."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    try:
        destination = record["destination"]
        state = State(record["state"])
        signal = record.get("signal")
        evidence = record.get("evidence", "")
        observed_at = float(record["observed_at"])
        expires_at = float(record["expires_at"])
    except KeyError as e:
        raise ValueError(f"missing field {e}") from None
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"bad field value: {e}") from None
    if not isinstance(destination, str) or not destination:
        raise ValueError("destination must be a non-empty string")
    if signal is not None and not isinstance(signal, str):
        raise ValueError("signal must be a string or null")
    if not isinstance(evidence, str):
        raise ValueError("evidence must be a string")
    if state is State.UNDECIDED or (state in SUPPRESSING) != (signal is not None):
        raise ValueError(f"state {state} does not go with signal {signal!r}")
    if not math.isfinite(observed_at) or not math.isfinite(expires_at) or expires_at < observed_at:
        raise ValueError("observed_at/expires_at must be finite and in order")
    return Verdict(destination, state, signal, evidence, observed_at, expires_at)


@dataclass(slots=True)
class Entry:
    """A cached verdict plus the bookkeeping that changes on the hot path."""

    verdict: Verdict
    suppressed_count: int = 0
    next_refresh: float = 0.0  # no background re-check before this (backs off a failing one)


class VerdictCache:
    """Bounded verdict cache with per-entry expiry and a stale grace period."""

    def __init__(
        self,
        maxsize: int,
        clock: Callable[[], float] = time.time,
        stale_grace: float = STALE_GRACE_SECONDS,
    ) -> None:
        self._clock = clock
        self.grace = stale_grace
        self._entries: TLRUCache[str, Entry] = TLRUCache(
            maxsize=maxsize, ttu=self._drop_at, timer=clock
        )

    def _drop_at(self, _key: str, entry: Entry, _now: float) -> float:
        grace = self.grace if entry.verdict.state is not State.UNDECIDED else 0.0
        return entry.verdict.expires_at + grace

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def put(self, verdict: Verdict) -> Entry:
        """Store `verdict`, keeping the suppression count of the entry it replaces."""
        previous = self._entries.get(verdict.destination)
        entry = Entry(verdict, previous.suppressed_count if previous else 0)
        self._entries[verdict.destination] = entry
        return entry

    def forget(self, name: str) -> Entry | None:
        return self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        self._entries.expire()
        return iter(list(self._entries.values()))

    def counts(self) -> list[tuple[tuple[str, str], int]]:
        """Verdict counts by (state, signal) for the `tombstone_verdicts` gauge."""
        tally: Counter[tuple[str, str]] = Counter()
        for entry in self:
            verdict = entry.verdict
            if verdict.state is not State.UNDECIDED:
                tally[(verdict.state.value, verdict.signal or "none")] += 1
        return sorted(tally.items())
