"""The outcome decision as a table: every outcome a channel can answer, and the retry policy."""

from __future__ import annotations

import random
import typing
import uuid
from dataclasses import replace

import pytest

from outbox.dispatcher._claimed import Claimed, Lease
from outbox.dispatcher._finishes import FinishDead, FinishHandoff, FinishRequeue, FinishSent
from outbox.dispatcher._outcomes import (
    failed,
    fall_back_lanes,
    finish_for,
    rate_limit_wait,
    unrenderable,
)
from outbox.dispatcher._retry import RetryPolicy
from outbox.dispatcher._routing import RecipientRecord
from outbox.dispatcher.channels.base import (
    ChannelOutage,
    DeletePushSubscription,
    DisableTelegram,
    MarkEmailUndeliverable,
    Outcome,
    PermanentFailure,
    PushSubscription,
    RateLimited,
    Sent,
    TransientFailure,
    Unreachable,
)

POLICY = RetryPolicy(delays=(1.0, 2.0, 4.0), max_attempts=3, jitter=0.0, rng=random.Random(0))
USER = RecipientRecord(user_id="u1", email="u1@example.com", telegram_chat_id=5)


def message(*, attempts: int = 0, channel: str = "telegram", fallback=None) -> Claimed:
    return Claimed(
        id=7,
        lane="transactional",
        priority=10,
        channel=channel,
        user_id="u1",
        template="price_alert",
        vars={},
        fallback=fallback,
        attempts=attempts,
        lease=Lease(id=7, token=uuid.uuid4()),
    )


BLOCKED = (DisableTelegram(),)
# (case, attempts so far, outcome, finish type, its name, error class, delay, burns an attempt)
TABLE = [
    ("sent", 0, Sent(), FinishSent, "sent", None, None, False),
    ("sent on the last try", 2, Sent(), FinishSent, "sent", None, None, False),
    ("transient: first retry", 0, TransientFailure(error_class="http_500", error="500"),
     FinishRequeue, "retry", "http_500", 1.0, True),
    ("transient: second retry", 1, TransientFailure(error_class="timeout", error="slow"),
     FinishRequeue, "retry", "timeout", 2.0, True),
    ("transient: exhausted", 2, TransientFailure(error_class="http_500", error="500"),
     FinishDead, "dead", "http_500", None, False),
    ("permanent", 0, PermanentFailure(error_class="http_400", error="bad"), FinishDead, "dead",
     "http_400", None, False),
    ("rate limited", 2, RateLimited(retry_after=7.5), FinishRequeue, "deferred", "rate_limited",
     7.5, False),
    ("rate limited, negative wait", 0, RateLimited(retry_after=-3), FinishRequeue, "deferred",
     "rate_limited", 0.0, False),
    ("unreachable: falls back", 0,
     Unreachable(error_class="bot_blocked", error="403", effects=BLOCKED), FinishHandoff,
     "fallback", "bot_blocked", None, False),
    ("outage", 2, ChannelOutage(error_class="connect", error="refused"), FinishRequeue,
     "deferred", "connect", 12.0, False),
]  # fmt: skip


