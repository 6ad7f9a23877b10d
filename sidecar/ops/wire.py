"""The ops listener's HTTP/1.1 wire: one request per connection, read under one guard.

Just enough HTTP/1.1 for Prometheus, kubelet probes, curl and `tombstone-sidecar verdicts`:
the head up to its blank line, a body only for PUT/POST/DELETE (by Content-Length), one
answer with Content-Length and `Connection: close`. `serve` holds the one guard: the head
is bounded by the stream's limit (MAX_HEADER_BYTES), the body by MAX_BODY_BYTES, and
reading plus answering by REQUEST_DEADLINE_SECONDS. Whatever breaks a bound or is malformed
gets a JSON answer (413 or 400), never a silent close, once the head is complete.

Why our own and not tornado's HTTPServer (mitmproxy ships tornado), measured with tornado
6.4.2 on the sidecar's loop (no_keep_alive, max_header_size, max_body_size,
idle_connection_timeout, body_timeout), against tests/fuzz/test_ops_http.py and
tests/integration/test_ops_api.py:
- a client that shuts its sending side after the request (as those tests do) gets no
  answer at all: tornado's IOStream closes the connection at end of input;
- a head over max_header_size is a connection reset, not a 413;
- a body over max_body_size, a version other than HTTP/1.x, a header line without a colon
  or a bad Content-Length get a bare `400 Bad Request` with neither Content-Length nor a
  JSON body, written by tornado before any code of ours runs;
- it costs more per request: GET /healthz 203-227 us of sidecar CPU instead of 123-135 us
  (one client on loopback, interleaved runs). GET /metrics (10 KiB) is 700-860 us either
  way: prometheus_client's generate_latest dominates, the wire is lost in the noise.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

MAX_HEADER_BYTES = 16 * 1024  # a scrape or probe request is a few hundred bytes
MAX_BODY_BYTES = 64 * 1024  # a PUT body is a TTL and a comment
REQUEST_DEADLINE_SECONDS = 10.0  # a client that dribbles its request is dropped
BODY_METHODS = frozenset({"PUT", "POST", "DELETE"})  # the only requests whose body is read
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

Reply = tuple[int, dict[str, str], bytes]  # status, extra headers, body


@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names; the head decoded as latin-1
    body: bytes


class Refused(Exception):
    """The request broke a bound or is malformed: answer `reply` instead of handling it."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.reply = json_reply(status, {"error": error})


def json_reply(status: int, payload: dict[str, Any]) -> Reply:
    return status, {"Content-Type": "application/json"}, json.dumps(payload, indent=1).encode()


async def read_request(reader: asyncio.StreamReader) -> Request:
    """One request from `reader`, whose limit is MAX_HEADER_BYTES. Refused (answer it);
    IncompleteReadError or ConnectionError when the client goes away first."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise Refused(413, "request headers too large") from None
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise Refused(400, f"malformed request line {lines[0][:100]!r}")
    method, target, _ = parts
    headers = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    body = b""
    if method in BODY_METHODS:
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise Refused(400, "Content-Length is not a number") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise Refused(413, f"body larger than {MAX_BODY_BYTES} bytes")
        body = await reader.readexactly(length)
    return Request(method, target, headers, body)


def encode(reply: Reply, head_only: bool) -> bytes:
    """The answer's bytes; HEAD: the same status and Content-Length as GET, and no body
    (RFC 9110 §9.3.2)."""
    status, headers, body = reply
    head = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + (b"" if head_only else body)


async def serve(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handle: Callable[[Request], Awaitable[Reply]],
    on_failure: Callable[[Exception], Reply],
) -> None:
    """Read one request, answer it with `handle`, close: all within the deadline. A client
    that is too slow or leaves is dropped without an answer; an exception from `handle` is
    a bug, answered with `on_failure`'s reply."""
    head_only = False
    try:
        async with asyncio.timeout(REQUEST_DEADLINE_SECONDS):
            try:
                request = await read_request(reader)
            except Refused as e:
                reply = e.reply
            else:
                head_only = request.method == "HEAD"
                try:
                    reply = await handle(request)
                except Exception as e:  # a bug: answer, keep serving
                    reply = on_failure(e)
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        writer.close()
        return
    writer.write(encode(reply, head_only))
    try:
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
