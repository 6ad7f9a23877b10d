"""The sidecar process in pass-through mode (the default; see test_intercept.py for the
other), driven through its real sockets as Synapse drives it.

Each tombstone signal must answer the CONNECT locally with nothing dialled (the dead
upstream sees zero connections); live names pass through byte for byte with TLS end to
end; DNS failure passes (fail open); shadow mode counts and passes.
"""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import BASE_ARGS, DEAD_IP, LIVE_IP
from tests.support.dns_server import Zone
from tests.support.procs import free_port, wait_until
from tests.support.sidecar_process import Sidecar
from tests.support.tls_client import split_hello_get, tls_get
from tests.support.tls_upstream import TestCA, Upstream

GONE_SIGNALS = [
    "dns_txt_gone",
    "dns_srv_dot",
    "dns_srv_dot_legacy",
    "invalid_tld_srv",
    "invalid_tld_name",
    "nxdomain",
    "operator",
]


def publish(zone: Zone, signal: str, name: str) -> str:
    """Publish the tombstone for `signal` at `name` (with an A record to the dead server)."""
    if signal not in ("nxdomain", "invalid_tld_name"):
        zone.add(name, "A", DEAD_IP)
    if signal == "dns_txt_gone":
        zone.add(name, "TXT", "v=spf1 -all")
        zone.add(name, "TXT", ["V=Matrix ; ", "gone; successor=new.example"])
    elif signal == "dns_srv_dot":
        zone.add(f"_matrix-fed._tcp.{name}", "SRV", "0 0 0 .")
    elif signal == "dns_srv_dot_legacy":
        zone.add(f"_matrix._tcp.{name}", "SRV", "0 0 0 .")
    elif signal == "invalid_tld_srv":
        zone.add(
            f"_matrix-fed._tcp.{name}", "SRV", ["10 0 8448 a.gone.invalid", "20 0 8448 b.invalid"]
        )
    elif signal == "invalid_tld_name":
        return name.removesuffix(".hs.test") + ".invalid"
    elif signal == "nxdomain":
        zone.nxdomain(name, soa_minimum=900)
    return name


def expected_code(signal: str) -> str:
    return {
        "dns_srv_dot_legacy": "dns_srv_dot",
        "invalid_tld_srv": "invalid_tld",
        "invalid_tld_name": "invalid_tld",
    }.get(signal, signal)


