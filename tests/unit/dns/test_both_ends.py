"""BothEnds, the DNS client's bound on queries in flight: order and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.dns.client import BothEnds


def test_freed_slots_go_in_turn_to_the_newest_and_the_oldest_waiter() -> None:
    async def scenario() -> list[str]:
        slots = BothEnds(1)
        order: list[str] = []
        await slots.acquire()  # held by the test

        async def wait(name: str) -> None:
            async with slots:
                order.append(name)
                await asyncio.sleep(0)

        waiters = [asyncio.ensure_future(wait(str(i))) for i in range(5)]
        await asyncio.sleep(0)
        slots.release()
        await asyncio.gather(*waiters)
        # Both slots back: a holder without waiting.
        await asyncio.wait_for(slots.acquire(), 1)
        return order

    assert asyncio.run(scenario()) == ["4", "0", "3", "1", "2"]


def test_cancelled_waiters_lose_no_slot() -> None:
    async def scenario() -> list[str]:
        slots = BothEnds(1)
        order: list[str] = []
        await slots.acquire()

        async def wait(name: str) -> None:
            async with slots:
                order.append(name)

        old = asyncio.ensure_future(wait("old"))
        gone = asyncio.ensure_future(wait("cancelled while waiting"))
        new = asyncio.ensure_future(wait("new"))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        slots.release()
        await asyncio.gather(old, new)
        with pytest.raises(asyncio.CancelledError):
            await gone
        await asyncio.wait_for(slots.acquire(), 1)
        return order

    assert asyncio.run(scenario()) == ["new", "old"]


def test_a_waiter_cancelled_as_it_is_given_a_slot_passes_it_on() -> None:
    async def scenario() -> bool:
        slots = BothEnds(1)
        await slots.acquire()
        first = asyncio.ensure_future(slots.acquire())
        second = asyncio.ensure_future(slots.acquire())
        await asyncio.sleep(0)
        slots.release()  # given to `second` (the newest) ...
        second.cancel()  # ... which is cancelled before it runs
        await asyncio.wait_for(first, 1)  # so the slot went on to `first`
        return second.cancelled()

    assert asyncio.run(scenario())
