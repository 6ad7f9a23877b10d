"""sidecar.verdicts.from_record: state-file rows and Redis values, possibly corrupt."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.judge.names import InvalidName, normalize_host
from sidecar.judge.signals import Signal
from sidecar.judge.verdicts import (
    MAX_EVIDENCE_CHARS,
    MAX_TIMESTAMP,
    SUPPRESSING,
    State,
    Verdict,
    from_record,
    to_record,
)
from tests.fuzz.strategies import dns_names, ipv4, json_values

times = st.floats(min_value=0, max_value=MAX_TIMESTAMP, allow_nan=False)


def _normalized_or_empty(raw: str) -> str:
    try:
        return normalize_host(raw)
    except InvalidName:
        return ""


destinations = st.one_of(dns_names().map(_normalized_or_empty).filter(bool), ipv4)
addresses = st.ip_addresses().map(str)


@st.composite
def verdicts(draw: st.DrawFn, max_evidence: int = 60) -> Verdict:
    """Verdicts as the sidecar makes them (what to_record must write and read back)."""
    state = draw(st.sampled_from([State.GONE, State.UNREACHABLE, State.ALIVE]))
    signal = draw(st.sampled_from([s.value for s in Signal])) if state in SUPPRESSING else None
    observed = draw(times)
    expires = draw(times.filter(lambda t: t >= observed))
    return Verdict(
        destination=draw(destinations),
        state=state,
        signal=signal,
        evidence=draw(st.text(max_size=max_evidence)),
        observed_at=observed,
        expires_at=expires,
    )


def field_values() -> st.SearchStrategy[Any]:
    return st.one_of(json_values, st.sampled_from([s.value for s in State]), st.just("nan"))


@st.composite
def records(draw: st.DrawFn) -> Any:
    """Almost-right records: a valid one with fields dropped, replaced or added."""
    record = to_record(draw(verdicts()))
    for key in draw(st.lists(st.sampled_from(sorted(record)), max_size=3)):
        if draw(st.booleans()):
            record.pop(key, None)
        else:
            record[key] = draw(field_values())
    record.update(draw(st.dictionaries(st.text(max_size=12), field_values(), max_size=2)))
    return record


@given(st.one_of(json_values, records()))
@example(
    {"destination": "a", "state": "undecided", "signal": None, "observed_at": 0, "expires_at": 1}
)
@example({"destination": "a", "state": "alive", "observed_at": "nan", "expires_at": 1})
@example({"destination": "a", "state": "alive", "observed_at": 1, "expires_at": 1, "addresses": 7})
@example({"destination": "a", "state": ["gone"], "observed_at": 1, "expires_at": 1})
def test_from_record_gives_a_valid_verdict_or_a_value_error(record: Any) -> None:
    try:
        verdict = from_record(record)
    except ValueError as e:
        assert str(e).strip()
        return
    assert_valid(verdict)
    assert from_record(to_record(verdict)) == verdict


def assert_valid(verdict: Verdict) -> None:
    """Everything the request path may rely on in a verdict read from a store."""
    assert verdict.destination and normalize_host(verdict.destination) == verdict.destination
    assert verdict.state in (State.GONE, State.UNREACHABLE, State.ALIVE)
    assert verdict.suppresses == (verdict.signal is not None)
    assert verdict.signal is None or Signal(verdict.signal)
    assert isinstance(verdict.evidence, str) and len(verdict.evidence) <= MAX_EVIDENCE_CHARS
    assert math.isfinite(verdict.observed_at) and verdict.observed_at <= verdict.expires_at
    assert verdict.observed_at >= 0 and verdict.expires_at <= MAX_TIMESTAMP
    assert not hasattr(verdict, "addresses")  # never taken from a store (address_book)


@given(verdicts())
def test_to_record_round_trips(verdict: Verdict) -> None:
    assert from_record(to_record(verdict)) == verdict


@given(verdicts())
def test_to_record_round_trips_through_json_as_the_stores_keep_it(verdict: Verdict) -> None:
    assert from_record(json.loads(json.dumps(to_record(verdict)))) == verdict


@given(verdicts(max_evidence=3 * MAX_EVIDENCE_CHARS))
def test_long_evidence_is_cut_on_write_so_every_replica_reads_the_record_back(
    verdict: Verdict,
) -> None:
    back = from_record(json.loads(json.dumps(to_record(verdict))))
    assert len(back.evidence) <= MAX_EVIDENCE_CHARS
    if len(verdict.evidence) <= MAX_EVIDENCE_CHARS:
        assert back == verdict
    else:
        assert back.evidence[:-1] == verdict.evidence[: MAX_EVIDENCE_CHARS - 1]


@pytest.mark.parametrize("field", ["observed_at", "expires_at"])
def test_regression_number_beyond_float_range_is_a_value_error(field: str) -> None:
    """float() of an int beyond float range raised OverflowError, which the stores do not
    catch: one such row in the sqlite state file stopped the sidecar from starting."""
    times = {"observed_at": "1.0", "expires_at": "2.0", field: "1" + "0" * 400}
    row = (
        '{"destination": "a.example", "state": "alive", "signal": null, "evidence": "", '
        f'"observed_at": {times["observed_at"]}, "expires_at": {times["expires_at"]}}}'
    )
    record = json.loads(row)  # as the sqlite and Redis stores read it: an int, not a float
    with pytest.raises(ValueError):
        from_record(record)
