"""Rate limits and the circuit breaker inside a running dispatcher (real PostgreSQL and
a real Bot API server on loopback)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb

from outbox import Settings
from outbox._settings import parse_rate_limits
from outbox.dispatcher import Dispatcher, DispatcherOptions
from outbox.dispatcher.channels.telegram import TelegramChannel
from outbox.testing.telegram import TelegramServer
from tests.support.channels import RecordingChannel

ENTRY = {
    "instrument": "EURUSD",
    "side": "buy",
    "entry_price": "1.0850",
    "volume": "0.5",
    "approval_id": "apr-1",
    "error_reason": "margin check failed",
}
LONG_REASON = " ".join(f"reason{i}." for i in range(1000))  # three Telegram parts


def enqueue(admin: psycopg.Connection[Any], user: str, channel: str, **vars: str) -> int:
    row = admin.execute(
        "SELECT outbox.enqueue(%s, 'position_failure_entry', %s, %s)",
        [channel, user, Jsonb({**ENTRY, **vars})],
    ).fetchone()
    assert row is not None
    return int(row[0])


@asynccontextmanager
async def running(dispatcher: Dispatcher) -> AsyncIterator[Dispatcher]:
    task = asyncio.create_task(dispatcher.run())
    try:
        yield dispatcher
    finally:
        dispatcher.stop()
        await asyncio.wait_for(task, 30)


async def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_each_part_of_a_split_telegram_message_waits_for_its_own_turn_in_the_chat(
    database_url: str, admin: psycopg.Connection[Any], telegram_server: TelegramServer
) -> None:
    admin.execute("SELECT outbox.set_address('u1', 'telegram', '77')")
    long_id = enqueue(admin, "u1", "telegram", error_reason=LONG_REASON)
    short_id = enqueue(admin, "u1", "telegram")
    settings = Settings(
        database_url=database_url,
        poll_interval=0.2,
        rate_limits=parse_rate_limits("telegram=20/s,telegram_chat=1/s"),
        **telegram_server.settings_overrides(),
    )
    channel = TelegramChannel(settings, transport=httpx.AsyncHTTPTransport())
    dispatcher = Dispatcher(
        settings, {"telegram": channel}, options=DispatcherOptions(until_idle=True)
    )
    await asyncio.wait_for(dispatcher.run(), 30)

    requests = telegram_server.requests
    assert [r.status for r in requests] == [200] * 4
    arrivals = [r.received_at for r in requests]
    assert min(b - a for a, b in itertools.pairwise(arrivals)) >= 1.0, arrivals
    assert telegram_server.max_per_second(77) == 1
    texts = [m.plain_text for m in telegram_server.messages_for(77)]
    long_parts = [t for t in texts if "reason" in t]
    assert len(long_parts) == 3 and "reason999." in long_parts[-1]
    sent = admin.execute(
        "SELECT message_id FROM outbox.attempt WHERE outcome = 'sent' ORDER BY message_id"
    ).fetchall()
    assert sent == [(long_id,), (short_id,)]
    slots = admin.execute(
        "SELECT count(*) FROM outbox.rate_limit WHERE starts_with(key, 'slot:telegram:')"
    ).fetchone()
    assert slots == (4,), "every request takes a slot of the bot's calendar"


async def test_a_breaker_tripped_by_another_replica_is_closed_by_this_ones_delivery(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    admin.execute("SELECT outbox.set_address('u1', 'email', 'u1@example.com')")
    admin.execute(
        "INSERT INTO outbox.channel_state (channel, failures, paused_until, last_error)"
        " VALUES ('email', 3, now() + interval '1 second', 'connection refused')"
    )
    enqueue(admin, "u1", "email")
    channel = RecordingChannel("email")
    settings = replace(Settings(database_url=database_url, rate_limits={}), poll_interval=0.2)
    async with running(Dispatcher(settings, {"email": channel})):
        await asyncio.sleep(0.5)
        assert channel.sent == [], "a paused channel was claimed"
        await wait_for(lambda: len(channel.sent) == 1)
        await wait_for(
            lambda: (
                admin.execute(
                    "SELECT failures, paused_until, last_error FROM outbox.channel_state"
                ).fetchall()
                == [(0, None, None)]
            )
        )


async def test_an_idle_dispatcher_does_not_claim_in_a_loop_while_a_paused_channel_has_a_backlog(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    """Due messages on a paused channel are due but not claimable: the dispatcher waits
    for the pause's end (or its poll), not a claim after a claim (it made about 165
    transactions a second before)."""
    admin.execute(
        "SELECT outbox.set_address('u' || g, 'email', 'u' || g || '@example.com')"
        " FROM generate_series(1, 20) g"
    )
    admin.execute(
        "INSERT INTO outbox.channel_state (channel, failures, paused_until, last_error)"
        " VALUES ('email', 3, now() + interval '3 seconds', 'connection refused')"
    )
    for g in range(1, 21):
        enqueue(admin, f"u{g}", "email")
    channel = RecordingChannel("email")
    settings = replace(Settings(database_url=database_url, rate_limits={}), poll_interval=1.0)

    def transactions() -> int:
        row = admin.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()"
        ).fetchone()
        admin.execute("SELECT pg_stat_clear_snapshot()")
        assert row is not None
        return int(row[0])

    async with running(Dispatcher(settings, {"email": channel})):
        await asyncio.sleep(0.5)  # started, claimed nothing, went idle
        before = transactions()
        await asyncio.sleep(1.5)
        during = transactions() - before
        assert channel.sent == [], "a paused channel was claimed"
        # the pause ends about 3 s after it began: delivered without a NOTIFY
        await wait_for(lambda: len(channel.sent) == 20, timeout=10)
    # the admin's own statements count too (two per transactions() call); a loop
    # would be hundreds
    assert during < 40, f"{during} transactions in 1.5 s while the channel was paused"


async def test_expiry_follows_the_databases_clock_when_the_hosts_clock_is_off(
    database_url: str, admin: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dispatcher host whose clock runs an hour fast (no NTP in the container) would
    expire an alert the producer gave 30 minutes, and one an hour slow would send an
    alert expired 30 minutes ago. Expiry follows the database's clock."""
    from datetime import UTC, datetime, timedelta

    from outbox.dispatcher import _clock

    admin.execute("SELECT outbox.set_address('u1', 'email', 'u1@example.com')")
    fresh = admin.execute(
        "SELECT outbox.enqueue('email', 'position_failure_entry', 'u1', %s,"
        " expires_at => now() + interval '30 minutes')",
        [Jsonb(ENTRY)],
    ).fetchone()
    stale = admin.execute(
        "SELECT outbox.enqueue('email', 'position_failure_entry', 'u1', %s,"
        " expires_at => now() + interval '2 seconds')",
        [Jsonb(ENTRY)],
    ).fetchone()
    assert fresh is not None and stale is not None
    time.sleep(2.5)  # the second one expires, by the database's clock
    channel = RecordingChannel("email")
    settings = replace(Settings(database_url=database_url, rate_limits={}), poll_interval=0.2)
    for skew in (timedelta(hours=1), timedelta(hours=-1)):
        monkeypatch.setattr(_clock, "local_now", lambda skew=skew: datetime.now(UTC) + skew)
        admin.execute("UPDATE outbox.message SET next_attempt_at = now()")
        async with running(Dispatcher(settings, {"email": channel})):
            await wait_for(
                lambda: admin.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)
            )
        outcomes = admin.execute(
            "SELECT message_id, outcome FROM outbox.attempt ORDER BY message_id"
        ).fetchall()
        assert outcomes == [(fresh[0], "sent"), (stale[0], "expired")], (skew, outcomes)
        # again, the other way round
        admin.execute("DELETE FROM outbox.attempt")
        for message_id, expires in ((fresh[0], "30 minutes"), (stale[0], "-30 seconds")):
            admin.execute(
                "INSERT INTO outbox.message (id, lane, priority, channel, user_id, template,"
                " vars, expires_at) OVERRIDING SYSTEM VALUE"
                " VALUES (%s, 'transactional', 0, 'email', 'u1', 'position_failure_entry',"
                " %s, now() + CAST(%s AS interval))",
                [message_id, Jsonb(ENTRY), expires],
            )
