"""Where a message is: ``outbox.message_status``.

Answered from ``outbox.message`` while the row exists and from the delivery log
(``outbox.attempt``) after it is gone, each through an index: cheap however long
the history. A producer's role sees only the messages it enqueued.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from outbox._db import fetch_one, fetch_one_async
from outbox._message_id import check_message_id

MessageState = Literal[
    "pending",
    "sending",
    "sent",
    "dead",
    "cancelled",
    "expired",
    "superseded",
    "awaiting_ack",
    "acknowledged",
    "skipped",
]
"""``skipped``: the user's preferences left no channel for it (it was muted)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class AttemptRecord:
    """One row of the delivery log: an attempt, a hop or a withdrawal."""

    attempt: int
    channel: str
    outcome: str
    error_class: str | None
    at: datetime


@dataclass(frozen=True, kw_only=True, slots=True)
class MessageStatus:
    """One message's state, its current (or last) channel and its attempts."""

    id: int
    state: MessageState
    channel: str
    attempts: tuple[AttemptRecord, ...]


def _status(message_id: int, row: Any) -> MessageStatus | None:
    if row is None or row[0] is None:
        return None
    state, channel, attempts = row
    if isinstance(attempts, str):
        attempts = json.loads(attempts)
    return MessageStatus(
        id=message_id,
        state=state,
        channel=channel,
        attempts=tuple(
            AttemptRecord(
                attempt=attempt,
                channel=attempt_channel,
                outcome=outcome,
                error_class=error_class,
                at=datetime.fromisoformat(at),
            )
            for attempt, attempt_channel, outcome, error_class, at in attempts or ()
        ),
    )


def message_status(conn: Any, message_id: int) -> MessageStatus | None:
    """The state of ``message_id`` (``pending``, ``sending``, ``sent``, ``dead``,
    ``cancelled``, ``expired``, ``superseded``, ``awaiting_ack``, ``acknowledged``,
    or ``skipped``), its channel and its attempts, oldest first; None when unknown
    (or not the caller's).
    """
    checked = check_message_id(message_id)
    return _status(checked, fetch_one(conn, "message_status", {"id": checked}))


async def message_status_async(conn: Any, message_id: int) -> MessageStatus | None:
    """Asynchronous :func:`message_status`; same contract, same SQL."""
    checked = check_message_id(message_id)
    return _status(checked, await fetch_one_async(conn, "message_status", {"id": checked}))
