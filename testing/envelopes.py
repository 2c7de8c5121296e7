"""Small builders of :class:`~outbox.dispatcher.channels.base.Envelope` values for tests."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any, Literal

from outbox.dispatcher.channels.base import (
    Envelope,
    PushSubscription,
    Recipient,
    RenderedEmail,
    RenderedPush,
    RenderedTelegram,
)

Lane = Literal["transactional", "campaign"]
_ids = itertools.count(1000)


def email_envelope(
    to: str | None = "trader@example.com",
    *,
    subject: str = "⚠️ Manual Trade Entry Required - EURUSD",
    html: str = "<html><body><p>Entry for <b>EURUSD</b> failed.</p></body></html>",
    text: str = "Entry for EURUSD failed.",
    message_id: int | None = None,
    lane: Lane = "transactional",
    attempt: int = 1,
) -> Envelope:
    """An email envelope for user ``u1``."""
    return Envelope(
        message_id=next(_ids) if message_id is None else message_id,
        lane=lane,
        channel="email",
        user_id="u1",
        template="position_failure_entry",
        attempt=attempt,
        recipient=Recipient(user_id="u1", email=to),
        content=RenderedEmail(subject=subject, html=html, text=text),
    )


def telegram_envelope(
    chat_id: int | None = 4242,
    *parts: str,
    message_id: int | None = None,
    lane: Lane = "transactional",
    attempt: int = 1,
) -> Envelope:
    """A Telegram envelope for user ``u1``; ``parts`` are MarkdownV2 texts."""
    return Envelope(
        message_id=next(_ids) if message_id is None else message_id,
        lane=lane,
        channel="telegram",
        user_id="u1",
        template="price_alert",
        attempt=attempt,
        recipient=Recipient(user_id="u1", telegram_chat_id=chat_id),
        content=RenderedTelegram(parts=parts or ("*Price alert*: EURUSD above 1\\.1000",)),
    )


def push_envelope(
    *subscriptions: PushSubscription,
    payload: Mapping[str, Any] | None = None,
    topic: str | None = "price-alert-EURUSD",
    message_id: int | None = None,
    lane: Lane = "transactional",
    attempt: int = 1,
) -> Envelope:
    """A push envelope for user ``u1`` with the given subscriptions."""
    payload = payload or {
        "title": "Price alert: EURUSD above 1.1000",
        "body": "EURUSD is at 1.1012",
        "icon": "/static/icon.png",
        "badge": "/static/badge.png",
        "data": {"url": "https://platform.example.com/dashboard/positions"},
    }
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return Envelope(
        message_id=next(_ids) if message_id is None else message_id,
        lane=lane,
        channel="push",
        user_id="u1",
        template="price_alert",
        attempt=attempt,
        recipient=Recipient(user_id="u1", push_subscriptions=tuple(subscriptions)),
        content=RenderedPush(payload=payload, body=body, topic=topic),
    )
