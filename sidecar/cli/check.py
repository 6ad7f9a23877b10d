"""`tombstone-sidecar check NAME`: every signal for one name, judged exactly as the proxy does.

It builds the same `Policy` as the proxy (same lists, same TTL bounds, same DNS code), so
what it prints is what the sidecar would decide; an operator uses it to confirm their own
tombstone is published, and to see why a destination is suppressed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from typing import Any

from sidecar.app import standalone_policy
from sidecar.cli import exits
from sidecar.cli.args import add_options, fail, sources_note
from sidecar.config.options import RawOptions, Settings
from sidecar.dns.client import DnsClient
from sidecar.dns.questions import evaluate
from sidecar.judge.names import InvalidName, is_ip_literal, parse_authority
from sidecar.judge.policy import Policy
from sidecar.judge.signals import DnsReport, Signal
from sidecar.judge.verdicts import State, Verdict
from sidecar.metrics import Metrics
from sidecar.remote import check_http
from sidecar.remote.addresses import AddressPolicy
from sidecar.remote.check_http import HttpReport
from sidecar.remote.probe import Prober

NAME = "check"
EXIT_BY_STATE = {
    State.ALIVE: exits.OK,
    State.GONE: exits.GONE,
    State.UNREACHABLE: exits.GONE,
    State.UNDECIDED: exits.NO_ANSWER,
}
EPILOG = f"""\
exit status: {exits.OK} alive, {exits.GONE} gone, {exits.USAGE} usage error, \
{exits.NO_ANSWER} DNS could not answer (no verdict).

--probe adds the HTTP side, fetched as a remote homeserver would: the well-known (410 is a
tombstone, m.server delegates), SRV, then /_matrix/key/v2/server on the target;
each 410 is judged with the sidecar's own rule and lifetime (--gone-ttl, --min-gone-ttl,
--max-gone-ttl), certificates verified (system store plus --upstream-ca), only to
addresses --allow-address permits.

{sources_note("TOMBSTONE_NAMESERVER=1.1.1.1 tombstone-sidecar check example.org")}
examples:
  tombstone-sidecar check example.org
  tombstone-sidecar check example.org --nameserver 1.1.1.1 --json
  tombstone-sidecar check example.org --probe      # after publishing your own tombstone
"""


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    parser: argparse.ArgumentParser = commands.add_parser(
        NAME,
        help="show every tombstone signal for one server name",
        description="Run every DNS tombstone signal for one server name live and print the\n"
        "evidence and the verdict, judged exactly as the sidecar would.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name", metavar="NAME", help="server name, e.g. example.org or example.org:8448"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="also fetch the well-known and the signing keys over HTTPS and judge any "
        "410 Gone (see below)",
    )
    add_options(parser, NAME)
    return parser


def main(args: argparse.Namespace, settings: Settings, raw: RawOptions) -> int:
    return asyncio.run(run_check(args.name, settings, raw, as_json=args.json, probe=args.probe))


async def run_check(
    raw_name: str, settings: Settings, raw: RawOptions, as_json: bool = False, probe: bool = False
) -> int:
    try:
        name = parse_authority(raw_name).host
    except InvalidName as e:
        return fail(f"NAME: {e}")
    try:
        dns = DnsClient(
            settings.nameservers, settings.dns_timeout, Metrics(), settings.require_dnssec
        )
    except ValueError as e:
        return fail(f"{raw.label('nameserver')}: {e}")
    policy = standalone_policy(
        dns,
        Metrics(),
        ttl=settings.verdict_ttl,
        cache_size=1,
        deny=settings.deny,
        allow=settings.allow,
    )
    report = await evaluate(dns, name)
    dns.close()
    operator = policy.cached(name)
    verdict = operator.verdict if operator is not None else policy.judge(report)
    http: HttpReport | None = None
    if probe:
        http, verdict = await _probe(raw_name, settings, dns, policy, verdict)
    if as_json:
        data = _as_dict(report, verdict, dns.nameservers)
        if http is not None:
            data["http"] = _http_dict(http, verdict)
        print(json.dumps(data, indent=2))
    else:
        text = _as_text(report, verdict, dns.nameservers)
        print(text if http is None else f"{text}\n{_http_text(http, verdict)}")
    return EXIT_BY_STATE[verdict.state]


async def _probe(
    raw_name: str, settings: Settings, dns: DnsClient, policy: Policy, verdict: Verdict
) -> tuple[HttpReport, Verdict]:
    """The HTTP side; a 410 makes the verdict http_410 exactly as the sidecar would."""
    probe = dataclasses.replace(settings.probing, concurrency=1)  # one name, one probe
    ttl = probe.ttl

    async def resolve(host: str) -> tuple[str, ...]:
        return (host,) if is_ip_literal(host) else (await evaluate(dns, host)).addresses

    prober = Prober(probe, Metrics(), AddressPolicy.default(settings.allow_addresses), resolve)
    http = await check_http.discover(prober, dns, raw_name)
    gone = http.gone
    if gone is not None and not verdict.suppresses:
        policy.learn_gone(verdict.destination, gone.lifetime or ttl.clamp(None), gone.detail)
        learned = policy.cached(verdict.destination)
        if learned is not None:
            verdict = learned.verdict
    return http, verdict


def _dns_gone(verdict: Verdict) -> str | None:
    return str(verdict.signal) if verdict.suppresses and verdict.signal != Signal.HTTP_410 else None


def _http_dict(http: HttpReport, verdict: Verdict) -> dict[str, Any]:
    return {
        "target": http.target,
        "steps": [
            {
                "step": s.step,
                "url": s.where,
                "finding": s.finding.value,
                "status": s.status,
                "detail": s.detail,
                "lifetime": s.lifetime,
            }
            for s in http.steps
        ],
        "senders": dict(check_http.senders(http, _dns_gone(verdict))),
    }


def _http_text(http: HttpReport, verdict: Verdict) -> str:
    lines = ["  http (as a remote homeserver discovers it):"]
    for step in http.steps:
        said = step.detail if "https://" in step.detail else f"{step.where}: {step.detail}"
        lines.append(f"  {step.step:<13} {step.finding.value.upper():<8} {said}")
    lines.append("  what senders conclude:")
    for sender, conclusion in check_http.senders(http, _dns_gone(verdict)):
        lines.append(f"    {sender + ':':<21} {conclusion}")
    return "\n".join(lines)


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
