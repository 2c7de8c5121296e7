"""Every statement the dispatcher runs, and the one place its database errors are mapped.

The rest of the dispatcher never sees psycopg: a call either answers or raises
:class:`StoreUnavailable` (the connection, the pool or the server is gone or slow:
try again later; the leases keep the rows safe meanwhile) or :class:`StoreRejected`
(the server refused the statement itself: retrying the same write cannot help).
The rate limiter and circuit breaker share the pool (:attr:`Store.pool`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal

import psycopg
import psycopg_pool
from psycopg.types.json import set_json_loads
from psycopg.types.string import TextLoader
from psycopg_pool import AsyncConnectionPool

from outbox._db import (
    RECONNECT_TIMEOUT,
    connect_kwargs,
    deadline_connection_class,
    reconnect_afresh,
)
from outbox._queries import QUERIES
from outbox._settings import Settings
from outbox.dispatcher._claimed import Lease
from outbox.dispatcher._finishes import (
    AckBatch,
    AckResult,
    FinishDead,
    FinishHandoff,
    FinishRequeue,
    FinishSent,
)
from outbox.dispatcher.delivery import clip_error, write_effect
from outbox.vocabulary import PRIORITY_RANGES

log = logging.getLogger("outbox.dispatcher")

UNAVAILABLE: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    OSError,
    TimeoutError,
)
"""Errors that say "not now": the server, the network or the pool."""

DATABASE_ERRORS: tuple[type[BaseException], ...] = (psycopg.Error, *UNAVAILABLE)
"""Everything a round trip can raise: for the few parts that run their own
statements on a connection of their own (the listener, the limiter's locked
transactions) and so cannot go through :class:`Store`."""


URGENT_PRIORITY_BELOW = PRIORITY_RANGES["transactional"].stop
"""An urgent claim takes pending messages of a priority below this: the transactional lane."""

ClaimScope = Literal["all", "transactional", "campaign"]
"""Which pending messages a claim takes; see :meth:`Store.claim`."""

_SCOPES: dict[str, tuple[int, int]] = {
    # priority_from, priority_below: every smallint, or one side of the lanes' border
    "all": (-32768, 32768),
    "transactional": (-32768, URGENT_PRIORITY_BELOW),
    "campaign": (URGENT_PRIORITY_BELOW, 32768),
}


class StoreError(Exception):
    """A statement of the dispatcher did not run; ``str()`` is its first line."""


class StoreUnavailable(StoreError):
    """The database cannot be reached in time: try again later."""


class StoreRejected(StoreError):
    """The database refused the statement (a constraint, a missing object)."""


@contextlib.contextmanager
def _mapped(what: str) -> Any:
    try:
        yield
    except UNAVAILABLE as error:
        raise StoreUnavailable(f"{what}: {_first_line(error)}") from error
    except psycopg.Error as error:
        raise StoreRejected(f"{what}: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


class Store:
    """The dispatcher's connection pool and statements."""

    def __init__(self, settings: Settings, *, dispatcher_id: str) -> None:
        self.settings = settings
        self.dispatcher_id = dispatcher_id
        self.pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            settings.database_url,
            min_size=1,
            # claim, urgent claim, acknowledgements and heartbeat can all be under
            # way at once; one more for the limiter, the breaker and the sleeper row
            max_size=5,
            open=False,
            kwargs={"autocommit": True, **connect_kwargs(settings)},
            configure=_configure,
            reconnect_timeout=RECONNECT_TIMEOUT,
            reconnect_failed=reconnect_afresh,
            # a round trip that gets no answer (half-open connection) fails in bounded time
            connection_class=deadline_connection_class(settings.db_timeout),
        )

    async def open(self) -> None:
        await self.pool.open(wait=False)

    async def close(self) -> None:
        await self.pool.close()

    @contextlib.asynccontextmanager
    async def _connection(self, what: str, timeout: float = 10.0) -> AsyncIterator[Any]:
        with _mapped(what):
            async with self.pool.connection(timeout=timeout) as conn:
                yield conn

    # ------------------------------------------------------------------ claims

    async def claim(
        self, limit: int, token: uuid.UUID, *, scope: ClaimScope = "all"
    ) -> list[tuple[Any, ...]]:
        """Lease up to ``limit`` due messages under ``token``; rows of ``claim_batch``.

        ``scope``: ``"all"`` pending messages, expired leases and due escalations;
        ``"transactional"`` (the urgent claim) that lane's pending messages and due
        escalations, no expired leases: its index range of ``message_claim_idx``
        ends before the campaign's part; ``"campaign"`` the rest (a busy
        dispatcher's regular claim, while its urgent claim takes the
        transactional lane; see ``Dispatcher._urgent_claims``).
        """
        priority_from, priority_below = _SCOPES[scope]
        async with self._connection("claim") as conn:
            cursor = conn.cursor()
            # json columns (a user's preferences and push subscriptions) as their text:
            # decoded only where a message or a recipient record is built from them,
            # and a user's record is kept while its columns read the same
            cursor.adapters.register_loader("json", TextLoader)
            await cursor.execute(
                QUERIES["claim_batch"],
                {
                    "batch_size": limit,
                    "priority_from": priority_from,
                    "priority_below": priority_below,
                    "expired_limit": 0 if scope == "transactional" else limit,
                    "lease_seconds": self.settings.lease_seconds,
                    "dispatcher_id": self.dispatcher_id,
                    "lease_token": str(token),
                },
            )
            return list(await cursor.fetchall())

    async def urgent_due(self) -> bool:
        """Whether a transactional message is pending and due (``urgent_due``)."""
        async with self._connection("urgent due") as conn:
            row = await (await conn.execute(QUERIES["urgent_due"])).fetchone()
        return bool(row and row[0])

    async def next_due(self) -> tuple[float | None, bool]:
        """Seconds until the next pending message is due (None: none pending), and
        whether any message is in flight.
        """
        async with self._connection("next due") as conn:
            row = await (await conn.execute(QUERIES["next_due"])).fetchone()
        if row is None:
            return None, False
        return (float(row[0]) if row[0] is not None else None), bool(row[1])

    async def database_now(self) -> datetime:
        """The database server's clock (``clock_timestamp()``)."""
        async with self._connection("database clock") as conn:
            row = await (await conn.execute(QUERIES["database_now"])).fetchone()
        if row is None:
            raise StoreUnavailable("the database did not say what time it is")
        return row[0]  # type: ignore[no-any-return]

    async def pause_ends(self) -> float | None:
        """Seconds until the first channel pause ends (None: no channel is paused)."""
        async with self._connection("pause ends") as conn:
            row = await (await conn.execute(QUERIES["pause_ends"])).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def deferred_summary(self) -> tuple[int, datetime | None]:
        """How many messages are pending, and when the first is due."""
        async with self._connection("deferred summary") as conn:
            row = await (await conn.execute(QUERIES["deferred_summary"])).fetchone()
        return (0, None) if row is None else (int(row[0]), row[1])

    # ------------------------------------------------------------------ leases

    async def extend_leases(self, leases: Sequence[Lease], *, timeout: float) -> set[int]:
        """Heartbeat: the ids whose lease (id and token) we still hold, now extended."""
        async with self._connection("heartbeat", timeout) as conn:
            cursor = await conn.execute(
                QUERIES["extend_leases"],
                {
                    "ids": [lease.id for lease in leases],
                    "tokens": [lease.token for lease in leases],
                    "lease_seconds": self.settings.lease_seconds,
                },
            )
            return {row[0] for row in await cursor.fetchall()}

    async def release_leases(self, leases: Sequence[Lease]) -> None:
        """Give unfinished messages back without burning an attempt."""
        async with self._connection("release", timeout=5.0) as conn:
            await conn.execute(
                QUERIES["release_leases"],
                {
                    "ids": [lease.id for lease in leases],
                    "tokens": [lease.token for lease in leases],
                },
            )

    # ------------------------------------------------------------------ sleeper

    async def set_sleeper(self, asleep: bool, *, stale_seconds: float) -> None:
        """Register (or renew) this dispatcher as asleep, or unregister it.

        The sleeper row is soft state: visible at commit whether flushed or not,
        and worthless after a crash, so it does not wait for the WAL flush.
        """
        async with (
            self._connection("sleeper", timeout=5.0) as conn,
            conn.pipeline(),
            conn.transaction(),
        ):
            await conn.execute("SET LOCAL synchronous_commit = off")
            if asleep:
                await conn.execute(
                    QUERIES["register_sleeper"],
                    {"dispatcher_id": self.dispatcher_id, "stale_seconds": stale_seconds},
                )
            else:
                await conn.execute(
                    QUERIES["unregister_sleeper"], {"dispatcher_id": self.dispatcher_id}
                )

    # ------------------------------------------------------------------ finishes

    async def write_finishes(self, batch: AckBatch) -> AckResult:
        """Write every finish of ``batch`` and its effects in one transaction.

        Every statement filters on the lease token: a finish whose lease was lost
        (another replica claimed the message again) changes nothing and comes back
        in ``lost``.
        """
        async with self._connection("acknowledge") as conn, conn.transaction():
            return await _write_finishes(conn.cursor(), batch, self.dispatcher_id)


