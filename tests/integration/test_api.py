"""The owner's API against real PostgreSQL and loopback SMTP, Bot API and push servers."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
import jwt
import psycopg
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from outbox._settings import Secret, Settings
from outbox.api import create_app
from outbox.dispatcher.channels.email import EmailChannel
from outbox.dispatcher.channels.push import PushChannel
from outbox.dispatcher.channels.sms import SmsChannel
from outbox.dispatcher.channels.telegram import TelegramChannel
from outbox.testing import fixtures as server_fixtures
from outbox.testing.fixtures import SMTP_PASSWORD, TELEGRAM_TOKEN
from outbox.testing.push import PushServer, VapidKeys
from outbox.testing.smtp import SmtpServer
from outbox.testing.telegram import TelegramServer
from outbox.testing.twilio import TwilioServer

# the loopback servers' fixtures, visible to this module's tests
loopback_settings = server_fixtures.loopback_settings
push_server = server_fixtures.push_server
push_server_factory = server_fixtures.push_server_factory
smtp_server = server_fixtures.smtp_server
telegram_server = server_fixtures.telegram_server
vapid_keys = server_fixtures.vapid_keys

SECRET = "api-jwt-secret-for-tests-only-0123456789"
URL = "/api/v1/messaging/test"
ENTRY = {
    "instrument": "EURUSD",
    "side": "buy",
    "entry_price": "1.0850",
    "volume": "0.10",
    "error_reason": "market closed",
    "approval_id": "ap-17",
}


def token(
    *,
    sub: str = "owner-1",
    role: str | None = "owner",
    ttl: float = 300,
    secret: str = SECRET,
    algorithm: str = "HS256",
) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl)}
    if role is not None:
        claims["role"] = role
    return jwt.encode(claims, secret, algorithm=algorithm)


def bearer(value: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {value or token()}"}


def body(
    user_id: str = "u1",
    channel: str = "email",
    template: str = "position_failure_entry",
    variables: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "channel": channel,
        "template_name": template,
        "template_vars": ENTRY if variables is None else variables,
    }


@pytest.fixture
def settings(loopback_settings: Settings, database_url: str) -> Settings:
    return replace(loopback_settings, database_url=database_url, api_jwt_secret=Secret(SECRET))


@pytest.fixture
def users(admin: psycopg.Connection[Any]) -> None:
    admin.execute(
        "SELECT outbox.set_address(u, c, a) FROM (VALUES ('u1', 'email', 'trader@example.com'),"
        " ('u1', 'telegram', '4242'), ('bounce', 'email', 'bounce@example.com')) v(u, c, a)"
    )
    admin.execute("INSERT INTO outbox.recipient (user_id) VALUES ('quiet')")


@asynccontextmanager
async def client_for(app: Litestar) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with AsyncTestClient(app=app) as client:
        yield client


@pytest.fixture
async def client(settings: Settings, users: None) -> AsyncIterator[AsyncTestClient[Litestar]]:
    async with client_for(create_app(settings)) as client:
        yield client


def attempts(admin: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    return admin.execute(
        "SELECT message_id, channel, user_id, template, outcome, error_class, is_test"
        " FROM outbox.attempt ORDER BY id"
    ).fetchall()


# ------------------------------------------------------------------ 200 and 502


async def test_an_owner_sends_an_email_now_and_a_test_attempt_is_logged(
    client: AsyncTestClient[Litestar],
    smtp_server: SmtpServer,
    admin: psycopg.Connection[Any],
) -> None:
    response = await client.post(URL, json=body(), headers=bearer())

    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["status"] == "sent" and answer["error"] is None
    assert answer["message_id"] < 0 and answer["delivery_time_ms"] >= 0
    [mail] = smtp_server.messages
    assert mail.rcpt_tos == ("trader@example.com",)
    assert mail.message["Subject"] == "⚠️ Manual Trade Entry Required - EURUSD"
    assert mail.message["Message-ID"].startswith(f"<outbox-{answer['message_id']}@")
    assert attempts(admin) == [
        (answer["message_id"], "email", "u1", "position_failure_entry", "sent", None, True)
    ]
    assert admin.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)


async def test_an_owner_sends_a_telegram_message_now(
    client: AsyncTestClient[Litestar],
    telegram_server: TelegramServer,
) -> None:
    response = await client.post(URL, json=body(channel="telegram"), headers=bearer())

    assert response.status_code == 200, response.text
    [message] = telegram_server.messages
    assert str(message.chat_id) == "4242" and "EURUSD" in message.plain_text


async def test_an_owner_sends_an_sms_now_through_twilio(
    settings: Settings, users: None, admin: psycopg.Connection[Any]
) -> None:
    admin.execute("SELECT outbox.set_address('u1', 'sms', '+447700900123')")
    with TwilioServer(tls=True) as twilio:

        def channels(settings: Settings) -> dict[str, SmsChannel]:
            transport = httpx.AsyncHTTPTransport(verify=twilio.client_tls_context())
            configured = replace(settings, **twilio.settings_overrides())
            return {"sms": SmsChannel(configured, transport=transport)}

        async with client_for(create_app(settings, channel_factory=channels)) as client:
            response = await client.post(URL, json=body(channel="sms"), headers=bearer())

    assert response.status_code == 200, response.text
    [sms] = twilio.messages
    assert sms.to == "+447700900123"
    assert sms.body.startswith("Manual trade entry required: the approved BUY EURUSD trade")
    assert sms.status_callback is None  # no public URL configured: no report asked for
    message_id = response.json()["message_id"]
    assert attempts(admin) == [
        (message_id, "sms", "u1", "position_failure_entry", "sent", None, True)
    ]


async def test_an_owner_sends_a_web_push_now(
    settings: Settings,
    users: None,
    admin: psycopg.Connection[Any],
    push_server_factory: Callable[..., PushServer],
    vapid_keys: VapidKeys,
) -> None:
    server = push_server_factory(tls=True)
    browser = server.subscribe(application_server_key=vapid_keys.public_raw)
    admin.execute(
        "INSERT INTO outbox.push_subscription (user_id, endpoint, p256dh, auth)"
        " VALUES ('u1', %s, %s, %s)",
        [browser.endpoint, browser.p256dh, browser.auth],
    )

    def channels(settings: Settings) -> dict[str, PushChannel]:
        transport = httpx.AsyncHTTPTransport(verify=server.client_tls_context())
        return {"push": PushChannel(settings, transport=transport)}

    app = create_app(settings, channel_factory=channels)
    async with client_for(app) as client:
        response = await client.post(URL, json=body(channel="push"), headers=bearer())

    assert response.status_code == 200, response.text
    [received] = server.messages
    assert received.json()["data"]["url"].endswith("/dashboard/approvals/ap-17")


async def test_a_refusing_provider_answers_502_with_its_error_and_logs_a_failed_attempt(
    client: AsyncTestClient[Litestar],
    smtp_server: SmtpServer,
    admin: psycopg.Connection[Any],
) -> None:
    smtp_server.respond("bounce@example.com", "550 5.1.1 no such user")

    response = await client.post(URL, json=body(user_id="bounce"), headers=bearer())

    assert response.status_code == 502, response.text
    answer = response.json()
    assert answer["status"] == "failed" and "550" in answer["error"]
    assert set(answer) == {"status", "message_id", "delivery_time_ms", "error"}
    [(message_id, _, user, _, outcome, _, is_test)] = attempts(admin)
    assert (message_id, user, outcome, is_test) == (answer["message_id"], "bounce", "failed", True)
    # the provider's verdict is applied to the recipient, as the dispatcher would
    assert admin.execute(
        "SELECT undeliverable_since IS NOT NULL FROM outbox.recipient_address"
        " WHERE user_id = 'bounce' AND channel = 'email'"
    ).fetchone() == (True,)
    assert SMTP_PASSWORD not in response.text and SECRET not in response.text


async def test_a_telegram_outage_answers_502_without_the_bot_token(
    client: AsyncTestClient[Litestar],
    telegram_server: TelegramServer,
) -> None:
    telegram_server.fail(4242, 500, times=None)

    response = await client.post(URL, json=body(channel="telegram"), headers=bearer())

    assert response.status_code == 502, response.text
    assert response.json()["status"] == "failed"
    assert TELEGRAM_TOKEN not in response.text


# ------------------------------------------------------------------ 401 and 403


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no header"),
        pytest.param({"Authorization": "Bearer"}, id="empty token"),
        pytest.param(bearer("not.a.jwt"), id="garbage"),
        pytest.param(bearer(token(ttl=-60)), id="expired"),
        pytest.param(bearer(token(secret="another-secret-of-enough-length-0123")), id="wrong key"),
        pytest.param(bearer(token(algorithm="none", secret="")), id="alg none"),
        pytest.param(bearer(token(role=None)), id="no role claim"),
    ],
)
async def test_a_missing_expired_forged_or_unsigned_token_gets_401(
    client: AsyncTestClient[Litestar],
    smtp_server: SmtpServer,
    headers: dict[str, str],
) -> None:
    response = await client.post(URL, json=body(), headers=headers)

    assert response.status_code == 401, response.text
    assert smtp_server.messages == []


async def test_a_caller_whose_role_is_not_owner_gets_403(
    client: AsyncTestClient[Litestar],
    smtp_server: SmtpServer,
) -> None:
    response = await client.post(URL, json=body(), headers=bearer(token(role="trader")))

    assert response.status_code == 403, response.text
    assert smtp_server.messages == []


# ------------------------------------------------------------------ 400, 404, 413, 422


async def test_an_unknown_user_gets_404(client: AsyncTestClient[Litestar]) -> None:
    response = await client.post(URL, json=body(user_id="nobody"), headers=bearer())

    assert response.status_code == 404, response.text
    assert "nobody" in response.json()["detail"]


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        pytest.param(body(template="no_such_template"), "unknown template", id="unknown template"),
        pytest.param(
            body(variables={"instrument": "EURUSD"}), "missing variables", id="missing variables"
        ),
        pytest.param(body(user_id="bounce", channel="telegram"), "Telegram", id="no chat id"),
        pytest.param(body(user_id="quiet"), "email", id="no email"),
        pytest.param(body(channel="push"), "push subscription", id="no push subscription"),
    ],
)
async def test_a_bad_template_or_an_unreachable_channel_gets_400_before_any_send(
    client: AsyncTestClient[Litestar],
    smtp_server: SmtpServer,
    admin: psycopg.Connection[Any],
    payload: dict[str, Any],
    needle: str,
) -> None:
    response = await client.post(URL, json=payload, headers=bearer())

    assert response.status_code == 400, response.text
    assert needle in response.json()["detail"]
    assert smtp_server.messages == [] and attempts(admin) == []


async def test_an_undeliverable_email_address_counts_as_no_address(
    client: AsyncTestClient[Litestar],
    admin: psycopg.Connection[Any],
) -> None:
    admin.execute(
        "UPDATE outbox.recipient_address SET undeliverable_since = now()"
        " WHERE user_id = 'u1' AND channel = 'email'"
    )

    response = await client.post(URL, json=body(), headers=bearer())

    assert response.status_code == 400, response.text


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({k: v for k, v in body().items() if k != "template_vars"}, id="missing"),
        pytest.param(body(channel="fax"), id="unknown channel"),
        pytest.param({**body(), "template_vars": ["not", "an", "object"]}, id="vars not object"),
        pytest.param({**body(), "user_id": ""}, id="empty user id"),
    ],
)
async def test_a_body_that_fails_the_schema_gets_422(
    client: AsyncTestClient[Litestar],
    payload: dict[str, Any],
) -> None:
    response = await client.post(URL, json=payload, headers=bearer())

    assert response.status_code == 422, response.text


async def test_inapp_is_not_a_provider_to_test(client: AsyncTestClient[Litestar]) -> None:
    response = await client.post(URL, json=body(channel="inapp"), headers=bearer())

    assert response.status_code == 400, response.text
    assert "enqueue a message instead" in response.text


async def test_a_body_over_64_kib_gets_413(client: AsyncTestClient[Litestar]) -> None:
    huge = body(variables={**ENTRY, "error_reason": "x" * (65 * 1024)})

    response = await client.post(URL, json=huge, headers=bearer())

    assert response.status_code == 413, response.text


async def test_calls_beyond_the_rate_limit_get_429_with_retry_after_per_caller(
    settings: Settings,
    users: None,
) -> None:
    async with client_for(create_app(settings, rate_limit_per_minute=2)) as client:
        statuses = [
            (await client.post(URL, json=body(user_id="nobody"), headers=bearer())).status_code
            for _ in range(3)
        ]
        refused = await client.post(URL, json=body(user_id="nobody"), headers=bearer())
        other = await client.post(
            URL, json=body(user_id="nobody"), headers=bearer(token(sub="owner-2"))
        )

    assert statuses == [404, 404, 429]
    assert refused.status_code == 429
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert other.status_code == 404


# ------------------------------------------------------------------ health, schema, metrics


async def test_health_says_ok_when_the_database_answers(client: AsyncTestClient[Litestar]) -> None:
    response = await client.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


async def test_health_answers_503_when_the_database_is_unreachable(settings: Settings) -> None:
    down = replace(settings, database_url="postgresql://postgres@127.0.0.1:9/outbox")
    async with client_for(create_app(down, channels={})) as client:
        started = time.monotonic()
        response = await client.get("/health")

    assert response.status_code == 503
    assert response.json()["database"] == "unreachable"
    assert time.monotonic() - started < 10


async def test_the_openapi_schema_and_docs_page_describe_the_endpoint(
    client: AsyncTestClient[Litestar],
) -> None:
    schema = (await client.get("/schema/openapi.json")).json()
    docs = await client.get("/schema")

    operation = schema["paths"][URL]["post"]
    assert {"200", "400", "401", "403", "404", "413", "422", "429", "502"} <= set(
        operation["responses"]
    )
    assert "BearerToken" in schema["components"]["securitySchemes"]
    assert docs.status_code == 200 and "html" in docs.headers["content-type"]
    assert SECRET not in str(schema)


async def test_metrics_report_queue_depth_dead_letters_and_oldest_pending_from_the_database(
    client: AsyncTestClient[Litestar],
    admin: psycopg.Connection[Any],
) -> None:
    for _ in range(2):
        admin.execute(
            "SELECT outbox.enqueue('email', 'position_failure_entry', 'u1', %s)",
            [psycopg.types.json.Jsonb(ENTRY)],
        )
    admin.execute(
        "UPDATE outbox.message SET created_at = now() - interval '90 seconds',"
        " next_attempt_at = now() - interval '90 seconds'"
        " WHERE id = (SELECT min(id) FROM outbox.message)"
    )
    admin.execute(
        "UPDATE outbox.message SET status = 'dead', dead_at = now()"
        " WHERE id = (SELECT max(id) FROM outbox.message)"
    )
    # an alert waiting for its acknowledgement is no work for a dispatcher
    admin.execute(
        "SELECT outbox.enqueue('email', 'position_failure_entry', 'u1', %s,"
        " escalate_after => interval '1 minute')",
        [psycopg.types.json.Jsonb(ENTRY)],
    )
    admin.execute(
        "UPDATE outbox.message SET status = 'awaiting_ack', sent_at = now(),"
        " next_attempt_at = now() + interval '1 minute' WHERE escalate_after IS NOT NULL"
    )

    response = await client.get("/metrics")

    text = response.text
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert 'outbox_queue_depth{channel="email",lane="transactional"} 1.0' in text
    assert 'outbox_queue_depth{channel="push",lane="campaign"} 0.0' in text
    assert "outbox_dead_letters 1.0" in text
    assert "outbox_alerts_awaiting_ack 1.0" in text
    [lag] = [
        line
        for line in text.splitlines()
        if line.startswith('outbox_oldest_pending_seconds{lane="transactional"}')
    ]
    assert 89 <= float(lag.split()[-1]) < 200
    assert "outbox_metrics_database_up 1.0" in text
    assert SECRET not in text and SMTP_PASSWORD not in text and TELEGRAM_TOKEN not in text


async def test_a_test_send_is_counted_in_the_api_metrics(
    client: AsyncTestClient[Litestar],
    smtp_server: SmtpServer,
) -> None:
    await client.post(URL, json=body(), headers=bearer())

    text = (await client.get("/metrics")).text

    assert 'outbox_api_test_sends_total{channel="email",status="sent"} 1.0' in text


def test_several_apps_can_live_in_one_process(settings: Settings) -> None:
    create_app(settings)
    create_app(settings)


def test_the_channels_are_the_dispatchers_own(settings: Settings) -> None:
    # the endpoint awaits the very classes the dispatcher uses; nothing API-specific
    assert EmailChannel.__module__ == "outbox.dispatcher.channels.email"
    assert TelegramChannel.__module__ == "outbox.dispatcher.channels.telegram"


# ------------------------------------------------------------------ nesting depth


def nested_body(depth: int) -> bytes:
    """A request whose ``template_vars`` nest ``depth`` levels (the vars object is 1)."""
    deep = '{"k":' * (depth - 1) + "1" + "}" * (depth - 1)
    vars_text = json.dumps(ENTRY)[:-1] + ', "extra": ' + deep + "}"
    head = json.dumps({k: v for k, v in body().items() if k != "template_vars"})[:-1]
    return f'{head}, "template_vars": {vars_text}}}'.encode()


async def test_vars_nesting_10000_levels_get_400_with_a_clear_body_not_500(
    client: AsyncTestClient[Litestar], smtp_server: SmtpServer, admin: psycopg.Connection[Any]
) -> None:
    payload = nested_body(10_000)
    assert 55_000 < len(payload) < 64 * 1024  # under the body limit: the parser would run

    response = await client.post(
        URL, content=payload, headers={**bearer(), "Content-Type": "application/json"}
    )

    assert response.status_code == 400, response.text[:500]
    assert "nest deeper than 32 levels" in response.json()["detail"]
    assert smtp_server.messages == [] and attempts(admin) == []


async def test_vars_of_32_levels_are_sent_and_33_levels_get_400(
    client: AsyncTestClient[Litestar], smtp_server: SmtpServer
) -> None:
    headers = {**bearer(), "Content-Type": "application/json"}

    refused = await client.post(URL, content=nested_body(33), headers=headers)
    accepted = await client.post(URL, content=nested_body(32), headers=headers)

    assert refused.status_code == 400, refused.text
    assert "nest deeper than 32 levels" in refused.json()["detail"]
    assert accepted.status_code == 200, accepted.text
    assert len(smtp_server.messages) == 1


async def test_brackets_inside_strings_do_not_count_as_nesting(
    client: AsyncTestClient[Litestar], smtp_server: SmtpServer
) -> None:
    reason = '[{"' * 1000 + '\\"]' * 10

    response = await client.post(
        URL, json=body(variables={**ENTRY, "error_reason": reason}), headers=bearer()
    )

    assert response.status_code == 200, response.text


async def test_an_overdue_escalation_shows_as_the_oldest_due_message(
    client: AsyncTestClient[Litestar],
    admin: psycopg.Connection[Any],
) -> None:
    """No dispatcher escalated it on time: the lag the on-call alert watches grows."""
    admin.execute(
        "SELECT outbox.enqueue('email', 'position_failure_entry', 'u1', %s,"
        " escalate_after => interval '1 minute')",
        [psycopg.types.json.Jsonb(ENTRY)],
    )
    admin.execute(
        "UPDATE outbox.message SET status = 'awaiting_ack', sent_at = now() - interval '5 minutes',"
        " next_attempt_at = now() - interval '4 minutes'"
    )
    text = (await client.get("/metrics")).text
    [lag] = [
        line
        for line in text.splitlines()
        if line.startswith('outbox_oldest_pending_seconds{lane="transactional"}')
    ]
    assert 239 <= float(lag.split()[-1]) < 400
