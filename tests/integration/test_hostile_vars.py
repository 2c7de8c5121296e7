"""Hostile vars cannot starve or bloat a dispatcher.

Rows written past every enqueue check (as the superuser here; in life, a producer
before the SQL size check was fixed) carry 20 MiB of highly compressible JSON,
vars nested 10,000 levels deep, or 245 KB of link markup that would make a
Telegram text of about 60 messages. A real Dispatcher claims them together with
normal messages whose (slow) channel keeps them in flight for several
heartbeats. The hostile ones end as dead letters of class ``template``; the
heartbeat keeps renewing the normal ones' leases (none is lost, none sent twice);
and the process's memory grows by less than :data:`MEMORY_BUDGET`. Before the
bounds, each 20 MiB message took about 3 s of event-loop CPU to render and ten of
them about 1 GB of memory.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from outbox import MAX_VARS_BYTES, Settings
from outbox._queries import QUERIES
from outbox._settings import parse_rate_limits
from outbox.dispatcher import Dispatcher, DispatcherOptions
from outbox.dispatcher._finishes import AckBatch, AckResult
from outbox.dispatcher.channels.base import Outcome
from tests.support.channels import RecordingChannel

ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.085",
    "current_price": "1.086",
    "condition": "above",
}
MEMORY_BUDGET = 200 * 1024 * 1024
"""Bytes the process's resident memory may grow while the batch is processed."""
LEASE_SECONDS = 3.0
"""A heartbeat every second; the slow channel holds a message for several leases."""
SLOW_SEND = 2.5 * LEASE_SECONDS


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class PeakRss:
    """Samples the resident memory every 5 ms in a thread (it runs while the loop is busy)."""

    def __init__(self) -> None:
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


class Observer:
    """Records what the dispatcher reports: leases lost at acknowledgement."""

    def __init__(self) -> None:
        self.lost: set[int] = set()

    def sent(self, message: Any, outcome: Outcome, duration_ms: float) -> None:
        pass

    def acked(self, batch: AckBatch, result: AckResult) -> None:
        self.lost |= set(result.lost)


async def measure_loop_lag(lags: list[float]) -> None:
    """Append how late each 50 ms sleep wakes up: the event loop's stalls."""
    while True:
        started = time.monotonic()
        await asyncio.sleep(0.05)
        lags.append(time.monotonic() - started - 0.05)


