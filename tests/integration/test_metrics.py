"""Dispatcher metrics: an in-process dispatcher, a recording channel, a private registry."""

from __future__ import annotations

import asyncio
import socket
import uuid
from dataclasses import replace
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from outbox import Settings
from outbox._settings import parse_rate_limits
from outbox.dispatcher import Dispatcher, DispatcherOptions
from outbox.dispatcher._claimed import Claimed, Lease
from outbox.dispatcher._finishes import AckBatch, AckResult, FinishDead, FinishSent
from outbox.dispatcher.channels.base import Envelope, Outcome, Sent, TransientFailure
from outbox.dispatcher.metrics import DispatcherMetrics, serve_metrics
from tests.support.channels import RecordingChannel

SL = {
    "instrument": "XAUUSD",
    "side": "sell",
    "entry_price": "2350.10",
    "current_price": "2371.40",
    "loss_amount": "213.00",
    "broker_ticket": "T-991",
}


def settings_for(url: str, **changes: Any) -> Settings:
    base = Settings(database_url=url, rate_limits=parse_rate_limits("off"), poll_interval=0.2)
    return replace(base, **changes)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def enqueue_sl(conn: psycopg.Connection[Any], user: str = "u1") -> int:
    row = conn.execute(
        "SELECT outbox.enqueue('email', 'position_failure_sl', %s, %s)",
        [user, psycopg.types.json.Jsonb(SL)],
    ).fetchone()
    assert row is not None
    return int(row[0])


async def drain(
    url: str, channel: RecordingChannel, metrics: DispatcherMetrics, **changes: Any
) -> None:
    dispatcher = Dispatcher(
        settings_for(url, **changes),
        {"email": channel},
        options=DispatcherOptions(until_idle=True),
        observer=metrics,
    )
    await asyncio.wait_for(dispatcher.run(), 60)


@pytest.fixture
def user(admin: psycopg.Connection[Any]) -> None:
    admin.execute("SELECT outbox.set_address('u1', 'email', 'u1@example.com')")


async def test_a_rolled_back_enqueue_is_never_counted_and_a_committed_one_counts_once_delivered(
    database_url: str,
    admin: psycopg.Connection[Any],
    user: None,
) -> None:
    registry = CollectorRegistry()
    metrics = DispatcherMetrics(registry)
    with psycopg.connect(database_url) as producer:
        enqueue_sl(producer)
        producer.rollback()
    channel = RecordingChannel("email")

    await drain(database_url, channel, metrics)

    assert channel.sent == []
    assert (
        value(registry, "messages_enqueued_total", priority="transactional", channel="email") == 0
    )

    with psycopg.connect(database_url) as producer:
        enqueue_sl(producer)
        producer.commit()
    await drain(database_url, channel, metrics)

    assert len(channel.sent) == 1
    assert (
        value(registry, "messages_enqueued_total", priority="transactional", channel="email") == 1
    )
    assert value(registry, "messages_sent_total", channel="email", type="position_failure_sl") == 1
    assert value(registry, "position_failure_alerts_sent_total", type="sl", channel="email") == 1
    assert value(registry, "message_send_duration_seconds_count", channel="email") == 1
    assert value(registry, "message_fail_total", reason="smtp_4xx", channel="email") == 0


async def test_a_retried_message_counts_each_failure_but_is_enqueued_and_sent_once(
    database_url: str,
    admin: psycopg.Connection[Any],
    user: None,
) -> None:
    registry = CollectorRegistry()
    metrics = DispatcherMetrics(registry)
    answers: list[Outcome] = [TransientFailure(error_class="smtp_4xx", error="451 later"), Sent()]

    def answer(envelope: Envelope) -> Outcome:
        return answers.pop(0)

    enqueue_sl(admin)
    await drain(
        database_url, RecordingChannel("email", answer=answer), metrics, retry_delays=(0.1,)
    )

    assert value(registry, "message_fail_total", reason="smtp_4xx", channel="email") == 1
    assert value(registry, "messages_sent_total", channel="email", type="position_failure_sl") == 1
    assert (
        value(registry, "messages_enqueued_total", priority="transactional", channel="email") == 1
    )
    assert value(registry, "message_send_duration_seconds_count", channel="email") == 2


def claimed(message_id: int, template: str = "price_alert") -> Claimed:
    return Claimed(
        id=message_id,
        lane="campaign",
        priority=100,
        channel="telegram",
        user_id="u9",
        template=template,
        vars={},
        fallback=None,
        attempts=0,
        lease=Lease(id=message_id, token=uuid.uuid4()),
    )


def test_a_message_that_dies_before_any_send_counts_as_enqueued_and_failed() -> None:
    registry = CollectorRegistry()
    metrics = DispatcherMetrics(registry)
    message = claimed(7)

    batch = AckBatch(
        finishes=[
            FinishDead(
                message=message,
                error_class="unknown_recipient",
                error="no outbox.recipient row",
            )
        ]
    )
    metrics.acked(batch, AckResult(finished=frozenset({7}), lost=frozenset(), fallback_ids=()))

    assert value(registry, "messages_enqueued_total", priority="campaign", channel="telegram") == 1
    assert (
        value(registry, "message_fail_total", reason="unknown_recipient", channel="telegram") == 1
    )


def test_a_finish_whose_lease_was_lost_is_left_to_the_replica_that_finishes_it() -> None:
    registry = CollectorRegistry()
    metrics = DispatcherMetrics(registry)
    message = claimed(8, template="position_failure_tp")
    metrics.sent(message, Sent(), 12.0)

    batch = AckBatch(finishes=[FinishSent(message=message, duration_ms=12.0)])
    metrics.acked(batch, AckResult(finished=frozenset(), lost=frozenset({8}), fallback_ids=()))

    assert value(registry, "messages_enqueued_total", priority="campaign", channel="telegram") == 0
    assert value(registry, "position_failure_alerts_sent_total", type="tp", channel="telegram") == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_serve_metrics_exposes_every_dispatcher_series_over_http() -> None:
    registry = CollectorRegistry()
    metrics = DispatcherMetrics(registry)
    metrics.sent(claimed(9, template="position_failure_entry"), Sent(), 3.0)
    port = free_port()

    serve_metrics(port, Settings(), addr="127.0.0.1", registry=registry)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

    for name in (
        "messages_enqueued_total",
        "messages_sent_total",
        "message_fail_total",
        "message_send_duration_seconds",
        "position_failure_alerts_sent_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in text
    assert 'position_failure_alerts_sent_total{channel="telegram",type="entry"} 1.0' in text