@pytest.mark.parametrize("signal", GONE_SIGNALS)
def test_each_signal_answers_connect_locally_and_dials_nothing(
    signal: str,
    sidecar: Sidecar,
    zone: Zone,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    name = "denied.test" if signal == "operator" else publish(zone, signal, unique(signal))
    code = expected_code(signal)
    before = sidecar.metric("tombstone_suppressed_total", signal=code, stage="connect")

    for _ in range(3):
        reply = sidecar.connect(f"{name}:{dead_upstream.port}")
        assert reply.status == 502, reply
        assert reply.headers["connection"] == "close"
        assert reply.headers["x-tombstone-signal"] == code
        assert reply.headers["content-type"] == "application/json"
        body = reply.json()
        assert body["signal"] == code
        assert body["errcode"] == "M_SERVER_DECOMMISSIONED"
        assert str(body["error"]).startswith(f"{name} is decommissioned ({code}: ")

    assert dead_upstream.connections == 0
    assert sidecar.metric("tombstone_suppressed_total", signal=code, stage="connect") == before + 3


def test_default_refusal_closes_the_connect_without_an_answer(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """Synapse logs a CRITICAL traceback for every non-200 CONNECT answer but backs off the
    same when the connection just closes (tests/e2e/test_s5_synapse_log.py measures it)."""
    sidecar = sidecar_factory("--refusal", "close")
    name = publish(zone, "dns_txt_gone", unique("closed"))
    reply = sidecar.connect(f"{name}:{dead_upstream.port}")
    assert (reply.status, reply.body) == (0, b"")
    assert sidecar.metric("tombstone_suppressed_total", signal="dns_txt_gone", stage="connect") == 1
    assert dead_upstream.connections == 0


def test_live_name_passes_through_byte_for_byte(
    sidecar: Sidecar,
    zone: Zone,
    live_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    name = unique("live")
    zone.add(name, "A", LIVE_IP)
    zone.add(name, "TXT", "v=matrix;alive")  # a matrix TXT record that is not a tombstone
    payload = bytes(range(256)) * 64
    status, _, body = sidecar.https_get(
        f"{name}:{live_upstream.port}",
        name,
        ca.client_context(),
        path="/_matrix/federation/v1/send/1",
        body=payload,
    )
    assert status == 200
    assert body == live_upstream.body
    seen = [r for r in live_upstream.requests if r.sni == name]
    assert len(seen) == 1
    assert seen[0].body == payload  # the request body crossed the proxy unchanged
    assert seen[0].path == "/_matrix/federation/v1/send/1"


def test_real_https_client_honouring_the_proxy_setting(
    sidecar: Sidecar,
    zone: Zone,
    live_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    """httpx configured with the proxy (as Synapse is) verifies the real server's cert."""
    name = unique("httpx")
    zone.add(name, "A", LIVE_IP)
    with httpx.Client(proxy=sidecar.proxy_url, verify=ca.client_context()) as client:
        for _ in range(3):
            response = client.get(f"https://{name}:{live_upstream.port}/_matrix/key/v2/server")
            assert response.status_code == 200
            assert response.content == live_upstream.body
    assert sum(1 for r in live_upstream.requests if r.sni == name) == 3


def test_curl_through_the_proxy(
    sidecar: Sidecar,
    zone: Zone,
    live_upstream: Upstream,
    ca: TestCA,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    import subprocess

    live, gone = unique("curl-live"), unique("curl-gone")
    zone.add(live, "A", LIVE_IP)
    publish(zone, "dns_txt_gone", gone)
    env = {"HTTPS_PROXY": sidecar.proxy_url, "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(
        ["curl", "-sS", "--cacert", str(ca.ca_pem_path), f"https://{live}:{live_upstream.port}/"],
        env=env,
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout == live_upstream.body
    refused = subprocess.run(
        ["curl", "-sS", "--cacert", str(ca.ca_pem_path), f"https://{gone}:{dead_upstream.port}/"],
        env=env,
        capture_output=True,
        timeout=20,
        check=False,
    )
    assert refused.returncode != 0
    assert b"502" in refused.stderr
    assert dead_upstream.connections == 0


def test_gone_sni_behind_a_live_connect_target_is_never_dialled(
    sidecar: Sidecar,
    zone: Zone,
    dead_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    """SRV delegation: CONNECT names the target host, the SNI names the (gone) server."""
    server = unique("srvgone")
    target = f"fed.{server}"
    zone.add(target, "A", DEAD_IP)
    zone.add(server, "TXT", "v=matrix;gone")
    zone.add(server, "A", DEAD_IP)
    before = sidecar.metric("tombstone_suppressed_total", signal="dns_txt_gone", stage="tls")

    reply = sidecar.connect(f"{target}:{dead_upstream.port}")
    assert reply.status == 200 and reply.sock is not None
    context = ca.client_context()
    with (
        pytest.raises((ssl.SSLError, ConnectionError, OSError)),
        context.wrap_socket(reply.sock, server_hostname=server) as tls,
    ):
        tls.recv(1)

    assert dead_upstream.connections == 0
    assert (
        sidecar.metric("tombstone_suppressed_total", signal="dns_txt_gone", stage="tls")
        == before + 1
    )


def test_resolver_failure_on_a_signal_fails_open(
    sidecar: Sidecar,
    zone: Zone,
    live_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    """TXT times out and SRV gets SERVFAIL: no evidence, so the connection passes."""
    name = unique("dnsfail")
    zone.add(name, "A", LIVE_IP)
    zone.add_raw(name, "TXT", lambda request: None)  # never answered: a timeout
    zone.add_raw(f"_matrix-fed._tcp.{name}", "SRV", _servfail)
    before = sidecar.metric("tombstone_undecided_total", stage="connect")

    status, _, body = sidecar.https_get(f"{name}:{live_upstream.port}", name, ca.client_context())
    assert status == 200 and body == live_upstream.body
    assert sidecar.metric("tombstone_undecided_total", stage="connect") == before + 1
    assert sidecar.metric("tombstone_dns_queries_total", rrtype="TXT", result="timeout") >= 1
    assert sidecar.metric("tombstone_dns_queries_total", rrtype="SRV", result="servfail") >= 1
    status, body = sidecar.ops(f"/v1/verdicts/{name}")
    verdict = json.loads(body)
    assert verdict["state"] == "undecided"
    # Each failure once, each naming what was asked (the TXT timeout is also why the
    # NXDOMAIN signal has no evidence: said once, not twice).
    failures = verdict["evidence"].split("; ")
    assert len(failures) == len(set(failures)), failures
    assert f"TXT {name}: timeout" in verdict["evidence"], failures


def _servfail(request: object) -> bytes:
    from dnslib import RCODE, DNSRecord

    assert isinstance(request, DNSRecord)
    reply = request.reply()
    reply.header.rcode = RCODE.SERVFAIL
    packed: bytes = reply.pack()
    return packed


def test_blocked_address_is_refused_with_403_not_a_tombstone(
    sidecar: Sidecar,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = unique("private")
    zone.add(name, "A", "10.1.2.3")
    zone.add(name, "AAAA", "fd00::1")
    before = sidecar.metric("tombstone_blocked_address_total")
    reply = sidecar.connect(f"{name}:8448")
    assert reply.status == 403
    assert "x-tombstone-signal" not in reply.headers
    error = str(reply.json()["error"])
    assert "10.1.2.3 (in 10.0.0.0/8)" in error and "fd00::1 (in fc00::/7)" in error
    assert "--allow-address" in error
    literal = sidecar.connect("[::ffff:192.168.1.1]:8448")
    assert literal.status == 403
    assert sidecar.metric("tombstone_blocked_address_total") == before + 2


def test_connects_to_the_address_it_checked(
    sidecar: Sidecar,
    zone: Zone,
    live_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    """The address checked at CONNECT is the one dialled, even if DNS changes meanwhile."""
    name = unique("rebind")
    zone.add(name, "A", LIVE_IP, ttl=0)
    reply = sidecar.connect(f"{name}:{live_upstream.port}")
    assert reply.status == 200 and reply.sock is not None
    zone.remove(name, "A")
    zone.add(name, "A", "10.0.0.1", ttl=0)  # a rebinding attacker's second answer
    with ca.client_context().wrap_socket(reply.sock, server_hostname=name) as tls:
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
        assert tls.recv(12).startswith(b"HTTP/1.1 200")


def test_unresolvable_live_name_is_a_502_without_a_tombstone(
    sidecar: Sidecar,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = unique("noaddr")
    zone.add(name, "TXT", "hello")  # exists, but has no A/AAAA
    reply = sidecar.connect(f"{name}:8448")
    assert reply.status == 502
    assert "x-tombstone-signal" not in reply.headers
    assert "no A or AAAA records" in str(reply.json()["error"])


@pytest.mark.parametrize("target", ["bad_name..test:443", "-dash.test:443", "a%20b.test:443"])
def test_malformed_connect_targets_get_400_and_the_proxy_keeps_serving(
    target: str,
    sidecar: Sidecar,
    zone: Zone,
    live_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    reply = sidecar.connect(target)
    assert reply.status == 400
    name = unique("after-bad")
    zone.add(name, "A", LIVE_IP)
    status, _, _ = sidecar.https_get(f"{name}:{live_upstream.port}", name, ca.client_context())
    assert status == 200


def test_connect_to_an_empty_host_is_closed_unanswered_like_any_refusal(
    sidecar_factory: Callable[..., Sidecar], sidecar: Sidecar
) -> None:
    """Synapse asks `CONNECT :0` for an SRV target "."; an answer would be a CRITICAL in
    its log (tests/e2e/test_s5), so with --refusal close the connection is just closed."""
    closing = sidecar_factory("--refusal", "close")
    with socket.create_connection(("127.0.0.1", closing.proxy_port), timeout=10) as sock:
        sock.sendall(b"CONNECT :0 HTTP/1.1\r\nHost: :0\r\n\r\n")
        assert sock.recv(1024) == b""  # closed without a byte
    assert closing.metric("tombstone_invalid_input_total", where="connect") == 1
    assert sidecar.connect(":0").status == 400  # --refusal status: mitmproxy's own 400 stays


def test_single_flight_and_cached_verdicts(
    sidecar: Sidecar,
    zone: Zone,
    dns_server: object,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """Twenty concurrent CONNECTs for a new name: one set of DNS queries, then none."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.support.dns_server import DnsServer

    assert isinstance(dns_server, DnsServer)
    name = publish(zone, "dns_txt_gone", unique("flight"))
    zone.delay(0.2)
    try:
        with ThreadPoolExecutor(20) as pool:
            replies = list(pool.map(lambda _: sidecar.connect(f"{name}:8448"), range(20)))
    finally:
        zone.delay(0)
    for _ in range(10):
        assert sidecar.connect(f"{name}:8448").status == 502
    assert all(r.status == 502 for r in replies)
    for qname, rrtype in [
        (name, "TXT"),
        (f"_matrix-fed._tcp.{name}", "SRV"),
        (f"_matrix._tcp.{name}", "SRV"),
        (name, "A"),
        (name, "AAAA"),
    ]:
        assert dns_server.query_count(qname, rrtype) == 1, (qname, rrtype, dns_server.queries)
    assert dead_upstream.connections == 0


def test_one_log_line_per_verdict_change(
    sidecar: Sidecar,
    zone: Zone,
    unique: Callable[[str], str],
) -> None:
    name = publish(zone, "dns_txt_gone", unique("logged"))
    for _ in range(5):
        assert sidecar.connect(f"{name}:443").status == 502
    lines = [line for line in sidecar.log().splitlines() if f" {name} " in f" {line} "]
    assert len(lines) == 1, lines
    assert f"{name} gone (dns_txt_gone: TXT {name} " in lines[0]
    assert lines[0].rstrip().endswith("ttl 300s")


def test_ops_endpoints(sidecar: Sidecar, zone: Zone, unique: Callable[[str], str]) -> None:
    status, body = sidecar.ops("/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = sidecar.ops("/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    name = publish(zone, "nxdomain", unique("ops"))
    assert sidecar.connect(f"{name}:443").status == 502
    status, body = sidecar.ops(f"/v1/verdicts/{name.upper()}.")
    verdict = json.loads(body)
    assert status == 200
    assert verdict["destination"] == name
    assert verdict["state"] == "gone" and verdict["signal"] == "nxdomain"
    assert verdict["expires_at"] - verdict["observed_at"] == pytest.approx(900)  # SOA minimum
    assert verdict["suppressed_count"] == 1
    status, body = sidecar.ops("/v1/verdicts?state=gone&signal=nxdomain&limit=1000")
    assert status == 200 and name in [v["destination"] for v in json.loads(body)["verdicts"]]
    assert sidecar.ops("/v1/verdicts/not..valid")[0] == 400
    assert sidecar.ops("/v1/verdicts/unknown.test")[0] == 404
    assert sidecar.ops("/nope")[0] == 404
    names = {key[0] for key in sidecar.metrics()}
    for metric in [
        "tombstone_suppressed_total",
        "tombstone_forwarded_total",
        "tombstone_verdicts",
        "tombstone_dns_queries_total",
        "tombstone_dns_query_seconds_count",
        "tombstone_decision_seconds_count",
        "tombstone_blocked_address_total",
        "tombstone_verdict_changes_total",
        "tombstone_build_info",
    ]:
        assert metric in names, metric
    assert sidecar.metric("tombstone_verdicts", state="gone", signal="operator") == 1


def test_shadow_mode_counts_but_forwards(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    live_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    shadow = sidecar_factory("--no-enforce")
    name = unique("shadow")
    zone.add(name, "A", LIVE_IP)
    zone.add(name, "TXT", "v=matrix;gone")
    status, _, body = shadow.https_get(f"{name}:{live_upstream.port}", name, ca.client_context())
    assert status == 200 and body == live_upstream.body
    assert (
        shadow.metric("tombstone_would_suppress_total", signal="dns_txt_gone", stage="connect") == 1
    )
    assert shadow.metric("tombstone_suppressed_total", signal="dns_txt_gone", stage="connect") == 0
    assert "shadow mode" in shadow.log()


def test_allow_list_beats_dns_and_env_and_config_file_configure(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    live_upstream: Upstream,
    dead_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
    tmp_path: object,
) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    allowed, denied_by_file, denied_by_env = unique("allowed"), unique("file"), unique("env")
    publish(zone, "dns_txt_gone", allowed)
    zone.remove(allowed, "A")
    zone.add(allowed, "A", LIVE_IP)
    deny_file = tmp_path / "deny.txt"
    deny_file.write_text(f"# decommissioned peers\n{denied_by_file}.   # trailing dot is fine\n")
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"allow: [{allowed}]\ndeny-file: {deny_file}\nmin_ttl: 1m\n")
    sidecar = sidecar_factory("--config", str(config), env={"TOMBSTONE_DENY": denied_by_env})
    status, _, _ = sidecar.https_get(
        f"{allowed}:{live_upstream.port}", allowed, ca.client_context()
    )
    assert status == 200
    for name in (denied_by_file, denied_by_env):
        reply = sidecar.connect(f"{name}:{dead_upstream.port}")
        assert reply.status == 502 and reply.headers["x-tombstone-signal"] == "operator"
    assert dead_upstream.connections == 0


def test_gone_verdict_is_rechecked_after_its_ttl_without_a_gap(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    live_upstream: Upstream,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """Stale-while-revalidate: the expired verdict keeps suppressing until DNS says otherwise."""
    sidecar = sidecar_factory("--min-ttl", "1s", "--max-ttl", "1s")
    name = publish(zone, "dns_txt_gone", unique("revive"))
    assert sidecar.connect(f"{name}:{dead_upstream.port}").status == 502
    zone.remove(name)  # the operator removes the tombstone and brings the server back
    zone.add(name, "A", LIVE_IP)

    assert wait_until(
        lambda: sidecar.tunnel_opens(f"{name}:{live_upstream.port}"), timeout=10, interval=0.2
    )
    assert dead_upstream.connections == 0
    changes = [line for line in sidecar.log().splitlines() if f"{name} " in line and "INFO" in line]
    assert len(changes) == 2, changes  # gone, then alive again
    assert "alive" in changes[1] and "was gone" in changes[1]
    assert sidecar.metric("tombstone_verdict_changes_total", **{"from": "gone", "to": "alive"}) == 1


def test_plain_http_proxy_request_to_a_gone_host_is_answered_locally(
    sidecar: Sidecar,
    zone: Zone,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    name = publish(zone, "dns_txt_gone", unique("plain"))
    with socket.create_connection(("127.0.0.1", sidecar.proxy_port), timeout=5) as sock:
        sock.sendall(
            f"GET http://{name}:{dead_upstream.port}/_matrix/key/v2/server HTTP/1.1\r\n"
            f"Host: {name}\r\n\r\n".encode()
        )
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 502")
    assert b"X-Tombstone-Signal: dns_txt_gone" in head
    assert dead_upstream.connections == 0


def test_sigterm_exits_cleanly(sidecar_factory: Callable[..., Sidecar]) -> None:
    sidecar = sidecar_factory()
    assert sidecar.stop() == 0


@pytest.mark.parametrize("split", [False, True], ids=["hello-whole", "hello-split"])
def test_the_sni_is_judged_whether_the_clienthello_comes_whole_or_split(
    split: bool,
    sidecar: Sidecar,
    zone: Zone,
    live_upstream: Upstream,
    dead_upstream: Upstream,
    ca: TestCA,
    unique: Callable[[str], str],
) -> None:
    """A whole ClientHello is judged at the layer choice (the tunnel is then relayed as
    plain TCP); one split over two reads is judged once mitmproxy has gathered it. Either
    way a gone SNI behind a live CONNECT target is never dialled and a live one passes."""
    server, live = unique("sni-gone"), unique("sni-live")
    target = f"fed.{server}"
    zone.add(target, "A", DEAD_IP)
    zone.add(server, "TXT", "v=matrix;gone")
    zone.add(server, "A", DEAD_IP)
    zone.add(live, "A", LIVE_IP)
    before = sidecar.metric("tombstone_suppressed_total", signal="dns_txt_gone", stage="tls")

    def get(authority: str, name: str) -> int:
        reply = sidecar.connect(authority)
        assert reply.status == 200 and reply.sock is not None
        client = split_hello_get if split else tls_get
        return client(reply.sock, ca.client_context(), name)

    assert get(f"{target}:{dead_upstream.port}", server) == 0
    assert dead_upstream.connections == 0
    assert (
        sidecar.metric("tombstone_suppressed_total", signal="dns_txt_gone", stage="tls")
        == before + 1
    )
    assert get(f"{live}:{live_upstream.port}", live) == 200
    assert any(r.sni == live for r in live_upstream.requests)  # TLS end to end, untouched


def test_readyz_says_when_the_resolvers_do_not_answer_and_stays_ready(tmp_path: Path) -> None:
    """The judge fails open, so the sidecar stays ready without DNS (an unready container
    would take Synapse's pod out of its Service); `/readyz` says how the resolvers fare."""
    silent = free_port()  # nothing listens there: every query is refused by the kernel
    sidecar = Sidecar(silent, [*BASE_ARGS, "--dns-timeout", "1s"], log_dir=tmp_path).start()
    try:
        status, body = sidecar.ops("/readyz")
        assert status == 200 and json.loads(body)["dns"]["state"] == "unused"
        assert sidecar.connect("unjudged.hs.test:443").status != 200  # no address to dial
        status, body = sidecar.ops("/readyz")
        detail = json.loads(body)
        assert status == 200 and detail["status"] == "ready"
        assert detail["dns"]["state"] == "failing"
        assert detail["dns"]["failures_in_a_row"] >= 1
        assert detail["dns"]["last_answer_seconds_ago"] is None
        verdict = json.loads(sidecar.ops("/v1/verdicts/unjudged.hs.test")[1])
        assert verdict["state"] == "undecided"  # a DNS failure is never evidence
    finally:
        sidecar.stop()


def test_readyz_says_the_resolvers_answer(
    sidecar: Sidecar, zone: Zone, unique: Callable[[str], str]
) -> None:
    name = unique("judged")
    zone.add(name, "A", "127.0.0.1")
    sidecar.connect(f"{name}:443")
    dns = json.loads(sidecar.ops("/readyz")[1])["dns"]
    assert dns["state"] == "answering" and dns["failures_in_a_row"] == 0
    assert 0 <= dns["last_answer_seconds_ago"] < 60
