"""A federation of N fake homeservers in one asyncio process: `python -m tests.scale.fakefed`.

One TLS listener per address and port serves every name at that address (one wildcard
certificate for `*.fed.test` from the test CA); the X-Matrix `destination` (or the Host
header) picks which server answers. Each server signs with its own ed25519 key, derived from
the population's seed (tests/scale/population.py), so the test process knows the keys too.

    127.0.1.1:8448  every live server's federation API; the hub hosts the room
    127.0.1.1:443   the live servers' well-known: 404 (they serve on 8448 directly)
    127.24-25.x.y:443   each gone-over-HTTP server at its own address: 410 on the
                        well-known (`wk410`), 404 (`mx410`)
    127.24-25.x.y:8448  the same servers: 410 on every /_matrix/ path
    127.0.0.1:PORT  the control API (plain HTTP): /stats, /received, /reset

What the live servers answer: /version, key/v2/server, key/v2/query (every server is a
notary for every other: the world's Synapse trusts the hub's), query/profile,
query/directory, make_join/send_join (v1, v2; `omit_members` honoured with
`--partial-state`), /state, /state_ids, /event, get_missing_events, backfill, /send
(each PDU's and EDU's arrival recorded per server), invite (v2), user/devices,
user/keys/query and user/keys/claim. Anything else is a 404 `M_UNRECOGNIZED`, counted by
path so a run shows what Synapse asked that the fake does not serve.

The process measures itself: CPU seconds and RSS are part of /stats. Every request that
reached a dead server is kept with its time (`/gone`), attributed to the server whose
address it reached.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import contextlib
import functools
import json
import resource
import ssl
import sys
import time
import urllib.parse
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.scale.population import (
    API_PORT,
    GONE_HTTP_KINDS,
    HUB,
    LIVE_IP,
    ROOM_ALIAS,
    ROOM_ID,
    WELL_KNOWN_PORT,
    Population,
)
from tests.scale.room import ROOM_VERSION, Room, build_room
from tests.support.signing import JsonDict, SigningKey, event_id

READY_LINE = "fakefed ready"
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024  # a send_join of 10,000 members is a few MB
LISTEN_BACKLOG = 4096  # a join storm opens a connection to every server at once
KEY_VALIDITY_MS = 7 * 24 * 3600 * 1000  # longer than any run: keys are fetched once
DIRECTORY_SERVERS = 5  # how many servers a directory answer names besides the hub
UNKNOWN_LOG_LIMIT = 50  # unknown paths written to stderr (all are counted)
# asyncio's TLS transport gives every connection a 256 KiB read buffer: 2.5 GB for the
# 10,000 connections Synapse keeps open to a room of 10,000 servers. One TLS record is at
# most 16 KiB, so a 32 KiB buffer reads as much per call as any record holds.
TLS_READ_BUFFER = 32 * 1024


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def path(self) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(self.target).path)

    @property
    def query(self) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.target).query)

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"


def _json(status: int, value: object) -> Reply:
    return Reply(status, json.dumps(value, separators=(",", ":")).encode())


def _error(status: int, errcode: str, error: str) -> Reply:
    return _json(status, {"errcode": errcode, "error": error})


def agent(headers: dict[str, str]) -> str:
    """Who asked, in one word: Synapse, the sidecar's probe, or something else."""
    value = headers.get("user-agent", "")
    if value.startswith("Synapse"):
        return "synapse"
    if value.startswith("tombstone-sidecar"):
        return "sidecar"
    return value.split("/", 1)[0] or "unknown"


