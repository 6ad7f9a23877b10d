"""A forwarded CONNECT whose upstream cannot be reached, seen by a real client through the
real sidecar process: with `--refusal close` (the default) the client sees what it would
see without a proxy, a connection that ends, never a status line other than 200.

Synapse 1.163 logs a CRITICAL `ProxyConnectError` traceback for every non-200 answer to
its CONNECT (tests/e2e/test_s5_synapse_log.py) where, alone, it logs an ordinary failed
connection. Each case here is a live name (no tombstone), so nothing is suppressed: the
upstream refuses (RST), never answers the SYN (blackhole, --connect-timeout), resolves
only into a blocked range (the address guard: nothing is dialled either way), or has no
address. `--refusal status` keeps its answers (403 / 502 with a JSON body). Under stock
mitmdump with its default `connection_strategy=eager`, mitmproxy itself would dial before
answering and turn a failed dial into `502 Bad Gateway`; the sidecar answers first there.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.dns_server import DnsServer, Zone
from tests.support.procs import ManagedProcess, closed_within, free_port
from tests.support.sidecar_process import REPO, Sidecar, mitmdump_command, read_head
from tests.support.tls_upstream import Blackhole, RefusingPort

CLOSE_SECONDS = 10.0  # far above --connect-timeout: the close comes from the sidecar
CONNECT_TIMEOUT = "1s"


def client_hello(sni: str) -> bytes:
    """The first flight of a real TLS client (Python's ssl), as Synapse sends it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def through(port: int, target: str, sni: str) -> tuple[int, bytes, bool]:
    """CONNECT `target` as Synapse does, then a ClientHello if the tunnel opens: (status,
    what came after the head, whether the connection was closed). Status 0: closed
    without a status line."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLOSE_SECONDS) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        status, _, _, rest = read_head(sock)
        if status != 200:
            closed, more = closed_within(sock, CLOSE_SECONDS)
            return status, rest + more, closed
        sock.sendall(client_hello(sni))
        closed, more = closed_within(sock, CLOSE_SECONDS)
        return status, rest + more, closed


@pytest.fixture
def refusing() -> Iterator[RefusingPort]:
    with RefusingPort("127.0.0.1") as port:
        yield port


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    with Blackhole("127.0.0.1", hang_connect=True) as hole:
        yield hole


def _cases(
    zone: Zone, unique: Callable[[str], str], refusing: RefusingPort, blackhole: Blackhole
) -> dict[str, tuple[str, str]]:
    """case -> (CONNECT target, SNI), every name live in DNS."""
    names = {case: unique(case) for case in ("refused", "blackhole", "blocked", "noaddr")}
    zone.add(names["refused"], "A", "127.0.0.1")
    zone.add(names["blackhole"], "A", "127.0.0.1")
    zone.add(names["blocked"], "A", "10.1.2.3")
    zone.add(names["noaddr"], "TXT", "exists, without an address")
    ports = {"refused": refusing.port, "blackhole": blackhole.port}
    return {case: (f"{name}:{ports.get(case, 8448)}", name) for case, name in names.items()}


def test_refusal_close_ends_a_failed_forward_without_a_status_line(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    unique: Callable[[str], str],
    refusing: RefusingPort,
    blackhole: Blackhole,
) -> None:
    sidecar = sidecar_factory("--refusal", "close", "--connect-timeout", CONNECT_TIMEOUT)
    cases = _cases(zone, unique, refusing, blackhole)
    seen = {case: through(sidecar.proxy_port, *cases[case]) for case in cases}
    # Dialled on the tunnel's first bytes: the client saw the tunnel open, then its end.
    assert seen["refused"] == (200, b"", True)
    assert seen["blackhole"] == (200, b"", True)
    # Decided at CONNECT, nothing dialled: closed without any answer.
    assert seen["blocked"] == (0, b"", True)
    assert seen["noaddr"] == (0, b"", True)
    # Counted where they were before; exactly two dials failed: the blocked address was
    # never dialled (the guard fails closed: it would have added a third failure).
    errors = {
        kind: sidecar.metric("tombstone_upstream_errors_total", kind=kind)
        for kind in ("refused", "timeout", "unreachable", "other", "resolve")
    }
    assert errors == {"refused": 1, "timeout": 1, "unreachable": 0, "other": 0, "resolve": 1}
    assert sidecar.metric("tombstone_blocked_address_total") == 1


def test_refusal_status_keeps_its_answers(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    unique: Callable[[str], str],
    refusing: RefusingPort,
    blackhole: Blackhole,
) -> None:
    sidecar = sidecar_factory("--refusal", "status", "--connect-timeout", CONNECT_TIMEOUT)
    cases = _cases(zone, unique, refusing, blackhole)
    blocked = through(sidecar.proxy_port, *cases["blocked"])
    noaddr = through(sidecar.proxy_port, *cases["noaddr"])
    assert blocked[0] == 403 and b"resolves only to blocked addresses" in blocked[1]
    assert noaddr[0] == 502 and b"no A or AAAA records" in noaddr[1]
    assert through(sidecar.proxy_port, *cases["refused"]) == (200, b"", True)


@pytest.mark.parametrize("refusal", ["close", "status"])
def test_under_stock_mitmdump_an_eager_dial_failure_is_no_502_with_refusal_close(
    refusal: str,
    dns_server: DnsServer,
    zone: Zone,
    unique: Callable[[str], str],
    refusing: RefusingPort,
    tmp_path: Path,
) -> None:
    """mitmdump without `connection_strategy=lazy` dials at CONNECT: its failure is
    mitmproxy's own 502, unless the sidecar answered the CONNECT first (close)."""
    port, ops = free_port(), free_port()
    options = [
        f"tombstone_nameserver=127.0.0.1:{dns_server.port}",
        f"tombstone_ops_listen=127.0.0.1:{ops}",
        "tombstone_allow_address=127.0.0.0/8",
        "tombstone_probe=false",
        f"tombstone_refusal={refusal}",
        f"tombstone_state_dir={tmp_path / 'state'}",
    ]
    command = mitmdump_command(port, tmp_path, options)
    at = command.index("connection_strategy=lazy")
    del command[at - 1 : at + 1]  # mitmdump's default: eager
    name = unique(f"eager-{refusal}")
    zone.add(name, "A", "127.0.0.1")
    with ManagedProcess(
        command, env={"PYTHONPATH": str(REPO)}, log_path=tmp_path / "mitmdump.log"
    ) as process:
        process.wait_for_port(port)
        process.wait_for_port(ops)
        status, after, closed = through(port, f"{name}:{refusing.port}", name)
    if refusal == "close":
        assert (status, after, closed) == (200, b"", True)
    else:
        assert status == 502 and b"Cannot connect" in after  # as before: mitmproxy's answer
