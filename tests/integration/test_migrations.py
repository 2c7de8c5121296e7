"""schema.sql and the Alembic history describe the same database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import psycopg
import pytest

from outbox._migrate import downgrade, upgrade
from outbox._queries import read_sql_file
from outbox._schema_check import head_revision

CATALOG_QUERIES = {
    "columns": """
        SELECT table_name, column_name, ordinal_position, data_type, is_nullable,
               column_default, is_identity, identity_generation
          FROM information_schema.columns WHERE table_schema = 'outbox'
         ORDER BY 1, 3""",
    # NOT NULL constraints (PostgreSQL 18 keeps them in pg_constraint, named after the
    # table at creation: a table rebuilt by a migration gets "..._not_null1") are
    # compared as the columns' nullability above, not by name
    "constraints": """
        SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
          FROM pg_constraint WHERE connamespace = 'outbox'::regnamespace AND contype <> 'n'
         ORDER BY 1, 2""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes
         WHERE schemaname = 'outbox' ORDER BY 1, 2""",
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid), pg_get_functiondef(p.oid),
               p.proacl::text, p.prosecdef, p.proowner::regrole::text
          FROM pg_proc p WHERE p.pronamespace = 'outbox'::regnamespace ORDER BY 1, 2""",
    "relations": """
        SELECT c.relname, c.relkind, c.relacl::text, c.reloptions, obj_description(c.oid),
               CASE c.relkind WHEN 'v' THEN pg_get_viewdef(c.oid) END
          FROM pg_class c WHERE c.relnamespace = 'outbox'::regnamespace ORDER BY 1""",
    "triggers": """
        SELECT t.tgrelid::regclass::text, t.tgname, pg_get_triggerdef(t.oid)
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'outbox'::regnamespace AND NOT t.tgisinternal ORDER BY 1, 2""",
    "column_privileges_and_comments": """
        SELECT a.attrelid::regclass::text, a.attname, a.attacl::text,
               col_description(a.attrelid, a.attnum)
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
         WHERE c.relnamespace = 'outbox'::regnamespace AND a.attnum > 0
           AND NOT a.attisdropped ORDER BY 1, 2""",
    "schema": """
        SELECT nspname, nspacl::text, obj_description(oid) FROM pg_namespace
         WHERE nspname = 'outbox'""",
}


def catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        return {name: conn.execute(query).fetchall() for name, query in CATALOG_QUERIES.items()}


@pytest.fixture
def second_empty_database_url(pg_server: Any) -> Iterator[str]:
    import uuid

    from pytest_postgresql.janitor import DatabaseJanitor

    name = f"outbox_empty_{uuid.uuid4().hex[:10]}"
    janitor = DatabaseJanitor(
        user=pg_server.user,
        host=pg_server.host,
        port=pg_server.port,
        password=pg_server.password,
        dbname=name,
    )
    janitor.init()
    try:
        yield pg_server.url(name)
    finally:
        janitor.drop()


def test_schema_sql_and_alembic_head_build_identical_catalogs(
    empty_database_url: str, second_empty_database_url: str
) -> None:
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(read_sql_file("schema.sql"))
    upgrade(second_empty_database_url)
    from_schema = catalog(empty_database_url)
    from_migrations = catalog(second_empty_database_url)
    assert from_schema["columns"], "the catalog query found no outbox tables"
    for name in CATALOG_QUERIES:
        assert from_schema[name] == from_migrations[name], f"{name} differ"


def test_downgrade_base_leaves_nothing_of_the_schema_behind(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    downgrade(empty_database_url, "base")
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'outbox'"
        ).fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM pg_proc WHERE proname LIKE 'enqueue%%'"
            " AND pronamespace <> 'pg_catalog'::regnamespace"
        ).fetchone() == (0,)
        version_rows = conn.execute("SELECT count(*) FROM outbox_alembic_version").fetchone()
        assert version_rows == (0,)
    # and it comes back cleanly
    upgrade(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT outbox.enqueue('email','price_alert','u','{}')").fetchone()


def test_upgrade_twice_is_a_no_op(empty_database_url: str) -> None:
    upgrade(empty_database_url)
    upgrade(empty_database_url)
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT version_num FROM outbox_alembic_version").fetchall() == [
            (head_revision(),)
        ]


def test_the_claim_index_exists_from_the_first_revision(empty_database_url: str) -> None:
    upgrade(empty_database_url, "outbox_0001")
    with psycopg.connect(empty_database_url) as conn:
        row = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'message_claim_idx'"
        ).fetchone()
    assert row is not None
    assert "(priority, next_attempt_at, id) WHERE (status = 'pending'::text)" in row[0]


