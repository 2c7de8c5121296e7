"""The database's clock, read on this host: what "now" means for expiry and quiet hours.

Producers set ``expires_at`` (and PostgreSQL sets ``send_at``, escalations and leases)
by the database server's clock; the pre-send check compares them with this process's
clock. A dispatcher host whose clock is off (no NTP in a container, a VM resumed from
a snapshot) would expire alerts early, or send expired ones. So the dispatcher measures
how far its clock is from the database's (a round trip, taken at its midpoint) when it
starts and every :data:`SYNC_SECONDS`, and reads the time as the database's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

log = logging.getLogger("outbox.dispatcher")

SYNC_SECONDS = 60.0
"""How often the offset is measured again."""
WARN_OFFSET_SECONDS = 1.0
"""An offset larger than this is logged: the host's clock needs fixing."""


def local_now() -> datetime:
    """The host's clock (a function of its own so that tests can skew it)."""
    return datetime.now(UTC)


class DatabaseClock:
    """``now()`` in the database's time: this host's clock plus the measured offset."""

    def __init__(self) -> None:
        self.offset = timedelta(0)
        self._warned = False

    def now(self) -> datetime:
        return local_now() + self.offset

    async def sync(self, database_now: Callable[[], Awaitable[datetime]]) -> None:
        """Measure the offset with one round trip (its midpoint against the server's
        ``clock_timestamp()``). A failed round trip keeps the last offset.
        """
        started = time.monotonic()
        before = local_now()
        server = await database_now()
        elapsed = time.monotonic() - started
        self.offset = server - (before + timedelta(seconds=elapsed / 2))
        off = abs(self.offset.total_seconds())
        if off > WARN_OFFSET_SECONDS and not self._warned:
            self._warned = True
            log.warning(
                "this host's clock is %.1f s %s the database's: expiry and quiet hours"
                " follow the database's clock",
                off,
                "behind" if self.offset > timedelta(0) else "ahead of",
            )

    async def keep_synced(
        self,
        database_now: Callable[[], Awaitable[datetime]],
        errors: tuple[type[BaseException], ...],
    ) -> None:
        """Measure again every :data:`SYNC_SECONDS` until cancelled."""
        while True:
            await asyncio.sleep(SYNC_SECONDS)
            try:
                await self.sync(database_now)
            except errors:  # the database is away: the claim loop says so; keep the offset
                continue
