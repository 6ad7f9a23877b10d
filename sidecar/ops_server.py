"""The ops HTTP listener: /metrics, /healthz, /readyz and read-only /v1/verdicts.

It runs on mitmproxy's own event loop (one process, one loop), so a scrape sees the live
cache without locks. It speaks just enough HTTP/1.1 for Prometheus, kubelet probes and
curl: one request per connection, bounded header size, a deadline per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from sidecar import __version__
from sidecar.names import Authority, InvalidName, normalize_host
from sidecar.verdicts import Entry, State

if TYPE_CHECKING:
    from sidecar.addon import TombstoneAddon

log = logging.getLogger("sidecar.ops")

MAX_HEADER_BYTES = 16 * 1024  # a scrape or probe request is a few hundred bytes
REQUEST_DEADLINE_SECONDS = 10.0  # a client that dribbles its request is dropped
DEFAULT_PAGE = 100
MAX_PAGE = 1000
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


def verdict_json(entry: Entry) -> dict[str, Any]:
    """The API form of a verdict (DESIGN.md §3)."""
    v = entry.verdict
    return {
        "destination": v.destination,
        "state": v.state.value,
        "signal": v.signal,
        "evidence": v.evidence,
        "observed_at": v.observed_at,
        "expires_at": v.expires_at,
        "suppressed_count": entry.suppressed_count,
    }


class OpsServer:
    """Serves the ops endpoints for one addon."""

    def __init__(self, addon: TombstoneAddon) -> None:
        self._addon = addon
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self, listen: Authority) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, listen.host, listen.port)
        except OSError as e:
            raise OSError(f"cannot listen for ops HTTP on {listen}: {e.strerror or e}") from e
        sock = self._server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        log.info("ops HTTP on http://%s/ (metrics, healthz, readyz, v1/verdicts)", listen)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, headers, body = await asyncio.wait_for(
                self._respond(reader), REQUEST_DEADLINE_SECONDS
            )
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            writer.close()
            return
        head = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        head += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _json(413, {"error": "request headers too large"})
        if len(raw) > MAX_HEADER_BYTES:
            return _json(413, {"error": "request headers too large"})
        request_line = raw.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3:
            return _json(400, {"error": f"malformed request line {request_line[:100]!r}"})
        method, target, _ = parts
        url = urlsplit(target)
        if method not in ("GET", "HEAD"):
            return _json(405, {"error": f"{method} is not supported here"})
        return self.route(url.path, parse_qs(url.query))

    def route(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        addon = self._addon
        if path == "/metrics":
            return (
                200,
                {"Content-Type": CONTENT_TYPE_LATEST},
                generate_latest(addon.metrics.registry),
            )
        if path == "/healthz":
            return _json(200, {"status": "ok", "version": __version__})
        if path == "/readyz":
            return self._readyz()
        if path == "/v1/verdicts":
            return self._list(query)
        if path.startswith("/v1/verdicts/"):
            return self._show(unquote(path.removeprefix("/v1/verdicts/")))
        return _json(
            404,
            {
                "error": f"no such endpoint {path[:100]!r}",
                "endpoints": ["/metrics", "/healthz", "/readyz", "/v1/verdicts"],
            },
        )

    def _readyz(self) -> tuple[int, dict[str, str], bytes]:
        addon = self._addon
        settings = addon.settings
        detail: dict[str, Any] = {
            "proxy_running": addon.is_running,
            "enforce": settings.enforce if settings else None,
            "nameservers": addon.policy.dns.nameservers if addon.policy else [],
            "verdicts_cached": len(addon.policy.cache) if addon.policy else 0,
        }
        ready = addon.is_running and addon.policy is not None
        detail["status"] = "ready" if ready else "starting"
        return _json(200 if ready else 503, detail)

    def _list(self, query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        policy = self._addon.policy
        if policy is None:
            return _json(503, {"error": "not configured yet"})
        state = query.get("state", [None])[0]
        signal = query.get("signal", [None])[0]
        if state is not None and state not in {s.value for s in State}:
            return _json(
                400, {"error": f"state must be one of {', '.join(s.value for s in State)}"}
            )
        try:
            limit = min(int(query.get("limit", [DEFAULT_PAGE])[0]), MAX_PAGE)
            offset = max(int(query.get("offset", [0])[0]), 0)
        except ValueError:
            return _json(400, {"error": "limit and offset must be whole numbers"})
        entries = sorted(policy.entries(), key=lambda e: e.verdict.destination)
        chosen = [
            e
            for e in entries
            if (state is None or e.verdict.state == state)
            and (signal is None or e.verdict.signal == signal)
        ]
        page = chosen[offset : offset + max(limit, 0)]
        return _json(
            200,
            {"total": len(chosen), "offset": offset, "verdicts": [verdict_json(e) for e in page]},
        )

    def _show(self, raw_name: str) -> tuple[int, dict[str, str], bytes]:
        policy = self._addon.policy
        if policy is None:
            return _json(503, {"error": "not configured yet"})
        try:
            name = normalize_host(raw_name)
        except InvalidName as e:
            return _json(400, {"error": str(e)})
        entry = policy.cached(name)
        if entry is None:
            return _json(404, {"error": f"no verdict for {name}", "destination": name})
        return _json(200, verdict_json(entry))


def _json(status: int, payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps(payload, indent=1).encode()
