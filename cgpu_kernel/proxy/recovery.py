"""The I/O side of the output journal: installing it, and asking it after a reconnection.

``journal`` builds the messages and reads the answers; this module sends them on a
:class:`~cgpu_kernel.proxy.connection.RemoteChannels` and waits, with bounds, for the answers.

A journal that is slow to answer (a kernel holding the GIL in a long C call, a loaded host)
gets a fair chance: it is asked again with waits doubling, for up to ``JOURNAL_PATIENCE`` s per
outage, and any of the answers is taken. One that never answers costs that outage its check
(the user is told so) but is asked again after the next one, for ``ANSWER_WAIT`` s, until it
answers again (late answers count): one slow answer never switches it off for the kernel's
life. Only an answer of the wrong shape (a broken agent) does, or proof that the journal is not
there: each request goes with a control-channel probe behind it, and the kernel (which answers
control messages in order) answering the probe but not the request means nothing handles the
request (the handler is gone, or a gateway filters the type). That costs one round trip, not
``JOURNAL_PATIENCE`` s of held output at every outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cgpu_kernel.core.journal import (
    LastSeen,
    LostMessage,
    OutputSequence,
    answer_sequence,
    can_hold_journal,
    control_probe_request,
    install_request,
    is_internal,
    journal_request,
    kernel_info_request,
    known_gaps,
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
ANSWER_WAIT = 5.0  # the journal's first wait (then asked again, waits doubling)
JOURNAL_PATIENCE = 30.0  # most seconds one outage waits for the journal's answer
LATE_ANSWER_WAIT = 300.0  # an abandoned request's answer still counts this long
IDLE_WAIT = 60.0  # the probe's idle on iopub, once its reply came (a backlog may precede it)


@dataclass
class JournalAnswer:
    """What the journal returned after an outage: the messages (in the order the kernel sent
    them), whether that is all of them, and what it could not keep (too large)."""

    messages: list[Message]
    complete: bool
    gaps: list[LostMessage] = field(default_factory=list)
    #: the last message the answer covers on each channel (where a second look starts)
    end: dict[str, str | None] = field(default_factory=dict)
    #: the last iopub number the kernel had given when it answered (None: it numbers none)
    sequence: int | None = None


class JournalKeeper:
    """One per proxy run: the journal of whichever remote kernel the proxy talks to now."""

    def __init__(self, session: str, *, enabled: bool, max_messages: int, max_bytes: int) -> None:
        self.session = session
        self.enabled = enabled
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.active = False
        # False once an outage's requests all went unanswered: the next outage waits only
        # ANSWER_WAIT; any answer (a late one too) makes it True again.
        self.answering = True
        self.last_seen = LastSeen()
        #: the kernel's numbered iopub messages delivered so far (the evidence of gaps)
        self.sequence = OutputSequence()
        self.iopub_heard = asyncio.Event()  # an iopub message about one of our requests came
        self._waiting: dict[str, asyncio.Future[Message]] = {}
        self._idle: dict[str, asyncio.Event] = {}  # probes whose iopub idle is awaited

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
            if msg.msg_type == "status" and msg.content.get("execution_state") == "idle":
                idle = self._idle.get(msg.parent_id or "")
                if idle is not None:
                    idle.set()
        else:
            future = self._waiting.pop(msg.parent_id or "", None)
            if future is not None and not future.done():
                future.set_result(msg)
        return True

    def kernel_changed(self) -> None:
        """A different kernel process answers now (fresh, or restarted): no journal yet."""
        self.active = False
        self.answering = True
        self.last_seen = LastSeen()
        self.sequence = OutputSequence()

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

    async def recover(
        self,
        channels: RemoteChannels,
        after: dict[str, str | None] | None = None,
        *,
        casual: bool = False,
    ) -> JournalAnswer | None:
        """Everything the kernel sent after what the proxy last received (or after ``after``),
        whether that is all of it, and what was too large to keep; None without an answer (no
        journal, the connection dropped, or no answer within the patience: see the module's
        docstring). ``casual``: a look with no outage behind it (a quiet cell's end), waiting
        ``ANSWER_WAIT`` s once; a kernel too busy to answer it is not marked slow."""
        if not self.active:
            return None
        if after is None:
            after = self.last_seen.snapshot()
        loop = asyncio.get_running_loop()
        patience = JOURNAL_PATIENCE if self.answering and not casual else ANSWER_WAIT
        deadline = loop.time() + patience
        wait = ANSWER_WAIT
        asked: list[asyncio.Future[Message | None]] = []
        asked_ids: list[str] = []
        probes: list[asyncio.Future[Message | None]] = []
        reply: Message | None = None
        try:
            while reply is None and not channels.closed.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if asked:
                    log.info("the output journal has not answered yet; asking again")
                request = journal_request(self.session, after)
                future = self.ask(channels, request, LATE_ANSWER_WAIT)
                if not casual:
                    future.add_done_callback(self._answered)
                asked.append(future)
                asked_ids.append(request.msg_id)
                probes.append(self.ask(channels, control_probe_request(self.session), remaining))
                done, _ = await asyncio.wait(
                    [*asked, *probes], timeout=min(wait, remaining), return_when="FIRST_COMPLETED"
                )
                probe_answered = False
                for finished in done:
                    answer = None if finished.cancelled() else finished.result()
                    if finished in probes:
                        probes.remove(finished)
                        probe_answered = probe_answered or answer is not None
                    else:
                        asked.remove(finished)
                        reply = reply or answer
                if reply is None and probe_answered and self._unanswered(asked_ids):
                    log.warning(
                        "the remote kernel answers control requests but not the output"
                        " journal's (its handler is gone, or a gateway filters the message"
                        " type): output lost in an outage can no longer be fetched, only"
                        " reported"
                    )
                    self.active = False
                    return None
                wait *= 2
        finally:
            for probe in probes:
                probe.cancel()
        if reply is None:
            if not channels.closed.is_set() and not casual:
                log.warning(
                    "the remote kernel's output journal did not answer within %.0f s; this"
                    " outage's output is not checked (it is asked again after the next one)",
                    patience,
                )
                self.answering = False
            return None
        try:
            messages, complete = recovered_messages(reply)
        except MalformedMessageError as exc:
            log.warning("the output journal's answer is unusable (%s); not asking it again", exc)
            self.active = False
            return None
        end = dict(after)
        for msg in messages:
            end[msg.channel] = msg.msg_id
        return JournalAnswer(messages, complete, known_gaps(reply), end, answer_sequence(reply))

    def _unanswered(self, msg_ids: list[str]) -> bool:
        """Whether none of these journal requests has had its reply yet (one received but not
        yet handed on has already left ``_waiting``). Called once a probe sent behind each of
        them was answered: their replies would have come first."""
        return all(msg_id in self._waiting for msg_id in msg_ids)

    def _answered(self, future: asyncio.Future[Message | None]) -> None:
        """A journal request was answered (in time or late): the journal is alive."""
        if not future.cancelled() and future.result() is not None:
            self.answering = True

    async def settled(self, channels: RemoteChannels) -> bool:
        """Whether every cell sent before now has ended, on shell and on iopub: a
        ``kernel_info_request`` (answered on shell only after every earlier cell) whose reply
        came, and then its ``idle`` on iopub (published after every earlier cell's), or
        ``IDLE_WAIT`` s passed without it. False if the connection dropped first. No time limit
        on the reply: the cells before it may run for hours; asked again as ``kernel_info``
        is."""
        interval = ASK_AGAIN
        while not channels.closed.is_set():
            request = kernel_info_request(self.session)
            idle = self._idle[request.msg_id] = asyncio.Event()
            try:
                reply = await self.ask(channels, request, interval)
                if reply is not None:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(idle.wait(), IDLE_WAIT)
                    return not channels.closed.is_set()
            finally:
                self._idle.pop(request.msg_id, None)
            interval = min(2 * interval, 300.0)
        return False

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
