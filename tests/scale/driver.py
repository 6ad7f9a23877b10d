"""What a user of the scale world's Synapse does, and what each step cost.

`join_and_send` is scenario 1 of issue 17: `@alice:hs.test` joins the hub's room by its ID
through the hub (Synapse's default join path, with its partial-state resync when the hub
answers one), waits until the room's member list is complete, sends a first message and
waits until every live server has received it. Everything is measured from the client's
side of Synapse's API and from the fake federation's arrival times.
"""

from __future__ import annotations

import statistics
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.scale.population import HUB, ROOM_ID
from tests.scale.world import ScaleWorld

quote = urllib.parse.quote
JOIN_TIMEOUT = 600.0  # a join's send_join response names every member; Synapse checks each
POLL_INTERVAL = 0.2


@dataclass
class Delivery:
    """When each live server received one event, relative to the client's send."""

    event_id: str
    sent_at: float  # epoch seconds, when the client sent its request
    arrivals: dict[str, float]  # server -> epoch seconds
    expected: int

    @property
    def latencies(self) -> list[float]:
        return sorted(max(0.0, t - self.sent_at) for t in self.arrivals.values())

    def summary(self) -> dict[str, float]:
        lat = self.latencies
        if not lat:
            return {"received": 0, "expected": self.expected}
        p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
        return {
            "received": len(lat),
            "expected": self.expected,
            "p50_ms": statistics.median(lat) * 1000,
            "p99_ms": p99 * 1000,
            "max_ms": lat[-1] * 1000,
        }


@dataclass
class JoinRun:
    join_status: int = 0
    join_body: dict[str, Any] = field(default_factory=dict)
    join_seconds: float = 0.0
    members_seconds: float = 0.0  # until /members listed every member (full state)
    members: int = 0
    message: Delivery | None = None
    message_status: int = 0


def _members(client: httpx.Client) -> int:
    response = client.get(
        f"/_matrix/client/v3/rooms/{quote(ROOM_ID)}/members", params={"membership": "join"}
    )
    if response.status_code != 200:
        return 0
    return len(response.json().get("chunk", []))


def wait_for_delivery(world: ScaleWorld, event_id: str, sent_at: float, timeout: float) -> Delivery:
    """Poll the fake federation until every live server has `event_id` (or the timeout)."""
    live = {s.name for s in world.population.live}
    deadline = time.monotonic() + timeout
    arrivals: dict[str, float] = {}
    while time.monotonic() < deadline:
        received = world.control(f"/received?event_id={quote(event_id)}")
        arrivals = {name: at for name, at in received.items() if name in live}
        if len(arrivals) >= len(live):
            break
        time.sleep(POLL_INTERVAL)
    return Delivery(event_id, sent_at, arrivals, len(live))


def join_and_send(world: ScaleWorld, delivery_timeout: float = 120.0) -> JoinRun:
    assert world.synapse is not None and world.account is not None
    run = JoinRun()
    # each remote's @m (the hub has none), the hub's @admin, and alice
    expected_members = len(world.population.servers) + 1
    with world.synapse.client(world.account, timeout=JOIN_TIMEOUT) as client:
        began = time.monotonic()
        response = client.post(
            f"/_matrix/client/v3/join/{quote(ROOM_ID)}", params={"server_name": HUB}, json={}
        )
        run.join_seconds = time.monotonic() - began
        run.join_status = response.status_code
        run.join_body = response.json()
        if response.status_code != 200:
            return run
        while time.monotonic() - began < JOIN_TIMEOUT:
            run.members = _members(client)
            if run.members >= expected_members:
                break
            time.sleep(POLL_INTERVAL)
        run.members_seconds = time.monotonic() - began
        path = f"/_matrix/client/v3/rooms/{quote(ROOM_ID)}/send/m.room.message/scale-1"
        sent_at = time.time()
        sent = client.put(path, json={"msgtype": "m.text", "body": "hello, everyone"})
        run.message_status = sent.status_code
        if sent.status_code == 200:
            event_id = sent.json()["event_id"]
            run.message = wait_for_delivery(world, event_id, sent_at, delivery_timeout)
    return run


