"""The claim loop: lease messages, render, send, acknowledge in batches.

One ``Dispatcher`` is one replica. Any number run at once against one database;
any of them may be killed at any moment. The loop:

1. claim a batch with its recipients (one short statement, ``FOR UPDATE SKIP
   LOCKED``, a fresh lease token per claim); no transaction stays open while a
   channel sends;
2. queue the messages, most urgent first; ``concurrency`` sender tasks take them
   one by one: apply preferences (opt-out, disabled channels, quiet hours),
   render, send within the cluster-wide rate limits (a message that must wait
   for its slot waits in a task of its own, so that it holds no sender back);
3. turn each outcome into a finishing write; an acknowledger writes them in
   batches, each filtered on the lease token;
4. a heartbeat extends the leases of messages still in flight;
5. with nothing to do, sleep on LISTEN (see ``_wakeup``) or the fallback poll.

On SIGTERM/SIGINT: stop claiming, let in-flight sends finish (up to a grace
period), write their outcomes, give back any lease still held, exit 0.

Durability: a claim commits without waiting for the WAL flush (``SET LOCAL
synchronous_commit = off``): a claim lost in a crash only returns its messages
to pending, and since the WAL is flushed in order, no acknowledgement can be
durable while the claim it depends on is not. It saves a disk flush on the way
from commit to send (the pickup latency) and per claimed batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import psycopg
import psycopg_pool
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool

from outbox._db import (
    RECONNECT_TIMEOUT,
    connect_kwargs,
    deadline_connection_class,
    reconnect_afresh,
)
from outbox._errors import OutboxError, TemplateRenderError
from outbox._queries import QUERIES
from outbox._settings import Settings
from outbox._templates import TemplateCatalog
from outbox.dispatcher._acks import (
    AckBatch,
    AckResult,
    Finish,
    FinishDead,
    FinishHandoff,
    FinishRequeue,
    FinishSent,
    Lease,
    write_batch,
)
from outbox.dispatcher._limits import CircuitBreaker, RateLimiter
from outbox.dispatcher._retry import RetryPolicy
from outbox.dispatcher._routing import RecipientRecord, next_channel
from outbox.dispatcher._wakeup import Wakeup
from outbox.dispatcher.channels.base import (
    Channel,
    ChannelOutage,
    Effect,
    Envelope,
    Outcome,
    PermanentFailure,
    RateLimited,
    Sent,
    TransientFailure,
    Unreachable,
)
from outbox.dispatcher.rendering import RenderCache, stored_vars

log = logging.getLogger("outbox.dispatcher")

_json_decode = json.JSONDecoder().raw_decode
_MESSAGE_COLUMNS = 9
"""``claim_batch`` returns the message in its first columns, then its recipient."""

CONNECT_KWARGS: dict[str, Any] = {
    # notice a half-open connection within about 15 s
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 15_000,  # ms: unacknowledged data fails the connection
    "connect_timeout": 10,
}


def default_dispatcher_id() -> str:
    """``host:pid:random``, unique per process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True, kw_only=True, slots=True)
class Claimed:
    """A message this dispatcher leases."""

    id: int
    lane: str
    priority: int
    channel: str
    user_id: str
    template: str
    vars: Mapping[str, Any] | None
    """None: not decoded yet (long, withheld or too deep; see ``rendering.stored_vars``)."""
    fallback: tuple[str, ...] | None
    attempts: int
    lease: Lease
    vars_key: str | None = None
    """The stored text of ``vars``: equal texts render equally (see RenderCache)."""

    @classmethod
    def from_row(cls, row: Sequence[Any], token: uuid.UUID) -> Claimed:
        """Build from a row of ``claim_batch`` run with lease token ``token``."""
        id_, lane, priority, channel, user_id, template, vars_text, fallback, attempts = row
        return cls(
            id=id_,
            lane=lane,
            priority=priority,
            channel=channel,
            user_id=user_id,
            template=template,
            vars=stored_vars(vars_text),
            fallback=tuple(fallback) if fallback is not None else None,
            attempts=attempts,
            lease=Lease(id=id_, token=token),
            vars_key=vars_text,
        )


