"""The transactional lane's own claim: an alert gets through while a campaign keeps
every regular in-flight slot busy, and an idle dispatcher still waits on LISTEN.

Real PostgreSQL, the dispatcher in-process, a recording channel whose campaign
sends hold until a gate opens (so the campaign fills the in-flight window and stays
there, deterministically).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import psycopg
import pytest

from outbox.dispatcher import Dispatcher, DispatcherOptions
from outbox.dispatcher._store import ClaimScope
from outbox.dispatcher.channels.base import Envelope, Outcome, Sent
from tests.integration.test_dispatcher import (
    ALERT,
    enqueue,
    rows,
    running,
    seed_users,
    settings_for,
    wait_for,
)
from tests.support.channels import RecordingChannel

CAMPAIGN = 300
WINDOW = 50
"""max_in_flight of these dispatchers: the regular claim leases at most this many."""
GONE = "SELECT 1 FROM outbox.message WHERE id = %s"


class CampaignGatedChannel(RecordingChannel):
    """Campaign sends hold until ``gate`` opens; transactional ones go at once."""

    def __init__(self) -> None:
        super().__init__("email")
        self.gate = asyncio.Event()
        self.sent_at: dict[int, float] = {}

    async def send(self, envelope: Envelope) -> Outcome:
        self.sent.append((time.time(), envelope))
        self.sent_at[envelope.message_id] = time.monotonic()
        if envelope.lane == "campaign":
            await self.gate.wait()
        return Sent()

    def campaign_sends(self) -> int:
        return sum(1 for _, envelope in self.sent if envelope.lane == "campaign")


def enqueue_campaign(admin: psycopg.Connection[Any], n: int) -> None:
    admin.execute(
        "SELECT outbox.enqueue_many('email', 'price_alert',"
        " ARRAY(SELECT 'u' || g FROM generate_series(1, %s) g), ARRAY[%s::jsonb], 'campaign')",
        [n, psycopg.types.json.Jsonb(ALERT)],
    )


def saturated_dispatcher(url: str, channel: CampaignGatedChannel, reserve: int) -> Dispatcher:
    # more senders than slots: a free sender is there for the alert, so what the
    # test measures is the claim alone
    return Dispatcher(
        settings_for(url, poll_interval=30.0),
        {"email": channel},
        options=DispatcherOptions(
            concurrency=WINDOW + 8,
            batch_size=WINDOW,
            max_in_flight=WINDOW,
            urgent_reserve=reserve,
            urgent_poll_seconds=0.01,
        ),
    )


def pending_campaign(admin: psycopg.Connection[Any]) -> int:
    ((count,),) = rows(
        admin, "SELECT count(*) FROM outbox.message WHERE lane = 'campaign' AND status = 'pending'"
    )
    return int(count)


async def test_an_alert_is_claimed_and_sent_while_the_campaign_fills_every_slot(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    seed_users(admin, CAMPAIGN)
    enqueue_campaign(admin, CAMPAIGN)
    channel = CampaignGatedChannel()
    dispatcher = saturated_dispatcher(database_url, channel, reserve=5)
    async with running(dispatcher):
        await wait_for(lambda: channel.campaign_sends() == WINDOW)
        await asyncio.sleep(0.2)  # the regular claim has no room: nothing more comes
        assert channel.campaign_sends() == WINDOW
        assert len(dispatcher.in_flight) == WINDOW
        committed = time.monotonic()
        alert = enqueue(admin, "u7")
        await wait_for(lambda: alert in channel.sent_at, timeout=5.0)
        latency = channel.sent_at[alert] - committed
        # the gate is still shut: the campaign has not moved; the alert overtook it
        assert channel.campaign_sends() == WINDOW
        assert pending_campaign(admin) == CAMPAIGN - WINDOW
        await wait_for(lambda: not rows(admin, "SELECT 1 FROM outbox.message WHERE id = %s", alert))
        channel.gate.set()
        await wait_for(lambda: rows(admin, "SELECT count(*) FROM outbox.message") == [(0,)])
    # a poll every 10 ms: well under a second even on a loaded machine
    assert latency < 1.0, f"alert sent {latency * 1000:.0f} ms after its commit"
    sent = [envelope.message_id for _, envelope in channel.sent]
    assert len(sent) == len(set(sent)) == CAMPAIGN + 1  # each message once
    assert rows(admin, "SELECT outcome, count(*) FROM outbox.attempt GROUP BY 1") == [
        ("sent", CAMPAIGN + 1)
    ]


async def test_a_transactional_backlog_drains_while_the_campaign_holds_every_slot(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    """Busy, the regular claim leaves the transactional lane to the urgent claim; that
    one claims again at once while it finds a full batch, so a backlog of alerts
    drains through the reserve alone while the campaign holds every regular slot."""
    seed_users(admin, CAMPAIGN)
    enqueue_campaign(admin, CAMPAIGN)
    channel = CampaignGatedChannel()
    dispatcher = saturated_dispatcher(database_url, channel, reserve=5)
    async with running(dispatcher):
        await wait_for(lambda: channel.campaign_sends() == WINDOW)
        admin.execute(
            "SELECT outbox.enqueue_many('email', 'price_alert',"
            " ARRAY(SELECT 'u' || g FROM generate_series(1, 200) g), ARRAY[%s::jsonb],"
            " 'transactional')",
            [psycopg.types.json.Jsonb(ALERT)],
        )
        await wait_for(lambda: len(channel.sent) == WINDOW + 200, timeout=30.0)
        assert channel.campaign_sends() == WINDOW  # the gate is still shut
        channel.gate.set()
        await wait_for(lambda: rows(admin, "SELECT count(*) FROM outbox.message") == [(0,)])
    sent = [envelope.message_id for _, envelope in channel.sent]
    assert len(sent) == len(set(sent)) == CAMPAIGN + 200


async def test_without_the_reserve_the_alert_waits_for_campaign_room(
    database_url: str, admin: psycopg.Connection[Any]
) -> None:
    """The same scene with ``urgent_reserve=0`` (the old claim loop): the alert stays
    pending until campaign acknowledgements free a batch of slots; what the test
    above proves is the urgent claim's doing."""
    seed_users(admin, CAMPAIGN)
    enqueue_campaign(admin, CAMPAIGN)
    channel = CampaignGatedChannel()
    dispatcher = saturated_dispatcher(database_url, channel, reserve=0)
    async with running(dispatcher):
        await wait_for(lambda: channel.campaign_sends() == WINDOW)
        alert = enqueue(admin, "u7")
        await asyncio.sleep(1.0)
        assert alert not in channel.sent_at
        assert rows(admin, "SELECT status FROM outbox.message WHERE id = %s", alert) == [
            ("pending",)
        ]
        channel.gate.set()
        await wait_for(lambda: alert in channel.sent_at)
        await wait_for(lambda: rows(admin, "SELECT count(*) FROM outbox.message") == [(0,)])


