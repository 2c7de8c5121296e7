"""Channels are data (outbox_0010): outbox.channel, outbox.recipient_address, and the
SQL the delivery webhooks call, against a real PostgreSQL and hostile callers."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import errors

import outbox
from tests.support.roles import login_role


def addresses(admin: psycopg.Connection[Any], user: str = "u1") -> list[tuple[Any, ...]]:
    return admin.execute(
        "SELECT channel, address, undeliverable_since IS NOT NULL, disabled_since IS NOT NULL"
        " FROM outbox.recipient_address WHERE user_id = %s ORDER BY channel",
        [user],
    ).fetchall()


# ------------------------------------------------------------------ the channel list


def test_the_built_in_channels_are_seeded_and_a_plugin_registers_its_own(
    admin: psycopg.Connection[Any],
) -> None:
    assert [(c.name, c.builtin) for c in outbox.list_channels(admin)] == [
        ("email", True),
        ("inapp", True),
        ("push", True),
        ("sms", True),
        ("telegram", True),
    ]
    assert outbox.register_channel(admin, "slack") is True
    assert outbox.register_channel(admin, "slack") is False  # idempotent
    assert [c.name for c in outbox.list_channels(admin) if not c.builtin] == ["slack"]


@pytest.mark.parametrize(
    "name", ["Slack", "1slack", "", "a" * 33, "sl ack", "slack;drop", "telegram_chat"]
)
def test_register_channel_refuses_a_name_that_cannot_be_a_channel(
    admin: psycopg.Connection[Any], name: str
) -> None:
    with pytest.raises(errors.InvalidParameterValue):
        admin.execute("SELECT outbox.register_channel(%s)", [name])
    assert admin.execute("SELECT count(*) FROM outbox.channel").fetchone() == (5,)


def test_only_operators_register_channels(
    admin: psycopg.Connection[Any], database_url: str
) -> None:
    for group in ("outbox_producer", "outbox_recipient_writer", "outbox_dispatcher"):
        with (
            login_role(admin, database_url, group) as url,
            psycopg.connect(url, autocommit=True) as other,
            pytest.raises(errors.InsufficientPrivilege),
        ):
            other.execute("SELECT outbox.register_channel('evil')")
    with (
        login_role(admin, database_url, "outbox_operator") as url,
        psycopg.connect(url, autocommit=True) as oncall,
    ):
        assert outbox.register_channel(oncall, "slack") is True


def test_enqueue_checks_channels_against_the_table_not_a_list(
    admin: psycopg.Connection[Any],
) -> None:
    for statement in (
        "SELECT outbox.enqueue('slack', 'price_alert', 'u1', '{}')",
        "SELECT outbox.enqueue_many('slack', 'price_alert', '{u1}', ARRAY['{}'::jsonb])",
        "SELECT outbox.set_preference('u1', 'price_alert', '{slack}')",
    ):
        with pytest.raises(errors.InvalidParameterValue, match="unknown channel"):
            admin.execute(statement)
    with pytest.raises(errors.CheckViolation, match="unknown channel"):
        admin.execute(
            "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}', fallback => '{slack}')"
        )
    with pytest.raises(errors.CheckViolation, match="unknown channel"):
        admin.execute("INSERT INTO outbox.recipient (user_id, fallback_order) VALUES ('u', '{x}')")
    with pytest.raises(errors.CheckViolation, match="unknown channel"):
        admin.execute(
            "INSERT INTO outbox.recipient (user_id, disabled_channels) VALUES ('u', '{x}')"
        )
    with pytest.raises(errors.ForeignKeyViolation):
        admin.execute("INSERT INTO outbox.channel_state (channel) VALUES ('slack')")

    outbox.register_channel(admin, "slack")
    admin.execute("SELECT outbox.enqueue('slack', 'price_alert', 'u1', '{}')")
    admin.execute(
        "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}', fallback => '{slack}')"
    )
    admin.execute("SELECT outbox.enqueue_many('slack', 'price_alert', '{u1}', ARRAY['{}'::jsonb])")
    admin.execute("SELECT outbox.set_preference('u1', 'price_alert', '{slack,email}')")
    outbox.upsert_recipient(admin, "u1", disabled_channels=["slack"], fallback_order=["slack"])
    admin.execute("INSERT INTO outbox.channel_state (channel) VALUES ('slack')")
    assert admin.execute(
        "SELECT count(*) FROM outbox.message WHERE channel = 'slack'"
    ).fetchone() == (2,)


# ------------------------------------------------------------------------ addresses


def test_set_address_sets_replaces_and_removes_any_channels_address(
    admin: psycopg.Connection[Any],
) -> None:
    outbox.register_channel(admin, "slack")
    outbox.set_address(admin, "u1", "slack", "U024BE7LH")  # creates the recipient
    outbox.set_address(admin, "u1", "sms", "+4915112345678")
    outbox.set_address(admin, "u1", "email", "u1@example.com")
    outbox.set_address(admin, "u1", "telegram", "-1001234567890")
    assert addresses(admin) == [
        ("email", "u1@example.com", False, False),
        ("slack", "U024BE7LH", False, False),
        ("sms", "+4915112345678", False, False),
        ("telegram", "-1001234567890", False, False),
    ]
    admin.execute(
        "UPDATE outbox.recipient_address SET undeliverable_since = now(), disabled_since = now()"
    )
    # the same address again keeps what the provider said; a new one starts clean
    outbox.set_address(admin, "u1", "sms", "+4915112345678")
    outbox.set_address(admin, "u1", "email", "new@example.com")
    assert addresses(admin)[0] == ("email", "new@example.com", False, False)
    assert addresses(admin)[2] == ("sms", "+4915112345678", True, True)
    outbox.set_address(admin, "u1", "slack", None)
    assert [row[0] for row in addresses(admin)] == ["email", "sms", "telegram"]


@pytest.mark.parametrize(
    ("channel", "address", "message"),
    [
        ("fax", "123", "unknown channel"),
        ("sms", "+49 151 1234567", "E.164"),
        ("sms", "015112345678", "E.164"),
        ("email", "a@example.com\r\nBcc: b@example.com", "control character"),
        ("email", "not-an-address", "not an address"),
        ("telegram", "12a", "chat id"),
        ("telegram", str(2**63), "chat id"),
        ("push", "https://push.example/x", "takes no address"),
        ("inapp", "x", "takes no address"),
        ("slack", "x" * 1025, "the limit is 1024"),
        ("slack", "line\nbreak", "control character"),
    ],
)
def test_set_address_refuses_bad_input_clearly_and_writes_nothing(
    admin: psycopg.Connection[Any], channel: str, address: str, message: str
) -> None:
    outbox.register_channel(admin, "slack")
    with pytest.raises(outbox.InvalidMessage, match=message):
        outbox.set_address(admin, "u1", channel, address)
    assert addresses(admin) == []


def test_the_sql_function_checks_what_the_python_one_checks(
    admin: psycopg.Connection[Any],
) -> None:
    """A producer in another language calls the SQL directly."""
    for channel, address in (
        ("fax", "1"),
        ("sms", "+49 151"),
        ("email", "a@b\nc"),
        ("telegram", "0042"),
        ("push", "x"),
        ("slack", "x"),  # not registered
    ):
        with pytest.raises(errors.InvalidParameterValue):
            admin.execute("SELECT outbox.set_address('u1', %s, %s)", [channel, address])
    with pytest.raises(errors.InvalidParameterValue):
        admin.execute("SELECT outbox.set_address(%s, 'sms', '+4915112345678')", ["u" * 256])
    assert addresses(admin) == []


async def test_set_address_async_on_the_callers_transaction(database_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await outbox.set_address_async(conn, "u1", "sms", "+14155550100")
        await conn.rollback()  # nothing committed: nothing kept
        await outbox.set_address_async(conn, "u2", "sms", "+14155550100")
        await conn.commit()
        cursor = await conn.execute("SELECT user_id FROM outbox.recipient_address")
        assert await cursor.fetchall() == [("u2",)]


# ----------------------------------------------------------- delivery reports (webhooks)


def sent_attempt(admin: psycopg.Connection[Any], provider_id: str, channel: str = "sms") -> int:
    """A message sent on ``channel`` whose provider id is ``provider_id`` (what the
    dispatcher's finish_sent logs)."""
    outbox.set_address(admin, "u1", "sms", "+4915112345678")
    outbox.set_address(admin, "u1", "email", "u1@example.com")
    [(message_id,)] = admin.execute(
        "SELECT outbox.enqueue(%s, 'price_alert', 'u1', '{}')", [channel]
    ).fetchall()
    admin.execute("DELETE FROM outbox.message WHERE id = %s", [message_id])
    admin.execute(
        "INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,"
        " outcome, provider_id) VALUES (%s, 'transactional', %s, 'u1', 'price_alert', 1,"
        " 'sent', %s)",
        [message_id, channel, provider_id],
    )
    return int(message_id)


def report(
    conn: psycopg.Connection[Any],
    provider_id: str,
    delivered: bool,
    code: str | None = None,
    permanent: bool = False,
    channel: str = "sms",
) -> Any:
    row = conn.execute(
        "SELECT outbox.record_delivery_report(%s, %s, %s, %s, %s)",
        [channel, provider_id, delivered, code, permanent],
    ).fetchone()
    assert row is not None
    return row[0]


def outcomes(admin: psycopg.Connection[Any], message_id: int) -> list[tuple[Any, ...]]:
    return admin.execute(
        "SELECT outcome, error_class, error, provider_id, attempt FROM outbox.attempt"
        " WHERE message_id = %s ORDER BY id",
        [message_id],
    ).fetchall()


def test_a_delivery_report_is_logged_once_however_often_it_comes(
    admin: psycopg.Connection[Any], database_url: str
) -> None:
    sid = "SM" + "a" * 32
    message_id = sent_attempt(admin, sid)
    with (
        login_role(admin, database_url, "outbox_dispatcher") as url,  # the API's role
        psycopg.connect(url, autocommit=True) as api,
    ):
        assert report(api, sid, True) == message_id
        assert report(api, sid, True) == message_id  # Twilio retried its callback
        assert report(api, "SM" + "b" * 32, True) is None  # not ours
        assert report(api, sid, True, channel="email") is None  # another channel's id
    assert outcomes(admin, message_id) == [
        ("sent", None, None, sid, 1),
        ("delivered", None, None, sid, 1),
    ]
    assert addresses(admin)[1] == ("sms", "+4915112345678", False, False)


def test_a_permanent_failure_report_marks_the_users_address_undeliverable(
    admin: psycopg.Connection[Any],
) -> None:
    message_id = sent_attempt(admin, "SM1")
    other = sent_attempt(admin, "SM2")
    assert report(admin, "SM1", False, "30003", permanent=False) == message_id
    assert addresses(admin)[1] == ("sms", "+4915112345678", False, False)  # transient
    assert report(admin, "SM2", False, "30005", permanent=True) == other
    assert report(admin, "SM2", False, "30005", permanent=True) == other
    assert outcomes(admin, message_id)[1:] == [
        ("undelivered", "undelivered", "provider error 30003", "SM1", 1)
    ]
    assert outcomes(admin, other)[1:] == [
        ("undelivered", "undeliverable", "provider error 30005", "SM2", 1)
    ]
    assert addresses(admin) == [
        ("email", "u1@example.com", False, False),  # only that channel's address
        ("sms", "+4915112345678", True, False),
    ]
    # a report can be read by the message's status like any attempt
    states = admin.execute("SELECT outcome FROM outbox.message_attempts(%s)", [other]).fetchall()
    assert states == [("sent",), ("undelivered",)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("fax", "SM1", True, None, False), "unknown channel"),
        (("x" * 100_000, "SM1", True, None, False), "unknown channel"),
        ((None, "SM1", True, None, False), "unknown channel"),
        (("sms", "S" * 256, True, None, False), "provider_id"),
        (("sms", "", True, None, False), "provider_id"),
        (("sms", None, True, None, False), "provider_id"),
        (("sms", "SM1\r\nX: y", True, None, False), "provider_id"),
        (("sms", "SM1", None, None, False), "delivered"),
        (("sms", "SM1", False, "3" * 65, True), "error_code"),
        (("sms", "SM1", False, "30003'; DROP TABLE outbox.attempt; --", True), "error_code"),
    ],
)
def test_a_hostile_delivery_report_gets_a_clear_error_and_changes_nothing(
    admin: psycopg.Connection[Any], args: tuple[Any, ...], message: str
) -> None:
    message_id = sent_attempt(admin, "SM1")
    with pytest.raises(errors.InvalidParameterValue, match=message):
        admin.execute("SELECT outbox.record_delivery_report(%s, %s, %s, %s, %s)", list(args))
    assert len(outcomes(admin, message_id)) == 1
    assert addresses(admin)[1][2] is False


