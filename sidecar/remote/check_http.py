"""`check NAME --probe`: the HTTP side of a tombstone, found the way a remote homeserver looks.

The walk itself is discovery.py's (the sidecar's background probe takes the same steps);
here is what each kind of sender concludes from it. Every fetch goes through
`Prober.fetch` (same TLS trust, address policy and deadline as the sidecar's probes) and
every 410 is judged by `gone_http`, so the lifetimes shown are the ones the sidecar would use.
"""

from __future__ import annotations

from sidecar.dns.client import DnsClient
from sidecar.judge.signals import Finding
from sidecar.remote.discovery import HttpReport, HttpStep, Route
from sidecar.remote.discovery import discover as walk
from sidecar.remote.probe import Prober

__all__ = ["HttpReport", "HttpStep", "Route", "discover", "senders"]

SYNAPSE_WELL_KNOWN_FAILURE_CACHE = 3600  # docs/design.md §2: Synapse caches a failed well-known 1 h


async def discover(prober: Prober, dns: DnsClient, raw_name: str) -> HttpReport:
    """Every step for `raw_name` (already validated by the caller), shown even past a 410."""
    return await walk(prober, dns, raw_name)


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
