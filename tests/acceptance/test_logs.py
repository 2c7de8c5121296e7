"""Logs: JSON a line, quiet on success, and a reader that stops reading stalls nothing."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg

from tests.acceptance.conftest import OUTBOX, ROOT, Spawn, wait_until
from tests.support.file_recorder import FileRecorder
from tests.support.recipients import seed_recipients

ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.1",
    "current_price": "1.2",
    "condition": "above",
}


def enqueue(admin: psycopg.Connection[Any], count: int) -> None:
    seed_recipients(admin, count, channels=("email",))
    admin.execute(
        "SELECT outbox.enqueue_many('email', 'price_alert',"
        " ARRAY(SELECT 'u' || g FROM generate_series(1, %s) g), ARRAY[%s::jsonb])",
        [count, json.dumps(ALERT)],
    )


def test_json_logs_parse_and_200_deliveries_write_a_handful_of_lines(
    admin: psycopg.Connection[Any], spawn_dispatcher: Spawn, recorder: FileRecorder, tmp_path: Path
) -> None:
    enqueue(admin, 200)

    process = spawn_dispatcher("--until-idle", OUTBOX_LOG_FORMAT="json")

    assert process.wait(timeout=120) == 0
    assert recorder.count() == 200
    lines = (tmp_path / "dispatcher-0.log").read_text().splitlines()
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(entry) for entry in entries)
    assert 1 <= len(entries) <= 15, lines


def test_an_unknown_log_format_or_level_is_refused(spawn_dispatcher: Spawn, tmp_path: Path) -> None:
    for number, env in enumerate(({"OUTBOX_LOG_FORMAT": "xml"}, {"OUTBOX_LOG_LEVEL": "LOUD"})):
        process = spawn_dispatcher("--until-idle", **env)
        assert process.wait(timeout=60) == 2
        log = (tmp_path / f"dispatcher-{number}.log").read_text()
        assert next(iter(env)) in log and "Traceback" not in log


def test_a_dispatcher_whose_output_nobody_reads_keeps_delivering(
    admin: psycopg.Connection[Any], database_url: str, recorder: FileRecorder
) -> None:
    total = 2000
    enqueue(admin, total)
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "OUTBOX_CHANNEL_PLUGINS": "email=tests.support.channels:file_email",
        "OUTBOX_TEST_RECORD_FILE": str(recorder.path),
        "OUTBOX_RATE_LIMITS": "off",
        "OUTBOX_LOG_LEVEL": "DEBUG",  # a line per claim of one: far more than a pipe holds
        "PYTHONPATH": str(ROOT),
    }
    # stdout and stderr are pipes that this test never reads (64 KiB fill them)
    process = subprocess.Popen(
        [OUTBOX, "-v", "dispatch", "--batch-size", "1"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while recorder.count() < total and time.monotonic() < deadline:
            assert process.poll() is None, "the dispatcher died"
            time.sleep(0.5)
        assert recorder.count() == total
        # the last acknowledgements commit a few milliseconds after their sends
        wait_until(
            lambda: admin.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,),
            10,
            "every delivery acknowledged",
        )
    finally:
        process.kill()
        process.wait(timeout=30)
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        process.stderr.close()


def test_sigusr1_prints_every_threads_stack_and_the_dispatcher_goes_on(
    admin: psycopg.Connection[Any], spawn_dispatcher: Spawn, recorder: FileRecorder, tmp_path: Path
) -> None:
    """For a dispatcher that will not stop: `kill -USR1` shows where it is stuck, from
    a signal handler (faulthandler), so even a blocked event loop answers."""
    import signal

    process = spawn_dispatcher()
    log = tmp_path / "dispatcher-0.log"
    wait_until(lambda: "dispatcher started" in log.read_text(), 30, "the dispatcher to start")
    process.send_signal(signal.SIGUSR1)
    wait_until(lambda: "most recent call first" in log.read_text(), 10, "the stacks")
    text = log.read_text()
    assert "Current thread" in text or "Thread 0x" in text, text[-2000:]
    assert "outbox" in text.split("most recent call first", 1)[1], text[-2000:]
    enqueue(admin, 3)  # still delivering
    wait_until(lambda: recorder.count() == 3, 30, "deliveries after the dump")
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
