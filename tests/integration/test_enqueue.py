"""The producer contract on every connection kind: rollback means no message."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import psycopg.types.json
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import outbox
from outbox._migrate import sqlalchemy_url

PRICE_ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.0850",
    "current_price": "1.0851",
    "condition": "above",
}


def count_messages(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM outbox.message").fetchone()
        assert row is not None
        return int(row[0])


Runner = Callable[[str, Callable[[Any], Any], bool], Any]
"""run(url, body, commit): open the connection kind, call body(conn) inside a
transaction, then commit or roll back; returns body's result."""


def _psycopg_sync(url: str, body: Callable[[Any], Any], commit: bool) -> Any:
    with psycopg.connect(url) as conn:
        result = body(conn)
        conn.commit() if commit else conn.rollback()
        return result


def _psycopg_async(url: str, body: Callable[[Any], Any], commit: bool) -> Any:
    async def run() -> Any:
        async with await psycopg.AsyncConnection.connect(url) as conn:
            result = await body(conn)
            await (conn.commit() if commit else conn.rollback())
            return result

    return asyncio.run(run())


def _sa_session(url: str, body: Callable[[Any], Any], commit: bool) -> Any:
    engine = create_engine(sqlalchemy_url(url))
    try:
        with Session(engine) as session:
            result = body(session)
            session.commit() if commit else session.rollback()
            return result
    finally:
        engine.dispose()


def _sa_connection(url: str, body: Callable[[Any], Any], commit: bool) -> Any:
    engine = create_engine(sqlalchemy_url(url))
    try:
        with engine.connect() as connection:
            result = body(connection)
            connection.commit() if commit else connection.rollback()
            return result
    finally:
        engine.dispose()


def _sa_async_session(url: str, body: Callable[[Any], Any], commit: bool) -> Any:
    async def run() -> Any:
        engine = create_async_engine(sqlalchemy_url(url))
        try:
            async with AsyncSession(engine) as session:
                result = await body(session)
                await (session.commit() if commit else session.rollback())
                return result
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _sa_async_connection(url: str, body: Callable[[Any], Any], commit: bool) -> Any:
    async def run() -> Any:
        engine = create_async_engine(sqlalchemy_url(url))
        try:
            async with engine.connect() as connection:
                result = await body(connection)
                await (connection.commit() if commit else connection.rollback())
                return result
        finally:
            await engine.dispose()

    return asyncio.run(run())


KINDS: dict[str, tuple[Runner, bool]] = {
    "psycopg.Connection": (_psycopg_sync, False),
    "psycopg.AsyncConnection": (_psycopg_async, True),
    "sqlalchemy.Session": (_sa_session, False),
    "sqlalchemy.Connection": (_sa_connection, False),
    "sqlalchemy.AsyncSession": (_sa_async_session, True),
    "sqlalchemy.AsyncConnection": (_sa_async_connection, True),
}


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> Iterator[tuple[Runner, bool]]:
    yield KINDS[request.param]


def _enqueue_body(is_async: bool, **kwargs: Any) -> Callable[[Any], Any]:
    args = {"user_id": "u1", "channel": "email", "template": "price_alert", "vars": PRICE_ALERT}
    args.update(kwargs)
    if is_async:
        return lambda conn: outbox.enqueue_async(conn, **args)
    return lambda conn: outbox.enqueue(conn, **args)


def test_enqueue_then_rollback_leaves_no_row(database_url: str, kind: tuple[Runner, bool]) -> None:
    run, is_async = kind
    message_id = run(database_url, _enqueue_body(is_async), False)
    assert isinstance(message_id, int)
    assert count_messages(database_url) == 0


def test_enqueue_then_commit_leaves_exactly_one_row(
    database_url: str, kind: tuple[Runner, bool]
) -> None:
    run, is_async = kind
    message_id = run(database_url, _enqueue_body(is_async), True)
    with psycopg.connect(database_url, autocommit=True) as c:
        rows = c.execute(
            "SELECT id, channel, template, user_id, lane, priority, status, vars"
            " FROM outbox.message"
        ).fetchall()
    assert rows == [
        (message_id, "email", "price_alert", "u1", "transactional", 0, "pending", PRICE_ALERT)
    ]