def test_a_non_superuser_with_createrole_migrates_up_and_down(pg_server: Any) -> None:
    import uuid

    from pytest_postgresql.janitor import DatabaseJanitor

    role = f"migrator_{uuid.uuid4().hex[:8]}"
    name = f"outbox_empty_{uuid.uuid4().hex[:10]}"
    admin_url = pg_server.url("postgres")
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN CREATEROLE")
        version = admin.execute("SHOW server_version_num").fetchone()
        owner_exists = admin.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = 'outbox_owner'"
        ).fetchone()
        if version and int(version[0]) >= 160000 and owner_exists:
            # PostgreSQL 16+: a CREATEROLE role cannot grant itself a role that another
            # created (the migration says so, with this command as its hint)
            admin.execute(f"GRANT outbox_owner TO {role}")
    janitor = DatabaseJanitor(
        user=pg_server.user,
        host=pg_server.host,
        port=pg_server.port,
        password=pg_server.password,
        dbname=name,
    )
    janitor.init()
    try:
        with psycopg.connect(pg_server.url(name), autocommit=True) as owner:
            owner.execute(f"GRANT CREATE ON DATABASE {name} TO {role}")
            owner.execute(f"GRANT CREATE ON SCHEMA public TO {role}")  # the version table
        url = pg_server.url(name).replace(f"//{pg_server.user}@", f"//{role}@", 1)
        upgrade(url)
        with psycopg.connect(url) as conn:
            owners = conn.execute(
                "SELECT DISTINCT proowner::regrole::text FROM pg_proc"
                " WHERE pronamespace = 'outbox'::regnamespace"
            ).fetchall()
            assert owners == [("outbox_owner",)]
            assert conn.execute("SELECT outbox.enqueue('email','price_alert','u','{}')").fetchone()
        downgrade(url, "outbox_0005")
        upgrade(url)
    finally:
        janitor.drop()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE {role}")


def test_downgrading_outbox_0006_restores_outbox_0005_exactly(
    empty_database_url: str, second_empty_database_url: str
) -> None:
    upgrade(empty_database_url, "outbox_0005")
    upgrade(second_empty_database_url)
    downgrade(second_empty_database_url, "outbox_0005")
    before, after = catalog(empty_database_url), catalog(second_empty_database_url)
    for name in CATALOG_QUERIES:
        assert before[name] == after[name], f"{name} differ"


def test_downgrading_outbox_0007_restores_outbox_0006_exactly(
    empty_database_url: str, second_empty_database_url: str
) -> None:
    upgrade(empty_database_url, "outbox_0006")
    upgrade(second_empty_database_url, "outbox_0007")
    downgrade(second_empty_database_url, "outbox_0006")
    before, after = catalog(empty_database_url), catalog(second_empty_database_url)
    for name in CATALOG_QUERIES:
        assert before[name] == after[name], f"{name} differ"


def test_a_dispatcher_of_outbox_0006_still_takes_slots_after_outbox_0007(
    empty_database_url: str,
) -> None:
    """Migrate first, then roll the dispatchers: the old statements still run."""
    upgrade(empty_database_url, "outbox_0007")
    with psycopg.connect(empty_database_url) as conn:
        conn.execute(
            "INSERT INTO outbox.rate_limit AS p (key, tokens, updated_at)"
            " VALUES ('pace:old', 0, '-infinity')"
            " ON CONFLICT (key) DO UPDATE SET tokens = 0"
        )
        conn.execute(
            "INSERT INTO outbox.rate_limit (key, updated_at) VALUES ('pace:new', '-infinity')"
        )
        rows = conn.execute("SELECT key, tokens FROM outbox.rate_limit ORDER BY key").fetchall()
    assert rows == [("pace:new", 0.0), ("pace:old", 0.0)]


def test_outbox_0006_keeps_existing_keys_for_the_default_window(empty_database_url: str) -> None:
    upgrade(empty_database_url, "outbox_0005")
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}', idempotency_key => 'k')"
        )
    upgrade(empty_database_url)
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT expires_at - created_at FROM outbox.idempotency_key"
        ).fetchall() == [(timedelta(hours=24),)]
        # still in force: the same key returns the first message
        again = conn.execute(
            "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}', idempotency_key => 'k')"
        ).fetchone()
        assert again == (1,)


def test_downgrading_outbox_0008_restores_outbox_0007_exactly(
    empty_database_url: str, second_empty_database_url: str
) -> None:
    upgrade(empty_database_url, "outbox_0007")
    upgrade(second_empty_database_url, "outbox_0008")
    downgrade(second_empty_database_url, "outbox_0007")
    before, after = catalog(empty_database_url), catalog(second_empty_database_url)
    for name in CATALOG_QUERIES:
        assert before[name] == after[name], f"{name} differ"


