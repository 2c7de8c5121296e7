"""The API's ``/metrics``: gauges read from the database at scrape time.

``outbox_queue_depth{lane,channel}``, ``outbox_dead_letters`` and
``outbox_oldest_pending_seconds{lane}`` describe the shared database, not a
process, so exactly one kind of process exports them: the API (docs/metrics.md).
Every dispatcher replica exporting them would multiply them by the replica count
in any ``sum``.

Prometheus collectors are synchronous while the database driver here is async, so
a scrape first awaits :meth:`QueueStatsCollector.refresh` (two cheap queries) and
then renders the registry, which reads the snapshot. When the database does not
answer, ``outbox_metrics_database_up`` is 0 and the database gauges are left out
(absent, rather than a misleading zero).

The API also counts what happens in its own requests: the owner's test sends, and
acknowledgements through links (``outbox_acknowledgements_total{via="link"}``, and
``outbox_time_to_acknowledge_seconds`` from the alert's first delivery).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg_pool
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from psycopg_pool import AsyncConnectionPool

from outbox._queries import QUERIES
from outbox.vocabulary import CHANNELS, LANES

log = logging.getLogger("outbox.api")

SCRAPE_TIMEOUT = 2.0
"""Seconds a scrape waits for a database connection."""
TIME_TO_ACKNOWLEDGE_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 86400)
"""Seconds: people answer alerts in minutes to hours, not in the milliseconds of the
default buckets; the last ones tell "the next morning" from "within the hour"."""


@dataclass(frozen=True, kw_only=True)
class QueueSnapshot:
    """What the database said at the last scrape."""

    depth: dict[tuple[str, str], int] = field(default_factory=dict)
    """(lane, channel) -> messages pending or in flight."""
    dead: int = 0
    awaiting_ack: int = 0
    """Alerts sent and waiting for the user's acknowledgement (not work to do)."""
    oldest_pending: dict[str, float] = field(default_factory=dict)
    """lane -> seconds the oldest due pending message has been waiting."""

    @classmethod
    def from_rows(
        cls, stats: Iterable[tuple[Any, ...]], lag: Iterable[tuple[Any, ...]]
    ) -> QueueSnapshot:
        """Build from rows of ``queue_stats`` and ``api_pending_lag``."""
        depth: dict[tuple[str, str], int] = {
            (lane, channel): 0 for lane in LANES for channel in CHANNELS
        }
        dead = awaiting = 0
        for lane, channel, status, count, _oldest in stats:
            if status == "dead":
                dead += int(count)
            elif status == "awaiting_ack":
                awaiting += int(count)  # no dispatcher work until it escalates
            else:
                depth[(lane, channel)] = depth.get((lane, channel), 0) + int(count)
        oldest: dict[str, float] = dict.fromkeys(LANES, 0.0)
        for lane, seconds in lag:
            oldest[lane] = max(float(seconds or 0.0), 0.0)
        return cls(depth=depth, dead=dead, awaiting_ack=awaiting, oldest_pending=oldest)


class QueueStatsCollector(Collector):
    """Exports the last :class:`QueueSnapshot`; ``await refresh(pool)`` before a scrape."""

    def __init__(self) -> None:
        self.snapshot: QueueSnapshot | None = None

    async def refresh(self, pool: AsyncConnectionPool[Any]) -> bool:
        """Read the queue state; on any database trouble forget the old one, return False."""
        try:
            async with pool.connection(timeout=SCRAPE_TIMEOUT) as conn:
                stats = await (await conn.execute(QUERIES["queue_stats"])).fetchall()
                lag = await (await conn.execute(QUERIES["api_pending_lag"])).fetchall()
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError, TimeoutError) as error:
            log.warning("metrics scrape: database unavailable error=%s", type(error).__name__)
            self.snapshot = None
            return False
        self.snapshot = QueueSnapshot.from_rows(stats, lag)
        return True

    def describe(self) -> list[Metric]:
        """Nothing to check at registration (the samples depend on the database)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Yield the gauges of the last snapshot."""
        snapshot = self.snapshot
        yield GaugeMetricFamily(
            "outbox_metrics_database_up",
            "1 when the last scrape could read the database",
            value=0 if snapshot is None else 1,
        )
        if snapshot is None:
            return
        depth = GaugeMetricFamily(
            "outbox_queue_depth", "Messages pending or in flight", labels=["lane", "channel"]
        )
        for (lane, channel), count in sorted(snapshot.depth.items()):
            depth.add_metric([lane, channel], count)
        yield depth
        yield GaugeMetricFamily(
            "outbox_dead_letters", "Messages in the dead-letter state", value=snapshot.dead
        )
        yield GaugeMetricFamily(
            "outbox_alerts_awaiting_ack",
            "Alerts sent and waiting for the user's acknowledgement",
            value=snapshot.awaiting_ack,
        )
        oldest = GaugeMetricFamily(
            "outbox_oldest_pending_seconds",
            "Seconds the oldest due pending message has waited since it became due",
            labels=["lane"],
        )
        for lane, seconds in sorted(snapshot.oldest_pending.items()):
            oldest.add_metric([lane], seconds)
        yield oldest


@dataclass(frozen=True, kw_only=True)
class ApiMetrics:
    """The API's own registry: database gauges, the owner's test sends, acknowledgements."""

    registry: CollectorRegistry
    queue: QueueStatsCollector
    test_sends: Counter
    acknowledgements: Counter
    time_to_acknowledge: Histogram

    @classmethod
    def create(cls) -> ApiMetrics:
        """Make a fresh registry per app, so several apps in one process never collide."""
        registry = CollectorRegistry(auto_describe=False)
        queue = QueueStatsCollector()
        registry.register(queue)
        test_sends = Counter(
            "outbox_api_test_sends_total",
            "Synchronous test sends of the owner's API, by outcome",
            ["channel", "status"],
            registry=registry,
        )
        acknowledgements = Counter(
            "outbox_acknowledgements_total",
            "Alerts newly acknowledged through the API, by way (a link)",
            ["via"],
            registry=registry,
        )
        acknowledgements.labels(via="link")  # exported as 0 before the first one
        time_to_acknowledge = Histogram(
            "outbox_time_to_acknowledge_seconds",
            "Seconds from an alert's first delivery to its acknowledgement through the API",
            buckets=TIME_TO_ACKNOWLEDGE_BUCKETS,
            registry=registry,
        )
        return cls(
            registry=registry,
            queue=queue,
            test_sends=test_sends,
            acknowledgements=acknowledgements,
            time_to_acknowledge=time_to_acknowledge,
        )
