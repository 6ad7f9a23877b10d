"""sidecar.verdicts.from_record: state-file rows and Redis values, possibly corrupt."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.verdicts import SUPPRESSING, State, Verdict, from_record, to_record
from tests.fuzz.strategies import json_values

finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def verdicts(draw: st.DrawFn) -> Verdict:
    state = draw(st.sampled_from([State.GONE, State.UNREACHABLE, State.ALIVE]))
    signal = draw(st.text(max_size=20)) if state in SUPPRESSING else None
    observed = draw(finite)
    expires = draw(finite.filter(lambda t: t >= observed))
    return Verdict(
        destination=draw(st.text(min_size=1, max_size=40)),
        state=state,
        signal=signal,
        evidence=draw(st.text(max_size=60)),
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
    assert verdict.destination and verdict.state is not State.UNDECIDED
    assert verdict.suppresses == (verdict.signal is not None)
    assert math.isfinite(verdict.observed_at) and verdict.observed_at <= verdict.expires_at
    assert from_record(to_record(verdict)) == verdict


@given(verdicts())
def test_to_record_round_trips(verdict: Verdict) -> None:
    assert from_record(to_record(verdict)) == verdict


@given(verdicts())
def test_to_record_round_trips_through_json_as_the_stores_keep_it(verdict: Verdict) -> None:
    assert from_record(json.loads(json.dumps(to_record(verdict)))) == verdict


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
