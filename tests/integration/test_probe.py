"""Pass-through 410 learning: background probes of the well-known and the key endpoint.

Real TLS upstreams answer 410, 200 or refuse; the sidecar (probing on, trusting the test
CA with --upstream-ca) learns an http_410 verdict from the first CONNECT to a name DNS
calls alive, without delaying that CONNECT, and never from an error or a 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.dns.client import DnsClient, Nameserver
from sidecar.judge.ttl import TtlBounds
from sidecar.metrics import Metrics
from sidecar.remote.addresses import AddressPolicy, parse_network
from sidecar.remote.probe import Prober, ProbeResult, ProbeSettings
from tests.integration.conftest import DEAD_IP, LIVE_IP
from tests.support.dns_server import DnsServer, Zone
from tests.support.procs import wait_until
from tests.support.sidecar_process import Sidecar
from tests.support.signing import SigningKey
from tests.support.tls_upstream import Blackhole, Request, Response, TestCA, Upstream

PROBE_IP = "127.0.0.6"


def probing(factory: Callable[..., Sidecar], ca: TestCA, *args: str) -> Sidecar:
    return factory("--probe", "--upstream-ca", str(ca.ca_pem_path), *args)


def verdict(sidecar: Sidecar, name: str) -> dict[str, object]:
    status, body = sidecar.ops(f"/v1/verdicts/{name}")
    return json.loads(body) if status == 200 else {}


def test_a_410_server_is_learned_after_its_first_connect(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar = probing(sidecar_factory, ca)
    name = unique("answers410")
    zone.add(name, "A", DEAD_IP)  # DNS says nothing: only the server itself knows it is gone
    first = sidecar.connect(f"{name}:{dead_upstream.port}")
    assert first.status == 200  # never delayed or refused by the probe
    assert first.sock is not None
    first.sock.close()
    assert wait_until(lambda: verdict(sidecar, name).get("signal") == "http_410", timeout=10)
    learned = verdict(sidecar, name)
    assert learned["state"] == "gone"
    assert f"410 Gone from https://{name}:{dead_upstream.port}/_matrix/key/v2/server" in str(
        learned["evidence"]
    )
    assert float(learned["expires_at"]) - float(learned["observed_at"]) == 86400  # type: ignore[arg-type]
    reached = dead_upstream.connections
    for _ in range(3):
        reply = sidecar.connect(f"{name}:{dead_upstream.port}")
        assert reply.status == 502 and reply.headers["x-tombstone-signal"] == "http_410"
    assert dead_upstream.connections == reached  # nothing after the probe
    assert [r.path for r in dead_upstream.requests] == ["/_matrix/key/v2/server"]
    assert sidecar.metric("tombstone_probes_total", result="gone") == 1
    assert f"{name} gone (http_410: 410 Gone from" in sidecar.log()


@pytest.fixture
def switchable(ca: TestCA) -> Iterator[tuple[Upstream, dict[str, int]]]:
    """A server on :443 whose answer the test changes (410, then back to life)."""
    state = {"status": 410}

    def handler(request: Request) -> Response:
        headers = {"Cache-Control": "max-age=1"} if state["status"] == 410 else {}
        return Response(state["status"], b"{}", {"Content-Type": "application/json", **headers})

    server = Upstream(ca, ["*.hs.test"], host=PROBE_IP, port=443, handler=handler).start()
    yield server, state
    server.stop()


def test_an_expired_410_is_probed_again_and_lifted_when_the_server_is_back(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    switchable: tuple[Upstream, dict[str, int]],
    unique: Callable[[str], str],
) -> None:
    server, state = switchable
    sidecar = probing(
        sidecar_factory,
        ca,
        "--min-gone-ttl",
        "1s",
        "--min-ttl",
        "1s",
        "--max-ttl",
        "1s",
        "--probe-interval",
        "1s",
    )
    name = unique("comeback")
    zone.add(name, "A", PROBE_IP)
    reply = sidecar.connect(f"{name}:443")
    assert reply.status == 200 and reply.sock is not None
    reply.sock.close()
    assert wait_until(lambda: verdict(sidecar, name).get("signal") == "http_410", timeout=10)
    assert "/.well-known/matrix/server (holds 1s)" in str(verdict(sidecar, name)["evidence"])

    assert sidecar.connect(f"{name}:443").status == 502
    state["status"] = 200  # the server is back; requests keep being refused until the
    # expired verdict's re-check (started by the next request) has seen it
    assert wait_until(lambda: sidecar.tunnel_opens(f"{name}:443"), timeout=15, interval=0.3)
    marker = f"INFO sidecar.policy: {name} alive"
    lifted = [line for line in sidecar.log().splitlines() if marker in line]
    assert len(lifted) == 1 and "(was gone: http_410)" in lifted[0]
    assert {r.path for r in server.requests} == {"/.well-known/matrix/server"}
    assert sidecar.metric("tombstone_verdict_changes_total", **{"from": "gone", "to": "alive"}) == 1


def test_forgetting_a_410_verdict_asks_the_server_before_lifting_it(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    switchable: tuple[Upstream, dict[str, int]],
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    server, state = switchable
    token = "forget-410-token-0123456789abcdef"
    (tmp_path / "token").write_text(token)
    sidecar = probing(sidecar_factory, ca, "--ops-token-file", str(tmp_path / "token"))
    name = unique("forget410")
    zone.add(name, "A", PROBE_IP)  # DNS alone would lift it at once
    reply = sidecar.connect(f"{name}:443")
    assert reply.status == 200 and reply.sock is not None
    reply.sock.close()
    assert wait_until(lambda: verdict(sidecar, name).get("signal") == "http_410", timeout=10)

    def forget() -> dict[str, object]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{sidecar.ops_port}/v1/verdicts/{name}", method="DELETE"
        )
        request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            answer: dict[str, object] = json.loads(response.read())
            return answer

    asked = len(server.requests)
    still = forget()  # the server still answers 410: it stays gone
    assert (still["state"], still["signal"]) == ("gone", "http_410")
    assert len(server.requests) > asked
    assert sidecar.connect(f"{name}:443").status == 502

    state["status"] = 200  # back to life: now forgetting lifts it
    back = forget()
    assert back["state"] == "alive"
    assert sidecar.tunnel_opens(f"{name}:443")


def test_404_and_errors_are_not_tombstones(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    sidecar = probing(sidecar_factory, ca)
    live, refusing = unique("answers200"), unique("refuses")
    zone.add(live, "A", LIVE_IP)
    zone.add(refusing, "A", "127.0.0.7")  # nothing listens there
    for name, port in ((live, live_upstream.port), (refusing, 8448)):
        reply = sidecar.connect(f"{name}:{port}")
        if reply.sock is not None:
            reply.sock.close()
    assert wait_until(
        lambda: (
            sidecar.metric("tombstone_probes_total", result="answered") >= 1
            and sidecar.metric("tombstone_probes_total", result="failed") >= 2
        ),
        timeout=15,
    )
    for name in (live, refusing):
        assert verdict(sidecar, name)["state"] == "alive"


# -- where the probe asks: where Synapse would (issue 17, finding 1) ------------------------

WELL_KNOWN_IP = "127.0.0.11"  # every server name's :443 (its well-known only)
API_IP = "127.0.0.12"  # the federation APIs, on their own ports
KEYS_FILE = "signing-keys.json"
PROBE_SETTLE_SECONDS = 1.0  # a loopback probe takes milliseconds


@dataclass
class Federation:
    """A well-known server on :443 and an API server elsewhere, with their requests."""

    well_known: Upstream
    api: Upstream
    on_8448: Upstream
    delegations: dict[str, str]  # server name -> its m.server
    keys: dict[str, SigningKey]  # server name -> its signing key (whoever serves it)

    def seen(self) -> list[tuple[str, int, str]]:
        """(SNI, port, path) of every request any of them answered, in order per server."""
        return [
            (r.sni or "", server.port, r.path)
            for server in (self.well_known, self.api, self.on_8448)
            for r in server.requests
        ]


@pytest.fixture
def federation(ca: TestCA) -> Iterator[Federation]:
    delegations: dict[str, str] = {}
    keys: dict[str, SigningKey] = {}

    def well_known(request: Request) -> Response:
        name = request.headers.get("host", "").rsplit(":", 1)[0]
        if request.path == "/.well-known/matrix/server" and name in delegations:
            body = json.dumps({"m.server": delegations[name]}).encode()
            return Response(200, body, {"Content-Type": "application/json"})
        return Response(404, b'{"errcode": "M_NOT_FOUND"}', {"Content-Type": "application/json"})

    def api(request: Request) -> Response:
        if request.path == "/_matrix/key/v2/server":
            # The key document names the server, wherever it is served (delegation).
            owner = next((n for n, d in delegations.items() if d.startswith(request.sni or "")), "")
            key = keys.get(owner) or keys.get(request.sni or "")
            if key is not None:
                body = json.dumps(key.key_document()).encode()
                return Response(200, body, {"Content-Type": "application/json"})
        return Response(200, b'{"server": {"name": "fake"}}', {"Content-Type": "application/json"})

    servers = (
        Upstream(ca, ["*.hs.test"], host=WELL_KNOWN_IP, port=443, handler=well_known).start(),
        Upstream(ca, ["*.hs.test"], host=API_IP, handler=api).start(),
        Upstream(ca, ["*.hs.test"], host=WELL_KNOWN_IP, port=8448, handler=api).start(),
    )
    yield Federation(*servers, delegations, keys)
    for server in servers:
        server.stop()


def recorded_keys(sidecar: Sidecar) -> dict[str, dict[str, object]]:
    path = sidecar.state_dir / KEYS_FILE
    if not path.exists():
        return {}
    records = json.loads(path.read_text())["records"]
    return {r["server_name"]: r for r in records}


def test_a_delegated_server_is_probed_where_its_well_known_points(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    federation: Federation,
    unique: Callable[[str], str],
) -> None:
    """Synapse's first CONNECT for a name is its well-known (name:443); the probe follows
    the delegation like Synapse: one key request at the delegated host:port (a 410 there
    is a tombstone; a 200 is the key record), with that host as SNI, and nothing but the
    well-known on :443."""
    sidecar = probing(sidecar_factory, ca)
    name, api_host = unique("delegates"), unique("api")
    port = federation.api.port
    federation.delegations[name] = f"{api_host}:{port}"
    federation.keys[name] = SigningKey(name)
    zone.add(name, "A", WELL_KNOWN_IP)
    zone.add(api_host, "A", API_IP)
    assert sidecar.tunnel_opens(f"{name}:443")
    assert wait_until(lambda: name in recorded_keys(sidecar), timeout=15), federation.seen()
    assert recorded_keys(sidecar)[name]["target"] == [api_host, port]
    assert recorded_keys(sidecar)[name]["sni"] == api_host  # for the re-fetch at a lift
    # Synapse then connects to the delegated host: a route already known, not probed again.
    assert sidecar.tunnel_opens(f"{api_host}:{port}")
    time.sleep(PROBE_SETTLE_SECONDS)  # a probe it started would have asked by now
    assert federation.seen() == [
        (name, 443, "/.well-known/matrix/server"),
        (api_host, port, "/_matrix/key/v2/server"),
    ]
    assert verdict(sidecar, name)["state"] == "alive"


@pytest.mark.parametrize("how", ["8448", "srv"])
def test_a_server_without_delegation_is_probed_on_8448_or_its_srv_target(
    how: str,
    sidecar_factory: Callable[..., Sidecar],
    dns_server: DnsServer,
    zone: Zone,
    ca: TestCA,
    federation: Federation,
    unique: Callable[[str], str],
) -> None:
    """No m.server (a 404 well-known): SRV `_matrix-fed._tcp`, else port 8448 of the name."""
    sidecar = probing(sidecar_factory, ca)
    name = unique(f"plain-{how}")
    federation.keys[name] = SigningKey(name)
    zone.add(name, "A", WELL_KNOWN_IP)
    if how == "srv":
        target_host, port = unique("srv-target"), federation.api.port
        zone.add(target_host, "A", API_IP)
        zone.add(f"_matrix-fed._tcp.{name}", "SRV", f"10 0 {port} {target_host}")
    else:
        target_host, port = name, 8448
    assert sidecar.tunnel_opens(f"{name}:443")
    assert wait_until(lambda: name in recorded_keys(sidecar), timeout=15), federation.seen()
    assert recorded_keys(sidecar)[name]["target"] == [target_host, port]
    assert federation.seen() == [
        (name, 443, "/.well-known/matrix/server"),
        (name, port, "/_matrix/key/v2/server"),  # SNI: the name, as Synapse sends it
    ]
    # The SRV pair the judgment asked a moment before is not asked again by the probe.
    for prefix in ("_matrix-fed._tcp", "_matrix._tcp"):
        assert dns_server.query_count(f"{prefix}.{name}", "SRV") == 1


def test_a_name_first_seen_on_its_federation_port_is_probed_there(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    federation: Federation,
    unique: Callable[[str], str],
) -> None:
    """A CONNECT to another port than 443 is Synapse's federation traffic (it resolved the
    name already, or the name has an explicit port): the probe asks the name's well-known
    for a 410, and the key request there, where Synapse goes, not on :443."""
    sidecar = probing(sidecar_factory, ca)
    name = unique("explicit")
    federation.keys[name] = SigningKey(name)
    zone.add(name, "A", WELL_KNOWN_IP)
    assert sidecar.tunnel_opens(f"{name}:8448")
    assert wait_until(lambda: name in recorded_keys(sidecar), timeout=15), federation.seen()
    assert federation.seen() == [
        (name, 443, "/.well-known/matrix/server"),
        (name, 8448, "/_matrix/key/v2/server"),
    ]


def test_a_route_into_a_gone_host_is_not_asked(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    federation: Federation,
    unique: Callable[[str], str],
) -> None:
    """A live name delegating to a host judged gone (here: on the deny list): the proxy
    would never dial that host, and neither does the probe."""
    name, api_host = unique("to-gone"), unique("gone-api")
    sidecar = probing(sidecar_factory, ca, "--deny", api_host)
    federation.delegations[name] = f"{api_host}:{federation.api.port}"
    zone.add(name, "A", WELL_KNOWN_IP)
    zone.add(api_host, "A", API_IP)
    assert sidecar.tunnel_opens(f"{name}:443")
    assert wait_until(lambda: sidecar.metric("tombstone_probes_total", result="failed") >= 1)
    assert sidecar.metric("tombstone_probes_total", result="answered") == 1  # the well-known
    assert federation.seen() == [(name, 443, "/.well-known/matrix/server")]
    assert federation.api.connections == 0
    assert verdict(sidecar, name)["state"] == "alive"  # not asked is no evidence


@contextlib.asynccontextmanager
async def real_prober(
    dns_server: DnsServer,
    ca: TestCA,
    allowed: str,
    *,
    probe_timeout: float = 5.0,
    concurrency: int = 4,
    gone: Callable[[str], bool] | None = None,
) -> AsyncIterator[Prober]:
    """A real Prober on the real test DNS server, trusting the test CA, allowed to dial
    only `allowed` (a network); closed with its DNS client afterwards."""
    dns = DnsClient((Nameserver("127.0.0.1", dns_server.port),), 2.0, Metrics())

    async def resolve(host: str) -> tuple[str, ...]:
        answer = await dns.query(host, "A")
        return tuple(str(r) for r in answer.records)

    settings = ProbeSettings(
        probe_timeout, concurrency, 60.0, TtlBounds(60, 86400), str(ca.ca_pem_path)
    )
    policy = AddressPolicy.default((parse_network(allowed),))
    prober = Prober(settings, Metrics(), policy, resolve, dns=dns, gone=gone)
    try:
        yield prober
    finally:
        await prober.close()
        dns.close()


def test_discovery_never_dials_what_the_address_policy_refuses(
    dns_server: DnsServer,
    zone: Zone,
    ca: TestCA,
    federation: Federation,
    unique: Callable[[str], str],
) -> None:
    """A well-known that delegates into a blocked range: the probe asks nothing there
    (a real Prober on the real DNS server, allowed to dial the well-known's address only)."""
    name, inside = unique("points-inside"), unique("inside")
    federation.delegations[name] = f"{inside}:{federation.api.port}"
    zone.add(name, "A", WELL_KNOWN_IP)
    zone.add(inside, "A", API_IP)

    async def run() -> ProbeResult:
        async with real_prober(dns_server, ca, f"{WELL_KNOWN_IP}/32") as prober:
            return await prober.probe(name)

    before = federation.api.connections
    result = asyncio.run(run())
    assert result.outcome == "answered"  # the well-known's 200: not a tombstone
    assert result.route is None  # its API was not asked: no keys to fetch there either
    assert federation.api.connections == before
    assert federation.seen() == [(name, 443, "/.well-known/matrix/server")]


def test_a_queued_probe_of_a_name_judged_gone_meanwhile_asks_nothing(
    dns_server: DnsServer,
    zone: Zone,
    ca: TestCA,
    dead_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """A join queues hundreds of first-sight probes; by its turn a name may be gone already
    (intercept mode learns a 410 from Synapse's own request). A real Prober with one slot,
    held by a probe of a server that never answers: the queued probe of the name judged
    gone meanwhile dials nothing."""
    slow, gone = unique("never-answers"), unique("gone-meanwhile")
    judged_gone: set[str] = set()

    async def run() -> ProbeResult:
        results: dict[str, ProbeResult] = {}
        both = asyncio.Event()

        def done(name: str, result: ProbeResult) -> None:
            results[name] = result
            if len(results) == 2:
                both.set()

        async with real_prober(
            dns_server,
            ca,
            "127.0.0.0/8",
            probe_timeout=1.0,
            concurrency=1,
            gone=judged_gone.__contains__,
        ) as prober:
            with Blackhole(host=PROBE_IP) as hole:
                zone.add(slow, "A", PROBE_IP)
                prober.schedule(slow, (slow, hole.port), done)
                prober.schedule(gone, (gone, dead_upstream.port), done)
                # the first holds the only slot once it has connected; the second waits
                assert await asyncio.to_thread(wait_until, lambda: hole.connections >= 1, 5)
                judged_gone.add(gone)
                await asyncio.wait_for(both.wait(), 10)
            return results[gone]

    zone.add(gone, "A", DEAD_IP)
    result = asyncio.run(run())
    assert result.outcome == "failed" and "judged gone while the probe waited" in result.detail
    assert dead_upstream.connections == 0


def test_intercept_mode_sends_no_first_sight_probe(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    live_upstream: Upstream,
    unique: Callable[[str], str],
) -> None:
    """Intercept mode reads Synapse's own responses: a live name's first CONNECT and request
    reach the server, and nothing else does (no well-known or key request of ours)."""
    sidecar = probing(sidecar_factory, ca, "--mode", "intercept")
    name = unique("intercepted")
    zone.add(name, "A", LIVE_IP)
    trust = ssl.create_default_context(
        cafile=str(sidecar.state_dir / "ca" / "mitmproxy-ca-cert.pem")
    )
    before = len(live_upstream.requests)
    status, _, _ = sidecar.https_get(f"{name}:{live_upstream.port}", name, trust, "/_matrix/x")
    assert status == 200
    time.sleep(1.0)  # a probe would be under way by now: it is scheduled at the CONNECT
    seen = [r.path for r in live_upstream.requests[before:] if r.sni == name]
    assert seen == ["/_matrix/x"]
    assert sidecar.metric("tombstone_probes_total", result="answered") == 0
