from __future__ import annotations

import random

import pytest

from outbox import ConfigurationError
from outbox.dispatcher._retry import RetryPolicy


def test_default_waits_double_from_one_second_and_the_fifth_failure_is_dead() -> None:
    policy = RetryPolicy(jitter=0)
    assert [policy.next_delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, None]


def test_more_attempts_reuse_the_last_delay() -> None:
    policy = RetryPolicy(delays=(1, 2), max_attempts=4, jitter=0)
    assert [policy.next_delay(n) for n in range(1, 5)] == [1, 2, 2, None]


def test_jitter_stays_within_its_bounds() -> None:
    policy = RetryPolicy(jitter=0.2, rng=random.Random(7))
    samples = [policy.next_delay(3) for _ in range(1000)]
    assert all(s is not None and 3.2 <= s <= 4.8 for s in samples)
    assert len(set(samples)) > 900


@pytest.mark.parametrize(
    "kwargs", [{"delays": ()}, {"delays": (-1.0,)}, {"max_attempts": 0}, {"jitter": 1.5}]
)
def test_invalid_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
