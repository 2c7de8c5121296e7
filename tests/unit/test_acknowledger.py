"""The acknowledger's bookkeeping around a write: what stays leased when a write is cut."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from outbox.dispatcher._acknowledger import Acknowledger
from outbox.dispatcher._claimed import Claimed, Lease
from outbox.dispatcher._finishes import AckBatch, AckResult, FinishSent
from outbox.dispatcher._leases import LeaseBook


class SlowStore:
    """Stands in for the database: a write commits when the test says so."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.commit = asyncio.Event()
        self.writes: list[list[int]] = []

    async def write_finishes(self, batch: AckBatch) -> AckResult:
        self.writes.append([f.lease.id for f in batch.finishes])
        self.started.set()
        await self.commit.wait()
        ids = frozenset(f.lease.id for f in batch.finishes)
        return AckResult(finished=ids, lost=frozenset())


def claimed(message_id: int) -> Claimed:
    return Claimed(
        id=message_id,
        lane="transactional",
        priority=10,
        channel="email",
        user_id="u1",
        template="price_alert",
        vars={},
        fallback=None,
        attempts=0,
        lease=Lease(id=message_id, token=uuid.uuid4()),
    )


def setup() -> tuple[SlowStore, LeaseBook, Acknowledger, list[Any]]:
    store = SlowStore()
    leases = LeaseBook(store, lease_seconds=30, on_room=lambda: None)  # type: ignore[arg-type]
    flushed: list[Any] = []
    acker = Acknowledger(
        store,  # type: ignore[arg-type]
        leases,
        delay=0.0,
        max_size=100,
        on_flushed=lambda batch, result: flushed.append(result),
    )
    return store, leases, acker, flushed


async def test_a_write_cancelled_midway_leaves_its_leases_held_for_the_release() -> None:
    store, leases, acker, flushed = setup()
    messages = [claimed(n) for n in (1, 2)]
    for message in messages:
        leases.hold(message.lease)
        acker.add(FinishSent(message=message, duration_ms=1.0))
    flush = asyncio.create_task(acker.flush())
    await store.started.wait()
    flush.cancel()
    await asyncio.gather(flush, return_exceptions=True)
    assert leases.ids() == {1, 2}  # nothing committed: still ours, to be released
    assert flushed == []


async def test_the_shutdown_flush_waits_for_the_flush_under_way() -> None:
    store, leases, acker, flushed = setup()
    first, second = claimed(1), claimed(2)
    for message in (first, second):
        leases.hold(message.lease)
    acker.add(FinishSent(message=first, duration_ms=1.0))
    running = asyncio.create_task(acker.flush())
    await store.started.wait()
    acker.add(FinishSent(message=second, duration_ms=1.0))
    shutdown = asyncio.create_task(acker.flush())
    await asyncio.sleep(0.01)
    assert store.writes == [[1]]  # the second flush has not started beside the first
    store.commit.set()
    await asyncio.gather(running, shutdown)
    assert store.writes == [[1], [2]]
    assert leases.ids() == set() and len(flushed) == 2
