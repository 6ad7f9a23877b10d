"""The address guard against IPv6 forms that embed a blocked IPv4 (issue 14).

A remote controls its own DNS: an AAAA of `64:ff9b::7f00:1` is 127.0.0.1 to any network
with a NAT64 translator. The sidecar must refuse it like 127.0.0.1 itself, even though
the test sidecar allows 127.0.0.0/8 (`--allow-address` names what the sidecar may dial,
not what a translator behind it may reach), and nothing may arrive at the loopback.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.support.dns_server import Zone
from tests.support.sidecar_process import Sidecar


class Canary:
    """Loopback listeners (127.0.0.1 and ::1, one port) that count every connection."""

    def __init__(self) -> None:
        self.connections = 0
        self._socks: list[socket.socket] = []
        v4 = socket.create_server(("127.0.0.1", 0))
        self.port = v4.getsockname()[1]
        self._socks.append(v4)
        with contextlib.suppress(OSError):  # no IPv6 loopback here: the IPv4 one counts
            self._socks.append(socket.create_server(("::1", self.port), family=socket.AF_INET6))
        self._threads = [
            threading.Thread(target=self._accept, args=(s,), daemon=True) for s in self._socks
        ]
        for thread in self._threads:
            thread.start()

    def _accept(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        for thread in self._threads:
            thread.join(timeout=5)


@pytest.fixture
def canary() -> Iterator[Canary]:
    listener = Canary()
    yield listener
    listener.close()


@pytest.mark.parametrize(
    ("aaaa", "why"),
    [
        ("64:ff9b::7f00:1", "NAT64 of 127.0.0.1, in 127.0.0.0/8"),
        ("2002:7f00:1::1", "6to4 of 127.0.0.1, in 127.0.0.0/8"),
        ("::ffff:0:7f00:1", "IPv4-translated of 127.0.0.1, in 127.0.0.0/8"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "Teredo client of 127.0.0.1, in 127.0.0.0/8"),
    ],
)
def test_embedded_loopback_is_refused_and_never_dialled(
    sidecar: Sidecar,
    zone: Zone,
    unique: Callable[[str], str],
    canary: Canary,
    aaaa: str,
    why: str,
) -> None:
    name = unique("embedded")
    zone.add(name, "AAAA", aaaa)
    before = sidecar.metric("tombstone_blocked_address_total")

    reply = sidecar.connect(f"{name}:{canary.port}")

    assert reply.status == 403, reply
    assert "x-tombstone-signal" not in reply.headers  # a blocked address, not a tombstone
    body = reply.json()
    assert body["errcode"] == "M_FORBIDDEN"
    assert f"{aaaa} ({why})" in str(body["error"])
    literal = sidecar.connect(f"[{aaaa}]:{canary.port}")
    assert literal.status == 403, literal
    assert sidecar.metric("tombstone_blocked_address_total") == before + 2
    assert canary.connections == 0


def test_reserved_ipv4_ranges_are_refused(
    sidecar: Sidecar, zone: Zone, unique: Callable[[str], str]
) -> None:
    name = unique("reserved")
    zone.add(name, "A", "240.0.0.1")
    zone.add(name, "A", "255.255.255.255")
    reply = sidecar.connect(f"{name}:8448")
    assert reply.status == 403, reply
    error = str(reply.json()["error"])
    assert "240.0.0.1 (in 240.0.0.0/4)" in error
    assert "255.255.255.255 (in 255.255.255.255/32)" in error
