"""Pass-through 410 learning: background probes of well-known and version endpoints.

Real TLS upstreams answer 410, 200 or refuse; the sidecar (probing on, trusting the test
CA with --upstream-ca) learns an http_410 verdict from the first CONNECT to a name DNS
calls alive, without delaying that CONNECT, and never from an error or a 404.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import DEAD_IP, LIVE_IP
from tests.support.dns_server import Zone
from tests.support.procs import wait_until
from tests.support.sidecar_process import Sidecar
from tests.support.tls_upstream import Request, Response, TestCA, Upstream

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
    assert (
        f"410 Gone from https://{name}:{dead_upstream.port}/_matrix/federation/v1/version"
        in str(learned["evidence"])
    )
    assert float(learned["expires_at"]) - float(learned["observed_at"]) == 86400  # type: ignore[arg-type]
    reached = dead_upstream.connections
    for _ in range(3):
        reply = sidecar.connect(f"{name}:{dead_upstream.port}")
        assert reply.status == 502 and reply.headers["x-tombstone-signal"] == "http_410"
    assert dead_upstream.connections == reached  # nothing after the probe
    assert [r.path for r in dead_upstream.requests] == ["/_matrix/federation/v1/version"]
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
