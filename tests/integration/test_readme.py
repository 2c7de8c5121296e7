"""Every snippet README.md marks with ``<!-- readme-test: KIND -->`` runs as written.

``python`` blocks run in order in one namespace (as a reader pastes them into one
session), ``sql`` blocks through psycopg, the ``alembic`` block as a host
application's ``migrate.py``, ``shell`` blocks through bash with the installed
``outbox``. The configuration table must name every ``OUTBOX_*`` variable the code
reads. The demo command itself is run by ``.ci/readme`` on a clean clone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox._migrate import sqlalchemy_url
from outbox._schema_check import head_revision

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```\w+\n(.*?)\n```", re.DOTALL)
EXAMPLE_ROLES = ("trading_app", "outbox_worker", "oncall")
BIN = Path(sys.executable).parent


def snippets(kind: str) -> list[str]:
    found = [code for found_kind, code in BLOCK.findall(README) if found_kind == kind]
    assert found, f"README.md has no {kind} snippet"
    return found


def test_the_python_snippets_write_what_they_say(
    database_url: str, admin: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    admin.execute(
        "CREATE SCHEMA trading;"
        " CREATE TABLE trading.position (broker_ticket text PRIMARY KEY, state text NOT NULL);"
        " INSERT INTO trading.position VALUES ('T-99812', 'open'), ('T-99813', 'open')"
    )
    monkeypatch.setenv("OUTBOX_DATABASE_URL", database_url)
    namespace: dict[str, Any] = {"__name__": "readme"}
    try:
        for code in snippets("python"):
            exec(compile(code, "README.md", "exec"), namespace)
    finally:
        if "engine" in namespace:
            namespace["engine"].dispose()

    assert admin.execute(
        "SELECT broker_ticket, state FROM trading.position ORDER BY 1"
    ).fetchall() == [("T-99812", "sl_close_failed"), ("T-99813", "tp_close_failed")]
    assert admin.execute(
        "SELECT channel, template, lane, count(*) FROM outbox.message"
        " GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    ).fetchall() == [
        ("email", "position_failure_sl", "transactional", 1),
        ("email", "price_alert", "campaign", 5000),
        ("push", "position_failure_sl", "transactional", 1),
        ("push", "price_alert", "transactional", 1),
        ("telegram", "position_failure_tp", "transactional", 1),
    ]
    # the alert waits for the dispatcher; the price alert was cancelled before it came
    assert admin.execute(
        "SELECT channel, fallback, escalate_after FROM outbox.message WHERE escalate_after"
        " IS NOT NULL"
    ).fetchall() == [("push", ["telegram", "email"], timedelta(seconds=120))]
    assert admin.execute("SELECT outcome FROM outbox.attempt").fetchall() == [("cancelled",)]
    assert admin.execute(
        "SELECT topic, instrument, channels FROM outbox.preference ORDER BY 2"
    ).fetchall() == [("price_alert", "", ["push", "telegram"]), ("price_alert", "XAUUSD", [])]
    assert admin.execute(
        "SELECT (SELECT array_agg(a.address ORDER BY a.channel) FROM outbox.recipient_address a"
        "         WHERE a.user_id = r.user_id), count(s.id) FROM outbox.recipient r"
        " JOIN outbox.push_subscription s USING (user_id) WHERE user_id = 'u42' GROUP BY 1"
    ).fetchall() == [(["trader42@example.com", "123456789"], 1)]


def test_the_sql_snippets_run_against_a_migrated_database(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    for code, error_class in (("smtp_4xx", "smtp_4xx"), ("smtp_5xx", "smtp_5xx")):
        admin.execute(
            "SELECT outbox.enqueue('email', 'price_alert', %s, '{\"instrument\": \"EURUSD\"}')",
            [f"user-{code}"],
        )
        admin.execute(
            "UPDATE outbox.message SET status = 'dead', dead_at = now(), attempts = 5,"
            " error_class = %s, last_error = 'refused' WHERE user_id = %s",
            [error_class, f"user-{code}"],
        )
    admin.execute(
        "INSERT INTO outbox.attempt (message_id, lane, channel, user_id, template, attempt,"
        " outcome, error_class) SELECT id, lane, channel, user_id, template, 5, 'dead',"
        " error_class FROM outbox.message"
    )

    def drop_example_roles() -> None:
        for role in EXAMPLE_ROLES:
            admin.execute(f"DROP ROLE IF EXISTS {role}")

    drop_example_roles()
    try:
        for code in snippets("sql"):
            admin.execute(code)
    finally:
        drop_example_roles()

    # the cookbook redrove everything; the enqueue snippets wrote four more
    assert admin.execute("SELECT count(*) FROM outbox.dead_letter").fetchone() == (0,)
    assert admin.execute(
        "SELECT count(*) FROM outbox.message WHERE user_id = 'u42'"
    ).fetchone() == (4,)
    assert admin.execute(
        "SELECT template, collapse_key, escalate_after IS NOT NULL FROM outbox.message"
        " WHERE collapse_key IS NOT NULL OR escalate_after IS NOT NULL ORDER BY 1"
    ).fetchall() == [("position_failure_sl", None, True), ("price_alert", "price:XAUUSD", False)]
    # the preference snippet muted one instrument and forgot that again
    assert admin.execute("SELECT instrument, channels FROM outbox.preference").fetchall() == [
        ("", ["push", "telegram"])
    ]


def test_the_alembic_snippet_runs_outbox_revisions_among_the_hosts(
    empty_database_url: str, tmp_path: Path
) -> None:
    from alembic import command
    from alembic.config import Config

    command.init(Config(str(tmp_path / "alembic.ini")), str(tmp_path / "migrations"))
    ini = tmp_path / "alembic.ini"
    ini.write_text(
        re.sub(
            r"^sqlalchemy\.url = .*$",
            "sqlalchemy.url = " + sqlalchemy_url(empty_database_url).replace("%", "%%"),
            ini.read_text(),
            flags=re.MULTILINE,
        )
    )
    (tmp_path / "migrations" / "versions" / "host_0001_trading.py").write_text(
        'from alembic import op\n\nrevision = "host_0001"\ndown_revision = None\n'
        "branch_labels = None\ndepends_on = None\n\n\ndef upgrade():\n"
        '    op.execute("CREATE SCHEMA trading")\n\n\ndef downgrade():\n'
        '    op.execute("DROP SCHEMA trading")\n'
    )
    [code] = snippets("alembic")
    (tmp_path / "migrate.py").write_text(code + "\n")

    result = subprocess.run(
        [sys.executable, "migrate.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version ORDER BY 1").fetchall() == [
            ("host_0001",),
            (head_revision(),),
        ]
        assert conn.execute("SELECT count(*) FROM outbox.queue_stats").fetchone() == (0,)


def test_the_shell_snippets_run_with_the_installed_command(
    database_url: str, admin: psycopg.Connection[Any], tmp_path: Path
) -> None:
    (tmp_path / "users.txt").write_text("u1\nu2\nu3\n")
    env = {
        **os.environ,
        "OUTBOX_DATABASE_URL": database_url,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    for code in snippets("shell"):
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", code],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, result.stderr
    assert admin.execute("SELECT count(*) FROM outbox.message").fetchone() == (3,)


def test_the_configuration_table_names_every_setting() -> None:
    sources = [ROOT / "outbox" / "_settings.py", ROOT / "dispatcher" / "channels" / "__init__.py"]
    names = {
        name
        for source in sources
        for name in re.findall(r"\"(OUTBOX_[A-Z_]+)\"", source.read_text(encoding="utf-8"))
    }
    assert "OUTBOX_DATABASE_URL" in names
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    assert sorted(name for name in names if f"`{name}`" not in table) == []


def test_the_two_commands_are_where_ci_finds_them() -> None:
    demo = re.search(
        r"<!-- demo-command -->\n```bash\n(.*?)\n```\n<!-- /demo-command -->", README, re.DOTALL
    )
    assert demo is not None
    assert demo.group(1).count("\n") == 0 and demo.group(1).endswith("outbox demo")
    assert "\npython -m pytest\n" in README
    assert "<!-- bench-table -->" in README
