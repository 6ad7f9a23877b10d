"""Synapse's admin API, for the two things the sidecar asks of it (issue 9, part 2).

- `reset_connection(d)`: when a verdict is lifted, Synapse should retry `d` now rather
  than sleep out a backoff of up to a week. Synapse 1.163 answers 404 for a destination
  it has never written a row for and 400 "does not need to be reset" when the row has no
  retry timing (`rest/admin/federation.py`): both mean there is nothing to wake, and are
  counted as `not_needed`, not as failures.
- `destinations()` / `destination(d)` / `room_count(d)`: Synapse's view of each remote
  (backoff, last failure, last success, rooms shared), for resume-early polling and for
  `verdicts list --synapse`.

Nothing here ever changes a proxy decision. The API being down, or the token being wrong,
is one WARNING line per change of state (mitmproxy stops on an ERROR logged at start),
`tombstone_synapse_admin_up` at 0, and `tombstone_synapse_admin_requests_total{result}`.
"""

from __future__ import annotations

import json
import logging
import ssl
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sidecar.metrics import Metrics
from sidecar.remote import http1

log = logging.getLogger("sidecar.synapse")
T = TypeVar("T")

ADMIN_PREFIX = "/_synapse/admin/v1/federation/destinations"
REQUEST_TIMEOUT_SECONDS = 10.0  # an admin call is a database lookup on the homeserver
MAX_REPLY_BYTES = 4 * 1024 * 1024  # one page of 500 destinations is ~100 KiB
PAGE_SIZE = 500  # destinations per admin request while polling
MAX_PAGES = 40  # per poll: 20 000 destinations; beyond that the rest waits for their TTL

OK, NOT_NEEDED, NOT_FOUND = "ok", "not_needed", "not_found"
UNAUTHORIZED, UNREACHABLE, ERROR = "unauthorized", "unreachable", "error"


class AdminError(Exception):
    """A call that did not work; `result` is its `tombstone_synapse_admin_requests_total` label."""

    def __init__(self, result: str, detail: str) -> None:
        super().__init__(detail)
        self.result = result


@dataclass(frozen=True)
class Destination:
    """One row of Synapse's `destinations` table, as the admin API reports it."""

    destination: str
    retry_last_ts: int  # ms since the epoch; 0 when Synapse is not backing off
    retry_interval: int  # ms
    failure_ts: int | None  # ms; set at the first failure of a run, cleared on success
    last_successful_stream_ordering: int | None

    @property
    def backing_off(self) -> bool:
        return self.failure_ts is not None or self.retry_interval > 0

    @classmethod
    def from_json(cls, row: Any) -> Destination:
        if not isinstance(row, dict) or not isinstance(row.get("destination"), str):
            raise ValueError(f"not a destination row: {str(row)[:100]}")

        def number(key: str) -> int | None:
            value = row.get(key)
            if value is None:
                return None
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{key} is not a number: {value!r}")
            return value

        return cls(
            destination=row["destination"],
            retry_last_ts=number("retry_last_ts") or 0,
            retry_interval=number("retry_interval") or 0,
            failure_ts=number("failure_ts"),
            last_successful_stream_ordering=number("last_successful_stream_ordering"),
        )


@dataclass(frozen=True)
class AdminEndpoint:
    """`--synapse-admin-url` taken apart: where to connect and how."""

    scheme: str
    host: str
    port: int
    base_path: str

    @classmethod
    def parse(cls, url: str) -> AdminEndpoint:
        """`http://127.0.0.1:8008` or `https://matrix.example.org`; ValueError otherwise."""
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{url!r} must start with http:// or https://")
        try:
            port = parts.port
        except ValueError as e:
            raise ValueError(f"{url!r}: {e}") from None
        if not parts.hostname:
            raise ValueError(f"{url!r} has no host")
        if parts.query or parts.fragment or parts.username:
            raise ValueError(f"{url!r}: give only scheme://host[:port][/path]")
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port or default, parts.path.rstrip("/"))

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.base_path}"