def x_matrix_destination(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if not auth.startswith("X-Matrix "):
        return None
    for part in auth[len("X-Matrix ") :].split(","):
        key, _, value = part.strip().partition("=")
        if key == "destination":
            return value.strip('"').lower()
    return None


@dataclass
class Stats:
    """What the federation saw; served as JSON by the control API."""

    started: float = field(default_factory=time.time)
    connections: Counter[str] = field(default_factory=Counter)  # by listener
    open_connections: int = 0
    peak_open_connections: int = 0
    requests: Counter[str] = field(default_factory=Counter)  # by endpoint (live servers)
    gone_requests: Counter[str] = field(default_factory=Counter)  # by server name
    gone_kinds: Counter[str] = field(default_factory=Counter)  # by kind, port and agent
    # every request a dead server received: (epoch seconds, server, port, agent, path)
    gone_log: list[tuple[float, str, str, str, str]] = field(default_factory=list)
    agents: Counter[str] = field(default_factory=Counter)  # live requests by agent, endpoint
    unknown: Counter[str] = field(default_factory=Counter)  # paths the fake does not serve
    # event ID -> server -> first arrival (epoch seconds), for every PDU a live server got
    pdus: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    # EDU type -> server -> arrival times
    edus: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    transactions: Counter[str] = field(default_factory=Counter)  # by server
    joins: list[str] = field(default_factory=list)  # event IDs the hub took by send_join

    def summary(self) -> JsonDict:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with open("/proc/self/statm") as statm:
            rss_pages = int(statm.read().split()[1])
        return {
            "uptime_seconds": time.time() - self.started,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "max_rss_kb": usage.ru_maxrss,
            "rss_kb": rss_pages * resource.getpagesize() // 1024,
            "connections": dict(self.connections),
            "open_connections": self.open_connections,
            "peak_open_connections": self.peak_open_connections,
            "requests": dict(self.requests),
            "gone_requests_total": sum(self.gone_requests.values()),
            "gone_requests": dict(self.gone_requests),
            "gone_kinds": dict(self.gone_kinds),
            "agents": dict(self.agents),
            "unknown": dict(self.unknown),
            "transactions_total": sum(self.transactions.values()),
            "servers_with_transactions": len(self.transactions),
            "pdus_seen": len(self.pdus),
            "edu_types": {t: sum(len(v) for v in by.values()) for t, by in self.edus.items()},
            "joins": list(self.joins),
        }


class Federation:
    """Every server of the population, answering requests by server name."""

    def __init__(self, population: Population, partial_state: bool) -> None:
        self.population = population
        self.partial_state = partial_state
        self.keys: dict[str, SigningKey] = {}
        began = time.monotonic()
        self.room: Room = build_room(population)
        self.build_seconds = time.monotonic() - began
        self.stats = Stats()
        self._self_signed: dict[str, JsonDict] = {}
        self._live_names = [s.name for s in population.live if s.name != HUB]

    def key(self, name: str) -> SigningKey:
        key = self.keys.get(name)
        if key is None:
            key = self.keys[name] = self.population.key(name)
        return key

    def key_document(self, name: str) -> JsonDict:
        """`name`'s self-signed key document (made once: valid longer than any run)."""
        doc = self._self_signed.get(name)
        if doc is None:
            key = self.key(name)
            doc = key.sign_json(
                {
                    "server_name": name,
                    "valid_until_ts": int(time.time() * 1000) + KEY_VALIDITY_MS,
                    "verify_keys": {"ed25519:e2e": {"key": key.public_b64}},
                    "old_verify_keys": {},
                }
            )
            self._self_signed[name] = doc
        return doc

    # -- dispatch -------------------------------------------------------------------------

    def handle(self, listener: str, request: Request, local_ip: str = "") -> Reply:
        host = request.headers.get("host", "").rsplit(":", 1)[0].lower()
        name = x_matrix_destination(request.headers) or host
        server = self.population.by_name.get(name)
        if listener.startswith("gone"):
            owner = self.population.by_address.get(local_ip)
            return self._gone(listener, owner.name if owner else name, request)
        if server is None or not server.live:
            return _error(404, "M_UNKNOWN", f"no server {name!r} here")
        if listener == "live-wk":  # the name's port 443: no delegation, no API here
            what = "well-known" if request.path == "/.well-known/matrix/server" else "443 other"
            self.stats.requests[what] += 1
            self.stats.agents[f"{agent(request.headers)} {what}"] += 1
            if what != "well-known":
                self.stats.unknown[f"443 {request.path}"] += 1
            return _error(404, "M_NOT_FOUND", "no delegation")
        try:
            return self._api(name, request)
        except (KeyError, ValueError, json.JSONDecodeError) as e:
            self.stats.requests["bad request"] += 1
            return _error(400, "M_BAD_JSON", f"{type(e).__name__}: {e}")

    def _gone(self, listener: str, name: str, request: Request) -> Reply:
        server = self.population.by_name.get(name)
        kind = server.kind if server is not None else "unknown"
        port = listener.removeprefix("gone-")
        who = agent(request.headers)
        self.stats.gone_requests[name] += 1
        self.stats.gone_kinds[f"{kind} {port} {who}"] += 1
        self.stats.gone_log.append((time.time(), name, port, who, request.path))
        if request.path == "/.well-known/matrix/server" and kind != "wk410":
            return _error(404, "M_NOT_FOUND", "no delegation")
        return _error(410, "M_UNKNOWN", "this server is gone")

    def _api(self, name: str, request: Request) -> Reply:
        path = request.path
        parts = path.strip("/").split("/")
        if parts[:2] == ["_matrix", "key"]:
            return self._keys(name, request, parts)
        if parts[:2] != ["_matrix", "federation"] or len(parts) < 4:
            return self._unknown(path)
        endpoint = parts[3]
        self.stats.requests[endpoint] += 1
        self.stats.agents[f"{agent(request.headers)} {endpoint}"] += 1
        if endpoint == "version":
            return _json(200, {"server": {"name": "scale-fake", "version": "1"}})
        if endpoint == "send" and request.method == "PUT":
            return self._send(name, request.json())
        if endpoint == "query" and parts[4:5] == ["profile"]:
            user = request.query.get("user_id", [""])[0]
            if not user.endswith(f":{name}"):
                return _error(404, "M_NOT_FOUND", "no such user")
            return _json(200, {"displayname": f"member of {name}"})
        if endpoint == "query" and parts[4:5] == ["directory"]:
            if request.query.get("room_alias", [""])[0] != ROOM_ALIAS or name != HUB:
                return _error(404, "M_NOT_FOUND", "no such alias")
            return _json(200, {"room_id": ROOM_ID, "servers": self._some_servers()})
        if endpoint == "user" and parts[4:5] == ["devices"]:
            return _json(200, {"user_id": parts[5], "stream_id": 1, "devices": []})
        if endpoint == "user" and parts[4:6] == ["keys", "query"]:
            wanted = request.json().get("device_keys", {})
            return _json(200, {"device_keys": {user: {} for user in wanted}})
        if endpoint == "user" and parts[4:6] == ["keys", "claim"]:
            return _json(200, {"one_time_keys": {}})
        if endpoint == "invite":
            event = request.json().get("event", {})
            return _json(200, {"event": self.key(name).sign_event(event)})
        if name != HUB or (len(parts) > 4 and parts[4] != ROOM_ID and endpoint != "event"):
            return _error(404, "M_NOT_FOUND", "this server hosts no such room")
        return self._room_api(endpoint, parts, request)

    def _room_api(self, endpoint: str, parts: list[str], request: Request) -> Reply:
        room = self.room
        if endpoint == "make_join" and len(parts) == 6:
            versions = request.query.get("ver", [])
            if versions and ROOM_VERSION not in versions:
                return _json(
                    400, {"errcode": "M_INCOMPATIBLE_ROOM_VERSION", "room_version": ROOM_VERSION}
                )
            user = parts[5]
            proto = room.proto("m.room.member", user, user, {"membership": "join"})
            return _json(200, {"room_version": ROOM_VERSION, "event": proto})
        if endpoint == "send_join" and request.method == "PUT":
            omit = request.query.get("omit_members", ["false"])[0] == "true"
            return self._send_join(request.json(), v1=parts[2] == "v1", omit=omit)
        if endpoint in ("state", "state_ids"):
            at = request.query.get("event_id", [""])[0]
            if at not in room.events:
                return _error(404, "M_NOT_FOUND", "no such event")
            state = sorted(room.state_before(at).values())
            chain = room.auth_chain(state)
            if endpoint == "state_ids":
                return _json(200, {"pdu_ids": state, "auth_chain_ids": chain})
            events = room.events
            return _json(
                200,
                {"pdus": [events[e] for e in state], "auth_chain": [events[e] for e in chain]},
            )
        if endpoint == "event" and len(parts) == 5:
            event = room.events.get(parts[4])
            if event is None:
                return _error(404, "M_NOT_FOUND", "no such event")
            return _json(200, self._pdus([event]))
        if endpoint == "backfill":
            limit = int(request.query.get("limit", ["10"])[0])
            found = room.before(request.query.get("v", []), limit)
            return _json(200, self._pdus([room.events[e] for e in found]))
        if endpoint == "get_missing_events" and request.method == "POST":
            body = request.json()
            latest = [
                prev
                for eid in body.get("latest_events", [])
                if eid in room.events
                for prev in room.events[eid].get("prev_events", [])
            ]
            found = room.before(latest, int(body.get("limit", 10)), set(body["earliest_events"]))
            return _json(200, {"events": [room.events[e] for e in reversed(found)]})
        return self._unknown(request.path)

    def _unknown(self, path: str) -> Reply:
        shape = "/".join(path.split("/")[:5])
        self.stats.unknown[shape] += 1
        if sum(self.stats.unknown.values()) <= UNKNOWN_LOG_LIMIT:
            print(f"fakefed: not served: {path}", file=sys.stderr, flush=True)
        return _error(404, "M_UNRECOGNIZED", f"the scale fake does not serve {path}")

    def _pdus(self, events: list[JsonDict]) -> JsonDict:
        now = int(time.time() * 1000)
        return {"origin": HUB, "origin_server_ts": now, "pdus": events}

    def _some_servers(self) -> list[str]:
        return [HUB, *self._live_names[:DIRECTORY_SERVERS]]

    # -- keys ------------------------------------------------------------------------------

    def _keys(self, name: str, request: Request, parts: list[str]) -> Reply:
        if parts[2:4] == ["v2", "server"]:
            self.stats.requests["key/v2/server"] += 1
            return _json(200, self.key_document(name))
        if parts[2:4] == ["v2", "query"]:
            self.stats.requests["key/v2/query"] += 1
            if request.method == "POST":
                wanted = list(request.json().get("server_keys", {}))
            else:
                wanted = parts[4:5]
            notary = self.key(name)
            docs = [
                notary.sign_json(self.key_document(n))
                for n in wanted
                if n in self.population.by_name
            ]
            return _json(200, {"server_keys": docs})
        return self._unknown(request.path)

    # -- transactions and joins --------------------------------------------------------------

    def _send(self, name: str, body: JsonDict) -> Reply:
        now = time.time()
        self.stats.transactions[name] += 1
        results: dict[str, JsonDict] = {}
        for pdu in body.get("pdus", []):
            eid = event_id(pdu)
            self.stats.pdus[eid].setdefault(name, now)
            results[eid] = {}
            if name == HUB and pdu.get("room_id") == ROOM_ID:
                self.room.accept(pdu)
        for edu in body.get("edus", []):
            self.stats.edus[str(edu.get("edu_type"))][name].append(now)
        return _json(200, {"pdus": results})

    def _send_join(self, event: JsonDict, *, v1: bool, omit: bool) -> Reply:
        room = self.room
        if event.get("room_id") != ROOM_ID:
            return _error(404, "M_NOT_FOUND", "no such room")
        partial = omit and self.partial_state and not v1
        state_ids = list(room.state.values())
        if partial:  # MSC3706: no membership events, the servers named instead
            state_ids = [e for e in state_ids if room.events[e]["type"] != "m.room.member"]
        chain = room.auth_chain([*state_ids, *event.get("auth_events", [])])
        signed = self.key(HUB).sign_event(event)
        servers = [HUB, *(s.name for s in self.population if s.name != HUB)]
        body = {
            "origin": HUB,
            "state": [room.events[e] for e in state_ids],
            "auth_chain": [room.events[e] for e in chain],
            "event": signed,
            "members_omitted": partial,
            "servers_in_room": servers,
        }
        self.stats.joins.append(room.accept(signed))
        return _json(200, [200, body] if v1 else body)


# -- HTTP/1.1 over asyncio streams -------------------------------------------------------------


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request, or None when the client closed the connection between requests."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
            if size == 0:
                break
        body = b"".join(chunks)
    else:
        length = int(headers.get("content-length", "0"))
        if length > MAX_BODY_BYTES:
            raise ValueError(f"body of {length} bytes")
        body = await reader.readexactly(length) if length else b""
    return Request(method, target, headers, body)


def render(reply: Reply, close: bool) -> bytes:
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 410: "Gone"}.get(reply.status, "X")
    head = (
        f"HTTP/1.1 {reply.status} {reason}\r\n"
        f"Content-Type: {reply.content_type}\r\n"
        f"Content-Length: {len(reply.body)}\r\n"
        f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n"
    )
    return head.encode() + reply.body


