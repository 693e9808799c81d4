"""Minimal asyncio clients, one per kind of path, all with the same small interface.

* :class:`ZmqClient`: what a frontend does (``jupyter_client.session.Session`` signs and
  verifies; DEALER sockets sharing the session identity, a SUB on iopub). It drives both the
  floor (ipykernel straight) and our proxy kernel, so the proxy is measured exactly as a
  frontend sees it.
* :class:`TornadoWsClient`: a direct WebSocket client to a Jupyter server's ``/channels``
  (tornado's ``websocket_connect``, v1 subprotocol with legacy fallback), with ``TCP_QUICKACK``
  after each read switchable at run time.
* :class:`WebsocketsWsClient`: the same on the ``websockets`` library, to pick the faster
  WebSocket client by measurement.

Each client turns what it receives into :class:`Msg` (content fully parsed, buffers as bytes-like
objects), which is what a real frontend has to do too.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import zmq
import zmq.asyncio
from jupyter_client.session import Session

from cgpu_kernel.core.wire import V1_SUBPROTOCOL, Message, from_ws, make_header, to_ws

QUICKACK = getattr(socket, "TCP_QUICKACK", None)
MAX_MESSAGE = (1 << 31) - 1


@dataclass
class Msg:
    channel: str
    msg_type: str
    parent_id: str | None
    content: dict[str, Any]
    buffers: list[Any] = field(default_factory=list)


class ZmqClient:
    """A frontend on the five sockets of a connection file (no heartbeat)."""

    def __init__(self, info: dict[str, Any]) -> None:
        key = info.get("key", b"")
        self.session = Session(
            key=key.encode() if isinstance(key, str) else bytes(key),
            signature_scheme=info.get("signature_scheme", "hmac-sha256"),
        )
        self.context = zmq.asyncio.Context()
        ident = self.session.bsession
        ip = info.get("ip", "127.0.0.1")
        self.sockets: dict[str, zmq.asyncio.Socket] = {}
        for channel in ("shell", "control", "stdin"):
            sock = self.context.socket(zmq.DEALER)
            sock.setsockopt(zmq.IDENTITY, ident)
            sock.linger = 0
            sock.connect(f"tcp://{ip}:{info[channel + '_port']}")
            self.sockets[channel] = sock
        iopub = self.context.socket(zmq.SUB)
        iopub.setsockopt(zmq.SUBSCRIBE, b"")
        iopub.linger = 0
        iopub.connect(f"tcp://{ip}:{info['iopub_port']}")
        self.sockets["iopub"] = iopub
        self.queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        for channel in ("shell", "control", "stdin", "iopub"):
            self._tasks.append(asyncio.ensure_future(self._reader(channel)))

    async def _reader(self, channel: str) -> None:
        sock = self.sockets[channel]
        while True:
            frames = await sock.recv_multipart(copy=False)
            _, parts = self.session.feed_identities(frames, copy=False)
            msg = self.session.deserialize(parts, content=True, copy=False)
            self.queue.put_nowait(
                Msg(
                    channel,
                    msg["header"]["msg_type"],
                    msg["parent_header"].get("msg_id"),
                    msg["content"],
                    list(msg["buffers"]),
                )
            )

    def send(
        self, channel: str, msg_type: str, content: dict[str, Any], buffers: list[Any] | None = None
    ) -> str:
        msg = self.session.msg(msg_type, content)
        self.session.send(self.sockets[channel], msg, buffers=buffers)
        return str(msg["header"]["msg_id"])

    async def recv(self) -> Msg:
        return await self.queue.get()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.context.destroy(linger=0)


def channels_url(base_url: str, kernel_id: str, session_id: str) -> str:
    scheme = "wss" if base_url.startswith("https") else "ws"
    rest = base_url[base_url.index(":") :]
    return f"{scheme}{rest}api/kernels/{quote(kernel_id)}/channels?session_id={session_id}"


def _to_msg(message: Message) -> Msg:
    return Msg(
        message.channel, message.msg_type, message.parent_id, message.content, message.buffers
    )


class _WsBase:
    session_id: str
    subprotocol: str | None
    quickack: bool
    _socket: Any

    def _build(
        self, channel: str, msg_type: str, content: dict[str, Any], buffers: list[Any] | None
    ) -> tuple[str, bytes | str]:
        header = make_header(msg_type, self.session_id, username="bench")
        msg = Message.build(channel, header, {}, {}, content, buffers)
        return msg.msg_id, to_ws(msg, self.subprotocol)

    def _after_read(self) -> None:
        if self.quickack and QUICKACK is not None and self._socket is not None:
            self._socket.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)


class TornadoWsClient(_WsBase):
    """tornado's ``websocket_connect`` to ``/api/kernels/{id}/channels``."""

    def __init__(self, ws: Any, session_id: str, quickack: bool) -> None:
        self.ws = ws
        self.session_id = session_id
        self.subprotocol = ws.selected_subprotocol
        self.quickack = quickack
        stream = ws.protocol.stream
        self._socket = stream.socket
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    async def connect(
        cls, base_url: str, token: str, kernel_id: str, *, quickack: bool = False
    ) -> TornadoWsClient:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        session_id = uuid.uuid4().hex
        request = HTTPRequest(
            channels_url(base_url, kernel_id, session_id),
            headers={"Authorization": f"token {token}"},
            connect_timeout=30,
        )
        ws = await websocket_connect(
            request, max_message_size=MAX_MESSAGE, subprotocols=[V1_SUBPROTOCOL]
        )
        return cls(ws, session_id, quickack)

    async def start(self) -> None:
        return None

    def send(
        self, channel: str, msg_type: str, content: dict[str, Any], buffers: list[Any] | None = None
    ) -> str:
        msg_id, data = self._build(channel, msg_type, content, buffers)
        self.ws.write_message(data, binary=isinstance(data, bytes))
        return msg_id

    async def recv(self) -> Msg:
        frame = await self.ws.read_message()
        if frame is None:
            raise ConnectionError(f"WebSocket closed ({self.ws.close_code} {self.ws.close_reason})")
        self._after_read()
        return _to_msg(from_ws(frame, self.subprotocol))

    async def close(self) -> None:
        self.ws.close()


