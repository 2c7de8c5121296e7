"""Cluster-wide Telegram rate limits, measured where they matter: at the Bot API server.

Two ``outbox dispatch`` subprocesses share the default limits (20 messages a second
per bot, 1 a second per chat). The loopback server stamps every request on arrival;
the test counts them in sliding one-second windows.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from outbox.testing.environment import dispatcher_environment
from outbox.testing.telegram import TelegramServer
from tests.acceptance.conftest import Spawn, wait_until
from tests.support.recipients import seed_recipients

CHATS = 20
PER_CHAT = 10
LONG_TO = (1, 2, 3)  # chats that also get a text long enough for three parts
ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.0850",
    "current_price": "1.0862",
    "condition": "above",
}
ENTRY = {
    "instrument": "EURUSD",
    "side": "buy",
    "entry_price": "1.0850",
    "volume": "0.5",
    "approval_id": "apr-1",
    "error_reason": " ".join(f"step{i}." for i in range(1000)),
}


def sent(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute("SELECT count(*) FROM outbox.attempt WHERE outcome = 'sent'").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.timeout(120)
def test_two_replicas_together_keep_to_the_bot_and_the_chat_limits(
    admin: psycopg.Connection[Any], spawn_dispatcher: Spawn, telegram_server: TelegramServer
) -> None:
    seed_recipients(admin, CHATS, channels=("telegram",))
    for _ in range(PER_CHAT):
        admin.execute(
            "SELECT outbox.enqueue_many('telegram', 'price_alert',"
            " ARRAY(SELECT 'u' || g FROM generate_series(1, %s::int) g), ARRAY[%s::jsonb],"
            " 'transactional')",
            [CHATS, Jsonb(ALERT)],
        )
    for chat in LONG_TO:
        admin.execute(
            "SELECT outbox.enqueue('telegram', 'position_failure_entry', %s, %s)",
            [f"u{chat}", Jsonb(ENTRY)],
        )
    messages = CHATS * PER_CHAT + len(LONG_TO)
    env = dispatcher_environment(telegram=telegram_server)
    for _ in range(2):
        spawn_dispatcher(OUTBOX_RATE_LIMITS="telegram=20/s,telegram_chat=1/s", **env)

    wait_until(lambda: sent(admin) == messages, 90, f"{messages} messages to be sent")
    requests = telegram_server.requests
    assert len(requests) == CHATS * PER_CHAT + 3 * len(LONG_TO)
    assert {r.status for r in requests} == {200}
    per_window = telegram_server.max_per_second()
    assert per_window <= 20, f"{per_window} requests to the bot within one second"
    for chat in range(1, CHATS + 1):
        arrivals = sorted(r.received_at for r in requests if r.chat_id == chat)
        closest = min(b - a for a, b in itertools.pairwise(arrivals))
        assert closest >= 1.0, f"chat {chat} got two messages {closest:.3f} s apart"
        assert telegram_server.max_per_second(chat) == 1
    # paced a little below the limit (room for 0.2 s of jitter), not far below it
    assert per_window >= 15, per_window

    texts = Counter(m.chat_id for m in telegram_server.messages if "step999." in m.plain_text)
    assert texts == Counter(dict.fromkeys(LONG_TO, 1)), "a long text lost its last part"
    dispatchers = admin.execute(
        "SELECT count(DISTINCT dispatcher_id) FROM outbox.attempt WHERE outcome = 'sent'"
    ).fetchone()
    assert dispatchers == (2,), "one replica did all the work; the test proves nothing"
    burned = admin.execute(
        "SELECT count(*) FROM outbox.attempt WHERE outcome NOT IN ('sent', 'deferred')"
    ).fetchone()
    assert burned == (0,)
