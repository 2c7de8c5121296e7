"""SMS end to end: ``outbox dispatch`` and ``outbox api`` subprocesses, the Twilio
stand-in over HTTPS (throwaway CA) and aiosmtpd on loopback.

The stand-in checks basic auth and the form like Twilio, and posts signed status
callbacks to the ``StatusCallback`` the dispatcher asked for: the API on loopback,
whose ``OUTBOX_API_PUBLIC_URL`` is where Twilio would reach it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

import outbox
from outbox.testing.environment import dispatcher_environment
from outbox.testing.smtp import SmtpServer
from outbox.testing.twilio import TwilioServer, twilio_signature
from tests.acceptance.conftest import Spawn, history, wait_until
from tests.support.pg_cluster import free_port

ROOT = Path(__file__).resolve().parents[2]
JWT_SECRET = "jwt-secret-for-the-sms-test-0123456789abcdef"
MAILGUN_KEY = "mailgun-signing-key-for-the-sms-test"
STOP_LOSS = {
    "instrument": "EURUSD",
    "side": "buy",
    "entry_price": "1.0850",
    "current_price": "1.0790",
    "loss_amount": "-600.00",
    "currency": "USD",
    "broker_ticket": "T-77",
}


@pytest.fixture
def twilio() -> Iterator[TwilioServer]:
    with TwilioServer(tls=True) as server:
        yield server


@pytest.fixture
def api_url(database_url: str, tmp_path: Path, twilio: TwilioServer) -> Iterator[str]:
    """``outbox api`` on a free port; Twilio's callbacks come here."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_API_JWT_SECRET": JWT_SECRET,
        "OUTBOX_API_PUBLIC_URL": url,
        "OUTBOX_MAILGUN_WEBHOOK_SIGNING_KEY": MAILGUN_KEY,
        **twilio.environment(),
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


def dispatch(
    spawn_dispatcher: Spawn, twilio: TwilioServer, api_url: str, smtp: SmtpServer | None = None
) -> None:
    spawn_dispatcher(
        **dispatcher_environment(twilio=twilio, smtp=smtp),
        OUTBOX_API_PUBLIC_URL=api_url,
        OUTBOX_API_JWT_SECRET=JWT_SECRET,
        OUTBOX_RATE_LIMITS="sms=5/s,email=100/m",
        OUTBOX_POLL_INTERVAL="0.2",
    )


def stop_loss(admin: psycopg.Connection[Any], user: str, **options: Any) -> int:
    return outbox.enqueue(
        admin,
        user_id=user,
        channel="sms",
        template="position_failure_sl",
        vars=STOP_LOSS,
        **options,
    )


def test_a_stop_loss_alert_arrives_by_sms_and_twilios_signed_callback_is_recorded(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    twilio: TwilioServer,
    api_url: str,
) -> None:
    outbox.upsert_recipient(admin, "u1", phone="+447700900123")
    message_id = stop_loss(admin, "u1")
    dispatch(spawn_dispatcher, twilio, api_url)

    [sms] = twilio.wait_for_messages(1, timeout=30)
    assert sms.to == "+447700900123" and sms.sender == "+15005550006"
    assert sms.body.startswith(
        "URGENT: the stop loss on your BUY EURUSD position could not be closed."
    )
    assert "Entry 1.0850, now 1.0790, loss -600.00 USD. Ticket T-77." in sms.body
    assert sms.status_callback == f"{api_url}/api/v1/webhooks/sms"

    # Twilio reports "sent" then "delivered"; the API verified and answered both
    callbacks = twilio.wait_for_callbacks(2, timeout=30)
    assert [(c.message_status, c.status) for c in callbacks] == [("sent", 204), ("delivered", 204)]
    wait_until(lambda: len(history(admin, "u1")) == 2, 10, "the delivery report")
    assert history(admin, "u1") == [("sms", "sent", None, 1), ("sms", "delivered", None, 1)]
    provider_ids = admin.execute(
        "SELECT DISTINCT provider_id FROM outbox.attempt WHERE message_id = %s", [message_id]
    ).fetchall()
    assert provider_ids == [(sms.sid,)]

    # Twilio retries a callback: recorded once. A forged one: 403, nothing written.
    assert twilio.post_callback(sms, "delivered") == 204
    forged = twilio.status_callback_form(sms, "undelivered", error_code="30005")
    answer = httpx.post(
        f"{api_url}/api/v1/webhooks/sms",
        data=forged,
        headers={
            "X-Twilio-Signature": twilio_signature(sms.status_callback or "", forged, "guess")
        },
    )
    assert answer.status_code == 403
    unsigned = httpx.post(f"{api_url}/api/v1/webhooks/sms", data=forged)
    assert unsigned.status_code == 403
    time.sleep(0.5)
    assert history(admin, "u1") == [("sms", "sent", None, 1), ("sms", "delivered", None, 1)]
    marked = admin.execute(
        "SELECT undeliverable_since FROM outbox.recipient_address WHERE channel = 'sms'"
    ).fetchone()
    assert marked == (None,)


