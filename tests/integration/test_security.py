"""Security: least-privilege roles, vars that stay data, and the push SSRF guard.

- A trading application logs in with a role that is a member of ``outbox_producer``:
  it can enqueue through the Python API, and it cannot read, change, redrive or
  delete anybody's messages, recipients, subscriptions or delivery history.
- Template variables are data, never template source: ``{{ 7*7 }}`` in a variable
  arrives literally on every channel, through the real loopback servers.
- A push subscription whose endpoint is outside ``OUTBOX_PUSH_ALLOWED_HOSTS`` gets no
  request at all, even when the host resolves to a server that would answer.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

import outbox
from outbox import Settings
from outbox._settings import parse_rate_limits
from outbox.dispatcher import Dispatcher, DispatcherOptions
from outbox.dispatcher.channels.email import EmailChannel
from outbox.dispatcher.channels.push import PushChannel
from outbox.dispatcher.channels.telegram import TelegramChannel
from outbox.testing.push import PushServer
from outbox.testing.smtp import SmtpServer
from outbox.testing.telegram import TelegramServer

ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.085",
    "current_price": "1.086",
    "condition": "above",
}
INJECTION = "{{ 7*7 }} {{ ''.__class__.__mro__ }} {% for x in range(3) %}x{% endfor %}"


# --------------------------------------------------------------------------- roles


@pytest.fixture
def producer_url(database_url: str, admin: psycopg.Connection[Any]) -> Iterator[str]:
    """A login role that is only a member of outbox_producer (dropped afterwards)."""
    role = f"trading_app_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE ROLE {role} LOGIN IN ROLE outbox_producer")
    parts = urlsplit(database_url)
    netloc = parts.netloc.split("@", 1)[-1]
    try:
        yield urlunsplit((parts.scheme, f"{role}@{netloc}", parts.path, parts.query, ""))
    finally:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role]
        )
        admin.execute(f"DROP ROLE {role}")


def test_a_producer_login_enqueues_through_the_python_api_and_nothing_else(
    producer_url: str, admin: psycopg.Connection[Any]
) -> None:
    outbox.upsert_recipient(admin, "victim", email="victim@example.com")
    theirs = outbox.enqueue(
        admin,
        user_id="victim",
        channel="email",
        template="price_alert",
        vars=ALERT,
        idempotency_key="theirs",
    )
    admin.execute(
        "UPDATE outbox.message SET status = 'dead', dead_at = now() WHERE id = %s", [theirs]
    )

    with psycopg.connect(producer_url) as producer:
        mine = outbox.enqueue(
            producer, user_id="me", channel="email", template="price_alert", vars=ALERT
        )
        producer.commit()
        attempts = [
            "SELECT * FROM outbox.message",
            "SELECT vars FROM outbox.message WHERE id = %(theirs)s",
            "UPDATE outbox.message SET vars = '{}' WHERE id = %(theirs)s",
            "DELETE FROM outbox.message WHERE id = %(theirs)s",
            "SELECT * FROM outbox.recipient",
            "UPDATE outbox.recipient SET timezone = 'UTC'",
            "INSERT INTO outbox.recipient (user_id) VALUES ('x')",
            "SELECT * FROM outbox.recipient_address",
            "UPDATE outbox.recipient_address SET address = 'attacker@example.com'",
            "SELECT outbox.set_address('victim', 'email', 'attacker@example.com')",
            "SELECT outbox.register_channel('evil')",
            "SELECT outbox.mark_address_undeliverable('email', 'victim@example.com', NULL)",
            "SELECT outbox.record_delivery_report('sms', 'SM1', false, '30003', true)",
            "SELECT * FROM outbox.push_subscription",
            "INSERT INTO outbox.push_subscription (user_id, endpoint, p256dh, auth)"
            " VALUES ('victim', 'https://evil.example/', 'a', 'b')",
            "SELECT * FROM outbox.attempt",
            "SELECT * FROM outbox.dead_letter",
            "SELECT * FROM outbox.idempotency_key",
            "SELECT outbox.retry_dead(ARRAY[%(theirs)s]::bigint[])",
            "SELECT outbox.purge_dead('0 seconds')",
            "SELECT outbox.prune_history('1 hour')",
            "SELECT outbox._wake_dispatchers()",
            "TRUNCATE outbox.message",
            "CREATE TABLE outbox.evil (id int)",
            "CREATE FUNCTION outbox.enqueue(text) RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "ALTER FUNCTION outbox.enqueue(text, text, text, jsonb, text, text, timestamptz,"
            " smallint, text[], interval, timestamptz, text, interval) OWNER TO CURRENT_USER",
            "SELECT * FROM outbox.preference",
            "SELECT outbox.set_preference('victim', 'price_alert', '{}')",
            "INSERT INTO outbox.preference (user_id, topic, channels) VALUES ('victim', 't', '{}')",
        ]
        for statement in attempts:
            with pytest.raises(errors.InsufficientPrivilege):
                producer.execute(statement, {"theirs": theirs})
            producer.rollback()
        # another producer's idempotency key is not this one's: it writes its own
        # message, learns nothing of theirs and changes nothing of theirs
        again = outbox.enqueue(
            producer,
            user_id="me",
            channel="email",
            template="price_alert",
            vars={**ALERT, "instrument": "HACK"},
            idempotency_key="theirs",
        )
        producer.commit()

    assert again not in (theirs, mine)
    rows = admin.execute(
        "SELECT id, user_id, status, vars->>'instrument' FROM outbox.message ORDER BY id"
    ).fetchall()
    assert rows == [
        (theirs, "victim", "dead", "EURUSD"),
        (mine, "me", "pending", "EURUSD"),
        (again, "me", "pending", "HACK"),
    ]
    assert admin.execute(
        "SELECT address, undeliverable_since FROM outbox.recipient_address"
    ).fetchall() == [("victim@example.com", None)]


def test_the_producer_functions_cannot_be_hijacked_through_the_search_path(
    producer_url: str, admin: psycopg.Connection[Any]
) -> None:
    with psycopg.connect(producer_url) as producer:
        # a temporary table shadowing a name, and a search path the caller controls
        producer.execute("CREATE TEMP TABLE message (id bigint)")
        producer.execute("SET search_path = pg_temp, public")
        message_id = outbox.enqueue(
            producer, user_id="me", channel="email", template="price_alert", vars=ALERT
        )
        producer.commit()
        assert producer.execute("SELECT count(*) FROM message").fetchone() == (0,)
    assert admin.execute("SELECT id FROM outbox.message").fetchall() == [(message_id,)]
    definers = admin.execute(
        "SELECT p.proname, p.proconfig FROM pg_proc p JOIN pg_namespace n"
        " ON n.oid = p.pronamespace WHERE n.nspname = 'outbox' AND p.prosecdef"
    ).fetchall()
    assert definers, "no SECURITY DEFINER function found"
    for name, config in definers:
        assert config and any(c.startswith("search_path=pg_catalog") for c in config), name


# ------------------------------------------------------------------ running dispatcher


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def drain(
    settings: Settings, channels: dict[str, Any], admin: psycopg.Connection[Any]
) -> None:
    dispatcher = Dispatcher(settings, channels, options=DispatcherOptions(concurrency=4))
    task = asyncio.create_task(dispatcher.run())
    try:
        await wait_until(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM outbox.message WHERE status <> 'dead'"
                ).fetchone()
                == (0,)
            ),
            30,
            "the queue to drain",
        )
    finally:
        dispatcher.stop()
        await asyncio.wait_for(task, 30)


@pytest.mark.timeout(60)
async def test_a_template_expression_in_vars_arrives_literally_on_every_channel(
    database_url: str,
    admin: psycopg.Connection[Any],
    loopback_settings: Settings,
    smtp_server: SmtpServer,
    telegram_server: TelegramServer,
    push_server_factory: Callable[..., PushServer],
) -> None:
    push_server = push_server_factory(tls=True)
    browser = push_server.subscribe(application_server_key=loopback_settings.vapid_public_key)
    outbox.upsert_recipient(admin, "u1", email="u1@example.com", telegram_chat_id=4242)
    outbox.add_push_subscription(admin, "u1", browser.info)
    for channel in ("email", "telegram", "push"):
        outbox.enqueue(
            admin,
            user_id="u1",
            channel=channel,
            template="price_alert",
            vars={**ALERT, "instrument": INJECTION},
        )
    settings = replace(
        loopback_settings,
        database_url=database_url,
        rate_limits=parse_rate_limits("off"),
        poll_interval=0.2,
    )
    transport = httpx.AsyncHTTPTransport(verify=push_server.client_tls_context())
    await drain(
        settings,
        {
            "email": EmailChannel(settings),
            "telegram": TelegramChannel(settings),
            "push": PushChannel(settings, transport=transport),
        },
        admin,
    )

    assert admin.execute(
        "SELECT count(*) FROM outbox.attempt WHERE outcome = 'sent'"
    ).fetchone() == (3,)
    [mail] = smtp_server.messages
    text = mail.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    html = mail.message.get_body(("html",)).get_content()  # type: ignore[union-attr]
    assert INJECTION in str(mail.message["Subject"])
    assert INJECTION in text
    assert INJECTION.replace("'", "&#39;") in html or INJECTION in html
    [chat] = telegram_server.messages
    assert INJECTION in chat.plain_text
    [push] = push_server.messages
    assert INJECTION in json.dumps(push.json(), ensure_ascii=False)
    for rendered in (str(mail.message["Subject"]), text, chat.plain_text):
        assert "<class" not in rendered and "xxx" not in rendered


@pytest.mark.timeout(60)
async def test_push_endpoints_outside_the_allowlist_get_no_request(
    database_url: str,
    admin: psycopg.Connection[Any],
    loopback_settings: Settings,
    push_server_factory: Callable[..., PushServer],
) -> None:
    allowed = push_server_factory(tls=True)
    forbidden = push_server_factory(tls=True)  # answers happily if anybody calls it
    key = loopback_settings.vapid_public_key
    good = allowed.subscribe(application_server_key=key)
    outbox.upsert_recipient(admin, "ok")
    outbox.upsert_recipient(admin, "victim")
    outbox.add_push_subscription(admin, "ok", good.info)
    target = forbidden.subscribe(application_server_key=key)
    path = urlsplit(target.endpoint).path
    port = forbidden.port
    sneaky = [
        f"https://localhost:{port}{path}",  # same machine, other name
        f"https://127.0.0.1@localhost:{port}{path}",  # user info that looks allowed
        f"https://0x7f000001:{port}{path}",  # 127.0.0.1 as a hex literal
        f"https://2130706433:{port}{path}",  # 127.0.0.1 as a decimal literal
        f"https://[::ffff:127.0.0.1]:{port}{path}",  # IPv4-mapped IPv6
        "https://169.254.169.254/latest/meta-data/",  # cloud metadata
    ]
    for endpoint in sneaky:
        admin.execute(
            "INSERT INTO outbox.push_subscription (user_id, endpoint, p256dh, auth)"
            " VALUES ('victim', %s, %s, %s)",
            [endpoint, target.p256dh, target.auth],
        )
    admin.execute("SELECT outbox.enqueue('push', 'price_alert', 'ok', %s)", [Jsonb(ALERT)])
    victim_id = outbox.enqueue(  # no fallback: the refusal itself ends it
        admin, user_id="victim", channel="push", template="price_alert", vars=ALERT, fallback=[]
    )
    settings = replace(
        loopback_settings,
        database_url=database_url,
        rate_limits=parse_rate_limits("off"),
        poll_interval=0.2,
        push_allowed_hosts=("127.0.0.1",),
    )
    transport = httpx.AsyncHTTPTransport(verify=allowed.client_tls_context())
    await drain(settings, {"push": PushChannel(settings, transport=transport)}, admin)

    assert forbidden.requests == []
    assert len(allowed.messages) == 1
    dead = admin.execute("SELECT id, error_class, last_error FROM outbox.dead_letter").fetchall()
    assert [(d[0], d[1]) for d in dead] == [(victim_id, "push_endpoint_not_allowed")]
    assert path not in dead[0][2], "the endpoint path is a capability; it must not be logged"


def test_a_producer_cannot_cancel_acknowledge_collapse_or_read_another_producers_messages(
    producer_url: str, admin: psycopg.Connection[Any], database_url: str
) -> None:
    """Ids are sequential, collapse keys guessable: the scope is the login role."""
    outbox.upsert_recipient(admin, "victim", email="victim@example.com")
    with psycopg.connect(producer_url) as producer:
        theirs = outbox.enqueue(
            admin,
            user_id="victim",
            channel="email",
            template="price_alert",
            vars=ALERT,
            collapse_key="EURUSD",
        )
        alert = outbox.enqueue(
            admin,
            user_id="victim",
            channel="email",
            template="price_alert",
            vars=ALERT,
            escalate_after=60,
        )
        admin.execute(
            "UPDATE outbox.message SET status = 'awaiting_ack', sent_at = now() WHERE id = %s",
            [alert],
        )
        assert outbox.cancel(producer, theirs) is False
        assert outbox.acknowledge(producer, alert) is False
        assert outbox.message_status(producer, theirs) is None
        assert producer.execute(
            "SELECT count(*) FROM outbox.message_attempts(%s)", [theirs]
        ).fetchone() == (0,)
        mine = outbox.enqueue(
            producer,
            user_id="victim",
            channel="email",
            template="price_alert",
            vars=ALERT,
            collapse_key="EURUSD",
        )
        producer.commit()
        # their own messages: visible and theirs to withdraw
        status = outbox.message_status(producer, mine)
        assert status is not None and status.state == "pending"
        assert outbox.cancel(producer, mine) is True
        producer.commit()
    states = dict(admin.execute("SELECT id, status FROM outbox.message").fetchall())
    assert states == {theirs: "pending", alert: "awaiting_ack"}
    # the operator (here: the superuser) sees and withdraws everything
    assert outbox.message_status(admin, mine).state == "cancelled"  # type: ignore[union-attr]
    assert outbox.cancel(admin, theirs) is True
