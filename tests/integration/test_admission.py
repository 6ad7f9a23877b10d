"""Admission on the proxy port through real sockets (sidecar/admission.py): credentials and
hop-by-hop headers never reach an origin, TLS without CONNECT is closed before anything is
resolved, and a client that has not authenticated holds bounded memory, time and
descriptors: a 431 for an endless head, a deadline for idle and half-sent connections, and
a cap that keeps an authorised tunnel and the ops port working under a small file limit."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import BASE_ARGS, LIVE_IP
from tests.support.dns_server import DnsServer, Zone
from tests.support.procs import ManagedProcess, closed_within, free_port, wait_until
from tests.support.sidecar_process import REPO, Sidecar, mitmdump_command, read_head
from tests.support.tls_upstream import TestCA, Upstream

USER, PASSWORD = "synapse", "s3cret-pass"
CREDENTIALS = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
CANARY_IP = "127.0.0.9"


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(f"{USER}:{PASSWORD}\n")
    return path


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def connect_authorised(sidecar: Sidecar, target: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=10)
    sock.sendall(
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        f"Proxy-Authorization: {CREDENTIALS}\r\n\r\n".encode()
    )
    status, _, _, _ = read_head(sock)
    assert status == 200, status
    return sock


# -- defect 1: credentials leak to origins ---------------------------------------------------


def test_plain_http_request_reaches_the_origin_without_proxy_or_hop_by_hop_headers(
    sidecar_factory: Callable[..., Sidecar],
    users: Path,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory("--proxy-auth-file", str(users))
    name = unique("preview")
    zone.add(name, "A", LIVE_IP)
    with Upstream(host=LIVE_IP, tls=False) as origin:
        target = f"{name}:{origin.port}"
        with socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=10) as sock:
            sock.sendall(
                f"GET http://{target}/preview HTTP/1.1\r\nHost: {target}\r\n"
                f"Proxy-Authorization: {CREDENTIALS}\r\nProxy-Connection: keep-alive\r\n"
                "Connection: close, X-Hop-Secret\r\nX-Hop-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
                "TE: trailers\r\nX-End-To-End: kept\r\n\r\n".encode()
            )
            assert read_head(sock)[0] == 200
            assert closed_within(sock, 5)[0]  # `Connection: close` still closes the client's hop
        # The same through a real client that puts the credentials in the proxy URL.
        proxy = f"http://{USER}:{PASSWORD}@127.0.0.1:{sidecar.proxy_port}"
        with httpx.Client(proxy=proxy) as client:
            assert client.get(f"http://{target}/again").status_code == 200
        seen = [request.headers for request in origin.requests]
    assert len(seen) == 2
    for headers in seen:
        leaked = {"proxy-authorization", "proxy-connection", "x-hop-secret", "keep-alive", "te"}
        assert not leaked & set(headers), headers
        assert headers.get("connection", "close") in ("close", "keep-alive")  # this hop's only
        assert headers["host"] == target
    assert seen[0]["x-end-to-end"] == "kept"
    assert PASSWORD not in json.dumps(seen) and CREDENTIALS.split()[1] not in json.dumps(seen)


def test_requests_inside_an_intercepted_tunnel_lose_proxy_headers(
    sidecar_factory: Callable[..., Sidecar],
    users: Path,
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory(
        "--mode", "intercept", "--upstream-ca", str(ca.ca_pem_path), "--proxy-auth-file", str(users)
    )
    trust = ssl.create_default_context(
        cafile=str(sidecar.state_dir / "ca" / "mitmproxy-ca-cert.pem")
    )
    name = unique("tunnelled")
    zone.add(name, "A", LIVE_IP)
    before = len(live_upstream.requests)
    sock = connect_authorised(sidecar, f"{name}:{live_upstream.port}")
    with trust.wrap_socket(sock, server_hostname=name) as tls:
        tls.sendall(
            f"GET /_matrix/federation/v1/version HTTP/1.1\r\nHost: {name}\r\n"
            f"Proxy-Authorization: {CREDENTIALS}\r\nConnection: X-Hop-Secret\r\n"
            "X-Hop-Secret: 1\r\nContent-Length: 0\r\n\r\n".encode()
        )
        assert read_head(tls)[0] == 200
    headers = live_upstream.requests[before].headers
    assert not {"proxy-authorization", "x-hop-secret", "connection"} & set(headers), headers


# -- defect 3: unauthenticated work ------------------------------------------------------------


def client_hello(sni: str) -> bytes:
    """The first flight of a real TLS client (Python's ssl), as sent straight to the proxy."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=sni)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls_without_connect_is_closed_before_anything_is_resolved_or_probed(
    sidecar_factory: Callable[..., Sidecar],
    dns_server: DnsServer,
    users: Path,
    zone: Zone,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    name = unique("hello")
    zone.add(name, "A", CANARY_IP)
    with Upstream(ca, [name], host=CANARY_IP, port=8448) as canary:
        # --probe: a judged SNI would be probed on port 8448, where the canary listens.
        sidecar = sidecar_factory("--proxy-auth-file", str(users), "--probe")
        dns_server.reset_queries()
        with socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=10) as sock:
            sock.sendall(client_hello(name))
            closed, received = closed_within(sock, 5)
        assert closed and received == b""
        time.sleep(1)  # what a resolution and a probe would take on loopback, many times over
        assert dns_server.query_count(name) == 0, dns_server.queries
        assert canary.connections == 0
    assert sidecar.ops(f"/v1/verdicts/{name}")[0] == 404
    assert sidecar.metric("tombstone_admission_refused_total", reason="tls_without_connect") == 1
    assert sum(v for (n, _), v in sidecar.metrics().items() if n == "tombstone_verdicts") == 0


