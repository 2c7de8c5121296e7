"""Destructive dlq commands: a duration needs a unit, a dry run, and a confirmation."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time
from typing import Any

import psycopg
import pytest

from tests.acceptance.test_cli import OUTBOX, make_dead, run


def counts(admin: psycopg.Connection[Any]) -> tuple[int, int]:
    row = admin.execute(
        "SELECT count(*) FILTER (WHERE status = 'dead'), count(*) FROM outbox.message"
    ).fetchone()
    assert row is not None
    return row[0], row[1]


@pytest.mark.parametrize("bare", ["7", "0", "7 days", "1.5", "7y"])
def test_a_duration_without_a_known_unit_is_an_error_and_deletes_nothing(
    database_url: str, admin: psycopg.Connection[Any], bare: str
) -> None:
    make_dead(admin, 3)

    result = run(database_url, "dlq", "purge", "--older-than", bare, "--yes")

    assert result.returncode == 2, result.stdout
    assert "s, m, h, d or w" in result.stderr and "Traceback" not in result.stderr
    assert counts(admin) == (3, 3)


def test_purge_dry_run_lists_what_it_would_delete_and_changes_nothing(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    ids = make_dead(admin, 3)

    result = run(database_url, "dlq", "purge", "--older-than", "7d", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dry run: would delete 3 dead message(s) older than 7d")
    assert all(str(i) in result.stdout for i in ids)
    assert "nothing changed" in result.stdout
    assert counts(admin) == (3, 3)


def test_retry_all_dry_run_changes_nothing(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    make_dead(admin, 2)

    result = run(database_url, "dlq", "retry", "--all", "--dry-run")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("dry run: would move 2 dead message(s) back to pending")
    assert counts(admin) == (2, 2)


@pytest.mark.parametrize("command", [["purge", "--older-than", "7d"], ["retry", "--all"]])
def test_without_a_terminal_and_without_yes_it_refuses(
    database_url: str, admin: psycopg.Connection[Any], command: list[str]
) -> None:
    make_dead(admin, 2)

    result = run(database_url, "dlq", *command)

    assert result.returncode == 2
    assert "without confirmation: add --yes" in result.stderr
    assert counts(admin) == (2, 2)


def on_a_terminal(database_url: str, args: list[str], answer: str) -> tuple[int, str]:
    """Run ``outbox`` with a pseudo-terminal as stdin/stdout; answer its prompt."""
    primary, secondary = pty.openpty()
    env = {**os.environ, "OUTBOX_DATABASE_URL": database_url}
    process = subprocess.Popen(
        [OUTBOX, *args], stdin=secondary, stdout=secondary, stderr=secondary, env=env
    )
    os.close(secondary)
    output = b""
    answered = False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(primary, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        if not answered and b"[y/N]" in output:
            os.write(primary, answer.encode() + b"\n")
            answered = True
        if process.poll() is not None and not ready:
            break
    os.close(primary)
    return process.wait(timeout=30), output.decode(errors="replace")


def test_on_a_terminal_no_keeps_everything(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    make_dead(admin, 2)

    code, output = on_a_terminal(database_url, ["dlq", "purge", "--older-than", "7d"], "n")

    assert "About to delete 2 dead message(s) older than 7d" in output, output
    assert code == 2 and "Nothing changed." in output
    assert counts(admin) == (2, 2)


def test_on_a_terminal_yes_deletes(database_url: str, admin: psycopg.Connection[Any]) -> None:
    make_dead(admin, 2)

    code, output = on_a_terminal(database_url, ["dlq", "purge", "--older-than", "7d"], "y")

    assert code == 0, output
    assert "2 dead message(s) older than 7d deleted." in output
    assert counts(admin) == (0, 0)
