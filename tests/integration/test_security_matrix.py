"""The egress boundary as a matrix, in the style of Smokescreen's integration tests.

{CONNECT, plain HTTP, intercepted request} x {live, blocked address, gone} x {no proxy
auth, auth with the right credentials, auth configured but none sent} x {enforce, shadow}:
each row drives a real client through a real sidecar process and asserts what the live,
dead and canary services saw. Every refusal leaves all three at zero. Shadow mode only
changes tombstone verdicts; the address guard and proxy auth are never in shadow.

Address plan (loopback): 127.0.0.2 live, 127.0.0.3 dead (the gone name's A record),
127.0.0.9 the canary, in no range these sidecars allow (only .2 and .3 are allowed).
"""

from __future__ import annotations

import base64
import itertools
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.integration.conftest import DEAD_IP, LIVE_IP
from tests.support.dns_server import DnsServer, Zone
from tests.support.sidecar_process import Sidecar, read_head
from tests.support.tls_upstream import TestCA, Upstream

CANARY_IP = "127.0.0.9"
USER, PASSWORD = "synapse", "s3cret-pass"
PATHS = ("connect", "plain", "intercepted")
TARGETS = ("live", "blocked", "gone")
AUTHS = ("none", "right", "missing")  # no auth configured / configured and sent / not sent
MODES = ("enforce", "shadow")
_names = itertools.count()


@dataclass
class Services:
    """Every server a request could reach: TLS and plain HTTP on each address."""

    tls: dict[str, Upstream]
    plain: dict[str, Upstream]

    def seen(self) -> dict[str, int]:
        return {
            target: self.tls[target].connections + self.plain[target].connections
            for target in TARGETS
        }

    def requests(self) -> int:
        return sum(len(u.requests) for u in (*self.tls.values(), *self.plain.values()))

    def proxy_headers_seen(self) -> list[str]:
        """Hop-by-hop proxy headers any service ever received (must stay empty)."""
        return [
            f"{upstream.host}: {key}"
            for upstream in (*self.tls.values(), *self.plain.values())
            for request in upstream.requests
            for key in request.headers
            if key.lower() in ("proxy-authorization", "proxy-connection")
        ]


@pytest.fixture(scope="module")
def services(ca: TestCA) -> Iterator[Services]:
    addresses = {"live": LIVE_IP, "gone": DEAD_IP, "blocked": CANARY_IP}
    tls: dict[str, Upstream] = {}
    plain: dict[str, Upstream] = {}
    for target, address in addresses.items():  # one port for each kind on every address
        tls[target] = Upstream(
            ca, ["*.hs.test"], host=address, port=tls["live"].port if tls else 0
        ).start()
        plain[target] = Upstream(
            host=address, tls=False, port=plain["live"].port if plain else 0
        ).start()
    yield Services(tls, plain)
    for server in (*tls.values(), *plain.values()):
        server.stop()


@pytest.fixture(scope="module")
def sidecars(
    dns_server: DnsServer, ca: TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[tuple[str, str, bool], Sidecar]]:
    """One sidecar per (mode, enforce|shadow, auth configured)."""
    directory = tmp_path_factory.mktemp("matrix")
    users = directory / "users"
    users.write_text(f"{USER}:{PASSWORD}\n")
    started: dict[tuple[str, str, bool], Sidecar] = {}
    try:
        for mode, enforce, auth in itertools.product(
            ("passthrough", "intercept"), MODES, (False, True)
        ):
            args = [
                "--allow-address",
                f"{LIVE_IP}/32",
                "--allow-address",
                f"{DEAD_IP}/32",
                "--refusal",
                "status",
                "--no-probe",
                "--mode",
                mode,
                "--upstream-ca",
                str(ca.ca_pem_path),
            ]
            if enforce == "shadow":
                args.append("--no-enforce")
            if auth:
                args += ["--proxy-auth-file", str(users)]
            sidecar = Sidecar(dns_server.port, args, log_dir=directory)
            started[(mode, enforce, auth)] = sidecar.start()
        yield started
    finally:
        for sidecar in started.values():
            sidecar.stop()


