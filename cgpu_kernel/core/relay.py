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
  ``max_queue``) and sent in order once it is; nothing reaches the kernel twice.
* A message the remote sends twice (a server replay after a reconnect) reaches frontends once:
  the relay remembers recent ``msg_id``\\ s.
* A request counts as delivered only once the remote kernel shows it has it (any message whose
  parent it is: ipykernel's ``busy`` for every shell and control request, ``execute_input``, a
  reply), not once it is written: bytes written into a socket that a reset then kills are gone
  without an error. One still unconfirmed when its connection drops is settled after the
  reconnection, once the kernel has answered everything sent before (``settle_after_probe``):
  sent again when the journal shows it never arrived (or it is harmless to repeat), otherwise
  answered with an error that says it may or may not have run. A cell never runs twice.
* ``interrupt_request`` and ``shutdown_request`` (on control, or on shell as some VS Code versions
  send them) are not forwarded: the remote server's REST API does them, which works even when the
  remote kernel is too busy to read its control channel.
* No request is left without an answer: when the remote fails, is lost, or the proxy shuts down,
  every waiting request gets an error reply naming the reason, with ``busy``/``idle`` around it,
  so no cell stays "busy" forever (a remote kernel that died ends the proxy instead, below).
* A remote kernel that dies (the server restarts it or gives it up, another client or the
  server deletes it, a reconnection finds it gone) is, by default (``on_remote_death="exit"``),
  a dead kernel to the frontend, as a local one would be: each waiting cell is shown the error
  as its output, no reply comes (so nbclient raises ``DeadKernelError``, papermill stops), and
  the proxy ends (``EndRun``), so the frontend's own restart policy applies. With
  ``"continue"`` the waiting requests get error replies and the next cell starts on a fresh
  remote kernel, in this same proxy.
* While no remote kernel is connected, the requests a frontend needs to stay usable are answered
  here: ``is_complete_request`` from a local check (never status "error", which the message
  spec does not allow), and, once the remote failed, ``complete_request``, ``inspect_request``,
  ``history_request`` and ``comm_info_request`` with empty answers, and a cell that is only
  ``exit`` or ``quit`` with IPython's ``ask_exit`` payload, so a console can leave. None of them
  starts a new attempt: only real work does, and it shows the error once.
