"""The HTTP tombstone: `410 Gone` from `/_matrix/` or `/.well-known/matrix/` (MSC4188).

One rule for both places a 410 is seen — a real response in intercept mode and an active
probe in pass-through mode: which responses count, and how long the verdict holds
(`Cache-Control: max-age`, else `Expires`, else `--gone-ttl`; clamped to
`--min-gone-ttl`..`--max-gone-ttl`). A 404, 403 or 5xx is not a tombstone.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping

from sidecar.judge.ttl import TtlBounds

TOMBSTONE_STATUS = 410
TOMBSTONE_PATHS = ("/_matrix/", "/.well-known/matrix/")
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d{1,10})\"?", re.IGNORECASE)


def is_tombstone(status: int, path: str) -> bool:
    """A 410 on a Matrix federation or well-known path."""
    return status == TOMBSTONE_STATUS and path.startswith(TOMBSTONE_PATHS)


def lifetime(headers: Mapping[str, str], ttl: TtlBounds, now: float | None = None) -> float:
    """How long the 410 holds: max-age, else Expires, else the default; clamped."""
    cache_control = headers.get("cache-control") or headers.get("Cache-Control") or ""
    match = _MAX_AGE.search(cache_control)
    if match:
        return ttl.clamp(float(match.group(1)))
    expires = headers.get("expires") or headers.get("Expires")
    if expires:
        try:
            when = email.utils.parsedate_to_datetime(expires).timestamp()
        except (TypeError, ValueError, IndexError, OverflowError):
            when = None
        if when is not None:
            return ttl.clamp(when - (time.time() if now is None else now))
    return ttl.clamp(None)


def evidence(status: int, path: str, where: str, seconds: float) -> str:
    """The evidence text every http_410 verdict carries."""
    return f"{status} Gone from {where}{path} (holds {seconds:.0f}s)"