def publish(zone: Zone, target: str) -> str:
    name = f"matrix-{target}-{next(_names)}.hs.test"
    zone.add(name, "A", {"live": LIVE_IP, "gone": DEAD_IP, "blocked": CANARY_IP}[target])
    if target == "gone":
        zone.add(name, "TXT", "v=matrix;gone")
    return name


def credentials(auth: str) -> str:
    if auth != "right":
        return ""
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    return f"Proxy-Authorization: Basic {token}\r\nProxy-Connection: keep-alive\r\n"


def via_connect(sidecar: Sidecar, name: str, port: int, auth: str, context: ssl.SSLContext) -> int:
    """CONNECT, then a GET inside the tunnel: the CONNECT's status if not 200, else the
    GET's (0 when the tunnel closed without an answer)."""
    with socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=10) as sock:
        sock.sendall(
            f"CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n"
            f"{credentials(auth)}\r\n".encode()
        )
        status = read_head(sock)[0]
        if status != 200:
            return status
        try:
            with context.wrap_socket(sock, server_hostname=name) as tls:
                auth_header = (
                    f'Authorization: X-Matrix origin="hs.example",destination='
                    f'"{name}",key="ed25519:a",sig="c2ln"\r\n'
                )
                tls.sendall(
                    f"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: {name}\r\n"
                    f"{auth_header}Connection: close\r\n\r\n".encode()
                )
                return read_head(tls)[0]
        except (OSError, ssl.SSLError):
            return 0


def via_plain(sidecar: Sidecar, name: str, port: int, auth: str) -> int:
    with socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=10) as sock:
        sock.sendall(
            f"GET http://{name}:{port}/preview HTTP/1.1\r\nHost: {name}:{port}\r\n"
            f"{credentials(auth)}Connection: close\r\n\r\n".encode()
        )
        return read_head(sock)[0]


def expected(path: str, target: str, auth: str, mode: str) -> tuple[int, str | None]:
    """(status the client reads, which service it reaches or None)."""
    if auth == "missing":
        return 407, None
    if target == "blocked":
        return 403, None  # the address guard is never in shadow
    if target == "gone" and mode == "enforce":
        return 502, None  # CONNECT: --refusal status; plain: --suppress-status; in a tunnel:
        # the request class `other` (502) for the version endpoint
    return 200, target  # live, or gone in shadow mode (counted, forwarded)


ROWS = list(itertools.product(PATHS, TARGETS, AUTHS, MODES))


@pytest.mark.parametrize(("path", "target", "auth", "mode"), ROWS, ids=["-".join(r) for r in ROWS])
def test_security_matrix(
    path: str,
    target: str,
    auth: str,
    mode: str,
    sidecars: dict[tuple[str, str, bool], Sidecar],
    services: Services,
    zone: Zone,
    ca: TestCA,
) -> None:
    sidecar = sidecars[
        ("intercept" if path == "intercepted" else "passthrough", mode, auth != "none")
    ]
    name = publish(zone, target)
    before = services.seen()
    if path == "plain":
        status = via_plain(sidecar, name, services.plain["live"].port, auth)
    else:
        trust = ca.client_context()
        if path == "intercepted":
            sidecar_ca = sidecar.state_dir / "ca" / "mitmproxy-ca-cert.pem"
            trust = ssl.create_default_context(cafile=str(sidecar_ca))
        status = via_connect(sidecar, name, services.tls["live"].port, auth, trust)
    want_status, reached = expected(path, target, auth, mode)
    after = services.seen()
    delta = {t: after[t] - before[t] for t in TARGETS}
    assert status == want_status, (status, delta)
    assert delta == {t: (1 if t == reached else 0) for t in TARGETS}, delta
    assert services.proxy_headers_seen() == []  # credentials never leave the proxy
