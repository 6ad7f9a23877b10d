"""Verdicts and their cache: what the sidecar believes about each destination, and until when.

The cache is a cachetools `TLRUCache`: bounded in size (least recently used goes first) and
each entry dropped at its own deadline. That deadline is the verdict's expiry plus a stale
grace: an expired verdict is still served while a re-check runs in the background
(stale-while-revalidate, docs/design.md §6), so a gone server is never re-contacted in the gap
and live traffic never waits for DNS on a refresh.
"""

from __future__ import annotations

import ipaddress
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cachetools import TLRUCache

from sidecar.judge.caches import resized
from sidecar.judge.names import InvalidName, normalize_host
from sidecar.judge.signals import Signal

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
    """One destination's verdict (docs/design.md §3): gone or alive, why, and until when.

    No addresses: those live by their own A/AAAA TTL in sidecar.dns.address_book, so a stored
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
        ttl = format_ttl(self.ttl)
        if self.state in (State.ALIVE, State.UNDECIDED):
            return f"{self.destination} {self.state} ({self.evidence}), ttl {ttl}"
        return f"{self.destination} {self.state} ({self.signal}: {self.evidence}), ttl {ttl}"


def format_ttl(seconds: float) -> str:
    """Seconds as DNS people read them (`300s`, `3600s`), and days from a day on: an
    operator verdict's ten years is `3650d`, not `315360000s`."""
    if seconds >= 86400:
        return f"{round(seconds / 86400, 1):g}d"
    return f"{seconds:.0f}s"


# -- records: what the state file, Redis keys and Redis messages hold ---------------------
#
# Everything read back from a store came from outside this process (another replica, an
# older version, whoever can write the file or reach Redis), so it is validated here, in
# one place, before the request path ever sees it: a bad record is a ValueError, never a
# crash and never an address the guard cannot judge.

# A record is flat: {"addresses": [...]} is its deepest part (2); a pub/sub message wraps
# one more level (3). Anything deeper is not ours.
MAX_RECORD_DEPTH = 3
# Evidence is for a person reading a log or the ops API. Real evidence is under 300
# characters (a TXT tombstone quoted with its name, a hold with its key ids); 1,000 leaves
# room and bounds what a hostile record may make every replica keep per cached name.
MAX_EVIDENCE_CHARS = 1000
# Synapse resolves a name to a handful of addresses; more than this is not a real answer.
MAX_ADDRESSES = 64
# Raw bytes of one record, checked before parsing: evidence at its bound escaped by
# json.dumps (up to 12 bytes a character outside the BMP) plus 64 IPv6 addresses and a
# name fit in about 15 KiB. A pub/sub message is a record plus a few fields.
MAX_RECORD_BYTES = 16 * 1024
MAX_MESSAGE_BYTES = MAX_RECORD_BYTES + 1024
# No real timestamp is beyond the year 9999; larger ones overflow the millisecond TTLs a
# store derives from them.
MAX_TIMESTAMP = 253_402_300_799.0
_STATES = frozenset({State.GONE.value, State.UNREACHABLE.value, State.ALIVE.value})
_SIGNALS = frozenset(s.value for s in Signal)


def load_json(raw: object, limit: int = MAX_RECORD_BYTES) -> Any:
    """Parse one stored JSON document of at most `limit` bytes and MAX_RECORD_DEPTH levels;
    ValueError otherwise. json.loads raises RecursionError past ~1,000 levels (measured:
    0.1 ms for a 100,000-deep `[[[...`, Python 3.11), which is caught here; the depth is
    then checked by an iterative walk, never by recursion."""
    if not isinstance(raw, bytes | str):
        raise ValueError(f"expected JSON text, got {type(raw).__name__}")
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise ValueError(f"{size} bytes; a stored record is at most {limit}")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_RECORD_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int beyond 4,300 digits
        raise ValueError(f"not JSON: {str(e)[:120]}") from None
    check_depth(value)
    return value


def check_depth(value: Any, limit: int = MAX_RECORD_DEPTH) -> None:
    """ValueError when `value` nests lists/objects deeper than `limit` (iterative)."""
    if not isinstance(value, dict | list):
        return
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise ValueError(f"nested deeper than {limit} levels")
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))


