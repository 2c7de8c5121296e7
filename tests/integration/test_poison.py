"""Poison messages: hostile or broken input gets a clear error or a dead letter.

Whatever can be refused when the message is written is refused there, with an
:class:`~outbox.InvalidMessage` that names the problem, and the caller's
transaction stays usable. What only shows when the message is rendered or sent
(a row written through raw SQL by a producer in another language, a channel with a
bug) becomes a dead letter with an error class. Either way the dispatcher keeps
running and every other message still arrives, through the real SMTP, Telegram and
Web Push servers on loopback.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import errors
from psycopg.types.json import Jsonb

import outbox
from outbox import InvalidMessage, Settings
from outbox._settings import parse_rate_limits
from outbox.dispatcher import Dispatcher, DispatcherOptions
from outbox.dispatcher.channels.base import Envelope, Outcome
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
EMOJI_RTL = "🚀📉 זהב مؤشر الذهب XAU/USD 🇮🇱🇸🇦 \u200fשלום\u200f"  # noqa: RUF001
ONE_MB = "x" * (1024 * 1024)


# ----------------------------------------------------------------- refused at enqueue


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"vars": {**ALERT, "instrument": ONE_MB}}, "the limit is 262144"),
        ({"vars": {**ALERT, "instrument": "EUR\x00USD"}}, "NUL"),
        ({"vars": {**ALERT, "instrument": "EUR\ud800USD"}}, "lone surrogate"),
        ({"vars": {**ALERT, "instrument": b"\xff\xfe"}}, "not JSON-serialisable"),
        ({"user_id": "u" * 10_000}, "10000 characters long; the limit is 255"),
        ({"user_id": "u\x00"}, "NUL"),
        ({"user_id": "\udcff"}, "lone surrogate"),
        ({"vars": {"instrument": "EURUSD"}}, "missing variables"),
        ({"template": "price_alert\r\nBcc: x"}, "template name"),
        ({"idempotency_key": "k" * 10_000}, "the limit is 255"),
    ],
    ids=[
        "1MB-vars",
        "NUL-in-vars",
        "surrogate-in-vars",
        "bytes-in-vars",
        "10000-char-user",
        "NUL-in-user",
        "surrogate-user",
        "missing-var",
        "CRLF-template",
        "10000-char-key",
    ],
)
def test_a_poison_enqueue_is_refused_with_a_clear_error_and_the_transaction_survives(
    conn: psycopg.Connection[Any], changes: dict[str, Any], message: str
) -> None:
    request = {
        "user_id": "u1",
        "channel": "email",
        "template": "price_alert",
        "vars": ALERT,
        **changes,
    }
    with pytest.raises(InvalidMessage, match=message):
        outbox.enqueue(conn, **request)
    # nothing was sent to the database: the same transaction goes on
    good = outbox.enqueue(conn, user_id="u1", channel="email", template="price_alert", vars=ALERT)
    conn.commit()
    assert conn.execute("SELECT array_agg(id) FROM outbox.message").fetchone() == ([good],)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"telegram_chat_id": 2**64}, "does not fit in 64 bits"),
        ({"telegram_chat_id": -(2**63) - 1}, "does not fit in 64 bits"),
        ({"email": "trader@example.com\r\nBcc: victim@example.com"}, "not an address"),
        ({"email": "trader@example.com\nX-Injected: 1"}, "not an address"),
        ({"email": "x" * 10_000 + "@example.com"}, "the limit is 254"),
    ],
    ids=["chat-id-2^64", "chat-id-below-int64", "CRLF-email", "LF-email", "10000-char-email"],
)
def test_a_poison_recipient_is_refused_with_a_clear_error(
    conn: psycopg.Connection[Any], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidMessage, match=message):
        outbox.upsert_recipient(conn, "u1", **kwargs)
    outbox.upsert_recipient(conn, "u1", email="u1@example.com", telegram_chat_id=2**63 - 1)


@pytest.mark.parametrize(
    ("statement", "params", "error"),
    [
        (
            "SELECT outbox.enqueue('email', 'price_alert', %s, '{}')",
            ["u" * 10_000],
            errors.CheckViolation,
        ),
        (
            "SELECT outbox.enqueue('email', 'price_alert', 'u1', %s::jsonb)",
            ['{"instrument": "EUR\\u0000USD"}'],
            errors.UntranslatableCharacter,
        ),
        (
            "SELECT outbox.enqueue('email', 'price_alert', 'u1',"
            " jsonb_build_object('instrument', convert_from('\\xff'::bytea, 'UTF8')))",
            [],
            errors.CharacterNotInRepertoire,
        ),
        (
            "SELECT outbox.enqueue('fax', 'price_alert', 'u1', '{}')",
            [],
            errors.InvalidParameterValue,
        ),
        (
            "SELECT outbox.set_address('u1', 'telegram', %s)",
            [str(2**64)],
            errors.InvalidParameterValue,
        ),
        (
            "SELECT outbox.set_address('u1', 'email', %s)",
            ["a@example.com\r\nBcc: b@example.com"],
            errors.InvalidParameterValue,
        ),
        (
            "SELECT outbox.set_address('u1', 'sms', %s)",
            ["+49 151 1234567"],
            errors.InvalidParameterValue,
        ),
        (
            "SELECT outbox.set_address('u1', 'fax', '+4915112345678')",
            [],
            errors.InvalidParameterValue,
        ),
        # a raw write past set_address meets the table's own checks
        (
            "WITH r AS (INSERT INTO outbox.recipient (user_id) VALUES ('u1'))"
            " INSERT INTO outbox.recipient_address (user_id, channel, address)"
            " VALUES ('u1', 'telegram', %s)",
            ["0042"],
            errors.CheckViolation,
        ),
        (
            "WITH r AS (INSERT INTO outbox.recipient (user_id) VALUES ('u1'))"
            " INSERT INTO outbox.recipient_address (user_id, channel, address)"
            " VALUES ('u1', 'email', %s)",
            ["a@example.com\r\nBcc: b@example.com"],
            errors.CheckViolation,
        ),
    ],
    ids=[
        "10000-char-user",
        "NUL",
        "invalid-UTF-8",
        "unknown-channel",
        "chat-id-2^64",
        "CRLF-email",
        "spaced-phone",
        "unknown-channel-address",
        "raw-zero-padded-chat",
        "raw-CRLF-email",
    ],
)
def test_the_database_refuses_poison_from_producers_in_any_language(
    conn: psycopg.Connection[Any], statement: str, params: list[Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        conn.execute(statement, params)


# ----------------------------------------------------------------- dead letters at send


class ExplodingChannel:
    """The email channel, except that it raises for one user (a channel bug)."""

    def __init__(self, inner: EmailChannel, victim: str) -> None:
        self.name = "email"
        self.inner = inner
        self.victim = victim

    async def send(self, envelope: Envelope) -> Outcome:
        if envelope.user_id == self.victim:
            raise RuntimeError("kaboom: the channel has a bug")
        return await self.inner.send(envelope)

    async def aclose(self) -> None:
        await self.inner.aclose()


def sql_enqueue(
    admin: psycopg.Connection[Any],
    channel: str,
    user: str,
    vars: dict[str, Any],
    template: str = "price_alert",
) -> int:
    """What a producer in another language does: no Python-side validation."""
    row = admin.execute(
        "SELECT outbox.enqueue(%s, %s, %s, %s)", [channel, template, user, Jsonb(vars)]
    ).fetchone()
    assert row is not None
    return int(row[0])


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.timeout(90)
async def test_poison_messages_die_with_an_error_class_while_every_other_message_arrives(
    database_url: str,
    admin: psycopg.Connection[Any],
    loopback_settings: Settings,
    smtp_server: SmtpServer,
    telegram_server: TelegramServer,
    push_server_factory: Callable[..., PushServer],
) -> None:
    push_server = push_server_factory(tls=True)
    browser = push_server.subscribe(application_server_key=loopback_settings.vapid_public_key)
    for user in ("good", "boom", "rtl", "crlf", "big", "raw"):
        outbox.upsert_recipient(admin, user, email=f"{user}@example.com", telegram_chat_id=4242)
        admin.execute(
            "INSERT INTO outbox.push_subscription (user_id, endpoint, p256dh, auth)"
            " VALUES (%s, %s, %s, %s)",
            [user, f"{browser.endpoint}?{user}", browser.p256dh, browser.auth],
        )
    admin.execute(
        "UPDATE outbox.push_subscription SET endpoint = split_part(endpoint, '?', 1)"
        " WHERE user_id = 'good'"
    )
    settings = replace(
        loopback_settings,
        database_url=database_url,
        rate_limits=parse_rate_limits("off"),
        retry_delays=(0.05,),
        max_attempts=3,
        poll_interval=0.2,
        fallback_on_failure="off",  # poison dies where it fails, to be seen
    )
    transport = httpx.AsyncHTTPTransport(verify=push_server.client_tls_context())
    channels = {
        "email": ExplodingChannel(EmailChannel(settings), victim="boom"),
        "telegram": TelegramChannel(settings),
        "push": PushChannel(settings, transport=transport),
    }
    poison = {
        # the vars of a raw-SQL row do not fit the template: missing variables
        sql_enqueue(admin, "email", "raw", {"instrument": "EURUSD"}): "template",
        # a push payload cannot exceed 4 KB: refused at render time
        sql_enqueue(admin, "push", "big", {**ALERT, "instrument": "X" * 5000}): "template",
        # the channel itself raises: retried, then dead
        outbox.enqueue(
            admin, user_id="boom", channel="email", template="price_alert", vars=ALERT
        ): "internal",
    }
    # 1 MB of vars from a producer that skipped the Python checks: refused at enqueue
    with pytest.raises(psycopg.errors.ProgramLimitExceeded), admin.transaction():
        sql_enqueue(admin, "email", "big", {**ALERT, "instrument": ONE_MB})
    # CR/LF in the variable that becomes the email subject (the <title>)
    crlf = outbox.enqueue(
        admin,
        user_id="crlf",
        channel="email",
        template="price_alert",
        vars={**ALERT, "instrument": "EURUSD\r\nBcc: victim@example.com"},
    )
    fine: list[int] = []
    for channel in ("email", "telegram", "push"):
        fine.append(
            outbox.enqueue(
                admin,
                user_id="rtl",
                channel=channel,
                template="price_alert",
                vars={**ALERT, "instrument": EMOJI_RTL},
            )
        )
        fine.append(
            outbox.enqueue(
                admin, user_id="good", channel=channel, template="price_alert", vars=ALERT
            )
        )

    dispatcher = Dispatcher(settings, channels, options=DispatcherOptions(concurrency=8))
    task = asyncio.create_task(dispatcher.run())
    try:
        await wait_until(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM outbox.message WHERE status <> 'dead'"
                ).fetchone()
                == (0,)
            ),
            45,
            "every message to be sent or dead",
        )
        dead = dict(admin.execute("SELECT id, error_class FROM outbox.dead_letter").fetchall())
        expected_dead = dict(poison)
        assert dead == expected_dead, dead
        for message_id, error_class in dead.items():
            (last_error,) = admin.execute(
                "SELECT last_error FROM outbox.dead_letter WHERE id = %s", [message_id]
            ).fetchone() or ("",)
            assert error_class and last_error, (message_id, error_class)
        assert "kaboom" in str(
            admin.execute(
                "SELECT last_error FROM outbox.dead_letter WHERE error_class = 'internal'"
            ).fetchone()
        )

        # the dispatcher is still running: a message written now still arrives
        assert not task.done()
        late = outbox.enqueue(
            admin, user_id="good", channel="telegram", template="price_alert", vars=ALERT
        )
        await wait_until(
            lambda: (
                admin.execute(
                    "SELECT count(*) FROM outbox.attempt"
                    " WHERE message_id = %s AND outcome = 'sent'",
                    [late],
                ).fetchone()
                == (1,)
            ),
            15,
            "a message after the poison",
        )
    finally:
        dispatcher.stop()
        await asyncio.wait_for(task, 30)

    sent = {
        row[0]
        for row in admin.execute("SELECT message_id FROM outbox.attempt WHERE outcome = 'sent'")
    }
    assert set(fine) | {crlf, late} <= sent

    # emoji and right-to-left text arrive intact on every channel
    mails = {m.rcpt_tos[0]: m for m in smtp_server.messages}
    rtl_mail = mails["rtl@example.com"]
    assert EMOJI_RTL in str(rtl_mail.message["Subject"])
    assert EMOJI_RTL in rtl_mail.message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert any(EMOJI_RTL in m.plain_text for m in telegram_server.messages)
    assert any(EMOJI_RTL in json.dumps(p.json(), ensure_ascii=False) for p in push_server.messages)

    # CR/LF in a variable never becomes a header: the subject stays one line
    crlf_mail = mails["crlf@example.com"]
    subject = str(crlf_mail.message["Subject"])
    assert "\r" not in subject and "\n" not in subject and "EURUSD" in subject
    assert crlf_mail.message["Bcc"] is None
    assert crlf_mail.rcpt_tos == ("crlf@example.com",)
    headers = crlf_mail.raw.split(b"\r\n\r\n", 1)[0]
    assert b"\nBcc:" not in headers and b"\nbcc:" not in headers.lower()
