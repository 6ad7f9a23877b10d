"""Count TCP connection attempts (SYNs) on the world's loopback, per destination.

A remote that refuses connections (nothing listening: the kernel answers RST) cannot
count what it receives, and a blackhole's accept counter misses SYNs that never complete.
Inside the world's private network namespace every packet on `lo` is the world's own, so
a raw AF_PACKET socket sees every connection attempt to every fake remote, exactly.

Given a network to watch, it also keeps when payload reached each address in it (the
kernel's time of each data segment): a remote stamps a request once it has read and
decrypted it, which under load is later than when its bytes left the proxy, so only the
wire can say on which side of an event (a gone verdict) a request was sent.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import select
import socket
import struct
import threading
import time
from collections import Counter, defaultdict

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
# The kernel's receive time of each packet (not when this thread got round to reading it):
# SO_TIMESTAMPNS, and its control message, a struct timespec.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("@qq")
TCP_SYN = 0x02
TCP_ACK = 0x10
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)


def syn_filter(
    network: ipaddress.IPv4Network | None = None,
) -> tuple[tuple[int, int, int, int], ...]:
    """A classic BPF program that passes IPv4 TCP SYNs without ACK (what tcpdump compiles
    from `tcp[tcpflags] & (tcp-syn|tcp-ack) == tcp-syn` on an Ethernet link, and the loopback
    is one) and, given `network`, every IPv4 TCP packet to it (its payload is timed).
    Without it every packet of every connection on `lo` wakes the counter's thread, which at
    a scale world's thousands of packets a second starves the test process's other threads
    (its DNS servers among them). Rows: (code, jump if true, jump if false, k)."""
    # No network: a destination no packet has (0.0.0.0/32), so only SYNs pass.
    prefix, mask = (int(network.network_address), int(network.netmask)) if network else (0, ~0)
    return (
        (0x28, 0, 0, 12),  # ldh [12]: the ethertype
        (0x15, 0, 12, ETH_P_IP),  # IPv4, else drop
        (0x30, 0, 0, 23),  # ldb [23]: the IP protocol
        (0x15, 0, 10, 6),  # TCP, else drop
        (0x28, 0, 0, 20),  # ldh [20]: flags and fragment offset
        (0x45, 8, 0, 0x1FFF),  # a later fragment: drop
        (0x20, 0, 0, 30),  # ld [30]: the destination address
        (0x54, 0, 0, mask & 0xFFFFFFFF),  # and #netmask
        (0x15, 4, 0, prefix),  # in the network: pass
        (0xB1, 0, 0, 14),  # ldxb 4*([14]&0xf): the IP header length
        (0x50, 0, 0, 27),  # ldb [x+27]: the TCP flags (14 + 13)
        (0x54, 0, 0, TCP_SYN | TCP_ACK),  # and #(SYN|ACK)
        (0x15, 0, 1, TCP_SYN),  # SYN alone, else drop
        (0x06, 0, 0, 65535),  # ret: the whole packet
        (0x06, 0, 0, 0),  # drop
    )


class SynCounter:
    """SYNs (without ACK) seen on `lo`, keyed by (destination IP, destination port); and
    with `watch`, when payload reached each address of that network."""

    def __init__(self, interface: str = "lo", watch: str | None = None) -> None:
        self.interface = interface
        self.watch = ipaddress.IPv4Network(watch) if watch else None
        self._payload: defaultdict[str, list[float]] = defaultdict(list)
        self._counts: Counter[tuple[str, int]] = Counter()
        # (destination IP, destination port, source port): one per connection attempt, so a
        # SYN the kernel retransmits to a blackhole is counted once here; the value is when
        # its first SYN was seen (epoch seconds), so attempts can be split by time
        self._attempts: dict[tuple[str, int, int], float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> SynCounter:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((self.interface, 0))
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        _attach_filter(sock, syn_filter(self.watch))
        self._sock = sock
        self._thread = threading.Thread(target=self._loop, name="syn-counter", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()

    def _loop(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            ready, _, _ = select.select([self._sock], [], [], 0.2)
            if not ready:
                continue
            with contextlib.suppress(OSError):
                frame, ancillary, _, address = self._sock.recvmsg(65535, 64)
                if address[2] == PACKET_OUTGOING:  # loopback shows each packet twice
                    continue
                self._parse(frame, _kernel_time(ancillary))

    def _parse(self, frame: bytes, seen: float | None = None) -> None:
        if len(frame) < 14 + 20 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
            return
        ip = frame[14:]
        header_len = (ip[0] & 0x0F) * 4
        if ip[9] != socket.IPPROTO_TCP or len(ip) < header_len + 14:
            return
        tcp = ip[header_len:]
        flags = tcp[13]
        if flags & TCP_SYN and not flags & TCP_ACK:
            source_port, port = struct.unpack_from("!HH", tcp, 0)
            destination = (socket.inet_ntoa(ip[16:20]), port)
            with self._lock:
                self._counts[destination] += 1
                self._attempts.setdefault((*destination, source_port), seen or time.time())
            return
        total_len = struct.unpack_from("!H", ip, 2)[0]
        payload = total_len - header_len - (tcp[12] >> 4) * 4
        if self.watch is not None and payload > 0:
            address = socket.inet_ntoa(ip[16:20])
            source = ipaddress.IPv4Address(ip[12:16])
            if ipaddress.IPv4Address(address) in self.watch and source not in self.watch:
                with self._lock:
                    self._payload[address].append(seen or time.time())

    def count(self, ip: str, port: int | None = None) -> int:
        """Connection attempts to `ip` (on `port`, or any port)."""
        with self._lock:
            return sum(n for (i, p), n in self._counts.items() if i == ip and port in (None, p))

    def attempts(self, ip: str) -> int:
        """Connection attempts to `ip`, each counted once however often its SYN was resent."""
        with self._lock:
            return sum(1 for i, _, _ in self._attempts if i == ip)

    def attempt_times(self) -> list[tuple[float, str, int]]:
        """Every connection attempt as (first SYN's epoch seconds, destination IP, port)."""
        with self._lock:
            return sorted((t, ip, port) for (ip, port, _), t in self._attempts.items())

    def payload_times(self) -> dict[str, list[float]]:
        """Per address of the watched network: the kernel time of each data segment to it."""
        with self._lock:
            return {address: list(times) for address, times in self._payload.items()}

    def snapshot(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return dict(self._counts)


def _kernel_time(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= TIMESPEC.size:
            seconds, nanoseconds = TIMESPEC.unpack_from(data)
            return float(seconds + nanoseconds / 1e9)
    return None


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def _attach_filter(sock: socket.socket, program: tuple[tuple[int, int, int, int], ...]) -> None:
    """SO_ATTACH_FILTER: the kernel copies the program, so the buffers may go after."""
    instructions = (_SockFilter * len(program))(*(_SockFilter(*i) for i in program))
    fprog = _SockFprog(len(program), instructions)
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(fprog))
