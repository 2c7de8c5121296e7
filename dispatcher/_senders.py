"""The senders: take claimed messages, most urgent first, and deliver each once.

``concurrency`` long-lived tasks share one ``ReadyQueue``. For each message a sender
applies the pre-send rules (``_presend``), renders and addresses it
(``delivery.prepare``), takes its send slots from the cluster-wide rate limiter,
sends under a timeout (``delivery.send``), tells the circuit breaker, and hands
the finish (``_outcomes``) to the acknowledger. A message whose channel is rate
limited may have to wait for its slot: it waits in a task of its own, so that it
holds no sender (and no other channel) back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime

from outbox._errors import OutboxError, TemplateRenderError
from outbox.dispatcher import delivery
from outbox.dispatcher._acknowledger import Acknowledger
from outbox.dispatcher._claimed import Claimed
from outbox.dispatcher._clock import local_now
from outbox.dispatcher._finishes import Finish
from outbox.dispatcher._leases import LeaseBook
from outbox.dispatcher._limits import CircuitBreaker, RateLimiter
from outbox.dispatcher._observer import Observer
from outbox.dispatcher._outcomes import failed, finish_for, rate_limit_wait, unrenderable
from outbox.dispatcher._presend import presend
from outbox.dispatcher._ready import ReadyQueue
from outbox.dispatcher._retry import RetryPolicy
from outbox.dispatcher._routing import RecipientRecord
from outbox.dispatcher.channels.base import Channel, ChannelOutage, Outcome, Recipient, Sent
from outbox.dispatcher.rendering import RenderCache

log = logging.getLogger("outbox.dispatcher")

ADDRESS_BOOK_SIZE = 4096
"""Recipients whose addresses a replica keeps at hand (cleared when full)."""


class SendSlots:
    """At most ``size`` sends at once, for the senders and the sends waiting for a
    rate-limit slot together.

    What an ``asyncio.Semaphore`` does, with a test that costs no coroutine when a
    slot is free (almost always: the senders are as many as the slots).
    """

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    def take_now(self) -> bool:
        """Take a slot if one is free and nobody is waiting for one."""
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        """Wait for a slot (after :meth:`take_now` said no); first come, first served."""
        if self.take_now():
            return
        handed = asyncio.get_running_loop().create_future()
        self._waiting.append(handed)
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self.give()  # handed over just as we were cancelled: pass it on
            raise

    def give(self) -> None:
        """Give a slot back: to the first sender still waiting, else to the pool."""
        while self._waiting:
            handed = self._waiting.popleft()
            if not handed.done():  # a cancelled waiter's future is done
                handed.set_result(None)
                return
        self._free += 1


class Senders:
    """Delivery for one replica; ``run()`` is one sender task (start ``concurrency``)."""

    def __init__(
        self,
        *,
        ready: ReadyQueue,
        leases: LeaseBook,
        acknowledger: Acknowledger,
        channels: Mapping[str, Channel],
        renderer: RenderCache,
        limiter: RateLimiter,
        limited: set[str],
        breaker: CircuitBreaker,
        policy: RetryPolicy,
        observer: Observer,
        concurrency: int,
        send_timeout: float,
        fall_back_lanes: frozenset[str] = frozenset(),
        ack_url: Callable[[int], str | None] | None = None,
        clock: Callable[[], datetime] = local_now,
    ) -> None:
        self._ready = ready
        self._leases = leases
        self._acker = acknowledger
        self.channels = channels
        self.renderer = renderer
        self._limiter = limiter
        self._breaker = breaker
        self.policy = policy
        self.observer = observer
        self._send_timeout = send_timeout
        self._fall_back_lanes = fall_back_lanes
        """Lanes whose messages go to their next channel when they die on one."""
        self._ack_url = ack_url
        self._clock = clock
        """The database's time (``DatabaseClock.now``): expiry and quiet hours."""
        """Signs an alert's acknowledgement link (None: no key configured, no link)."""
        self._slots = SendSlots(concurrency)
        self._stopping = False
        self._sending = 0
        self.waiting: set[asyncio.Task[None]] = set()
        """Sends waiting for a rate-limit slot, each in a task of its own."""
        self._limited = limited
        """Channels with a cluster-wide rate limit (their sends may wait for a slot)."""
        self._address_book: dict[int, tuple[RecipientRecord, Recipient]] = {}

    async def stop(self, grace: float) -> None:
        """Take nothing new; give sends under way up to ``grace`` seconds to finish."""
        self._stopping = True
        self._ready.wake_all()
        deadline = time.monotonic() + grace
        if self.waiting:
            _, pending = await asyncio.wait(set(self.waiting), timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                while self._sending:
                    await asyncio.sleep(0.01)

    async def run(self) -> None:
        """One sender: take the most urgent queued message, deliver it, repeat.

        Senders are long-lived, so a message costs no task of its own, except one
        whose channel is rate limited: it may wait for its slot, and waits in a
        task so that it holds no sender (and no other channel) back.
        """
        done = 0
        deadlines = delivery.SendDeadlines()
        try:
            while not self._stopping:
                entry = self._ready.pop()
                if entry is None:
                    await self._ready.wait()
                    continue
                message, recipient = entry
                if not self._leases.holds(message.lease):
                    continue  # another dispatcher has it now, or our own later claim of it
                if message.channel in self._limited:
                    task = asyncio.create_task(self._deliver(message, recipient))
                    self.waiting.add(task)
                    task.add_done_callback(self.waiting.discard)
                    continue
                self._sending += 1
                try:
                    await self._deliver(message, recipient, deadlines)
                finally:
                    self._sending -= 1
                done += 1
                if done % 32 == 0:  # sends that never suspend must not starve claims and acks
                    await asyncio.sleep(0)
        finally:
            deadlines.close()

    async def _deliver(
        self,
        message: Claimed,
        recipient: RecipientRecord | None,
        deadlines: delivery.SendDeadlines | None = None,
    ) -> None:
        try:
            finish = await self._attempt(message, recipient, deadlines)
        except Exception as error:  # a bug must not lose the message or stop the loop
            log.exception("unexpected error id=%d", message.id)
            error_text = f"{type(error).__name__}: {error}"
            finish = failed(
                message,
                "internal",
                error_text,
                None,
                policy=self.policy,
                recipient=recipient,
                fall_back_lanes=self._fall_back_lanes,
            )
        self._acker.add(finish)

    async def _attempt(
        self,
        message: Claimed,
        recipient: RecipientRecord | None,
        deadlines: delivery.SendDeadlines | None,
    ) -> Finish:
        held_back = presend(message, recipient, now=self._clock(), configured=self.channels)
        if held_back is not None:
            return held_back
        assert recipient is not None  # presend finishes an unknown recipient
        channel = message.channel
        try:
            if message.vars is not None:  # decoded (short) vars render inline: no await
                content = self.renderer.render(
                    channel,
                    message.template,
                    message.vars,
                    vars_key=message.vars_key,
                    message_id=message.id,
                    lane=message.lane,
                    ack_url=self._alert_link(message),
                )
            else:
                content = await self.renderer.render_async(
                    channel,
                    message.template,
                    None,
                    vars_key=message.vars_key,
                    message_id=message.id,
                    lane=message.lane,
                    ack_url=self._alert_link(message),
                )
        except (TemplateRenderError, OutboxError) as error:
            return unrenderable(message, str(error))
        envelope = delivery.address(
            content,
            message_id=message.id,
            lane=message.lane,
            channel=channel,
            user_id=message.user_id,
            template=message.template,
            attempt=message.attempts + 1,
            recipient=self._addresses(recipient),
        )
        timeout = self._send_timeout
        if channel in self._limited:  # no limit, no reservation (and no round trip)
            reservation = await self._limiter.acquire_for(envelope)
            if not reservation.granted:
                return rate_limit_wait(message, reservation.wait)
            if reservation.slots:
                envelope = replace(envelope, send_slots=reservation.slots)
            timeout += reservation.spread
        if not self._slots.take_now():
            await self._slots.take()
        try:
            attempt = await delivery.send(
                self.channels[channel], envelope, timeout=timeout, deadlines=deadlines
            )
        finally:
            self._slots.give()
        outcome = attempt.outcome
        self.observer.sent(message, outcome, attempt.duration_ms)
        if type(outcome) is Sent and self._breaker.settled(channel):
            pause = 0.0  # nothing for the breaker to record: no await
        else:
            pause = await self._update_breaker(channel, outcome)
        return finish_for(
            message,
            recipient,
            outcome,
            attempt.duration_ms,
            policy=self.policy,
            outage_pause=pause,
            fall_back_lanes=self._fall_back_lanes,
        )

    def _addresses(self, recipient: RecipientRecord) -> Recipient:
        """``recipient.addresses()``, made once per record: a claim shares one record
        among a user's messages, and the claim decoder keeps a user's record while
        the row it was read from is unchanged.
        """
        found = self._address_book.get(id(recipient))
        if found is not None and found[0] is recipient:
            return found[1]
        addresses = recipient.addresses()
        if len(self._address_book) >= ADDRESS_BOOK_SIZE:
            self._address_book.clear()
        # the record is kept with its addresses, so its id cannot be reused meanwhile
        self._address_book[id(recipient)] = (recipient, addresses)
        return addresses

    def _alert_link(self, message: Claimed) -> str | None:
        if message.escalate_after is None or self._ack_url is None:
            return None
        return self._ack_url(message.id)

    async def _update_breaker(self, channel: str, outcome: Outcome) -> float:
        """Close the channel's breaker on a delivery, trip it on an outage (for every
        replica); the pause in seconds an outage gets.
        """
        if isinstance(outcome, Sent):
            await self._breaker.success(channel)
        elif isinstance(outcome, ChannelOutage):
            pause = await self._breaker.trip(channel, outcome.error)
            log.warning(
                "channel outage channel=%s pause=%.1fs error_class=%s",
                channel,
                pause,
                outcome.error_class,
            )
            return pause
        return 0.0
