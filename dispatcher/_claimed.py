"""A claimed message as the dispatcher holds it, decoded from a row of ``claim_batch``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from outbox.dispatcher._routing import RecipientRecord
from outbox.dispatcher._stored_vars import stored_vars
from outbox.dispatcher._values import value_builder

MESSAGE_COLUMNS = 15
"""``claim_batch`` returns the message in its first columns, then its recipient."""

KNOWN_RECIPIENTS = 10_000
"""Users whose recipient record a :class:`ClaimDecoder` keeps (cleared when full)."""


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
    expires_at: datetime | None = None
    """Not sent after this moment (outcome ``expired``)."""
    escalate_after: float | None = None
    """An alert: seconds it waits for the acknowledgement once sent."""
    acknowledged: bool = False
    """The user acknowledged it while it was in flight: nothing more to send."""
    sent_before: bool = False
    """An alert sent on an earlier channel (this is an escalation or its retry)."""
    escalated: bool = False
    """This claim is the escalation of an unacknowledged alert (logged by the claim)."""
    preferences: tuple[tuple[str, frozenset[str]], ...] = ()
    """The user's preferences for this topic: (instrument or '', allowed channels)."""

    def allowed_channels(self) -> frozenset[str] | None:
        """The channels the user's preferences allow for this message, None: all.

        A preference for the message's ``vars["instrument"]`` wins over the topic's.
        """
        if not self.preferences:
            return None
        instrument = self.vars.get("instrument") if self.vars is not None else None
        topic_wide = None
        for scope, channels in self.preferences:
            if scope == "":
                topic_wide = channels
            elif scope == instrument:
                return channels
        return topic_wide

    @classmethod
    def from_row(cls, row: Sequence[Any], token: uuid.UUID) -> Claimed:
        """Build from the message columns of a ``claim_batch`` row run with ``token``."""
        (
            id_,
            lane,
            priority,
            channel,
            user_id,
            template,
            vars_text,
            fallback,
            attempts,
            expires_at,
            escalate_after,
            acknowledged,
            sent_before,
            escalated,
            preferences,
        ) = row
        if isinstance(preferences, str):
            preferences = json.loads(preferences)
        return _build_claimed(  # Claimed(...), by field order
            id_,
            lane,
            priority,
            channel,
            user_id,
            template,
            stored_vars(vars_text),
            tuple(fallback) if fallback is not None else None,
            attempts,
            _build_lease(id_, token),
            vars_text,
            expires_at,
            escalate_after,
            acknowledged,
            sent_before,
            escalated,
            tuple((scope, frozenset(channels)) for scope, channels in preferences)
            if preferences
            else (),
        )


_build_claimed = value_builder(Claimed)
_build_lease = value_builder(Lease)


class ClaimDecoder:
    """Turns the rows of claims into messages with their recipients.

    A user's recipient record is decoded once and kept while the columns it was
    decoded from come back unchanged (compared in full on every row, so a change
    of address or preference is seen by the next claim), for at most
    :data:`KNOWN_RECIPIENTS` users.
    """

    def __init__(self) -> None:
        self._known: dict[str, tuple[Sequence[Any], RecipientRecord]] = {}

    def decode(
        self, rows: Sequence[Sequence[Any]], token: uuid.UUID
    ) -> list[tuple[Claimed, RecipientRecord | None]]:
        """The messages of one claim with their recipients (None: no
        ``outbox.recipient`` row).
        """
        decoded: list[tuple[Claimed, RecipientRecord | None]] = []
        known = self._known
        for row in rows:
            message = Claimed.from_row(row[:MESSAGE_COLUMNS], token)
            recipient = None
            if row[MESSAGE_COLUMNS] is not None:
                columns = row[MESSAGE_COLUMNS:]
                found = known.get(message.user_id)
                if found is not None and found[0] == columns:
                    recipient = found[1]
                else:
                    recipient = RecipientRecord.from_row(columns)
                    if len(known) >= KNOWN_RECIPIENTS:
                        known.clear()
                    known[message.user_id] = (columns, recipient)
            decoded.append((message, recipient))
        return decoded


def decode_claim(
    rows: Sequence[Sequence[Any]], token: uuid.UUID
) -> list[tuple[Claimed, RecipientRecord | None]]:
    """The messages of one claim with their recipients (None: no ``outbox.recipient``
    row). Several messages of one user share one decoded record.
    """
    return ClaimDecoder().decode(rows, token)
