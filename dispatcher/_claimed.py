"""A claimed message as the dispatcher holds it, decoded from a row of ``claim_batch``."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from outbox.dispatcher._routing import RecipientRecord
from outbox.dispatcher._stored_vars import stored_vars

MESSAGE_COLUMNS = 9
"""``claim_batch`` returns the message in its first columns, then its recipient."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Lease:
    """One claim of one message: the token fences every write of this claim.

    Compared by identity where it matters (``LeaseBook``): the same message claimed
    twice by one dispatcher (its own lease ran out during an outage) is two leases.
    """

    id: int
    token: uuid.UUID


@dataclass(frozen=True, kw_only=True, slots=True)
class Claimed:
    """A message this dispatcher leases."""

    id: int
    lane: str
    priority: int
    channel: str
    user_id: str
    template: str
    vars: Mapping[str, Any] | None
    """None: not decoded yet (long, withheld or too deep; see ``_stored_vars``)."""
    fallback: tuple[str, ...] | None
    attempts: int
    lease: Lease
    vars_key: str | None = None
    """The stored text of ``vars``: equal texts render equally (see RenderCache)."""

    @classmethod
    def from_row(cls, row: Sequence[Any], token: uuid.UUID) -> Claimed:
        """Build from the message columns of a ``claim_batch`` row run with ``token``."""
        id_, lane, priority, channel, user_id, template, vars_text, fallback, attempts = row
        return cls(
            id=id_,
            lane=lane,
            priority=priority,
            channel=channel,
            user_id=user_id,
            template=template,
            vars=stored_vars(vars_text),
            fallback=tuple(fallback) if fallback is not None else None,
            attempts=attempts,
            lease=Lease(id=id_, token=token),
            vars_key=vars_text,
        )


def decode_claim(
    rows: Sequence[Sequence[Any]], token: uuid.UUID
) -> list[tuple[Claimed, RecipientRecord | None]]:
    """The messages of one claim with their recipients (None: no ``outbox.recipient``
    row). Several messages of one user share one decoded record.
    """
    decoded: list[tuple[Claimed, RecipientRecord | None]] = []
    recipients: dict[str, RecipientRecord] = {}
    for row in rows:
        message = Claimed.from_row(row[:MESSAGE_COLUMNS], token)
        recipient = None
        if row[MESSAGE_COLUMNS] is not None:
            recipient = recipients.get(message.user_id)
            if recipient is None:
                recipient = RecipientRecord.from_row(row[MESSAGE_COLUMNS:])
                recipients[message.user_id] = recipient
        decoded.append((message, recipient))
    return decoded
