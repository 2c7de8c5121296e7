"""outbox.recipient.addresses: the claim's copy of outbox.recipient_address (outbox_0012).

The claim reads one column instead of aggregating every message's address rows. The
copy must follow every write path of the truth (set_address, upsert_recipient, the
dispatcher's effects, the delivery reports, deletes, TRUNCATE), ignore whatever a
statement writes into it, and stay whole when two transactions change one user's
addresses at once.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import psycopg
import pytest

from outbox._migrate import downgrade, upgrade


def cached(conn: psycopg.Connection[Any], user_id: str) -> list[list[Any]]:
    row = conn.execute(
        "SELECT addresses FROM outbox.recipient WHERE user_id = %s", [user_id]
    ).fetchone()
    assert row is not None, f"no recipient {user_id}"
    value = row[0]
    return value if isinstance(value, list) else json.loads(value)


def truth(conn: psycopg.Connection[Any], user_id: str) -> list[list[Any]]:
    rows = conn.execute(
        "SELECT channel, address, undeliverable_since IS NULL AND disabled_since IS NULL"
        "  FROM outbox.recipient_address WHERE user_id = %s ORDER BY channel",
        [user_id],
    ).fetchall()
    return [list(r) for r in rows]


def test_every_write_path_of_an_address_updates_the_copy(admin: psycopg.Connection[Any]) -> None:
    admin.execute("SELECT outbox.set_address('u1', 'email', 'u1@example.com')")
    assert cached(admin, "u1") == [["email", "u1@example.com", True]]

    admin.execute("SELECT outbox.set_address('u1', 'sms', '+41790000001')")
    admin.execute("SELECT outbox.set_address('u1', 'telegram', '42')")
    assert cached(admin, "u1") == [
        ["email", "u1@example.com", True],
        ["sms", "+41790000001", True],
        ["telegram", "42", True],
    ]

    # a bounce webhook marks the address dead (a function that matches by address)
    assert admin.execute(
        "SELECT outbox.mark_address_undeliverable('email', 'U1@example.com', 'bounce')"
    ).fetchone() == (1,)
    # the dispatcher's effect (a plain UPDATE of its own): the user blocked the bot
    admin.execute(
        "UPDATE outbox.recipient_address SET disabled_since = now()"
        " WHERE user_id = 'u1' AND channel = 'telegram'"
    )
    assert cached(admin, "u1") == [
        ["email", "u1@example.com", False],
        ["sms", "+41790000001", True],
        ["telegram", "42", False],
    ]

    # upsert_recipient (the Python producer API's statement) with a new email clears
    # the bounce; removing an address removes it from the copy
    from outbox._queries import QUERIES

    params = dict.fromkeys(
        [
            "timezone",
            "quiet_hours_start",
            "quiet_hours_end",
            "disabled_channels",
            "campaign_opt_out",
            "fallback_order",
            "telegram_chat_id",
            "phone",
        ]
    )
    admin.execute(
        QUERIES["upsert_recipient"],
        {**params, "user_id": "u1", "email": "new@example.com", "set_quiet_hours": False},
    )
    admin.execute("SELECT outbox.set_address('u1', 'sms', NULL)")
    assert cached(admin, "u1") == [["email", "new@example.com", True], ["telegram", "42", False]]
    assert cached(admin, "u1") == truth(admin, "u1")

    # a new user through upsert_recipient alone: recipient and addresses in one statement
    admin.execute(
        QUERIES["upsert_recipient"],
        {
            **params,
            "user_id": "u2",
            "email": "u2@example.com",
            "telegram_chat_id": 7,
            "set_quiet_hours": False,
        },
    )
    assert cached(admin, "u2") == [["email", "u2@example.com", True], ["telegram", "7", True]]

    admin.execute("DELETE FROM outbox.recipient_address WHERE user_id = 'u2' AND channel = 'email'")
    assert cached(admin, "u2") == [["telegram", "7", True]]
    admin.execute("TRUNCATE outbox.recipient_address")
    assert cached(admin, "u1") == cached(admin, "u2") == []


@pytest.mark.parametrize("role", ["outbox_recipient_writer", "outbox_dispatcher"])
def test_a_statement_cannot_forge_the_copy(admin: psycopg.Connection[Any], role: str) -> None:
    """A role that may update recipients (the user service, the API) writes the copy in
    vain: the trigger computes it from the addresses, whose CHECKs it would bypass."""
    admin.execute("SELECT outbox.set_address('u1', 'email', 'u1@example.com')")
    admin.commit()
    admin.execute(f"SET ROLE {role}")
    forged = json.dumps([["email", "victim@example.com\r\nBcc: all@example.com", True]])
    admin.execute("UPDATE outbox.recipient SET addresses = %s WHERE user_id = 'u1'", [forged])
    admin.execute("RESET ROLE")
    assert cached(admin, "u1") == [["email", "u1@example.com", True]]


def test_a_recipient_inserted_with_a_copy_gets_the_truth(admin: psycopg.Connection[Any]) -> None:
    admin.execute(
        "INSERT INTO outbox.recipient (user_id, addresses) VALUES ('u9', %s)",
        [json.dumps([["email", "forged@example.com", True]])],
    )
    assert cached(admin, "u9") == []


@pytest.mark.timeout(60)
def test_two_transactions_adding_addresses_to_one_user_at_once_both_land_in_the_copy(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    """Each transaction's trigger reads the addresses under the recipient's row lock,
    with a snapshot taken after the lock: the second sees the first's commit. (A
    trigger that computed the copy in its UPDATE's own subquery loses the first's
    address here: that statement's snapshot predates the first's commit.)"""
    admin.execute("SELECT outbox.set_address('u1', 'email', 'u1@example.com')")
    admin.commit()
    with psycopg.connect(database_url) as first, psycopg.connect(database_url) as second:
        first.execute("SELECT outbox.set_address('u1', 'sms', '+41790000001')")
        # second blocks on the recipient row that first's trigger updated
        done = threading.Event()
        errors: list[BaseException] = []

        def add_telegram() -> None:
            try:
                # a plain INSERT (the user service may write addresses directly):
                # set_address would first wait on the recipient row in its own
                # INSERT ... ON CONFLICT, and so hide a trigger that reads too early
                second.execute(
                    "INSERT INTO outbox.recipient_address (user_id, channel, address)"
                    " VALUES ('u1', 'telegram', '42')"
                )
                second.commit()
            except BaseException as error:  # reported below
                errors.append(error)
            finally:
                done.set()

        worker = threading.Thread(target=add_telegram)
        worker.start()
        assert not done.wait(1.0), "the second transaction did not wait for the first"
        assert admin.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND datname = current_database()"
        ).fetchone() == (1,), "the second transaction should wait on a lock"
        first.commit()
        assert done.wait(20)
        worker.join()
        assert not errors, errors
    admin.rollback()
    assert cached(admin, "u1") == [
        ["email", "u1@example.com", True],
        ["sms", "+41790000001", True],
        ["telegram", "42", True],
    ]


def test_the_claim_returns_the_copy(admin: psycopg.Connection[Any]) -> None:
    from outbox._queries import QUERIES

    admin.execute("SELECT outbox.set_address('u1', 'email', 'u1@example.com')")
    admin.execute("SELECT outbox.set_address('u1', 'sms', '+41790000001')")
    admin.execute("SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}')")
    columns = admin.execute(
        QUERIES["claim_batch"],
        {
            "batch_size": 10,
            "priority_from": -32768,
            "priority_below": 32768,
            "expired_limit": 10,
            "lease_seconds": 30,
            "dispatcher_id": "test",
            "lease_token": "00000000-0000-0000-0000-000000000001",
        },
    )
    names = [c.name for c in columns.description or []]
    (row,) = columns.fetchall()
    addresses = row[names.index("addresses")]
    assert (addresses if isinstance(addresses, list) else json.loads(addresses)) == [
        ["email", "u1@example.com", True],
        ["sms", "+41790000001", True],
    ]


def test_outbox_0012_fills_the_copy_from_existing_addresses_and_its_downgrade_drops_it(
    empty_database_url: str,
) -> None:
    upgrade(empty_database_url, "outbox_0011")
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        conn.execute(
            "SELECT outbox.set_address('u' || g, 'email', 'u' || g || '@example.com')"
            " FROM generate_series(1, 50) g"
        )
        conn.execute("SELECT outbox.set_address('u7', 'telegram', '-1007')")
        conn.execute(
            "UPDATE outbox.recipient_address SET undeliverable_since = now() WHERE user_id = 'u3'"
        )
        conn.execute("INSERT INTO outbox.recipient (user_id) VALUES ('nobody')")
    upgrade(empty_database_url, "outbox_0012")
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        for g in range(1, 51):
            assert cached(conn, f"u{g}") == truth(conn, f"u{g}")
        assert cached(conn, "u7") == [
            ["email", "u7@example.com", True],
            ["telegram", "-1007", True],
        ]
        assert cached(conn, "u3") == [["email", "u3@example.com", False]]
        assert cached(conn, "nobody") == []
    downgrade(empty_database_url, "outbox_0011")
    with psycopg.connect(empty_database_url, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_schema = 'outbox' AND table_name = 'recipient'"
            "   AND column_name = 'addresses'"
        ).fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM outbox.recipient_address").fetchone() == (51,)
