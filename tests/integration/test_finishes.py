"""The finishing write against real PostgreSQL: the lease fences the row and its effects."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg

from outbox.dispatcher._claimed import Claimed, Lease
from outbox.dispatcher._finishes import AckBatch, FinishSent
from outbox.dispatcher._store import _write_finishes
from outbox.dispatcher.channels.base import DisableTelegram


async def test_a_finish_whose_lease_was_lost_writes_neither_its_row_nor_its_effects(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    admin.execute("SELECT outbox.set_address('u1', 'telegram', '5')")
    [(message_id,)] = admin.execute(
        "SELECT outbox.enqueue('telegram', 'price_alert', 'u1', '{}')"
    ).fetchall()
    holder = uuid.uuid4()  # another replica's claim holds it now
    admin.execute(
        "UPDATE outbox.message SET status = 'sending', lease_token = %s,"
        " leased_until = now() + interval '1 minute' WHERE id = %s",
        [holder, message_id],
    )

    def finish(token: uuid.UUID) -> FinishSent:
        message = Claimed(
            id=message_id,
            lane="transactional",
            priority=0,
            channel="telegram",
            user_id="u1",
            template="price_alert",
            vars={},
            fallback=None,
            attempts=0,
            lease=Lease(id=message_id, token=token),
        )
        return FinishSent(message=message, duration_ms=1.0, effects=(DisableTelegram(),))

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        result = await _write_finishes(
            conn.cursor(), AckBatch(finishes=[finish(uuid.uuid4())]), "stale"
        )
        await conn.commit()
    assert result.lost == {message_id} and not result.finished
    assert admin.execute("SELECT disabled_since FROM outbox.recipient_address").fetchone() == (
        None,
    )
    assert admin.execute("SELECT count(*) FROM outbox.attempt").fetchone() == (0,)

    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        result = await _write_finishes(conn.cursor(), AckBatch(finishes=[finish(holder)]), "d")
        await conn.commit()
    assert result.finished == {message_id}
    blocked = admin.execute(
        "SELECT disabled_since IS NOT NULL FROM outbox.recipient_address WHERE channel = 'telegram'"
    )
    assert blocked.fetchone() == (True,)
