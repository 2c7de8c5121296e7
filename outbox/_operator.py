"""What operators do at 3 a.m.: read queue depth, read and redrive dead letters.

Thin wrappers over the SQL interface (``outbox.queue_stats``,
``outbox.dead_letter``, ``outbox.retry_dead``, ``outbox.purge_dead``), so the CLI
and plain SQL always agree. The connection should be in autocommit mode; the
functions do not commit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import psycopg

from outbox._queries import QUERIES
from outbox._schema_check import SchemaNotReady, schema_problem
from outbox._settings import Settings
from outbox._table import format_table


def queue_stats(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
    """Rows of (lane, channel, status, count, oldest age in seconds)."""
    return conn.execute(QUERIES["queue_stats"]).fetchall()


def dead_letters(conn: psycopg.Connection[Any], *, limit: int = 50) -> list[tuple[Any, ...]]:
    """The newest dead messages, at most ``limit``."""
    return conn.execute(QUERIES["dead_letters"], {"limit": limit}).fetchall()


def dead_letter_detail(conn: psycopg.Connection[Any], message_id: int) -> str | None:
    """A readable report of one dead message and its attempts, or None."""
    cursor = conn.execute(QUERIES["dead_letter"], {"id": message_id})
    row = cursor.fetchone()
    if row is None:
        return None
    names = [column.name for column in cursor.description or ()]
    fields = dict(zip(names, row, strict=True))
    vars_text = json.dumps(fields.pop("vars"), indent=2, ensure_ascii=False, sort_keys=True)
    width = max(len(name) for name in fields)
    lines = [f"{name.ljust(width)}  {value}" for name, value in fields.items()]
    lines += ["", "vars:", vars_text, "", "attempts:"]
    history = conn.execute(QUERIES["message_history"], {"id": message_id}).fetchall()
    lines.append(
        format_table(["at", "attempt", "outcome", "class", "error", "ms", "dispatcher"], history)
        if history
        else "(none logged)"
    )
    return "\n".join(lines)


def retry_dead(conn: psycopg.Connection[Any], ids: Sequence[int] | None) -> int:
    """Move dead messages back to pending (all of them when ``ids`` is None)."""
    row = conn.execute(QUERIES["retry_dead"], {"ids": list(ids) if ids is not None else None})
    result = row.fetchone()
    return int(result[0]) if result else 0


def dead_count(conn: psycopg.Connection[Any]) -> int:
    """How many messages are dead right now."""
    return sum(int(row[3]) for row in queue_stats(conn) if row[2] == "dead")


def retry_all_dead(
    conn: psycopg.Connection[Any],
    *,
    batch_size: int = 1000,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Move every dead message back to pending, ``batch_size`` per statement.

    Each batch is its own ``outbox.retry_dead(ids)`` call, so on an autocommit
    connection each one commits on its own and dispatchers start on the first
    batch while the next is written. Stops after the messages that were dead when
    it started (new dead letters arriving meanwhile are left for the next run).
    ``progress(retried_so_far, total)`` is called after each batch.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    total = dead_count(conn)
    retried = 0
    while retried < total:
        rows = dead_letters(conn, limit=min(batch_size, total - retried))
        if not rows:
            break
        retried += retry_dead(conn, [row[0] for row in rows])
        if progress is not None:
            progress(retried, total)
    return retried


def dead_ids(
    conn: psycopg.Connection[Any],
    *,
    ids: Sequence[int] | None = None,
    older_than_seconds: float | None = None,
) -> list[int]:
    """Ids of the dead messages a redrive (``ids``, None = all) or a purge would touch.

    What ``--dry-run`` shows and what a confirmation counts: read from the
    ``outbox.dead_letter`` view, with the same conditions as ``retry_dead`` and
    ``purge_dead``.
    """
    rows = conn.execute(
        "SELECT id FROM outbox.dead_letter"
        " WHERE (CAST(%(ids)s AS bigint[]) IS NULL OR id = ANY (CAST(%(ids)s AS bigint[])))"
        "   AND (CAST(%(older_than)s AS interval) IS NULL"
        "        OR dead_at < now() - CAST(%(older_than)s AS interval))"
        " ORDER BY id",
        {
            "ids": list(ids) if ids is not None else None,
            "older_than": (
                timedelta(seconds=older_than_seconds) if older_than_seconds is not None else None
            ),
        },
    ).fetchall()
    return [int(row[0]) for row in rows]


def purge_dead(conn: psycopg.Connection[Any], older_than_seconds: float) -> int:
    """Delete dead messages that died more than ``older_than_seconds`` ago."""
    row = conn.execute(
        QUERIES["purge_dead"], {"older_than": timedelta(seconds=older_than_seconds)}
    ).fetchone()
    return int(row[0]) if row else 0


def connect_migrated(settings: Settings) -> psycopg.Connection[Any]:
    """An operator's connection to a database that is migrated (else SchemaNotReady)."""
    conn = psycopg.connect(settings.database_url, autocommit=True, connect_timeout=10)
    problem = schema_problem(conn)
    if problem is not None:
        conn.close()
        raise SchemaNotReady(problem)
    return conn
