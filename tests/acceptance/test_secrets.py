"""No secret leaks: a full run with distinctive secrets, then grep everything.

The SMTP password, the bot token, the VAPID private key, the JWT secret, the Twilio
auth token and the Mailgun webhook signing key are set to distinctive values. A
dispatcher subprocess (debug logging, metrics port) and the API subprocess run
against real loopback servers through successes and failures: sent messages, an
SMTP 550, an SMTP login refused after the password changed on the server, Telegram
500 and "chat not found", an expired push subscription, an SMS sent through the
Twilio stand-in (with its signed status callbacks) and one refused as an invalid
number, API calls with good, forged and missing tokens, forged webhooks. Then every
place a secret could end up is searched for each secret and its encodings: both
processes' output, the CLI's output, the API's answers, every row of
``outbox.attempt``, ``outbox.message``, ``outbox.channel_state`` and the dead
letters, and the metrics of both processes.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import psycopg
import pytest

import outbox
from outbox.testing.push import PushServer, VapidKeys
from outbox.testing.smtp import SmtpServer
from outbox.testing.telegram import TelegramServer
from outbox.testing.tls import loopback_certificate
from outbox.testing.twilio import TwilioServer, twilio_signature
from tests.acceptance.conftest import ROOT, wait_until
from tests.support.pg_cluster import free_port

OUTBOX = str(Path(sys.executable).with_name("outbox"))
SMTP_USER = "outbox-mailer"
SMTP_PASSWORD = "smtp-Pw-7f3a9c1e-NEVER-SHOW"
BOT_TOKEN = "987654321:AAH-botToken-Zq8x7w6v5u4t3s2r1p0o"
JWT_SECRET = "jwt-Signing-Key-4e5f6a7b8c9d0e1f-NEVER-SHOW"
TWILIO_TOKEN = "twilio-AuthToken-9a8b7c6d5e4f-NEVER-SHOW"
MAILGUN_KEY = "mailgun-SigningKey-1a2b3c4d5e6f-NEVER-SHOW"
SENDER = "alerts@outbox.test"
ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.085",
    "current_price": "1.086",
    "condition": "above",
}


def encodings(secret: str) -> set[str]:
    """The secret, its parts and the ways a protocol or log could encode it."""
    raw = secret.encode()
    forms = {
        secret,
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.hex(),
    }
    if ":" in secret:  # a bot token: the part after the colon is the secret
        forms.add(secret.split(":", 1)[1])
    return forms


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[SmtpServer, TelegramServer, PushServer]]:
    smtp = SmtpServer(username=SMTP_USER, password=SMTP_PASSWORD).start()
    telegram = TelegramServer(token=BOT_TOKEN).start()
    push = PushServer(tls=True).start()
    try:
        yield smtp, telegram, push
    finally:
        smtp.stop()
        telegram.stop()
        push.stop()


@pytest.fixture
def twilio() -> Iterator[TwilioServer]:
    with TwilioServer(auth_token=TWILIO_TOKEN, tls=True) as server:
        yield server


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([OUTBOX, *args], env=env, cwd=ROOT, stdout=out, stderr=out)


def stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait(10)


def token(secret: str, role: str = "owner") -> str:
    return jwt.encode(
        {"sub": "owner", "role": role, "exp": int(time.time()) + 600}, secret, algorithm="HS256"
    )


@pytest.mark.timeout(150)
def test_no_secret_appears_in_logs_errors_rows_or_metrics_over_a_full_run(
    database_url: str,
    admin: psycopg.Connection[Any],
    servers: tuple[SmtpServer, TelegramServer, PushServer],
    twilio: TwilioServer,
    tmp_path: Path,
) -> None:
    smtp, telegram, push = servers
    keys = VapidKeys.generate()
    secrets = {
        "SMTP password": SMTP_PASSWORD,
        "bot token": BOT_TOKEN,
        "VAPID private key": keys.private_raw,
        "JWT secret": JWT_SECRET,
        "Twilio auth token": TWILIO_TOKEN,
        "Mailgun signing key": MAILGUN_KEY,
    }
    metrics_port, api_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_SMTP_HOST": smtp.host,
        "OUTBOX_SMTP_PORT": str(smtp.port),
        "OUTBOX_SMTP_TLS": "none",
        "OUTBOX_SMTP_USERNAME": SMTP_USER,
        "OUTBOX_SMTP_PASSWORD": SMTP_PASSWORD,
        "OUTBOX_SMTP_FROM": SENDER,
        "OUTBOX_TELEGRAM_BOT_TOKEN": BOT_TOKEN,
        "OUTBOX_TELEGRAM_API_URL": telegram.url,
        "OUTBOX_VAPID_PRIVATE_KEY": keys.private_raw,
        "OUTBOX_VAPID_PUBLIC_KEY": keys.public_raw,
        "OUTBOX_VAPID_SUBJECT": "mailto:ops@outbox.test",
        "OUTBOX_PUSH_ALLOWED_HOSTS": "127.0.0.1",
        "OUTBOX_API_JWT_SECRET": JWT_SECRET,
        "OUTBOX_RATE_LIMITS": "off",
        "OUTBOX_RETRY_DELAYS": "0.2",
        "OUTBOX_MAX_ATTEMPTS": "2",
        "OUTBOX_POLL_INTERVAL": "0.2",
        # plain SMTP (AUTH allowed) and Telegram on loopback; push over TLS with the test CA
        "OUTBOX_TEST_CA_FILE": str(loopback_certificate().ca_file),
        "OUTBOX_CHANNEL_PLUGINS": (
            "push=tests.support.ca_plugins:push_channel,sms=tests.support.ca_plugins:sms_channel"
        ),
        **twilio.environment(),
        "OUTBOX_API_PUBLIC_URL": api_url,  # Twilio's status callbacks come to the API
        "OUTBOX_MAILGUN_WEBHOOK_SIGNING_KEY": MAILGUN_KEY,
    }
    good = push.subscribe(application_server_key=keys.public_raw)
    gone = push.subscribe(application_server_key=keys.public_raw)
    push.expire(gone)
    smtp.respond("bounce@example.com", "550 5.1.1 no such user")
    telegram.fail(500, 500, times=None)
    telegram.chat_not_found(404)
    outbox.upsert_recipient(admin, "good", email="good@example.com", telegram_chat_id=100)
    outbox.upsert_recipient(admin, "bounce", email="bounce@example.com", telegram_chat_id=500)
    outbox.upsert_recipient(admin, "lost", telegram_chat_id=404)
    outbox.upsert_recipient(admin, "texted", phone="+447700900001")
    outbox.upsert_recipient(admin, "wrong", phone="+447700900002")
    twilio.invalid_number("+447700900002")
    outbox.add_push_subscription(admin, "good", good.info)
    outbox.add_push_subscription(admin, "lost", gone.info)
    for user, channel in [
        ("good", "email"),
        ("good", "telegram"),
        ("good", "push"),
        ("bounce", "email"),
        ("bounce", "telegram"),
        ("lost", "telegram"),
        ("lost", "push"),
        ("texted", "sms"),
        ("wrong", "sms"),
    ]:
        outbox.enqueue(
            admin, user_id=user, channel=channel, template="price_alert", vars=ALERT, fallback=[]
        )

    # the API first: Twilio's status callbacks are not retried
    api = start(["-v", "api", "--port", str(api_port)], env, tmp_path / "api.log")
    wait_until(lambda: _get(f"{api_url}/health") == 200, 30, "the API")
    dispatcher = start(
        ["-v", "dispatch", "--metrics-port", str(metrics_port)], env, tmp_path / "dispatcher.log"
    )
    answers: list[str] = []
    try:
        wait_until(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM outbox.message WHERE status <> 'dead'"
                ).fetchone()
                == (0,)
            ),
            60,
            "the first round to finish",
        )
        # the password changes on the server: the next login is refused (535)
        smtp.password = "rotated-on-the-server"
        smtp.disconnect_clients()
        outbox.enqueue(admin, user_id="good", channel="email", template="price_alert", vars=ALERT)
        wait_until(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM outbox.attempt WHERE error_class = 'smtp_auth'"
                ).fetchone()
                != (0,)
            ),
            30,
            "a refused SMTP login",
        )

        wait_until(lambda: _get(f"{api_url}/health") == 200, 30, "the API")
        webhook_answers: list[str] = []
        # Twilio's signed callbacks reach the API; forged webhooks of both kinds do not
        [texted] = twilio.wait_for_callbacks(2, timeout=30)[-1:]
        assert texted.status == 204, twilio.callbacks
        callback_url = f"{api_url}/api/v1/webhooks/sms"
        form = {"MessageSid": texted.message_sid, "MessageStatus": "undelivered"}
        for signature in ("", twilio_signature(callback_url, form, "a-guessed-token")):
            response = httpx.post(
                callback_url, data=form, headers={"X-Twilio-Signature": signature}, timeout=10
            )
            webhook_answers.append(f"{response.status_code} {response.headers} {response.text}")
            assert response.status_code == 403
        bounce = {
            "signature": {
                "timestamp": str(int(time.time())),
                "token": "t" * 50,
                "signature": "0" * 64,
            },
            "event-data": {
                "event": "failed",
                "severity": "permanent",
                "recipient": "good@example.com",
            },
        }
        response = httpx.post(f"{api_url}/api/v1/webhooks/email/mailgun", json=bounce, timeout=10)
        webhook_answers.append(f"{response.status_code} {response.headers} {response.text}")
        assert response.status_code == 403
        body = {
            "user_id": "good",
            "channel": "telegram",
            "template_name": "price_alert",
            "template_vars": ALERT,
        }
        for headers in (
            {"Authorization": f"Bearer {token(JWT_SECRET)}"},
            {"Authorization": f"Bearer {token('a-forged-key-of-the-attacker-0123456789')}"},
            {"Authorization": f"Bearer {token(JWT_SECRET, role='viewer')}"},
            {},
        ):
            response = httpx.post(
                f"{api_url}/api/v1/messaging/test", json=body, headers=headers, timeout=10
            )
            answers.append(f"{response.status_code} {response.headers} {response.text}")
        statuses = [int(a.split()[0]) for a in answers]
        assert statuses == [200, 401, 403, 401], answers
        answers += webhook_answers
        telegram.fail(100, 500, times=None)  # the API's provider error text, too
        response = httpx.post(
            f"{api_url}/api/v1/messaging/test",
            json=body,
            headers={"Authorization": f"Bearer {token(JWT_SECRET)}"},
            timeout=30,
        )
        answers.append(f"{response.status_code} {response.text}")
        assert response.status_code == 502, response.text
        for path in ("/metrics", "/schema/openapi.json"):
            answers.append(httpx.get(f"{api_url}{path}", timeout=10).text)
        answers.append(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text)
    finally:
        assert stop(dispatcher) == 0
        stop(api)

    cli = [
        subprocess.run(
            [OUTBOX, *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for args in (["stats"], ["dlq", "list"], ["-v", "dlq", "list"])
    ]
    dead_ids = [row[0] for row in admin.execute("SELECT id FROM outbox.dead_letter")]
    cli += [
        subprocess.run(
            [OUTBOX, "dlq", "show", str(i)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        for i in dead_ids
    ]
    rows = [
        str(row[0])
        for table in (
            "outbox.attempt",
            "outbox.message",
            "outbox.channel_state",
            "outbox.dead_letter",
            "outbox.recipient",
            "outbox.recipient_address",
        )
        for row in admin.execute(f"SELECT row_to_json(t)::text FROM {table} t")
    ]
    places = {
        "dispatcher output": (tmp_path / "dispatcher.log").read_text(errors="replace"),
        "API output": (tmp_path / "api.log").read_text(errors="replace"),
        "API answers and metrics": "\n".join(answers),
        "CLI output": "\n".join(r.stdout + r.stderr for r in cli),
        "database rows": "\n".join(rows),
    }
    # the run did exercise the failure paths whose texts we search
    classes = {r[0] for r in admin.execute("SELECT DISTINCT error_class FROM outbox.attempt")}
    assert {
        "smtp_5xx",
        "smtp_auth",
        "telegram_5xx",
        "telegram_chat_not_found",
        "sms_invalid_number",
    } <= classes
    assert len(twilio.messages) == 1
    assert len(smtp.messages) >= 1 and len(push.messages) == 1
    assert "DEBUG" in places["dispatcher output"], "the dispatcher did not log at debug level"
    leaks = [
        f"{name} ({form[:6]}...) in {place}"
        for name, secret in secrets.items()
        for form in encodings(secret)
        for place, text in places.items()
        if form in text
    ]
    assert not leaks, leaks


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0
