"""The providers' webhooks (Twilio status callbacks, Mailgun bounces) over the API,
against a real PostgreSQL, with the API connected as the dispatcher's role."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlencode

import psycopg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

import outbox
from outbox._settings import Secret, Settings
from outbox.api import create_app
from outbox.testing.twilio import twilio_signature
from tests.support.roles import login_role

SECRET = "api-jwt-secret-for-tests-only-0123456789"
PUBLIC_URL = "https://outbox.example:8443/prefix"
CALLBACK = f"{PUBLIC_URL}/api/v1/webhooks/sms"
AUTH_TOKEN = "twilio-auth-token-for-webhook-tests"
ACCOUNT = "AC" + "7" * 32
MAILGUN_KEY = "key-mailgun-signing-for-tests-0123456789"
SMS_PATH = "/api/v1/webhooks/sms"
MAILGUN_PATH = "/api/v1/webhooks/email/mailgun"


@pytest.fixture
def api_url(admin: psycopg.Connection[Any], database_url: str) -> Iterator[str]:
    with login_role(admin, database_url, "outbox_dispatcher") as url:
        yield url


@pytest.fixture
def settings(api_url: str) -> Settings:
    return Settings(
        database_url=api_url,
        api_jwt_secret=Secret(SECRET),
        api_public_url=PUBLIC_URL,
        sms_account_sid=ACCOUNT,
        sms_auth_token=Secret(AUTH_TOKEN),
        sms_from="+15005550006",
        mailgun_webhook_signing_key=Secret(MAILGUN_KEY),
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=create_app(settings, channels={})) as client:
        yield client


def sent_sms(admin: psycopg.Connection[Any], sid: str, user: str = "u1") -> int:
    """A message the dispatcher sent by SMS, Twilio's SID logged with it."""
    outbox.set_address(admin, user, "sms", "+4915112345678")
    [(message_id,)] = admin.execute(
        "SELECT outbox.enqueue('sms', 'price_alert', %s, '{}')", [user]
    ).fetchall()
    admin.execute("DELETE FROM outbox.message WHERE id = %s", [message_id])
    admin.execute(
        "INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,"
        " outcome, provider_id) VALUES (%s, 'transactional', 'sms', %s, 'price_alert', 1,"
        " 'sent', %s)",
        [message_id, user, sid],
    )
    return int(message_id)


def attempts(admin: psycopg.Connection[Any], message_id: int) -> list[tuple[Any, ...]]:
    return admin.execute(
        "SELECT outcome, error_class, error FROM outbox.attempt WHERE message_id = %s ORDER BY id",
        [message_id],
    ).fetchall()


def number_marked(admin: psycopg.Connection[Any], user: str = "u1") -> bool:
    row = admin.execute(
        "SELECT undeliverable_since IS NOT NULL FROM outbox.recipient_address"
        " WHERE user_id = %s AND channel = 'sms'",
        [user],
    ).fetchone()
    assert row is not None
    return bool(row[0])


def callback(sid: str, status: str, error_code: str | None = None) -> dict[str, str]:
    form = {
        "MessageSid": sid,
        "SmsSid": sid,
        "MessageStatus": status,
        "SmsStatus": status,
        "AccountSid": ACCOUNT,
        "From": "+15005550006",
        "To": "+4915112345678",
        "ApiVersion": "2010-04-01",
    }
    if error_code is not None:
        form["ErrorCode"] = error_code
    return form


async def post_callback(
    client: AsyncTestClient[Litestar],
    form: dict[str, str],
    *,
    signature: str | None = None,
    token: str = AUTH_TOKEN,
) -> int:
    signed = twilio_signature(CALLBACK, form, token) if signature is None else signature
    response = await client.post(
        SMS_PATH,
        content=urlencode(form),
        headers={
            "Content-Type": "application/x-www-form-urlencoded",
            **({"X-Twilio-Signature": signed} if signed else {}),
        },
    )
    return response.status_code


# ------------------------------------------------------------------ Twilio callbacks


