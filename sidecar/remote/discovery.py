"""Server discovery as the Matrix spec describes it and Synapse does it: where a server
name's federation API is, and the 410s that can appear on the way.

1. an IP literal or a name with an explicit port: that address, no well-known, no SRV;
2. `GET https://NAME/.well-known/matrix/server` (port 443): a 410 is a tombstone; a 200
   whose JSON names `m.server` delegates to that host (its port, or step 3 for it);
   anything else means no delegation;
3. SRV `_matrix-fed._tcp` then `_matrix._tcp` of the (delegated) host: its target, a `.`
   target (nobody connects), or none (port 8448);
4. `GET /_matrix/key/v2/server` there, with the (delegated) host as SNI and Host: the
   first thing any sender asks of a server. A 410 there is a tombstone on `/_matrix/`; a
   200 is the signing-key document the sidecar records for the resurrection check
   (identity.py). One request does both: with a version request beside a key fetch, a
   probe cost three TLS connections per live server, now two (tests/scale).

One walk for both users, so that they cannot disagree: `check NAME --probe` shows every
step, and the sidecar's background probe (probe.py) sends exactly these requests, so its
key requests go where Synapse sends federation traffic, never to port 443 of a server
that only serves its well-known there. Not done: following redirects on
well-known, well-known caching rules, CNAMEs beyond what the resolver does, and
IPv6-only targets when the address policy prefers IPv4.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sidecar.dns.client import DnsClient
from sidecar.judge.names import Authority, InvalidName, is_ip_literal, parse_authority
from sidecar.judge.signals import SRV_PREFIXES, Finding, choose_srv, srv_targets
from sidecar.remote.identity import KEY_PATH

WELL_KNOWN_PATH = "/.well-known/matrix/server"
API_PATH = KEY_PATH  # the federation API request of step 4
FEDERATION_PORT = 8448  # the spec's default when nothing delegates
WELL_KNOWN_PORT = 443


class Fetcher(Protocol):
    """GET `path` from `target` as server `name` (SNI and Host), judged by gone_http."""

    async def fetch(
        self, name: str, target: tuple[str, int], path: str, body: bool = False
    ) -> ProbeResult: ...


@dataclass(frozen=True)
class Route:
    """Where a server's federation API is: the host named in TLS SNI and Host (the
    delegated one, if any), and the host and port connected to."""

    sni: str
    target: tuple[str, int]

    @property
    def hosts(self) -> frozenset[str]:
        return frozenset((self.sni, self.target[0]))


@dataclass(frozen=True)
class ProbeResult:
    """`gone` with a lifetime and evidence, `answered` (not a tombstone), or `failed`."""

    outcome: str  # "gone" | "answered" | "failed"
    detail: str
    lifetime: float = 0.0
    status: int = 0  # the HTTP status when there was an answer
    body: bytes = b""  # only when asked for (`fetch(..., body=True)`)
    route: Route | None = None  # where the federation API answered (its keys are there)


@dataclass(frozen=True)
class HttpStep:
    """One step of discovery: what was asked, what came back, and what it means."""

    step: str  # "well_known" | "srv" | "keys"
    where: str
    finding: Finding  # GONE: a tombstone; CLEAR: an answer that is not one; UNKNOWN: no answer
    detail: str
    lifetime: float | None = None  # seconds a gone finding holds (sidecar's clamp)
    status: int | None = None
    body: bytes = b""  # the key document of a `keys` step that answered 200


@dataclass(frozen=True)
class HttpReport:
    steps: tuple[HttpStep, ...]
    route: Route | None  # where federation requests go; None when SRV says '.' (or stopped)

    @property
    def target(self) -> str | None:
        """host:port federation requests go to, for people."""
        return None if self.route is None else f"{self.route.target[0]}:{self.route.target[1]}"

    @property
    def gone(self) -> HttpStep | None:
        return next((s for s in self.steps if s.finding is Finding.GONE), None)

    @property
    def answered(self) -> bool:
        return any(s.finding is Finding.CLEAR for s in self.steps if s.step != "srv")

    @property
    def api_answered(self) -> bool:
        """The federation API itself answered (not a tombstone) at `route`."""
        return any(s.finding is Finding.CLEAR for s in self.steps if s.step == "keys")


async def discover(
    fetcher: Fetcher,
    dns: DnsClient,
    raw_name: str,
    *,
    stop_at_gone: bool = False,
    on_route: Callable[[Route], None] | None = None,
) -> HttpReport:
    """Walk discovery for `raw_name` (already validated by the caller). `stop_at_gone`: a
    410 on the well-known is the answer, nothing more is asked (the sidecar's probe; `check`
    shows the keys step too). `on_route` hears the route as soon as it is known, before
    the key request."""
    authority = parse_authority(raw_name, default_port=0)
    host, port = authority.host, authority.port
    steps: list[HttpStep] = []
    if port or is_ip_literal(host):
        route = Route(host, (host, port or FEDERATION_PORT))
        if on_route is not None:
            on_route(route)
        return await at_endpoint(fetcher, route)
    known = await fetcher.fetch(host, (host, WELL_KNOWN_PORT), WELL_KNOWN_PATH, body=True)
    delegated, step = _well_known_step(host, known)
    steps.append(step)
    if stop_at_gone and step.finding is Finding.GONE:
        return HttpReport(tuple(steps), None)
    sni = host
    target: tuple[str, int] | None
    if delegated is not None:
        sni = delegated.host
        if delegated.port or is_ip_literal(delegated.host):
            target = (delegated.host, delegated.port or FEDERATION_PORT)
        else:
            target, srv_step = await _srv(dns, delegated.host)
            steps.append(srv_step)
    else:
        target, srv_step = await _srv(dns, host)
        steps.append(srv_step)
    if target is None:
        return HttpReport(tuple(steps), None)
    route = Route(sni, target)
    if on_route is not None:
        on_route(route)
    steps.append(_api_step(await fetcher.fetch(sni, target, API_PATH, body=True), route))
    return HttpReport(tuple(steps), route)


async def at_endpoint(fetcher: Fetcher, route: Route, *, well_known: bool = False) -> HttpReport:
    """The key request at a route already known (an explicit port, or where Synapse is
    connecting): no SRV. `well_known`: the route's host's well-known first (a 410 there is
    the answer); a delegation it names is not followed, the route is where traffic goes."""
    steps: list[HttpStep] = []
    if well_known:
        host = route.sni
        known = await fetcher.fetch(host, (host, WELL_KNOWN_PORT), WELL_KNOWN_PATH, body=True)
        step = _well_known_step(host, known)[1]
        steps.append(step)
        if step.finding is Finding.GONE:
            return HttpReport(tuple(steps), None)
    result = await fetcher.fetch(route.sni, route.target, API_PATH, body=True)
    steps.append(_api_step(result, route))
    return HttpReport(tuple(steps), route)


def _well_known_step(host: str, result: ProbeResult) -> tuple[Authority | None, HttpStep]:
    where = f"https://{host}{WELL_KNOWN_PATH}"
    if result.outcome == "gone":
        return None, HttpStep(
            "well_known", where, Finding.GONE, result.detail, result.lifetime, result.status
        )
    if result.outcome == "failed":
        return None, HttpStep("well_known", where, Finding.UNKNOWN, result.detail)
    if result.status != 200:
        return None, HttpStep(
            "well_known",
            where,
            Finding.CLEAR,
            f"{result.status}: no delegation, not a tombstone",
            None,
            result.status,
        )
    server = _m_server(result.body)
    if server is None:
        return None, HttpStep(
            "well_known",
            where,
            Finding.CLEAR,
            "200 without a usable m.server: no delegation",
            None,
            result.status,
        )
    try:
        delegated = parse_authority(server, default_port=0)
    except InvalidName as e:
        return None, HttpStep(
            "well_known",
            where,
            Finding.CLEAR,
            f"200, m.server {server[:80]!r} is not a server name ({e}): ignored, as Synapse does",
            None,
            result.status,
        )
    return delegated, HttpStep(
        "well_known", where, Finding.CLEAR, f"200: delegates to {server}", None, result.status
    )


def _m_server(body: bytes) -> str | None:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    server = document.get("m.server") if isinstance(document, dict) else None
    return server if isinstance(server, str) and server else None


async def _srv(dns: DnsClient, host: str) -> tuple[tuple[str, int] | None, HttpStep]:
    # recent: the policy asked these for a name it just judged (one question set per name)
    fed = await dns.query(f"{SRV_PREFIXES[0]}.{host}", "SRV", recent=True)
    legacy = await dns.query(f"{SRV_PREFIXES[1]}.{host}", "SRV", recent=True)
    answer = choose_srv(fed, legacy)
    where = f"SRV {answer.name}"
    if answer.outcome != "ok":
        finding = Finding.CLEAR if answer.is_evidence else Finding.UNKNOWN
        return (host, FEDERATION_PORT), HttpStep(
            "srv",
            where,
            finding,
            f"no SRV record ({answer.outcome}): port {FEDERATION_PORT} of {host}",
        )
    targets = srv_targets(answer)
    if all(t == "." for t, _ in targets):
        return None, HttpStep(
            "srv",
            where,
            Finding.CLEAR,
            "target '.': senders that honour it never connect (the DNS signal dns_srv_dot above)",
        )
    target = next((t, p) for t, p in targets if t != ".")
    return target, HttpStep("srv", where, Finding.CLEAR, f"{target[0]}:{target[1]}")


def _api_step(result: ProbeResult, route: Route) -> HttpStep:
    where = f"https://{route.target[0]}:{route.target[1]}{API_PATH}"
    if result.outcome == "gone":
        return HttpStep("keys", where, Finding.GONE, result.detail, result.lifetime, result.status)
    if result.outcome == "failed":
        return HttpStep("keys", where, Finding.UNKNOWN, result.detail)
    body = result.body if result.status == 200 else b""
    detail = f"{result.status}: not a tombstone"
    return HttpStep("keys", where, Finding.CLEAR, detail, None, result.status, body)
