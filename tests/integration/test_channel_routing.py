"""Fallback between the real channels, through a running dispatcher and real PostgreSQL.

No provider is contacted: every user here lacks an address on the channels tried,
which the channels find out before making any request.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from outbox import Settings
from outbox._settings import Secret
from outbox.dispatcher import Dispatcher, DispatcherOptions
from outbox.dispatcher._routing import RecipientRecord, next_channel
from outbox.dispatcher.channels.email import EmailChannel
from outbox.dispatcher.channels.push import PushChannel
from outbox.dispatcher.channels.telegram import TelegramChannel
from outbox.testing.fixtures import TELEGRAM_TOKEN
from outbox.testing.push import VapidKeys

ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.085",
    "current_price": "1.086",
    "condition": "above",
}


async def dispatch_until_idle(database_url: str, vapid_keys: VapidKeys) -> None:
    settings = Settings(
        database_url=database_url,
        rate_limits={},
        poll_interval=0.2,
        smtp_from="alerts@outbox.test",
        telegram_bot_token=Secret(TELEGRAM_TOKEN),
        vapid_private_key=Secret(vapid_keys.private_raw),
    )
    channels = {
        "email": EmailChannel(settings),
        "telegram": TelegramChannel(settings),
        "push": PushChannel(settings),
    }
    dispatcher = Dispatcher(settings, channels, options=DispatcherOptions(until_idle=True))
    await asyncio.wait_for(dispatcher.run(), 30)


def history(admin: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return admin.execute(
        "SELECT channel, outcome, error_class FROM outbox.attempt ORDER BY id"
    ).fetchall()


async def test_a_user_reachable_nowhere_ends_dead_after_each_channel_was_tried_once(
    database_url: str, admin: psycopg.Connection[Any], vapid_keys: VapidKeys
) -> None:
    admin.execute("SELECT outbox.set_address('u1', 'email', 'gone@example.com')")
    admin.execute("UPDATE outbox.recipient_address SET undeliverable_since = now()")
    admin.execute("SELECT outbox.enqueue('telegram', 'price_alert', 'u1', %s)", [Jsonb(ALERT)])
    await dispatch_until_idle(database_url, vapid_keys)
    assert history(admin) == [
        ("telegram", "fallback", "no_address"),
        ("push", "fallback", "no_address"),
        ("email", "dead", "no_address"),
    ]
    assert admin.execute("SELECT channel, status, error_class FROM outbox.message").fetchall() == [
        ("email", "dead", "no_address")
    ]


async def test_an_explicit_fallback_list_is_followed_and_then_ends(
    database_url: str, admin: psycopg.Connection[Any], vapid_keys: VapidKeys
) -> None:
    admin.execute("INSERT INTO outbox.recipient (user_id) VALUES ('u1')")
    admin.execute(
        "INSERT INTO outbox.message (lane, priority, channel, user_id, template, vars, fallback)"
        " VALUES ('transactional', 0, 'push', 'u1', 'price_alert', %s, ARRAY['telegram'])",
        [Jsonb(ALERT)],
    )
    await dispatch_until_idle(database_url, vapid_keys)
    assert history(admin) == [
        ("push", "fallback", "no_address"),
        ("telegram", "dead", "no_address"),
    ]


def test_the_last_channel_of_a_chain_carries_a_fallback_that_ends_there() -> None:
    record = RecipientRecord(user_id="u1")
    assert next_channel("telegram", None, record) == ("push", ("email",))
    follow = next_channel("push", ("email",), record)
    assert follow is not None and follow[0] == "email"
    assert next_channel("email", follow[1], record) is None
    assert next_channel("email", (), record) is None
