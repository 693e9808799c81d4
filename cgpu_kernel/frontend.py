"""The ZMQ shell: the five sockets a frontend expects a kernel to bind.

This module only moves bytes: it verifies each incoming message with the connection file's key
(``jupyter_client.session.Session`` checks the HMAC and rejects replays), hands verified messages
to a callback, and signs what the relay sends out. Routing lives in ``relay``.

* shell, control, stdin: ROUTER sockets (with ``ROUTER_HANDOVER``, so a frontend that reconnects
  with the same identity takes its place).
* iopub: an XPUB socket, so each subscription is seen and answered with ``iopub_welcome``.
* heartbeat: a ROUTER echo in its own thread, so it answers even while the loop is busy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import zmq
import zmq.asyncio
from jupyter_client.session import Session

from .exceptions import MalformedMessageError
from .wire import Message, split_zmq_frames, zmq_frames

log = logging.getLogger(__name__)

EARLY_IOPUB_LIMIT = 10_000

FrontendCallback = Callable[[str, tuple[bytes, ...], Message], None]
SubscribeCallback = Callable[[bytes], None]


def socket_address(info: dict[str, Any], port: int) -> str:
    transport = info.get("transport", "tcp")
    ip = info.get("ip", "127.0.0.1")
    if transport == "ipc":
        return f"ipc://{ip}-{port}"
    return f"{transport}://{ip}:{port}"


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
        self.context = zmq.asyncio.Context()
        self._hb_context: zmq.Context[Any] = zmq.Context()
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        self.rejected = 0
        # iopub messages published before any frontend subscribed (ZMQ would drop them: the
        # "slow joiner"), delivered right after the first subscription's welcome.
        self._subscribed = False
        self._early_iopub: list[Message] = []

    def bind(self) -> None:
        for channel in ("shell", "control", "stdin"):
            socket = self.context.socket(zmq.ROUTER)
            socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
            socket.linger = 1000
            socket.bind(socket_address(self.info, int(self.info[f"{channel}_port"])))
            self.sockets[channel] = socket
        iopub = self.context.socket(zmq.XPUB)
        iopub.setsockopt(zmq.XPUB_VERBOSE, 1)
        iopub.linger = 1000
        iopub.bind(socket_address(self.info, int(self.info["iopub_port"])))
        self.sockets["iopub"] = iopub
        ready = threading.Event()
        address = socket_address(self.info, int(self.info["hb_port"]))
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
        socket = self.sockets[channel]
        while True:
            frames: list[bytes] = await socket.recv_multipart()
            try:
                identities, msg = self.verify(channel, frames)
            except MalformedMessageError as exc:
                self.rejected += 1
                log.warning("rejected a message on %s, not forwarded: %s", channel, exc)
                continue
            on_message(channel, tuple(identities), msg)

    async def _read_subscriptions(self, on_subscribe: SubscribeCallback) -> None:
        socket = self.sockets["iopub"]
        while True:
            frame: bytes = await socket.recv()
            if frame[:1] == b"\x01":
                first = not self._subscribed
                self._subscribed = True
                on_subscribe(frame[1:])
                if first:
                    early, self._early_iopub = self._early_iopub, []
                    for msg in early:
                        self.publish(msg)

    def verify(self, channel: str, frames: list[bytes]) -> tuple[list[bytes], Message]:
        """Check signature, replay and shape; raises :class:`MalformedMessageError`."""
        identities, rest = split_zmq_frames(frames)
        try:
            # Session records a signature before comparing it, so a forged message carrying a
            # copied signature would get the genuine one rejected as a replay. Verify first
            # (content=False checks without recording), then record and parse.
            self.session.deserialize(rest, content=False, copy=True)
            parsed = self.session.deserialize(rest, content=True, copy=True)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as exc:
            reason = str(exc).split(":")[0] if "Signature" in str(exc) else str(exc)
            raise MalformedMessageError(reason or type(exc).__name__) from None
        if not isinstance(parsed.get("content"), dict):
            raise MalformedMessageError("the content is not a JSON object")
        msg = Message(
            channel,
            [bytes(part) for part in rest[1:5]],
            [bytes(buffer) for buffer in rest[5:]],
            header=dict(parsed["header"]),
            parent_header=dict(parsed["parent_header"]),
            content=parsed["content"],
        )
        return identities, msg

    def send(self, channel: str, identities: tuple[bytes, ...], msg: Message) -> None:
        frames = zmq_frames(list(identities), self.session.sign(msg.parts), msg)
        self.sockets[channel].send_multipart(frames, copy=False)

    def publish(self, msg: Message) -> None:
        if not self._subscribed:
            if len(self._early_iopub) < EARLY_IOPUB_LIMIT:
                self._early_iopub.append(msg)
            else:
                log.warning("no frontend subscribed to iopub yet; dropped %s", msg)
            return
        topic = msg.msg_type.encode("ascii", "replace")
        frames = zmq_frames([topic], self.session.sign(msg.parts), msg)
        self.sockets["iopub"].send_multipart(frames, copy=False)

    def close(self) -> None:
        for socket in self.sockets.values():
            socket.close()
        self.context.term()
        self._hb_context.destroy(linger=0)