def insert_raw(admin: psycopg.Connection[Any], channel: str, user: str, vars_sql: str) -> int:
    """What nothing in the product allows any more: a row written straight into the table."""
    row = admin.execute(
        "INSERT INTO outbox.message (lane, priority, channel, user_id, template, vars)"
        f" VALUES ('transactional', 0, %s, %s, 'price_alert', {vars_sql}) RETURNING id",
        [channel, user],
    ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.timeout(120)
async def test_hostile_vars_die_as_template_errors_while_leases_renew_and_memory_stays_bounded(
    database_url: str, admin: psycopg.Connection[Any], caplog: pytest.LogCaptureFixture
) -> None:
    admin.execute(
        "SELECT outbox.set_address('u' || g, a.channel,"
        " CASE a.channel WHEN 'email' THEN 'u' || g || '@example.com' ELSE g::text END)"
        " FROM generate_series(1, 4) g, unnest(ARRAY['email', 'telegram']) a(channel)"
    )
    normal = [
        int(row[0])
        for row in admin.execute(
            "SELECT outbox.enqueue('telegram', 'price_alert', 'u' || g, %s)"
            " FROM generate_series(1, 4) g",
            [Jsonb(ALERT)],
        ).fetchall()
    ]
    alert = "jsonb_build_object('instrument', 'EURUSD', 'trigger_price', '1.085',"
    alert += " 'current_price', '1.086', 'condition', 'above')"
    twenty_mib = f"{alert} || jsonb_build_object('pad', repeat('x', 20 * 1024 * 1024))"
    hostile = {
        insert_raw(admin, "email", "u1", twenty_mib): "over the limit of 262144 bytes",
        insert_raw(
            admin,
            "email",
            "u2",
            f"{alert} || jsonb_build_object('deep', ("
            "repeat('[', 10000) || repeat(']', 10000))::jsonb)",
        ): "nest deeper than 32 levels",
        insert_raw(
            admin,
            "email",
            "u3",
            f"{alert} || jsonb_build_object('deep', (repeat('[', 32) || repeat(']', 32))::jsonb)",
        ): "nest deeper than 32 levels",
    }
    hostile |= {
        insert_raw(admin, "email", "u1", twenty_mib): "over the limit of 262144 bytes"
        for _ in range(9)
    }
    # within the limits, but a text that would become about 60 Telegram messages:
    # rendered in a worker thread, and cut short at the output budget
    markup = f"{alert} || jsonb_build_object('instrument', repeat('[x](y) ', 35000))"
    hostile |= {
        insert_raw(admin, "telegram", "u3", markup): "produced over 81920 characters"
        for _ in range(10)
    }
    # within the limits but long: rendered in a worker thread, and delivered
    large = insert_raw(
        admin,
        "email",
        "u2",
        f"{alert} || jsonb_build_object('pad', (SELECT jsonb_agg('{{}}'::jsonb)"
        f" FROM generate_series(1, {MAX_VARS_BYTES // 5})))",
    )
    sizes = dict(
        admin.execute(
            "SELECT id, octet_length(vars::text) FROM outbox.message WHERE id = ANY(%s)",
            [[*hostile, large]],
        ).fetchall()
    )
    assert sizes[large] <= MAX_VARS_BYTES
    assert sum(100_000 < size <= MAX_VARS_BYTES for size in sizes.values()) == 11
    assert sum(size > 20 * 1024 * 1024 for size in sizes.values()) == 10

    settings = replace(
        Settings(database_url=database_url, rate_limits=parse_rate_limits("off")),
        lease_seconds=LEASE_SECONDS,
        poll_interval=0.2,
    )
    email = RecordingChannel(name="email")
    telegram = RecordingChannel(name="telegram", delay=SLOW_SEND)
    observer = Observer()
    dispatcher = Dispatcher(
        settings,
        {"email": email, "telegram": telegram},
        options=DispatcherOptions(concurrency=8, batch_size=100, send_timeout=4 * SLOW_SEND),
        observer=observer,
    )
    leases: dict[int, set[Any]] = {message_id: set() for message_id in normal}

    caplog.set_level(logging.WARNING, logger="outbox.dispatcher")
    with PeakRss() as memory:
        task = asyncio.create_task(dispatcher.run())
        lags: list[float] = []
        ticker = asyncio.create_task(measure_loop_lag(lags))
        try:
            deadline = time.monotonic() + 60
            while True:
                rows = admin.execute(
                    "SELECT id, leased_until FROM outbox.message"
                    " WHERE id = ANY(%s) AND status = 'sending'",
                    [normal],
                ).fetchall()
                for message_id, leased_until in rows:
                    leases[message_id].add(leased_until)
                left = admin.execute(
                    "SELECT count(*) FROM outbox.message WHERE status <> 'dead'"
                ).fetchone()
                if left == (0,):
                    break
                assert time.monotonic() < deadline, "the batch was not processed in time"
                await asyncio.sleep(0.2)
        finally:
            ticker.cancel()
            dispatcher.stop()
            await asyncio.wait_for(task, 30)

    # the hostile messages are dead letters of class template, each with its reason
    dead = {
        row[0]: (row[1], row[2])
        for row in admin.execute("SELECT id, error_class, last_error FROM outbox.dead_letter")
    }
    assert set(dead) == set(hostile)
    for message_id, reason in hostile.items():
        error_class, last_error = dead[message_id]
        assert error_class == "template" and reason in last_error, (message_id, last_error)

    # every normal message was sent once, after being kept in flight by the heartbeat
    sent_ids = [envelope.message_id for _, envelope in telegram.sent]
    assert sorted(sent_ids) == sorted(normal)
    assert [envelope.message_id for _, envelope in email.sent] == [large]
    for message_id in normal:
        assert len(leases[message_id]) >= 3, (message_id, leases[message_id])
    assert observer.lost == set()
    assert not [r for r in caplog.records if "lost" in r.getMessage()], caplog.text
    attempts = admin.execute(
        "SELECT message_id, outcome FROM outbox.attempt WHERE message_id = ANY(%s)",
        [[*normal, large]],
    ).fetchall()
    assert sorted(attempts) == sorted((m, "sent") for m in [*normal, large])

    print(f"RSS growth {memory.growth / 2**20:.1f} MiB; longest loop stall {max(lags):.3f} s")
    # the loop never stalled for a heartbeat interval (a third of a lease)
    assert max(lags) < LEASE_SECONDS / 3, sorted(lags)[-5:]
    assert memory.growth < MEMORY_BUDGET, f"RSS grew by {memory.growth / 2**20:.0f} MiB"


def test_the_claim_withholds_vars_over_256_kib_of_json_text_and_sends_the_rest(
    conn: psycopg.Connection[Any], admin: psycopg.Connection[Any]
) -> None:
    padding = MAX_VARS_BYTES - len('{"a": ""}')
    # 2-byte characters: the limit is on UTF-8 bytes of the text the dispatcher receives
    at_limit = insert_raw(
        admin,
        "email",
        "u1",
        f"jsonb_build_object('a', repeat('é', {padding // 2}) || repeat('x', {padding % 2}))",
    )
    over = insert_raw(admin, "email", "u1", f"jsonb_build_object('a', repeat('x', {padding + 1}))")
    rows = conn.execute(
        QUERIES["claim_batch"],
        {
            "batch_size": 10,
            "priority_from": -32768,
            "priority_below": 32768,
            "expired_limit": 10,
            "lease_seconds": 30,
            "dispatcher_id": "d",
            "lease_token": str(uuid.uuid4()),
        },
    ).fetchall()
    texts = {row[0]: row[6] for row in rows}
    assert len(texts[at_limit].encode()) == MAX_VARS_BYTES
    assert texts[over] is None
