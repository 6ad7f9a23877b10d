"""Helpers for the intercept-mode scenarios (test_i*): a fake remote that can turn 410 at
runtime, and a Synapse behind its own (intercepting or probing) sidecar.

The switchable remote listens on 127.0.3.1:443 and :8448 (new addresses; the rest of the
world is untouched) and answers for the server names it is given, each with its own
signing key and `#lobby`. `gone` is the set of names it answers `410 Gone` for, on every
path including the well-known; tests add and remove names while Synapse holds pooled
connections to it. Every request is recorded with its arrival time, so a test can ask
what reached the remote after a moment (a 410, a probe's completion).
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.federation import FakeHomeserver
from tests.e2e.world import FEDERATION, World
from tests.support.sidecar_process import Sidecar
from tests.support.synapse_server import Account, Synapse
from tests.support.tls_upstream import Request, Response, Upstream

FLIP_IP = "127.0.3.1"
FLIP_PORTS = (443, 8448)
GONE_BODY = b'{"errcode":"M_UNKNOWN","error":"this server is gone"}'
PROBE_AGENT = "tombstone-sidecar-probe"  # sidecar/probe.py USER_AGENT
_ports = itertools.count(8020)


@dataclass(frozen=True)
class Seen:
    """One request the switchable remote received."""

    at: float  # time.monotonic() on arrival
    server: str  # the server name it was for (X-Matrix destination, else Host)
    line: str  # "GET /path"
    status: int  # what the remote answered
    agent: str
    wall: float = 0.0  # time.time() on arrival, to compare with the sidecar's log
    connection: tuple[int, int] = (0, 0)  # (remote port, connection number on it)

    @property
    def from_probe(self) -> bool:
        return self.agent.startswith(PROBE_AGENT)


class FlipRemote:
    """Live servers whose answers can be switched to 410 for everything, at runtime."""

    def __init__(self, world: World, names: Sequence[str]) -> None:
        self.world = world
        self.names = list(names)
        self.fake = FakeHomeserver({n: n for n in names})
        self.gone: set[str] = set()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self.upstreams: list[Upstream] = []

    def start(self) -> FlipRemote:
        for name in self.names:
            self.world.zone.add(name, "A", FLIP_IP, ttl=1)
        for port in FLIP_PORTS:
            upstream = Upstream(
                self.world.ca,
                self.names,
                host=FLIP_IP,
                port=port,
                handler=functools.partial(self._handle, port),
            )
            self.upstreams.append(upstream.start())
        return self

    def stop(self) -> None:
        for upstream in self.upstreams:
            upstream.stop()

    def _handle(self, port: int, request: Request) -> Response:
        server = self.fake.server_for(request) or "?"
        if server in self.gone:
            response = Response(410, GONE_BODY, {"Content-Type": "application/json"})
        else:
            response = self.fake.handler(request)
        with self._lock:
            self.seen.append(
                Seen(
                    time.monotonic(),
                    server,
                    f"{request.method} {request.path}",
                    response.status,
                    request.headers.get("user-agent", ""),
                    time.time(),
                    (port, request.connection_id),
                )
            )
        return response

    def requests_for(self, server: str, since: float = 0.0) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.server == server and s.at >= since]


@dataclass
class Behind:
    """A fresh Synapse behind its own sidecar, and a user of it."""

    sidecar: Sidecar
    synapse: Synapse
    account: Account


def sidecar_bundle(sidecar: Sidecar, world: World, destination: Path) -> Path:
    """The intercepting sidecar's CA (made in its state dir at start) plus the world's CA:
    the `federation_custom_ca_list` of a Synapse behind it."""
    ours = (sidecar.state_dir / "ca" / "mitmproxy-ca-cert.pem").read_text()
    destination.write_text(ours.rstrip("\n") + "\n" + world.ca.ca_pem.decode())
    return destination


def start_behind(world: World, label: str, sidecar_args: Sequence[str]) -> Behind:
    """A sidecar with `sidecar_args` and a fresh Synapse federating through it (trusting
    the sidecar's CA when it intercepts). Both are stopped with the world."""
    sidecar = world.start_sidecar(sidecar_args)
    ca_file = None
    if "intercept" in sidecar_args:
        ca_file = sidecar_bundle(sidecar, world, world.directory / f"{label}-ca-bundle.pem")
    port = next(_ports)
    synapse = world.start_synapse(
        label, f"hs-{port}.test", port, sidecar.proxy_url, ca_file=ca_file, federation=FEDERATION
    )
    return Behind(sidecar, synapse, synapse.register("alice"))