def test_invalid_enqueue_leaves_the_transaction_usable_and_writes_nothing(
    database_url: str, kind: tuple[Runner, bool]
) -> None:
    run, is_async = kind
    bad = _enqueue_body(is_async, channel="fax")
    good = _enqueue_body(is_async)

    if is_async:

        async def body(conn: Any) -> Any:
            with pytest.raises(outbox.InvalidMessage, match="unknown channel 'fax'"):
                await bad(conn)
            return await good(conn)

    else:

        def body(conn: Any) -> Any:
            with pytest.raises(outbox.InvalidMessage, match="unknown channel 'fax'"):
                bad(conn)
            return good(conn)

    run(database_url, body, True)
    assert count_messages(database_url) == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"channel": "fax"}, "unknown channel"),
        ({"lane": "urgent"}, "unknown lane"),
        ({"user_id": ""}, "user_id must not be empty"),
        ({"user_id": 42}, "user_id must be a string"),
        ({"user_id": "x" * 10_000}, "the limit is 255"),
        ({"vars": {**PRICE_ALERT, "when": datetime.now(UTC)}}, "not JSON-serialisable"),
        ({"vars": {**PRICE_ALERT, "bad": float("nan")}}, "not JSON-serialisable"),
        ({"vars": {**PRICE_ALERT, "nul": "a\x00b"}}, "NUL"),
        ({"vars": {**PRICE_ALERT, "surrogate": "\ud800"}}, "invalid Unicode"),
        ({"vars": {**PRICE_ALERT, "big": "x" * 300_000}}, "the limit is"),
        ({"vars": ["not", "a", "mapping"]}, "vars must be a mapping"),
        ({"template": "../etc/passwd"}, "template name"),
        ({"send_at": datetime(2030, 1, 1)}, "timezone-aware"),
        ({"priority": 150}, "outside the transactional lane"),
        ({"fallback": ["email"]}, "must not repeat"),
        ({"fallback": ["pigeon"]}, "unknown channel"),
        ({"idempotency_key": ""}, "idempotency_key must not be empty"),
    ],
)
def test_invalid_arguments_raise_a_clear_outbox_error_before_writing(
    conn: psycopg.Connection, changes: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {
        "user_id": "u1",
        "channel": "email",
        "template": "price_alert",
        "vars": PRICE_ALERT,
    }
    args.update(changes)
    with pytest.raises(outbox.InvalidMessage, match=message):
        outbox.enqueue(conn, **args)
    row = conn.execute("SELECT count(*) FROM outbox.message").fetchone()
    assert row == (0,)


def test_same_idempotency_key_twice_gives_one_row_and_the_same_id(
    conn: psycopg.Connection,
) -> None:
    first = outbox.enqueue(
        conn,
        user_id="u1",
        channel="email",
        template="price_alert",
        vars=PRICE_ALERT,
        idempotency_key="order-17-rejected",
    )
    second = outbox.enqueue(
        conn,
        user_id="u1",
        channel="email",
        template="price_alert",
        vars=PRICE_ALERT,
        idempotency_key="order-17-rejected",
    )
    assert first == second
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (1,)


def test_idempotency_key_still_dedupes_after_the_message_was_delivered(
    database_url: str,
) -> None:
    args: dict[str, Any] = {
        "user_id": "u1",
        "channel": "email",
        "template": "price_alert",
        "vars": PRICE_ALERT,
        "idempotency_key": "fill-99",
    }
    with psycopg.connect(database_url) as conn:
        first = outbox.enqueue(conn, **args)
        conn.commit()
        # delivery deletes the row from the hot table
        conn.execute("DELETE FROM outbox.message WHERE id = %s", [first])
        conn.commit()
        again = outbox.enqueue(conn, **args)
        conn.commit()
    assert again == first
    assert count_messages(database_url) == 0


def test_idempotency_key_is_reusable_after_the_window(conn: psycopg.Connection) -> None:
    args: dict[str, Any] = {
        "user_id": "u1",
        "channel": "email",
        "template": "price_alert",
        "vars": PRICE_ALERT,
        "idempotency_key": "daily-digest",
    }
    first = outbox.enqueue(conn, **args)
    conn.execute(
        "UPDATE outbox.idempotency_key"
        " SET created_at = now() - interval '25 hours', expires_at = now() - interval '1 hour'"
    )
    second = outbox.enqueue(conn, **args)
    assert second != first
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (2,)


def test_concurrent_enqueues_with_one_key_write_one_message(database_url: str) -> None:
    args: dict[str, Any] = {
        "user_id": "u1",
        "channel": "email",
        "template": "price_alert",
        "vars": PRICE_ALERT,
        "idempotency_key": "race",
    }
    with psycopg.connect(database_url) as a, psycopg.connect(database_url) as b:
        first = outbox.enqueue(a, **args)
        import threading

        result: list[int] = []
        blocked = threading.Thread(target=lambda: result.append(outbox.enqueue(b, **args)))
        blocked.start()
        blocked.join(0.5)
        assert blocked.is_alive(), "the second enqueue should wait for the first commit"
        a.commit()
        blocked.join(10)
        b.commit()
    assert result == [first]
    assert count_messages(database_url) == 1


def test_the_sql_function_works_from_plain_sql(conn: psycopg.Connection) -> None:
    row = conn.execute("SELECT outbox.enqueue('email','price_alert','u1','{}')").fetchone()
    assert row is not None and isinstance(row[0], int)
    named = conn.execute(
        "SELECT outbox.enqueue('telegram', 'price_alert', 'u2', '{\"instrument\": \"XAUUSD\"}',"
        " lane => 'campaign', send_at => now() + interval '1 hour')"
    ).fetchone()
    assert named is not None
    rows = conn.execute(
        "SELECT channel, lane, priority, next_attempt_at > now() + interval '59 minutes'"
        " FROM outbox.message ORDER BY id"
    ).fetchall()
    assert rows == [("email", "transactional", 0, False), ("telegram", "campaign", 100, True)]


def test_the_sql_function_rejects_an_unknown_channel(conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="unknown channel"):
        conn.execute("SELECT outbox.enqueue('fax','price_alert','u1','{}')")


def test_the_sql_functions_refuse_vars_over_256_kib_and_write_nothing(
    conn: psycopg.Connection,
) -> None:
    """The Python API's size limit holds for producers that call SQL directly too."""
    big = psycopg.types.json.Jsonb({"note": "x" * (300 * 1024)})
    small = psycopg.types.json.Jsonb({"note": "x" * 1024})
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="the limit is 262144"):
        conn.execute("SELECT outbox.enqueue('email', 'price_alert', 'u1', %s)", [big])
    conn.rollback()
    with pytest.raises(psycopg.errors.ProgramLimitExceeded, match="over the limit"):
        conn.execute(
            "SELECT outbox.enqueue_many('email', 'price_alert', ARRAY['u1', 'u2'], "
            "ARRAY[%s, %s]::jsonb[])",
            [small, big],
        )
    conn.rollback()
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)
    # just under the limit still goes in
    conn.execute("SELECT outbox.enqueue('email', 'price_alert', 'u1', %s)", [small])
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (1,)


