"""What the policy needs from the outside world, as the policy sees it.

The policy decides; it does no I/O. Its collaborators — the DNS questions (dns/questions.py),
the address book (dns/address_book.py), the verdict store (store/) and the 410 prober
(remote/probe.py) — are handed to it by the sidecar's wiring (app.py) and reach it only
through these shapes, so the judging core imports none of them.
"""

from __future__ import annotations

from typing import Protocol

from sidecar.judge.signals import DnsReport, SignalCheck
from sidecar.judge.verdicts import Verdict


class Questions(Protocol):
    """Asks DNS every tombstone question about a name at once."""

    @property
    def nameservers(self) -> list[str]: ...

    async def evaluate(self, name: str) -> DnsReport: ...


class FoundAddresses(Protocol):
    """Where a live name can be dialled now, or why nobody can say."""

    @property
    def known(self) -> bool: ...  # DNS answered (with addresses, or with none)

    @property
    def addresses(self) -> tuple[str, ...]: ...

    @property
    def detail(self) -> str: ...


class Addresses(Protocol):
    """The addresses of live names, each kept for its own A/AAAA TTL."""

    def record(self, name: str, addresses: tuple[str, ...], check: SignalCheck) -> None: ...

    async def resolve(self, name: str) -> FoundAddresses: ...


class SharedVerdicts(Protocol):
    """Where verdicts outlive the process, and reach other sidecars."""

    async def fetch(self, name: str) -> Verdict | None: ...

    def save(self, verdict: Verdict) -> None: ...

    def forget(self, name: str) -> None: ...


class ProbeAnswer(Protocol):
    """`gone` (with a lifetime), `answered` (not a tombstone) or `failed`."""

    @property
    def outcome(self) -> str: ...

    @property
    def detail(self) -> str: ...

    @property
    def lifetime(self) -> float: ...


class Rechecker(Protocol):
    """Asks a server over HTTP whether it still answers 410 Gone."""

    async def probe(self, name: str, target: tuple[str, int] | None) -> ProbeAnswer: ...
