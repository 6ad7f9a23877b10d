"""The ops listener's wire (sidecar/ops/wire.py): each bound answered once, in one place.

A real asyncio StreamReader with the listener's limit is fed the bytes a client sent.
"""

from __future__ import annotations

import asyncio

import pytest

from sidecar.ops import wire


def read(data: bytes) -> wire.Request:
    async def go() -> wire.Request:
        reader = asyncio.StreamReader(limit=wire.MAX_HEADER_BYTES)
        reader.feed_data(data)
        reader.feed_eof()
        return await wire.read_request(reader)

    return asyncio.run(go())


def refused(data: bytes) -> tuple[int, str]:
    with pytest.raises(wire.Refused) as caught:
        read(data)
    status, _, body = caught.value.reply
    return status, body.decode()


def test_a_put_is_read_with_its_body_and_lower_case_headers() -> None:
    request = read(b"PUT /v1/verdicts/a HTTP/1.1\r\nContent-Length: 2\r\nX-A: b\r\n\r\n{}tail")
    assert request == wire.Request(
        "PUT", "/v1/verdicts/a", {"content-length": "2", "x-a": "b"}, b"{}"
    )


def test_a_get_body_is_left_unread() -> None:
    assert read(b"GET /healthz HTTP/1.1\r\nContent-Length: 99\r\n\r\n").body == b""


def test_each_bound_is_a_json_answer() -> None:
    padding = b"X: " + b"a" * wire.MAX_HEADER_BYTES + b"\r\n"
    assert refused(b"GET / HTTP/1.1\r\n" + padding + b"\r\n")[0] == 413
    too_long = str(wire.MAX_BODY_BYTES + 1).encode()
    assert refused(b"PUT / HTTP/1.1\r\nContent-Length: " + too_long + b"\r\n\r\n")[0] == 413
    assert refused(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n")[0] == 413
    assert refused(b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n") == (
        400,
        '{\n "error": "Content-Length is not a number"\n}',
    )
    assert refused(b"GET /\r\n\r\n")[0] == 400


def test_a_body_cut_short_is_the_client_leaving() -> None:
    with pytest.raises(asyncio.IncompleteReadError):
        read(b"PUT / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab")


def test_head_keeps_the_content_length_and_drops_the_body() -> None:
    reply = (404, {"Content-Type": "application/json"}, b'{"a": 1}')
    assert wire.encode(reply, head_only=True) == (
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 8\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\n\r\n"
    )
    assert wire.encode(reply, head_only=False).endswith(b'\r\n\r\n{"a": 1}')
