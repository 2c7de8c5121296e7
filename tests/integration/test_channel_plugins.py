"""The loopback channel plugins, built the way a dispatcher subprocess builds them."""

from __future__ import annotations

from outbox._settings import Settings
from outbox.dispatcher.channels import build_channels
from outbox.dispatcher.channels.base import Channel, Sent
from outbox.testing.envelopes import email_envelope, push_envelope, telegram_envelope
from outbox.testing.push import PushServer
from outbox.testing.smtp import SmtpServer
from outbox.testing.telegram import TelegramServer

PLUGINS = ",".join(
    f"{name}=outbox.testing.plugins:{name}_channel" for name in ("email", "telegram", "push")
)


async def test_the_plugins_reach_all_three_loopback_servers(
    loopback_settings: Settings,
    smtp_server: SmtpServer,
    telegram_server: TelegramServer,
    push_server: PushServer,
) -> None:
    channels = build_channels(loopback_settings, {"OUTBOX_CHANNEL_PLUGINS": PLUGINS})
    browser = push_server.subscribe(application_server_key=loopback_settings.vapid_public_key)
    try:
        assert all(isinstance(channel, Channel) for channel in channels.values())
        outcomes = [
            await channels["email"].send(email_envelope()),
            await channels["telegram"].send(telegram_envelope(42)),
            await channels["push"].send(push_envelope(browser.subscription)),
        ]
    finally:
        for channel in channels.values():
            await channel.aclose()

    assert all(isinstance(outcome, Sent) for outcome in outcomes), outcomes
    assert len(smtp_server.messages) == 1
    assert len(telegram_server.messages) == 1
    assert len(push_server.messages) == 1
