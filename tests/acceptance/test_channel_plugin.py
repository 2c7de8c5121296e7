"""A plugin that adds a channel, end to end: ``outbox dispatch`` loads
``chat=outbox.testing.plugins:chat_channel`` (a channel outbox does not ship), and a
message is enqueued to it, rendered from ``chat/<name>.txt.j2``, delivered, retried,
dead-lettered, and used as a fallback link, against the chat API's stand-in over HTTPS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

import outbox
from outbox.testing import chat
from outbox.testing.chat import ChatServer
from outbox.testing.environment import dispatcher_environment
from outbox.testing.smtp import SmtpServer
from tests.acceptance.conftest import Spawn, history, wait_until

ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.0850",
    "current_price": "1.0862",
    "condition": "above",
}


def enqueue(
    admin: psycopg.Connection[Any],
    user: str,
    channel: str,
    *,
    fallback: list[str] | None = None,
    lane: str = "transactional",
) -> int:
    row = admin.execute(
        "SELECT outbox.enqueue(%s, 'price_alert', %s, %s, %s, fallback => %s)",
        [channel, user, Jsonb(ALERT), lane, fallback],
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_plugin_channel_delivers_retries_dies_and_is_a_fallback_link(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    smtp_server: SmtpServer,
    tmp_path: Path,
) -> None:
    templates = tmp_path / "templates"
    (templates / "chat").mkdir(parents=True)
    (templates / "chat" / "price_alert.txt.j2").write_text(
        "{{ instrument }} crossed {{ trigger_price }} (now {{ current_price }})\n"
        "{% if ack_url is defined %}{{ ack_url }}{% endif %}\n"
    )
    # the operator registers the plugin's channel; users get a handle on it
    assert outbox.register_channel(admin, "chat") is True
    for user in ("alice", "bob", "carol", "dave", "erin"):
        outbox.set_address(admin, user, "chat", f"@{user}")
    outbox.set_address(admin, "dave", "email", "dave@example.com")
    outbox.set_address(admin, "erin", "email", "erin@example.com")

    with ChatServer() as server:
        server.fail("@bob", 503, times=1)  # one retry, then delivered
        server.fail("@carol", 500, times=10)  # every attempt fails: a dead letter
        server.fail("@dave", 404)  # no such handle: unreachable, falls back to email
        smtp_server.respond("erin@example.com", "550 5.1.1 No such user here")

        alice = enqueue(admin, "alice", "chat")
        enqueue(admin, "bob", "chat")
        carol = enqueue(admin, "carol", "chat", lane="campaign")
        enqueue(admin, "dave", "chat", fallback=["email"])
        erin = enqueue(admin, "erin", "email", fallback=["chat"])  # chat as the next link

        environment = dispatcher_environment(smtp=smtp_server)
        environment["OUTBOX_CHANNEL_PLUGINS"] += ",chat=outbox.testing.plugins:chat_channel"
        spawn_dispatcher(
            **environment,
            **chat.environment(server),
            OUTBOX_TEMPLATES_DIR=str(templates),
            OUTBOX_RETRY_DELAYS="0.2",
            OUTBOX_MAX_ATTEMPTS="3",
            OUTBOX_POLL_INTERVAL="0.2",
            OUTBOX_RATE_LIMITS="chat=50/s",  # a plugin's channel is rate-limited like any
        )

        messages = server.wait_for_messages(3, timeout=60)  # alice, bob, erin
        wait_until(
            lambda: (
                admin.execute("SELECT count(*) FROM outbox.dead_letter").fetchone() == (1,)
                and all(
                    history(admin, user) and history(admin, user)[-1][1] in ("sent", "dead")
                    for user in ("alice", "bob", "dave", "erin")
                )
            ),
            60,
            "every message to finish",
        )
        texts = {m.to: m.text for m in messages}

    # rendered from chat/price_alert.txt.j2 (plain text, stripped) and delivered
    assert texts == {
        "@alice": "EURUSD crossed 1.0850 (now 1.0862)",
        "@bob": "EURUSD crossed 1.0850 (now 1.0862)",
        "@erin": "EURUSD crossed 1.0850 (now 1.0862)",
    }
    assert history(admin, "alice") == [("chat", "sent", None, 1)]
    # retried after a 503, sent on the second attempt
    assert history(admin, "bob") == [("chat", "retry", "chat_5xx", 1), ("chat", "sent", None, 2)]
    # a campaign message dies where it fails: three attempts, then the dead letters
    assert [row[:3] for row in history(admin, "carol")] == [
        ("chat", "retry", "chat_5xx"),
        ("chat", "retry", "chat_5xx"),
        ("chat", "dead", "chat_5xx"),
    ]
    assert admin.execute("SELECT id, channel FROM outbox.dead_letter").fetchall() == [
        (carol, "chat")
    ]
    # unreachable on chat: the next link of its chain (email) gets it, and the handle
    # is marked so that chat is not tried for dave again
    assert history(admin, "dave") == [
        ("chat", "fallback", "chat_unknown_handle", 1),
        ("email", "sent", None, 1),
    ]
    assert admin.execute(
        "SELECT undeliverable_since IS NOT NULL FROM outbox.recipient_address"
        " WHERE user_id = 'dave' AND channel = 'chat'"
    ).fetchone() == (True,)
    assert [mail.rcpt_tos for mail in smtp_server.messages] == [("dave@example.com",)]
    # a bounced email falls back to the plugin's channel
    assert history(admin, "erin") == [
        ("email", "fallback", "smtp_5xx", 1),
        ("chat", "sent", None, 1),
    ]
    # the provider's message id is logged with 'sent': a delivery report finds it
    ids = dict(
        admin.execute(
            "SELECT user_id, provider_id FROM outbox.attempt WHERE outcome = 'sent'"
            " AND channel = 'chat'"
        ).fetchall()
    )
    assert ids == {m.to.lstrip("@"): m.id for m in messages}
    assert admin.execute(
        "SELECT outbox.record_delivery_report('chat', %s, true, NULL, false)", [ids["alice"]]
    ).fetchone() == (alice,)
    assert admin.execute("SELECT outbox.message_status(%s)", [erin]).fetchone() == ("sent",)
