"""The one rule for a message id passed back by a caller: a positive 64-bit integer."""

from __future__ import annotations

from outbox._errors import InvalidMessage

_BIGINT_MAX = 2**63 - 1


def check_message_id(message_id: object) -> int:
    """Return ``message_id`` if it can name a message, else raise ``InvalidMessage``."""
    if isinstance(message_id, bool) or not isinstance(message_id, int):
        raise InvalidMessage(f"message_id must be an integer, not {type(message_id).__name__}")
    if not 1 <= message_id <= _BIGINT_MAX:
        raise InvalidMessage(f"message_id {message_id} is not a message id")
    return message_id
