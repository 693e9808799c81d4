"""Publishing on iopub with bursts of stream messages merged (``--coalesce-window``).

``kernel.ProxyKernelRun`` hands every message the relay publishes to :class:`IopubPublisher`:
the pure :class:`~cgpu_kernel.core.limits.Coalescer` decides what merges, this shell owns the
clock and the flush timer. A stream message after a quiet spell goes at once (the leading edge:
a lone ``print`` is not delayed); what follows within the window is merged and flushed on a
timer, so a loop printing thousands of lines reaches the frontend as a few messages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cgpu_kernel.core.limits import Coalescer
from cgpu_kernel.core.wire import Message

if TYPE_CHECKING:
    from cgpu_kernel.proxy.options import ProxyKernel


class IopubPublisher:
    """Publishes through ``publish`` (the frontend's iopub socket), merging stream bursts."""

    def __init__(
        self,
        publish: Callable[[Message], None],
        *,
        window: float,
        before_status: Callable[[], None] = lambda: None,
    ) -> None:
        self._send = publish
        self.window = window
        self.before_status = before_status  # the spool is flushed before a cell's idle
        self.coalescer = Coalescer()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._last_stream = 0.0

    @classmethod
    def from_options(
        cls,
        options: ProxyKernel,
        publish: Callable[[Message], None],
        before_status: Callable[[], None],
    ) -> IopubPublisher:
        """The publisher for one run under ``--coalesce-window`` (0 merges nothing)."""
        return cls(publish, window=options.coalesce_window, before_status=before_status)

    def publish(self, msg: Message) -> None:
        """Publish ``msg`` now, or hold it to merge with the stream messages that follow."""
        window = self.window
        if msg.msg_type == "status":
            self.before_status()
        if window <= 0:
            self._send(msg)
            return
        now = time.monotonic()
        idle_stream = msg.msg_type == "stream" and not self.coalescer.pending
        if idle_stream and now - self._last_stream >= window:
            self._last_stream = now
            self._send(msg)
            return
        for ready in self.coalescer.add(msg):
            self._send(ready)
        if self.coalescer.pending and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(window, self.flush)

    def flush(self) -> None:
        """Publish whatever is held (the timer's callback, and once more at shutdown)."""
        self._flush_handle = None
        self._last_stream = time.monotonic()
        for ready in self.coalescer.flush():
            self._send(ready)

    def close(self) -> None:
        """Stop the timer and publish what is held: nothing is left behind at shutdown."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.flush()
