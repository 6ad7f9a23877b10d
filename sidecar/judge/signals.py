"""DNS tombstone signals for one server name, all queries in flight at once.

For a name the sidecar asks, concurrently: TXT (the `v=matrix;gone` record), SRV at
`_matrix-fed._tcp` and `_matrix._tcp` (a `.` target or `.invalid` targets), and A/AAAA
(the addresses it will connect to; NXDOMAIN here is the `nxdomain` signal). Each signal
ends as a `SignalCheck`: gone (positive evidence), clear (evidence of life), or unknown
(DNS could not say). The report turns them into a verdict; unknown never means gone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import dns.name

from sidecar.judge.dns_answer import MAX_ADDRESSES, DnsAnswer
from sidecar.judge.names import is_ip_literal, is_under
from sidecar.judge.tombstone_txt import find_tombstone, join_strings

INVALID_TLD = "invalid"  # RFC 6761 §6.4: guaranteed never to resolve
SRV_PREFIXES = ("_matrix-fed._tcp", "_matrix._tcp")  # current first, then the legacy name


class Signal(StrEnum):
    """Stable signal codes (docs/design.md §3): used in metrics, logs, headers and the API."""

    OPERATOR = "operator"
    DNS_TXT_GONE = "dns_txt_gone"
    DNS_SRV_DOT = "dns_srv_dot"
    INVALID_TLD = "invalid_tld"
    NXDOMAIN = "nxdomain"
    HTTP_410 = "http_410"
    UNREACHABLE = "unreachable"


# When several signals fire, the verdict names the most explicit one.
DNS_SIGNAL_ORDER = (Signal.DNS_TXT_GONE, Signal.DNS_SRV_DOT, Signal.INVALID_TLD, Signal.NXDOMAIN)


class Finding(StrEnum):
    GONE = "gone"
    CLEAR = "clear"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class SignalCheck:
    """What one signal found for a name, in words an operator can read."""

    signal: Signal
    finding: Finding
    detail: str
    ttl: int | None = None


@dataclass(frozen=True, slots=True)
class DnsReport:
    """Every DNS signal for one name, and the addresses the name resolves to."""

    name: str
    checks: tuple[SignalCheck, ...]
    addresses: tuple[str, ...]
    address_check: SignalCheck  # whether the addresses could be learned (not a signal)

    @property
    def gone(self) -> SignalCheck | None:
        """The signal that proves the name gone, by DNS_SIGNAL_ORDER, or None."""
        by_signal = {c.signal: c for c in self.checks if c.finding is Finding.GONE}
        for signal in DNS_SIGNAL_ORDER:
            if signal in by_signal:
                return by_signal[signal]
        return None

    @property
    def complete(self) -> bool:
        """True when every signal gave evidence one way or the other."""
        return all(c.finding is not Finding.UNKNOWN for c in self.checks)

    @property
    def alive_ttl(self) -> int | None:
        """How long the evidence of life holds: the shortest TTL among the tombstone checks.

        Not the A/AAAA TTL: addresses live by their own TTL (sidecar.dns.address_book), and
        each time they are asked again the name's existence is seen again (an NXDOMAIN
        there starts a re-check). A busy name with A TTL 60 s and TXT TTL 3600 s is then
        asked A+AAAA once a minute and the whole signal set once an hour, not every 5 min.
        """
        ttls = [c.ttl for c in self.checks if c.ttl is not None and c.signal is not Signal.NXDOMAIN]
        if not ttls:
            ttls = [c.ttl for c in self.checks if c.ttl is not None]
        return min(ttls) if ttls else None


def literal_report(name: str) -> DnsReport | None:
    """The report for a name no DNS question is asked about: an IP literal (alive as far
    as DNS can tell) or a name under `.invalid` (gone by definition); else None."""
    if is_ip_literal(name):
        clear = SignalCheck(Signal.NXDOMAIN, Finding.CLEAR, "an IP literal has no DNS records")
        return DnsReport(name, (), (name,), clear)
    if is_under(name, INVALID_TLD):
        gone = SignalCheck(Signal.INVALID_TLD, Finding.GONE, f"{name} is under .invalid (RFC 6761)")
        return DnsReport(
            name, (gone,), (), SignalCheck(Signal.NXDOMAIN, Finding.UNKNOWN, "not asked")
        )
    return None


def report(
    name: str,
    *,
    txt: DnsAnswer,
    srv_fed: DnsAnswer,
    srv_legacy: DnsAnswer,
    a: DnsAnswer,
    aaaa: DnsAnswer,
    require_dnssec: bool,
) -> DnsReport:
    """Every DNS signal of `name` from the answers to its five questions."""
    srv = choose_srv(srv_fed, srv_legacy)
    addresses, address_check = _addresses(name, (a, aaaa))
    checks: tuple[SignalCheck, ...] = (
        _txt_check(name, txt),
        _srv_dot_check(srv),
        _invalid_tld_check(srv),
        _nxdomain_check(name, (txt, a, aaaa)),
    )
    if require_dnssec:
        checks = tuple(_require_validation(c, (txt, srv, a, aaaa)) for c in checks)
    return DnsReport(name, checks, addresses, address_check)


def addresses_of(name: str, a: DnsAnswer, aaaa: DnsAnswer) -> tuple[tuple[str, ...], SignalCheck]:
    """The addresses in the A and AAAA answers, and what they say of the name."""
    return _addresses(name, (a, aaaa))


def _require_validation(check: SignalCheck, answers: Sequence[DnsAnswer]) -> SignalCheck:
    """--require-dnssec: a tombstone counts only if the answers behind it were validated."""
    if check.finding is not Finding.GONE:
        return check
    relevant = {
        Signal.DNS_TXT_GONE: answers[:1],
        Signal.DNS_SRV_DOT: answers[1:2],
        Signal.INVALID_TLD: answers[1:2],
        Signal.NXDOMAIN: [a for a in answers if a.outcome == "nxdomain"],
    }[check.signal]
    if relevant and all(a.authenticated for a in relevant):
        return check
    return SignalCheck(
        check.signal,
        Finding.CLEAR,
        f"ignored, not DNSSEC-validated (--require-dnssec): {check.detail}",
        check.ttl,
    )


def choose_srv(fed: DnsAnswer, legacy: DnsAnswer) -> DnsAnswer:
    """Synapse's order: `_matrix-fed._tcp` when it has records, else `_matrix._tcp`."""
    if fed.outcome == "ok" or not fed.is_evidence:
        return fed
    if legacy.outcome == "ok" or not legacy.is_evidence:
        return legacy
    return fed


