"""``outbox.message_status`` stays cheap on a large history: the plans, shown.

auto_explain prints the plan of every statement the functions run (nested ones
included) as a NOTICE, so the test reads the real plans, not a copy of the SQL.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg

import outbox


def nested_plans(conn: psycopg.Connection[Any], statement: str, *params: Any) -> list[str]:
    notices: list[str] = []
    conn.add_notice_handler(lambda diagnostic: notices.append(diagnostic.message_primary or ""))
    conn.execute("LOAD 'auto_explain'")
    conn.execute("SET auto_explain.log_min_duration = 0")
    conn.execute("SET auto_explain.log_nested_statements = on")
    conn.execute("SET auto_explain.log_format = 'json'")
    conn.execute("SET auto_explain.log_level = 'notice'")
    conn.execute("SET client_min_messages = 'notice'")
    conn.execute(statement, list(params)).fetchall()
    conn.execute("RESET auto_explain.log_min_duration")
    return [n for n in notices if "Plan" in n]


def scans(plan_text: str) -> list[tuple[str, str | None]]:
    """(node type, index name) of every scan in one auto_explain JSON plan."""
    start = plan_text.index("{")
    document = json.loads(plan_text[start:])
    found: list[tuple[str, str | None]] = []

    def walk(node: dict[str, Any]) -> None:
        if "Scan" in node.get("Node Type", ""):
            found.append((node["Node Type"], node.get("Index Name")))
        for child in node.get("Plans", []):
            walk(child)

    walk(document["Plan"])
    return found


def test_status_reads_two_indexes_and_no_table_on_a_large_history(
    admin: psycopg.Connection[Any],
) -> None:
    # 200,000 delivered messages' attempts and 20,000 live rows
    admin.execute(
        "INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,"
        " outcome) SELECT g / 2, 'transactional', 'email', 'u' || g % 100, 'price_alert', 1,"
        " CASE WHEN g % 2 = 0 THEN 'retry' ELSE 'sent' END FROM generate_series(2, 400001) g"
    )
    admin.execute(
        "INSERT INTO outbox.message (lane, priority, channel, user_id, template)"
        " SELECT 'transactional', 0, 'email', 'u' || g, 'price_alert'"
        " FROM generate_series(1, 20000) g"
    )
    admin.execute("ANALYZE outbox.attempt")
    admin.execute("ANALYZE outbox.message")
    live = admin.execute("SELECT max(id) FROM outbox.message").fetchone()[0]  # type: ignore[index]

    for message_id, state in ((123_456, "sent"), (live, "pending")):
        status = outbox.message_status(admin, message_id)
        assert status is not None and status.state == state
        plans = nested_plans(admin, "SELECT * FROM outbox.message_status(%s)", message_id)
        plans += nested_plans(admin, "SELECT * FROM outbox.message_attempts(%s)", message_id)
        every_scan = [scan for plan in plans for scan in scans(plan)]
        assert every_scan, "auto_explain showed no plan"
        assert all(kind != "Seq Scan" for kind, _ in every_scan), every_scan
        used = {index for _, index in every_scan if index}
        assert used <= {"message_pkey", "attempt_message_idx"}, used
    sent = outbox.message_status(admin, 123_456)
    assert sent is not None and [a.outcome for a in sent.attempts] == ["retry", "sent"]
