"""The pre-send decision as a table: every rule, its precedence, and the go-ahead."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime, time, timedelta

import pytest

from outbox.dispatcher._claimed import Claimed, Lease
from outbox.dispatcher._finishes import FinishDead, FinishHandoff, FinishRequeue
from outbox.dispatcher._presend import UNCONFIGURED_RETRY_SECONDS, presend
from outbox.dispatcher._routing import RecipientRecord

NOW = datetime(2026, 1, 5, 23, 0, tzinfo=UTC)  # inside 22:00-07:00 UTC quiet hours
ALL = frozenset({"email", "telegram", "push"})


def message(*, lane: str = "transactional", channel: str = "email", fallback=None) -> Claimed:
    return Claimed(
        id=1,
        lane=lane,
        priority=10 if lane == "transactional" else 100,
        channel=channel,
        user_id="u1",
        template="price_alert",
        vars={},
        fallback=fallback,
        attempts=0,
        lease=Lease(id=1, token=uuid.uuid4()),
    )


USER = RecipientRecord(user_id="u1", email="u1@example.com", telegram_chat_id=5)
OPTED_OUT = replace(USER, campaign_opt_out=True)
NO_EMAIL = replace(USER, disabled_channels=frozenset({"email"}))
QUIET = replace(USER, quiet_hours=(time(22), time(7)))
EVERYTHING = replace(
    USER,
    campaign_opt_out=True,
    disabled_channels=frozenset({"email"}),
    quiet_hours=(time(22), time(7)),
)

# (case, lane, recipient, configured channels, expected finish type, its outcome, error class)
TABLE = [
    ("go ahead", "transactional", USER, ALL, None, None, None),
    ("campaign go ahead", "campaign", USER, ALL, None, None, None),
    ("unknown recipient", "transactional", None, ALL, FinishDead, "dead", "unknown_recipient"),
    ("unknown recipient first", "campaign", None, frozenset(), FinishDead, "dead",
     "unknown_recipient"),
    ("opted out campaign", "campaign", OPTED_OUT, ALL, FinishHandoff, "skipped", "opted_out"),
    ("opt-out spares alerts", "transactional", OPTED_OUT, ALL, None, None, None),
    ("disabled channel", "transactional", NO_EMAIL, ALL, FinishHandoff, "skipped",
     "channel_disabled"),
    ("quiet hours campaign", "campaign", QUIET, ALL, FinishRequeue, "deferred", "quiet_hours"),
    ("quiet hours spare alerts", "transactional", QUIET, ALL, None, None, None),
    ("opt-out before disabled and quiet", "campaign", EVERYTHING, ALL, FinishHandoff, "skipped",
     "opted_out"),
    ("disabled before quiet", "campaign", replace(EVERYTHING, campaign_opt_out=False), ALL,
     FinishHandoff, "skipped", "channel_disabled"),
    ("unconfigured channel", "transactional", USER, frozenset({"push"}), FinishRequeue,
     "deferred", "channel_unconfigured"),
    ("quiet before unconfigured", "campaign", QUIET, frozenset(), FinishRequeue, "deferred",
     "quiet_hours"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("lane", "recipient", "configured", "kind", "outcome", "error_class"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_presend_table(lane, recipient, configured, kind, outcome, error_class) -> None:
    finish = presend(message(lane=lane), recipient, now=NOW, configured=configured)
    if kind is None:
        assert finish is None
        return
    assert type(finish) is kind
    assert finish.name == outcome
    assert finish.error_class == error_class
    assert finish.message.lease.token  # the finish is fenced by the message's lease
    assert finish.duration_ms is None  # no provider call was made


def test_a_deferral_burns_no_attempt_and_waits_for_the_end_of_quiet_hours() -> None:
    finish = presend(message(lane="campaign"), QUIET, now=NOW, configured=ALL)
    assert isinstance(finish, FinishRequeue)
    assert not finish.burns_attempt
    assert timedelta(seconds=finish.delay) == timedelta(hours=8)  # 23:00 -> 07:00


def test_an_unconfigured_channel_is_looked_at_again_later() -> None:
    finish = presend(message(), USER, now=NOW, configured=frozenset())
    assert isinstance(finish, FinishRequeue)
    assert finish.delay == UNCONFIGURED_RETRY_SECONDS and not finish.burns_attempt


@pytest.mark.parametrize(
    ("fallback", "order", "expected"),
    [
        (None, None, ("push", ("telegram",))),  # the default order, email removed
        (("telegram",), None, ("telegram", ())),  # the message's own chain wins
        ((), None, None),  # an exhausted chain: skipped with no follow-up
        (None, ("telegram", "email", "push"), ("telegram", ("push",))),  # the user's order
    ],
)
def test_a_disabled_channel_hands_the_message_to_the_next_one(fallback, order, expected) -> None:
    user = replace(NO_EMAIL, fallback_order=order)
    finish = presend(message(fallback=fallback), user, now=NOW, configured=ALL)
    assert isinstance(finish, FinishHandoff)
    follow = None if finish.next_channel is None else (finish.next_channel, finish.next_fallback)
    assert follow == expected


# ------------------------------------------------ second wave: expiry, acknowledged, topic

PAST = NOW - timedelta(seconds=1)


def alert(**changes) -> Claimed:
    return replace(message(), **changes)


# (case, message changes, recipient, expected finish type, outcome, error class, next channel)
SECOND_WAVE = [
    ("expired", {"expires_at": PAST}, USER, FinishHandoff, "expired", "expired", None),
    ("expires at this very moment", {"expires_at": NOW}, USER, FinishHandoff, "expired",
     "expired", None),
    ("not expired yet", {"expires_at": NOW + timedelta(seconds=1)}, USER, None, None, None, None),
    ("expiry before an unknown recipient", {"expires_at": PAST}, None, FinishHandoff, "expired",
     "expired", None),
    ("acknowledged in flight", {"acknowledged": True}, USER, FinishHandoff, "skipped",
     "acknowledged", None),
    ("topic allows the channel", {"preferences": (("", frozenset({"email"})),)}, USER, None,
     None, None, None),
    ("topic excludes the channel", {"preferences": (("", frozenset({"telegram"})),)}, USER,
     FinishHandoff, "skipped", "preference", "telegram"),
    ("topic muted", {"preferences": (("", frozenset()),)}, USER, FinishHandoff, "skipped",
     "preference", None),
    ("instrument wins over topic",
     {"vars": {"instrument": "EURUSD"},
      "preferences": (("", frozenset({"telegram"})), ("EURUSD", frozenset({"email"})))},
     USER, None, None, None, None),
    ("another instrument's preference does not apply",
     {"vars": {"instrument": "GBPUSD"},
      "preferences": (("", frozenset({"push"})), ("EURUSD", frozenset({"email"})))},
     USER, FinishHandoff, "skipped", "preference", "push"),
    ("a position failure with no allowed channel left goes out here",
     {"template": "position_failure_sl", "fallback": ("telegram",),
      "preferences": (("", frozenset({"push"})),)},
     USER, None, None, None, None),
    ("a position failure follows its preference when the chain allows it",
     {"template": "position_failure_sl", "fallback": ("telegram",),
      "preferences": (("", frozenset({"telegram"})),)},
     USER, FinishHandoff, "skipped", "preference", "telegram"),
    ("preference skips a disabled channel too",
     {"preferences": (("", frozenset({"telegram", "push"})),)},
     replace(USER, disabled_channels=frozenset({"push"})), FinishHandoff, "skipped",
     "preference", "telegram"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "recipient", "kind", "outcome", "error_class", "follow"),
    [row[1:] for row in SECOND_WAVE],
    ids=[row[0] for row in SECOND_WAVE],
)
def test_presend_second_wave_table(changes, recipient, kind, outcome, error_class, follow) -> None:
    finish = presend(alert(**changes), recipient, now=NOW, configured=ALL)
    if kind is None:
        assert finish is None
        return
    assert type(finish) is kind
    assert finish.name == outcome
    assert finish.error_class == error_class
    assert finish.next_channel == follow