* A cell whose first line is ``%cgpu ...`` (``core.files``) is answered by the proxy itself
  (``RunFiles``): later cells wait until its transfer is done, then the rest of the cell (if
  any) goes to the remote kernel under the cell's own ``msg_id``, so its reply ends the cell; a
  failed or interrupted transfer answers the cell with an error, runs nothing of it, and
  aborts the cells that waited behind it (status ``aborted``, as ipykernel's queue on an error).
* A message the server refuses as too big (it closes with 1009, or the connection drops each
  time that message is being sent) is not sent again: a request gets an error reply, anything
  else (a comm message) a notice in the cell that opened the comm and in the running cell, each
  saying how big it was and how to raise the server's limit. Later messages at least as big as
  one refused are refused before they are sent.
"""

from __future__ import annotations

import codeop
import html
import logging
import re
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from cgpu_kernel import __version__
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
from cgpu_kernel.core.files import is_magic_cell, parse_cell
from cgpu_kernel.core.journal import LostMessage
from cgpu_kernel.core.limits import OutputLimiter, Show, SpoolFailure, stream_notice
from cgpu_kernel.core.wire import (
    PROTOCOL_VERSION,
    VIEW_MIN,
    JsonDict,
    Message,
    TextPart,
    make_header,
)
from cgpu_kernel.exceptions import (
    CgpuError,
    FileTransferError,
    RemoteKernelGoneError,
    RemoteMessageTooBigError,
    ReplyLostError,
)

log = logging.getLogger(__name__)

#: The close code of a server that refuses a message as too big (RFC 6455, section 7.4.1).
CLOSE_MESSAGE_TOO_BIG = 1009
#: Messages up to this size (one outgoing fragment) are never suspected of being refused for
#: their size: no Jupyter server's limit is that low (a stock one takes 10 MiB).
SUSPECT_SIZE = 1 << 20
#: A connection that drops this many times in a row while the same large message is being sent
#: is taken to refuse it (a server or proxy that drops the socket without a 1009).
CUTS_BEFORE_REFUSAL = 2
MIB = 1 << 20
COMM_OPENERS_KEPT = 1024  # comms whose opening cell the relay remembers (oldest forgotten)

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


#: Cells a console sends to leave; IPython answers them with an ``ask_exit`` payload.
EXIT_CELLS = frozenset({"exit", "quit", "exit()", "quit()"})
#: What a frontend gets for each request answered locally once the remote failed.
EMPTY_REPLIES: dict[str, JsonDict] = {
    "inspect_request": {"status": "ok", "found": False, "data": {}, "metadata": {}},
    "history_request": {"status": "ok", "history": []},
    "comm_info_request": {"status": "ok", "comms": {}},
}


def local_is_complete(code: str, language: str) -> JsonDict:
    """The ``is_complete_reply`` content for ``code`` without a remote kernel.

    Python is checked with :mod:`codeop` (what the interactive interpreter uses): a block
    still open is ``incomplete`` with the indent of its next line. Source Python does not
    compile (IPython magics, ``!ls``) may well be valid for the remote, and other languages
    are not known here: both are ``unknown``, which frontends treat as "run it".
    """
    if language != "python":
        return {"status": "unknown"}
    try:
        with warnings.catch_warnings():  # a SyntaxWarning is the remote kernel's to show
            warnings.simplefilter("ignore")
            compiled = codeop.compile_command(code, "<cell>", "exec")
    except (SyntaxError, OverflowError, ValueError):
        return {"status": "unknown"}
    if compiled is not None:
        return {"status": "complete"}
    lines = [line for line in code.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    indent = last[: len(last) - len(last.lstrip())]
    if last.rstrip().endswith(":"):
        indent += "    "
    return {"status": "incomplete", "indent": indent}


#: The key of a fallback ``kernel_info_reply`` that carries why the remote is not connected.
REMOTE_ERROR_KEY = "cgpu_kernel_remote_error"


class RemoteState(Enum):
    CONNECTING = "connecting"  # first connection (or a fresh kernel) on its way
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # the socket dropped; the same remote kernel is expected back
    RESTARTING = "restarting"  # the server restarts a crashed kernel; requests wait until it is up
    FAILED = "failed"  # no remote; the next request asks for a new attempt
    SHUTTING_DOWN = "shutting_down"


@dataclass
class _AskedBy:
    """Which cell each recent ``input_request`` came from, so its answer can be tracked."""

    limit: int
    _cells: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def add(self, input_request: str, cell: str) -> None:
        self._cells[input_request] = cell
        if len(self._cells) > self.limit:
            self._cells.popitem(last=False)

    def get(self, input_request: str | None) -> str | None:
        return self._cells.get(input_request) if input_request else None


@dataclass
class _RecentIds:
    """A bounded set of message ids, oldest forgotten first."""

    limit: int
    _ids: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def __contains__(self, msg_id: object) -> bool:
        return msg_id in self._ids

    def add(self, msg_id: str) -> bool:
        """Remember ``msg_id``; False when it was already known."""
        if msg_id in self._ids:
            return False
        self._ids[msg_id] = None
        if len(self._ids) > self.limit:
            self._ids.popitem(last=False)
        return True


@dataclass(frozen=True)
class _LargeSend:
    """A large message sent on the current connection, as much of it as a refusal needs: a
    request (which waits for its reply anyway), or only the facts about a comm message (its
    buffers are not held once written)."""

    msg_id: str
    size: int
    msg_type: str
    comm_id: str | None
    request: Request | None  # set when the message gets a reply, to carry the error

    @classmethod
    def of(cls, request: Request) -> _LargeSend:
        msg = request.msg
        comm_id = msg.content.get("comm_id") if msg.msg_type.startswith("comm_") else None
        replied = request.channel != "stdin" and msg.msg_type.endswith("_request")
        return cls(
            msg.msg_id,
            msg.size,
            msg.msg_type,
            comm_id if isinstance(comm_id, str) else None,
            request if replied else None,
        )


#: Requests that may be sent twice without harm: they read, they change nothing in the kernel.
REPEATABLE_REQUESTS = frozenset(
    {
        "kernel_info_request",
        "complete_request",
        "inspect_request",
        "history_request",
        "is_complete_request",
        "comm_info_request",
    }
)


@dataclass
class _Unconfirmed:
    """A request written to the remote that the kernel has not yet shown it received.

    ``epoch`` counts the connections: one from an older epoch was written into a socket that
    has since dropped, and may never have arrived. ``knowable``: every outage since then was
    followed by a complete journal answer, so the kernel's own record shows whether it
    arrived. ``cell``: for an ``input_reply``, the ``msg_id`` of the cell it answers.
    """

    request: Request
    epoch: int
    knowable: bool = True
    cell: str | None = None


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
        on_remote_death: str = "exit",
    ) -> None:
        self.session = session
        #: "exit": a dead remote kernel ends the proxy; "continue": a fresh one takes its place
        self.on_remote_death = on_remote_death
        self._had_kernel = False  # a remote kernel was connected once (its death is a death)
        self._first_cell_notice: str | None = None  # said in the next cell's output, once
        self._notice_in_cell: tuple[str, str] | None = None  # (cell msg_id, that notice)
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
        # cells sent to the remote whose ``idle`` has not come yet (an outage can lose it)
        self._open_cells: dict[str, Request] = {}
        self._state_lost = False  # the remote kernel died: tell the next cell it starts afresh
        #: the smallest message the remote refused as too big; as big or bigger is not sent
        self.refused_size: int | None = None
        # the largest message (over SUSPECT_SIZE) sent on the current connection: the one a
        # 1009 refers to (it is certainly over the limit, whichever message the server read)
        self._largest_sent: _LargeSend | None = None
        self._cuts_while_sending: tuple[str, int] = ("", 0)  # (msg_id, connections lost)
        self._comm_openers: OrderedDict[str, JsonDict] = OrderedDict()  # comm_id -> cell header
        self._epoch = 0  # connections lost so far (see _Unconfirmed)
        self._unconfirmed: OrderedDict[str, _Unconfirmed] = OrderedDict()
        self._asked: _AskedBy = _AskedBy(dedupe_window)  # input_request id -> its cell's id
        # the cell that last asked each frontend for input (an answer without a parent header,
        # as jupyter_client's ``input()`` sends, answers that one)
        self._asking: dict[tuple[bytes, ...], str] = {}
        self._last_cell: JsonDict | None = None  # the header of the last cell a frontend sent
        # a %cgpu transfer is running: cells wait here until it is done, in order
        self._files_busy = False
        self._held_cells: deque[Request] = deque()
        self._startup_files_error: CgpuError | None = None  # told to the first cell

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
        if msg_type == "execute_request" and channel == "shell":
            self._last_cell = msg.header
        if msg_type == "interrupt_request" and channel in ("control", "shell"):
            return self._interrupt(request)
        if msg_type == "shutdown_request" and channel in ("control", "shell"):
            self.state = RemoteState.SHUTTING_DOWN
            restart = bool(msg.content.get("restart", False))
            return [self._status("busy", msg), ShutdownRemote(request, restart)]
        if self.state is RemoteState.SHUTTING_DOWN:
            return self._fail(request, CgpuError("The kernel is shutting down."))
        if channel == "shell" and msg_type == "execute_request":
            if self._files_busy:
                self._held_cells.append(request)
                return []
            if self._startup_files_error is not None:
                error, self._startup_files_error = self._startup_files_error, None
                return self._fail(request, error)
            if is_magic_cell(msg.content.get("code")):
                return self._start_files(request)
        if channel == "shell" and msg_type in ("comm_open", "comm_close"):
            self._comm_event(msg)
        if msg_type == "kernel_info_request" and self.state is RemoteState.FAILED:
            return self._local_kernel_info(request)
        if channel == "shell" and self.state is not RemoteState.CONNECTED:
            local = self._answer_locally(request)
            if local is not None:
                return local
        actions = (
            self._forward(request)
            if self.state is RemoteState.CONNECTED
            else self._enqueue(request)
        )
        if channel == "shell" and msg_type == "execute_request" and self._first_cell_notice:
            # said among the cell's own output, after its busy and execute_input (the order
            # ipykernel's message-spec tests check), see _with_first_cell_notice
            self._notice_in_cell = (msg.msg_id, self._first_cell_notice)
            self._first_cell_notice = None
        return actions

    def first_cell_notice(self, text: str) -> list[Action]:
        """Say ``text`` once, in the output of the cell running now, else of the next one
        (what the kernel's command line asked for that the remote kernel did not get)."""
        running = self._waiting_cells()
        if running:
            return [self._notice(running[0].msg, text)]
        self._first_cell_notice = text
        return []

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
        gone = CgpuError("The kernel was shut down before this finished.")
        actions: list[Action] = []
        while self._held_cells:
            actions.extend(self._fail(self._held_cells.popleft(), gone))
        actions.extend(self._fail_waiting(gone))
        actions.append(self._reply(request, "shutdown_reply", {"status": "ok", "restart": restart}))
        actions.append(self._status("idle", request.msg))
        return actions

    # --- %cgpu cells (core.files; proxy.files does the transfers) -----------------------------

    def _start_files(self, request: Request) -> list[Action]:
        try:
            command = parse_cell(str(request.msg.content.get("code", "")))
        except FileTransferError as exc:
            return self._fail(request, exc)
        self._files_busy = True
        self._announced_busy.add(request.msg.msg_id)
        return [self._status("busy", request.msg), RunFiles(request, command)]

    def files_on_start(self) -> list[Action]:
        """The ``upload_on_start`` option's uploads begin (``proxy.kernel`` runs them): cells
        wait until :meth:`files_finished` is called with no request."""
        self._files_busy = True
        return []

    def files_output(self, request: Request | None, text: str) -> list[Action]:
        """A progress line, listing or summary of a ``%cgpu`` cell (stdout, no newline added:
        a progress line is redrawn with a carriage return). Not marked as a notice: it is the
        cell's output, so ``cgpu-kernel run`` and ``files`` print it on stdout, as cells show it.
        """
        if request is None:
            return []
        content: JsonDict = {"name": "stdout", "text": text}
        return [Publish(self._make("iopub", "stream", content, request.msg))]

    def files_finished(
        self, request: Request | None, rest: str, error: CgpuError | None
    ) -> list[Action]:
        """A ``RunFiles`` ended (``error`` None: it worked): answer the cell, or send the rest
        of it to the remote under its ``msg_id``, then let the waiting cells go, in order.

        A failed or interrupted transfer aborts the cells waiting behind it, as ipykernel
        aborts its queue when a cell fails (unless the cell asked ``stop_on_error: false``):
        after "Run All", the cells that read the file must not run without it. A failed
        ``upload_on_start`` fails the first waiting cell and aborts the others the same way."""
        self._files_busy = False
        actions: list[Action] = []
        if request is None:
            self._startup_files_error = error
        elif error is not None:
            actions.extend(self._fail(request, error))
            if request.msg.content.get("stop_on_error", True):
                while self._held_cells:
                    actions.extend(self._abort(self._held_cells.popleft()))
        elif rest.strip():
            msg = request.msg
            content = dict(msg.content, code=rest)
            remainder = Message.build(
                msg.channel, msg.header, msg.parent_header, msg.metadata, content
            )
            actions.extend(self._execute(Request(request.channel, request.identities, remainder)))
        else:
            content = {
                "status": "ok",
                "execution_count": self._execution_count,
                "user_expressions": {},
                "payload": [],
            }
            self._announced_busy.discard(request.msg.msg_id)
            actions.append(self._reply(request, "execute_reply", content))
            actions.append(self._status("idle", request.msg))
        while self._held_cells and not self._files_busy:
            held = self._held_cells.popleft()
            told = self._startup_files_error is not None  # this cell gets the uploads' error
            actions.extend(self.frontend_message(held.channel, held.identities, held.msg))
            if told and held.msg.content.get("stop_on_error", True):
                while self._held_cells:  # and the cells behind it are aborted, as above
                    actions.extend(self._abort(self._held_cells.popleft()))
        return actions

    def _abort(self, request: Request) -> list[Action]:
        """ipykernel's answer to a cell it aborts (``kernelbase._send_abort_reply``): busy, an
        ``execute_reply`` with status ``aborted`` (in its metadata too), idle."""
        content: JsonDict = {"status": "aborted"}
        header = make_header("execute_reply", self.session)
        reply = Message.build(
            request.channel, header, request.msg.header, {"status": "aborted"}, content
        )
        return [
            self._status("busy", request.msg),
            SendToFrontend(request.channel, request.identities, reply),
            self._status("idle", request.msg),
        ]

    def _execute(self, request: Request) -> list[Action]:
        if self.state is RemoteState.CONNECTED:
            return self._forward(request)
        return self._enqueue(request)

    # --- events from the remote side ----------------------------------------------------------

    def remote_connected(self) -> list[Action]:
        """The WebSocket to the remote kernel is open: send what waited, in order."""
        self.state = RemoteState.CONNECTED
        self._had_kernel = True
        self.last_error = None
        self._largest_sent = None  # a new connection: nothing sent on it yet
        actions: list[Action] = []
        while self._queue:
            actions.extend(self._forward(self._queue.popleft()))
        return actions

    def outage_over(self, seconds: float, complete: bool | None) -> list[Action]:
        """A reconnection finished bringing back what it could; say only what is known.

        ``complete`` is True when the remote kernel's journal returned everything after the last
        message received, False when it says something is missing (its record did not reach
        back far enough, or a message was too large to keep), and None when nothing could be
        checked (no journal, or it did not answer): then what the server relayed is all there
        is, and a server that stopped reading (frozen, swapping) may have dropped output.

        Cells told about the outage are told it is over. Something known missing is told to
        every waiting cell, told of the outage or not: a short outage can lose output too.
        """
        if complete is True:
            outcome = "nothing was lost (the kernel's output journal confirmed it)."
        elif complete is False:
            outcome = (
                "the kernel's record of its output does not cover all of the outage, so some"
                " output from it may be missing."
            )
        else:
            outcome = (
                "the proxy could not check what the outage cost (no answer from an output"
                " journal): output the kernel sent meanwhile may be missing."
            )
        if complete is not True:
            # The kernel's record does not cover the outage: for a request written into the
            # lost socket, nothing can tell any more whether it arrived.
            for entry in self._unconfirmed.values():
                if entry.epoch < self._epoch:
                    entry.knowable = False
        actions: list[Action] = []
        for request in self._waiting_cells():
            if request.msg.msg_id in self._told_outage or complete is False:
                text = f"cgpu-kernel: reconnected after {seconds:.0f} s; {outcome}"
                actions.append(self._notice(request.msg, text))
        self._told_outage.clear()
        return actions

    def lost_messages(self, lost: list[LostMessage]) -> list[Action]:
        """Messages an outage lost that the journal could not keep (too large): each is told to
        a running cell, or else in the output of the request that caused it (for a comm
        message, the cell or comm message it answered), so a widget that never updated has
        a reason the user can read. Nothing is re-sent: the message no longer exists."""
        actions: list[Action] = []
        running = self._waiting_cells()
        for gone in lost:
            text = (
                f"cgpu-kernel: {gone.describe()} from {self.remote_description} was lost when"
                " the connection dropped (too large for the kernel's output journal, raise"
                " --journal-max-bytes to keep messages up to a quarter of it); a widget or"
                " display that needed it may be stale. Run the cell again if needed."
            )
            parent_id = gone.parent_header.get("msg_id")
            mine = [r for r in running if r.msg.msg_id == parent_id]
            if mine or running:
                actions.append(self._notice((mine or running)[-1].msg, text))
            elif isinstance(parent_id, str):
                actions.append(Publish(stream_notice(self.session, gone.parent_header, text)))
            else:
                log.warning("%s", text)
        return actions

    def has_seen(self, msg_id: str) -> bool:
        """Whether a message with ``msg_id`` already reached the relay (recently)."""
        return msg_id in self._seen

    def startup_progress(self, seconds: float, deadline: float) -> list[Action]:
        """The remote kernel has been starting for ``seconds`` (of at most ``deadline``): tell
        the cells waiting for it that it still is, so a slow launch (a gateway scheduling a
        pod) does not look like a hang. Called by the supervisor's timer while it starts one."""
        if self.state is not RemoteState.CONNECTING:
            return []
        text = (
            f"cgpu-kernel: still starting {self.remote_description}: {seconds:.0f} s so far"
            f" (waiting up to {deadline:.0f} s)..."
        )
        return [self._notice(r.msg, text) for r in self._waiting_cells()]

    def late_output(self, count: int, *, complete: bool, parent: JsonDict) -> list[Action]:
        """After an outage, the journal found ``count`` messages the server dropped later (it
        fell behind while forwarding its backlog); they were just delivered, out of order.
        Told to the running cells, else in the output of the first late message's request."""
        text = (
            f"cgpu-kernel: the server fell behind while it caught up after the outage; {count}"
            " output messages it had not delivered were fetched from the kernel's output"
            " journal (some may be shown late, out of order)."
        )
        if not complete:
            text += " Some output may still be missing (the journal did not reach back far enough)."
        return self._tell(text, parent)

    def output_lost(self, count: int, *, parent: JsonDict) -> list[Action]:
        """``count`` numbered iopub messages never arrived, and the kernel's output journal no
        longer had them (its record did not reach back far enough, or it did not answer): the
        numbers prove the loss, so it is told, however the outage was reported before. Told to
        the running cells, else in the output of the request that the next message answered."""
        text = (
            f"cgpu-kernel: {count} output message{'s' if count != 1 else ''} from"
            f" {self.remote_description} never arrived (lost on the way from the kernel, as"
            " its numbering shows) and the kernel's output journal could not give them back:"
            " some output is missing. A larger --journal-max-bytes or --journal-max-messages"
            " keeps more."
        )
        return self._tell(text, parent)

    def open_cells(self) -> list[Request]:
        """Cells sent to the remote whose ``idle`` has not come back (reply or not)."""
        return list(self._open_cells.values())

    def end_cells_without_idle(self, requests: list[Request]) -> list[Action]:
        """End the given cells whose reply came but whose final ``idle`` an outage lost (the
        kernel answered a later request, so they are over): a notice, then the ``idle``, so
        no frontend keeps them busy forever. Cells still without a reply are not touched
        (``fail_requests`` answers those)."""
        actions: list[Action] = []
        for request in requests:
            msg_id = request.msg.msg_id
            if msg_id in self._inflight or self._open_cells.pop(msg_id, None) is None:
                continue
            actions.append(
                self._notice(
                    request.msg,
                    "cgpu-kernel: this cell finished, but its final status was lost when the"
                    " connection dropped; it is marked done here. Its output may be incomplete.",
                )
            )
            idle = self._make("iopub", "status", {"execution_state": "idle"}, request.msg)
            actions.extend(self._limited(idle))
        return actions

    def remote_disconnected(self) -> list[Action]:
        """The socket dropped; the same remote kernel is expected back, so keep everything.

        Requests written to it and not yet confirmed may never have arrived: they are settled
        after the reconnection (``resend_answers``, ``settle_after_probe``)."""
        if self.state in (RemoteState.CONNECTED, RemoteState.RESTARTING):
            self.state = RemoteState.RECONNECTING
            self._epoch += 1
        return []

    def remote_closed(self, close_code: int | None) -> list[Action]:
        """The connection ended with the server's ``close_code`` (None: it sent none); the
        supervisor calls this before :meth:`remote_disconnected`.

        A 1009 means the server refused a message as too big. Which one it was reading cannot
        be told from here, but the largest sent on that connection is at least as big, so it is
        refused (an error reply, or notices) and not sent again. A connection that drops without
        a 1009 twice in a row while the same large message is the largest sent is taken to
        refuse it too (servers and proxies that just drop the socket): never an endless loop.
        """
        suspect, self._largest_sent = self._largest_sent, None
        if suspect is None:
            self._cuts_while_sending = ("", 0)
            if close_code == CLOSE_MESSAGE_TOO_BIG:
                log.warning(
                    "the server closed with 1009 (message too big) but nothing large"
                    " was sent on that connection"
                )
            return []
        msg_id = suspect.msg_id
        if close_code == CLOSE_MESSAGE_TOO_BIG:
            self._cuts_while_sending = ("", 0)
            return self._refuse(suspect, "closed the connection with code 1009 (message too big)")
        previous, cuts = self._cuts_while_sending
        cuts = cuts + 1 if previous == msg_id else 1
        if cuts >= CUTS_BEFORE_REFUSAL:
            self._cuts_while_sending = ("", 0)
            return self._refuse(
                suspect,
                f"dropped the connection each of the {cuts} times it was being sent (the server,"
                " or a proxy in front of it, most likely refuses messages this big)",
            )
        self._cuts_while_sending = (msg_id, cuts)
        return []

    def send_failed(self, request: Request, *, connection_alive: bool) -> list[Action]:
        """Writing ``request`` failed because its socket closed: send it again.

        ``connection_alive`` says whether the proxy has a working connection now (the failure
        was on an older one): then the request goes out at once, otherwise it waits in order.
        """
        self._inflight.remove(request)
        self._unconfirmed.pop(request.msg.msg_id, None)
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

    @property
    def unconfirmed(self) -> list[Request]:
        """Requests written to the remote that the kernel has not yet shown it received."""
        return [entry.request for entry in self._unconfirmed.values()]

    def awaiting_probe(self) -> list[Request]:
        """What the supervisor's lost-reply probe (a ``kernel_info_request`` that the shell
        answers after everything sent before it) settles: the cells without a reply, and the
        requests written into a connection that dropped before the kernel confirmed them."""
        waiting = {r.msg.msg_id: r for r in self.unanswered_cells()}
        for msg_id, entry in self._unconfirmed.items():
            if entry.epoch < self._epoch and entry.request.channel != "stdin":
                waiting[msg_id] = entry.request
        return list(waiting.values())

    def resend_answers(self) -> list[Action]:
        """After a reconnection (the journal's answer and the held messages already in): send
        again each ``input()`` answer that was written into the lost socket while its cell
        still waits and asked nothing since.

        The shell cannot settle these: a kernel blocked in ``input()`` answers no probe. A
        repeat is harmless: ipykernel empties its stdin socket before each ``input_request``,
        so an answer that did arrive the first time is thrown away at the cell's next
        ``input()`` (or stays unread if there is none)."""
        actions: list[Action] = []
        for msg_id, entry in list(self._unconfirmed.items()):
            if entry.request.channel != "stdin" or entry.epoch >= self._epoch:
                continue
            del self._unconfirmed[msg_id]
            if entry.cell is not None and entry.cell in self._inflight:
                log.info("sending the answer %s again: its connection dropped", msg_id)
                actions.extend(self._forward(entry.request))
        return actions

    def settle_after_probe(self, waiting: list[Request], error: CgpuError) -> list[Action]:
        """The lost-reply probe was answered: the kernel has finished everything in ``waiting``
        (``awaiting_probe`` when the probe was sent) that it ever received.

        A request it never confirmed is sent again when that is safe: the kernel's journal
        covered every outage since it was written (so it did not arrive: ipykernel publishes
        ``busy`` for every request it takes up), or it only reads. Otherwise it is answered
        with an error that says it may or may not have run; it is not repeated, so a cell
        never runs twice. A comm message is never repeated (ipykernel 7 publishes nothing for
        one that arrives while a cell runs, so no record can show it did not arrive): the
        running cells are told. A cell that did arrive but still has no reply lost it: it is
        answered with ``error``."""
        actions: list[Action] = []
        unanswered = []
        comms: list[str] = []
        for request in waiting:  # first the unconfirmed: a notice may go to a cell failed below
            msg_id = request.msg.msg_id
            entry = self._unconfirmed.pop(msg_id, None)
            if entry is None or entry.epoch >= self._epoch:
                unanswered.append(request)
                continue
            self._inflight.remove(request)
            msg_type = request.msg.msg_type
            if not msg_type.endswith("_request"):
                comms.append(msg_type)
            elif entry.knowable or msg_type in REPEATABLE_REQUESTS:
                log.info("sending %s again: it never reached the remote kernel", request.msg)
                actions.extend(self._forward(request))
            else:
                actions.extend(self._lost_in_flight(request))
        if comms:
            actions.extend(self._comms_lost_in_flight(comms))
        for request in unanswered:
            if request.msg.msg_type == "execute_request" and self._inflight.remove(request):
                actions.extend(self._fail(request, error))
        return actions

    def _lost_in_flight(self, request: Request) -> list[Action]:
        """``request`` was written just as the connection dropped, and nothing shows whether
        the kernel got it."""
        log.warning(
            "%s may not have reached %s: not sent again", request.msg, self.remote_description
        )
        return self._fail(
            request,
            ReplyLostError(
                "The connection dropped just as this was sent, and nothing the server or the"
                " kernel kept shows whether it arrived: it may or may not have run. It was not"
                " sent again, so that it cannot run twice. Check its effects and run it again"
                " if it did not run."
            ),
        )

    def _comms_lost_in_flight(self, msg_types: list[str]) -> list[Action]:
        """Comm messages (a widget's) that may not have arrived: no reply can carry an error,
        so the running cells are told, once."""
        what = ", ".join(sorted(set(msg_types)))
        log.warning("%d comm messages (%s) may not have reached the kernel", len(msg_types), what)
        return [
            self._notice(
                cell.msg,
                f"cgpu-kernel: {len(msg_types)} widget message(s) ({what}) were sent just as the"
                " connection dropped and may not have reached the kernel; they were not sent"
                " again.",
            )
            for cell in self.unanswered_cells()
        ]

    def fail_requests(self, requests: list[Request], error: CgpuError) -> list[Action]:
        """Answer the given waiting requests with ``error`` (their replies were lost)."""
        actions: list[Action] = []
        for request in requests:
            self._unconfirmed.pop(request.msg.msg_id, None)
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
        if isinstance(error, RemoteKernelGoneError) and self._dies_with_remote():
            return self._remote_died(error)
        self.state = RemoteState.FAILED
        self.last_error = error
        self._state_lost = isinstance(error, RemoteKernelGoneError)
        return self._fail_waiting(error)

    def remote_message(self, msg: Message) -> list[Action]:
        """A message from the remote kernel."""
        if not self._seen.add(msg.msg_id):
            log.debug("dropping replayed duplicate %s", msg)
            return []
        self._confirmed(msg)
        # a pure predicate (Backend.intercepts): answering is the I/O shell's, via the action
        if self.intercept is not None and self.intercept(msg):
            return [AnswerRemoteRequest(msg, self._asking_cell(msg))]
        if msg.channel == "iopub":
            if msg.msg_type in ("comm_open", "comm_close"):
                self._comm_event(msg)
            if msg.msg_type == "execute_input":
                count = _execution_count(msg)
                if count is not None:
                    self._execution_count = count
            elif msg.msg_type == "status" and not msg.parent_header:
                return [Publish(msg), *self._remote_status(msg.content.get("execution_state"))]
            elif msg.msg_type == "status" and msg.content.get("execution_state") == "idle":
                self._open_cells.pop(msg.parent_id or "", None)
            elif msg.msg_type == "shutdown_reply" and msg.parent_id not in self._inflight:
                return [Publish(msg), *self._shut_down_by_others(msg)]
            if self._notice_in_cell is not None and msg.parent_id == self._notice_in_cell[0]:
                return self._with_first_cell_notice(msg)
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
            if self._asking.get(request.identities) == request.msg.msg_id:
                del self._asking[request.identities]
        elif msg.msg_type == "input_request":
            self._asked.add(msg.msg_id, request.msg.msg_id)
            self._asking[request.identities] = request.msg.msg_id
        return [SendToFrontend(msg.channel, request.identities, msg)]

    def _with_first_cell_notice(self, msg: Message) -> list[Action]:
        """``msg`` (iopub, of the cell that is to show the first-cell notice) with the notice
        where a cell's output goes: after the cell's ``busy`` and ``execute_input``, before
        anything else it sends."""
        assert self._notice_in_cell is not None
        cell, text = self._notice_in_cell
        if msg.msg_type == "status" and msg.content.get("execution_state") == "busy":
            return self._limited(msg)
        self._notice_in_cell = None
        request = self._inflight.get(cell)
        if request is None:
            return self._limited(msg)
        notice = self._notice(request.msg, text)
        if msg.msg_type == "execute_input":
            return [*self._limited(msg), notice]
        return [notice, *self._limited(msg)]

    def _asking_cell(self, msg: Message) -> Request | None:
        """The frontend request a remote kernel's own request (``colab_request``) belongs to.

        Matched by parent id when the kernel names its cell. colabtools (``google/colab/
        _message.py``, ``send_request``) gives the requests of ``drive.mount()`` and
        ``auth.authenticate_user()`` a parent that holds only the session: those belong to the
        cell running now, which is the oldest ``execute_request`` without a reply (a kernel runs
        its cells in order), preferring the cells of that session. None when no cell runs.
        """
        parent_id = msg.parent_id
        if parent_id:
            return self._inflight.get(parent_id)
        cells = [r for r in self._inflight.values() if r.msg.msg_type == "execute_request"]
        session = msg.parent_header.get("session")
        same_session = [r for r in cells if r.msg.header.get("session") == session]
        running = same_session or cells
        return running[0] if running else None

    def answer_remote(self, asked: Message, content: JsonDict) -> list[Action]:
        """Send the backend's answer to ``asked`` back to the remote kernel (on stdin)."""
        answer = self._make("stdin", "input_reply", content, asked)
        request = Request("stdin", (), answer)
        if self.state is RemoteState.CONNECTED:
            return self._forward(request)
        self._queue.append(request)
        return []

    def notice(
        self, request: Request | None, text: str, *, link: str | None = None
    ) -> list[Action]:
        """A short message from the proxy in the output of ``request``'s cell.

        With ``link`` (a URL the user must open, such as Colab's Drive consent) it is a
        ``display_data``: a clickable link in frontends that render HTML, the text and the URL
        in those that show ``text/plain`` only.
        """
        if request is None:
            log.warning("%s%s", text, f" {link}" if link else "")
            return []
        if link is None:
            return [self._notice(request.msg, text)]
        data = {
            "text/plain": f"{text}\n{link}",
            "text/html": (
                f'<p>{html.escape(text)}<br><a href="{html.escape(link, quote=True)}"'
                f' target="_blank" rel="noopener">{html.escape(link)}</a></p>'
            ),
        }
        content: JsonDict = {"data": data, "metadata": {}, "transient": {}}
        return [Publish(self._make("iopub", "display_data", content, request.msg))]

    def announce(self, text: str) -> list[Action]:
        """Something the user should know while perhaps no cell runs (the backend says so:
        Colab's keep-alive is about to stop). In every running cell; else in the output of the
        last cell sent, which frontends that show output arriving after a cell finished
        (``jupyter console``) display; and always in the log."""
        log.warning("%s", text)
        return self._tell(text, self._last_cell or {}, logged=True)

    def spool_failed(self, failure: SpoolFailure) -> list[Action]:
        """A ``SpoolOutput`` could not be written in full (a full disk, no permission): the
        output limits count the loss and tell the cell (``proxy.kernel`` calls this)."""
        if self.limiter is None:
            return []
        return [Publish(d.msg) for d in self.limiter.spool_failed(failure) if isinstance(d, Show)]

    # --- internals ----------------------------------------------------------------------------

    def _confirmed(self, msg: Message) -> None:
        """``msg`` shows the kernel received its parent request; an ``input_request`` or the
        cell's reply also shows it took the cell's last ``input()`` answer."""
        parent_id = msg.parent_id
        if not parent_id or not self._unconfirmed:
            return
        entry = self._unconfirmed.get(parent_id)
        if entry is not None:
            # It reached the server, so did everything written before it on the same
            # connection (one TCP stream, forwarded in order over ZMQ): a comm message sent
            # while a cell runs gets no ``busy`` of its own from ipykernel 7.
            for msg_id in list(self._unconfirmed):
                if self._unconfirmed[msg_id].epoch == entry.epoch:
                    del self._unconfirmed[msg_id]
                if msg_id == parent_id:
                    break
        if msg.msg_type in {"input_request", "execute_reply"}:
            for msg_id, entry in list(self._unconfirmed.items()):
                if entry.cell == parent_id:
                    del self._unconfirmed[msg_id]

    def _track(self, request: Request) -> None:
        """Remember ``request`` until the kernel shows it has it (bounded: a kernel that never
        confirms anything must not make the proxy hold every message it ever sent)."""
        cell = None
        if request.channel == "stdin":
            cell = self._asked.get(request.msg.parent_id) or self._asking.get(request.identities)
            if cell is None:  # not an answer to a cell's input(): nothing would confirm it
                return
        elif not request.msg.msg_type.endswith("_request"):
            # comm_open/msg/close are never sent again (see settle_after_probe): keep only
            # what a notice needs, not their content and buffers (an upload can be large).
            msg = request.msg
            bare = Message(  # its header's bytes as they came: a large one is not encoded again
                msg.channel,
                [msg.parts[0], msg.parts[1], b"{}", b"{}"],
                header=msg.header,
                parent_header=msg.parent_header,
                content={},
            )
            request = Request(request.channel, request.identities, bare)
        msg_id = request.msg.msg_id
        self._unconfirmed.pop(msg_id, None)
        self._unconfirmed[msg_id] = _Unconfirmed(request, self._epoch, cell=cell)
        while len(self._unconfirmed) > self.max_queue:
            self._unconfirmed.popitem(last=False)

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
        if self._dies_with_remote():
            return self._remote_died(
                RemoteKernelGoneError(
                    f"{self.remote_description} was shut down by another client or by the"
                    " server: its variables are lost."
                )
            )
        return [*self.remote_failed(error), CloseRemote()]

    def _remote_status(self, state: object) -> list[Action]:
        """The *server* reports the kernel restarted (it crashed) or died: state is lost."""
        if state == "restarting" and self._dies_with_remote():
            return self._remote_died(
                RemoteKernelGoneError(
                    f"{self.remote_description} died (it crashed, or ran out of memory; the"
                    " server restarts it): its variables are lost."
                )
            )
        if state == "dead" and self._dies_with_remote():
            return self._remote_died(
                RemoteKernelGoneError(
                    f"{self.remote_description} died and the server could not restart it."
                )
            )
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

    def _dies_with_remote(self) -> bool:
        """Whether a dead remote kernel ends this proxy now: the ``exit`` mode, a kernel that
        was connected once (one lost before it ever ran is a failed start: the next cell tries
        again), and not already ending."""
        return (
            self.on_remote_death == "exit"
            and self._had_kernel
            and self.state is not RemoteState.SHUTTING_DOWN
        )

    def _remote_died(self, lost: RemoteKernelGoneError) -> list[Action]:
        """``on_remote_death = exit``: behave as a local kernel that died.

        Each waiting cell gets the error as its output (an ``error`` message, which nbclient
        and papermill keep in the notebook), but no reply and no ``idle``: a local kernel that
        died sends neither, and a reply would make nbclient report a failed cell
        (``CellExecutionError``, which ``allow_errors`` runs carry on past) rather than
        ``DeadKernelError``. Other waiting requests get nothing either: the frontend learns
        from the process's exit, as it does from a local kernel's. Then the proxy ends
        (``EndRun``)."""
        error = RemoteKernelGoneError(
            f"{lost} This kernel exits too, so that the frontend sees a dead kernel and applies"
            " its restart policy, as for a local kernel (a restarted kernel starts a fresh"
            " remote kernel). To carry on in the same kernel with a fresh remote kernel"
            " instead, install it with --option on_remote_death=continue."
        )
        self.state = RemoteState.SHUTTING_DOWN
        self.last_error = error
        content = self._error_content(error)
        output = {k: content[k] for k in ("ename", "evalue", "traceback")}
        actions: list[Action] = [
            Publish(self._make("iopub", "error", output, cell.msg))
            for cell in self._waiting_cells()
        ]
        self._inflight.clear()
        self._queue.clear()
        self._unconfirmed.clear()
        self._open_cells.clear()
        actions.append(EndRun(error))
        return actions

    def _forward(self, request: Request) -> list[Action]:
        size = request.msg.size
        if self.refused_size is not None and size >= self.refused_size:
            return self._refuse(
                _LargeSend.of(request),
                f"refused a {_megabytes(self.refused_size)} message earlier, so this one was not"
                " sent",
            )
        if size > SUSPECT_SIZE and (self._largest_sent is None or size > self._largest_sent.size):
            self._largest_sent = _LargeSend.of(request)
        self._announced_busy.discard(request.msg.msg_id)
        # Only a *_request gets a reply that forgets it again: comm_open/msg/close never do, and
        # holding them (buffers and all) would leak.
        if request.channel != "stdin" and request.msg.msg_type.endswith("_request"):
            self._inflight.add(request)
            if request.msg.msg_type == "execute_request":
                self._open_cells[request.msg.msg_id] = request
        self._track(request)
        return [SendToRemote(request)]

    def _comm_event(self, msg: Message) -> None:
        """Remember which cell opened a comm (a refused comm message is reported there)."""
        comm_id = msg.content.get("comm_id")
        if not isinstance(comm_id, str):
            return
        if msg.msg_type == "comm_close":
            self._comm_openers.pop(comm_id, None)
            return
        opener: JsonDict | None = msg.parent_header if msg.parent_header.get("msg_id") else None
        if opener is None:  # a frontend's comm_open names no cell: the running one, if any
            running = self.unanswered_cells()
            opener = running[0].msg.header if running else None
        if opener is not None:
            self._comm_openers[comm_id] = opener
            if len(self._comm_openers) > COMM_OPENERS_KEPT:
                self._comm_openers.popitem(last=False)

    def _refuse(self, sent: _LargeSend, why: str) -> list[Action]:
        """``sent`` is too big for the remote: it is dropped from the queue and the waiting
        requests, never sent again, and its sender told (see :meth:`remote_closed`)."""
        size = sent.size
        self.refused_size = size if self.refused_size is None else min(self.refused_size, size)
        if sent.request is not None:
            self._inflight.remove(sent.request)
        self._queue = deque(r for r in self._queue if r.msg.msg_id != sent.msg_id)
        suggested = -(-2 * size // (100 * MIB)) * 100  # twice the size, in 100s of MiB
        error = RemoteMessageTooBigError(
            f"The server of {self.remote_description} {why}: this {_megabytes(size)}"
            f" {sent.msg_type} is over its limit for one WebSocket message (a stock Jupyter"
            " server takes at most 10 MiB). It was not delivered and will not be sent again."
            " Send less at once, or raise the server's limit, e.g. start it with"
            f" --ServerApp.tornado_settings=\"{{'websocket_max_message_size': {suggested * MIB}}}\""
            f" ({suggested} MiB)."
        )
        log.warning("%s", error)
        if sent.request is not None:
            return self._fail(sent.request, error)
        # No reply to carry the error (a comm message, an input reply): notices where a user
        # can read them, the cell that opened the comm and the cell running now.
        parents: list[JsonDict] = []
        opener = self._comm_openers.get(sent.comm_id) if sent.comm_id is not None else None
        if opener is not None:
            parents.append(opener)
        for running in self.unanswered_cells():
            if all(p.get("msg_id") != running.msg.msg_id for p in parents):
                parents.append(running.msg.header)
        text = f"cgpu-kernel: {error}"
        return [Publish(stream_notice(self.session, parent, text)) for parent in parents]

    def _answer_locally(self, request: Request) -> list[Action] | None:
        """A shell request answered here while no remote kernel is connected (see the rules
        above), or None when it waits for the remote like any other."""
        msg = request.msg
        if msg.msg_type == "is_complete_request":
            code = str(msg.content.get("code", ""))
            return self._local_reply(request, local_is_complete(code, self._language()))
        if self.state is not RemoteState.FAILED:
            return None
        if msg.msg_type == "complete_request":
            cursor = msg.content.get("cursor_pos")
            at = cursor if isinstance(cursor, int) else len(str(msg.content.get("code", "")))
            content: JsonDict = {
                "status": "ok",
                "matches": [],
                "cursor_start": at,
                "cursor_end": at,
                "metadata": {},
            }
            return self._local_reply(request, content)
        if msg.msg_type in EMPTY_REPLIES:
            return self._local_reply(request, dict(EMPTY_REPLIES[msg.msg_type]))
        if msg.msg_type == "execute_request" and self._is_exit(msg):
            content = {
                "status": "ok",
                "execution_count": self._execution_count,
                "payload": [{"source": "ask_exit", "keepkernel": False}],
                "user_expressions": {},
            }
            return self._local_reply(request, content)
        return None

    def _is_exit(self, msg: Message) -> bool:
        """A cell that is only ``exit``/``quit``, with no other cell waiting before it."""
        code = msg.content.get("code")
        waiting = any(r.msg.msg_type == "execute_request" for r in self._queue)
        return isinstance(code, str) and code.strip() in EXIT_CELLS and not waiting

    def _language(self) -> str:
        """The remote kernel's language when it ever said, else the fallback's (Python)."""
        info = (self._kernel_info or {}).get("language_info")
        name = info.get("name") if isinstance(info, dict) else None
        return str(name or FALLBACK_LANGUAGE_INFO["name"]).lower()

    def _local_reply(self, request: Request, content: JsonDict) -> list[Action]:
        reply_type = request.msg.msg_type.replace("_request", "_reply")
        return [
            self._status("busy", request.msg),
            self._reply(request, reply_type, content),
            self._status("idle", request.msg),
        ]

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
        actions = self._stop_local_work()
        if self._only_local_work_ran():
            return actions
        return [*actions, InterruptRemote(None)]

    def _interrupt(self, request: Request) -> list[Action]:
        actions = [self._status("busy", request.msg), *self._stop_local_work()]
        if self._only_local_work_ran():
            return [*actions, *self.interrupt_finished(request, None)]
        return [*actions, InterruptRemote(request)]

    def _stop_local_work(self) -> list[Action]:
        """An interrupt's local part: cells not yet sent are cancelled, a transfer stopped."""
        actions = self._cancel_queued_cells()
        if self._files_busy:
            actions.append(CancelFiles())
        return actions

    def _only_local_work_ran(self) -> bool:
        """Whether only a ``%cgpu`` transfer ran, with no cell of the user's on the remote: the
        remote kernel is idle then, and an interrupt that reached it late would stop the next
        cell (a KeyboardInterrupt there), so it is not sent."""
        return self._files_busy and not (
            self._open_cells
            or any(r.msg.msg_type == "execute_request" for r in self._inflight.values())
        )

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
        self._unconfirmed.clear()
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
        if msg.msg_type == "is_complete_request":  # "error" is no status an is_complete has
            code = str(msg.content.get("code", ""))
            return self._local_reply(request, local_is_complete(code, self._language()))
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
        self._open_cells.pop(msg.msg_id, None)
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
        content: JsonDict = {
            "status": "ok",
            "protocol_version": PROTOCOL_VERSION,
            "implementation": "cgpu-kernel",
            "implementation_version": __version__,
            "language_info": FALLBACK_LANGUAGE_INFO,
            "banner": banner,
            "help_links": [],
        }
        if self.last_error is not None:
            content["banner"] = banner + f"\n(not connected: {self.last_error})"
            # `cgpu-kernel run` reads this to end a run whose remote never started, rather
            # than sending the code into a second attempt (and waiting twice as long).
            content[REMOTE_ERROR_KEY] = {
                "ename": self.last_error.ename,
                "evalue": str(self.last_error),
            }
        return content

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

    def _tell(self, text: str, parent: JsonDict, *, logged: bool = False) -> list[Action]:
        """``text`` in every running cell; else in the output of the request ``parent`` heads
        (when it has an id); else only in the log (``logged``: it is there already)."""
        running = self._waiting_cells()
        if running:
            return [self._notice(r.msg, text) for r in running]
        if parent.get("msg_id"):
            return [Publish(stream_notice(self.session, parent, text))]
        if not logged:
            log.warning("%s", text)
        return []

    def _notice(self, parent: Message, text: str) -> Publish:
        """A line from the proxy in the output of the cell ``parent`` started."""
        return Publish(stream_notice(self.session, parent.header, text))


#: The end of ipykernel's ``execute_input`` content: ``..., "execution_count": 7}``. Matched
#: after a comma, the quote is structural (inside a string it would follow a backslash), so in
#: valid JSON this is the top-level key, the last of its name (the one ``json.loads`` keeps).
_COUNT_AT_END = re.compile(rb',\s*"execution_count"\s*:\s*(\d+)\s*}\s*\Z')


def _execution_count(msg: Message) -> int | None:
    """An ``execute_input``'s execution count. A large content (it holds the cell's code) is
    not parsed for it (issue 19: that was the parse of a 100 MB code string, twice its size
    held for a moment): the count is read from the end of the raw JSON, where ipykernel puts
    it; parsed as before where the end is not in that form."""
    raw = msg.parts[3]
    if not isinstance(raw, TextPart) and len(raw) >= VIEW_MIN:
        found = _COUNT_AT_END.search(raw, max(0, len(raw) - 256))
        if found is not None:
            return int(found.group(1))
    count = msg.content.get("execution_count")
    return count if isinstance(count, int) else None


def _megabytes(size: int) -> str:
    """``size`` bytes as users read it in a notice: ``24.0 MB``."""
    return f"{size / 1e6:.1f} MB"
