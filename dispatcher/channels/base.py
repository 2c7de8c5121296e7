"""What a channel receives, what it answers, and the protocol it implements.

The dispatcher renders a claimed message into one of the ``Rendered*`` values,
wraps it in an :class:`Envelope` with the recipient's addresses, and awaits
``channel.send(envelope)``. The channel answers with one :class:`Outcome`; the
dispatcher turns outcomes into database writes uniformly:

==================  =====================================================
``Sent``            row deleted, attempt ``sent`` logged
``TransientFailure``  retry after backoff (burns an attempt), dead when exhausted
``PermanentFailure``  dead at once
``RateLimited``     retried at ``retry_after`` without burning an attempt
``Unreachable``     this channel cannot reach the user: fallback or dead
``ChannelOutage``   the whole channel is down: circuit breaker, no attempt burned
==================  =====================================================

Side effects on the recipient (Telegram blocked the bot, a push subscription is
gone, an address bounced, a chat migrated) travel as ``effects`` on the outcome and
are written in the same transaction as the acknowledgement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from outbox.vocabulary import CHANNELS as CHANNELS  # re-exported for channel plugins
from outbox.vocabulary import ChannelName as ChannelName
from outbox.vocabulary import LaneName

# --- rendered content ---------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RenderedEmail:
    """An email ready to send: subject (from ``<title>``), HTML and plain text."""

    subject: str
    html: str
    text: str


@dataclass(frozen=True, kw_only=True)
class RenderedTelegram:
    """Telegram MarkdownV2 text, already split into parts of at most 4096 characters."""

    parts: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class RenderedPush:
    """A Web Push payload (title, body, icon, badge, data.url) and its encoding."""

    payload: Mapping[str, Any]
    body: bytes
    """UTF-8 JSON of ``payload``; at most 3993 bytes."""
    topic: str | None = None
    """Web Push ``Topic`` header: a newer message with the same topic replaces an
    older undelivered one. At most 32 URL-safe base64 characters."""


@dataclass(frozen=True, kw_only=True)
class RenderedInApp:
    """An in-app inbox item: a title, a body and the link it opens."""

    title: str
    body: str
    url: str | None = None


@dataclass(frozen=True, kw_only=True)
class RenderedText:
    """Plain text from ``<channel>/<name>.txt.j2``: what a plugin's channel receives
    (rendered in the same sandbox as every template, nothing escaped: the channel
    escapes for its provider).
    """

    text: str


@dataclass(frozen=True, kw_only=True)
class RenderedSms:
    """An SMS body from ``sms/<name>.txt.j2``, with what it costs to send.

    ``segments`` is at most the configured cap (``OUTBOX_SMS_MAX_SEGMENTS``): a
    longer text is a render error, never a surprise on the bill.
    """

    text: str
    encoding: str
    """``GSM-7`` or ``UCS-2`` (:mod:`outbox.dispatcher.sms_text`)."""
    segments: int


Rendered = (
    RenderedEmail | RenderedTelegram | RenderedPush | RenderedInApp | RenderedText | RenderedSms
)


# --- recipients ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PushSubscription:
    """One browser subscription of a user."""

    endpoint: str
    p256dh: str
    auth: str


@dataclass(frozen=True, kw_only=True)
class Recipient:
    """The addresses of one user, as stored in ``outbox.recipient``."""

    user_id: str
    email: str | None = None
    telegram_chat_id: int | None = None
    push_subscriptions: tuple[PushSubscription, ...] = ()
    # Every other channel's address (sms: an E.164 phone, a plugin's own kind), by
    # channel name, from ``outbox.recipient_address``.
    addresses: Mapping[str, str] = field(default_factory=dict)

    def reaches(self, channel: str) -> bool:
        """Whether the user has a usable address on ``channel``: one the provider has
        not refused and the user has not turned off (those never get here). inapp
        reaches every user; push needs a subscription.
        """
        match channel:
            case "email":
                return self.email is not None
            case "telegram":
                return self.telegram_chat_id is not None
            case "push":
                return bool(self.push_subscriptions)
            case "inapp":
                return True
        return channel in self.addresses


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """One message to send on one channel."""

    message_id: int
    lane: LaneName
    channel: ChannelName
    user_id: str
    template: str
    attempt: int
    """1 for the first try, 2 for the first retry, and so on."""
    recipient: Recipient
    content: Rendered
    send_slots: tuple[float, ...] = field(default=(), compare=False)
    """Cluster-wide rate limits: ``time.monotonic()`` instants before which the 1st,
    2nd, ... provider request for this message must not start (see
    :func:`wait_for_slot`). Empty when no limit applies."""


async def wait_for_slot(envelope: Envelope, request: int) -> None:
    """Sleep until request number ``request`` (0 for the first) of ``envelope`` may start.

    A channel that makes several requests for one message (Telegram parts) calls it
    before each; requests beyond the reserved slots are not held back.
    """
    if request < len(envelope.send_slots):
        delay = envelope.send_slots[request] - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


# --- effects on the recipient, applied with the acknowledgement ---------------


@dataclass(frozen=True, kw_only=True)
class DisableTelegram:
    """The user blocked the bot (or the bot cannot write to them); the same as
    ``DisableChannel(channel="telegram")``.
    """


@dataclass(frozen=True, kw_only=True)
class MarkEmailUndeliverable:
    """The mail server answered 5xx for the user's address; the same as
    ``MarkAddressUndeliverable(channel="email")``.
    """


@dataclass(frozen=True, kw_only=True)
class UpdateTelegramChat:
    """The group chat migrated to a supergroup with a new id."""

    chat_id: int


@dataclass(frozen=True, kw_only=True)
class DeletePushSubscription:
    """The push service says the subscription is gone (404/410)."""

    endpoint: str


@dataclass(frozen=True, kw_only=True)
class MarkAddressUndeliverable:
    """The provider says the user's address on ``channel`` cannot receive (any channel)."""

    channel: str


