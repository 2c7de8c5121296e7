"""A dispatcher lingers while producers commit steadily: no NOTIFY per commit.

Real PostgreSQL, the dispatcher in-process, a producer in a thread committing one
message every few milliseconds, and a listener counting what producers send on
``outbox_wakeup``. Asleep on LISTEN after every small claim, the dispatcher would
have (almost) every one of those commits send a NOTIFY, which PostgreSQL serializes
on one lock at commit; lingering (``OUTBOX_LINGER_SECONDS``) it stays awake and
takes what arrived meanwhile as one batch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import psycopg
import pytest

from outbox import ConfigurationError, Settings
from outbox.dispatcher import Dispatcher
from tests.integration.test_dispatcher import (
    ALERT,
    rows,
    running,
    seed_users,
    settings_for,
    wait_for,
)
from tests.support.channels import RecordingChannel

MESSAGES = 150
GAP_SECONDS = 0.003


def produce(database_url: str, done: threading.Event) -> None:
    """Commit MESSAGES enqueues, one every GAP_SECONDS, each in its own transaction."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        for n in range(MESSAGES):
            conn.execute(
                "SELECT outbox.enqueue('email', 'price_alert', %s, %s)",
                [f"u{n % 3 + 1}", psycopg.types.json.Jsonb(ALERT)],
            )
            time.sleep(GAP_SECONDS)
    done.set()


def notifications(listener: psycopg.Connection[Any]) -> int:
    """NOTIFYs on outbox_wakeup received so far by ``listener``."""
    return sum(1 for _ in listener.notifies(timeout=0.2))


async def stream_through(
    database_url: str, admin: psycopg.Connection[Any], linger: float
) -> tuple[int, int]:
    """Stream MESSAGES to an idle dispatcher lingering ``linger`` seconds; how many
    NOTIFYs the producer's commits sent, and how many messages were delivered."""
    channel = RecordingChannel("email")
    dispatcher = Dispatcher(
        settings_for(database_url, poll_interval=30.0, linger=linger), {"email": channel}
    )
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN outbox_wakeup")
        async with running(dispatcher):
            await wait_for(lambda: rows(admin, "SELECT count(*) FROM outbox.sleeper") == [(1,)])
            notifications(listener)  # none so far; start counting from here
            done = threading.Event()
            producer = threading.Thread(target=produce, args=(database_url, done))
            producer.start()
            try:
                await wait_for(done.is_set, timeout=60.0)
                await wait_for(lambda: len(channel.sent) >= MESSAGES, timeout=30.0)
            finally:
                producer.join()
        return notifications(listener), len(channel.sent)


async def test_a_lingering_dispatcher_is_not_notified_per_commit(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 3)
    # generous: a CI machine may stall the producer longer than 5 ms now and then
    lingering, delivered = await stream_through(database_url, admin, linger=0.05)
    assert delivered == MESSAGES
    # the first commit wakes it; then it stays awake while the commits go on
    assert lingering <= MESSAGES // 10, lingering
    # the measurement can tell: without lingering most commits find it asleep
    eager, delivered = await stream_through(database_url, admin, linger=0.0)
    assert delivered == MESSAGES
    assert eager > 2 * lingering + 10, (eager, lingering)


async def test_an_idle_dispatcher_still_sleeps_after_lingering(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    """Lingering ends with the first claim that finds nothing: the dispatcher
    registers as a sleeper again, and a lone message wakes it by NOTIFY."""
    seed_users(admin, 1)
    channel = RecordingChannel("email")
    dispatcher = Dispatcher(
        settings_for(database_url, poll_interval=30.0, linger=0.05), {"email": channel}
    )
    sleeping = "SELECT count(*) FROM outbox.sleeper"
    async with running(dispatcher):
        await wait_for(lambda: rows(admin, sleeping) == [(1,)])
        for n in (1, 2):
            committed = time.monotonic()
            admin.execute(
                "SELECT outbox.enqueue('email', 'price_alert', 'u1', %s)",
                [psycopg.types.json.Jsonb(ALERT)],
            )
            await wait_for(lambda n=n: len(channel.sent) == n, timeout=5.0)  # type: ignore[misc]
            assert time.monotonic() - committed < 2.0  # a NOTIFY, not the 30 s poll
            await wait_for(lambda: rows(admin, sleeping) == [(1,)], timeout=5.0)
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("raw", ["nan", "inf", "-0.1", "1.5", "soon"])
def test_the_linger_must_be_a_duration_up_to_a_second(raw: str) -> None:
    with pytest.raises(ConfigurationError, match="OUTBOX_LINGER_SECONDS"):
        Settings.from_env(
            {"OUTBOX_DATABASE_URL": "postgresql://x@h/db", "OUTBOX_LINGER_SECONDS": raw}
        )


def test_the_linger_defaults_to_five_milliseconds() -> None:
    env = {"OUTBOX_DATABASE_URL": "postgresql://x@h/db"}
    assert Settings.from_env(env).linger == 0.005
    assert Settings.from_env({**env, "OUTBOX_LINGER_SECONDS": "0"}).linger == 0.0


@pytest.mark.parametrize("name", ["OUTBOX_POLL_INTERVAL", "OUTBOX_LEASE_SECONDS"])
def test_no_duration_setting_takes_nan(name: str) -> None:
    env = {"OUTBOX_DATABASE_URL": "postgresql://x@h/db", name: "nan"}
    with pytest.raises(ConfigurationError, match=f"{name} must be a finite number"):
        Settings.from_env(env)
