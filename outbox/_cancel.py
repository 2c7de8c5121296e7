"""Withdraw a message before it is sent: ``outbox.cancel``.

A pending message that no dispatcher has claimed is deleted and logged
``cancelled``; it is never sent. One already claimed is not cancelled (the answer is
False) and is delivered: its dispatcher may have handed it to the provider
already, and no cancel can take that back. Like enqueue, this runs in the
caller's transaction: a cancel that rolls back cancels nothing.

A producer's database role may cancel only the messages it enqueued itself
(``outbox.message.enqueued_by``); operators may cancel any.
"""

from __future__ import annotations

from typing import Any

from outbox._db import fetch_one, fetch_one_async
from outbox._message_id import check_message_id


def cancel(conn: Any, message_id: int) -> bool:
    """Withdraw ``message_id`` if it is pending and nobody has started sending it.

    True when it was withdrawn (it will never be sent); False when it is unknown,
    not the caller's, already sent, in flight or dead. Never begins, commits or
    rolls back the caller's transaction.
    """
    row = fetch_one(conn, "cancel", {"id": check_message_id(message_id)})
    return bool(row and row[0])


async def cancel_async(conn: Any, message_id: int) -> bool:
    """Asynchronous :func:`cancel`; same contract, same SQL."""
    row = await fetch_one_async(conn, "cancel", {"id": check_message_id(message_id)})
    return bool(row and row[0])
