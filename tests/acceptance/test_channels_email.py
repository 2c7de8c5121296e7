"""Email end to end: ``outbox dispatch`` subprocesses delivering to aiosmtpd on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from outbox._templates import TemplateCatalog
from outbox.dispatcher.rendering import render
from outbox.testing.environment import dispatcher_environment
from outbox.testing.fixtures import SMTP_PASSWORD, SMTP_USERNAME
from outbox.testing.push import VapidKeys
from outbox.testing.smtp import SmtpServer
from outbox.testing.telegram import TelegramServer
from tests.acceptance.conftest import Spawn, history, wait_until

SENDER = "alerts@outbox.test"
ENTRY = {
    "instrument": "EUR/USD",
    "side": "sell",
    "entry_price": "1.0850",
    "volume": "2.5",
    "error_reason": 'Margin < required & broker said "no"',
    "approval_id": "apr-42",
}
ALERT = {
    "instrument": "GBPUSD",
    "trigger_price": "1.2700",
    "current_price": "1.2712",
    "condition": "above",
}


def enqueue(
    admin: psycopg.Connection[Any],
    user: str,
    template: str,
    vars: dict[str, str],
    channel: str = "email",
) -> int:
    row = admin.execute(
        "SELECT outbox.enqueue(%s, %s, %s, %s)", [channel, template, user, Jsonb(vars)]
    ).fetchone()
    assert row is not None
    return int(row[0])


def count(admin: psycopg.Connection[Any], sql: str, *params: Any) -> int:
    row = admin.execute(sql, list(params)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture
def smtp(smtp_server_factory: Callable[..., SmtpServer]) -> SmtpServer:
    """STARTTLS and AUTH required, like a real submission server."""
    return smtp_server_factory(tls="starttls", username=SMTP_USERNAME, password=SMTP_PASSWORD)


def test_an_email_alert_arrives_as_multipart_alternative_from_an_allowed_sender(
    admin: psycopg.Connection[Any], spawn_dispatcher: Spawn, smtp: SmtpServer
) -> None:
    admin.execute("SELECT outbox.set_address('u1', 'email', 'trader@example.com')")
    message_id = enqueue(admin, "u1", "position_failure_entry", ENTRY)
    spawn_dispatcher(
        **dispatcher_environment(
            smtp=smtp, sender=SENDER, allowed_senders=(SENDER, "ops@outbox.test")
        )
    )

    [mail] = smtp.wait_for_messages(1, timeout=30)
    expected = render(
        TemplateCatalog(None),
        "email",
        "position_failure_entry",
        ENTRY,
        message_id=message_id,
        lane="transactional",
        platform_base_url="https://platform.example.com",
    )
    message = mail.message
    assert message["Subject"] == "⚠️ Manual Trade Entry Required - EUR/USD"
    assert message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in message.iter_parts()] == ["text/plain", "text/html"]
    text = message.get_body(("plain",)).get_content().replace("\r\n", "\n")  # type: ignore[union-attr]
    html = message.get_body(("html",)).get_content().replace("\r\n", "\n")  # type: ignore[union-attr]
    assert text == expected.text  # type: ignore[union-attr]
    assert html == expected.html  # type: ignore[union-attr]
    assert 'Reason       Margin < required & broker said "no"' in text
    assert "Margin &lt; required &amp; broker said &#34;no&#34;" in html
    assert "https://platform.example.com/dashboard/approvals/apr-42" in html
    assert message["Message-ID"] == f"<outbox-{message_id}@outbox.test>"
    assert message["From"] == SENDER and mail.mail_from == SENDER
    assert message["To"] == "trader@example.com" and mail.rcpt_tos == ("trader@example.com",)
    sent_at = parsedate_to_datetime(message["Date"])
    assert abs(sent_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert mail.tls and mail.login == SMTP_USERNAME
    wait_until(lambda: history(admin, "u1") == [("email", "sent", None, 1)], 10, "the ack")


def test_a_451_recipient_is_retried_and_a_550_alert_reaches_telegram_at_once(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    smtp: SmtpServer,
    telegram_server: TelegramServer,
    vapid_keys: VapidKeys,
) -> None:
    admin.execute(
        "SELECT outbox.set_address(u, c, a) FROM (VALUES"
        " ('flaky', 'email', 'flaky@example.com'), ('flaky', 'telegram', '2002'),"
        " ('gone', 'email', 'gone@example.com'), ('gone', 'telegram', '3003')) v(u, c, a)"
    )
    smtp.respond("flaky@example.com", "451 4.3.0 Mailbox busy, try again later", times=1)
    smtp.respond("gone@example.com", "550 5.1.1 No such user here")
    enqueue(admin, "flaky", "price_alert", ALERT)
    bounced_id = enqueue(admin, "gone", "price_alert", ALERT)
    spawn_dispatcher(
        **dispatcher_environment(
            smtp=smtp, sender=SENDER, telegram=telegram_server, vapid=vapid_keys
        )
    )

    [mail] = smtp.wait_for_messages(1, timeout=30)
    assert mail.rcpt_tos == ("flaky@example.com",)
    wait_until(lambda: len(history(admin, "flaky")) == 2, 10, "the ack of the retry")
    assert history(admin, "flaky") == [
        ("email", "retry", "smtp_4xx", 1),
        ("email", "sent", None, 2),
    ]
    # fallback on failure (transactional, the default): the bounce is a hop, not a death;
    # push is passed over (no browser subscribed) and Telegram gets the alert
    [chat] = telegram_server.wait_for_messages(1, timeout=30)
    assert chat.chat_id == 3003 and "Price alert: GBPUSD above 1.2700" in chat.plain_text
    wait_until(lambda: len(history(admin, "gone")) == 2, 10, "the ack on Telegram")
    assert history(admin, "gone") == [
        ("email", "fallback", "smtp_5xx", 1),
        ("telegram", "sent", None, 1),
    ]
    hop = admin.execute(
        "SELECT message_id, error FROM outbox.attempt WHERE user_id = 'gone' ORDER BY id"
    ).fetchall()[0]
    assert hop[0] == bounced_id and "550" in hop[1] and "No such user" in hop[1]
    assert count(admin, "SELECT count(*) FROM outbox.dead_letter") == 0
    assert (
        count(
            admin,
            "SELECT count(*) FROM outbox.recipient_address WHERE user_id = 'gone'"
            " AND channel = 'email' AND undeliverable_since IS NOT NULL",
        )
        == 1
    )

    next_id = enqueue(admin, "gone", "price_alert", ALERT)
    telegram_server.wait_for_messages(2, timeout=30)
    wait_until(lambda: len(history(admin, "gone")) == 5, 10, "the second alert's hops")
    assert history(admin, "gone")[2:] == [
        ("email", "fallback", "no_address", 1),  # the bounced address is not used again
        ("push", "fallback", "no_address", 1),  # no browser subscribed
        ("telegram", "sent", None, 1),
    ]
    third_row = admin.execute(
        "SELECT message_id FROM outbox.attempt WHERE user_id = 'gone' ORDER BY id"
    ).fetchall()[2]
    assert third_row == (next_id,)
    assert len(smtp.messages) == 1, "the bounced address was sent to again"


def test_a_campaign_message_that_bounces_dies_where_it_fails(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    smtp: SmtpServer,
    telegram_server: TelegramServer,
    vapid_keys: VapidKeys,
) -> None:
    admin.execute(
        "SELECT outbox.set_address('reader', 'email', 'reader@example.com'),"
        " outbox.set_address('reader', 'telegram', '4004')"
    )
    smtp.respond("reader@example.com", "550 5.1.1 No such user here")
    row = admin.execute(
        "SELECT outbox.enqueue('email', 'price_alert', 'reader', %s, 'campaign')", [Jsonb(ALERT)]
    ).fetchone()
    assert row is not None
    spawn_dispatcher(
        **dispatcher_environment(
            smtp=smtp, sender=SENDER, telegram=telegram_server, vapid=vapid_keys
        )
    )

    wait_until(lambda: len(history(admin, "reader")) == 1, 30, "the campaign's death")
    assert history(admin, "reader") == [("email", "dead", "smtp_5xx", 1)]
    assert admin.execute("SELECT id FROM outbox.dead_letter").fetchall() == [(row[0],)]
    assert telegram_server.messages == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_60_second_smtp_outage_loses_nothing_and_kills_nothing(
    admin: psycopg.Connection[Any], spawn_dispatcher: Spawn, smtp_server: SmtpServer
) -> None:
    admin.execute(
        "SELECT outbox.set_address('u' || g, 'email', 'u' || g || '@example.com')"
        " FROM generate_series(1, 50) g"
    )
    env = dispatcher_environment(smtp=smtp_server, sender=SENDER)
    replicas = [spawn_dispatcher("--concurrency", "8", **env) for _ in range(2)]
    before = [enqueue(admin, f"u{i}", "price_alert", ALERT) for i in range(1, 11)]
    smtp_server.wait_for_messages(10, timeout=30)
    wait_until(
        lambda: count(admin, "SELECT count(*) FROM outbox.message") == 0,
        10,
        "the first ten to be acknowledged",
    )

    smtp_server.stop()
    stopped = time.monotonic()
    during = [enqueue(admin, f"u{i}", "price_alert", ALERT) for i in range(11, 51)]
    wait_until(
        lambda: (
            count(
                admin,
                "SELECT count(*) FROM outbox.channel_state"
                " WHERE channel = 'email' AND failures > 0",
            )
            == 1
        ),
        15,
        "the breaker to open",
    )
    time.sleep(max(0.0, stopped + 60 - time.monotonic()))
    assert len(smtp_server.messages) == 10
    assert count(admin, "SELECT count(*) FROM outbox.message WHERE status = 'dead'") == 0
    smtp_server.start()  # the same port
    restarted = time.monotonic()

    smtp_server.wait_for_messages(50, timeout=60)
    recovered = time.monotonic() - restarted
    wait_until(
        lambda: count(admin, "SELECT count(*) FROM outbox.message") == 0,
        15,
        "every delivery to be acknowledged",
    )
    assert all(p.poll() is None for p in replicas), "a dispatcher died during the outage"

    delivered = sorted(
        int(m.message["Message-ID"].split("-")[1].split("@")[0]) for m in smtp_server.messages
    )
    assert delivered == sorted(before + during), "a message was lost or sent twice"
    outcomes = dict(
        admin.execute("SELECT outcome, count(*) FROM outbox.attempt GROUP BY outcome").fetchall()
    )
    assert outcomes.get("sent") == 50 and "dead" not in outcomes and "retry" not in outcomes
    assert outcomes.get("deferred", 0) >= 40, "the outage was never seen"
    assert count(admin, "SELECT max(attempt) FROM outbox.attempt WHERE outcome = 'sent'") == 1
    assert (
        count(
            admin,
            "SELECT count(*) FROM outbox.attempt WHERE outcome = 'deferred'"
            " AND error_class <> 'smtp_connect'",
        )
        == 0
    )
    # the pauses double up to 32 s while it is down, so the probe after the restart
    # comes within one pause; after it, one replica's success closes it for both
    assert recovered < 40, recovered
    wait_until(
        lambda: count(admin, "SELECT count(*) FROM outbox.channel_state WHERE failures > 0") == 0,
        10,
        "the breaker to close",
    )
