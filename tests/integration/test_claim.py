"""The claim statement: disjoint, non-blocking, indexed, fenced by the lease token."""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any

import psycopg

from outbox._queries import QUERIES
from outbox.dispatcher._store import URGENT_PRIORITY_BELOW


def enqueue_many(conn: psycopg.Connection[Any], n: int, *, lane: str = "transactional") -> None:
    conn.execute(
        "SELECT outbox.enqueue_many('email', 'price_alert',"
        " ARRAY(SELECT 'u' || g FROM generate_series(1, %s) g), ARRAY['{}'::jsonb], %s)",
        [n, lane],
    )


def claim(
    conn: psycopg.Connection[Any], n: int, who: str = "d1", token: uuid.UUID | None = None
) -> list[tuple[Any, ...]]:
    return conn.execute(
        QUERIES["claim_batch"],
        {
            "batch_size": n,
            "priority_from": -32768,
            "priority_below": 32768,
            "expired_limit": n,
            "lease_seconds": 30,
            "dispatcher_id": who,
            "lease_token": str(token or uuid.uuid4()),
        },
    ).fetchall()


def tokens(conn: psycopg.Connection[Any]) -> dict[int, uuid.UUID]:
    return dict(conn.execute("SELECT id, lease_token FROM outbox.message").fetchall())


def test_two_concurrent_claims_get_disjoint_rows(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as setup:
        enqueue_many(setup, 1000)
    results: list[list[int]] = [[], []]

    def worker(slot: int) -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            while rows := claim(conn, 50, f"d{slot}"):
                results[slot].extend(row[0] for row in rows)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    a, b = set(results[0]), set(results[1])
    assert not a & b
    assert len(a) + len(b) == 1000
    assert len(results[0]) + len(results[1]) == 1000


def test_a_claim_skips_rows_locked_by_another_transaction_without_blocking(
    database_url: str,
) -> None:
    with psycopg.connect(database_url, autocommit=True) as setup:
        enqueue_many(setup, 10)
    with (
        psycopg.connect(database_url) as holder,
        psycopg.connect(database_url, autocommit=True) as claimer,
    ):
        locked = holder.execute(
            "SELECT id FROM outbox.message ORDER BY id LIMIT 4 FOR UPDATE"
        ).fetchall()
        claimer.execute("SET lock_timeout = '1s'")
        rows = claim(claimer, 100)
        holder.rollback()
    claimed = {row[0] for row in rows}
    assert len(claimed) == 6
    assert not claimed & {row[0] for row in locked}


def test_the_claim_orders_by_priority_then_due_time(conn: psycopg.Connection[Any]) -> None:
    enqueue_many(conn, 5, lane="campaign")
    enqueue_many(conn, 3, lane="transactional")
    conn.commit()
    rows = claim(conn, 3)
    assert sorted(row[1] for row in rows) == ["transactional"] * 3


def test_the_claim_uses_the_partial_index(conn: psycopg.Connection[Any]) -> None:
    enqueue_many(conn, 5000, lane="campaign")
    conn.execute("UPDATE outbox.message SET status = 'dead', dead_at = now() WHERE id % 2 = 0")
    conn.execute("ANALYZE outbox.message")
    plan = conn.execute(
        "EXPLAIN (FORMAT JSON) " + QUERIES["claim_batch"],
        {
            "batch_size": 100,
            "priority_from": -32768,
            "priority_below": 32768,
            "expired_limit": 100,
            "lease_seconds": 30,
            "dispatcher_id": "d",
            "lease_token": str(uuid.uuid4()),
        },
    ).fetchone()
    assert plan is not None
    text = json.dumps(plan[0])
    assert '"Index Name": "message_claim_idx"' in text
    assert '"Index Name": "message_lease_idx"' in text
    scanned = [
        node.get("Relation Name")
        for node in _nodes(plan[0][0]["Plan"])
        if node["Node Type"] == "Seq Scan"
    ]
    assert "message" not in scanned


def _nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    found = [node]
    for child in node.get("Plans", []):
        found += _nodes(child)
    return found


def test_a_finish_with_a_stale_lease_token_updates_zero_rows(
    conn: psycopg.Connection[Any],
) -> None:
    enqueue_many(conn, 1)
    token = uuid.uuid4()
    (row,) = claim(conn, 1, token=token)
    message_id = row[0]
    assert tokens(conn) == {message_id: token}
    params = {
        "ids": [message_id],
        "tokens": [uuid.uuid4()],
        "durations": [1.0],
        "provider_ids": ["SMabc"],
        "dispatcher_id": "late",
    }
    assert conn.execute(QUERIES["finish_sent"], params).fetchall() == []
    assert conn.execute(
        "SELECT status FROM outbox.message WHERE id = %s", [message_id]
    ).fetchone() == ("sending",)
    params["tokens"] = [token]
    assert conn.execute(QUERIES["finish_sent"], params).fetchall() == [(message_id,)]
    assert conn.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)
    assert conn.execute(
        "SELECT outcome, attempt, dispatcher_id, provider_id FROM outbox.attempt"
    ).fetchall() == [("sent", 1, "late", "SMabc")]


