"""SIGTERM with the database gone silent: the dispatcher still stops in bounded time.

Its sends finish, but nothing it writes at shutdown (outcomes, released leases, the
sleeper row) gets an answer: the path to PostgreSQL is a black hole (a TCP proxy
that swallows everything). Before, the last flush retried for ever and the process
was SIGKILLed by whoever waited for it; now the database part of the shutdown has
``SHUTDOWN_DATABASE_SECONDS`` and the leases do the rest (the messages are sent
again: at least once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from outbox import Settings
from outbox.dispatcher import Dispatcher, DispatcherOptions
from outbox.dispatcher._dispatcher import SHUTDOWN_DATABASE_SECONDS
from tests.support.channels import RecordingChannel
from tests.support.tcp_proxy import TcpProxy

DB_TIMEOUT = 3.0
GRACE = 5.0


@pytest.fixture
def proxy(database_url: str, pg_server: Any) -> Iterator[TcpProxy]:
    parts = urlsplit(database_url)
    if pg_server.kind == "embedded":
        pytest.skip("a silent TCP path needs PostgreSQL over TCP, not the embedded socket")
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as running:
        yield running


@pytest.mark.timeout(120)
async def test_a_dispatcher_stops_in_bounded_time_when_the_database_goes_silent(
    database_url: str, admin: psycopg.Connection[Any], proxy: TcpProxy
) -> None:
    admin.execute(
        "SELECT outbox.set_address('u' || g, 'email', 'u' || g || '@example.com')"
        " FROM generate_series(1, 20) g"
    )
    admin.execute(
        "SELECT outbox.enqueue_many('email', 'price_alert',"
        " ARRAY(SELECT 'u' || g FROM generate_series(1, 20) g),"
        ' ARRAY[\'{"instrument": "EURUSD", "trigger_price": "1",'
        ' "current_price": "1", "condition": "above"}\'::jsonb])'
    )
    channel = RecordingChannel("email", delay=1.0)
    settings = replace(
        Settings(database_url=proxy.url(database_url), rate_limits={}),
        db_timeout=DB_TIMEOUT,
        listen=False,
    )
    dispatcher = Dispatcher(
        settings,
        {"email": channel},
        options=DispatcherOptions(concurrency=4, shutdown_grace=GRACE),
    )
    task = asyncio.create_task(dispatcher.run())
    deadline = time.monotonic() + 30
    while not channel.sent:  # sends under way: leases held, outcomes to write
        assert time.monotonic() < deadline, "nothing was sent"
        await asyncio.sleep(0.05)
    proxy.blackhole(new_connections=True)
    started = time.monotonic()
    dispatcher.stop()
    # sends finish (1 s), the urgent claim's round trip runs into its deadline, the
    # database part has its bound, the pool closes (5 s at most)
    bound = GRACE + DB_TIMEOUT + SHUTDOWN_DATABASE_SECONDS + 1 + 5 + 10
    try:
        await asyncio.wait_for(task, bound)
    except TimeoutError:
        pytest.fail(f"the dispatcher did not stop within {bound:.0f} s of stop()")
    took = time.monotonic() - started
    print(f"stopped {took:.1f} s after stop() with the database silent")
    # what it could not write is the leases' business: nothing was lost
    remaining = admin.execute(
        "SELECT count(*) FROM outbox.message WHERE status IN ('pending', 'sending')"
    ).fetchone()
    assert remaining is not None and remaining[0] >= 1, "the outcomes could not be written"
