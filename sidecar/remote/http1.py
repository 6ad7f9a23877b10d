"""One HTTP/1.1 request with a body, over TCP or TLS, bounded in time and size.

The sidecar's own small clients (the 410 probes, `check --probe`, Synapse's admin API,
signing-key fetches) need a status,
a few headers and a JSON body, and nothing else: no pooling, no redirects, no proxy (the
sidecar is the proxy). `Connection: close` on every request; the body is read to its
Content-Length, through chunked encoding, or to the end of the stream.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

MAX_HEAD_BYTES = 16 * 1024  # status line and headers of an API answer
CRLF = b"\r\n"


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


async def request(
    host: str,
    port: int,
    method: str,
    path: str,
    *,
    host_header: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    seconds: float,
    limit: int,
    read_body: bool = True,
) -> HttpReply:
    """Send one request, all of it within `seconds`; OSError, ssl.SSLError, TimeoutError
    or ValueError (malformed, too large) on failure. `read_body=False`: status and headers
    are all the caller needs (the body, however large, is left unread)."""
    async with asyncio.timeout(seconds):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=server_hostname if tls is not None else None,
            limit=MAX_HEAD_BYTES,
        )  # fmt: skip
        try:
            lines = [f"{method} {path} HTTP/1.1", f"Host: {host_header}", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            if body or method in ("POST", "PUT"):
                lines.append(f"Content-Length: {len(body)}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
            await writer.drain()
            try:
                head = await reader.readuntil(CRLF + CRLF)
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError) as e:
                raise ValueError(f"malformed response head: {e}") from None
            status, answer_headers = _parse_head(head)
            payload = await _read_body(reader, answer_headers, limit) if read_body else b""
        finally:
            writer.close()
    return HttpReply(status, answer_headers, payload)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"malformed status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], limit: int) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader, limit)
    length = headers.get("content-length")
    if length is not None:
        if not length.isdigit() or int(length) > limit:
            raise ValueError(f"response body of {length[:20]} bytes (limit {limit})")
        try:
            return await reader.readexactly(int(length))
        except asyncio.IncompleteReadError as e:
            raise ValueError("response body cut short") from e
    data = b""
    while len(data) <= limit:
        try:
            more = await reader.read(limit + 1 - len(data))
        except ssl.SSLError:  # closed without TLS close_notify: what arrived is the body
            break
        if not more:
            break
        data += more
    if len(data) > limit:
        raise ValueError(f"response body larger than {limit} bytes")
    return data


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    data = b""
    try:
        while True:
            size_line = await reader.readuntil(CRLF)
            size = int(size_line.split(b";", 1)[0].strip() or b"x", 16)
            if size == 0:
                return data
            if len(data) + size > limit:
                raise ValueError(f"response body larger than {limit} bytes")
            data += await reader.readexactly(size)
            await reader.readexactly(2)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
        raise ValueError(f"malformed chunked body: {e}") from None
