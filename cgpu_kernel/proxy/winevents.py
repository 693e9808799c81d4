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
    """Call ``on_interrupt`` (from a thread) each time the frontend sets the event."""
    handle = os.environ.get("JPY_INTERRUPT_EVENT")
    if sys.platform != "win32" or not handle:
        return False
    import ctypes

    kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined,unused-ignore]
    infinite, signalled = 0xFFFFFFFF, 0

    def wait() -> None:
        while kernel32.WaitForSingleObject(int(handle), infinite) == signalled:
            kernel32.ResetEvent(int(handle))
            on_interrupt()

    threading.Thread(target=wait, name="cgpu-interrupt-event", daemon=True).start()
    return True