def test_send_at_in_the_future_delays_the_message(conn: psycopg.Connection) -> None:
    later = datetime.now(UTC) + timedelta(hours=2)
    outbox.enqueue(
        conn,
        user_id="u1",
        channel="push",
        template="price_alert",
        vars=PRICE_ALERT,
        send_at=later,
        lane="campaign",
        priority=150,
        fallback=["email"],
    )
    row = conn.execute(
        "SELECT next_attempt_at, lane, priority, fallback FROM outbox.message"
    ).fetchone()
    assert row is not None
    assert abs((row[0] - later).total_seconds()) < 0.01
    assert row[1:] == ("campaign", 150, ["email"])


def test_enqueue_does_not_flush_a_sqlalchemy_session(database_url: str) -> None:
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with Session(engine) as session:
            session.execute(text("CREATE TEMP TABLE t (x int)"))
            flushed: list[bool] = []
            from sqlalchemy import event

            event.listen(session, "before_flush", lambda *a: flushed.append(True))
            outbox.enqueue(
                session,
                user_id="u1",
                channel="email",
                template="price_alert",
                vars=PRICE_ALERT,
            )
            assert flushed == []
            assert session.in_transaction()
            session.rollback()
    finally:
        engine.dispose()
    assert count_messages(database_url) == 0


