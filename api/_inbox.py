"""A user's in-app inbox over HTTP: list it, mark items read, count the unread.

Every route takes the user from the token (``role: "user"``, ``sub``), never from the
request: an item id of another user answers as an unknown one (404), and nothing
of theirs changes. Reading an alert's item acknowledges the alert
(``outbox.read_inbox_item``). The live stream is ``_inbox_stream``.

===  ============================================================================
GET  ``/api/v1/inbox?unread=true&cursor=<id>&limit=50``: ``{items, next_cursor}``,
     newest first; ``next_cursor`` is the last item's id when more may follow
     (the next page has smaller ids), else null
POST ``/api/v1/inbox/{id}/read``: 200 ``{read: true}`` (now or already); 404 unknown
     or another user's
POST ``/api/v1/inbox/read-all``: ``{read: n}``, the items marked now
GET  ``/api/v1/inbox/unread-count``: ``{unread: n}``
===  ============================================================================

401 no token, a bad one, or one without ``sub``; 403 the role is not ``user``; 422 a
query parameter out of range; 503 the database does not answer.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, Parameter

from outbox import InboxItem, inbox_async, read_all_inbox_items_async, read_inbox_item_async
from outbox._queries import QUERIES
from outbox.api._auth import user_of
from outbox.api._database import database
from outbox.api._testsend import ApiContext, ErrorBody
from outbox.api._user_routes import USER_ROUTE, user_responses

BIGINT_MAX = 2**63 - 1
DEFAULT_PAGE = 50
MAX_PAGE = 100
"""Items one page holds at most (the query asks for one more, to know if more follow)."""
NOT_FOUND = "inbox item not found"


class InboxItemView(msgspec.Struct, kw_only=True):
    """One notification in the user's inbox; times in UTC."""

    id: int
    message_id: int
    template: str
    title: str
    body: str
    url: str | None
    created_at: datetime
    read_at: datetime | None


class InboxPage(msgspec.Struct, kw_only=True):
    """One page, newest first; ``next_cursor`` asks for the next (null: no more)."""

    items: list[InboxItemView]
    next_cursor: int | None


class MarkedRead(msgspec.Struct, kw_only=True):
    """The item is read (by this request or an earlier one)."""

    read: bool = True


class MarkedAllRead(msgspec.Struct, kw_only=True):
    """How many unread items this request marked read."""

    read: int


class UnreadCount(msgspec.Struct, kw_only=True):
    """How many of the user's items are unread."""

    unread: int


class ItemNotFound(msgspec.Struct, kw_only=True):
    """No such item among the user's (another user's item answers the same)."""

    detail: str = NOT_FOUND


def _utc(moment: datetime | None) -> datetime | None:
    # every answer spells times alike, whatever the server's TimeZone
    return None if moment is None else moment.astimezone(UTC)


def item_view(item: InboxItem) -> InboxItemView:
    """The answer's shape of an :class:`outbox.InboxItem`."""
    return InboxItemView(
        id=item.id,
        message_id=item.message_id,
        template=item.template,
        title=item.title,
        body=item.body,
        url=item.url,
        created_at=item.created_at.astimezone(UTC),
        read_at=_utc(item.read_at),
    )


def row_view(row: Any) -> InboxItemView:
    """The answer's shape of a row ``(id, user_id, message_id, template, title, body,
    url, created_at, read_at)`` (the stream's statements).
    """
    return InboxItemView(
        id=row[0],
        message_id=row[2],
        template=row[3],
        title=row[4],
        body=row[5],
        url=row[6],
        created_at=row[7].astimezone(UTC),
        read_at=_utc(row[8]),
    )


@get(
    "/api/v1/inbox",
    **USER_ROUTE,
    operation_id="listInbox",
    summary="The user's inbox, newest first, a page at a time",
    responses=user_responses(
        {422: ResponseSpec(data_container=ErrorBody, description="A parameter is out of range")}
    ),
)
async def list_inbox(
    request: Request[Any, Any, Any],
    unread: Annotated[bool, Parameter(description="only the unread items")] = False,
    cursor: Annotated[
        int | None,
        Parameter(ge=1, le=BIGINT_MAX, description="next_cursor of the previous page"),
    ] = None,
    limit: Annotated[
        int, Parameter(ge=1, le=MAX_PAGE, description=f"items per page (at most {MAX_PAGE})")
    ] = DEFAULT_PAGE,
) -> InboxPage:
    """Answer one page of the caller's inbox."""
    user_id = user_of(request)
    async with database(request.app.state["outbox"], "inbox") as conn:
        items = await inbox_async(conn, user_id, unread_only=unread, before=cursor, limit=limit + 1)
    page = items[:limit]
    more = len(items) > limit
    return InboxPage(
        items=[item_view(item) for item in page], next_cursor=page[-1].id if more else None
    )


@post(
    "/api/v1/inbox/{item_id:int}/read",
    **USER_ROUTE,
    status_code=200,
    operation_id="readInboxItem",
    summary="Mark one of the user's items read (an alert's item acknowledges the alert)",
    responses=user_responses(
        {404: ResponseSpec(data_container=ItemNotFound, description="Unknown or another user's")}
    ),
)
async def read_item(item_id: FromPath[int], request: Request[Any, Any, Any]) -> Response[Any]:
    """Mark item ``item_id`` read; 200 when it is read now or was already."""
    user_id = user_of(request)
    if not 1 <= item_id <= BIGINT_MAX:
        return Response(ItemNotFound(), status_code=404)
    context: ApiContext = request.app.state["outbox"]
    async with database(context, "inbox read") as conn:
        if await read_inbox_item_async(conn, user_id, item_id):
            return Response(MarkedRead(), status_code=200)
        # nothing changed: read already (still 200: the caller's wish holds), or not
        # the caller's to read (404, as if it did not exist)
        params = {"item_id": item_id, "user_id": user_id}
        row = await (await conn.execute(QUERIES["api_inbox_item_is_read"], params)).fetchone()
    if row is None:
        return Response(ItemNotFound(), status_code=404)
    return Response(MarkedRead(), status_code=200)


@post(
    "/api/v1/inbox/read-all",
    **USER_ROUTE,
    status_code=200,
    operation_id="readAllInboxItems",
    summary="Mark every unread item of the user read (their alerts are acknowledged)",
    responses=user_responses(),
)
async def read_all(request: Request[Any, Any, Any]) -> MarkedAllRead:
    """Mark all the caller's unread items read; answer how many."""
    user_id = user_of(request)
    async with database(request.app.state["outbox"], "inbox read-all") as conn:
        return MarkedAllRead(read=await read_all_inbox_items_async(conn, user_id))


@get(
    "/api/v1/inbox/unread-count",
    **USER_ROUTE,
    operation_id="countUnreadInboxItems",
    summary="How many of the user's items are unread",
    responses=user_responses(),
)
async def unread_count(request: Request[Any, Any, Any]) -> UnreadCount:
    """Count the caller's unread items."""
    user_id = user_of(request)
    async with database(request.app.state["outbox"], "inbox unread-count") as conn:
        cursor = await conn.execute(QUERIES["api_inbox_unread_count"], {"user_id": user_id})
        row = await cursor.fetchone()
    return UnreadCount(unread=int(row[0]) if row else 0)