async def test_a_signed_delivered_callback_is_recorded_once_however_often_it_comes(
    client: AsyncTestClient[Litestar], admin: psycopg.Connection[Any]
) -> None:
    sid = "SM" + secrets.token_hex(16)
    message_id = sent_sms(admin, sid)
    assert await post_callback(client, callback(sid, "sent")) == 204
    assert attempts(admin, message_id) == [("sent", None, None)]  # not final: nothing
    assert await post_callback(client, callback(sid, "delivered")) == 204
    assert await post_callback(client, callback(sid, "delivered")) == 204  # Twilio retried
    assert attempts(admin, message_id) == [("sent", None, None), ("delivered", None, None)]
    assert number_marked(admin) is False


@pytest.mark.parametrize(
    ("code", "permanent"), [("30005", True), ("30006", True), ("21610", True), ("30003", False)]
)
async def test_an_undelivered_callback_marks_the_number_only_for_a_permanent_code(
    client: AsyncTestClient[Litestar], admin: psycopg.Connection[Any], code: str, permanent: bool
) -> None:
    sid = "SM" + secrets.token_hex(16)
    message_id = sent_sms(admin, sid)
    assert await post_callback(client, callback(sid, "undelivered", code)) == 204
    error_class = "undeliverable" if permanent else "undelivered"
    assert attempts(admin, message_id)[-1] == ("undelivered", error_class, f"provider error {code}")
    assert number_marked(admin) is permanent


@pytest.mark.parametrize(
    "forgery",
    [
        "missing",
        "empty",
        "another token",
        "another url",
        "a field changed after signing",
    ],
)
async def test_a_forged_or_unsigned_callback_gets_403_and_changes_nothing(
    client: AsyncTestClient[Litestar], admin: psycopg.Connection[Any], forgery: str
) -> None:
    sid = "SM" + secrets.token_hex(16)
    message_id = sent_sms(admin, sid)
    form = callback(sid, "undelivered", "30005")
    signature: str | None
    match forgery:
        case "missing":
            signature = ""
        case "empty":
            signature = " "
        case "another token":
            signature = twilio_signature(CALLBACK, form, "not-the-auth-token")
        case "another url":
            signature = twilio_signature(
                "https://attacker.example/api/v1/webhooks/sms", form, AUTH_TOKEN
            )
        case _:
            signature = twilio_signature(CALLBACK, callback(sid, "delivered"), AUTH_TOKEN)
    assert await post_callback(client, form, signature=signature) == 403
    assert attempts(admin, message_id) == [("sent", None, None)]
    assert number_marked(admin) is False


async def test_a_signed_callback_that_is_not_one_gets_400_and_an_unknown_sid_204(
    client: AsyncTestClient[Litestar], admin: psycopg.Connection[Any]
) -> None:
    assert await post_callback(client, {"MessageStatus": "delivered"}) == 400
    assert await post_callback(client, callback("SM1", "delivered")) == 400
    bad_code = callback("SM" + "1" * 32, "undelivered", "30005; DROP TABLE")
    assert await post_callback(client, bad_code) == 400
    assert await post_callback(client, callback("SM" + "2" * 32, "delivered")) == 204
    [(count,)] = admin.execute(
        "SELECT count(*) FROM outbox.attempt WHERE outcome IN ('delivered', 'undelivered')"
    ).fetchall()
    assert count == 0


async def test_an_oversized_callback_is_refused_before_it_is_read(
    client: AsyncTestClient[Litestar],
) -> None:
    form = {**callback("SM" + "3" * 32, "delivered"), "Padding": "x" * 20_000}
    assert await post_callback(client, form) == 413


async def test_without_a_public_url_the_sms_webhook_answers_503(api_url: str) -> None:
    settings = Settings(
        database_url=api_url, api_jwt_secret=Secret(SECRET), sms_auth_token=Secret(AUTH_TOKEN)
    )
    async with AsyncTestClient(app=create_app(settings, channels={})) as client:
        response = await client.post(SMS_PATH, content=b"", headers={"X-Twilio-Signature": "x"})
    assert response.status_code == 503
    assert "OUTBOX_API_PUBLIC_URL" in response.json()["detail"]


# ------------------------------------------------------------------ Mailgun bounces


