"""After a send (or a failure to get that far): which finish ends this lease.

A pure decision (no database, no event loop), one row per outcome:

=====================  ==============================================================
``Sent``               sent: the row is deleted; an alert (``escalate_after``) waits
                       for its acknowledgement instead, on this channel, its chain
                       starting with the next reachable channel, which the claim of
                       its escalation moves it to if nobody acknowledges in time
``TransientFailure``   retry after the policy's backoff (an attempt burned); once the
                       policy is exhausted, it dies on this channel (below)
``PermanentFailure``   it dies on this channel at once (below)
``RateLimited``        deferred by the provider's ``retry_after`` (nothing burned)
``Unreachable``        fallback to the next channel of the chain; dead when none is left
``ChannelOutage``      deferred for the circuit breaker's pause (nothing burned)
=====================  ==============================================================

A message that dies on its channel is handed to the next channel of its chain on
which the user can be reached (outcome ``fallback``) when its lane falls back on
failure (``OUTBOX_FALLBACK_ON_FAILURE``: alerts by default); otherwise, or at the
chain's end, it is dead.

Whether an attempt is burned follows from the finish (``FinishRequeue.outcome``),
and every finish carries the outcome's recipient effects. A new outcome type gets
its row here and in ``tests/unit/test_outcomes.py``.
"""

from __future__ import annotations

from collections.abc import Container

from outbox.dispatcher._claimed import Claimed
from outbox.dispatcher._finishes import (
    Finish,
    FinishDead,
    FinishHandoff,
    FinishRequeue,
    FinishSent,
)
from outbox.dispatcher._retry import RetryPolicy
from outbox.dispatcher._routing import RecipientRecord, next_channel
from outbox.dispatcher._values import value_builder
from outbox.dispatcher.channels.base import (
    ChannelOutage,
    Effect,
    Outcome,
    PermanentFailure,
    RateLimited,
    Sent,
    TransientFailure,
    Unreachable,
)
from outbox.vocabulary import LANES

_build_sent = value_builder(FinishSent)  # FinishSent(...), one per delivery


def finish_for(
    message: Claimed,
    recipient: RecipientRecord,
    outcome: Outcome,
    duration_ms: float,
    *,
    policy: RetryPolicy,
    outage_pause: float = 0.0,
    fall_back_lanes: Container[str] = frozenset(),
) -> Finish:
    """The finish of a provider call that answered ``outcome``.

    ``outage_pause``: seconds the circuit breaker paused the channel for (only read
    for a ``ChannelOutage``; tripping the breaker is the caller's database call).
    ``fall_back_lanes``: the lanes whose messages fall back when they die here
    (:func:`fall_back_lanes`).
    """
    effects = outcome.effects
    match outcome:
        case Sent(provider_id=provider_id):
            provider_id = kept_provider_id(provider_id)
            if message.escalate_after is not None:
                return _awaiting_ack(message, recipient, duration_ms, effects, provider_id)
            return _build_sent(
                message=message, duration_ms=duration_ms, effects=effects, provider_id=provider_id
            )
        case TransientFailure(error_class=error_class, error=error):
            return failed(
                message,
                error_class,
                error,
                duration_ms,
                policy=policy,
                effects=effects,
                recipient=recipient,
                fall_back_lanes=fall_back_lanes,
            )
        case PermanentFailure():
            if message.lane in fall_back_lanes:
                follow = next_reachable(message, recipient)
                if follow is not None:
                    return _handoff(message, outcome, follow, duration_ms)
            return _dead(message, outcome, duration_ms)
        case Unreachable():
            return _fall_back(message, recipient, outcome, duration_ms)
        case RateLimited(retry_after=after, error=error):
            return FinishRequeue(
                message=message,
                delay=max(after, 0.0),
                outcome="deferred",
                error_class="rate_limited",
                error=error,
                duration_ms=duration_ms,
                effects=effects,
            )
        case ChannelOutage(error_class=error_class, error=error):
            return FinishRequeue(
                message=message,
                delay=max(outage_pause, 0.0),
                outcome="deferred",
                error_class=error_class,
                error=error,
                duration_ms=duration_ms,
                effects=effects,
            )
    raise AssertionError(f"unknown outcome {outcome!r}")


def _awaiting_ack(
    message: Claimed,
    recipient: RecipientRecord,
    duration_ms: float,
    effects: tuple[Effect, ...],
    provider_id: str | None,
) -> FinishSent:
    """A sent alert: it escalates to the next reachable channel of its chain unless
    acknowledged within ``escalate_after``; at the chain's end it just waits.
    """
    assert message.escalate_after is not None
    follow = next_reachable(message, recipient)
    return FinishSent(
        message=message,
        duration_ms=duration_ms,
        effects=effects,
        ack_wait=message.escalate_after,
        next_channel=follow[0] if follow else None,
        next_fallback=follow[1] if follow else (),
        provider_id=provider_id,
    )


