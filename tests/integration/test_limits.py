"""Cluster-wide rate limits and circuit breakers against real PostgreSQL.

Each test runs two limiters (or breakers) on two connection pools, as two dispatcher
replicas would, and checks what they left in ``outbox.rate_limit`` and
``outbox.channel_state``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from outbox._settings import parse_rate_limits
from outbox.dispatcher._limits import CircuitBreaker, RateLimiter, Reservation

LIMITS = parse_rate_limits("email=100/m,telegram=20/s,telegram_chat=1/s")
BOT = 1.25 / 20  # (one second + 0.25 s of jitter allowance) / 20
CHAT = 1.25
SLACK = 0.05  # exact in the database; each reply takes its own time to arrive

# Times compared on this side are database times mapped onto time.monotonic(), off by
# at most half a round trip (dispatcher._limits._DatabaseClock); on a loaded machine a
# round trip takes far longer than SLACK. Tests measure how long their calls took and
# widen the comparison by that much: a correct limiter passes on any machine, and a
# limiter that hands out a slot one interval too early still fails where calls are fast.


class Stopwatch:
    """The longest of the timed calls: an upper bound on any round trip inside them."""

    def __init__(self) -> None:
        self.longest = 0.0

    async def __call__(self, call: Awaitable[Reservation]) -> Reservation:
        started = time.monotonic()
        try:
            return await call
        finally:
            self.longest = max(self.longest, time.monotonic() - started)

    @property
    def slack(self) -> float:
        return SLACK + self.longest


@asynccontextmanager
async def pools(
    database_url: str, count: int, *, role: str = "outbox_dispatcher"
) -> AsyncIterator[list[AsyncConnectionPool[Any]]]:
    """``count`` pools, each like one replica's, with the dispatcher's privileges only."""
    async with AsyncExitStack() as stack:
        made = []
        for _ in range(count):
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                database_url,
                min_size=1,
                max_size=4,
                open=False,
                kwargs={"autocommit": True, "options": f"-c role={role}"},
            )
            await pool.open(wait=True)
            stack.push_async_callback(pool.close)
            made.append(pool)
        yield made


def slot_rows(admin: psycopg.Connection[Any], prefix: str) -> list[float]:
    rows = admin.execute(
        "SELECT extract(epoch FROM updated_at)::float8 FROM outbox.rate_limit"
        " WHERE starts_with(key, %s) ORDER BY updated_at",
        [prefix],
    ).fetchall()
    return [row[0] for row in rows]


def pace_of(admin: psycopg.Connection[Any], chat_id: int) -> float:
    row = admin.execute(
        "SELECT extract(epoch FROM updated_at)::float8 FROM outbox.rate_limit WHERE key = %s",
        [f"pace:telegram_chat:{chat_id}"],
    ).fetchone()
    assert row is not None
    return float(row[0])


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(sorted(times))]


async def test_two_replicas_take_distinct_slots_evenly_spaced_below_the_bot_limit(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    timed = Stopwatch()
    async with pools(database_url, 2) as (first, second):
        limiters = [RateLimiter(first, LIMITS), RateLimiter(second, LIMITS)]
        started = time.monotonic()
        reservations = await asyncio.gather(
            *(timed(limiters[i % 2].reserve("telegram", chat_id=1000 + i)) for i in range(60))
        )
        burst = time.monotonic() - started
    assert all(r.granted for r in reservations)
    slots = slot_rows(admin, "slot:telegram:")
    assert len(slots) == 60
    assert min(gaps(slots)) >= BOT - 1e-6
    # Each request takes the first free slot at or after its arrival: a burst faster
    # than the calendar fills it without holes; a burst slowed down by a loaded machine
    # may leave the slots it arrived too late for, never more.
    assert slots[-1] - slots[0] <= max(59 * BOT + 0.01, burst + BOT), "slots were left empty"
    for replica in (0, 1):  # one clock mapping per replica
        waits = sorted(s for r in reservations[replica::2] for s in r.slots)
        assert min(gaps(waits)) >= BOT - timed.slack


async def test_a_chat_is_paced_without_holding_back_other_chats(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    timed = Stopwatch()
    async with pools(database_url, 2) as (first, second):
        a, b = RateLimiter(first, LIMITS), RateLimiter(second, LIMITS)
        to_one = [
            timed(a.reserve("telegram", chat_id=1) if i % 2 else b.reserve("telegram", chat_id=1))
            for i in range(4)
        ]
        to_others = [timed(a.reserve("telegram", chat_id=100 + i)) for i in range(4)]
        reservations = await asyncio.gather(*to_one, *to_others)
    one = [r.slots[0] for r in reservations[:4]]
    others = [r.slots[0] for r in reservations[4:]]
    assert min(gaps(one)) >= CHAT - timed.slack
    assert max(others) - min(one) < 1.0 + timed.slack, (
        "messages to other chats waited for a busy chat"
    )
    assert len(slot_rows(admin, "slot:telegram:")) == 8
    assert pace_of(admin, 1) == pytest.approx(
        max(slot_rows(admin, "slot:telegram:")) + CHAT, abs=0.2
    )


async def test_every_part_of_a_split_message_takes_a_bot_slot_and_a_chat_turn(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    async with pools(database_url, 1) as (pool,):
        limiter = RateLimiter(pool, LIMITS)
        timed = Stopwatch()
        three_parts = await timed(limiter.reserve("telegram", chat_id=7, requests=3))
        after = await timed(limiter.reserve("telegram", chat_id=7))
    assert three_parts.granted and len(three_parts.slots) == 3
    assert min(gaps(list(three_parts.slots))) >= CHAT - timed.slack
    assert three_parts.spread == pytest.approx(2 * CHAT, abs=timed.slack)
    assert after.slots[0] - three_parts.slots[-1] >= CHAT - timed.slack
    assert len(slot_rows(admin, "slot:telegram:")) == 4


async def test_a_reservation_beyond_max_wait_takes_nothing_and_is_deferred(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    async with pools(database_url, 1) as (pool,):
        limiter = RateLimiter(pool, LIMITS, max_wait=2.0)
        timed = Stopwatch()
        started = time.monotonic()
        granted = [await timed(limiter.reserve("telegram", chat_id=9)) for _ in range(2)]
        pace_before = pace_of(admin, 9)
        refused = await timed(limiter.reserve("telegram", chat_id=9))
        elapsed = time.monotonic() - started
        other_chat = await timed(limiter.reserve("telegram", chat_id=10))
    assert [r.granted for r in granted] == [True, True]
    # The chat's next turn is two intervals after the first send, counted from when
    # the first was granted: whatever time the calls took since is already spent.
    assert not refused.granted and refused.slots == ()
    assert 2 * CHAT - elapsed - 0.1 <= refused.wait <= 2 * CHAT + 0.1
    assert pace_of(admin, 9) == pace_before
    assert len(slot_rows(admin, "slot:telegram:")) == 3
    assert other_chat.granted and other_chat.wait < 0.2 + timed.slack


async def test_a_multi_part_message_beyond_max_wait_gives_its_slots_back(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    limits = parse_rate_limits("email=2/s")
    async with pools(database_url, 1) as (pool,):
        limiter = RateLimiter(pool, limits, max_wait=1.0)
        first = await limiter.reserve("email", requests=2)
        refused = await limiter.reserve("email", requests=2)
    assert first.granted and first.spread == pytest.approx(0.625, abs=0.02)
    assert not refused.granted and refused.wait > 1.0
    assert len(slot_rows(admin, "slot:email:")) == 2


async def test_unlimited_channels_and_missing_chats_reserve_nothing(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    async with pools(database_url, 1) as (pool,):
        limiter = RateLimiter(pool, parse_rate_limits("telegram_chat=1/s"))
        push = await limiter.reserve("push")
        no_chat = await limiter.reserve("telegram", chat_id=None)
        paced = [await limiter.reserve("telegram", chat_id=5) for _ in range(2)]
    assert push == no_chat == Reservation(granted=True, wait=0.0)
    assert paced[1].slots[0] - paced[0].slots[0] >= CHAT - SLACK
    assert slot_rows(admin, "slot:") == []


async def test_past_slots_and_paces_are_forgotten(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    admin.execute(
        "INSERT INTO outbox.rate_limit (key, tokens, updated_at) VALUES"
        " ('slot:telegram:1', 0, now() - interval '1 minute'),"
        " ('pace:telegram_chat:1', 0, now() - interval '1 minute'),"
        " ('telegram', 1, now() - interval '1 minute')"
    )
    async with pools(database_url, 1) as (pool,):
        await RateLimiter(pool, LIMITS).reserve("telegram", chat_id=2)
    keys = {row[0] for row in admin.execute("SELECT key FROM outbox.rate_limit").fetchall()}
    assert "slot:telegram:1" not in keys and "pace:telegram_chat:1" not in keys
    assert "telegram" in keys and "pace:telegram_chat:2" in keys


# --- circuit breaker -----------------------------------------------------------------


def breaker_state(admin: psycopg.Connection[Any]) -> tuple[int, bool | None, float | None]:
    row = admin.execute(
        "SELECT failures, paused_until > now(),"
        " extract(epoch FROM paused_until - now())::float8"
        " FROM outbox.channel_state WHERE channel = 'email'"
    ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_a_delivery_by_another_replica_after_the_pause_closes_the_breaker_for_all(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    async with pools(database_url, 2) as (first, second):
        # A pause long enough that a loaded machine cannot outlast it between the
        # trip and the checks below (0.5 s could: the success then was the probe).
        tripped = CircuitBreaker(first, base_seconds=1.5)
        other = CircuitBreaker(second, base_seconds=1.5)
        pause = await tripped.trip("email", "connection refused")
        assert 0.9 < pause <= 1.5
        await tripped.success("email")  # a send that began before the outage ends
        assert breaker_state(admin)[:2] == (1, True)
        await wait_for(lambda: breaker_state(admin)[1] is False)
        await other.success("email")  # the probe, by a replica that never saw it fail
        assert breaker_state(admin) == (0, None, None)
        await tripped.success("email")  # learns that it is closed; nothing to write
        assert breaker_state(admin) == (0, None, None)
        assert await tripped.trip("email", "refused again") == pytest.approx(1.5, abs=0.1)


async def test_reports_during_a_pause_do_not_lengthen_it_and_each_failed_probe_doubles_it(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    async with pools(database_url, 2) as (first, second):
        a = CircuitBreaker(first, base_seconds=0.2, max_seconds=0.7)
        b = CircuitBreaker(second, base_seconds=0.2, max_seconds=0.7)
        pauses = []
        for _ in range(4):  # each round: both replicas see the failed probe
            started = time.monotonic()
            pauses.append(await a.trip("email", "refused"))
            await b.trip("email", "refused")
            remaining = breaker_state(admin)[2]
            elapsed = time.monotonic() - started
            # b's report did not lengthen the pause: what remains is a's pause minus
            # the time gone by since a's trip (at most the time these calls took).
            assert remaining is not None
            assert pauses[-1] - elapsed - 0.01 <= remaining <= pauses[-1] + 0.01
            await wait_for(lambda: breaker_state(admin)[1] is False)
    assert pauses == pytest.approx([0.2, 0.4, 0.7, 0.7], abs=0.05)
    assert breaker_state(admin)[0] == 4
