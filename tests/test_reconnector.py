"""The reconnection attempt loop (``proxy.reconnect.Reconnector``) against a scripted backend.

No server: the backend answers ``kernel_health`` from a script and ``open_remote`` hands back a
stand-in connection, so each verdict (reconnected, kernel gone, credentials refused, budget
spent, no longer wanted) is checked in milliseconds. ``test_reconnect.py`` checks the same loop
end to end, through real servers and fault injection.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cgpu_kernel.backends.base import KernelHealth
from cgpu_kernel.core.backoff import Backoff
from cgpu_kernel.exceptions import (
    CgpuError,
    ReconnectBudgetError,
    RemoteAuthError,
    RemoteKernelGoneError,
)
from cgpu_kernel.proxy.reconnect import Reconnector

FAST = Backoff(first=0.001, cap=0.002)


class ScriptedBackend:
    """Answers ``kernel_health`` with the next entry of ``health`` (the last one repeats)."""

    description = "the scripted kernel"

    def __init__(self, *health: KernelHealth, renewed: bool = False) -> None:
        self.health = list(health)
        self.renewed = renewed
        self.asked = 0

    async def kernel_health(self) -> KernelHealth:
        self.asked += 1
        return self.health.pop(0) if len(self.health) > 1 else self.health[0]

    async def reauthenticate(self) -> bool:
        return self.renewed


def attempt(backend: ScriptedBackend, budget: float = 5.0, **kwargs: Any) -> Any:
    """Run one reconnection; the outcome and how many connections were opened."""
    opened: list[object] = []

    async def open_remote() -> Any:
        opened.append(object())
        return opened[-1]

    async def main() -> Any:
        reconnector = Reconnector(
            backend,  # type: ignore[arg-type]
            open_remote=open_remote,
            still_wanted=kwargs.pop("still_wanted", lambda: True),
            ping_interval=1.0,
            budget=budget,
            auth_hint="Renew the scripted token.",
            backoff=FAST,
        )
        deadline = asyncio.get_running_loop().time() + budget
        return await reconnector.run(deadline, None)

    return asyncio.run(main()), opened


def test_reconnects_once_the_server_answers_again() -> None:
    down, up = KernelHealth.UNREACHABLE, KernelHealth.ALIVE
    backend = ScriptedBackend(down, down, up)
    outcome, opened = attempt(backend)
    assert opened == [outcome]
    assert backend.asked == 3


def test_a_gone_kernel_is_reported_at_once_without_opening_anything() -> None:
    outcome, opened = attempt(ScriptedBackend(KernelHealth.GONE))
    assert isinstance(outcome, RemoteKernelGoneError)
    assert "the scripted kernel is gone" in str(outcome)
    assert opened == []


def test_refused_credentials_end_with_the_callers_hint() -> None:
    outcome, opened = attempt(ScriptedBackend(KernelHealth.AUTH_EXPIRED))
    assert isinstance(outcome, RemoteAuthError)
    assert str(outcome).endswith("Renew the scripted token.")
    assert opened == []


def test_renewed_credentials_are_retried() -> None:
    backend = ScriptedBackend(KernelHealth.AUTH_EXPIRED, KernelHealth.ALIVE, renewed=True)
    outcome, opened = attempt(backend)
    assert not isinstance(outcome, CgpuError)
    assert opened == [outcome]


def test_the_budget_ends_the_attempts() -> None:
    outcome, opened = attempt(ScriptedBackend(KernelHealth.UNREACHABLE), budget=0.05)
    assert isinstance(outcome, ReconnectBudgetError)
    assert "after 0.05 s" in str(outcome)
    assert opened == []


@pytest.mark.parametrize("health", [KernelHealth.ALIVE, KernelHealth.GONE])
def test_nothing_when_no_longer_wanted(health: KernelHealth) -> None:
    outcome, opened = attempt(ScriptedBackend(health), still_wanted=lambda: False)
    assert outcome is None
    assert opened == []