def test_an_expired_lease_is_claimed_again_with_a_new_token(
    conn: psycopg.Connection[Any],
) -> None:
    enqueue_many(conn, 1)
    first_token, second_token = uuid.uuid4(), uuid.uuid4()
    (first,) = claim(conn, 1, "dead-dispatcher", first_token)
    assert claim(conn, 1, "other") == []
    conn.execute("UPDATE outbox.message SET leased_until = now() - interval '1 second'")
    (again,) = claim(conn, 1, "other", second_token)
    assert again[0] == first[0]
    assert tokens(conn) == {first[0]: second_token}
    assert conn.execute("SELECT leased_by FROM outbox.message").fetchone() == ("other",)


def test_heartbeat_extends_only_leases_we_still_hold(conn: psycopg.Connection[Any]) -> None:
    enqueue_many(conn, 2)
    token = uuid.uuid4()
    rows = claim(conn, 2, token=token)
    kept = conn.execute(
        QUERIES["extend_leases"],
        {"ids": [r[0] for r in rows], "tokens": [token, uuid.uuid4()], "lease_seconds": 60},
    ).fetchall()
    assert kept == [(rows[0][0],)]


def test_next_due_reads_the_claim_index_not_the_pending_rows(
    conn: psycopg.Connection[Any],
) -> None:
    assert conn.execute(QUERIES["next_due"]).fetchall() == [(None, False)]
    conn.execute(
        "INSERT INTO outbox.message (lane, priority, channel, user_id, template, vars,"
        " next_attempt_at) SELECT 'campaign', 100 + g % 3, 'email', 'u' || g, 'price_alert',"
        " '{}', now() + g * interval '1 minute' FROM generate_series(1, 5000) g"
    )
    conn.execute(
        "INSERT INTO outbox.message (lane, priority, channel, user_id, template, vars,"
        " next_attempt_at) VALUES ('transactional', 0, 'email', 'u', 'price_alert', '{}',"
        " now() + interval '30 seconds')"
    )
    conn.execute("ANALYZE outbox.message")
    ((due_in, sending),) = conn.execute(QUERIES["next_due"]).fetchall()
    assert 29 < due_in <= 30 and sending is False
    plan = conn.execute("EXPLAIN (FORMAT JSON) " + QUERIES["next_due"]).fetchone()
    assert plan is not None
    scans = {(node["Node Type"], node.get("Relation Name")) for node in _nodes(plan[0][0]["Plan"])}
    assert ("Seq Scan", "message") not in scans


