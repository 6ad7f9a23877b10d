"""`tombstone-sidecar check NAME`: every signal for one name, judged exactly as the proxy does.

It builds the same `Policy` as the proxy (same lists, same TTL bounds, same DNS code), so
what it prints is what the sidecar would decide; an operator uses it to confirm their own
tombstone is published, and to see why a destination is suppressed.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from sidecar.dns_client import DnsClient
from sidecar.metrics import Metrics
from sidecar.names import InvalidName, parse_authority
from sidecar.options import Settings
from sidecar.policy import Policy, TtlBounds
from sidecar.signals import DnsReport, evaluate
from sidecar.verdicts import State, Verdict

EXIT_BY_STATE = {State.ALIVE: 0, State.GONE: 1, State.UNREACHABLE: 1, State.UNDECIDED: 3}


async def run_check(raw_name: str, settings: Settings, as_json: bool = False) -> int:
    try:
        name = parse_authority(raw_name).host
    except InvalidName as e:
        print(f"tombstone-sidecar: error: NAME: {e}", file=sys.stderr)
        return 2
    try:
        dns = DnsClient(settings.nameservers, settings.dns_timeout, Metrics(),
                        settings.require_dnssec)  # fmt: skip
    except ValueError as e:
        print(f"tombstone-sidecar: error: --nameserver: {e}", file=sys.stderr)
        return 2
    policy = Policy(
        dns,
        metrics=Metrics(),
        ttl=TtlBounds(settings.min_ttl, settings.max_ttl),
        cache_size=1,
        deny=settings.deny,
        allow=settings.allow,
    )
    report = await evaluate(dns, name)
    dns.close()
    operator = policy.cached(name)
    verdict = operator.verdict if operator is not None else policy.judge(report)
    if as_json:
        print(json.dumps(_as_dict(report, verdict, dns.nameservers), indent=2))
    else:
        print(_as_text(report, verdict, dns.nameservers))
    return EXIT_BY_STATE[verdict.state]


def _as_dict(report: DnsReport, verdict: Verdict, nameservers: list[str]) -> dict[str, Any]:
    return {
        "name": report.name,
        "verdict": {
            "state": verdict.state.value,
            "signal": verdict.signal,
            "evidence": verdict.evidence,
            "ttl": round(verdict.ttl),
        },
        "signals": [
            {"signal": c.signal.value, "finding": c.finding.value, "detail": c.detail, "ttl": c.ttl}
            for c in report.checks
        ],
        "addresses": list(report.addresses),
        "nameservers": nameservers or ["system resolver"],
    }


def _as_text(report: DnsReport, verdict: Verdict, nameservers: list[str]) -> str:
    if verdict.state is State.UNDECIDED:
        head = f"{report.name}: NO VERDICT (DNS could not answer; the sidecar would forward)"
    elif verdict.state is State.ALIVE:
        head = f"{report.name}: ALIVE ({verdict.evidence}), re-checked after {verdict.ttl:.0f}s"
    else:
        head = f"{report.name}: GONE ({verdict.signal}: {verdict.evidence}), for {verdict.ttl:.0f}s"
    lines = [head]
    for check in report.checks:
        ttl = f" [ttl {check.ttl}s]" if check.ttl is not None else ""
        lines.append(
            f"  {check.signal.value:<13} {check.finding.value.upper():<8} {check.detail}{ttl}"
        )
    lines.append(
        f"  {'addresses':<13} {report.address_check.finding.value.upper():<8} "
        f"{report.address_check.detail}"
    )
    lines.append(f"  (asked {', '.join(nameservers) or 'the system resolver'})")
    return "\n".join(lines)