@dataclass(frozen=True, kw_only=True)
class DispatcherOptions:
    """Knobs of one replica (the CLI flags)."""

    concurrency: int = 32
    batch_size: int = 100
    max_in_flight: int | None = None
    """Messages claimed and not yet acknowledged; default 4 batches."""
    until_idle: bool = False
    idle_horizon: float = 60.0
    """With ``until_idle``: "idle" means nothing in flight and nothing pending due
    within this many seconds. Messages due later (retries far ahead, quiet hours,
    ``send_at``) are left for the next run, and the exit log line says when."""
    ack_delay: float = 0.005
    ack_max: int = 500
    shutdown_grace: float = 10.0
    send_timeout: float | None = None


class Dispatcher:
    """One dispatcher replica; ``await run()`` until ``stop()`` (or idle)."""

    def __init__(
        self,
        settings: Settings,
        channels: Mapping[str, Channel],
        *,
        options: DispatcherOptions | None = None,
        catalog: TemplateCatalog | None = None,
        policy: RetryPolicy | None = None,
        dispatcher_id: str | None = None,
        observer: Any = None,
    ) -> None:
        self.settings = settings
        self.channels = dict(channels)
        self.options = options or DispatcherOptions()
        self.catalog = catalog or TemplateCatalog(settings.templates_dir)
        self.policy = policy or RetryPolicy.from_settings(settings)
        self.renderer = RenderCache(self.catalog, platform_base_url=settings.platform_base_url)
        self.id = dispatcher_id or settings.dispatcher_id or default_dispatcher_id()
        self.observer = observer
        self._stopping = asyncio.Event()
        self._in_flight: dict[int, Lease] = {}
        self._capacity = asyncio.Event()
        self._acks = AckBatch()
        self._ack_ready = asyncio.Event()
        # ends an idle wait: a NOTIFY, a listener reconnect, an acknowledgement flush
        # (it may have written follow-ups, which send no NOTIFY) or stop()
        self._wake = asyncio.Event()
        self._acking: set[int] = set()  # ids of the flush being written
        self._tasks: set[asyncio.Task[None]] = set()
        self._sem = asyncio.Semaphore(self.options.concurrency)
        # claimed messages whose recipients are loaded, waiting for a sender
        # (priority, id, sequence, message, recipient): the sequence keeps two entries
        # of one message apart (our own lease expired during an outage and our next
        # claim took the message again), so the heap never compares Claimed objects
        self._ready: list[tuple[int, int, int, Claimed, RecipientRecord | None]] = []
        self._sequence = itertools.count()
        self._ready_event = asyncio.Event()
        self._sending = 0
        limits = settings.rate_limits
        self._limited = {channel for channel in ("email", "telegram", "push") if channel in limits}
        if "telegram_chat" in limits:
            self._limited.add("telegram")
        self._pool: AsyncConnectionPool[Any] | None = None
        self._wakeup: Wakeup | None = None
        self._limiter: RateLimiter | None = None
        self._breaker: CircuitBreaker | None = None
        self._asleep = False
        self._registered_at = 0.0
        self.delivered = 0

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask the loop to stop claiming and shut down gracefully."""
        self._stopping.set()
        self._capacity.set()
        self._wake.set()

    async def run(self) -> None:
        """Dispatch until stopped (or, with ``until_idle``, until nothing is left)."""
        self._pool = AsyncConnectionPool(
            self.settings.database_url,
            min_size=1,
            max_size=4,
            open=False,
            kwargs={"autocommit": True, **connect_kwargs(self.settings)},
            configure=_configure,
            reconnect_timeout=RECONNECT_TIMEOUT,
            reconnect_failed=reconnect_afresh,
            # a round trip that gets no answer (half-open connection) fails in bounded time
            connection_class=deadline_connection_class(self.settings.db_timeout),
        )
        await self._pool.open(wait=False)
        self._limiter = RateLimiter(self._pool, self.settings.rate_limits)
        self._breaker = CircuitBreaker(self._pool)
        if self.settings.listen:
            # LISTEN needs a session: behind PgBouncer in transaction mode, a direct URL
            listen_url = self.settings.listen_database_url or self.settings.database_url
            self._wakeup = Wakeup(listen_url, on_wake=self._notified, connect_kwargs=CONNECT_KWARGS)
            await self._wakeup.start()
        acker = asyncio.create_task(self._ack_loop(), name="outbox-acks")
        heartbeat = asyncio.create_task(self._heartbeat_loop(), name="outbox-heartbeat")
        senders = [
            asyncio.create_task(self._send_loop(), name=f"outbox-sender-{n}")
            for n in range(self.options.concurrency)
        ]
        log.info(
            "dispatcher started id=%s concurrency=%d batch=%d",
            self.id,
            self.options.concurrency,
            self.options.batch_size,
        )
        try:
            await self._claim_loop()
        finally:
            await self._shutdown(acker, heartbeat, senders)

    async def _shutdown(
        self,
        acker: asyncio.Task[None],
        heartbeat: asyncio.Task[None],
        senders: list[asyncio.Task[None]],
    ) -> None:
        # senders take nothing new once stopping; sends under way get the grace period
        self._ready_event.set()
        deadline = time.monotonic() + self.options.shutdown_grace
        if self._tasks:
            _done, pending = await asyncio.wait(
                set(self._tasks), timeout=self.options.shutdown_grace
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._sending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    while self._sending:
                        await asyncio.sleep(0.01)
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        self._ready.clear()
        await self._flush_acks()
        acker.cancel()
        heartbeat.cancel()
        await asyncio.gather(acker, heartbeat, return_exceptions=True)
        await self._release_all()
        await self._set_asleep(False)
        if self._wakeup is not None:
            await self._wakeup.close()
        for channel in self.channels.values():
            try:
                await channel.aclose()
            except Exception:  # closing must not hide the shutdown
                log.exception("channel close failed channel=%s", getattr(channel, "name", "?"))
        assert self._pool is not None
        await self._pool.close()
        log.info("dispatcher stopped id=%s delivered=%d", self.id, self.delivered)

    # ------------------------------------------------------------------ claiming

    @property
    def _max_in_flight(self) -> int:
        # Enough to cover a claim, the sends and an acknowledgement round trip
        # (a WAL flush) without the claim loop waiting on capacity.
        return self.options.max_in_flight or max(
            self.options.batch_size * 4, self.options.concurrency * 2
        )

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            room = self._max_in_flight - len(self._in_flight)
            if room < min(self.options.batch_size, self._max_in_flight // 2):
                self._capacity.clear()
                await self._capacity.wait()
                continue
            claimed = await self._claim(min(room, self.options.batch_size))
            if claimed is None:  # database unreachable: back off, keep trying
                await self._sleep(1.0)
                continue
            if claimed:
                if self._asleep:
                    # the senders first: this round trip is for producers' sake only
                    await asyncio.sleep(0)
                    await self._set_asleep(False)
                continue
            if await self._idle():
                return

    async def _claim(self, limit: int) -> list[Claimed] | None:
        """Lease a batch and queue it for the senders (with its recipients)."""
        assert self._pool is not None
        token = uuid.uuid4()
        try:
            async with self._pool.connection(timeout=10) as conn:
                cursor = await conn.execute(
                    QUERIES["claim_batch"],
                    {
                        "batch_size": limit,
                        "lease_seconds": self.settings.lease_seconds,
                        "dispatcher_id": self.id,
                        "lease_token": str(token),
                    },
                )
                rows = await cursor.fetchall()
        except (psycopg.Error, OSError, TimeoutError) as error:
            log.warning(
                "claim failed error=%s detail=%s",
                type(error).__name__,
                str(error).splitlines()[0] if str(error) else "",
            )
            return None
        claimed: list[Claimed] = []
        recipients: dict[str, RecipientRecord] = {}
        for row in rows:
            message = Claimed.from_row(row[:_MESSAGE_COLUMNS], token)
            claimed.append(message)
            self._in_flight[message.id] = message.lease
            recipient = None
            if row[_MESSAGE_COLUMNS] is not None:  # else no outbox.recipient row
                recipient = recipients.get(message.user_id)
                if recipient is None:
                    recipient = RecipientRecord.from_row(row[_MESSAGE_COLUMNS:])
                    recipients[message.user_id] = recipient
            heapq.heappush(
                self._ready,
                (message.priority, message.id, next(self._sequence), message, recipient),
            )
        if claimed:
            self._ready_event.set()
            if self.observer is not None:
                self.observer.claimed(claimed)
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "claimed count=%d ids=%s..%s", len(claimed), claimed[0].id, claimed[-1].id
                )
        return claimed

    async def _idle(self) -> bool:
        """Nothing was due. Sleep until woken; return True to exit (until-idle)."""
        timeout = self.settings.poll_interval
        if self.options.until_idle and not self._in_flight and not self._tasks:
            due_in, sending = await self._next_due()
            if not sending and (due_in is None or due_in > self.options.idle_horizon):
                await self._log_idle_exit(due_in)
                return True
            self._log_idle_wait(due_in, sending)
            if sending:  # another replica's messages: exit soon after they are done
                timeout = min(timeout, 0.05)
        if self._wakeup is None:
            await self._sleep(min(timeout, 0.05) if self._in_flight else timeout)
            return False
        # Notifications, reconnects and acknowledgements from now on end the wait
        # (earlier ones are covered by the claim below). Our own acknowledgements
        # may have written follow-ups (fallbacks) that send no NOTIFY, and they end
        # an until-idle run.
        self._wake.clear()
        # registered only while listening: producers name one sleeper to wake, and
        # one that cannot hear them would hold their messages until its next poll
        await self._set_asleep(self._wakeup.connected)
        # claim once more: a message committed before we registered sent no NOTIFY
        if await self._claim(self.options.batch_size):
            await asyncio.sleep(0)  # the senders first, as in _claim_loop
            await self._set_asleep(False)
            return False
        due_in, _ = await self._next_due()
        if due_in is not None:
            timeout = max(0.0, min(timeout, due_in))
        if not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        return False

    def _log_idle_wait(self, due_in: float | None, sending: bool) -> None:
        """--until-idle: say what keeps the run going, once per reason (not every poll)."""
        reason = "sending" if sending else "due"
        if reason == getattr(self, "_idle_wait_reason", None):
            return
        self._idle_wait_reason = reason
        if sending:
            log.info("until-idle: waiting for messages in flight on other replicas")
        else:
            log.info(
                "until-idle: waiting for a message due in %.1fs (within --idle-horizon %gs)",
                max(0.0, due_in or 0.0),
                self.options.idle_horizon,
            )

    async def _log_idle_exit(self, due_in: float | None) -> None:
        if due_in is None:
            log.info("until-idle: nothing pending or in flight; exiting")
            return
        count, first = 0, None
        with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
            assert self._pool is not None
            async with self._pool.connection(timeout=10) as conn:
                row = await (await conn.execute(QUERIES["deferred_summary"])).fetchone()
                if row is not None:
                    count, first = int(row[0]), row[1]
        log.info(
            "until-idle: idle; %d message(s) deferred beyond --idle-horizon %gs,"
            " the first due at %s; exiting",
            count,
            self.options.idle_horizon,
            first.isoformat(timespec="seconds") if first is not None else f"+{due_in:.0f}s",
        )

    def _notified(self, payload: str) -> None:
        # an empty payload is for everybody; a dispatcher id only for that one
        if not payload or payload == self.id:
            self._wake.set()

    async def _next_due(self) -> tuple[float | None, bool]:
        assert self._pool is not None
        try:
            async with self._pool.connection(timeout=10) as conn:
                row = await (await conn.execute(QUERIES["next_due"])).fetchone()
        except (psycopg.Error, OSError, TimeoutError):
            return 0.0, True
        if row is None:
            return None, False
        return (float(row[0]) if row[0] is not None else None), bool(row[1])

    @property
    def _sleeper_stale_seconds(self) -> float:
        """A sleeper row older than this is a dispatcher that died asleep; others
        delete it. A live sleeper renews its row three times as often.
        """
        return max(30.0, self.settings.poll_interval * 10)

    async def _set_asleep(self, asleep: bool) -> None:
        if self._pool is None:
            return
        renew = time.monotonic() - self._registered_at > self._sleeper_stale_seconds / 3
        if asleep == self._asleep and not (asleep and renew):
            return
        try:
            # The sleeper row is soft state: visible at commit whether flushed or not,
            # and worthless after a crash, so it does not wait for the WAL flush.
            async with (
                self._pool.connection(timeout=5) as conn,
                conn.pipeline(),
                conn.transaction(),
            ):
                await conn.execute("SET LOCAL synchronous_commit = off")
                if asleep:
                    await conn.execute(
                        QUERIES["register_sleeper"],
                        {
                            "dispatcher_id": self.id,
                            "stale_seconds": self._sleeper_stale_seconds,
                        },
                    )
                else:
                    await conn.execute(QUERIES["unregister_sleeper"], {"dispatcher_id": self.id})
            self._asleep = asleep
            if asleep:
                self._registered_at = time.monotonic()
        except (psycopg.Error, OSError, TimeoutError) as error:
            log.warning("sleeper update failed error=%s", type(error).__name__)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ processing

    async def _send_loop(self) -> None:
        """One sender: take the most urgent queued message, deliver it, repeat.

        Senders are long-lived, so a message costs no task of its own, except one
        whose channel is rate limited: it may wait for its slot, and waits in a
        task so that it holds no sender (and no other channel) back.
        """
        done = 0
        while True:
            if self._stopping.is_set():
                return
            if not self._ready:
                self._ready_event.clear()
                await self._ready_event.wait()
                continue
            _, _, _, message, recipient = heapq.heappop(self._ready)
            if self._in_flight.get(message.id) is not message.lease:
                # another dispatcher has it now, or our own later claim of it is queued
                continue
            if message.channel in self._limited:
                self._spawn(self._deliver(message, recipient))
                continue
            self._sending += 1
            try:
                await self._deliver(message, recipient)
            finally:
                self._sending -= 1
            done += 1
            if done % 32 == 0:  # sends that never suspend must not starve claims and acks
                await asyncio.sleep(0)

    async def _deliver(self, message: Claimed, recipient: RecipientRecord | None) -> None:
        try:
            finish, effects = await self._attempt(message, recipient)
        except Exception as error:  # a bug must not lose the message or stop the loop
            log.exception("unexpected error id=%d", message.id)
            finish = self._failure(message, "internal", f"{type(error).__name__}: {error}", None)
            effects = ()
        self._finish(finish, message, effects)

    async def _attempt(
        self, message: Claimed, recipient: RecipientRecord | None
    ) -> tuple[Finish, tuple[Effect, ...]]:
        lease = message.lease
        if recipient is None:
            return FinishDead(
                lease=lease,
                error_class="unknown_recipient",
                error=f"no outbox.recipient row for user {message.user_id!r}",
            ), ()
        if message.lane == "campaign" and recipient.campaign_opt_out:
            return FinishHandoff(
                lease=lease,
                outcome="skipped",
                error_class="opted_out",
                error="the user opted out of campaigns",
            ), ()
        if message.channel in recipient.disabled_channels:
            follow = next_channel(message.channel, message.fallback, recipient)
            return FinishHandoff(
                lease=lease,
                outcome="skipped",
                error_class="channel_disabled",
                error=f"the user disabled {message.channel}",
                next_channel=follow[0] if follow else None,
                next_fallback=follow[1] if follow else (),
            ), ()
        if message.lane == "campaign":
            now = datetime.now(UTC)
            quiet_until = recipient.quiet_until(now)
            if quiet_until is not None:
                return FinishRequeue(
                    lease=lease,
                    delay=(quiet_until - now).total_seconds(),
                    burn=False,
                    outcome="deferred",
                    error_class="quiet_hours",
                    error=None,
                ), ()
        channel = self.channels.get(message.channel)
        if channel is None:
            return FinishRequeue(
                lease=lease,
                delay=30.0,
                burn=False,
                outcome="deferred",
                error_class="channel_unconfigured",
                error=f"no {message.channel} channel is configured",
            ), ()
        try:
            content = await self.renderer.render_async(
                message.channel,
                message.template,
                message.vars,
                vars_key=message.vars_key,
                message_id=message.id,
                lane=message.lane,
            )
        except (TemplateRenderError, OutboxError) as error:
            return FinishDead(lease=lease, error_class="template", error=str(error)), ()
        envelope = Envelope(
            message_id=message.id,
            lane=message.lane,  # type: ignore[arg-type]
            channel=message.channel,  # type: ignore[arg-type]
            user_id=message.user_id,
            template=message.template,
            attempt=message.attempts + 1,
            recipient=recipient.addresses(),
            content=content,
        )
        assert self._limiter is not None
        reservation = await self._limiter.acquire_for(envelope)
        if not reservation.granted:
            return FinishRequeue(
                lease=lease,
                delay=reservation.wait,
                burn=False,
                outcome="deferred",
                error_class="rate_limit",
                error=None,
            ), ()
        if reservation.slots:
            envelope = replace(envelope, send_slots=reservation.slots)
        started = time.perf_counter()
        async with self._sem:
            timeout = (
                self.options.send_timeout or self.settings.lease_seconds * 0.8
            ) + reservation.spread
            try:
                async with asyncio.timeout(timeout):
                    outcome: Outcome = await channel.send(envelope)
            except TimeoutError:
                outcome = TransientFailure(
                    error_class="timeout", error=f"no answer within {timeout:.0f} s"
                )
            except Exception as error:
                log.exception("channel raised id=%d channel=%s", message.id, message.channel)
                outcome = TransientFailure(
                    error_class="internal", error=f"{type(error).__name__}: {error}"
                )
        duration_ms = (time.perf_counter() - started) * 1000
        if self.observer is not None:
            self.observer.sent(message, outcome, duration_ms)
        return await self._decide(message, recipient, outcome, duration_ms), outcome.effects

    async def _decide(
        self, message: Claimed, recipient: RecipientRecord, outcome: Outcome, duration_ms: float
    ) -> Finish:
        lease = message.lease
        match outcome:
            case Sent():
                assert self._breaker is not None
                await self._breaker.success(message.channel)
                return FinishSent(lease=lease, duration_ms=duration_ms)
            case TransientFailure(error_class=cls, error=err):
                return self._failure(message, cls, err, duration_ms)
            case PermanentFailure(error_class=cls, error=err):
                return FinishDead(lease=lease, error_class=cls, error=err, duration_ms=duration_ms)
            case RateLimited(retry_after=after, error=err):
                return FinishRequeue(
                    lease=lease,
                    delay=max(after, 0.0),
                    burn=False,
                    outcome="deferred",
                    error_class="rate_limited",
                    error=err,
                    duration_ms=duration_ms,
                )
            case Unreachable(error_class=cls, error=err):
                follow = next_channel(message.channel, message.fallback, recipient)
                if follow is None:
                    return FinishDead(
                        lease=lease, error_class=cls, error=err, duration_ms=duration_ms
                    )
                return FinishHandoff(
                    lease=lease,
                    outcome="fallback",
                    error_class=cls,
                    error=err,
                    next_channel=follow[0],
                    next_fallback=follow[1],
                    duration_ms=duration_ms,
                )
            case ChannelOutage(error_class=cls, error=err):
                assert self._breaker is not None
                pause = await self._breaker.trip(message.channel, err)
                log.warning(
                    "channel outage channel=%s pause=%.1fs error_class=%s",
                    message.channel,
                    pause,
                    cls,
                )
                return FinishRequeue(
                    lease=lease,
                    delay=pause,
                    burn=False,
                    outcome="deferred",
                    error_class=cls,
                    error=err,
                    duration_ms=duration_ms,
                )
        raise AssertionError(f"unknown outcome {outcome!r}")

    def _failure(
        self, message: Claimed, error_class: str, error: str, duration_ms: float | None
    ) -> Finish:
        delay = self.policy.next_delay(message.attempts + 1)
        if delay is None:
            return FinishDead(
                lease=message.lease, error_class=error_class, error=error, duration_ms=duration_ms
            )
        return FinishRequeue(
            lease=message.lease,
            delay=delay,
            burn=True,
            outcome="retry",
            error_class=error_class,
            error=error,
            duration_ms=duration_ms,
        )

    # ------------------------------------------------------------------ acknowledging

    def _finish(self, finish: Finish, message: Claimed, effects: Sequence[Effect] = ()) -> None:
        self._acks.finishes.append(finish)
        if effects:
            self._acks.effects.extend((message.user_id, effect) for effect in effects)
        # a delivery is logged in outbox.attempt; the log line is for debugging only
        level = logging.DEBUG if type(finish) is FinishSent else logging.INFO
        if log.isEnabledFor(level):
            log.log(
                level,
                "finish id=%d lease=%s channel=%s outcome=%s%s",
                message.id,
                message.lease.token,
                message.channel,
                _outcome_name(finish),
                f" error_class={finish.error_class}"
                if isinstance(finish, FinishDead | FinishRequeue | FinishHandoff)
                and finish.error_class
                else "",
            )
        self._ack_ready.set()

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_ready.wait()
            if len(self._acks) < self.options.ack_max:
                await asyncio.sleep(self.options.ack_delay)
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        self._ack_ready.clear()
        if not self._acks.finishes:
            return
        batch, self._acks = self._acks, AckBatch()
        self._acking = {finish.lease.id for finish in batch.finishes}
        try:
            result = await self._write_acks(batch)
        finally:
            self._acking = set()
        for finish in batch.finishes:
            # only this lease: the message may have been claimed again meanwhile
            if self._in_flight.get(finish.lease.id) is finish.lease:
                del self._in_flight[finish.lease.id]
        self.delivered += sum(
            1 for f in batch.finishes if isinstance(f, FinishSent) and f.lease.id in result.finished
        )
        if result.lost:
            log.warning("lease lost before ack ids=%s", sorted(result.lost)[:20])
        if self.observer is not None:
            self.observer.acked(batch, result)
        self._capacity.set()
        self._wake.set()

    async def _write_acks(self, batch: AckBatch) -> AckResult:
        """Write a batch; connection trouble is retried (the leases protect the rows),
        a statement the database rejects is split so one bad row cannot block the rest.
        """
        assert self._pool is not None
        delay = 0.1
        while True:
            try:
                async with self._pool.connection(timeout=10) as conn:
                    return await write_batch(conn, batch, dispatcher_id=self.id)
            except (
                psycopg.OperationalError,
                psycopg_pool.PoolTimeout,
                OSError,
                TimeoutError,
            ) as error:
                log.warning(
                    "ack failed count=%d error=%s; retrying", len(batch), type(error).__name__
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except psycopg.Error as error:
                if len(batch) == 1:
                    log.error(
                        "ack rejected id=%d error=%s; the lease will expire",
                        batch.finishes[0].lease.id,
                        error,
                    )
                    ids = frozenset(f.lease.id for f in batch.finishes)
                    return AckResult(finished=frozenset(), lost=ids, fallback_ids=())
                log.error(
                    "ack batch rejected count=%d error=%s; writing one by one", len(batch), error
                )
                return self._merge([await self._write_acks(part) for part in _split(batch)])

    @staticmethod
    def _merge(results: Sequence[AckResult]) -> AckResult:
        return AckResult(
            finished=frozenset().union(*(r.finished for r in results)),
            lost=frozenset().union(*(r.lost for r in results)),
            fallback_ids=tuple(i for r in results for i in r.fallback_ids),
        )

    # ------------------------------------------------------------------ leases

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.lease_seconds / 3
        delay = interval
        while True:
            await asyncio.sleep(delay)
            delay = interval
            # messages being acknowledged are deleted or requeued: nothing to extend
            leases = [lease for lease in self._in_flight.values() if lease.id not in self._acking]
            if not leases or self._pool is None:
                continue
            try:
                async with self._pool.connection(timeout=interval) as conn:
                    cursor = await conn.execute(
                        QUERIES["extend_leases"],
                        {
                            "ids": [lease.id for lease in leases],
                            "tokens": [lease.token for lease in leases],
                            "lease_seconds": self.settings.lease_seconds,
                        },
                    )
                    kept = {row[0] for row in await cursor.fetchall()}
            except (psycopg.Error, OSError, TimeoutError) as error:
                log.warning("heartbeat failed error=%s", type(error).__name__)
                # the leases run out meanwhile: try again soon, not a third of one later
                delay = min(interval, 1.0)
                continue
            # an acknowledgement that finished meanwhile is no lost lease
            lost = [
                lease
                for lease in leases
                if lease.id not in kept
                and self._in_flight.get(lease.id) is lease
                and lease.id not in self._acking
            ]
            if lost:
                log.warning("leases lost ids=%s", [lease.id for lease in lost][:20])
                # no longer ours: a queued copy is dropped unsent by the senders, one
                # being sent is acknowledged in vain, and the heartbeat stops on them
                for lease in lost:
                    del self._in_flight[lease.id]
                self._capacity.set()

    async def _release_all(self) -> None:
        leases = list(self._in_flight.values())
        if not leases or self._pool is None:
            return
        try:
            async with self._pool.connection(timeout=5) as conn:
                await conn.execute(
                    QUERIES["release_leases"],
                    {
                        "ids": [lease.id for lease in leases],
                        "tokens": [lease.token for lease in leases],
                    },
                )
            log.info("released leases count=%d", len(leases))
        except (psycopg.Error, OSError, TimeoutError) as error:
            log.warning(
                "release failed count=%d error=%s (leases will expire)",
                len(leases),
                type(error).__name__,
            )
        self._in_flight.clear()


def _split(batch: AckBatch) -> list[AckBatch]:
    """One batch per finish; the recipient effects travel with the first."""
    parts = [AckBatch(finishes=[finish]) for finish in batch.finishes]
    if parts:
        parts[0].effects.extend(batch.effects)
    return parts


def _outcome_name(finish: Finish) -> str:
    if isinstance(finish, FinishSent):
        return "sent"
    if isinstance(finish, FinishDead):
        return "dead"
    return finish.outcome


def _load_json(data: Any) -> Any:
    """Jsonb from the server is one well-formed value: skip ``json.loads``'s checks."""
    return _json_decode(str(data, "utf-8"))[0]


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    set_json_loads(_load_json, conn)
    await conn.execute("SET statement_timeout = '30s'")
    await conn.execute("SET application_name = 'outbox-dispatcher'")
