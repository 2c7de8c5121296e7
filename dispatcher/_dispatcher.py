"""The claim loop: lease messages, deliver them, acknowledge in batches.

One ``Dispatcher`` is one replica. Any number run at once against one database;
any of them may be killed at any moment. This module only wires the parts
together (``docs/architecture.md`` draws them):

1. claim a batch with its recipients (``Store.claim``: one short statement, ``FOR
   UPDATE SKIP LOCKED``, a fresh lease token per claim); no transaction stays open
   while a channel sends. The leases go in the ``LeaseBook``, the messages in the
   ``ReadyQueue``;
2. ``concurrency`` sender tasks take the most urgent message, apply the pre-send
   rules (``_presend``), render and send it (``delivery``) within the cluster-wide
   rate limits (a message that must wait for its slot waits in a task of its own,
   so that it holds no sender back), and turn the outcome into a finish
   (``_outcomes``);
3. the ``Acknowledger`` writes finishes in batches, each filtered on its lease token;
4. the ``LeaseBook``'s heartbeat extends the leases of messages still in flight;
5. with nothing to do, sleep on LISTEN (``_wakeup``) or the fallback poll.

On SIGTERM/SIGINT: stop claiming, let in-flight sends finish (up to a grace
period), write their outcomes, give back any lease still held, exit 0.

The transactional lane has a path of its own (``_urgent_claims``): while anything
is in flight, a claim of the transactional lane alone runs every
``urgent_poll_seconds`` into any free slot and ``urgent_reserve`` more that the
regular claim never fills, and while it drains a backlog the regular claim takes
the campaign's part only.
Under a campaign no dispatcher sleeps, so a stop-loss alert's commit wakes nobody;
without this path it waited for a batch of campaign acknowledgements to free room
for the next regular claim, and then rode in it with a batch of campaign rows
whose claim grows slower as the campaign drains (``bench/RESULTS.md``, "flood").

Durability: a claim commits with the WAL flush before anything of it is sent. It
used to commit without (``synchronous_commit`` off, a flush less on the pickup
path): a claim lost in a PostgreSQL crash then put messages its dispatcher had
already sent back to pending, and ``outbox.cancel`` withdrew such a message and
answered true, a cancel that was not one (the chaos test caught it: the send
happened 0.1 s after the crash, under a claim the crash had lost). The sleeper
row still skips the flush: it is soft state, worthless after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outbox._settings import Settings
from outbox._templates import TemplateCatalog
from outbox.dispatcher._acknowledger import Acknowledger
from outbox.dispatcher._claimed import ClaimDecoder
from outbox.dispatcher._clock import DatabaseClock
from outbox.dispatcher._finishes import AckBatch, AckResult, FinishSent
from outbox.dispatcher._leases import LeaseBook
from outbox.dispatcher._limits import CircuitBreaker, RateLimiter
from outbox.dispatcher._observer import NoObserver, Observer
from outbox.dispatcher._outcomes import fall_back_lanes
from outbox.dispatcher._ready import ReadyQueue
from outbox.dispatcher._retry import RetryPolicy
from outbox.dispatcher._senders import Senders
from outbox.dispatcher._store import ClaimScope, Store, StoreError
from outbox.dispatcher._until_idle import UntilIdle
from outbox.dispatcher._wakeup import Sleeper, Wakeup
from outbox.dispatcher.channels.base import Channel
from outbox.dispatcher.rendering import RenderCache

log = logging.getLogger("outbox.dispatcher")

SHUTDOWN_DATABASE_SECONDS = 10.0
"""At shutdown, how long writing the last outcomes, giving leases back and leaving
``outbox.sleeper`` may take together. A database that does not answer meanwhile
(gone silent, restarting) must not keep the process past its orchestrator's grace
period into a SIGKILL: what is not written by then is left to the leases, which
expire, and the messages are sent again (at least once, as after a crash)."""

UNCLAIMABLE_RETRY_SECONDS = 0.05
"""How soon to claim again when a due message was not claimable and no channel is
paused (another replica's claim held it): its lease is being written right now."""


def default_dispatcher_id() -> str:
    """``host:pid:random``, unique per process start."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


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
    within this many seconds (see ``_until_idle``)."""
    ack_delay: float = 0.005
    ack_max: int = 500
    shutdown_grace: float = 10.0
    send_timeout: float | None = None
    urgent_reserve: int = 25
    """In-flight slots beyond ``max_in_flight`` that only the urgent claim (the
    transactional lane, see ``_urgent_claims``) fills; 0 turns the urgent claim off
    (the regular claim then takes every lane, as before it existed)."""
    urgent_poll_seconds: float = 0.01
    """While anything is in flight, the urgent claim runs this often."""


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
        observer: Observer | None = None,
    ) -> None:
        self.settings = settings
        self.channels = dict(channels)
        self.options = options = options or DispatcherOptions()
        self.catalog = catalog or TemplateCatalog(settings.templates_dir)
        self.policy = policy or RetryPolicy.from_settings(settings)
        self.renderer = RenderCache(
            self.catalog,
            platform_base_url=settings.platform_base_url,
            sms_max_segments=settings.sms_max_segments,
        )
        self.id = dispatcher_id or settings.dispatcher_id or default_dispatcher_id()
        self.observer: Observer = observer if observer is not None else NoObserver()
        self.delivered = 0
        self._store = Store(settings, dispatcher_id=self.id)
        self._capacity = asyncio.Event()
        self._leases = LeaseBook(
            self._store, lease_seconds=settings.lease_seconds, on_room=self._capacity.set
        )
        self._acker = Acknowledger(
            self._store,
            self._leases,
            delay=options.ack_delay,
            max_size=options.ack_max,
            on_flushed=self._flushed,
        )
        self._ready = ReadyQueue()
        self._decoder = ClaimDecoder()
        limits = settings.rate_limits
        limited: set[str] = {c for c in limits if c != "telegram_chat"}
        if "telegram_chat" in limits:
            limited.add("telegram")
        self._clock = DatabaseClock()
        self._senders = Senders(
            ready=self._ready,
            leases=self._leases,
            acknowledger=self._acker,
            channels=self.channels,
            renderer=self.renderer,
            limiter=RateLimiter(self._store.pool, limits),
            limited=limited,
            breaker=CircuitBreaker(self._store.pool),
            policy=self.policy,
            observer=self.observer,
            concurrency=options.concurrency,
            send_timeout=options.send_timeout or settings.lease_seconds * 0.8,
            fall_back_lanes=fall_back_lanes(settings.fallback_on_failure),
            ack_url=settings.ack_url,
            clock=self._clock.now,
        )
        self._sleeper = Sleeper(self._store, poll_interval=settings.poll_interval)
        self._until_idle = UntilIdle(self._store, horizon=options.idle_horizon)
        self._wakeup: Wakeup | None = None
        self._stopping = asyncio.Event()
        # set by a claim that leased anything: the urgent claim polls only while busy
        self._busy = asyncio.Event()
        # the urgent claim's last batch was full: more is waiting than it takes
        self._transactional_backlog = False
        # ends an idle wait: a NOTIFY, a listener reconnect, an acknowledgement flush
        # (it may have moved messages to their next channel, due now, which sends no
        # NOTIFY) or stop()
        self._wake = asyncio.Event()

    @property
    def in_flight(self) -> frozenset[int]:
        """Ids of the messages this replica leases now (claimed, not yet finished)."""
        return self._leases.ids()

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        """Ask the loop to stop claiming and shut down gracefully."""
        self._stopping.set()
        self._capacity.set()
        self._wake.set()
        self._busy.set()

    async def run(self) -> None:
        """Dispatch until stopped (or, with ``until_idle``, until nothing is left)."""
        await self._store.open()
        # not reachable yet: the claim loop waits for it; measured again later
        with contextlib.suppress(StoreError):
            await self._clock.sync(self._store.database_now)
        clock = asyncio.create_task(
            self._clock.keep_synced(self._store.database_now, (StoreError,)), name="outbox-clock"
        )
        if self.settings.listen:
            # LISTEN needs a session: behind PgBouncer in transaction mode, a direct URL
            listen_url = self.settings.listen_database_url or self.settings.database_url
            self._wakeup = Wakeup(listen_url, on_wake=self._notified)
            await self._wakeup.start()
        acker = asyncio.create_task(self._acker.run(), name="outbox-acks")
        heartbeat = asyncio.create_task(self._leases.heartbeat(), name="outbox-heartbeat")
        senders = [
            asyncio.create_task(self._senders.run(), name=f"outbox-sender-{n}")
            for n in range(self.options.concurrency)
        ]
        log.info(
            "dispatcher started id=%s concurrency=%d batch=%d",
            self.id,
            self.options.concurrency,
            self.options.batch_size,
        )
        if self.settings.ack_signing_key() is None:
            log.warning(
                "no OUTBOX_ACK_SECRET or OUTBOX_API_JWT_SECRET: alerts (escalate_after)"
                " are sent without an acknowledgement link"
            )
        urgent = (
            asyncio.create_task(self._urgent_claims(), name="outbox-urgent-claims")
            if self._urgent_on
            else None
        )
        try:
            await self._claim_loop()
        finally:
            if urgent is not None:
                # not cancelled: a claim under way finishes and its leases are held,
                # so that the shutdown gives them back
                self.stop()
                try:
                    await asyncio.wait_for(urgent, timeout=15.0)
                except (TimeoutError, asyncio.CancelledError):
                    pass
                except Exception:  # the shutdown must run whatever ended the task
                    log.exception("urgent claims failed")
            clock.cancel()
            await self._shutdown(acker, heartbeat, senders)

    async def _shutdown(
        self, acker: asyncio.Task[None], heartbeat: asyncio.Task[None], senders: list[Any]
    ) -> None:
        await self._senders.stop(self.options.shutdown_grace)
        for task in senders:
            task.cancel()
        await asyncio.gather(*senders, return_exceptions=True)
        self._ready.clear()
        deadline = asyncio.get_running_loop().time() + SHUTDOWN_DATABASE_SECONDS
        try:
            async with asyncio.timeout_at(deadline):
                await self._acker.flush()
        except TimeoutError:
            log.warning(
                "shutdown: outcomes not written within %gs; their leases expire and the"
                " messages are sent again",
                SHUTDOWN_DATABASE_SECONDS,
            )
        acker.cancel()
        heartbeat.cancel()
        await asyncio.gather(acker, heartbeat, return_exceptions=True)
        try:
            async with asyncio.timeout_at(max(deadline, asyncio.get_running_loop().time() + 1)):
                await self._leases.release_all()
                await self._sleeper.set(False)
        except TimeoutError:
            log.warning("shutdown: leases not given back in time; they expire")
        if self._wakeup is not None:
            await self._wakeup.close()
        for name, channel in self.channels.items():
            try:
                await channel.aclose()
            except Exception:  # closing must not hide the shutdown
                log.exception("channel close failed channel=%s", name)
        await self._store.close()
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
        draining = False
        while not self._stopping.is_set():
            room = self._max_in_flight - len(self._leases)
            if room < min(self.options.batch_size, self._max_in_flight // 2):
                self._capacity.clear()
                await self._capacity.wait()
                continue
            # draining a backlog (the last claim was a full batch), the urgent claim
            # takes the transactional lane (see _urgent_claims); otherwise, as after a
            # NOTIFY woke us, this claim takes every lane: waiting for the next poll
            # would lengthen the wake-one path. So does it while the urgent claim
            # finds more than it takes: a transactional backlog goes first, in
            # priority order, as the claim always sent it
            limit = min(room, self.options.batch_size)
            campaign_only = self._urgent_on and draining and not self._transactional_backlog
            scope: ClaimScope = "campaign" if campaign_only else "all"
            claimed = await self._claim(limit, scope=scope)
            draining = claimed == limit
            if claimed is None:  # database unreachable: back off, keep trying
                await self._sleep(1.0)
            elif claimed:
                if self._sleeper.asleep:
                    # the senders first: this round trip is for producers' sake only
                    await asyncio.sleep(0)
                    await self._sleeper.set(False)
                if not draining and self.settings.linger > 0:
                    # Some arrived, fewer than a batch: producers are committing now.
                    # Asleep on LISTEN, each of their commits would NOTIFY us (NOTIFY
                    # serializes commits on one lock) and each claim would take a
                    # few; a moment's wait takes what arrives meanwhile as one batch.
                    await self._sleep(self.settings.linger)
            elif await self._idle():
                return

    async def _urgent_claims(self) -> None:
        """Claim the transactional lane on its own, into free and reserved slots.

        Runs every ``urgent_poll_seconds`` while anything is in flight, whether or
        not the regular claim loop is waiting for room: under load nobody sleeps on
        LISTEN, so no NOTIFY tells us an alert was committed, and the regular claim
        runs only once a batch of slots is free. While the regular claim drains a
        backlog (it found a full batch last time) it takes the campaign's part
        only: a transactional message claimed with a batch of
        campaign rows waited for that statement (slower the more a campaign has
        drained while vacuum is behind) and for its batch to be decoded. This claim
        is bounded to the transactional priorities, so its index range stops before
        the campaign's part of ``message_claim_idx``. It may fill any free slot and
        ``urgent_reserve`` more, and claims again at once while it finds a full
        batch, so a transactional backlog drains at the regular pace. A cheap
        question (``urgent_due``) comes first: most polls find nothing. Idle, it
        does not poll: a producer's NOTIFY wakes one sleeping dispatcher, whose
        claim (``_idle``) takes every lane and starts the polling. Each claim is
        fenced by its own lease token like any other.
        """
        full = False
        while not self._stopping.is_set():
            if not len(self._leases):
                self._busy.clear()
                await self._busy.wait()
                continue
            if not full:
                # a plain sleep: _sleep's wait_for needs one more turn of a saturated
                # event loop to wake (cancelling its inner wait), each a few ms here;
                # stop() is noticed below and by the busy wait
                await asyncio.sleep(self.options.urgent_poll_seconds)
            full = False
            room = self._max_in_flight + self.options.urgent_reserve - len(self._leases)
            if self._stopping.is_set() or not len(self._leases) or room <= 0:
                continue
            try:
                # a third of an empty claim's cost, on both sides: ask before claiming
                if not await self._store.urgent_due():
                    self._transactional_backlog = False
                    continue
            except StoreError:
                await self._sleep(1.0)  # database unreachable: the claim loop logs it
                continue
            limit = min(room, self.options.batch_size)
            claimed = await self._claim(limit, scope="transactional")
            if claimed is None:
                await self._sleep(1.0)
            full = claimed == limit
            self._transactional_backlog = full

    @property
    def _urgent_on(self) -> bool:
        return self.options.urgent_reserve > 0

    async def _claim(self, limit: int, *, scope: ClaimScope = "all") -> int | None:
        """Lease a batch and queue it for the senders; how many, or None (no database)."""
        token = uuid.uuid4()
        try:
            rows = await self._store.claim(limit, token, scope=scope)
        except StoreError as error:
            log.warning("claim failed scope=%s error=%s", scope, error)
            return None
        for message, recipient in self._decoder.decode(rows, token):
            self._leases.hold(message.lease)
            self._ready.push(message, recipient)
        if rows:
            self._busy.set()
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "claimed count=%d ids=%s..%s scope=%s",
                    len(rows),
                    rows[0][0],
                    rows[-1][0],
                    scope,
                )
        return len(rows)

    async def _idle(self) -> bool:
        """Nothing was due. Sleep until woken; return True to exit (until-idle)."""
        timeout = self.settings.poll_interval
        if self.options.until_idle and not len(self._leases) and not self._senders.waiting:
            cap = await self._until_idle.wait_cap()
            if cap is None:
                return True
            timeout = min(timeout, cap)
        if self._wakeup is None:
            await self._sleep(min(timeout, 0.05) if len(self._leases) else timeout)
            return False
        # Notifications, reconnects and acknowledgements from now on end the wait
        # (earlier ones are covered by the claim below). Our own acknowledgements
        # may have moved messages to their next channel (fallbacks), due now, which
        # sends no NOTIFY. Escalations fall due without any NOTIFY: the poll finds them.
        self._wake.clear()
        await self._sleeper.set(self._wakeup.connected)
        # claim once more: a message committed before we registered sent no NOTIFY
        if await self._claim(self.options.batch_size):
            await asyncio.sleep(0)  # the senders first, as in _claim_loop
            await self._sleeper.set(False)
            return False
        try:
            due_in, _ = await self._store.next_due()
            if due_in is not None and due_in <= 0:
                due_in = await self._unclaimable_for()
        except StoreError:
            due_in = UNCLAIMABLE_RETRY_SECONDS
        if due_in is not None:
            timeout = max(0.0, min(timeout, due_in))
        if not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
        return False

    async def _unclaimable_for(self) -> float:
        """A message is due, yet the claim just found none: it is on a paused channel
        (an open breaker) or leased by another replica's claim under way. How long to
        wait before claiming again: until the first pause ends, else a moment. Without
        this an idle dispatcher would claim in a loop for as long as a breaker is open
        with a backlog behind it (measured: 165 transactions per second, each replica).
        """
        pause_ends = await self._store.pause_ends()
        if pause_ends is None:
            return UNCLAIMABLE_RETRY_SECONDS
        return max(pause_ends, UNCLAIMABLE_RETRY_SECONDS)

    def _notified(self, payload: str) -> None:
        # an empty payload is for everybody; a dispatcher id only for that one
        if not payload or payload == self.id:
            self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    def _flushed(self, batch: AckBatch, result: AckResult) -> None:
        finished = result.finished
        self.delivered += sum(
            1 for f in batch.finishes if type(f) is FinishSent and f.message.lease.id in finished
        )
        self.observer.acked(batch, result)
        self._wake.set()
