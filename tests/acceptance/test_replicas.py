"""Several dispatcher processes, killed and stopped, against real PostgreSQL."""

from __future__ import annotations

import signal
import time
from collections import Counter
from typing import Any

import psycopg
import pytest

from tests.acceptance.conftest import Spawn, wait_until
from tests.support.file_recorder import FileRecorder
from tests.support.recipients import seed_recipients

ALERT = (
    '{"instrument": "EURUSD", "trigger_price": "1.085", "current_price": "1.086",'
    ' "condition": "above"}'
)


def seed(admin: psycopg.Connection[Any], users: int) -> None:
    seed_recipients(admin, users)


def enqueue_many(admin: psycopg.Connection[Any], first: int, last: int, lane: str) -> None:
    admin.execute(
        "SELECT outbox.enqueue_many('email', 'price_alert',"
        " ARRAY(SELECT 'u' || g FROM generate_series(%s::int, %s::int) g), ARRAY[%s::jsonb], %s)",
        [first, last, ALERT, lane],
    )


def remaining(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute("SELECT count(*) FROM outbox.message").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.timeout(300)
def test_three_dispatchers_deliver_20000_messages_exactly_once_alerts_first(
    database_url: str,
    admin: psycopg.Connection[Any],
    recorder: FileRecorder,
    spawn_dispatcher: Spawn,
) -> None:
    seed(admin, 20_000)
    enqueue_many(admin, 1, 10_000, "campaign")
    processes = [spawn_dispatcher("--concurrency", "16") for _ in range(3)]
    wait_until(lambda: recorder.count() > 300, 60, "the backlog to start draining")
    for first in range(10_001, 20_001, 1000):
        enqueue_many(admin, first, first + 999, "transactional")
    wait_until(lambda: recorder.count() >= 20_000, 240, "20,000 deliveries")
    wait_until(lambda: remaining(admin) == 0, 30, "the table to empty")
    for process in processes:
        process.send_signal(signal.SIGTERM)
    assert [p.wait(30) for p in processes] == [0, 0, 0]

    delivered = recorder.delivered()
    counts = Counter(record["message_id"] for record in delivered)
    assert len(counts) == 20_000
    assert max(counts.values()) == 1, "a message was delivered twice without any crash"
    assert len({record["dispatcher"] for record in delivered}) == 3
    last_alert = max(r["received_at"] for r in delivered if r["lane"] == "transactional")
    last_campaign = max(r["received_at"] for r in delivered if r["lane"] == "campaign")
    assert last_alert < last_campaign, "alerts waited for the campaign backlog"
    logged = admin.execute(
        "SELECT count(*), count(DISTINCT message_id) FROM outbox.attempt WHERE outcome = 'sent'"
    ).fetchone()
    assert logged == (20_000, 20_000)


@pytest.mark.timeout(180)
def test_sigkill_of_a_dispatcher_holding_leases_loses_nothing(
    database_url: str,
    admin: psycopg.Connection[Any],
    recorder: FileRecorder,
    spawn_dispatcher: Spawn,
) -> None:
    seed(admin, 300)
    enqueue_many(admin, 1, 300, "transactional")
    victim = spawn_dispatcher(
        "--concurrency",
        "8",
        "--batch-size",
        "50",
        OUTBOX_LEASE_SECONDS="3",
        OUTBOX_TEST_SEND_DELAY="0.05",
    )
    wait_until(lambda: recorder.count() >= 20, 60, "the victim to start sending")
    victim.kill()
    victim.wait(10)
    held = {
        row[0]
        for row in admin.execute(
            "SELECT id FROM outbox.message WHERE status = 'sending'"
        ).fetchall()
    }
    assert held, "the killed dispatcher held no leases; the test proves nothing"
    sent_by_victim = {r["message_id"] for r in recorder.records}
    survivor = spawn_dispatcher("--concurrency", "8", OUTBOX_LEASE_SECONDS="3")
    wait_until(lambda: remaining(admin) == 0, 90, "every message to be delivered")
    survivor.send_signal(signal.SIGTERM)
    assert survivor.wait(30) == 0

    delivered = Counter(r["message_id"] for r in recorder.delivered())
    ids = {
        row[0]
        for row in admin.execute(
            "SELECT DISTINCT message_id FROM outbox.attempt WHERE outcome = 'sent'"
        ).fetchall()
    }
    assert len(ids) == 300
    assert set(delivered) == ids
    duplicates = {mid for mid, n in delivered.items() if n > 1}
    assert duplicates <= (held & sent_by_victim)


@pytest.mark.timeout(120)
def test_sigterm_during_a_busy_run_exits_zero_and_leaves_nothing_sending(
    database_url: str,
    admin: psycopg.Connection[Any],
    recorder: FileRecorder,
    spawn_dispatcher: Spawn,
) -> None:
    seed(admin, 2000)
    enqueue_many(admin, 1, 2000, "campaign")
    process = spawn_dispatcher("--concurrency", "16", OUTBOX_TEST_SEND_DELAY="0.01")
    wait_until(lambda: recorder.count() >= 100, 60, "a busy dispatcher")
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    row = admin.execute(
        "SELECT count(*) FILTER (WHERE status = 'sending'), count(*) FROM outbox.message"
    ).fetchone()
    assert row is not None and row[0] == 0 and row[1] > 0
    assert row[1] + len(recorder.delivered()) >= 2000


@pytest.mark.timeout(120)
def test_busy_dispatchers_cost_producers_no_notify(
    database_url: str,
    admin: psycopg.Connection[Any],
    recorder: FileRecorder,
    spawn_dispatcher: Spawn,
) -> None:
    seed(admin, 5000)
    enqueue_many(admin, 1, 5000, "campaign")
    spawn_dispatcher("--concurrency", "4", "--batch-size", "20", OUTBOX_TEST_SEND_DELAY="0.02")
    wait_until(lambda: recorder.count() >= 20, 60, "the dispatcher to be busy")
    with psycopg.connect(database_url, autocommit=True) as listener:
        listener.execute("LISTEN outbox_wakeup")
        with psycopg.connect(database_url) as producer:
            for i in range(50):
                producer.execute(
                    "SELECT outbox.enqueue('email', 'price_alert', %s, %s::jsonb)",
                    [f"u{i + 1}", ALERT],
                )
                producer.commit()
        notified = list(listener.notifies(timeout=1.0))
    assert admin.execute("SELECT count(*) FROM outbox.sleeper").fetchone() == (0,)
    assert notified == []


@pytest.mark.timeout(120)
def test_an_idle_dispatcher_wakes_fast_and_survives_its_listener_being_killed(
    database_url: str,
    admin: psycopg.Connection[Any],
    recorder: FileRecorder,
    spawn_dispatcher: Spawn,
) -> None:
    seed(admin, 10)
    spawn_dispatcher(OUTBOX_POLL_INTERVAL="5")
    wait_until(
        lambda: admin.execute("SELECT count(*) FROM outbox.sleeper").fetchone() == (1,),
        30,
        "the dispatcher to fall asleep",
    )
    latencies = []
    for i in range(1, 6):
        time.sleep(0.3)
        before = len(recorder.records)
        committed = time.time()
        admin.execute(
            "SELECT outbox.enqueue('email', 'price_alert', %s, %s::jsonb)", [f"u{i}", ALERT]
        )
        wait_until(lambda b=before: len(recorder.records) > b, 10, "the wakeup")
        latencies.append(recorder.records[-1]["received_at"] - committed)
    assert max(latencies) < 1.0, latencies  # the fallback poll is 5 s

    killed = admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'outbox-listener' AND datname = current_database()"
    ).fetchall()
    assert killed == [(True,)]
    time.sleep(0.5)
    admin.execute("SELECT outbox.enqueue('email', 'price_alert', 'u9', %s::jsonb)", [ALERT])
    wait_until(
        lambda: any(r["user_id"] == "u9" for r in recorder.records),
        12,
        "delivery after the listener was killed",
    )
    wait_until(
        lambda: (
            admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbox-listener'"
                " AND datname = current_database()"
            ).fetchone()
            == (1,)
        ),
        15,
        "the listener to return",
    )


def test_a_long_asleep_dispatcher_renews_its_sleeper_row(
    admin: psycopg.Connection[Any], spawn_dispatcher: Spawn
) -> None:
    """Replicas delete sleeper rows older than 30 s as left behind by dead dispatchers;
    a live one asleep for minutes must not look dead, or producers stop waking it."""
    spawn_dispatcher(OUTBOX_POLL_INTERVAL="0.5")

    def since() -> Any:
        row = admin.execute("SELECT since FROM outbox.sleeper").fetchone()
        return None if row is None else row[0]

    wait_until(lambda: since() is not None, 30, "the dispatcher to fall asleep")
    first = since()
    wait_until(lambda: since() != first, 20, "the sleeper row to be renewed")
    assert (since() - first).total_seconds() >= 9  # renewed every 10 s, not every poll
