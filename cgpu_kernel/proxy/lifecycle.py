"""How the proxy process learns it should stop or interrupt: signals, and its parent's exit.

``kernel.ProxyKernelRun.run`` starts both: the handlers turn SIGINT (``interrupt_mode:
signal``) into an interrupt of the remote kernel and SIGTERM into a stop; the parent watch stops
the run when the frontend that launched it is gone, so a crashed frontend does not leave a remote
kernel (or a Colab runtime) running. A frontend that asked for the shutdown and then exited
without waiting for the reply (``jupyter console`` does, on every ``exit``) ended normally:
that is logged at INFO, and only a frontend gone without asking gets the warning.
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
#: Seconds a vanished parent's ``shutdown_request`` may still take to be read: the frontend
#: sends it and exits at once, so the watch may notice the exit first.
SHUTDOWN_GRACE = 0.5


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


async def watch_parent(stop: Callable[[], None], asked_shutdown: Callable[[], bool]) -> None:
    """Call ``stop`` (which deletes the remote kernel) when the frontend that launched us is
    gone; return at once when there is no parent to watch (launched by init).

    ``asked_shutdown`` says whether a ``shutdown_request`` came: then the frontend's exit is
    its normal end, the shutdown already under way finishes the run, and nothing is warned.
    """
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
    while parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE:
        await asyncio.sleep(PARENT_POLL)
    await asyncio.sleep(SHUTDOWN_GRACE)  # a shutdown_request it sent just before exiting
    if asked_shutdown():
        log.info("the frontend process %d exited after asking for the shutdown", parent.pid)
        return  # the shutdown under way ends the run
    log.warning("the frontend process %d is gone; shutting down", parent.pid)
    stop()
