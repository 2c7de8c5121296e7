"""Least privilege: each role may do its job and nothing else."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

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
        "SELECT * FROM outbox.recipient_address",
        "UPDATE outbox.recipient_address SET address = 'attacker@example.com'",
        "SELECT outbox.set_address('u1', 'email', 'attacker@example.com')",
        "SELECT outbox.register_channel('evil')",
        "SELECT * FROM outbox.push_subscription",
        "SELECT * FROM outbox.attempt",
        "SELECT * FROM outbox.dead_letter",
        "SELECT outbox.retry_dead()",
        "SELECT outbox.purge_dead('0 seconds')",
        "SELECT outbox.prune_history('1 hour')",
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


# ----------------------------------------------------------------- outbox_0006 roles

OPERATOR_CANNOT = [
    "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}')",
    "SELECT outbox.enqueue_many('email', 'price_alert', ARRAY['a'], ARRAY['{}'::jsonb])",
    "SELECT * FROM outbox.message",
    "UPDATE outbox.message SET status = 'pending'",
    "DELETE FROM outbox.message",
    "SELECT address FROM outbox.recipient_address",
    "SELECT * FROM outbox.recipient_address",
    "SELECT * FROM outbox.recipient",
    "UPDATE outbox.recipient_address SET address = 'attacker@example.com'",
    "SELECT outbox.set_address('u1', 'email', 'attacker@example.com')",
    "SELECT outbox.mark_address_undeliverable('email', 'a@example.com', NULL)",
    "SELECT outbox.record_delivery_report('sms', 'SM1', false, '30003', true)",
    "SELECT * FROM outbox.push_subscription",
    "SELECT * FROM outbox.idempotency_key",
    "INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,"
    " outcome) VALUES (1, 'transactional', 'email', 'u1', 'price_alert', 1, 'sent')",
    "DELETE FROM outbox.attempt",
    "SELECT outbox._wake_dispatchers()",
]


@pytest.fixture
def login(database_url: str, admin: psycopg.Connection) -> Iterator[Callable[[str], str]]:
    """``login("outbox_operator")``: the URL of a new login role in that role."""
    created: list[str] = []
    parts = urlsplit(database_url)
    netloc = parts.netloc.split("@", 1)[-1]

    def make(group: str) -> str:
        role = f"r_{uuid.uuid4().hex[:10]}"
        admin.execute(f"CREATE ROLE {role} LOGIN IN ROLE {group}")
        created.append(role)
        return urlunsplit((parts.scheme, f"{role}@{netloc}", parts.path, parts.query, ""))

    try:
        yield make
    finally:
        for role in created:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s",
                [role],
            )
            admin.execute(f"DROP ROLE {role}")


def _dead_letters(admin: psycopg.Connection, count: int) -> list[int]:
    ids = []
    for n in range(count):
        row = admin.execute(
            "SELECT outbox.enqueue('email', 'price_alert', %s, '{\"instrument\": \"EURUSD\"}')",
            [f"user-{n}"],
        ).fetchone()
        assert row is not None
        ids.append(int(row[0]))
    admin.execute(
        "UPDATE outbox.message SET status = 'dead', dead_at = now() - interval '10 days',"
        " attempts = 5, error_class = 'smtp_4xx', last_error = 'refused'"
    )
    admin.execute(
        "INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,"
        " outcome, error_class) SELECT id, lane, channel, user_id, template, 5, 'dead',"
        " error_class FROM outbox.message"
    )
    admin.execute("SELECT outbox.set_address('user-0', 'email', 'secret@example.com')")
    admin.execute("UPDATE outbox.recipient_address SET undeliverable_since = now()")
    return ids


def test_the_readme_cookbook_runs_as_an_operator_login(
    login: Callable[[str], str], admin: psycopg.Connection
) -> None:
    _dead_letters(admin, 3)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    cookbook = readme.split("### The dead-letter SQL cookbook", 1)[1]
    sql = re.search(r"```sql\n(.*?)\n```", cookbook, re.DOTALL)
    assert sql is not None
    with psycopg.connect(login("outbox_operator"), autocommit=True) as oncall:
        oncall.execute(sql.group(1))
        refused = oncall.execute(
            "SELECT user_id FROM outbox.recipient_address WHERE undeliverable_since IS NOT NULL"
        ).fetchall()
        assert refused == [("user-0",)]
        for statement in (
            "SELECT outbox.prune_history(interval '30 days')",
            "SELECT outbox.purge_dead(interval '30 days')",
        ):
            oncall.execute(statement)
    # the cookbook ends by redriving everything
    assert admin.execute("SELECT count(*) FROM outbox.dead_letter").fetchone() == (0,)
    assert admin.execute(
        "SELECT count(*) FROM outbox.message WHERE status = 'pending' AND attempts = 0"
    ).fetchone() == (3,)


def test_outbox_dlq_and_stats_work_for_an_operator_login(
    login: Callable[[str], str],
    admin: psycopg.Connection,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from outbox.cli import main

    ids = _dead_letters(admin, 3)
    monkeypatch.setenv("OUTBOX_DATABASE_URL", login("outbox_operator"))
    assert main(["stats"]) == 0
    assert main(["dlq", "list"]) == 0
    assert "smtp_4xx" in capsys.readouterr().out
    assert main(["dlq", "show", str(ids[0])]) == 0
    shown = capsys.readouterr().out
    assert "EURUSD" in shown and "dead" in shown
    assert main(["dlq", "retry", str(ids[0])]) == 0
    assert "1 dead message(s) back to pending" in capsys.readouterr().out
    assert main(["dlq", "purge", "--older-than", "7d", "--yes"]) == 0
    assert "2 dead message(s) older than 7d deleted" in capsys.readouterr().out
    admin.execute(
        "UPDATE outbox.message SET status = 'dead', dead_at = now() WHERE id = %s", [ids[0]]
    )
    assert main(["dlq", "retry", "--all", "--yes"]) == 0
    assert "1 dead message(s) back to pending" in capsys.readouterr().out
    assert admin.execute("SELECT id, status FROM outbox.message").fetchall() == [
        (ids[0], "pending")
    ]


@pytest.mark.parametrize("statement", OPERATOR_CANNOT)
def test_the_operator_cannot_enqueue_change_rows_or_read_addresses(
    conn: psycopg.Connection, statement: str
) -> None:
    as_role(conn, "outbox_operator")
    with pytest.raises(errors.InsufficientPrivilege):
        conn.execute(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT outbox.retry_dead()",
        "SELECT outbox.purge_dead('0 seconds')",
        "SELECT outbox.prune_history('1 hour')",
        "SELECT * FROM outbox.idempotency_key",
    ],
)
def test_the_dispatcher_cannot_redrive_purge_or_prune(
    conn: psycopg.Connection, statement: str
) -> None:
    as_role(conn, "outbox_dispatcher")
    with pytest.raises(errors.InsufficientPrivilege):
        conn.execute(statement)


@pytest.mark.parametrize(
    "statement",
    [
        "SELECT outbox.prune_history('1 hour')",
        "SELECT * FROM outbox.idempotency_key",
        "UPDATE outbox.idempotency_key SET expires_at = now()",
        "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}', idempotency_key => 'k',"
        " dedup_window => '-1 day')",
    ],
)
def test_the_producer_cannot_prune_or_touch_keys(conn: psycopg.Connection, statement: str) -> None:
    as_role(conn, "outbox_producer")
    with pytest.raises((errors.InsufficientPrivilege, errors.InvalidParameterValue)):
        conn.execute(statement)


def test_the_recipient_writer_upserts_recipients_and_nothing_else(
    login: Callable[[str], str], admin: psycopg.Connection
) -> None:
    import outbox

    with psycopg.connect(login("outbox_recipient_writer")) as service:
        outbox.upsert_recipient(service, "u42", email="u42@example.com", telegram_chat_id=42)
        outbox.upsert_recipient(service, "u42", email="new@example.com")
        outbox.set_address(service, "u42", "sms", "+4915112345678")
        subscription = {
            "endpoint": "https://fcm.googleapis.com/fcm/send/abc",
            "keys": {"p256dh": "BNcR", "auth": "tBHI"},
        }
        assert outbox.add_push_subscription(service, "u42", subscription) > 0
        service.commit()
        for statement in (
            "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}')",
            "SELECT * FROM outbox.message",
            "SELECT * FROM outbox.attempt",
            "DELETE FROM outbox.recipient",
            "DELETE FROM outbox.push_subscription",
            "SELECT outbox.retry_dead()",
            "SELECT outbox.register_channel('evil')",
            "SELECT outbox.record_delivery_report('sms', 'SM1', true, NULL, false)",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                service.execute(statement)
            service.rollback()
    assert admin.execute(
        "SELECT channel, address FROM outbox.recipient_address ORDER BY 1"
    ).fetchall() == [("email", "new@example.com"), ("sms", "+4915112345678"), ("telegram", "42")]


def test_the_functions_belong_to_a_nologin_owner_that_reads_no_addresses(
    conn: psycopg.Connection,
) -> None:
    owners = conn.execute(
        "SELECT DISTINCT proowner::regrole::text FROM pg_proc"
        " WHERE pronamespace = 'outbox'::regnamespace"
    ).fetchall()
    assert owners == [("outbox_owner",)]
    assert conn.execute(
        "SELECT rolcanlogin, rolsuper, rolcreaterole, rolbypassrls FROM pg_roles"
        " WHERE rolname = 'outbox_owner'"
    ).fetchone() == (False, False, False, False)
    as_role(conn, "outbox_owner")
    for statement in (
        "SELECT * FROM outbox.recipient",
        "SELECT * FROM outbox.push_subscription",
        "CREATE TABLE outbox.evil (id int)",
    ):
        conn.execute("SAVEPOINT s")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(statement)
        conn.execute("ROLLBACK TO SAVEPOINT s")
