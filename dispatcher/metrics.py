"""Prometheus counters of one dispatcher replica, fed by the dispatcher's observer hooks.

:class:`DispatcherMetrics` is the ``observer`` of a :class:`~outbox.dispatcher.Dispatcher`.
The dispatcher calls it synchronously from its event loop:

- ``sent(message, outcome, duration_ms)`` after every provider call;
- ``acked(batch, result)`` after every flush of finishing writes, with the ids the
  flush really finished (``result.finished``: the rows whose lease it still held).
  Each finish carries its message (the labels) and, when a provider call was made
  in that lease, its duration: nothing is remembered between the two hooks.

What each series counts (docs/metrics.md says why):

``messages_enqueued_total{priority,channel}``
    committed messages, counted once each when the replica holding the current
    lease writes the message's first terminal outcome (``sent``, ``dead``,
    ``skipped`` or ``expired``; an alert's first ``sent``, though its row stays to
    wait for the acknowledgement). A hop to the next channel is not terminal: the
    message goes on under the same id. A rolled-back enqueue never produced a row,
    so it never counts; the lease fencing makes exactly one replica finish a row.
    ``priority`` is the lane (``transactional`` or ``campaign``): numeric
    priorities are unbounded; ``channel`` is where it ended.
``outbox_escalations_total{channel}``
    alerts nobody acknowledged in time, sent on to ``channel`` (counted when the
    escalated message's first finish is written).
``outbox_expired_total{channel}``
    messages not sent by their ``expires_at`` (never sent, no dead letter).
``messages_sent_total{channel,type}``
    provider acceptances; ``type`` is the template name.
``message_fail_total{reason,channel}``
    every attempt that did not end in ``Sent`` (``reason`` is the error class,
    ``rate_limited`` for a provider's slow-down), plus messages that died without
    reaching a channel (``unknown_recipient``, ``template``).
``message_send_duration_seconds{channel}``
    the duration of every provider call, whatever its outcome.
``position_failure_alerts_sent_total{type,channel}``
    provider acceptances of ``position_failure_entry|sl|tp`` (type ``entry|sl|tp``).

The gauges derived from the database (queue depth, dead letters, oldest pending
age) are served by the API only, so that N replicas do not export N copies.
Nothing here reads settings secrets; labels hold channel, lane, template and error
class names only.
"""

from __future__ import annotations

import math
import threading
import time
from http.server import ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import MetricsHandler

from outbox.dispatcher._claimed import Claimed
from outbox.dispatcher._finishes import (
    AckBatch,
    AckResult,
    FinishDead,
    FinishHandoff,
    FinishRequeue,
)
from outbox.dispatcher.channels.base import Outcome, RateLimited, Sent

if TYPE_CHECKING:
    from outbox._settings import Settings

POSITION_FAILURE_TYPES = {
    "position_failure_entry": "entry",
    "position_failure_sl": "sl",
    "position_failure_tp": "tp",
}
"""Template name -> ``type`` label of ``position_failure_alerts_sent_total``."""

