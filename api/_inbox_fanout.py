"""One LISTEN connection per API process, and the fan-out to the open inbox streams.

The dispatcher writes an inbox item and ``NOTIFY outbox_inbox, '<item id> <user id>'``
in the acknowledgement's transaction, so the notification arrives once the item is
committed. :class:`InboxFanout` holds the process's only listening connection (the
database pays one connection per API process, not one per stream) and the open
streams by user. For each burst of notifications it reads the named items in one
statement, for the users that have a stream open here only, and hands each item to
that user's streams. The user an item goes to is the row's ``user_id``, never the
payload's: any role may NOTIFY, and a forged payload must not show anyone an item
that is not theirs.

Nothing is lost when a notification is: each stream also knows the last item id it
sent, and catches up from the database (items with a greater id) when it opens,
when the listener has reconnected (notifications sent meanwhile are gone), when
reading the named items failed, and when it fell more than :data:`MAX_QUEUED` items
behind. An item committed out of id order (two transactions for one user, the
later id committed first) still reaches the open streams through its own
notification, as a "late" item below the stream's last id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable
from typing import Any

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from outbox._db import CONNECT_KWARGS
from outbox._queries import QUERIES
from outbox.api._inbox import row_view
from outbox.api._testsend import DB_ERRORS, DB_TIMEOUT

log = logging.getLogger("outbox.api")

CHANNEL = "outbox_inbox"
"""The dispatcher's NOTIFY channel for new inbox items (payload ``'<id> <user_id>'``)."""
MAX_QUEUED = 256
"""Items one stream may have waiting to be written; beyond, it catches up by id."""
MAX_BATCH = 1000
"""Items read from the database in one statement."""
REMEMBERED = 1024
"""Item ids a stream remembers having sent (to tell a late item from a repeat)."""
BIGINT_MAX = 2**63 - 1
RECONNECT_PAUSE_MAX = 2.0
"""Seconds between the listener's reconnection attempts, at most."""


def sse_event(row: Any) -> tuple[int, bytes]:
    """The item id and its Server-Sent Event (``id``, ``event: item``, ``data`` JSON)."""
    item_id = int(row[0])
    data = msgspec.json.encode(row_view(row))  # one line: JSON escapes every newline
    return item_id, b"id: %d\nevent: item\ndata: %s\n\n" % (item_id, data)


class Subscriber:
    """One open stream: what it has sent, what waits for it, and its wake-up."""

    __slots__ = (
        "_order",
        "_sent",
        "catch_up",
        "catch_up_at",
        "catch_up_failures",
        "cursor",
        "pending",
        "user_id",
        "wake",
    )

    def __init__(self, user_id: str, cursor: int) -> None:
        self.user_id = user_id
        self.cursor = cursor
        """The greatest item id sent (or the client's ``Last-Event-ID``)."""
        self.wake = asyncio.Event()
        self.pending: deque[tuple[int, bytes]] = deque()
        self.catch_up = True
        """Read items after ``cursor`` from the database before anything else."""
        self.catch_up_at = 0.0
        """``time.monotonic()`` from which to try it (later after a failed one)."""
        self.catch_up_failures = 0
        self._sent: set[int] = set()
        self._order: deque[int] = deque()

    def offer(self, item: tuple[int, bytes]) -> None:
        """A new item for this stream (the listener's)."""
        if len(self.pending) >= MAX_QUEUED:
            # a slow reader: drop what waits, and read it back from the table later
            self.pending.clear()
            self.catch_up, self.catch_up_at = True, 0.0
        else:
            self.pending.append(item)
        self.wake.set()

    def resync(self) -> None:
        """Notifications may have been lost: catch up from the database, now."""
        self.catch_up, self.catch_up_at = True, 0.0
        self.wake.set()

    def is_new(self, item_id: int) -> bool:
        """Whether the stream has not sent this item.

        An item below the cursor that the stream does not remember sending is a late
        one (committed after a greater id): sent. Rarely it is one the client had
        from its previous connection, still in flight here: sent again, which the
        item's id lets a client tell (a repeat, never a loss).
        """
        return item_id > self.cursor or item_id not in self._sent

    def mark_sent(self, item_id: int) -> None:
        self.cursor = max(self.cursor, item_id)
        self._sent.add(item_id)
        self._order.append(item_id)
        if len(self._order) > REMEMBERED:
            self._sent.discard(self._order.popleft())


