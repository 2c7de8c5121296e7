"""The lease book: which claimed messages this dispatcher holds, and keeping them held.

Every claim gets a fresh token (see ``claim_batch``); a ``Lease`` is one message
under one token, and the book maps message id -> the *current* lease. A message can
come back to us under a new lease (ours ran out during an outage and our next claim
took it again), so "do we still hold it" is an identity test on the lease object,
never an id lookup alone.

The heartbeat extends every lease not being acknowledged at a third of the lease
time; a lease the database no longer knows was taken over by another replica and
is dropped (a queued copy is then skipped unsent, a copy being sent is
acknowledged in vain: the fenced write matches nothing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from outbox.dispatcher._claimed import Lease
from outbox.dispatcher._store import Store, StoreError

log = logging.getLogger("outbox.dispatcher")


class LeaseBook:
    """Leases held by one dispatcher, the heartbeat that keeps them and the release."""

    def __init__(self, store: Store, *, lease_seconds: float, on_room: Callable[[], None]) -> None:
        self._store = store
        self._lease_seconds = lease_seconds
        self._on_room = on_room
        self._held: dict[int, Lease] = {}
        self._acking: set[int] = set()

    def __len__(self) -> int:
        return len(self._held)

    def ids(self) -> frozenset[int]:
        return frozenset(self._held)

    def hold(self, lease: Lease) -> None:
        self._held[lease.id] = lease

    def holds(self, lease: Lease) -> bool:
        """True while ``lease`` is this dispatcher's current lease of its message."""
        return self._held.get(lease.id) is lease

    def acknowledging(self, ids: Iterable[int]) -> None:
        """These messages are being finished: the heartbeat leaves them alone."""
        self._acking = set(ids)

    def acknowledged(self, leases: Iterable[Lease]) -> None:
        """Forget leases whose finish was written (or found lost); there is room again."""
        self._acking = set()
        for lease in leases:
            # only this lease: the message may have been claimed again meanwhile
            if self._held.get(lease.id) is lease:
                del self._held[lease.id]
        self._on_room()

    async def heartbeat(self) -> None:
        """Run forever: extend our leases every third of the lease time."""
        interval = self._lease_seconds / 3
        delay = interval
        while True:
            await asyncio.sleep(delay)
            delay = interval if await self.extend(timeout=interval) else min(interval, 1.0)

    async def extend(self, *, timeout: float) -> bool:
        """Extend every lease not being acknowledged; False when the database did not
        answer (the caller tries again soon: the leases are running out meanwhile).
        """
        leases = [lease for lease in self._held.values() if lease.id not in self._acking]
        if not leases:
            return True
        try:
            kept = await self._store.extend_leases(leases, timeout=timeout)
        except StoreError as error:
            log.warning("heartbeat failed error=%s", error)
            return False
        # an acknowledgement that finished meanwhile is no lost lease
        lost = [
            lease
            for lease in leases
            if lease.id not in kept and self.holds(lease) and lease.id not in self._acking
        ]
        if lost:
            log.warning("leases lost ids=%s", [lease.id for lease in lost][:20])
            for lease in lost:
                del self._held[lease.id]
            self._on_room()
        return True

    async def release_all(self) -> None:
        """Shutdown: give back every message still held, without burning an attempt."""
        leases = list(self._held.values())
        self._held.clear()
        if not leases:
            return
        try:
            await self._store.release_leases(leases)
            log.info("released leases count=%d", len(leases))
        except StoreError as error:
            log.warning("release failed count=%d error=%s (leases will expire)", len(leases), error)
