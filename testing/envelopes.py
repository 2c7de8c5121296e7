"""Small builders of :class:`~outbox.dispatcher.channels.base.Envelope` values for tests."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from typing import Any

from outbox.dispatcher.channels.base import (
    Envelope,
    PushSubscription,
    Recipient,
    Rendered,
    RenderedEmail,
    RenderedPush,
    RenderedSms,
    RenderedTelegram,
)
from outbox.vocabulary import ChannelName, LaneName

Lane = LaneName
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
    return _envelope(
        "email",
        "position_failure_entry",
        Recipient(user_id="u1", email=to),
        RenderedEmail(subject=subject, html=html, text=text),
        message_id=message_id,
        lane=lane,
        attempt=attempt,
    )


def telegram_envelope(
    chat_id: int | None = 4242,
    *parts: str,
    message_id: int | None = None,
    lane: Lane = "transactional",
    attempt: int = 1,
) -> Envelope:
    """A Telegram envelope for user ``u1``; ``parts`` are MarkdownV2 texts."""
    return _envelope(
        "telegram",
        "price_alert",
        Recipient(user_id="u1", telegram_chat_id=chat_id),
        RenderedTelegram(parts=parts or ("*Price alert*: EURUSD above 1\\.1000",)),
        message_id=message_id,
        lane=lane,
        attempt=attempt,
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
    return _envelope(
        "push",
        "price_alert",
        Recipient(user_id="u1", push_subscriptions=tuple(subscriptions)),
        RenderedPush(payload=payload, body=body, topic=topic),
        message_id=message_id,
        lane=lane,
        attempt=attempt,
    )


def sms_envelope(
    number: str | None = "+15005550006",
    text: str = "URGENT: the stop loss on your BUY EURUSD position could not be closed.",
    *,
    message_id: int | None = None,
    lane: Lane = "transactional",
    attempt: int = 1,
) -> Envelope:
    """An SMS envelope for user ``u1``; segments are counted as the renderer does."""
    from outbox.dispatcher.sms_text import count_segments

    cost = count_segments(text)
    return _envelope(
        "sms",
        "position_failure_sl",
        Recipient(user_id="u1", addresses={} if number is None else {"sms": number}),
        RenderedSms(text=text, encoding=cost.encoding, segments=cost.segments),
        message_id=message_id,
        lane=lane,
        attempt=attempt,
    )


def _envelope(
    channel: ChannelName,
    template: str,
    recipient: Recipient,
    content: Rendered,
    *,
    message_id: int | None,
    lane: Lane,
    attempt: int,
) -> Envelope:
    return Envelope(
        message_id=next(_ids) if message_id is None else message_id,
        lane=lane,
        channel=channel,
        user_id="u1",
        template=template,
        attempt=attempt,
        recipient=recipient,
        content=content,
    )
