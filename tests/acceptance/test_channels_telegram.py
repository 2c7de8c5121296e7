"""Telegram end to end: ``outbox dispatch`` subprocesses against the Bot API on loopback.

The test server parses every MarkdownV2 text the way Telegram does and refuses what
Telegram would refuse, so a badly escaped variable fails these tests.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from outbox.testing.environment import dispatcher_environment
from outbox.testing.markdown_v2 import Entity
from outbox.testing.push import VapidKeys
from outbox.testing.smtp import SmtpServer
from outbox.testing.telegram import TelegramServer
from tests.acceptance.conftest import Spawn, history, wait_until

DEFAULT_LIMITS = "email=100/m,telegram=20/s,telegram_chat=1/s"
ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.0850",
    "current_price": "1.0862",
    "condition": "above",
}
SL_ALERT = {
    "instrument": "EURUSD",
    "side": "buy",
    "entry_price": "1.0850",
    "current_price": "1.0790",
    "loss_amount": "-600.00",
    "currency": "USD",
    "broker_ticket": "T-77",
}


def enqueue(
    admin: psycopg.Connection[Any],
    user: str,
    template: str = "price_alert",
    vars: dict[str, str] = ALERT,
) -> int:
    row = admin.execute(
        "SELECT outbox.enqueue('telegram', %s, %s, %s)", [template, user, Jsonb(vars)]
    ).fetchone()
    assert row is not None
    return int(row[0])


def dispatch(spawn_dispatcher: Spawn, telegram: TelegramServer, **servers: Any) -> None:
    spawn_dispatcher(
        **dispatcher_environment(telegram=telegram, **servers), OUTBOX_RATE_LIMITS=DEFAULT_LIMITS
    )


def test_escaped_markdown_v2_arrives_intact(
    admin: psycopg.Connection[Any], spawn_dispatcher: Spawn, telegram_server: TelegramServer
) -> None:
    nasty = {
        "instrument": "EUR/USD_[spot]*",
        "side": "buy",
        "entry_price": "1.0850",
        "volume": "0.5",
        "error_reason": "margin < 5% (code #42) ~ try `again`! {a=b} |c| > d. \\o/",
        "approval_id": "apr_42 (v2)`x",
    }
    admin.execute("SELECT outbox.set_address('u1', 'telegram', '42')")
    enqueue(admin, "u1", "position_failure_entry", nasty)
    dispatch(spawn_dispatcher, telegram_server)

    [message] = telegram_server.wait_for_messages(1, timeout=30)
    assert message.chat_id == 42 and message.parse_mode == "MarkdownV2"
    lines = message.plain_text.splitlines()
    assert f"Instrument: {nasty['instrument']}" in lines
    assert f"Side: {nasty['side'].upper()}" in lines
    assert f"Reason: {nasty['error_reason']}" in lines
    assert f"Approval: {nasty['approval_id']}" in lines
    assert f"The platform could not open an approved trade on {nasty['instrument']}." in (
        message.plain_text
    )
    assert Entity("bold", nasty["instrument"]) in message.entities
    assert Entity("code", nasty["approval_id"]) in message.entities
    [link] = [e for e in message.entities if e.type == "text_link"]
    assert link.text == "Review the approval"
    assert link.argument.startswith("https://platform.example.com/dashboard/approvals/apr_42")
    assert all(r.status == 200 for r in telegram_server.requests)


def test_a_429_with_retry_after_2_delays_the_message_without_counting_an_attempt(
    admin: psycopg.Connection[Any], spawn_dispatcher: Spawn, telegram_server: TelegramServer
) -> None:
    admin.execute("SELECT outbox.set_address('u1', 'telegram', '42')")
    telegram_server.rate_limit(42, retry_after=2, times=1)
    message_id = enqueue(admin, "u1")
    dispatch(spawn_dispatcher, telegram_server)

    telegram_server.wait_for_messages(1, timeout=30)
    refused, accepted = telegram_server.requests
    assert (refused.status, accepted.status) == (429, 200)
    assert accepted.received_at - refused.received_at >= 2.0
    wait_until(lambda: len(history(admin, "u1")) == 2, 10, "the ack")
    assert history(admin, "u1") == [
        ("telegram", "deferred", "rate_limited", 1),
        ("telegram", "sent", None, 1),  # still the first attempt
    ]
    row = admin.execute(
        "SELECT error FROM outbox.attempt WHERE message_id = %s AND outcome = 'deferred'",
        [message_id],
    ).fetchone()
    assert row is not None and "retry after 2" in row[0]


def test_a_403_disables_telegram_for_the_user_and_the_alert_falls_back_to_email(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    telegram_server: TelegramServer,
    smtp_server: SmtpServer,
    vapid_keys: VapidKeys,
) -> None:
    admin.execute(
        "SELECT outbox.set_address('u1', 'email', 'u1@example.com'),"
        " outbox.set_address('u1', 'telegram', '42')"
    )
    telegram_server.block(42)
    enqueue(admin, "u1")
    dispatch(spawn_dispatcher, telegram_server, smtp=smtp_server, vapid=vapid_keys)

    [mail] = smtp_server.wait_for_messages(1, timeout=30)
    assert mail.rcpt_tos == ("u1@example.com",)
    assert mail.message["Subject"] == "Price alert: EURUSD above 1.0850"
    wait_until(lambda: len(history(admin, "u1")) == 3, 10, "the ack by email")
    assert history(admin, "u1") == [
        ("telegram", "fallback", "telegram_blocked", 1),
        ("push", "fallback", "no_address", 1),  # no browser subscribed
        ("email", "sent", None, 1),
    ]
    blocked = admin.execute(
        "SELECT disabled_since IS NOT NULL, address FROM outbox.recipient_address"
        " WHERE channel = 'telegram'"
    ).fetchone()
    assert blocked == (True, "42")

    enqueue(admin, "u1")  # the next one does not knock on a blocked chat again
    smtp_server.wait_for_messages(2, timeout=30)
    wait_until(lambda: len(history(admin, "u1")) == 6, 10, "the second ack by email")
    assert history(admin, "u1")[3] == ("telegram", "fallback", "no_address", 1)
    assert len(telegram_server.requests) == 1


def test_a_group_that_migrated_to_a_supergroup_gets_the_message_and_its_new_id_is_stored(
    admin: psycopg.Connection[Any], spawn_dispatcher: Spawn, telegram_server: TelegramServer
) -> None:
    admin.execute("SELECT outbox.set_address('u1', 'telegram', '-100')")
    telegram_server.migrate(-100, to=-1001)
    enqueue(admin, "u1")
    dispatch(spawn_dispatcher, telegram_server)

    [message] = telegram_server.wait_for_messages(1, timeout=30)
    assert message.chat_id == -1001
    assert "Price alert: EURUSD above 1.0850" in message.plain_text
    assert [(r.chat_id, r.status) for r in telegram_server.requests] == [(-100, 400), (-1001, 200)]
    wait_until(lambda: history(admin, "u1") == [("telegram", "sent", None, 1)], 10, "the ack")
    wait_until(
        lambda: (
            admin.execute(
                "SELECT address FROM outbox.recipient_address WHERE channel = 'telegram'"
            ).fetchone()
            == ("-1001",)
        ),
        10,
        "the new chat id to be stored",
    )

    enqueue(admin, "u1")
    telegram_server.wait_for_messages(2, timeout=30)
    assert [r.chat_id for r in telegram_server.requests] == [-100, -1001, -1001]


def test_five_500s_on_telegram_hand_the_alert_to_email(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    telegram_server: TelegramServer,
    smtp_server: SmtpServer,
    vapid_keys: VapidKeys,
) -> None:
    admin.execute(
        "SELECT outbox.set_address('u5', 'email', 'u5@example.com'),"
        " outbox.set_address('u5', 'telegram', '55')"
    )
    telegram_server.fail(55, 500, times=None)  # the Bot API keeps failing for this chat
    alert_id = enqueue(admin, "u5", "position_failure_sl", SL_ALERT)
    spawn_dispatcher(
        **dispatcher_environment(telegram=telegram_server, smtp=smtp_server, vapid=vapid_keys),
        OUTBOX_RATE_LIMITS=DEFAULT_LIMITS,
        OUTBOX_RETRY_DELAYS="0.2,0.2,0.2,0.2",
    )

    [mail] = smtp_server.wait_for_messages(1, timeout=60)
    assert mail.rcpt_tos == ("u5@example.com",)
    wait_until(lambda: len(history(admin, "u5")) == 6, 10, "the ack by email")
    assert history(admin, "u5") == [
        *[("telegram", "retry", "telegram_5xx", n) for n in range(1, 5)],
        ("telegram", "fallback", "telegram_5xx", 5),  # the fifth failure: a hop, not a death
        ("email", "sent", None, 1),
    ]
    assert len(telegram_server.requests) == 5
    first = admin.execute(
        "SELECT message_id FROM outbox.attempt WHERE user_id = 'u5' ORDER BY id LIMIT 1"
    ).fetchone()
    assert first == (alert_id,)
    assert admin.execute("SELECT count(*) FROM outbox.dead_letter").fetchone() == (0,)
