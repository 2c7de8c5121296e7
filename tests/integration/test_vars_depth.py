"""Deeply nested vars: one rule on every producer path, refused before anything recurses.

The vars object is level 1, every object or array inside adds one, scalars add
none: 32 levels are accepted, 33 refused with :class:`~outbox.InvalidMessage`,
and a 10,000-level document is refused the same way (not a ``RecursionError``),
with nothing written and the caller's transaction still usable.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

import outbox
from outbox import MAX_VARS_DEPTH, InvalidMessage

ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.085",
    "current_price": "1.086",
    "condition": "above",
}


def nested_vars(depth: int, *, leaf: Any = 1, kind: str = "list") -> dict[str, Any]:
    """Price-alert vars whose deepest branch nests exactly ``depth`` levels."""
    value: Any = leaf
    for _ in range(depth - 1):  # the vars object itself is the first level
        value = [value] if kind == "list" else {"k": value}
    return {**ALERT, "extra": value}


def messages(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM outbox.message").fetchone()
    assert row is not None
    return int(row[0])


def test_the_depth_limit_is_32_levels() -> None:
    assert MAX_VARS_DEPTH == 32
    assert not outbox.vars_depth_exceeds(nested_vars(32))
    assert outbox.vars_depth_exceeds(nested_vars(33))
    # an empty object or array is a level too; scalars are none
    assert not outbox.vars_depth_exceeds(nested_vars(31, leaf=[]))
    assert outbox.vars_depth_exceeds(nested_vars(32, leaf={}))
    assert not outbox.vars_depth_exceeds(nested_vars(32, leaf="[[[[deep-looking text]]]]"))


@pytest.mark.parametrize("kind", ["list", "dict"])
def test_enqueue_accepts_32_levels_and_refuses_33(conn: psycopg.Connection[Any], kind: str) -> None:
    accepted = outbox.enqueue(
        conn, user_id="u1", channel="email", template="price_alert", vars=nested_vars(32, kind=kind)
    )
    with pytest.raises(InvalidMessage, match="vars nest deeper than 32 levels"):
        outbox.enqueue(
            conn,
            user_id="u1",
            channel="email",
            template="price_alert",
            vars=nested_vars(33, kind=kind),
        )
    conn.commit()
    assert conn.execute("SELECT array_agg(id) FROM outbox.message").fetchone() == ([accepted],)


def test_a_10000_level_document_is_an_invalid_message_and_nothing_is_written(
    conn: psycopg.Connection[Any],
) -> None:
    with pytest.raises(InvalidMessage, match="vars nest deeper than 32 levels"):
        outbox.enqueue(
            conn,
            user_id="u1",
            channel="telegram",
            template="price_alert",
            vars=nested_vars(10_000),
        )
    # a cycle is infinitely deep: refused the same way, no hang, no RecursionError
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(InvalidMessage, match="deeper than 32"):
        outbox.enqueue(
            conn, user_id="u1", channel="email", template="price_alert", vars={**ALERT, "c": cyclic}
        )
    # nothing reached the database: the transaction goes on
    outbox.enqueue(conn, user_id="u1", channel="email", template="price_alert", vars=ALERT)
    conn.commit()
    assert messages(conn) == 1


async def test_enqueue_async_accepts_32_levels_and_refuses_33_and_10000(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as aconn:
        await outbox.enqueue_async(
            aconn, user_id="u1", channel="push", template="price_alert", vars=nested_vars(32)
        )
        for depth in (33, 10_000):
            with pytest.raises(InvalidMessage, match="vars nest deeper than 32 levels"):
                await outbox.enqueue_async(
                    aconn,
                    user_id="u1",
                    channel="push",
                    template="price_alert",
                    vars=nested_vars(depth),
                )
        await aconn.commit()
    with psycopg.connect(database_url) as conn:
        assert messages(conn) == 1


def test_a_campaign_accepts_32_levels_and_refuses_33_for_shared_and_per_user_vars(
    conn: psycopg.Connection[Any],
) -> None:
    users = ["u1", "u2", "u3"]
    result = outbox.enqueue_campaign(
        conn, users, channel="email", template="price_alert", vars=nested_vars(32)
    )
    assert result.enqueued == 3
    with pytest.raises(InvalidMessage, match="vars nest deeper than 32 levels"):
        outbox.enqueue_campaign(
            conn, users, channel="email", template="price_alert", vars=nested_vars(33)
        )
    with pytest.raises(InvalidMessage, match="vars nest deeper than 32 levels"):
        outbox.enqueue_campaign(
            conn,
            users,
            channel="email",
            template="price_alert",
            vars=lambda user: nested_vars(10_000 if user == "u2" else 2),
        )
    conn.commit()
    assert messages(conn) == 3
