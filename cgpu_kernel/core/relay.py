"""The relay core: every routing decision between local frontends and the remote kernel.

Sans-I/O, in the style of the ``websockets`` protocol core: the ZMQ shell (``frontend``) and the
WebSocket shell (``connection``) feed events in by calling methods, and each method returns the
actions to carry out, in order. Nothing here touches a socket, a clock or an event loop, so
every rule below is a fast, deterministic unit test.

Rules the relay enforces:

* A reply goes back to the identity (and channel) whose request caused it; an ``input_request``
  goes to the stdin socket of the identity that sent the ``execute_request``. Several frontends
  may share one kernel.
* Requests that arrive before the remote is connected, or while it reconnects, are queued (up to
  ``max_queue``) and sent in order once it is; nothing is sent twice.
* A message the remote sends twice (a server replay after a reconnect) reaches frontends once:
  the relay remembers recent ``msg_id``\\ s.
* ``interrupt_request`` and ``shutdown_request`` (on control, or on shell as some VS Code versions
  send them) are not forwarded: the remote server's REST API does them, which works even when the
  remote kernel is too busy to read its control channel.
* No request is left without an answer: when the remote fails, is lost, or the proxy shuts down,
  every waiting request gets an error reply naming the reason, with ``busy``/``idle`` around it,
  so no cell stays "busy" forever.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from cgpu_kernel import __version__
from cgpu_kernel.core.actions import (
    Action,
    AnswerRemoteRequest,
    AwaitRestartedKernel,
    CloseRemote,
    ConnectRemote,
    InterruptRemote,
    Publish,
    Request,
    SendToFrontend,
    SendToRemote,
    ShutdownRemote,
    SpoolOutput,
)
from cgpu_kernel.core.limits import OutputLimiter, Show, SpoolFailure, stream_notice
from cgpu_kernel.core.wire import PROTOCOL_VERSION, JsonDict, Message, make_header
from cgpu_kernel.exceptions import CgpuError, RemoteKernelGoneError

log = logging.getLogger(__name__)

#: What a frontend gets from ``kernel_info_request`` while no remote kernel has answered one.
FALLBACK_LANGUAGE_INFO: JsonDict = {
    "name": "python",
    "version": "3",
    "mimetype": "text/x-python",
    "file_extension": ".py",
    "pygments_lexer": "ipython3",
    "codemirror_mode": {"name": "ipython", "version": 3},
    "nbconvert_exporter": "python",
}


class RemoteState(Enum):
    CONNECTING = "connecting"  # first connection (or a fresh kernel) on its way
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # the socket dropped; the same remote kernel is expected back
    RESTARTING = "restarting"  # the server restarts a crashed kernel; requests wait until it is up
    FAILED = "failed"  # no remote; the next request asks for a new attempt
    SHUTTING_DOWN = "shutting_down"


@dataclass
class _RecentIds:
    """A bounded set of message ids, oldest forgotten first."""

    limit: int
    _ids: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def add(self, msg_id: str) -> bool:
        """Remember ``msg_id``; False when it was already known."""
        if msg_id in self._ids:
            return False
        self._ids[msg_id] = None
        if len(self._ids) > self.limit:
            self._ids.popitem(last=False)
        return True


class _InflightRequests:
    """Requests sent to the remote and not yet answered, found again by their ``msg_id``.

    Two frontends may send the same ``msg_id`` (each numbers its own messages; nothing makes
    ids unique across clients). ipykernel tells them apart by the ROUTER identity; the remote
    sees one WebSocket, so here requests sharing an id are kept in the order they were sent,
    and a reply goes to the oldest one on its channel: the remote kernel answers each channel
    in order, so that is the identity whose request it answers.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, list[Request]] = {}

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._by_id

    def add(self, request: Request) -> None:
        self._by_id.setdefault(request.msg.msg_id, []).append(request)

    def get(self, msg_id: str, channel: str | None = None) -> Request | None:
        """The oldest request with ``msg_id`` (on ``channel`` when one of them is)."""
        requests = self._by_id.get(msg_id)
        if not requests:
            return None
        if channel is not None:
            for request in requests:
                if request.channel == channel:
                    return request
        return requests[0]

    def remove(self, request: Request) -> bool:
        """Forget ``request`` (this very one, not another frontend's with the same id)."""
        requests = self._by_id.get(request.msg.msg_id)
        if not requests:
            return False
        for index, candidate in enumerate(requests):
            if candidate is request:
                del requests[index]
                if not requests:
                    del self._by_id[request.msg.msg_id]
                return True
        return False

    def values(self) -> list[Request]:
        return [request for requests in self._by_id.values() for request in requests]

    def clear(self) -> None:
        self._by_id.clear()


