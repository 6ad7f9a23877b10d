"""DNS over UDP on a few long-lived sockets, many queries in flight on each.

dnspython's resolver opens, registers and closes a socket for every query; with five
queries per new server name that was most of the CPU a burst of new names costs
(~370 µs per query here, against ~120 µs on a shared socket). Replies are matched by
query ID *and* question, so a reply to another query, or a forged one without the exact
question, is dropped. Sockets are replaced after a number of queries so the source port
keeps moving (RFC 5452: ID and port are what a spoofer must guess).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import struct
from dataclasses import dataclass, field
from typing import cast

SOCKETS_PER_NAMESERVER = 4  # source ports in use at once: spoofing needs port and ID
QUERIES_PER_SOCKET = 1024  # then a new socket (a new random port) takes its place
HEADER = struct.Struct("!HHHHHH")
FLAG_RD = 0x0100  # recursion desired: we talk to a recursive resolver
FLAG_AD = 0x0020  # RFC 6840 §5.7: ask the resolver to report validation
FLAG_TC = 0x0200
EDNS_PAYLOAD = 1232  # DNS flag day 2020: fits any path MTU without fragments
EDNS_DO = 0x8000  # DNSSEC OK: lets a validating resolver set AD


def question_wire(qname: bytes, rdtype: int) -> bytes:
    """The question section for `qname` (uncompressed wire form), class IN."""
    return qname + struct.pack("!HH", rdtype, 1)


def query_wire(qid: int, question: bytes, dnssec: bool) -> bytes:
    """A whole query: header, one question, and an OPT record with DO when asked for."""
    flags = FLAG_RD | (FLAG_AD if dnssec else 0)
    header = HEADER.pack(qid, flags, 1, 0, 0, 1 if dnssec else 0)
    if not dnssec:
        return header + question
    opt = b"\x00" + struct.pack("!HHIH", 41, EDNS_PAYLOAD, EDNS_DO, 0)
    return header + question + opt


def is_truncated(reply: bytes) -> bool:
    return len(reply) >= 4 and bool(reply[2] << 8 & FLAG_TC)


@dataclass(eq=False)
class _Socket(asyncio.DatagramProtocol):
    """One connected UDP socket and the queries waiting on it."""

    pending: dict[int, tuple[bytes, asyncio.Future[bytes]]] = field(default_factory=dict)
    transport: asyncio.DatagramTransport | None = None
    sent: int = 0
    retired: bool = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if len(data) < HEADER.size:
            return
        waiting = self.pending.get(int.from_bytes(data[:2], "big"))
        if waiting is None:
            return
        question, future = waiting
        end = HEADER.size + len(question)
        if (
            not data[2] & 0x80
            or data[4:6] != b"\x00\x01"
            or data[HEADER.size : end].lower() != question
        ):
            return  # not the question we asked: a stray or forged reply, keep waiting
        if not future.done():
            future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable, ...) are not tied to one query: all waiting fail.
        for _, future in self.pending.values():
            if not future.done():
                future.set_exception(OSError(f"{exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.error_received(exc or ConnectionError("socket closed"))

    def free_id(self) -> int:
        while True:
            qid = secrets.randbelow(0x10000)
            if qid not in self.pending:
                return qid

    def close_when_idle(self) -> None:
        if not self.pending and self.transport is not None:
            with contextlib.suppress(RuntimeError):  # its event loop is closed already
                self.transport.close()

    def usable(self, limit: int) -> bool:
        return self.transport is not None and not self.retired and self.sent < limit

    def retire(self) -> None:
        self.retired = True
        self.close_when_idle()


class UdpTransport:
    """Sends queries to resolvers over shared UDP sockets; one per running event loop."""

    def __init__(
        self, sockets: int = SOCKETS_PER_NAMESERVER, queries_per_socket: int = QUERIES_PER_SOCKET
    ) -> None:
        self._width = sockets
        self._queries_per_socket = queries_per_socket
        self._sockets: dict[tuple[str, int], list[_Socket | None]] = {}
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: dict[tuple[str, int, int], asyncio.Future[_Socket]] = {}

    async def exchange(
        self, address: str, port: int, question: bytes, dnssec: bool, seconds: float
    ) -> bytes:
        """One query, one reply (raw wire). Raises TimeoutError or OSError."""
        sock = await self._socket(address, port)
        qid = sock.free_id()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        sock.pending[qid] = (question.lower(), future)
        timer = loop.call_later(seconds, _expire, future)
        try:
            assert sock.transport is not None
            sock.transport.sendto(query_wire(qid, question, dnssec))
            sock.sent += 1
            return await future
        finally:
            timer.cancel()
            del sock.pending[qid]
            if sock.retired or sock.sent >= self._queries_per_socket:
                sock.close_when_idle()

    def close(self) -> None:
        """Close every socket once the queries waiting on it are answered or time out."""
        for slots in self._sockets.values():
            for sock in slots:
                if sock is not None:
                    sock.retire()
        self._sockets.clear()

    async def _socket(self, address: str, port: int) -> _Socket:
        """A socket to send on: the next slot's, opened or replaced when needed."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # sockets belong to the loop that made them
            self.close()
            self._loop = loop
        while True:
            slots = self._sockets.setdefault((address, port), [None] * self._width)
            index = self._next = (self._next + 1) % self._width
            sock = slots[index]
            if sock is not None and sock.usable(self._queries_per_socket):
                return sock
            opening = self._opening.get((address, port, index))
            if opening is not None:  # another query is opening this slot's socket: wait, retry
                await asyncio.shield(opening)
                continue
            if sock is not None:
                sock.retire()  # closes once its last reply is in
            return await self._open(loop, address, port, index, slots)

    async def _open(
        self,
        loop: asyncio.AbstractEventLoop,
        address: str,
        port: int,
        index: int,
        slots: list[_Socket | None],
    ) -> _Socket:
        opening: asyncio.Future[_Socket] = loop.create_future()
        self._opening[(address, port, index)] = opening
        try:
            _, fresh = await loop.create_datagram_endpoint(_Socket, remote_addr=(address, port))
        except OSError as e:
            opening.set_exception(e)
            opening.exception()  # retrieved: waiters re-raise it, nobody else must
            raise
        else:
            opening.set_result(fresh)
        finally:
            del self._opening[(address, port, index)]
        slots[index] = fresh
        return fresh


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
