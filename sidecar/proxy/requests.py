"""Decisions for each HTTP request the proxy sees, and what its response teaches.

Plain-HTTP proxy requests, and in intercept mode each request inside a (pooled) tunnel.
The rule, for every mode and path: a request is answered here when the host it would be
sent to is gone, or the server it is for (X-Matrix destination, else Host) is gone; the
answer names whichever is gone (the server it is for first). A live request is pinned to
a checked address of its host. Real responses teach: a `410 Gone` from `/_matrix/` or
`/.well-known/matrix/` is a tombstone (judge/gone_http.py), a live server's key
document is recorded for the resurrection check (synapse/lifting.py), and a `send_join`
answer names the servers of the room, judged in the background (judge/room_servers.py).
"""

from __future__ import annotations

import contextlib
import time
import urllib.parse

from mitmproxy import http

from sidecar.app import Sidecar
from sidecar.judge import gone_http, request_classes
from sidecar.judge.names import InvalidName, is_ip_literal, normalize_host, parse_authority
from sidecar.judge.room_servers import MAX_ROOM_BODY_BYTES, Unreadable, decoded, room_of
from sidecar.judge.verdicts import Entry
from sidecar.proxy import answers, xmatrix
from sidecar.proxy.connections import LOCAL_ANSWER, Connections, Tunnel
from sidecar.proxy.xmatrix import XMatrixError
from sidecar.remote.identity import KEY_PATH

MAX_ROOM_ID_SHOWN = 255  # the spec's limit for a room ID: a longer one is cut in the log
ROOM_BODY = "tombstone_room_body"  # flow.metadata: the copy of a send_join answer's body


class BodyCopy:
    """A send_join answer streams through unchanged (mitmproxy's `stream` callable), and
    this keeps a copy of it, up to `limit` bytes, for the background judge.

    Streamed, because `run` streams intercepted bodies over 1 MB (never buffered), and a
    full-state answer for a large room is several MB: without the copy it would pass
    unseen. Every chunk is passed on as it arrives, so nothing waits for the copy."""

    def __init__(self, limit: int = MAX_ROOM_BODY_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] = []

    def __call__(self, chunk: bytes) -> bytes:
        self.size += len(chunk)
        if self.size <= self.limit:
            self.chunks.append(chunk)
        elif self.chunks:
            self.chunks = []  # too large to read: keep nothing
        return chunk

    def body(self) -> bytes:
        """The whole body (joined off the event loop: `read` runs in a thread)."""
        if self.size > self.limit:
            raise Unreadable(f"body is larger than {self.limit} bytes")
        return b"".join(self.chunks)