def test_an_unsubscribed_number_falls_back_to_email_and_sms_is_not_tried_again(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    twilio: TwilioServer,
    smtp_server: SmtpServer,
    api_url: str,
) -> None:
    outbox.upsert_recipient(
        admin, "u2", phone="+15005550009", email="u2@example.com", fallback_order=["sms", "email"]
    )
    twilio.unsubscribed("+15005550009")
    stop_loss(admin, "u2", fallback=["email"])
    dispatch(spawn_dispatcher, twilio, api_url, smtp=smtp_server)

    [mail] = smtp_server.wait_for_messages(1, timeout=30)
    assert mail.rcpt_tos == ("u2@example.com",)
    assert mail.message["Subject"] == "🚨 URGENT: Manual Stop Loss Close Required"
    wait_until(lambda: len(history(admin, "u2")) == 2, 10, "the ack by email")
    assert history(admin, "u2") == [
        ("sms", "fallback", "sms_unsubscribed", 1),
        ("email", "sent", None, 1),
    ]
    disabled = admin.execute(
        "SELECT disabled_since IS NOT NULL FROM outbox.recipient_address"
        " WHERE user_id = 'u2' AND channel = 'sms'"
    ).fetchone()
    assert disabled == (True,)
    [refused] = twilio.requests
    assert (refused.status, refused.code) == (400, 21610)

    stop_loss(admin, "u2", fallback=["email"])  # the next alert does not knock on SMS again
    smtp_server.wait_for_messages(2, timeout=30)
    wait_until(lambda: len(history(admin, "u2")) == 4, 10, "the second ack by email")
    assert history(admin, "u2")[2] == ("sms", "fallback", "no_address", 1)
    assert len(twilio.requests) == 1


def _mailgun(event: str, recipient: str, key: str = MAILGUN_KEY, **data: Any) -> dict[str, Any]:
    timestamp, token = str(int(time.time())), secrets.token_hex(25)
    signature = hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()
    return {
        "signature": {"timestamp": timestamp, "token": token, "signature": signature},
        "event-data": {"event": event, "recipient": recipient, **data},
    }


def test_a_signed_mailgun_hard_bounce_marks_the_address_and_a_forged_one_changes_nothing(
    admin: psycopg.Connection[Any], api_url: str
) -> None:
    outbox.upsert_recipient(admin, "u3", email="gone@example.com")
    outbox.upsert_recipient(admin, "u4", email="kept@example.com")
    url = f"{api_url}/api/v1/webhooks/email/mailgun"

    forged = _mailgun("failed", "kept@example.com", key="not-the-key", severity="permanent")
    assert httpx.post(url, json=forged).status_code == 403
    bounce = _mailgun("failed", "gone@example.com", severity="permanent")
    answer = httpx.post(url, json=bounce)
    assert (answer.status_code, answer.json()) == (200, {"marked": 1})
    assert httpx.post(url, json=bounce).status_code == 403  # the same request again: a replay

    rows = admin.execute(
        "SELECT user_id, undeliverable_since IS NOT NULL FROM outbox.recipient_address"
        " WHERE channel = 'email' ORDER BY user_id"
    ).fetchall()
    assert rows == [("u3", True), ("u4", False)]


