"""Channel factories that trust the loopback servers, for ``OUTBOX_CHANNEL_PLUGINS``.

A dispatcher started as a subprocess (acceptance tests) builds its channels from
settings alone, so it cannot be handed a test certificate or the permission to use
``http://`` push endpoints. Point it at these factories instead::

    OUTBOX_CHANNEL_PLUGINS="email=outbox.testing.plugins:email_channel,\
telegram=outbox.testing.plugins:telegram_channel,push=outbox.testing.plugins:push_channel,\
sms=outbox.testing.plugins:sms_channel"

Each one is the production channel with one loopback-only difference: TLS trusts the
throwaway CA of :mod:`outbox.testing.tls` (and nothing else), and push accepts
``http://`` endpoints on hosts listed exactly in ``OUTBOX_PUSH_ALLOWED_HOSTS``.

``chat=outbox.testing.plugins:chat_channel`` adds a channel outbox does not ship
(:mod:`outbox.testing.chat`, the example of docs/channels.md), trusting the same CA.
"""

from __future__ import annotations

import os

import httpx

from outbox._settings import Settings
from outbox.dispatcher.channels.email import EmailChannel
from outbox.dispatcher.channels.push import PushChannel
from outbox.dispatcher.channels.sms import SmsChannel
from outbox.dispatcher.channels.telegram import TelegramChannel
from outbox.testing.chat import ChatChannel
from outbox.testing.tls import client_context


def email_channel(settings: Settings) -> EmailChannel:
    """The production email channel, trusting the loopback CA."""
    return EmailChannel(settings, tls_context=client_context())


def telegram_channel(settings: Settings) -> TelegramChannel:
    """The production Telegram channel, trusting the loopback CA."""
    return TelegramChannel(settings, transport=httpx.AsyncHTTPTransport(verify=client_context()))


def push_channel(settings: Settings) -> PushChannel:
    """The production push channel, allowing ``http://`` endpoints on loopback."""
    return PushChannel(
        settings,
        transport=httpx.AsyncHTTPTransport(verify=client_context()),
        allow_insecure_http=True,
    )


def sms_channel(settings: Settings) -> SmsChannel:
    """The production SMS channel, trusting the loopback CA (the Twilio stand-in)."""
    return SmsChannel(settings, transport=httpx.AsyncHTTPTransport(verify=client_context()))


def chat_channel(settings: Settings) -> ChatChannel:
    """The example plugin channel ``chat`` (its own settings come from the
    environment: ``OUTBOX_CHAT_URL``, ``OUTBOX_CHAT_TOKEN``), trusting the loopback CA.
    """
    return ChatChannel(os.environ, transport=httpx.AsyncHTTPTransport(verify=client_context()))
