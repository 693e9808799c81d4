"""Windows: interrupts arrive as an event, not SIGINT.

On Windows, jupyter_client's ``interrupt_mode: signal`` sets the event whose handle it passed in
``JPY_INTERRUPT_EVENT``. A daemon thread waits on it and calls back into the event loop. On
every other platform this module does nothing.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable


def watch_interrupt_event(on_interrupt: Callable[[], None]) -> bool:
    """Call ``on_interrupt`` (from a thread) each time the frontend sets the event; False when
    there is no event to watch. ``lifecycle.install_signal_handlers`` calls this on Windows."""
    if sys.platform == "win32":  # a platform block: mypy checks it only for Windows
        handle = os.environ.get("JPY_INTERRUPT_EVENT")
        if handle:
            _watch(int(handle), on_interrupt)
            return True
    return False


def _watch(handle: int, on_interrupt: Callable[[], None]) -> None:
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined,unused-ignore]
    infinite, signalled = 0xFFFFFFFF, 0

    def wait() -> None:
        while kernel32.WaitForSingleObject(handle, infinite) == signalled:
            kernel32.ResetEvent(handle)
            on_interrupt()

    threading.Thread(target=wait, name="cgpu-interrupt-event", daemon=True).start()
