"""Least privilege: each role may do its job and nothing else."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors


def as_role(conn: psycopg.Connection, role: str) -> None:
    conn.execute(f"SET ROLE {role}")


def test_producer_can_enqueue(conn: psycopg.Connection) -> None:
    as_role(conn, "outbox_producer")
    row = conn.execute("SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}')").fetchone()
    assert row is not None
    row = conn.execute(
        "SELECT outbox.enqueue_many('email', 'price_alert', ARRAY['a','b'], ARRAY['{}'::jsonb])"
    ).fetchone()
    assert row == (2,)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM outbox.message",
        "UPDATE outbox.message SET status = 'dead'",
        "DELETE FROM outbox.message",
        "INSERT INTO outbox.message (lane, priority, channel, user_id, template)"
        " VALUES ('transactional', 0, 'email', 'u', 't')",
        "SELECT * FROM outbox.recipient",
        "UPDATE outbox.recipient SET email = 'attacker@example.com'",
        "SELECT * FROM outbox.push_subscription",
        "SELECT * FROM outbox.attempt",
        "SELECT * FROM outbox.dead_letter",
        "SELECT outbox.retry_dead()",
        "SELECT outbox.purge_dead('0 seconds')",
        "SELECT outbox._wake_dispatchers()",
    ],
)
def test_producer_cannot_read_or_alter_anything_else(
    conn: psycopg.Connection, statement: str
) -> None:
    as_role(conn, "outbox_producer")
    with pytest.raises(errors.InsufficientPrivilege):
        conn.execute(statement)


def test_inspector_reads_the_views(conn: psycopg.Connection) -> None:
    conn.execute("SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}')")
    conn.execute("UPDATE outbox.message SET status = 'dead', dead_at = now()")
    as_role(conn, "outbox_inspector")
    assert conn.execute("SELECT count(*) FROM outbox.dead_letter").fetchone() == (1,)
    stats = conn.execute("SELECT lane, channel, status, count FROM outbox.queue_stats").fetchall()
    assert stats == [("transactional", "email", "dead", 1)]


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT * FROM outbox.message",
        "SELECT * FROM outbox.recipient",
        "SELECT * FROM outbox.attempt",
        "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}')",
        "SELECT outbox.retry_dead()",
        "DELETE FROM outbox.message",
    ],
)
def test_inspector_can_do_nothing_but_read_views(conn: psycopg.Connection, statement: str) -> None:
    as_role(conn, "outbox_inspector")
    with pytest.raises(errors.InsufficientPrivilege):
        conn.execute(statement)


def test_dispatcher_can_claim_finish_and_log_but_not_rewrite_history(
    conn: psycopg.Connection,
) -> None:
    conn.execute("SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}')")
    as_role(conn, "outbox_dispatcher")
    conn.execute("UPDATE outbox.message SET attempts = 1")
    conn.execute(
        "INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,"
        " outcome) VALUES (1, 'transactional', 'email', 'u1', 'price_alert', 1, 'sent')"
    )
    conn.execute("DELETE FROM outbox.message")
    with pytest.raises(errors.InsufficientPrivilege):
        conn.execute("DELETE FROM outbox.attempt")
