"""`check NAME --probe`: the HTTP side of a tombstone, found the way a remote homeserver looks.

Server discovery as the Matrix spec describes it and Synapse does it, as far as a 410 can
appear on the way:
1. an IP literal or a name with an explicit port: that address, no well-known, no SRV;
2. `GET https://NAME/.well-known/matrix/server` (port 443): a 410 is a tombstone; a 200
   whose JSON names `m.server` delegates to that host (its port, or step 3 for it);
   anything else means no delegation;
3. SRV `_matrix-fed._tcp` then `_matrix._tcp` of the (delegated) host: its target, a `.`
   target (nobody connects), or none (port 8448);
4. `GET /_matrix/federation/v1/version` there, with the (delegated) host as SNI and Host.
Not done: following redirects on well-known, well-known caching rules, CNAMEs beyond what
the resolver does, and IPv6-only targets when the address policy prefers IPv4. Every
fetch goes through `Prober.fetch` (same TLS trust, address policy and deadline as the
sidecar's probes) and every 410 is judged by `gone_http`, so the lifetimes shown are the
ones the sidecar would use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sidecar.dns.client import DnsClient
from sidecar.judge.names import Authority, InvalidName, is_ip_literal, parse_authority
from sidecar.judge.signals import SRV_PREFIXES, Finding, choose_srv, srv_targets
from sidecar.remote.probe import VERSION_PATH, WELL_KNOWN_PATH, Prober, ProbeResult

FEDERATION_PORT = 8448  # the spec's default when nothing delegates
WELL_KNOWN_PORT = 443
SYNAPSE_WELL_KNOWN_FAILURE_CACHE = 3600  # docs/design.md §2: Synapse caches a failed well-known 1 h


@dataclass(frozen=True)
class HttpStep:
    """One step of discovery: what was asked, what came back, and what it means."""

    step: str  # "well_known" | "srv" | "version"
    where: str
    finding: Finding  # GONE: a tombstone; CLEAR: an answer that is not one; UNKNOWN: no answer
    detail: str
    lifetime: float | None = None  # seconds a gone finding holds (sidecar's clamp)
    status: int | None = None


@dataclass(frozen=True)
class HttpReport:
    steps: tuple[HttpStep, ...]
    target: str | None  # host:port federation requests go to; None when SRV says '.'

    @property
    def gone(self) -> HttpStep | None:
        return next((s for s in self.steps if s.finding is Finding.GONE), None)

    @property
    def answered(self) -> bool:
        return any(s.finding is Finding.CLEAR for s in self.steps if s.step != "srv")


async def discover(prober: Prober, dns: DnsClient, raw_name: str) -> HttpReport:
    """Walk discovery for `raw_name` (already validated by the caller)."""
    authority = parse_authority(raw_name, default_port=0)
    host, port = authority.host, authority.port
    steps: list[HttpStep] = []
    target: tuple[str, int] | None
    if port or is_ip_literal(host):
        direct = (host, port or FEDERATION_PORT)
        steps.append(_version_step(await prober.fetch(host, direct, VERSION_PATH), direct))
        return HttpReport(tuple(steps), f"{direct[0]}:{direct[1]}")
    known = await prober.fetch(host, (host, WELL_KNOWN_PORT), WELL_KNOWN_PATH, body=True)
    delegated, step = _well_known_step(host, known)
    steps.append(step)
    sni = host
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
    steps.append(_version_step(await prober.fetch(sni, target, VERSION_PATH), target))
    return HttpReport(tuple(steps), f"{target[0]}:{target[1]}")


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
    fed = await dns.query(f"{SRV_PREFIXES[0]}.{host}", "SRV")
    legacy = await dns.query(f"{SRV_PREFIXES[1]}.{host}", "SRV")
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


def _version_step(result: ProbeResult, target: tuple[str, int]) -> HttpStep:
    where = f"https://{target[0]}:{target[1]}{VERSION_PATH}"
    if result.outcome == "gone":
        return HttpStep(
            "version", where, Finding.GONE, result.detail, result.lifetime, result.status
        )
    if result.outcome == "failed":
        return HttpStep("version", where, Finding.UNKNOWN, result.detail)
    return HttpStep(
        "version", where, Finding.CLEAR, f"{result.status}: not a tombstone", None, result.status
    )


def senders(report: HttpReport, dns_gone: str | None) -> list[tuple[str, str]]:
    """What each kind of sender concludes from the HTTP side (and DNS, for the sidecar)."""
    gone = report.gone
    known = next((s for s in report.steps if s.step == "well_known"), None)
    lines: list[tuple[str, str]] = []
    if dns_gone is not None:
        sidecar = f"gone by DNS ({dns_gone}): never connects"
    elif gone is not None:
        sidecar = (
            f"gone (http_410) for {_human(gone.lifetime or 0)} after its first "
            "probe or intercepted answer, then asks again"
        )
    else:
        sidecar = "no verdict from HTTP: forwards (a 404, 5xx or error is never a tombstone)"
    lines.append(("tombstone-sidecar", sidecar))
    if known is not None and known.finding is Finding.GONE:
        msc = f"halts discovery for {_human(known.lifetime or 0)} (well-known 410)"
    else:
        msc = "no well-known 410: keeps discovering"
    lines.append(("MSC4188 resolver", msc))
    if gone is not None:
        synapse = (
            f"caches the failed well-known for {_human(SYNAPSE_WELL_KNOWN_FAILURE_CACHE)}"
            if known is not None and known.finding is not Finding.CLEAR
            else "follows the well-known"
        )
        synapse += "; a 410 is an answer, not a failure: no backoff, requests keep coming"
    else:
        synapse = "sees a live or failing server; backs off only on connection errors and 5xx"
    lines.append(("Synapse 1.163 alone", synapse))
    return lines


def _human(seconds: float) -> str:
    if seconds >= 86400 and seconds % 86400 == 0:
        return f"{seconds / 86400:.0f}d ({seconds:.0f}s)"
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:.0f}h ({seconds:.0f}s)"
    return f"{seconds:.0f}s"
