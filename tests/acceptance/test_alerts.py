"""Alerts that must be seen, end to end: ``outbox dispatch`` and ``outbox api``
subprocesses, aiosmtpd and the Telegram stand-in on loopback.

Cancel, expire and collapse before a send; an alert that nobody acknowledges
reaches the next channel after its delay, one acknowledged through the link in
its email does not, and the wait survives a dispatcher killed with SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

import outbox
from outbox.testing.environment import dispatcher_environment
from outbox.testing.fixtures import SMTP_PASSWORD, SMTP_USERNAME
from outbox.testing.smtp import ReceivedMail, SmtpServer
from outbox.testing.telegram import TelegramServer
from tests.acceptance.conftest import Spawn, history, wait_until
from tests.support.pg_cluster import free_port

ROOT = Path(__file__).resolve().parents[2]
SENDER = "alerts@outbox.test"
JWT_SECRET = "jwt-secret-for-the-alerts-test-0123456789abcdef"
ALERT = {
    "instrument": "GBPUSD",
    "trigger_price": "1.2700",
    "current_price": "1.2712",
    "condition": "above",
}
STOP_LOSS = {
    "instrument": "EUR/USD",
    "side": "buy",
    "entry_price": "1.0850",
    "current_price": "1.0790",
    "loss_amount": "1,500.00",
    "broker_ticket": "T-99",
}
ACK_LINK = re.compile(r'href="(http://127\.0\.0\.1:\d+/ack/[^"]+)"')


@pytest.fixture
def smtp(smtp_server_factory: Callable[..., SmtpServer]) -> SmtpServer:
    return smtp_server_factory(tls="starttls", username=SMTP_USERNAME, password=SMTP_PASSWORD)


@pytest.fixture
def api_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """``outbox api`` on a free port; its public URL is where the links point."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_API_JWT_SECRET": JWT_SECRET,
        "OUTBOX_API_PUBLIC_URL": url,
        "PYTHONPATH": str(ROOT),
    }
    with open(tmp_path / "api.log", "wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("outbox")), "api", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
    try:
        wait_until(lambda: _health(url) == 200, 30, "the API to start")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _health(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def environment(smtp: SmtpServer, telegram: TelegramServer, api_url: str = "") -> dict[str, str]:
    env = dispatcher_environment(smtp=smtp, sender=SENDER, telegram=telegram)
    env |= {"OUTBOX_API_JWT_SECRET": JWT_SECRET, "OUTBOX_POLL_INTERVAL": "0.2"}
    if api_url:
        env["OUTBOX_API_PUBLIC_URL"] = api_url
    return env


def trader(admin: psycopg.Connection[Any], user: str = "u1", chat: int = 1001) -> None:
    outbox.upsert_recipient(
        admin,
        user,
        email=f"{user}@example.com",
        telegram_chat_id=chat,
        fallback_order=["email", "telegram"],
    )


def stop_loss_alert(admin: psycopg.Connection[Any], user: str = "u1", **options: Any) -> int:
    return outbox.enqueue(
        admin,
        user_id=user,
        channel="email",
        template="position_failure_sl",
        vars=STOP_LOSS,
        fallback=["telegram"],
        **options,
    )


def ack_link(mail: ReceivedMail) -> str:
    html = mail.message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    found = ACK_LINK.search(html)
    assert found is not None, "the alert's email has no acknowledgement link"
    return unescape(found.group(1))


# ---------------------------------------------------------------- before the send


def test_cancel_before_the_claim_prevents_delivery(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    smtp: SmtpServer,
    telegram_server: TelegramServer,
) -> None:
    trader(admin)
    withdrawn = outbox.enqueue(
        admin, user_id="u1", channel="email", template="price_alert", vars=ALERT
    )
    kept = outbox.enqueue(
        admin,
        user_id="u1",
        channel="email",
        template="price_alert",
        vars={**ALERT, "instrument": "USDJPY"},
    )
    assert outbox.cancel(admin, withdrawn) is True
    spawn_dispatcher(**environment(smtp, telegram_server))
    [mail] = smtp.wait_for_messages(1, timeout=30)
    assert "USDJPY" in mail.message["Subject"]
    assert mail.message["Message-ID"] == f"<outbox-{kept}@outbox.test>"
    wait_until(lambda: len(history(admin, "u1")) == 2, 10, "the ack")
    time.sleep(1.0)
    assert len(smtp.messages) == 1
    assert outbox.message_status(admin, withdrawn).state == "cancelled"  # type: ignore[union-attr]
    assert telegram_server.messages == []


def test_an_expired_message_is_never_sent_and_is_no_dead_letter(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    smtp: SmtpServer,
    telegram_server: TelegramServer,
) -> None:
    trader(admin)
    stale = outbox.enqueue(
        admin,
        user_id="u1",
        channel="email",
        template="price_alert",
        vars=ALERT,
        expires_at=datetime.now(UTC) + timedelta(seconds=1),
        send_at=datetime.now(UTC) + timedelta(seconds=0.5),
    )
    time.sleep(1.2)
    spawn_dispatcher(**environment(smtp, telegram_server))
    wait_until(lambda: history(admin, "u1") != [], 30, "the expiry")
    assert history(admin, "u1") == [("email", "expired", "expired", 1)]
    time.sleep(1.0)
    assert smtp.messages == [] and telegram_server.messages == []
    assert admin.execute("SELECT count(*) FROM outbox.dead_letter").fetchone() == (0,)
    assert outbox.message_status(admin, stale).state == "expired"  # type: ignore[union-attr]


def test_three_collapsed_messages_send_only_the_last(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    smtp: SmtpServer,
    telegram_server: TelegramServer,
) -> None:
    trader(admin)
    ids = [
        outbox.enqueue(
            admin,
            user_id="u1",
            channel="email",
            template="price_alert",
            vars={**ALERT, "current_price": price},
            collapse_key="price:GBPUSD",
        )
        for price in ("1.2712", "1.2745", "1.2790")
    ]
    spawn_dispatcher(**environment(smtp, telegram_server))
    [mail] = smtp.wait_for_messages(1, timeout=30)
    assert mail.message["Message-ID"] == f"<outbox-{ids[-1]}@outbox.test>"
    text = mail.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "1.2790" in text and "1.2712" not in text
    wait_until(lambda: len(history(admin, "u1")) == 3, 10, "the ack")
    assert history(admin, "u1") == [
        ("email", "superseded", "collapsed", 1),
        ("email", "superseded", "collapsed", 1),
        ("email", "sent", None, 1),
    ]
    time.sleep(1.0)
    assert len(smtp.messages) == 1


# ---------------------------------------------------------------- acknowledge and escalate


def test_an_unacknowledged_alert_reaches_telegram_after_its_delay_with_its_own_link(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    smtp: SmtpServer,
    telegram_server: TelegramServer,
    api_url: str,
) -> None:
    trader(admin)
    alert = stop_loss_alert(admin, escalate_after=2)
    spawn_dispatcher(**environment(smtp, telegram_server, api_url))
    [mail] = smtp.wait_for_messages(1, timeout=30)
    assert ack_link(mail).startswith(f"{api_url}/ack/")
    [chat] = telegram_server.wait_for_messages(1, timeout=30)
    assert "MANUAL STOP LOSS CLOSE REQUIRED" in chat.plain_text
    assert "I have seen this alert" in chat.plain_text
    wait_until(lambda: len(history(admin, "u1")) == 3, 10, "the escalation's ack")
    assert history(admin, "u1") == [
        ("email", "sent", None, 1),
        ("telegram", "escalated", "unacknowledged", 0),
        ("telegram", "sent", None, 1),
    ]
    # the escalation waited its delay on the database's clock
    sent_at, escalated_at = (
        row[0]
        for row in admin.execute(
            "SELECT created_at FROM outbox.attempt WHERE message_id = %s"
            " AND outcome IN ('sent', 'escalated') ORDER BY id LIMIT 2",
            [alert],
        ).fetchall()
    )
    assert (escalated_at - sent_at).total_seconds() >= 2.0
    # the Telegram link acknowledges the same message
    [link] = [e.argument for e in chat.entities if "/ack/" in e.argument]
    assert httpx.get(link, timeout=10).status_code == 200
    assert outbox.message_status(admin, alert).state == "acknowledged"  # type: ignore[union-attr]


def test_an_alert_acknowledged_through_its_email_link_does_not_escalate(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    smtp: SmtpServer,
    telegram_server: TelegramServer,
    api_url: str,
) -> None:
    trader(admin)
    alert = stop_loss_alert(admin, escalate_after=2)
    spawn_dispatcher(**environment(smtp, telegram_server, api_url))
    [mail] = smtp.wait_for_messages(1, timeout=30)
    answer = httpx.get(ack_link(mail), timeout=10)
    assert answer.status_code == 200 and answer.json()["status"] == "acknowledged"
    assert httpx.get(ack_link(mail), timeout=10).status_code == 200  # a second click
    time.sleep(3.5)
    assert telegram_server.messages == []
    assert history(admin, "u1") == [("email", "sent", None, 1), ("email", "acknowledged", None, 0)]
    assert outbox.message_status(admin, alert).state == "acknowledged"  # type: ignore[union-attr]
    forged = ack_link(mail)[:-3] + ("AAA" if not ack_link(mail).endswith("AAA") else "BBB")
    refused = httpx.get(forged, timeout=10)
    assert refused.status_code == 404
    assert refused.json() == {"detail": "invalid or expired acknowledgement link"}


def test_the_escalation_wait_survives_a_dispatcher_killed_while_it_waits(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    smtp: SmtpServer,
    telegram_server: TelegramServer,
) -> None:
    trader(admin, "waits", 2002)
    trader(admin, "sees", 3003)
    unseen = stop_loss_alert(admin, "waits", escalate_after=3)
    seen = stop_loss_alert(admin, "sees", escalate_after=3)
    first = spawn_dispatcher(**environment(smtp, telegram_server))
    smtp.wait_for_messages(2, timeout=30)
    wait_until(
        lambda: (
            {
                outbox.message_status(admin, i).state  # type: ignore[union-attr]
                for i in (unseen, seen)
            }
            == {"awaiting_ack"}
        ),
        10,
        "both alerts waiting",
    )
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert outbox.acknowledge(admin, seen) is True  # while no dispatcher runs
    time.sleep(3.5)
    assert telegram_server.messages == []
    spawn_dispatcher(**environment(smtp, telegram_server))
    [chat] = telegram_server.wait_for_messages(1, timeout=30)
    assert chat.chat_id == 2002
    time.sleep(1.0)
    assert len(telegram_server.messages) == 1
    assert [row[:2] for row in history(admin, "waits")] == [
        ("email", "sent"),
        ("telegram", "escalated"),
        ("telegram", "sent"),
    ]
    assert [row[:2] for row in history(admin, "sees")] == [
        ("email", "sent"),
        ("email", "acknowledged"),
    ]
