"""Reconnection attempts: from a dropped connection to a working one, or to a verdict.

``supervisor`` decides *when* to reconnect and what an outage means for the cells; this module
is the attempt loop. Before each attempt it asks the backend about the kernel (alive, gone,
credentials refused, no answer), so a dead kernel is reported at once and an expired credential
is never taken for a dead kernel. Attempts back off exponentially with jitter (``core.backoff``:
0.1 s doubling to 10 s) within a time budget. A stalled socket that comes back to life is
preferred to a new one: TCP rides out short outages by itself, and not switching sockets is
not losing anything.

The schedule and the budget carry across outages (``core.backoff.FailureStreak``, one per
supervisor): a connection that dies within a few seconds of opening (a server, or a proxy in
front of it, that accepts the WebSocket and closes it at once) counts as a failed attempt, so
the next outage starts with the next delay, not the first, and the budget keeps counting from
the first failure. Without that, each such "successful" attempt restarted the schedule: a
reconnect storm of thousands of connections a minute, both cores busy, no error ever shown.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from cgpu_kernel.backends.base import Backend, KernelHealth
from cgpu_kernel.core.backoff import Backoff, FailureStreak
from cgpu_kernel.exceptions import (
    CgpuError,
    ReconnectBudgetError,
    RemoteAuthError,
    RemoteKernelGoneError,
)
from cgpu_kernel.proxy.connection import RemoteChannels

log = logging.getLogger("cgpu_kernel")


class Reconnector:
    """One reconnection, attempt after attempt; the supervisor makes one per outage.

    ``auth_hint`` ends the error for credentials the server stopped accepting: what to renew
    is the caller's knowledge (which variable, which file), not this loop's. ``streak`` is the
    supervisor's, shared by every outage (a fresh one when none is given: each outage alone).
    """

    def __init__(
        self,
        backend: Backend,
        *,
        open_remote: Callable[[], Awaitable[RemoteChannels]],
        still_wanted: Callable[[], bool],
        ping_interval: float,
        budget: float,
        auth_hint: str = "Renew the credentials and run the cell again.",
        backoff: Backoff = Backoff(),  # noqa: B008 - frozen, shared safely
        streak: FailureStreak | None = None,
    ) -> None:
        self.backend = backend
        self.open_remote = open_remote
        self.still_wanted = still_wanted
        self.ping_interval = ping_interval
        self.budget = budget
        self.auth_hint = auth_hint
        self.backoff = backoff
        self.streak = streak if streak is not None else FailureStreak(backoff)
        #: the server's last answer about the kernel (None before the first), for notices
        self.last_health: KernelHealth | None = None

    async def run(
        self,
        deadline: float,
        stalled: RemoteChannels | None,
        lost: RemoteChannels | None = None,
    ) -> RemoteChannels | CgpuError | None:
        """A working connection (a new one, or ``stalled`` revived), the error that ends the
        attempts (kernel gone, credentials refused, budget spent), or None when the proxy no
        longer wants one (it is stopping, or the remote was declared lost meanwhile).

        ``lost`` is the connection whose end began this outage: one that died young makes the
        first attempt wait the streak's next delay. The attempts end at ``deadline`` or at the
        streak's, whichever is sooner. (``loop.time()`` and the connection's ``opened_at`` are
        both ``time.monotonic()``.)
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        streak = self.streak
        attempt = 0
        if lost is not None:
            how = lost.close_reason.rstrip(", ")  # "code 1011, " when the reason is empty
            wait = streak.lost(lost.opened_at, time.monotonic(), how)
            if wait > 0:
                log.log(
                    logging.WARNING if streak.short_lived > 1 else logging.INFO,
                    "%s closed %d connection(s) in a row soon after opening (last: %s);"
                    " waiting %.1f s before the next attempt",
                    self.backend.description,
                    streak.short_lived,
                    how,
                    wait,
                )
                deadline = min(deadline, streak.deadline(self.budget, started))
                await asyncio.sleep(max(0.0, min(wait, deadline - loop.time())))
        deadline = min(deadline, streak.deadline(self.budget, started))
        while self.still_wanted() and loop.time() < deadline:
            attempt += 1
            health = self.last_health = await self.backend.kernel_health()
            if not self.still_wanted():
                return None
            if await self._revived(stalled):
                return stalled
            if health is KernelHealth.AUTH_EXPIRED and not await self.backend.reauthenticate():
                return RemoteAuthError(
                    f"The server stopped accepting our credentials for"
                    f" {self.backend.description}. {self.auth_hint}"
                )
            if health is KernelHealth.GONE:
                return RemoteKernelGoneError(
                    f"{self.backend.description} is gone (deleted, died, or its server"
                    " restarted): its variables are lost. The next cell starts a fresh"
                    " kernel."
                )
            if health is KernelHealth.ALIVE:
                try:
                    channels = await asyncio.wait_for(
                        self.open_remote(), max(5.0, 2 * self.ping_interval)
                    )
                except (CgpuError, asyncio.TimeoutError) as exc:
                    log.info("reconnect attempt %d failed: %s", attempt, exc or "timed out")
                else:
                    log.warning(
                        "reconnected after %.1f s (%d attempts)", loop.time() - started, attempt
                    )
                    return channels
            else:
                log.info("reconnect attempt %d: the server is %s", attempt, health.value)
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            await asyncio.sleep(min(streak.next_delay(), remaining))
        if not self.still_wanted():
            return None
        why = ""
        if streak.short_lived:
            why = (
                f" The server accepted the connection and closed it within"
                f" {streak.healthy_after:g} s, {streak.short_lived} time(s) in a row (last:"
                f" {streak.last_close}): the server, or a proxy in front of it, is failing;"
                " its log should say why."
            )
        streak.gave_up()
        return ReconnectBudgetError(
            f"Gave up reconnecting to {self.backend.description} after {self.budget:g} s.{why}"
            " Run the cell again to retry; raise --reconnect-budget (CGPU_RECONNECT_BUDGET) to"
            " wait longer."
        )

    async def _revived(self, stalled: RemoteChannels | None) -> bool:
        """Did the stalled connection start talking again (within a short grace)?"""
        if stalled is None or stalled.closed.is_set():
            return False
        interval = self.ping_interval
        stalled.ping()
        for _ in range(10):
            if stalled.silent_for() < interval:
                return True
            if stalled.closed.is_set():
                return False
            await asyncio.sleep(interval / 5)
        return False