def test_an_email_bounce_marks_every_user_with_that_address_once(
    admin: psycopg.Connection[Any], database_url: str
) -> None:
    outbox.set_address(admin, "u1", "email", "Trader@Example.com")
    outbox.set_address(admin, "u2", "email", "trader@example.com")
    outbox.set_address(admin, "u3", "email", "other@example.com")
    with (
        login_role(admin, database_url, "outbox_dispatcher") as url,
        psycopg.connect(url, autocommit=True) as api,
    ):

        def mark(address: str, reason: str | None = "hard bounce") -> Any:
            row = api.execute(
                "SELECT outbox.mark_address_undeliverable('email', %s, %s)", [address, reason]
            ).fetchone()
            assert row is not None
            return row[0]

        assert mark("trader@EXAMPLE.com", "mailgun: 550 5.1.1\r\nunknown user") == 2
        assert mark("trader@example.com") == 0  # the provider's retry
        assert mark("nobody@example.com") == 0
        for bad, problem in (
            ("", "address"),
            ("x" * 1025, "address"),
        ):
            with pytest.raises(errors.InvalidParameterValue, match=problem):
                mark(bad)
        with pytest.raises(errors.InvalidParameterValue, match="reason"):
            mark("other@example.com", "r" * 501)
        with pytest.raises(errors.InvalidParameterValue, match="unknown channel"):
            api.execute("SELECT outbox.mark_address_undeliverable('fax', 'x', NULL)")
    rows = admin.execute(
        "SELECT user_id, undeliverable_since IS NOT NULL, undeliverable_reason"
        " FROM outbox.recipient_address ORDER BY user_id"
    ).fetchall()
    assert rows == [
        ("u1", True, "mailgun: 550 5.1.1  unknown user"),  # no control characters kept
        ("u2", True, "mailgun: 550 5.1.1  unknown user"),
        ("u3", False, None),
    ]


