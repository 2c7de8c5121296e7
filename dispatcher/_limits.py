"""Limits that hold across every dispatcher replica: rate limits and circuit breakers.

Both keep their state in PostgreSQL, so two replicas together send no faster than
one would, and all of them see one breaker per channel.

Rate limits
    A channel-wide limit (``email``, ``telegram``, ``push``, or any other channel's
    name: "20 a second") is a *calendar*: a grid of send slots
    ``(period + jitter) / count`` seconds apart, each taken by at most one send (a
    row ``slot:<limit>:<n>`` of ``outbox.rate_limit``).
    A per-recipient limit (``telegram_chat``: "1 a second to one chat") is a *pace*:
    the earliest moment of the recipient's next send (a row
    ``pace:<limit>:<recipient>``). A send takes the first free slot at or after its
    recipient's pace and moves the pace one interval past that slot. A message that
    waits for its chat therefore holds back no message to another chat, and no two
    sends share a slot.

    Each provider request takes its own slot: a Telegram text split into three parts
    takes three, spaced by the chat's pace, and the channel waits for them
    (``Envelope.send_slots``).

    The spacing leaves room for ``jitter`` (0.25 s) of scheduling and network delay:
    as long as no send reaches the provider more than that much later than another
    one, no window of one period holds more than ``count`` sends there. (A replica
    that claims and renders a batch of 100 keeps its event loop busy for 50-150 ms,
    and sends due meanwhile go out that much late.) It costs little for slow limits
    (email 100/m: one every 0.6025 s rather than 0.6 s) and a fifth for fast ones
    (Telegram 20/s: 16 a second; 1/s to a chat: one every 1.25 s). A message whose
    first slot lies more than ``max_wait`` ahead takes nothing and is deferred,
    without burning an attempt.

Circuit breakers
    A channel outage (connection refused, authentication failed) pauses the channel
    for every replica (``outbox.channel_state``): 1 s, doubling with each failed
    probe, up to 60 s. While paused, claims skip the channel; when the pause ends, the
    next claimed messages are the probe. A delivery after the pause, by any replica,
    closes the breaker for all of them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from outbox._queries import QUERIES
from outbox._settings import RateLimit
from outbox.dispatcher._store import DATABASE_ERRORS
from outbox.dispatcher.channels.base import Envelope, RenderedTelegram

log = logging.getLogger("outbox.dispatcher")

_FORGET_EVERY = 10.0


@dataclass(frozen=True, kw_only=True)
class Reservation:
    """When the sends of one message may go out, or a deferral."""

    granted: bool
    wait: float
    """Seconds until the first send; when not granted, how long to defer."""
    slots: tuple[float, ...] = ()
    """``time.monotonic()`` instants before which each request may not start (one per
    request; empty when no limit applies)."""

    @property
    def spread(self) -> float:
        """Seconds between the first and the last slot."""
        return self.slots[-1] - self.slots[0] if self.slots else 0.0


def requests_for(envelope: Envelope) -> int:
    """How many provider requests sending ``envelope`` takes (Telegram: one per part)."""
    if isinstance(envelope.content, RenderedTelegram):
        return max(1, len(envelope.content.parts))
    return 1


class _DatabaseClock:
    """Maps the database's clock (epoch seconds) onto this process's ``time.monotonic()``.

    Slots are times on the database's clock. Reading "seconds until the slot" from a
    reply would make every send late by however long the reply sat unread (an event
    loop busy rendering a batch: tens of milliseconds); the mapping instead comes from
    the reply that came back fastest in the last half minute, and is off by at most
    half of that round trip.
    """

    def __init__(self, max_age: float = 30.0) -> None:
        self._max_age = max_age
        self._offset = 0.0
        self._round_trip = math.inf
        self._measured = -math.inf

    def observe(self, sent: float, received: float, database_now: float) -> None:
        """One reading of the database clock, between two ``time.monotonic()`` calls."""
        round_trip = received - sent
        if round_trip <= self._round_trip or received - self._measured > self._max_age:
            self._offset = (sent + received) / 2 - database_now
            self._round_trip, self._measured = round_trip, received

    def local(self, database_time: float) -> float:
        """``time.monotonic()`` at the moment ``database_time`` (epoch seconds)."""
        return database_time + self._offset


class _Deferred(Exception):
    def __init__(self, wait: float) -> None:
        super().__init__(f"deferred {wait:.1f} s")
        self.wait = wait


class RateLimiter:
    """Cluster-wide send calendars (per channel) and paces (per Telegram chat).

    ``limits`` maps ``email``, ``telegram``, ``push`` and ``telegram_chat`` to their
    :class:`~outbox._settings.RateLimit`; a missing name is not limited.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        limits: Mapping[str, RateLimit],
        *,
        max_wait: float = 5.0,
        jitter: float = 0.25,
    ) -> None:
        if jitter < 0:
            raise ValueError("jitter must not be negative")
        self._pool = pool
        self._limits = dict(limits)
        self._max_wait = max_wait
        self._jitter = jitter
        self._next_forget = 0.0
        self._clock = _DatabaseClock()

    def interval(self, name: str) -> float:
        """Seconds between two sends under limit ``name``, the jitter allowance included."""
        limit = self._limits[name]
        return (limit.per_seconds + self._jitter) / limit.count

    async def acquire_for(self, envelope: Envelope) -> Reservation:
        """Reserve every request of ``envelope``, then sleep until the first one."""
        reservation = await self.reserve(
            envelope.channel,
            chat_id=envelope.recipient.telegram_chat_id,
            requests=requests_for(envelope),
        )
        if reservation.granted:
            delay = reservation.slots[0] - time.monotonic() if reservation.slots else 0.0
            if delay > 0:
                await asyncio.sleep(delay)
        return reservation

    async def reserve(
        self, channel: str, *, chat_id: int | None = None, requests: int = 1
    ) -> Reservation:
        """Reserve ``requests`` consecutive sends on ``channel``; all or nothing.

        Never raises for database trouble: the message is deferred by a second.
        """
        # every key but the per-chat pace is a channel's (a plugin's too)
        calendar = channel if channel in self._limits and channel != "telegram_chat" else None
        paces: list[tuple[str, float]] = []
        if channel == "telegram" and chat_id is not None and "telegram_chat" in self._limits:
            paces.append((f"pace:telegram_chat:{chat_id}", self.interval("telegram_chat")))
        if calendar is None and not paces:
            return Reservation(granted=True, wait=0.0)
        slots: list[float] = []
        taken: list[str] = []
        try:
            async with self._pool.connection(timeout=10) as conn:
                await self._forget_past(conn)
                not_before = 0.0
                try:
                    for index in range(max(1, requests)):
                        key, at = await self._take_one(
                            conn, calendar, paces, not_before, first=index == 0
                        )
                        if key is not None:
                            taken.append(key)
                        slots.append(self._clock.local(at))
                        not_before = at
                except _Deferred as deferred:
                    if taken:
                        await conn.execute(QUERIES["release_slots"], {"keys": taken})
                    return Reservation(granted=False, wait=deferred.wait)
        except DATABASE_ERRORS as error:
            log.warning(
                "rate limit unavailable channel=%s error=%s; deferring",
                channel,
                type(error).__name__,
            )
            return Reservation(granted=False, wait=1.0)
        return Reservation(
            granted=True, wait=max(0.0, slots[0] - time.monotonic()), slots=tuple(slots)
        )

    async def _take_one(
        self,
        conn: psycopg.AsyncConnection[Any],
        calendar: str | None,
        paces: list[tuple[str, float]],
        not_before: float,
        *,
        first: bool,
    ) -> tuple[str | None, float]:
        """Take one send: (calendar slot key or None, its time on the database clock).

        One short transaction per send: it locks the recipient's pace, then takes its
        turn on the calendar (always in this order, so replicas cannot deadlock) and
        takes one slot.
        """
        async with conn.transaction():
            earliest, now = not_before, 0.0
            for key, _ in paces:
                sent = time.monotonic()
                row = await (await conn.execute(QUERIES["hold_pace"], {"key": key})).fetchone()
                assert row is not None
                earliest, now = max(earliest, float(row[0])), float(row[1])
                self._clock.observe(sent, time.monotonic(), now)
            if calendar is None:
                at, slot_key = max(earliest, now), None
            else:
                slot_key, at, now = await self._take_slot(conn, calendar, earliest)
            if first and at - now > self._max_wait:
                raise _Deferred(at - now)
            for key, interval in paces:
                await conn.execute(QUERIES["set_pace"], {"key": key, "next_at": at + interval})
        return slot_key, at

    async def _take_slot(
        self, conn: psycopg.AsyncConnection[Any], calendar: str, not_before: float
    ) -> tuple[str, float, float]:
        """(slot key, slot time, database now) of the first free slot of ``calendar``."""
        interval = self.interval(calendar)
        horizon = math.ceil(self._max_wait / interval) + 1
        await conn.execute(QUERIES["hold_calendar"], {"key": f"outbox.calendar:{calendar}"})
        sent = time.monotonic()
        row = await (
            await conn.execute(
                QUERIES["take_slot"],
                {
                    "prefix": f"slot:{calendar}:",
                    "interval": interval,
                    "not_before": not_before,
                    "horizon": horizon,
                },
            )
        ).fetchone()
        if row is None:  # every slot within reach is taken
            raise _Deferred(self._max_wait)
        at, now = float(row[1]), float(row[1]) - float(row[2])
        self._clock.observe(sent, time.monotonic(), now)
        return str(row[0]), at, now

    async def _forget_past(self, conn: psycopg.AsyncConnection[Any]) -> None:
        now = time.monotonic()
        if now < self._next_forget:
            return
        self._next_forget = now + _FORGET_EVERY
        await conn.execute(QUERIES["forget_past_slots"])


