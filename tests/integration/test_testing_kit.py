"""outbox.testing, as a host service's tests use it: assertions on what a transaction
enqueued (through the caller's connection) and an in-process drain."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine

import outbox
from outbox._migrate import sqlalchemy_url
from outbox.dispatcher.channels.base import RenderedEmail, RenderedTelegram
from outbox.testing import (
    Drained,
    assert_enqueued,
    assert_nothing_enqueued,
    drain,
    enqueued_messages,
)

PRICE = {
    "instrument": "EURUSD",
    "condition": "above",
    "trigger_price": "1.0900",
    "current_price": "1.0902",
}


def enqueue_price_alert(conn: Any, user: str = "u42", channel: str = "email") -> int:
    return outbox.enqueue(conn, user_id=user, channel=channel, template="price_alert", vars=PRICE)


def test_an_uncommitted_message_is_seen_by_its_own_connection_only(database_url: str) -> None:
    with psycopg.connect(database_url) as writer, psycopg.connect(database_url) as other:
        message_id = enqueue_price_alert(writer)

        found = assert_enqueued(
            writer, user_id="u42", template="price_alert", vars={"instrument": "EURUSD"}
        )
        assert (found.id, found.channel, found.lane, found.status) == (
            message_id,
            "email",
            "transactional",
            "pending",
        )
        assert_nothing_enqueued(other)
        writer.commit()
        assert [m.id for m in enqueued_messages(other, user_id="u42")] == [message_id]


def test_a_mismatch_fails_with_what_the_connection_does_see(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        enqueue_price_alert(conn)
        with pytest.raises(AssertionError) as raised:
            assert_enqueued(
                conn, user_id="u42", template="price_alert", vars={"instrument": "GBPUSD"}
            )
        assert "found 0" in str(raised.value)
        assert "email/price_alert to u42" in str(raised.value) and "EURUSD" in str(raised.value)
        with pytest.raises(AssertionError, match="expected no message"):
            assert_nothing_enqueued(conn, user_id="u42")


def test_a_sqlalchemy_connection_is_read_inside_its_transaction(database_url: str) -> None:
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.connect() as connection:
            enqueue_price_alert(connection, user="u7", channel="telegram")
            assert_enqueued(connection, user_id="u7", channel="telegram", template="price_alert")
            connection.rollback()
            assert_nothing_enqueued(connection)
    finally:
        engine.dispose()


def test_drain_renders_with_the_real_templates_and_records_what_each_channel_sends(
    database_url: str,
) -> None:
    with psycopg.connect(database_url) as conn:
        outbox.upsert_recipient(conn, "u42", email="u42@trader.test", telegram_chat_id=42)
        enqueue_price_alert(conn, channel="email")
        enqueue_price_alert(conn, channel="telegram")
        enqueue_price_alert(conn, user="nobody", channel="email")  # no address: dead

    sent = drain(database_url)

    assert isinstance(sent, Drained) and len(sent) == 2
    [email] = sent.for_user("u42", channel="email")
    [telegram] = sent.on("telegram")
    assert isinstance(email.content, RenderedEmail) and "EURUSD" in email.content.subject
    assert email.recipient.email == "u42@trader.test"
    assert isinstance(telegram.content, RenderedTelegram)
    assert "EURUSD" in telegram.content.parts[0]
    with psycopg.connect(database_url) as conn:
        [dead] = enqueued_messages(conn)
        assert (dead.user_id, dead.status) == ("nobody", "dead")


def test_enqueued_messages_show_the_alert_options(database_url: str) -> None:
    from datetime import UTC, datetime, timedelta

    import outbox

    expires = datetime.now(UTC) + timedelta(hours=1)
    with psycopg.connect(database_url) as conn:
        outbox.enqueue(
            conn,
            user_id="u42",
            channel="email",
            template="price_alert",
            vars={
                "instrument": "EURUSD",
                "trigger_price": "1",
                "current_price": "1",
                "condition": "above",
            },
            expires_at=expires,
            collapse_key="price:EURUSD",
            escalate_after=90,
        )
        [alert] = enqueued_messages(conn)
    assert (alert.expires_at, alert.collapse_key, alert.escalate_after) == (
        expires,
        "price:EURUSD",
        90.0,
    )