async def _write_finishes(cur: Any, batch: AckBatch, dispatcher_id: str) -> AckResult:
    sent: list[FinishSent] = []
    alerts: list[FinishSent] = []
    requeue: list[FinishRequeue] = []
    dead: list[FinishDead] = []
    handoff: list[FinishHandoff] = []
    for f in batch.finishes:  # one pass: a batch holds hundreds of finishes
        if isinstance(f, FinishSent):
            (sent if f.ack_wait is None else alerts).append(f)
        elif isinstance(f, FinishRequeue):
            requeue.append(f)
        elif isinstance(f, FinishDead):
            dead.append(f)
        else:
            handoff.append(f)
    finished: set[int] = set()
    fallback_ids: list[int] = []
    common = {"dispatcher_id": dispatcher_id}
    if sent:
        await cur.execute(
            QUERIES["finish_sent"],
            {
                "ids": _int_array(f.message.lease.id for f in sent),
                "tokens": "{" + ",".join(_token_text(f.message.lease.token) for f in sent) + "}",
                # to the microsecond: repr() would spell out every digit, at twice the cost
                "durations": "{"
                + ",".join(map(_MICROSECONDS, (f.duration_ms for f in sent)))
                + "}",
                "provider_ids": [f.provider_id for f in sent],
                **common,
            },
        )
        finished.update(row[0] for row in await cur.fetchall())
    if alerts:
        await cur.execute(
            QUERIES["finish_sent_alert"],
            {
                "ids": [f.lease.id for f in alerts],
                "tokens": [f.lease.token for f in alerts],
                "durations": [float(f.duration_ms) for f in alerts],
                "channels": [f.message.channel for f in alerts],
                "attempts": [f.message.attempts + 1 for f in alerts],
                "waits": [float(f.ack_wait or 0.0) for f in alerts],
                "next_channels": [f.next_channel for f in alerts],
                "next_fallbacks": [",".join(f.next_fallback) for f in alerts],
                "provider_ids": [f.provider_id for f in alerts],
                **common,
            },
        )
        finished.update(row[0] for row in await cur.fetchall())
    if requeue:
        await cur.execute(
            QUERIES["finish_requeue"],
            {
                **_failures(requeue),
                "delays": [max(float(f.delay), 0.0) for f in requeue],
                "burn": [f.burns_attempt for f in requeue],
                "outcomes": [f.outcome for f in requeue],
                **common,
            },
        )
        finished.update(row[0] for row in await cur.fetchall())
    if dead:
        await cur.execute(QUERIES["finish_dead"], {**_failures(dead), **common})
        finished.update(row[0] for row in await cur.fetchall())
    if handoff:
        await cur.execute(
            QUERIES["finish_handoff"],
            {
                **_failures(handoff),
                "outcomes": [f.outcome for f in handoff],
                "next_channels": [f.next_channel for f in handoff],
                "next_fallbacks": [",".join(f.next_fallback) for f in handoff],
                **common,
            },
        )
        rows = await cur.fetchall()
        finished.update(row[0] for row in rows)
        fallback_ids = [row[0] for row in rows if row[1]]
    for finish in batch.finishes:
        if not finish.effects or finish.message.lease.id not in finished:
            continue  # none, or the lease was lost: the replica that holds it now reports
        for effect in finish.effects:
            await write_effect(cur, finish.message.user_id, effect)
    all_ids = {f.message.lease.id for f in batch.finishes}
    return AckResult(
        finished=frozenset(finished & all_ids),
        lost=frozenset(all_ids - finished),
        fallback_ids=tuple(fallback_ids),
    )


