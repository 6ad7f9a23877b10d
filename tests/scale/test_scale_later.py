"""Scenario 3 of issue 17 at CI size, "ten minutes later": Synapse joins the room of N
servers and sends a first message (every server becomes a destination), then keeps sending
while its own retry schedule retries the destinations that failed. The schedule is
compressed by Synapse's own settings from its start (`LATER_TIME_FACTOR`), hence a world
of its own, one per mode (both sidecar modes unless SIDECAR_TEST_SCALE_MODE names one).
Then, per name: Synapse did retry within the window (else the goal below would hold only
because nothing was tried); issue 17's dead-server goal held in the window (the join and
its first message are scenario 1's, test_scale_join.py); a DNS-signal name was never
reached at all. Counts only; the figures go to the measurements summary.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from tests.scale.accounting import Backoffs, DeadAccount
from tests.scale.driver import JoinRun, Later, compressed_retries, join_and_send, ten_minutes_later
from tests.scale.population import DEAD_KINDS, DNS_SIGNAL_KINDS
from tests.scale.world import ScaleWorld

if TYPE_CHECKING:  # conftest.py is pytest's to import
    from tests.scale.conftest import WorldFactory

# Synapse's retry schedule 120 times faster (its first backoff 5 s, a request's own
# retries at most 0.5 s apart), so within a window of seconds it backs off every
# destination that fails fast and retries each once the backoff runs out. At the
# benchmark's factor of 10 (scripts/scale --later) the first such retry comes about 2
# minutes after the first failure; at 60 the window took 31 s a mode, at 120 16 s.
LATER_TIME_FACTOR = 120.0
# A message every 2.5 s (5 minutes of Synapse's compressed schedule): a backed-off
# destination is retried at the first new event after its backoff runs out.
LATER_INTERVAL = 2.5
# The window ends once Synapse has retried every name below, at the latest after this
# long. It took 16 s on the shared 2-core machine (load 11); the cap leaves more than
# three times that before the test fails.
LATER_MAX_SECONDS = 60.0
# The dead kinds whose requests fail within seconds (refused by the sidecar or the
# server, a 410, no address), so Synapse backs them off and retries them within the
# window. `blackhole` is not among them: each attempt waits out a 30 s connect timeout and
# one request's own retries (10 of them) outlast any CI window, so Synapse never gets as
# far as backing a blackholed name off here.
RETRIED_KINDS = tuple(kind for kind in DEAD_KINDS if kind != "blackhole")


@dataclass
class LaterRun:
    """What one world's scenario 3 did, and the dead servers' account of it."""

    join: JoinRun
    later: Later
    account: DeadAccount  # the whole run: the join, the first message and the window
    window: DeadAccount  # the window only (what Synapse's retries did), verdicts from any time


def _all_retried(world: ScaleWorld) -> Callable[[float], bool]:
    """Whether Synapse has retried every name of `RETRIED_KINDS` since the window began."""
    names = [s.name for kind in RETRIED_KINDS for s in world.population.of_kind(kind)]

    def enough(began: float) -> bool:
        assert world.synapse is not None
        backoffs = Backoffs.parse(world.synapse.log_text())
        return all(backoffs.retries(name, since=began) for name in names)

    return enough


@pytest.fixture(scope="module")
def later_world(later_mode: str, world_factory: WorldFactory) -> Iterator[ScaleWorld]:
    """Synapse's retry schedule `LATER_TIME_FACTOR` times faster from its start."""
    with world_factory(later_mode, compressed_retries(LATER_TIME_FACTOR)) as world:
        yield world


@pytest.fixture(scope="module")
def later_run(later_world: ScaleWorld) -> LaterRun:
    join = join_and_send(later_world)
    if join.join_status != 200 or join.message is None:
        pytest.fail(f"the join or its first message failed: {join}", pytrace=False)
    later = ten_minutes_later(
        later_world,
        LATER_MAX_SECONDS,
        LATER_TIME_FACTOR,
        interval=LATER_INTERVAL,
        enough=_all_retried(later_world),
    )
    return LaterRun(
        join=join,
        later=later,
        account=later_world.dead_account(),
        window=later_world.dead_account(since=later.began),
    )


