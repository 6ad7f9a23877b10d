"""What a user does through Synapse's client-server API, timed as the client sees it."""

from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import httpx

from tests.support.sidecar_process import Sidecar

quote = urllib.parse.quote


@dataclass
class Outcome:
    """One client request: status, decoded body and wall time in seconds."""

    action: str
    target: str
    status: int
    body: dict[str, Any]
    seconds: float

    @property
    def ms(self) -> float:
        return self.seconds * 1000

    def __str__(self) -> str:
        error = self.body.get("errcode", "")
        return f"{self.action} {self.target}: {self.status} {error} in {self.ms:.0f} ms".strip()


def _timed(
    action: str, target: str, client: httpx.Client, method: str, path: str, **kw: Any
) -> Outcome:
    started = time.perf_counter()
    response = client.request(method, path, **kw)
    seconds = time.perf_counter() - started
    try:
        body = response.json()
    except json.JSONDecodeError:
        body = {"raw": response.text[:500]}
    return Outcome(action, target, response.status_code, body, seconds)


def profile(client: httpx.Client, user: str) -> Outcome:
    return _timed("profile", user, client, "GET", f"/_matrix/client/v3/profile/{quote(user)}")


def join(client: httpx.Client, room: str, via: str | None = None) -> Outcome:
    """Join by alias (`#a:b`: directory query, then make_join) or by room ID (`!a:b`)."""
    action = "join alias" if room.startswith("#") else "join room id"
    params = {"server_name": via} if via else None
    path = f"/_matrix/client/v3/join/{quote(room)}"
    return _timed(action, room, client, "POST", path, json={}, params=params)


def join_via(client: httpx.Client, room_id: str, servers: list[str]) -> Outcome:
    """Join by room ID with several `server_name` params, tried by Synapse in this order."""
    path = f"/_matrix/client/v3/join/{quote(room_id)}"
    params = [("server_name", s) for s in servers]
    return _timed(
        "join via", f"{room_id} via {servers}", client, "POST", path, json={}, params=params
    )


def invite(client: httpx.Client, room_id: str, user: str) -> Outcome:
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/invite"
    return _timed("invite", user, client, "POST", path, json={"user_id": user})


_txn = iter(range(10**9))


def send_text(client: httpx.Client, room_id: str, text: str) -> Outcome:
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/send/m.room.message/e2e{next(_txn)}"
    body = {"msgtype": "m.text", "body": text}
    return _timed("message", room_id, client, "PUT", path, json=body)


def create_room(client: httpx.Client) -> str:
    response = client.post("/_matrix/client/v3/createRoom", json={"preset": "private_chat"})
    response.raise_for_status()
    room_id: str = response.json()["room_id"]
    return room_id


def suppressed(sidecar: Sidecar) -> dict[str, float]:
    """`tombstone_suppressed_total` by signal (all stages added up)."""
    return _by_signal(sidecar, "tombstone_suppressed_total")


def would_suppress(sidecar: Sidecar) -> dict[str, float]:
    """Shadow mode: `tombstone_would_suppress_total` by signal."""
    return _by_signal(sidecar, "tombstone_would_suppress_total")


def _by_signal(sidecar: Sidecar, metric: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for (name, labels), value in sidecar.metrics().items():
        if name == metric:
            signal = dict(labels)["signal"]
            totals[signal] = totals.get(signal, 0.0) + value
    return totals


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


def verdict(sidecar: Sidecar, name: str) -> dict[str, Any]:
    status, body = sidecar.ops(f"/v1/verdicts/{name}")
    if status != 200:
        return {"status": status}
    data: dict[str, Any] = json.loads(body)
    return data