def test_producers_of_outbox_0007_keep_working_after_outbox_0008(empty_database_url: str) -> None:
    """Migrate first, then roll the producers: the ten-argument enqueue still runs, and
    messages written before the revision belong to the role that migrated."""
    upgrade(empty_database_url, "outbox_0007")
    with psycopg.connect(empty_database_url) as conn:
        before = conn.execute(
            "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}', 'transactional',"
            " NULL, NULL, NULL, NULL, interval '1 hour')"
        ).fetchone()
    upgrade(empty_database_url, "outbox_0008")
    with psycopg.connect(empty_database_url) as conn:
        after = conn.execute(
            "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}', 'transactional',"
            " NULL, NULL, NULL, NULL, interval '1 hour')"
        ).fetchone()
        owners = conn.execute(
            "SELECT DISTINCT enqueued_by::regrole::text = current_user FROM outbox.message"
        ).fetchall()
        assert before is not None and after is not None
        assert conn.execute("SELECT outbox.cancel(%s)", [before[0]]).fetchone() == (True,)
    assert owners == [(True,)]


def test_downgrading_outbox_0009_restores_outbox_0008_exactly(
    empty_database_url: str, second_empty_database_url: str
) -> None:
    upgrade(empty_database_url, "outbox_0008")
    upgrade(second_empty_database_url, "outbox_0009")
    downgrade(second_empty_database_url, "outbox_0008")
    before, after = catalog(empty_database_url), catalog(second_empty_database_url)
    for name in CATALOG_QUERIES:
        assert before[name] == after[name], f"{name} differ"


def test_downgrading_outbox_0010_restores_outbox_0009_exactly(
    empty_database_url: str, second_empty_database_url: str
) -> None:
    upgrade(empty_database_url, "outbox_0009")
    upgrade(second_empty_database_url, "outbox_0010")
    downgrade(second_empty_database_url, "outbox_0009")
    before, after = catalog(empty_database_url), catalog(second_empty_database_url)
    for name in CATALOG_QUERIES:
        assert before[name] == after[name], f"{name} differ"


def test_downgrading_outbox_0011_restores_outbox_0010_exactly(
    empty_database_url: str, second_empty_database_url: str
) -> None:
    upgrade(empty_database_url, "outbox_0010")
    upgrade(second_empty_database_url, "outbox_0011")
    downgrade(second_empty_database_url, "outbox_0010")
    before, after = catalog(empty_database_url), catalog(second_empty_database_url)
    for name in CATALOG_QUERIES:
        assert before[name] == after[name], f"{name} differ"


def test_downgrading_outbox_0013_restores_outbox_0012_exactly(
    empty_database_url: str, second_empty_database_url: str
) -> None:
    upgrade(empty_database_url, "outbox_0012")
    upgrade(second_empty_database_url, "outbox_0013")
    downgrade(second_empty_database_url, "outbox_0012")
    before, after = catalog(empty_database_url), catalog(second_empty_database_url)
    for name in CATALOG_QUERIES:
        assert before[name] == after[name], f"{name} differ"


def test_outbox_0011_gives_each_key_to_the_producer_of_its_message(
    empty_database_url: str,
) -> None:
    upgrade(empty_database_url, "outbox_0010")
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute("CREATE ROLE producer_0011_a; CREATE ROLE producer_0011_b")
        try:
            pending = conn.execute(
                "SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}', idempotency_key => 'p')"
            ).fetchone()
            delivered = conn.execute(
                "SELECT outbox.enqueue('email', 'price_alert', 'u2', '{}', idempotency_key => 'd')"
            ).fetchone()
            assert pending is not None and delivered is not None
            conn.execute(
                "UPDATE outbox.message SET enqueued_by = 'producer_0011_a'::regrole WHERE id = %s",
                pending,
            )
            # a delivered message is gone from outbox.message; its log row remains
            conn.execute(
                "INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,"
                " outcome, enqueued_by) VALUES (%s, 'transactional', 'email', 'u2',"
                " 'price_alert', 1, 'sent', 'producer_0011_b'::regrole)",
                delivered,
            )
            conn.execute("DELETE FROM outbox.message WHERE id = %s", delivered)
            upgrade(empty_database_url, "outbox_0011")
            owners = conn.execute(
                "SELECT key, producer::regrole::text FROM outbox.idempotency_key ORDER BY key"
            ).fetchall()
            assert owners == [("d", "producer_0011_b"), ("p", "producer_0011_a")]
            # both producers now hold 'p'; the downgrade keeps the one used first
            conn.execute(
                "INSERT INTO outbox.idempotency_key (key, message_id, expires_at, producer,"
                " created_at) VALUES ('p', 999, now() + interval '1 hour',"
                " 'producer_0011_b'::regrole, now() + interval '1 second')"
            )
            downgrade(empty_database_url, "outbox_0010")
            assert conn.execute(
                "SELECT key, message_id FROM outbox.idempotency_key ORDER BY key"
            ).fetchall() == [("d", delivered[0]), ("p", pending[0])]
        finally:
            conn.execute("DROP OWNED BY producer_0011_a, producer_0011_b")
            conn.execute("DROP ROLE producer_0011_a; DROP ROLE producer_0011_b")


