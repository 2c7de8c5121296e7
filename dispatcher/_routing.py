"""Who can be reached where: recipients, preferences, quiet hours and fallback order."""

from __future__ import annotations

import json
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from outbox.dispatcher.channels.base import PushSubscription, Recipient

DEFAULT_FALLBACK_ORDER: tuple[str, ...] = ("push", "email", "telegram")


@dataclass(frozen=True, kw_only=True)
class RecipientRecord:
    """A row of ``outbox.recipient`` with its addresses and push subscriptions.

    Email and Telegram keep their own fields (with their states); every other
    channel's usable address is in ``channel_addresses`` (an address the provider
    refused or the user turned off is left out: the channel cannot reach them).
    """

    user_id: str
    email: str | None = None
    telegram_chat_id: int | None = None
    timezone: str = "UTC"
    quiet_hours: tuple[time, time] | None = None
    disabled_channels: frozenset[str] = frozenset()
    campaign_opt_out: bool = False
    fallback_order: tuple[str, ...] | None = None
    email_undeliverable: bool = False
    telegram_blocked: bool = False
    subscriptions: tuple[PushSubscription, ...] = ()
    channel_addresses: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> RecipientRecord:
        """Build from a row of the ``recipients`` query."""
        (
            user_id,
            timezone,
            quiet_start,
            quiet_end,
            disabled,
            opt_out,
            order,
            addresses,
            subscriptions,
        ) = row
        subs = json.loads(subscriptions) if isinstance(subscriptions, str) else subscriptions
        rows = json.loads(addresses) if isinstance(addresses, str) else addresses
        by_channel = {channel: (address, usable) for channel, address, usable in rows or ()}
        email, email_usable = by_channel.pop("email", (None, True))
        chat, chat_usable = by_channel.pop("telegram", (None, True))
        return cls(
            user_id=user_id,
            email=email,
            # the column's CHECK keeps it a 64-bit integer in plain decimal
            telegram_chat_id=None if chat is None else int(chat),
            email_undeliverable=not email_usable,
            telegram_blocked=not chat_usable,
            channel_addresses={c: a for c, (a, usable) in by_channel.items() if usable},
            timezone=timezone or "UTC",
            quiet_hours=(quiet_start, quiet_end) if quiet_start is not None else None,
            disabled_channels=frozenset(disabled or ()),
            campaign_opt_out=bool(opt_out),
            fallback_order=tuple(order) if order else None,
            subscriptions=tuple(
                PushSubscription(endpoint=e, p256dh=p, auth=a) for e, p, a in subs or ()
            ),
        )

    def addresses(self) -> Recipient:
        """What a channel may use: bounced emails and blocked chats are left out."""
        return Recipient(
            user_id=self.user_id,
            email=None if self.email_undeliverable else self.email,
            telegram_chat_id=None if self.telegram_blocked else self.telegram_chat_id,
            push_subscriptions=self.subscriptions,
            addresses=self.channel_addresses,
        )

    def quiet_until(self, now: datetime) -> datetime | None:
        """The end of the quiet window ``now`` falls in (user's timezone), or None."""
        if self.quiet_hours is None:
            return None
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            zone = ZoneInfo("UTC")
        local = now.astimezone(zone)
        start, end = self.quiet_hours
        today_end = datetime.combine(local.date(), end, tzinfo=zone)
        clock = local.time()
        if start == end:
            return None
        if start < end:  # e.g. 13:00-15:00
            return today_end if start <= clock < end else None
        # across midnight, e.g. 22:00-07:00
        if clock >= start:
            return today_end + timedelta(days=1)
        if clock < end:
            return today_end
        return None


def next_channel(
    current: str,
    fallback: Sequence[str] | None,
    recipient: RecipientRecord | None,
    *,
    allowed: Container[str] | None = None,
) -> tuple[str, tuple[str, ...]] | None:
    """The channel to try after ``current`` and the ones left after it, or None.

    An explicit ``fallback`` list on the message wins; otherwise the user's
    preferred order (any registered channel, plugins' too), else push, email,
    telegram. Channels the user disabled, and
    with ``allowed`` (the user's topic preference) the ones it leaves out, are
    passed over. After the last channel the list left is empty, which the row
    stores as ``'{}'`` (no more channels), never NULL (the default order).
    """
    if fallback is not None:
        remaining = [c for c in fallback if c != current]
    else:
        order = (recipient.fallback_order if recipient else None) or DEFAULT_FALLBACK_ORDER
        remaining = [c for c in order if c != current]
    disabled = recipient.disabled_channels if recipient else frozenset()
    remaining = [c for c in remaining if c not in disabled]
    if allowed is not None:
        remaining = [c for c in remaining if c in allowed]
    if not remaining:
        return None
    return remaining[0], tuple(remaining[1:])
