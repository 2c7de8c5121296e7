"""One delivery, the same for the dispatcher and the API's test send.

render -> envelope -> send under a timeout -> an :class:`Outcome` (a channel that
raises or hangs becomes a ``TransientFailure``) -> its recipient effects written
-> its error clipped for the attempt log. The dispatcher adds what only queued
messages have: the pre-send rules, cluster rate limits, the breaker and the
finishing write (see ``docs/architecture.md``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from psycopg import AsyncConnection, AsyncCursor

from outbox._queries import QUERIES
from outbox.dispatcher._routing import RecipientRecord
from outbox.dispatcher.channels.base import (
    Channel,
    DeletePushSubscription,
    DisableChannel,
    DisableTelegram,
    Effect,
    Envelope,
    MarkAddressUndeliverable,
    MarkEmailUndeliverable,
    Outcome,
    RateLimited,
    Sent,
    TransientFailure,
    UpdateTelegramChat,
    WriteInboxItem,
)
from outbox.dispatcher.rendering import RenderCache
from outbox.vocabulary import ChannelName, LaneName

__all__ = [
    "Attempt",
    "RecipientRecord",
    "clip_error",
    "failure_of",
    "load_recipient",
    "prepare",
    "send",
    "write_effect",
]

log = logging.getLogger("outbox.dispatcher")

MAX_ERROR_LENGTH = 2000
"""Characters of an error kept in ``outbox.attempt`` and ``outbox.message``."""


async def load_recipient(conn: AsyncConnection[Any], user_id: str) -> RecipientRecord | None:
    """The addresses and preferences of one user, or None when unknown."""
    cursor = await conn.execute(QUERIES["recipients"], {"user_ids": [user_id]})
    row = await cursor.fetchone()
    return None if row is None else RecipientRecord.from_row(row)


def clip_error(text: str | None) -> str | None:
    """An error text fit for a row: no NUL (text columns refuse it), at most
    :data:`MAX_ERROR_LENGTH` characters.
    """
    if text is None:
        return None
    text = text.replace("\x00", "")
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


def failure_of(outcome: Outcome) -> tuple[str | None, str | None]:
    """``(error_class, error)`` of an outcome; ``(None, None)`` for ``Sent``."""
    if isinstance(outcome, Sent):
        return None, None
    if isinstance(outcome, RateLimited):
        return "rate_limited", f"{outcome.error} (retry after {outcome.retry_after:.0f} s)"
    return outcome.error_class, outcome.error


async def prepare(
    renderer: RenderCache,
    *,
    message_id: int,
    lane: str,
    channel: str,
    user_id: str,
    template: str,
    vars: Mapping[str, Any] | None,
    vars_key: str | None,
    attempt: int,
    recipient: RecipientRecord,
    in_thread: bool = False,
    ack_url: str | None = None,
) -> Envelope:
    """Render and address one message; raise ``TemplateRenderError`` (or another
    ``OutboxError``) when it cannot be rendered.

    ``in_thread`` renders in a worker thread whatever the vars (the API's request
    vars are decoded already, up to 64 KiB); otherwise only vars the renderer
    would decode (long ones) leave the event loop. ``ack_url``: the signed
    acknowledgement link of an alert (the template variable of that name).
    """
    if in_thread:
        content = await asyncio.to_thread(
            renderer.render,
            channel,
            template,
            vars,
            vars_key=vars_key,
            message_id=message_id,
            lane=lane,
            ack_url=ack_url,
        )
    else:
        content = await renderer.render_async(
            channel,
            template,
            vars,
            vars_key=vars_key,
            message_id=message_id,
            lane=lane,
            ack_url=ack_url,
        )
    return Envelope(
        message_id=message_id,
        lane=cast(LaneName, lane),
        channel=cast(ChannelName, channel),
        user_id=user_id,
        template=template,
        attempt=attempt,
        recipient=recipient.addresses(),
        content=content,
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class Attempt:
    """What one provider call gave: its outcome and how long it took."""

    outcome: Outcome
    duration_ms: float


async def send(channel: Channel, envelope: Envelope, *, timeout: float) -> Attempt:
    """``channel.send(envelope)`` within ``timeout`` seconds; never raises.

    A channel is not supposed to raise; one that does (a bug, an unexpected
    library error) gives a ``TransientFailure`` of class ``internal`` naming the
    exception, and one that does not answer in time a ``timeout``.
    """
    started = time.perf_counter()
    outcome: Outcome
    try:
        async with asyncio.timeout(timeout):
            outcome = await channel.send(envelope)
    except TimeoutError:
        outcome = TransientFailure(error_class="timeout", error=f"no answer within {timeout:.0f} s")
    except Exception as error:
        log.exception("channel raised id=%d channel=%s", envelope.message_id, envelope.channel)
        outcome = TransientFailure(error_class="internal", error=f"{type(error).__name__}: {error}")
    return Attempt(outcome=outcome, duration_ms=(time.perf_counter() - started) * 1000)


async def write_effect(
    target: AsyncConnection[Any] | AsyncCursor[Any], user_id: str, effect: Effect
) -> None:
    """Apply one recipient side effect in the caller's transaction."""
    match effect:
        case DisableTelegram() | DisableChannel():
            channel = "telegram" if isinstance(effect, DisableTelegram) else effect.channel
            await target.execute(
                QUERIES["effect_disable_channel"], {"user_id": user_id, "channel": channel}
            )
        case MarkEmailUndeliverable() | MarkAddressUndeliverable():
            channel = "email" if isinstance(effect, MarkEmailUndeliverable) else effect.channel
            await target.execute(
                QUERIES["effect_address_undeliverable"],
                {
                    "user_id": user_id,
                    "channel": channel,
                    "reason": f"{channel} provider refused it",
                },
            )
        case UpdateTelegramChat(chat_id=chat_id):
            await target.execute(
                QUERIES["effect_telegram_chat"], {"user_id": user_id, "chat_id": chat_id}
            )
        case DeletePushSubscription(endpoint=endpoint):
            await target.execute(
                QUERIES["effect_delete_subscription"], {"user_id": user_id, "endpoint": endpoint}
            )
        case WriteInboxItem(message_id=message_id, template=template, item=item):
            await target.execute(
                QUERIES["effect_inbox_item"],
                {
                    "user_id": user_id,
                    "message_id": message_id,
                    "template": template,
                    "title": item.title,
                    "body": item.body,
                    "url": item.url,
                },
            )
            return  # a delivery, not a change of the recipient: no log line per message
    log.info("recipient updated user=%s effect=%s", user_id, type(effect).__name__)