class CircuitBreaker:
    """Pauses a channel for every replica during an outage (1 s, doubling, up to 60 s).

    The state lives in ``outbox.channel_state`` and is shared: a pause started by
    one replica stops all of them from claiming the channel, and a delivery after the
    pause, by any replica, closes the breaker for all. To keep deliveries cheap, a
    replica that has not seen the channel fail asks the database at most once every
    ``recheck_seconds`` per channel whether a breaker is left to close.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        base_seconds: float = 1.0,
        max_seconds: float = 60.0,
        recheck_seconds: float = 1.0,
    ) -> None:
        self._pool = pool
        self._base = base_seconds
        self._max = max_seconds
        self._recheck = recheck_seconds
        self._open: set[str] = set()
        self._next_check: dict[str, float] = {}

    async def trip(self, channel: str, error: str) -> float:
        """Record an outage; return how long the channel is paused (seconds)."""
        self._open.add(channel)
        try:
            async with self._pool.connection(timeout=10) as conn:
                row = await (
                    await conn.execute(
                        QUERIES["trip_breaker"],
                        {
                            "channel": channel,
                            "base_seconds": self._base,
                            "max_seconds": self._max,
                            "error": error[:500],
                        },
                    )
                ).fetchone()
        except DATABASE_ERRORS as failure:
            log.warning("breaker not recorded channel=%s error=%s", channel, type(failure).__name__)
            return self._base
        return max(float(row[0]), 0.0) if row and row[0] is not None else self._base

    def settled(self, channel: str) -> bool:
        """True when a delivery on ``channel`` has nothing to record now: this replica
        saw no outage there and asked the database less than ``recheck_seconds`` ago.
        """
        return channel not in self._open and time.monotonic() < self._next_check.get(channel, 0.0)

    async def success(self, channel: str) -> None:
        """Record a delivery: close the channel's breaker, if one is open and its pause over."""
        if self.settled(channel):
            return
        self._next_check[channel] = time.monotonic() + self._recheck
        try:
            async with self._pool.connection(timeout=10) as conn:
                row = await (
                    await conn.execute(QUERIES["close_breaker_after_probe"], {"channel": channel})
                ).fetchone()
        except DATABASE_ERRORS as failure:
            log.warning("breaker not closed channel=%s error=%s", channel, type(failure).__name__)
            return
        if row is not None and row[0]:
            self._open.add(channel)
        else:
            if channel in self._open:
                log.info("channel recovered channel=%s", channel)
            self._open.discard(channel)
