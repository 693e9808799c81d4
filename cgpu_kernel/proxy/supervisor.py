"""The remote connection's life: open it, serve it, watch it, reconnect it, recover after.

``kernel.ProxyKernelRun`` owns one :class:`RemoteSupervisor` and tells it when the relay wants a
remote (:meth:`RemoteSupervisor.want`) and when the server restarted the kernel
(:meth:`RemoteSupervisor.after_restart`); the supervisor feeds the relay the remote's messages
and its connection events, and hands the relay's answers back through ``perform``. Around
that loop:

* a silent connection is pinged and, past twice the ping interval, declared stalled;
* a lost one is reconnected (``reconnect.Reconnector``), preferring the old socket if it revives;
* after an outage the output journal (``recovery.JournalKeeper``) returns what the cut lost,
  before what the new connection brought meanwhile;
* a cell whose reply the cut (or a kernel restart) lost is answered with an error, found by a
  ``kernel_info_request`` that the shell channel answers only after every cell sent before it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from cgpu_kernel.backends.base import Backend
from cgpu_kernel.core.actions import Action
from cgpu_kernel.core.relay import Relay, RemoteState
from cgpu_kernel.core.wire import Message
from cgpu_kernel.exceptions import (
    CgpuError,
    MalformedMessageError,
    ReplyLostError,
    StartupTimeoutError,
)
from cgpu_kernel.proxy.connection import MessageSink, RemoteChannels
from cgpu_kernel.proxy.options import TOKEN_ENV, ProxyKernel
from cgpu_kernel.proxy.reconnect import Reconnector
from cgpu_kernel.proxy.recovery import JournalKeeper

log = logging.getLogger("cgpu_kernel")

#: How to renew credentials a server stopped accepting (ends the reconnector's error).
AUTH_HINT = (
    f"Renew the token (update the token file; {TOKEN_ENV} cannot change under a running kernel,"
    " so restart it after changing that) and run the cell again."
)


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
        #: the working connection, None while there is none
        self.channels: RemoteChannels | None = None
        self._want_remote = asyncio.Event()

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
        ``--ping-interval``, ``--outage-notice-after`` and ``--max-message-size``."""
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
            try:
                channels = await asyncio.wait_for(self._open_remote(), self.startup_timeout)
            except asyncio.TimeoutError:
                self._remote_failed(
                    StartupTimeoutError(
                        f"{self.backend.description} was not ready within"
                        f" {self.startup_timeout:g} s. Run the cell again to retry, or"
                        " raise --startup-timeout (CGPU_STARTUP_TIMEOUT)."
                    )
                )
                continue
            except CgpuError as exc:
                self._remote_failed(exc)
                continue
            await self._serve(channels)

    def _remote_failed(self, error: CgpuError) -> None:
        log.error("%s", error)
        self.perform(self.relay.remote_failed(error))

    async def _open_remote(self) -> RemoteChannels:
        await self.backend.start_kernel()
        return await RemoteChannels.open(
            self.backend.websocket_request(self.session_id),
            self.backend.description,
            max_message_size=self.max_message_size,
        )

    def _sink(self, held: list[Message] | None = None) -> MessageSink:
        """Where a connection's messages go: answers to the proxy's own requests to the
        journal keeper, the rest to the relay, or into ``held`` while a recovery runs."""

        def sink(msg: Message) -> None:
            if self.journal.route(msg):
                return
            if held is not None:
                held.append(msg)
            else:
                self._on_remote_message(msg)

        return sink

    def _on_remote_message(self, msg: Message) -> None:
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
        if channels is not None:  # a fresh remote kernel: install its journal before any cell
            channels.deliver_to(self._sink())
            ready = asyncio.Event()
            self.spawn(self.journal.arm(channels, ready.set))
            await ready.wait()
        outage: float | None = None
        revived = False
        loop = asyncio.get_running_loop()
        while channels is not None:
            self.channels = channels
            self.connected()
            if outage is not None and not revived:
                held: list[Message] = []
                channels.deliver_to(self._sink(held))
                self.perform(self.relay.remote_connected())
                self.spawn(self._recover(channels, held, outage))
            else:
                channels.deliver_to(self._sink())
                self.perform(self.relay.remote_connected())
                if outage is not None:  # TCP carried the old socket through: nothing lost
                    self.perform(self.relay.outage_over(outage, complete=True))
            stalled = await self._watch(channels)
            self.channels = None
            if channels.sink_error is not None:  # a bug handling a message: end the run
                raise channels.sink_error
            if self.stopping():
                return
            lost_at = loop.time()
            if stalled:
                log.warning(
                    "no sign of life from %s for %.0f s; reconnecting",
                    channels.where,
                    channels.silent_for(),
                )
            else:
                log.warning("lost the connection to %s (%s)", channels.where, channels.close_reason)
            self.perform(self.relay.remote_disconnected())
            old = channels
            channels = await self._reconnect(old if stalled else None)
            outage = loop.time() - lost_at
            revived = channels is old
            if revived:
                log.warning("the connection came back by itself after %.1f s", outage)
                continue
            if stalled:
                # The server closes the stale socket once the new one registers; let the old one
                # deliver its backlog first (it keeps feeding the relay), then drop it.
                try:
                    await asyncio.wait_for(old.closed.wait(), self._drain_timeout())
                except asyncio.TimeoutError:
                    log.info("the stale connection did not drain; dropping it")
            old.abort()

    async def _recover(self, channels: RemoteChannels, held: list[Message], outage: float) -> None:
        """After a reconnection: what the cut lost (from the remote kernel's journal), then what
        the new connection brought meanwhile, in order, each message once (the relay drops
        what it has seen)."""
        result = await self.journal.recover(channels)
        if result is None and channels.closed.is_set() and self.journal.active:
            # Dropped again before the journal answered: the next reconnection asks again, for
            # everything after the same point, so the messages held here are not lost.
            return
        complete: bool | None = None
        if result is not None:
            recovered, complete = result
            log.info("the output journal returned %d messages", len(recovered))
            for msg in recovered:
                self._on_remote_message(msg)
        for msg in held:
            self._on_remote_message(msg)
        channels.deliver_to(self._sink())
        self.perform(self.relay.outage_over(outage, complete))
        if not complete:
            self.spawn(self._check_lost_replies(channels))

    def _still_reconnecting(self) -> bool:
        """Whether the reconnector should go on (not once stopping, or the remote was lost)."""
        return not self.stopping() and self.relay.state is RemoteState.RECONNECTING

    def _drain_timeout(self) -> float:
        return max(2.0, 2 * self.ping_interval)

    async def _watch(self, channels: RemoteChannels) -> bool:
        """Wait until ``channels`` closes (False) or stays silent too long (True)."""
        interval = self.ping_interval
        if interval <= 0:
            await channels.closed.wait()
            return False
        while not channels.closed.is_set():
            try:
                await asyncio.wait_for(channels.closed.wait(), interval)
            except asyncio.TimeoutError:
                if channels.silent_for() > 2 * interval:
                    return True
                channels.ping()
        return False

    async def after_restart(self, channels: RemoteChannels) -> None:
        """The server restarted a crashed kernel. The relay holds new requests meanwhile; they
        go once the new process answers, has its journal, and its iopub reaches the proxy
        (output published before the server's subscription takes hold is lost). A cell that
        slipped through to the restarting kernel anyway must not stay busy forever."""
        self.journal.iopub_heard.clear()
        await self.journal.arm(channels, lambda: None)
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
        """After a reconnection (or a kernel restart), a cell whose reply never comes would
        stay busy forever.

        The shell channel answers in order, so a ``kernel_info_request`` sent now is answered
        only after every cell sent before it. A cell still without a reply then has lost it:
        answer it with ``error``, by default one that says the connection lost it. (The
        server's REST ``execution_state`` cannot tell: its own kernel_info on a new connection
        makes a busy kernel look idle.)
        """
        waiting = self.relay.unanswered_cells()
        if not waiting:
            return
        # No time limit: the cells before the probe may run for hours.
        answered = await self.journal.kernel_info(channels, within=None)
        if answered is None or self.channels is not channels:
            return
        still = [r for r in self.relay.unanswered_cells() if r in waiting]
        self.perform(
            self.relay.fail_requests(
                still,
                error
                or ReplyLostError(
                    "The connection dropped and the server kept nothing to replay: this cell's"
                    " result (and possibly part of its output) was lost, though the remote"
                    " kernel and its variables are fine. Run the cell again if needed."
                ),
            )
        )

    async def _reconnect(self, stalled: RemoteChannels | None) -> RemoteChannels | None:
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
        )
        try:
            outcome = await attempts.run(deadline, stalled)
        finally:
            if notice is not None:
                notice.cancel()
        if isinstance(outcome, CgpuError):
            self._remote_failed(outcome)
            return None
        return outcome
