"""The stand-in backend for options that cannot work.

``cgpu_kernel.proxy.app`` uses it when ``make_backend`` raised: the proxy kernel stays up and
every cell fails with the reason, instead of a kernel that exits at once and is restarted by
the frontend in a loop with the reason buried in a log.
"""

from __future__ import annotations

from cgpu_kernel.backends.base import Backend, KernelHealth, WebSocketTarget
from cgpu_kernel.exceptions import CgpuError


class UnavailableBackend(Backend):
    """Stands in when the options cannot work: every attempt fails with the reason."""

    def __init__(self, error: CgpuError) -> None:
        self.error = error
        self.description = "the remote kernel (misconfigured)"

    async def start_kernel(self) -> str:
        raise self.error

    def websocket_request(self, session_id: str) -> WebSocketTarget:
        raise self.error

    async def interrupt_kernel(self) -> None:
        return None

    async def kernel_health(self) -> KernelHealth:
        return KernelHealth.GONE

    async def shutdown_kernel(self, *, restart: bool = False) -> None:
        return None
