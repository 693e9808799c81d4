"""The reconnection schedule (``core.backoff``): first delay, doubling, cap, jitter."""

from __future__ import annotations

import itertools

import pytest

from cgpu_kernel.core.backoff import Backoff


def test_delays_double_from_the_first_up_to_the_cap_without_jitter() -> None:
    delays = Backoff(first=0.1, cap=1.0).delays(lambda low, high: low)
    assert [round(d, 6) for d in itertools.islice(delays, 6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


def test_jitter_adds_at_most_its_fraction_of_each_delay() -> None:
    drawn: list[tuple[float, float]] = []

    def top(low: float, high: float) -> float:
        drawn.append((low, high))
        return high

    delays = list(itertools.islice(Backoff(first=1.0, cap=4.0, jitter=0.5).delays(top), 4))
    assert delays == [1.5, 3.0, 6.0, 6.0]
    assert drawn == [(0, 0.5), (0, 1.0), (0, 2.0), (0, 2.0)]


def test_the_default_schedule_stays_within_its_bounds() -> None:
    backoff = Backoff()
    bases = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    for delay, base in zip(itertools.islice(backoff.delays(), len(bases)), bases, strict=True):
        assert base <= delay <= base * (1 + backoff.jitter)


@pytest.mark.parametrize(("first", "cap", "jitter"), [(0, 1, 0.5), (2, 1, 0.5), (1, 2, -1)])
def test_an_unusable_schedule_is_refused(first: float, cap: float, jitter: float) -> None:
    with pytest.raises(ValueError, match="not a usable backoff schedule"):
        Backoff(first=first, cap=cap, jitter=jitter)
