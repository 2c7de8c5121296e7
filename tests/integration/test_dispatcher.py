"""The dispatcher in-process against real PostgreSQL, with a recording channel."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import psycopg
import pytest

from outbox import Settings
from outbox._settings import parse_rate_limits
from outbox.dispatcher import Dispatcher, DispatcherOptions, RetryPolicy
from outbox.dispatcher.channels.base import (
    ChannelOutage,
    Envelope,
    Outcome,
    PermanentFailure,
    RateLimited,
    Sent,
    TransientFailure,
    Unreachable,
)
from tests.support.channels import RecordingChannel
from tests.support.recipients import seed_recipients, set_addresses

ALERT = {
    "instrument": "EURUSD",
    "trigger_price": "1.085",
    "current_price": "1.086",
    "condition": "above",
}


def settings_for(url: str, **changes: Any) -> Settings:
    base = Settings(database_url=url, rate_limits=parse_rate_limits("off"), poll_interval=1.0)
    return replace(base, **changes)


def seed_users(admin: psycopg.Connection[Any], n: int, prefix: str = "u") -> None:
    seed_recipients(admin, n, prefix=prefix, email_prefix="user")


def enqueue(
    admin: psycopg.Connection[Any],
    user: str,
    *,
    channel: str = "email",
    lane: str = "transactional",
) -> int:
    row = admin.execute(
        "SELECT outbox.enqueue(%s, 'price_alert', %s, %s, %s)",
        [channel, user, psycopg.types.json.Jsonb(ALERT), lane],
    ).fetchone()
    assert row is not None
    return int(row[0])


@asynccontextmanager
async def running(dispatcher: Dispatcher) -> AsyncIterator[Dispatcher]:
    task = asyncio.create_task(dispatcher.run())
    try:
        yield dispatcher
    finally:
        dispatcher.stop()
        await asyncio.wait_for(task, 30)


async def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def rows(admin: psycopg.Connection[Any], sql: str, *params: Any) -> list[tuple[Any, ...]]:
    return admin.execute(sql, list(params)).fetchall()


async def test_a_message_is_sent_deleted_and_logged(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    message_id = enqueue(admin, "u1")
    channel = RecordingChannel("email")
    dispatcher = Dispatcher(
        settings_for(database_url), {"email": channel}, options=DispatcherOptions(until_idle=True)
    )
    await asyncio.wait_for(dispatcher.run(), 30)
    ((_, envelope),) = channel.sent
    assert envelope.message_id == message_id
    assert envelope.recipient.email == "user1@example.com"
    assert "EURUSD" in envelope.content.subject  # type: ignore[union-attr]
    assert rows(admin, "SELECT count(*) FROM outbox.message") == [(0,)]
    assert rows(admin, "SELECT message_id, outcome, attempt FROM outbox.attempt") == [
        (message_id, "sent", 1)
    ]


async def test_a_failing_channel_retries_at_growing_intervals_then_dead_then_redriven(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    message_id = enqueue(admin, "u1")
    failing = True

    def answer(envelope: Envelope) -> Outcome:
        if failing:
            return TransientFailure(error_class="smtp_4xx", error="451 try later")
        return Sent()

    channel = RecordingChannel("email", answer=answer)
    dispatcher = Dispatcher(
        # the retry schedule down to the dead letter (fallback on failure: test_outcomes)
        settings_for(database_url, poll_interval=0.2, fallback_on_failure="off"),
        {"email": channel},
        policy=RetryPolicy(jitter=0),
    )
    async with running(dispatcher):
        await wait_for(lambda: len(channel.sent) == 5, timeout=30)
        await wait_for(lambda: rows(admin, "SELECT status FROM outbox.message") == [("dead",)])
        times = [t for t, _ in channel.sent]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        for gap, expected in zip(gaps, [1, 2, 4, 8], strict=True):
            assert expected - 0.05 <= gap <= expected + 0.6, gaps
        assert [e.attempt for _, e in channel.sent] == [1, 2, 3, 4, 5]
        dead = rows(admin, "SELECT id, attempts, error_class, last_error FROM outbox.dead_letter")
        assert dead == [(message_id, 5, "smtp_4xx", "451 try later")]
        failing = False
        assert rows(admin, "SELECT outbox.retry_dead(ARRAY[%s]::bigint[])", message_id) == [(1,)]
        await wait_for(lambda: len(channel.sent) == 6)
        await wait_for(lambda: rows(admin, "SELECT count(*) FROM outbox.message") == [(0,)])
    outcomes = rows(admin, "SELECT outcome FROM outbox.attempt ORDER BY id")
    assert [o for (o,) in outcomes] == ["retry"] * 4 + ["dead", "sent"]


async def test_outcomes_map_to_dead_deferral_fallback_and_outage(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 4)
    answers: dict[str, Outcome] = {
        "u1": PermanentFailure(error_class="smtp_5xx", error="550 no such user"),
        "u2": RateLimited(retry_after=30, error="slow down"),
        "u3": Unreachable(error_class="no_address", error="no email"),
        "u4": ChannelOutage(error_class="smtp_connect", error="connection refused"),
    }
    email = RecordingChannel("email", answer=lambda e: answers.get(e.user_id, Sent()))
    push = RecordingChannel("push")
    ids = {user: enqueue(admin, user) for user in answers}
    dispatcher = Dispatcher(
        settings_for(database_url, fallback_on_failure="off"),  # u1 dies where it fails
        {"email": email, "push": push},
        options=DispatcherOptions(until_idle=False),
    )
    async with running(dispatcher):
        await wait_for(
            lambda: (
                len(push.sent) == 1 and rows(admin, "SELECT count(*) FROM outbox.attempt") >= [(5,)]
            )
        )
    state = dict(
        (r[0], r[1:])
        for r in rows(
            admin,
            "SELECT user_id, status, attempts, next_attempt_at > now() + interval '20 s',"
            " error_class FROM outbox.message WHERE id = ANY(%s)",
            list(ids.values()),
        )
    )
    assert state["u1"] == ("dead", 1, False, "smtp_5xx")
    assert state["u2"] == ("pending", 0, True, "rate_limited")
    assert "u3" not in state  # handed over to the next channel: push, by default
    assert state["u4"][0:2] == ("pending", 0)
    assert push.sent[0][1].user_id == "u3"
    paused = rows(admin, "SELECT channel, paused_until > now() FROM outbox.channel_state")
    assert paused == [("email", True)]


@pytest.mark.parametrize(
    ("lane", "setting", "falls_back"),
    [
        ("transactional", "transactional", True),
        ("campaign", "transactional", False),
        ("campaign", "all", True),
        ("transactional", "off", False),
    ],
)
async def test_a_permanent_failure_falls_back_by_lane_and_setting(
    database_url: str, admin: psycopg.Connection[Any], lane: str, setting: str, falls_back: bool
) -> None:
    seed_users(admin, 1)
    admin.execute(
        "INSERT INTO outbox.push_subscription (user_id, endpoint, p256dh, auth)"
        " VALUES ('u1', 'https://push.example/u1', 'k', 'a')"
    )
    bounce = PermanentFailure(error_class="smtp_5xx", error="550 no such user")
    email = RecordingChannel("email", answer=lambda e: bounce)
    push = RecordingChannel("push")
    message_id = enqueue(admin, "u1", lane=lane)
    dispatcher = Dispatcher(
        settings_for(database_url, fallback_on_failure=setting),
        {"email": email, "push": push},
        options=DispatcherOptions(until_idle=True),
    )
    await asyncio.wait_for(dispatcher.run(), 30)
    history = rows(admin, "SELECT message_id, channel, outcome FROM outbox.attempt ORDER BY id")
    if falls_back:
        assert [h[1:] for h in history] == [("email", "fallback"), ("push", "sent")]
        assert history[0][0] == message_id and len(push.sent) == 1
        assert rows(admin, "SELECT count(*) FROM outbox.dead_letter") == [(0,)]
    else:
        assert history == [(message_id, "email", "dead")] and push.sent == []


async def test_a_render_failure_of_a_raw_sql_row_is_dead_with_class_template(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 1)
    admin.execute("SELECT outbox.enqueue('email', 'price_alert', 'u1', '{}')")
    admin.execute("SELECT outbox.enqueue('email', 'no_such_template', 'u1', '{}')")
    channel = RecordingChannel("email")
    dispatcher = Dispatcher(
        settings_for(database_url), {"email": channel}, options=DispatcherOptions(until_idle=True)
    )
    await asyncio.wait_for(dispatcher.run(), 30)
    assert channel.sent == []
    dead = rows(admin, "SELECT template, error_class FROM outbox.dead_letter ORDER BY id")
    assert dead == [("price_alert", "template"), ("no_such_template", "template")]


async def test_preferences_skip_opted_out_and_disabled_and_defer_quiet_campaigns(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    admin.execute(
        "INSERT INTO outbox.recipient (user_id, campaign_opt_out,"
        " disabled_channels, quiet_hours_start, quiet_hours_end) VALUES"
        " ('optout', true, '{}', NULL, NULL),"
        " ('noemail', false, '{email}', NULL, NULL),"
        " ('sleepy', false, '{}', localtime - interval '1 hour',"
        "   localtime + interval '1 hour')"
    )
    set_addresses(
        admin,
        {
            "optout": {"email": "a@x.io", "telegram": 1},
            "noemail": {"email": "b@x.io", "telegram": 2},
            "sleepy": {"email": "c@x.io", "telegram": 3},
        },
    )
    admin.execute("SET TIME ZONE 'UTC'")
    enqueue(admin, "optout", lane="campaign")
    enqueue(admin, "noemail")
    enqueue(admin, "sleepy", lane="campaign")
    alert = enqueue(admin, "sleepy", lane="transactional")
    email, telegram, push = (RecordingChannel(n) for n in ("email", "telegram", "push"))
    dispatcher = Dispatcher(
        settings_for(database_url), {"email": email, "telegram": telegram, "push": push}
    )
    async with running(dispatcher):
        await wait_for(lambda: rows(admin, "SELECT count(*) FROM outbox.attempt") >= [(5,)])
    assert [e.message_id for _, e in email.sent] == [alert]  # quiet hours skip alerts
    # 'noemail' disabled email: skipped there, handed to push (default order)
    assert [e.user_id for _, e in push.sent] == ["noemail"]
    log = rows(admin, "SELECT user_id, outcome, error_class FROM outbox.attempt ORDER BY id")
    assert ("optout", "skipped", "opted_out") in log
    assert ("noemail", "skipped", "channel_disabled") in log
    assert ("sleepy", "deferred", "quiet_hours") in log
    waiting = rows(admin, "SELECT user_id, lane, attempts FROM outbox.message")
    assert waiting == [("sleepy", "campaign", 0)]


async def test_transactional_messages_overtake_a_campaign_backlog(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 2000)
    admin.execute(
        "SELECT outbox.enqueue_many('email', 'price_alert',"
        " ARRAY(SELECT 'u' || g FROM generate_series(1, 2000) g), ARRAY[%s::jsonb])",
        [psycopg.types.json.Jsonb(ALERT)],
    )
    channel = RecordingChannel("email", delay=0.001)
    dispatcher = Dispatcher(
        settings_for(database_url),
        {"email": channel},
        options=DispatcherOptions(batch_size=50, concurrency=8),
    )
    async with running(dispatcher):
        await wait_for(lambda: len(channel.sent) >= 200)
        urgent = enqueue(admin, "u7")
        await wait_for(lambda: any(e.message_id == urgent for _, e in channel.sent))
        position = [e.message_id for _, e in channel.sent].index(urgent)
    assert position < 600, f"urgent alert was sent as number {position} of a 2000 backlog"


async def test_sigterm_like_stop_releases_unfinished_leases(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 50)
    for i in range(1, 51):
        enqueue(admin, f"u{i}")
    channel = RecordingChannel("email", delay=60)
    dispatcher = Dispatcher(
        settings_for(database_url),
        {"email": channel},
        options=DispatcherOptions(shutdown_grace=0.5),
    )
    async with running(dispatcher):
        await wait_for(lambda: len(channel.sent) >= 10)
    assert rows(admin, "SELECT count(*) FROM outbox.message WHERE status = 'sending'") == [(0,)]
    assert rows(admin, "SELECT count(*), max(attempts) FROM outbox.message") == [(50, 0)]


async def test_a_fanned_out_alert_is_rendered_once_and_sent_to_everyone(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, 30)
    admin.execute(
        "SELECT outbox.enqueue_many('email', 'price_alert',"
        " ARRAY(SELECT 'u' || g FROM generate_series(1, 30) g), ARRAY[%s::jsonb])",
        [psycopg.types.json.Jsonb(ALERT)],
    )
    enqueue(admin, "u1")  # same vars, another message: the same text
    channel = RecordingChannel("email")
    dispatcher = Dispatcher(
        settings_for(database_url), {"email": channel}, options=DispatcherOptions(until_idle=True)
    )
    await asyncio.wait_for(dispatcher.run(), 30)
    assert sorted(e.user_id for _, e in channel.sent) == sorted(
        [f"u{i}" for i in range(1, 31)] + ["u1"]
    )
    assert {id(e.content) for _, e in channel.sent} == {id(channel.sent[0][1].content)}
    assert dispatcher.renderer.hits == 30
    assert rows(admin, "SELECT count(*) FROM outbox.attempt WHERE outcome = 'sent'") == [(31,)]


async def test_a_template_that_reads_message_id_is_rendered_per_message(
    database_url: str, admin: psycopg.Connection[Any], tmp_path: Any
) -> None:
    (tmp_path / "push").mkdir()
    (tmp_path / "push" / "ticket.json.j2").write_text(
        '{"title": "Ticket {{ message_id }}", "body": "{{ instrument }}",'
        ' "data": {"url": "{{ platform_url(\'/t\') }}"}}'
    )
    seed_users(admin, 3)
    for user in ("u1", "u2", "u3"):
        admin.execute(
            "SELECT outbox.enqueue('push', 'ticket', %s, %s)",
            [user, psycopg.types.json.Jsonb({"instrument": "EURUSD"})],
        )
    channel = RecordingChannel("push")
    dispatcher = Dispatcher(
        settings_for(database_url, templates_dir=tmp_path),
        {"push": channel},
        options=DispatcherOptions(until_idle=True),
    )
    await asyncio.wait_for(dispatcher.run(), 30)
    titles = {
        e.message_id: e.content.payload["title"]  # type: ignore[union-attr]
        for _, e in channel.sent
    }
    assert titles == {i: f"Ticket {i}" for i in titles} and len(titles) == 3
    assert dispatcher.renderer.hits == 0


class GatedChannel(RecordingChannel):
    """Holds every send until ``gate`` opens."""

    def __init__(self) -> None:
        super().__init__("email")
        self.gate = asyncio.Event()

    async def send(self, envelope: Envelope) -> Outcome:
        self.sent.append((time.time(), envelope))
        await self.gate.wait()
        return Sent()


def gated_dispatcher(url: str, **settings: Any) -> tuple[GatedChannel, Dispatcher]:
    """One sender on a gated email channel: the first message holds it, the rest queue."""
    channel = GatedChannel()
    dispatcher = Dispatcher(
        settings_for(url, **settings), {"email": channel}, options=DispatcherOptions(concurrency=1)
    )
    return channel, dispatcher


async def test_a_message_claimed_again_by_its_own_dispatcher_is_still_delivered(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    """After an outage our own leases can expire while the messages still wait in
    the send queue, and our next claim takes them again: the queue then holds two
    entries of one message. Once that crashed the senders (the heap compared two
    messages), and the messages stayed in flight for ever, leases renewed."""
    seed_users(admin, 3)
    ids = [enqueue(admin, f"u{n}") for n in (1, 2, 3)]
    channel, dispatcher = gated_dispatcher(database_url, poll_interval=0.05, lease_seconds=60.0)
    async with running(dispatcher):
        await wait_for(lambda: len(channel.sent) == 1)  # one sends, two wait in the queue
        admin.execute(  # as if the heartbeat had failed through an outage
            "UPDATE outbox.message SET leased_until = now() - interval '1 second'"
            " WHERE status = 'sending'"
        )
        # our next claim takes them again (the one being sent too)
        await wait_for(
            lambda: (
                rows(admin, "SELECT count(*) FROM outbox.message WHERE leased_until > now()")
                == [(3,)]
            ),
            timeout=10,
        )
        channel.gate.set()
        await wait_for(lambda: rows(admin, "SELECT count(*) FROM outbox.message") == [(0,)])
        await wait_for(lambda: not dispatcher.in_flight)
    sent = [envelope.message_id for _, envelope in channel.sent]
    assert set(sent) == set(ids)
    outcomes = rows(
        admin, "SELECT message_id, outcome FROM outbox.attempt WHERE outcome = 'sent' ORDER BY 1"
    )
    assert outcomes == [(i, "sent") for i in ids]  # each acknowledged once, by its new lease


async def test_a_queued_message_whose_lease_was_taken_over_is_not_sent_by_us(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    """The heartbeat finds a lease gone (another dispatcher claimed the message after
    ours ran out): the copy still waiting in our queue is dropped, not sent twice."""
    seed_users(admin, 3)
    first, taken, third = (enqueue(admin, f"u{n}") for n in (1, 2, 3))
    channel, dispatcher = gated_dispatcher(database_url, poll_interval=0.2, lease_seconds=1.5)
    async with running(dispatcher):
        await wait_for(lambda: len(channel.sent) == 1)
        assert channel.sent[0][1].message_id == first
        admin.execute(  # what another dispatcher's claim does
            "UPDATE outbox.message SET lease_token = gen_random_uuid(), leased_by = 'other',"
            " leased_until = now() + interval '1 hour' WHERE id = %s",
            [taken],
        )
        await wait_for(lambda: taken not in dispatcher.in_flight, timeout=5)  # heartbeat
        channel.gate.set()
        await wait_for(lambda: rows(admin, "SELECT id FROM outbox.message") == [(taken,)])
        await wait_for(lambda: not dispatcher.in_flight)
    assert [envelope.message_id for _, envelope in channel.sent] == [first, third]
    assert rows(admin, "SELECT leased_by FROM outbox.message") == [("other",)]
