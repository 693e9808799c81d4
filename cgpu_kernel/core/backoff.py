"""The reconnection schedule: how long to wait before each next attempt. Pure arithmetic.

``proxy.reconnect.Reconnector`` sleeps ``next(delays)`` between attempts (never past its time
budget). Exponential with jitter: the first retry comes fast (a blip heals in a fraction of a
second), later ones spread out to at most ``cap`` so a server coming back is not hammered, and
the random part keeps many kernels that lost the same server from retrying in step.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

FIRST_DELAY = 0.1
MAX_DELAY = 10.0
JITTER = 0.5  # up to this fraction of the delay is added at random


@dataclass(frozen=True)
class Backoff:
    """Delays of ``first``, doubling to ``cap``, each plus up to ``jitter`` of itself at random."""

    first: float = FIRST_DELAY
    cap: float = MAX_DELAY
    jitter: float = JITTER

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap or self.jitter < 0:
            raise ValueError(f"not a usable backoff schedule: {self}")

    def delays(self, uniform: Callable[[float, float], float] = random.uniform) -> Iterator[float]:
        """The waits before attempt 2, 3, ... (endless). ``uniform(a, b)`` draws the jitter;
        tests pass a fixed one."""
        delay = self.first
        while True:
            yield delay + uniform(0, delay * self.jitter)
            delay = min(delay * 2, self.cap)
