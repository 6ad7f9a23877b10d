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
import socket
import struct

SOCKETS_PER_NAMESERVER = 4  # source ports in use at once: spoofing needs port and ID
QUERIES_PER_SOCKET = 1024  # then a new socket (a new random port) takes its place
HEADER = struct.Struct("!HHHHHH")
FLAG_RD = 0x0100  # recursion desired: we talk to a recursive resolver
FLAG_AD = 0x0020  # RFC 6840 §5.7: ask the resolver to report validation
FLAG_TC = 0x0200
EDNS_PAYLOAD = 1232  # DNS flag day 2020: fits any path MTU without fragments
EDNS_DO = 0x8000  # DNSSEC OK: lets a validating resolver set AD
# Replies taken from one socket per turn of the event loop: all that can be waiting (at
# most MAX_CONCURRENT_QUERIES are in flight), while a flood of strays cannot hold the loop.
READS_PER_TURN = 512
MAX_REPLY = 65535  # the largest UDP payload: a longer reply cannot arrive, a shorter fits


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


class _Socket:
    """One connected, non-blocking UDP socket and the queries waiting on it.

    Read by its own reader callback, which takes every reply waiting at each turn of the
    event loop (up to READS_PER_TURN). asyncio's datagram transport reads one datagram
    per socket per turn: in a join storm, with the loop busy with thousands of
    connections, replies then queued in the buffers for seconds (256 in flight on 4
    sockets: 64 turns) and outlived the per-try timeout, so questions were asked twice.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        self.pending: dict[int, tuple[bytes, asyncio.Future[bytes]]] = {}
        self.sent = 0
        self.retired = False
        self.open = True
        self._loop = loop
        self._sock = sock
        loop.add_reader(sock.fileno(), self._read_ready)

    def send(self, wire: bytes) -> None:
        """Send one query; a full send buffer loses it as the network would (the next
        try sends it again), an error on the socket fails every query waiting on it."""
        self.sent += 1
        try:
            self._sock.send(wire)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self.error_received(e)

    def _read_ready(self) -> None:
        for _ in range(READS_PER_TURN):
            try:
                data = self._sock.recv(MAX_REPLY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # an ICMP error reported on the connected socket
                self.error_received(e)
                return
            self.datagram_received(data)

    def datagram_received(self, data: bytes) -> None:
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

    def free_id(self) -> int:
        while True:
            qid = secrets.randbelow(0x10000)
            if qid not in self.pending:
                return qid

    def close_when_idle(self) -> None:
        if not self.pending and self.open:
            self.open = False
            with contextlib.suppress(RuntimeError, ValueError):  # its event loop is closed
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()

    def usable(self, limit: int) -> bool:
        return self.open and not self.retired and self.sent < limit

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

    async def exchange(
        self, address: str, port: int, question: bytes, dnssec: bool, seconds: float
    ) -> bytes:
        """One query, one reply (raw wire). Raises TimeoutError or OSError."""
        sock = self._socket(address, port)
        qid = sock.free_id()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        sock.pending[qid] = (question.lower(), future)
        timer = loop.call_later(seconds, _expire, future)
        try:
            sock.send(query_wire(qid, question, dnssec))
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

    def _socket(self, address: str, port: int) -> _Socket:
        """A socket to send on: the next slot's, opened or replaced when needed."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # sockets belong to the loop that made them
            self.close()
            self._loop = loop
        slots = self._sockets.setdefault((address, port), [None] * self._width)
        index = self._next = (self._next + 1) % self._width
        sock = slots[index]
        if sock is not None and sock.usable(self._queries_per_socket):
            return sock
        if sock is not None:
            sock.retire()  # closes once its last reply is in
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        raw = socket.socket(family, socket.SOCK_DGRAM)
        try:
            raw.setblocking(False)
            raw.connect((address, port))  # a new random source port; no packet is sent
            fresh = slots[index] = _Socket(loop, raw)
        except BaseException:
            raw.close()
            raise
        return fresh


def _expire(future: asyncio.Future[bytes]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
