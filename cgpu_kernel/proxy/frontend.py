"""The ZMQ shell: the five sockets a frontend expects a kernel to bind.

This module only moves bytes: it verifies each incoming message with the connection file's key
(``jupyter_client.session.Session`` checks the HMAC and rejects replays), hands verified messages
to a callback, and signs what the relay sends out. Routing lives in ``relay``.

* shell, control, stdin: ROUTER sockets (with ``ROUTER_HANDOVER``, so a frontend that reconnects
  with the same identity takes its place).
* iopub: an XPUB socket, so each subscription is seen and answered with ``iopub_welcome``.
  It never drops and never grows without bound: past :data:`IOPUB_HWM` messages (or
  :data:`IOPUB_MAX_BYTES` of large ones) not yet taken by the frontends' connections, what the
  relay publishes waits here and ``on_flow(True)`` tells the proxy to stop reading the
  WebSocket (flow control back to the remote), until the frontends catch up.
* heartbeat: a ROUTER echo in its own thread, so it answers even while the loop is busy.

stdin is also ``ROUTER_MANDATORY``. A frontend connects its five sockets independently, each
retrying every 100 ms (ZMQ's reconnect interval) until the kernel has bound them, so its stdin
socket can connect after its shell socket has sent the cell. A quick ``input()`` then asked a
frontend that was not there yet, and a ROUTER drops such a message silently: the kernel waited
for an answer forever (``cgpu-kernel run`` with piped input hung about one run in twenty). Now a
message to a stdin not yet connected waits here, and is sent again every
:data:`STDIN_RETRY` s, in order, for up to :data:`STDIN_WAIT` s.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from hmac import compare_digest
from typing import Any, cast

import zmq
from jupyter_client.session import Session

from cgpu_kernel.core.wire import (
    DELIMITER,
    VIEW_MIN,
    Buffer,
    Message,
    Part,
    TextPart,
    zmq_frames,
)
from cgpu_kernel.exceptions import ConfigurationError, MalformedMessageError

log = logging.getLogger(__name__)

EARLY_IOPUB_LIMIT = 10_000
#: Messages read from one socket per wake-up before the other sockets get a turn.
DRAIN_BATCH = 64
#: Buffers at least this large are kept as views into ZMQ's message instead of copied.
ZERO_COPY_MIN = 64 * 1024
#: A frontend's content from this size on is held as its decoded text, not as ZMQ's frame.
TEXT_MIN = 1 << 20
#: Messages ZMQ may queue towards the frontends' iopub connections (``XPUB_NODROP``: past it a
#: send is refused, never dropped). A frontend's own ZMQ reads ahead into its memory besides.
IOPUB_HWM = 64
#: Bytes of large messages (each tracked until ZMQ has written it) allowed in that queue.
IOPUB_MAX_BYTES = 32 * 1024 * 1024
#: Frames from this size on are not tracked: a tracked send kept a 100 MB comm buffer's memory
#: ~33 MB longer (2.33x the buffer against 2.00x, benchmarks.memory); such messages are few,
#: and the high-water mark still counts them.
UNTRACKED_FRAME = 8 * 1024 * 1024
#: How often a full iopub queue is looked at again while the WebSocket is not being read.
FLOW_POLL = 0.005
#: A frontend that takes nothing for this long has stopped reading iopub, not slowed down:
#: the WebSocket is read again (replies must reach it) and its output is held in memory.
IOPUB_STUCK = 30.0
#: How often a message for a frontend's stdin that is not connected yet is tried again, and for
#: how long (see the module's docstring).
STDIN_RETRY = 0.02
STDIN_WAIT = 30.0
# Plain ints: flag arithmetic on pyzmq's IntFlag enums costs more than the send itself.
_NOWAIT = int(zmq.DONTWAIT)
_NOWAIT_MORE = int(zmq.DONTWAIT | zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)

FrontendCallback = Callable[[str, tuple[bytes, ...], Message], None]
SubscribeCallback = Callable[[bytes], None]


def socket_address(info: dict[str, Any], port: int) -> str:
    """The ZMQ address of one socket from the connection file's ``transport`` and ``ip``.

    An ``ip`` that is missing or empty (some launchers write ``"ip": ""``) means loopback, as
    jupyter_client's default; an ``ipc`` transport without a path, or a transport ZMQ cannot
    bind here, is a :class:`~cgpu_kernel.exceptions.ConfigurationError` naming the file's
    fields instead of a traceback from deep in ZMQ.
    """
    transport = info.get("transport") or "tcp"
    ip = info.get("ip")
    if transport == "ipc":
        if not ip or not isinstance(ip, str):
            raise ConfigurationError(
                'The connection file has "transport": "ipc" but no "ip" (the socket path'
                " prefix). Give one, or use the tcp transport."
            )
        return f"ipc://{ip}-{port}"
    if transport != "tcp":
        raise ConfigurationError(
            f'The connection file\'s "transport" is {transport!r}; cgpu-kernel binds "tcp"'
            ' or "ipc".'
        )
    if not ip:
        ip = "127.0.0.1"
    elif not isinstance(ip, str):
        raise ConfigurationError(f'The connection file\'s "ip" is {ip!r}, not an address.')
    return f"tcp://{ip}:{port}"


def _port(info: dict[str, Any], channel: str) -> int:
    """The connection file's ``<channel>_port``, or a clear error when it is missing or bad."""
    value = info.get(f"{channel}_port")
    try:
        port = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigurationError(
            f'The connection file\'s "{channel}_port" is {value!r}, not a port number.'
        ) from None
    if not 0 < port < 65536:
        raise ConfigurationError(f'The connection file\'s "{channel}_port" {port} is no port.')
    return port