def test_enqueue_wakes_the_freshest_sleeper_and_bulk_writes_wake_all(
    database_url: str, admin: psycopg.Connection
) -> None:
    """One message, one claim: the NOTIFY names one sleeping dispatcher (the one that
    registered or renewed last); a bulk write wakes every sleeper (empty payload);
    with nobody asleep, producers send no NOTIFY at all."""
    alert = psycopg.types.json.Jsonb(PRICE_ALERT)
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN outbox_wakeup")

        def payloads() -> list[str]:
            return [n.payload for n in listener.notifies(timeout=0.5)]

        admin.execute("SELECT outbox.enqueue('email', 'price_alert', 'u1', %s)", [alert])
        assert payloads() == []

        admin.execute(
            "INSERT INTO outbox.sleeper (dispatcher_id, since) VALUES"
            " ('host-a:1', now() - interval '8 seconds'),"
            " ('host-b:2', now() - interval '1 second'),"
            " ('host-c:3', now() - interval '5 seconds')"
        )
        admin.execute("SELECT outbox.enqueue('email', 'price_alert', 'u1', %s)", [alert])
        assert payloads() == ["host-b:2"]

        with psycopg.connect(database_url) as producer:  # a transaction of three alerts
            for user in ("u1", "u2", "u3"):
                outbox.enqueue(
                    producer,
                    channel="email",
                    template="price_alert",
                    user_id=user,
                    vars=PRICE_ALERT,
                )
            producer.commit()
        assert payloads() == ["host-b:2"]  # NOTIFY folds identical payloads in one commit

        later = datetime.now(UTC) + timedelta(hours=1)
        admin.execute(
            "SELECT outbox.enqueue('email', 'price_alert', 'u1', %s, send_at => %s)",
            [alert, later],
        )
        assert payloads() == []  # not due: nobody needs waking

        admin.execute(
            "SELECT outbox.enqueue_many('email', 'price_alert', ARRAY['u1', 'u2'], ARRAY[%s])",
            [alert],
        )
        assert payloads() == [""]
        admin.execute(
            "UPDATE outbox.message SET status = 'dead', dead_at = now() WHERE user_id = 'u2'"
        )
        admin.execute("SELECT outbox.retry_dead()")
        assert payloads() == [""]


def test_cancel_status_acknowledge_and_preferences_on_every_connection_kind(
    database_url: str, kind: tuple[Runner, bool]
) -> None:
    """The second wave's calls run in the caller's transaction on all six kinds."""
    run, is_async = kind
    with psycopg.connect(database_url, autocommit=True) as admin:
        pending = outbox.enqueue(
            admin, user_id="u1", channel="email", template="price_alert", vars=PRICE_ALERT
        )
        waiting = outbox.enqueue(
            admin,
            user_id="u1",
            channel="email",
            template="price_alert",
            vars=PRICE_ALERT,
            escalate_after=60,
        )
        admin.execute(
            "UPDATE outbox.message SET status = 'awaiting_ack', sent_at = now() WHERE id = %s",
            [waiting],
        )

    async def async_body(conn: Any) -> Any:
        status = await outbox.message_status_async(conn, pending)
        await outbox.set_preference_async(conn, "u1", topic="price_alert", channels=["push"])
        return (
            status.state if status else None,
            await outbox.cancel_async(conn, pending),
            await outbox.acknowledge_async(conn, waiting),
        )

    def sync_body(conn: Any) -> Any:
        status = outbox.message_status(conn, pending)
        outbox.set_preference(conn, "u1", topic="price_alert", channels=["push"])
        return (
            status.state if status else None,
            outbox.cancel(conn, pending),
            outbox.acknowledge(conn, waiting),
        )

    body = async_body if is_async else sync_body
    assert run(database_url, body, False) == ("pending", True, True)
    with psycopg.connect(database_url) as check:  # rolled back: nothing changed
        assert check.execute("SELECT count(*) FROM outbox.message").fetchone() == (2,)
        assert check.execute("SELECT count(*) FROM outbox.preference").fetchone() == (0,)
    assert run(database_url, body, True) == ("pending", True, True)
    with psycopg.connect(database_url) as check:
        assert check.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)
        assert check.execute("SELECT channels FROM outbox.preference").fetchone() == (["push"],)
        states = {
            i: outbox.message_status(check, i).state  # type: ignore[union-attr]
            for i in (pending, waiting)
        }
    assert states == {pending: "cancelled", waiting: "acknowledged"}


def test_set_address_and_upsert_recipient_with_a_phone_on_every_connection_kind(
    database_url: str, kind: tuple[Runner, bool]
) -> None:
    """One SQL text, six connection kinds, the caller's transaction (rolled back: no
    row; committed: the rows)."""
    run, is_async = kind

    def body(conn: Any) -> Any:
        if is_async:

            async def both() -> None:
                await outbox.upsert_recipient_async(conn, "u1", phone="+4915112345678")
                await outbox.set_address_async(conn, "u1", "email", "u1@example.com")

            return both()
        outbox.upsert_recipient(conn, "u1", phone="+4915112345678")
        outbox.set_address(conn, "u1", "email", "u1@example.com")
        return None

    def stored() -> list[tuple[Any, ...]]:
        with psycopg.connect(database_url, autocommit=True) as c:
            return c.execute(
                "SELECT user_id, channel, address FROM outbox.recipient_address ORDER BY 2"
            ).fetchall()

    run(database_url, body, False)
    assert stored() == []
    run(database_url, body, True)
    assert stored() == [("u1", "email", "u1@example.com"), ("u1", "sms", "+4915112345678")]
