"""Recipients: addresses, preferences and push subscriptions.

Like enqueue, these run on the caller's connection or session and never begin,
commit, roll back or flush. They need a role that is a member of
``outbox_recipient_writer`` (the service that registers users); ``outbox_producer``
alone may not write or read addresses, by design.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from outbox._db import fetch_one, fetch_one_async
from outbox._enqueue import check_channel, check_text
from outbox._errors import InvalidMessage

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_BASE64URL = re.compile(r"^[A-Za-z0-9_\-]+={0,2}$")
INT64 = range(-(2**63), 2**63)


@dataclass(frozen=True, kw_only=True, slots=True)
class PushSubscriptionRecord:
    """One stored browser subscription of a user (``outbox.push_subscription``)."""

    id: int
    endpoint: str
    p256dh: str
    auth: str
    created_at: datetime
    last_used_at: datetime | None


def _channels(name: str, value: Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise InvalidMessage(f"{name} must be a list of channel names")
    return [check_channel(item) for item in value]


def recipient_params(
    user_id: str,
    *,
    email: str | None = None,
    telegram_chat_id: int | None = None,
    timezone: str | None = None,
    quiet_hours: tuple[time, time] | None = None,
    disabled_channels: Sequence[str] | None = None,
    campaign_opt_out: bool | None = None,
    fallback_order: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Validate a recipient update; return the ``upsert_recipient`` parameters."""
    check_text("user_id", user_id)
    if email is not None:
        check_text("email", email, max_length=254)
        if not _EMAIL.match(email) or "\r" in email or "\n" in email:
            raise InvalidMessage(f"email {email!r} is not an address")
    if telegram_chat_id is not None:
        if isinstance(telegram_chat_id, bool) or not isinstance(telegram_chat_id, int):
            raise InvalidMessage("telegram_chat_id must be an integer")
        if telegram_chat_id not in INT64:
            raise InvalidMessage("telegram_chat_id does not fit in 64 bits")
    if timezone is not None:
        try:
            ZoneInfo(check_text("timezone", timezone, max_length=64))
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidMessage(f"unknown timezone {timezone!r}") from None
    if quiet_hours is not None and (
        len(quiet_hours) != 2 or not all(isinstance(t, time) for t in quiet_hours)
    ):
        raise InvalidMessage("quiet_hours must be a (start, end) pair of datetime.time")
    return {
        "user_id": user_id,
        "email": email,
        "telegram_chat_id": telegram_chat_id,
        "timezone": timezone,
        "set_quiet_hours": quiet_hours is not None,
        "quiet_hours_start": quiet_hours[0] if quiet_hours else None,
        "quiet_hours_end": quiet_hours[1] if quiet_hours else None,
        "disabled_channels": _channels("disabled_channels", disabled_channels),
        "campaign_opt_out": campaign_opt_out,
        "fallback_order": _channels("fallback_order", fallback_order),
    }


