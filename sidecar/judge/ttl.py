"""How long a verdict holds: one clamp for every lifetime the sidecar takes from outside.

A DNS TTL (`--min-ttl`..`--max-ttl`) and a 410's `max-age`/`Expires` (`--min-gone-ttl`..
`--max-gone-ttl`, `--gone-ttl` when it says nothing) are both numbers a remote server
chose: each is clamped into the operator's range, and a missing one takes the default.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TtlBounds:
    """`minimum`..`maximum` seconds; `default` for a lifetime nobody stated (else the
    maximum: a DNS answer without a TTL is as good as the longest allowed)."""

    minimum: float
    maximum: float
    default: float | None = None

    def clamp(self, ttl: float | None) -> float:
        if ttl is None:
            return self.maximum if self.default is None else self.clamp(self.default)
        return max(self.minimum, min(self.maximum, float(ttl)))