class InboxFanout:
    """The listening connection, the open streams by user, and what joins them."""

    def __init__(
        self,
        conninfo: str,
        pool: AsyncConnectionPool[Any],
        *,
        connect_kwargs: dict[str, Any] | None = None,
        health_check_interval: float = 5.0,
    ) -> None:
        self._conninfo = conninfo
        self._pool = pool
        self._connect_kwargs = dict(CONNECT_KWARGS if connect_kwargs is None else connect_kwargs)
        self._health_check_interval = health_check_interval
        self._streams: dict[str, set[Subscriber]] = {}
        self._heard: dict[int, str] = {}
        self._heard_event = asyncio.Event()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._failures = 0
        self.closing = False
        """Set at shutdown: streams end, new ones are refused."""
        self.reconnects = 0

    # ------------------------------------------------------------------ streams

    @property
    def connected(self) -> bool:
        """Whether the listening connection is open (as far as we know)."""
        return self._conn is not None and not self._conn.closed

    @property
    def stream_count(self) -> int:
        return sum(len(streams) for streams in self._streams.values())

    def streams_of(self, user_id: str) -> int:
        return len(self._streams.get(user_id, ()))

    def subscribe(self, user_id: str, cursor: int) -> Subscriber:
        """Register a stream that has sent items up to ``cursor``; it catches up first."""
        subscriber = Subscriber(user_id, cursor)
        self._streams.setdefault(user_id, set()).add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        streams = self._streams.get(subscriber.user_id)
        if streams is not None:
            streams.discard(subscriber)
            if not streams:
                del self._streams[subscriber.user_id]

    def end_streams(self) -> None:
        """Shutdown: every stream ends after what it is writing, and none may open."""
        self.closing = True
        for subscriber in self._all():
            subscriber.wake.set()

    def _all(self) -> Iterable[Subscriber]:
        return [s for streams in self._streams.values() for s in streams]

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        """Listen in the background; the first connection is tried there too, so the
        API starts (and answers /health) while PostgreSQL is down.
        """
        self._tasks = [
            asyncio.create_task(self._listen(), name="outbox-inbox-listener"),
            asyncio.create_task(self._deliver(), name="outbox-inbox-fanout"),
        ]

    async def close(self) -> None:
        self.end_streams()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._drop()

    # ------------------------------------------------------------------ listening

    async def _connect(self) -> bool:
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo,
                autocommit=True,
                application_name="outbox-api-inbox",
                **self._connect_kwargs,
            )
            try:
                await conn.execute(f"LISTEN {CHANNEL}")
            except BaseException:  # cancelled at shutdown too: never leave it open
                with contextlib.suppress(psycopg.Error, OSError):
                    await conn.close()
                raise
        except DB_ERRORS as error:
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 100 == 0:
                log.warning(
                    "inbox listener: connect failed attempt=%d error=%s",
                    self._failures,
                    type(error).__name__,
                )
            return False
        if self._failures:
            log.info("inbox listener: connected after %d failed attempts", self._failures)
        self._conn = conn
        self._failures = 0
        return True

    async def _listen(self) -> None:
        first = True
        while True:
            if self._conn is None:
                if not first:
                    await asyncio.sleep(min(0.1 * 2**self._failures, RECONNECT_PAUSE_MAX))
                first = False
                if not await self._connect():
                    continue
                # notifications sent while nobody listened are gone: every open stream
                # reads what it missed from the table
                for subscriber in self._all():
                    subscriber.resync()
            conn = self._conn
            assert conn is not None
            try:
                async for notify in conn.notifies(timeout=self._health_check_interval):
                    self._hear(notify.payload)
                # quiet for a while: is the connection still there?
                await asyncio.wait_for(conn.execute("SELECT 1"), timeout=DB_TIMEOUT)
            except DB_ERRORS as error:
                log.warning("inbox listener: connection lost error=%s", type(error).__name__)
                self.reconnects += 1
                await self._drop()

    def _hear(self, payload: str) -> None:
        item, _, user_id = payload.partition(" ")
        if user_id not in self._streams or not (item.isascii() and item.isdigit()):
            return  # nobody here waits for it (or it is no item's word)
        if len(item) > 19 or int(item) > BIGINT_MAX:
            return
        self._heard[int(item)] = user_id
        self._heard_event.set()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, TimeoutError, OSError):
                await asyncio.wait_for(conn.close(), timeout=1)

    # ------------------------------------------------------------------ delivering

    async def _deliver(self) -> None:
        while True:
            await self._heard_event.wait()
            self._heard_event.clear()
            while self._heard:
                ids = list(self._heard)[:MAX_BATCH]
                users = {self._heard.pop(item_id) for item_id in ids}
                await self._read_and_offer(ids, users)

    async def _read_and_offer(self, ids: list[int], users: set[str]) -> None:
        try:
            async with self._pool.connection(timeout=DB_TIMEOUT) as conn:
                cursor = await conn.execute(QUERIES["api_inbox_items"], {"ids": ids})
                rows = await cursor.fetchall()
        except DB_ERRORS as error:
            log.warning("inbox fan-out: reading items failed error=%s", type(error).__name__)
            for user_id in users:
                for subscriber in self._streams.get(user_id, ()):
                    subscriber.resync()
            return
        for row in rows:
            streams = self._streams.get(row[1])
            if streams:
                event = sse_event(row)
                for subscriber in streams:
                    subscriber.offer(event)