def _txt_check(name: str, answer: DnsAnswer) -> SignalCheck:
    if answer.outcome == "ok":
        texts = [join_strings(getattr(r, "strings", ())) for r in answer.records]
        found = find_tombstone(texts)
        if found is not None:
            return SignalCheck(
                Signal.DNS_TXT_GONE, Finding.GONE, f"TXT {name} {found!r}", answer.ttl
            )
        return SignalCheck(
            Signal.DNS_TXT_GONE,
            Finding.CLEAR,
            f"{len(texts)} TXT record(s) at {name}, none is v=matrix;gone",
            answer.ttl,
        )
    if answer.is_evidence:
        return SignalCheck(Signal.DNS_TXT_GONE, Finding.CLEAR, f"no TXT at {name}", answer.ttl)
    return _unknown(Signal.DNS_TXT_GONE, answer)


def srv_targets(answer: DnsAnswer) -> list[tuple[str, int]]:
    targets = []
    for record in answer.records:
        target = getattr(record, "target", None)
        if isinstance(target, dns.name.Name):
            text = target.to_text(omit_final_dot=True).lower()
            targets.append(
                (text if target != dns.name.root else ".", int(getattr(record, "port", 0)))
            )
    return targets


def _srv_dot_check(answer: DnsAnswer) -> SignalCheck:
    if answer.outcome == "ok":
        targets = srv_targets(answer)
        if targets and all(t == "." for t, _ in targets):
            return SignalCheck(
                Signal.DNS_SRV_DOT,
                Finding.GONE,
                f"SRV {answer.name} target '.' (RFC 2782: decidedly not available)",
                answer.ttl,
            )
        return SignalCheck(
            Signal.DNS_SRV_DOT, Finding.CLEAR, f"SRV {answer.name} has real targets", answer.ttl
        )
    if answer.is_evidence:
        return SignalCheck(
            Signal.DNS_SRV_DOT, Finding.CLEAR, f"no SRV at {answer.name}", answer.ttl
        )
    return _unknown(Signal.DNS_SRV_DOT, answer)


