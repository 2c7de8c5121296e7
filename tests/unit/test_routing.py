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
