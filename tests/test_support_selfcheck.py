"""Self-check of tests/support: prove the fakes behave like the real thing.

Every other test trusts these servers, so here they are driven by real
clients (dnspython, httpx, ssl sockets, subprocesses) over loopback.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import dns.asyncresolver
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import httpx
import pytest

from tests.support import (
    Blackhole,
    DnsServer,
    ManagedProcess,
    ProcessStartError,
    RefusingPort,
    Request,
    Response,
    TestCA,
    Upstream,
    Zone,
    free_port,
    wait_until,
)

# Seconds an answer from a local test server may take: a guard against a hang, never a
# measure of speed (1-2 s timed out with the machine's CPUs busy with other work).
ANSWER_WAIT = 10.0

# -- helpers -----------------------------------------------------------------


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    with DnsServer() as server:
        yield server


@pytest.fixture(scope="module")
def ca() -> Iterator[TestCA]:
    with TestCA() as test_ca:
        yield test_ca


def make_resolver(server: DnsServer, lifetime: float = ANSWER_WAIT) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [dns.nameserver.Do53Nameserver("127.0.0.1", port=server.port)]
    resolver.lifetime = lifetime
    resolver.timeout = lifetime
    return resolver


def resolve(server: DnsServer, name: str, rrtype: str, lifetime: float = ANSWER_WAIT) -> Any:
    resolver = make_resolver(server, lifetime)
    return asyncio.run(resolver.resolve(name, rrtype))


def negative_response(exc: BaseException, name: str | None = None) -> dns.message.Message:
    """Response behind NXDOMAIN/NoAnswer (dnspython leaves these untyped)."""
    err: Any = exc
    if name is None:
        response: dns.message.Message = err.response()
    else:
        response = err.response(dns.name.from_text(name))
    return response


def soa_of(message: dns.message.Message) -> Any:
    (rrset,) = [r for r in message.authority if r.rdtype == dns.rdatatype.SOA]
    return rrset


# -- DNS -----------------------------------------------------------------------


def test_txt_multi_string_and_plain(dns_server: DnsServer) -> None:
    dns_server.zone.add("gone.test", "TXT", ["v=matrix;gone", "part2"])
    dns_server.zone.add("plain.test", "TXT", "v=matrix;gone", ttl=60)
    answer = resolve(dns_server, "gone.test", "TXT")
    assert [rd.strings for rd in answer] == [(b"v=matrix;gone", b"part2")]
    assert answer.response.flags & dns.flags.AA
    plain = resolve(dns_server, "PLAIN.test.", "TXT")
    assert [rd.strings for rd in plain] == [(b"v=matrix;gone",)]
    assert plain.rrset.ttl == 60
    assert dns_server.queries == [("gone.test", "TXT"), ("plain.test", "TXT")]


def test_srv_with_root_target(dns_server: DnsServer) -> None:
    dns_server.zone.add("_matrix-fed._tcp.dot.test", "SRV", "0 0 0 .")
    answer = resolve(dns_server, "_matrix-fed._tcp.dot.test", "SRV")
    (srv,) = list(answer)
    assert srv.target == dns.name.root
    assert (srv.priority, srv.weight, srv.port) == (0, 0, 0)


def test_a_aaaa_and_cname_chain(dns_server: DnsServer) -> None:
    zone = dns_server.zone
    zone.add("alias.test", "CNAME", "mid.test.")
    zone.add("mid.test", "CNAME", "real.test")
    zone.add("real.test", "A", ["127.0.0.2", "127.0.0.3"])
    zone.add("real.test", "AAAA", "::1")
    answer = resolve(dns_server, "alias.test", "A")
    assert sorted(rd.address for rd in answer) == ["127.0.0.2", "127.0.0.3"]
    assert answer.canonical_name == dns.name.from_text("real.test")
    assert [rd.address for rd in resolve(dns_server, "alias.test", "AAAA")] == ["::1"]
    # CNAME to a missing in-zone name: NXDOMAIN (RFC 6604), chain still shown.
    zone.add("dangling.test", "CNAME", "nowhere.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(dns_server, "dangling.test", "A")


def test_nxdomain_carries_soa_minimum(dns_server: DnsServer) -> None:
    dns_server.zone.nxdomain("gone.test", soa_minimum=42, soa_ttl=3600)
    with pytest.raises(dns.resolver.NXDOMAIN) as info:
        resolve(dns_server, "gone.test", "TXT")
    response = negative_response(info.value, "gone.test")
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA
    soa = soa_of(response)
    assert soa.name == dns.name.from_text("test.")
    assert soa[0].minimum == 42
    assert soa.ttl == 3600
    # Below a declared NXDOMAIN nothing exists either, with the same SOA.
    with pytest.raises(dns.resolver.NXDOMAIN) as below:
        resolve(dns_server, "x.gone.test", "A")
    assert soa_of(negative_response(below.value, "x.gone.test"))[0].minimum == 42


def test_undeclared_names_default_nxdomain_any_tld(dns_server: DnsServer) -> None:
    for name, apex in (("foo.invalid", "invalid."), ("example.org", "org.")):
        with pytest.raises(dns.resolver.NXDOMAIN) as info:
            resolve(dns_server, name, "A")
        soa = soa_of(negative_response(info.value, name))
        assert soa.name == dns.name.from_text(apex)
        assert soa[0].minimum == 300


def test_default_nxdomain_off_gives_nodata() -> None:
    with DnsServer(Zone(default_nxdomain=False)) as server, pytest.raises(dns.resolver.NoAnswer):
        resolve(server, "anything.test", "A")


def test_nodata_and_empty_non_terminal(dns_server: DnsServer) -> None:
    zone = dns_server.zone
    zone.add("a.test", "A", "127.0.0.2")
    zone.add("_matrix._tcp.ent.test", "SRV", "10 5 8448 a.test.")
    zone.add("test", "SOA", "ns.test. root.test. 7 3600 600 86400 120", ttl=900)
    with pytest.raises(dns.resolver.NoAnswer) as info:
        resolve(dns_server, "a.test", "TXT")
    soa = soa_of(negative_response(info.value))
    assert (soa.name, soa.ttl, soa[0].minimum, soa[0].serial) == (
        dns.name.from_text("test."),
        900,
        120,
        7,
    )
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(dns_server, "_tcp.ent.test", "SRV")  # empty non-terminal
    zone.nodata("declared.test", soa_minimum=5)
    with pytest.raises(dns.resolver.NoAnswer) as declared:
        resolve(dns_server, "declared.test", "A")
    assert soa_of(negative_response(declared.value))[0].minimum == 5


def test_servfail(dns_server: DnsServer) -> None:
    dns_server.zone.servfail("broken.test")
    with pytest.raises(dns.resolver.NoNameservers):
        resolve(dns_server, "broken.test", "TXT")
    query = dns.message.make_query("broken.test", "A")
    response = dns.query.udp(query, "127.0.0.1", port=dns_server.port, timeout=ANSWER_WAIT)
    assert response.rcode() == dns.rcode.SERVFAIL


def test_blackhole_times_out(dns_server: DnsServer) -> None:
    dns_server.zone.blackhole("slow.test")
    started = time.monotonic()
    with pytest.raises(dns.resolver.LifetimeTimeout):
        resolve(dns_server, "slow.test", "TXT", lifetime=0.3)
    # Silent for the whole lifetime (no quick error answer); the upper bound only says
    # that it did not hang (it was 1.0 s, a wall-clock bound a loaded machine can miss).
    assert 0.3 <= time.monotonic() - started < ANSWER_WAIT
    assert dns_server.query_count("slow.test.", "txt") >= 1


def test_delay(dns_server: DnsServer) -> None:
    dns_server.zone.add("d.test", "A", "127.0.0.2")
    dns_server.zone.delay(0.2)
    started = time.monotonic()
    resolve(dns_server, "d.test", "A")
    assert time.monotonic() - started >= 0.2


def test_truncation_falls_back_to_tcp(dns_server: DnsServer) -> None:
    for i in range(40):
        dns_server.zone.add("big.test", "TXT", f"{i:03d}" + "x" * 100)
    answer = resolve(dns_server, "big.test", "TXT")
    assert len(answer) == 40
    assert dns_server.query_count("big.test", "TXT", transport="udp") == 1
    assert dns_server.query_count("big.test", "TXT", transport="tcp") == 1
    # With EDNS advertising enough room the same answer comes over UDP only.
    dns_server.reset_queries()
    query = dns.message.make_query("big.test", "TXT", use_edns=0, payload=8192)
    response = dns.query.udp(query, "127.0.0.1", port=dns_server.port, timeout=ANSWER_WAIT)
    assert not response.flags & dns.flags.TC
    assert len(response.answer[0]) == 40
    # A small EDNS buffer gets TC with the question echoed and no records.
    small = dns.message.make_query("big.test", "TXT", use_edns=0, payload=1232)
    truncated = dns.query.udp(small, "127.0.0.1", port=dns_server.port, timeout=ANSWER_WAIT)
    assert truncated.flags & dns.flags.TC
    assert truncated.answer == [] and truncated.question == small.question


def test_raw_hook_sends_exact_bytes(dns_server: DnsServer) -> None:
    def garbage(request: Any) -> bytes:
        return bytes(request.header.id.to_bytes(2, "big")) + b"\x81\x80\xff"

    dns_server.zone.add_raw("bad.test", "TXT", garbage)
    query = dns.message.make_query("bad.test", "TXT")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(ANSWER_WAIT)
        sock.sendto(query.to_wire(), dns_server.address)
        data, _ = sock.recvfrom(4096)
    assert data == query.id.to_bytes(2, "big") + b"\x81\x80\xff"


def test_fast_start_parallel_instances_clean_stop() -> None:
    before = threading.active_count()
    started = time.monotonic()
    servers = [DnsServer().start() for _ in range(3)]
    assert (time.monotonic() - started) / 3 < 0.1
    assert len({s.port for s in servers}) == 3
    for server in servers:
        server.zone.add("x.test", "A", "127.0.0.2")
        assert resolve(server, "x.test", "A")[0].address == "127.0.0.2"
        server.stop()
    assert threading.active_count() == before


# -- TLS / HTTP upstreams ------------------------------------------------------


def test_upstream_keepalive_https_with_httpx(ca: TestCA) -> None:
    with Upstream(ca, ["upstream.test"]) as upstream:
        url = f"https://127.0.0.1:{upstream.port}/_matrix/federation/v1/version"
        with httpx.Client(verify=ca.client_context()) as client:
            ext = {"sni_hostname": "upstream.test"}
            first = client.get(url, extensions=ext)
            second = client.post(url, content=b"hello", extensions=ext)
        assert first.json() == {"server": {"name": "fake", "version": "0"}}
        assert first.headers["content-type"] == "application/json"
        assert second.status_code == 200
        assert upstream.connections == 1
        assert upstream.tls_handshakes == 1
        requests = upstream.requests
        assert [(r.method, r.path) for r in requests] == [
            ("GET", "/_matrix/federation/v1/version"),
            ("POST", "/_matrix/federation/v1/version"),
        ]
        assert requests[1].body == b"hello"
        assert {r.sni for r in requests} == {"upstream.test"}
        assert upstream.snis == ["upstream.test"]
        upstream.reset()
        assert (upstream.connections, upstream.requests) == (0, [])


def test_upstream_handler_connection_close_and_bad_cert(ca: TestCA) -> None:
    def handler(request: Request) -> Response:
        if request.path == "/boom":
            raise RuntimeError("boom")
        return Response(201, request.body[::-1], {"X-Seen": request.headers["x-test"]})

    with Upstream(ca, ["up.test"], host="127.0.0.2", handler=handler) as upstream:
        ctx = ca.client_context()
        with (
            socket.create_connection(upstream.address, timeout=ANSWER_WAIT) as raw,
            ctx.wrap_socket(raw, server_hostname="up.test") as tls,
        ):
            tls.sendall(
                b"PUT /x HTTP/1.1\r\nHost: up.test\r\nX-Test: 1\r\nContent-Length: 3\r\n"
                b"Connection: close\r\n\r\nabc"
            )
            data = b""
            while chunk := tls.recv(4096):
                data += chunk  # server closes: loop ends
        assert data.startswith(b"HTTP/1.1 201 Created\r\n")
        assert b"X-Seen: 1\r\n" in data and b"Connection: close\r\n" in data
        assert data.endswith(b"\r\n\r\ncba")
        # Client that does not trust the cert: handshake counted as failure.
        with (
            socket.create_connection(upstream.address, timeout=ANSWER_WAIT) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            ssl.create_default_context().wrap_socket(raw, server_hostname="up.test")
        assert wait_until(lambda: upstream.tls_failures == 1)
        conn = http.client.HTTPSConnection(
            "127.0.0.2", upstream.port, context=ctx, timeout=ANSWER_WAIT
        )
        ctx.check_hostname = False
        conn.request("GET", "/boom")
        assert conn.getresponse().status == 500
        conn.close()
        assert "RuntimeError: boom" in upstream.errors[0]
        assert upstream.connections == 3


def test_plain_upstream() -> None:
    with Upstream(tls=False, status=404, body=b"{}") as upstream:
        conn = http.client.HTTPConnection("127.0.0.1", upstream.port, timeout=ANSWER_WAIT)
        for _ in range(2):
            conn.request("GET", "/a")
            response = conn.getresponse()
            assert (response.status, response.read()) == (404, b"{}")
        conn.close()
        assert upstream.connections == 1
        assert upstream.tls_handshakes == 0
        assert [r.sni for r in upstream.requests] == [None, None]


def test_refusing_port() -> None:
    with RefusingPort() as refusing, pytest.raises(ConnectionRefusedError):
        socket.create_connection(refusing.address, timeout=1)


def test_blackhole_accepts_but_never_answers(ca: TestCA) -> None:
    with Blackhole() as hole, socket.create_connection(hole.address, timeout=0.3) as raw:
        with pytest.raises(TimeoutError):
            ca.client_context().wrap_socket(raw, server_hostname="x.test")
        assert wait_until(lambda: hole.received_bytes > 0)
        assert hole.connections == 1


def test_blackhole_connect_hangs() -> None:
    with Blackhole(hang_connect=True) as hole:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            socket.create_connection(hole.address, timeout=0.3)
        assert time.monotonic() - started >= 0.25


# -- processes ---------------------------------------------------------------------

SERVER_SCRIPT = """
import signal, socket, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("child", child.pid, flush=True)
if sys.argv[2] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
print("listening", flush=True)
time.sleep(60)
"""


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.parametrize("mode", ["polite", "stubborn"])
def test_managed_process_group(mode: str, tmp_path: Any) -> None:
    port = free_port()
    argv = [sys.executable, "-c", SERVER_SCRIPT, str(port), mode]
    with ManagedProcess(argv, log_path=tmp_path / "p.log") as proc:
        proc.wait_for_port(port, timeout=5)
        child = int(proc.wait_for_log(r"child (\d+)").group(1))
        assert "listening" in proc.log_text()
        code = proc.stop(grace=0.3)
    assert code == (-15 if mode == "polite" else -9)
    assert wait_until(lambda: not _pid_alive(child), timeout=ANSWER_WAIT)


def test_process_death_reports_log_tail(tmp_path: Any) -> None:
    script = "import sys; print('config error: no upstream', file=sys.stderr); sys.exit(3)"
    proc = ManagedProcess([sys.executable, "-c", script], log_path=tmp_path / "dead.log")
    with proc, pytest.raises(ProcessStartError, match="config error: no upstream") as info:
        proc.wait_for_port(free_port(), timeout=5)
    assert "exited with 3" in str(info.value)
    assert proc.log_path == tmp_path / "dead.log"