class Relay:
    """The routing state machine. One per proxy kernel process."""

    def __init__(
        self,
        session: str,
        *,
        remote_description: str = "the remote kernel",
        max_queue: int = 1000,
        dedupe_window: int = 65536,
        intercept: Callable[[Message], bool] | None = None,
        limiter: OutputLimiter | None = None,
    ) -> None:
        self.session = session
        self.intercept = intercept
        self.limiter = limiter
        self.remote_description = remote_description
        self.max_queue = max_queue
        self.state = RemoteState.CONNECTING
        self.last_error: CgpuError | None = None
        self._inflight = _InflightRequests()
        self._queue: deque[Request] = deque()
        self._seen = _RecentIds(dedupe_window)
        self._kernel_info: JsonDict | None = None
        self._execution_count = 0
        self._announced_busy: set[str] = set()  # queued requests already shown as busy
        self._told_outage: set[str] = set()  # cells told the connection is down
        self._state_lost = False  # the remote kernel died: tell the next cell it starts afresh

    # --- introspection (tests, status notices) ------------------------------------------------

    @property
    def inflight(self) -> list[Request]:
        return list(self._inflight.values())

    @property
    def queued(self) -> list[Request]:
        return list(self._queue)

    # --- events from the frontend side --------------------------------------------------------

    def start(self) -> list[Action]:
        """The proxy process is up: say ``starting`` and ask for the remote."""
        return [self._status("starting", None), ConnectRemote()]

    def subscribed(self, topic: bytes) -> list[Action]:
        """A frontend subscribed to iopub (JEP 65): welcome it."""
        subscription = topic.decode("utf-8", "replace")
        return [Publish(self._make("iopub", "iopub_welcome", {"subscription": subscription}))]

    def frontend_message(
        self, channel: str, identities: tuple[bytes, ...], msg: Message
    ) -> list[Action]:
        """A verified message arrived from a frontend on ``channel``."""
        request = Request(channel, identities, msg)
        msg_type = msg.msg_type
        if msg_type == "interrupt_request" and channel in ("control", "shell"):
            return self._interrupt(request)
        if msg_type == "shutdown_request" and channel in ("control", "shell"):
            self.state = RemoteState.SHUTTING_DOWN
            restart = bool(msg.content.get("restart", False))
            return [self._status("busy", msg), ShutdownRemote(request, restart)]
        if self.state is RemoteState.SHUTTING_DOWN:
            return self._fail(request, CgpuError("The kernel is shutting down."))
        if msg_type == "kernel_info_request" and self.state is RemoteState.FAILED:
            return self._local_kernel_info(request)
        if self.state is RemoteState.CONNECTED:
            return self._forward(request)
        return self._enqueue(request)

    def interrupt_finished(self, request: Request, error: CgpuError | None) -> list[Action]:
        """The REST interrupt for ``request`` completed (``error`` is None on success)."""
        if error is None:
            content: JsonDict = {"status": "ok"}
        else:
            content = self._error_content(error)
        return [
            self._reply(request, "interrupt_reply", content),
            self._status("idle", request.msg),
        ]

    def shutdown_finished(self, request: Request, restart: bool) -> list[Action]:
        """The remote kernel is gone for good: answer the shutdown and every waiting request."""
        actions = self._fail_waiting(CgpuError("The kernel was shut down before this finished."))
        actions.append(self._reply(request, "shutdown_reply", {"status": "ok", "restart": restart}))
        actions.append(self._status("idle", request.msg))
        return actions

    # --- events from the remote side ----------------------------------------------------------

    def remote_connected(self) -> list[Action]:
        """The WebSocket to the remote kernel is open: send what waited, in order."""
        self.state = RemoteState.CONNECTED
        self.last_error = None
        actions: list[Action] = []
        while self._queue:
            actions.extend(self._forward(self._queue.popleft()))
        return actions

    def outage_over(self, seconds: float, complete: bool | None) -> list[Action]:
        """A reconnection finished bringing back what it could; cells told about the outage are
        told it is over, and whether anything is missing.

        ``complete`` is True when the remote kernel's journal returned everything after the last
        message received, False when its record did not reach back far enough, and None when
        there is no journal (the server's replay is all there is).
        """
        if complete is True:
            outcome = "nothing was lost."
        elif complete is False:
            outcome = (
                "the kernel's record of its output did not reach back far enough, so some"
                " output from the outage may be missing."
            )
        else:
            outcome = "the output the server kept meanwhile follows."
        actions: list[Action] = []
        for request in self._waiting_cells():
            if request.msg.msg_id in self._told_outage:
                text = f"cgpu-kernel: reconnected after {seconds:.0f} s; {outcome}"
                actions.append(self._notice(request.msg, text))
        self._told_outage.clear()
        return actions

    def remote_disconnected(self) -> list[Action]:
        """The socket dropped; the same remote kernel is expected back, so keep everything."""
        if self.state in (RemoteState.CONNECTED, RemoteState.RESTARTING):
            self.state = RemoteState.RECONNECTING
        return []

    def send_failed(self, request: Request, *, connection_alive: bool) -> list[Action]:
        """Writing ``request`` failed because its socket closed: send it again.

        ``connection_alive`` says whether the proxy has a working connection now (the failure
        was on an older one): then the request goes out at once, otherwise it waits in order.
        """
        self._inflight.remove(request)
        if connection_alive and self.state is RemoteState.CONNECTED:
            return self._forward(request)
        self._queue.append(request)
        return self.remote_disconnected()

    def outage_notice(self, seconds: float, kernel_health: str | None = None) -> list[Action]:
        """The connection has been down for ``seconds``: tell the cells waiting on it, once.

        ``kernel_health`` is the server's last answer about the kernel (``backends.base.
        KernelHealth``'s value: "alive", "unreachable"...; None before the first check). The
        notice says only what that answer shows: a killed server takes its kernels with it, so
        "unreachable" is no sign the cell still runs.
        """
        if kernel_health == "alive":
            known = "The server says the kernel is still running."
        elif kernel_health == "unreachable":
            known = (
                "The server does not answer, so whether the kernel (and this cell) still runs is"
                " not known."
            )
        else:
            known = "Whether the kernel (and this cell) still runs is not known yet."
        actions: list[Action] = []
        for request in self._waiting_cells():
            if request.msg.msg_id not in self._told_outage:
                self._told_outage.add(request.msg.msg_id)
                actions.append(
                    self._notice(
                        request.msg,
                        f"cgpu-kernel: lost the connection to {self.remote_description}"
                        f" {seconds:.0f} s ago; reconnecting. {known}",
                    )
                )
        return actions

    def unanswered_cells(self) -> list[Request]:
        """Cells sent to the remote that have no reply yet."""
        return [r for r in self._inflight.values() if r.msg.msg_type == "execute_request"]

    def fail_requests(self, requests: list[Request], error: CgpuError) -> list[Action]:
        """Answer the given waiting requests with ``error`` (their replies were lost)."""
        actions: list[Action] = []
        for request in requests:
            if self._inflight.remove(request):
                actions.extend(self._fail(request, error))
        return actions

    def _waiting_cells(self) -> list[Request]:
        return [
            r
            for r in [*self._inflight.values(), *self._queue]
            if r.msg.msg_type == "execute_request"
        ]

    def remote_failed(self, error: CgpuError) -> list[Action]:
        """No remote kernel (could not start, lost, or gave up reconnecting).

        Every request waiting on the remote is answered with ``error`` at once; the next
        request asks for a fresh attempt.
        """
        if self.state is RemoteState.SHUTTING_DOWN:
            return []
        self.state = RemoteState.FAILED
        self.last_error = error
        self._state_lost = isinstance(error, RemoteKernelGoneError)
        return self._fail_waiting(error)

    def remote_message(self, msg: Message) -> list[Action]:
        """A message from the remote kernel."""
        if not self._seen.add(msg.msg_id):
            log.debug("dropping replayed duplicate %s", msg)
            return []
        # a pure predicate (Backend.intercepts): answering is the I/O shell's, via the action
        if self.intercept is not None and self.intercept(msg):
            parent_id = msg.parent_id
            return [AnswerRemoteRequest(msg, self._inflight.get(parent_id) if parent_id else None)]
        if msg.channel == "iopub":
            if msg.msg_type == "execute_input":
                count = msg.content.get("execution_count")
                if isinstance(count, int):
                    self._execution_count = count
            elif msg.msg_type == "status" and not msg.parent_header:
                return [Publish(msg), *self._remote_status(msg.content.get("execution_state"))]
            elif msg.msg_type == "shutdown_reply" and msg.parent_id not in self._inflight:
                return [Publish(msg), *self._shut_down_by_others(msg)]
            return self._limited(msg)
        if msg.channel not in ("shell", "control", "stdin"):
            log.warning("remote sent %s on unknown channel %r; not forwarded", msg, msg.channel)
            return []
        parent_id = msg.parent_id
        # the oldest request with that id on the reply's channel (stdin: the executing cell's)
        reply_channel = None if msg.channel == "stdin" else msg.channel
        request = self._inflight.get(parent_id, reply_channel) if parent_id else None
        if request is None:
            log.debug("remote %s answers no request of ours; not forwarded", msg)
            return []
        if msg.channel != "stdin" and msg.msg_type.endswith("_reply"):
            self._inflight.remove(request)
            if msg.msg_type == "kernel_info_reply":
                self._kernel_info = msg.content
        return [SendToFrontend(msg.channel, request.identities, msg)]

    def answer_remote(self, asked: Message, content: JsonDict) -> list[Action]:
        """Send the backend's answer to ``asked`` back to the remote kernel (on stdin)."""
        answer = self._make("stdin", "input_reply", content, asked)
        request = Request("stdin", (), answer)
        if self.state is RemoteState.CONNECTED:
            return self._forward(request)
        self._queue.append(request)
        return []

    def notice(self, request: Request | None, text: str) -> list[Action]:
        """A short message from the proxy in the output of ``request``'s cell."""
        if request is None:
            log.warning("%s", text)
            return []
        return [self._notice(request.msg, text)]

    def spool_failed(self, failure: SpoolFailure) -> list[Action]:
        """A ``SpoolOutput`` could not be written in full (a full disk, no permission): the
        output limits count the loss and tell the cell (``proxy.kernel`` calls this)."""
        if self.limiter is None:
            return []
        return [Publish(d.msg) for d in self.limiter.spool_failed(failure) if isinstance(d, Show)]

    # --- internals ----------------------------------------------------------------------------

    def _limited(self, msg: Message) -> list[Action]:
        """Remote output through the output limits: shown, or spooled with a notice."""
        if self.limiter is None:
            return [Publish(msg)]
        return [
            Publish(d.msg) if isinstance(d, Show) else SpoolOutput(d.name, d.data)
            for d in self.limiter.process(msg)
        ]

    def _shut_down_by_others(self, msg: Message) -> list[Action]:
        """Another client (or the server's culler) shut the remote kernel down."""
        if msg.content.get("restart"):
            return self._remote_status("restarting")
        error = RemoteKernelGoneError(
            f"{self.remote_description} was shut down by another client or by the server: its"
            " variables are lost. The next cell starts a fresh kernel."
        )
        return [*self.remote_failed(error), CloseRemote()]

    def _remote_status(self, state: object) -> list[Action]:
        """The *server* reports the kernel restarted (it crashed) or died: state is lost."""
        if state == "restarting":
            lost = RemoteKernelGoneError(
                f"{self.remote_description} restarted (it crashed, or ran out of memory): its"
                " variables are lost. Run the cells it needs again."
            )
            actions = self._fail_waiting(lost)
            if self.state is RemoteState.CONNECTED:
                # Requests wait until the new process is up and its output reaches the server
                # (``remote_connected``): what a restarting kernel is sent, or publishes before
                # the server listens again, can be lost.
                self.state = RemoteState.RESTARTING
                actions.append(AwaitRestartedKernel())
            return actions
        if state == "dead":
            error = RemoteKernelGoneError(
                f"{self.remote_description} died and could not be restarted. The next cell"
                " starts a fresh kernel."
            )
            return [*self.remote_failed(error), CloseRemote()]
        return []

    def _forward(self, request: Request) -> list[Action]:
        self._announced_busy.discard(request.msg.msg_id)
        # Only a *_request gets a reply that forgets it again: comm_open/msg/close never do, and
        # holding them (buffers and all) would leak.
        if request.channel != "stdin" and request.msg.msg_type.endswith("_request"):
            self._inflight.add(request)
        return [SendToRemote(request)]

    def _enqueue(self, request: Request) -> list[Action]:
        if len(self._queue) >= self.max_queue:
            return self._fail(
                request,
                CgpuError(
                    f"{self.max_queue} messages are already waiting for {self.remote_description};"
                    " this one was refused. Wait for the connection to come back, or raise"
                    " --max-queue."
                ),
            )
        self._queue.append(request)
        actions: list[Action] = []
        if self.state is RemoteState.FAILED:
            self.state = RemoteState.CONNECTING
            actions.append(ConnectRemote())
        if request.msg.msg_type == "execute_request":
            self._announced_busy.add(request.msg.msg_id)
            actions.append(self._status("busy", request.msg))
            if self._state_lost:
                self._state_lost = False
                text = (
                    "cgpu-kernel: the previous remote kernel was lost; this cell starts a fresh"
                    " one. Variables from earlier cells are gone."
                )
            elif self.state is RemoteState.RECONNECTING:
                text = f"cgpu-kernel: reconnecting to {self.remote_description}..."
            elif self.state is RemoteState.RESTARTING:
                text = f"cgpu-kernel: waiting for {self.remote_description} to restart..."
            else:
                text = f"cgpu-kernel: waiting for {self.remote_description}..."
            actions.append(self._notice(request.msg, text))
        return actions

    def signal_interrupt(self) -> list[Action]:
        """SIGINT to the proxy (``interrupt_mode: signal``): an interrupt that expects no reply."""
        return [*self._cancel_queued_cells(), InterruptRemote(None)]

    def _interrupt(self, request: Request) -> list[Action]:
        return [
            self._status("busy", request.msg),
            *self._cancel_queued_cells(),
            InterruptRemote(request),
        ]

    def _cancel_queued_cells(self) -> list[Action]:
        actions: list[Action] = []
        if self.state is not RemoteState.CONNECTED:
            # Cells still waiting for the remote were never started: cancel them.
            keep: deque[Request] = deque()
            cancelled = CgpuError("Interrupted before the remote kernel started this cell.")
            cancelled.ename = "KeyboardInterrupt"
            for queued in self._queue:
                if queued.msg.msg_type == "execute_request":
                    actions.extend(self._fail(queued, cancelled))
                else:
                    keep.append(queued)
            self._queue = keep
        return actions

    def _fail_waiting(self, error: CgpuError) -> list[Action]:
        waiting = [*self._inflight.values(), *self._queue]
        self._inflight.clear()
        self._queue.clear()
        actions: list[Action] = []
        for request in waiting:
            actions.extend(self._fail(request, error))
        return actions

    def _fail(self, request: Request, error: CgpuError) -> list[Action]:
        """Answer ``request`` with ``error`` the way its frontend expects."""
        msg = request.msg
        if request.channel == "stdin":
            log.warning("an %s could not be delivered: %s", msg.msg_type, error)
            return []
        if msg.msg_type == "kernel_info_request":
            return self._local_kernel_info(request)
        reply_type = msg.msg_type.replace("_request", "_reply")
        content = self._error_content(error)
        actions: list[Action] = []
        if msg.msg_id not in self._announced_busy:
            actions.append(self._status("busy", msg))
        if msg.msg_type == "execute_request":
            content["execution_count"] = self._execution_count
            error_output = {k: content[k] for k in ("ename", "evalue", "traceback")}
            actions.append(Publish(self._make("iopub", "error", error_output, msg)))
        actions.append(self._reply(request, reply_type, content))
        actions.append(self._status("idle", msg))
        self._announced_busy.discard(msg.msg_id)
        return actions

    def _local_kernel_info(self, request: Request) -> list[Action]:
        content = dict(self._kernel_info or self._fallback_kernel_info())
        return [
            self._status("busy", request.msg),
            self._reply(request, "kernel_info_reply", content),
            self._status("idle", request.msg),
        ]

    def _fallback_kernel_info(self) -> JsonDict:
        banner = f"cgpu-kernel {__version__}: proxy to {self.remote_description}"
        if self.last_error is not None:
            banner += f"\n(not connected: {self.last_error})"
        return {
            "status": "ok",
            "protocol_version": PROTOCOL_VERSION,
            "implementation": "cgpu-kernel",
            "implementation_version": __version__,
            "language_info": FALLBACK_LANGUAGE_INFO,
            "banner": banner,
            "help_links": [],
        }

    @staticmethod
    def _error_content(error: CgpuError) -> JsonDict:
        ename = error.ename
        evalue = str(error)
        return {
            "status": "error",
            "ename": ename,
            "evalue": evalue,
            "traceback": [f"\x1b[0;31m{ename}\x1b[0m: {evalue}"],
        }

    def _make(
        self, channel: str, msg_type: str, content: JsonDict, parent: Message | None = None
    ) -> Message:
        header = make_header(msg_type, self.session)
        return Message.build(channel, header, parent.header if parent else {}, {}, content)

    def _reply(self, request: Request, msg_type: str, content: JsonDict) -> SendToFrontend:
        msg = self._make(request.channel, msg_type, content, request.msg)
        return SendToFrontend(request.channel, request.identities, msg)

    def _status(self, state: str, parent: Message | None) -> Publish:
        return Publish(self._make("iopub", "status", {"execution_state": state}, parent))

    def _notice(self, parent: Message, text: str) -> Publish:
        """A line from the proxy in the output of the cell ``parent`` started."""
        return Publish(stream_notice(self.session, parent.header, text))
