"""sidecar.judge.verdicts: the verdict log form, the bounded expiring cache, and stored records."""

from __future__ import annotations

import json

import pytest

from sidecar.judge.signals import Signal
from sidecar.judge.verdicts import (
    MAX_ADDRESSES,
    MAX_EVIDENCE_CHARS,
    STALE_GRACE_SECONDS,
    State,
    Verdict,
    VerdictCache,
    decode_record,
    format_ttl,
    from_record,
    load_json,
    to_record,
)
from tests.unit.clock import FakeClock

GRACE = 100.0


def verdict(
    destination: str = "example.org",
    state: State = State.GONE,
    signal: str | None = "dns_txt_gone",
    *,
    observed_at: float = 1000.0,
    ttl: float = 60.0,
    evidence: str = 'TXT "v=matrix;gone"',
) -> Verdict:
    return Verdict(destination, state, signal, evidence, observed_at, observed_at + ttl)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cache(clock: FakeClock) -> VerdictCache:
    return VerdictCache(maxsize=10, clock=clock, stale_grace=GRACE)


# --- Verdict ----------------------------------------------------------------------------------


def test_describe_gone() -> None:
    v = verdict(ttl=3600.0)
    assert v.describe() == 'example.org gone (dns_txt_gone: TXT "v=matrix;gone"), ttl 3600s'


def test_describe_unreachable() -> None:
    v = verdict(state=State.UNREACHABLE, signal="unreachable", evidence="5 connect failures")
    assert v.describe() == "example.org unreachable (unreachable: 5 connect failures), ttl 60s"


def test_describe_alive_has_no_signal() -> None:
    v = verdict(state=State.ALIVE, signal=None, evidence="A 1.1.1.1", ttl=299.6)
    assert v.describe() == "example.org alive (A 1.1.1.1), ttl 300s"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0s"),
        (300, "300s"),
        (86399, "86399s"),
        (86400, "1d"),
        (129600, "1.5d"),
        (10 * 365 * 86400.0, "3650d"),
    ],
)
def test_ttls_read_in_seconds_then_days(seconds: float, text: str) -> None:
    assert format_ttl(seconds) == text


@pytest.mark.parametrize(
    ("state", "suppresses"),
    [
        (State.GONE, True),
        (State.UNREACHABLE, True),
        (State.ALIVE, False),
        (State.UNDECIDED, False),
    ],
)
def test_suppresses(state: State, suppresses: bool) -> None:
    assert verdict(state=state).suppresses is suppresses


def test_ttl_and_states_are_strings() -> None:
    v = verdict(observed_at=10.0, ttl=90.0)
    assert v.ttl == 90.0
    assert [s.value for s in State] == ["gone", "unreachable", "alive", "undecided"]
    assert f"{State.GONE}" == "gone"


def test_verdict_is_frozen() -> None:
    v = verdict()
    with pytest.raises(AttributeError):
        v.state = State.ALIVE  # type: ignore[misc]


def test_default_stale_grace() -> None:
    assert STALE_GRACE_SECONDS == 3600.0


# --- VerdictCache -----------------------------------------------------------------------------


def test_put_and_get(cache: VerdictCache) -> None:
    v = verdict()
    entry = cache.put(v)
    assert entry.verdict is v
    assert entry.suppressed_count == 0
    assert entry.next_refresh == 0.0
    assert cache.get("example.org") is entry
    assert cache.get("other.example") is None
    assert len(cache) == 1


def test_verdict_is_served_through_the_stale_grace(cache: VerdictCache, clock: FakeClock) -> None:
    v = verdict(ttl=60.0)
    cache.put(v)
    clock.now = v.expires_at
    assert cache.get("example.org") is not None  # expired, but stale-while-revalidate
    clock.now = v.expires_at + GRACE - 0.001
    entry = cache.get("example.org")
    assert entry is not None
    assert entry.verdict is v
    clock.now = v.expires_at + GRACE
    assert cache.get("example.org") is None
    assert len(cache) == 0


@pytest.mark.parametrize("state", [State.GONE, State.UNREACHABLE, State.ALIVE])
def test_every_real_verdict_gets_the_grace(
    cache: VerdictCache, clock: FakeClock, state: State
) -> None:
    v = verdict(state=state)
    cache.put(v)
    clock.now = v.expires_at + GRACE / 2
    assert cache.get("example.org") is not None


def test_undecided_is_dropped_at_expiry(cache: VerdictCache, clock: FakeClock) -> None:
    v = verdict(state=State.UNDECIDED, signal=None, evidence="timeout", ttl=30.0)
    cache.put(v)
    clock.now = v.expires_at - 0.001
    assert cache.get("example.org") is not None
    clock.now = v.expires_at
    assert cache.get("example.org") is None


