"""Intercept mode judges the servers a send_join answer names, in the background (issue 17).

A real sidecar process intercepting, a resident server (TLS upstream) answering send_join
with a body naming the room's servers, and the test DNS server holding tombstones for some
of them: the answer reaches the client unchanged and at once, then every named server gets
its verdict without any request for it, each with one set of DNS questions."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.judge.room_servers import MAX_ROOM_SERVERS
from tests.integration.test_intercept import Tunnel
from tests.support.dns_server import DnsServer, Zone
from tests.support.procs import wait_until
from tests.support.sidecar_process import Sidecar
from tests.support.tls_upstream import Request, Response, TestCA, Upstream

HUB_IP = "127.0.0.9"
QUESTIONS_PER_NAME = 5  # TXT, two SRV, A, AAAA: one cold decision (sidecar/dns/questions.py)
ORIGIN = "hs.example"  # the joining server, as the X-Matrix origin names it
SEND_JOIN = "/_matrix/federation/v2/send_join/!room%3Ahub.test/$join?omit_members=true"


class Room:
    """What the resident server answers to send_join: the servers it is told to name."""

    def __init__(self) -> None:
        self.servers: list[str] = []
        self.answers: list[bytes] = []
        self.garbage: bytes | None = None  # answer this instead of a send_join body
        self.padding = 0  # bytes of padding in the answer's event (a large answer)

    def handler(self, request: Request) -> Response:
        if "/send_join/" not in request.path:
            return Response(404, b'{"errcode":"M_NOT_FOUND"}')
        if self.garbage is not None:
            self.answers.append(self.garbage)
            return Response(200, self.garbage, {"Content-Type": "application/json"})
        members = [
            {
                "type": "m.room.member",
                "state_key": f"@user:{name}",
                "sender": f"@user:{name}",
                "content": {"membership": "join"},
            }
            for name in self.servers[: len(self.servers) // 2]
        ]
        body = json.dumps(
            {
                "origin": "hub",
                "members_omitted": True,
                "servers_in_room": self.servers,
                "state": members,
                "auth_chain": [],
                "event": {
                    "type": "m.room.member",
                    "sender": f"@me:{ORIGIN}",
                    "unsigned": {"padding": "x" * self.padding},
                },
            }
        ).encode()
        self.answers.append(body)
        return Response(200, body, {"Content-Type": "application/json"})


@pytest.fixture
def room() -> Room:
    return Room()


@pytest.fixture
def hub(ca: TestCA, room: Room) -> Iterator[Upstream]:
    server = Upstream(ca, ["*.hs.test"], host=HUB_IP, handler=room.handler).start()
    yield server
    server.stop()


def intercept(
    sidecar_factory: Callable[..., Sidecar], ca: TestCA, *args: str
) -> tuple[Sidecar, ssl.SSLContext]:
    sidecar = sidecar_factory("--mode", "intercept", "--upstream-ca", str(ca.ca_pem_path), *args)
    trust = ssl.create_default_context(cafile=str(sidecar.state_dir / "ca/mitmproxy-ca-cert.pem"))
    return sidecar, trust


def send_join(sidecar: Sidecar, trust: ssl.SSLContext, hub_name: str, port: int) -> bytes:
    tunnel = Tunnel(sidecar, f"{hub_name}:{port}", hub_name, trust)
    try:
        status, _, body = tunnel.request(SEND_JOIN, hub_name, "PUT", b"{}")
    finally:
        tunnel.close()
    assert status == 200
    return body


def verdict(sidecar: Sidecar, name: str) -> str | None:
    status, body = sidecar.ops(f"/v1/verdicts/{name}")
    return str(json.loads(body)["state"]) if status == 200 else None


def test_the_servers_of_a_joined_room_get_verdicts_without_a_request(
    sidecar_factory: Callable[..., Sidecar],
    ca: TestCA,
    zone: Zone,
    dns_server: DnsServer,
    hub: Upstream,
    room: Room,
    unique: Callable[[str], str],
) -> None:
    sidecar, trust = intercept(sidecar_factory, ca)
    hub_name = unique("hub")
    zone.add(hub_name, "A", HUB_IP)
    txt_gone = [unique("txtgone") for _ in range(5)]
    nxdomain = [unique("nxgone") for _ in range(5)]  # not in the zone: NXDOMAIN
    alive = [unique("alive") for _ in range(30)]
    for name in txt_gone:
        zone.add(name, "A", "127.0.0.3")
        zone.add(name, "TXT", "v=matrix;gone")
    for name in alive:
        zone.add(name, "A", "127.0.0.2")
    room.servers = [hub_name, *alive[:15], *txt_gone, *nxdomain, *alive[15:], "bad name", ORIGIN]
    named = [*txt_gone, *nxdomain, *alive]

    body = send_join(sidecar, trust, hub_name, hub.port)

    assert body == room.answers[0]  # byte for byte, as the resident server sent it
    assert wait_until(lambda: all(verdict(sidecar, n) is not None for n in named), timeout=20)
    assert {n: verdict(sidecar, n) for n in named} == {
        **dict.fromkeys(txt_gone, "gone"),
        **dict.fromkeys(nxdomain, "gone"),
        **dict.fromkeys(alive, "alive"),
    }
    assert [r.path for r in hub.requests] == [SEND_JOIN]  # no request for any named server
    asked = {
        name: sum(
            dns_server.query_count(q)
            for q in (name, f"_matrix-fed._tcp.{name}", f"_matrix._tcp.{name}")
        )
        for name in named
    }
    assert asked == dict.fromkeys(named, QUESTIONS_PER_NAME)  # one set of questions each
    assert dns_server.query_count(ORIGIN) == 0  # the joining server itself is not judged
    metrics = {
        result: sidecar.metric("tombstone_prejudge_names_total", result=result)
        for result in ("taken", "judged", "cached", "invalid")
    }
    assert metrics == {"taken": 40, "judged": 40, "cached": 0, "invalid": 1}
    assert sidecar.metric("tombstone_prejudge_rooms_total", result="read") == 1
    lines = [line for line in sidecar.log().splitlines() if "servers of room" in line]
    assert (
        len(lines) == 1
        and "judging 40 servers of room !room:hub.test in the background" in (lines[0])
    )


def test_an_answer_larger_than_what_run_buffers_is_read_as_it_streams_through(
    sidecar_factory: Callable[..., Sidecar],
    ca: TestCA,
    zone: Zone,
    hub: Upstream,
    room: Room,
    unique: Callable[[str], str],
) -> None:
    """`run` streams intercepted bodies over 1 MB; a full-state answer for a large room is
    larger. It passes unchanged, and its servers are still judged."""
    sidecar, trust = intercept(sidecar_factory, ca)
    hub_name = unique("hub")
    zone.add(hub_name, "A", HUB_IP)
    room.servers = [unique("alive") for _ in range(20)]
    for name in room.servers:
        zone.add(name, "A", "127.0.0.2")
    room.padding = 3 * 1024 * 1024
    assert send_join(sidecar, trust, hub_name, hub.port) == room.answers[0]
    assert len(room.answers[0]) > 3 * 1024 * 1024
    assert wait_until(lambda: all(verdict(sidecar, n) == "alive" for n in room.servers))
    assert sidecar.metric("tombstone_prejudge_names_total", result="judged") == 20


def test_a_live_request_and_the_background_judge_one_name_once(
    sidecar_factory: Callable[..., Sidecar],
    ca: TestCA,
    zone: Zone,
    dns_server: DnsServer,
    hub: Upstream,
    room: Room,
    unique: Callable[[str], str],
) -> None:
    """DNS is slow (0.5 s an answer): the send_join answer still comes at once, and a
    request for a named server while the background judges it shares that decision."""
    sidecar, trust = intercept(sidecar_factory, ca)
    hub_name = unique("hub")
    zone.add(hub_name, "A", HUB_IP)
    gone = unique("txtgone")
    zone.add(gone, "TXT", "v=matrix;gone")
    others = [unique("alive") for _ in range(10)]
    for name in others:
        zone.add(name, "A", "127.0.0.2")
    room.servers = [gone, *others]
    tunnel = Tunnel(sidecar, f"{hub_name}:{hub.port}", hub_name, trust)
    try:
        assert tunnel.request("/_matrix/federation/v1/version", hub_name)[0] == 404  # judged
        zone.delay(0.5)
        began = time.monotonic()
        status, _, body = tunnel.request(SEND_JOIN, hub_name, "PUT", b"{}")
        took = time.monotonic() - began
        assert (status, body) == (200, room.answers[0])
        assert took < 0.5  # not held up by the judging it set off
        status, headers, _ = tunnel.request("/_matrix/federation/v1/query/profile", gone)
        assert status == 410 and headers["x-tombstone-signal"] == "dns_txt_gone"
    finally:
        tunnel.close()
        zone.delay(0)
    assert wait_until(lambda: all(verdict(sidecar, n) == "alive" for n in others), timeout=20)
    assert dns_server.query_count(gone, "TXT") == 1  # one decision for both askers
    assert [r.path for r in hub.requests] == ["/_matrix/federation/v1/version", SEND_JOIN]


def test_no_more_than_the_cap_of_names_is_taken_from_one_answer(
    sidecar_factory: Callable[..., Sidecar],
    ca: TestCA,
    zone: Zone,
    dns_server: DnsServer,
    hub: Upstream,
    room: Room,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """A room naming more servers than MAX_ROOM_SERVERS: the first ones are taken, the rest
    never asked about. (Most of the first ones are on the deny list, so that the test asks
    DNS about a few names, not ten thousand.)"""
    listed = [f"listed-{i}.deny.test" for i in range(MAX_ROOM_SERVERS - 10)]
    deny_file = tmp_path / "deny.txt"
    deny_file.write_text("\n".join(listed) + "\n")
    sidecar, trust = intercept(sidecar_factory, ca, "--deny-file", str(deny_file))
    hub_name = unique("hub")
    zone.add(hub_name, "A", HUB_IP)
    within = [unique("within") for _ in range(10)]
    beyond = [unique("beyond") for _ in range(50)]
    room.servers = [*listed[:5000], *within, *listed[5000:], *beyond]

    assert send_join(sidecar, trust, hub_name, hub.port) == room.answers[0]

    assert wait_until(lambda: all(verdict(sidecar, n) is not None for n in within), timeout=20)
    assert wait_until(
        lambda: sidecar.metric("tombstone_prejudge_names_total", result="judged") == 10
    )
    assert sidecar.metric("tombstone_prejudge_names_total", result="taken") == MAX_ROOM_SERVERS
    assert sidecar.metric("tombstone_prejudge_names_total", result="cached") == len(listed)
    assert sidecar.metric("tombstone_prejudge_rooms_total", result="capped") == 1
    assert all(verdict(sidecar, n) is None for n in beyond)
    assert sum(dns_server.query_count(n) for n in beyond) == 0
    assert "judging 10000 servers of room" in sidecar.log()


def test_no_prejudge_room_judges_nothing_in_the_background(
    sidecar_factory: Callable[..., Sidecar],
    ca: TestCA,
    zone: Zone,
    dns_server: DnsServer,
    hub: Upstream,
    room: Room,
    unique: Callable[[str], str],
) -> None:
    sidecar, trust = intercept(sidecar_factory, ca, "--no-prejudge-room")
    hub_name = unique("hub")
    zone.add(hub_name, "A", HUB_IP)
    room.servers = [unique("alive") for _ in range(5)]
    for name in room.servers:
        zone.add(name, "A", "127.0.0.2")
    assert send_join(sidecar, trust, hub_name, hub.port) == room.answers[0]
    time.sleep(1.0)  # time enough for a background judge to have asked (it asks in ms)
    assert sum(dns_server.query_count(n) for n in room.servers) == 0
    assert sidecar.metric("tombstone_prejudge_names_total", result="taken") == 0


def test_an_answer_that_is_not_a_send_join_body_passes_and_is_counted(
    sidecar_factory: Callable[..., Sidecar],
    ca: TestCA,
    zone: Zone,
    hub: Upstream,
    room: Room,
    unique: Callable[[str], str],
) -> None:
    sidecar, trust = intercept(sidecar_factory, ca)
    hub_name = unique("hub")
    zone.add(hub_name, "A", HUB_IP)
    room.garbage = b'{"servers_in_room": ["a.test", ' + b"\x00\n" * 1000
    assert send_join(sidecar, trust, hub_name, hub.port) == room.garbage  # as it was sent
    assert wait_until(
        lambda: sidecar.metric("tombstone_prejudge_rooms_total", result="unreadable") == 1
    )
    assert "not judging the servers of room !room:hub.test: " in sidecar.log()
    assert "Traceback" not in sidecar.log()


def test_a_live_decision_does_not_queue_behind_a_rooms_names(
    sidecar_factory: Callable[..., Sidecar],
    ca: TestCA,
    zone: Zone,
    hub: Upstream,
    room: Room,
    unique: Callable[[str], str],
) -> None:
    """64 names whose DNS never answers (2 s each, --dns-timeout 2s): the background needs
    8 s for them, 16 at a time; a request for another new name meanwhile is decided in one
    cold decision of its own."""
    sidecar, trust = intercept(sidecar_factory, ca)
    hub_name = unique("hub")
    zone.add(hub_name, "A", HUB_IP)
    room.servers = [unique("silent") for _ in range(64)]
    for name in room.servers:
        zone.blackhole(name)
    fresh = unique("txtgone")
    zone.add(fresh, "TXT", "v=matrix;gone")
    tunnel = Tunnel(sidecar, f"{hub_name}:{hub.port}", hub_name, trust)
    try:
        assert tunnel.request(SEND_JOIN, hub_name, "PUT", b"{}")[0] == 200
        assert wait_until(lambda: "judging 64 servers of room" in sidecar.log(), timeout=5)
        began = time.monotonic()
        status, headers, _ = tunnel.request("/_matrix/federation/v1/query/profile", fresh)
        took = time.monotonic() - began
    finally:
        tunnel.close()
    assert status == 410 and headers["x-tombstone-signal"] == "dns_txt_gone"
    assert took < 1.0, took  # not behind the 8 s of background work
    assert sidecar.metric("tombstone_prejudge_names_total", result="judged") < len(room.servers)
    began = time.monotonic()
    assert sidecar.stop() == 0  # SIGTERM with the background work under way: a clean exit
    assert time.monotonic() - began < 4.0
    assert "Traceback" not in sidecar.log()
