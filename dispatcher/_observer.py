"""What the dispatcher reports as it works: the seam the metrics hang on.

:class:`outbox.dispatcher.metrics.DispatcherMetrics` implements it; tests pass
their own. An observer is called on the event loop and must not block; it gets
the finishes themselves, so it needs no map of its own of what is in flight.
"""

from __future__ import annotations

from typing import Protocol

from outbox.dispatcher._claimed import Claimed
from outbox.dispatcher._finishes import AckBatch, AckResult
from outbox.dispatcher.channels.base import Outcome


class Observer(Protocol):
    """Hooks of one dispatcher replica."""

    def sent(self, message: Claimed, outcome: Outcome, duration_ms: float) -> None:
        """A provider call answered ``outcome`` after ``duration_ms``."""

    def acked(self, batch: AckBatch, result: AckResult) -> None:
        """A batch of finishes was written; ``result`` says which held their lease."""


class NoObserver:
    """The default: nobody listens."""

    def sent(self, message: Claimed, outcome: Outcome, duration_ms: float) -> None:
        pass

    def acked(self, batch: AckBatch, result: AckResult) -> None:
        pass
