"""``GET /api/v1/inbox/stream``: the user's new inbox items as Server-Sent Events.

Each item is one event: ``id:`` the item id, ``event: item``, ``data:`` the item as
JSON (the shape of ``GET /api/v1/inbox``'s items). It is written within a second of
the commit that delivered it (the dispatcher's NOTIFY, heard by the process's one
listening connection, ``_inbox_fanout``). A stream starts with the items after
``Last-Event-ID`` when the client sends one (a reconnecting ``EventSource`` does),
else with those committed from now on; while it is open it never loses an item,
through a dropped listener or a database restart too (it catches up by id). A
comment line every ``heartbeat`` seconds (15) keeps proxies from closing it.

===  ============================================================================
200  ``text/event-stream``, open until the client leaves or the API shuts down;
     the first lines are ``retry: 2000`` and the comment ``: connected``
400  ``Last-Event-ID`` is not an item id (digits, at most ``2^63 - 1``)
429  the user has :data:`MAX_STREAMS_PER_USER` streams open in this process
===  ============================================================================
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, get
from litestar.exceptions import (
    ClientException,
    ServiceUnavailableException,
    TooManyRequestsException,
)
from litestar.openapi import ResponseSpec
from litestar.response import Stream

from outbox._queries import QUERIES
from outbox.api._auth import user_of
from outbox.api._database import database
from outbox.api._inbox_fanout import InboxFanout, Subscriber, sse_event
from outbox.api._testsend import DB_ERRORS, DB_TIMEOUT, ApiContext, ErrorBody
from outbox.api._user_routes import USER_ROUTE, user_responses

log = logging.getLogger("outbox.api")

BIGINT_MAX = 2**63 - 1
DEFAULT_HEARTBEAT = 15.0
MAX_STREAMS_PER_USER = 16
"""Streams one user may hold open in one API process (tabs, devices)."""
PAGE = 100
"""Items one catch-up statement reads; a long catch-up reads page after page."""
CATCH_UP_RETRY = 1.0
"""Seconds before a stream retries a catch-up the database did not answer; doubled
after each failure up to :data:`CATCH_UP_RETRY_MAX` (a thousand streams must not
hammer a database that is down: the listener's reconnect wakes them all anyway)."""
CATCH_UP_RETRY_MAX = 30.0
RECONNECT_MS = 2000
"""The ``retry:`` a client waits before reconnecting (EventSource's own default is 3 s)."""
HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
"""No cache may keep the stream, no proxy buffer it (nginx reads X-Accel-Buffering)."""
OPENING = b"retry: %d\n: connected\n\n" % RECONNECT_MS
HEARTBEAT = b": heartbeat\n\n"


def last_event_id(request: Request[Any, Any, Any]) -> int | None:
    """The item id the client had last (``Last-Event-ID``), None without one; 400
    for anything that is not one.
    """
    raw = request.headers.get("last-event-id")
    if raw is None or not raw.strip():
        return None
    text = raw.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > BIGINT_MAX:
        raise ClientException("Last-Event-ID must be the id of an inbox item (digits)")
    return int(text)


async def _page_after(context: ApiContext, user_id: str, after: int) -> list[tuple[int, bytes]]:
    params = {"user_id": user_id, "after": after, "limit": PAGE}
    async with context.pool.connection(timeout=DB_TIMEOUT) as conn:
        rows = await (await conn.execute(QUERIES["api_inbox_after"], params)).fetchall()
    return [sse_event(row) for row in rows]


async def _events(
    fanout: InboxFanout, context: ApiContext, user_id: str, start: int, heartbeat: float
) -> AsyncIterator[bytes]:
    # Registered before the first byte: anything committed once the client reads
    # ": connected" reaches this stream, through the listener or the catch-up.
    subscriber = fanout.subscribe(user_id, start)
    try:
        yield OPENING
        written = time.monotonic()
        while not fanout.closing:
            subscriber.wake.clear()
            if subscriber.catch_up and time.monotonic() >= subscriber.catch_up_at:
                async for event in _catch_up(context, subscriber):
                    yield event
                    written = time.monotonic()
            # items the listener brought, unless a catch-up is due first (it finds
            # them too; sending them now would move the cursor past a gap)
            while subscriber.pending and not subscriber.catch_up:
                item_id, event = subscriber.pending.popleft()
                if subscriber.is_new(item_id):
                    subscriber.mark_sent(item_id)
                    yield event
                    written = time.monotonic()
            wait = written + heartbeat - time.monotonic()
            if subscriber.catch_up:
                wait = min(wait, subscriber.catch_up_at - time.monotonic())
            try:
                async with asyncio.timeout(max(0.0, wait)):
                    await subscriber.wake.wait()
            except TimeoutError:
                if time.monotonic() - written >= heartbeat:
                    yield HEARTBEAT
                    written = time.monotonic()
    finally:
        fanout.unsubscribe(subscriber)


async def _catch_up(context: ApiContext, subscriber: Subscriber) -> AsyncIterator[bytes]:
    """The user's items after the stream's cursor, page by page; no connection is
    held while the client reads.
    """
    subscriber.catch_up = False
    while True:
        try:
            page = await _page_after(context, subscriber.user_id, subscriber.cursor)
        except DB_ERRORS as error:
            # DEBUG: with the database down every stream fails alike; the listener
            # says so once, at WARNING
            log.debug("inbox stream: catch-up failed error=%s", type(error).__name__)
            pause = CATCH_UP_RETRY * 2 ** min(subscriber.catch_up_failures, 10)
            subscriber.catch_up_failures += 1
            subscriber.catch_up = True  # again after the pause, or at the next resync
            subscriber.catch_up_at = time.monotonic() + min(pause, CATCH_UP_RETRY_MAX)
            return
        for item_id, event in page:
            if subscriber.is_new(item_id):
                subscriber.mark_sent(item_id)
                yield event
        if len(page) < PAGE:
            subscriber.catch_up_failures = 0
            return


@get(
    "/api/v1/inbox/stream",
    **USER_ROUTE,
    # no media_type here: Litestar would give the errors (403, 400) that type too; the
    # stream sets its own
    operation_id="streamInbox",
    summary="The user's new inbox items as Server-Sent Events",
    description=__doc__.split("\n\n")[1] if __doc__ else None,
    responses=user_responses(
        {
            200: ResponseSpec(
                data_container=str,
                media_type="text/event-stream",
                description="Events `id: <item id>`, `event: item`, `data: <item JSON>`",
            ),
            400: ResponseSpec(data_container=ErrorBody, description="Last-Event-ID is garbage"),
            429: ResponseSpec(
                data_container=ErrorBody,
                description="Too many streams open for this user, or too many failed"
                " authentications from this address; see Retry-After",
            ),
        }
    ),
)
async def inbox_stream(request: Request[Any, Any, Any]) -> Stream:
    """Open the caller's stream."""
    user_id = user_of(request)
    resume = last_event_id(request)
    fanout: InboxFanout = request.app.state["inbox_fanout"]
    if fanout.closing:
        raise ServiceUnavailableException("the API is shutting down")
    if fanout.streams_of(user_id) >= MAX_STREAMS_PER_USER:
        raise TooManyRequestsException(
            f"at most {MAX_STREAMS_PER_USER} streams per user are open at once",
            headers={"RateLimit-Reset": "5"},  # the app's 429 handler makes Retry-After
        )
    context: ApiContext = request.app.state["outbox"]
    if resume is None:
        # from now on: the newest item is where this stream starts (503 if unknown)
        async with database(context, "inbox stream") as conn:
            cursor = await conn.execute(QUERIES["api_inbox_last_id"], {"user_id": user_id})
            row = await cursor.fetchone()
        resume = int(row[0]) if row else 0
    heartbeat: float = request.app.state["inbox_stream_heartbeat"]
    return Stream(
        _events(fanout, context, user_id, resume, heartbeat),
        media_type="text/event-stream",
        headers=HEADERS,
    )