def test_uses_the_injected_clock_not_wall_time(clock: FakeClock) -> None:
    cache = VerdictCache(maxsize=10, clock=clock)  # default grace
    v = verdict(observed_at=0.0, ttl=10.0)
    clock.now = 0.0
    cache.put(v)
    clock.now = 10.0 + STALE_GRACE_SECONDS - 1
    assert cache.get("example.org") is not None
    clock.now = 10.0 + STALE_GRACE_SECONDS
    assert cache.get("example.org") is None


def test_maxsize_evicts_least_recently_used(clock: FakeClock) -> None:
    cache = VerdictCache(maxsize=2, clock=clock, stale_grace=GRACE)
    cache.put(verdict("a.example"))
    cache.put(verdict("b.example"))
    assert cache.get("a.example") is not None  # a is now more recent than b
    cache.put(verdict("c.example"))
    assert len(cache) == 2
    assert cache.get("b.example") is None
    assert cache.get("a.example") is not None
    assert cache.get("c.example") is not None


def test_maxsize_bound_holds(clock: FakeClock) -> None:
    cache = VerdictCache(maxsize=3, clock=clock, stale_grace=GRACE)
    for i in range(20):
        cache.put(verdict(f"n{i}.example"))
    assert len(cache) == 3
    assert sorted(e.verdict.destination for e in cache) == [
        "n17.example",
        "n18.example",
        "n19.example",
    ]


def test_put_keeps_suppressed_count(cache: VerdictCache, clock: FakeClock) -> None:
    first = cache.put(verdict(ttl=60.0))
    first.suppressed_count = 7
    clock.advance(30.0)
    refreshed = verdict(observed_at=clock.now, ttl=120.0, evidence="TXT again")
    second = cache.put(refreshed)
    assert second is not first
    assert second.suppressed_count == 7
    assert second.verdict is refreshed
    assert cache.get("example.org") is second


def test_put_keeps_suppressed_count_from_a_stale_entry(
    cache: VerdictCache, clock: FakeClock
) -> None:
    v = verdict(ttl=60.0)
    cache.put(v).suppressed_count = 3
    clock.now = v.expires_at + GRACE / 2
    assert cache.put(verdict(observed_at=clock.now)).suppressed_count == 3


def test_put_after_drop_starts_counting_again(cache: VerdictCache, clock: FakeClock) -> None:
    v = verdict(ttl=60.0)
    cache.put(v).suppressed_count = 3
    clock.now = v.expires_at + GRACE
    assert cache.put(verdict(observed_at=clock.now)).suppressed_count == 0


def test_put_replacement_uses_the_new_deadline(cache: VerdictCache, clock: FakeClock) -> None:
    cache.put(verdict(ttl=1000.0))
    short = verdict(state=State.UNDECIDED, signal=None, evidence="timeout", ttl=5.0)
    cache.put(short)
    clock.now = short.expires_at
    assert cache.get("example.org") is None


def test_forget(cache: VerdictCache) -> None:
    entry = cache.put(verdict())
    assert cache.forget("example.org") is entry
    assert cache.get("example.org") is None
    assert cache.forget("example.org") is None
    assert len(cache) == 0


def test_iteration_skips_dropped_entries(cache: VerdictCache, clock: FakeClock) -> None:
    cache.put(verdict("short.example", ttl=10.0))
    cache.put(verdict("long.example", ttl=10_000.0))
    cache.put(verdict("undecided.example", State.UNDECIDED, None, ttl=5.0))
    assert {e.verdict.destination for e in cache} == {
        "short.example",
        "long.example",
        "undecided.example",
    }
    clock.advance(10.0 + GRACE)
    assert [e.verdict.destination for e in cache] == ["long.example"]
    assert len(cache) == 1


def test_counts_excludes_undecided(cache: VerdictCache) -> None:
    cache.put(verdict("a.example", State.GONE, "dns_txt_gone"))
    cache.put(verdict("b.example", State.GONE, "dns_txt_gone"))
    cache.put(verdict("c.example", State.GONE, "nxdomain"))
    cache.put(verdict("d.example", State.UNREACHABLE, "unreachable"))
    cache.put(verdict("e.example", State.ALIVE, None))
    cache.put(verdict("f.example", State.ALIVE, None))
    cache.put(verdict("g.example", State.UNDECIDED, None))
    cache.put(verdict("h.example", State.UNDECIDED, "dns_txt_gone"))
    assert cache.counts() == [
        (("alive", "none"), 2),
        (("gone", "dns_txt_gone"), 2),
        (("gone", "nxdomain"), 1),
        (("unreachable", "unreachable"), 1),
    ]


