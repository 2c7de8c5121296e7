"""The senders' slots: at most N sends at once, in arrival order, none lost to a cancel."""

from __future__ import annotations

import asyncio

from outbox.dispatcher._senders import SendSlots


async def test_no_more_than_size_sends_hold_a_slot_and_waiters_go_in_order() -> None:
    slots = SendSlots(2)
    assert slots.take_now() and slots.take_now()
    assert not slots.take_now()
    order: list[int] = []

    async def waiter(number: int) -> None:
        await slots.take()
        order.append(number)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    assert order == []
    slots.give()
    await asyncio.sleep(0.01)
    assert order == [0]
    assert not slots.take_now()  # the queue comes first
    slots.give()
    slots.give()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    slots.give()  # the two holders now: waiters 1 and 2
    slots.give()
    assert slots.take_now() and slots.take_now() and not slots.take_now()


async def test_a_cancelled_waiter_takes_no_slot_with_it() -> None:
    slots = SendSlots(1)
    assert slots.take_now()
    cancelled = asyncio.create_task(slots.take())
    handed_then_cancelled = asyncio.create_task(slots.take())
    last = asyncio.create_task(slots.take())
    await asyncio.sleep(0.01)
    cancelled.cancel()
    await asyncio.sleep(0.01)
    slots.give()  # goes to the second waiter...
    handed_then_cancelled.cancel()  # ...which is cancelled before it runs: passed on
    await asyncio.wait_for(last, 1)
    assert cancelled.cancelled() and handed_then_cancelled.cancelled()
    slots.give()
    assert slots.take_now() and not slots.take_now()
