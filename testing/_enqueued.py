"""What a transaction enqueued, read through the caller's own connection.

A host service's test runs its business code on a connection it owns (psycopg, or a
SQLAlchemy ``Session`` or ``Connection``), then asks::

    assert_enqueued(conn, user_id="u42", template="position_failure_sl",
                    vars={"position_id": 7})

The query runs on that same connection, inside its open transaction: the rows are
visible before the commit (and gone after a rollback), so a test can check an alert
without committing anything. Nothing here begins, commits or rolls back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

_SELECT = """
SELECT id, lane, channel, user_id, template, vars, status, next_attempt_at,
       idempotency_key, expires_at, collapse_key,
       CAST(extract(epoch FROM escalate_after) AS float8)
  FROM outbox.message
 WHERE (%(user_id)s::text IS NULL OR user_id = %(user_id)s::text)
   AND (%(channel)s::text IS NULL OR channel = %(channel)s::text)
   AND (%(template)s::text IS NULL OR template = %(template)s::text)
 ORDER BY id
"""


@dataclass(frozen=True, kw_only=True)
class EnqueuedMessage:
    """One row of ``outbox.message``, as a test sees it."""

    id: int
    lane: str
    channel: str
    user_id: str
    template: str
    vars: Mapping[str, Any]
    status: str
    send_at: datetime
    idempotency_key: str | None
    expires_at: datetime | None = None
    collapse_key: str | None = None
    escalate_after: float | None = None
    """Seconds an alert waits for its acknowledgement once sent (None: not an alert)."""

    def describe(self) -> str:
        """One line for an assertion message."""
        return (
            f"#{self.id} {self.channel}/{self.template} to {self.user_id} "
            f"({self.lane}, {self.status}) vars={dict(self.vars)}"
        )


def _rows(conn: Any, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    if hasattr(conn, "exec_driver_sql"):  # SQLAlchemy Connection
        return [tuple(row) for row in conn.exec_driver_sql(_SELECT, dict(params))]
    if hasattr(conn, "get_bind") and hasattr(conn, "connection"):  # SQLAlchemy Session
        result = conn.connection().exec_driver_sql(_SELECT, dict(params))
        return [tuple(row) for row in result]
    if hasattr(conn, "execute") and hasattr(conn, "cursor"):  # psycopg Connection
        return list(conn.execute(_SELECT, params).fetchall())
    raise TypeError(
        f"expected a psycopg Connection or a SQLAlchemy Session or Connection, "
        f"got {type(conn).__name__}"
    )


def enqueued_messages(
    conn: Any,
    *,
    user_id: str | None = None,
    channel: str | None = None,
    template: str | None = None,
) -> list[EnqueuedMessage]:
    """The messages in ``outbox.message`` visible to ``conn``, oldest first.

    Filters are optional and combine. Sent messages are no longer there (delivery
    deletes the row): this shows what is waiting, retrying or dead.
    """
    params = {"user_id": user_id, "channel": channel, "template": template}
    return [
        EnqueuedMessage(
            id=row[0],
            lane=row[1],
            channel=row[2],
            user_id=row[3],
            template=row[4],
            vars=row[5] if isinstance(row[5], Mapping) else json.loads(row[5]),
            status=row[6],
            send_at=row[7],
            idempotency_key=row[8],
            expires_at=row[9],
            collapse_key=row[10],
            escalate_after=row[11],
        )
        for row in _rows(conn, params)
    ]


def assert_enqueued(
    conn: Any,
    *,
    user_id: str,
    template: str,
    channel: str | None = None,
    vars: Mapping[str, Any] | None = None,
    lane: str | None = None,
) -> EnqueuedMessage:
    """Exactly one message for ``user_id`` and ``template`` (and ``channel``, ``lane``
    when given) whose variables include ``vars``; returns it.

    ``vars`` is a subset match: the variables given must be equal, others may exist.
    Raises AssertionError listing what ``conn`` does see otherwise.
    """
    candidates = enqueued_messages(conn, user_id=user_id, channel=channel, template=template)
    wanted = dict(vars or {})
    matching = [
        m
        for m in candidates
        if (lane is None or m.lane == lane)
        and all(k in m.vars and m.vars[k] == v for k, v in wanted.items())
    ]
    if len(matching) == 1:
        return matching[0]
    seen = enqueued_messages(conn)
    listing = "\n".join(f"  {m.describe()}" for m in seen) or "  (no message at all)"
    what = f"{channel or 'any channel'}/{template} to {user_id}"
    if wanted:
        what += f" with vars including {wanted}"
    raise AssertionError(
        f"expected one message {what}, found {len(matching)}; the connection sees:\n{listing}"
    )


def assert_nothing_enqueued(conn: Any, *, user_id: str | None = None) -> None:
    """No message (for ``user_id``, when given) is visible to ``conn``."""
    seen = enqueued_messages(conn, user_id=user_id)
    if seen:
        listing = "\n".join(f"  {m.describe()}" for m in seen)
        raise AssertionError(f"expected no message, the connection sees:\n{listing}")
