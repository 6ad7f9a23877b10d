"""Active HTTP probes: how pass-through mode learns `410 Gone` without seeing responses.

The first time a server name is seen (and when its http_410 verdict expires) the sidecar
fetches, in the background, `https://<name>/.well-known/matrix/server` and
`GET /_matrix/federation/v1/version` on the connection target, the way a remote homeserver
would: certificates verified (system store plus `--upstream-ca`), only addresses the
address policy allows, a deadline on everything. The live request is never delayed by a
probe, and a probe that fails (timeout, TLS error, refused) is never a verdict.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cachetools import TTLCache

from sidecar.judge import gone_http
from sidecar.judge.ttl import TtlBounds
from sidecar.metrics import Metrics
from sidecar.remote import http1
from sidecar.remote.addresses import AddressPolicy

log = logging.getLogger("sidecar.probe")

WELL_KNOWN_PATH = "/.well-known/matrix/server"
VERSION_PATH = "/_matrix/federation/v1/version"
MAX_BODY_BYTES = 64 * 1024  # a well-known document (`check --probe` reads its m.server)
USER_AGENT = "tombstone-sidecar-probe"
MAX_REMEMBERED = 100_000  # names whose last probe time is kept for the rate limit

Resolve = Callable[[str], Awaitable[tuple[str, ...]]]


@dataclass(frozen=True)
class ProbeResult:
    """`gone` with a lifetime and evidence, `answered` (not a tombstone), or `failed`."""

    outcome: str  # "gone" | "answered" | "failed"
    detail: str
    lifetime: float = 0.0
    status: int = 0  # the HTTP status when there was an answer
    body: bytes = b""  # only when asked for (`fetch(..., body=True)`)


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
        self, settings: ProbeSettings, metrics: Metrics, addresses: AddressPolicy, resolve: Resolve
    ) -> None:
        self.settings = settings
        self.addresses = addresses
        self._metrics = metrics
        self._resolve = resolve
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._last: TTLCache[str, float] = TTLCache(MAX_REMEMBERED, settings.interval)
        self._tasks: set[asyncio.Task[None]] = set()
        self._context = ssl.create_default_context()
        if settings.ca_file:
            self._context.load_verify_locations(settings.ca_file)

    def due(self, name: str) -> bool:
        return name not in self._last

    def schedule(
        self,
        name: str,
        target: tuple[str, int] | None,
        on_result: Callable[[str, ProbeResult], None],
    ) -> None:
        """Probe `name` in the background unless it was probed within the interval."""
        if name in self._last:
            return
        self._last[name] = time.monotonic()

        async def run() -> None:
            on_result(name, await self.probe(name, target))

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def probe(self, name: str, target: tuple[str, int] | None) -> ProbeResult:
        """Both probes; the first tombstone wins, any real answer means not gone."""
        self._last[name] = time.monotonic()
        target = target or (name, 8448)
        async with self._slots:
            results = [await self.fetch(name, (name, 443), WELL_KNOWN_PATH)]
            if results[0].outcome != "gone":
                results.append(await self.fetch(name, target, VERSION_PATH))
        for result in results:
            self._metrics.probes.labels(result.outcome).inc()
        gone = next((r for r in results if r.outcome == "gone"), None)
        if gone is not None:
            return gone
        answered = next((r for r in results if r.outcome == "answered"), None)
        return answered or results[-1]

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