def report(world: ScaleWorld, run: JoinRun) -> dict[str, Any]:
    """Every figure of one run, as plain data (the pytest summary and the CLI print it)."""
    stats = world.control("/stats")
    return {
        "servers": len(world.population.servers),
        "live": len(world.population.live),
        "dead": len(world.population.dead),
        "mode": world.mode,
        "partial_state": world.partial_state,
        "join": {
            "status": run.join_status,
            "seconds": round(run.join_seconds, 3),
            "members": run.members,
            "members_complete_seconds": round(run.members_seconds, 3),
        },
        "message": {"status": run.message_status}
        | ({} if run.message is None else run.message.summary()),
        "dead_reached": world.dead_reached(),
        "usage": world.usage(),
        "dns_queries": world.dns_queries(),
        "sidecar_counters": world.sidecar_counters(),
        "synapse_log": world.synapse_log_counts(),
        "fakefed": {
            "requests": stats["requests"],
            "requests_by_agent": stats["agents"],
            "unknown": stats["unknown"],
            "connections": stats["connections"],
            "peak_open_connections": stats["peak_open_connections"],
            "edu_types": stats["edu_types"],
            "servers_with_transactions": stats["servers_with_transactions"],
        },
        "start_seconds": {k: round(v, 2) for k, v in world.timings.items()},
        "fd_limit": world.fd_limit,
    }


@dataclass
class EduDelivery:
    """When each live server first received an EDU of one type after the client's action."""

    edu_type: str
    sent_at: float
    arrivals: dict[str, float]
    expected: int

    def summary(self) -> dict[str, float]:
        return Delivery(self.edu_type, self.sent_at, self.arrivals, self.expected).summary()


def wait_for_edu(world: ScaleWorld, edu_type: str, sent_at: float, timeout: float) -> EduDelivery:
    """Poll until every live server got an EDU of `edu_type` sent after `sent_at`."""
    live = {s.name for s in world.population.live}
    deadline = time.monotonic() + timeout
    arrivals: dict[str, float] = {}
    while time.monotonic() < deadline:
        received: dict[str, list[float]] = world.control(f"/edus?type={quote(edu_type)}")
        arrivals = {
            name: min(after)
            for name, times in received.items()
            if name in live and (after := [t for t in times if t >= sent_at])
        }
        if len(arrivals) >= len(live):
            break
        time.sleep(POLL_INTERVAL)
    return EduDelivery(edu_type, sent_at, arrivals, len(live))


@dataclass
class FanOut:
    messages: list[Delivery] = field(default_factory=list)
    typing: EduDelivery | None = None
    device: EduDelivery | None = None

    def summary(self) -> dict[str, Any]:
        latencies = sorted(x for d in self.messages for x in d.latencies)
        everything: dict[str, Any] = {"messages": len(self.messages)}
        if latencies:
            p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
            everything |= {
                "deliveries": len(latencies),
                "expected": sum(d.expected for d in self.messages),
                "p50_ms": statistics.median(latencies) * 1000,
                "p99_ms": p99 * 1000,
                "max_ms": latencies[-1] * 1000,
            }
        if self.typing is not None:
            everything["typing"] = self.typing.summary()
        if self.device is not None:
            everything["device_list_update"] = self.device.summary()
        return everything


def fan_out(world: ScaleWorld, messages: int, timeout: float = 120.0) -> FanOut:
    """Scenario 2 of issue 17: `messages` messages, a typing notification and a new device
    (a second login: Synapse tells every server sharing a room with alice)."""
    assert world.synapse is not None and world.account is not None
    result = FanOut()
    user = world.account.user_id
    with world.synapse.client(world.account, timeout=JOIN_TIMEOUT) as client:
        room = quote(ROOM_ID)
        sent: list[tuple[str, float]] = []
        for i in range(messages):
            at = time.time()
            response = client.put(
                f"/_matrix/client/v3/rooms/{room}/send/m.room.message/fan-{i}",
                json={"msgtype": "m.text", "body": f"message {i}"},
            )
            response.raise_for_status()
            sent.append((response.json()["event_id"], at))
        for event_id, at in sent:
            result.messages.append(wait_for_delivery(world, event_id, at, timeout))
        at = time.time()
        client.put(
            f"/_matrix/client/v3/rooms/{room}/typing/{quote(user)}",
            json={"typing": True, "timeout": 30000},
        ).raise_for_status()
        result.typing = wait_for_edu(world, "m.typing", at, timeout)
        at = time.time()
        login = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": user},
            "password": world.account.password,
        }
        client.post("/_matrix/client/v3/login", json=login).raise_for_status()
        result.device = wait_for_edu(world, "m.device_list_update", at, timeout)
    return result


