"""When to try again: exponential waits with jitter, then the dead-letter state."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from outbox._errors import ConfigurationError
from outbox._settings import Settings


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """Waits ``delays[n-1]`` seconds after the n-th failed attempt, with jitter.

    A message is dead when its ``max_attempts``-th attempt fails: with the defaults
    (1, 2, 4, 8, 16 s and 5 attempts) a message that always fails is tried at about
    0, 1, 3, 7 and 15 seconds and is dead after the fifth try.
    """

    delays: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0)
    max_attempts: int = 5
    jitter: float = 0.1
    """Each wait is scaled by a random factor in [1 - jitter, 1 + jitter]."""
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.delays or any(d < 0 for d in self.delays):
            raise ConfigurationError("retry delays must be non-negative and not empty")
        if self.max_attempts < 1:
            raise ConfigurationError("max_attempts must be at least 1")
        if not 0 <= self.jitter < 1:
            raise ConfigurationError("jitter must be in [0, 1)")

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy of ``OUTBOX_RETRY_DELAYS`` and ``OUTBOX_MAX_ATTEMPTS``."""
        return cls(delays=settings.retry_delays, max_attempts=settings.max_attempts)

    def next_delay(self, failed_attempts: int) -> float | None:
        """Seconds to wait after ``failed_attempts`` failures, or None: dead."""
        if failed_attempts >= self.max_attempts:
            return None
        base = self.delays[min(max(failed_attempts, 1), len(self.delays)) - 1]
        return base * self.rng.uniform(1 - self.jitter, 1 + self.jitter)