# -- defect 4: pre-auth resource use -------------------------------------------------------


def send_endless_header(port: int, limit_bytes: int) -> tuple[bytes, float, int]:
    """A header line that never ends (up to `limit_bytes`): (answer, seconds, bytes sent)."""
    started = time.monotonic()
    sent = 0
    chunk = b"a" * 65536
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # closed by the sidecar: expected
            sock.sendall(b"CONNECT example.test:443 HTTP/1.1\r\nX-Long: ")
            while sent < limit_bytes:
                sock.sendall(chunk)
                sent += len(chunk)
        _, received = closed_within(sock, 10)
    return received, time.monotonic() - started, sent


def test_an_endless_head_is_answered_431_and_memory_stays_flat(
    sidecar_factory: Callable[..., Sidecar], users: Path
) -> None:
    sidecar = sidecar_factory("--proxy-auth-file", str(users))
    pid = sidecar.process.pid
    before = rss_kib(pid)
    for _ in range(3):
        received, seconds, sent = send_endless_header(sidecar.proxy_port, 40 * 1024 * 1024)
        assert seconds < 10, seconds
        assert sent < 40 * 1024 * 1024, sent  # closed before taking it all (buffers: < 40 MB)
        if received:  # a reset may overtake the answer while we are still sending
            assert received.startswith(b"HTTP/1.1 431 "), received[:200]
            assert b"--max-head-size" in received
    grown = rss_kib(pid) - before
    assert grown < 8 * 1024, f"RSS grew by {grown} KiB"  # landed code: ~120 MiB, kept
    assert sidecar.metric("tombstone_admission_refused_total", reason="too_large") == 3
    # A head just under the limit is still an ordinary request (here: 407, no credentials).
    with socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=10) as sock:
        filler = "b" * (60 * 1024)
        sock.sendall(f"CONNECT example.test:443 HTTP/1.1\r\nX-Filler: {filler}\r\n\r\n".encode())
        assert read_head(sock)[0] == 407