class SynapseAdmin:
    """A client for the destinations admin API; tracks and reports its own health."""

    def __init__(self, endpoint: AdminEndpoint, token: str, metrics: Metrics | None) -> None:
        self.endpoint = endpoint
        self._token = token
        self._metrics = metrics
        self._tls = ssl.create_default_context() if endpoint.scheme == "https" else None
        self.state = OK  # OK, or the result of the last failed call
        self.detail = "no request yet"
        if metrics is not None:
            metrics.synapse_admin_up.set(1)

    async def reset_connection(self, name: str) -> str:
        """Wake Synapse's federation sender for `name`: OK or NOT_NEEDED, or AdminError."""
        path = f"{ADMIN_PREFIX}/{_quote(name)}/reset_connection"
        try:
            await self._call("reset_connection", "POST", path, b"{}")
        except AdminError as e:
            if e.result == NOT_FOUND:  # Synapse never wrote a row: nothing backs off
                return NOT_NEEDED
            raise
        return OK

    async def destination(self, name: str) -> Destination | None:
        """Synapse's row for `name`, None if it has none."""
        try:
            reply = await self._call("destination", "GET", f"{ADMIN_PREFIX}/{_quote(name)}")
        except AdminError as e:
            if e.result == NOT_FOUND:
                return None
            raise
        return self._parse("destination", Destination.from_json, reply)

    async def destinations(
        self, page_size: int = PAGE_SIZE, max_pages: int = MAX_PAGES
    ) -> tuple[list[Destination], bool]:
        """Every row, a page at a time, at most `max_pages`; True if there were more."""
        rows: list[Destination] = []
        start = 0
        for _ in range(max_pages):
            query = urllib.parse.urlencode({"from": start, "limit": page_size})
            reply = await self._call("destinations", "GET", f"{ADMIN_PREFIX}?{query}")
            page = self._parse("destinations", _rows, reply)
            rows += page
            token = reply.get("next_token")
            if token is None or not page:
                return rows, False
            try:
                start = int(token)
            except (TypeError, ValueError):
                raise self._failed("destinations", ERROR, f"bad next_token {token!r}") from None
        return rows, True

    async def room_count(self, name: str) -> int | None:
        """How many rooms Synapse shares with `name` (None: Synapse does not know it)."""
        path = f"{ADMIN_PREFIX}/{_quote(name)}/rooms?limit=1"
        try:
            reply = await self._call("rooms", "GET", path)
        except AdminError as e:
            if e.result == NOT_FOUND:
                return None
            raise
        total = reply.get("total")
        if not isinstance(total, int) or isinstance(total, bool):
            raise self._failed("rooms", ERROR, f"rooms answer without a total: {str(reply)[:100]}")
        return total

    # -- plumbing -----------------------------------------------------------------------

    def _parse(self, op: str, parse: Callable[[Any], T], reply: dict[str, Any]) -> T:
        try:
            return parse(reply)
        except ValueError as e:
            raise self._failed(op, ERROR, f"unexpected answer: {e}") from None

    async def _call(self, op: str, method: str, path: str, body: bytes = b"") -> dict[str, Any]:
        endpoint = self.endpoint
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        if body:
            headers["Content-Type"] = "application/json"
        try:
            reply = await http1.request(
                endpoint.host,
                endpoint.port,
                method,
                endpoint.base_path + path,
                host_header=endpoint.host_header,
                headers=headers,
                body=body,
                tls=self._tls,
                server_hostname=endpoint.host,
                seconds=REQUEST_TIMEOUT_SECONDS,
                limit=MAX_REPLY_BYTES,
            )
        except TimeoutError:
            detail = f"no answer in {REQUEST_TIMEOUT_SECONDS:g}s"
            raise self._failed(op, UNREACHABLE, detail) from None
        except (OSError, ssl.SSLError) as e:
            raise self._failed(op, UNREACHABLE, str(e) or type(e).__name__) from None
        except ValueError as e:
            raise self._failed(op, ERROR, str(e)) from None
        try:
            data = json.loads(reply.body) if reply.body.strip() else {}
        except (ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            raise self._failed(op, ERROR, f"{reply.status} answer is not a JSON object")
        if reply.status == 200:
            self._count(op, OK)
            self._health(OK, "answering")
            return data
        error = f"{reply.status} {data.get('errcode', '')} {data.get('error', '')}".strip()
        if reply.status in (401, 403):
            raise self._failed(op, UNAUTHORIZED, f"{error} (is the token an admin's?)")
        if reply.status == 404 and data.get("errcode") == "M_NOT_FOUND":
            self._count(op, NOT_FOUND)
            self._health(OK, "answering")
            raise AdminError(NOT_FOUND, error)
        if reply.status == 400 and op == "reset_connection":
            self._count(op, NOT_NEEDED)  # "The retry timing does not need to be reset"
            self._health(OK, "answering")
            raise AdminError(NOT_NEEDED, error)
        raise self._failed(op, ERROR, error)

    def _failed(self, op: str, result: str, detail: str) -> AdminError:
        self._count(op, result)
        self._health(result, detail)
        return AdminError(result, detail)

    def _count(self, op: str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.synapse_admin_requests.labels(op, result).inc()

    def _health(self, state: str, detail: str) -> None:
        """One log line per change of state, never one per request."""
        was, self.state, self.detail = self.state, state, detail
        if self._metrics is not None:
            self._metrics.synapse_admin_up.set(1 if state == OK else 0)
        if state == was:
            return
        if state == OK:
            log.info("Synapse admin API at %s answers again", self.endpoint)
        else:
            log.warning(
                "Synapse admin API at %s: %s (%s); proxying is not affected, lifted verdicts "
                "will not reset Synapse's backoff until it answers",
                self.endpoint,
                state,
                detail,
            )


def _rows(reply: dict[str, Any]) -> list[Destination]:
    rows = reply.get("destinations")
    if not isinstance(rows, list):
        raise ValueError("no destinations list")
    return [Destination.from_json(row) for row in rows]


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")
