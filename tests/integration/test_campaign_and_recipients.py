"""Campaigns write in batches; recipients and push subscriptions are stored."""

from __future__ import annotations

from datetime import time
from typing import Any

import psycopg
import pytest

import outbox

PRICE_ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.0850",
    "current_price": "1.0851",
    "condition": "above",
}


class CountingCursor(psycopg.Cursor[Any]):
    """Counts every statement the driver sends on this connection."""

    statements = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        type(self).statements += 1
        return super().execute(*args, **kwargs)


def test_a_campaign_to_100000_users_takes_one_statement_per_batch(database_url: str) -> None:
    CountingCursor.statements = 0
    progress: list[int] = []
    with psycopg.connect(database_url, cursor_factory=CountingCursor) as conn:
        result = outbox.enqueue_campaign(
            conn,
            (f"user-{i}" for i in range(100_000)),
            channel="email",
            template="price_alert",
            vars=PRICE_ALERT,
            batch_size=25_000,
            progress=progress.append,
        )
        statements = CountingCursor.statements
        conn.commit()
    assert result == outbox.CampaignResult(enqueued=100_000, batches=4)
    assert statements == 4
    assert progress == [25_000, 50_000, 75_000, 100_000]
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*), count(DISTINCT user_id), min(priority), max(priority),"
            " bool_and(lane = 'campaign') FROM outbox.message"
        ).fetchone()
    assert row == (100_000, 100_000, 100, 100, True)


def test_a_campaign_at_the_default_batch_size_sends_one_statement_per_1000_users(
    conn: psycopg.Connection,
) -> None:
    CountingCursor.statements = 0
    with psycopg.connect(conn.info.dsn, cursor_factory=CountingCursor) as counting:
        result = outbox.enqueue_campaign(
            counting,
            [f"u{i}" for i in range(2500)],
            channel="telegram",
            template="price_alert",
            vars=PRICE_ALERT,
        )
        assert CountingCursor.statements == 3
        counting.rollback()
    assert result.batches == 3 and result.enqueued == 2500


def test_a_campaign_with_per_user_vars_stores_each_users_vars(conn: psycopg.Connection) -> None:
    outbox.enqueue_campaign(
        conn,
        ["a", "b"],
        channel="push",
        template="price_alert",
        vars=lambda user: {**PRICE_ALERT, "instrument": f"{user.upper()}USD"},
    )
    rows = conn.execute(
        "SELECT user_id, vars->>'instrument' FROM outbox.message ORDER BY user_id"
    ).fetchall()
    assert rows == [("a", "AUSD"), ("b", "BUSD")]


def test_a_campaign_with_an_empty_user_id_writes_nothing_of_that_batch(
    conn: psycopg.Connection,
) -> None:
    with pytest.raises(outbox.InvalidMessage, match="user_id must not be empty"):
        outbox.enqueue_campaign(
            conn, ["a", ""], channel="email", template="price_alert", vars=PRICE_ALERT
        )
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)


def test_upsert_recipient_inserts_then_changes_only_given_fields(
    conn: psycopg.Connection,
) -> None:
    outbox.upsert_recipient(
        conn,
        "u1",
        email="trader@example.com",
        telegram_chat_id=123456789,
        phone="+4915112345678",
        timezone="Europe/Berlin",
        quiet_hours=(time(22), time(7)),
    )
    outbox.upsert_recipient(conn, "u1", disabled_channels=["push"], campaign_opt_out=True)
    addresses = conn.execute(
        "SELECT channel, address FROM outbox.recipient_address WHERE user_id = 'u1' ORDER BY 1"
    ).fetchall()
    assert addresses == [
        ("email", "trader@example.com"),
        ("sms", "+4915112345678"),
        ("telegram", "123456789"),
    ]
    row = conn.execute(
        "SELECT timezone, quiet_hours_start, quiet_hours_end,"
        " disabled_channels, campaign_opt_out FROM outbox.recipient WHERE user_id = 'u1'"
    ).fetchone()
    assert row == (
        "Europe/Berlin",
        time(22),
        time(7),
        ["push"],
        True,
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"email": "not-an-address"}, "not an address"),
        ({"email": "a@b.com\r\nBcc: evil@x.com"}, "not an address"),
        ({"telegram_chat_id": 2**64}, "64 bits"),
        ({"phone": "+49 151 1234567"}, "E.164"),
        ({"phone": "004915112345678"}, "E.164"),
        ({"phone": "+0123456789"}, "E.164"),
        ({"phone": "+1234567890123456"}, "E.164"),
        ({"timezone": "Mars/Olympus"}, "unknown timezone"),
        ({"disabled_channels": ["fax"]}, "unknown channel"),
    ],
)
def test_upsert_recipient_rejects_bad_input_clearly(
    conn: psycopg.Connection, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(outbox.InvalidMessage, match=message):
        outbox.upsert_recipient(conn, "u1", **kwargs)


def test_add_push_subscription_stores_and_moves_an_endpoint(conn: psycopg.Connection) -> None:
    info = {
        "endpoint": "https://fcm.googleapis.com/fcm/send/abc",
        "keys": {
            "p256dh": "BNcRdreALRFXTkOOUHK1EtK2wtaz5Ry4YfYCA_0QTpQ",
            "auth": "tBHItJI5svbpez7KI4CCXg",
        },
    }
    first = outbox.add_push_subscription(conn, "u1", info)
    second = outbox.add_push_subscription(conn, "u2", info)
    assert first == second
    rows = conn.execute("SELECT user_id, endpoint FROM outbox.push_subscription").fetchall()
    assert rows == [("u2", info["endpoint"])]


def test_add_push_subscription_refuses_a_plain_http_endpoint(conn: psycopg.Connection) -> None:
    with pytest.raises(outbox.InvalidMessage, match="https"):
        outbox.add_push_subscription(
            conn,
            "u1",
            {"endpoint": "http://169.254.169.254/", "keys": {"p256dh": "a", "auth": "b"}},
        )
