"""Keep-alive for a Colab runtime: calls while the notebook is in use, silence once it idles.

Colab reclaims a runtime nobody keeps alive. :class:`KeepAlive` calls ``tun/m/<endpoint>/
keep-alive/`` every ``interval`` seconds (from one ping's start to the next: google-colab-cli
pings every 60 s, colab-vscode every 5 min) while the kernel is in use; a ping the runtime
never answers counts as sent (google-colab-cli AGENTS.md, verified live) and logs nothing
alarming. After ``idle_timeout`` seconds without a running cell it stops, so an abandoned
notebook stops burning compute units, and the next sign of use resumes it. Use is seen in the
remote's messages (:meth:`observe`, which the backend's ``observe`` forwards from the proxy's
I/O shell) and reported directly with :meth:`note_activity`. Owned and started by
:class:`~cgpu_kernel.backends.colab.backend.ColabBackend`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cgpu_kernel.backends.colab.api import ColabAPI
from cgpu_kernel.core.wire import Message
from cgpu_kernel.exceptions import ColabHTTPError, RemoteError

log = logging.getLogger(__name__)


class KeepAlive:
    """The keep-alive rhythm of one runtime, and the activity that drives it."""

    def __init__(self, api: ColabAPI, *, interval: float, idle_timeout: float) -> None:
        self.api = api
        self.interval = interval
        self.idle_timeout = idle_timeout
        #: Keep-alive calls sent: answered, or read timed out (which counts, see
        #: :meth:`ColabAPI.keep_alive`), for ``status`` and tests.
        self.sent = 0
        #: Of those, the ones Colab never answered.
        self.unanswered = 0
        #: True while idleness has stopped the calls.
        self.paused = False
        #: True once the coming stop was announced (until the next sign of use).
        self.warned = False
        self._last_activity = time.monotonic()
        self._busy = False
        self._activity: asyncio.Event | None = None
        #: How the coming stop is told to the user (the proxy's ``announce``); else the log.
        self.announce: Callable[[str], None] = lambda text: log.warning("%s", text)

    def note_activity(self) -> None:
        """The user did something (sent a cell): keep the runtime alive, resuming keep-alive."""
        self._last_activity = time.monotonic()
        self.warned = False
        if self._activity is not None:
            self._activity.set()

    def observe(self, msg: Message) -> None:
        """A message from the remote kernel: what a user's cell does is use, the rest is not."""
        if msg.parent_header.get("msg_type") == "execute_request":
            if msg.msg_type == "status":
                self._busy = msg.content.get("execution_state") == "busy"
            self.note_activity()

    def idle_for(self) -> float:
        """Seconds since the last sign of use; 0 while a cell runs."""
        return 0.0 if self._busy else time.monotonic() - self._last_activity

    @property
    def warn_before(self) -> float:
        """How long before stopping the stop is announced: 5 minutes, at most a quarter of
        the idle window (colab-vscode ``keep-alive.ts`` asks the user before it stops)."""
        return min(300.0, self.idle_timeout / 4)

    def _announce_stop(self) -> None:
        """Once per idle stretch: keep-alive will stop soon, and how to keep the runtime."""
        idle, left = self.idle_for(), self.idle_timeout - self.idle_for()
        if self.warned or idle < self.idle_timeout - self.warn_before:
            return
        self.warned = True
        self.announce(
            f"cgpu-kernel: no cell has run for {_minutes(idle)}: keep-alive for the Colab runtime"
            f" stops in {_minutes(max(left, 0.0))}, and Colab may then reclaim it (its variables"
            " would be lost). Run a cell to keep it, or raise idle_timeout (`--option"
            " idle-timeout=SECONDS`, CGPU_IDLE_TIMEOUT)."
        )

    async def run(self, endpoint: str) -> None:
        """Keep ``endpoint`` alive until cancelled (or Colab no longer knows it)."""
        self._last_activity = time.monotonic()
        activity = self._activity = asyncio.Event()
        while True:
            self._announce_stop()
            if self.idle_for() >= self.idle_timeout:
                if not self.paused:
                    self.paused = True
                    log.warning(
                        "no cell has run for %.0f s: stopped keeping the Colab runtime alive so"
                        " Colab can reclaim it; the next cell resumes (if it is still there)",
                        self.idle_for(),
                    )
                activity.clear()
                await activity.wait()
                continue
            self.paused = False
            started = time.monotonic()
            try:
                answered = await self.api.keep_alive(endpoint)
            except ColabHTTPError as exc:
                if exc.code == 404:
                    log.warning("Colab no longer knows the runtime: stopped its keep-alive")
                    return
                log.warning("keep-alive for the Colab runtime failed: %s", exc)
            except RemoteError as exc:
                log.warning("keep-alive for the Colab runtime failed: %s", exc)
            else:
                self.sent += 1
                if not answered:
                    self.unanswered += 1
                    log.debug("keep-alive sent; Colab did not answer it (it often does not)")
            # the rhythm is kept from each ping's start: a silent runtime does not stretch it
            await asyncio.sleep(max(0.0, started + self.interval - time.monotonic()))


def _minutes(seconds: float) -> str:
    """``12 min`` (``40 s`` under two minutes), as a notice reads."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