SEND_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Seconds; provider calls range from a loopback millisecond to a 30 s SMTP timeout."""


class _Children:
    """A labelled metric's children by label values, in label order.

    ``metric.labels(...)`` checks and locks on every call (about 1.2 µs, three times
    per message); the children are the same objects each time, so a dict keeps them.
    Label values are channel, template, lane and reason names: a bounded set, the
    same that prometheus-client keeps itself.
    """

    def __init__(self, metric: Any) -> None:
        self._labels = metric.labels
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._labels(*values)
        return child


class DispatcherMetrics:
    """Counters for one dispatcher process; pass it as ``Dispatcher(observer=...)``.

    ``registry`` defaults to prometheus_client's process-wide registry, which
    :func:`serve_metrics` exposes; create at most one instance per registry.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = REGISTRY if registry is None else registry
        self.enqueued = Counter(
            "messages_enqueued_total",
            "Committed messages (counted at their terminal outcome)",
            ["priority", "channel"],
            registry=self.registry,
        )
        self.sent_total = Counter(
            "messages_sent_total",
            "Messages accepted by the provider",
            ["channel", "type"],
            registry=self.registry,
        )
        self.failed = Counter(
            "message_fail_total",
            "Delivery attempts that did not end in Sent",
            ["reason", "channel"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "message_send_duration_seconds",
            "Duration of provider calls",
            ["channel"],
            buckets=SEND_BUCKETS,
            registry=self.registry,
        )
        self.escalations = Counter(
            "outbox_escalations_total",
            "Alerts nobody acknowledged in time, sent on to the next channel",
            ["channel"],
            registry=self.registry,
        )
        self.expired = Counter(
            "outbox_expired_total",
            "Messages not sent by their expires_at",
            ["channel"],
            registry=self.registry,
        )
        self.position_failures = Counter(
            "position_failure_alerts_sent_total",
            "Position-failure alerts accepted by the provider",
            ["type", "channel"],
            registry=self.registry,
        )

        self._enqueued = _Children(self.enqueued)
        self._sent = _Children(self.sent_total)
        self._failed = _Children(self.failed)
        self._duration = _Children(self.duration)
        self._escalations = _Children(self.escalations)
        self._expired = _Children(self.expired)
        self._position_failures = _Children(self.position_failures)

    # ------------------------------------------------------------------ hooks

    def sent(self, message: Claimed, outcome: Outcome, duration_ms: float) -> None:
        """Count one provider call and its outcome."""
        self._duration(message.channel).observe(max(duration_ms, 0.0) / 1000)
        if isinstance(outcome, Sent):
            self._sent(message.channel, message.template).inc()
            kind = POSITION_FAILURE_TYPES.get(message.template)
            if kind is not None:
                self._position_failures(kind, message.channel).inc()
            return
        reason = "rate_limited" if isinstance(outcome, RateLimited) else outcome.error_class
        self._failed(reason, message.channel).inc()

    def acked(self, batch: AckBatch, result: AckResult) -> None:
        """Count the messages whose terminal outcome this flush committed.

        A requeued message is not finished yet; a message whose lease was lost is
        finished by the replica that holds the new lease, and counted there.
        """
        for finish in batch.finishes:
            if finish.lease.id not in result.finished:
                continue
            message = finish.message
            if message.escalated:
                self._escalations(message.channel).inc()
            if isinstance(finish, FinishRequeue):
                continue
            if isinstance(finish, FinishHandoff) and finish.next_channel is not None:
                continue  # the message goes on, under the same id
            if isinstance(finish, FinishHandoff) and finish.outcome == "expired":
                self._expired(message.channel).inc()
            if message.sent_before:
                continue  # an alert, counted at its first send
            self._enqueued(message.lane, message.channel).inc()
            if isinstance(finish, FinishDead) and finish.duration_ms is None:
                # died before any provider call (unknown recipient, template error)
                self._failed(finish.error_class, message.channel).inc()


class Health(Protocol):
    """What ``/livez`` and ``/readyz`` answer: None when fine, else the problem in words."""

    def live(self) -> str | None:
        """Why the process should be restarted, or None."""

    def ready(self) -> str | None:
        """Why the process should get no work now, or None."""


def serve_metrics(
    port: int,
    settings: Settings,
    *,
    addr: str = "0.0.0.0",  # noqa: S104
    registry: CollectorRegistry | None = None,
    health: Health | None = None,
) -> None:
    """Serve ``/metrics`` (Prometheus text), ``/livez`` and ``/readyz`` on ``port``.

    A daemon thread, so a busy event loop never delays a scrape or a probe. The
    dispatcher exports its own counters only: the database-derived gauges come from
    the API's ``/metrics`` (docs/metrics.md). By default (one dispatcher process)
    ``/livez`` is 200 while the process runs and ``/readyz`` is 503 while the
    database does not answer or is not migrated (checked at most every
    :data:`READINESS_CACHE_SECONDS`, from this thread); a supervisor of several
    processes passes its own ``health``.
    """
    probes: Health = health if health is not None else DatabaseHealth(settings.database_url)
    base = MetricsHandler.factory(REGISTRY if registry is None else registry)

    class Handler(base):  # type: ignore[valid-type,misc]
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/livez":
                problem = probes.live()
                self._answer(503 if problem else 200, (problem or "ok") + "\n")
            elif path == "/readyz":
                problem = probes.ready()
                self._answer(503 if problem else 200, (problem or "ok") + "\n")
            else:
                super().do_GET()

        def _answer(self, status: int, text: str) -> None:
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # probes every few seconds are not worth a log line

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="outbox-metrics", daemon=True).start()


READINESS_CACHE_SECONDS = 2.0


class DatabaseHealth:
    """One dispatcher process's probes: alive while it runs; ready while the database
    answers and is migrated (the answer is remembered for a moment).
    """

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._lock = threading.Lock()
        self._checked = -math.inf
        self._problem: str | None = None

    def live(self) -> str | None:
        """Never a problem: the process answers, so it runs."""
        return None

    def ready(self) -> str | None:
        """The database's problem (unreachable, not migrated), or None."""
        with self._lock:
            if time.monotonic() - self._checked >= READINESS_CACHE_SECONDS:
                self._problem = self._check()
                self._checked = time.monotonic()
            return self._problem

    def _check(self) -> str | None:
        import psycopg

        from outbox._schema_check import schema_problem

        try:
            with psycopg.connect(self._url, autocommit=True, connect_timeout=3) as conn:
                return schema_problem(conn)
        except psycopg.Error as error:
            return f"the database does not answer ({type(error).__name__})"