@pytest.mark.parametrize(
    ("attempts", "outcome", "kind", "name", "error_class", "delay", "burns"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_outcome_table(attempts, outcome, kind, name, error_class, delay, burns) -> None:
    claimed = message(attempts=attempts)
    finish = finish_for(claimed, USER, outcome, 42.0, policy=POLICY, outage_pause=12.0)
    assert type(finish) is kind
    assert finish.name == name
    assert finish.message is claimed
    assert finish.duration_ms == 42.0
    assert finish.effects == outcome.effects
    assert getattr(finish, "error_class", None) == error_class
    assert getattr(finish, "delay", None) == delay
    assert (isinstance(finish, FinishRequeue) and finish.burns_attempt) is burns


@pytest.mark.parametrize(
    ("fallback", "disabled", "expected"),
    [
        (None, frozenset(), ("push", ("email",))),
        (("email",), frozenset(), ("email", ())),
        (None, frozenset({"push"}), ("email", ())),
        ((), frozenset(), None),
        (None, frozenset({"push", "email"}), None),
    ],
)
def test_unreachable_hands_off_along_the_chain_and_dies_at_its_end(
    fallback, disabled, expected
) -> None:
    user = RecipientRecord(user_id="u1", disabled_channels=disabled)
    outcome = Unreachable(error_class="no_address", error="no chat")
    finish = finish_for(message(fallback=fallback), user, outcome, 1.0, policy=POLICY)
    if expected is None:
        assert isinstance(finish, FinishDead) and finish.error_class == "no_address"
    else:
        assert isinstance(finish, FinishHandoff)
        assert (finish.next_channel, finish.next_fallback) == expected


def test_effects_travel_with_a_dead_letter_too() -> None:
    gone = (DeletePushSubscription(endpoint="https://push.example/1"),)
    outcome = PermanentFailure(error_class="http_410", error="gone", effects=gone)
    finish = finish_for(message(channel="push"), USER, outcome, 3.0, policy=POLICY)
    assert isinstance(finish, FinishDead) and finish.effects == gone


def test_an_internal_error_is_a_failed_attempt_with_no_provider_call() -> None:
    retry = failed(message(), "internal", "KeyError: 'x'", None, policy=POLICY)
    assert isinstance(retry, FinishRequeue) and retry.burns_attempt and retry.duration_ms is None
    dead = failed(message(attempts=2), "internal", "KeyError: 'x'", None, policy=POLICY)
    assert isinstance(dead, FinishDead) and dead.error_class == "internal"


def test_a_render_error_dies_and_a_missing_slot_defers() -> None:
    dead = unrenderable(message(), "price_alert (telegram): 'symbol' is undefined")
    assert isinstance(dead, FinishDead) and dead.error_class == "template"
    wait = rate_limit_wait(message(), 0.25)
    assert isinstance(wait, FinishRequeue)
    assert (wait.name, wait.error_class, wait.delay, wait.burns_attempt) == (
        "deferred",
        "rate_limit",
        0.25,
        False,
    )


def test_every_outcome_type_has_a_row() -> None:
    covered = {type(row[2]) for row in TABLE}
    assert set(typing.get_args(Outcome)) == covered


# --- fallback on failure (OUTBOX_FALLBACK_ON_FAILURE) ---------------------------

REACHABLE_EVERYWHERE = RecipientRecord(
    user_id="u1",
    email="u1@example.com",
    telegram_chat_id=5,
    subscriptions=(PushSubscription(endpoint="https://push.example/1", p256dh="k", auth="a"),),
)
BOUNCE = PermanentFailure(error_class="smtp_5xx", error="550 no such user")
HTTP_500 = TransientFailure(error_class="http_5xx", error="500")


def lane_message(lane: str, *, channel: str = "email", attempts: int = 0, fallback=None):
    claimed = message(attempts=attempts, channel=channel, fallback=fallback)
    return replace(claimed, lane=lane, priority=10 if lane == "transactional" else 100)


# (case, setting, lane, channel, attempts so far, outcome, recipient, expected follow-up)
FALLBACK_TABLE = [
    ("bounce hands an alert on", "transactional", "transactional", "email", 0, BOUNCE,
     REACHABLE_EVERYWHERE, ("push", ("telegram",))),
    ("last 500 hands an alert on", "transactional", "transactional", "telegram", 2, HTTP_500,
     REACHABLE_EVERYWHERE, ("push", ("email",))),
    ("an earlier 500 is retried first", "transactional", "transactional", "telegram", 1,
     HTTP_500, REACHABLE_EVERYWHERE, "retry"),
    ("a campaign dies where it fails", "transactional", "campaign", "email", 0, BOUNCE,
     REACHABLE_EVERYWHERE, "dead"),
    ("all: a campaign falls back too", "all", "campaign", "email", 0, BOUNCE,
     REACHABLE_EVERYWHERE, ("push", ("telegram",))),
    ("off: an alert dies", "off", "transactional", "email", 0, BOUNCE, REACHABLE_EVERYWHERE,
     "dead"),
    ("channels without an address are passed over", "transactional", "transactional", "email",
     0, BOUNCE, RecipientRecord(user_id="u1", email="e@x.y", telegram_chat_id=5),
     ("telegram", ())),
    ("nowhere else to go: dead", "transactional", "transactional", "email", 0, BOUNCE,
     RecipientRecord(user_id="u1", email="e@x.y"), "dead"),
    ("a disabled channel is passed over", "transactional", "transactional", "email", 0, BOUNCE,
     replace(REACHABLE_EVERYWHERE, disabled_channels=frozenset({"push"})), ("telegram", ())),
]  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "lane", "channel", "attempts", "outcome", "recipient", "expected"),
    [row[1:] for row in FALLBACK_TABLE],
    ids=[row[0] for row in FALLBACK_TABLE],
)
def test_fallback_on_failure_table(
    setting, lane, channel, attempts, outcome, recipient, expected
) -> None:
    claimed = lane_message(lane, channel=channel, attempts=attempts)
    finish = finish_for(
        claimed, recipient, outcome, 5.0, policy=POLICY, fall_back_lanes=fall_back_lanes(setting)
    )
    if expected == "dead":
        assert isinstance(finish, FinishDead) and finish.error_class == outcome.error_class
    elif expected == "retry":
        assert isinstance(finish, FinishRequeue) and finish.burns_attempt
    else:
        assert isinstance(finish, FinishHandoff)
        assert finish.name == "fallback"  # logged as a hop in outbox.attempt
        assert (finish.error_class, finish.error) == (outcome.error_class, outcome.error)
        assert (finish.next_channel, finish.next_fallback) == expected