def _bind(socket: zmq.Socket[Any], address: str) -> None:
    """Bind, turning ZMQ's refusal (address in use, not an address of this machine) into a
    clear error that names the address."""
    try:
        socket.bind(address)
    except zmq.ZMQError as exc:
        raise ConfigurationError(
            f"Could not listen on {address} (from the connection file): {exc}."
        ) from None


def _nothing() -> None:
    pass


def _split(
    frames: Sequence[bytes | zmq.Frame],
) -> tuple[list[bytes], bytes, list[Part], list[Buffer]]:
    """(identities, signature, 4 parts, buffers) from received frames, ``bytes`` or ZMQ frames
    (received without copying). A large part or buffer stays a view into ZMQ's message: a
    100 MB code string is held once, not once by ZMQ and once more as ``bytes``; its HMAC is
    computed over the view."""
    identities: list[bytes] = []
    for frame in frames:
        raw = frame if isinstance(frame, bytes) else frame.bytes
        if raw == DELIMITER:
            break
        identities.append(raw)
    else:
        raise MalformedMessageError("no <IDS|MSG> delimiter in the ZMQ frames")
    rest = frames[len(identities) + 1 :]
    if len(rest) < 5:
        raise MalformedMessageError(f"{len(rest)} frames after the delimiter, at least 5 needed")
    signature = rest[0] if isinstance(rest[0], bytes) else rest[0].bytes
    parts: list[Part] = [
        f if isinstance(f, bytes) else f.buffer if len(f) >= VIEW_MIN else f.bytes
        for f in rest[1:5]
    ]
    buffers: list[Buffer] = [
        f if isinstance(f, bytes) else f.buffer if len(f) >= ZERO_COPY_MIN else f.bytes
        for f in rest[5:]
    ]
    return identities, signature, parts, buffers


def _heartbeat(context: zmq.Context[Any], address: str, ready: threading.Event) -> None:
    socket = context.socket(zmq.ROUTER)
    socket.linger = 0
    try:
        socket.bind(address)
    finally:
        ready.set()
    try:
        zmq.proxy(socket, socket)
    except zmq.ZMQError:
        pass  # the context was terminated at exit
    finally:
        socket.close(linger=0)


