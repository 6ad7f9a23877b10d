"""Active HTTP probes: how pass-through mode learns `410 Gone` without seeing responses.

The first time a server name is seen (and when its http_410 verdict expires) the sidecar
asks the server itself, in the background, where Synapse would ask it:

- a name first seen on port 443 (Synapse's well-known lookup goes there first), or one up
  for lifting: the whole of discovery (discovery.py): the well-known (a 410 there is the
  answer, nothing more is asked), then `m.server`, SRV, 8448, and
  `GET /_matrix/key/v2/server` where that leads;
- a name first seen elsewhere (Synapse resolved it already: an explicit port, an SRV
  target, a delegation): its well-known (a 410 there is the answer), then the key
  request on that connection target, with the name as SNI: where Synapse is sending its
  own traffic.

A key request that answers 200 hands its document on (`ProbeResult.body`): the signing
keys the resurrection check records, without a connection of their own.

The hosts a discovery leads to (a delegated host, an SRV target) are not server names:
they are not probed on their own while their server's route is remembered. Certificates
are verified (system store plus `--upstream-ca`), only addresses the address policy allows
are dialled, everything has a deadline. The live request is never delayed by a probe, and
a probe that fails (timeout, TLS error, refused) is never a verdict.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cachetools import TTLCache

from sidecar.dns.client import DnsClient
from sidecar.judge import gone_http
from sidecar.judge.names import is_ip_literal
from sidecar.judge.signals import Finding
from sidecar.judge.ttl import TtlBounds
from sidecar.metrics import Metrics
from sidecar.remote import http1
from sidecar.remote.addresses import AddressPolicy
from sidecar.remote.discovery import (
    API_PATH,
    WELL_KNOWN_PATH,
    WELL_KNOWN_PORT,
    HttpReport,
    ProbeResult,
    Route,
    at_endpoint,
    discover,
)
from sidecar.remote.identity import MAX_KEY_DOCUMENT_BYTES

log = logging.getLogger("sidecar.probe")

__all__ = ["API_PATH", "WELL_KNOWN_PATH", "ProbeResult", "ProbeSettings", "Prober"]

MAX_BODY_BYTES = MAX_KEY_DOCUMENT_BYTES  # a well-known (its m.server) or a key document
USER_AGENT = "tombstone-sidecar-probe"
MAX_REMEMBERED = 100_000  # names whose last probe time (and route) is kept
_OUTCOMES = {Finding.GONE: "gone", Finding.CLEAR: "answered", Finding.UNKNOWN: "failed"}

Resolve = Callable[[str], Awaitable[tuple[str, ...]]]
Gone = Callable[[str], bool]  # a host judged gone now: never dialled, not even by a probe


@dataclass(frozen=True)
class ProbeSettings:
    timeout: float
    concurrency: int
    interval: float  # at most one probe per name per interval
    ttl: TtlBounds
    ca_file: str | None


class Prober:
    """Runs probes: bounded concurrency, per-name rate limit, never raises."""

    def __init__(
        self,
        settings: ProbeSettings,
        metrics: Metrics,
        addresses: AddressPolicy,
        resolve: Resolve,
        *,
        dns: DnsClient | None = None,
        gone: Gone | None = None,
    ) -> None:
        """`dns` asks the SRV questions of discovery (`probe`); `fetch` alone needs none.
        `gone`: hosts a route may lead to that must not be asked (judged gone)."""
        self.settings = settings
        self.addresses = addresses
        self._metrics = metrics
        self._resolve = resolve
        self._dns = dns
        self._gone = gone
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._last: TTLCache[str, float] = TTLCache(MAX_REMEMBERED, settings.interval)
        # name -> where its federation API is; a delegated host / SRV target -> its server
        self._routes: TTLCache[str, Route] = TTLCache(MAX_REMEMBERED, settings.interval)
        self._endpoints: TTLCache[str, str] = TTLCache(MAX_REMEMBERED, settings.interval)
        self._tasks: set[asyncio.Task[None]] = set()
        self._context = ssl.create_default_context()
        if settings.ca_file:
            self._context.load_verify_locations(settings.ca_file)

    def due(self, name: str) -> bool:
        """Not probed within the interval, and not a host another server's route leads to."""
        return name not in self._last and name not in self._endpoints

    def route_of(self, name: str) -> Route | None:
        """Where `name`'s federation API was found by its last probe (within the interval)."""
        return self._routes.get(name)

    def schedule(
        self,
        name: str,
        seen: tuple[str, int] | None,
        on_result: Callable[[str, ProbeResult], None],
    ) -> None:
        """Probe `name` in the background unless it was probed within the interval;
        `seen` is the connection target it was seen on (see the module docstring)."""
        if not self.due(name):
            return
        self._last[name] = time.monotonic()

        async def run() -> None:
            on_result(name, await self.probe(name, seen, skip_endpoints=True))

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def probe(
        self, name: str, seen: tuple[str, int] | None = None, skip_endpoints: bool = False
    ) -> ProbeResult:
        """Ask `name` where Synapse would (the module docstring); the first tombstone wins,
        any real answer means not gone. `skip_endpoints` (a first-sight probe): nothing is
        asked of a host that turned out, while this probe waited for a slot, to be another
        server's route, or to be gone (intercept mode learns a 410 from Synapse's own
        request; a join queues hundreds of probes: the scale world saw them dial 410
        servers after their verdict)."""
        self._last[name] = time.monotonic()
        async with self._slots:
            owner = self._endpoints.get(name)
            if skip_endpoints and owner is not None:
                return ProbeResult("failed", f"{name} is where {owner} serves federation")
            if skip_endpoints and self.judged_gone(name):
                return ProbeResult("failed", f"{name} was judged gone while the probe waited")
            fetcher = _ForServer(self, name, first_sight=skip_endpoints)
            if seen is not None and seen != (name, WELL_KNOWN_PORT):
                route = Route(name, seen)
                self._learn(name, route)
                report = await at_endpoint(fetcher, route, well_known=not is_ip_literal(name))
            elif self._dns is None:
                return ProbeResult("failed", f"{name}: no resolver for discovery")
            else:
                report = await discover(
                    fetcher,
                    self._dns,
                    name,
                    stop_at_gone=True,
                    on_route=lambda route: self._learn(name, route),
                )
        return self._result(report)

    def judged_gone(self, host: str) -> bool:
        return self._gone is not None and self._gone(host)

    def _learn(self, name: str, route: Route) -> None:
        self._routes[name] = route
        for host in route.hosts - {name}:
            self._endpoints[host] = name

    def _result(self, report: HttpReport) -> ProbeResult:
        fetched = [s for s in report.steps if s.step != "srv"]
        for step in fetched:
            self._metrics.probes.labels(_OUTCOMES[step.finding]).inc()
        gone = report.gone
        if gone is not None:
            return ProbeResult("gone", gone.detail, gone.lifetime or 0.0, gone.status or 0)
        route = report.route if report.api_answered else None
        answered = next((s for s in fetched if s.finding is Finding.CLEAR), None)
        if answered is not None:
            detail = f"{answered.where}: {answered.detail}"
            keys = next((s.body for s in fetched if s.step == "keys"), b"")
            return ProbeResult("answered", detail, 0.0, answered.status or 0, keys, route)
        detail = "; ".join(s.detail for s in fetched) or "no request made"
        return ProbeResult("failed", detail)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def fetch(
        self, name: str, target: tuple[str, int], path: str, body: bool = False
    ) -> ProbeResult:
        """GET `path` from `target` as server `name` (SNI, Host), judged by gone_http."""
        host, port = target
        where = f"https://{name}" if (host, port) == (name, 443) else f"https://{host}:{port}"
        try:
            address = await self._address(host)
            if address is None:
                return ProbeResult("failed", f"{where}: no address the policy allows")
            reply = await http1.request(
                address,
                port,
                "GET",
                path,
                host_header=name if port == 443 else f"{name}:{port}",
                headers={"User-Agent": USER_AGENT},
                tls=self._context,
                server_hostname=name,
                seconds=self.settings.timeout,
                limit=MAX_BODY_BYTES,
                read_body=body,
            )
            status, headers, content = reply.status, reply.headers, reply.body
        except TimeoutError:
            return ProbeResult("failed", f"{where}{path}: no answer in {self.settings.timeout:g}s")
        except (OSError, ssl.SSLError, ValueError) as e:
            return ProbeResult("failed", f"{where}{path}: {e}")
        if gone_http.is_tombstone(status, path):
            seconds = gone_http.lifetime(headers, self.settings.ttl)
            evidence = gone_http.evidence(status, path, where, seconds)
            return ProbeResult("gone", evidence, seconds, status, content)
        return ProbeResult("answered", f"{where}{path}: {status}", 0.0, status, content)

    async def _address(self, host: str) -> str | None:
        address, _ = self.addresses.choose(await self._resolve(host))
        return address


class _ForServer:
    """The prober's fetch for one server's probe: a host its route leads to (a delegated
    host, an SRV target) that is judged gone is not asked, as the proxy would not dial it;
    nor is the server itself once judged gone during a first-sight probe (intercept mode
    learns a 410 from Synapse's own request between two of the probe's steps). Its re-check
    asks it (the 410 verdict is up for lifting)."""

    def __init__(self, prober: Prober, server: str, first_sight: bool) -> None:
        self._prober = prober
        self._server = server
        self._first_sight = first_sight

    async def fetch(
        self, name: str, target: tuple[str, int], path: str, body: bool = False
    ) -> ProbeResult:
        hosts = {name, target[0]}
        for host in hosts if self._first_sight else hosts - {self._server}:
            if self._prober.judged_gone(host):
                return ProbeResult("failed", f"{host} is judged gone: not asked {path}")
        return await self._prober.fetch(name, target, path, body)
