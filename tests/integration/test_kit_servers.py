"""The decommissioning kit against real parts: its snippets in a real nginx and Caddy, its
DNS records in a real DNS server, `check --probe` judging them, the sidecar suppressing.

Every snippet comes from the real command (`tombstone-sidecar tombstone ... --only nginx`)
and is pasted verbatim into a minimal server block; the answers are read over TLS.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.dns_server import DnsServer, Zone
from tests.support.procs import free_port, wait_until
from tests.support.sidecar_process import Sidecar, read_head, sidecar_command
from tests.support.tls_upstream import Request, Response, TestCA, Upstream
from tests.support.web_servers import FALLBACK_BODY, Caddy, Nginx

NGINX_IP = "127.0.0.20"  # the retired homeserver's web server (443 and a federation port)
CADDY_IP = "127.0.0.21"
DELEGATING_IP = "127.0.0.22"  # a well-known that still delegates
BROKEN_IP = "127.0.0.23"  # a server answering 404 and 503: not a tombstone
WEEK = 7 * 86400
# Operator text with every character nginx, Caddy or JSON would read into.
CONTACT = 'it\'s $host {http.request.host} {$HOME} `x` "q" back\\slash; #hash é 🎉'
SUCCESSOR = "new.example.test"
PATHS = (
    "/.well-known/matrix/server",
    "/.well-known/matrix/client",
    "/_matrix/federation/v1/version",
    "/_matrix/key/v2/server",
)


def kit(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*sidecar_command(), "tombstone", name, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def kit_args(name: str) -> list[str]:
    return [
        name,
        "--date",
        "2026-12-01",
        "--contact",
        CONTACT,
        "--successor",
        SUCCESSOR,
        "--max-age",
        "7d",
    ]


def expected_body(name: str) -> dict[str, object]:
    result = kit(*kit_args(name), "--format", "json")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)["body"]
    assert isinstance(body, dict)
    return body


def https_get(
    host: str, port: int, name: str, path: str, ca: TestCA
) -> tuple[int, dict[str, str], bytes]:
    """One GET over TLS with SNI and Host `name`; the whole answer (Connection: close)."""
    request = f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        ca.client_context().wrap_socket(raw, server_hostname=name) as tls,
    ):
        tls.sendall(request.encode())
        status, _, headers, rest = read_head(tls)
        while chunk := tls.recv(65536):
            rest += chunk
    return status, headers, rest


def assert_tombstone_answers(host: str, port: int, name: str, ca: TestCA) -> None:
    body = expected_body(name)
    assert body["contact"] == CONTACT and body["successor"] == SUCCESSOR
    for path in PATHS:
        status, headers, raw = https_get(host, port, name, path, ca)
        assert status == 410, (path, raw)
        assert headers["content-type"].startswith("application/json"), headers
        assert headers["cache-control"] == f"max-age={WEEK}"
        assert json.loads(raw) == body
    status, _, raw = https_get(host, port, name, "/", ca)
    assert (status, raw.decode()) == (200, FALLBACK_BODY)  # only the tombstone paths


@pytest.fixture
def nginx_for(
    ca: TestCA, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Nginx]]:
    started: list[Nginx] = []

    def start(name: str, ports: tuple[int, ...]) -> Nginx:
        result = kit(*kit_args(name), "--only", "nginx")
        assert result.returncode == 0, result.stderr
        server = Nginx(tmp_path / f"nginx{len(started)}", ca, name, NGINX_IP, ports)
        started.append(server)
        return server.start(result.stdout)

    yield start
    for server in started:
        server.stop()
        if getattr(request.node, "rep_call", None) and request.node.rep_call.failed:
            print(server.log())


def test_nginx_answers_410_with_the_generated_snippet(
    nginx_for: Callable[..., Nginx], ca: TestCA, unique: Callable[[str], str]
) -> None:
    name = unique("nginx")
    port = free_port(NGINX_IP)
    nginx_for(name, (port,))
    assert_tombstone_answers(NGINX_IP, port, name, ca)


def test_caddy_answers_410_with_the_generated_snippet_and_check_probe_judges_it(
    dns_server: DnsServer,
    zone: Zone,
    ca: TestCA,
    tmp_path: Path,
    unique: Callable[[str], str],
) -> None:
    name = unique("caddy")
    result = kit(*kit_args(name), "--only", "caddy")
    assert result.returncode == 0, result.stderr
    port = free_port(CADDY_IP)
    server = Caddy(tmp_path / "caddy", ca, name, CADDY_IP, (443, port))
    zone.add(name, "A", CADDY_IP)
    zone.add(f"_matrix-fed._tcp.{name}", "SRV", f"10 0 {port} {name}")
    try:
        server.start(result.stdout, name)
        assert_tombstone_answers(CADDY_IP, port, name, ca)
        report = json.loads(probe_check(dns_server, ca, name, "--json").stdout)
        assert report["verdict"]["signal"] == "http_410" and report["verdict"]["ttl"] == WEEK
        assert [(s["step"], s["finding"], s["lifetime"]) for s in report["http"]["steps"]] == [
            ("well_known", "gone", WEEK),
            ("srv", "clear", None),
            ("keys", "gone", WEEK),
        ]
    except BaseException:
        print(server.log())
        raise
    finally:
        server.stop()


def probe_check(
    dns_server: DnsServer, ca: TestCA, name: str, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *sidecar_command(),
            "check",
            name,
            "--probe",
            "--nameserver",
            f"127.0.0.1:{dns_server.port}",
            "--upstream-ca",
            str(ca.ca_pem_path),
            "--allow-address",
            "127.0.0.0/8",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_probe_follows_srv_and_judges_the_nginx_tombstone_gone_for_its_max_age(
    nginx_for: Callable[..., Nginx],
    dns_server: DnsServer,
    zone: Zone,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    name = unique("retired")
    port = free_port(NGINX_IP)
    nginx_for(name, (443, port))
    zone.add(name, "A", NGINX_IP)  # no TXT yet: only the HTTP side says gone
    zone.add(f"_matrix-fed._tcp.{name}", "SRV", f"10 0 {port} {name}")
    text = probe_check(dns_server, ca, name)
    assert text.returncode == 1, text.stdout + text.stderr
    assert text.stdout.startswith(
        f"{name}: GONE (http_410: 410 Gone from https://{name}/.well-known/matrix/server "
        f"(holds {WEEK}s)), for {WEEK}s"
    ), text.stdout
    assert f"tombstone-sidecar:    gone (http_410) for 7d ({WEEK}s)" in text.stdout
    assert f"MSC4188 resolver:     halts discovery for 7d ({WEEK}s)" in text.stdout

    report = json.loads(probe_check(dns_server, ca, name, "--json").stdout)
    assert report["verdict"]["state"] == "gone" and report["verdict"]["ttl"] == WEEK
    steps = [(s["step"], s["finding"], s["status"], s["lifetime"]) for s in report["http"]["steps"]]
    assert steps == [
        ("well_known", "gone", 410, WEEK),
        ("srv", "clear", None, None),
        ("keys", "gone", 410, WEEK),
    ]
    assert report["http"]["target"] == f"{name}:{port}"


def test_check_probe_of_a_live_server_is_no_http_verdict(
    dns_server: DnsServer,
    zone: Zone,
    ca: TestCA,
    live_upstream: object,
    unique: Callable[[str], str],
) -> None:
    from tests.integration.conftest import LIVE_IP

    name = unique("alive")
    zone.add(name, "A", LIVE_IP)
    port = getattr(live_upstream, "port")  # noqa: B009
    result = probe_check(dns_server, ca, f"{name}:{port}", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"]["state"] == "alive"
    assert [(s["step"], s["finding"], s["status"]) for s in report["http"]["steps"]] == [
        ("keys", "clear", 200)
    ]
    assert report["http"]["senders"]["tombstone-sidecar"].startswith("no verdict from HTTP")


def test_the_sidecar_learns_the_nginx_410_and_stops_reaching_it(
    nginx_for: Callable[..., Nginx],
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    name = unique("learned")
    port = free_port(NGINX_IP)
    nginx = nginx_for(name, (443, port))
    zone.add(name, "A", NGINX_IP)
    sidecar = sidecar_factory("--probe", "--upstream-ca", str(ca.ca_pem_path))
    first = sidecar.connect(f"{name}:{port}")
    assert first.status == 200 and first.sock is not None  # never delayed by the probe
    first.sock.close()

    def learned() -> dict[str, object]:
        status, body = sidecar.ops(f"/v1/verdicts/{name}")
        return json.loads(body) if status == 200 else {}

    assert wait_until(lambda: learned().get("signal") == "http_410", timeout=15)
    verdict = learned()
    assert verdict["state"] == "gone"
    assert float(verdict["expires_at"]) - float(verdict["observed_at"]) == WEEK  # type: ignore[arg-type]
    reached = nginx.requests()
    assert [line.split('"')[1] for line in reached] == ["GET /.well-known/matrix/server HTTP/1.1"]
    for _ in range(3):
        reply = sidecar.connect(f"{name}:{port}")
        assert reply.status == 502 and reply.headers["x-tombstone-signal"] == "http_410"
    assert nginx.requests() == reached  # nothing reached the retired server after the 410


def test_check_probe_follows_well_known_delegation_to_the_410(
    nginx_for: Callable[..., Nginx],
    dns_server: DnsServer,
    zone: Zone,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    """example.org's well-known (forgotten, still 200) delegates to the federation host,
    which answers with the kit: discovery must reach it as the delegated name."""
    name, federation = unique("delegating"), unique("fed")
    port = free_port(NGINX_IP)
    nginx_for(federation, (port,))
    document = json.dumps({"m.server": f"{federation}:{port}"}).encode()
    well_known = Upstream(
        ca, [name], host=DELEGATING_IP, port=443, handler=lambda request: Response(200, document)
    ).start()
    try:
        zone.add(name, "A", DELEGATING_IP)
        zone.add(federation, "A", NGINX_IP)
        result = probe_check(dns_server, ca, name, "--json")
    finally:
        well_known.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert [(s["step"], s["finding"], s["status"]) for s in report["http"]["steps"]] == [
        ("well_known", "clear", 200),
        ("keys", "gone", 410),
    ]
    assert report["http"]["steps"][0]["detail"] == f"200: delegates to {federation}:{port}"
    assert report["verdict"]["signal"] == "http_410" and report["verdict"]["ttl"] == WEEK
    assert report["http"]["senders"]["MSC4188 resolver"] == "no well-known 410: keeps discovering"


def test_the_whole_kit_dns_and_http_is_judged_by_dns_first(
    nginx_for: Callable[..., Nginx],
    dns_server: DnsServer,
    zone: Zone,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    """Publish what `tombstone --srv` prints into the zone: the verdict is the TXT, and
    the SRV '.' leaves no federation target to fetch."""
    name = unique("kit")
    nginx_for(name, (443,))
    records = kit(name, "--srv", "--only", "dns")
    assert records.returncode == 0, records.stderr
    for line in records.stdout.splitlines():
        if line.startswith(";"):
            continue
        owner, ttl, _, rrtype, rdata = line.split(None, 4)
        zone.add(owner, rrtype, rdata.strip('"'), ttl=int(ttl))
    zone.add(name, "A", NGINX_IP)
    result = probe_check(dns_server, ca, name, "--json")
    assert result.returncode == 1, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["verdict"]["signal"] == "dns_txt_gone"
    findings = {s["signal"]: s["finding"] for s in report["signals"]}
    assert findings["dns_txt_gone"] == "gone" and findings["dns_srv_dot"] == "gone"
    assert [(s["step"], s["finding"]) for s in report["http"]["steps"]] == [
        ("well_known", "gone"),
        ("srv", "clear"),
    ]
    assert report["http"]["target"] is None
    assert report["http"]["senders"]["tombstone-sidecar"] == (
        "gone by DNS (dns_txt_gone): never connects"
    )


def test_tombstone_command_errors_help_and_clean_parts() -> None:
    bad = kit("bad..name")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == "tombstone-sidecar: error: NAME: 'bad..name' has an empty label\n"
    unknown = kit("example.org", "--format", "yaml")
    assert unknown.returncode == 2 and len(unknown.stderr.splitlines()) == 1
    clamped = kit("example.org", "--max-age", "90d", "--only", "nginx")
    assert clamped.returncode == 0
    assert clamped.stderr.startswith("tombstone-sidecar: note: --max-age 90d is longer than")
    assert clamped.stdout.startswith("# tombstone for example.org")
    assert "note:" not in clamped.stdout
    helped = kit("--help")
    assert helped.returncode == 0
    for taught in ("v=matrix;gone", "410 Gone", "MSC4188", "--max-age", "check NAME --probe"):
        assert taught in helped.stdout


def test_check_probe_404_5xx_and_refused_are_no_verdict(
    dns_server: DnsServer, zone: Zone, ca: TestCA, unique: Callable[[str], str]
) -> None:
    """Not a tombstone: a 404 well-known, a 503 key request, a port nobody listens on."""
    name, refusing = unique("broken"), unique("refusing")

    def handler(request: Request) -> Response:
        return Response(404 if request.path.startswith("/.well-known/") else 503, b"{}")

    server = Upstream(ca, [name], host=BROKEN_IP, port=443, handler=handler).start()
    try:
        zone.add(name, "A", BROKEN_IP)
        zone.add(f"_matrix-fed._tcp.{name}", "SRV", f"10 0 443 {name}")
        broken = probe_check(dns_server, ca, name, "--json")
        zone.add(refusing, "A", "127.0.0.24")  # nothing listens there
        refused = probe_check(dns_server, ca, refusing, "--json")
    finally:
        server.stop()
    assert broken.returncode == 0, broken.stdout + broken.stderr
    report = json.loads(broken.stdout)
    assert report["verdict"]["state"] == "alive"
    assert [(s["step"], s["finding"], s["status"]) for s in report["http"]["steps"]] == [
        ("well_known", "clear", 404),
        ("srv", "clear", None),
        ("keys", "clear", 503),
    ]
    assert report["http"]["senders"]["tombstone-sidecar"].startswith("no verdict from HTTP")
    assert refused.returncode == 0, refused.stdout + refused.stderr
    steps = json.loads(refused.stdout)["http"]["steps"]
    assert [(s["step"], s["finding"]) for s in steps] == [
        ("well_known", "unknown"),
        ("srv", "clear"),
        ("keys", "unknown"),
    ]
    assert "Connect call failed" in steps[0]["detail"] or "refused" in steps[0]["detail"]