# Scenario 3, "ten minutes later": Synapse's own retry schedule, compressed by its own
# settings (homeserver.yaml `federation:`), never by patching it. Synapse 1.163's defaults:
# a failing destination is left alone 10 min, then 2x longer each time up to 7 days; a
# request is retried after up to 60 s (long, /send) or 2 s (short). `client_timeout`
# (60 s per request) is left alone: shortening it would time out live servers under load.
RETRY_DEFAULTS_MS = {
    "destination_min_retry_interval": 10 * 60 * 1000,
    "destination_max_retry_interval": 7 * 24 * 3600 * 1000,
    "max_long_retry_delay": 60 * 1000,
    "max_short_retry_delay": 2 * 1000,
}
LATER_MESSAGE_INTERVAL = 10.0  # one message every 10 s: a reason for Synapse to retry


def compressed_retries(factor: float) -> dict[str, Any]:
    """Synapse's `federation:` section with its retry schedule `factor` times faster."""
    section: dict[str, Any] = {k: max(1, round(v / factor)) for k, v in RETRY_DEFAULTS_MS.items()}
    section["destination_retry_multiplier"] = 2  # the default: the schedule's shape kept
    return {"federation": section}


@dataclass
class Later:
    """What reached the dead servers in the window, and how the messages sent in it fared."""

    began: float  # epoch seconds
    seconds: float
    synapse_seconds: float  # how much of Synapse's retry schedule the window covers
    messages: list[Delivery] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        latencies = sorted(x for d in self.messages for x in d.latencies)
        out: dict[str, Any] = {
            "seconds": round(self.seconds, 1),
            "synapse_schedule_seconds": round(self.synapse_seconds),
            "messages": len(self.messages),
            "deliveries": len(latencies),
            "expected": sum(d.expected for d in self.messages),
        }
        if latencies:
            out["p50_ms"] = statistics.median(latencies) * 1000
            out["p99_ms"] = (
                latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))] * 1000
            )
        return out


def ten_minutes_later(
    world: ScaleWorld,
    seconds: float,
    factor: float,
    interval: float = LATER_MESSAGE_INTERVAL,
    timeout: float = 120.0,
    enough: Callable[[float], bool] | None = None,
) -> Later:
    """Scenario 3 of issue 17: `seconds` of wall time (Synapse's schedule runs `factor`
    times faster, see `compressed_retries`) with a message every `interval` seconds, so
    Synapse has something to retry towards every destination that failed. `enough(began)`,
    asked after each interval, ends the window sooner: CI stops once Synapse has retried
    what it was waiting for, rather than sitting out a fixed margin."""
    assert world.synapse is not None and world.account is not None
    began = time.time()
    later = Later(began=began, seconds=seconds, synapse_seconds=seconds * factor)
    sent: list[tuple[str, float]] = []
    with world.synapse.client(world.account, timeout=JOIN_TIMEOUT) as client:
        room = quote(ROOM_ID)
        i = 0
        while time.time() - began < seconds:
            at = time.time()
            response = client.put(
                f"/_matrix/client/v3/rooms/{room}/send/m.room.message/later-{i}",
                json={"msgtype": "m.text", "body": f"later {i}"},
            )
            response.raise_for_status()
            sent.append((response.json()["event_id"], at))
            i += 1
            time.sleep(max(0.0, min(interval, seconds - (time.time() - began))))
            if enough is not None and enough(began):
                break
    later.seconds = time.time() - began
    later.synapse_seconds = later.seconds * factor
    for event_id, at in sent:
        later.messages.append(wait_for_delivery(world, event_id, at, timeout))
    return later
