"""The WebSocket shell: one connection to a remote kernel's ``/channels`` endpoint.

Offers the ``v1.kernel.websocket.jupyter.org`` subprotocol and falls back to the legacy JSON
protocol when the server does not pick it. Sets ``TCP_NODELAY`` and, after each read where the
platform has it, ``TCP_QUICKACK``: without them every round trip pays ~40 ms of Nagle and
delayed-ACK latency (FIELD-NOTES section 3).

The client is a small RFC 6455 client on an asyncio buffered protocol, not tornado's
``websocket_connect``: per message, tornado's client awaited two reads through its stream's
futures and copied a message three times on the way out (join, mask, frame). Here the framing
is :mod:`cgpu_kernel.wire`'s (sans-I/O): a read lands in one reusable buffer and every complete
frame in it is handled in the same callback; a large frame is read straight into a buffer of its
own, whose binary buffers go on to ZMQ as views; a large message goes out as 1 MiB fragments
masked one at a time, each written only once the socket took the one before (the transport's
write buffer never holds more than a fragment). TLS is verified as before (the system's trust
store, or the request's ``ca_certs``; ``validate_cert=False`` only where a backend asks for it).

Liveness is ours: a silent connection here is only marked stalled; the proxy opens a new one
(same ``session_id``, so the server replaces the stale one and replays what it buffered) while
this one keeps delivering whatever backlog still arrives, until the server closes it. TCP
recovers from a short outage by itself; nothing in flight is thrown away.

Messages are handed to a sink callback as they are parsed (no queue hop). A new connection
holds its messages until :meth:`RemoteChannels.deliver_to` is called, so the proxy can finish
draining an old connection first and keep the order.

Reconnection policy lives in ``kernelapp``; this class is one socket's life.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

from tornado.httpclient import HTTPRequest
from tornado.httputil import HTTPHeaders

from . import __version__
from .exceptions import (
    MalformedMessageError,
    RemoteAuthError,
    RemoteKernelGoneError,
    RemoteProtocolError,
    RemoteUnreachableError,
)
from .wire import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    V1_SUBPROTOCOL,
    FrameReader,
    Mask,
    Message,
    WebSocketProtocolError,
    client_frames,
    close_payload,
    frame_header,
    from_ws_legacy,
    from_ws_v1,
    mask_python,
    parse_close,
    to_ws_legacy,
    to_ws_v1_pieces,
)

try:
    from tornado.speedups import websocket_mask as _c_mask
except ImportError:  # pragma: no cover - tornado built without its C extension
    _MASK: Mask = mask_python
else:
    _MASK = _c_mask

log = logging.getLogger(__name__)

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEAD = 64 * 1024
CLOSE_TIMEOUT = 5.0  # how long a closing handshake may take before the socket is dropped

MessageSink = Callable[[Message], None]


class ChannelsClosedError(Exception):
    """Sending on a channels WebSocket that has closed (the message was not sent)."""


def _new_key() -> bytes:
    return os.urandom(4)


class _Handshake:
    """The HTTP upgrade's response, read into the protocol's buffer before framing starts."""

    def __init__(self) -> None:
        self.data = bytearray(_MAX_HEAD)
        self.filled = 0
        self.done: asyncio.Future[tuple[int, str, dict[str, str], bytes]] = (
            asyncio.get_running_loop().create_future()
        )

    def received(self, count: int) -> bool:
        """Parse once the head is complete; True when it is."""
        self.filled += count
        end = self.data.find(b"\r\n\r\n", 0, self.filled)
        if end < 0:
            if self.filled >= len(self.data) and not self.done.done():
                self.done.set_exception(RemoteProtocolError("an HTTP response head over 64 KiB"))
            return False
        lines = bytes(self.data[:end]).decode("latin-1").split("\r\n")
        status_line = lines[0].split(" ", 2)
        try:
            code = int(status_line[1])
        except (IndexError, ValueError):
            if not self.done.done():
                self.done.set_exception(RemoteProtocolError(f"not HTTP: {lines[0][:80]!r}"))
            return True
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        reason = status_line[2] if len(status_line) > 2 else ""
        if not self.done.done():
            self.done.set_result((code, reason, headers, bytes(self.data[end + 4 : self.filled])))
        return True


class RemoteChannels(asyncio.BufferedProtocol):
    """An open channels WebSocket to one remote kernel."""

    def __init__(self, where: str, max_message_size: int = 1 << 30) -> None:
        self.where = where
        self.subprotocol: str | None = None
        self.malformed = 0
        self.last_heard = time.monotonic()
        self.closed = asyncio.Event()
        self._socket: Any = None
        self._sink: MessageSink | None = None
        self._held: list[Message] = []
        self._transport: asyncio.Transport | None = None
        self._handshake: _Handshake | None = _Handshake()
        self._reader = FrameReader(max_message_size)
        self._v1 = False
        # Messages being written: (frames still to write, future). The head's frames are
        # written as the socket takes them; the future resolves once they are all flushed.
        self._queue: deque[tuple[Iterator[bytes], asyncio.Future[None]]] = deque()
        self._paused = False
        self._close_sent = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._close_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, request: HTTPRequest, where: str, *, max_message_size: int
    ) -> RemoteChannels:
        """Connect; raises :class:`~cgpu_kernel.exceptions.RemoteError` subclasses."""
        channels = cls(where, max_message_size)
        timeout = request.request_timeout or 20.0
        try:
            await asyncio.wait_for(channels._connect(request), timeout)
        except asyncio.TimeoutError:
            channels.abort()
            raise RemoteUnreachableError(
                f"Could not reach {where}: no WebSocket handshake within {timeout:g} s."
            ) from None
        except BaseException:
            channels.abort()
            raise
        channels._alive()
        log.info("connected to %s (protocol: %s)", where, channels.subprotocol or "legacy JSON")
        return channels

    async def _connect(self, request: HTTPRequest) -> None:
        url = request.url
        parts = urlsplit(url)
        secure = parts.scheme in ("wss", "https")
        if parts.scheme not in ("ws", "wss", "http", "https") or not parts.hostname:
            raise RemoteProtocolError(f"not a WebSocket URL: {self.where}")
        host = parts.hostname
        port = parts.port or (443 if secure else 80)
        context: ssl.SSLContext | None = None
        if secure:
            context = ssl.create_default_context(cafile=request.ca_certs)
            if request.client_cert:
                context.load_cert_chain(request.client_cert, request.client_key)
            if request.validate_cert is False:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        connect_timeout = request.connect_timeout or 20.0
        try:
            await asyncio.wait_for(
                self._loop.create_connection(
                    lambda: self,
                    host,
                    port,
                    ssl=context,
                    server_hostname=host if context is not None else None,
                ),
                connect_timeout,
            )
        except asyncio.TimeoutError:
            raise RemoteUnreachableError(
                f"Could not reach {self.where}: no connection within {connect_timeout:g} s."
            ) from None
        except OSError as exc:
            raise RemoteUnreachableError(f"Could not reach {self.where}: {exc}.") from None
        key = base64.b64encode(os.urandom(16)).decode("ascii")
        self._transport_or_raise().write(self._upgrade_request(request, parts, key))
        assert self._handshake is not None
        code, reason, headers, rest = await self._handshake.done
        self._check_upgrade(code, reason, headers, key)
        self.subprotocol = headers.get("sec-websocket-protocol") or None
        self._v1 = self.subprotocol == V1_SUBPROTOCOL
        self._handshake = None
        if rest:
            self._handle_events(rest)
        self._transport_or_raise().resume_reading()

    def _upgrade_request(self, request: HTTPRequest, parts: Any, key: str) -> bytes:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default_port = 443 if parts.scheme in ("wss", "https") else 80
        netloc = parts.netloc.rpartition("@")[2]
        if parts.port == default_port:
            netloc = netloc.rsplit(":", 1)[0]
        lines = [
            f"GET {target} HTTP/1.1",
            f"Host: {netloc}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Protocol: {V1_SUBPROTOCOL}",
        ]
        given = request.headers
        items = given.get_all() if isinstance(given, HTTPHeaders) else dict(given or {}).items()
        skip = {"host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version"}
        skip.add("sec-websocket-protocol")
        have_agent = False
        for name, value in items:
            if name.lower() in skip:
                continue
            have_agent = have_agent or name.lower() == "user-agent"
            lines.append(f"{name}: {value}")
        if not have_agent:
            lines.append(f"User-Agent: cgpu-kernel/{__version__}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def _check_upgrade(self, code: int, reason: str, headers: dict[str, str], key: str) -> None:
        where = self.where
        if code in (401, 403):
            raise RemoteAuthError(
                f"The server refused the WebSocket to {where} (HTTP {code}): check the token."
            )
        if code == 404:
            raise RemoteKernelGoneError(f"The server no longer knows {where}.")
        if code != 101:
            raise RemoteProtocolError(
                f"The server refused the WebSocket to {where} (HTTP {code} {reason})."
            )
        # RFC 6455's fixed accept-key derivation, not a security use of SHA-1
        digest = hashlib.sha1(key.encode("ascii") + _GUID, usedforsecurity=False).digest()
        accept = base64.b64encode(digest).decode()
        if (
            headers.get("upgrade", "").lower() != "websocket"
            or headers.get("sec-websocket-accept") != accept
        ):
            raise RemoteProtocolError(f"{where} answered the WebSocket upgrade wrongly.")
        chosen = headers.get("sec-websocket-protocol")
        if chosen and chosen != V1_SUBPROTOCOL:
            raise RemoteProtocolError(f"{where} chose an unknown subprotocol {chosen!r}.")

    def _transport_or_raise(self) -> asyncio.Transport:
        if self._transport is None:
            raise RemoteUnreachableError(f"Could not reach {self.where}: the connection closed.")
        return self._transport

    # --- asyncio protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        # Told the moment anything stays buffered, and again once it is all written: a send's
        # future resolves when its bytes are in the kernel, and a large message is produced one
        # fragment at a time.
        transport.set_write_buffer_limits(high=0, low=0)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socket = sock

    def get_buffer(self, sizehint: int) -> memoryview:
        handshake = self._handshake
        if handshake is not None:
            return memoryview(handshake.data)[handshake.filled :]
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.last_heard = time.monotonic()
        if self._socket is not None and _QUICKACK is not None:
            try:
                self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self._socket = None
        handshake = self._handshake
        if handshake is not None:
            if handshake.received(nbytes):
                # Framing starts with whatever follows the head; wait for _connect to switch.
                self._transport_or_raise().pause_reading()
            return
        try:
            events = self._reader.buffer_updated(nbytes)
        except WebSocketProtocolError as exc:
            self._protocol_error(exc)
            return
        self._dispatch(events)

    def _handle_events(self, data: bytes) -> None:
        try:
            events = self._reader.feed(data)
        except WebSocketProtocolError as exc:
            self._protocol_error(exc)
            return
        self._dispatch(events)

    def _dispatch(self, events: list[tuple[int, bytes | bytearray]]) -> None:
        for opcode, payload in events:
            if opcode in (OP_BINARY, OP_TEXT):
                self._message(opcode, payload)
            elif opcode == OP_PING:
                self._write_control(OP_PONG, bytes(payload))
            elif opcode == OP_CLOSE:
                self._close_code, self._close_reason = parse_close(payload)
                if not self._close_sent:
                    code = self._close_code if self._close_code is not None else 1000
                    self._write_control(OP_CLOSE, close_payload(code))
                    self._close_sent = True
                if self._transport is not None:
                    self._transport.close()
            # OP_PONG: a sign of life, already noted

    def _message(self, opcode: int, payload: bytes | bytearray) -> None:
        try:
            if self._v1:
                if opcode != OP_BINARY:
                    raise MalformedMessageError("text frame on a v1 WebSocket")
                msg = from_ws_v1(payload)
            elif opcode == OP_TEXT:
                try:
                    text = payload.decode("utf-8")
                except UnicodeDecodeError:
                    raise MalformedMessageError("a text frame that is not UTF-8") from None
                msg = from_ws_legacy(text)
            else:
                msg = from_ws_legacy(payload)
        except MalformedMessageError as exc:
            self.malformed += 1
            log.warning("dropped a malformed message from %s: %s", self.where, exc)
            return
        sink = self._sink
        if sink is None:
            self._held.append(msg)
            return
        try:
            sink(msg)
        except Exception:
            log.exception("handling a message from %s failed", self.where)

    def _on_frame(self, frame: str | bytes | None) -> None:
        """One whole message (or None at the end), for clients that frame messages themselves
        (the ``websockets`` prototype in ``benchmarks/``)."""
        if frame is None:
            self.closed.set()
            return
        self.last_heard = time.monotonic()
        if self._socket is not None and _QUICKACK is not None:
            try:
                self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self._socket = None
        self._v1 = self.subprotocol == V1_SUBPROTOCOL
        if isinstance(frame, str):
            self._message(OP_TEXT, frame.encode("utf-8"))
        else:
            self._message(OP_BINARY, frame)

    def _protocol_error(self, exc: WebSocketProtocolError) -> None:
        log.warning("closing the WebSocket to %s: %s", self.where, exc)
        self._close_code, self._close_reason = exc.code, str(exc)
        if not self._close_sent:
            self._write_control(OP_CLOSE, close_payload(exc.code))
            self._close_sent = True
        self.abort()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        queue, self._queue = self._queue, deque()
        for _, future in queue:
            if not future.done():
                future.set_exception(ChannelsClosedError("the connection closed"))
        handshake = self._handshake
        if handshake is not None and not handshake.done.done():
            handshake.done.set_exception(
                RemoteUnreachableError(f"{self.where} closed the connection during the handshake.")
            )
        self.closed.set()

    # --- the public side ----------------------------------------------------------------------

    def _alive(self) -> None:
        self.last_heard = time.monotonic()

    def deliver_to(self, sink: MessageSink) -> None:
        """Start handing messages to ``sink``, first those that arrived before this call."""
        held, self._held = self._held, []
        for msg in held:
            sink(msg)
        self._sink = sink

    def silent_for(self) -> float:
        return time.monotonic() - self.last_heard

    def ping(self) -> None:
        if self._transport is not None and not self.closed.is_set():
            self._write_control(OP_PING, b"")

    def _write_control(self, opcode: int, payload: bytes) -> None:
        """A control frame goes out at once (allowed between the fragments of a message)."""
        transport = self._transport
        if transport is None or self._close_sent or transport.is_closing():
            return
        key = _new_key()
        transport.write(frame_header(opcode, len(payload), key) + _MASK(key, payload))

    def send(self, msg: Message) -> asyncio.Future[None]:
        """Write ``msg``; the future fails if the connection drops before it is written out."""
        transport = self._transport
        if transport is None or self._close_sent or self.closed.is_set():
            raise ChannelsClosedError(str(msg))
        if self._v1:
            opcode, pieces = OP_BINARY, to_ws_v1_pieces(msg)
        else:
            data = to_ws_legacy(msg)
            if isinstance(data, str):
                opcode, pieces = OP_TEXT, [data.encode("utf-8")]
            else:
                opcode, pieces = OP_BINARY, [data]
        future: asyncio.Future[None] = self._loop.create_future()
        self._queue.append((client_frames(opcode, pieces, _MASK, _new_key), future))
        if len(self._queue) == 1 and not self._paused:
            self._pump()
        return future

    def _pump(self) -> None:
        """Write frames from the queue's head while the socket takes them whole."""
        queue = self._queue
        while queue and not self._paused:
            transport = self._transport
            if transport is None:
                return
            frames, future = queue[0]
            frame = next(frames, None)
            if frame is None:
                queue.popleft()
                if not future.done():
                    future.set_result(None)
                continue
            transport.write(frame)

    @property
    def close_reason(self) -> str:
        if self._close_code is None:
            return "connection lost"
        return f"code {self._close_code}, {self._close_reason}"

    def close(self) -> None:
        """Start the closing handshake; the socket is dropped if it does not finish in time."""
        transport = self._transport
        if transport is None:
            return
        if not self._close_sent:
            self._write_control(OP_CLOSE, close_payload(1000))
            self._close_sent = True
        if self._close_timer is None:
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self.abort)

    def abort(self) -> None:
        """Drop the TCP connection now (a stalled socket that will not drain)."""
        if self._transport is not None:
            self._transport.abort()
        self.closed.set()
