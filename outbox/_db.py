"""Run one named statement on whatever connection the caller handed us.

The caller's object may be a psycopg ``Connection`` or ``AsyncConnection``, or a
SQLAlchemy ``Session``, ``Connection``, ``AsyncSession`` or ``AsyncConnection``.
Each gets the same statement from ``sql/queries.sql``; SQLAlchemy objects receive it
through ``text()`` with ``:name`` placeholders, so any SQLAlchemy PostgreSQL driver
works. Nothing here begins, commits, rolls back or flushes: psycopg starts its
implicit transaction as usual and SQLAlchemy autobegins as usual, both on the
caller's side of the contract.

For the long-lived connections of the dispatcher and the API, :data:`CONNECT_KWARGS`
and :func:`deadline_connection_class` make a dead network path visible: TCP
keepalives and ``tcp_user_timeout`` catch a peer that stopped acknowledging, and a
client-side deadline on every round trip catches one that acknowledges but never
answers (a half-open connection behind a proxy or a hung server).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, ClassVar, LiteralString, NoReturn

import psycopg

from outbox._errors import InvalidMessage
from outbox._queries import QUERIES
from outbox._settings import Settings

Params = Mapping[str, Any]
Row = Sequence[Any]

_PYFORMAT = re.compile(r"%\((\w+)\)s")

CONNECT_KWARGS: dict[str, Any] = {
    # a silent peer is noticed after about 5 + 3 * 2 = 11 s of idle time ...
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    # ... and data the peer never acknowledges fails the connection after 15 s
    "tcp_user_timeout": 15_000,
    "connect_timeout": 10,
}
"""libpq options for the dispatcher's and the API's connections."""


def connect_kwargs(settings: Settings) -> dict[str, Any]:
    """Connection options for the dispatcher's and the API's pools."""
    kwargs = dict(CONNECT_KWARGS)
    if not settings.prepared_statements:
        kwargs["prepare_threshold"] = None  # PgBouncer in transaction mode
    return kwargs


class DeadlineConnection(psycopg.AsyncConnection[Any]):
    """An async connection whose every round trip must finish within ``deadline``.

    When the database does not answer in time, psycopg cancels the query. If even
    the cancellation goes unanswered, the path to the server is dead: the
    connection is closed, and every connection of the same class opened before
    that moment is abandoned at its next use instead of waiting out its own
    deadline (they most likely share the dead path). Either way the caller gets
    :class:`psycopg.OperationalError`, so code that already handles a lost
    connection handles a silent one too, and a pool replaces the connection.
    Use :func:`deadline_connection_class` to get one with a given deadline.
    """

    deadline: ClassVar[float] = 15.0
    path_failed_at: ClassVar[float] = 0.0
    """``time.monotonic()`` when a connection of this class last went silent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._opened_at = time.monotonic()

    async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if self._opened_at < type(self).path_failed_at and not self.closed:
            self.pgconn.finish()
            raise psycopg.OperationalError(
                "connection opened before the database path went silent; abandoned"
            )
        try:
            async with asyncio.timeout(self.deadline):
                return await super().wait(gen, *args, **kwargs)
        except TimeoutError:
            if self.pgconn.transaction_status == psycopg.pq.TransactionStatus.ACTIVE:
                self.pgconn.finish()  # the protocol state is unknown: never reuse it
            if self.closed:
                type(self).path_failed_at = time.monotonic()
            fate = "connection closed" if self.closed else "query cancelled"
            raise psycopg.OperationalError(
                f"the database did not answer within {self.deadline:g} s"
                f" (OUTBOX_DB_TIMEOUT); {fate}"
            ) from None


RECONNECT_TIMEOUT = 5.0
"""Seconds a pool retries one lost connection before starting afresh.

psycopg_pool waits 1, 2, 4, 8, ... s between attempts, without bound: after a 30 s
outage its next attempt could be another 30 s away. Pools given
:func:`reconnect_afresh` as ``reconnect_failed`` give up on a slot after this many
seconds and immediately start a new series at 1 s, so no pause ever exceeds a few
seconds and service resumes within moments of PostgreSQL coming back.
"""