def subscription_params(user_id: str, subscription_info: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a browser ``PushSubscription.toJSON()`` object."""
    check_text("user_id", user_id)
    if not isinstance(subscription_info, Mapping):
        raise InvalidMessage("subscription_info must be a mapping with endpoint and keys")
    endpoint = subscription_info.get("endpoint")
    keys = subscription_info.get("keys")
    if not isinstance(endpoint, str) or not endpoint.startswith("https://"):
        raise InvalidMessage("subscription endpoint must be an https:// URL")
    check_text("endpoint", endpoint, max_length=2048)
    if not isinstance(keys, Mapping):
        raise InvalidMessage("subscription_info needs keys.p256dh and keys.auth")
    p256dh, auth = keys.get("p256dh"), keys.get("auth")
    for name, value in (("p256dh", p256dh), ("auth", auth)):
        if not isinstance(value, str) or not _BASE64URL.match(value) or len(value) > 200:
            raise InvalidMessage(f"subscription key {name} must be base64url text")
    return {"user_id": user_id, "endpoint": endpoint, "p256dh": p256dh, "auth": auth}


def upsert_recipient(
    conn: Any,
    user_id: str,
    *,
    email: str | None = None,
    telegram_chat_id: int | None = None,
    timezone: str | None = None,
    quiet_hours: tuple[time, time] | None = None,
    disabled_channels: Sequence[str] | None = None,
    campaign_opt_out: bool | None = None,
    fallback_order: Sequence[str] | None = None,
) -> None:
    """Create or update a recipient in the caller's transaction.

    Only the arguments given (not None) change; a new email address clears an
    earlier bounce, a new Telegram chat id clears an earlier block.
    """
    params = recipient_params(
        user_id,
        email=email,
        telegram_chat_id=telegram_chat_id,
        timezone=timezone,
        quiet_hours=quiet_hours,
        disabled_channels=disabled_channels,
        campaign_opt_out=campaign_opt_out,
        fallback_order=fallback_order,
    )
    fetch_one(conn, "upsert_recipient", params)


async def upsert_recipient_async(
    conn: Any,
    user_id: str,
    *,
    email: str | None = None,
    telegram_chat_id: int | None = None,
    timezone: str | None = None,
    quiet_hours: tuple[time, time] | None = None,
    disabled_channels: Sequence[str] | None = None,
    campaign_opt_out: bool | None = None,
    fallback_order: Sequence[str] | None = None,
) -> None:
    """Asynchronous :func:`upsert_recipient`."""
    params = recipient_params(
        user_id,
        email=email,
        telegram_chat_id=telegram_chat_id,
        timezone=timezone,
        quiet_hours=quiet_hours,
        disabled_channels=disabled_channels,
        campaign_opt_out=campaign_opt_out,
        fallback_order=fallback_order,
    )
    await fetch_one_async(conn, "upsert_recipient", params)


def add_push_subscription(conn: Any, user_id: str, subscription_info: Mapping[str, Any]) -> int:
    """Store a browser push subscription for ``user_id``; return its id.

    ``subscription_info`` is what the browser's ``PushSubscription.toJSON()``
    gives: ``{"endpoint": ..., "keys": {"p256dh": ..., "auth": ...}}``. The
    endpoint is unique: subscribing it again moves it to this user.
    """
    row = fetch_one(conn, "add_push_subscription", subscription_params(user_id, subscription_info))
    assert row is not None
    return int(row[0])


async def add_push_subscription_async(
    conn: Any, user_id: str, subscription_info: Mapping[str, Any]
) -> int:
    """Asynchronous :func:`add_push_subscription`."""
    params = subscription_params(user_id, subscription_info)
    row = await fetch_one_async(conn, "add_push_subscription", params)
    assert row is not None
    return int(row[0])


def _subscriptions(row: Any) -> list[PushSubscriptionRecord]:
    if row is None or row[0] is None:
        return []
    # psycopg parses json; some SQLAlchemy set-ups hand it over as text
    items = json.loads(row[0]) if isinstance(row[0], str) else row[0]
    return [
        PushSubscriptionRecord(
            id=item[0],
            endpoint=item[1],
            p256dh=item[2],
            auth=item[3],
            created_at=datetime.fromisoformat(item[4]),
            last_used_at=datetime.fromisoformat(item[5]) if item[5] else None,
        )
        for item in items
    ]


def _endpoint_params(user_id: str, endpoint: str) -> dict[str, Any]:
    # the limits add_push_subscription stores under: anything else is a caller's bug
    check_text("endpoint", endpoint, max_length=2048)
    return {"user_id": check_text("user_id", user_id), "endpoint": endpoint}


def list_push_subscriptions(conn: Any, user_id: str) -> list[PushSubscriptionRecord]:
    """The user's browser push subscriptions, oldest first."""
    params = {"user_id": check_text("user_id", user_id)}
    return _subscriptions(fetch_one(conn, "list_push_subscriptions", params))


async def list_push_subscriptions_async(conn: Any, user_id: str) -> list[PushSubscriptionRecord]:
    """Asynchronous :func:`list_push_subscriptions`."""
    params = {"user_id": check_text("user_id", user_id)}
    return _subscriptions(await fetch_one_async(conn, "list_push_subscriptions", params))


def remove_push_subscription(conn: Any, user_id: str, endpoint: str) -> bool:
    """Delete the user's subscription of ``endpoint`` (the browser unsubscribed);
    False when the user has none there (unknown, or another user's).
    """
    row = fetch_one(conn, "remove_push_subscription", _endpoint_params(user_id, endpoint))
    return row is not None and row[0] is True


async def remove_push_subscription_async(conn: Any, user_id: str, endpoint: str) -> bool:
    """Asynchronous :func:`remove_push_subscription`."""
    row = await fetch_one_async(
        conn, "remove_push_subscription", _endpoint_params(user_id, endpoint)
    )
    return row is not None and row[0] is True
