"""Channels are data: which ones exist is a table (``outbox.channel``), not code.

The built-in channels are seeded by the migration. A plugin's channel
(``OUTBOX_CHANNEL_PLUGINS=slack=pkg.mod:factory``) is registered once per database,
by an operator (``outbox channels register slack``) or by the plugin's own
migration calling SQL ``outbox.register_channel('slack')``; from then on producers
may enqueue to it and users may have an address on it (:func:`outbox.set_address`).
Registering needs ``outbox_operator``; reading the list, any outbox role. Like the
rest of the producer API these run on the caller's connection and never commit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from outbox._db import fetch_one, fetch_one_async
from outbox._enqueue import check_channel
from outbox._queries import QUERIES


@dataclass(frozen=True, kw_only=True, slots=True)
class ChannelRecord:
    """One row of ``outbox.channel``."""

    name: str
    builtin: bool
    created_at: datetime


def register_channel(conn: Any, name: str) -> bool:
    """Add channel ``name``; True when it is new, False when it existed already.

    Raises :class:`~outbox.InvalidMessage` unless ``name`` is 1-32 characters of
    a-z, 0-9 and _ starting with a letter.
    """
    row = fetch_one(conn, "register_channel", {"name": check_channel(name)})
    return bool(row and row[0])


async def register_channel_async(conn: Any, name: str) -> bool:
    """Asynchronous :func:`register_channel`."""
    row = await fetch_one_async(conn, "register_channel", {"name": check_channel(name)})
    return bool(row and row[0])


def list_channels(conn: Any) -> list[ChannelRecord]:
    """Every channel of the database, built-ins first (a psycopg connection)."""
    rows = conn.execute(QUERIES["channels"]).fetchall()
    return [ChannelRecord(name=n, builtin=b, created_at=c) for n, b, c in rows]
