"""Campaigns: one template to many users, written in batches.

Each batch of ``batch_size`` users is one ``outbox.enqueue_many`` statement (one
round trip), so 100,000 users at the default batch size take 100 statements, not
100,000. Like every enqueue path it runs on the caller's connection and never
begins, commits, rolls back or flushes the transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from itertools import islice
from typing import Any

from outbox._db import fetch_one, fetch_one_async
from outbox._enqueue import (
    check_channel,
    check_lane,
    check_priority,
    check_send_at,
    check_template_name,
    check_text,
    encode_vars,
)
from outbox._errors import InvalidMessage
from outbox._templates import default_catalog

VarsSource = Mapping[str, Any] | Callable[[str], Mapping[str, Any]]
ProgressCallback = Callable[[int], None]
"""Called after each batch with the number of messages written so far."""


@dataclass(frozen=True, kw_only=True)
class CampaignResult:
    """What :func:`enqueue_campaign` wrote."""

    enqueued: int
    batches: int


@dataclass(frozen=True, kw_only=True)
class _Batch:
    params: dict[str, Any]
    size: int


def _batches(
    user_ids: Iterable[str],
    *,
    channel: str,
    template: str,
    vars: VarsSource,
    lane: str,
    send_at: datetime | None,
    priority: int | None,
    batch_size: int,
) -> Iterator[_Batch]:
    catalog = default_catalog()
    shared_json: str | None = None
    if not callable(vars):
        catalog.validate(channel, template, vars)
        shared_json = encode_vars(vars)
    iterator = iter(user_ids)
    while chunk := list(islice(iterator, batch_size)):
        users = [check_text("user_id", user_id) for user_id in chunk]
        if shared_json is not None:
            vars_list = [shared_json]
        else:
            assert callable(vars)
            vars_list = []
            for user_id in users:
                user_vars = vars(user_id)
                catalog.validate(channel, template, user_vars)
                vars_list.append(encode_vars(user_vars))
        yield _Batch(
            params={
                "channel": channel,
                "template": template,
                "user_ids": users,
                "vars_list": vars_list,
                "lane": lane,
                "send_at": send_at,
                "priority": priority,
            },
            size=len(users),
        )


def _prepare(
    channel: str, template: str, lane: str, send_at: object, priority: object, batch_size: int
) -> tuple[str, str, str, datetime | None, int | None]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidMessage(f"batch_size must be a positive integer, not {batch_size!r}")
    checked_lane = check_lane(lane)
    return (
        check_channel(channel),
        check_template_name(template),
        checked_lane,
        check_send_at(send_at),
        check_priority(checked_lane, priority),
    )


def enqueue_campaign(
    conn: Any,
    user_ids: Iterable[str],
    *,
    channel: str,
    template: str,
    vars: VarsSource,
    batch_size: int = 1000,
    lane: str = "campaign",
    send_at: datetime | None = None,
    priority: int | None = None,
    progress: ProgressCallback | None = None,
) -> CampaignResult:
    """Write one message per user in the caller's transaction, ``batch_size`` per statement.

    ``vars`` is one mapping for everybody or a callable ``vars(user_id)``. Every
    batch is validated before it is sent; an invalid user id or vars raise
    :class:`~outbox.InvalidMessage` and nothing of that batch is written (batches
    already sent stay in the transaction, which the caller may roll back).
    ``progress(written_so_far)`` is called after each batch.
    """
    channel, template, lane, checked_send_at, checked_priority = _prepare(
        channel, template, lane, send_at, priority, batch_size
    )
    enqueued = batches = 0
    for batch in _batches(
        user_ids,
        channel=channel,
        template=template,
        vars=vars,
        lane=lane,
        send_at=checked_send_at,
        priority=checked_priority,
        batch_size=batch_size,
    ):
        row = fetch_one(conn, "enqueue_many", batch.params)
        enqueued += int(row[0]) if row else 0
        batches += 1
        if progress is not None:
            progress(enqueued)
    return CampaignResult(enqueued=enqueued, batches=batches)


async def enqueue_campaign_async(
    conn: Any,
    user_ids: Iterable[str],
    *,
    channel: str,
    template: str,
    vars: VarsSource,
    batch_size: int = 1000,
    lane: str = "campaign",
    send_at: datetime | None = None,
    priority: int | None = None,
    progress: ProgressCallback | None = None,
) -> CampaignResult:
    """Asynchronous :func:`enqueue_campaign`; same contract, same SQL."""
    channel, template, lane, checked_send_at, checked_priority = _prepare(
        channel, template, lane, send_at, priority, batch_size
    )
    enqueued = batches = 0
    for batch in _batches(
        user_ids,
        channel=channel,
        template=template,
        vars=vars,
        lane=lane,
        send_at=checked_send_at,
        priority=checked_priority,
        batch_size=batch_size,
    ):
        row = await fetch_one_async(conn, "enqueue_many", batch.params)
        enqueued += int(row[0]) if row else 0
        batches += 1
        if progress is not None:
            progress(enqueued)
    return CampaignResult(enqueued=enqueued, batches=batches)
