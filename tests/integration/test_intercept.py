"""Intercept mode through real sockets: the sidecar's own CA, per-request decisions inside a
pooled tunnel keyed by X-Matrix destination, answers per request class, passive 410
learning, and upstream certificates that must verify."""

from __future__ import annotations

import json
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.proxy import xmatrix
from tests.integration.conftest import LIVE_IP
from tests.support.dns_server import Zone
from tests.support.procs import wait_until
from tests.support.sidecar_process import Sidecar, read_head, sidecar_command
from tests.support.tls_upstream import Request, Response, TestCA, Upstream

SHARED_IP = "127.0.0.8"


class Tunnel:
    """One CONNECT tunnel through the sidecar, TLS to the sidecar's CA, many requests."""

    def __init__(self, sidecar: Sidecar, target: str, sni: str, trust: ssl.SSLContext) -> None:
        reply = sidecar.connect(target)
        assert reply.status == 200 and reply.sock is not None, reply
        self.tls = trust.wrap_socket(reply.sock, server_hostname=sni)
        self.host = sni

    def request(
        self, path: str, destination: str | None = None, method: str = "GET", body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        auth = ""
        if destination is not None:
            auth = (
                f'Authorization: X-Matrix origin="hs.example",destination="{destination}",'
                'key="ed25519:a",sig="c2ln"\r\n'
            )
        self.tls.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{auth}"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        status, _, headers, rest = read_head(self.tls)
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            rest += self.tls.recv(65536)
        return status, headers, rest

    def close(self) -> None:
        self.tls.close()


@pytest.fixture
def shared_host(ca: TestCA) -> Iterator[Upstream]:
    """A host serving several Matrix servers (a delegated target); answers 410 for any
    destination whose name starts with 'gone410', 200 otherwise."""

    def handler(request: Request) -> Response:
        named = xmatrix.destination(request.headers.get("authorization"))
        if named and named.startswith("gone410"):
            return Response(
                410, b'{"errcode":"M_UNKNOWN","error":"gone"}', {"Cache-Control": "max-age=172800"}
            )
        return Response(
            200,
            json.dumps({"destination": named, "path": request.path}).encode(),
            {"Content-Type": "application/json"},
        )

    server = Upstream(ca, ["*.hs.test"], host=SHARED_IP, handler=handler).start()
    yield server
    server.stop()


@pytest.fixture
def intercepting(
    sidecar_factory: Callable[..., Sidecar], ca: TestCA
) -> tuple[Sidecar, ssl.SSLContext]:
    sidecar = sidecar_factory("--mode", "intercept", "--upstream-ca", str(ca.ca_pem_path))
    sidecar_ca = sidecar.state_dir / "ca" / "mitmproxy-ca-cert.pem"
    assert "tombstone-sidecar CA" in sidecar_ca.read_text() or sidecar_ca.exists()
    trust = ssl.create_default_context(cafile=str(sidecar_ca))
    return sidecar, trust


def test_requests_in_one_pooled_tunnel_are_judged_by_destination(
    intercepting: tuple[Sidecar, ssl.SSLContext],
    zone: Zone,
    shared_host: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar, trust = intercepting
    target, alive, gone = unique("target"), unique("alive"), unique("txtgone")
    zone.add(target, "A", SHARED_IP)
    zone.add(alive, "A", SHARED_IP)
    zone.add(gone, "TXT", "v=matrix;gone")
    tunnel = Tunnel(sidecar, f"{target}:{shared_host.port}", target, trust)
    try:
        status, _, body = tunnel.request("/_matrix/federation/v1/query/profile?user_id=@a:x", alive)
        assert status == 200 and json.loads(body)["destination"] == alive
        expected = {
            "/_matrix/federation/v1/make_join/!r:x/@u:x": (502, "failover"),
            "/_matrix/federation/v1/query/profile?user_id=@c:x": (410, "user"),
            "/_matrix/federation/v2/invite/!r:x/$e": (410, "user"),
            "/_matrix/federation/v1/send/123": (410, "send"),
            "/_matrix/federation/v1/backfill/!r:x": (502, "failover"),
        }
        for path, (code, cls) in expected.items():
            method = "PUT" if "/send/" in path or "/invite/" in path else "GET"
            status, headers, body = tunnel.request(path, gone, method=method, body=b"{}")
            assert (status, headers["x-tombstone-class"]) == (code, cls), path
            answer = json.loads(body)
            assert answer["errcode"] == "M_SERVER_DECOMMISSIONED"
            assert answer["error"].startswith(f"{gone} is decommissioned (dns_txt_gone: ")
        status, _, body = tunnel.request("/_matrix/federation/v1/version", alive)
        assert status == 200  # the same tunnel still reaches the live server
    finally:
        tunnel.close()
    seen = {r.path.split("?")[0] for r in shared_host.requests}
    assert seen == {"/_matrix/federation/v1/query/profile", "/_matrix/federation/v1/version"}
    assert all(
        xmatrix.destination(r.headers.get("authorization")) == alive for r in shared_host.requests
    )
    assert sidecar.metric("tombstone_suppressed_total", signal="dns_txt_gone", stage="request") == 5


def test_a_410_for_one_server_on_a_shared_host_does_not_suppress_another(
    intercepting: tuple[Sidecar, ssl.SSLContext],
    zone: Zone,
    shared_host: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar, trust = intercepting
    target, dead, neighbour = unique("target"), unique("gone410"), unique("neighbour")
    for name in (target, dead, neighbour):
        zone.add(name, "A", SHARED_IP)  # DNS says nothing: only the server's own 410 does
    tunnel = Tunnel(sidecar, f"{target}:{shared_host.port}", target, trust)
    try:
        assert tunnel.request("/_matrix/federation/v1/query/profile", dead)[0] == 410  # real one
        assert wait_until(lambda: sidecar.ops(f"/v1/verdicts/{dead}")[0] == 200)
        status, headers, _ = tunnel.request("/_matrix/federation/v1/query/directory", dead)
        assert status == 410 and headers["x-tombstone-signal"] == "http_410"  # ours
        assert tunnel.request("/_matrix/federation/v1/query/profile", neighbour)[0] == 200
    finally:
        tunnel.close()
    to_dead = [
        r
        for r in shared_host.requests
        if xmatrix.destination(r.headers.get("authorization")) == dead
    ]
    assert len(to_dead) == 1  # nothing reached it after its first 410
    learned = json.loads(sidecar.ops(f"/v1/verdicts/{dead}")[1])
    assert (
        learned["signal"] == "http_410" and learned["expires_at"] - learned["observed_at"] == 172800
    )
    assert json.loads(sidecar.ops(f"/v1/verdicts/{neighbour}")[1])["state"] == "alive"


def test_well_known_of_a_gone_server_is_answered_with_its_lifetime(
    intercepting: tuple[Sidecar, ssl.SSLContext],
    zone: Zone,
    shared_host: Upstream,
    unique: Callable[[str], str],
) -> None:
    """In intercept mode a CONNECT to a gone server is accepted, so that each request inside
    gets the answer of its class; nothing is dialled."""
    sidecar, trust = intercepting
    name = unique("wkgone")
    zone.add(name, "A", SHARED_IP)
    zone.add(name, "TXT", "v=matrix;gone", ttl=3600)
    tunnel = Tunnel(sidecar, f"{name}:443", name, trust)
    try:
        status, headers, _ = tunnel.request("/.well-known/matrix/server")
        invite = tunnel.request("/_matrix/federation/v2/invite/!r:x/$e", name, "PUT", b"{}")
    finally:
        tunnel.close()
    assert status == 410 and headers["x-tombstone-class"] == "well_known"
    assert 3500 < int(headers["cache-control"].removeprefix("max-age=")) <= 3600
    assert invite[0] == 410 and json.loads(invite[2])["signal"] == "dns_txt_gone"
    assert shared_host.requests == []


def test_garbage_x_matrix_header_gets_400(
    intercepting: tuple[Sidecar, ssl.SSLContext],
    zone: Zone,
    shared_host: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar, trust = intercepting
    target = unique("target")
    zone.add(target, "A", SHARED_IP)
    tunnel = Tunnel(sidecar, f"{target}:{shared_host.port}", target, trust)
    try:
        tunnel.tls.sendall(
            f"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: {target}\r\n"
            'Authorization: X-Matrix destination="unterminated\r\n'
            "Content-Length: 0\r\n\r\n".encode()
        )
        status, _, _, _ = read_head(tunnel.tls)
    finally:
        tunnel.close()
    assert status == 400
    assert sidecar.metric("tombstone_invalid_input_total", where="request") == 1


def test_an_upstream_that_fails_verification_is_never_accepted(
    intercepting: tuple[Sidecar, ssl.SSLContext],
    zone: Zone,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    sidecar, trust = intercepting
    stranger = TestCA(tmp_path / "other-ca")  # a CA nobody trusts
    name = unique("impostor")
    zone.add(name, "A", LIVE_IP)
    with Upstream(stranger, [name], host="127.0.0.9") as impostor:
        zone.remove(name, "A")
        zone.add(name, "A", "127.0.0.9")
        tunnel = Tunnel(sidecar, f"{name}:{impostor.port}", name, trust)
        try:
            status, _, _ = tunnel.request("/_matrix/federation/v1/version", name)
        except (ConnectionError, ssl.SSLError):
            status = 0
        finally:
            tunnel.close()
        assert status != 200
        assert impostor.requests == []  # no request was sent over the unverified connection
    assert wait_until(lambda: sidecar.metric("tombstone_upstream_errors_total", kind="tls") >= 1)


def test_ca_command_exports_the_certificate_and_a_bundle(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = subprocess.run(
        [
            *sidecar_command(),
            "ca",
            "--state-dir",
            str(state),
            "--export",
            str(tmp_path / "ca.pem"),
            "--bundle",
            str(tmp_path / "bundle.pem"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "O=tombstone-sidecar,CN=tombstone-sidecar CA" in result.stdout
    ours = (tmp_path / "ca.pem").read_text()
    bundle = (tmp_path / "bundle.pem").read_text()
    assert ours.strip() in bundle and bundle.count("BEGIN CERTIFICATE") > 50
    again = subprocess.run(
        [*sidecar_command(), "ca", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.stdout.split(": ", 1)[1] == result.stdout.split(": ", 1)[1].splitlines()[0] + "\n"
    assert (state / "ca" / "mitmproxy-ca.pem").stat().st_mode & 0o077 == 0


def test_a_pooled_tunnel_reuses_one_upstream_connection(
    intercepting: tuple[Sidecar, ssl.SSLContext],
    zone: Zone,
    shared_host: Upstream,
    unique: Callable[[str], str],
) -> None:
    """The checked address is dialled, yet mitmproxy pools by it: 20 requests in one tunnel
    share one upstream connection (mitmproxy allows 5 per address; more would stall)."""
    sidecar, trust = intercepting
    target = unique("pooled")
    zone.add(target, "A", SHARED_IP)
    tunnel = Tunnel(sidecar, f"{target}:{shared_host.port}", target, trust)
    try:
        statuses = [tunnel.request("/_matrix/federation/v1/version", target)[0] for _ in range(20)]
    finally:
        tunnel.close()
    assert statuses == [200] * 20
    assert shared_host.connections == 1 and shared_host.tls_handshakes == 1
    assert {r.sni for r in shared_host.requests} == {target}  # SNI is the name, not the IP
    assert {r.headers["host"] for r in shared_host.requests} == {target}
