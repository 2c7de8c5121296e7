"""Deliver committed messages in-process, to channels that record instead of send.

``drain(database_url)`` runs the real dispatcher loop (claim, render with the real
templates, acknowledge) in the calling process until nothing is due, with a
:class:`RecordingChannel` in place of each provider. A host service's test then
reads what each channel would have sent::

    sent = drain(database_url)
    [email] = sent.for_user("u42", channel="email")
    assert "EURUSD" in email.content.subject

No SMTP server, bot token or VAPID key is needed; rate limits are off. Messages must
be committed (the dispatcher claims them on its own connections). Sent messages
leave ``outbox.message`` and get an ``outbox.attempt`` row, as in production; a user
with no address on the channel ends as a dead letter, as in production.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from outbox._settings import Settings, parse_rate_limits
from outbox.dispatcher import Dispatcher, DispatcherOptions
from outbox.dispatcher.channels.base import Envelope, Outcome, Sent
from outbox.vocabulary import CHANNELS


@dataclass
class RecordingChannel:
    """A channel that records every envelope and answers :class:`Sent`."""

    name: str
    sent: list[Envelope] = field(default_factory=list)

    async def send(self, envelope: Envelope) -> Outcome:
        """Record ``envelope``; it counts as delivered."""
        self.sent.append(envelope)
        return Sent()

    async def aclose(self) -> None:
        """Nothing to release."""


@dataclass(frozen=True)
class Drained:
    """What each channel would have sent, in delivery order."""

    envelopes: tuple[Envelope, ...]

    def for_user(self, user_id: str, *, channel: str | None = None) -> list[Envelope]:
        """The envelopes for ``user_id`` (on ``channel``, when given)."""
        return [
            e
            for e in self.envelopes
            if e.user_id == user_id and (channel is None or e.channel == channel)
        ]

    def on(self, channel: str) -> list[Envelope]:
        """The envelopes of one channel."""
        return [e for e in self.envelopes if e.channel == channel]

    def __len__(self) -> int:
        return len(self.envelopes)


def _settings(target: str | Settings) -> Settings:
    settings = target if isinstance(target, Settings) else Settings(database_url=target)
    return replace(settings, rate_limits=parse_rate_limits("off"), poll_interval=0.2)


async def drain_async(
    target: str | Settings, *, channels: Iterable[str] = CHANNELS, timeout: float = 30.0
) -> Drained:
    """Deliver every due message to recording channels; return what they got.

    ``target``: a database URL or ``outbox.Settings``. ``timeout`` in seconds;
    raises TimeoutError when messages are still due after it.
    """
    recorders = {name: RecordingChannel(name) for name in channels}
    dispatcher = Dispatcher(
        _settings(target), dict(recorders), options=DispatcherOptions(until_idle=True)
    )
    await asyncio.wait_for(dispatcher.run(), timeout)
    envelopes = sorted((e for r in recorders.values() for e in r.sent), key=lambda e: e.message_id)
    return Drained(tuple(envelopes))


def drain(
    target: str | Settings, *, channels: Iterable[str] = CHANNELS, timeout: float = 30.0
) -> Drained:
    """:func:`drain_async` for synchronous tests (runs its own event loop)."""
    return asyncio.run(drain_async(target, channels=channels, timeout=timeout))
