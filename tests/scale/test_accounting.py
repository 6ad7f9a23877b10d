"""The dead-server accounting's one judgment call, checked without a world: a request the
fake federation stamped after the sidecar's gone verdict counts as after it only if bytes
reached the name's address after the verdict (finding 9 in docs/scale.md); with no capture
of the wire, or one that saw nothing of the name, the stamps are trusted."""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.scale.accounting import DeadAccount, Verdicts
from tests.scale.population import Population

VERDICT_AT = "2026-12-05 05:00:00,000"


def _account(wire: list[float] | None) -> DeadAccount:
    population = Population(40)
    server = next(s for s in population.dead if s.kind == "wk410")
    at = datetime.strptime(VERDICT_AT, "%Y-%m-%d %H:%M:%S,%f").timestamp()
    log = f"{VERDICT_AT} INFO sidecar.policy: {server.name} gone (http_410: 410 Gone from x)\n"
    account = DeadAccount(population, verdicts=Verdicts.parse(log))
    account.add_requests(
        [(at + 0.012, server.name, 8448, "synapse", "/_matrix/federation/v1/send/1")]
    )
    if wire is not None:
        assert server.address is not None
        account.add_payload({server.address: [at + dt for dt in wire]})
    return account


@pytest.mark.parametrize(
    ("wire", "after", "in_flight"),
    [
        ([-0.5, -0.001], 0, 1),  # every byte left before the verdict: in flight
        ([-0.5, 0.010], 1, 0),  # a segment after it: the request was sent after
        (None, 1, 0),  # no capture: the stamp decides
        ([], 1, 0),  # a capture that saw nothing of the name: the stamp decides
    ],
)
def test_a_late_stamp_is_after_the_verdict_only_if_the_wire_says_so(
    wire: list[float] | None, after: int, in_flight: int
) -> None:
    account = _account(wire)
    count = account.by_kind()["wk410"]
    assert (count.requests_after_verdict, count.requests_in_flight_at_verdict) == (
        after,
        in_flight,
    )
    assert bool(account.late_names()) == bool(after)
