"""The WebSocket shell: one connection to a remote kernel's ``/channels`` endpoint.

Offers the ``v1.kernel.websocket.jupyter.org`` subprotocol and falls back to the legacy JSON
protocol when the server does not pick it. Sets ``TCP_NODELAY`` and, after each read where the
platform has it, ``TCP_QUICKACK``: without them every round trip pays ~40 ms of Nagle and
delayed-ACK latency (FIELD-NOTES section 3).

Liveness is ours, not tornado's: tornado's ping timeout *closes* a silent socket, throwing away
whatever the server already wrote into it. A silent connection here is only marked stalled;
the proxy opens a new one (same ``session_id``, so the server replaces the stale one and replays
what it buffered) while this one keeps delivering whatever backlog still arrives, until the
server closes it. TCP recovers from a short outage by itself; nothing in flight is thrown away.

Messages are handed to a sink callback as they are parsed (no queue hop). A new connection
holds its messages until :meth:`RemoteChannels.deliver_to` is called, so the proxy can finish
draining an old connection first and keep the order.

Reconnection policy lives in ``kernelapp``; this class is one socket's life.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from tornado.httpclient import HTTPClientError, HTTPRequest, _RequestProxy
from tornado.httputil import HTTPHeaders
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError

from .exceptions import (
    MalformedMessageError,
    RemoteAuthError,
    RemoteKernelGoneError,
    RemoteProtocolError,
    RemoteUnreachableError,
)
from .wire import V1_SUBPROTOCOL, Message, from_ws, to_ws

log = logging.getLogger(__name__)

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

MessageSink = Callable[[Message], None]


class ChannelsClosedError(Exception):
    """Sending on a channels WebSocket that has closed (the message was not sent)."""


class _Client(WebSocketClientConnection):
    """tornado's client, reporting pongs and pings as signs of life."""

    def __init__(self, *args: Any, on_alive: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_alive = on_alive

    def on_pong(self, data: bytes) -> None:
        self._on_alive()

    def on_ping(self, data: bytes) -> None:
        self._on_alive()


class RemoteChannels:
    """An open channels WebSocket to one remote kernel."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.subprotocol: str | None = None
        self.malformed = 0
        self.last_heard = time.monotonic()
        self.closed = asyncio.Event()
        self._ws: _Client | None = None
        self._socket: socket.socket | None = None
        self._sink: MessageSink | None = None
        self._held: list[Message] = []

    @classmethod
    async def open(
        cls, request: HTTPRequest, where: str, *, max_message_size: int
    ) -> RemoteChannels:
        """Connect; raises :class:`~cgpu_kernel.exceptions.RemoteError` subclasses."""
        channels = cls(where)
        # What tornado's websocket_connect does before building its client: normalised headers
        # and the HTTP client's defaults behind the request.
        request.headers = HTTPHeaders(request.headers)
        request = cast(HTTPRequest, _RequestProxy(request, HTTPRequest._DEFAULTS))
        client = _Client(
            request,
            on_message_callback=channels._on_frame,
            max_message_size=max_message_size,
            subprotocols=[V1_SUBPROTOCOL],
            on_alive=channels._alive,
        )
        try:
            await client.connect_future
            channels._ws = client
        except HTTPClientError as exc:
            if exc.code in (401, 403):
                raise RemoteAuthError(
                    f"The server refused the WebSocket to {where} (HTTP {exc.code}): check the"
                    " token."
                ) from None
            if exc.code == 404:
                raise RemoteKernelGoneError(f"The server no longer knows {where}.") from None
            if exc.code == 599:
                raise RemoteUnreachableError(f"Could not reach {where}: {exc.message}.") from None
            raise RemoteProtocolError(
                f"The server refused the WebSocket to {where} (HTTP {exc.code} {exc.message})."
            ) from None
        except (OSError, StreamClosedError) as exc:
            raise RemoteUnreachableError(f"Could not reach {where}: {exc}.") from None
        channels.subprotocol = client.selected_subprotocol
        channels._socket = channels._raw_socket()
        if channels._socket is not None:
            channels._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        channels._alive()
        log.info("connected to %s (protocol: %s)", where, channels.subprotocol or "legacy JSON")
        return channels

    def _raw_socket(self) -> socket.socket | None:
        stream = getattr(getattr(self._ws, "protocol", None), "stream", None)
        raw = getattr(stream, "socket", None)
        if isinstance(raw, socket.socket) and raw.family in (socket.AF_INET, socket.AF_INET6):
            return raw
        return None

    def _alive(self) -> None:
        self.last_heard = time.monotonic()

    def _on_frame(self, frame: str | bytes | None) -> None:
        if frame is None:
            self.closed.set()
            return
        self.last_heard = time.monotonic()
        if _QUICKACK is not None and self._socket is not None:
            try:
                self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self._socket = None
        try:
            msg = from_ws(frame, self.subprotocol)
        except MalformedMessageError as exc:
            self.malformed += 1
            log.warning("dropped a malformed message from %s: %s", self.where, exc)
            return
        if self._sink is None:
            self._held.append(msg)
        else:
            self._sink(msg)

    def deliver_to(self, sink: MessageSink) -> None:
        """Start handing messages to ``sink``, first those that arrived before this call."""
        held, self._held = self._held, []
        for msg in held:
            sink(msg)
        self._sink = sink

    def silent_for(self) -> float:
        return time.monotonic() - self.last_heard

    def ping(self) -> None:
        if self._ws is not None and not self.closed.is_set():
            try:
                self._ws.ping()
            except (WebSocketClosedError, StreamClosedError):
                self.closed.set()

    def send(self, msg: Message) -> asyncio.Future[None]:
        """Write ``msg``; the future fails if the connection drops before it is written out."""
        if self._ws is None or self.closed.is_set():
            raise ChannelsClosedError(str(msg))
        data = to_ws(msg, self.subprotocol)
        try:
            written: asyncio.Future[None] = self._ws.write_message(
                data, binary=isinstance(data, bytes)
            )
        except (WebSocketClosedError, StreamClosedError):
            raise ChannelsClosedError(str(msg)) from None
        return written

    @property
    def close_reason(self) -> str:
        if self._ws is None or self._ws.close_code is None:
            return "connection lost"
        return f"code {self._ws.close_code}, {self._ws.close_reason}"

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()

    def abort(self) -> None:
        """Drop the TCP connection now (a stalled socket that will not drain)."""
        stream = getattr(getattr(self._ws, "protocol", None), "stream", None)
        if stream is not None:
            stream.close()
        self.closed.set()
