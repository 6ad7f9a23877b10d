"""sidecar.synapse.lifting: the Lifter's record of a server's keys, stamped by its clock.

What a lift does with those records against a real TLS server (re-keyed or not, held,
released) is tests/integration/test_resurrection.py; here a set clock shows when the keys
count as recorded, when they are due to be fetched again, and when a lift happened.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from sidecar.judge.signals import Signal
from sidecar.judge.verdicts import State, Verdict
from sidecar.metrics import Metrics
from sidecar.remote.identity import KeyBook
from sidecar.synapse.lifting import HOLD_EVIDENCE, Lifter, is_hold
from tests.support.signing import SigningKey
from tests.unit.clock import FakeClock

NAME = "back.hs.test"
TARGET = (NAME, 8448)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def lifter(clock: FakeClock, metrics: Metrics) -> Lifter:
    """No fetcher, no Synapse admin, no file: only the clock and the key book at work."""
    return Lifter(metrics, KeyBook(None), clock=clock)


def key_document(key: SigningKey) -> bytes:
    return json.dumps(key.key_document()).encode()


def verdicts(at: float) -> tuple[Verdict, Verdict]:
    gone = Verdict(NAME, State.GONE, Signal.DNS_TXT_GONE, 'TXT "v=matrix;gone"', at - 600, at)
    alive = Verdict(NAME, State.ALIVE, None, "192.0.2.1", at, at + 3600)
    return gone, alive


def test_observed_keys_are_recorded_at_the_clocks_time(lifter: Lifter, clock: FakeClock) -> None:
    key = SigningKey(NAME)
    lifter.observe_keys(NAME, key_document(key), TARGET)
    record = lifter.book.records[NAME]
    assert (record.seen_at, record.target) == (clock.now, TARGET)
    assert record.keys == (("ed25519:e2e", key.public_b64),)


def test_the_same_keys_seen_again_move_the_record_forward(lifter: Lifter, clock: FakeClock) -> None:
    key = SigningKey(NAME)
    lifter.observe_keys(NAME, key_document(key), TARGET)
    clock.advance(1800)
    lifter.observe_keys(NAME, key_document(key), None)
    record = lifter.book.records[NAME]
    assert record.seen_at == clock.now
    assert record.target == TARGET  # a sighting without a target keeps the one known


def test_a_document_that_is_not_evidence_records_nothing(lifter: Lifter) -> None:
    impostor = SigningKey("elsewhere.hs.test")
    lifter.observe_keys(NAME, key_document(impostor), TARGET)
    lifter.observe_keys(NAME, b"{not json", TARGET)
    assert lifter.book.records == {}


def test_a_lift_without_recorded_keys_is_an_unknown_resurrection_at_the_clocks_time(
    lifter: Lifter, clock: FakeClock, metrics: Metrics
) -> None:
    gone, alive = verdicts(clock.now)
    clock.advance(5.0)
    assert asyncio.run(lifter.guard(NAME, gone, alive)) is None  # nothing to compare: lifted
    [event] = lifter.book.resurrections
    assert (event.destination, event.key_changed, event.observed_at, event.held) == (
        NAME,
        "unknown",
        clock.now,
        False,
    )
    assert "no signing keys were recorded" in event.detail
    value = metrics.registry.get_sample_value(
        "tombstone_resurrections_total", {"key_changed": "unknown"}
    )
    assert value == 1


def test_a_hold_is_known_by_its_evidence_on_every_replica(clock: FakeClock) -> None:
    gone, _ = verdicts(clock.now)
    held = Verdict(
        NAME,
        State.GONE,
        Signal.OPERATOR,
        f"{HOLD_EVIDENCE} (new keys)",
        clock.now,
        clock.now + 3600,
    )
    assert is_hold(held)
    assert not is_hold(gone)
