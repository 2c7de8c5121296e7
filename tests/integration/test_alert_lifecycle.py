"""Cancel, expire, collapse, status, acknowledge and escalate, topic preferences:
the dispatcher in-process against real PostgreSQL, with recording channels.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import outbox
from outbox.dispatcher import Dispatcher, DispatcherOptions
from outbox.dispatcher.channels.base import Envelope, Outcome, Sent
from tests.integration.test_dispatcher import (
    ALERT,
    rows,
    running,
    seed_users,
    settings_for,
    wait_for,
)
from tests.support.channels import RecordingChannel


def channels() -> dict[str, RecordingChannel]:
    return {name: RecordingChannel(name) for name in ("email", "telegram", "push")}


async def drain(database_url: str, chans: dict[str, RecordingChannel], **settings: Any) -> None:
    dispatcher = Dispatcher(
        settings_for(database_url, **settings), chans, options=DispatcherOptions(until_idle=True)
    )
    await asyncio.wait_for(dispatcher.run(), 30)


def sent_ids(channel: RecordingChannel) -> list[int]:
    return [envelope.message_id for _, envelope in channel.sent]


def log(admin: psycopg.Connection[Any], message_id: int) -> list[tuple[str, str]]:
    return rows(
        admin,
        "SELECT channel, outcome FROM outbox.attempt WHERE message_id = %s ORDER BY id",
        message_id,
    )


# ---------------------------------------------------------------- cancel


async def test_cancel_before_the_claim_withdraws_the_message(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    message_id = outbox.enqueue(
        admin, user_id="u1", channel="email", template="price_alert", vars=ALERT
    )
    assert outbox.cancel(admin, message_id) is True
    assert outbox.cancel(admin, message_id) is False  # once
    chans = channels()
    await drain(database_url, chans)
    assert chans["email"].sent == []
    assert log(admin, message_id) == [("email", "cancelled")]
    status = outbox.message_status(admin, message_id)
    assert status is not None and status.state == "cancelled"
    assert rows(admin, "SELECT count(*) FROM outbox.dead_letter") == [(0,)]


async def test_a_cancel_that_rolls_back_cancels_nothing(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    message_id = outbox.enqueue(
        admin, user_id="u1", channel="email", template="price_alert", vars=ALERT
    )
    with psycopg.connect(database_url) as conn:
        assert outbox.cancel(conn, message_id) is True
        conn.rollback()
    chans = channels()
    await drain(database_url, chans)
    assert sent_ids(chans["email"]) == [message_id]
    assert outbox.message_status(admin, message_id).state == "sent"  # type: ignore[union-attr]


async def test_a_claimed_message_is_not_cancelled_and_is_delivered(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    """The documented race: once a dispatcher holds it, cancel says False."""
    seed_users(admin, 1)
    message_id = outbox.enqueue(
        admin, user_id="u1", channel="email", template="price_alert", vars=ALERT
    )
    release = asyncio.Event()

    class Blocking(RecordingChannel):
        async def send(self, envelope: Envelope) -> Outcome:
            self.sent.append((0.0, envelope))
            await release.wait()
            return Sent()

    chans = {**channels(), "email": Blocking("email")}
    dispatcher = Dispatcher(settings_for(database_url), chans)
    async with running(dispatcher):
        await wait_for(lambda: bool(chans["email"].sent))
        assert outbox.message_status(admin, message_id).state == "sending"  # type: ignore[union-attr]
        assert outbox.cancel(admin, message_id) is False
        release.set()
        await wait_for(lambda: rows(admin, "SELECT count(*) FROM outbox.message") == [(0,)])
    assert log(admin, message_id) == [("email", "sent")]


async def test_cancel_refuses_what_is_not_a_message_id(admin: psycopg.Connection[Any]) -> None:
    for bad in (0, -1, 2**63, "1", 1.0, True, None):
        with pytest.raises(outbox.InvalidMessage):
            outbox.cancel(admin, bad)  # type: ignore[arg-type]
    assert outbox.cancel(admin, 424242) is False
    assert outbox.message_status(admin, 424242) is None


# ---------------------------------------------------------------- expire


async def test_an_expired_message_is_never_sent_and_is_no_dead_letter(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    expired = outbox.enqueue(
        admin,
        user_id="u1",
        channel="email",
        template="price_alert",
        vars=ALERT,
        expires_at=datetime.now(UTC) + timedelta(seconds=0.5),
    )
    fresh = outbox.enqueue(
        admin,
        user_id="u1",
        channel="email",
        template="price_alert",
        vars=ALERT,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    await asyncio.sleep(0.6)
    chans = channels()
    await drain(database_url, chans)
    assert sent_ids(chans["email"]) == [fresh]
    assert log(admin, expired) == [("email", "expired")]
    assert outbox.message_status(admin, expired).state == "expired"  # type: ignore[union-attr]
    assert rows(admin, "SELECT count(*) FROM outbox.message") == [(0,)]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"expires_at": datetime.now(UTC) - timedelta(seconds=1)}, "not in the future"),
        ({"expires_at": datetime(2030, 1, 1)}, "timezone-aware"),
        (
            {
                "send_at": datetime.now(UTC) + timedelta(hours=2),
                "expires_at": datetime.now(UTC) + timedelta(hours=1),
            },
            "not after send_at",
        ),
        ({"collapse_key": "k" * 256}, "limit is 255"),
        ({"collapse_key": ""}, "must not be empty"),
        ({"escalate_after": 0}, "between 1 second"),
        ({"escalate_after": -5}, "between 1 second"),
        ({"escalate_after": timedelta(days=8)}, "between 1 second"),
        ({"escalate_after": float("nan")}, "finite"),
        ({"escalate_after": "60"}, "seconds (a number) or a timedelta"),
    ],
)
def test_bad_options_are_refused_before_anything_is_written(
    admin: psycopg.Connection[Any], changes: dict[str, Any], problem: str
) -> None:
    with pytest.raises(
        outbox.InvalidMessage, match=problem.replace("(", r"\(").replace(")", r"\)")
    ):
        outbox.enqueue(
            admin, user_id="u1", channel="email", template="price_alert", vars=ALERT, **changes
        )
    assert rows(admin, "SELECT count(*) FROM outbox.message") == [(0,)]


@pytest.mark.parametrize(
    "arguments",
    [
        "expires_at => now() - interval '1 second'",
        "expires_at => now() + interval '1 hour', send_at => now() + interval '2 hours'",
        "expires_at => 'infinity'",
        "collapse_key => repeat('k', 256)",
        "collapse_key => ''",
        "escalate_after => interval '0'",
        "escalate_after => interval '-1 minute'",
        "escalate_after => interval '8 days'",
    ],
)
def test_the_sql_function_refuses_the_same_options(
    admin: psycopg.Connection[Any], arguments: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        admin.execute(
            "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}', " + arguments + ")"
        )
    assert rows(admin, "SELECT count(*) FROM outbox.message") == [(0,)]


# ---------------------------------------------------------------- collapse


async def test_three_collapsed_messages_send_only_the_last(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 2)
    ids = [
        outbox.enqueue(
            admin,
            user_id="u1",
            channel="email",
            template="price_alert",
            vars={**ALERT, "current_price": price},
            collapse_key="price:EURUSD",
        )
        for price in ("1.1", "1.2", "1.3")
    ]
    other_user = outbox.enqueue(
        admin,
        user_id="u2",
        channel="email",
        template="price_alert",
        vars=ALERT,
        collapse_key="price:EURUSD",
    )
    chans = channels()
    await drain(database_url, chans)
    assert sorted(sent_ids(chans["email"])) == sorted([ids[-1], other_user])
    for superseded in ids[:2]:
        assert log(admin, superseded) == [("email", "superseded")]
        assert outbox.message_status(admin, superseded).state == "superseded"  # type: ignore[union-attr]
    prices = {
        envelope.message_id: "1.3" in str(envelope.content) and "1.2" not in str(envelope.content)
        for _, envelope in chans["email"].sent
    }
    assert prices[ids[-1]] is True


async def test_collapse_does_not_touch_a_message_in_flight(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    first = outbox.enqueue(
        admin,
        user_id="u1",
        channel="email",
        template="price_alert",
        vars=ALERT,
        collapse_key="k",
    )
    admin.execute(
        "UPDATE outbox.message SET status = 'sending', lease_token = gen_random_uuid(),"
        " leased_until = now() + interval '1 minute' WHERE id = %s",
        [first],
    )
    second = outbox.enqueue(
        admin,
        user_id="u1",
        channel="email",
        template="price_alert",
        vars=ALERT,
        collapse_key="k",
    )
    states = dict(rows(admin, "SELECT id, status FROM outbox.message"))
    assert states == {first: "sending", second: "pending"}
    assert log(admin, first) == []


# ---------------------------------------------------------------- acknowledge, escalate


def alert(admin: psycopg.Connection[Any], *, escalate_after: float, **more: Any) -> int:
    return outbox.enqueue(
        admin,
        user_id="u1",
        channel="email",
        template="price_alert",
        vars=ALERT,
        fallback=["telegram"],
        escalate_after=escalate_after,
        **more,
    )


async def test_an_unacknowledged_alert_escalates_after_its_delay_to_the_chains_end(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    message_id = alert(admin, escalate_after=1)
    chans = channels()
    async with running(Dispatcher(settings_for(database_url, poll_interval=0.2), chans)):
        await wait_for(lambda: bool(chans["email"].sent))
        await wait_for(lambda: outbox.message_status(admin, message_id).state == "awaiting_ack")  # type: ignore[union-attr]
        emailed = chans["email"].sent[0][0]
        waiting = outbox.message_status(admin, message_id)
        assert waiting is not None and waiting.channel == "email"  # where the user saw it
        await wait_for(lambda: bool(chans["telegram"].sent), timeout=10)
        escalated = chans["telegram"].sent[0][0]
        await wait_for(
            lambda: (
                log(admin, message_id)
                == [("email", "sent"), ("telegram", "escalated"), ("telegram", "sent")]
            )
        )
    assert escalated - emailed >= 1.0
    assert sent_ids(chans["telegram"]) == [message_id]  # one id, end to end
    status = outbox.message_status(admin, message_id)
    assert status is not None
    assert (status.state, status.channel) == ("awaiting_ack", "telegram")
    assert [a.outcome for a in status.attempts] == ["sent", "escalated", "sent"]
    # at the chain's end it waits for the user without a deadline
    assert rows(
        admin, "SELECT next_attempt_at = 'infinity' FROM outbox.message WHERE id = %s", message_id
    ) == [(True,)]
    assert outbox.acknowledge(admin, message_id) is True
    assert outbox.message_status(admin, message_id).state == "acknowledged"  # type: ignore[union-attr]


async def test_an_acknowledged_alert_does_not_escalate(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    message_id = alert(admin, escalate_after=1)
    assert outbox.acknowledge(admin, message_id) is False  # not sent yet: nothing to see
    chans = channels()
    async with running(Dispatcher(settings_for(database_url, poll_interval=0.2), chans)):
        await wait_for(lambda: outbox.message_status(admin, message_id).state == "awaiting_ack")  # type: ignore[union-attr]
        assert outbox.acknowledge(admin, message_id) is True
        assert outbox.acknowledge(admin, message_id) is False
        await asyncio.sleep(1.6)
    assert chans["telegram"].sent == []
    assert log(admin, message_id) == [("email", "sent"), ("email", "acknowledged")]
    assert outbox.message_status(admin, message_id).state == "acknowledged"  # type: ignore[union-attr]
    assert rows(admin, "SELECT count(*) FROM outbox.message") == [(0,)]


async def test_an_acknowledgement_during_the_escalation_send_stops_what_follows(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    admin.execute("UPDATE outbox.recipient SET fallback_order = '{email,telegram,push}'")
    admin.execute(
        "INSERT INTO outbox.push_subscription (user_id, endpoint, p256dh, auth)"
        " VALUES ('u1', 'https://push.example/1', 'k', 'a')"
    )
    message_id = outbox.enqueue(
        admin,
        user_id="u1",
        channel="email",
        template="price_alert",
        vars=ALERT,
        escalate_after=1,
    )
    release = asyncio.Event()

    class Blocking(RecordingChannel):
        async def send(self, envelope: Envelope) -> Outcome:
            self.sent.append((0.0, envelope))
            await release.wait()
            return Sent()

    chans = {**channels(), "telegram": Blocking("telegram")}
    async with running(Dispatcher(settings_for(database_url, poll_interval=0.2), chans)):
        await wait_for(lambda: bool(chans["telegram"].sent), timeout=10)
        assert outbox.message_status(admin, message_id).state == "sending"  # type: ignore[union-attr]
        assert outbox.acknowledge(admin, message_id) is True
        release.set()
        await wait_for(lambda: rows(admin, "SELECT count(*) FROM outbox.message") == [(0,)])
        await asyncio.sleep(1.5)
    assert chans["push"].sent == []
    assert log(admin, message_id) == [
        ("email", "sent"),
        ("telegram", "escalated"),
        ("telegram", "acknowledged"),
        ("telegram", "sent"),
    ]
    assert outbox.message_status(admin, message_id).state == "acknowledged"  # type: ignore[union-attr]


async def test_the_escalation_wait_lives_in_the_database_across_dispatchers(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    """The dispatcher that sent it is gone; another one escalates it on time."""
    seed_users(admin, 1)
    message_id = alert(admin, escalate_after=1)
    chans = channels()
    await drain(database_url, chans)  # sends the email, then stops: nothing else is due
    assert chans["telegram"].sent == []
    assert outbox.message_status(admin, message_id).state == "awaiting_ack"  # type: ignore[union-attr]
    await asyncio.sleep(1.1)
    later = channels()
    await drain(database_url, later)
    assert sent_ids(later["telegram"]) == [message_id]
    assert later["email"].sent == []


# ---------------------------------------------------------------- preferences


async def test_a_topic_preference_skips_to_the_next_allowed_channel(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    outbox.set_preference(admin, "u1", topic="price_alert", channels=["telegram"])
    message_id = outbox.enqueue(
        admin, user_id="u1", channel="email", template="price_alert", vars=ALERT
    )
    chans = channels()
    await drain(database_url, chans)
    assert chans["email"].sent == []
    assert sent_ids(chans["telegram"]) == [message_id]
    assert rows(
        admin,
        "SELECT channel, outcome, error_class FROM outbox.attempt WHERE message_id = %s"
        " ORDER BY id",
        message_id,
    ) == [("email", "skipped", "preference"), ("telegram", "sent", None)]


async def test_an_instrument_preference_wins_over_the_topics_and_an_empty_one_mutes(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    outbox.set_preference(admin, "u1", topic="price_alert", channels=["telegram"])
    outbox.set_preference(admin, "u1", topic="price_alert", channels=["email"], instrument="EURUSD")
    outbox.set_preference(admin, "u1", topic="price_alert", channels=[], instrument="GBPUSD")
    eurusd = outbox.enqueue(
        admin, user_id="u1", channel="email", template="price_alert", vars=ALERT
    )
    gbpusd = outbox.enqueue(
        admin,
        user_id="u1",
        channel="email",
        template="price_alert",
        vars={**ALERT, "instrument": "GBPUSD"},
    )
    usdjpy = outbox.enqueue(
        admin,
        user_id="u1",
        channel="email",
        template="price_alert",
        vars={**ALERT, "instrument": "USDJPY"},
    )
    chans = channels()
    await drain(database_url, chans)
    assert sent_ids(chans["email"]) == [eurusd]
    assert sent_ids(chans["telegram"]) == [usdjpy]
    assert outbox.message_status(admin, gbpusd).state == "skipped"  # type: ignore[union-attr]
    # forgetting the instrument's preference falls back to the topic's
    outbox.set_preference(admin, "u1", topic="price_alert", channels=None, instrument="EURUSD")
    assert rows(admin, "SELECT instrument, channels FROM outbox.preference ORDER BY 1") == [
        ("", ["telegram"]),
        ("GBPUSD", []),
    ]


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"topic": "position_failure_sl", "channels": []}, "cannot be muted"),
        ({"topic": "price_alert", "channels": ["fax"]}, "unknown channel"),
        ({"topic": "price_alert", "channels": "email"}, "list of channel names"),
        ({"topic": "t" * 256, "channels": ["email"]}, "limit is 255"),
        ({"topic": "", "channels": ["email"]}, "must not be empty"),
        ({"topic": "price_alert", "channels": ["email"], "instrument": "i" * 256}, "limit is 255"),
    ],
)
def test_bad_preferences_are_refused_and_nothing_is_written(
    admin: psycopg.Connection[Any], arguments: dict[str, Any], problem: str
) -> None:
    with pytest.raises(outbox.InvalidMessage, match=problem):
        outbox.set_preference(admin, "u1", **arguments)
    assert rows(admin, "SELECT count(*) FROM outbox.preference") == [(0,)]


@pytest.mark.parametrize(
    "call",
    [
        "SELECT outbox.set_preference('u1', 'position_failure_tp', '{}')",
        "SELECT outbox.set_preference('u1', 'price_alert', '{fax}')",
        "SELECT outbox.set_preference('u1', 'price_alert', ARRAY[NULL]::text[])",
        "SELECT outbox.set_preference('u1', repeat('t', 256), '{email}')",
        "SELECT outbox.set_preference('', 'price_alert', '{email}')",
        "SELECT outbox.set_preference('u1', 'price_alert', '{email}', '')",
    ],
)
def test_the_sql_function_refuses_the_same_preferences(
    admin: psycopg.Connection[Any], call: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        admin.execute(call)
    assert rows(admin, "SELECT count(*) FROM outbox.preference") == [(0,)]


def test_a_position_failure_alert_may_be_narrowed_to_one_channel(
    admin: psycopg.Connection[Any],
) -> None:
    outbox.set_preference(admin, "u1", topic="position_failure_sl", channels=["telegram", "push"])
    assert rows(admin, "SELECT topic, channels FROM outbox.preference") == [
        ("position_failure_sl", ["push", "telegram"])
    ]


async def test_on_call_sees_the_unacknowledged_alerts_without_their_vars(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    waiting = alert(admin, escalate_after=60)
    not_sent = alert(admin, escalate_after=60)
    admin.execute(
        "UPDATE outbox.message SET status = 'awaiting_ack', sent_at = now(),"
        " fallback = '{telegram}', next_attempt_at = now() + interval '1 minute'"
        " WHERE id = %s",
        [waiting],
    )
    with psycopg.connect(database_url) as inspector:
        inspector.execute("SET ROLE outbox_inspector")
        found = inspector.execute(
            "SELECT id, channel, status, escalates_to, escalates_at IS NOT NULL"
            " FROM outbox.unacknowledged_alert"
        ).fetchall()
        columns = [
            c.name
            for c in inspector.execute("SELECT * FROM outbox.unacknowledged_alert").description
            or ()
        ]
    assert found == [(waiting, "email", "awaiting_ack", "telegram", True)]
    assert "vars" not in columns and not_sent != waiting
    assert outbox.acknowledge(admin, waiting) is True
    assert rows(admin, "SELECT count(*) FROM outbox.unacknowledged_alert") == [(0,)]
