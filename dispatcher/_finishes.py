"""How a delivery ends, as the acknowledger writes it: one ``Finish`` per claimed message.

A finish carries its message (and so its lease, whose token fences the write) and
the recipient side effects its outcome reported. Which finish an outcome becomes is
decided in ``_presend`` (before a send) and ``_outcomes`` (after one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from outbox.dispatcher._claimed import Claimed, Lease
from outbox.dispatcher.channels.base import Effect


@dataclass(frozen=True, kw_only=True)
class _Finish:
    message: Claimed
    duration_ms: float | None = None
    """The provider call's duration; None when no call was made in this lease."""
    effects: tuple[Effect, ...] = ()
    """Recipient updates written with the finish (a blocked bot, a bounced address)."""

    @property
    def lease(self) -> Lease:
        return self.message.lease


@dataclass(frozen=True, kw_only=True)
class FinishSent(_Finish):
    """Delivered: delete the row, log ``sent``.

    An alert (``escalate_after``) keeps its row instead: it waits for the
    acknowledgement (``awaiting_ack``) on the channel it was sent on, its chain now
    starting with ``next_channel``, which the claim of its escalation moves it to
    ``ack_wait`` seconds from now; with no next channel it waits without a deadline.
    """

    duration_ms: float
    ack_wait: float | None = None
    next_channel: str | None = None
    next_fallback: tuple[str, ...] = ()
    provider_id: str | None = None
    """The provider's id of the message, logged with ``sent``: delivery reports
    (webhooks) find the message by it."""

    @property
    def awaits_ack(self) -> bool:
        return self.ack_wait is not None

    @property
    def name(self) -> str:
        return "sent"


@dataclass(frozen=True, kw_only=True)
class FinishRequeue(_Finish):
    """Back to pending after ``delay`` seconds.

    ``retry`` is a failed attempt and counts against the retry policy; ``deferred``
    (rate limit, quiet hours, outage, no channel configured) did not try to deliver
    and counts nothing.
    """

    delay: float
    outcome: Literal["retry", "deferred"]
    error_class: str | None
    error: str | None

    @property
    def burns_attempt(self) -> bool:
        return self.outcome == "retry"

    @property
    def name(self) -> str:
        return self.outcome


@dataclass(frozen=True, kw_only=True)
class FinishDead(_Finish):
    """A dead letter."""

    error_class: str
    error: str

    @property
    def name(self) -> str:
        return "dead"


@dataclass(frozen=True, kw_only=True)
class FinishHandoff(_Finish):
    """``fallback`` or ``skipped`` to ``next_channel``: the message moves there in
    place (same id, ``next_fallback`` its remaining chain); without a next channel
    (``skipped`` at the chain's end, ``expired``) the row is deleted.
    """

    outcome: Literal["fallback", "skipped", "expired"]
    error_class: str | None
    error: str | None
    next_channel: str | None = None
    next_fallback: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.outcome


Finish = FinishSent | FinishRequeue | FinishDead | FinishHandoff


@dataclass(kw_only=True)
class AckBatch:
    """Finishes waiting to be written together."""

    finishes: list[Finish] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.finishes)


@dataclass(frozen=True, kw_only=True)
class AckResult:
    """What a flush wrote: ids finished, ids whose lease was lost, ids moved to their
    next channel.
    """

    finished: frozenset[int]
    lost: frozenset[int]
    fallback_ids: tuple[int, ...] = ()

    @staticmethod
    def merge(results: list[AckResult]) -> AckResult:
        return AckResult(
            finished=frozenset().union(*(r.finished for r in results)),
            lost=frozenset().union(*(r.lost for r in results)),
            fallback_ids=tuple(i for r in results for i in r.fallback_ids),
        )
