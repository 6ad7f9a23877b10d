"""`verdicts list --synapse`: our verdicts side by side with Synapse's view of each name.

For every listed verdict, Synapse's admin API is asked for its `destinations` row (is it
backing off, since when, how long until the next try) and how many rooms it shares with
the name: the rooms that still tie the homeserver to a dead server.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sidecar.synapse.admin import AdminEndpoint, AdminError, SynapseAdmin

CONCURRENT_CALLS = 8  # admin requests in flight at once; each is a database query


def join(result: dict[str, Any], url: str, token: str) -> dict[str, Any]:
    """`result` (a /v1/verdicts page) with a `synapse` object added to every verdict."""
    admin = SynapseAdmin(AdminEndpoint.parse(url), token, None)
    verdicts = list(result.get("verdicts", []))
    views = asyncio.run(_ask_all(admin, [str(v["destination"]) for v in verdicts]))
    return {
        **result,
        "verdicts": [{**v, "synapse": s} for v, s in zip(verdicts, views, strict=True)],
    }


async def _ask_all(admin: SynapseAdmin, names: list[str]) -> list[dict[str, Any] | None]:
    slots = asyncio.Semaphore(CONCURRENT_CALLS)

    async def one(name: str) -> dict[str, Any] | None:
        async with slots:
            return await _ask(admin, name)

    return list(await asyncio.gather(*(one(n) for n in names)))


async def _ask(admin: SynapseAdmin, name: str) -> dict[str, Any] | None:
    """Synapse's row and shared-room count for `name`; None if Synapse never knew it."""
    if ":" in name and not name.startswith("["):  # host:port breaker keys are not names
        return None
    try:
        row = await admin.destination(name)
        if row is None:
            return None
        rooms = await admin.room_count(name)
    except AdminError as e:
        return {"error": f"{e.result}: {e}"}
    return {
        "retry_interval_ms": row.retry_interval,
        "retry_last_ts": row.retry_last_ts,
        "failure_ts": row.failure_ts,
        "last_successful_stream_ordering": row.last_successful_stream_ordering,
        "rooms": rooms,
    }


def _since(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(ms / 1000))


def _interval(ms: int) -> str:
    seconds = ms / 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s" if ms else "-"


def table(joined: dict[str, Any]) -> str:
    rows = [("DESTINATION", "STATE", "SIGNAL", "SYNAPSE", "RETRY", "FAILING SINCE (UTC)", "ROOMS")]
    for v in joined.get("verdicts", []):
        view = v.get("synapse")
        if view is None:
            synapse, retry, since, rooms = "unknown", "-", "-", "-"
        elif "error" in view:
            synapse, retry, since, rooms = view["error"], "-", "-", "-"
        else:
            backing_off = view["failure_ts"] is not None or view["retry_interval_ms"] > 0
            synapse = "backing off" if backing_off else "sending"
            retry = _interval(view["retry_interval_ms"])
            since = _since(view["failure_ts"])
            rooms = str(view["rooms"] if view["rooms"] is not None else "-")
        rows.append(
            (v["destination"], v["state"], v.get("signal") or "-", synapse, retry, since, rooms)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    shown, total = len(rows) - 1, joined.get("total", len(rows) - 1)
    if total > shown:
        lines.append(f"({shown} of {total}; use --offset/--limit for more)")
    return "\n".join(lines)
