"""The small HTTP/1.1 client against a real loopback server speaking each body framing."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.remote import http1


async def exchange(answer: bytes, limit: int = 1000, read_body: bool = True) -> http1.HttpReply:
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        return await http1.request(
            "127.0.0.1",
            port,
            "GET",
            "/x",
            host_header="h",
            seconds=5,
            limit=limit,
            read_body=read_body,
        )
    finally:
        server.close()
        await server.wait_closed()
        assert received and received[0].startswith(b"GET /x HTTP/1.1\r\nHost: h\r\n")


@pytest.mark.parametrize(
    "answer",
    [
        b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{"a":1}',
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n{"a\r\n4\r\n":1}\r\n0\r\n\r\n',
        b'HTTP/1.1 200 OK\r\n\r\n{"a":1}',
    ],
    ids=["content-length", "chunked", "until-close"],
)
def test_each_body_framing_reads_the_same(answer: bytes) -> None:
    reply = asyncio.run(exchange(answer))
    assert (reply.status, reply.body) == (200, b'{"a":1}')


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 2000,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n" + b"x" * 2048,
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * (http1.MAX_HEAD_BYTES + http1.READ_CHUNK) + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9x\r\n\r\n",
    ],
    ids=[
        "too-large",
        "cut-short",
        "not-http",
        "too-large-until-close",
        "too-large-chunked",
        "head-too-large",
        "bad-chunk-size",
        "bad-content-length",
    ],
)
def test_bad_answers_are_value_errors(answer: bytes) -> None:
    with pytest.raises(ValueError):
        asyncio.run(exchange(answer))


def test_status_only_leaves_even_an_oversized_body_unread() -> None:
    """A probe needs the 410 and its Cache-Control, not the page behind it."""
    answer = b"HTTP/1.1 410 Gone\r\nCache-Control: max-age=60\r\n\r\n" + b"x" * 5000
    reply = asyncio.run(exchange(answer, read_body=False))
    assert (reply.status, reply.headers["cache-control"], reply.body) == (410, "max-age=60", b"")


def test_an_interim_answer_is_skipped_for_the_final_one() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n"
    reply = asyncio.run(exchange(answer))
    assert (reply.status, reply.headers["x-a"], reply.body) == (204, "b", b"")


def test_a_header_value_with_a_line_break_is_refused_before_sending() -> None:
    received: list[bytes] = []

    async def attempt() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            received.append(await reader.read())
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            await http1.request(
                "127.0.0.1",
                port,
                "GET",
                "/",
                host_header="h",
                headers={"X": "a\r\nInjected: 1"},
                seconds=5,
                limit=10,
            )
        finally:
            server.close()
            await server.wait_closed()

    with pytest.raises(ValueError, match="cannot send"):
        asyncio.run(attempt())
    assert received == []  # refused before connecting
