"""The guard fails closed: an exception in any decision hook refuses, it never lets through.

Without this, mitmproxy logs "Addon error", answers the CONNECT 200 and dials the raw
name itself, past the address check. Each test runs the real addon under mitmdump with one
decision raising (tests/support/faulty_addon.py), drives a real client through it three
times, and checks: refused every time, the upstream saw nothing, one ERROR line (not one
per connection), and `tombstone_hook_errors_total` counts each.
"""

from __future__ import annotations

import socket
import ssl
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import LIVE_IP
from tests.support.dns_server import DnsServer, Zone
from tests.support.procs import ManagedProcess, free_port
from tests.support.sidecar_process import REPO, mitmdump_command, read_head
from tests.support.tls_client import split_hello_get, tls_get
from tests.support.tls_upstream import TestCA, Upstream

SCRIPT = REPO / "tests" / "support" / "faulty_addon.py"
ATTEMPTS = 3


@dataclass
class Faulty:
    process: ManagedProcess
    port: int
    ops: int
    confdir: Path

    def hook_errors(self, hook: str) -> float:
        return self.metric("tombstone_hook_errors_total", {"hook": hook})

    def metric(self, name: str, labels: dict[str, str]) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ops}/metrics", timeout=5) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return sample.value
        return 0.0

    def error_lines(self) -> list[str]:
        """The ERROR lines of the hook failures (mitmdump -q prints only errors)."""
        lines = self.process.log_text().splitlines()
        return [line for line in lines if "refused what it was deciding" in line]


@pytest.fixture
def faulty(dns_server: DnsServer, tmp_path: Path) -> Iterator[Callable[[str, str], Faulty]]:
    started: list[ManagedProcess] = []

    def start(fault: str, mode: str) -> Faulty:
        port, ops = free_port(), free_port()
        confdir = tmp_path / f"conf-{fault}"
        options = [
            f"tombstone_nameserver=127.0.0.1:{dns_server.port}",
            f"tombstone_ops_listen=127.0.0.1:{ops}",
            f"tombstone_state_dir={tmp_path / ('state-' + fault)}",
            "tombstone_allow_address=127.0.0.0/8",
            "tombstone_refusal=status",
            "tombstone_probe=false",
            f"tombstone_mode={mode}",
        ]
        process = ManagedProcess(
            mitmdump_command(port, confdir, options, script=SCRIPT),
            env={"PYTHONPATH": str(REPO), "SIDECAR_TEST_FAULT": fault},
            log_path=tmp_path / f"mitmdump-{fault}.log",
        ).start()
        started.append(process)
        process.wait_for_port(port)
        process.wait_for_port(ops)
        return Faulty(process, port, ops, confdir)

    yield start
    for process in started:
        process.stop()


@pytest.fixture(scope="module")
def plain_live() -> Iterator[Upstream]:
    server = Upstream(host=LIVE_IP, tls=False).start()
    yield server
    server.stop()


def connect(port: int, target: str) -> tuple[int, socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    status, _, _, _ = read_head(sock)
    return status, sock


@pytest.mark.parametrize(
    ("fault", "hook"),
    [
        ("TunnelGate.next_layer", "next_layer"),
        ("TunnelGate.connect", "http_connect"),
        ("TunnelGate.clienthello", "tls_clienthello"),  # a ClientHello in two writes
        ("DialGate.server_connect", "server_connect"),
    ],
)
def test_a_failing_passthrough_hook_refuses_and_dials_nothing(
    fault: str,
    hook: str,
    faulty: Callable[[str, str], Faulty],
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    proxy = faulty(fault, "passthrough")
    name = unique("faulty")
    zone.add(name, "A", LIVE_IP)
    before = live_upstream.connections
    for _ in range(ATTEMPTS):
        status, sock = connect(proxy.port, f"{name}:{live_upstream.port}")
        if status == 200:  # decided at CONNECT; the failure comes at TLS or dialling
            get = split_hello_get if hook == "tls_clienthello" else tls_get
            assert get(sock, ca.client_context(), name) == 0
        else:
            assert status in (0, 502), status
            sock.close()
    assert live_upstream.connections == before
    assert proxy.hook_errors(hook) >= ATTEMPTS
    errors = proxy.error_lines()
    assert len(errors) == 1 and f"{hook} failed (InjectedFault" in errors[0], errors


def test_a_failing_early_refusal_closes_and_dials_nothing(
    faulty: Callable[[str, str], Faulty],
    zone: Zone,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """The refusal from a CONNECT's first bytes (admission.py) is asked of every plain
    CONNECT head: when it raises, Admission closes the connection, whatever the target."""
    proxy = faulty("TunnelGate.refuse_early", "passthrough")
    name = unique("faultyearly")
    zone.add(name, "A", LIVE_IP)
    before = live_upstream.connections
    for _ in range(ATTEMPTS):
        status, sock = connect(proxy.port, f"{name}:{live_upstream.port}")
        sock.close()
        assert status == 0  # closed without a byte
    assert live_upstream.connections == before
    refused = proxy.metric("tombstone_admission_refused_total", {"reason": "error"})
    assert refused == ATTEMPTS
    lines = proxy.process.log_text().splitlines()
    errors = [line for line in lines if "admission next_layer hook failed" in line]
    assert len(errors) == 1 and "InjectedFault" in errors[0], errors


def test_a_failing_request_decision_refuses_plain_http(
    faulty: Callable[[str, str], Faulty],
    zone: Zone,
    plain_live: Upstream,
    unique: Callable[[str], str],
) -> None:
    proxy = faulty("RequestGate.request", "passthrough")
    name = unique("faultyplain")
    zone.add(name, "A", LIVE_IP)
    before = plain_live.connections
    for _ in range(ATTEMPTS):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.sendall(
                f"GET http://{name}:{plain_live.port}/ HTTP/1.1\r\nHost: {name}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            assert read_head(sock)[0] == 502
    assert plain_live.connections == before
    assert proxy.hook_errors("requestheaders") == ATTEMPTS
    assert len(proxy.error_lines()) == 1


def test_a_failing_request_decision_refuses_inside_an_intercepted_tunnel(
    faulty: Callable[[str, str], Faulty],
    zone: Zone,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    proxy = faulty("RequestGate.request", "intercept")
    trust = ssl.create_default_context(cafile=str(proxy.confdir / "mitmproxy-ca-cert.pem"))
    name = unique("faultytunnel")
    zone.add(name, "A", LIVE_IP)
    before = live_upstream.connections
    for _ in range(ATTEMPTS):
        status, sock = connect(proxy.port, f"{name}:{live_upstream.port}")
        assert status == 200
        assert tls_get(sock, trust, name) == 502
    assert live_upstream.connections == before
    assert proxy.hook_errors("requestheaders") == ATTEMPTS
    assert len(proxy.error_lines()) == 1