RECIPIENTS_0009 = """
INSERT INTO outbox.recipient (user_id, email, telegram_chat_id, email_undeliverable_at,
                              telegram_blocked_at, disabled_channels, fallback_order, timezone)
VALUES ('both', 'both@example.com', 42, NULL, NULL, '{}', '{telegram,email}', 'Europe/Berlin'),
       ('bounced', 'gone@example.com', NULL, '2026-01-02 03:04:05+00', NULL, '{push}', NULL, 'UTC'),
       ('blocked', NULL, -1001234567890, NULL, '2026-02-03 04:05:06+00', '{}', NULL, 'UTC'),
       ('bounced_and_blocked', 'x@example.org', 9223372036854775807,
        '2026-03-01 00:00:00+00', '2026-03-02 00:00:00+00', '{inapp}', '{email}', 'UTC'),
       ('none', NULL, NULL, NULL, NULL, '{}', NULL, 'UTC')
"""

RECIPIENT_COLUMNS_0009 = """
SELECT user_id, email, telegram_chat_id, email_undeliverable_at, telegram_blocked_at,
       disabled_channels, fallback_order, timezone, created_at, updated_at
  FROM outbox.recipient ORDER BY user_id
"""


def test_outbox_0010_moves_every_address_and_state_and_its_downgrade_brings_them_back(
    empty_database_url: str,
) -> None:
    upgrade(empty_database_url, "outbox_0009")
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(RECIPIENTS_0009)
        before = conn.execute(RECIPIENT_COLUMNS_0009).fetchall()
    upgrade(empty_database_url, "outbox_0010")
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        addresses = conn.execute(
            "SELECT user_id, channel, address, undeliverable_since, disabled_since"
            " FROM outbox.recipient_address ORDER BY user_id, channel"
        ).fetchall()
        rest = conn.execute(
            "SELECT user_id, disabled_channels, fallback_order, timezone FROM outbox.recipient"
            " ORDER BY user_id"
        ).fetchall()
        # an sms address and a plugin channel, which outbox_0009 cannot hold
        conn.execute("SELECT outbox.register_channel('slack')")
        conn.execute("SELECT outbox.set_address('both', 'sms', '+4915112345678')")
        conn.execute("SELECT outbox.set_address('both', 'slack', 'U123')")
        conn.execute("UPDATE outbox.recipient SET disabled_channels = '{slack,sms,push}'")
        conn.execute("SELECT outbox.enqueue('slack', 'price_alert', 'both', '{}')")
    when = {row[0]: (row[3], row[4]) for row in before}
    assert addresses == [
        ("blocked", "telegram", "-1001234567890", None, when["blocked"][1]),
        ("both", "email", "both@example.com", None, None),
        ("both", "telegram", "42", None, None),
        ("bounced", "email", "gone@example.com", when["bounced"][0], None),
        ("bounced_and_blocked", "email", "x@example.org", when["bounced_and_blocked"][0], None),
        (
            "bounced_and_blocked",
            "telegram",
            "9223372036854775807",
            None,
            when["bounced_and_blocked"][1],
        ),
    ]
    assert rest == [
        ("blocked", [], None, "UTC"),
        ("both", [], ["telegram", "email"], "Europe/Berlin"),
        ("bounced", ["push"], None, "UTC"),
        ("bounced_and_blocked", ["inapp"], ["email"], "UTC"),
        ("none", [], None, "UTC"),
    ]
    downgrade(empty_database_url, "outbox_0009")
    with psycopg.connect(empty_database_url) as conn:
        after = conn.execute(RECIPIENT_COLUMNS_0009).fetchall()
        messages = conn.execute("SELECT count(*) FROM outbox.message").fetchone()
    # every column as before, but the channels outbox_0009 does not know are gone
    assert [row[:5] + row[6:] for row in after] == [row[:5] + row[6:] for row in before]
    assert [row[5] for row in after] == [["push"], ["push"], ["push"], ["push"], ["push"]]
    assert messages == (0,)


def test_downgrading_outbox_0012_restores_outbox_0011_exactly(
    empty_database_url: str, second_empty_database_url: str
) -> None:
    upgrade(empty_database_url, "outbox_0011")
    upgrade(second_empty_database_url, "outbox_0012")
    downgrade(second_empty_database_url, "outbox_0011")
    before, after = catalog(empty_database_url), catalog(second_empty_database_url)
    for name in CATALOG_QUERIES:
        assert before[name] == after[name], f"{name} differ"
