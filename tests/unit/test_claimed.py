"""Claim rows decoded into messages and recipients: values as the constructors build them."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest

from outbox.dispatcher._claimed import ClaimDecoder, Claimed, Lease
from outbox.dispatcher._routing import RecipientRecord

TOKEN = uuid.uuid4()


def message_columns(message_id: int, user_id: str = "u1") -> tuple[Any, ...]:
    return (
        message_id, "campaign", 100, "push", user_id, "price_alert", '{"instrument": "EURUSD"}',
        ["email"], 2, None, 30.0, False, True, False, [["", ["push", "email"]]],
    )  # fmt: skip


def recipient_columns(user_id: str = "u1", email: str = "a@example.com") -> tuple[Any, ...]:
    # the claim's recipient columns (sql/queries.sql, _recipient_columns)
    return (
        user_id, "Europe/Berlin", None, None, ["telegram"], False, None,
        [["email", email, True], ["telegram", "42", True]],
        [["https://push.example.com/s/1", "p256dh", "auth"]],
    )  # fmt: skip


def test_a_claimed_row_is_the_value_the_constructor_builds_and_as_immutable() -> None:
    message = Claimed.from_row(message_columns(7), TOKEN)
    assert message == Claimed(
        id=7,
        lane="campaign",
        priority=100,
        channel="push",
        user_id="u1",
        template="price_alert",
        vars={"instrument": "EURUSD"},
        fallback=("email",),
        attempts=2,
        lease=Lease(id=7, token=TOKEN),
        vars_key='{"instrument": "EURUSD"}',
        escalate_after=30.0,
        sent_before=True,
        preferences=(("", frozenset({"push", "email"})),),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.attempts = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.lease.token = uuid.uuid4()  # type: ignore[misc]
    assert dataclasses.replace(message, attempts=3).attempts == 3
    assert hash(message.lease) == hash(Lease(id=7, token=TOKEN))


def test_a_users_record_is_kept_while_its_row_is_unchanged_and_decoded_again_after() -> None:
    decoder = ClaimDecoder()
    first = decoder.decode([message_columns(1) + recipient_columns()], TOKEN)
    again = decoder.decode(
        [message_columns(2) + recipient_columns(), message_columns(3) + recipient_columns()],
        uuid.uuid4(),
    )
    moved = decoder.decode([message_columns(4) + recipient_columns(email="b@example.com")], TOKEN)
    unknown = decoder.decode([message_columns(5, "u9") + (None,) * 12], TOKEN)

    record = first[0][1]
    assert record == RecipientRecord.from_row(recipient_columns())
    assert again[0][1] is record and again[1][1] is record
    assert moved[0][1] is not record
    assert moved[0][1] is not None and moved[0][1].email == "b@example.com"
    assert unknown[0][1] is None
    assert [m.id for m, _ in first + again + moved + unknown] == [1, 2, 3, 4, 5]


def test_json_columns_read_as_text_decode_to_the_same_values() -> None:
    """The claim returns a user's preferences and push subscriptions as JSON text."""
    message_text = (*message_columns(7)[:14], '[["", ["push", "email"]]]')
    recipient_text = (
        *recipient_columns()[:8],
        '[["https://push.example.com/s/1", "p256dh", "auth"]]',
    )
    [(message, recipient)] = ClaimDecoder().decode([message_text + recipient_text], TOKEN)
    [(expected, expected_recipient)] = ClaimDecoder().decode(
        [message_columns(7) + recipient_columns()], TOKEN
    )
    assert message == expected
    assert recipient == expected_recipient
