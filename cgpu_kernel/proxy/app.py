"""The proxy kernel process: ``python -m cgpu_kernel -f {connection_file}``.

Wires the parts together and owns the lifecycle: binds the frontend sockets, asks the backend
for a remote kernel, opens the channels WebSocket, reconnects it when it drops, forwards
interrupts (message or SIGINT) to the remote over REST, and deletes the remote kernel on
shutdown, on SIGTERM, and when the frontend that started it disappears.

Every routing decision is the relay's; this module performs the relay's actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.session import Session
from jupyter_core.paths import jupyter_config_path
from traitlets import Bool, TraitError, Unicode
from traitlets.config import Application

from cgpu_kernel import __version__, kernelspec
from cgpu_kernel.backends.base import Backend
from cgpu_kernel.backends.unavailable import UnavailableBackend
from cgpu_kernel.core.limits import Budgets, Coalescer, OutputLimiter
from cgpu_kernel.core.relay import (
    Action,
    AnswerRemoteRequest,
    AwaitRestartedKernel,
    CloseRemote,
    ConnectRemote,
    InterruptRemote,
    Publish,
    Relay,
    RemoteState,
    Request,
    SendToFrontend,
    SendToRemote,
    ShutdownRemote,
    SpoolOutput,
)
from cgpu_kernel.core.wire import Message
from cgpu_kernel.exceptions import (
    CgpuError,
    ChannelsClosedError,
    ConfigurationError,
    MalformedMessageError,
    ReplyLostError,
    StartupTimeoutError,
)
from cgpu_kernel.paths import default_spool_root
from cgpu_kernel.proxy.connection import MessageSink, RemoteChannels
from cgpu_kernel.proxy.frontend import FrontendSockets
from cgpu_kernel.proxy.options import ProxyKernel
from cgpu_kernel.proxy.reconnect import Reconnector
from cgpu_kernel.proxy.recovery import JournalKeeper
from cgpu_kernel.proxy.spool import SpoolWriter
from cgpu_kernel.proxy.spool import clean as clean_spool
from cgpu_kernel.proxy.winevents import watch_interrupt_event
from cgpu_kernel.run.history import ExecutionTracker

log = logging.getLogger("cgpu_kernel")

#: iopub messages whose size the execution history counts as output
HISTORY_OUTPUTS = frozenset({"stream", "display_data", "execute_result", "error"})
DELETE_TIMEOUT = 30.0  # Colab: delete the kernel, list kernels, unassign the runtime
HISTORY_FLUSH_DELAY = 1.0  # execution records are written in batches, at most this late


class ProxyKernelRun:
    """One run of the proxy: from binding the sockets to deleting the remote kernel."""

    def __init__(
        self, options: ProxyKernel, connection_info: dict[str, Any], backend: Backend
    ) -> None:
        self.options = options
        self.backend = backend
        key = str(connection_info.get("key", "")).encode("ascii")
        self.session = Session(
            key=key,
            signature_scheme=connection_info.get("signature_scheme", "hmac-sha256"),
            username="cgpu-kernel",
        )
        spool_root = Path(options.spool_dir) if options.spool_dir else default_spool_root()
        try:
            clean_spool(
                spool_root,
                max_age_days=options.spool_max_age_days,
                max_total_bytes=options.spool_max_total_bytes,
            )
        except OSError as exc:
            log.warning("could not clean old saved outputs in %s: %s", spool_root, exc)
        run_name = time.strftime("%Y%m%d-%H%M%S") + "-" + self.session.session[:8]
        self.spool = SpoolWriter(spool_root / run_name)
        limiter = OutputLimiter(
            Budgets(
                max_stream_bytes=options.max_output_bytes,
                max_rich_bytes=options.max_rich_output_bytes,
                max_rich_item_bytes=options.max_rich_item_bytes,
                tail_lines=options.output_tail_lines,
            ),
            self.session.session,
            spool_location=str(self.spool.folder),
        )
        self.relay = Relay(
            self.session.session,
            remote_description=backend.description,
            max_queue=options.max_queue,
            intercept=backend.intercepts,
            limiter=limiter,
        )
        self.tracker = ExecutionTracker(
            str(connection_info.get("kernel_name") or backend.description), deferred=True
        )
        self._history_flush: asyncio.TimerHandle | None = None
        self.journal = JournalKeeper(
            self.session.session,
            enabled=options.output_journal,
            max_messages=options.journal_max_messages,
            max_bytes=options.journal_max_bytes,
        )
        self.coalescer = Coalescer()
        self._flush_handle: asyncio.TimerHandle | None = None
        self._last_stream = 0.0
        self.frontend = FrontendSockets(connection_info, self.session)
        self.channels: RemoteChannels | None = None
        self._want_remote = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopping = False
        self._shutting_down = False
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle ----------------------------------------------------------------------------

    async def run(self) -> None:
        self.frontend.bind()
        for loop_coroutine in self.frontend.loops(self.on_frontend, self.on_subscribe):
            self._spawn(loop_coroutine)
        self._spawn(self._supervise_remote())
        self._spawn(self._watch_parent())
        self._install_signal_handlers()
        self.perform(self.relay.start())
        try:
            await self._stopped.wait()
        finally:
            await self._cleanup()

    def stop(self) -> None:
        self._stopping = True
        self._stopped.set()

    async def _cleanup(self) -> None:
        self._stopping = True
        await self._delete_remote()
        await self.backend.close()
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()
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
        if self.channels is not None:
            self.channels.close()
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
        loop = asyncio.get_running_loop()
        if sys.platform == "win32":
            signal.signal(signal.SIGINT, lambda *_: loop.call_soon_threadsafe(self._sigint))
            watch_interrupt_event(lambda: loop.call_soon_threadsafe(self._sigint))
            return
        loop.add_signal_handler(signal.SIGINT, self._sigint)
        loop.add_signal_handler(signal.SIGTERM, self._sigterm)

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

    async def _watch_parent(self) -> None:
        """Stop (deleting the remote kernel) when the frontend that launched us is gone."""
        # jupyter_client names the launcher in JPY_PARENT_PID: reading our parent instead could
        # find init already, had the launcher died before this line ran.
        try:
            pid = int(os.environ.get("JPY_PARENT_PID") or os.getppid())
            parent = psutil.Process(pid)
        except (psutil.Error, ValueError):
            log.warning("the frontend process that launched this kernel is gone; shutting down")
            self.stop()
            return
        if parent.pid == 1:
            return
        while True:
            if not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE:
                log.warning("the frontend process %d is gone; shutting down", parent.pid)
                self.stop()
                return
            await asyncio.sleep(1.0)

    # --- relay events and actions -------------------------------------------------------------

    def on_frontend(self, channel: str, identities: tuple[bytes, ...], msg: Message) -> None:
        if channel == "shell" and msg.msg_type == "execute_request":
            self.tracker.request(msg.msg_id)
        self.perform(self.relay.frontend_message(channel, identities, msg))

    def on_subscribe(self, topic: bytes) -> None:
        self.perform(self.relay.subscribed(topic))

    def perform(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendToRemote):
                self._send_remote(action.request)
            elif isinstance(action, SendToFrontend):
                if action.msg.msg_type == "execute_reply":
                    self.tracker.reply(action.msg.parent_id or "", action.msg.content)
                    self._schedule_history()
                self.frontend.send(action.channel, action.identities, action.msg)
            elif isinstance(action, Publish):
                if action.msg.msg_type in HISTORY_OUTPUTS:
                    self.tracker.output(action.msg.parent_id or "", action.msg.size)
                elif (
                    action.msg.msg_type == "status"
                    and action.msg.content.get("execution_state") == "idle"
                ):
                    self.tracker.idle(action.msg.parent_id or "")
                    self._schedule_history()
                self._publish(action.msg)
            elif isinstance(action, SpoolOutput):
                self.spool.write(action.name, action.data)
            elif isinstance(action, InterruptRemote):
                self._spawn(self._interrupt(action.request))
            elif isinstance(action, ShutdownRemote):
                self._spawn(self._shutdown(action.request, action.restart))
            elif isinstance(action, ConnectRemote):
                self._want_remote.set()
            elif isinstance(action, CloseRemote):
                if self.channels is not None:
                    self.channels.close()
            elif isinstance(action, AnswerRemoteRequest):
                self._spawn(self._answer_remote(action.msg, action.request))
            elif isinstance(action, AwaitRestartedKernel) and self.channels is not None:
                self._spawn(self._after_restart(self.channels))

    def _schedule_history(self) -> None:
        if self.tracker.unwritten and self._history_flush is None:
            self._history_flush = asyncio.get_running_loop().call_later(
                HISTORY_FLUSH_DELAY, self._flush_history
            )

    def _flush_history(self) -> None:
        self._history_flush = None
        self.tracker.flush()

    def _publish(self, msg: Message) -> None:
        """Publish on iopub, merging bursts of stream messages (leading edge goes at once)."""
        window = self.options.coalesce_window
        if msg.msg_type == "status":
            self.spool.flush()
        if window <= 0:
            self.frontend.publish(msg)
            return
        now = time.monotonic()
        idle_stream = msg.msg_type == "stream" and not self.coalescer.pending
        if idle_stream and now - self._last_stream >= window:
            self._last_stream = now
            self.frontend.publish(msg)
            return
        for ready in self.coalescer.add(msg):
            self.frontend.publish(ready)
        if self.coalescer.pending and self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(window, self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        self._last_stream = time.monotonic()
        for ready in self.coalescer.flush():
            self.frontend.publish(ready)

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
        def notify(text: str) -> None:
            self.perform(self.relay.notice(request, text))

        try:
            content = await self.backend.answer_kernel_request(msg, notify)
        except CgpuError as exc:
            notify(f"cgpu-kernel: {exc}")
            content = {"value": {"type": "error", "error": str(exc)}}
        self.perform(self.relay.answer_remote(msg, content))

    async def _shutdown(self, request: Request, restart: bool) -> None:
        self._stopping = self._shutting_down = True
        await self._delete_remote(restart=restart)
        self.perform(self.relay.shutdown_finished(request, restart))
        self.stop()

    # --- the remote side ----------------------------------------------------------------------

    async def _supervise_remote(self) -> None:
        while not self._stopping:
            await self._want_remote.wait()
            self._want_remote.clear()
            if self._stopping:
                return
            try:
                channels = await asyncio.wait_for(self._open_remote(), self.options.startup_timeout)
            except asyncio.TimeoutError:
                self._remote_failed(
                    StartupTimeoutError(
                        f"{self.backend.description} was not ready within"
                        f" {self.options.startup_timeout:g} s. Run the cell again to retry, or"
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
            self.backend.websocket_request(self.session.session),
            self.backend.description,
            max_message_size=self.options.max_message_size,
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
            self._spawn(self.journal.arm(channels, ready.set))
            await ready.wait()
        outage: float | None = None
        revived = False
        loop = asyncio.get_running_loop()
        while channels is not None:
            self.channels = channels
            self.tracker.connected()
            if outage is not None and not revived:
                held: list[Message] = []
                channels.deliver_to(self._sink(held))
                self.perform(self.relay.remote_connected())
                self._spawn(self._recover(channels, held, outage))
            else:
                channels.deliver_to(self._sink())
                self.perform(self.relay.remote_connected())
                if outage is not None:  # TCP carried the old socket through: nothing lost
                    self.perform(self.relay.outage_over(outage, complete=True))
            stalled = await self._watch(channels)
            self.channels = None
            if self._stopping:
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
            self._spawn(self._check_lost_replies(channels))

    def _drain_timeout(self) -> float:
        return max(2.0, 2 * self.options.ping_interval)

    async def _watch(self, channels: RemoteChannels) -> bool:
        """Wait until ``channels`` closes (False) or stays silent too long (True)."""
        interval = self.options.ping_interval
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

    async def _after_restart(self, channels: RemoteChannels) -> None:
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
        deadline = started + self.options.reconnect_budget
        notice_after = self.options.outage_notice_after
        notice = (
            loop.call_later(
                notice_after,
                lambda: self.perform(self.relay.outage_notice(loop.time() - started)),
            )
            if notice_after > 0
            else None
        )
        attempts = Reconnector(
            self.backend,
            open_remote=self._open_remote,
            still_wanted=lambda: not self._stopping and self.state is RemoteState.RECONNECTING,
            ping_interval=self.options.ping_interval,
            budget=self.options.reconnect_budget,
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

    @property
    def state(self) -> RemoteState:
        return self.relay.state


class ProxyKernelApp(Application):
    """``python -m cgpu_kernel -f CONNECTION_FILE``: the kernel process frontends launch."""

    name = "cgpu-kernel"
    version = __version__
    description = "A Jupyter kernel that runs cells on a remote kernel (Colab, Jupyter server)."
    classes = [ProxyKernel]  # noqa: RUF012 - traitlets reads this class attribute
    connection_file = Unicode("", config=True, help="Connection file written by the frontend.")
    # -f, --log-level, and every ProxyKernel option as --kebab-case-name
    aliases = {  # noqa: RUF012 - traitlets reads this class attribute
        "f": "ProxyKernelApp.connection_file",
        "log-level": "Application.log_level",
        **{
            name.replace("_", "-"): f"ProxyKernel.{name}"
            for name in ProxyKernel.class_trait_names(config=True)
        },
    }

    # A config file that does not run is an error shown in the cell, not a log line skipped past.
    raise_config_file_errors = Bool(True)
    #: set when the command line itself could not be used: the kernel still comes up and says so
    launch_error: ConfigurationError | None = None

    def start(self) -> None:
        if not self.connection_file:
            raise ConfigurationError("Give the connection file with -f CONNECTION_FILE.")
        config_error = self.launch_error
        try:
            self.load_config_file("cgpu_kernel_config", path=jupyter_config_path())
        except Exception as exc:  # a config file is Python: it can fail in any way
            config_error = config_error or ConfigurationError(
                f"The config file cgpu_kernel_config.py could not be loaded ({exc}). Fix it"
                " (`jupyter --paths` lists where it is looked for), then restart the kernel."
            )
        logging.basicConfig(
            level=int(self.log_level),  # type: ignore[call-overload]
            format="[cgpu-kernel %(levelname)s %(asctime)s %(name)s] %(message)s",
            stream=sys.stderr,
        )
        try:
            connection_info = json.loads(Path(self.connection_file).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"Cannot read the connection file {self.connection_file}: {exc}. Frontends write"
                " it before starting the kernel; check the kernelspec's argv."
            ) from None
        try:
            options = ProxyKernel(parent=self)
        except TraitError as exc:
            options = ProxyKernel()
            config_error = config_error or ConfigurationError(
                f"A kernel option has a value cgpu-kernel cannot use: {exc} Fix it in the"
                " kernelspec (reinstall with `cgpu-kernel install ... --option NAME=VALUE`) or in"
                " cgpu_kernel_config.py, then restart the kernel."
            )
        try:
            if config_error is not None:
                raise config_error
            options.check_environment()
            backend: Backend = options.make_backend()
        except CgpuError as exc:
            # Stay up and show the error in the cell: a kernel that exits at once only makes
            # the frontend restart it in a loop, with the reason buried in a log.
            log.error("%s", exc)
            backend = UnavailableBackend(exc)
        if sys.platform == "win32":
            asyncio.set_event_loop_policy(asyncio.WindowsSelectorEventLoopPolicy())  # type: ignore[attr-defined]
        asyncio.run(ProxyKernelRun(options, connection_info, backend).run())


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def launch_kernel(argv: list[str]) -> None:
    app = ProxyKernelApp()
    recorder = _Recorder()
    app.log.addHandler(recorder)  # traitlets reports a bad value here, then exits
    captured = io.StringIO()  # argparse writes an unknown option's error to stderr, then exits
    try:
        try:
            with contextlib.redirect_stderr(captured):
                app.initialize(argv)
        except SystemExit as exc:
            sys.stderr.write(captured.getvalue())
            connection_file = kernelspec.argv_option(argv, *kernelspec.CONNECTION_FILE_OPTIONS)
            if exc.code in (0, None) or connection_file is None:
                raise
            # Come up anyway and say what is wrong in the cell: a kernel that exits at once
            # only makes the frontend restart it in a loop, the reason buried in a log.
            said = [line for line in captured.getvalue().splitlines() if "error:" in line]
            reason = "; ".join(recorder.lines + said) or "see the kernel's log"
            app = ProxyKernelApp(connection_file=connection_file)
            app.launch_error = ConfigurationError(
                f"The kernel's command line could not be used ({reason}). Reinstall the"
                " kernelspec with `cgpu-kernel install` (options as --option NAME=VALUE), then"
                " restart the kernel."
            )
        else:
            sys.stderr.write(captured.getvalue())
        app.log.removeHandler(recorder)
        app.start()
    except CgpuError as exc:
        print(f"cgpu-kernel: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
