"""A fake remote homeserver that a real Synapse federates with, through the sidecar.

Just enough of the federation API for the scenarios, with real cryptography so Synapse
accepts it: each server name has an ed25519 signing key (served, self-signed, at
`/_matrix/key/v2/server`), and rooms are real room-version-10 event graphs (content
hashes, reference-hash event IDs, signatures over the redacted event). Inbound requests'
X-Matrix signatures are not verified; the `destination` in them (or the Host) picks which
of the fake's server names answers, so one fake serves a plain name, an SRV-delegated name
and a well-known-delegated name on several ports.

Endpoints: version, key/v2/server, query/profile, query/directory, make_join, send_join
(v1, v2), invite (v2), send (transactions: accepted, PDUs ignored), well-known. Anything
else is a 404 `M_UNRECOGNIZED`, and every request is recorded by the `Upstream` it came in
on, so a test can see exactly what Synapse asked.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from tests.support.signing import JsonDict, SigningKey, content_hash, event_id
from tests.support.tls_upstream import Request, Response

ROOM_VERSION = "10"


@dataclass
class Room:
    """A public room hosted by one fake server: its events, state and alias."""

    room_id: str
    alias: str
    key: SigningKey
    events: dict[str, JsonDict] = field(default_factory=dict)
    state: dict[tuple[str, str], str] = field(default_factory=dict)  # (type, key) -> event ID
    latest: str | None = None
    depth: int = 0

    @classmethod
    def create(
        cls,
        server: str,
        key: SigningKey,
        localpart: str = "lobby",
        members: tuple[SigningKey, ...] = (),
    ) -> Room:
        """A public room created by `@carol:server`; `@bob` of each `members` key joined."""
        room = cls(f"!{localpart}:{server}", f"#{localpart}:{server}", key)
        creator = f"@carol:{server}"
        room.add("m.room.create", "", creator, {"creator": creator, "room_version": ROOM_VERSION})
        room.add("m.room.member", creator, creator, {"membership": "join", "displayname": "Carol"})
        room.add(
            "m.room.power_levels",
            "",
            creator,
            {
                "users": {creator: 100},
                "users_default": 0,
                "events": {},
                "events_default": 0,
                "state_default": 50,
                "ban": 50,
                "kick": 50,
                "redact": 50,
                "invite": 0,
            },
        )
        room.add("m.room.join_rules", "", creator, {"join_rule": "public"})
        room.add("m.room.history_visibility", "", creator, {"history_visibility": "shared"})
        for member in members:
            user = f"@bob:{member.server_name}"
            room.add("m.room.member", user, user, {"membership": "join"}, key=member)
        return room

    def auth_for(self, etype: str, state_key: str, sender: str, content: JsonDict) -> list[str]:
        """Auth events of a new event (the spec's auth_events selection)."""
        wanted = [("m.room.create", "")]
        if etype != "m.room.create":
            wanted += [("m.room.power_levels", ""), ("m.room.member", sender)]
        if etype == "m.room.member":
            wanted += [("m.room.member", state_key)]
            if content.get("membership") in ("join", "invite"):
                wanted += [("m.room.join_rules", "")]
        seen: list[str] = []
        for key in wanted:
            found = self.state.get(key)
            if found and found not in seen:
                seen.append(found)
        return seen

    def proto(
        self, etype: str, state_key: str, sender: str, content: JsonDict, origin: str = ""
    ) -> JsonDict:
        """An unsigned, unhashed event on top of the room (what make_join returns)."""
        return {
            "type": etype,
            "room_id": self.room_id,
            "sender": sender,
            "state_key": state_key,
            "content": content,
            "origin": origin or self.key.server_name,
            "origin_server_ts": int(time.time() * 1000),
            "depth": self.depth + 1,
            "prev_events": [self.latest] if self.latest else [],
            "auth_events": self.auth_for(etype, state_key, sender, content),
        }

    def add(
        self,
        etype: str,
        state_key: str,
        sender: str,
        content: JsonDict,
        key: SigningKey | None = None,
    ) -> str:
        signer = key or self.key
        event = self.proto(etype, state_key, sender, content, signer.server_name)
        event["hashes"] = {"sha256": content_hash(event)}
        return self.accept(signer.sign_event(event))

    def accept(self, event: JsonDict) -> str:
        """Append a complete event (ours or a joining server's) to the room."""
        eid = event_id(event)
        self.events[eid] = event
        if "state_key" in event:
            self.state[(event["type"], event["state_key"])] = eid
        self.latest = eid
        self.depth = max(self.depth, int(event.get("depth", 0)))
        return eid

    def auth_chain(self, auth_ids: list[str]) -> list[JsonDict]:
        """These events and, transitively, every event they are authorised by."""
        chain: dict[str, JsonDict] = {}
        todo = list(auth_ids)
        while todo:
            eid = todo.pop()
            if eid in chain:
                continue
            chain[eid] = self.events[eid]
            todo.extend(chain[eid].get("auth_events", []))
        return list(chain.values())


def _json(status: int, body: object, headers: dict[str, str] | None = None) -> Response:
    return Response(
        status, json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
    )


def x_matrix_destination(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if not auth.startswith("X-Matrix "):
        return None
    for part in auth[len("X-Matrix ") :].split(","):
        key, _, value = part.strip().partition("=")
        if key == "destination":
            return value.strip('"')
    return None


class FakeHomeserver:
    """One remote homeserver process answering for several server names.

    `names` maps every Host/SNI name it may be reached as to the server name it then is
    (`{"fed.wk.test": "wk.test"}` for a well-known delegation); `well_known` maps a server
    name to the `m.server` it delegates to. Every server name hosts `#lobby:<name>`.

    `shared_with` are other (decommissioned) server names: the fake holds their signing
    keys, serves them as a notary (`/_matrix/key/v2/query`, as matrix.org does for most
    servers), and `#shared:<first name>` has a joined `@bob` of each, so a Synapse that
    joins it has those servers in a room and sends them transactions.
    Use `handler` as an `Upstream` handler.
    """

    def __init__(
        self,
        names: dict[str, str],
        well_known: dict[str, str] | None = None,
        shared_with: tuple[str, ...] = (),
    ) -> None:
        self.names = dict(names)
        self.well_known = dict(well_known or {})
        servers = sorted(set(names.values()))
        self.keys = {server: SigningKey(server) for server in servers}
        self.foreign_keys = {name: SigningKey(name) for name in shared_with}
        self.rooms: dict[str, Room] = {}
        for server in servers:
            self._host(Room.create(server, self.keys[server]))
        self.notary = servers[0]
        if shared_with:
            members = tuple(self.foreign_keys.values())
            self._host(Room.create(self.notary, self.keys[self.notary], "shared", members))
        self.invites: list[JsonDict] = []
        self.joins: list[JsonDict] = []
        self._lock = threading.Lock()

    def _host(self, room: Room) -> None:
        self.rooms[room.room_id] = room

    def add_shared_room(self, localpart: str) -> str:
        """Another room like `#shared:<notary>` (fresh, for one experiment); its alias."""
        members = tuple(self.foreign_keys.values())
        room = Room.create(self.notary, self.keys[self.notary], localpart, members)
        with self._lock:
            self._host(room)
        return room.alias

    def add_room(self, server: str, localpart: str) -> str:
        """A fresh public room of `server` (one of this fake's names), for one experiment
        (joining a shared `#lobby` would put another homeserver into the main world's
        rooms); its room ID."""
        room = Room.create(server, self.keys[server], localpart)
        with self._lock:
            self._host(room)
        return room.room_id

    def room_by_alias(self, alias: str) -> Room | None:
        return next((r for r in self.rooms.values() if r.alias == alias), None)

    def server_for(self, request: Request) -> str | None:
        destination = x_matrix_destination(request)
        if destination is not None:
            host = destination
        else:
            host = request.headers.get("host", request.sni or "").rsplit(":", 1)[0]
            if host.startswith("["):
                host = host.strip("[]")
        return self.names.get(host.lower())

    def handler(self, request: Request) -> Response:
        with self._lock:
            return self._handle(request)

    def _handle(self, request: Request) -> Response:
        url = urllib.parse.urlsplit(request.path)
        path = urllib.parse.unquote(url.path)
        query = urllib.parse.parse_qs(url.query)
        server = self.server_for(request)
        if path == "/.well-known/matrix/server":
            delegated = self.well_known.get(server or "")
            if delegated is None:
                return _json(404, {"errcode": "M_NOT_FOUND", "error": "no delegation"})
            return _json(200, {"m.server": delegated})
        if server is None:
            return _json(404, {"errcode": "M_UNKNOWN", "error": "unknown server name"})
        key = self.keys[server]
        parts = path.strip("/").split("/")
        if path == "/_matrix/federation/v1/version":
            return _json(200, {"server": {"name": "e2e-fake", "version": "1"}})
        if path.startswith("/_matrix/key/v2/server"):
            return _json(200, key.key_document())
        if path == "/_matrix/key/v2/query" and request.method == "POST":
            wanted = json.loads(request.body or b"{}").get("server_keys", {})
            known = {**self.keys, **self.foreign_keys}
            docs = [key.sign_json(known[n].key_document()) for n in wanted if n in known]
            return _json(200, {"server_keys": docs})
        if path == "/_matrix/federation/v1/query/profile":
            user = query.get("user_id", [""])[0]
            if not user.endswith(f":{server}"):
                return _json(404, {"errcode": "M_NOT_FOUND", "error": "no such user"})
            return _json(200, {"displayname": f"{user.split(':')[0][1:].title()} of {server}"})
        if path == "/_matrix/federation/v1/query/directory":
            room = self.room_by_alias(query.get("room_alias", [""])[0])
            if room is None or room.key is not key:
                return _json(404, {"errcode": "M_NOT_FOUND", "error": "no such alias"})
            return _json(200, {"room_id": room.room_id, "servers": [server]})
        if parts[:4] == ["_matrix", "federation", "v1", "make_join"] and len(parts) == 6:
            return self._make_join(parts[4], parts[5], query.get("ver", []))
        if parts[:3] == ["_matrix", "federation", "v1"] and parts[3:4] == ["send_join"]:
            return self._send_join(request, v1=True)
        if parts[:3] == ["_matrix", "federation", "v2"] and parts[3:4] == ["send_join"]:
            return self._send_join(request, v1=False)
        if parts[:4] == ["_matrix", "federation", "v2", "invite"]:
            body = json.loads(request.body or b"{}")
            event = body.get("event", {})
            self.invites.append(event)
            return _json(200, {"event": key.sign_event(event)})
        if parts[:4] == ["_matrix", "federation", "v1", "send"]:
            body = json.loads(request.body or b"{}")
            return _json(200, {"pdus": {e.get("event_id", "?"): {} for e in body.get("pdus", [])}})
        return _json(404, {"errcode": "M_UNRECOGNIZED", "error": f"fake does not serve {path}"})

    def _make_join(self, room_id: str, user_id: str, versions: list[str]) -> Response:
        room = self.rooms.get(room_id)
        if room is None:
            return _json(404, {"errcode": "M_NOT_FOUND", "error": "no such room"})
        if versions and ROOM_VERSION not in versions:
            return _json(
                400, {"errcode": "M_INCOMPATIBLE_ROOM_VERSION", "room_version": ROOM_VERSION}
            )
        event = room.proto("m.room.member", user_id, user_id, {"membership": "join"})
        return _json(200, {"room_version": ROOM_VERSION, "event": event})

    def _send_join(self, request: Request, v1: bool) -> Response:
        event = json.loads(request.body or b"{}")
        room = self.rooms.get(event.get("room_id", ""))
        if room is None:
            return _json(404, {"errcode": "M_NOT_FOUND", "error": "no such room"})
        state = [room.events[eid] for eid in room.state.values()]
        signed = room.key.sign_event(event)
        auth_ids = {a for eid in room.state.values() for a in room.events[eid]["auth_events"]}
        auth_chain = room.auth_chain(sorted(auth_ids | set(event.get("auth_events", []))))
        room.accept(signed)
        self.joins.append(signed)
        body = {
            "origin": room.key.server_name,
            "state": state,
            "auth_chain": auth_chain,
            "event": signed,
            "members_omitted": False,
            "servers_in_room": sorted({e["sender"].split(":", 1)[1] for e in state}),
        }
        return _json(200, [200, body] if v1 else body)