def _label(world: ScaleWorld) -> str:
    return f"scale later {world.mode} N={len(world.population.servers)}"


def test_every_live_server_receives_every_message(
    later_world: ScaleWorld, later_run: LaterRun, record: Callable[[str, str], None]
) -> None:
    """The join's first message and each message of the window reach every live server."""
    label = _label(later_world)
    record(f"{label} window", json.dumps(later_run.later.summary(), sort_keys=True))
    record(f"{label} CPU and memory", json.dumps(later_world.usage(), sort_keys=True))
    live = len(later_world.population.live)
    join = later_run.join
    assert join.members == len(later_world.population.servers) + 1
    assert join.message is not None and len(join.message.arrivals) == live
    messages = later_run.later.messages
    assert messages, "the window sent no message"
    assert [len(d.arrivals) for d in messages] == [live] * len(messages)


def test_synapse_retried_every_dead_name_that_fails_fast(
    later_world: ScaleWorld, later_run: LaterRun, record: Callable[[str, str], None]
) -> None:
    """Within the window Synapse started a transaction to every dead name of
    `RETRIED_KINDS` after backing it off: its retry schedule ran, so the counts below are
    what a retry does, not what no retry did."""
    kinds = later_run.window.by_kind()
    retried = {
        kind: {
            "names": c.names,
            "backed_off": c.synapse_backed_off,
            "retried": c.synapse_names_retried,
            "retries": c.synapse_retries,
        }
        for kind, c in kinds.items()
    }
    label = _label(later_world)
    record(f"{label} Synapse's retries per kind, window", json.dumps(retried))
    record(f"{label} dead servers per kind, window", json.dumps(later_run.window.summary()))
    missed = {k: kinds[k].names - kinds[k].synapse_names_retried for k in RETRIED_KINDS}
    assert {k: n for k, n in missed.items() if n} == {}, json.dumps(retried, indent=1)


def _judged(later_world: ScaleWorld, run: LaterRun) -> None:
    if run.account.verdicts is None:
        pytest.skip(f"{later_world.mode}: no sidecar, no verdicts to count against")


def test_dns_signal_kinds_are_never_reached(
    later_world: ScaleWorld, later_run: LaterRun, record: Callable[[str, str], None]
) -> None:
    """A name DNS says is gone gets no SYN and no request at all, Synapse's retries
    included, and every one is judged gone."""
    _judged(later_world, later_run)
    summary = later_run.account.summary()
    record(f"{_label(later_world)} dead servers per kind, whole run", json.dumps(summary))
    kinds = later_run.account.by_kind()
    reached = {
        kind: (kinds[kind].syns, kinds[kind].requests, kinds[kind].never_judged_gone)
        for kind in DNS_SIGNAL_KINDS
    }
    assert reached == {kind: (0, 0, 0) for kind in DNS_SIGNAL_KINDS}, summary


def test_no_connection_attempt_after_the_first_gone_verdict(
    later_world: ScaleWorld, later_run: LaterRun
) -> None:
    """In the window, no dead server of any kind gets a SYN after the sidecar's first gone
    (or unreachable) verdict on its name (the verdict may predate the window)."""
    _judged(later_world, later_run)
    account = later_run.window
    late = {k: c.syns_after_verdict for k, c in account.by_kind().items() if c.syns_after_verdict}
    assert late == {}, json.dumps(account.timelines(names=account.late_names()), indent=1)


def test_no_request_after_the_first_gone_verdict(
    later_world: ScaleWorld, later_run: LaterRun
) -> None:
    """In the window, no dead server of any kind gets a request after the sidecar's first
    gone verdict on its name (the verdict may predate the window)."""
    _judged(later_world, later_run)
    account = later_run.window
    late = {
        k: c.requests_after_verdict
        for k, c in account.by_kind().items()
        if c.requests_after_verdict
    }
    assert late == {}, json.dumps(account.timelines(names=account.late_names()), indent=1)
