"""Recipients for tests, many at once: since outbox_0010 a user's addresses are rows of
``outbox.recipient_address`` (through ``outbox.set_address``), not recipient columns.

    seed_recipients(admin, 50)                      # u1..u50, u1@example.com.., chats 1..50
    seed_recipients(admin, 3, channels=("email",))  # email only

A single user is simpler with ``outbox.upsert_recipient(admin, "u1", email=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

SEED = """
SELECT outbox.set_address(
           %(prefix)s || g, a.channel,
           CASE a.channel WHEN 'email' THEN %(email_prefix)s || g || '@example.com'
                          ELSE CAST(g + %(chat_offset)s AS text) END)
  FROM generate_series(1, %(count)s) g, unnest(CAST(%(channels)s AS text[])) a(channel)
"""


def seed_recipients(
    conn: psycopg.Connection[Any],
    count: int,
    *,
    prefix: str = "u",
    email_prefix: str | None = None,
    channels: Sequence[str] = ("email", "telegram"),
    chat_offset: int = 0,
) -> None:
    """Users ``<prefix>1..<prefix><count>``: email ``<email_prefix><n>@example.com``
    (``email_prefix`` defaults to ``prefix``) and Telegram chat ``n + chat_offset``,
    on the ``channels`` asked for."""
    conn.execute(
        SEED,
        {
            "prefix": prefix,
            "email_prefix": prefix if email_prefix is None else email_prefix,
            "count": count,
            "channels": list(channels),
            "chat_offset": chat_offset,
        },
    )


def set_addresses(conn: psycopg.Connection[Any], addresses: dict[str, dict[str, object]]) -> None:
    """``{user: {channel: address}}`` through ``outbox.set_address`` (chat ids as ints
    are fine); creates the recipients that do not exist."""
    for user, by_channel in addresses.items():
        for channel, address in by_channel.items():
            conn.execute(
                "SELECT outbox.set_address(%s, %s, %s)",
                [user, channel, None if address is None else str(address)],
            )


def mark_undeliverable(conn: psycopg.Connection[Any], user: str, channel: str = "email") -> None:
    """What a bounce does to ``user``'s address on ``channel``."""
    conn.execute(
        "UPDATE outbox.recipient_address SET undeliverable_since = now()"
        " WHERE user_id = %s AND channel = %s",
        [user, channel],
    )