def test_a_429_waits_retry_after_without_an_attempt_and_a_500_is_retried(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    twilio: TwilioServer,
    api_url: str,
) -> None:
    outbox.upsert_recipient(admin, "u5", phone="+447700900555")
    outbox.upsert_recipient(admin, "u6", phone="+447700900666")
    twilio.rate_limit("+447700900555", retry_after=2)
    twilio.answer("+447700900666", status=500, code=20500, message="Internal Error", times=1)
    stop_loss(admin, "u5")
    stop_loss(admin, "u6")
    spawn_dispatcher(
        **dispatcher_environment(twilio=twilio),
        OUTBOX_API_PUBLIC_URL=api_url,
        OUTBOX_RATE_LIMITS="sms=5/s",
        OUTBOX_RETRY_DELAYS="0.5",
        OUTBOX_POLL_INTERVAL="0.2",
    )

    twilio.wait_for_messages(2, timeout=30)
    by_number: dict[str | None, list[Any]] = {}
    for request in twilio.requests:
        by_number.setdefault(request.to, []).append(request)
    limited, accepted = by_number["+447700900555"]
    assert (limited.status, limited.code, accepted.status) == (429, 20429, 201)
    assert accepted.received_at - limited.received_at >= 2.0  # Retry-After honoured
    failed, retried = by_number["+447700900666"]
    assert (failed.status, retried.status) == (500, 201)
    wait_until(
        lambda: len(history(admin, "u5")) >= 2 and len(history(admin, "u6")) >= 2, 10, "the acks"
    )
    assert history(admin, "u5")[:2] == [
        ("sms", "deferred", "rate_limited", 1),
        ("sms", "sent", None, 1),  # still the first attempt: a rate limit burns none
    ]
    assert history(admin, "u6")[:2] == [("sms", "retry", "sms_5xx", 1), ("sms", "sent", None, 2)]


def test_a_wrong_auth_token_pauses_sms_without_burning_attempts_until_it_is_fixed(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    twilio: TwilioServer,
    api_url: str,
) -> None:
    outbox.upsert_recipient(admin, "u7", phone="+447700900777")
    message_id = stop_loss(admin, "u7")
    wrong = spawn_dispatcher(
        **(dispatcher_environment(twilio=twilio) | {"OUTBOX_SMS_AUTH_TOKEN": "a-revoked-token"}),
        OUTBOX_POLL_INTERVAL="0.2",
    )
    wait_until(lambda: len(history(admin, "u7")) >= 1, 20, "the refused login")
    assert history(admin, "u7")[0] == ("sms", "deferred", "sms_auth", 1)
    assert [(r.status, r.code) for r in twilio.requests][:1] == [(401, 20003)]
    breaker = admin.execute(
        "SELECT failures > 0 FROM outbox.channel_state WHERE channel = 'sms'"
    ).fetchone()
    assert breaker == (True,)
    assert twilio.messages == []
    wrong.terminate()
    wrong.wait(20)

    dispatch(spawn_dispatcher, twilio, api_url)  # the right token: the alert goes out
    [sms] = twilio.wait_for_messages(1, timeout=90)
    assert sms.to == "+447700900777"
    wait_until(lambda: ("sms", "sent", None, 1) in history(admin, "u7"), 10, "the ack")
    attempts = admin.execute(
        "SELECT attempt FROM outbox.attempt WHERE message_id = %s AND outcome = 'sent'",
        [message_id],
    ).fetchall()
    assert attempts == [(1,)]  # the outage burned no attempt