class WebsocketsWsClient(_WsBase):
    """The ``websockets`` library's asyncio client to the same endpoint."""

    def __init__(self, ws: Any, session_id: str, quickack: bool) -> None:
        self.ws = ws
        self.session_id = session_id
        self.subprotocol = ws.subprotocol
        self.quickack = quickack
        self._sending: set[asyncio.Future[None]] = set()
        self._socket = ws.transport.get_extra_info("socket")
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    async def connect(
        cls, base_url: str, token: str, kernel_id: str, *, quickack: bool = True
    ) -> WebsocketsWsClient:
        from websockets.asyncio.client import connect

        session_id = uuid.uuid4().hex
        ws = await connect(
            channels_url(base_url, kernel_id, session_id),
            additional_headers={"Authorization": f"token {token}"},
            subprotocols=[V1_SUBPROTOCOL],  # type: ignore[list-item]
            max_size=None,
            compression=None,
            ping_interval=None,
            open_timeout=30,
        )
        return cls(ws, session_id, quickack)

    async def start(self) -> None:
        return None

    def send(
        self, channel: str, msg_type: str, content: dict[str, Any], buffers: list[Any] | None = None
    ) -> str:
        msg_id, data = self._build(channel, msg_type, content, buffers)
        # websockets' send is a coroutine; schedule it (the order of sends is kept).
        task = asyncio.ensure_future(self.ws.send(data))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        return msg_id

    async def recv(self) -> Msg:
        frame = await self.ws.recv()
        self._after_read()
        return _to_msg(from_ws(frame, self.subprotocol))

    async def close(self) -> None:
        await self.ws.close()