def test_idle_and_half_sent_connections_are_closed_at_the_head_deadline(
    sidecar_factory: Callable[..., Sidecar],
    users: Path,
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar = sidecar_factory("--proxy-auth-file", str(users), "--head-timeout", "1s")
    name = unique("patient")
    zone.add(name, "A", LIVE_IP)
    idle = socket.create_connection(("127.0.0.1", sidecar.proxy_port))
    half = socket.create_connection(("127.0.0.1", sidecar.proxy_port))
    half.sendall(b"CONNECT example.test:443 HTTP/1.1\r\nHost: exa")
    tunnel = connect_authorised(sidecar, f"{name}:{live_upstream.port}")
    started = time.monotonic()
    with idle, half, tunnel:
        assert closed_within(idle, 5) == (True, b"")
        assert closed_within(half, 5) == (True, b"")
        assert time.monotonic() - started < 5  # landed code: mitmproxy's 600 s watchdog
        time.sleep(1.5)  # past the deadline: an admitted tunnel is not affected
        with ca.client_context().wrap_socket(tunnel, server_hostname=name) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            assert read_head(tls)[0] == 200
    assert sidecar.metric("tombstone_admission_refused_total", reason="timeout") == 2
    assert wait_until(lambda: sidecar.metric("tombstone_pending_clients") == 0)


# Sets the open-file limit in the child, then becomes the sidecar (exec keeps the limit).
WITH_FILE_LIMIT = (
    "import os, resource, sys; n = int(sys.argv[1]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])"
)


@pytest.fixture
def small_fd_sidecar(dns_server: DnsServer, tmp_path: Path, users: Path) -> Iterator[Sidecar]:
    sidecar = Sidecar(
        dns_server.port, [*BASE_ARGS, "--proxy-auth-file", str(users)], log_dir=tmp_path
    )
    argv = [sys.executable, "-c", WITH_FILE_LIMIT, "256", *sidecar.argv]
    sidecar.process = ManagedProcess(argv, log_path=sidecar.process.log_path)
    try:
        yield sidecar.start()
    finally:
        sidecar.stop()


def test_idle_flood_under_a_small_file_limit_leaves_room_for_tunnels_and_ops(
    small_fd_sidecar: Sidecar,
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """At a 256-file limit `auto` allows (256 - 128) / 4 = 32 waiting connections; landed
    code let 220 idle connections at a 200-file limit block a CONNECT and /healthz."""
    sidecar = small_fd_sidecar
    name = unique("crowded")
    zone.add(name, "A", LIVE_IP)
    flood = [socket.create_connection(("127.0.0.1", sidecar.proxy_port)) for _ in range(300)]
    try:
        evicted = ("tombstone_admission_refused_total", frozenset({("reason", "evicted")}))
        assert wait_until(lambda: sidecar.metrics()[evicted] >= 300 - 32, timeout=10)
        assert sidecar.metric("tombstone_pending_clients") <= 32
        assert sidecar.ops("/healthz")[0] == 200
        tunnel = connect_authorised(sidecar, f"{name}:{live_upstream.port}")
        with ca.client_context().wrap_socket(tunnel, server_hostname=name) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            assert read_head(tls)[0] == 200
        assert sidecar.ops("/healthz")[0] == 200
    finally:
        for sock in flood:
            sock.close()
    assert sidecar.process.alive
    warnings = [line for line in sidecar.log().splitlines() if "--max-pending-clients" in line]
    assert len(warnings) == 1, warnings  # one line, not one per evicted connection


# -- an exception in an admission hook refuses ------------------------------------------------


def test_an_admission_hook_that_fails_refuses_the_connection() -> None:
    """In process, with mitmproxy's own addon test context and layers: an Admission whose
    options never arrived (limits unknown) raises inside its hooks, and each refuses."""
    from mitmproxy.addons.next_layer import NextLayer as MitmNextLayer
    from mitmproxy.proxy import events
    from mitmproxy.proxy.context import Context
    from mitmproxy.proxy.layer import NextLayer
    from mitmproxy.proxy.layers.modes import HttpProxy
    from mitmproxy.test import taddons, tflow

    from sidecar.metrics import Metrics
    from sidecar.proxy.admission import Admission
    from sidecar.proxy.empty_connect import CloseClient

    metrics = Metrics()
    admission = Admission(metrics)
    with taddons.context(MitmNextLayer(), admission) as tctx:
        client = tflow.tclient_conn()
        admission.client_connected(client)
        assert client.error == "admission failed"

        context = Context(tflow.tclient_conn(), tctx.options)
        HttpProxy(context)
        nextlayer = NextLayer(context)
        nextlayer.events.append(
            events.DataReceived(context.client, b"CONNECT a.test:443 HTTP/1.1\r\n\r\n")
        )
        tctx.master.addons.get("nextlayer").next_layer(nextlayer)  # mitmproxy's choice first
        admission.next_layer(nextlayer)
        assert isinstance(nextlayer.layer, CloseClient)
    refused = metrics.registry.get_sample_value(
        "tombstone_admission_refused_total", {"reason": "error"}
    )
    assert refused == 2


# -- under mitmdump, admission guards the port the same way -------------------------------


def test_under_mitmdump_tls_without_connect_and_an_oversized_head_are_refused(
    dns_server: DnsServer, users: Path, tmp_path: Path
) -> None:
    """mitmdump runs a script's hooks before its own NextLayer addon: admission makes the
    first layer choice itself there, so the head limit and the TLS-without-CONNECT refusal
    hold under `mitmdump -s addons/tombstone.py` as under `run`."""
    port, ops = free_port(), free_port()
    options = [
        f"tombstone_nameserver=127.0.0.1:{dns_server.port}",
        f"tombstone_ops_listen=127.0.0.1:{ops}",
        f"tombstone_proxy_auth_file={users}",
        "tombstone_max_head_size=1k",
        f"tombstone_state_dir={tmp_path / 'state'}",
    ]
    process = ManagedProcess(
        mitmdump_command(port, tmp_path, options),
        env={"PYTHONPATH": str(REPO)},
        log_path=tmp_path / "mitmdump.log",
    ).start()
    try:
        process.wait_for_port(port)
        process.wait_for_port(ops)
        proxy = Sidecar.__new__(Sidecar)
        proxy.proxy_port, proxy.ops_port = port, ops
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(client_hello("hello.test"))
            closed, received = closed_within(sock, 5)
        assert closed and received == b""
        assert proxy.metric("tombstone_admission_refused_total", reason="tls_without_connect") == 1
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            filler = "b" * 4096
            sock.sendall(
                f"CONNECT example.test:443 HTTP/1.1\r\nX-Filler: {filler}\r\n\r\n".encode()
            )
            assert read_head(sock)[0] == 431
        assert proxy.metric("tombstone_admission_refused_total", reason="too_large") == 1
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"CONNECT example.test:443 HTTP/1.1\r\n\r\n")
            assert read_head(sock)[0] == 407  # an ordinary head: proxy auth asks first
    finally:
        process.stop()
