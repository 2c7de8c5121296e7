"""Delivery channels: email (SMTP), Telegram (Bot API), Web Push and the in-app inbox.

:func:`build_channels` builds the configured ones. A deployment can replace a
channel with its own implementation of :class:`~outbox.dispatcher.channels.base.Channel`
through ``OUTBOX_CHANNEL_PLUGINS="email=package.module:factory"``, where
``factory(settings)`` returns the channel (docs/channels.md).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

from outbox._errors import ConfigurationError
from outbox._settings import Settings
from outbox.dispatcher.channels.base import CHANNELS, Channel


def _plugins(text: str) -> dict[str, str]:
    plugins: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, target = item.partition("=")
        if name not in CHANNELS or ":" not in target:
            raise ConfigurationError(
                f"OUTBOX_CHANNEL_PLUGINS: cannot read {item!r}; expected "
                "'email=package.module:factory' with a channel of email, telegram, push"
                " or inapp"
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
    if "inapp" not in channels:
        from outbox.dispatcher.channels.inapp import InAppChannel

        channels["inapp"] = InAppChannel(settings)
    return channels