def _invalid_tld_check(answer: DnsAnswer) -> SignalCheck:
    if answer.outcome == "ok":
        targets = [t for t, _ in srv_targets(answer) if t != "."]
        if targets and all(is_under(t, INVALID_TLD) for t in targets):
            return SignalCheck(
                Signal.INVALID_TLD,
                Finding.GONE,
                f"every SRV target of {answer.name} is under .invalid ({', '.join(targets[:3])})",
                answer.ttl,
            )
        return SignalCheck(
            Signal.INVALID_TLD, Finding.CLEAR, "no SRV target under .invalid", answer.ttl
        )
    if answer.is_evidence:
        return SignalCheck(Signal.INVALID_TLD, Finding.CLEAR, "no SRV targets", answer.ttl)
    return _unknown(Signal.INVALID_TLD, answer)


def _nxdomain_check(name: str, answers: Sequence[DnsAnswer]) -> SignalCheck:
    """NXDOMAIN concerns the whole name: one such answer proves it, unless another has records."""
    if any(a.outcome == "ok" for a in answers):
        return SignalCheck(Signal.NXDOMAIN, Finding.CLEAR, f"{name} exists", _min_ttl(answers))
    nx = [a for a in answers if a.outcome == "nxdomain"]
    if nx:
        ttl = (
            min(a.ttl for a in nx if a.ttl is not None)
            if any(a.ttl is not None for a in nx)
            else None
        )
        return SignalCheck(Signal.NXDOMAIN, Finding.GONE, f"{name} does not exist (NXDOMAIN)", ttl)
    if any(a.is_evidence for a in answers):
        return SignalCheck(
            Signal.NXDOMAIN, Finding.CLEAR, f"{name} exists (no data)", _min_ttl(answers)
        )
    return _unknown(Signal.NXDOMAIN, answers[0])


def _addresses(name: str, answers: Sequence[DnsAnswer]) -> tuple[tuple[str, ...], SignalCheck]:
    addresses: list[str] = []
    for answer in answers:
        for record in answer.records[:MAX_ADDRESSES]:
            address = getattr(record, "address", None)
            if isinstance(address, str):
                try:
                    addresses.append(str(ipaddress.ip_address(address)))
                except ValueError:
                    continue
    ok = [a for a in answers if a.outcome == "ok"]
    if addresses:
        detail = ", ".join(addresses[:4]) + (" …" if len(addresses) > 4 else "")
        return tuple(addresses), SignalCheck(Signal.NXDOMAIN, Finding.CLEAR, detail, _min_ttl(ok))
    if all(a.is_evidence for a in answers):
        return (), SignalCheck(
            Signal.NXDOMAIN, Finding.CLEAR, f"{name} has no A/AAAA records", _min_ttl(answers)
        )
    failed = next(a for a in answers if not a.is_evidence)
    return (), _unknown(Signal.NXDOMAIN, failed)


def _min_ttl(answers: Sequence[DnsAnswer]) -> int | None:
    ttls = [a.ttl for a in answers if a.ttl is not None]
    return min(ttls) if ttls else None


def _unknown(signal: Signal, answer: DnsAnswer) -> SignalCheck:
    why = f": {answer.detail}" if answer.detail else ""
    return SignalCheck(
        signal, Finding.UNKNOWN, f"{answer.rrtype} {answer.name}: {answer.outcome}{why}"
    )
