"""What the stores read back, as raw bytes: state-file rows, Redis keys, pub/sub messages
and shared signing-key records. Whatever arrives, the result is a valid record or a
ValueError (sidecar.verdicts.decode_record, KeyRecord.from_json), and the Redis
subscriber's message handler never raises: it applies a valid message or counts it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from sidecar.judge.verdicts import (
    MAX_MESSAGE_BYTES,
    MAX_RECORD_BYTES,
    Verdict,
    decode_record,
    load_json,
    to_record,
)
from sidecar.metrics import Metrics
from sidecar.remote.identity import MAX_KEY_RECORD_BYTES, KeyBook, KeyRecord
from sidecar.store.redis import RedisStore
from tests.fuzz.strategies import json_documents, json_values
from tests.fuzz.test_verdicts import assert_valid, records, verdicts

# Nesting that json.loads cannot take (RecursionError past ~1,000 levels) and that a
# flat record never has, in the shapes that matter: deep and tiny, deep and huge.
DEEP_SMALL = "[" * 5000 + "]" * 5000
DEEP_HUGE = "[" * 100_000 + "]" * 100_000


@st.composite
def nested(draw: st.DrawFn) -> str:
    depth = draw(st.integers(1, 3000))
    opener = draw(st.sampled_from(["[", '{"a":', '{"destination": "a.example", "x": [']))
    return opener * depth + draw(st.sampled_from(["", "1", "]" * depth, "}" * depth]))


# A number beyond str(int)'s 4,300-digit limit cannot be dumped (nor parsed): stand-in text.
HUGE_NUMBER = '{"destination": "a.example", "observed_at": 1' + "0" * 5000 + "}"


def dumps(value: Any) -> str:
    """JSON text for a generated value; one with an undumpable number becomes HUGE_NUMBER."""
    try:
        return json.dumps(value, default=str)
    except ValueError:
        return HUGE_NUMBER


raw_records = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    json_documents.map(json.dumps),
    records().map(dumps),
    nested(),
)


@given(raw_records)
@example(DEEP_SMALL)
@example(DEEP_HUGE)
@example("x" * (MAX_RECORD_BYTES + 1))
@example(
    b'{"destination": "a.example", "state": "alive", "observed_at": 1, "expires_at": 2,'
    b' "addresses": ["localhost"]}'
)
@example(b"\xff\xfe")
def test_decode_record_gives_a_valid_verdict_or_a_value_error(raw: str | bytes) -> None:
    try:
        verdict = decode_record(raw)
    except ValueError as e:
        assert str(e).strip() and len(str(e)) < 500  # one bounded line, never the input
        return
    assert_valid(verdict)


@given(st.one_of(raw_records, st.builds(lambda: DEEP_HUGE)))
def test_load_json_bounds_size_and_depth_without_recursion_error(raw: str | bytes) -> None:
    try:
        value = load_json(raw)
    except ValueError:
        return
    size = len(raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass"))
    assert size <= MAX_RECORD_BYTES
    assert json.dumps(json.loads(raw)) == json.dumps(value)  # NaN-safe equality


class Applied:
    """The callbacks a subscriber hands to the cache, recording what reached it."""

    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []
        self.forgotten: list[str] = []

    def remote(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)

    def forget(self, name: str) -> None:
        self.forgotten.append(name)


@st.composite
def messages(draw: st.DrawFn) -> Any:
    """Pub/sub payloads: valid messages with parts replaced, and anything at all."""
    verdict = draw(verdicts())
    body: dict[str, Any] = {
        "origin": draw(st.sampled_from(["peer", "ME"])),
        "destination": verdict.destination,
    }
    if draw(st.booleans()):
        body["verdict"] = to_record(verdict)
    for key in draw(st.lists(st.sampled_from(["origin", "destination", "verdict"]), max_size=2)):
        body[key] = draw(st.one_of(json_values, records()))
    return dumps(body)


@given(st.one_of(messages(), raw_records, st.integers(), st.none()))
@example(DEEP_SMALL)
@example("x" * (MAX_MESSAGE_BYTES + 1))
def test_a_redis_message_is_applied_or_counted_and_never_raises(data: Any) -> None:
    store = RedisStore("redis://127.0.0.1:1/0", Metrics())  # never connects here
    store.origin = "ME"
    applied = Applied()
    invalid = store.metrics.store_invalid_records.labels("redis", "message")

    store._receive(data, applied.remote, applied.forget)

    counted = invalid._value.get()
    assert counted + len(applied.verdicts) + len(applied.forgotten) <= 1
    for verdict in applied.verdicts:
        assert_valid(verdict)
    for name in applied.forgotten:
        assert json.loads(data)["destination"] == name
    if counted == 0 and not applied.verdicts and not applied.forgotten:
        assert json.loads(data)["origin"] == "ME"  # only our own message is skipped silently


@st.composite
def key_records(draw: st.DrawFn) -> Any:
    record: dict[str, Any] = {
        "server_name": draw(st.sampled_from(["a.example", "B.example", "", "a.example."])),
        "keys": draw(st.dictionaries(st.text(max_size=12), st.text(max_size=44), max_size=3)),
        "old_keys": draw(
            st.one_of(st.none(), st.dictionaries(st.text(max_size=12), json_values, max_size=2))
        ),
        "seen_at": draw(st.one_of(st.floats(), st.integers(), st.text(max_size=5))),
        "target": draw(
            st.one_of(
                st.none(),
                st.lists(json_values, max_size=3),
                st.tuples(st.text(max_size=12), st.integers()).map(list),
            )
        ),
    }
    for key in draw(st.lists(st.sampled_from(sorted(record)), max_size=2)):
        record.pop(key, None)
    return record


@given(st.one_of(key_records(), json_values, raw_records))
@example(DEEP_SMALL)
def test_a_shared_key_record_is_valid_or_a_value_error(data: Any) -> None:
    try:
        raw = data if isinstance(data, str | bytes) else dumps(data)
        record = KeyRecord.from_json(load_json(raw, MAX_KEY_RECORD_BYTES))
    except ValueError as e:
        assert str(e).strip()
        return
    assert record.server_name and record.server_name == record.server_name.lower()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in record.keys)
    assert record.target is None or 0 < record.target[1] < 65536
    assert KeyRecord.from_json(json.loads(json.dumps(record.to_json()))) == record


def test_the_key_file_drops_bad_entries_and_survives_deep_nesting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """signing-keys.json is read at start like the state file: a bad entry is dropped (one
    warning for all), a file nested past json.loads' limit is set aside, never a crash."""
    path = tmp_path / "signing-keys.json"
    good = {
        "server_name": "a.example",
        "keys": {"ed25519:1": "k"},
        "seen_at": 5.0,
        "target": ["a.example", 8448],
    }
    bad = [
        {"server_name": "A.example"},
        {"server_name": "b.example", "keys": {"x": [1]}},
        {"server_name": "c.example", "target": ["c.example", 0]},
        "[[[",
        7,
    ]
    path.write_text(json.dumps({"records": [good, *bad], "held": ["a.example", "Bad Name!"]}))
    book = KeyBook(path)
    with caplog.at_level(logging.WARNING, logger="sidecar.identity"):
        book.load()
    assert list(book.records) == ["a.example"] and book.held == {"a.example"}
    assert [r.getMessage()[:27] for r in caplog.records] == ["dropped 6 invalid entries i"]

    path.write_text("[" * 100_000)
    deep = KeyBook(path)
    deep.load()
    assert deep.records == {} and not path.exists()
    assert [p.name.startswith("signing-keys.broken-") for p in tmp_path.iterdir()] == [True]
