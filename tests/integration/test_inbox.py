"""Channel inapp against real PostgreSQL: the item is written with the ack, announced
to listeners at commit, read by its user only, and reading an alert acknowledges it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import outbox
from outbox.dispatcher import Dispatcher, DispatcherOptions
from outbox.dispatcher.channels import build_channels
from outbox.dispatcher.channels.base import Envelope, Outcome, Sent, Unreachable
from tests.integration.test_dispatcher import (
    ALERT,
    rows,
    running,
    seed_users,
    settings_for,
    wait_for,
)
from tests.support.channels import RecordingChannel


def _needs_address(envelope: Envelope) -> Outcome:
    if not envelope.recipient.reaches(envelope.channel):
        return Unreachable(error_class="no_address", error=f"no {envelope.channel} address")
    return Sent()


def inapp_dispatcher(database_url: str, **options: Any) -> Dispatcher:
    """The real inapp channel; recording stand-ins that need an address for the rest."""
    settings = settings_for(database_url, poll_interval=0.2)
    chans: dict[str, Any] = {"inapp": build_channels(settings, environ={})["inapp"]}
    for name in ("email", "telegram", "push"):
        chans[name] = RecordingChannel(name, answer=_needs_address)
    return Dispatcher(settings, chans, options=DispatcherOptions(**options))


async def test_an_inapp_message_lands_in_its_users_inbox_and_is_announced_at_commit(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 2)
    listener = psycopg.connect(database_url, autocommit=True)
    listener.execute("LISTEN outbox_inbox")
    message_id = outbox.enqueue(
        admin, user_id="u1", channel="inapp", template="price_alert", vars=ALERT
    )
    await asyncio.wait_for(inapp_dispatcher(database_url, until_idle=True).run(), 30)

    [item] = outbox.inbox(admin, "u1")
    assert (item.message_id, item.template, item.unread) == (message_id, "price_alert", True)
    assert item.title == "Price alert: EURUSD above 1.085"
    assert item.url is not None and item.url.endswith("/dashboard/positions")
    assert outbox.inbox(admin, "u2") == []
    notices = [n.payload for n in listener.notifies(timeout=2, stop_after=1)]
    listener.close()
    assert notices == [f"{item.id} u1"]
    assert rows(admin, "SELECT channel, outcome FROM outbox.attempt") == [("inapp", "sent")]


async def test_inapp_is_the_last_link_a_failed_alert_falls_back_to(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    admin.execute("INSERT INTO outbox.recipient (user_id) VALUES ('nobody')")  # no address
    message_id = outbox.enqueue(
        admin,
        user_id="nobody",
        channel="email",
        template="price_alert",
        vars=ALERT,
        fallback=["telegram", "inapp"],
    )
    await asyncio.wait_for(inapp_dispatcher(database_url, until_idle=True).run(), 30)
    [item] = outbox.inbox(admin, "nobody")
    assert item.message_id == message_id
    assert outbox.message_status(admin, message_id).state == "sent"  # type: ignore[union-attr]
    assert [a.channel for a in outbox.message_status(admin, message_id).attempts] == [  # type: ignore[union-attr]
        "email",
        "telegram",
        "inapp",
    ]


async def test_reading_an_alerts_item_acknowledges_it_and_stops_the_escalation(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 2)
    alert = outbox.enqueue(
        admin,
        user_id="u1",
        channel="inapp",
        template="price_alert",
        vars=ALERT,
        fallback=["email"],
        escalate_after=1,
    )
    dispatcher = inapp_dispatcher(database_url)
    email = dispatcher.channels["email"]
    assert isinstance(email, RecordingChannel)
    async with running(dispatcher):
        await wait_for(lambda: outbox.inbox(admin, "u1") != [])
        [item] = outbox.inbox(admin, "u1", unread_only=True)
        assert outbox.read_inbox_item(admin, "u2", item.id) is False  # not theirs
        assert outbox.read_inbox_item(admin, "u1", item.id) is True
        assert outbox.read_inbox_item(admin, "u1", item.id) is False  # once
        await asyncio.sleep(1.6)
    assert email.sent == []
    assert outbox.message_status(admin, alert).state == "acknowledged"  # type: ignore[union-attr]
    assert outbox.inbox(admin, "u1", unread_only=True) == []


async def test_read_all_pages_and_bad_input(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    for n in range(5):
        outbox.enqueue(
            admin,
            user_id="u1",
            channel="inapp",
            template="price_alert",
            vars={**ALERT, "current_price": str(n)},
        )
    await asyncio.wait_for(inapp_dispatcher(database_url, until_idle=True).run(), 30)
    first = outbox.inbox(admin, "u1", limit=2)
    second = outbox.inbox(admin, "u1", limit=2, before=first[-1].id)
    assert [i.id for i in first + second] == sorted((i.id for i in first + second), reverse=True)
    assert len({i.id for i in first + second}) == 4
    assert outbox.read_all_inbox_items(admin, "u1") == 5
    assert outbox.read_all_inbox_items(admin, "u1") == 0
    for bad in ({"limit": 0}, {"limit": 201}, {"before": -1}, {"unread_only": "yes"}):
        with pytest.raises(outbox.InvalidMessage):
            outbox.inbox(admin, "u1", **bad)  # type: ignore[arg-type]
    with pytest.raises(outbox.InvalidMessage):
        outbox.read_inbox_item(admin, "", 1)


def test_a_redelivered_message_adds_no_second_item(admin: psycopg.Connection[Any]) -> None:
    """At least once: the same message's item twice is one item."""
    for _ in range(2):
        admin.execute(
            "WITH item AS (INSERT INTO outbox.inbox_item (user_id, message_id, template, title,"
            " body) VALUES ('u1', 7, 'price_alert', 't', 'b')"
            " ON CONFLICT ON CONSTRAINT inbox_item_message_key DO NOTHING RETURNING id)"
            " SELECT count(*) FROM item"
        )
    assert rows(admin, "SELECT count(*) FROM outbox.inbox_item") == [(1,)]
