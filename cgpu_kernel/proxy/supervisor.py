"""The remote connection's life: open it, serve it, watch it, reconnect it, recover after.

``kernel.ProxyKernelRun`` owns one :class:`RemoteSupervisor` and tells it when the relay wants a
remote (:meth:`RemoteSupervisor.want`) and when the server restarted the kernel
(:meth:`RemoteSupervisor.after_restart`); the supervisor feeds the relay the remote's messages
and its connection events, and hands the relay's answers back through ``perform``. Around
that loop:

* a silent connection is pinged and, past twice the ping interval, declared stalled;
* a lost one is reconnected (``reconnect.Reconnector``), preferring the old socket if it revives;
* an outage is any of these: a close, a stall (revived or replaced), or a *hiccup* (a ping left
  unanswered for 1.2 intervals, then the socket talks again). A server that stops reading (a
  frozen process, a swapping host) lets the kernel's IOPub socket drop output at ZMQ's
  high-water mark; the socket reviving says nothing about what was dropped;
* from the moment an outage is seen, what any connection brings is *held*; after it the output
  journal (``recovery.JournalKeeper``) returns what the proxy missed, then the held messages
  follow, in order, each once (the relay drops what it has seen). Only then is the user told,
  and only what the journal said;
* the journal agent numbers each iopub message it records; a gap in the numbers (a server that
  fell behind dropped some, at any moment: during a stop too short to notice, while catching up
  after one) holds the message that shows it, and what follows, while the journal is asked for
  what is missing (``_fill``); what it no longer has is told as lost. After the lost-reply
  probe a last look fetches a lost end, where no later message could show the gap;
* after an outage the journal did not cover, a ``kernel_info_request`` (answered on shell only
  after every cell sent before it, its ``idle`` on iopub after theirs) finds the cells whose
  reply was lost (answered with an error) and those whose final ``idle`` was lost (ended with a
  notice): no cell stays busy forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from cgpu_kernel.backends.base import LAUNCH_SLACK, Backend
from cgpu_kernel.core.actions import Action
from cgpu_kernel.core.backoff import FailureStreak
from cgpu_kernel.core.journal import sequence_number, without_sequence_number
from cgpu_kernel.core.kernel_options import (
    KernelOptions,
    apply_request,
    not_applied,
    not_applied_notice,
)
from cgpu_kernel.core.relay import Relay, RemoteState
from cgpu_kernel.core.wire import JsonDict, Message
from cgpu_kernel.exceptions import (
    CgpuError,
    MalformedMessageError,
    ReplyLostError,
    StartupTimeoutError,
)
from cgpu_kernel.proxy.connection import MessageSink, RemoteChannels
from cgpu_kernel.proxy.options import TOKEN_ENV, ProxyKernel
from cgpu_kernel.proxy.reconnect import Reconnector
from cgpu_kernel.proxy.recovery import KERNEL_INFO_WAIT, JournalAnswer, JournalKeeper

log = logging.getLogger("cgpu_kernel")

#: How to renew credentials a server stopped accepting (ends the reconnector's error).
AUTH_HINT = (
    f"Renew the token (update the token file; {TOKEN_ENV} cannot change under a running kernel,"
    " so restart it after changing that) and run the cell again."
)


SECOND_LOOKS = 15  # most looks at the journal after an outage's recovery (30 s)
SECOND_LOOK_AFTER = 2.0  # seconds between them (the server's backlog drains meanwhile)
QUIET_LOOK_AFTER = 3.0  # seconds an open cell stays silent before the journal's end is looked at
QUIET_LOOK_MAX = 60.0  # the longest wait between such looks (doubling while it stays quiet)


class RemoteSupervisor:
    """One per proxy run: the connection to whichever remote kernel the relay talks to now."""

    def __init__(
        self,
        backend: Backend,
        relay: Relay,
        journal: JournalKeeper,
        *,
        session_id: str,
        perform: Callable[[list[Action]], None],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        stopping: Callable[[], bool],
        connected: Callable[[], None],
        startup_timeout: float,
        reconnect_budget: float,
        ping_interval: float,
        outage_notice_after: float,
        max_message_size: int,
        startup_progress_interval: float = 0.0,
    ) -> None:
        self.backend = backend
        self.relay = relay
        self.journal = journal
        self.session_id = session_id
        self.perform = perform
        self.spawn = spawn
        self.stopping = stopping
        self.connected = connected  # the run's history counts reconnections
        self.startup_timeout = startup_timeout
        self.reconnect_budget = reconnect_budget
        self.ping_interval = ping_interval
        self.outage_notice_after = outage_notice_after
        self.max_message_size = max_message_size
        self.startup_progress_interval = startup_progress_interval
        #: the working connection, None while there is none
        self.channels: RemoteChannels | None = None
        self._want_remote = asyncio.Event()
        # While an outage is being recovered from: every remote message, in arrival order
        # (None: delivered at once). Connections come one after another (a replaced one is
        # drained or dropped before the next delivers), so one list keeps the order.
        self._held: list[Message] | None = None
        self._outages = 0  # outages seen so far; a recovery releases only if no newer began
        # Where the journal has not yet been checked after a silence's recovery (a second look
        # is due, or was cut short by a newer outage, whose recovery then starts here).
        self._unverified: dict[str, str | None] | None = None
        # the connection whose quiet cells are looked at (``_look_at_quiet_ends``)
        self._looking_at: RemoteChannels | None = None
        self._last_delivery = 0.0  # loop time a remote message last reached the relay
        #: the command line's options for the kernel (``proxy.kernel`` sets them)
        self.kernel_options = KernelOptions()
        self._kernel_options_told = False  # what was not applied is said once per run
        #: the reconnection schedule across outages (connections that die young keep it going)
        self.reconnect_streak = FailureStreak()
        self._last_failure: str | None = None  # the last start failure logged, until one works

    @classmethod
    def from_options(
        cls,
        options: ProxyKernel,
        backend: Backend,
        relay: Relay,
        journal: JournalKeeper,
        *,
        session_id: str,
        perform: Callable[[list[Action]], None],
        spawn: Callable[[Coroutine[Any, Any, Any]], None],
        stopping: Callable[[], bool],
        connected: Callable[[], None],
    ) -> RemoteSupervisor:
        """The supervisor under ``--startup-timeout``, ``--reconnect-budget``,
        ``--ping-interval``, ``--outage-notice-after``, ``--max-message-size`` and
        ``--startup-progress-interval``."""
        return cls(
            backend,
            relay,
            journal,
            session_id=session_id,
            perform=perform,
            spawn=spawn,
            stopping=stopping,
            connected=connected,
            startup_timeout=options.startup_timeout,
            reconnect_budget=options.reconnect_budget,
            ping_interval=options.ping_interval,
            outage_notice_after=options.outage_notice_after,
            max_message_size=options.max_message_size,
            startup_progress_interval=options.startup_progress_interval,
        )

    def want(self) -> None:
        """The relay asked for a (new) remote kernel (``ConnectRemote``)."""
        self._want_remote.set()

    def close(self) -> None:
        """Close the working connection, if any (``CloseRemote``, and at shutdown)."""
        if self.channels is not None:
            self.channels.close()

    async def run(self) -> None:
        """Open a remote whenever the relay wants one, and serve it until it is lost for good."""
        while not self.stopping():
            await self._want_remote.wait()
            self._want_remote.clear()
            if self.stopping():
                return
            deadline = self.startup_deadline()
            progress = asyncio.ensure_future(self._startup_progress(deadline))
            try:
                channels = await asyncio.wait_for(self._open_remote(), deadline)
            except asyncio.TimeoutError:
                self._remote_failed(StartupTimeoutError(self._startup_timeout_text(deadline)))
                continue
            except CgpuError as exc:
                self._remote_failed(exc)
                continue
            finally:
                progress.cancel()
            await self._serve(channels)

    def startup_deadline(self) -> float:
        """Seconds a remote kernel may take to be ready: ``--startup-timeout``, or longer when
        the gateway was told it may take longer to launch one (``KERNEL_LAUNCH_TIMEOUT``)."""
        launch = self.backend.launch_timeout
        if launch is None:
            return self.startup_timeout
        return max(self.startup_timeout, launch + LAUNCH_SLACK)

    def _startup_timeout_text(self, deadline: float) -> str:
        text = f"{self.backend.description} was not ready within {deadline:g} s. Run the cell"
        if self.backend.launch_timeout is not None:
            return text + (
                " again to retry, or raise KERNEL_LAUNCH_TIMEOUT (the kernelspec's --option"
                " KERNEL_LAUNCH_TIMEOUT=..., or the frontend's environment)."
            )
        return text + " again to retry, or raise --startup-timeout (CGPU_STARTUP_TIMEOUT)."

    async def _startup_progress(self, deadline: float) -> None:
        """While a remote kernel is being started: every ``startup_progress_interval`` seconds,
        a line in the waiting cells saying it still is (a pod can take minutes)."""
        interval = self.startup_progress_interval
        if interval <= 0:
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            await asyncio.sleep(interval)
            self.perform(self.relay.startup_progress(loop.time() - started, deadline))

    def _apply_kernel_options(self, channels: RemoteChannels) -> None:
        """Send the command line's ``--Class.trait=value`` options for the kernel to a fresh
        (or restarted) remote kernel, before any cell; then say once what was not applied."""
        options = self.kernel_options
        if not options:
            return
        if not options.settings:
            self._tell_kernel_options(None)
            return
        answer = self.journal.ask(
            channels, apply_request(self.session_id, options), KERNEL_INFO_WAIT
        )

        async def applied() -> None:
            self._tell_kernel_options(await answer)

        self.spawn(applied())

    def _tell_kernel_options(self, reply: Message | None) -> None:
        if self._kernel_options_told:
            return
        self._kernel_options_told = True
        missed = not_applied(self.kernel_options, reply)
        if not missed:
            log.info(
                "applied to the remote kernel: %s",
                " ".join(s[0] for s in self.kernel_options.settings),
            )
            return
        text = not_applied_notice(missed)
        log.warning("%s", text)
        self.perform(self.relay.first_cell_notice(text))

    def _remote_failed(self, error: CgpuError) -> None:
        """Every waiting request gets ``error``; the log says it once while it repeats (the
        proxy's log shares the terminal with ``jupyter console``, where each cell already
        shows it), and again at ERROR once it changes or after a connection worked."""
        text = str(error)
        level = logging.INFO if text == self._last_failure else logging.ERROR
        self._last_failure = text
        log.log(level, "%s", error)
        self.perform(self.relay.remote_failed(error))

    async def _open_remote(self) -> RemoteChannels:
        await self.backend.start_kernel()
        return await RemoteChannels.open(
            self.backend.websocket_request(self.session_id),
            self.backend.description,
            max_message_size=self.max_message_size,
        )

    def _sink(self) -> MessageSink:
        """Where a connection's messages go: answers to the proxy's own requests to the
        journal keeper, the rest to the relay, or into the held list while an outage is
        recovered from."""

        def sink(msg: Message) -> None:
            if self.journal.route(msg):
                return
            if self._held is not None:
                self._held.append(msg)
            else:
                self._on_remote_message(msg)

        return sink

    def _outage_began(self) -> int:
        """Hold what the remote sends from now on, until a recovery asked the journal."""
        self._outages += 1
        if self._held is None:
            self._held = []
        return self._outages

    def _on_remote_message(self, msg: Message) -> None:
        """One remote message to the relay, in order; a gap in the kernel's numbering before it
        holds it (and what follows) while the journal is asked for what is missing."""
        self._last_delivery = asyncio.get_running_loop().time()
        number = sequence_number(msg)
        if number is not None:
            sequence = self.journal.sequence
            if sequence.gap_before(number) and self._held is None:
                if self.channels is not None and self.journal.active:
                    self._held = [msg]
                    self.spawn(self._fill(self.channels, number))
                    return
                sequence.settle(number)  # nothing to ask: told lost at once
                self._tell_lost(msg.parent_header)
            late = sequence.expected is not None and number < sequence.expected
            sequence.delivered(number)
            msg = without_sequence_number(msg)
            if not late:  # a straggler (its successors came first) does not move the mark
                self.journal.last_seen.saw(msg)
        else:
            self.journal.last_seen.saw(msg)
        self.backend.observe(msg)  # before the relay, whose intercept predicate changes nothing
        try:
            actions = self.relay.remote_message(msg)
        except MalformedMessageError as exc:  # valid framing, but content that is not JSON
            log.warning("dropped a malformed message from the remote: %s", exc)
            return
        self.perform(actions)

    async def _serve(self, channels: RemoteChannels | None) -> None:
        """Relay until the remote is lost for good, reconnecting while it is not."""
        self._last_failure = None
        if channels is not None:  # a fresh remote kernel: install its journal before any cell
            self._held = None
            self._unverified = None
            channels.deliver_to(self._sink())
            ready = asyncio.Event()
            self.spawn(self.journal.arm(channels, ready.set))
            await ready.wait()
            self._apply_kernel_options(channels)
        outage: float | None = None
        hiccup = False
        quiet = False  # the outage was a silence (the server may have stopped reading)
        loop = asyncio.get_running_loop()
        while channels is not None:
            self.channels = channels
            if self._looking_at is not channels:
                self._looking_at = channels
                self.spawn(self._look_at_quiet_ends(channels))
            if not hiccup:  # the run's history counts reconnections; a hiccup is not one
                self.connected()
            channels.deliver_to(self._sink())
            self.perform(self.relay.remote_connected())
            if outage is not None:
                self.spawn(self._recover(channels, outage, self._outages, look_again=quiet))
            ended = await self._watch(channels)
            self.channels = None
            if channels.sink_error is not None:  # a bug handling a message: end the run
                raise channels.sink_error
            if self.stopping():
                return
            lost_at = loop.time()
            self._outage_began()
            hiccup = ended == "hiccup"
            quiet = ended != "closed"
            if hiccup:
                # It talked again before it was declared stalled: the same socket, but the
                # server may have dropped output meanwhile.
                log.info("%s was silent for a while; checking what it missed", channels.where)
                outage = 0.0
                continue
            stalled = ended == "stalled"
            if stalled:
                log.warning(
                    "no sign of life from %s for %.0f s; reconnecting",
                    channels.where,
                    channels.silent_for(),
                )
            else:
                log.warning("lost the connection to %s (%s)", channels.where, channels.close_reason)
            if not stalled:  # a 1009, or a large message cut short again: refused, not re-sent
                self.perform(self.relay.remote_closed(channels.close_code))
            self.perform(self.relay.remote_disconnected())
            old = channels
            channels = await self._reconnect(old if stalled else None, lost=old)
            outage = loop.time() - lost_at
            if channels is old:
                log.warning("the connection came back by itself after %.1f s", outage)
                continue
            if stalled:
                # The server closes the stale socket once the new one registers; let the old one
                # deliver its backlog first (into the held list), then drop it.
                try:
                    await asyncio.wait_for(old.closed.wait(), self._drain_timeout())
                except asyncio.TimeoutError:
                    log.info("the stale connection did not drain; dropping it")
            old.abort()
            if channels is None:  # given up: nothing to recover into; the relay failed cells
                self._release()

    def _release(self) -> None:
        """Hand the held messages to the relay, in order, and stop holding."""
        held, self._held = self._held or [], None
        for index, msg in enumerate(held):
            again = self._holding()
            if again is not None:  # a gap in them: held again behind its recovery
                again.extend(held[index:])
                return
            self._on_remote_message(msg)

    def _holding(self) -> list[Message] | None:
        """The held list, if messages are held now (read anew: a delivery can start a hold)."""
        return self._held

    async def _look_at_quiet_ends(self, channels: RemoteChannels) -> None:
        """A cell still open after ``QUIET_LOOK_AFTER`` s without a message: look at the
        journal's end (``_fill``). A server that fell behind for a moment too short to notice
        can drop a cell's last lines and its ``idle``, and nothing follows to show the gap:
        without this look the cell would stay busy until the next cell's output arrives. A
        quiet cell costs one small control round trip per look; a chatty one none."""
        loop = asyncio.get_running_loop()
        wait = QUIET_LOOK_AFTER
        while self.channels is channels and not channels.closed.is_set():
            await asyncio.sleep(wait)
            if loop.time() - self._last_delivery < wait:
                wait = QUIET_LOOK_AFTER  # it talks: nothing to look at
                continue
            if (
                self.channels is channels
                and self._held is None
                and self.journal.active
                and self.journal.sequence.numbered
                and self.relay.open_cells()
            ):
                self._held = []
                await self._fill(channels, None, casual=True)
            # a cell quiet for long (a long computation) is looked at less and less often
            wait = min(2 * wait, QUIET_LOOK_MAX)

    def _tell_lost(self, parent: JsonDict) -> None:
        """Tell the user of numbered messages known lost since the last telling, if any."""
        lost = self.journal.sequence.take_lost()
        if lost:
            log.warning("%d iopub messages from the remote kernel are lost", lost)
            self.perform(self.relay.output_lost(lost, parent=parent))

    async def _fill(
        self, channels: RemoteChannels, before: int | None, *, casual: bool = False
    ) -> None:
        """Messages are missing before the one numbered ``before``, which is held with all that
        follows (``_on_remote_message``): ask the journal for everything after the last
        message delivered, deliver it, count what it no longer had as lost, and release the
        held ones (dropping what the answer already brought). ``before`` None: a look at the
        end (``_check_lost_replies``), where no later message could show a gap: what the
        kernel had numbered when it answered is the end. ``casual``: a look at a quiet cell,
        which a journal too busy to answer soon does not fail (``JournalKeeper.recover``)."""
        sequence = self.journal.sequence
        held = self._held[0] if self._held else None
        outage_id = self._outages
        if before is not None:
            log.warning(
                "%d iopub messages from the remote kernel never arrived (numbers %s-%d: the"
                " server dropped them); fetching them from its output journal",
                sequence.gap_before(before),
                sequence.expected,
                before - 1,
            )
        result = await self.journal.recover(channels, casual=casual)
        if self._outages != outage_id or (result is None and channels.closed.is_set()):
            return  # a newer outage: its recovery asks for all of it and releases the held
        self._deliver(result)
        if before is not None:
            sequence.settle(before)
        elif result is not None and result.sequence is not None:
            sequence.settle(result.sequence + 1)
        if result is not None and before is not None:
            log.info("the output journal filled the gap")
        self._tell_lost(held.parent_header if held is not None else {})
        self._release()

    async def _recover(
        self, channels: RemoteChannels, outage: float, outage_id: int, *, look_again: bool
    ) -> None:
        """After an outage (``outage_id``): what the proxy missed (from the remote kernel's
        journal), then what the connections brought meanwhile, in order, each message once (the
        relay drops what it has seen); then tell the user what is known, and find the cells
        whose reply or idle the outage lost. ``look_again`` after a silence: the server may
        fall behind while it catches up (``_second_look``)."""
        result = await self.journal.recover(channels, self._unverified)
        if result is None and channels.closed.is_set() and self.journal.active:
            # Dropped again before the journal answered: the next reconnection asks again, for
            # everything after the same point, so the messages held here are not lost.
            return
        complete = None if result is None else result.complete
        if self._outages == outage_id:
            # Told first, while the cells it concerns still wait (what follows may end them).
            self.perform(self.relay.outage_over(outage, complete))
        self._deliver(result)
        if self._outages != outage_id:
            # Another outage began meanwhile: its recovery releases what is held (releasing it
            # now would move "the last message seen" past what that outage may have lost).
            return
        self._release()
        self.perform(self.relay.resend_answers())
        if result is not None:
            self._unverified = None
        if result is not None:
            self._tell_lost({})  # numbers the answer lacked (it said so: complete is False)
        # A kernel that numbers its output shows every later gap as it comes (``_fill``); one
        # that does not gets second looks, for drops while the server catches up.
        numbered = self.journal.sequence.numbered
        if look_again and result is not None and result.messages and not numbered:
            self._unverified = result.end
            self.spawn(self._second_look(channels, result.end, outage_id))
        # Whatever the journal said: a request written into the lost socket is settled only
        # once the kernel has answered everything sent before the probe.
        self.spawn(self._check_lost_replies(channels))

    async def _second_look(
        self, channels: RemoteChannels, after: dict[str, str | None], outage_id: int
    ) -> None:
        """A server that ran again after a stop has a backlog to forward, the journal's answer
        among it, and can fall behind its kernel for a while: its IOPub then drops at ZMQ's
        high-water mark with no silence the proxy could see. So look again, a moment later,
        at what the kernel sent since the end of the last answer; what the proxy lacks (dropped,
        or still in the server's backlog: the proxy cannot tell) is delivered now, with a
        notice, some of it possibly out of order rather than lost; repeat until a look finds
        nothing new, for at most ``SECOND_LOOKS`` looks."""
        late = 0
        first_late: Message | None = None
        incomplete = False
        for _ in range(SECOND_LOOKS):
            await asyncio.sleep(SECOND_LOOK_AFTER)
            if self.channels is not channels or self._outages != outage_id:
                break  # another outage: its own recovery asks
            result = await self.journal.recover(channels, after)
            if result is None or self._outages != outage_id:
                break
            new = [m for m in result.messages if not self.relay.has_seen(m.msg_id)]
            for msg in new:
                self._on_remote_message(msg)
            if result.gaps:
                self.perform(self.relay.lost_messages(result.gaps))
            if new and first_late is None:
                first_late = new[0]
            late += len(new)
            incomplete = incomplete or not result.complete
            after = self._unverified = result.end
            if not new:
                self._unverified = None
                break
        if late or incomplete:
            log.warning("fetched %d messages the server had not delivered after the outage", late)
            parent = first_late.parent_header if first_late is not None else {}
            self.perform(self.relay.late_output(late, complete=not incomplete, parent=parent))

    def _deliver(self, result: JournalAnswer | None) -> None:
        """The journal's answer to the relay: its messages, and a notice for each message it
        could not keep."""
        if result is None:
            return
        log.info("the output journal returned %d messages", len(result.messages))
        self.journal.sequence.excuse([g.sequence for g in result.gaps if g.sequence is not None])
        for msg in result.messages:
            self._on_remote_message(msg)
        if result.gaps:
            self.perform(self.relay.lost_messages(result.gaps))

    def _still_reconnecting(self) -> bool:
        """Whether the reconnector should go on (not once stopping, or the remote was lost)."""
        return not self.stopping() and self.relay.state is RemoteState.RECONNECTING

    def _drain_timeout(self) -> float:
        return max(2.0, 2 * self.ping_interval)

    async def _watch(self, channels: RemoteChannels) -> str:
        """Wait until ``channels`` closes ("closed"), stays silent too long ("stalled"), or
        leaves a ping unanswered for 1.2 intervals and then talks again ("hiccup": the server
        was not reading, and may have dropped output meanwhile)."""
        interval = self.ping_interval
        if interval <= 0:
            await channels.closed.wait()
            return "closed"
        quiet = False  # a ping went unanswered: watch closely for it coming back
        while not channels.closed.is_set():
            try:
                await asyncio.wait_for(channels.closed.wait(), interval / 4 if quiet else interval)
            except asyncio.TimeoutError:
                if channels.reading_paused:  # the frontends are behind: nothing to judge by
                    quiet = False
                    continue
                silent = channels.silent_for()
                if silent > 2 * interval:
                    return "stalled"
                if quiet and silent < interval:
                    return "hiccup"
                if silent > 1.2 * interval:
                    quiet = True
                if not quiet or silent > interval:
                    channels.ping()
        return "closed"

    async def after_restart(self, channels: RemoteChannels) -> None:
        """The server restarted a crashed kernel. The relay holds new requests meanwhile; they
        go once the new process answers, has its journal, and its iopub reaches the proxy
        (output published before the server's subscription takes hold is lost). A cell that
        slipped through to the restarting kernel anyway must not stay busy forever."""
        self.journal.iopub_heard.clear()
        await self.journal.arm(channels, lambda: None)
        self._apply_kernel_options(channels)
        if not await self.journal.iopub_flowing(channels):
            log.warning("no output from the restarted remote kernel yet; sending cells anyway")
        if self.channels is channels and self.relay.state is RemoteState.RESTARTING:
            self.perform(self.relay.remote_connected())
        await self._check_lost_replies(
            channels,
            ReplyLostError(
                "This cell was sent while the remote kernel was restarting and never reached"
                " it (the server lost it on the way to the new kernel). Run it again."
            ),
        )

    async def _check_lost_replies(
        self, channels: RemoteChannels, error: CgpuError | None = None
    ) -> None:
        """After a reconnection (or a kernel restart), a cell whose reply or final ``idle``
        never comes would stay busy forever.

        The shell channel answers in order, so a ``kernel_info_request`` sent now is answered
        only after every cell sent before it, and its ``idle`` on iopub follows theirs
        (``JournalKeeper.settled``). A cell still without a reply then has lost it: answered
        with ``error``, by default one that says the connection lost it. A cell with its reply
        but no ``idle`` is ended with a notice. (The server's REST ``execution_state`` cannot
        tell: its own kernel_info on a new connection makes a busy kernel look idle.)
        """
        waiting = self.relay.awaiting_probe()
        open_cells = self.relay.open_cells()
        if not waiting and not open_cells:
            return
        if not await self.journal.settled(channels) or self.channels is not channels:
            return
        if self._held is not None:
            return  # another outage began: its own check follows its recovery
        if self.journal.active and self.journal.sequence.numbered:
            # The end of the output (a cell's last lines, its idle) has nothing after it to
            # show a gap: ask what follows the last message delivered.
            self._held = []
            await self._fill(channels, None)
            if self._holding() is not None or self.channels is not channels:
                return  # another outage (or a gap) began: its own check follows
        # Requests the kernel never confirmed are sent again or answered (the relay decides).
        self.perform(
            self.relay.settle_after_probe(
                waiting,
                error
                or ReplyLostError(
                    "The connection dropped and nothing kept this cell's result: it (and"
                    " possibly part of its output) was lost, though the remote kernel and its"
                    " variables are fine. Run the cell again if needed."
                ),
            )
        )
        self.perform(self.relay.end_cells_without_idle(open_cells))

    async def _reconnect(
        self, stalled: RemoteChannels | None, lost: RemoteChannels | None = None
    ) -> RemoteChannels | None:
        """A working connection again: a new one, or ``stalled`` if it came back to life.

        TCP rides out short outages by itself; keeping a connection that revives avoids the
        server's switch to a new socket, the one moment a stock Jupyter server can lose output.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.reconnect_budget
        notice_after = self.outage_notice_after
        attempts: Reconnector  # made below, before the notice can fire
        notice = (
            loop.call_later(
                notice_after,
                lambda: self.perform(
                    self.relay.outage_notice(
                        loop.time() - started,
                        attempts.last_health.value if attempts.last_health else None,
                    )
                ),
            )
            if notice_after > 0
            else None
        )
        attempts = Reconnector(
            self.backend,
            open_remote=self._open_remote,
            still_wanted=lambda: (
                not self.stopping() and self.relay.state is RemoteState.RECONNECTING
            ),
            ping_interval=self.ping_interval,
            budget=self.reconnect_budget,
            auth_hint=AUTH_HINT,
            streak=self.reconnect_streak,
        )
        try:
            outcome = await attempts.run(deadline, stalled, lost)
        finally:
            if notice is not None:
                notice.cancel()
        if isinstance(outcome, CgpuError):
            self._remote_failed(outcome)
            return None
        return outcome
