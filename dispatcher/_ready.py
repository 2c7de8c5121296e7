"""Claimed messages waiting for a sender, most urgent first (lowest priority number)."""

from __future__ import annotations

import asyncio
import heapq
import itertools

from outbox.dispatcher._claimed import Claimed
from outbox.dispatcher._routing import RecipientRecord


class ReadyQueue:
    """A priority heap the sender tasks wait on.

    Entries are ``(priority, id, sequence, message, recipient)``: the sequence keeps
    two entries of one message apart (our own lease expired during an outage and
    our next claim took the message again), so the heap never compares messages.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, int, Claimed, RecipientRecord | None]] = []
        self._sequence = itertools.count()
        self._event = asyncio.Event()

    def push(self, message: Claimed, recipient: RecipientRecord | None) -> None:
        heapq.heappush(
            self._heap, (message.priority, message.id, next(self._sequence), message, recipient)
        )
        self._event.set()

    def pop(self) -> tuple[Claimed, RecipientRecord | None] | None:
        """The most urgent entry, or None when the queue is empty."""
        if not self._heap:
            self._event.clear()
            return None
        _, _, _, message, recipient = heapq.heappop(self._heap)
        return message, recipient

    async def wait(self) -> None:
        """Until something is pushed (or :meth:`wake_all`)."""
        await self._event.wait()

    def wake_all(self) -> None:
        """Let every waiting sender look again (at shutdown)."""
        self._event.set()

    def clear(self) -> None:
        self._heap.clear()
