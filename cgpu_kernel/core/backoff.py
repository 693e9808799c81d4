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


#: A connection that dies sooner than this after opening counts as a failed attempt: a server
#: (or a proxy in front of it) that accepts the WebSocket and closes it at once is failing, and
#: every such "success" must not restart the schedule.
HEALTHY_AFTER = 5.0


class FailureStreak:
    """Reconnection across outages: the schedule and the budget go on while connections keep
    dying young, and start afresh only after one that lived.

    ``proxy.reconnect.Reconnector`` is made per outage; the supervisor keeps one streak for the
    proxy's life and every reconnector reports to it. Times are the caller's clock (seconds);
    nothing here reads one.
    """

    def __init__(
        self,
        backoff: Backoff = Backoff(),  # frozen, shared safely
        *,
        healthy_after: float = HEALTHY_AFTER,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.backoff = backoff
        self.healthy_after = healthy_after
        self._uniform = uniform
        self._delays = backoff.delays(uniform)
        #: when the current streak of failures began (its budget counts from here); None
        #: while the last connection was healthy
        self.started: float | None = None
        #: connections that died young in this streak, and how the last one ended
        self.short_lived = 0
        self.last_close: str | None = None

    def lost(self, opened_at: float | None, now: float, how: str) -> float:
        """A connection opened at ``opened_at`` ended at ``now`` (``how``: its close reason).
        The wait before the first attempt: none after a healthy connection (a blip heals
        fast), the schedule's next delay after one that died young."""
        if opened_at is not None and now - opened_at >= self.healthy_after:
            self.reset()
            self.started = now
            return 0.0
        self.short_lived += 1
        self.last_close = how
        if self.started is None:
            self.started = opened_at if opened_at is not None else now
        return self.next_delay()

    def next_delay(self) -> float:
        """The wait before the next attempt (a failed one, or a connection that died young)."""
        return next(self._delays)

    def deadline(self, budget: float, now: float) -> float:
        """When the attempts give up: ``budget`` seconds after the streak began."""
        if self.started is None:
            self.started = now
        return self.started + budget

    def gave_up(self) -> None:
        """The budget is spent and the user told; a retry (their next cell) gets a fresh budget,
        but the delays stay where they are until a connection proves healthy."""
        self.started = None
        self.short_lived = 0

    def reset(self) -> None:
        """A healthy connection: the next outage starts from the first, short delay."""
        self._delays = self.backoff.delays(self._uniform)
        self.started = None
        self.short_lived = 0
        self.last_close = None
