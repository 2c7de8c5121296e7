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
from typing import Any

from psycopg import AsyncConnection, AsyncCursor

from outbox._queries import QUERIES
from outbox.dispatcher._routing import RecipientRecord
from outbox.dispatcher._values import value_builder
from outbox.dispatcher.channels._redaction import describe_raised
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
    Recipient,
    Rendered,
    Sent,
    TransientFailure,
    UpdateTelegramChat,
    WriteInboxItem,
)
from outbox.dispatcher.rendering import RenderCache

__all__ = [
    "Attempt",
    "RecipientRecord",
    "SendDeadlines",
    "address",
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
    return address(
        content,
        message_id=message_id,
        lane=lane,
        channel=channel,
        user_id=user_id,
        template=template,
        attempt=attempt,
        recipient=recipient.addresses(),
    )


def address(
    content: Rendered,
    *,
    message_id: int,
    lane: str,
    channel: str,
    user_id: str,
    template: str,
    attempt: int,
    recipient: Recipient,
) -> Envelope:
    """The envelope of rendered ``content`` to ``recipient`` (what :func:`prepare`
    returns once it has rendered).
    """
    return _build_envelope(  # Envelope(...): lane and channel are the row's, checked there
        message_id=message_id,
        lane=lane,
        channel=channel,
        user_id=user_id,
        template=template,
        attempt=attempt,
        recipient=recipient,
        content=content,
    )


_build_envelope = value_builder(Envelope)


@dataclass(frozen=True, kw_only=True, slots=True)
class Attempt:
    """What one provider call gave: its outcome and how long it took."""

    outcome: Outcome
    duration_ms: float


_build_attempt = value_builder(Attempt)


class SendDeadlines:
    """The time limit of the sends one task makes one after another, without a timer each.

    ``asyncio.timeout`` schedules and cancels a timer on the event loop for every
    send, which costs more than a send to a fast provider. A task that sends
    message after message (a sender) keeps one of these instead: a send only
    notes its deadline; one timer per task checks it when it fires, and re-arms
    itself for the deadline of the send under way, if that is still ahead. A send
    that outlives its deadline is cancelled, as ``asyncio.timeout`` would. Made
    in the task that sends, and used by it alone.
    """

    def __init__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("SendDeadlines() belongs to the task that makes the sends")
        self.task: asyncio.Task[Any] = task
        """The task whose sends these are (the one that made this object)."""
        self._deadline = 0.0
        self._sending = False
        self._timer: asyncio.TimerHandle | None = None
        self.expired = False
        """The send under way was cancelled for its deadline."""

    def start(self, timeout: float) -> None:
        """A send of at most ``timeout`` seconds starts now, in :attr:`task`."""
        self._deadline = time.monotonic() + timeout
        self._sending = True
        self.expired = False
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(self._deadline, self._check)
        elif self._timer.when() > self._deadline:  # a shorter timeout than the timer's
            self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_at(self._deadline, self._check)

    def stop(self) -> None:
        """The send has ended (answered, failed or cancelled)."""
        self._sending = False

    def _check(self) -> None:
        self._timer = None
        if not self._sending:
            return  # the next send arms a timer again
        if time.monotonic() >= self._deadline:
            self.expired = True
            self.task.cancel()
        else:
            self._timer = asyncio.get_running_loop().call_at(self._deadline, self._check)

    def close(self) -> None:
        """No more sends: drop the timer."""
        self._sending = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def send(
    channel: Channel,
    envelope: Envelope,
    *,
    timeout: float,
    deadlines: SendDeadlines | None = None,
) -> Attempt:
    """``channel.send(envelope)`` within ``timeout`` seconds; never raises.

    A channel is not supposed to raise; one that does (a bug, an unexpected
    library error) gives a ``TransientFailure`` of class ``internal`` naming the
    exception, and one that does not answer in time a ``timeout``. A task that
    sends many messages in turn passes its :class:`SendDeadlines` to time them.
    """
    started = time.perf_counter()
    outcome: Outcome
    try:
        if deadlines is None:
            async with asyncio.timeout(timeout):
                outcome = await channel.send(envelope)
        else:
            outcome = await _send_by(deadlines, channel, envelope, timeout)
    except TimeoutError:
        outcome = TransientFailure(error_class="timeout", error=f"no answer within {timeout:.0f} s")
    except Exception as raised:
        # its text may carry a request URL with a token in it: stored and logged
        # with every URL cut to its host (the row and the log are read by operators)
        error, trace = describe_raised(raised)
        log.error(
            "channel raised id=%d channel=%s error=%s\n%s",
            envelope.message_id,
            envelope.channel,
            error,
            trace.rstrip(),
        )
        outcome = TransientFailure(error_class="internal", error=error)
    return _build_attempt(outcome, (time.perf_counter() - started) * 1000)  # Attempt(...)


async def _send_by(
    deadlines: SendDeadlines, channel: Channel, envelope: Envelope, timeout: float
) -> Outcome:
    task = deadlines.task
    cancelling = task.cancelling()
    deadlines.start(timeout)
    try:
        outcome = await channel.send(envelope)
    except asyncio.CancelledError:
        # our cancel alone becomes a timeout; one from elsewhere (shutdown) goes on
        if deadlines.expired and task.uncancel() <= cancelling:
            raise TimeoutError from None
        raise
    finally:
        deadlines.stop()
    if deadlines.expired:  # the channel swallowed our cancel: take the request back
        task.uncancel()
    return outcome


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