class Server:
    """The listeners and the control API around one Federation."""

    def __init__(self, federation: Federation, tls: ssl.SSLContext, control_port: int) -> None:
        self.federation = federation
        self.tls = tls
        self.control_port = control_port
        self.servers: list[asyncio.Server] = []

    async def start(self) -> None:
        gone = [
            s.address
            for s in self.federation.population.dead
            if s.kind in GONE_HTTP_KINDS and s.address is not None
        ]
        listeners: tuple[tuple[str, str | list[str], int], ...] = (
            ("live-api", LIVE_IP, API_PORT),
            ("live-wk", LIVE_IP, WELL_KNOWN_PORT),
            ("gone-8448", gone, API_PORT),  # one socket per gone server's address
            ("gone-443", gone, WELL_KNOWN_PORT),
        )
        for label, host, port in listeners:
            server = await asyncio.start_server(
                functools.partial(self.serve, label),
                host,
                port,
                ssl=self.tls,
                backlog=LISTEN_BACKLOG,
                limit=MAX_HEADER_BYTES,
            )
            self.servers.append(server)
        control = await asyncio.start_server(self.control, "127.0.0.1", self.control_port)
        self.servers.append(control)

    async def serve(
        self, label: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        stats = self.federation.stats
        stats.connections[label] += 1
        sockname = writer.get_extra_info("sockname")
        local_ip = str(sockname[0]) if sockname else ""
        stats.open_connections += 1
        stats.peak_open_connections = max(stats.peak_open_connections, stats.open_connections)
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    break
                reply = self.federation.handle(label, request, local_ip)
                close = request.headers.get("connection", "").lower() == "close"
                writer.write(render(reply, close))
                await writer.drain()
                if close:
                    break
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.federation.stats.open_connections -= 1
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """GET /stats, /received?event_id=..., /edus?type=..., /gone; POST /reset."""
        try:
            while (request := await read_request(reader)) is not None:
                writer.write(render(self._control(request), close=False))
                await writer.drain()
        except (OSError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _control(self, request: Request) -> Reply:
        stats = self.federation.stats
        if request.path == "/stats":
            summary = stats.summary()
            summary["room_build_seconds"] = self.federation.build_seconds
            summary["room_events"] = len(self.federation.room.events)
            return _json(200, summary)
        if request.path == "/received":
            eid = request.query.get("event_id", [""])[0]
            return _json(200, stats.pdus.get(eid, {}))
        if request.path == "/gone":
            return _json(200, stats.gone_log)
        if request.path == "/edus":
            edu_type = request.query.get("type", [""])[0]
            return _json(200, stats.edus.get(edu_type, {}))
        if request.path == "/reset" and request.method == "POST":
            self.federation.stats = Stats()
            return _json(200, {})
        return _error(404, "M_NOT_FOUND", request.path)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.scale.fakefed", description=__doc__)
    parser.add_argument("--count", type=int, required=True, help="remote servers besides the hub")
    parser.add_argument("--dead-share", type=float, required=True)
    parser.add_argument("--seed", required=True)
    parser.add_argument("--cert", required=True, help="PEM chain for *.fed.test")
    parser.add_argument("--key", required=True, help="its private key (PEM)")
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument(
        "--partial-state",
        action="store_true",
        help="honour send_join's omit_members (Synapse's faster joins) instead of always "
        "answering the full state",
    )
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
    population = Population(args.count, args.dead_share, args.seed)
    federation = Federation(population, args.partial_state)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(args.cert, args.key)
    server = Server(federation, tls, args.control_port)
    await server.start()
    print(
        f"{READY_LINE}: {len(population.servers)} servers, {len(federation.room.events)} "
        f"events built in {federation.build_seconds:.2f} s",
        flush=True,
    )
    await asyncio.Event().wait()  # until killed


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
