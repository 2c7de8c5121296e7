"""The in-app inbox of one user: what channel ``inapp`` delivered, newest first.

Reading an item is how the user says "seen": for an alert (``escalate_after``) it
is the acknowledgement, in the same transaction, like the signed link. These run
on the caller's connection or session and never begin, commit or roll back. They
need the role of the service that manages users (``outbox_recipient_writer``) or
the API's (``outbox_dispatcher``); the user's identity is the caller's to check.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from outbox._db import fetch_one, fetch_one_async
from outbox._enqueue import check_text
from outbox._errors import InvalidMessage
from outbox._message_id import check_message_id

MAX_PAGE = 200
"""Items one call returns at most."""


@dataclass(frozen=True, kw_only=True, slots=True)
class InboxItem:
    """One notification in a user's inbox."""

    id: int
    message_id: int
    template: str
    title: str
    body: str
    url: str | None
    created_at: datetime
    read_at: datetime | None

    @property
    def unread(self) -> bool:
        return self.read_at is None


def inbox_params(
    user_id: str, *, unread_only: bool, before: int | None, limit: int
) -> dict[str, Any]:
    """Validate an inbox query; return the ``inbox`` statement's parameters."""
    check_text("user_id", user_id)
    if not isinstance(unread_only, bool):
        raise InvalidMessage("unread_only must be True or False")
    if before is not None:
        check_message_id(before)  # an item id follows the same rule as a message id
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidMessage(f"limit must be an integer from 1 to {MAX_PAGE}")
    return {"user_id": user_id, "unread_only": unread_only, "before": before, "limit": limit}


def _items(row: Any) -> list[InboxItem]:
    if row is None or row[0] is None:
        return []
    return [
        InboxItem(
            id=item[0],
            message_id=item[1],
            template=item[2],
            title=item[3],
            body=item[4],
            url=item[5],
            created_at=datetime.fromisoformat(item[6]),
            read_at=datetime.fromisoformat(item[7]) if item[7] else None,
        )
        for item in row[0]
    ]


def inbox(
    conn: Any,
    user_id: str,
    *,
    unread_only: bool = False,
    before: int | None = None,
    limit: int = 50,
) -> list[InboxItem]:
    """The user's inbox items, newest first; ``before``: only items older than that
    item id (the next page); ``unread_only``: items not read yet.
    """
    params = inbox_params(user_id, unread_only=unread_only, before=before, limit=limit)
    return _items(fetch_one(conn, "inbox", params))


async def inbox_async(
    conn: Any,
    user_id: str,
    *,
    unread_only: bool = False,
    before: int | None = None,
    limit: int = 50,
) -> list[InboxItem]:
    """Asynchronous :func:`inbox`; same contract, same SQL."""
    params = inbox_params(user_id, unread_only=unread_only, before=before, limit=limit)
    return _items(await fetch_one_async(conn, "inbox", params))


def read_inbox_item(conn: Any, user_id: str, item_id: int) -> bool:
    """Mark one of the user's items read (and acknowledge its alert); False when it
    is unknown, another user's, or read already.
    """
    params = {"user_id": check_text("user_id", user_id), "item_id": check_message_id(item_id)}
    row = fetch_one(conn, "read_inbox_item", params)
    return bool(row and row[0])


async def read_inbox_item_async(conn: Any, user_id: str, item_id: int) -> bool:
    """Asynchronous :func:`read_inbox_item`."""
    params = {"user_id": check_text("user_id", user_id), "item_id": check_message_id(item_id)}
    row = await fetch_one_async(conn, "read_inbox_item", params)
    return bool(row and row[0])


def read_all_inbox_items(conn: Any, user_id: str) -> int:
    """Mark every unread item of the user read (and acknowledge their alerts);
    returns how many.
    """
    row = fetch_one(conn, "read_all_inbox_items", {"user_id": check_text("user_id", user_id)})
    return int(row[0]) if row else 0


async def read_all_inbox_items_async(conn: Any, user_id: str) -> int:
    """Asynchronous :func:`read_all_inbox_items`."""
    params = {"user_id": check_text("user_id", user_id)}
    row = await fetch_one_async(conn, "read_all_inbox_items", params)
    return int(row[0]) if row else 0
