"""One run of the proxy kernel: the parts wired together, and the relay's actions performed.

:class:`ProxyKernelRun` is what ``app.ProxyKernelApp.start`` runs (and what the Colab tests run
in a thread). It binds the frontend sockets (``frontend``), builds the sans-I/O relay and its
output limits from the options, hands the remote connection to ``supervisor``, and carries out
every action the relay returns (:meth:`ProxyKernelRun.perform`, exhaustive over
:data:`~cgpu_kernel.core.actions.Action`). It also owns the run's ending: a shutdown request,
SIGTERM or the parent's exit (``lifecycle``) delete the remote kernel and close everything.

Every routing decision is the relay's; this module decides none.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Coroutine
from typing import Any

from jupyter_client.session import Session

from cgpu_kernel.backends.base import Backend
from cgpu_kernel.core.actions import (
    Action,
    AnswerRemoteRequest,
    AwaitRestartedKernel,
    CancelFiles,
    CloseRemote,
    ConnectRemote,
    EndRun,
    InterruptRemote,
    Publish,
    Request,
    RunFiles,
    SendToFrontend,
    SendToRemote,
    ShutdownRemote,
    SpoolOutput,
)
from cgpu_kernel.core.files import FileCommand
from cgpu_kernel.core.kernel_options import KernelOptions
from cgpu_kernel.core.limits import Budgets, OutputLimiter
from cgpu_kernel.core.relay import Relay, RemoteState
from cgpu_kernel.core.wire import Message
from cgpu_kernel.exceptions import CgpuError, ChannelsClosedError, FileTransferError
from cgpu_kernel.proxy.connection import RemoteChannels
from cgpu_kernel.proxy.files import FileMagic
from cgpu_kernel.proxy.frontend import FrontendSockets
from cgpu_kernel.proxy.lifecycle import install_signal_handlers, watch_parent
from cgpu_kernel.proxy.options import ProxyKernel
from cgpu_kernel.proxy.publisher import IopubPublisher
from cgpu_kernel.proxy.recovery import JournalKeeper
from cgpu_kernel.proxy.spool import SpoolWriter
from cgpu_kernel.proxy.supervisor import RemoteSupervisor
from cgpu_kernel.run.history import ExecutionTracker

if sys.version_info >= (3, 11):
    from typing import assert_never
else:  # typing_extensions is not a dependency; this is all of it that is needed
    from typing import NoReturn

    def assert_never(value: NoReturn) -> NoReturn:
        raise AssertionError(f"unhandled value: {value!r}")


log = logging.getLogger("cgpu_kernel")

#: iopub messages whose size the execution history counts as output
HISTORY_OUTPUTS = frozenset({"stream", "display_data", "execute_result", "error"})
DELETE_TIMEOUT = 30.0  # Colab: delete the kernel, list kernels, unassign the runtime
HISTORY_FLUSH_DELAY = 1.0  # execution records are written in batches, at most this late


class ProxyKernelRun:
    """One run of the proxy: from binding the sockets to deleting the remote kernel."""

    def __init__(
        self,
        options: ProxyKernel,
        connection_info: dict[str, Any],
        backend: Backend,
        kernel_options: KernelOptions | None = None,
    ) -> None:
        self.options = options
        self.backend = backend
        key = str(connection_info.get("key", "")).encode("ascii")
        self.session = Session(
            key=key,
            signature_scheme=connection_info.get("signature_scheme", "hmac-sha256"),
            username="cgpu-kernel",
        )
        session_id = self.session.session
        self.spool = SpoolWriter.from_options(options, session_id[:8])
        limiter = OutputLimiter(
            Budgets.from_options(options), session_id, spool_location=str(self.spool.folder)
        )
        self.relay = Relay(
            session_id,
            remote_description=backend.description,
            max_queue=options.max_queue,
            intercept=backend.intercepts,
            limiter=limiter,
            on_remote_death=options.on_remote_death,
        )
        self.tracker = ExecutionTracker(
            str(connection_info.get("kernel_name") or backend.description), deferred=True
        )
        self._history_flush: asyncio.TimerHandle | None = None
        self.journal = JournalKeeper.from_options(options, session_id)
        self.frontend = FrontendSockets(connection_info, self.session)
        self.frontend.on_flow = self._iopub_flow
        self.iopub = IopubPublisher.from_options(
            options, self.frontend.publish, before_status=self.spool.flush
        )
        self.remote = RemoteSupervisor.from_options(
            options,
            backend,
            self.relay,
            self.journal,
            session_id=session_id,
            perform=self.perform,
            spawn=self._spawn,
            stopping=lambda: self._stopping,
            connected=self.tracker.connected,
        )
        backend.announce_to(lambda text: self.perform(self.relay.announce(text)))
        self.remote.kernel_options = kernel_options or KernelOptions()
        self._stopped = asyncio.Event()
        #: set when the run ended because the remote kernel died: the process exits non-zero
        self.died: CgpuError | None = None
        self._stopping = False
        self._shutting_down = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._files_task: asyncio.Task[None] | None = None

    @property
    def channels(self) -> RemoteChannels | None:
        """The working connection to the remote kernel (the supervisor's), None while down."""
        return self.remote.channels

    @property
    def state(self) -> RemoteState:
        return self.relay.state

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until stopped, then delete the remote kernel and close everything."""
        self.frontend.bind()
        for loop_coroutine in self.frontend.loops(self.on_frontend, self.on_subscribe):
            self._spawn(loop_coroutine)
        self._spawn(self.remote.run())
        self._spawn(watch_parent(self.stop, lambda: self._shutting_down))
        self._install_signal_handlers()
        self.perform(self.relay.start())
        uploads = [p for p in self.options.upload_on_start.split(os.pathsep) if p.strip()]
        if uploads:
            self.perform(self.relay.files_on_start())
            commands = [FileCommand("upload", (path.strip(),)) for path in uploads]
            self._start_files(None, commands, "")
        try:
            await self._stopped.wait()
        finally:
            await self._cleanup()

    def stop(self) -> None:
        """End the run (from any callback on the loop); :meth:`run` then cleans up."""
        self._stopping = True
        self._stopped.set()

    async def _cleanup(self) -> None:
        self._stopping = True
        await self._delete_remote()
        await self.backend.close()
        self.iopub.close()
        if self._history_flush is not None:
            self._history_flush.cancel()
        self.tracker.close()
        self.spool.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.frontend.close()

    async def _delete_remote(self, restart: bool = False) -> None:
        """Close the socket and delete the remote kernel (a no-op the second time)."""
        self.remote.close()
        try:
            await asyncio.wait_for(self.backend.shutdown_kernel(restart=restart), DELETE_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning(
                "deleting the remote kernel took over %g s (for a jupyter-backend kernel,"
                " `cgpu-kernel reclaim` retries it)",
                DELETE_TIMEOUT,
            )
        except CgpuError as exc:
            log.warning("could not delete the remote kernel: %s", exc)

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed; stopping", exc_info=task.exception())
            self.stop()

    def _install_signal_handlers(self) -> None:
        """A method, so a run in a thread (the Colab tests) can leave signals alone."""
        install_signal_handlers(self._sigint, self._sigterm)

    def _sigterm(self) -> None:
        """jupyter_client sends SIGTERM when a shutdown takes longer than it waits (5 s).

        A shutdown already deleting the remote kernel (releasing a Colab runtime takes several
        calls) is let finish; otherwise stop now, deleting the remote kernel on the way out.
        """
        if self._shutting_down:
            log.info("SIGTERM during shutdown: finishing the remote kernel's deletion first")
            return
        self.stop()

    def _sigint(self) -> None:
        """``interrupt_mode: signal``: the frontend signalled us; interrupt the remote."""
        self.perform(self.relay.signal_interrupt())

    # --- relay events and actions -------------------------------------------------------------

    def on_frontend(self, channel: str, identities: tuple[bytes, ...], msg: Message) -> None:
        """A verified message from a frontend socket (``frontend``'s receive loops call this)."""
        if channel == "shell" and msg.msg_type == "execute_request":
            self.tracker.request(msg.msg_id)
        actions = self.relay.frontend_message(channel, identities, msg)
        msg.shed()  # before it is sent: a large content's parse is not held beside its fragments
        self.perform(actions)

    def on_subscribe(self, topic: bytes) -> None:
        """A frontend subscribed to iopub (the XPUB socket's loop calls this)."""
        self.perform(self.relay.subscribed(topic))

    def perform(self, actions: list[Action]) -> None:
        """Carry out the relay's ``actions`` in order; every event handler ends here.

        The ``match`` is exhaustive: a new action type in ``core.actions`` fails ``mypy`` at
        ``assert_never`` until a branch here performs it.
        """
        for action in actions:
            match action:
                case SendToRemote():
                    self._send_remote(action.request)
                case SendToFrontend():
                    if action.msg.msg_type == "execute_reply":
                        self.tracker.reply(action.msg.parent_id or "", action.msg.content)
                        self._schedule_history()
                    self.frontend.send(action.channel, action.identities, action.msg)
                case Publish():
                    self._publish(action.msg)
                case SpoolOutput():
                    failure = self.spool.write(action.name, action.data)
                    if failure is not None:  # a full disk, no permission: the cell is told
                        self.perform(self.relay.spool_failed(failure))
                case CancelFiles():
                    if self._files_task is not None:
                        self._files_task.cancel()  # a %cgpu transfer: it cleans up and ends
                case InterruptRemote():
                    self._spawn(self._interrupt(action.request))
                case ShutdownRemote():
                    self._spawn(self._shutdown(action.request, action.restart))
                case ConnectRemote():
                    self.remote.want()
                case CloseRemote():
                    self.remote.close()
                case AnswerRemoteRequest():
                    self._spawn(self._answer_remote(action.msg, action.request))
                case AwaitRestartedKernel():
                    if self.channels is not None:
                        self._spawn(self.remote.after_restart(self.channels))
                case RunFiles():
                    self._start_files(action.request, [action.command], action.command.rest)
                case EndRun():
                    self._end_with_remote(action.error)
                case _:
                    assert_never(action)

    def _end_with_remote(self, error: CgpuError) -> None:
        """The remote kernel died (``on_remote_death = exit``): say so once in the log, then
        end the run; the cleanup deletes what the server kept of the remote kernel (a restarted
        process), so none is left behind, and the frontend sees this kernel die."""
        if self.died is not None:
            return
        self.died = error
        log.error("exiting: %s", error)
        self.iopub.flush()  # the cells' error outputs go out before the sockets close
        self.stop()

    def _publish(self, msg: Message) -> None:
        """Count ``msg`` in the execution history, then publish it on iopub."""
        if msg.msg_type in HISTORY_OUTPUTS:
            self.tracker.output(msg.parent_id or "", msg.size)
        elif msg.msg_type == "status" and msg.content.get("execution_state") == "idle":
            self.tracker.idle(msg.parent_id or "")
            self._schedule_history()
        self.iopub.publish(msg)

    def _iopub_flow(self, full: bool) -> None:
        """Flow control: while the frontends' iopub queue is full the remote's WebSocket is not
        read, so a fast producer waits in the server (and its kernel) instead of here."""
        channels = self.channels
        if channels is not None:
            if full:
                channels.pause_reading()
            else:
                channels.resume_reading()

    def _schedule_history(self) -> None:
        if self.tracker.unwritten and self._history_flush is None:
            self._history_flush = asyncio.get_running_loop().call_later(
                HISTORY_FLUSH_DELAY, self._flush_history
            )

    def _flush_history(self) -> None:
        self._history_flush = None
        self.tracker.flush()

    def _send_remote(self, request: Request) -> None:
        channels = self.channels
        if channels is None:
            self.perform(self.relay.send_failed(request, connection_alive=False))
            return
        try:
            written = channels.send(request.msg)
        except ChannelsClosedError:
            self.perform(self.relay.send_failed(request, connection_alive=False))
            return

        def check(future: asyncio.Future[None]) -> None:
            # A write cut short by a dropped connection never reached the server: send again.
            if not future.cancelled() and future.exception() is not None:
                alive = self.channels is not None and self.channels is not channels
                self.perform(self.relay.send_failed(request, connection_alive=alive))

        written.add_done_callback(check)

    async def _interrupt(self, request: Request | None) -> None:
        """REST interrupt; ``request`` is None for a SIGINT, which gets no reply."""
        error: CgpuError | None = None
        try:
            await self.backend.interrupt_kernel()
        except CgpuError as exc:
            # jupyter_client interrupts right before a shutdown: that race is not worth a warning
            log.log(
                logging.INFO if self._stopping else logging.WARNING, "interrupt failed: %s", exc
            )
            error = exc
        if request is not None:
            self.perform(self.relay.interrupt_finished(request, error))

    async def _answer_remote(self, msg: Message, request: Request | None) -> None:
        def notify(text: str, *, link: str | None = None) -> None:
            self.perform(self.relay.notice(request, text, link=link))

        try:
            content = await self.backend.answer_kernel_request(msg, notify)
        except CgpuError as exc:
            notify(f"cgpu-kernel: {exc}")
            content = {"value": {"type": "error", "error": str(exc)}}
        if content is not None:  # None: the kernel expects no answer
            self.perform(self.relay.answer_remote(msg, content))

    def _start_files(self, request: Request | None, commands: list[FileCommand], rest: str) -> None:
        task = asyncio.ensure_future(self._run_files(request, commands, rest))
        self._files_task = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _run_files(
        self, request: Request | None, commands: list[FileCommand], rest: str
    ) -> None:
        """``%cgpu`` commands (``proxy.files``) with their output in the cell (``request``;
        None: the ``upload_on_start`` uploads, logged); then the relay answers the cell or
        sends the rest of it on."""

        def emit(text: str) -> None:
            if request is None:
                if not text.startswith("\r"):
                    log.info("upload_on_start: %s", text.strip())
                return
            self.perform(self.relay.files_output(request, text))

        error: CgpuError | None = None
        try:
            for command in commands:
                await FileMagic(self.backend.contents_target, emit).run(command)
        except CgpuError as exc:
            error = exc
        except asyncio.CancelledError:
            if self._stopping:
                raise
            error = FileTransferError("Interrupted: the transfer was stopped; nothing was kept.")
            error.ename = "KeyboardInterrupt"
        finally:
            self._files_task = None
        if error is not None:
            log.warning("%%cgpu %s failed: %s", commands[0].verb, error)
        self.perform(self.relay.files_finished(request, rest, error))

    async def _shutdown(self, request: Request, restart: bool) -> None:
        self._stopping = self._shutting_down = True
        await self._delete_remote(restart=restart)
        self.perform(self.relay.shutdown_finished(request, restart))
        self.stop()
