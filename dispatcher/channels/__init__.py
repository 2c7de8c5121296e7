"""Delivery channels: email (SMTP), Telegram (Bot API), Web Push, SMS (Twilio), in-app.

:func:`build_channels` builds the configured ones. A deployment can replace a
channel with its own implementation of :class:`~outbox.dispatcher.channels.base.Channel`,
or add one with a new name, through ``OUTBOX_CHANNEL_PLUGINS="slack=package.module:factory"``,
where ``factory(settings)`` returns the channel. A new name must also be registered
in the database (``outbox channels register slack``, or SQL
``outbox.register_channel('slack')``) before producers can enqueue to it
(docs/channels.md, "Writing a channel plugin").
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

from outbox._errors import ConfigurationError
from outbox._settings import Settings
from outbox.dispatcher.channels.base import CHANNELS, Channel
from outbox.vocabulary import CHANNEL_NAME


def _plugins(text: str) -> dict[str, str]:
    plugins: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, target = item.partition("=")
        if not CHANNEL_NAME.match(name) or ":" not in target:
            raise ConfigurationError(
                f"OUTBOX_CHANNEL_PLUGINS: cannot read {item!r}; expected "
                "'name=package.module:factory' where name is a channel (a built-in one"
                f" of {', '.join(CHANNELS)} to replace it, or a new one: 1-32 characters"
                " of a-z, 0-9 and _)"
            )
        plugins[name] = target
    return plugins


def build_channels(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, Channel]:
    """One channel per name: the built-in ones, or plugins that replace them."""
    env = os.environ if environ is None else environ
    plugins = _plugins(env.get("OUTBOX_CHANNEL_PLUGINS", ""))
    channels: dict[str, Channel] = {}
    for name, target in plugins.items():
        module_name, _, attribute = target.partition(":")
        factory = getattr(importlib.import_module(module_name), attribute)
        channels[name] = factory(settings)
    if "email" not in channels:
        from outbox.dispatcher.channels.email import EmailChannel

        channels["email"] = EmailChannel(settings)
    if "telegram" not in channels:
        from outbox.dispatcher.channels.telegram import TelegramChannel

        channels["telegram"] = TelegramChannel(settings)
    if "push" not in channels:
        from outbox.dispatcher.channels.push import PushChannel

        channels["push"] = PushChannel(settings)
    if "sms" not in channels:
        from outbox.dispatcher.channels.sms import SmsChannel

        channels["sms"] = SmsChannel(settings)
    if "inapp" not in channels:
        from outbox.dispatcher.channels.inapp import InAppChannel

        channels["inapp"] = InAppChannel(settings)
    return channels
