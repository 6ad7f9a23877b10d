"""Nothing reaches a gone server, whichever way a request names it.

The rule (README "How a request is judged"): a request is answered locally when the host
it would be sent to is gone, or the server it is for (X-Matrix destination, else Host) is
gone; the answer names whichever is gone. Tested on each path: an intercepted tunnel to a
gone federation host with a live destination, a tunnel to an operator-denied host, plain
HTTP by host and by destination, and `CONNECT :0` (an SRV target ".") in intercept mode,
which is accepted and answered per request without dialling anything.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable, Iterator

import pytest

from tests.integration.conftest import DEAD_IP, LIVE_IP
from tests.integration.test_intercept import Tunnel
from tests.support.dns_server import Zone
from tests.support.sidecar_process import Sidecar, read_head
from tests.support.tls_upstream import Request, Response, TestCA, Upstream

INVITE = "/_matrix/federation/v2/invite/!room:hs.example/$event"
PROFILE = "/_matrix/federation/v1/query/profile?user_id=@u:x"
MAKE_JOIN = "/_matrix/federation/v1/make_join/!room:x/@u:x"


@pytest.fixture
def intercepting(
    sidecar_factory: Callable[..., Sidecar], ca: TestCA
) -> tuple[Sidecar, ssl.SSLContext]:
    sidecar = sidecar_factory(
        "--mode", "intercept", "--upstream-ca", str(ca.ca_pem_path), "--deny", "denied-host.hs.test"
    )
    trust = ssl.create_default_context(
        cafile=str(sidecar.state_dir / "ca" / "mitmproxy-ca-cert.pem")
    )
    return sidecar, trust


@pytest.fixture(scope="module")
def plain_dead() -> Iterator[Upstream]:
    """A plain-HTTP server where gone names point: it must never see a connection."""
    server = Upstream(host=DEAD_IP, tls=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def plain_live(plain_dead: Upstream) -> Iterator[Upstream]:
    def handler(request: Request) -> Response:
        return Response(200, json.dumps({"host": request.headers.get("host")}).encode())

    server = Upstream(host=LIVE_IP, port=plain_dead.port, tls=False, handler=handler).start()
    yield server
    server.stop()


def plain_get(
    sidecar: Sidecar, url: str, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=10) as sock:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall(f"GET {url} HTTP/1.1\r\n{extra}Connection: close\r\n\r\n".encode())
        status, _, head, rest = read_head(sock)
        while chunk := sock.recv(65536):
            rest += chunk
    return status, head, rest


def test_connect_empty_host_in_intercept_mode_answers_each_request_by_its_server(
    intercepting: tuple[Sidecar, ssl.SSLContext],
    zone: Zone,
    dead_upstream: Upstream,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """Synapse sends `CONNECT :0` for an SRV target "."; the server it meant is in the SNI
    and the X-Matrix destination. The invite is refused with the reason in milliseconds;
    a live destination inside such a tunnel has nowhere to go: 502, nothing dialled."""
    sidecar, trust = intercepting
    gone, live = unique("srvdot"), unique("live")
    zone.add(gone, "A", DEAD_IP)
    zone.add(f"_matrix-fed._tcp.{gone}", "SRV", "0 0 0 .")
    zone.add(live, "A", LIVE_IP)
    dead_before, live_before = dead_upstream.connections, live_upstream.connections
    tunnel = Tunnel(sidecar, ":0", gone, trust)
    try:
        for path, code, cls in (
            (INVITE, 410, "user"),
            (PROFILE, 410, "user"),
            (MAKE_JOIN, 502, "failover"),
        ):
            method = "PUT" if path == INVITE else "GET"
            status, headers, body = tunnel.request(path, gone, method=method, body=b"{}")
            assert (status, headers["x-tombstone-class"]) == (code, cls), (path, body)
            answer = json.loads(body)
            assert answer["errcode"] == "M_SERVER_DECOMMISSIONED"
            assert answer["signal"] == "dns_srv_dot"
            assert answer["error"].startswith(f"{gone} is decommissioned (dns_srv_dot: ")
        status, _, body = tunnel.request(PROFILE, live)
        assert status == 502 and "CONNECT :0" in json.loads(body)["error"]
    finally:
        tunnel.close()
    assert (dead_upstream.connections, live_upstream.connections) == (dead_before, live_before)
    assert sidecar.metric("tombstone_suppressed_total", signal="dns_srv_dot", stage="request") == 3


def test_passthrough_still_closes_connect_empty_host(
    sidecar_factory: Callable[..., Sidecar],
) -> None:
    sidecar = sidecar_factory("--refusal", "close")
    reply = sidecar.connect(":0")
    assert (reply.status, reply.body) == (0, b"")


def test_a_live_destination_through_a_gone_federation_host_is_answered_not_dialled(
    intercepting: tuple[Sidecar, ssl.SSLContext],
    zone: Zone,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """Delegation: the destination is alive, its federation host carries the tombstone
    (the kit's --federation-host). The answer names the host; the host sees nothing."""
    sidecar, trust = intercepting
    host, destination = unique("fedhost"), unique("delegating")
    zone.add(host, "A", DEAD_IP)
    zone.add(host, "TXT", "v=matrix;gone")
    zone.add(destination, "A", LIVE_IP)
    before = dead_upstream.connections
    tunnel = Tunnel(sidecar, f"{host}:{dead_upstream.port}", host, trust)
    try:
        status, headers, body = tunnel.request(PROFILE, destination)
    finally:
        tunnel.close()
    assert status == 410 and headers["x-tombstone-signal"] == "dns_txt_gone", body
    assert json.loads(body)["error"].startswith(f"{host} is decommissioned (dns_txt_gone: ")
    assert dead_upstream.connections == before


def test_a_tunnel_to_an_operator_denied_host_is_answered_as_gone(
    intercepting: tuple[Sidecar, ssl.SSLContext],
    zone: Zone,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """An operator verdict has no addresses; the answer is still the verdict, never a
    misleading "has no A or AAAA records"."""
    sidecar, trust = intercepting
    destination = unique("behind-denied")
    zone.add("denied-host.hs.test", "A", DEAD_IP)
    zone.add(destination, "A", LIVE_IP)
    before = dead_upstream.connections
    tunnel = Tunnel(
        sidecar, f"denied-host.hs.test:{dead_upstream.port}", "denied-host.hs.test", trust
    )
    try:
        status, headers, body = tunnel.request(PROFILE, destination)
    finally:
        tunnel.close()
    assert status == 410 and headers["x-tombstone-signal"] == "operator", body
    assert "denied-host.hs.test is decommissioned (operator: " in json.loads(body)["error"]
    assert dead_upstream.connections == before


def test_plain_http_is_refused_when_either_the_host_or_the_server_it_is_for_is_gone(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    plain_dead: Upstream,
    plain_live: Upstream,
    unique: Callable[[str], str],
) -> None:
    """`--suppress-status` applies to plain HTTP, as its help says."""
    sidecar = sidecar_factory("--suppress-status", "410")
    gone, live = unique("plaingone"), unique("plainlive")
    zone.add(gone, "A", DEAD_IP)
    zone.add(gone, "TXT", "v=matrix;gone")
    zone.add(live, "A", LIVE_IP)
    port = plain_dead.port
    dead_before, live_before = plain_dead.connections, plain_live.connections

    # The URL names the gone host; the Host header a live one.
    status, head, body = plain_get(sidecar, f"http://{gone}:{port}/x", {"Host": f"{live}:{port}"})
    assert status == 410 and head["x-tombstone-signal"] == "dns_txt_gone", body
    assert json.loads(body)["error"].startswith(f"{gone} is decommissioned")
    # The URL names a live host; the X-Matrix destination is gone.
    auth = f'X-Matrix origin="hs.example",destination="{gone}",key="ed25519:a",sig="c2ln"'
    status, head, body = plain_get(
        sidecar, f"http://{live}:{port}/x", {"Host": f"{live}:{port}", "Authorization": auth}
    )
    assert status == 410 and head["x-tombstone-signal"] == "dns_txt_gone", body
    assert plain_dead.connections == dead_before
    assert plain_live.connections == live_before

    # Both alive: delivered, with the Host header the client sent.
    status, _, body = plain_get(sidecar, f"http://{live}:{port}/x", {"Host": f"{live}:{port}"})
    assert status == 200 and json.loads(body)["host"] == f"{live}:{port}"


def test_plain_http_to_a_blocked_address_gets_the_json_403(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    plain_live: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory()  # 127.0.0.0/8 is allowed for the tests; ::1 is not
    name = unique("blocked")
    zone.add(name, "AAAA", "::1")
    status, head, body = plain_get(sidecar, f"http://{name}:{plain_live.port}/x", {})
    assert status == 403 and head["content-type"] == "application/json", body
    answer = json.loads(body)
    assert answer["errcode"] == "M_FORBIDDEN" and "blocked addresses (::1" in answer["error"]