def test_counts_follow_expiry(cache: VerdictCache, clock: FakeClock) -> None:
    cache.put(verdict("a.example", ttl=10.0))
    cache.put(verdict("b.example", ttl=10_000.0))
    assert cache.counts() == [(("gone", "dns_txt_gone"), 2)]
    clock.advance(10.0 + GRACE)
    assert cache.counts() == [(("gone", "dns_txt_gone"), 1)]


def test_counts_empty(cache: VerdictCache) -> None:
    assert cache.counts() == []


# --- records read back from a store (issue 14) ------------------------------------------------


def good_record(**fields: object) -> dict[str, object]:
    record: dict[str, object] = {
        "destination": "example.org",
        "state": "gone",
        "signal": "dns_txt_gone",
        "evidence": "TXT",
        "observed_at": 10.0,
        "expires_at": 20.0,
        "addresses": ["192.0.2.1", "2001:db8::1"],
    }
    record.update(fields)
    return record


def test_a_good_record_reads_back_without_its_addresses() -> None:
    """Addresses written by earlier versions are checked, then ignored: a live name is
    dialled where DNS says it is now (sidecar.address_book), never where a store says."""
    verdict = from_record(good_record())
    assert verdict.destination == "example.org" and verdict.state is State.GONE
    assert not hasattr(verdict, "addresses")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"destination": "Example.ORG."}, "not a normalized server name"),
        ({"destination": "bad name!"}, "not a normalized server name"),
        ({"destination": 7}, "non-empty string"),
        ({"state": "undecided", "signal": None}, "not one of"),
        ({"state": ["gone"]}, "not one of"),
        ({"signal": "rumour"}, "not a known signal"),
        ({"state": "alive"}, "does not go with signal"),
        ({"evidence": "x" * (MAX_EVIDENCE_CHARS + 1)}, "at most 1000"),
        ({"evidence": 5}, "evidence must be a string"),
        ({"observed_at": True}, "must be a number"),
        ({"observed_at": "10"}, "must be a number"),
        ({"observed_at": -1.0}, "between 1970 and 9999"),
        ({"expires_at": 1e300}, "between 1970 and 9999"),
        ({"expires_at": 10**400}, "beyond the range of a float"),
        ({"expires_at": 5.0}, "before observed_at"),
        ({"addresses": ["localhost"]}, "not an IP address"),
        ({"addresses": ["127.1"]}, "not an IP address"),
        ({"addresses": [7]}, "not a string"),
        ({"addresses": "192.0.2.1"}, "must be a list"),
        ({"addresses": ["192.0.2.1"] * (MAX_ADDRESSES + 1)}, "at most 64"),
        ({"addresses": [["192.0.2.1"]]}, "nested deeper"),
        ({"extra": {"a": [1]}}, "nested deeper"),
    ],
)
def test_a_bad_record_is_a_value_error_saying_why(fields: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as error:
        from_record(good_record(**fields))
    assert len(str(error.value)) < 200


def test_unknown_flat_fields_are_ignored_for_newer_replicas() -> None:
    assert from_record(good_record(added_later="x")) == from_record(good_record())


def test_every_signal_of_the_enum_is_accepted() -> None:
    for signal in Signal:
        assert from_record(good_record(signal=signal.value)).signal == signal


def test_to_record_cuts_long_evidence_so_it_reads_back() -> None:
    long = Verdict("example.org", State.GONE, "operator", "y" * 5000, 10.0, 20.0)
    back = from_record(to_record(long))
    assert len(back.evidence) == MAX_EVIDENCE_CHARS and back.evidence.endswith("…")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("[" * 10_000, "nested deeper"),  # json.loads itself raises RecursionError
        ("[" * 100_000 + "]" * 100_000, "at most 16384"),  # refused before parsing
        ('{"a": [[[1]]]}', "nested deeper"),
        ("not json", "not JSON"),
        (b"\xff", "not JSON"),
        ("1" + "0" * 5000, "not JSON"),  # beyond str(int)'s digit limit
        (None, "expected JSON text"),
    ],
)
def test_load_json_refuses_without_raising_anything_but_value_error(
    raw: object, reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        load_json(raw)


def test_decode_record_reads_what_the_stores_write() -> None:
    verdict = from_record(good_record())
    assert decode_record(json.dumps(to_record(verdict)).encode()) == verdict