class RequestGate:
    """`requestheaders`, `responseheaders` and `response` for one sidecar."""

    def __init__(self, sidecar: Sidecar, connections: Connections) -> None:
        self.sidecar = sidecar
        self.connections = connections

    async def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None or flow.request.method == "CONNECT":
            return
        sidecar = self.sidecar
        tunnel = self.connections.tunnels.get(flow.client_conn)
        started = time.perf_counter()
        try:
            name = destination(flow, tunnel)
            host = (
                None if tunnel is not None and tunnel.empty else normalize_host(flow.request.host)
            )
        except (InvalidName, XMatrixError) as e:
            sidecar.metrics.invalid_input.labels("request").inc()
            flow.response = answers.bad_target(str(e))
            flow.metadata[LOCAL_ANSWER] = True
            return
        entry = await sidecar.decide(name)
        if not entry.verdict.suppresses and host is not None and host != name:
            via = await sidecar.decide(host)  # e.g. the delegated federation host is gone
            entry = via if via.verdict.suppresses else entry
        if not entry.verdict.suppresses and tunnel is not None and host is not None:
            broken = sidecar.breaker_verdict(f"{host}:{flow.request.port}")
            entry = Entry(broken) if broken is not None else entry
        if sidecar.suppress(entry, "request"):
            settings = sidecar.settings
            if tunnel is None:  # plain HTTP (URL previews): --suppress-status, as its help says
                flow.response = answers.suppressed(entry.verdict, settings.suppress_status)
            else:
                cls = request_classes.classify(flow.request.path)
                status = settings.answer_status[cls]
                flow.response = answers.request_refused(entry.verdict, status, cls)
            flow.metadata[LOCAL_ANSWER] = True
        elif host is None:
            # CONNECT :0 and the server it is for is not gone: there is nowhere to send it.
            flow.response = answers.nowhere(name)
            flow.metadata[LOCAL_ANSWER] = True
        else:
            sidecar.forward(entry, "request")
            await self._pin(flow, host)
        sidecar.metrics.decision_by_stage["request"].observe(time.perf_counter() - started)

    async def _pin(self, flow: http.HTTPFlow, host: str) -> None:
        """Send this request to a checked address of its host (within its DNS TTL).

        mitmproxy pools upstream connections by the request's (host, port), and allows only
        five per address per client; dialling by a different address than the request
        names would open a new connection per request until the tunnel stalls. So the
        request itself names the checked IP (its Host header is kept), and server_connect
        puts the server name back as the TLS SNI for that connection. Plain-HTTP requests
        are pinned the same way, so a blocked address gets the 403 JSON answer.
        """
        if is_ip_literal(host):
            return  # server_connect checks literals itself
        address, refused, found = await self.sidecar.checked_address(host)
        if address is None:
            if refused:
                flow.response = answers.blocked_address(host, refused)
            else:
                flow.response = answers.unresolvable(host, answers.no_address_reason(host, found))
            flow.metadata[LOCAL_ANSWER] = True
            return
        if "host" not in flow.request.headers:
            flow.request.headers["Host"] = flow.request.host_header or host
        names = self.connections.upstream_names.setdefault(flow.client_conn, {})
        names[(address, flow.request.port)] = host
        flow.request.data.host = address

    def response_headers(self, flow: http.HTTPFlow) -> None:
        """A send_join answer is about to pass: stream it through a copy (BodyCopy)."""
        response = flow.response
        if (
            response is not None
            and response.status_code == 200
            and flow.request.method == "PUT"
            and self.sidecar.settings.prejudge_room
            and room_of(flow.request.path) is not None
        ):
            copy = BodyCopy()
            response.stream = copy
            flow.metadata[ROOM_BODY] = copy

    def response(self, flow: http.HTTPFlow) -> None:
        """Passive 410 learning from real responses, keyed by the request's destination."""
        response = flow.response
        if response is None or flow.metadata.get(LOCAL_ANSWER):
            return
        if response.status_code == 200 and flow.request.path.startswith(KEY_PATH):
            self._observe_keys(flow, response)
            return
        if response.status_code == 200 and flow.request.method == "PUT":
            room = room_of(flow.request.path)
            if room is not None:
                self._prejudge(flow, response, room)
                return
        if not gone_http.is_tombstone(response.status_code, flow.request.path):
            return
        try:
            name = destination(flow)
        except (InvalidName, XMatrixError):
            return
        sidecar = self.sidecar
        seconds = gone_http.lifetime(response.headers, sidecar.gone_ttl)
        where = f"https://{flow.request.host_header or flow.request.host}"
        path = flow.request.path.split("?", 1)[0]
        sidecar.policy.learn_gone(name, seconds, gone_http.evidence(410, path, where, seconds))

    def _prejudge(self, flow: http.HTTPFlow, response: http.Response, room: str) -> None:
        """A send_join answer passed (it is on its way to Synapse, unchanged): hand its
        body to the background judge. Only references are taken here; decoding and
        parsing happen later, off this hook."""
        copy = flow.metadata.pop(ROOM_BODY, None)  # the judge holds it only while it reads
        raw = response.raw_content
        if not self.sidecar.settings.prejudge_room:
            return
        if isinstance(copy, BodyCopy):
            read_raw = copy.body  # streamed through it (response_headers)
        elif raw:
            read_raw = lambda: raw  # noqa: E731 - buffered: the option was turned on meanwhile
        else:
            return
        encoding = response.headers.get("content-encoding", "")
        skip = set()
        with contextlib.suppress(XMatrixError, InvalidName):
            origin = xmatrix.parse(flow.request.headers.get("Authorization", "")).get("origin")
            if origin:
                skip.add(parse_authority(origin).host)  # the joining server: ourselves
        with contextlib.suppress(XMatrixError, InvalidName):
            skip.add(destination(flow))  # the server that answered: judged already
        room_id = "".join(  # for the log line: one line, whatever the path held
            c if c.isprintable() else "?" for c in urllib.parse.unquote(room)[:MAX_ROOM_ID_SHOWN]
        )
        self.sidecar.prejudge_room(room_id, lambda: decoded(read_raw(), encoding), frozenset(skip))

    def _observe_keys(self, flow: http.HTTPFlow, response: http.Response) -> None:
        """Intercept mode: record the signing keys an alive server published to Synapse."""
        try:
            name = destination(flow)
        except (InvalidName, XMatrixError):
            return
        port = flow.request.port
        names = self.connections.upstream_names.get(flow.client_conn, {})
        pinned = names.get((flow.request.host, port))
        target = (pinned or normalize_host(flow.request.host), port)  # a name, not the IP
        self.sidecar.observe_keys(name, response.content or b"", target)


def destination(flow: http.HTTPFlow, tunnel: Tunnel | None = None) -> str:
    """X-Matrix `destination`, else the Host header, else the TLS SNI of a `CONNECT :0`
    tunnel, else the request's host."""
    named = xmatrix.destination(flow.request.headers.get("Authorization"))
    if named is not None:
        return parse_authority(named).host
    host = flow.request.host_header
    if host:
        return parse_authority(host).host
    if tunnel is not None and tunnel.empty:
        if tunnel.sni is None:
            raise InvalidName("CONNECT :0 without a TLS server name or Host header")
        return tunnel.sni
    return normalize_host(flow.request.host)