async def reconnect_afresh(pool: Any) -> None:
    """``reconnect_failed`` callback: start a new connection attempt series now."""
    try:
        await pool.check()  # an empty pool grows again: a fresh attempt, 1 s pauses
    except Exception:  # a closing pool: nothing to reconnect
        return


@cache
def deadline_connection_class(deadline: float) -> type[DeadlineConnection]:
    """A :class:`DeadlineConnection` subclass for ``deadline`` seconds (pool-ready)."""
    if deadline <= 0:
        raise ValueError("the deadline must be positive")
    return type(
        f"DeadlineConnection{deadline:g}s".replace(".", "_"),
        (DeadlineConnection,),
        {"deadline": float(deadline), "__module__": __name__},
    )


@cache
def _sqlalchemy_text(query: str) -> Any:
    from sqlalchemy import text

    return text(_PYFORMAT.sub(r":\1", query).replace("%%", "%"))


def _is_sqlalchemy_sync(conn: object) -> bool:
    module = type(conn).__module__
    return module.startswith("sqlalchemy.") and not module.startswith("sqlalchemy.ext.asyncio")


def _is_sqlalchemy_async(conn: object) -> bool:
    return type(conn).__module__.startswith("sqlalchemy.ext.asyncio")


def _unsupported(conn: object) -> TypeError:
    return TypeError(
        "outbox needs a psycopg Connection/AsyncConnection or a SQLAlchemy "
        f"Session/Connection/AsyncSession/AsyncConnection, not {type(conn).__name__}"
    )


def _translate(error: Exception) -> Exception:
    """Turn the database's rejection of bad input into an outbox error."""
    sqlstate = getattr(error, "sqlstate", None)
    orig = getattr(error, "orig", None)
    if sqlstate is None and orig is not None:
        sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if sqlstate in ("22023", "23514", "22P02", "22021", "54000"):
        diag = getattr(orig or error, "diag", None)
        message = getattr(diag, "message_primary", None) or str(orig or error)
        return InvalidMessage(message)
    return error


def fetch_one(conn: Any, name: str, params: Params) -> Row | None:
    """Run the named statement on a synchronous connection; return its first row."""
    query: LiteralString = QUERIES[name]
    try:
        if isinstance(conn, psycopg.Connection):
            cursor = conn.execute(query, params)
            return cursor.fetchone() if cursor.description else None
        if _is_sqlalchemy_sync(conn):
            from sqlalchemy.orm import Session

            connection = conn.connection() if isinstance(conn, Session) else conn
            result = connection.execute(_sqlalchemy_text(query), dict(params))
            return result.first() if result.returns_rows else None
    except (psycopg.Error, _sqlalchemy_error()) as error:
        _raise_translated(error)
    raise _unsupported(conn)


def _raise_translated(error: Exception) -> NoReturn:
    """Raise the outbox error a database error means, or the error itself."""
    translated = _translate(error)
    if translated is error:
        raise error
    raise translated from error


async def fetch_one_async(conn: Any, name: str, params: Params) -> Row | None:
    """Run the named statement on an asynchronous connection; return its first row."""
    query: LiteralString = QUERIES[name]
    try:
        if isinstance(conn, psycopg.AsyncConnection):
            acursor = await conn.execute(query, params)
            return await acursor.fetchone() if acursor.description else None
        if _is_sqlalchemy_async(conn):
            from sqlalchemy.ext.asyncio import AsyncSession

            connection = await conn.connection() if isinstance(conn, AsyncSession) else conn
            result = await connection.execute(_sqlalchemy_text(query), dict(params))
            return result.first() if result.returns_rows else None
    except (psycopg.Error, _sqlalchemy_error()) as error:
        _raise_translated(error)
    if isinstance(conn, psycopg.Connection) or _is_sqlalchemy_sync(conn):
        raise TypeError("this is a synchronous connection: call the non-async function")
    raise _unsupported(conn)


@cache
def _sqlalchemy_error() -> type[Exception]:
    try:
        from sqlalchemy.exc import DBAPIError
    except ImportError:  # pragma: no cover - SQLAlchemy is a dependency
        return psycopg.Error
    return DBAPIError