def _failures(items: Sequence[FinishRequeue | FinishDead | FinishHandoff]) -> dict[str, Any]:
    """The columns every finish but ``sent`` writes: lease, error and duration."""
    return {
        "ids": [f.lease.id for f in items],
        "tokens": [f.lease.token for f in items],
        "error_classes": [f.error_class for f in items],
        "errors": [clip_error(f.error) for f in items],
        "durations": [None if f.duration_ms is None else float(f.duration_ms) for f in items],
    }


_MICROSECONDS = "{:.3f}".format
"""A duration in milliseconds as text, to the microsecond."""


def _int_array(values: Iterable[int]) -> str:
    """A PostgreSQL array literal of integers (psycopg dumps a list item by item in
    Python; one string is much cheaper for the hot statements).
    """
    return "{" + ",".join(map(str, values)) + "}"


@lru_cache(maxsize=64)
def _token_text(token: uuid.UUID) -> str:
    """A claim's token as text; every message of the claim shares it."""
    return str(token)


_json_decode = json.JSONDecoder().raw_decode


def _load_json(data: Any) -> Any:
    """Jsonb from the server is one well-formed value: skip ``json.loads``'s checks."""
    return _json_decode(str(data, "utf-8"))[0]


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    set_json_loads(_load_json, conn)
    await conn.execute("SET statement_timeout = '30s'")
    await conn.execute("SET application_name = 'outbox-dispatcher'")
