"""The WebSocket shell: one connection to a remote kernel's ``/channels`` endpoint.

Offers the ``v1.kernel.websocket.jupyter.org`` subprotocol and falls back to the legacy JSON
protocol when the server does not pick it. Pings on an interval and treats a missing pong as a
lost connection, so a half-open socket is noticed within about two intervals. Sets
``TCP_NODELAY`` and, after each read where the platform has it, ``TCP_QUICKACK``: without them
every round trip pays ~40 ms of Nagle and delayed-ACK latency (FIELD-NOTES section 3).

Reconnection policy lives in ``kernelapp``; this class is one socket's life.
"""

from __future__ import annotations

import logging
import socket

from tornado.httpclient import HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClientConnection, WebSocketClosedError, websocket_connect

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


class ChannelsClosedError(Exception):
    """Sending on a channels WebSocket that has closed (the message was not sent)."""


class RemoteChannels:
    """An open channels WebSocket to one remote kernel."""

    def __init__(self, ws: WebSocketClientConnection, where: str) -> None:
        self._ws = ws
        self.where = where
        self.subprotocol = ws.selected_subprotocol
        self.malformed = 0
        self._socket = self._raw_socket()
        if self._socket is not None:
            self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @classmethod
    async def open(
        cls,
        request: HTTPRequest,
        where: str,
        *,
        ping_interval: float,
        max_message_size: int,
    ) -> RemoteChannels:
        """Connect; raises :class:`~cgpu_kernel.exceptions.RemoteError` subclasses."""
        try:
            ws = await websocket_connect(
                request,
                ping_interval=ping_interval or None,
                ping_timeout=ping_interval or None,
                max_message_size=max_message_size,
                subprotocols=[V1_SUBPROTOCOL],
            )
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
        channels = cls(ws, where)
        log.info("connected to %s (protocol: %s)", where, channels.subprotocol or "legacy JSON")
        return channels

    def _raw_socket(self) -> socket.socket | None:
        stream = getattr(getattr(self._ws, "protocol", None), "stream", None)
        raw = getattr(stream, "socket", None)
        if isinstance(raw, socket.socket) and raw.family in (socket.AF_INET, socket.AF_INET6):
            return raw
        return None

    async def receive(self) -> Message | None:
        """The next message from the remote; None once the socket is closed."""
        while True:
            frame = await self._ws.read_message()
            if frame is None:
                return None
            if _QUICKACK is not None and self._socket is not None:
                try:
                    self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                except OSError:
                    self._socket = None
            try:
                return from_ws(frame, self.subprotocol)
            except MalformedMessageError as exc:
                self.malformed += 1
                log.warning("dropped a malformed message from %s: %s", self.where, exc)

    def send(self, msg: Message) -> None:
        data = to_ws(msg, self.subprotocol)
        try:
            written = self._ws.write_message(data, binary=isinstance(data, bytes))
        except (WebSocketClosedError, StreamClosedError):
            raise ChannelsClosedError(str(msg)) from None
        # A write that fails later surfaces as a closed socket in receive(); consume it here.
        written.add_done_callback(lambda future: future.cancelled() or future.exception())

    @property
    def close_reason(self) -> str:
        code, reason = self._ws.close_code, self._ws.close_reason
        return f"code {code}, {reason}" if code is not None else "connection lost"

    def close(self) -> None:
        self._ws.close()
