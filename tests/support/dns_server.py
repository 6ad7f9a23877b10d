"""A real authoritative DNS server on loopback for resolver tests.

The sidecar's behaviour depends on exact DNS semantics (NXDOMAIN vs NODATA,
negative-caching TTLs from the SOA, SERVFAIL, timeouts, UDP truncation and
TCP retry), so tests talk to this server over real UDP and TCP sockets
instead of mocking a resolver.  Packets are built with dnslib; the socket
loops are our own so that start/stop are fast and deterministic.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import heapq
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from dnslib import (
    AAAA,
    CNAME,
    EDNS0,
    QTYPE,
    RCODE,
    RR,
    SOA,
    SRV,
    TXT,
    A,
    DNSHeader,
    DNSRecord,
)

Transport = Literal["udp", "tcp"]
#: Handler for :meth:`Zone.add_raw`: gets the parsed request and returns the
#: complete reply packet (sent verbatim, never truncated) or ``None`` to drop.
RawHandler = Callable[[Any], bytes | None]

_MAX_CNAME_CHAIN = 16
_UDP_PLAIN_LIMIT = 512
_EDNS_PAYLOAD = 1232
_OPT = 41
# Linux's SO_RCVBUFFORCE (Python has no name for it): SO_RCVBUF past net.core.rmem_max,
# allowed to root; without it a requested buffer is silently capped at rmem_max (~208 KB
# by default, about 256 small queries).
SO_RCVBUFFORCE = 33


def normalize_name(name: str) -> str:
    """Canonical key for a DNS name: lowercase, no trailing dot, root is ''."""
    return name.strip().rstrip(".").lower()


def _ancestors(name: str) -> Iterable[str]:
    """Yield ``name`` and each parent up to and including the root ''."""
    while True:
        yield name
        if not name:
            return
        name = name.partition(".")[2]


def _txt_strings(value: str) -> list[bytes]:
    """Split one logical string into <=255-byte character-strings."""
    raw = value.encode()
    if not raw:
        return [b""]
    return [raw[i : i + 255] for i in range(0, len(raw), 255)]


def _make_rdata(name: str, rrtype: str, rdata: str, ttl: int) -> Any:
    """Parse presentation-format rdata for one record (validated eagerly)."""
    if rrtype == "A":
        return A(rdata)
    if rrtype == "AAAA":
        return AAAA(rdata)
    if rrtype == "CNAME":
        return CNAME(rdata)
    if rrtype == "SRV":
        prio, weight, port, target = rdata.split()
        return SRV(int(prio), int(weight), int(port), target)
    if rrtype == "SOA":
        mname, rname, *times = rdata.split()
        if len(times) != 5:
            raise ValueError(f"SOA needs 7 fields, got {rdata!r}")
        return SOA(mname, rname, tuple(int(t) for t in times))
    # Anything else (MX, NS, PTR, CAA, ...): let dnslib's zone parser do it.
    parsed = RR.fromZone(f"{name or '.'}. {ttl} IN {rrtype} {rdata}")
    if len(parsed) != 1:
        raise ValueError(f"could not parse {rrtype} rdata {rdata!r}")
    return parsed[0].rdata


@dataclass(frozen=True)
class _Negative:
    """An explicit nxdomain()/nodata() declaration and its SOA overrides."""

    nxdomain: bool
    soa_minimum: int | None
    soa_ttl: int | None


class QueryRecord(NamedTuple):
    """One query as received by the server."""

    name: str
    rrtype: str
    transport: Transport


class Zone:
    """Mutable, thread-safe record store answering as an authoritative server.

    Tests reconfigure it while the server runs (e.g. flip a name from A to
    NXDOMAIN between two requests), so every method takes the lock.

    Negative answers carry an SOA in the authority section.  Its owner is the
    closest ancestor holding an explicit SOA record (``add(apex, "SOA", ...)``)
    or, failing that, the top-level label of the name (``test.``, ``org.``),
    so every name gets an answer.  Unknown names give NXDOMAIN unless
    ``default_nxdomain=False``, in which case they give NOERROR/NODATA.
    """

    def __init__(
        self,
        default_nxdomain: bool = True,
        soa_minimum: int = 300,
        soa_ttl: int = 3600,
    ) -> None:
        self.default_nxdomain = default_nxdomain
        self.default_soa_minimum = soa_minimum
        self.default_soa_ttl = soa_ttl
        self._lock = threading.RLock()
        self._records: dict[str, dict[str, list[tuple[int, Any]]]] = {}
        self._negative: dict[str, _Negative] = {}
        self._servfail: set[str] = set()
        self._blackhole: set[str] = set()
        self._raw: dict[tuple[str, str], tuple[RawHandler, Transport | None]] = {}
        self._delay = 0.0

    # -- configuration -----------------------------------------------------

    def add(self, name: str, rrtype: str, rdata: str | list[str], ttl: int = 300) -> None:
        """Append record(s).  For TXT a list is ONE record of several strings;
        for other types a list is several records of that type."""
        key = normalize_name(name)
        rrtype = rrtype.upper()
        if rrtype == "TXT":
            values = [rdata] if isinstance(rdata, str) else list(rdata)
            strings = [chunk for value in values for chunk in _txt_strings(value)]
            rds: list[Any] = [TXT(strings)]
        else:
            items = [rdata] if isinstance(rdata, str) else list(rdata)
            rds = [_make_rdata(key, rrtype, item, ttl) for item in items]
        with self._lock:
            self._negative.pop(key, None)
            bucket = self._records.setdefault(key, {}).setdefault(rrtype, [])
            bucket.extend((ttl, rd) for rd in rds)

    def remove(self, name: str, rrtype: str | None = None) -> None:
        """Drop records at ``name`` (all types, or just ``rrtype``)."""
        key = normalize_name(name)
        with self._lock:
            if rrtype is None:
                self._records.pop(key, None)
                return
            types = self._records.get(key)
            if types is not None:
                types.pop(rrtype.upper(), None)
                if not types:
                    del self._records[key]

    def nxdomain(self, name: str, soa_minimum: int = 600, soa_ttl: int = 3600) -> None:
        """Declare that ``name`` (and everything below it) does not exist."""
        key = normalize_name(name)
        with self._lock:
            self._records.pop(key, None)
            self._negative[key] = _Negative(True, soa_minimum, soa_ttl)

    def nodata(self, name: str, soa_minimum: int | None = None, soa_ttl: int | None = None) -> None:
        """Declare that ``name`` exists but has no records (NOERROR/NODATA)."""
        key = normalize_name(name)
        with self._lock:
            self._negative[key] = _Negative(False, soa_minimum, soa_ttl)

    def servfail(self, name: str) -> None:
        """Answer SERVFAIL for any query type at exactly ``name``."""
        with self._lock:
            self._servfail.add(normalize_name(name))

    def blackhole(self, name: str) -> None:
        """Never answer queries for exactly ``name`` (client times out)."""
        with self._lock:
            self._blackhole.add(normalize_name(name))

    def add_raw(
        self,
        name: str,
        rrtype: str,
        handler: RawHandler,
        transport: Transport | None = None,
    ) -> None:
        """Serve hand-made reply bytes for (name, rrtype); rrtype '*' matches
        any type.  ``transport`` restricts the hook to UDP or TCP only."""
        with self._lock:
            self._raw[(normalize_name(name), rrtype.upper())] = (handler, transport)

    def delay(self, seconds: float) -> None:
        """Add ``seconds`` of latency before every answer (0 disables)."""
        with self._lock:
            self._delay = max(0.0, seconds)

    def clear(self) -> None:
        """Forget all records, declarations, hooks and the delay."""
        with self._lock:
            self._records.clear()
            self._negative.clear()
            self._servfail.clear()
            self._blackhole.clear()
            self._raw.clear()
            self._delay = 0.0

    @property
    def current_delay(self) -> float:
        """Latency currently applied before each answer."""
        with self._lock:
            return self._delay

    # -- answering ---------------------------------------------------------

    def respond(
        self, request: Any, transport: Transport, recursion_available: bool = True
    ) -> Any | bytes | None:
        """Build the reply for a parsed request.

        Returns a dnslib ``DNSRecord`` for normal answers, raw ``bytes`` from
        an :meth:`add_raw` hook, or ``None`` when the query must be dropped.
        """
        question = request.q
        qname = normalize_name(str(question.qname))
        qtype = QTYPE.get(question.qtype, f"TYPE{question.qtype}")
        handler: RawHandler | None = None
        with self._lock:
            if qname in self._blackhole:
                return None
            for key in ((qname, qtype), (qname, "*")):
                hook = self._raw.get(key)
                if hook is not None and hook[1] in (None, transport):
                    handler = hook[0]
                    break
        if handler is not None:  # called unlocked: hooks may be slow
            return handler(request)
        with self._lock:
            reply = request.reply(ra=int(recursion_available), aa=1)
            if qname in self._servfail:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            self._fill_answer(reply, qname, qtype)
            return reply

    def _fill_answer(self, reply: Any, qname: str, qtype: str) -> None:
        """Add answer/authority sections, following in-zone CNAME chains."""
        current = qname
        seen = {current}
        for _ in range(_MAX_CNAME_CHAIN):
            cnames = self._records.get(current, {}).get("CNAME")
            if not cnames or qtype in ("CNAME", "ANY"):
                break
            ttl, rd = cnames[0]
            reply.add_answer(RR(current or ".", QTYPE.CNAME, rdata=rd, ttl=ttl))
            current = normalize_name(str(rd.label))
            if current in seen:
                return
            seen.add(current)

        types = self._records.get(current, {})
        wanted = list(types) if qtype == "ANY" else [qtype]
        found = False
        for rrtype in wanted:
            for ttl, rd in types.get(rrtype, []):
                reply.add_answer(RR(current or ".", getattr(QTYPE, rrtype), rdata=rd, ttl=ttl))
                found = True
        if found:
            return

        negative = self._declared_negative(current)
        if negative is not None and negative.nxdomain:
            exists = False
        elif self._exists(current) or negative is not None:
            exists = True
        else:
            exists = not self.default_nxdomain
        if not exists:
            reply.header.rcode = RCODE.NXDOMAIN
        reply.add_auth(self._soa_for(current, negative))

    def _declared_negative(self, name: str) -> _Negative | None:
        """Own nxdomain/nodata declaration, or an nxdomain on an ancestor."""
        own = self._negative.get(name)
        if own is not None:
            return own
        if name in self._records:
            return None
        for ancestor in list(_ancestors(name))[1:]:
            declared = self._negative.get(ancestor)
            if declared is not None and declared.nxdomain:
                return declared
        return None

    def _exists(self, name: str) -> bool:
        """True if the name owns records or is an empty non-terminal."""
        if name in self._records:
            return True
        suffix = "." + name
        return any((not name and key) or key.endswith(suffix) for key in self._records)

    def _soa_for(self, name: str, negative: _Negative | None) -> Any:
        """SOA RR for negative answers about ``name``."""
        minimum = self.default_soa_minimum
        ttl = self.default_soa_ttl
        for ancestor in _ancestors(name):
            soas = self._records.get(ancestor, {}).get("SOA")
            if soas:
                ttl, rd = soas[0]
                apex = ancestor
                mname, rname, times = rd.mname, rd.rname, tuple(rd.times)
                minimum = times[4]
                break
        else:
            apex = name.rpartition(".")[2]
            mname = f"ns1.{apex}." if apex else "ns1.invalid."
            rname = f"hostmaster.{apex}." if apex else "hostmaster.invalid."
            times = (1, 3600, 600, 86400, minimum)
        if negative is not None:
            minimum = negative.soa_minimum if negative.soa_minimum is not None else minimum
            ttl = negative.soa_ttl if negative.soa_ttl is not None else ttl
        soa = SOA(mname, rname, (*times[:4], minimum))
        return RR(apex or ".", QTYPE.SOA, rdata=soa, ttl=ttl)


def _request_opt(request: Any) -> Any | None:
    """The request's EDNS OPT pseudo-record, if any."""
    for rr in request.ar:
        if rr.rtype == _OPT:
            return rr
    return None


