"""``outbox dispatch --processes N``: one supervisor, N dispatcher processes, one port.

Real processes on a real database: the supervisor is the ``outbox`` console script,
its children deliver to the file-recording channel (one JSON line per delivery with
the child's pid), and the tests read the one metrics port the supervisor serves.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.conftest import OUTBOX, ROOT, wait_until
from tests.support.file_recorder import FileRecorder
from tests.support.pg_cluster import free_port
from tests.support.recipients import seed_recipients

ALERT_VARS = (
    "jsonb_build_object('instrument', 'EURUSD', 'condition', 'above',"
    " 'trigger_price', g::text, 'current_price', g::text)"
)


class Supervised:
    """``outbox dispatch --processes N --metrics-port P`` as a subprocess."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.base = f"http://127.0.0.1:{port}"
        self.log = log

    def children(self) -> list[int]:
        """The pids of the supervisor's child processes now (Linux /proc)."""
        pid = self.process.pid
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()

    def sample(self, name: str, **labels: str) -> float:
        """The value of one series on ``/metrics`` (0 when absent)."""
        _, text = self.get("/metrics")
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def wait_ready(self, processes: int, timeout: float = 30.0) -> None:
        def ready() -> bool:
            try:
                return self.get("/readyz")[0] == 200 and len(self.children()) == processes
            except OSError:
                return False

        try:
            wait_until(ready, timeout, "the supervisor's /readyz")
        except AssertionError:
            raise AssertionError(self.log.read_text()) from None

    def stop(self, timeout: float) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds it took)."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout)
        return code, time.monotonic() - started


@pytest.fixture
def supervise(database_url: str, recorder: FileRecorder, tmp_path: Path) -> Iterator[Any]:
    started: list[Supervised] = []

    def start(*args: str, database: str | None = None, **env: str) -> Supervised:
        port = free_port()
        log = tmp_path / f"supervisor-{len(started)}.log"
        environment = {
            **os.environ,
            "OUTBOX_DATABASE_URL": database or database_url,
            "OUTBOX_CHANNEL_PLUGINS": "email=tests.support.channels:file_email",
            "OUTBOX_TEST_RECORD_FILE": str(recorder.path),
            "OUTBOX_RATE_LIMITS": "off",
            "PYTHONPATH": str(ROOT),
            # the private metrics directory goes here, where the test can look
            "TMPDIR": str(tmp_path),
            **env,
        }
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [OUTBOX, "dispatch", "--metrics-port", str(port), *args],
                env=environment,
                cwd=ROOT,
                stdout=out,
                stderr=out,
            )
        supervised = Supervised(process, port, log)
        started.append(supervised)
        return supervised

    yield start
    for supervised in started:
        children = supervised.children()
        if supervised.process.poll() is None:
            supervised.process.kill()
        supervised.process.wait(10)
        for pid in children:  # a failed test may leave them behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def enqueue(admin: psycopg.Connection[Any], count: int, first: int = 1) -> set[int]:
    """``count`` email alerts to users u1..u50, in one transaction; their ids."""
    seed_recipients(admin, 50, channels=("email",))  # again: the same addresses
    rows = admin.execute(
        "SELECT outbox.enqueue('email', 'price_alert', 'u' || (1 + g %% 50),"
        f" {ALERT_VARS}) FROM generate_series(%s::int, %s::int) g",
        [first, first + count - 1],
    ).fetchall()
    return {int(row[0]) for row in rows}


def test_two_processes_drain_each_message_once_and_one_port_sums_their_counters(
    supervise: Any, admin: psycopg.Connection[Any], recorder: FileRecorder, tmp_path: Path
) -> None:
    ids = enqueue(admin, 1500)  # waiting before the children start: both claim at once
    supervisor = supervise("--processes", "2", "--concurrency", "4", OUTBOX_TEST_SEND_DELAY="0.01")
    supervisor.wait_ready(2)
    assert supervisor.get("/livez") == (200, "ok\n")
    wait_until(lambda: recorder.count() >= len(ids), 30, "the backlog drained")

    records = recorder.records
    delivered = collections.Counter(r["message_id"] for r in records)
    assert set(delivered) == ids and max(delivered.values()) == 1
    by_child = collections.Counter(r["dispatcher"] for r in records)
    assert set(by_child) == {str(pid) for pid in supervisor.children()}, by_child
    assert admin.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)
    # the acknowledgement is written after the send: the counter follows it closely
    wait_until(
        lambda: supervisor.sample("messages_enqueued_total", channel="email") == len(ids),
        10,
        "messages_enqueued_total to reach the count",
    )
    assert supervisor.sample("messages_sent_total", channel="email", type="price_alert") == len(ids)
    assert supervisor.sample("message_send_duration_seconds_count", channel="email") == len(ids)
    assert supervisor.sample("outbox_dispatcher_restarts_total") == 0
    assert list(tmp_path.glob("outbox-metrics-*")), "no private metrics directory"

    code, took = supervisor.stop(timeout=30)
    log = supervisor.log.read_text()
    assert code == 0, log
    assert took < 10, f"the stop took {took:.1f}s"  # the default grace is 10 s
    assert log.count("dispatcher stopped id=") == 2, log
    assert not list(tmp_path.glob("outbox-metrics-*")), "the metrics directory was left"


