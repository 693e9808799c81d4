"""The I/O side of the output journal: installing it, and asking it after a reconnection.

``journal`` builds the messages and reads the answers; this module sends them on a
:class:`~cgpu_kernel.connection.RemoteChannels` and waits, with bounds, for the answers. A
journal that does not answer in time is given up for this remote kernel, so a remote that
cannot hold one (not an ipykernel, a gateway that filters unknown message types) costs one
timeout, not one per reconnection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from .connection import ChannelsClosedError, RemoteChannels
from .exceptions import MalformedMessageError
from .journal import (
    LastSeen,
    can_hold_journal,
    install_request,
    is_internal,
    journal_request,
    kernel_info_request,
    recovered_messages,
)
from .wire import Message

log = logging.getLogger(__name__)

FIRST_REPLY_WAIT = 10.0  # how long cells wait for the journal before going ahead anyway
KERNEL_INFO_WAIT = 120.0  # how long a starting (or restarting) kernel may take to answer at all
ANSWER_WAIT = 5.0  # the journal answering on the control channel


class JournalKeeper:
    """One per proxy run: the journal of whichever remote kernel the proxy talks to now."""

    def __init__(self, session: str, *, enabled: bool, max_messages: int, max_bytes: int) -> None:
        self.session = session
        self.enabled = enabled
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.active = False
        self.last_seen = LastSeen()
        self._waiting: dict[str, asyncio.Future[Message]] = {}

    def route(self, msg: Message) -> bool:
        """Take ``msg`` if it belongs to one of the proxy's own requests (never shown to a
        frontend: replies go to whoever waits for them, busy/idle and the like are dropped)."""
        if not is_internal(msg):
            return False
        if msg.channel != "iopub":
            future = self._waiting.pop(msg.parent_id or "", None)
            if future is not None and not future.done():
                future.set_result(msg)
        return True

    def kernel_changed(self) -> None:
        """A different kernel process answers now (fresh, or restarted): no journal yet."""
        self.active = False
        self.last_seen = LastSeen()

    async def arm(self, channels: RemoteChannels, ready: Callable[[], None]) -> None:
        """Install the journal in the kernel behind ``channels``.

        ``ready`` is called once the install request is written (cells queued behind it are
        then covered from their first line), once it is clear there will be none, or after
        ``FIRST_REPLY_WAIT`` s of a kernel slow to answer (the install follows when it does).
        """
        self.kernel_changed()
        if not self.enabled:
            ready()
            return
        try:
            asked = self.ask(channels, kernel_info_request(self.session), KERNEL_INFO_WAIT)
            done, _ = await asyncio.wait({asked}, timeout=FIRST_REPLY_WAIT)
            if not done:
                ready()  # a slow kernel: cells go ahead; the journal follows when it answers
            info = await asked
            if info is None or not can_hold_journal(info.content):
                if info is not None:
                    log.info("the remote kernel is not an IPython kernel: no output journal")
                return
            install = install_request(self.session, self.max_messages, self.max_bytes)
            answer = self.ask(channels, install, KERNEL_INFO_WAIT)
            ready()
            reply = await answer
        finally:
            ready()
        if reply is not None and reply.content.get("status") == "ok":
            self.active = True
            log.info("output journal installed in the remote kernel")
        elif reply is not None:
            log.warning(
                "could not install the output journal (%s: %s); a dropped connection may lose"
                " the output in flight",
                reply.content.get("ename"),
                reply.content.get("evalue"),
            )

    async def recover(self, channels: RemoteChannels) -> tuple[list[Message], bool] | None:
        """Everything the kernel sent after what the proxy last received, and whether that is
        all of it; None without an answer (no journal, the connection dropped, or a timeout)."""
        if not self.active:
            return None
        request = journal_request(self.session, self.last_seen.snapshot())
        reply = await self.ask(channels, request, ANSWER_WAIT)
        if reply is None:
            if not channels.closed.is_set():
                log.warning(
                    "the remote kernel's output journal did not answer within %g s; relying on"
                    " the server's replay from now on",
                    ANSWER_WAIT,
                )
                self.active = False
            return None
        try:
            return recovered_messages(reply)
        except MalformedMessageError as exc:
            log.warning("the output journal's answer is unusable (%s); not asking it again", exc)
            self.active = False
            return None

    def ask(
        self, channels: RemoteChannels, msg: Message, timeout: float | None
    ) -> asyncio.Future[Message | None]:
        """Send the internal request ``msg`` now; the future gives its reply, or None on timeout
        or a dropped socket."""
        reply: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiting[msg.msg_id] = reply
        try:
            channels.send(msg)
        except ChannelsClosedError:
            self._waiting.pop(msg.msg_id, None)
            reply.cancel()
        return asyncio.ensure_future(self._wait(channels, msg.msg_id, reply, timeout))

    async def _wait(
        self,
        channels: RemoteChannels,
        msg_id: str,
        reply: asyncio.Future[Message],
        timeout: float | None,
    ) -> Message | None:
        closed = asyncio.ensure_future(channels.closed.wait())
        either: set[asyncio.Future[Any]] = {reply, closed}
        try:
            await asyncio.wait(either, timeout=timeout, return_when="FIRST_COMPLETED")
        finally:
            closed.cancel()
            self._waiting.pop(msg_id, None)
        if reply.done() and not reply.cancelled():
            return reply.result()
        reply.cancel()
        return None
