"""The acknowledger: finishes buffered for a moment, then written many per transaction.

A finish waits at most ``delay`` seconds, or none when ``max_size`` are waiting (the
shape of pgqueuer's ``TimedOverflowBuffer`` and River's ``BatchCompleter``). A flush
that cannot reach the database is retried with a growing pause (the leases keep
the rows safe; the heartbeat leaves messages being acknowledged alone); a batch
the database rejects is split, and written one finish at a time, so that one bad
row cannot hold the others back. A single finish rejected on its own is given up:
its lease expires and another claim retries the message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from outbox.dispatcher._finishes import AckBatch, AckResult, Finish, FinishSent
from outbox.dispatcher._leases import LeaseBook
from outbox.dispatcher._store import Store, StoreRejected, StoreUnavailable

log = logging.getLogger("outbox.dispatcher")

MAX_RETRY_PAUSE = 5.0
"""Seconds: the longest pause between two tries of an unreachable database."""


class Acknowledger:
    """Buffers finishes and writes them; ``run()`` is the flushing task."""

    def __init__(
        self,
        store: Store,
        leases: LeaseBook,
        *,
        delay: float,
        max_size: int,
        on_flushed: Callable[[AckBatch, AckResult], None],
    ) -> None:
        self._store = store
        self._leases = leases
        self._delay = delay
        self._max_size = max_size
        self._on_flushed = on_flushed
        self._batch = AckBatch()
        self._ready = asyncio.Event()
        # one flush at a time: the shutdown's waits for the acker task's to commit
        self._flushing = asyncio.Lock()

    def add(self, finish: Finish) -> None:
        self._batch.finishes.append(finish)
        # a delivery is logged in outbox.attempt; the log line is for debugging only
        level = logging.DEBUG if type(finish) is FinishSent else logging.INFO
        if log.isEnabledFor(level):
            error_class = getattr(finish, "error_class", None)
            log.log(
                level,
                "finish id=%d lease=%s channel=%s outcome=%s%s",
                finish.message.id,
                finish.lease.token,
                finish.message.channel,
                finish.name,
                f" error_class={error_class}" if error_class else "",
            )
        self._ready.set()

    async def run(self) -> None:
        while True:
            await self._ready.wait()
            if len(self._batch) < self._max_size:
                await asyncio.sleep(self._delay)
            await self.flush()

    async def flush(self) -> None:
        """Write what is buffered now; at shutdown, after the flush under way ends."""
        async with self._flushing:
            self._ready.clear()
            if not self._batch.finishes:
                return
            batch, self._batch = self._batch, AckBatch()
            self._leases.acknowledging(finish.message.lease.id for finish in batch.finishes)
            try:
                result = await self._write(batch)
            except BaseException:
                # cancelled mid-write: nothing was committed, so the leases are still
                # ours and must stay in the book (the shutdown releases them)
                self._leases.acknowledging(())
                raise
            self._leases.acknowledged(finish.message.lease for finish in batch.finishes)
        if result.lost:
            log.warning("lease lost before ack ids=%s", sorted(result.lost)[:20])
        self._on_flushed(batch, result)

    async def _write(self, batch: AckBatch) -> AckResult:
        pause = 0.1
        while True:
            try:
                return await self._store.write_finishes(batch)
            except StoreUnavailable as error:
                log.warning("ack failed count=%d error=%s; retrying", len(batch), error)
                await asyncio.sleep(pause)
                pause = min(pause * 2, MAX_RETRY_PAUSE)
            except StoreRejected as error:
                if len(batch) == 1:
                    log.error(
                        "ack rejected id=%d error=%s; the lease will expire",
                        batch.finishes[0].lease.id,
                        error,
                    )
                    return AckResult(
                        finished=frozenset(), lost=frozenset({batch.finishes[0].lease.id})
                    )
                log.error(
                    "ack batch rejected count=%d error=%s; writing one by one", len(batch), error
                )
                parts = [AckBatch(finishes=[finish]) for finish in batch.finishes]
                return AckResult.merge([await self._write(part) for part in parts])
