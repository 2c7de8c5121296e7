"""Wake idle dispatchers with LISTEN/NOTIFY, without taxing producers' commits.

A dispatcher with nothing to do registers in ``outbox.sleeper``; ``outbox.enqueue``
sends a NOTIFY only while that table has a row, so under load (nobody asleep)
producers never take NOTIFY's commit-time lock. The order that makes a missed
wakeup impossible is: LISTEN first (the listener is always listening), register
as asleep, claim once more, then wait. A message committed before registration
is found by that last claim; one committed after it sends a NOTIFY.

``outbox.enqueue`` wakes one sleeper: the payload is the ``dispatcher_id`` of the
sleeper that registered or renewed its row last, and only that dispatcher claims
(the others' wait goes on, so one message costs one claim, not one per replica).
Writes of many messages (``enqueue_many``, ``retry_dead``) and reconnects use an
empty payload, which wakes everybody. A dispatcher renews its sleeper row every
``stale/3`` seconds, so one that died asleep stops being chosen within that time;
until then a message can wait for the fallback poll.

:class:`Wakeup` runs one long-lived task that reads the listener connection and
calls ``on_wake`` with every notification's payload, so a sleeping dispatcher waits on a plain
event: no task is created or cancelled per wait, which keeps the pickup path short.
While no notification comes, the connection is health-checked every few seconds;
when it fails it is re-established with a growing pause (at most 5 s), and
``on_wake("")`` is called after every reconnect, because a notification may have been
lost meanwhile: the dispatcher claims once more. The fallback poll interval bounds
the latency of any wakeup lost anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg

from outbox.dispatcher._store import DATABASE_ERRORS, Store, StoreError

log = logging.getLogger("outbox.dispatcher")

CHANNEL = "outbox_wakeup"

LISTENER_CONNECT_KWARGS: dict[str, Any] = {
    # notice a half-open connection within about 15 s
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,  # ms: unacknowledged data fails the connection
    "connect_timeout": 10,
}


class Wakeup:
    """A dedicated LISTEN connection that survives being killed."""

    def __init__(
        self,
        conninfo: str,
        *,
        on_wake: Callable[[str], None],
        connect_kwargs: dict[str, Any] | None = None,
        health_check_interval: float = 5.0,
    ) -> None:
        self._conninfo = conninfo
        self._on_wake = on_wake
        self._connect_kwargs = LISTENER_CONNECT_KWARGS if connect_kwargs is None else connect_kwargs
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._health_check_interval = health_check_interval
        self._failures = 0
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0

    @property
    def connected(self) -> bool:
        """Whether the listener connection is open (as far as we know)."""
        return self._conn is not None and not self._conn.closed

    async def start(self) -> bool:
        """Connect and LISTEN, then keep listening in the background.

        Returns whether the first connection succeeded; if it did not, the
        background task keeps trying (the dispatcher polls meanwhile).
        """
        connected = await self._connect()
        self._task = asyncio.create_task(self._run(), name="outbox-listener")
        return connected

    async def close(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop()

    async def _connect(self) -> bool:
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                application_name="outbox-listener",
                **self._connect_kwargs,
            )
            await conn.execute(f"LISTEN {CHANNEL}")
        except DATABASE_ERRORS as error:
            self._failures += 1
            log.warning(
                "listener connect failed attempt=%d error=%s", self._failures, type(error).__name__
            )
            return False
        self._conn = conn
        self._failures = 0
        return True

    async def _run(self) -> None:
        while True:
            if self._conn is None:
                await asyncio.sleep(min(0.1 * 2**self._failures, 5.0))
                if not await self._connect():
                    continue
                self.reconnects += 1
                log.info("listener reconnected reconnects=%d", self.reconnects)
                self._on_wake("")  # a notification may have been lost: poll
            conn = self._conn
            assert conn is not None
            try:
                async for notify in conn.notifies(timeout=self._health_check_interval):
                    self._on_wake(notify.payload)
                # quiet for a while: is the connection still there?
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=5)
            except DATABASE_ERRORS as error:
                log.warning("listener lost error=%s", type(error).__name__)
                await self._drop()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, TimeoutError, OSError):
                await asyncio.wait_for(conn.close(), timeout=1)


class Sleeper:
    """The registering half: tells producers (``outbox.sleeper``) that we wait.

    Registered only while the listener is connected: producers name one sleeper
    to wake, and one that cannot hear them would hold their messages until its
    next poll. A registration is renewed every third of ``stale_seconds`` while
    we keep sleeping; older rows are dispatchers that died asleep, and whoever
    registers next deletes them.
    """

    def __init__(self, store: Store, *, poll_interval: float) -> None:
        self._store = store
        self.stale_seconds = max(30.0, poll_interval * 10)
        self.asleep = False
        self._registered_at = 0.0

    async def set(self, asleep: bool) -> None:
        """Register (or renew) or unregister; a database error leaves it as it was."""
        renew = time.monotonic() - self._registered_at > self.stale_seconds / 3
        if asleep == self.asleep and not (asleep and renew):
            return
        try:
            await self._store.set_sleeper(asleep, stale_seconds=self.stale_seconds)
        except StoreError as error:
            log.warning("sleeper update failed error=%s", error)
            return
        self.asleep = asleep
        if asleep:
            self._registered_at = time.monotonic()