def test_sigterm_lets_sends_under_way_finish_and_loses_nothing(
    supervise: Any, admin: psycopg.Connection[Any], recorder: FileRecorder
) -> None:
    ids = enqueue(admin, 400)
    supervisor = supervise(
        "--processes",
        "2",
        "--concurrency",
        "4",
        "--shutdown-grace",
        "5s",
        OUTBOX_TEST_SEND_DELAY="0.3",
    )
    supervisor.wait_ready(2)
    wait_until(lambda: recorder.count() >= 8, 20, "the first deliveries")
    in_flight = admin.execute(
        "SELECT count(*) FROM outbox.message WHERE status = 'sending'"
    ).fetchone()
    assert in_flight is not None and in_flight[0] > 0
    code, took = supervisor.stop(timeout=30)
    assert code == 0, supervisor.log.read_text()
    assert took < 5 + 5

    delivered = collections.Counter(r["message_id"] for r in recorder.records)
    assert max(delivered.values()) == 1
    left = {
        int(row[0])
        for row in admin.execute("SELECT id FROM outbox.message WHERE status = 'pending'")
    }
    # every message was either delivered (its row gone) or given back, none both
    assert set(delivered) | left == ids and not set(delivered) & left
    assert admin.execute(
        "SELECT count(*) FROM outbox.message WHERE status = 'sending' OR lease_token IS NOT NULL"
    ).fetchone() == (0,)


def test_a_killed_process_is_restarted_and_delivery_goes_on_without_loss(
    supervise: Any, admin: psycopg.Connection[Any], recorder: FileRecorder
) -> None:
    ids = enqueue(admin, 400)
    supervisor = supervise(
        "--processes",
        "2",
        "--concurrency",
        "4",
        OUTBOX_TEST_SEND_DELAY="0.05",
        # the killed child's messages come back soon; the survivor's heartbeat (every
        # second) keeps its own leases even on a busy machine
        OUTBOX_LEASE_SECONDS="3",
    )
    supervisor.wait_ready(2)
    wait_until(lambda: recorder.count() >= 60, 20, "the first deliveries")
    victim, survivor = supervisor.children()
    os.kill(victim, signal.SIGKILL)

    def restarted() -> bool:
        now = supervisor.children()
        return len(now) == 2 and victim not in now and survivor in now

    wait_until(restarted, 10, "the supervisor to restart the killed process")
    supervisor.wait_ready(2)
    assert supervisor.sample("outbox_dispatcher_restarts_total") == 1
    wait_until(lambda: len({r["message_id"] for r in recorder.records}) >= len(ids), 30, "drain")

    records = recorder.records
    assert {r["message_id"] for r in records} == ids, "a message was lost"
    assert admin.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)
    # at least once: a second delivery only of a message the killed process had sent
    # (the provider accepted it, the acknowledgement never committed)
    first_by: dict[int, str] = {}
    for record in records:
        if record["message_id"] in first_by:
            assert first_by[record["message_id"]] == str(victim), record
        else:
            first_by[record["message_id"]] = record["dispatcher"]
    log = supervisor.log.read_text()
    assert f"pid={victim} ended unexpectedly (killed by SIGKILL)" in log, log
    code, _ = supervisor.stop(timeout=30)
    assert code == 0, supervisor.log.read_text()


def test_a_process_that_cannot_stop_is_killed_after_the_grace_and_the_status_is_1(
    supervise: Any,
) -> None:
    supervisor = supervise("--processes", "2", "--shutdown-grace", "0s")
    supervisor.wait_ready(2)
    stuck, _ = supervisor.children()
    os.kill(stuck, signal.SIGSTOP)  # it never sees its SIGTERM
    code, took = supervisor.stop(timeout=30)
    log = supervisor.log.read_text()
    assert code == 1, log
    assert 5 <= took < 5 + 3, f"{took:.1f}s"  # no grace, the supervisor's 5 s margin
    assert f"pid={stuck} did not stop within 5s: killed" in log, log
    assert log.count("dispatcher stopped id=") == 1, log


def test_readyz_names_an_unmigrated_database_while_livez_stays_200(
    supervise: Any, empty_database_url: str
) -> None:
    supervisor = supervise("--processes", "2", database=empty_database_url)

    def answering() -> bool:
        try:
            return supervisor.get("/readyz")[0] == 503 and len(supervisor.children()) == 2
        except OSError:
            return False

    wait_until(answering, 30, "the supervisor's /readyz")
    status, body = supervisor.get("/readyz")
    assert status == 503 and "run `outbox migrate`" in body, body
    assert supervisor.get("/livez") == (200, "ok\n")
    code, _ = supervisor.stop(timeout=30)  # children waiting for the schema stop too
    assert code == 0, supervisor.log.read_text()