async def test_an_idle_dispatcher_sleeps_on_listen_and_does_not_poll(
    database_url: str, admin: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wake-one path is untouched: idle, the urgent claim does not run at all;
    a producer's NOTIFY wakes the dispatcher well before its 30 s fallback poll."""
    seed_users(admin, 3)
    channel = RecordingChannel("email")
    dispatcher = Dispatcher(
        settings_for(database_url, poll_interval=30.0),
        {"email": channel},
        options=DispatcherOptions(urgent_reserve=25, urgent_poll_seconds=0.01),
    )
    claims: list[str] = []
    claim = dispatcher._store.claim

    async def counted(limit: int, token: uuid.UUID, *, scope: ClaimScope = "all") -> Any:
        claims.append(scope)
        return await claim(limit, token, scope=scope)

    polls: list[float] = []
    urgent_due = dispatcher._store.urgent_due

    async def counted_poll() -> bool:
        polls.append(time.monotonic())
        return await urgent_due()

    monkeypatch.setattr(dispatcher._store, "claim", counted)
    monkeypatch.setattr(dispatcher._store, "urgent_due", counted_poll)
    async with running(dispatcher):
        await wait_for(lambda: rows(admin, "SELECT count(*) FROM outbox.sleeper") == [(1,)])
        await asyncio.sleep(0.5)
        assert not polls and "transactional" not in claims  # 50 polls would have run by now
        assert set(claims) == {"all"}  # an idle dispatcher's claims take every lane
        for n in (1, 2, 3):
            committed = time.monotonic()
            message_id = enqueue(admin, f"u{n}")
            await wait_for(lambda n=n: len(channel.sent) == n, timeout=5.0)  # type: ignore[misc]
            assert time.monotonic() - committed < 2.0
            await wait_for(lambda m=message_id: not rows(admin, GONE, m))  # type: ignore[misc]
            await wait_for(lambda: rows(admin, "SELECT count(*) FROM outbox.sleeper") == [(1,)])
        await asyncio.sleep(0.3)  # the last acknowledgement's flush ends one more wait
        regular, polled = claims.count("all"), len(polls)
        await asyncio.sleep(0.5)
        assert len(polls) <= 3 * 2, polls  # a poll or two per message in flight at most
        assert claims.count("transactional") <= len(polls)
        assert (claims.count("all"), len(polls)) == (regular, polled)  # and asleep again