def test_the_chain_of_the_message_wins_and_its_end_is_dead() -> None:
    lanes = fall_back_lanes("transactional")
    claimed = lane_message("transactional", fallback=("telegram",))
    hop = finish_for(
        claimed, REACHABLE_EVERYWHERE, BOUNCE, 1.0, policy=POLICY, fall_back_lanes=lanes
    )
    assert isinstance(hop, FinishHandoff) and (hop.next_channel, hop.next_fallback) == (
        "telegram",
        (),
    )
    last = lane_message("transactional", channel="telegram", fallback=())
    died = finish_for(last, REACHABLE_EVERYWHERE, BOUNCE, 1.0, policy=POLICY, fall_back_lanes=lanes)
    assert isinstance(died, FinishDead)


def test_an_internal_error_on_the_last_attempt_falls_back_too() -> None:
    claimed = lane_message("transactional", attempts=2)
    finish = failed(
        claimed,
        "internal",
        "KeyError: 'x'",
        None,
        policy=POLICY,
        recipient=REACHABLE_EVERYWHERE,
        fall_back_lanes=fall_back_lanes("transactional"),
    )
    assert isinstance(finish, FinishHandoff) and finish.next_channel == "push"


def test_the_bounce_effect_travels_with_the_fallback() -> None:
    bounce = PermanentFailure(
        error_class="smtp_5xx", error="550", effects=(MarkEmailUndeliverable(),)
    )
    finish = finish_for(
        lane_message("transactional"),
        REACHABLE_EVERYWHERE,
        bounce,
        1.0,
        policy=POLICY,
        fall_back_lanes=fall_back_lanes("transactional"),
    )
    assert isinstance(finish, FinishHandoff) and finish.effects == bounce.effects


# -------------------------------------------------------------- alerts: sent, then waiting

WITH_PUSH = replace(
    USER,
    subscriptions=(PushSubscription(endpoint="https://push.example/1", p256dh="k", auth="a"),),
)

# (case, message changes, recipient, ack wait, next channel, chain left after it)
ALERTS = [
    ("not an alert: the row goes", {}, USER, None, None, ()),
    ("alert: waits, moved to the next channel", {"escalate_after": 120.0, "channel": "email",
     "fallback": ("telegram", "push")}, WITH_PUSH, 120.0, "telegram", ("push",)),
    ("alert: unreachable channels are passed over", {"escalate_after": 60.0, "channel": "email",
     "fallback": ("push", "telegram")}, USER, 60.0, "telegram", ()),
    ("alert at the chain's end: waits without a next channel", {"escalate_after": 60.0,
     "channel": "telegram", "fallback": ()}, USER, 60.0, None, ()),
    ("alert: the topic preference is honoured", {"escalate_after": 30.0, "channel": "email",
     "fallback": ("telegram", "push"), "preferences": (("", frozenset({"email", "push"})),)},
     WITH_PUSH, 30.0, "push", ()),
]  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "recipient", "wait", "follow", "rest"),
    [row[1:] for row in ALERTS],
    ids=[row[0] for row in ALERTS],
)
def test_a_sent_alert_waits_for_its_acknowledgement(changes, recipient, wait, follow, rest):
    finish = finish_for(replace(message(), **changes), recipient, Sent(), 3.0, policy=POLICY)
    assert type(finish) is FinishSent
    assert finish.ack_wait == wait
    assert finish.awaits_ack is (wait is not None)
    assert finish.next_channel == follow
    assert finish.next_fallback == rest


@pytest.mark.parametrize(
    ("provider_id", "kept"),
    [
        ("SM" + "a" * 32, "SM" + "a" * 32),
        (None, None),
        ("", None),
        ("x" * 256, None),
        ("x" * 255, "x" * 255),
        ("SM1\r\nX-Injected: 1", None),
        (42, None),
    ],
)
def test_the_providers_message_id_is_kept_with_sent_when_a_report_could_name_it(
    provider_id, kept
) -> None:
    finish = finish_for(message(), USER, Sent(provider_id=provider_id), 1.0, policy=POLICY)
    assert isinstance(finish, FinishSent) and finish.provider_id == kept
    alert = replace(message(), escalate_after=60.0)
    finish = finish_for(alert, USER, Sent(provider_id=provider_id), 1.0, policy=POLICY)
    assert isinstance(finish, FinishSent) and finish.awaits_ack and finish.provider_id == kept


def test_a_permanent_failure_falls_back_to_a_plugin_channel_only_with_an_address() -> None:
    """Reachability is generic: a usable address row for the channel."""
    failure = PermanentFailure(error_class="smtp_5xx", error="550")
    bounced = message(channel="email", fallback=("chat", "telegram"))
    with_handle = replace(USER, channel_addresses={"chat": "@u1"})
    finish = finish_for(
        bounced, with_handle, failure, 1.0, policy=POLICY, fall_back_lanes={"transactional"}
    )
    assert isinstance(finish, FinishHandoff)
    assert (finish.next_channel, finish.next_fallback) == ("chat", ("telegram",))
    finish = finish_for(
        bounced, USER, failure, 1.0, policy=POLICY, fall_back_lanes={"transactional"}
    )
    assert isinstance(finish, FinishHandoff)
    assert (finish.next_channel, finish.next_fallback) == ("telegram", ())
