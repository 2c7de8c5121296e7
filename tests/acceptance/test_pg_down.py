"""PostgreSQL down for 30 seconds in the middle of a busy run.

The test runs its own throwaway cluster (never the machine's shared server). A
dispatcher subprocess is delivering a backlog and the API subprocess answers
``/health`` when the cluster stops. For 30 s: ``/health`` answers 503, the dispatcher
keeps running and waits (it does not spin), messages it had already claimed finish
sending. When the cluster is back: ``/health`` answers 200 again, delivery resumes,
and every message arrives exactly once (the outage is shorter than the lease, so no
lease expires and nothing is sent twice).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.acceptance.conftest import ROOT, Spawn, wait_until
from tests.support.file_recorder import FileRecorder
from tests.support.pg_cluster import ThrowawayCluster, free_port
from tests.support.recipients import seed_recipients

OUTAGE = 30.0
MESSAGES = 3000
ALERT = (
    '{"instrument": "EURUSD", "trigger_price": "1.085", "current_price": "1.086",'
    ' "condition": "above"}'
)


@pytest.fixture
def cluster() -> Iterator[ThrowawayCluster]:
    with ThrowawayCluster(prefix="outbox-down-") as running:
        running.create_database("outbox")
        yield running


@pytest.fixture
def api(cluster: ThrowawayCluster, tmp_path: Path) -> Iterator[str]:
    """``outbox api`` on a free port against the throwaway cluster."""
    port = free_port()
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": cluster.url("outbox"),
        "OUTBOX_API_JWT_SECRET": "jwt-secret-for-the-outage-test-0123456789",
        "PYTHONPATH": str(ROOT),
    }
    with open(tmp_path / "api.log", "wb") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("outbox")), "api", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: health(url) == 200, 30, "the API to start")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def health(url: str) -> int:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


@pytest.mark.timeout(150)
def test_postgres_down_for_30_seconds_loses_nothing_and_health_says_503_meanwhile(
    cluster: ThrowawayCluster,
    api: str,
    recorder: FileRecorder,
    spawn_dispatcher: Spawn,
    tmp_path: Path,
) -> None:
    url = cluster.url("outbox")
    with psycopg.connect(url, autocommit=True) as admin:
        seed_recipients(admin, MESSAGES, channels=("email",))
        admin.execute(
            "SELECT outbox.enqueue_many('email', 'price_alert',"
            " ARRAY(SELECT 'u' || g FROM generate_series(1, %s) g), ARRAY[%s::jsonb],"
            " 'transactional')",
            [MESSAGES, ALERT],
        )
    process = spawn_dispatcher(
        "--concurrency",
        "8",
        OUTBOX_DATABASE_URL=url,
        OUTBOX_TEST_SEND_DELAY="0.02",
        OUTBOX_LEASE_SECONDS="60",
    )
    wait_until(lambda: recorder.count() >= 300, 60, "a busy dispatcher")

    with psycopg.connect(url, autocommit=True) as admin:
        in_flight = {
            row[0]
            for row in admin.execute("SELECT id FROM outbox.message WHERE status = 'sending'")
        }
    cluster.stop("fast")
    down_at = time.monotonic()
    delivered_at_stop = recorder.count()
    statuses: list[int] = []
    while time.monotonic() - down_at < OUTAGE:
        statuses.append(health(api))
        assert process.poll() is None, "the dispatcher died with the database"
        time.sleep(1.0)
    after_outage = recorder.count()
    delivered_during = after_outage - delivered_at_stop
    cluster.start()
    up_at = time.monotonic()
    health_back = resumed = None
    while health_back is None or resumed is None:
        elapsed = time.monotonic() - up_at
        assert elapsed < 60, f"not back after 60 s: health {health_back}, delivery {resumed}"
        if resumed is None and recorder.count() > after_outage:
            resumed = elapsed
        if health_back is None and health(api) == 200:
            health_back = time.monotonic() - up_at
        time.sleep(0.1)
    wait_until(lambda: recorder.count() >= MESSAGES, 90, "every message")
    with psycopg.connect(url, autocommit=True) as admin:
        wait_until(
            lambda: admin.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,),
            30,
            "the outbox to empty",
        )
        acked = admin.execute(
            "SELECT count(DISTINCT message_id) FROM outbox.attempt WHERE outcome = 'sent'"
        ).fetchone()
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0

    assert statuses and set(statuses) == {503}, statuses
    sends = Counter(r["message_id"] for r in recorder.records)
    assert len(sends) == MESSAGES, "a message was lost"
    duplicates = {mid for mid, n in sends.items() if n > 1}
    assert not duplicates, (duplicates, len(in_flight))
    assert acked == (MESSAGES,)
    log = (tmp_path / "dispatcher-0.log").read_text()
    outage_warnings = sum(
        1 for line in log.splitlines() if "claim failed" in line or "ack failed" in line
    )
    assert outage_warnings <= OUTAGE / 2, f"{outage_warnings} retries: no backoff"
    print(
        f"pg down {OUTAGE:.0f} s: health 503 x{len(statuses)}, 200 again {health_back:.1f} s"
        f" after restart; delivery resumed after {resumed:.1f} s; {delivered_during} sends"
        f" finished during the outage; {len(in_flight)} in flight at the stop;"
        f" {outage_warnings} claim/ack retries logged; lost 0, duplicates 0"
    )
    assert resumed < 15, f"delivery resumed only {resumed:.1f} s after PostgreSQL came back"
    assert health_back < 15, f"/health said 200 only {health_back:.1f} s after PostgreSQL"
