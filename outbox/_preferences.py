"""Preferences by topic: which channels a user wants a kind of message on.

A topic is a template name (``price_alert``); a preference may narrow it to one
instrument (``vars["instrument"]``), and that one wins over the topic's. A message
on a channel the preference leaves out is skipped (error class ``preference``)
and goes to the next allowed channel of its chain; an empty list mutes the topic.
Position-failure alerts (``position_failure_*``) cannot be muted on every channel:
a failed stop-loss must reach the trader somewhere. Needs the role of the service
that registers users (``outbox_recipient_writer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from outbox._db import fetch_one, fetch_one_async
from outbox._enqueue import check_channel, check_text
from outbox._errors import InvalidMessage
from outbox.vocabulary import UNMUTABLE_PREFIX


def preference_params(
    user_id: str, *, topic: str, channels: Sequence[str] | None, instrument: str | None
) -> dict[str, Any]:
    """Validate a preference; return the ``set_preference`` parameters."""
    check_text("user_id", user_id)
    check_text("topic", topic)
    if instrument is not None:
        check_text("instrument", instrument)
    checked: list[str] | None = None
    if channels is not None:
        if isinstance(channels, str) or not isinstance(channels, Sequence):
            raise InvalidMessage("channels must be a list of channel names (empty: mute)")
        checked = sorted({check_channel(channel) for channel in channels})
        if not checked and topic.startswith(UNMUTABLE_PREFIX):
            raise InvalidMessage(
                f"{topic} is a position-failure alert: it cannot be muted on every channel"
            )
    return {"user_id": user_id, "topic": topic, "channels": checked, "instrument": instrument}


def set_preference(
    conn: Any,
    user_id: str,
    *,
    topic: str,
    channels: Sequence[str] | None,
    instrument: str | None = None,
) -> None:
    """Deliver ``topic`` (only for ``instrument`` when given) to ``user_id`` on
    ``channels`` only; ``[]`` mutes it, None forgets the preference. Raises
    :class:`~outbox.InvalidMessage` before anything is written.
    """
    fetch_one(
        conn,
        "set_preference",
        preference_params(user_id, topic=topic, channels=channels, instrument=instrument),
    )


async def set_preference_async(
    conn: Any,
    user_id: str,
    *,
    topic: str,
    channels: Sequence[str] | None,
    instrument: str | None = None,
) -> None:
    """Asynchronous :func:`set_preference`; same contract, same SQL."""
    await fetch_one_async(
        conn,
        "set_preference",
        preference_params(user_id, topic=topic, channels=channels, instrument=instrument),
    )