def to_record(verdict: Verdict) -> dict[str, Any]:
    """The JSON-ready form shared by the state file, Redis and the ops API. Evidence is cut
    to MAX_EVIDENCE_CHARS, so what one replica writes every replica reads back."""
    evidence = verdict.evidence
    if len(evidence) > MAX_EVIDENCE_CHARS:
        evidence = evidence[: MAX_EVIDENCE_CHARS - 1] + "…"
    return {
        "destination": verdict.destination,
        "state": verdict.state.value,
        "signal": verdict.signal,
        "evidence": evidence,
        "observed_at": verdict.observed_at,
        "expires_at": verdict.expires_at,
    }


def decode_record(raw: object) -> Verdict:
    """A verdict from a stored JSON record (state file row, Redis key); ValueError if bad."""
    return from_record(load_json(raw))


def from_record(record: Any) -> Verdict:
    """Rebuild a verdict from `to_record` output; ValueError says what is wrong with it.

    The one check at every store boundary: a normalized server name, a known state and
    signal, bounded evidence, finite times in order. Unknown fields are ignored (a newer
    replica may add some); only flat records pass. An `addresses` field, written by
    earlier versions, must still be a list of IP literals (anything else is not a record
    we wrote), and is then ignored: dial addresses live by their own DNS TTL
    (sidecar.dns.address_book) and are never taken from a store."""
    if not isinstance(record, dict):
        raise ValueError(f"expected an object, got {type(record).__name__}")
    check_depth(record, MAX_RECORD_DEPTH - 1)
    for field in ("destination", "state", "observed_at", "expires_at"):
        if field not in record:
            raise ValueError(f"missing field {field!r}")
    destination = destination_name(record["destination"])
    raw_state = record["state"]
    if not isinstance(raw_state, str) or raw_state not in _STATES:
        raise ValueError(f"state {_quote(raw_state)} is not one of gone, unreachable, alive")
    state = State(raw_state)
    signal = record.get("signal")
    if signal is not None and (not isinstance(signal, str) or signal not in _SIGNALS):
        raise ValueError(f"signal {_quote(signal)} is not a known signal")
    if state is State.UNDECIDED or (state in SUPPRESSING) != (signal is not None):
        raise ValueError(f"state {state} does not go with signal {signal!r}")
    evidence = record.get("evidence", "")
    if not isinstance(evidence, str):
        raise ValueError("evidence must be a string")
    if len(evidence) > MAX_EVIDENCE_CHARS:
        raise ValueError(f"evidence is {len(evidence)} characters; at most {MAX_EVIDENCE_CHARS}")
    observed_at = _timestamp(record["observed_at"], "observed_at")
    expires_at = _timestamp(record["expires_at"], "expires_at")
    if expires_at < observed_at:
        raise ValueError("expires_at is before observed_at")
    _check_addresses(record.get("addresses"))
    return Verdict(destination, state, signal, evidence, observed_at, expires_at)


def destination_name(value: Any) -> str:
    """`value` if it is a server name in the normalized form verdicts are keyed by (so a
    stored `Example.ORG.` cannot shadow `example.org`); ValueError otherwise."""
    if not isinstance(value, str) or not value:
        raise ValueError("a destination must be a non-empty string")
    try:
        normalized = normalize_host(value)
    except InvalidName:
        normalized = None
    if normalized != value:
        raise ValueError(f"destination {_quote(value)} is not a normalized server name")
    return value


def _timestamp(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field} must be a number, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError(f"{field} is beyond the range of a float") from None
    if not (math.isfinite(seconds) and 0 <= seconds <= MAX_TIMESTAMP):
        raise ValueError(f"{field} {_quote(value)} is not a time between 1970 and 9999")
    return seconds


def _check_addresses(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, list) or len(value) > MAX_ADDRESSES:
        raise ValueError(f"addresses must be a list of at most {MAX_ADDRESSES} IP addresses")
    for address in value:
        if not isinstance(address, str):
            raise ValueError(f"address {_quote(address)} is not a string")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ValueError(f"address {_quote(address)} is not an IP address") from None


def _quote(value: Any, limit: int = 60) -> str:
    """Outside input in an error message, cut so a hostile record cannot flood the log."""
    text = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return text if len(text) <= limit else text[:limit] + "…"


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

    def resize(self, maxsize: int) -> None:
        """Hold at most `maxsize` entries from now on, keeping the ones held; if they do not
        all fit, suppressing verdicts are the last to go (a live one only costs a decision)."""
        if maxsize != self._entries.maxsize:
            self._entries = resized(
                self._entries,
                maxsize,
                self._drop_at,
                self._clock,
                keep_last=lambda entry: entry.verdict.suppresses,
            )

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
