"""What the ops API needs from the running sidecar, and nothing more.

The ops listener reads and changes verdicts through these calls only: it never reaches
into the proxy's internals, so the proxy and the ops API can change independently, and
a test can serve the ops API over any object that keeps this contract.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from sidecar.judge.verdicts import Entry
from sidecar.remote.identity import Resurrection


@dataclass(frozen=True)
class Readiness:
    """`/readyz`: ready once the proxy listens and stored verdicts are loaded.

    Resolvers that do not answer leave it ready: the judge fails open (connections go
    where Synapse alone would send them), and an unready sidecar container would take its
    Synapse pod out of its Service. `dns` says how the resolvers fare instead."""

    status: str  # "starting", "ready" or "draining"
    proxy_running: bool
    enforce: bool | None
    nameservers: list[str]
    verdicts_cached: int
    store: dict[str, Any] | None = None  # kind, up, detail
    dns: dict[str, Any] | None = None  # state, failures_in_a_row, last_answer_seconds_ago

    @property
    def ready(self) -> bool:
        return self.status == "ready"


@dataclass(frozen=True)
class Resurrections:
    """`/v1/resurrections`: servers that came back, and the names held gone meanwhile."""

    events: list[Resurrection]
    held: list[str] = field(default_factory=list)


class Unavailable(Exception):
    """The sidecar cannot answer this yet (starting) or at all (feature not configured)."""


class Listed(Exception):
    """The name is on an operator list: change the list, not the verdict."""


class OpsBackend(Protocol):
    @property
    def registry(self) -> CollectorRegistry: ...

    @property
    def ops_token(self) -> str | None: ...

    def readiness(self) -> Readiness: ...

    def entries(self) -> list[Entry]:
        """Every verdict: names and open breakers. Unavailable while starting."""
        ...

    def verdict(self, name: str) -> Entry | None:
        """The cached verdict for a normalized name. Unavailable while starting."""
        ...

    def mark_gone(self, name: str, ttl: float, comment: str) -> Entry:
        """An operator's gone verdict. Unavailable while starting."""
        ...

    async def recheck(self, name: str) -> tuple[Entry, bool]:
        """Forget, release any hold, judge again now: (the new entry, whether a hold was
        released). Listed for a name on --deny; Unavailable while starting."""
        ...

    def resurrections(self) -> Resurrections: ...

    def synapse(self) -> dict[str, Any]:
        """The admin-API link and its last poll. Unavailable without --synapse-admin-url."""
        ...
