"""Before a send: whether this message may go out now, on this channel, to this user.

A pure decision (no database, no event loop): ``None`` means go ahead; otherwise
the finish that ends this lease without a provider call. The rules, in order:

=====================================  =======================================
past its ``expires_at``                expired: never sent, no dead letter
an alert the user acknowledged while   skipped, ``acknowledged``: nothing more
it was in flight                       to send
no ``outbox.recipient`` row            dead, ``unknown_recipient``
campaign, user opted out of campaigns  skipped, ``opted_out``
user disabled the channel              skipped, ``channel_disabled``; the next
                                       channel of the chain gets the message
the user's preference for this topic   skipped, ``preference``; the next channel
(and instrument) excludes the channel  of the chain it allows gets the message; a
                                       position failure with none left is sent
                                       here all the same
campaign inside the user's quiet hours deferred to the end of them,
                                       ``quiet_hours`` (no attempt burned)
no channel of that name configured     deferred 30 s, ``channel_unconfigured``
=====================================  =======================================

A new preference rule goes here, with its row in ``tests/unit/test_presend.py``.
"""

from __future__ import annotations

from collections.abc import Container
from datetime import datetime

from outbox._preferences import UNMUTABLE_PREFIX
from outbox.dispatcher._claimed import Claimed
from outbox.dispatcher._finishes import Finish, FinishDead, FinishHandoff, FinishRequeue
from outbox.dispatcher._routing import RecipientRecord, next_channel

UNCONFIGURED_RETRY_SECONDS = 30.0
"""A message for a channel this dispatcher lacks waits this long for one that has it."""


def presend(
    message: Claimed,
    recipient: RecipientRecord | None,
    *,
    now: datetime,
    configured: Container[str],
) -> Finish | None:
    """The finish that keeps ``message`` from being sent now, or None to send it.

    ``now`` is timezone-aware; ``configured`` holds the channels this dispatcher
    can send on.
    """
    if message.expires_at is not None and now >= message.expires_at:
        return FinishHandoff(
            message=message,
            outcome="expired",
            error_class="expired",
            error=f"not sent by its expires_at {message.expires_at.isoformat()}",
        )
    if message.acknowledged:
        return FinishHandoff(
            message=message,
            outcome="skipped",
            error_class="acknowledged",
            error="the user acknowledged the alert",
        )
    if recipient is None:
        return FinishDead(
            message=message,
            error_class="unknown_recipient",
            error=f"no outbox.recipient row for user {message.user_id!r}",
        )
    campaign = message.lane == "campaign"
    if campaign and recipient.campaign_opt_out:
        return FinishHandoff(
            message=message,
            outcome="skipped",
            error_class="opted_out",
            error="the user opted out of campaigns",
        )
    if message.channel in recipient.disabled_channels:
        follow = next_channel(message.channel, message.fallback, recipient)
        return FinishHandoff(
            message=message,
            outcome="skipped",
            error_class="channel_disabled",
            error=f"the user disabled {message.channel}",
            next_channel=follow[0] if follow else None,
            next_fallback=follow[1] if follow else (),
        )
    allowed = message.allowed_channels()
    if allowed is not None and message.channel not in allowed:
        follow = next_channel(message.channel, message.fallback, recipient, allowed=allowed)
        if follow is None and message.template.startswith(UNMUTABLE_PREFIX):
            # a position failure must reach the trader: when the preference leaves
            # no channel of its chain, it goes out here despite the preference
            return _configured_or_none(message, configured)
        return FinishHandoff(
            message=message,
            outcome="skipped",
            error_class="preference",
            error=f"the user's preference for {message.template} excludes {message.channel}",
            next_channel=follow[0] if follow else None,
            next_fallback=follow[1] if follow else (),
        )
    if campaign:
        quiet_until = recipient.quiet_until(now)
        if quiet_until is not None:
            return FinishRequeue(
                message=message,
                delay=(quiet_until - now).total_seconds(),
                outcome="deferred",
                error_class="quiet_hours",
                error=None,
            )
    return _configured_or_none(message, configured)


def _configured_or_none(message: Claimed, configured: Container[str]) -> Finish | None:
    if message.channel not in configured:
        return FinishRequeue(
            message=message,
            delay=UNCONFIGURED_RETRY_SECONDS,
            outcome="deferred",
            error_class="channel_unconfigured",
            error=f"no {message.channel} channel is configured",
        )
    return None
