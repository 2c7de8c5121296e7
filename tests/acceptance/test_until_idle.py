"""``outbox dispatch --until-idle``: "idle" is nothing in flight and nothing due within
``--idle-horizon``; messages due later are left, and the log says so."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psycopg

from tests.acceptance.conftest import Spawn
from tests.support.file_recorder import FileRecorder

ALERT = (
    '{"instrument": "EURUSD", "trigger_price": "1.1", "current_price": "1.2", "condition": "above"}'
)


def enqueue(admin: psycopg.Connection[Any], user: str, send_in: str | None) -> int:
    row = admin.execute(
        "SELECT outbox.enqueue('email', 'price_alert', %s, %s::jsonb,"
        " send_at => now() + CAST(%s AS interval))",
        [user, ALERT, send_in or "0 seconds"],
    ).fetchone()
    assert row is not None
    return int(row[0])


def recipients(admin: psycopg.Connection[Any], *users: str) -> None:
    for user in users:
        admin.execute(
            "SELECT outbox.set_address(%s, 'email', %s)",
            [user, f"{user}@example.com"],
        )


def test_a_message_deferred_beyond_the_horizon_does_not_keep_the_run_going(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    recorder: FileRecorder,
    tmp_path: Path,
) -> None:
    recipients(admin, "now", "later")
    enqueue(admin, "now", None)
    deferred = enqueue(admin, "later", "1 hour")

    started = time.monotonic()
    process = spawn_dispatcher("--until-idle")
    code = process.wait(timeout=60)

    assert code == 0
    assert time.monotonic() - started < 30
    assert [r["user_id"] for r in recorder.records] == ["now"]
    assert admin.execute(
        "SELECT status FROM outbox.message WHERE id = %s", [deferred]
    ).fetchone() == ("pending",)
    log = (tmp_path / "dispatcher-0.log").read_text()
    assert "1 message(s) deferred beyond --idle-horizon 60s" in log, log


def test_a_message_due_within_the_horizon_is_waited_for_and_delivered(
    admin: psycopg.Connection[Any],
    spawn_dispatcher: Spawn,
    recorder: FileRecorder,
    tmp_path: Path,
) -> None:
    recipients(admin, "soon")
    enqueue(admin, "soon", "2 seconds")

    process = spawn_dispatcher("--until-idle", "--idle-horizon", "10s")
    code = process.wait(timeout=60)

    assert code == 0
    assert [r["user_id"] for r in recorder.records] == ["soon"]
    log = (tmp_path / "dispatcher-0.log").read_text()
    assert "until-idle: waiting for a message due in" in log, log
    assert log.count("until-idle: waiting for") == 1, log  # once, not at every poll


def test_an_idle_horizon_without_a_unit_is_refused(spawn_dispatcher: Spawn, tmp_path: Path) -> None:
    process = spawn_dispatcher("--until-idle", "--idle-horizon", "10")
    assert process.wait(timeout=60) == 2
    log = (tmp_path / "dispatcher-0.log").read_text()
    assert "s, m, h, d or w" in log and "Traceback" not in log