def mailgun_body(
    event: str,
    recipient: str,
    *,
    severity: str | None = None,
    key: str = MAILGUN_KEY,
    timestamp: int | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    token = token or secrets.token_hex(25)
    signature = hmac.new(key.encode(), (stamp + token).encode(), hashlib.sha256).hexdigest()
    data: dict[str, Any] = {"event": event, "recipient": recipient, "id": secrets.token_hex(8)}
    if severity is not None:
        data["severity"] = severity
        data["delivery-status"] = {"code": 550, "message": "5.1.1 mailbox unavailable"}
    return {
        "signature": {"timestamp": stamp, "token": token, "signature": signature},
        "event-data": data,
    }


def email_marked(admin: psycopg.Connection[Any], user: str) -> tuple[bool, str | None]:
    row = admin.execute(
        "SELECT undeliverable_since IS NOT NULL, undeliverable_reason FROM outbox.recipient_address"
        " WHERE user_id = %s AND channel = 'email'",
        [user],
    ).fetchone()
    assert row is not None
    return bool(row[0]), row[1]


async def test_a_hard_bounce_and_a_complaint_mark_the_address_and_a_soft_one_does_not(
    client: AsyncTestClient[Litestar], admin: psycopg.Connection[Any]
) -> None:
    outbox.set_address(admin, "u1", "email", "Bounced@Example.com")
    outbox.set_address(admin, "u2", "email", "spam@example.com")
    outbox.set_address(admin, "u3", "email", "soft@example.com")
    hard = mailgun_body("failed", "bounced@example.com", severity="permanent")
    response = await client.post(MAILGUN_PATH, json=hard)
    assert (response.status_code, response.json()) == (200, {"marked": 1})
    assert email_marked(admin, "u1") == (True, "mailgun: hard bounce 550")
    again = mailgun_body("failed", "bounced@example.com", severity="permanent")
    assert (await client.post(MAILGUN_PATH, json=again)).json() == {"marked": 0}  # idempotent
    complaint = await client.post(MAILGUN_PATH, json=mailgun_body("complained", "spam@example.com"))
    assert complaint.json() == {"marked": 1}
    assert email_marked(admin, "u2")[0] is True
    soft = mailgun_body("failed", "soft@example.com", severity="temporary")
    assert (await client.post(MAILGUN_PATH, json=soft)).json() == {"marked": 0}
    delivered = mailgun_body("delivered", "soft@example.com")
    assert (await client.post(MAILGUN_PATH, json=delivered)).json() == {"marked": 0}
    assert email_marked(admin, "u3") == (False, None)


@pytest.mark.parametrize("forgery", ["wrong key", "old", "future", "replayed", "tampered"])
async def test_a_forged_old_or_replayed_bounce_gets_403_and_changes_nothing(
    client: AsyncTestClient[Litestar], admin: psycopg.Connection[Any], forgery: str
) -> None:
    outbox.set_address(admin, "u1", "email", "victim@example.com")
    body = mailgun_body("failed", "victim@example.com", severity="permanent")
    match forgery:
        case "wrong key":
            body = mailgun_body(
                "failed", "victim@example.com", severity="permanent", key="key-guess"
            )
        case "old":
            body = mailgun_body(
                "failed",
                "victim@example.com",
                severity="permanent",
                timestamp=int(time.time()) - 301,
            )
        case "future":
            body = mailgun_body(
                "failed",
                "victim@example.com",
                severity="permanent",
                timestamp=int(time.time()) + 301,
            )
        case "replayed":
            soft = mailgun_body("delivered", "victim@example.com", token="t" * 50)
            assert (await client.post(MAILGUN_PATH, json=soft)).status_code == 200
            body = {**body, "signature": soft["signature"]}
        case "tampered":
            body["signature"]["token"] = "x" * 50
    response = await client.post(MAILGUN_PATH, json=body)
    assert response.status_code == 403
    assert email_marked(admin, "u1") == (False, None)


async def test_a_body_that_is_not_a_mailgun_webhook_gets_400(
    client: AsyncTestClient[Litestar],
) -> None:
    deep = b"[" * 30_000 + b"]" * 30_000  # within 64 KiB, deeper than the parser goes
    for content in (b"not json", b"[]", json.dumps({"signature": {}}).encode(), deep, b"\xff"):
        response = await client.post(
            MAILGUN_PATH, content=content, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400
