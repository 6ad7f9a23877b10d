"""Resurrection alerts: a gone server that comes back is compared with the keys it had alive.

A real sidecar (pass-through, probing on, trusting the test CA) and a fake remote
homeserver on a real TLS port that serves a self-signed `/_matrix/key/v2/server` with
real ed25519 keys (tests.support.signing.SigningKey) and can re-key. The life of a name:
alive (its keys are recorded next to the first probe), tombstoned in DNS (suppressed),
re-keyed or not, tombstone removed, lifted — and then alerted on, held, released.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.dns_server import Zone
from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer
from tests.support.sidecar_process import Sidecar
from tests.support.signing import SigningKey
from tests.support.tls_upstream import Request, Response, TestCA, Upstream

REMOTE_IP = "127.0.0.9"
TOKEN = "resurrection-token-0123456789abcdef"
KEY_PATH = "/_matrix/key/v2/server"


@dataclass
class Remote:
    """The fake homeserver; `keys[name]` is what it signs and serves for `name` now."""

    upstream: Upstream
    keys: dict[str, SigningKey]

    def key_fetches(self, name: str) -> int:
        requests = self.upstream.requests
        return sum(1 for r in requests if r.path == KEY_PATH and r.headers["host"].startswith(name))


@pytest.fixture
def remote(ca: TestCA) -> Iterator[Remote]:
    keys: dict[str, SigningKey] = {}

    def handler(request: Request) -> Response:
        name = request.headers.get("host", "").rsplit(":", 1)[0]
        if request.path == KEY_PATH and name in keys:
            body = json.dumps(keys[name].key_document()).encode()
            return Response(200, body, {"Content-Type": "application/json"})
        return Response(200, b'{"server": {"name": "fake"}}', {"Content-Type": "application/json"})

    upstream = Upstream(ca, ["*.hs.test"], host=REMOTE_IP, handler=handler).start()
    yield Remote(upstream, keys)
    upstream.stop()


@pytest.fixture
def ops_token(tmp_path: Path) -> Path:
    path = tmp_path / "ops-token"
    path.write_text(TOKEN + "\n")
    return path


def ops(sidecar: Sidecar, method: str, path: str) -> tuple[int, dict[str, object]]:
    req = urllib.request.Request(f"http://127.0.0.1:{sidecar.ops_port}{path}", method=method)
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def start(factory: Callable[..., Sidecar], ca: TestCA, token: Path, *args: str) -> Sidecar:
    return factory(
        "--probe",
        "--upstream-ca",
        str(ca.ca_pem_path),
        "--ops-token-file",
        str(token),
        "--min-ttl",
        "1s",
        "--max-ttl",
        "1s",
        *args,
    )


def live_then_gone(sidecar: Sidecar, zone: Zone, remote: Remote, name: str) -> str:
    """`name` alive (keys recorded), then tombstoned in DNS and suppressed; its target."""
    target = f"{name}:{remote.upstream.port}"
    remote.keys[name] = SigningKey(name)
    zone.add(name, "A", REMOTE_IP, ttl=1)
    assert sidecar.tunnel_opens(target)
    assert wait_until(lambda: remote.key_fetches(name) == 1, timeout=10)
    zone.add(name, "TXT", "v=matrix;gone", ttl=1)
    assert wait_until(lambda: sidecar.connect(target).status == 502, timeout=15, interval=0.3)
    return target


def untombstone(zone: Zone, name: str) -> None:
    zone.remove(name, "TXT")


def resurrections(sidecar: Sidecar) -> dict[str, object]:
    status, body = sidecar.ops("/v1/resurrections")
    assert status == 200, body
    result = json.loads(body)
    assert isinstance(result, dict)
    return result


def test_a_rekeyed_server_is_a_resurrection_and_held_until_an_operator_lifts_it(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    remote: Remote,
    ops_token: Path,
    unique: Callable[[str], str],
) -> None:
    sidecar = start(sidecar_factory, ca, ops_token, "--hold-reborn")
    name = unique("reborn")
    target = live_then_gone(sidecar, zone, remote, name)
    sidecar.restart()  # the keys recorded while alive must survive a restart
    remote.keys[name] = SigningKey(name)  # a new owner, a new key
    untombstone(zone, name)

    def lifted_or_held() -> bool:
        sidecar.tunnel_opens(target)  # traffic starts the re-check of the expired verdict
        return resurrections(sidecar)["total"] == 1

    assert wait_until(lifted_or_held, timeout=15, interval=0.3)
    event = resurrections(sidecar)["resurrections"][0]  # type: ignore[index]
    assert event["destination"] == name and event["key_changed"] == "true" and event["held"]
    assert resurrections(sidecar)["held"] == [name]
    assert sidecar.metric("tombstone_resurrections_total", key_changed="true") == 1
    alerts = [
        line
        for line in sidecar.log().splitlines()
        if f"RESURRECTION WITH A NEW IDENTITY: {name}" in line
    ]
    assert len(alerts) == 1 and "WARNING" in alerts[0] and "--hold-reborn" in alerts[0]
    held = sidecar.connect(target)
    assert held.status == 502 and held.headers["x-tombstone-signal"] == "operator"
    assert "back with new signing keys" in str(held.json()["error"])

    status, lifted = ops(sidecar, "DELETE", f"/v1/verdicts/{name}")
    assert status == 200 and lifted["state"] == "alive", lifted
    assert sidecar.tunnel_opens(target)
    assert resurrections(sidecar)["held"] == []
    assert sidecar.metric("tombstone_resurrections_total", key_changed="true") == 1
    assert f"{name} released by an operator" in sidecar.log()


def test_a_server_back_with_its_own_keys_is_lifted_and_counted_as_the_same(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    remote: Remote,
    ops_token: Path,
    unique: Callable[[str], str],
) -> None:
    sidecar = start(sidecar_factory, ca, ops_token, "--hold-reborn")
    name = unique("sameagain")
    target = live_then_gone(sidecar, zone, remote, name)
    untombstone(zone, name)

    assert wait_until(lambda: sidecar.tunnel_opens(target), timeout=15, interval=0.3)
    assert resurrections(sidecar)["resurrections"][0]["key_changed"] == "false"  # type: ignore[index]
    assert resurrections(sidecar)["held"] == []
    assert sidecar.metric("tombstone_resurrections_total", key_changed="false") == 1
    assert sidecar.metric("tombstone_resurrections_total", key_changed="true") == 0
    assert "RESURRECTION" not in sidecar.log()


def test_without_hold_a_rekeyed_server_is_alerted_on_and_let_through(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    remote: Remote,
    ops_token: Path,
    unique: Callable[[str], str],
) -> None:
    sidecar = start(sidecar_factory, ca, ops_token)
    name = unique("rekeyed")
    target = live_then_gone(sidecar, zone, remote, name)
    remote.keys[name] = SigningKey(name)
    untombstone(zone, name)

    assert wait_until(lambda: sidecar.tunnel_opens(target), timeout=15, interval=0.3)
    event = resurrections(sidecar)["resurrections"][0]  # type: ignore[index]
    assert event["key_changed"] == "true" and not event["held"]
    assert sidecar.metric("tombstone_resurrections_total", key_changed="true") == 1
    assert "Not held (no --hold-reborn)" in sidecar.log()


def test_intercept_mode_records_the_keys_synapse_fetched_and_catches_the_rekey(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    remote: Remote,
    ops_token: Path,
    unique: Callable[[str], str],
) -> None:
    """No probes: the keys are the ones the homeserver itself fetched through the sidecar."""
    sidecar = sidecar_factory(
        "--mode",
        "intercept",
        "--upstream-ca",
        str(ca.ca_pem_path),
        "--ops-token-file",
        str(ops_token),
        "--min-ttl",
        "1s",
        "--max-ttl",
        "1s",
        "--hold-reborn",
    )
    trust = ssl.create_default_context(
        cafile=str(sidecar.state_dir / "ca" / "mitmproxy-ca-cert.pem")
    )
    name = unique("intercepted")
    target = f"{name}:{remote.upstream.port}"
    remote.keys[name] = SigningKey(name)
    zone.add(name, "A", REMOTE_IP, ttl=1)

    def key_request() -> int:
        status, _, _ = sidecar.https_get(target, name, trust, KEY_PATH)
        return status

    assert key_request() == 200  # what Synapse does before it verifies the server's events
    zone.add(name, "TXT", "v=matrix;gone", ttl=1)
    assert wait_until(lambda: key_request() != 200, timeout=15, interval=0.3)
    remote.keys[name] = SigningKey(name)
    untombstone(zone, name)

    def held() -> bool:
        key_request()
        return resurrections(sidecar)["total"] == 1

    assert wait_until(held, timeout=15, interval=0.3)
    event = resurrections(sidecar)["resurrections"][0]  # type: ignore[index]
    assert event["key_changed"] == "true" and event["held"]
    assert key_request() != 200
    checks = [
        r
        for r in remote.upstream.requests
        if r.headers.get("user-agent") == "tombstone-sidecar-keys"
    ]
    assert len(checks) == 1  # the lift's own check; every other fetch was the client's


def test_replicas_share_recorded_keys_and_holds_through_redis(
    sidecar_factory: Callable[..., Sidecar],
    zone: Zone,
    ca: TestCA,
    remote: Remote,
    ops_token: Path,
    unique: Callable[[str], str],
) -> None:
    """Two replicas on one Redis (the central egress): the one that saw the server alive
    recorded its keys; the other one sees it come back re-keyed, holds it for both, and
    an operator's DELETE on either replica releases it for both."""
    redis = RedisServer().start()
    try:
        store = ("--store", redis.url, "--hold-reborn")
        witness = start(sidecar_factory, ca, ops_token, *store)
        other = start(sidecar_factory, ca, ops_token, *store)
        name = unique("replicated")
        target = live_then_gone(witness, zone, remote, name)  # keys recorded by `witness` only
        assert wait_until(lambda: other.connect(target).status == 502, timeout=15, interval=0.3)
        remote.keys[name] = SigningKey(name)  # a new owner, a new key
        untombstone(zone, name)

        def held_by_other() -> bool:
            other.tunnel_opens(target)  # only `other` sees traffic for it
            return resurrections(other)["total"] == 1

        assert wait_until(held_by_other, timeout=15, interval=0.3)
        event = resurrections(other)["resurrections"][0]  # type: ignore[index]
        assert event["key_changed"] == "true" and event["held"], event
        assert resurrections(witness)["total"] == 0  # the alert is the lifting replica's

        def refused_by(sidecar: Sidecar) -> bool:
            reply = sidecar.connect(target)
            return reply.status == 502 and reply.headers.get("x-tombstone-signal") == "operator"

        assert wait_until(lambda: refused_by(witness), timeout=10, interval=0.2)  # shared hold

        status, lifted = ops(witness, "DELETE", f"/v1/verdicts/{name}")  # not the holder
        assert status == 200 and lifted["state"] == "alive", lifted
        assert wait_until(lambda: other.tunnel_opens(target), timeout=10, interval=0.2)
        assert witness.tunnel_opens(target)
        assert wait_until(lambda: resurrections(other)["held"] == [], timeout=10)
        assert (
            sum(
                s.metric("tombstone_resurrections_total", key_changed="true")
                for s in (witness, other)
            )
            == 1
        )
    finally:
        redis.stop()
