"""The ops HTTP listener: /metrics, /healthz, /readyz and the /v1/verdicts API.

It runs on mitmproxy's own event loop (one process, one loop), so it sees the live cache
without locks. The HTTP/1.1 wire, with its bounds on size and time, is ops/wire.py (and
why it is not tornado's); this module routes and answers. Reading is open (scrapers and
probes need no secret); changing a verdict (PUT, DELETE) needs the bearer token from
`--ops-token-file`.

API (JSON):
  GET    /v1/verdicts?state=&signal=&sort=&limit=&offset=   list, filtered, paginated;
                                                        sort=suppressed: most refused first
  GET    /v1/verdicts/{name}                            one verdict with its evidence
  PUT    /v1/verdicts/{name}  {"ttl": "30d", "comment": "..."}   mark gone (operator)
  DELETE /v1/verdicts/{name}                            forget and check again now
                                                        (and release a --hold-reborn hold)
  GET    /v1/resurrections                              gone servers that came back
  GET    /v1/synapse                                    the admin API link, last poll
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import unicodedata
from functools import partial
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from sidecar import __version__
from sidecar.config.values import parse_duration
from sidecar.judge.names import Authority, InvalidName, normalize_host
from sidecar.judge.verdicts import Entry, State, to_record
from sidecar.ops.backend import Listed, OpsBackend, Unavailable
from sidecar.ops.wire import MAX_HEADER_BYTES, Reply, Request, json_reply, serve

log = logging.getLogger("sidecar.ops")

DEFAULT_PAGE = 100
MAX_PAGE = 1000
LIST_ORDERS = ("name", "suppressed")  # by server name, or most refused first
DEFAULT_OPERATOR_TTL = "3650d"  # an operator's "gone" holds until they DELETE it
# A sentence or a ticket link. The comment becomes the verdict's evidence, logged on the
# verdict-change line: 500 characters (at most 2,000 bytes of UTF-8) keep that line far
# below the 16 KiB at which container runtimes split a log line.
MAX_COMMENT = 500
# Characters that would break a log line in two or disguise it: controls (CR, LF, ESC...),
# format characters (bidi overrides), line/paragraph separators and lone surrogates.
FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
ERROR_LOG_INTERVAL = 60.0  # a handler bug logs at most one line a minute, not one per request


def verdict_json(entry: Entry) -> dict[str, Any]:
    """The API form of a verdict (docs/design.md §3)."""
    record = to_record(entry.verdict)
    record["suppressed_count"] = entry.suppressed_count
    return record


class OpsServer:
    """Serves the ops endpoints over one running sidecar (`OpsBackend`)."""

    def __init__(self, backend: OpsBackend) -> None:
        self._backend = backend
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self._failures = 0
        self._last_failure_log = float("-inf")

    async def start(self, listen: Authority) -> None:
        try:
            self._server = await asyncio.start_server(
                partial(serve, handle=self._handle, on_failure=self._failed),
                listen.host,
                listen.port,
                limit=MAX_HEADER_BYTES,
            )
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

    async def _handle(self, request: Request) -> Reply:
        try:
            url = urlsplit(request.target)
        except ValueError as e:
            return json_reply(400, {"error": f"malformed request target: {e}"})
        return await self.route(
            request.method, url.path, parse_qs(url.query), request.headers, request.body
        )

    def _failed(self, error: Exception) -> Reply:
        """A handler bug: answer 500, log it once a minute, keep serving."""
        self._log_failure(error)
        return json_reply(500, {"error": "internal error; see the sidecar log"})

    def _log_failure(self, error: Exception) -> None:
        """One ERROR line (no traceback) per ERROR_LOG_INTERVAL, however many requests fail:
        the listener is unauthenticated, so a failing request must not flood the log."""
        self._failures += 1
        now = time.monotonic()
        if now - self._last_failure_log < ERROR_LOG_INTERVAL:
            return
        self._last_failure_log = now
        count, self._failures = self._failures, 0
        log.error(
            "an ops HTTP request failed: %s: %s (%d such failures since the last "
            "report; answered 500; at most one line a minute)",
            type(error).__name__,
            _one_line(str(error)),
            count,
        )
        log.debug("the traceback of that ops HTTP failure", exc_info=error)  # --log-level debug

    async def route(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
    ) -> Reply:
        try:
            return await self._route(method, path, query, headers, body)
        except Unavailable as e:
            return json_reply(404 if path == "/v1/synapse" else 503, {"error": str(e)})

    async def _route(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: dict[str, str],
        body: bytes,
    ) -> Reply:
        if path.startswith("/v1/verdicts/"):
            name = unquote(path.removeprefix("/v1/verdicts/"))
            if method in ("GET", "HEAD"):
                return self._show(name)
            if method in ("PUT", "DELETE"):
                denied = self._authorize(headers)
                if denied is not None:
                    return denied
                return self._mark(name, body) if method == "PUT" else await self._recheck(name)
            return json_reply(405, {"error": f"{method} is not supported on {path}"})
        if method not in ("GET", "HEAD"):
            return json_reply(405, {"error": f"{method} is not supported on {path[:100]}"})
        if path == "/metrics":
            payload = generate_latest(self._backend.registry)
            return 200, {"Content-Type": CONTENT_TYPE_LATEST}, payload
        if path == "/healthz":
            return json_reply(200, {"status": "ok", "version": __version__})
        if path == "/readyz":
            return self._readyz()
        if path == "/v1/verdicts":
            return self._list(query)
        if path == "/v1/resurrections":
            return self._resurrections()
        if path == "/v1/synapse":
            return json_reply(200, self._backend.synapse())
        endpoints = [
            "/metrics",
            "/healthz",
            "/readyz",
            "/v1/verdicts",
            "/v1/resurrections",
            "/v1/synapse",
        ]
        return json_reply(
            404, {"error": f"no such endpoint {path[:100]!r}", "endpoints": endpoints}
        )

    def _authorize(self, headers: dict[str, str]) -> Reply | None:
        token = self._backend.ops_token
        if token is None:
            return json_reply(
                403,
                {
                    "error": "the ops API is read-only: start the sidecar with "
                    "--ops-token-file to allow changes"
                },
            )
        scheme, _, given = headers.get("authorization", "").partition(" ")
        given = given.strip()
        # The head was decoded as latin-1, so any byte arrives here; a token is printable
        # ASCII. Anything else is a malformed header: 401, never an exception.
        wellformed = scheme.lower() == "bearer" and given.isascii() and given.isprintable()
        # Compared as bytes: compare_digest raises TypeError on non-ASCII str.
        if not (wellformed and hmac.compare_digest(given.encode(), token.encode())):
            status, extra, payload = json_reply(401, {"error": "missing or wrong bearer token"})
            return (
                status,
                {**extra, "WWW-Authenticate": 'Bearer realm="tombstone-sidecar"'},
                payload,
            )
        return None

    def _readyz(self) -> Reply:
        readiness = self._backend.readiness()
        detail: dict[str, Any] = {
            "status": readiness.status,
            "proxy_running": readiness.proxy_running,
            "enforce": readiness.enforce,
            "nameservers": readiness.nameservers,
            "verdicts_cached": readiness.verdicts_cached,
        }
        if readiness.store is not None:
            detail["store"] = readiness.store
        if readiness.dns is not None:
            detail["dns"] = readiness.dns
        return json_reply(200 if readiness.ready else 503, detail)

    def _list(self, query: dict[str, list[str]]) -> Reply:
        state = query.get("state", [None])[0]
        signal = query.get("signal", [None])[0]
        order = query.get("sort", ["name"])[0]
        if order not in LIST_ORDERS:
            return json_reply(400, {"error": f"sort must be one of {', '.join(LIST_ORDERS)}"})
        if state is not None and state not in {s.value for s in State}:
            return json_reply(
                400, {"error": f"state must be one of {', '.join(s.value for s in State)}"}
            )
        try:
            limit = max(min(int(query.get("limit", [DEFAULT_PAGE])[0]), MAX_PAGE), 0)
            offset = max(int(query.get("offset", [0])[0]), 0)
        except ValueError:
            return json_reply(400, {"error": "limit and offset must be whole numbers"})
        chosen = [
            e
            for e in self._backend.entries()
            if (state is None or e.verdict.state == state)
            and (signal is None or e.verdict.signal == signal)
        ]
        if order == "suppressed":  # the dead servers this homeserver tries hardest to reach
            chosen.sort(key=lambda e: (-e.suppressed_count, e.verdict.destination))
        else:
            chosen.sort(key=lambda e: e.verdict.destination)
        page = chosen[offset : offset + limit]
        return json_reply(
            200,
            {
                "total": len(chosen),
                "offset": offset,
                "limit": limit,
                "verdicts": [verdict_json(e) for e in page],
            },
        )

    def _show(self, raw_name: str) -> Reply:
        try:
            name = normalize_host(raw_name)
        except InvalidName as e:
            return json_reply(400, {"error": str(e)})
        entry = self._backend.verdict(name)
        if entry is None:
            return json_reply(404, {"error": f"no verdict for {name}", "destination": name})
        return json_reply(200, verdict_json(entry))

    def _mark(self, raw_name: str, body: bytes) -> Reply:
        try:
            name = normalize_host(raw_name)
        except InvalidName as e:
            return json_reply(400, {"error": str(e)})
        try:
            request = json.loads(body) if body.strip() else {}
            if not isinstance(request, dict):
                raise ValueError("the body must be a JSON object")
            ttl = _operator_ttl(request.get("ttl", DEFAULT_OPERATOR_TTL))
            comment = _comment(request.get("comment", ""))
        except (ValueError, RecursionError) as e:
            return json_reply(400, {"error": f"bad request body: {str(e)[:200]}"})
        entry = self._backend.mark_gone(name, ttl, comment)
        log.info("%s marked gone through the ops API", name)
        return json_reply(200, verdict_json(entry))

    async def _recheck(self, raw_name: str) -> Reply:
        try:
            name = normalize_host(raw_name)
        except InvalidName as e:
            return json_reply(400, {"error": str(e)})
        try:
            entry, released = await self._backend.recheck(name)
        except Listed as e:
            return json_reply(409, {"error": str(e)})
        log.info(
            "%s forgotten through the ops API%s; now %s",
            name,
            " (hold released)" if released else "",
            entry.verdict.state,
        )
        return json_reply(200, verdict_json(entry))

    def _resurrections(self) -> Reply:
        found = self._backend.resurrections()
        events = [e.to_json() for e in reversed(found.events)]
        return json_reply(200, {"total": len(events), "held": found.held, "resurrections": events})


def _operator_ttl(raw: object) -> float:
    """The PUT body's `ttl`: a duration string up to 3650d, parse_duration's bound and as
    long as a deny-list verdict lasts (ValueError says why)."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        raw = repr(raw)  # plain seconds
    if not isinstance(raw, str) or len(raw) > 32:
        raise ValueError('ttl must be a duration such as "30d" or a number of seconds')
    return parse_duration(raw)  # rejects zero, negative, nan, inf and beyond 3650d


def _comment(raw: object) -> str:
    """The PUT body's `comment`: bounded and free of anything that could split a log line."""
    if not isinstance(raw, str) or len(raw) > MAX_COMMENT:
        raise ValueError(f"comment must be a string of at most {MAX_COMMENT} characters")
    for position, char in enumerate(raw):
        if unicodedata.category(char) in FORBIDDEN_CATEGORIES:
            raise ValueError(
                f"comment has a control character ({char!a}) at position "
                f"{position}; it must be one line of text"
            )
    return raw.strip()


def _one_line(text: str, limit: int = 200) -> str:
    """`text` as one bounded log line: non-printable characters escaped."""
    return ascii(text[:limit])[1:-1]
