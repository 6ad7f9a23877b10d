"""sidecar.dns.address_book: address sets dialled exactly within their TTL, served stale
(RFC 8767) only while the resolver fails, and never past `max_stale`.

A set clock drives the book; the DNS answers come from the real loopback server of
tests/support over real UDP, so "DNS was asked" is read from its query log. The process
view (a renumbered server followed across restarts and Redis) is
tests/integration/test_dial_addresses.py.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sidecar.dns.address_book import STALE_ANSWER_SECONDS, AddressBook, AddressSet
from sidecar.dns.client import DnsClient, Nameserver
from sidecar.judge.signals import Finding, Signal, SignalCheck
from sidecar.metrics import Metrics
from tests.support.dns_server import DnsServer, Zone
from tests.unit.clock import FakeClock

NAME = "live.hs.test"
OLD, NEW = "192.0.2.1", "192.0.2.2"
A_TTL = 60  # seconds, the A record's own TTL
MAX_STALE = 100.0  # a few STALE_ANSWER_SECONDS, so the stale window has several retries
TICK = 0.001
DNS_TIMEOUT = 1.0  # bounds a test if the server ever failed to answer


@dataclass
class World:
    clock: FakeClock
    zone: Zone
    server: DnsServer
    metrics: Metrics
    book: AddressBook

    def asked(self) -> int:
        """A queries the resolver has received for NAME so far."""
        return self.server.query_count(NAME, "A")

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def refreshes(self, outcome: str) -> float:
        return self.sample("tombstone_address_refreshes_total", outcome=outcome)

    def stale_serves(self) -> float:
        return self.sample("tombstone_stale_addresses_total")

    def resolve(self, name: str = NAME) -> AddressSet:
        return asyncio.run(self.book.resolve(name))

    def renumber(self, address: str) -> None:
        """DNS answers again (SERVFAIL cleared), with `address`."""
        self.zone.clear()
        self.zone.add(NAME, "A", address, ttl=A_TTL)


@pytest.fixture
def world() -> Iterator[World]:
    clock = FakeClock()
    with DnsServer() as server:
        server.zone.add(NAME, "A", OLD, ttl=A_TTL)
        metrics = Metrics()
        client = DnsClient((Nameserver("127.0.0.1", server.port),), DNS_TIMEOUT, metrics)
        book = AddressBook(client, metrics, max_stale=MAX_STALE, maxsize=100, clock=clock)
        yield World(clock, server.zone, server, metrics, book)
        client.close()


def clear(ttl: int | None) -> SignalCheck:
    return SignalCheck(Signal.NXDOMAIN, Finding.CLEAR, OLD, ttl)


# --- within the TTL ---------------------------------------------------------------------------


def test_a_set_is_dialled_exactly_within_its_ttl_then_asked_again(world: World) -> None:
    first = world.resolve()
    assert (first.addresses, first.expires_at, first.known) == (
        (OLD,),
        world.clock.now + A_TTL,
        True,
    )
    assert world.asked() == 1
    world.clock.advance(A_TTL - TICK)
    assert world.book.fresh(NAME) is first
    assert world.resolve() is first
    assert world.asked() == 1  # no query within the TTL
    world.clock.advance(TICK)
    assert world.book.fresh(NAME) is None  # expired on the dot: not dialled unasked
    world.resolve()
    assert world.asked() == 2


def test_a_renumbered_server_is_followed_as_soon_as_its_record_expires(world: World) -> None:
    assert world.resolve().addresses == (OLD,)
    world.renumber(NEW)
    assert world.resolve().addresses == (OLD,)  # the old record still holds
    world.clock.advance(A_TTL)
    assert world.resolve().addresses == (NEW,)
    assert world.refreshes("fresh") == 2
    assert world.stale_serves() == 0


def test_what_a_full_evaluation_learned_is_used_for_its_ttl(world: World) -> None:
    world.book.record(NAME, (NEW,), clear(ttl=30))
    known = world.book.fresh(NAME)
    assert known is not None and known.addresses == (NEW,)
    assert known.expires_at == world.clock.now + 30
    world.clock.advance(30)
    assert world.book.fresh(NAME) is None
    assert world.asked() == 0


def test_an_answer_without_a_ttl_is_asked_again_at_once(world: World) -> None:
    world.book.record(NAME, (NEW,), clear(ttl=None))
    assert world.book.fresh(NAME) is None


def test_an_evaluation_that_learned_nothing_keeps_the_last_good_set(world: World) -> None:
    world.book.record(NAME, (OLD,), clear(ttl=A_TTL))
    unknown = SignalCheck(Signal.NXDOMAIN, Finding.UNKNOWN, "A live.hs.test: timeout")
    world.book.record(NAME, (), unknown)
    known = world.book.fresh(NAME)
    assert known is not None and known.addresses == (OLD,)


def test_an_ip_literal_is_its_own_address_forever(world: World) -> None:
    literal = world.book.fresh("192.0.2.9")
    assert literal == AddressSet("192.0.2.9", ("192.0.2.9",), math.inf)
    assert world.server.query_count() == 0


def test_connections_waiting_on_one_name_share_one_query(world: World) -> None:
    async def many() -> list[AddressSet]:
        return list(await asyncio.gather(*(world.book.resolve(NAME) for _ in range(20))))

    sets = asyncio.run(many())
    assert {s.addresses for s in sets} == {(OLD,)}
    assert world.asked() == 1


# --- the stale window (RFC 8767) --------------------------------------------------------------


def test_a_failing_resolver_gets_the_last_set_served_stale_between_retries(world: World) -> None:
    last = world.resolve()
    world.zone.servfail(NAME)
    world.clock.now = last.expires_at
    assert world.resolve() is last  # asked, failed: the last answer, stale
    assert (world.asked(), world.refreshes("stale"), world.stale_serves()) == (2, 1, 1)
    # For STALE_ANSWER_SECONDS the stale set is dialled without asking again...
    world.clock.advance(STALE_ANSWER_SECONDS - TICK)
    assert world.book.fresh(NAME) is last
    assert world.resolve() is last
    assert (world.asked(), world.stale_serves()) == (2, 3)  # each connection counted
    # ...then DNS is asked again before anything is dialled.
    world.clock.advance(TICK)
    assert world.book.fresh(NAME) is None
    assert world.resolve() is last
    assert (world.asked(), world.refreshes("stale")) == (3, 2)


def test_stale_serving_ends_max_stale_after_the_set_expired(world: World) -> None:
    last = world.resolve()
    world.zone.servfail(NAME)
    end = last.expires_at + MAX_STALE
    world.clock.now = last.expires_at
    while world.clock.now + STALE_ANSWER_SECONDS < end:  # retry after retry, still stale
        assert world.resolve() is last
        world.clock.advance(STALE_ANSWER_SECONDS)
    assert world.resolve() is last
    # The next retry would fall after the end: the window closes at the end, not at it.
    world.clock.now = end - TICK
    assert world.book.fresh(NAME) is last
    world.clock.now = end
    assert world.book.fresh(NAME) is None
    failed = world.resolve()
    assert (failed.known, failed.addresses) == (False, ())
    assert "servfail" in failed.detail.lower()
    assert world.refreshes("failed") == 1


def test_a_resolver_that_answers_again_ends_the_stale_serving(world: World) -> None:
    last = world.resolve()
    world.zone.servfail(NAME)
    world.clock.now = last.expires_at
    assert world.resolve() is last
    world.renumber(NEW)
    world.clock.advance(STALE_ANSWER_SECONDS)
    current = world.resolve()
    assert current.addresses == (NEW,)
    assert current.expires_at == world.clock.now + A_TTL
    stale = world.stale_serves()
    assert world.resolve() is current
    assert world.stale_serves() == stale


def test_without_a_last_set_a_failing_resolver_fails_the_name_at_once(world: World) -> None:
    world.zone.servfail(NAME)
    failed = world.resolve()
    assert (failed.known, failed.addresses) == (False, ())
    assert (world.refreshes("failed"), world.stale_serves()) == (1, 0)
    assert world.book.fresh(NAME) is None