@dataclass(frozen=True, kw_only=True)
class DisableChannel:
    """The user turned ``channel`` off at the provider (an SMS STOP): never try it again."""

    channel: str


@dataclass(frozen=True, kw_only=True)
class WriteInboxItem:
    """Channel inapp delivers by writing the user's inbox item with the ack."""

    message_id: int
    template: str
    item: RenderedInApp


Effect = (
    DisableTelegram
    | MarkEmailUndeliverable
    | UpdateTelegramChat
    | DeletePushSubscription
    | WriteInboxItem
    | MarkAddressUndeliverable
    | DisableChannel
)


# --- outcomes -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Sent:
    """The provider accepted the message."""

    provider_id: str | None = None
    effects: tuple[Effect, ...] = ()


@dataclass(frozen=True, kw_only=True)
class TransientFailure:
    """Worth retrying later (timeouts, 4xx SMTP replies, 5xx HTTP answers)."""

    error_class: str
    error: str
    effects: tuple[Effect, ...] = ()


@dataclass(frozen=True, kw_only=True)
class PermanentFailure:
    """Retrying cannot help (SMTP 5xx, Telegram 400, push 413, a render error)."""

    error_class: str
    error: str
    effects: tuple[Effect, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RateLimited:
    """The provider asked us to wait; the attempt is not counted."""

    retry_after: float
    """Seconds to wait before the next try."""
    error: str = "rate limited"
    effects: tuple[Effect, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Unreachable:
    """The user cannot be reached on this channel: no address, blocked, bounced."""

    error_class: str
    error: str
    effects: tuple[Effect, ...] = ()


@dataclass(frozen=True, kw_only=True)
class ChannelOutage:
    """The channel itself is down (connection refused, authentication failed).

    The message waits without burning an attempt and the channel's circuit
    breaker opens.
    """

    error_class: str
    error: str
    effects: tuple[Effect, ...] = field(default=())


Outcome = Sent | TransientFailure | PermanentFailure | RateLimited | Unreachable | ChannelOutage


@runtime_checkable
class Channel(Protocol):
    """A way to deliver rendered messages: email, Telegram, Web Push, or a test sink."""

    name: str

    async def send(self, envelope: Envelope) -> Outcome:
        """Deliver one message and classify what happened.

        Must not raise for provider errors: every failure is an :data:`Outcome`.
        An exception that escapes anyway is treated as a transient failure with
        error class ``internal``.
        """
        ...

    async def aclose(self) -> None:
        """Release connections (SMTP session, HTTP client)."""
        ...