def test_roles_without_the_grant_cannot_report_deliveries_or_bounces(
    admin: psycopg.Connection[Any], database_url: str
) -> None:
    message_id = sent_attempt(admin, "SM1")
    for group in ("outbox_producer", "outbox_recipient_writer", "outbox_inspector"):
        with (
            login_role(admin, database_url, group) as url,
            psycopg.connect(url, autocommit=True) as other,
        ):
            for statement in (
                "SELECT outbox.record_delivery_report('sms', 'SM1', false, '30005', true)",
                "SELECT outbox.mark_address_undeliverable('email', 'u1@example.com', NULL)",
            ):
                with pytest.raises(errors.InsufficientPrivilege):
                    other.execute(statement)
    assert len(outcomes(admin, message_id)) == 1
    assert all(not row[2] for row in addresses(admin))


def test_an_unknown_channel_changes_nothing_even_behind_a_key_or_a_collapse(
    admin: psycopg.Connection[Any],
) -> None:
    """Enqueue asks outbox.channel in its INSERT: the refusal comes after the collapse
    and the idempotency look-up, and must undo the one and not slip past the other."""
    [(first,)] = admin.execute(
        "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}',"
        " idempotency_key => 'k1', collapse_key => 'eurusd')"
    ).fetchall()
    for statement in (
        "SELECT outbox.enqueue('chat', 'price_alert', 'u1', '{}', collapse_key => 'eurusd')",
        "SELECT outbox.enqueue('chat', 'price_alert', 'u1', '{}', idempotency_key => 'k1')",
    ):
        with pytest.raises(errors.InvalidParameterValue, match="unknown channel chat"):
            admin.execute(statement)
    assert admin.execute("SELECT id, status FROM outbox.message").fetchall() == [(first, "pending")]
    assert admin.execute("SELECT count(*) FROM outbox.attempt").fetchone() == (0,)
