"""Ending a process that is done without the interpreter's teardown.

Called by the proxy once its run ended cleanly (``proxy.app.launch_kernel``: sockets closed, its
ZMQ context terminated, so every reply is sent) and by ``cgpu-kernel run`` once its result is
printed (``cli.main``). After that nothing of ours is left to run, yet Python's finalization --
tearing down the modules jupyter_client, zmq, tornado and traitlets bring -- took 60-110 ms per
process on two shared cores (measured: a child that imports the CLI, prints, and is waited for),
twice per ``run``: a tenth of the one-second budget of a warm run. ``os._exit`` skips it, after
the standard streams and the logging handlers are flushed; atexit handlers are skipped too (the
libraries' only ones set "exiting" flags) -- except under ``coverage``, whose data is written by
one: then the exit is the ordinary one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import NoReturn


def exit_now(status: int) -> NoReturn:
    """Flush stdout, stderr and logging, then end the process with ``status`` at once.

    A reader gone from stdout (``| head``) is no failure here: what could be written was."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    logging.shutdown()
    if "coverage" in sys.modules:  # measured by coverage: let its atexit handler save the data
        raise SystemExit(status)
    os._exit(status)
