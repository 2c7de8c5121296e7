"""TelegramChannel against a real Bot API server on loopback (no database needed)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from outbox._settings import Secret, Settings
from outbox.dispatcher.channels.base import (
    ChannelOutage,
    DisableTelegram,
    Outcome,
    PermanentFailure,
    RateLimited,
    Sent,
    TransientFailure,
    Unreachable,
    UpdateTelegramChat,
)
from outbox.dispatcher.channels.telegram import TelegramChannel
from outbox.testing.envelopes import telegram_envelope
from outbox.testing.fixtures import TELEGRAM_TOKEN
from outbox.testing.markdown_v2 import Entity, escape_markdown_v2
from outbox.testing.telegram import TelegramServer

CHAT = 4242


@asynccontextmanager
async def channel_for(
    server: TelegramServer, *, timeout: float = 5.0, **overrides: Any
) -> AsyncIterator[TelegramChannel]:
    values = {**server.settings_overrides(), **overrides}
    transport = httpx.AsyncHTTPTransport(verify=server.client_tls_context())
    channel = TelegramChannel(Settings(**values), transport=transport, timeout=timeout)
    try:
        yield channel
    finally:
        await channel.aclose()


def assert_no_token(outcome: Outcome) -> None:
    assert TELEGRAM_TOKEN not in repr(outcome)
    assert TELEGRAM_TOKEN.split(":")[1] not in repr(outcome)


async def test_escaped_markdown_v2_arrives_intact(telegram_server: TelegramServer) -> None:
    instrument = "EUR/USD (spot) [v2]"
    reason = "margin_check failed: -3.5% > limit! #42 {x=1} | ~`\\"
    in_code = reason.replace("\\", "\\\\").replace("`", "\\`")
    text = (
        f"*⚠️ Manual entry required* for _{escape_markdown_v2(instrument)}_\n"
        f"Reason: {escape_markdown_v2(reason)}\n"
        f"`{in_code}`"
    )
    async with channel_for(telegram_server) as channel:
        outcome = await channel.send(telegram_envelope(CHAT, text))

    assert isinstance(outcome, Sent)
    [message] = telegram_server.messages_for(CHAT)
    assert message.parse_mode == "MarkdownV2"
    assert message.plain_text == (
        f"⚠️ Manual entry required for {instrument}\nReason: {reason}\n{reason}"
    )
    assert Entity("bold", "⚠️ Manual entry required") in message.entities
    assert Entity("italic", instrument) in message.entities
    assert Entity("code", reason) in message.entities


async def test_an_unescaped_reserved_character_is_refused_as_a_bad_request(
    telegram_server: TelegramServer,
) -> None:
    async with channel_for(telegram_server) as channel:
        outcome = await channel.send(telegram_envelope(CHAT, "EURUSD at 1.1000"))

    assert isinstance(outcome, PermanentFailure)
    assert outcome.error_class == "telegram_bad_request"
    assert "can't parse entities" in outcome.error
    assert telegram_server.messages == []


async def test_a_429_is_rate_limited_for_retry_after_seconds(
    telegram_server: TelegramServer,
) -> None:
    telegram_server.rate_limit(CHAT, retry_after=2)
    async with channel_for(telegram_server) as channel:
        limited = await channel.send(telegram_envelope(CHAT))
        retried = await channel.send(telegram_envelope(CHAT))

    assert isinstance(limited, RateLimited)
    assert limited.retry_after == 2
    assert isinstance(retried, Sent)


async def test_a_blocked_bot_makes_the_user_unreachable_and_disables_telegram(
    telegram_server: TelegramServer,
) -> None:
    telegram_server.block(CHAT)
    async with channel_for(telegram_server) as channel:
        outcome = await channel.send(telegram_envelope(CHAT))

    assert isinstance(outcome, Unreachable)
    assert outcome.error_class == "telegram_blocked"
    assert outcome.effects == (DisableTelegram(),)
    assert "blocked" in outcome.error


async def test_chat_not_found_is_permanent(telegram_server: TelegramServer) -> None:
    telegram_server.chat_not_found(CHAT)
    async with channel_for(telegram_server) as channel:
        outcome = await channel.send(telegram_envelope(CHAT))

    assert isinstance(outcome, PermanentFailure)
    assert outcome.error_class == "telegram_chat_not_found"


async def test_a_migrated_chat_is_resent_to_the_new_id_and_the_new_id_is_stored(
    telegram_server: TelegramServer,
) -> None:
    telegram_server.migrate(-4242, to=-1004242)
    async with channel_for(telegram_server) as channel:
        outcome = await channel.send(telegram_envelope(-4242))

    assert isinstance(outcome, Sent)
    assert outcome.effects == (UpdateTelegramChat(chat_id=-1004242),)
    assert telegram_server.messages_for(-4242) == []
    assert len(telegram_server.messages_for(-1004242)) == 1


@pytest.mark.parametrize("status", [500, 502])
async def test_a_5xx_is_transient(telegram_server: TelegramServer, status: int) -> None:
    telegram_server.fail(CHAT, status)
    async with channel_for(telegram_server) as channel:
        outcome = await channel.send(telegram_envelope(CHAT))

    assert isinstance(outcome, TransientFailure)
    assert outcome.error_class == "telegram_5xx"


async def test_a_wrong_token_is_an_auth_outage_that_never_shows_the_token(
    telegram_server: TelegramServer,
) -> None:
    wrong = "987654321:AAH-wrong-token_abcdefghijklmnopqrstu"
    async with channel_for(telegram_server, telegram_bot_token=Secret(wrong)) as channel:
        outcome = await channel.send(telegram_envelope(CHAT))

    assert isinstance(outcome, ChannelOutage)
    assert outcome.error_class == "telegram_auth"
    assert wrong not in repr(outcome)


async def test_a_stopped_api_is_an_outage_and_the_restarted_one_delivers(
    telegram_server: TelegramServer,
) -> None:
    async with channel_for(telegram_server) as channel:
        assert isinstance(await channel.send(telegram_envelope(CHAT)), Sent)
        telegram_server.stop()
        down = await channel.send(telegram_envelope(CHAT))
        telegram_server.start()
        up = await channel.send(telegram_envelope(CHAT))

    assert isinstance(down, ChannelOutage | TransientFailure)
    assert isinstance(down, ChannelOutage), down
    assert down.error_class == "telegram_connect"
    assert_no_token(down)
    assert isinstance(up, Sent)


async def test_a_slow_api_is_a_transient_network_failure(telegram_server: TelegramServer) -> None:
    telegram_server.delay(CHAT, 1.5)
    async with channel_for(telegram_server, timeout=0.5) as channel:
        outcome = await channel.send(telegram_envelope(CHAT))

    assert isinstance(outcome, TransientFailure)
    assert outcome.error_class == "telegram_network"
    assert_no_token(outcome)


async def test_parts_go_out_in_order_and_a_retry_resumes_after_the_delivered_ones(
    telegram_server: TelegramServer,
) -> None:
    telegram_server.fail(CHAT, 500, after=1)
    envelope = telegram_envelope(CHAT, "part *one*", "part *two*", "part *three*")
    async with channel_for(telegram_server) as channel:
        first = await channel.send(envelope)
        second = await channel.send(envelope)

    assert isinstance(first, TransientFailure)
    assert "after 1 of 3 parts" in first.error
    assert isinstance(second, Sent)
    texts = [m.plain_text for m in telegram_server.messages_for(CHAT)]
    assert texts == ["part one", "part two", "part three"]


async def test_the_api_works_over_https_with_a_verified_certificate() -> None:
    with TelegramServer(token=TELEGRAM_TOKEN, tls=True) as server:
        async with channel_for(server) as channel:
            outcome = await channel.send(telegram_envelope(CHAT))
        assert server.url.startswith("https://")
        assert isinstance(outcome, Sent)
        assert len(server.messages) == 1


async def test_a_user_without_a_chat_is_unreachable_and_nothing_is_sent(
    telegram_server: TelegramServer,
) -> None:
    async with channel_for(telegram_server) as channel:
        outcome = await channel.send(telegram_envelope(None))

    assert isinstance(outcome, Unreachable)
    assert outcome.error_class == "no_address"
    assert telegram_server.requests == []


async def test_without_a_token_every_message_falls_back_and_nothing_is_sent(
    telegram_server: TelegramServer,
) -> None:
    async with channel_for(telegram_server, telegram_bot_token=Secret("")) as channel:
        outcome = await channel.send(telegram_envelope(CHAT))

    assert isinstance(outcome, Unreachable)
    assert outcome.error_class == "not_configured"
    assert telegram_server.requests == []


async def test_the_token_never_reaches_the_logs(
    telegram_server: TelegramServer, caplog: pytest.LogCaptureFixture
) -> None:
    telegram_server.fail(CHAT, 500)
    caplog.set_level(logging.DEBUG)
    async with channel_for(telegram_server) as channel:
        await channel.send(telegram_envelope(CHAT))
        await channel.send(telegram_envelope(CHAT))
        telegram_server.stop()
        await channel.send(telegram_envelope(CHAT))

    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "/botREDACTED/sendMessage" in logged
    assert TELEGRAM_TOKEN not in logged


async def test_the_server_can_enforce_telegram_s_per_chat_limit() -> None:
    with TelegramServer(token=TELEGRAM_TOKEN, chat_rate_limit_per_second=1) as server:
        async with channel_for(server) as channel:
            first = await channel.send(telegram_envelope(CHAT))
            second = await channel.send(telegram_envelope(CHAT))
            other_chat = await channel.send(telegram_envelope(CHAT + 1))

        assert isinstance(first, Sent)
        assert isinstance(second, RateLimited)
        assert second.retry_after == 1
        assert isinstance(other_chat, Sent)
        assert server.max_per_second(CHAT) == 2
        assert server.max_per_second(CHAT, accepted_only=True) == 1
