"""A producer is a hostile caller: what it can send through SQL alone.

Each test logs in as real ``outbox_producer`` login roles (two distinct ones where
one producer attacks the other) and calls the SQL functions directly, as a producer
in another language would. Revision ``outbox_0006``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
from psycopg import errors

import outbox
from outbox import InvalidMessage
from outbox._enqueue import build_message

ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.085",
    "current_price": "1.086",
    "condition": "above",
}
ENQUEUE = "SELECT outbox.enqueue('email', 'price_alert', %(user)s, '{}', idempotency_key => %(key)s"
DEEP = 'strict $.**{32} ? (@.type() == "object" || @.type() == "array")'

Login = Callable[[], psycopg.Connection[Any]]


@pytest.fixture
def login_as(database_url: str, admin: psycopg.Connection[Any]) -> Iterator[Callable[[str], Login]]:
    """``login_as("outbox_producer")()`` connects as a new login role in that role."""
    created: list[str] = []
    parts = urlsplit(database_url)
    netloc = parts.netloc.split("@", 1)[-1]

    def make(group: str) -> Login:
        role = f"p_{uuid.uuid4().hex[:10]}"
        admin.execute(f"CREATE ROLE {role} LOGIN IN ROLE {group}")
        created.append(role)
        url = urlunsplit((parts.scheme, f"{role}@{netloc}", parts.path, parts.query, ""))
        return lambda: psycopg.connect(url, autocommit=True)

    try:
        yield make
    finally:
        for role in created:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                [role],
            )
            admin.execute(f"DROP ROLE {role}")


def message_count(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute("SELECT count(*) FROM outbox.message").fetchone()
    assert row is not None
    return int(row[0])


# ------------------------------------------------------------------ idempotency keys


def test_a_producer_cannot_squat_another_producers_key(
    login_as: Callable[[str], Login], admin: psycopg.Connection[Any]
) -> None:
    # The attacker guesses the victim's key scheme and uses the key first. Keys were
    # one namespace before outbox_0011: the victim's alert was then never written and
    # its enqueue returned the attacker's message id.
    producer_a, producer_b = login_as("outbox_producer"), login_as("outbox_producer")
    with producer_a() as victim, producer_b() as attacker:
        (squatted,) = (
            attacker.execute(ENQUEUE + ")", {"user": "x", "key": "sl-T-1"}).fetchone() or ()
        )
        (alert,) = (
            victim.execute(ENQUEUE + ")", {"user": "victim", "key": "sl-T-1"}).fetchone() or ()
        )
        assert alert != squatted
        # each producer's repeat still finds its own message, and writes nothing
        assert victim.execute(ENQUEUE + ")", {"user": "victim", "key": "sl-T-1"}).fetchone() == (
            alert,
        )
        assert attacker.execute(ENQUEUE + ")", {"user": "x", "key": "sl-T-1"}).fetchone() == (
            squatted,
        )
    assert admin.execute("SELECT id, user_id FROM outbox.message ORDER BY id").fetchall() == [
        (squatted, "x"),
        (alert, "victim"),
    ]
    keys = admin.execute(
        "SELECT k.message_id, r.rolname FROM outbox.idempotency_key k"
        " JOIN pg_roles r ON r.oid = k.producer ORDER BY k.message_id"
    ).fetchall()
    assert [message_id for message_id, _ in keys] == [squatted, alert]
    assert keys[0][1] != keys[1][1]


@pytest.mark.parametrize("window", ["-1 day", "0 seconds", "-1 second", "31 days"])
def test_a_window_out_of_range_is_refused_and_takes_over_nothing(
    login_as: Callable[[str], Login], admin: psycopg.Connection[Any], window: str
) -> None:
    with login_as("outbox_producer")() as a:
        (first,) = a.execute(ENQUEUE + ")", {"user": "victim", "key": "sl-T-1"}).fetchone() or ()
        with pytest.raises(errors.InvalidParameterValue, match=r"dedup_window .* between 1 second"):
            a.execute(
                ENQUEUE + ", dedup_window => %(window)s)",
                {"user": "other", "key": "sl-T-1", "window": window},
            )
        again = a.execute(ENQUEUE + ")", {"user": "victim", "key": "sl-T-1"}).fetchone()
    assert again == (first,)
    assert admin.execute("SELECT user_id FROM outbox.message").fetchall() == [("victim",)]
    assert admin.execute("SELECT message_id FROM outbox.idempotency_key").fetchall() == [(first,)]


def test_a_later_shorter_window_cannot_shorten_a_key_in_force(
    login_as: Callable[[str], Login], admin: psycopg.Connection[Any]
) -> None:
    with login_as("outbox_producer")() as a:
        (first,) = a.execute(ENQUEUE + ")", {"user": "victim", "key": "k"}).fetchone() or ()
        params = {"user": "other", "key": "k", "window": "1 second"}
        shorter = ENQUEUE + ", dedup_window => %(window)s)"
        assert a.execute(shorter, params).fetchone() == (first,)
        time.sleep(1.2)  # longer than the later call's window, far shorter than the key's
        assert a.execute(shorter, params).fetchone() == (first,)
        assert a.execute(ENQUEUE + ")", {"user": "victim", "key": "k"}).fetchone() == (first,)
    assert admin.execute("SELECT user_id FROM outbox.message").fetchall() == [("victim",)]
    (expires,) = (
        admin.execute("SELECT expires_at - created_at FROM outbox.idempotency_key").fetchone() or ()
    )
    assert expires == timedelta(hours=24)


def test_a_key_keeps_the_window_of_its_first_use_and_is_free_after_it(
    login_as: Callable[[str], Login],
) -> None:
    with login_as("outbox_producer")() as a:
        first = a.execute(
            ENQUEUE + ", dedup_window => '1 second')", {"user": "u1", "key": "short"}
        ).fetchone()
        # a longer window later does not lengthen it either
        again = a.execute(
            ENQUEUE + ", dedup_window => '30 days')", {"user": "u1", "key": "short"}
        ).fetchone()
        assert again == first
        time.sleep(1.2)
        later = a.execute(ENQUEUE + ")", {"user": "u1", "key": "short"}).fetchone()
    assert later != first


def test_a_null_window_means_the_default(conn: psycopg.Connection[Any]) -> None:
    conn.execute(ENQUEUE + ", dedup_window => NULL)", {"user": "u1", "key": "k"})
    row = conn.execute("SELECT expires_at - created_at FROM outbox.idempotency_key").fetchone()
    assert row == (timedelta(hours=24),)


@pytest.mark.parametrize(
    "window", [timedelta(0), timedelta(seconds=-1), timedelta(days=-1), timedelta(days=31), "1d"]
)
def test_the_python_api_refuses_the_same_windows(window: object) -> None:
    with pytest.raises(InvalidMessage, match="dedup_window"):
        build_message(
            user_id="u1", channel="email", template="price_alert", vars=ALERT, dedup_window=window
        )


# ------------------------------------------------------------------------------ vars


def test_compressed_vars_over_the_limit_are_refused_and_nothing_is_written(
    login_as: Callable[[str], Login], admin: psycopg.Connection[Any]
) -> None:
    with login_as("outbox_producer")() as producer:
        producer.execute(
            "CREATE TEMP TABLE bomb AS"
            " SELECT jsonb_build_object('x', repeat('a', 20 * 1024 * 1024)) AS v"
        )
        stored = producer.execute("SELECT pg_column_size(v) FROM bomb").fetchone()
        assert stored is not None and stored[0] < 262144  # compressed below the limit
        with pytest.raises(
            errors.ProgramLimitExceeded, match="20971529 bytes; the limit is 262144"
        ):
            producer.execute(
                "SELECT outbox.enqueue('email', 'price_alert', 'u1', (SELECT v FROM bomb))"
            )
        with pytest.raises(errors.ProgramLimitExceeded, match="the limit of 262144 bytes"):
            producer.execute(
                "SELECT outbox.enqueue_many('email', 'price_alert', ARRAY['u1', 'u2'],"
                " ARRAY[(SELECT v FROM bomb)])"
            )
        # compressed but within the limit: accepted
        producer.execute(
            "CREATE TEMP TABLE fine AS SELECT jsonb_build_object('x', repeat('a', 200 * 1024)) AS v"
        )
        producer.execute(
            "SELECT outbox.enqueue('email', 'price_alert', 'u3', (SELECT v FROM fine))"
        )
        producer.execute("DROP TABLE bomb, fine")  # a role that owns them cannot be dropped
    assert admin.execute("SELECT user_id FROM outbox.message").fetchall() == [("u3",)]


def nested(depth: int, *, leaf: str = "", arrays: bool = True) -> str:
    """A JSON object nested ``depth`` levels deep (the top-level object is level 1)."""
    if arrays:
        return '{"a":' + "[" * (depth - 1) + leaf + "]" * (depth - 1) + "}"
    return '{"":' * (depth - 1) + "{}" + "}" * (depth - 1)


@pytest.mark.parametrize(
    "document",
    [nested(32), nested(32, leaf="1"), nested(32, arrays=False), '{"a": [1, {"b": [2]}]}'],
    ids=["arrays", "arrays-and-a-scalar", "objects", "shallow"],
)
def test_vars_32_levels_deep_are_accepted(conn: psycopg.Connection[Any], document: str) -> None:
    conn.execute("SELECT outbox.enqueue('email', 'price_alert', 'u1', %s::jsonb)", [document])
    conn.execute(
        "SELECT outbox.enqueue_many('email', 'price_alert', ARRAY['u2'], ARRAY[%s::jsonb])",
        [document],
    )
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (2,)


@pytest.mark.parametrize(
    "document",
    [nested(33), nested(33, leaf="1"), nested(33, arrays=False), nested(10_000)],
    ids=["arrays", "arrays-and-a-scalar", "objects", "10000-levels"],
)
def test_vars_33_levels_deep_are_refused_by_both_functions(
    login_as: Callable[[str], Login], admin: psycopg.Connection[Any], document: str
) -> None:
    with login_as("outbox_producer")() as producer:
        for statement in (
            "SELECT outbox.enqueue('email', 'price_alert', 'u1', %s::jsonb)",
            "SELECT outbox.enqueue_many('email', 'price_alert', ARRAY['u1'], ARRAY[%s::jsonb])",
        ):
            with pytest.raises(psycopg.Error, match="nested more than 32 levels") as caught:
                producer.execute(statement, [document])
            assert caught.value.sqlstate == "54000"  # not 54001, a stack overflow
    assert message_count(admin) == 0


def test_no_document_under_256_bytes_can_be_33_levels_deep(conn: psycopg.Connection[Any]) -> None:
    # outbox.enqueue walks only vars of 256 bytes or more; the smallest 33-level
    # documents are larger than that
    for document in (nested(33), nested(33, arrays=False), '{"":' + "[" * 32 + "]" * 32 + "}"):
        row = conn.execute(
            "SELECT pg_column_size(%s::jsonb), jsonb_path_exists(%s::jsonb, %s)",
            [document, document, DEEP],
        ).fetchone()
        assert row is not None and row[1] is True and row[0] >= 256


# --------------------------------------------------------------------------- send_at


@pytest.mark.parametrize(
    "send_at", ["infinity", "-infinity", "now() + interval '366 days'", "'9999-12-31'"]
)
def test_send_at_that_is_not_finite_or_too_far_ahead_is_refused(
    login_as: Callable[[str], Login], admin: psycopg.Connection[Any], send_at: str
) -> None:
    value = f"'{send_at}'::timestamptz" if "infinity" in send_at else f"({send_at})::timestamptz"
    with login_as("outbox_producer")() as producer:
        for statement in (
            f"SELECT outbox.enqueue('email', 'price_alert', 'u1', '{{}}', send_at => {value})",
            "SELECT outbox.enqueue_many('email', 'price_alert', ARRAY['u1'], ARRAY['{}'::jsonb],"
            f" send_at => {value})",
        ):
            with pytest.raises(errors.InvalidParameterValue, match="at most 365 days ahead"):
                producer.execute(statement)
    assert message_count(admin) == 0


def test_send_at_within_a_year_or_in_the_past_is_accepted(conn: psycopg.Connection[Any]) -> None:
    for value in ("now() + interval '364 days'", "'2001-01-01'::timestamptz"):
        conn.execute(
            f"SELECT outbox.enqueue('email', 'price_alert', 'u1', '{{}}', send_at => {value})"
        )
    rows = conn.execute(
        "SELECT next_attempt_at > now() + interval '363 days' FROM outbox.message ORDER BY id"
    ).fetchall()
    assert rows == [(True,), (False,)]  # the past means now


@pytest.mark.parametrize(
    "send_at",
    [
        datetime.now(UTC) + timedelta(days=366),
        datetime.max.replace(tzinfo=UTC),
        datetime.max.replace(tzinfo=timezone(timedelta(hours=-12))),
    ],
    ids=["366-days", "max", "max-west"],
)
def test_the_python_api_refuses_send_at_more_than_a_year_ahead(
    conn: psycopg.Connection[Any], send_at: datetime
) -> None:
    with pytest.raises(InvalidMessage, match="more than 365 days ahead"):
        outbox.enqueue(
            conn, user_id="u1", channel="email", template="price_alert", vars=ALERT, send_at=send_at
        )
    with pytest.raises(InvalidMessage, match="more than 365 days ahead"):
        outbox.enqueue_campaign(
            conn, ["u1"], channel="email", template="price_alert", vars=ALERT, send_at=send_at
        )
    soon = datetime.now(UTC) + timedelta(days=364)
    outbox.enqueue(
        conn, user_id="u1", channel="email", template="price_alert", vars=ALERT, send_at=soon
    )
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (1,)


# ------------------------------------------------------------- the short way (0012)

# Since outbox_0013 a call without options is checked by one expression and takes a
# short way; anything else takes the long way, one rule after the other. A send_at in
# the past changes nothing about the message (it is due now) but takes the long way:
# both ways must accept and refuse the same calls, with the same error.
BOTH_WAYS = """SELECT outbox.enqueue(channel => %(channel)s, template => %(template)s,
    user_id => %(user_id)s, vars => %(vars)s::jsonb, lane => %(lane)s,
    priority => %(priority)s::smallint, dedup_window => %(window)s::interval{extra})"""
LONG_WAY = ", send_at => now() - interval '1 second'"
VALID = {
    "channel": "push",
    "template": "price_alert",
    "user_id": "u1",
    "vars": '{"a": "b"}',
    "lane": "transactional",
    "priority": None,
    "window": "24 hours",
}
EDGES: list[dict[str, Any]] = [
    {},
    {"channel": "sms"},
    {"channel": "nope"},
    {"channel": "PUSH"},
    {"channel": None},
    {"channel": ""},
    {"template": "a" * 100},
    {"template": "a" * 101},
    {"template": "Price_alert"},
    {"template": ""},
    {"template": None},
    {"user_id": "x" * 255},
    {"user_id": "x" * 256},
    {"user_id": ""},
    {"user_id": None},
    {"vars": None},
    {"vars": "{}"},
    {"vars": "[]"},
    {"vars": '"text"'},
    {"vars": "null"},
    {"vars": "1"},
    *({"vars": '{"k": "' + "x" * n + '"}'} for n in (230, 238, 242, 246, 250, 300)),
    {"vars": nested(32)},
    {"vars": nested(33)},
    {"lane": "campaign"},
    {"lane": "bogus"},
    {"lane": None},
    *({"priority": p} for p in (-1, 0, 99, 100)),
    *({"lane": "campaign", "priority": p} for p in (99, 100, 199, 200)),
    *({"window": w} for w in ("0 seconds", "1 second", "30 days", "31 days", "-1 day", None)),
]


def outcome(producer: psycopg.Connection[Any], call: dict[str, Any], extra: str) -> object:
    """What one call did: wrote a row, or raised an error (its code and message)."""
    try:
        row = producer.execute(BOTH_WAYS.format(extra=extra), {**VALID, **call}).fetchone()
    except psycopg.Error as error:
        return (error.sqlstate, str(error).splitlines()[0])
    assert row is not None and row[0] is not None
    return ("written", None)


def test_the_short_and_the_long_way_accept_and_refuse_the_same_calls(
    login_as: Callable[[str], Login], admin: psycopg.Connection[Any]
) -> None:
    refused = 0
    with login_as("outbox_producer")() as producer:
        for call in EDGES:
            short, long = outcome(producer, call, ""), outcome(producer, call, LONG_WAY)
            assert short == long, call
            refused += short[0] != "written"  # type: ignore[index]
    # the edges are edges: some on each side
    assert 0 < refused < len(EDGES)
    rows = admin.execute(
        "SELECT lane, priority, channel, user_id, template, vars, fallback, status, attempts,"
        " idempotency_key, expires_at, collapse_key, escalate_after, enqueued_by,"
        " next_attempt_at - created_at < interval '1 second'"
        "  FROM outbox.message ORDER BY id"
    ).fetchall()
    # the two ways wrote the same rows, one after the other
    assert len(rows) == 2 * (len(EDGES) - refused)
    assert rows[0::2] == rows[1::2]
    assert all(row[-1] for row in rows)