class FrontendSockets:
    """Binds the connection file's sockets and moves verified messages in and signed ones out."""

    def __init__(self, connection_info: dict[str, Any], session: Session) -> None:
        self.info = connection_info
        self.session = session
        self.context: zmq.Context[Any] = zmq.Context()
        self._hb_context: zmq.Context[Any] = zmq.Context()
        self.sockets: dict[str, zmq.Socket[Any]] = {}
        self._drains: dict[str, Callable[[], None]] = {}
        self.rejected = 0
        # iopub messages published before any frontend subscribed (ZMQ would drop them: the
        # "slow joiner"), delivered right after the first subscription's welcome.
        self._subscribed = False
        self._early_iopub: list[Message] = []
        #: called with True when the iopub queue is full (the proxy stops reading the remote),
        #: and with False once it has room again (see :data:`IOPUB_HWM`)
        self.on_flow: Callable[[bool], None] = lambda full: None
        self._backlog: deque[list[Buffer]] = deque()  # signed iopub messages ZMQ refused
        self._tracked: deque[tuple[zmq.MessageTracker, int]] = deque()
        self._tracked_bytes = 0
        self._flow_timer: asyncio.TimerHandle | None = None
        self._last_progress = 0.0
        self._stuck = False
        #: signed stdin messages whose frontend's socket is not connected yet, with when to
        #: give up on each
        self._stdin_waiting: deque[tuple[float, list[Buffer]]] = deque()
        self._stdin_timer: asyncio.TimerHandle | None = None

    def bind(self) -> None:
        for channel in ("shell", "control", "stdin"):
            socket = self.context.socket(zmq.ROUTER)
            socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
            socket.sndhwm = 0  # see iopub below
            socket.linger = 1000
            if channel == "stdin":  # refuse, not drop, a send to a frontend not connected yet
                socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
            _bind(socket, socket_address(self.info, _port(self.info, channel)))
            self.sockets[channel] = socket
        iopub = self.context.socket(zmq.XPUB)
        iopub.setsockopt(zmq.XPUB_VERBOSE, 1)
        # At the high-water mark ZMQ would *drop* what a slow frontend has not read yet; with
        # XPUB_NODROP it refuses the send instead, and the proxy stops reading the remote.
        iopub.sndhwm = IOPUB_HWM
        iopub.setsockopt(zmq.XPUB_NODROP, 1)
        iopub.linger = 1000
        _bind(iopub, socket_address(self.info, _port(self.info, "iopub")))
        self.sockets["iopub"] = iopub
        ready = threading.Event()
        address = socket_address(self.info, _port(self.info, "hb"))
        threading.Thread(
            target=_heartbeat, args=(self._hb_context, address, ready), daemon=True
        ).start()
        ready.wait(5.0)

    def loops(
        self, on_message: FrontendCallback, on_subscribe: SubscribeCallback
    ) -> list[Coroutine[Any, Any, None]]:
        """Coroutines that read each socket forever; the caller runs them as tasks."""
        loops: list[Coroutine[Any, Any, None]] = [
            self._read(channel, on_message) for channel in ("shell", "control", "stdin")
        ]
        loops.append(self._read_subscriptions(on_subscribe))
        return loops

    async def _read(self, channel: str, on_message: FrontendCallback) -> None:
        def drain() -> None:
            self._drain(channel, on_message)

        await self._watch(channel, drain)

    async def _read_subscriptions(self, on_subscribe: SubscribeCallback) -> None:
        def drain() -> None:
            self._drain_subscriptions(on_subscribe)

        await self._watch("iopub", drain)

    async def _watch(self, channel: str, drain: Callable[[], None]) -> None:
        """Call ``drain`` whenever the socket may have messages, until cancelled.

        A ZMQ socket's file descriptor only says that its state changed (edge-triggered): each
        wake-up reads until ``Again``, and a send on the same socket (which can consume that
        edge) looks for waiting messages itself (see :meth:`_send_now`). No future or task per
        message, unlike the asyncio socket's ``recv_multipart``.
        """
        loop = asyncio.get_running_loop()
        socket = self.sockets[channel]
        fd = socket.fileno()
        self._drains[channel] = drain
        loop.add_reader(fd, drain)
        try:
            drain()  # whatever arrived before the reader was added
            await loop.create_future()  # forever: the caller cancels this task at exit
        finally:
            self._drains.pop(channel, None)
            loop.remove_reader(fd)

    def _drain(self, channel: str, on_message: FrontendCallback) -> None:
        socket = self.sockets[channel]
        for _ in range(DRAIN_BATCH):
            try:
                frames = socket.recv_multipart(_NOWAIT, copy=False)
            except zmq.Again:
                return
            try:
                identities, msg = self.verify(channel, frames)
            except MalformedMessageError as exc:
                self.rejected += 1
                log.warning("rejected a message on %s, not forwarded: %s", channel, exc)
                continue
            on_message(channel, tuple(identities), msg)
        # More may be waiting, and the descriptor will not say so again: come back after the
        # other sockets had a turn.
        asyncio.get_running_loop().call_soon(self._drains.get(channel, _nothing))

    def _drain_subscriptions(self, on_subscribe: SubscribeCallback) -> None:
        socket = self.sockets["iopub"]
        for _ in range(DRAIN_BATCH):
            try:
                frame: bytes = socket.recv(_NOWAIT)
            except zmq.Again:
                return
            if frame[:1] == b"\x01":
                first = not self._subscribed
                self._subscribed = True
                on_subscribe(frame[1:])
                if first:
                    early, self._early_iopub = self._early_iopub, []
                    for msg in early:
                        self.publish(msg)
        asyncio.get_running_loop().call_soon(self._drains.get("iopub", _nothing))

    def verify(
        self, channel: str, frames: list[bytes] | list[zmq.Frame]
    ) -> tuple[list[bytes], Message]:
        """Check signature, replay and shape; raises :class:`MalformedMessageError`.

        The same checks as ``Session.deserialize`` (unsigned, replayed, forged; JSON header with
        ``msg_id`` and ``msg_type``; JSON metadata; content a JSON object), done once: the HMAC
        is computed by ``Session.sign`` a single time and each part is parsed a single time,
        without converting dates (the relay never reads them; the bytes are forwarded as they
        came). A signature is recorded for the replay guard only once it has been verified, so a
        forged message carrying a copied signature cannot get the genuine one rejected.

        A content of :data:`TEXT_MIN` bytes or more in a ZMQ frame is decoded once, and its
        text replaces the frame (:class:`~cgpu_kernel.core.wire.TextPart`): the frame is taken
        out of ``frames`` (``_drain``'s list, not used after this) and freed before the text is
        parsed, so a 100 MB code string is held twice at most, not three times (issue 19).
        """
        identities, signature, parts, buffers = _split(frames)
        session = self.session
        if session.auth is not None:
            if not signature:
                raise MalformedMessageError("Unsigned Message")
            if signature in session.digest_history:
                raise MalformedMessageError("Duplicate Signature")
            if not compare_digest(signature, session.sign(parts)):
                raise MalformedMessageError("Invalid Signature")
        msg = Message(channel, parts, buffers)
        msg.metadata  # noqa: B018 - parsed now so that invalid JSON is rejected here
        if session.auth is not None:
            session._add_digest(signature)
        content = parts[3]
        del parts
        if isinstance(content, memoryview) and len(content) >= TEXT_MIN:
            try:
                text = str(content, "utf-8")
            except UnicodeDecodeError as exc:
                raise MalformedMessageError(f"the content is not valid JSON: {exc}") from None
            msg.parts[3] = TextPart(text, len(content))
            del text, content
            frames[len(identities) + 5] = b""  # type: ignore[call-overload]  # ZMQ's frame: freed
        msg.content  # noqa: B018 - likewise: the content must be a JSON object
        return identities, msg

    def send(self, channel: str, identities: tuple[bytes, ...], msg: Message) -> None:
        frames = zmq_frames(list(identities), self.session.sign(msg.wire_parts), msg)
        if channel != "stdin":
            self._send_now(channel, frames)
            return
        self._stdin_waiting.append((time.monotonic() + STDIN_WAIT, frames))
        if self._stdin_timer is None:  # else a retry is due, and this waits behind the others
            self._send_stdin()

    def _send_stdin(self) -> None:
        """Send the waiting stdin messages in order; one whose frontend's stdin socket is not
        connected yet stops the rest, and all are tried again in :data:`STDIN_RETRY` s."""
        self._stdin_timer = None
        while self._stdin_waiting:
            give_up_at, frames = self._stdin_waiting[0]
            try:
                self._send_now("stdin", frames)
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                if time.monotonic() < give_up_at:
                    self._stdin_timer = asyncio.get_running_loop().call_later(
                        STDIN_RETRY, self._send_stdin
                    )
                    return
                log.warning(
                    "a message for a frontend's stdin (an input() prompt) was dropped: that"
                    " frontend connected no stdin socket within %g s; interrupt the cell",
                    STDIN_WAIT,
                )
            self._stdin_waiting.popleft()

    def _send_now(self, channel: str, frames: list[Buffer]) -> None:
        """Send at once: ROUTER and XPUB sockets never block a send (their high-water mark is
        off: see bind). Large frames go without a copy (ZMQ holds a reference until sent).

        Sending can consume the edge that would have announced a message waiting on the same
        socket, so a waiting message is looked for right after (pyzmq's own async sockets do
        the same).
        """
        sock = self.sockets[channel]
        last = len(frames) - 1
        try:
            sock.send(frames[0], _NOWAIT_MORE if last else _NOWAIT, copy=False)
        except zmq.Again:  # not expected on ROUTER/XPUB; wait for room rather than lose it
            sock.send_multipart(frames, copy=False)
        else:
            for index in range(1, last + 1):
                sock.send(frames[index], _NOWAIT_MORE if index < last else _NOWAIT, copy=False)
        if cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
            drain = self._drains.get(channel)
            if drain is not None:
                asyncio.get_running_loop().call_soon(drain)

    def publish(self, msg: Message) -> None:
        if not self._subscribed:
            if len(self._early_iopub) < EARLY_IOPUB_LIMIT:
                self._early_iopub.append(msg)
            else:
                log.warning("no frontend subscribed to iopub yet; dropped %s", msg)
            return
        topic = msg.msg_type.encode("ascii", "replace")
        frames = zmq_frames([topic], self.session.sign(msg.wire_parts), msg)
        if self._backlog or not self._publish_frames(frames):
            self._backlog.append(frames)
        if self.iopub_full:
            self._hold_back()

    @property
    def iopub_full(self) -> bool:
        """Whether the frontends are behind: messages wait here, or too many large ones wait
        in ZMQ's queue."""
        if self._stuck:
            return False
        tracked = self._tracked
        while tracked and tracked[0][0].done:
            self._tracked_bytes -= tracked.popleft()[1]
        return bool(self._backlog) or self._tracked_bytes > IOPUB_MAX_BYTES

    def _publish_frames(self, frames: list[Buffer]) -> bool:
        """Send one signed iopub message without waiting; False when ZMQ's queue is full
        (nothing of it was sent: the high-water mark is checked at a message's first frame)."""
        sock = self.sockets["iopub"]
        last = len(frames) - 1
        try:
            sock.send(frames[0], _NOWAIT_MORE if last else _NOWAIT, copy=False)
        except zmq.Again:
            return False
        for index in range(1, last + 1):
            frame = frames[index]
            flags = _NOWAIT_MORE if index < last else _NOWAIT
            if ZERO_COPY_MIN <= len(frame) < UNTRACKED_FRAME:  # no copy: tracked until written
                tracker = sock.send(frame, flags, copy=False, track=True)
                self._tracked.append((tracker, len(frame)))
                self._tracked_bytes += len(frame)
            else:
                sock.send(frame, flags, copy=False)
        if cast(int, sock.getsockopt(_EVENTS)) & _POLLIN:
            drain = self._drains.get("iopub")
            if drain is not None:
                asyncio.get_running_loop().call_soon(drain)
        return True

    def _hold_back(self) -> None:
        """The queue is full: tell the proxy (again: a new remote connection starts reading)
        and look again shortly."""
        if self._flow_timer is None:
            self._last_progress = time.monotonic()
            self._flow_timer = asyncio.get_running_loop().call_later(FLOW_POLL, self._retry)
        self.on_flow(True)

    def _retry(self) -> None:
        """Send what waits; once the queue has room, tell the proxy to read the remote again."""
        self._flow_timer = None
        backlog = self._backlog
        before = len(backlog), self._tracked_bytes
        while backlog and self._publish_frames(backlog[0]):
            backlog.popleft()
        full = self.iopub_full
        now = time.monotonic()
        if (len(backlog), self._tracked_bytes) != before:
            self._last_progress = now
        elif full and not self._stuck and now - self._last_progress > IOPUB_STUCK:
            self._stuck = True
            full = False
            log.warning(
                "a frontend has taken no output for %g s; reading the remote kernel again and"
                " holding its output in memory until the frontend reads",
                IOPUB_STUCK,
            )
        if backlog or full:
            self._flow_timer = asyncio.get_running_loop().call_later(FLOW_POLL, self._retry)
        else:
            self._stuck = False
        if not full:
            self.on_flow(False)

    def close(self) -> None:
        if self._flow_timer is not None:
            self._flow_timer.cancel()
        if self._stdin_timer is not None:
            self._stdin_timer.cancel()
        while self._backlog and self._publish_frames(self._backlog[0]):
            self._backlog.popleft()
        for socket in self.sockets.values():
            socket.close()
        self.context.term()
        self._hb_context.destroy(linger=0)