def _udp_limit(request: Any) -> int:
    """Largest UDP reply the client said it accepts (RFC 6891)."""
    opt = _request_opt(request)
    if opt is None:
        return _UDP_PLAIN_LIMIT
    return max(_UDP_PLAIN_LIMIT, int(opt.rclass))


def _truncated(request: Any, reply: Any, with_opt: bool) -> bytes:
    """Header + question with TC set, so the client retries over TCP."""
    header = DNSHeader(
        id=reply.header.id,
        bitmap=reply.header.bitmap,
        q=0,
        a=0,
        auth=0,
        ar=0,
    )
    header.tc = 1
    short = DNSRecord(header=header, questions=list(request.questions))
    if with_opt:
        short.add_ar(EDNS0(udp_len=_EDNS_PAYLOAD))
    return bytes(short.pack())


class DnsServer:
    """Authoritative DNS on 127.0.0.1, same port on UDP and TCP.

    Use as a context manager.  ``queries`` records every parsed question
    (including blackholed ones) so tests can assert caching behaviour;
    ``peak_in_flight`` is the most queries received and not yet answered at once.

    With ``timed_delay`` a delayed UDP answer is built on arrival and sent by one
    timer thread when its delay is up, so any number of queries can wait at once,
    as at a real resolver; by default each delayed answer holds one of 32 threads
    (at most 32 wait at once) and is built after its delay.
    """

    def __init__(
        self,
        zone: Zone | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        recursion_available: bool = True,
        udp_buffer_bytes: int = 0,
        timed_delay: bool = False,
    ) -> None:
        self.zone = zone if zone is not None else Zone()
        # SO_RCVBUF of the UDP socket (0: the kernel's default, about 200 KB, which holds a
        # few hundred queries: a burst of thousands, as a scale world's join sends, overflows
        # it and the dropped queries time out at the asker)
        self.udp_buffer_bytes = udp_buffer_bytes
        self.host = host
        self._requested_port = port
        self.recursion_available = recursion_available
        self._port: int | None = None
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conn_threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._log: list[QueryRecord] = []
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.timed_delay = timed_delay
        self._in_flight = 0
        self._peak_in_flight = 0
        self._due: list[tuple[float, int, bytes | None, tuple[str, int]]] = []  # a heap
        self._due_ready = threading.Condition(self._lock)
        self._due_seq = 0
        self._held = False  # `timed_delay`: replies wait until release_replies()

    # -- lifecycle -----------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        """Bind UDP and TCP on one port, retrying if the TCP side is taken."""
        last_error: OSError | None = None
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                if self.udp_buffer_bytes:
                    set_receive_buffer(udp, self.udp_buffer_bytes)
                udp.bind((self.host, self._requested_port))
                port = udp.getsockname()[1]
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                tcp.bind((self.host, port))
                tcp.listen(64)
                return udp, tcp
            except OSError as exc:
                udp.close()
                tcp.close()
                last_error = exc
                if self._requested_port:
                    break
        raise OSError(f"could not bind UDP+TCP on {self.host}: {last_error}")

    def start(self) -> DnsServer:
        """Bind sockets and start serving in background threads."""
        if self._port is not None:
            raise RuntimeError("DnsServer already started")
        self._stop.clear()
        self._udp, self._tcp = self._bind()
        self._port = self._udp.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=32, thread_name_prefix=f"dns-{self._port}"
        )
        self._threads = [
            threading.Thread(target=self._udp_loop, name=f"dns-udp-{self._port}", daemon=True),
            threading.Thread(target=self._tcp_loop, name=f"dns-tcp-{self._port}", daemon=True),
        ]
        if self.timed_delay:
            self._threads.append(
                threading.Thread(target=self._send_due, name=f"dns-due-{self._port}", daemon=True)
            )
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; joins every thread and closes every socket."""
        if self._port is None:
            return
        self._stop.set()
        with self._due_ready:
            self._due.clear()
            self._due_ready.notify_all()
        assert self._wake_w is not None
        self._wake_w.send(b"x")
        for thread in self._threads:
            thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
            conn_threads = list(self._conn_threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in conn_threads:
            thread.join(timeout=5)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for sock in (self._udp, self._tcp, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._udp = self._tcp = self._wake_r = self._wake_w = None
        self._pool = None
        self._threads = []
        self._port = None

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def hold_replies(self) -> None:
        """`timed_delay`: keep every UDP reply (built on arrival) until release_replies(),
        so a test can have every query arrive before any answer leaves, whatever the
        machine's pace; queries are still received and counted meanwhile."""
        if not self.timed_delay:
            raise RuntimeError("hold_replies needs timed_delay=True")
        with self._due_ready:
            self._held = True

    def release_replies(self) -> None:
        """Send the held replies (each when its delay is up) and hold no more."""
        with self._due_ready:
            self._held = False
            self._due_ready.notify_all()

    # -- introspection -------------------------------------------------------

    @property
    def port(self) -> int:
        """The shared UDP/TCP port (only valid while running)."""
        if self._port is None:
            raise RuntimeError("DnsServer is not running")
        return self._port

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to hand to a resolver."""
        return (self.host, self.port)

    @property
    def query_log(self) -> list[QueryRecord]:
        """Snapshot of received queries including their transport."""
        with self._lock:
            return list(self._log)

    @property
    def queries(self) -> list[tuple[str, str]]:
        """Snapshot of (lowercase name without trailing dot, rrtype)."""
        return [(q.name, q.rrtype) for q in self.query_log]

    def query_count(
        self,
        name: str | None = None,
        rrtype: str | None = None,
        transport: Transport | None = None,
    ) -> int:
        """Number of received queries matching every given filter."""
        key = normalize_name(name) if name is not None else None
        kind = rrtype.upper() if rrtype is not None else None
        return sum(
            1
            for q in self.query_log
            if (key is None or q.name == key)
            and (kind is None or q.rrtype == kind)
            and (transport is None or q.transport == transport)
        )

    def reset_queries(self) -> None:
        """Forget the query log and the in-flight peak (e.g. after warming a cache)."""
        with self._lock:
            self._log.clear()
            self._peak_in_flight = self._in_flight

    @property
    def in_flight(self) -> int:
        """Queries received and not answered (or dropped) yet."""
        with self._lock:
            return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        """The most queries in flight at once since the start or `reset_queries`."""
        with self._lock:
            return self._peak_in_flight

    def _arrived(self) -> None:
        with self._lock:
            self._in_flight += 1
            self._peak_in_flight = max(self._peak_in_flight, self._in_flight)

    def _done(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # -- serving -------------------------------------------------------------

    def _handle(self, data: bytes, transport: Transport, wait: bool = True) -> bytes | None:
        """Turn one request packet into reply bytes (None = stay silent); `wait` sleeps
        the zone's delay first (else the caller sends the reply late)."""
        try:
            request = DNSRecord.parse(data)
        except Exception:  # garbage in, silence out
            return None
        if not request.questions:
            return None
        question = request.q
        name = normalize_name(str(question.qname))
        rrtype = QTYPE.get(question.qtype, f"TYPE{question.qtype}")
        with self._lock:
            self._log.append(QueryRecord(name, rrtype, transport))
        delay = self.zone.current_delay if wait else 0.0
        if delay and self._stop.wait(delay):
            return None
        try:
            result = self.zone.respond(request, transport, self.recursion_available)
        except Exception:  # a broken hook must not kill the server
            reply = request.reply(ra=int(self.recursion_available), aa=1)
            reply.header.rcode = RCODE.SERVFAIL
            result = reply
        if result is None or isinstance(result, bytes | bytearray):
            return bytes(result) if result is not None else None
        with_opt = _request_opt(request) is not None
        if with_opt:
            result.add_ar(EDNS0(udp_len=_EDNS_PAYLOAD))
        packet = bytes(result.pack())
        if transport == "udp" and len(packet) > _udp_limit(request):
            return _truncated(request, result, with_opt)
        return packet

    def _udp_loop(self) -> None:
        """Receive datagrams; answer each on the pool (delays don't block)."""
        assert self._udp is not None and self._wake_r is not None and self._pool
        udp, pool = self._udp, self._pool
        while not self._stop.is_set():
            ready, _, _ = select.select([udp, self._wake_r], [], [])
            if udp not in ready:
                continue
            try:
                data, peer = udp.recvfrom(65535)
            except OSError:
                continue
            self._arrived()
            if self.timed_delay:  # built here, sent late by _send_due: no thread hand-off
                self._answer_udp(data, peer, time.monotonic())
                continue
            try:
                pool.submit(self._answer_udp, data, peer, time.monotonic())
            except RuntimeError:  # pool shut down during stop()
                self._done()
                return

    def _answer_udp(self, data: bytes, peer: tuple[str, int], arrived: float) -> None:
        if self.timed_delay:
            delay = self.zone.current_delay
            reply = self._handle(data, "udp", wait=False)
            if delay or self._held:
                with self._due_ready:
                    self._due_seq += 1
                    heapq.heappush(self._due, (arrived + delay, self._due_seq, reply, peer))
                    self._due_ready.notify()
                return
        else:
            reply = self._handle(data, "udp")
        self._send_udp(reply, peer)

    def _send_udp(self, reply: bytes | None, peer: tuple[str, int]) -> None:
        # Done before the reply leaves: the client may ask its next question at once, and
        # counting that one before this one is done would overstate what is in flight.
        self._done()
        if reply is None or self._stop.is_set() or self._udp is None:
            return
        with contextlib.suppress(OSError):
            self._udp.sendto(reply, peer)

    def _send_due(self) -> None:
        """`timed_delay`: send each held answer when its delay is up (one thread)."""
        while True:
            with self._due_ready:
                while not self._stop.is_set():
                    now = time.monotonic()
                    if self._due and self._due[0][0] <= now and not self._held:
                        break
                    waiting = self._due and not self._held
                    self._due_ready.wait(self._due[0][0] - now if waiting else None)
                if self._stop.is_set():
                    return
                _, _, reply, peer = heapq.heappop(self._due)
            self._send_udp(reply, peer)

    def _tcp_loop(self) -> None:
        """Accept TCP connections, one thread each (length-prefixed frames)."""
        assert self._tcp is not None and self._wake_r is not None
        tcp = self._tcp
        while not self._stop.is_set():
            ready, _, _ = select.select([tcp, self._wake_r], [], [])
            if tcp not in ready:
                continue
            try:
                conn, _ = tcp.accept()
            except OSError:
                continue
            thread = threading.Thread(
                target=self._serve_tcp, args=(conn,), name="dns-tcp-conn", daemon=True
            )
            with self._lock:
                self._conns.add(conn)
                self._conn_threads.add(thread)
            thread.start()

    def _serve_tcp(self, conn: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                header = _recv_exact(conn, 2)
                if header is None:
                    return
                (length,) = struct.unpack("!H", header)
                data = _recv_exact(conn, length)
                if data is None:
                    return
                self._arrived()
                try:
                    reply = self._handle(data, "tcp")
                    if reply is not None:
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
                finally:
                    self._done()
        except OSError:
            return
        finally:
            conn.close()
            with self._lock:
                self._conns.discard(conn)
                self._conn_threads.discard(threading.current_thread())


def set_receive_buffer(sock: socket.socket, size: int) -> None:
    """SO_RCVBUF of `size` bytes: forced past net.core.rmem_max as root, else capped by it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def _recv_exact(conn: socket.socket, size: int) -> bytes | None:
    """Read exactly ``size`` bytes, or None if the peer closed early."""
    chunks = bytearray()
    while len(chunks) < size:
        chunk = conn.recv(size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)