MAX_PROVIDER_ID_LENGTH = 255
"""The longest provider message id kept (``outbox.record_delivery_report``'s limit)."""


def kept_provider_id(provider_id: object) -> str | None:
    """``Sent.provider_id`` if a delivery report could name it: a non-empty string of at
    most 255 characters without control characters; else None (a plugin's odd id is
    not worth a failed acknowledgement).
    """
    if not isinstance(provider_id, str) or not 0 < len(provider_id) <= MAX_PROVIDER_ID_LENGTH:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in provider_id):
        return None
    return provider_id


def _dead(
    message: Claimed, outcome: PermanentFailure | Unreachable, duration_ms: float
) -> FinishDead:
    return FinishDead(
        message=message,
        error_class=outcome.error_class,
        error=outcome.error,
        duration_ms=duration_ms,
        effects=outcome.effects,
    )


def _fall_back(
    message: Claimed, recipient: RecipientRecord, outcome: Unreachable, duration_ms: float
) -> Finish:
    """The next channel of the chain gets the message; dead when none is left."""
    follow = next_channel(
        message.channel, message.fallback, recipient, allowed=message.allowed_channels()
    )
    if follow is None:
        return _dead(message, outcome, duration_ms)
    return _handoff(message, outcome, follow, duration_ms)


def _handoff(
    message: Claimed,
    outcome: PermanentFailure | Unreachable | TransientFailure,
    follow: tuple[str, tuple[str, ...]],
    duration_ms: float | None,
) -> FinishHandoff:
    return FinishHandoff(
        message=message,
        outcome="fallback",
        error_class=outcome.error_class,
        error=outcome.error,
        next_channel=follow[0],
        next_fallback=follow[1],
        duration_ms=duration_ms,
        effects=outcome.effects,
    )


def next_reachable(
    message: Claimed, recipient: RecipientRecord | None
) -> tuple[str, tuple[str, ...]] | None:
    """The next channel of the message's chain on which the user has an address, and
    the chain left after it; None at the chain's end. Channels without an address
    (no email, a blocked bot, no push subscription, no usable address on a plugin's
    channel; inapp reaches everybody) and channels the user's topic
    preference leaves out are passed over.
    """
    if recipient is None:
        return None
    addresses = recipient.addresses()
    current, chain = message.channel, message.fallback
    allowed = message.allowed_channels()
    while (follow := next_channel(current, chain, recipient, allowed=allowed)) is not None:
        if addresses.reaches(follow[0]):
            return follow
        current, chain = follow
    return None


def fall_back_lanes(setting: str) -> frozenset[str]:
    """The lanes ``OUTBOX_FALLBACK_ON_FAILURE`` makes fall back on failure."""
    return {
        "transactional": frozenset({"transactional"}),
        "all": frozenset(LANES),
        "off": frozenset(),
    }[setting]


def failed(
    message: Claimed,
    error_class: str,
    error: str,
    duration_ms: float | None,
    *,
    policy: RetryPolicy,
    effects: tuple[Effect, ...] = (),
    recipient: RecipientRecord | None = None,
    fall_back_lanes: Container[str] = frozenset(),
) -> Finish:
    """A failed attempt: a retry after the policy's wait; when the policy is
    exhausted, a fallback (its lane in ``fall_back_lanes``) or dead.
    """
    delay = policy.next_delay(message.attempts + 1)
    if delay is None and message.lane in fall_back_lanes:
        follow = next_reachable(message, recipient)
        if follow is not None:
            failure = TransientFailure(error_class=error_class, error=error, effects=effects)
            return _handoff(message, failure, follow, duration_ms)
    if delay is None:
        return FinishDead(
            message=message,
            error_class=error_class,
            error=error,
            duration_ms=duration_ms,
            effects=effects,
        )
    return FinishRequeue(
        message=message,
        delay=delay,
        outcome="retry",
        error_class=error_class,
        error=error,
        duration_ms=duration_ms,
        effects=effects,
    )


def unrenderable(message: Claimed, error: str) -> Finish:
    """The template cannot be rendered with these vars: retrying cannot help."""
    return FinishDead(message=message, error_class="template", error=error)


def rate_limit_wait(message: Claimed, wait: float) -> Finish:
    """No send slot within the limiter's horizon: try again when one may be free."""
    return FinishRequeue(
        message=message, delay=wait, outcome="deferred", error_class="rate_limit", error=None
    )
