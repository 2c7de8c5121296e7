"""PgBouncer in transaction mode between the application and PostgreSQL.

Each test starts its own PgBouncer (the Debian package ``pgbouncer``) on a free
port in front of the test database. Producers (psycopg and SQLAlchemy) enqueue
through it; the dispatcher's pool works through it with
``OUTBOX_PREPARED_STATEMENTS=off``; LISTEN either uses a direct connection
(``OUTBOX_LISTEN_DATABASE_URL``) or is switched off (``OUTBOX_LISTEN=off``, poll
only). See docs/pgbouncer.md. A machine without pgbouncer skips these tests with a
reason (``apt-get install -y pgbouncer``); under CI (``OUTBOX_TEST_REQUIRE_ALL=1``)
they fail instead (tests/support/binaries.py).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

import outbox
from tests.acceptance.conftest import Spawn, wait_until
from tests.support.binaries import require_binary
from tests.support.file_recorder import FileRecorder
from tests.support.pgbouncer import PgBouncer
from tests.support.recipients import seed_recipients

ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.085",
    "current_price": "1.086",
    "condition": "above",
}
PRODUCERS = 4
PER_PRODUCER = 50


@pytest.fixture
def bouncer(pg_server: Any) -> Iterator[PgBouncer]:
    require_binary("pgbouncer", "the PgBouncer tests: apt-get install -y pgbouncer")
    if pg_server.kind == "embedded":
        # PgBouncer runs as the postgres system user; the embedded server's socket is
        # private to the user that started it. The run against a server (CI's first
        # stage) covers these tests.
        pytest.skip("PgBouncer cannot reach an embedded PostgreSQL's private socket")
    with PgBouncer(pg_server.host, pg_server.port, users=[pg_server.user], pool_size=2) as running:
        yield running


def pooled(bouncer: PgBouncer, database_url: str) -> str:
    return bouncer.url(urlsplit(database_url).path.lstrip("/"))


def produce(url: str, number: int, errors: list[BaseException]) -> None:
    """One producer: PER_PRODUCER transactions, each one message (+ commit)."""
    try:
        if number == 0:  # a SQLAlchemy application
            engine = create_engine(
                url.replace("postgresql://", "postgresql+psycopg://"),
                connect_args={"prepare_threshold": None},
            )
            try:
                for i in range(PER_PRODUCER):
                    with Session(engine) as session, session.begin():
                        outbox.enqueue(
                            session,
                            user_id=f"u{i % 50 + 1}",
                            channel="email",
                            template="price_alert",
                            vars=ALERT,
                        )
            finally:
                engine.dispose()
            return
        with psycopg.connect(url, prepare_threshold=None) as conn:
            for i in range(PER_PRODUCER):
                outbox.enqueue(
                    conn,
                    user_id=f"u{i % 50 + 1}",
                    channel="email",
                    template="price_alert",
                    vars=ALERT,
                )
                conn.commit()
    except BaseException as error:
        errors.append(error)


def run_producers(url: str) -> None:
    errors: list[BaseException] = []
    threads = [threading.Thread(target=produce, args=(url, n, errors)) for n in range(PRODUCERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


def seed(admin: psycopg.Connection[Any]) -> None:
    seed_recipients(admin, 50, channels=("email",))


def dispatcher_clients(bouncer: PgBouncer, database_url: str) -> int:
    """Connections the dispatcher holds to PgBouncer (its pool, set up as it names it)."""
    dbname = urlsplit(database_url).path.lstrip("/")
    return sum(
        1
        for row in bouncer.show("CLIENTS")
        if row["database"] == dbname and row["application_name"] == "outbox-dispatcher"
    )


@pytest.mark.timeout(120)
def test_producers_and_dispatcher_work_through_pgbouncer_with_listen_on_a_direct_connection(
    database_url: str,
    admin: psycopg.Connection[Any],
    recorder: FileRecorder,
    spawn_dispatcher: Spawn,
    bouncer: PgBouncer,
    tmp_path: Any,
) -> None:
    seed(admin)
    url = pooled(bouncer, database_url)
    process = spawn_dispatcher(
        OUTBOX_DATABASE_URL=url,
        OUTBOX_PREPARED_STATEMENTS="off",
        OUTBOX_LISTEN_DATABASE_URL=database_url,
        OUTBOX_POLL_INTERVAL="5",
    )
    run_producers(url)
    total = PRODUCERS * PER_PRODUCER
    wait_until(lambda: recorder.count() >= total, 60, "every message through PgBouncer")

    # idle now: a NOTIFY from a producer's pooled transaction reaches the direct LISTEN
    wait_until(
        lambda: admin.execute("SELECT count(*) FROM outbox.sleeper").fetchone() == (1,),
        30,
        "the dispatcher to go idle",
    )
    with psycopg.connect(url, prepare_threshold=None) as producer:
        time.sleep(0.5)
        committed = time.time()
        outbox.enqueue(producer, user_id="u1", channel="email", template="price_alert", vars=ALERT)
        producer.commit()
    wait_until(lambda: recorder.count() > total, 10, "the wakeup")
    latency = recorder.records[-1]["received_at"] - committed
    assert latency < 1.5, f"woken after {latency:.2f} s; the poll interval is 5 s"

    through = dispatcher_clients(bouncer, database_url)
    assert through >= 1, bouncer.show("CLIENTS")
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    ids = [r["message_id"] for r in recorder.records]
    assert len(ids) == len(set(ids)) == total + 1
    log = (tmp_path / "dispatcher-0.log").read_text()
    assert "prepared statement" not in log and "ERROR" not in log, log[-3000:]
    print(
        f"pgbouncer (transaction mode, LISTEN direct): {total + 1} messages, "
        f"{through} dispatcher connections to PgBouncer, wakeup {latency * 1000:.0f} ms"
    )


@pytest.mark.timeout(120)
def test_a_poll_only_dispatcher_works_entirely_through_pgbouncer(
    database_url: str,
    admin: psycopg.Connection[Any],
    recorder: FileRecorder,
    spawn_dispatcher: Spawn,
    bouncer: PgBouncer,
    tmp_path: Any,
) -> None:
    seed(admin)
    url = pooled(bouncer, database_url)
    process = spawn_dispatcher(
        OUTBOX_DATABASE_URL=url,
        OUTBOX_PREPARED_STATEMENTS="off",
        OUTBOX_LISTEN="off",
        OUTBOX_POLL_INTERVAL="0.3",
    )
    run_producers(url)
    total = PRODUCERS * PER_PRODUCER
    wait_until(lambda: recorder.count() >= total, 60, "every message through PgBouncer")
    wait_until(
        lambda: admin.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,),
        30,
        "the outbox to empty",
    )
    assert admin.execute("SELECT count(*) FROM outbox.sleeper").fetchone() == (0,)
    assert dispatcher_clients(bouncer, database_url) >= 1, bouncer.show("CLIENTS")
    direct = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'outbox-listener'"
    ).fetchone()
    assert direct == (0,), "poll-only mode must not hold a LISTEN connection"
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    ids = [r["message_id"] for r in recorder.records]
    assert len(ids) == len(set(ids)) == total
    log = (tmp_path / "dispatcher-0.log").read_text()
    assert "ERROR" not in log, log[-3000:]
