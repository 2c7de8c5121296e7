"""Recipients: addresses, preferences and push subscriptions.

Addresses are rows of ``outbox.recipient_address``, one per user and channel, with
what the providers said about them (undeliverable since, disabled since); push
subscriptions are rows of ``outbox.push_subscription`` (a user has many), and inapp
needs no address. :func:`upsert_recipient` sets email, Telegram and SMS with the
rest of a recipient; :func:`set_address` sets any channel's, a plugin's included.

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
_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
MAX_ADDRESS_LENGTH = 1024
"""The longest address of any channel (``outbox.recipient_address``)."""
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
    phone: str | None = None,
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
    if phone is not None:
        check_phone(phone)
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
        "phone": phone,
        "timezone": timezone,
        "set_quiet_hours": quiet_hours is not None,
        "quiet_hours_start": quiet_hours[0] if quiet_hours else None,
        "quiet_hours_end": quiet_hours[1] if quiet_hours else None,
        "disabled_channels": _channels("disabled_channels", disabled_channels),
        "campaign_opt_out": campaign_opt_out,
        "fallback_order": _channels("fallback_order", fallback_order),
    }


def check_phone(phone: object) -> str:
    """Return ``phone`` if it is an E.164 number (``+``, country code, at most 15
    digits, no leading 0), else raise :class:`~outbox.InvalidMessage`.
    """
    if not isinstance(phone, str) or not _E164.match(phone):
        raise InvalidMessage(
            "phone must be an E.164 number: + then 7-15 digits, the first not 0"
            " (e.g. +4915112345678, no spaces or dashes)"
        )
    return phone


def address_params(user_id: str, channel: str, address: str | None) -> dict[str, Any]:
    """Validate a :func:`set_address` call; return the ``set_address`` parameters.

    Email, Telegram and SMS addresses get their own checks (the database repeats
    them); any other channel's is 1-1024 characters without control characters.
    """
    check_text("user_id", user_id)
    check_channel(channel)
    if channel in ("push", "inapp"):
        raise InvalidMessage(
            f"channel {channel} takes no address: push addresses are subscriptions"
            " (add_push_subscription), inapp reaches every user"
        )
    if address is None:
        return {"user_id": user_id, "channel": channel, "address": None}
    check_text("address", address, max_length=MAX_ADDRESS_LENGTH)
    if any(ord(c) < 32 or ord(c) == 127 for c in address):
        raise InvalidMessage("address contains a control character")
    if channel == "email":
        recipient_params(user_id, email=address)
    elif channel == "telegram":
        if not re.fullmatch(r"-?(0|[1-9][0-9]{0,18})", address) or int(address) not in INT64:
            raise InvalidMessage("a Telegram address is a chat id: a 64-bit integer")
    elif channel == "sms":
        check_phone(address)
    return {"user_id": user_id, "channel": channel, "address": address}


def set_address(conn: Any, user_id: str, channel: str, address: str | None) -> None:
    """Set ``user_id``'s address on ``channel`` (any registered channel, a plugin's
    too) in the caller's transaction; ``None`` removes it. Creates the recipient if
    needed.

    A new address clears what the provider said about the old one (undeliverable,
    disabled); the same address again keeps it. Raises
    :class:`~outbox.InvalidMessage` for an unknown channel or a malformed address
    (a Telegram address is the chat id as text, an SMS address an E.164 number).
    Needs ``outbox_recipient_writer``.
    """
    fetch_one(conn, "set_address", address_params(user_id, channel, address))


async def set_address_async(conn: Any, user_id: str, channel: str, address: str | None) -> None:
    """Asynchronous :func:`set_address`."""
    await fetch_one_async(conn, "set_address", address_params(user_id, channel, address))


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
    phone: str | None = None,
    timezone: str | None = None,
    quiet_hours: tuple[time, time] | None = None,
    disabled_channels: Sequence[str] | None = None,
    campaign_opt_out: bool | None = None,
    fallback_order: Sequence[str] | None = None,
) -> None:
    """Create or update a recipient in the caller's transaction.

    Only the arguments given (not None) change; a new email address clears an
    earlier bounce, a Telegram chat id given again clears an earlier block, a new
    ``phone`` (E.164, e.g. ``"+4915112345678"``: the SMS channel's address) clears an
    earlier STOP or invalid-number report. Raises :class:`~outbox.InvalidMessage`
    for a malformed value, before anything is written.
    """
    params = recipient_params(
        user_id,
        email=email,
        telegram_chat_id=telegram_chat_id,
        phone=phone,
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
    phone: str | None = None,
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
        phone=phone,
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
