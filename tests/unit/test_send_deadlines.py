"""Sends timed by a task's ``SendDeadlines``: the same answers as ``asyncio.timeout``."""

from __future__ import annotations

import asyncio
import time

import pytest

from outbox.dispatcher import delivery
from outbox.dispatcher.channels.base import (
    Envelope,
    Outcome,
    Recipient,
    RenderedInApp,
    Sent,
    TransientFailure,
)


class Channel:
    """Answers after ``delays[n]`` seconds for the n-th send (None: never)."""

    name = "inapp"

    def __init__(self, *delays: float | None, swallow_cancel: bool = False) -> None:
        self.delays = list(delays)
        self.swallow_cancel = swallow_cancel
        self.cancelled = 0

    async def send(self, envelope: Envelope) -> Outcome:
        delay = self.delays.pop(0)
        try:
            await asyncio.sleep(3600 if delay is None else delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            if not self.swallow_cancel:
                raise
        return Sent()

    async def aclose(self) -> None:
        return None


def envelope(message_id: int = 1) -> Envelope:
    return Envelope(
        message_id=message_id,
        lane="transactional",
        channel="inapp",
        user_id="u1",
        template="price_alert",
        attempt=1,
        recipient=Recipient(user_id="u1"),
        content=RenderedInApp(title="t", body="b"),
    )


async def test_sends_in_turn_each_get_their_own_deadline() -> None:
    channel = Channel(0.0, 0.05, None, 0.0)
    deadlines = delivery.SendDeadlines()
    answers = []
    started = time.monotonic()
    for number in range(4):
        attempt = await delivery.send(channel, envelope(number), timeout=0.2, deadlines=deadlines)
        answers.append(attempt.outcome)
    took = time.monotonic() - started
    deadlines.close()
    assert [type(a) for a in answers] == [Sent, Sent, TransientFailure, Sent]
    assert isinstance(answers[2], TransientFailure) and answers[2].error_class == "timeout"
    assert channel.cancelled == 1
    assert 0.2 <= took < 1.0, took
    # the task is not left cancelling: it goes on awaiting normally
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0.01)


async def test_a_deadline_shorter_than_the_armed_one_is_kept() -> None:
    deadlines = delivery.SendDeadlines()
    first = await delivery.send(Channel(0.0), envelope(), timeout=60, deadlines=deadlines)
    started = time.monotonic()
    second = await delivery.send(Channel(None), envelope(), timeout=0.1, deadlines=deadlines)
    deadlines.close()
    assert isinstance(first.outcome, Sent)
    assert isinstance(second.outcome, TransientFailure)
    assert time.monotonic() - started < 1.0


async def test_a_cancel_from_elsewhere_is_not_turned_into_a_timeout() -> None:
    async def sender() -> delivery.Attempt:
        deadlines = delivery.SendDeadlines()
        try:
            return await delivery.send(Channel(None), envelope(), timeout=60, deadlines=deadlines)
        finally:
            deadlines.close()

    task = asyncio.create_task(sender())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_send_deadlines_belong_to_a_task() -> None:
    with pytest.raises(RuntimeError):  # no running loop, so no task
        delivery.SendDeadlines()


async def test_a_channel_that_swallows_the_cancel_leaves_its_task_usable() -> None:
    channel = Channel(None, swallow_cancel=True)
    deadlines = delivery.SendDeadlines()
    attempt = await delivery.send(channel, envelope(), timeout=0.05, deadlines=deadlines)
    deadlines.close()
    assert isinstance(attempt.outcome, Sent)  # what the channel answered, however late
    assert channel.cancelled == 1
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
    await asyncio.sleep(0.01)  # not cancelled again
