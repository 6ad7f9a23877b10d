"""Admission on the proxy port: nothing is done or held for a client until it is admitted.

One mitmproxy addon, loaded before `TombstoneAddon`, owns everything between a client's
TCP connect and its first admitted request (modelled on mitmproxy's own proxyauth addon:
one concern, hooks that return early):

- proxy authentication (`--proxy-auth-file`): 407 unless `Proxy-Authorization` is right;
  a CONNECT that passes admits its whole tunnel, a plain-HTTP request must carry it each
  time. Without the option the first request head admits the connection.
- credentials never leave: hop-by-hop headers (`Proxy-Authorization`, `Proxy-Connection`,
  `Keep-Alive`, `TE` and every header `Connection` names) are removed from each request
  before it is forwarded, plain HTTP and inside intercepted tunnels alike; `Connection`
  keeps only close/keep-alive/upgrade, which mitmproxy reads for the client's connection.
- a regular proxy listener speaks HTTP first: TLS without a CONNECT is closed at the layer
  decision, before any addon sees its ClientHello (its SNI is never resolved or probed).
- pre-admission limits: the first request head must be complete and admitted within
  `--head-timeout` (idle and half-sent connections are closed), may not exceed
  `--max-head-size` (431), and at most `--max-pending-clients` connections may wait for
  admission at once (the oldest is closed to make room for a new one).

- a refusal at the first bytes: a CONNECT whose whole head arrived at once, whose
  credentials (if any are required) are right, and whose target the sidecar refuses
  without waiting for anything (`refuse_early`: a cached gone name under `--refusal
  close`) is closed at the layer decision, before mitmproxy's HTTP layer, its flow and the
  hooks that follow (tests/bench: the CPU per refused CONNECT). Any other head, and every
  client with wrong or missing credentials, takes the HTTP layer as before (407 first).

A hook of this addon that raises refuses: the connection is closed or answered 502, with
one rate-limited ERROR line and `tombstone_admission_refused_total{reason="error"}`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import time
import weakref
from collections.abc import Callable, MutableSet
from dataclasses import dataclass

from mitmproxy import connection, ctx, exceptions, http
from mitmproxy.net.http.http1 import assemble_response
from mitmproxy.net.tls import starts_like_tls_record
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import HttpLayer
from mitmproxy.proxy.layers.http import HTTPMode
from mitmproxy.proxy.layers.modes import HttpProxy
from mitmproxy.proxy.mode_specs import RegularMode

from sidecar.config.options import (
    BY_NAME,
    MITMPROXY,
    ConfigError,
    RawOptions,
    Settings,
    open_proxy_problem,
)
from sidecar.metrics import Metrics
from sidecar.proxy import answers
from sidecar.proxy.auth import ProxyAuth
from sidecar.proxy.connect_head import read_connect_head
from sidecar.proxy.connections import end_connection
from sidecar.proxy.empty_connect import CloseClient

log = logging.getLogger("sidecar.admission")

OPTIONS = tuple(
    BY_NAME[name]
    for name in (
        "proxy_auth_file",
        "head_timeout",
        "max_head_size",
        "max_pending_clients",
        "allow_open_proxy",
    )
)
# Hop-by-hop headers a proxy must not forward (RFC 9110 §7.6.1), besides those `Connection`
# names. Proxy-Authorization carries the proxy's password: it must never reach an origin.
HOP_BY_HOP = ("proxy-connection", "proxy-authorization", "keep-alive", "te")
# Named by `Connection` or not, these frame the message (mitmproxy re-frames it from them)
# or name its target: removing them would make the forwarded request a different one.
FRAMING = frozenset({"host", "content-length", "transfer-encoding", "upgrade"})
# The `Connection` tokens that stay: mitmproxy reads the request's own `Connection` to
# manage the client's connection (close after the answer, upgrade to WebSocket), and for
# the next hop they mean the same. Every other token goes, with the header it names.
CONNECTION_TOKENS = ("close", "keep-alive", "upgrade")
HEAD_END = re.compile(rb"\n\r?\n")  # where h11 (mitmproxy's HTTP/1 parser) ends a head
LOG_EVERY = 60.0  # seconds between two log lines about the same kind of refusal
# `--max-pending-clients auto`: a quarter of the open-file limit after this many descriptors
# for the process itself (11 measured at rest: listeners, epoll, DNS, state file) and a
# burst of accepts not yet refused (asyncio accepts up to 100 at once), at most
# AUTO_MAX_PENDING; the other three quarters are for tunnels (two each) and the ops port.
RESERVED_FDS = 128
AUTO_MAX_PENDING = 1024
MIN_PENDING = 8


def strip_hop_by_hop(headers: http.Headers) -> list[str]:
    """Remove the hop-by-hop headers of a request about to be forwarded; the names removed.

    `Connection` keeps only its close/keep-alive/upgrade tokens. Headers that frame the
    message or name its host stay even when `Connection` names them (a client could
    otherwise make the forwarded request differ from the one judged).
    """
    connection = _tokens(headers.get_all("connection"))
    named = connection | _tokens(headers.get_all("proxy-connection"))
    removed = []
    for name in [*HOP_BY_HOP, *sorted(named - FRAMING - {"connection", *CONNECTION_TOKENS})]:
        if name and name in headers:
            del headers[name]
            removed.append(name)
    if "connection" in headers:
        kept = [token for token in CONNECTION_TOKENS if token in connection]
        if kept:
            headers["connection"] = ", ".join(kept)
        else:
            del headers["connection"]
            removed.append("connection")
    return removed


def _tokens(values: list[str]) -> set[str]:
    return {token.strip().lower() for value in values for token in value.split(",")}


@dataclass(frozen=True, slots=True)
class Limits:
    head_timeout: float
    max_head_size: int
    max_pending: int


# (host, port) of a CONNECT -> True when it is refused at once (and counted as such).
RefuseEarly = Callable[[str, int], bool]


class Admission:
    """The addon; see the module docstring. `metrics` is the sidecar's one registry.

    It reads its own options in `configure`, as mitmproxy's addons do, so it needs nothing
    from TombstoneAddon but the declaration of the options (the one table in options.py):
    the same under `tombstone-sidecar run` and `mitmdump -s addons/tombstone.py`.
    """

    def __init__(
        self,
        metrics: Metrics,
        settings: Settings | None = None,
        refuse_early: RefuseEarly | None = None,
    ) -> None:
        """`settings`: given whole by `tombstone-sidecar run` (which refuses an open proxy
        before it starts); None under mitmdump, where `configure` reads the options.
        `refuse_early(host, port)`: True when a CONNECT to that target is refused at once,
        counted by the caller (TombstoneAddon.refuse_early); None: never early."""
        self.metrics = metrics
        self.given = settings
        self.refuse_early = refuse_early
        self.auth: ProxyAuth | None = None
        self.open_proxy: str | None = None  # why the listener would be an open proxy
        self.limits: Limits | None = None
        # Clients not admitted yet, oldest first, with their --head-timeout timer.
        self.pending: dict[connection.Client, asyncio.TimerHandle | None] = {}
        # Clients whose CONNECT carried the right credentials: their tunnel is theirs.
        self.tunnels: MutableSet[connection.Client] = weakref.WeakSet()
        self._next_log: dict[str, float] = {}
        self._held_back: dict[str, int] = {}
        metrics.pending_clients.set_function(lambda: len(self.pending))
        if settings is not None:
            self.apply(settings)

    # -- configuration -------------------------------------------------------------------

    def configure(self, updated: set[str]) -> None:
        if self.given is not None:
            return
        if (
            self.limits is not None
            and "listen_host" not in updated
            and not any(o.mitm in updated for o in OPTIONS)
        ):
            return
        if not all(o.mitm in ctx.options for o in OPTIONS):
            return  # TombstoneAddon declares the options; not all of them yet
        # Settings.from_raw validates exactly as for every other option; fields not given
        # keep their defaults and are not used here.
        raw = {o.name: getattr(ctx.options, o.mitm) for o in OPTIONS}
        try:
            settings = Settings.from_raw(RawOptions(raw, fallback=MITMPROXY))
        except ConfigError as e:
            raise exceptions.OptionsError(str(e)) from None
        # mitmdump listens on every interface unless told otherwise: the same rule as
        # `tombstone-sidecar run --listen` (which checks before it starts mitmproxy). Judged
        # on every configure (the first one sees only defaults); while it holds, every
        # client is refused and `running` stops the proxy with the reason.
        listen_host = str(getattr(ctx.options, "listen_host", ""))
        self.open_proxy = open_proxy_problem(listen_host, settings)
        self.apply(settings)

    def apply(self, settings: Settings) -> None:
        self.auth = ProxyAuth(settings.proxy_users) if settings.proxy_users else None
        self.limits = Limits(
            settings.head_timeout,
            settings.max_head_size,
            settings.max_pending_clients or auto_max_pending(),
        )

    # -- hooks ---------------------------------------------------------------------------

    def running(self) -> None:
        if self.open_proxy is not None:
            # An ERROR at start-up makes mitmproxy's ErrorCheck exit with status 1.
            log.error("listen_host: %s", self.open_proxy)
            ctx.master.shutdown()

    def client_connected(self, client: connection.Client) -> None:
        if client.error or not _regular(client):
            return
        if self.open_proxy is not None:
            client.error = "refused: this proxy would be open to anyone (see the log)"
            return
        try:
            limits = self._limits()
            while len(self.pending) >= limits.max_pending:
                self._evict_oldest()
            timer = asyncio.get_running_loop().call_later(limits.head_timeout, self._expire, client)
            self.pending[client] = timer
        except Exception as e:
            self._failed("client_connected", e)
            client.error = "admission failed"

    def client_disconnected(self, client: connection.Client) -> None:
        self._admit(client)  # nothing left to wait for

    def next_layer(self, nextlayer: layer.NextLayer) -> None:
        """The first layer of a regular proxy connection: HTTP with a bounded head, or
        closed. Under `run` mitmproxy's NextLayer addon has chosen already; under
        `mitmdump -s` this script's hook runs before it, so the choice is made here, as
        NextLayer makes it for an explicit HTTP proxy (TLS first, else HTTP). A CONNECT
        refused at once (`refuse_early`) is closed here, before any HTTP layer."""
        context = nextlayer.context
        if not (context.layers and isinstance(context.layers[0], HttpProxy)):
            return
        chosen = nextlayer.layer
        # Chosen layers register themselves in context.layers (a TLS stack: two of them).
        depth = _index(context.layers, chosen)
        if depth != 1:
            return  # deeper: inside an admitted tunnel
        try:
            limit = self._limits().max_head_size
            if chosen is None:
                data = nextlayer.data_client()
                if not data:
                    return  # nothing to decide on yet
                tls_first = starts_like_tls_record(data)
            else:
                tls_first = type(chosen) is not HttpLayer or chosen.mode is not HTTPMode.regular
            if tls_first:
                # mitmproxy chose TLS (a ClientHello sent straight to the proxy port) or
                # anything else that is not an HTTP proxy request: refuse before any addon
                # sees a ClientHello, authenticated or not.
                self._refuse(nextlayer, "tls_without_connect")
                return
            if self.refuse_early is not None and self._refused_early(nextlayer, limit):
                return
            del context.layers[1:]  # mitmproxy's HttpLayer registered itself there
            nextlayer.layer = HeadLimitedHttpLayer(context, limit, self)
        except Exception as e:
            self._failed("next_layer", e)
            _close_instead(nextlayer)

    def http_connect(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        try:
            if self._authenticate(flow):
                self.tunnels.add(flow.client_conn)
        except Exception as e:
            self._failed("http_connect", e)
            flow.response = _refused()

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        """Plain-HTTP proxy requests and requests inside intercepted tunnels."""
        if flow.response is not None:
            return
        try:
            if flow.client_conn not in self.tunnels and not self._authenticate(flow):
                return
            strip_hop_by_hop(flow.request.headers)
        except Exception as e:
            self._failed("requestheaders", e)
            flow.response = _refused()

    # -- internals -----------------------------------------------------------------------

    def _limits(self) -> Limits:
        # A method, not a property: mitmproxy's command collector reads every attribute.
        if self.limits is None:
            raise RuntimeError("admission is not configured")
        return self.limits

    def _refused_early(self, nextlayer: layer.NextLayer, limit: int) -> bool:
        """Close a CONNECT that `refuse_early` refuses, from its first bytes (see
        `refuses_first_bytes`); False, and nothing done, otherwise."""
        if not self._refuses(nextlayer.context.client, nextlayer.data_client(), limit):
            return False
        _close_instead(nextlayer)
        return True

    def refuses_first_bytes(self, client: connection.Client, data: bytes) -> bool:
        """True when the client's first bytes are a CONNECT refused at once: the caller
        closes the connection (FirstBytesProxy, before mitmproxy's first layer decision
        and its hook). Fails closed: an error is counted, logged and refuses."""
        if self.refuse_early is None or not _regular(client):
            return False
        try:
            return self._refuses(client, data, self._limits().max_head_size)
        except Exception as e:
            self._failed("first_bytes", e)
            return True

    def _refuses(self, client: connection.Client, data: bytes, limit: int) -> bool:
        """False (and nothing done) for any head that needs mitmproxy's HTTP layer:
        incomplete, unusual, over the head limit, without the right credentials, or a
        target not refused now; else the client is admitted (its refusal is counted by
        `refuse_early`) and True."""
        assert self.refuse_early is not None
        head = read_connect_head(data, limit)
        if head is None:
            return False
        if self.auth is not None and not self.auth.check(head.proxy_authorization):
            return False  # the HTTP layer answers 407 and counts the failure
        if not self.refuse_early(head.host, head.port):
            return False
        self._admit(client)  # authenticated; closed now, no timer needed
        return True

    def _authenticate(self, flow: http.HTTPFlow) -> bool:
        """With --proxy-auth-file, answer 407 unless Proxy-Authorization is right; a request
        that passes admits its connection."""
        auth = self.auth
        if auth is not None and not auth.check(flow.request.headers.get("Proxy-Authorization")):
            self.metrics.proxy_auth_failures.inc()
            flow.response = answers.proxy_auth_required()
            return False
        self._admit(flow.client_conn)
        return True

    def _admit(self, client: connection.Client) -> None:
        timer = self.pending.pop(client, None)
        if timer is not None:
            timer.cancel()

    def _expire(self, client: connection.Client) -> None:
        if client in self.pending:
            del self.pending[client]
            self._close(client, "timeout")

    def _evict_oldest(self) -> None:
        client, timer = next(iter(self.pending.items()))
        del self.pending[client]
        if timer is not None:
            timer.cancel()
        if self._may_log("evicted"):
            log.warning(
                "%d proxy connections are waiting to be admitted (--max-pending-clients): "
                "closing the oldest to make room; a client is connecting without sending "
                "requests%s",
                len(self.pending) + 1,
                self._held_back_note("evicted"),
            )
        self._close(client, "evicted")

    def _close(self, client: connection.Client, reason: str) -> None:
        """Close a client not admitted in time or evicted; counted by `reason`."""
        self.metrics.admission_refused.labels(reason).inc()
        end_connection(client, f"not admitted: {reason}")

    def _refuse(self, nextlayer: layer.NextLayer, reason: str) -> None:
        self.metrics.admission_refused.labels(reason).inc()
        _close_instead(nextlayer)
        if self._may_log(reason):
            log.info(
                "closed a proxy connection that started with TLS instead of CONNECT (from %s)%s",
                _peer(nextlayer.context.client),
                self._held_back_note(reason),
            )

    def too_large(self, client: connection.Client) -> None:
        """Counted and logged when HeadLimitedHttpLayer answers 431."""
        self.metrics.admission_refused.labels("too_large").inc()
        self._admit(client)  # being closed: no timer needed
        if self._may_log("too_large"):
            log.info(
                "answered 431 to a proxy request head over --max-head-size %d bytes (from %s)%s",
                self._limits().max_head_size,
                _peer(client),
                self._held_back_note("too_large"),
            )

    def _failed(self, hook: str, error: Exception) -> None:
        self.metrics.admission_refused.labels("error").inc()
        if self._may_log("error"):
            log.error(
                "admission %s hook failed (%s: %s); refusing the connection%s",
                hook,
                type(error).__name__,
                error,
                self._held_back_note("error"),
            )
            log.debug("admission %s hook failed", hook, exc_info=error)  # the traceback

    def _may_log(self, kind: str) -> bool:
        """At most one line per kind per LOG_EVERY seconds: unauthenticated clients must
        not be able to fill the log."""
        now = time.monotonic()
        if now < self._next_log.get(kind, 0.0):
            self._held_back[kind] = self._held_back.get(kind, 0) + 1
            return False
        self._next_log[kind] = now + LOG_EVERY
        return True

    def _held_back_note(self, kind: str) -> str:
        held = self._held_back.pop(kind, 0)
        return f" ({held} more like it since the last line)" if held else ""


def auto_max_pending(limit: int | None = None) -> int:
    """`--max-pending-clients auto` from the soft open-file limit (the CLI raises it first)."""
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if limit == resource.RLIM_INFINITY or limit < 0:
        return AUTO_MAX_PENDING
    return max(MIN_PENDING, min(AUTO_MAX_PENDING, (limit - RESERVED_FDS) // 4))


def _close_instead(nextlayer: layer.NextLayer) -> None:
    """Close the connection in place of whatever layer mitmproxy chose."""
    del nextlayer.context.layers[1:]  # the chosen layers registered themselves there
    nextlayer.layer = CloseClient(nextlayer.context)


def _index(layers: list[layer.Layer], chosen: layer.Layer | None) -> int:
    """How many layers lie above the one being chosen."""
    for index, each in enumerate(layers):
        if each is chosen:
            return index
    return len(layers)


def _regular(client: connection.Client) -> bool:
    return isinstance(client.proxy_mode, RegularMode)


def _peer(client: connection.Client) -> str:
    peer = client.peername
    return f"{peer[0]}:{peer[1]}" if peer else "unknown"


def _refused() -> http.Response:
    """502 for a request whose admission failed with an error: refused, never forwarded."""
    body = {
        "errcode": answers.ERRCODE_UNAVAILABLE,
        "error": "the proxy could not admit this request",
    }
    return http.Response.make(
        502, json.dumps(body).encode(), {"Content-Type": "application/json", "Connection": "close"}
    )


def _head_too_large(limit: int) -> bytes:
    body = {
        "errcode": answers.ERRCODE_TOO_LARGE,
        "error": f"request head larger than {limit} bytes (--max-head-size)",
    }
    response = http.Response.make(
        431, json.dumps(body).encode(), {"Content-Type": "application/json", "Connection": "close"}
    )
    return bytes(assemble_response(response))


class HeadLimitedHttpLayer(HttpLayer):
    """mitmproxy's HTTP proxy layer with a bound on the first request head.

    mitmproxy buffers a request head without limit until its blank line ("FIXME: protect
    against header size DoS" in its HTTP/1 server): three unauthenticated 40 MB header lines
    grew the sidecar's RSS by 120 MiB, never returned (tests/bench/preauth.py). This layer
    sees the client's bytes before mitmproxy's parser does, counts them until the first
    head's blank line, and answers 431 and closes once they exceed the limit. After the
    first head it only passes events on: by then the client is admitted, or answered 407
    with `Connection: close`. It takes HttpLayer's place in the layer stack,
    where mitmproxy's own layers and the sidecar's `CONNECT :0` check expect an HttpLayer.
    """

    def __init__(self, context: Context, limit: int, admission: Admission) -> None:
        super().__init__(context, HTTPMode.regular)
        self.limit = limit
        self.admission = admission
        self.received = 0
        self.gating = True
        self.started = False  # past any blank lines before the request line
        self.tail = b""  # last bytes seen, for a blank line split across two reads
        self.refused = False

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.refused:
            return  # closed: nothing more for mitmproxy's HTTP layer
        if (
            self.gating
            and isinstance(event, events.DataReceived)
            and event.connection is self.context.client
        ):
            head = self._head_bytes(event.data)
            if head is not None:
                self.gating = False  # the head is complete: the rest is not ours to count
            if (head if head is not None else self.received) > self.limit:
                self.refused = True
                self.admission.too_large(self.context.client)
                yield commands.SendData(self.context.client, _head_too_large(self.limit))
                yield commands.CloseConnection(self.context.client)
                return
            if not self.gating:
                # Admitted: mitmproxy's HttpLayer takes every later event itself, so the
                # tunnel's bytes pass one layer fewer (pooled keep-alive requests).
                self._handle_event = super()._handle_event  # type: ignore[method-assign]
        yield from super()._handle_event(event)

    def _head_bytes(self, data: bytes) -> int | None:
        """Count `data`; the length of the first head (blank line included) once it is
        complete, else None."""
        before = self.received
        self.received += len(data)
        if not self.started:
            stripped = data.lstrip(b"\r\n")  # h11 skips empty lines before a request line
            if not stripped:
                return None
            before += len(data) - len(stripped)
            data = stripped
            self.started = True
        window = self.tail + data
        end = HEAD_END.search(window)
        if end is not None:
            return before + end.end() - len(self.tail)
        self.tail = window[-2:]
        return None
