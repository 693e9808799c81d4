"""The I/O side of the output journal: installing it, and asking it after a reconnection.

``journal`` builds the messages and reads the answers; this module sends them on a
:class:`~cgpu_kernel.proxy.connection.RemoteChannels` and waits, with bounds, for the answers. A
journal that does not answer in time is given up for this remote kernel, so a remote that
cannot hold one (not an ipykernel, a gateway that filters unknown message types) costs one
timeout, not one per reconnection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cgpu_kernel.core.journal import (
    LastSeen,
    can_hold_journal,
    install_request,
    is_internal,
    journal_request,
    kernel_info_request,
    recovered_messages,
)
from cgpu_kernel.core.wire import Message
from cgpu_kernel.exceptions import ChannelsClosedError, MalformedMessageError
from cgpu_kernel.proxy.connection import RemoteChannels

if TYPE_CHECKING:
    from cgpu_kernel.proxy.options import ProxyKernel

log = logging.getLogger(__name__)

FIRST_REPLY_WAIT = 10.0  # how long cells wait for the journal before going ahead anyway
KERNEL_INFO_WAIT = 120.0  # how long a starting (or restarting) kernel may take to answer at all
ASK_AGAIN = 5.0  # a kernel_info request unanswered this long is sent again (it may have been lost)
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
        self.iopub_heard = asyncio.Event()  # an iopub message about one of our requests came
        self._waiting: dict[str, asyncio.Future[Message]] = {}

    @classmethod
    def from_options(cls, options: ProxyKernel, session: str) -> JournalKeeper:
        """The keeper for one proxy run, as ``--output-journal`` and the journal's size options
        say; called by ``proxy.kernel`` when it wires the run."""
        return cls(
            session,
            enabled=options.output_journal,
            max_messages=options.journal_max_messages,
            max_bytes=options.journal_max_bytes,
        )

    def route(self, msg: Message) -> bool:
        """Take ``msg`` if it belongs to one of the proxy's own requests (never shown to a
        frontend: replies go to whoever waits for them, busy/idle and the like are dropped)."""
        if not is_internal(msg):
            return False
        if msg.channel == "iopub":
            self.iopub_heard.set()
        else:
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
        # A slow kernel: cells go ahead after a while; the journal follows when it answers.
        impatient = asyncio.get_running_loop().call_later(FIRST_REPLY_WAIT, ready)
        try:
            info = await self.kernel_info(channels)
            if info is None or not can_hold_journal(info.content):
                if info is not None:
                    log.info("the remote kernel is not an IPython kernel: no output journal")
                return
            install = install_request(self.session, self.max_messages, self.max_bytes)
            answer = self.ask(channels, install, KERNEL_INFO_WAIT)
            ready()
            reply = await answer
        finally:
            impatient.cancel()
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

    async def kernel_info(
        self, channels: RemoteChannels, within: float | None = KERNEL_INFO_WAIT
    ) -> Message | None:
        """The remote kernel's ``kernel_info_reply`` to an internal request, which is answered
        only after every shell request sent before it; None if none comes ``within`` s (None:
        no limit) or the connection drops.

        Asked again if unanswered (after ``ASK_AGAIN`` s, then twice as long each time, up to
        5 minutes): a request sent while the server restarts a crashed kernel can be lost
        between the server and the new process.
        """
        loop = asyncio.get_running_loop()
        deadline = None if within is None else loop.time() + within
        interval = ASK_AGAIN
        while not channels.closed.is_set():
            wait = interval if deadline is None else min(interval, deadline - loop.time())
            if wait <= 0:
                break
            reply = await self.ask(channels, kernel_info_request(self.session), wait)
            if reply is not None:
                return reply
            interval = min(2 * interval, 300.0)
        return None

    async def iopub_flowing(self, channels: RemoteChannels, within: float = 30.0) -> bool:
        """Wait until the kernel's iopub reaches the proxy, asking ``kernel_info`` (whose
        busy/idle go out on iopub) until a status about one of our requests arrives.

        After the server restarts a kernel, its subscription to the new process's iopub takes a
        moment to take hold, and what the kernel publishes before that is lost: a cell run then
        could lose its output, even its ``idle``, and look busy forever.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        asked: list[asyncio.Future[Message | None]] = []  # their replies do not matter
        try:
            while not self.iopub_heard.is_set() and not channels.closed.is_set():
                if loop.time() >= deadline:
                    return False
                asked.append(self.ask(channels, kernel_info_request(self.session), 2.0))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.iopub_heard.wait(), 0.5)
            return self.iopub_heard.is_set()
        finally:
            for future in asked:
                future.cancel()

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
