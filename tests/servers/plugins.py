"""Channel factories that trust the loopback servers, for ``OUTBOX_CHANNEL_PLUGINS``.

A dispatcher started as a subprocess (acceptance tests) builds its channels from
settings alone, so it cannot be handed a test certificate or the permission to use
``http://`` push endpoints. Point it at these factories instead::

    OUTBOX_CHANNEL_PLUGINS="email=tests.servers.plugins:email_channel,\
telegram=tests.servers.plugins:telegram_channel,push=tests.servers.plugins:push_channel"

Each one is the production channel with one loopback-only difference: TLS trusts the
throwaway CA of :mod:`tests.servers.tls` (and nothing else), and push accepts
``http://`` endpoints on hosts listed exactly in ``OUTBOX_PUSH_ALLOWED_HOSTS``.
"""

from __future__ import annotations

import httpx

from outbox._settings import Settings
from outbox.dispatcher.channels.email import EmailChannel
from outbox.dispatcher.channels.push import PushChannel
from outbox.dispatcher.channels.telegram import TelegramChannel
from tests.servers.tls import client_context


def email_channel(settings: Settings) -> EmailChannel:
    return EmailChannel(settings, tls_context=client_context())


def telegram_channel(settings: Settings) -> TelegramChannel:
    return TelegramChannel(settings, transport=httpx.AsyncHTTPTransport(verify=client_context()))


def push_channel(settings: Settings) -> PushChannel:
    return PushChannel(
        settings,
        transport=httpx.AsyncHTTPTransport(verify=client_context()),
        allow_insecure_http=True,
    )
