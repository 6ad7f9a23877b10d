"""One HTTP/1.1 request with a body, over TCP or TLS, bounded in time and size.

The sidecar's own small clients (the 410 probes, `check --probe`, Synapse's admin API,
signing-key fetches) need a status, a few headers and a JSON body, and nothing else: no
pooling, no redirects, no proxy (the sidecar is the proxy). `Connection: close` on every
request. h11 (which mitmproxy already depends on) reads and writes the messages: body
framing by Content-Length, chunked encoding or the end of the stream; this module only
moves bytes and enforces the bounds.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

import h11

# Status line and headers of an API answer. h11 refuses an unfinished head beyond this; a
# head that arrives whole in one read may reach MAX_HEAD_BYTES + READ_CHUNK (still bounded).
MAX_HEAD_BYTES = 16 * 1024
READ_CHUNK = 64 * 1024  # bytes asked of the socket at a time


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
    fields = [("Host", host_header), ("Connection", "close"), *(headers or {}).items()]
    if body or method in ("POST", "PUT"):
        fields.append(("Content-Length", str(len(body))))
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        events: list[h11.Event] = [h11.Request(method=method, target=path, headers=fields)]
        events += [h11.Data(data=body)] if body else []
        out = b"".join(connection.send(event) or b"" for event in [*events, h11.EndOfMessage()])
    except h11.LocalProtocolError as e:  # e.g. a CR or LF in a header value
        raise ValueError(f"cannot send that request: {e}") from None
    async with asyncio.timeout(seconds):
        reader, writer = await asyncio.open_connection(
            host, port, ssl=tls, server_hostname=server_hostname if tls is not None else None
        )
        try:
            writer.write(out)
            await writer.drain()
            return await _read_reply(connection, reader, limit, read_body)
        finally:
            writer.close()


async def _read_reply(
    connection: h11.Connection, reader: asyncio.StreamReader, limit: int, read_body: bool
) -> HttpReply:
    response: h11.Response | None = None
    headers: dict[str, str] = {}
    data = bytearray()
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as e:
            raise ValueError(f"malformed response: {e}") from None
        if event is h11.NEED_DATA:
            try:
                more = await reader.read(READ_CHUNK)
            except ssl.SSLError:  # closed without TLS close_notify: the stream ends here
                more = b""
            connection.receive_data(more)  # b"": the end of the stream
        elif isinstance(event, h11.Response):
            response = event
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
            length = headers.get("content-length")
            if length is not None and int(length) > limit:  # h11 checked it is digits
                raise ValueError(f"response body of {length[:20]} bytes (limit {limit})")
            if not read_body:
                return HttpReply(event.status_code, headers, b"")
        elif isinstance(event, h11.Data):
            data += event.data
            if len(data) > limit:
                raise ValueError(f"response body larger than {limit} bytes")
        elif isinstance(event, h11.EndOfMessage):
            assert response is not None  # h11 orders the events
            return HttpReply(response.status_code, headers, bytes(data))
        # h11.InformationalResponse (1xx): the final answer follows
