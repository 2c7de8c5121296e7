"""Finishing writes, batched: many outcomes per statement, one transaction per flush.

Every write filters on the message's lease token, so a dispatcher that lost its
lease (it stalled past ``leased_until`` and another replica reclaimed the row)
changes nothing. Recipient side effects (a blocked bot, a bounced address, a
migrated chat, a gone push subscription) are written in the same transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any
from uuid import UUID

from psycopg import AsyncConnection

from outbox._queries import QUERIES
from outbox.dispatcher.channels.base import (
    DeletePushSubscription,
    DisableTelegram,
    Effect,
    MarkEmailUndeliverable,
    UpdateTelegramChat,
)

log = logging.getLogger("outbox.dispatcher")

MAX_ERROR_LENGTH = 2000


def _clip(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.replace("\x00", "")
    return text if len(text) <= MAX_ERROR_LENGTH else text[: MAX_ERROR_LENGTH - 1] + "…"


@dataclass(frozen=True, kw_only=True)
class Lease:
    """A claimed message as the dispatcher holds it."""

    id: int
    token: UUID


@dataclass(frozen=True, kw_only=True)
class FinishSent:
    """Delivered: delete the row."""

    lease: Lease
    duration_ms: float


@dataclass(frozen=True, kw_only=True)
class FinishRequeue:
    """Back to pending after ``delay`` seconds; ``burn`` counts the attempt."""

    lease: Lease
    delay: float
    burn: bool
    outcome: str  # retry | deferred
    error_class: str | None
    error: str | None
    duration_ms: float | None = None


@dataclass(frozen=True, kw_only=True)
class FinishDead:
    """Dead letter."""

    lease: Lease
    error_class: str
    error: str
    duration_ms: float | None = None


@dataclass(frozen=True, kw_only=True)
class FinishHandoff:
    """Skipped, or handed to ``next_channel`` (fallback): the row is deleted."""

    lease: Lease
    outcome: str  # fallback | skipped
    error_class: str | None
    error: str | None
    next_channel: str | None = None
    next_fallback: tuple[str, ...] = ()
    duration_ms: float | None = None


Finish = FinishSent | FinishRequeue | FinishDead | FinishHandoff


@dataclass(kw_only=True)
class AckBatch:
    """Outcomes waiting to be written."""

    finishes: list[Finish] = field(default_factory=list)
    effects: list[tuple[str, Effect]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.finishes)


@dataclass(frozen=True, kw_only=True)
class AckResult:
    """What a flush wrote: ids finished, ids whose lease was lost, new fallback ids."""

    finished: frozenset[int]
    lost: frozenset[int]
    fallback_ids: tuple[int, ...]


def int_array(values: Iterable[int]) -> str:
    """A PostgreSQL array literal of integers (psycopg dumps a list item by item in
    Python; one string is much cheaper for the hot statements).
    """
    return "{" + ",".join(map(str, values)) + "}"


def _durations(items: Sequence[Finish]) -> list[float | None]:
    return [None if f.duration_ms is None else float(f.duration_ms) for f in items]


@lru_cache(maxsize=64)
def _token_text(token: UUID) -> str:
    """A claim's token as text; every message of the claim shares it."""
    return str(token)


def _ids_tokens(items: Sequence[Finish]) -> dict[str, Any]:
    return {
        "ids": [f.lease.id for f in items],
        "tokens": [f.lease.token for f in items],
    }


async def write_batch(
    conn: AsyncConnection[Any], batch: AckBatch, *, dispatcher_id: str
) -> AckResult:
    """Write every outcome of ``batch`` in one transaction (a handful of statements)."""
    sent = [f for f in batch.finishes if isinstance(f, FinishSent)]
    requeue = [f for f in batch.finishes if isinstance(f, FinishRequeue)]
    dead = [f for f in batch.finishes if isinstance(f, FinishDead)]
    handoff = [f for f in batch.finishes if isinstance(f, FinishHandoff)]
    finished: set[int] = set()
    fallback_ids: list[int] = []
    async with conn.transaction():
        cur = conn.cursor()
        if sent:
            await cur.execute(
                QUERIES["finish_sent"],
                {
                    "ids": int_array(f.lease.id for f in sent),
                    "tokens": "{" + ",".join(_token_text(f.lease.token) for f in sent) + "}",
                    "durations": "{" + ",".join(repr(float(f.duration_ms)) for f in sent) + "}",
                    "dispatcher_id": dispatcher_id,
                },
            )
            finished.update(row[0] for row in await cur.fetchall())
        if requeue:
            await cur.execute(
                QUERIES["finish_requeue"],
                {
                    **_ids_tokens(requeue),
                    "delays": [max(float(f.delay), 0.0) for f in requeue],
                    "burn": [f.burn for f in requeue],
                    "outcomes": [f.outcome for f in requeue],
                    "error_classes": [f.error_class for f in requeue],
                    "errors": [_clip(f.error) for f in requeue],
                    "durations": _durations(requeue),
                    "dispatcher_id": dispatcher_id,
                },
            )
            finished.update(row[0] for row in await cur.fetchall())
        if dead:
            await cur.execute(
                QUERIES["finish_dead"],
                {
                    **_ids_tokens(dead),
                    "error_classes": [f.error_class for f in dead],
                    "errors": [_clip(f.error) for f in dead],
                    "durations": _durations(dead),
                    "dispatcher_id": dispatcher_id,
                },
            )
            finished.update(row[0] for row in await cur.fetchall())
        if handoff:
            await cur.execute(
                QUERIES["finish_handoff"],
                {
                    **_ids_tokens(handoff),
                    "outcomes": [f.outcome for f in handoff],
                    "error_classes": [f.error_class for f in handoff],
                    "errors": [_clip(f.error) for f in handoff],
                    "next_channels": [f.next_channel for f in handoff],
                    "next_fallbacks": [",".join(f.next_fallback) for f in handoff],
                    "durations": _durations(handoff),
                    "dispatcher_id": dispatcher_id,
                },
            )
            fallback_ids = [row[0] for row in await cur.fetchall()]
            # a handoff's own row is deleted whether or not it had a follow-up
            finished.update(f.lease.id for f in handoff)
        for user_id, effect in batch.effects:
            await _apply_effect(cur, user_id, effect)
    all_ids = {f.lease.id for f in batch.finishes}
    return AckResult(
        finished=frozenset(finished & all_ids),
        lost=frozenset(all_ids - finished),
        fallback_ids=tuple(fallback_ids),
    )


async def _apply_effect(cur: Any, user_id: str, effect: Effect) -> None:
    if isinstance(effect, DisableTelegram):
        await cur.execute(QUERIES["effect_disable_telegram"], {"user_id": user_id})
    elif isinstance(effect, MarkEmailUndeliverable):
        await cur.execute(QUERIES["effect_email_undeliverable"], {"user_id": user_id})
    elif isinstance(effect, UpdateTelegramChat):
        await cur.execute(
            QUERIES["effect_telegram_chat"], {"user_id": user_id, "chat_id": effect.chat_id}
        )
    elif isinstance(effect, DeletePushSubscription):
        await cur.execute(
            QUERIES["effect_delete_subscription"],
            {"user_id": user_id, "endpoint": effect.endpoint},
        )
    log.info("recipient updated user=%s effect=%s", user_id, type(effect).__name__)
