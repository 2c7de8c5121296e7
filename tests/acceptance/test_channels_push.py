"""Web Push end to end: ``outbox dispatch`` subprocesses against a push service on loopback.

The service speaks HTTPS with the test CA, verifies every VAPID token and decrypts
every ``aes128gcm`` body with the subscription's private key, as a browser vendor's
push service and the browser would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from outbox import add_push_subscription
from outbox._templates import TemplateCatalog
from outbox.dispatcher.rendering import push_topic, render
from outbox.testing.environment import VAPID_SUBJECT, dispatcher_environment
from outbox.testing.push import PushServer, VapidKeys
from outbox.testing.smtp import SmtpServer
from tests.acceptance.conftest import Spawn, history, wait_until

ALERT = {
    "instrument": "XAUUSD",
    "trigger_price": "2350.00",
    "current_price": "2351.20",
    "condition": "above",
}
PushFactory = Callable[..., PushServer]


def enqueue(admin: psycopg.Connection[Any], user: str, lane: str = "transactional") -> int:
    row = admin.execute(
        "SELECT outbox.enqueue('push', 'price_alert', %s, %s, %s)", [user, Jsonb(ALERT), lane]
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_the_push_service_accepts_the_vapid_token_and_decrypts_the_rendered_json(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    push_server_factory: PushFactory,
    vapid_keys: VapidKeys,
) -> None:
    push = push_server_factory(tls=True)
    browser = push.subscribe(application_server_key=vapid_keys.public_raw)
    admin.execute("INSERT INTO outbox.recipient (user_id) VALUES ('u1')")
    add_push_subscription(admin, "u1", browser.info)
    alert_id = enqueue(admin, "u1")
    enqueue(admin, "u1", lane="campaign")
    spawn_dispatcher(**dispatcher_environment(vapid=vapid_keys))

    wait_until(lambda: len(push.messages) == 2, 30, "two push messages")
    expected = render(
        TemplateCatalog(None),
        "push",
        "price_alert",
        ALERT,
        message_id=alert_id,
        lane="transactional",
        platform_base_url="https://platform.example.com",
    )
    alert, campaign = sorted(push.messages, key=lambda m: m.urgency != "high")
    assert alert.json() == expected.payload  # type: ignore[union-attr]
    assert alert.json()["data"]["url"] == "https://platform.example.com/dashboard/positions"
    assert alert.endpoint == browser.endpoint
    assert alert.vapid_public_key == vapid_keys.public_raw
    claims = alert.vapid_claims
    assert claims["aud"] == push.url and claims["sub"] == VAPID_SUBJECT
    assert time.time() < claims["exp"] <= time.time() + 24 * 3600
    assert alert.urgency == "high" and campaign.urgency == "normal"
    assert alert.topic == push_topic("price_alert", ALERT) == campaign.topic
    assert alert.ttl == 3600
    assert [r.status for r in push.requests] == [201, 201]
    wait_until(lambda: len(history(admin, "u1")) == 2, 10, "the acks")
    assert history(admin, "u1") == [("push", "sent", None, 1)] * 2


def test_a_410_deletes_the_subscription_and_the_alert_arrives_by_email(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    push_server_factory: PushFactory,
    vapid_keys: VapidKeys,
    smtp_server: SmtpServer,
) -> None:
    push = push_server_factory(tls=True)
    browser = push.subscribe(application_server_key=vapid_keys.public_raw)
    push.expire(browser)
    admin.execute("SELECT outbox.set_address('u1', 'email', 'u1@example.com')")
    add_push_subscription(admin, "u1", browser.info)
    enqueue(admin, "u1")
    spawn_dispatcher(**dispatcher_environment(vapid=vapid_keys, smtp=smtp_server))

    [mail] = smtp_server.wait_for_messages(1, timeout=30)
    assert mail.rcpt_tos == ("u1@example.com",)
    assert mail.message["Subject"] == "Price alert: XAUUSD above 2350.00"
    assert [r.status for r in push.requests] == [410]
    wait_until(lambda: len(history(admin, "u1")) == 2, 10, "the ack by email")
    assert history(admin, "u1") == [
        ("push", "fallback", "push_gone", 1),
        ("email", "sent", None, 1),
    ]
    assert admin.execute("SELECT count(*) FROM outbox.push_subscription").fetchone() == (0,)


def test_an_endpoint_on_a_host_that_is_not_allowed_receives_no_request(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    push_server_factory: PushFactory,
    vapid_keys: VapidKeys,
    smtp_server: SmtpServer,
) -> None:
    push = push_server_factory(tls=True)  # https://127.0.0.1:port, allowed
    elsewhere = push_server_factory(tls=True, host="localhost")  # a host not on the list
    admin.execute("INSERT INTO outbox.recipient (user_id) VALUES ('only_elsewhere'), ('both')")
    admin.execute("SELECT outbox.set_address('has_email', 'email', 'he@example.com')")
    add_push_subscription(admin, "only_elsewhere", elsewhere.subscribe().info)
    add_push_subscription(admin, "has_email", elsewhere.subscribe().info)
    add_push_subscription(admin, "both", elsewhere.subscribe().info)
    add_push_subscription(admin, "both", push.subscribe().info)
    refused_id = enqueue(admin, "only_elsewhere")
    enqueue(admin, "both")
    enqueue(admin, "has_email")
    spawn_dispatcher(
        **dispatcher_environment(
            vapid=vapid_keys, smtp=smtp_server, push_allowed_hosts=("127.0.0.1",)
        )
    )

    wait_until(lambda: len(push.messages) == 1, 30, "the allowed subscription's message")
    # no push address it may call, no email, no chat: push, email, telegram, dead
    wait_until(lambda: len(history(admin, "only_elsewhere")) == 3, 20, "the refusal")
    # the push server has the message before the batched ack commits its attempt row
    wait_until(lambda: len(history(admin, "both")) == 1, 10, "the acknowledgement")
    assert history(admin, "both") == [("push", "sent", None, 1)]
    assert history(admin, "only_elsewhere") == [
        ("push", "fallback", "push_endpoint_not_allowed", 1),
        ("email", "fallback", "no_address", 1),
        ("telegram", "dead", "not_configured", 1),  # no bot token in this test
    ]
    dead = admin.execute("SELECT user_id, channel FROM outbox.dead_letter").fetchall()
    assert dead == [("only_elsewhere", "telegram")]
    # a user with another channel still gets the alert: the refusal is a fallback
    [mail] = smtp_server.wait_for_messages(1, timeout=30)
    assert mail.rcpt_tos == ("he@example.com",)
    wait_until(lambda: len(history(admin, "has_email")) == 2, 10, "the email's acknowledgement")
    assert history(admin, "has_email") == [
        ("push", "fallback", "push_endpoint_not_allowed", 1),
        ("email", "sent", None, 1),
    ]
    refusal = admin.execute(
        "SELECT error FROM outbox.attempt WHERE message_id = %s AND channel = 'push'",
        [refused_id],
    ).fetchone()
    assert refusal is not None
    assert "localhost" in refusal[0] and "/wpush/" not in refusal[0]  # a capability
    assert elsewhere.requests == [], "a refused endpoint was contacted"