def urgent_claim(conn: psycopg.Connection[Any], n: int) -> list[tuple[Any, ...]]:
    """The dispatcher's urgent claim (``Store.claim(urgent=True)``)."""
    return conn.execute(
        QUERIES["claim_batch"],
        {
            "batch_size": n,
            "priority_from": -32768,
            "priority_below": URGENT_PRIORITY_BELOW,
            "expired_limit": 0,
            "lease_seconds": 30,
            "dispatcher_id": "urgent",
            "lease_token": str(uuid.uuid4()),
        },
    ).fetchall()


def urgent_due(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute(QUERIES["urgent_due"]).fetchone()
    assert row is not None
    return bool(row[0])


def test_urgent_due_names_the_transactional_lane_as_a_literal() -> None:
    """A literal, so that no generic plan of a prepared statement scans the table;
    it must stay the lane's bound."""
    assert f"priority < {URGENT_PRIORITY_BELOW} " in QUERIES["urgent_due"]


def test_the_urgent_claim_takes_the_transactional_lane_alone(
    conn: psycopg.Connection[Any],
) -> None:
    enqueue_many(conn, 1)
    ((expired, *_),) = claim(conn, 1)
    conn.execute(  # its dispatcher died: recovering it is the regular claim's business
        "UPDATE outbox.message SET leased_until = now() - interval '1 second' WHERE id = %s",
        [expired],
    )
    enqueue_many(conn, 5, lane="campaign")
    enqueue_many(conn, 2)
    conn.commit()
    assert urgent_due(conn)
    urgent = urgent_claim(conn, 10)
    assert sorted(row[1] for row in urgent) == ["transactional"] * 2
    assert expired not in {row[0] for row in urgent}
    assert not urgent_due(conn)  # the campaign's five are pending, and not its business
    assert urgent_claim(conn, 10) == []
    regular = claim(conn, 10)
    assert sorted(row[1] for row in regular) == ["campaign"] * 5 + ["transactional"]
    assert expired in {row[0] for row in regular}


def test_the_urgent_claim_stops_before_the_campaigns_dead_index_entries(
    conn: psycopg.Connection[Any],
) -> None:
    """A drained campaign leaves dead entries at the head of its part of
    message_claim_idx until vacuum runs; the regular claim reads past them, the urgent
    claim's index scan ends at the first campaign priority."""
    conn.execute("ALTER TABLE outbox.message SET (autovacuum_enabled = false)")
    enqueue_many(conn, 6000, lane="campaign")
    conn.commit()
    conn.execute("ANALYZE outbox.message")
    for _ in range(50):  # claimed and acknowledged (deleted), as a dispatcher does
        ids = [row[0] for row in claim(conn, 100)]
        conn.execute("DELETE FROM outbox.message WHERE id = ANY(%s)", [ids])
        conn.commit()
    enqueue_many(conn, 1)
    conn.commit()

    def claim_index_blocks(priority_below: int) -> int:
        plan = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + QUERIES["claim_batch"],
            {
                "batch_size": 100,
                "priority_from": -32768,
                "priority_below": priority_below,
                "expired_limit": 0,
                "lease_seconds": 30,
                "dispatcher_id": "d",
                "lease_token": str(uuid.uuid4()),
            },
        ).fetchone()
        conn.rollback()
        assert plan is not None
        scans = [
            node
            for node in _nodes(plan[0][0]["Plan"])
            if node.get("Index Name") == "message_claim_idx"
        ]
        assert len(scans) == 1
        return int(scans[0]["Shared Hit Blocks"]) + int(scans[0]["Shared Read Blocks"])

    urgent = claim_index_blocks(URGENT_PRIORITY_BELOW)
    regular = claim_index_blocks(32768)
    # a few blocks: the index's root and the leaf with the one transactional entry
    # (PostgreSQL 15 reads 3, 18 reads 9); the regular claim reads the dead entries
    # too (65 and 43 blocks there while claims committed without the WAL flush; 33 on
    # PostgreSQL 18 since they commit with it: hint bits wait for a commit's flush,
    # so scans now mark more of the dead entries)
    assert urgent <= 12, urgent
    assert regular >= 3 * urgent, (regular, urgent)
