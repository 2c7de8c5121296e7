from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from outbox.dispatcher._routing import RecipientRecord, next_channel


def test_default_fallback_order_is_push_email_telegram() -> None:
    assert next_channel("push", None, None) == ("email", ("telegram",))
    assert next_channel("email", None, None) == ("push", ("telegram",))


def test_explicit_fallback_on_the_message_wins() -> None:
    assert next_channel("telegram", ["email"], None) == ("email", ())
    assert next_channel("telegram", [], None) is None


def test_users_order_and_disabled_channels_are_honoured() -> None:
    user = RecipientRecord(
        user_id="u",
        fallback_order=("telegram", "email", "push"),
        disabled_channels=frozenset({"email"}),
    )
    assert next_channel("push", None, user) == ("telegram", ())


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (datetime(2026, 1, 5, 21, 59, tzinfo=UTC), None),
        (datetime(2026, 1, 5, 22, 30, tzinfo=UTC), datetime(2026, 1, 6, 7, 0, tzinfo=UTC)),
        (datetime(2026, 1, 6, 3, 0, tzinfo=UTC), datetime(2026, 1, 6, 7, 0, tzinfo=UTC)),
        (datetime(2026, 1, 6, 7, 0, tzinfo=UTC), None),
    ],
)
def test_quiet_hours_across_midnight(now: datetime, expected: datetime | None) -> None:
    user = RecipientRecord(user_id="u", quiet_hours=(time(22), time(7)))
    assert user.quiet_until(now) == expected


def test_quiet_hours_use_the_users_timezone() -> None:
    user = RecipientRecord(user_id="u", timezone="Asia/Tokyo", quiet_hours=(time(22), time(7)))
    # 14:00 UTC is 23:00 in Tokyo: quiet until 07:00 Tokyo = 22:00 UTC
    until = user.quiet_until(datetime(2026, 1, 5, 14, 0, tzinfo=UTC))
    assert until is not None and until.astimezone(UTC) == datetime(2026, 1, 5, 22, 0, tzinfo=UTC)


def test_a_bounced_email_and_a_blocked_chat_are_not_offered_to_channels() -> None:
    user = RecipientRecord(
        user_id="u",
        email="a@b.c",
        telegram_chat_id=5,
        email_undeliverable=True,
        telegram_blocked=True,
    )
    addresses = user.addresses()
    assert addresses.email is None and addresses.telegram_chat_id is None


def test_a_chain_ends_after_its_last_channel() -> None:
    """The follow-up row keeps what is left: at the end that is nothing, not NULL
    (NULL would mean the default order and send the message round in circles)."""
    follow = next_channel("push", ["email"], None)
    assert follow == ("email", ())
    assert next_channel("email", follow[1], None) is None


def test_a_claimed_row_spreads_its_addresses_over_the_record() -> None:
    """The claim's ``addresses`` column: [[channel, address, usable], ...]."""
    row = (
        "u",
        "UTC",
        None,
        None,
        ["sms"],
        False,
        ["chat", "email"],
        '[["email", "a@b.c", false], ["telegram", "-1001", true],'
        ' ["chat", "@u", true], ["sms", "+4915112345678", false]]',
        [["https://push.example/1", "p", "a"]],
    )
    user = RecipientRecord.from_row(row)
    assert (user.email, user.email_undeliverable) == ("a@b.c", True)
    assert (user.telegram_chat_id, user.telegram_blocked) == (-1001, False)
    # only usable addresses of the other channels; the refused sms number is left out
    assert user.channel_addresses == {"chat": "@u"}
    assert user.fallback_order == ("chat", "email")
    addresses = user.addresses()
    assert addresses.addresses == {"chat": "@u"}
    assert [
        c
        for c in ("email", "telegram", "push", "inapp", "sms", "chat", "slack")
        if addresses.reaches(c)
    ] == ["telegram", "push", "inapp", "chat"]


def test_a_user_without_address_rows_is_reached_only_in_app() -> None:
    user = RecipientRecord.from_row(("u", None, None, None, [], False, None, "[]", "[]"))
    assert [
        c for c in ("email", "telegram", "push", "inapp", "chat") if user.addresses().reaches(c)
    ] == ["inapp"]


def test_a_plugin_channel_in_the_users_order_is_a_link_of_the_chain() -> None:
    user = RecipientRecord(user_id="u", fallback_order=("chat", "email"))
    assert next_channel("push", None, user) == ("chat", ("email",))
