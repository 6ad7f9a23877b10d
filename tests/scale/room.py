"""The scale world's one room: hosted by the hub, a joined member from every remote server.

A real room-version-10 event graph (content hashes, reference-hash event IDs, each event
signed by its sender's own server), linear (each event's prev_event is the one before), so
`/state`, `/backfill` and `get_missing_events` are walks back along one line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tests.scale.population import HUB, ROOM_ALIAS, ROOM_ID, Population
from tests.support.signing import JsonDict, SigningKey, content_hash, event_id

ROOM_VERSION = "10"
POWER_LEVELS: JsonDict = {
    "users_default": 0,
    "events": {},
    "events_default": 0,
    "state_default": 50,
    "ban": 50,
    "kick": 50,
    "redact": 50,
    "invite": 0,
}


@dataclass
class Room:
    room_id: str
    key: SigningKey  # the hub's
    events: dict[str, JsonDict] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)  # event IDs, oldest first
    position: dict[str, int] = field(default_factory=dict)
    state: dict[tuple[str, str], str] = field(default_factory=dict)  # (type, key) -> event ID
    depth: int = 0

    @property
    def latest(self) -> str | None:
        return self.order[-1] if self.order else None

    def auth_for(self, etype: str, state_key: str, sender: str, content: JsonDict) -> list[str]:
        """Auth events of a new event (the spec's selection)."""
        wanted = [("m.room.create", "")]
        if etype != "m.room.create":
            wanted += [("m.room.power_levels", ""), ("m.room.member", sender)]
        if etype == "m.room.member":
            wanted.append(("m.room.member", state_key))
            if content.get("membership") in ("join", "invite"):
                wanted.append(("m.room.join_rules", ""))
        found: list[str] = []
        for key in wanted:
            eid = self.state.get(key)
            if eid is not None and eid not in found:
                found.append(eid)
        return found

    def proto(self, etype: str, state_key: str | None, sender: str, content: JsonDict) -> JsonDict:
        """An unsigned, unhashed event on top of the room (what make_join returns)."""
        event: JsonDict = {
            "type": etype,
            "room_id": self.room_id,
            "sender": sender,
            "content": content,
            "origin": sender.split(":", 1)[1],
            "origin_server_ts": int(time.time() * 1000),
            "depth": self.depth + 1,
            "prev_events": [self.latest] if self.latest else [],
            "auth_events": self.auth_for(etype, state_key or "", sender, content),
        }
        if state_key is not None:
            event["state_key"] = state_key
        return event

    def add(
        self,
        etype: str,
        state_key: str | None,
        key: SigningKey,
        content: JsonDict,
        sender: str | None = None,
    ) -> str:
        """A new event from `sender` (default `@admin` of the key's server), signed by it."""
        event = self.proto(etype, state_key, sender or f"@admin:{key.server_name}", content)
        event["hashes"] = {"sha256": content_hash(event)}
        return self.accept(key.sign_event(event))

    def accept(self, event: JsonDict) -> str:
        """Append a complete event (ours, or one a remote server sent) to the room."""
        eid = event_id(event)
        if eid in self.events:
            return eid
        self.events[eid] = event
        self.position[eid] = len(self.order)
        self.order.append(eid)
        if "state_key" in event:
            self.state[(event["type"], event["state_key"])] = eid
        self.depth = max(self.depth, int(event.get("depth", 0)))
        return eid

    def auth_chain(self, event_ids: list[str]) -> list[str]:
        """The auth events of these events, transitively (not the events themselves)."""
        chain: set[str] = set()
        todo = [a for eid in event_ids for a in self.events[eid].get("auth_events", [])]
        while todo:
            eid = todo.pop()
            if eid in chain or eid not in self.events:
                continue
            chain.add(eid)
            todo.extend(self.events[eid].get("auth_events", []))
        return sorted(chain)

    def state_before(self, event_id: str) -> dict[tuple[str, str], str]:
        """The room state *before* `event_id` (what /state and /state_ids answer for it)."""
        stop = self.position[event_id]
        state: dict[tuple[str, str], str] = {}
        for eid in self.order[:stop]:
            event = self.events[eid]
            if "state_key" in event:
                state[(event["type"], event["state_key"])] = eid
        return state

    def before(self, event_ids: list[str], limit: int, stop: set[str] | None = None) -> list[str]:
        """Up to `limit` events walking back from (and including) the newest of `event_ids`,
        not past any of `stop`: backfill and get_missing_events on a linear graph."""
        known = [self.position[e] for e in event_ids if e in self.position]
        if not known:
            return []
        found: list[str] = []
        for index in range(max(known), -1, -1):
            eid = self.order[index]
            if stop and eid in stop:
                break
            found.append(eid)
            if len(found) >= limit:
                break
        return found


def build_room(population: Population) -> Room:
    """The hub's public room, with `@m:<name>` of every remote server joined (live or dead),
    each join signed by its own server."""
    hub_key = population.key(HUB)
    room = Room(ROOM_ID, hub_key)
    creator = f"@admin:{HUB}"
    room.add("m.room.create", "", hub_key, {"creator": creator, "room_version": ROOM_VERSION})
    room.add("m.room.member", creator, hub_key, {"membership": "join", "displayname": "Admin"})
    room.add("m.room.power_levels", "", hub_key, {**POWER_LEVELS, "users": {creator: 100}})
    room.add("m.room.join_rules", "", hub_key, {"join_rule": "public"})
    room.add("m.room.history_visibility", "", hub_key, {"history_visibility": "shared"})
    room.add("m.room.canonical_alias", "", hub_key, {"alias": ROOM_ALIAS})
    room.add("m.room.name", "", hub_key, {"name": f"{len(population.servers)} servers"})
    for server in population:
        if server.kind == "hub":
            continue
        key = population.key(server.name)
        room.add("m.room.member", server.user, key, {"membership": "join"}, sender=server.user)
    return room
