"""How the proxy process learns it should stop or interrupt: signals, and its parent's exit.

``kernel.ProxyKernelRun.run`` starts both: the handlers turn SIGINT (``interrupt_mode:
signal``) into an interrupt of the remote kernel and SIGTERM into a stop; the parent watch stops
the run when the frontend that launched it is gone, so a crashed frontend does not leave a remote
kernel (or a Colab runtime) running.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable

import psutil

from cgpu_kernel.proxy.winevents import watch_interrupt_event

log = logging.getLogger("cgpu_kernel")

PARENT_POLL = 1.0  # seconds between looks at the parent process


def install_signal_handlers(on_sigint: Callable[[], None], on_sigterm: Callable[[], None]) -> None:
    """Call ``on_sigint``/``on_sigterm`` on the running loop when those signals come.

    On Windows there is no SIGTERM handler and the frontend interrupts through a named event
    (``winevents``) as well as SIGINT.
    """
    loop = asyncio.get_running_loop()
    if sys.platform == "win32":
        signal.signal(signal.SIGINT, lambda *_: loop.call_soon_threadsafe(on_sigint))
        watch_interrupt_event(lambda: loop.call_soon_threadsafe(on_sigint))
        return
    loop.add_signal_handler(signal.SIGINT, on_sigint)
    loop.add_signal_handler(signal.SIGTERM, on_sigterm)


async def watch_parent(stop: Callable[[], None]) -> None:
    """Call ``stop`` (which deletes the remote kernel) when the frontend that launched us is
    gone; return at once when there is no parent to watch (launched by init)."""
    # jupyter_client names the launcher in JPY_PARENT_PID: reading our parent instead could
    # find init already, had the launcher died before this line ran.
    try:
        pid = int(os.environ.get("JPY_PARENT_PID") or os.getppid())
        parent = psutil.Process(pid)
    except (psutil.Error, ValueError):
        log.warning("the frontend process that launched this kernel is gone; shutting down")
        stop()
        return
    if parent.pid == 1:
        return
    while True:
        if not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE:
            log.warning("the frontend process %d is gone; shutting down", parent.pid)
            stop()
            return
        await asyncio.sleep(PARENT_POLL)
