"""The operator commands, run as a user would: the installed `outbox` script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg

OUTBOX = str(Path(sys.executable).with_name("outbox"))


def run(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OUTBOX_DATABASE_URL": database_url}
    return subprocess.run(
        [OUTBOX, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def make_dead(admin: psycopg.Connection[Any], count: int) -> list[int]:
    ids = []
    for i in range(count):
        row = admin.execute(
            "SELECT outbox.enqueue('email', 'price_alert', %s, '{\"instrument\": \"EURUSD\"}')",
            [f"user-{i}"],
        ).fetchone()
        assert row is not None
        ids.append(row[0])
    admin.execute(
        "UPDATE outbox.message SET status = 'dead', dead_at = now() - interval '8 days',"
        " attempts = 5, error_class = 'smtp_5xx', last_error = '550 mailbox unavailable'"
    )
    return ids


def test_dlq_list_show_retry_and_stats_read_like_tables(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    ids = make_dead(admin, 3)
    listed = run(database_url, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    header, _rule, *lines = listed.stdout.splitlines()
    assert header.split()[:4] == ["id", "lane", "channel", "user"]
    assert len(lines) == 3 and all("smtp_5xx" in line for line in lines)

    shown = run(database_url, "dlq", "show", str(ids[0]))
    assert shown.returncode == 0
    assert "550 mailbox unavailable" in shown.stdout and '"instrument": "EURUSD"' in shown.stdout
    assert run(database_url, "dlq", "show", "999999").returncode == 1

    stats = run(database_url, "stats")
    assert "transactional" in stats.stdout and "dead" in stats.stdout

    retried = run(database_url, "dlq", "retry", str(ids[0]))
    assert retried.stdout.strip() == "1 dead message(s) back to pending."
    assert run(database_url, "dlq", "retry", "--all", "--yes").stdout.startswith("2 dead")
    assert admin.execute(
        "SELECT count(*) FROM outbox.message WHERE status = 'pending' AND attempts = 0"
    ).fetchone() == (3,)
    assert run(database_url, "dlq", "list").stdout.strip() == "No dead letters."


def test_dlq_purge_deletes_only_older_dead_letters(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    make_dead(admin, 2)
    assert run(database_url, "dlq", "purge", "--older-than", "30d", "--yes").stdout.startswith(
        "0 dead"
    )
    purged = run(database_url, "dlq", "purge", "--older-than", "7d", "--yes")
    assert purged.stdout.startswith("2 dead"), purged.stdout + purged.stderr
    assert admin.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)


def test_bad_configuration_and_usage_exit_2(database_url: str) -> None:
    bad = subprocess.run(
        [OUTBOX, "stats"],
        env={**os.environ, "OUTBOX_SMTP_TLS": "maybe", "OUTBOX_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2 and "OUTBOX_SMTP_TLS" in bad.stderr
    assert run(database_url, "dlq", "retry").returncode == 2


def test_migrate_on_an_empty_database(empty_database_url: str) -> None:
    result = run(empty_database_url, "migrate")
    assert result.returncode == 0, result.stderr
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT count(*) FROM outbox.queue_stats").fetchone() == (0,)


def test_templates_lists_the_built_in_alerts(database_url: str) -> None:
    result = run(database_url, "templates")
    assert result.returncode == 0, result.stderr
    for name in (
        "position_failure_entry",
        "position_failure_sl",
        "position_failure_tp",
        "price_alert",
    ):
        assert name in result.stdout
    assert "broker_ticket" in result.stdout


PRICE_ALERT = {
    "instrument": "XAUUSD",
    "trigger_price": "2400",
    "current_price": "2401.5",
    "condition": "above",
}


def test_campaign_enqueues_every_user_in_one_transaction_with_a_progress_bar(
    database_url: str, admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    users = tmp_path / "users.txt"
    users.write_text(
        "# exported from the CRM\n" + "".join(f"trader-{i}\n" for i in range(2500)) + "\n"
    )
    variables = tmp_path / "vars.json"
    variables.write_text(json.dumps(PRICE_ALERT))

    result = run(
        database_url,
        "campaign",
        "--users",
        str(users),
        "--channel",
        "email",
        "--template",
        "price_alert",
        "--vars",
        f"@{variables}",
        "--batch-size",
        "1000",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "2,500 message(s) enqueued (email, price_alert, lane campaign) in 3 batch(es),"
        " one transaction."
    )
    # not a terminal: whole lines, the last one complete
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("campaign") and "2,500/2,500" in last and "100%" in last
    assert "\r" not in result.stderr
    assert admin.execute(
        "SELECT count(*), count(DISTINCT user_id), min(lane), max(vars->>'instrument')"
        " FROM outbox.message"
    ).fetchone() == (2500, 2500, "campaign", "XAUUSD")


def test_campaign_with_missing_variables_rolls_back_and_enqueues_nothing(
    database_url: str, admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    users = tmp_path / "users.txt"
    users.write_text("u1\nu2\n")

    result = run(
        database_url,
        "campaign",
        "--users",
        str(users),
        "--channel",
        "telegram",
        "--template",
        "price_alert",
        "--vars",
        '{"instrument": "EURUSD"}',
    )

    assert result.returncode == 1
    assert "missing variables" in result.stderr and "rolled back" in result.stderr
    assert admin.execute("SELECT count(*) FROM outbox.message").fetchone() == (0,)


def test_campaign_rejects_bad_input_before_connecting(tmp_path: Path) -> None:
    users = tmp_path / "users.txt"
    users.write_text("u1\n")
    unreachable = "postgresql://nobody@127.0.0.1:1/none"

    not_json = run(
        unreachable,
        "campaign",
        "--users",
        str(users),
        "--channel",
        "email",
        "--template",
        "price_alert",
        "--vars",
        "{instrument",
    )
    not_object = run(
        unreachable,
        "campaign",
        "--users",
        str(users),
        "--channel",
        "email",
        "--template",
        "price_alert",
        "--vars",
        "[1]",
    )
    no_file = run(
        unreachable,
        "campaign",
        "--users",
        str(tmp_path / "missing.txt"),
        "--channel",
        "email",
        "--template",
        "price_alert",
        "--vars",
        "{}",
    )

    assert (not_json.returncode, not_object.returncode, no_file.returncode) == (2, 2, 2)
    assert "not valid JSON" in not_json.stderr
    assert "must be a JSON object" in not_object.stderr
    assert "cannot read" in no_file.stderr


def test_dlq_retry_all_redrives_many_rows_in_batches_with_progress(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    admin.execute(
        "SELECT outbox.enqueue_many('email', 'price_alert',"
        " ARRAY(SELECT 'u' || g FROM generate_series(1, 250) g), ARRAY[%s::jsonb])",
        [json.dumps(PRICE_ALERT)],
    )
    admin.execute(
        "UPDATE outbox.message SET status = 'dead', dead_at = now(), attempts = 5,"
        " error_class = 'smtp_5xx', last_error = '550 no such user'"
    )

    result = run(database_url, "dlq", "retry", "--all", "--batch-size", "100", "--yes")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "250 dead message(s) back to pending."
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("retrying") and "250/250" in last
    assert admin.execute(
        "SELECT count(*) FILTER (WHERE status = 'pending' AND attempts = 0), count(*)"
        " FROM outbox.message"
    ).fetchone() == (250, 250)
