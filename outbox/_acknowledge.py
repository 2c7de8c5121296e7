"""The user saw an alert: ``outbox.acknowledge`` stops its escalation.

An alert is a message enqueued with ``escalate_after``. Once sent, it waits that
long for an acknowledgement, then goes to the next channel of its chain. The
acknowledgement comes from the platform (this function, in the caller's
transaction), from the signed ``ack_url`` in the message (``GET /ack/{token}``
of the API), or, once the in-app inbox exists, from reading it there.
"""

from __future__ import annotations

from typing import Any

from outbox._db import fetch_one, fetch_one_async
from outbox._message_id import check_message_id


def acknowledge(conn: Any, message_id: int) -> bool:
    """Acknowledge the alert ``message_id``: nothing more is sent for it.

    True when this call acknowledged it; False when it is unknown, not the
    caller's, not an alert, not sent yet, or acknowledged already. An escalation
    already handed to its dispatcher (in flight) still goes out; nothing after it.
    """
    row = fetch_one(conn, "acknowledge", {"id": check_message_id(message_id)})
    return bool(row and row[0])


async def acknowledge_async(conn: Any, message_id: int) -> bool:
    """Asynchronous :func:`acknowledge`; same contract, same SQL."""
    row = await fetch_one_async(conn, "acknowledge", {"id": check_message_id(message_id)})
    return bool(row and row[0])
