"""The WebSocket shell: one connection to a remote kernel's ``/channels`` endpoint.

Offers the ``v1.kernel.websocket.jupyter.org`` subprotocol and falls back to the legacy JSON
protocol when the server does not pick it. Sets ``TCP_NODELAY`` and, after each read where the
platform has it, ``TCP_QUICKACK``: without them every round trip pays ~40 ms of Nagle and
delayed-ACK latency (FIELD-NOTES section 3).

The WebSocket protocol itself (handshake, framing, masking, ping/pong, the closing handshake,
size limits) is the ``websockets`` library's sans-I/O core, :class:`websockets.client.
ClientProtocol`; this module is the I/O around it, on a plain asyncio protocol. Not its asyncio
client, nor tornado's: measured side by side (docs/benchmarks.md), both copy a large message
whole on the way out (join, then mask) and hold it while it drains. Here a message goes out as
1 MiB fragments, each masked and written only once the socket took the one before, so the
biggest copy is a fragment. TLS is verified (the system's trust store, or the request's
``ca_certs``; ``validate_cert=False`` only where a backend asks for it).

Liveness is ours: a silent connection here is only marked stalled; the proxy opens a new one
(same ``session_id``, so the server replaces the stale one and replays what it buffered) while
this one keeps delivering whatever backlog still arrives, until the server closes it. TCP
recovers from a short outage by itself; nothing in flight is thrown away.

Messages are handed to a sink callback as they are parsed (no queue hop). A new connection
holds its messages until :meth:`RemoteChannels.deliver_to` is called, so the proxy can finish
draining an old connection first and keep the order.

Reconnection policy lives in ``supervisor`` and ``reconnect``; this class is one socket's life.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator
from hmac import compare_digest
from typing import Any, cast

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidState, InvalidStatus, InvalidURI
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.streams import StreamReader
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from cgpu_kernel.backends.base import WebSocketTarget
from cgpu_kernel.backends.http import USER_AGENT
from cgpu_kernel.core.wire import (
    FRAGMENT_SIZE,
    V1_SUBPROTOCOL,
    VIEW_MIN,
    Buffer,
    Message,
    Part,
    TextPart,
    fragments,
    from_ws_legacy,
    from_ws_v1,
    plain,
    to_ws_legacy,
    to_ws_v1_pieces,
)
from cgpu_kernel.exceptions import (
    ChannelsClosedError,
    MalformedMessageError,
    RemoteAuthError,
    RemoteKernelGoneError,
    RemoteProtocolError,
    RemoteUnreachableError,
)

log = logging.getLogger(__name__)
# The library's own log: at DEBUG it writes the handshake's headers, token and all, so it never
# goes below INFO, whatever the kernel's --log-level.
_protocol_log = logging.getLogger(__name__ + ".protocol")
_protocol_log.setLevel(logging.INFO)

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
CLOSE_TIMEOUT = 5.0  # how long a closing handshake may take before the socket is dropped
# Headers the handshake sets itself; a backend's request may not override them.
_HANDSHAKE_HEADERS = frozenset(
    {
        "host",
        "upgrade",
        "connection",
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
    }
)

MessageSink = Callable[[Message], None]

#: Frames from this size on are handed over in the reader's own buffer, not copied out of it.
HANDOVER_MIN = 1 << 20


class _HandoverReader(StreamReader):
    """The library's stream reader, except that a large read takes the buffer it arrived in.

    ``StreamReader.read_exact`` copies what it returns out of its buffer (``buffer[:n]``) and
    frees the buffer only afterwards: a 100 MB frame was held twice while it was cut out
    (issue 19). Here a read of :data:`HANDOVER_MIN` bytes or more returns the buffer itself,
    cut at ``n`` (the few bytes of the next frame that came with it start a new buffer), so a
    large frame is only ever in memory once. Who calls: the protocol's frame parser, through
    :class:`_Protocol`.
    """

    def read_exact(self, n: int) -> Generator[None, None, bytearray]:
        if n < HANDOVER_MIN:
            return (yield from super().read_exact(n))
        while len(self.buffer) < n:
            if self.eof:
                raise EOFError(f"stream ends after {len(self.buffer)} bytes, expected {n} bytes")
            yield
        whole = self.buffer
        self.buffer = whole[n:]  # the start of what follows: at most one read's worth
        del whole[n:]  # a cut at the end: no copy, no reallocation
        return whole


class _Protocol(ClientProtocol):
    """``ClientProtocol`` reading with :class:`_HandoverReader`.

    The reader is swapped as the parser starts (the base class's ``__init__`` primes it right
    after making its reader, before any byte has been fed), so nothing is read by the other."""

    def parse(self) -> Generator[None]:
        if not isinstance(self.reader, _HandoverReader) and not self.reader.buffer:
            self.reader = _HandoverReader()
        yield from super().parse()


class RemoteChannels(asyncio.Protocol):
    """An open channels WebSocket to one remote kernel."""

    def __init__(self, where: str, max_message_size: int = 1 << 30) -> None:
        self.where = where
        self.max_message_size = max_message_size
        self.subprotocol: str | None = None
        self.malformed = 0
        self.last_heard = time.monotonic()
        #: when the handshake finished (``time.monotonic()``); the reconnector counts a
        #: connection that dies soon after as a failed attempt
        self.opened_at: float | None = None
        self.closed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._ws: ClientProtocol | None = None
        self._transport: asyncio.Transport | None = None
        self._socket: Any = None
        self._opened: asyncio.Future[Response] = self._loop.create_future()
        # A connection dropped after a timed-out handshake fails this with nobody left waiting:
        # mark the failure as seen, so asyncio does not report it as lost.
        self._opened.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._sink: MessageSink | None = None
        #: what the sink raised, if it did (``supervisor`` re-raises it: the run ends)
        self.sink_error: Exception | None = None
        self._held: list[Message] = []
        # Messages sent with a large header (weakly: the relay holds a request while it waits
        # for its reply); a reply whose parent header is those bytes shares its parse.
        self._large_headers: deque[weakref.ref[Message]] = deque(maxlen=8)
        self._partial: list[Buffer] = []  # a fragmented message being received
        self._partial_opcode = Opcode.BINARY
        # Messages being written: (their wire bytes, frame by frame, made as the socket takes
        # them; the future resolves once all are written).
        self._queue: deque[tuple[Iterator[bytes], asyncio.Future[None]]] = deque()
        self._paused = False
        #: the proxy stopped reading this socket (the frontends are behind, see
        #: :meth:`pause_reading`): its silence says nothing about the server meanwhile
        self.reading_paused = False
        self._close_timer: asyncio.TimerHandle | None = None

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, target: WebSocketTarget, where: str, *, max_message_size: int
    ) -> RemoteChannels:
        """Connect to the backend's ``target``; raises
        :class:`~cgpu_kernel.exceptions.RemoteError` subclasses."""
        channels = cls(where, max_message_size)
        timeout = target.handshake_timeout
        try:
            await asyncio.wait_for(channels._connect(target), timeout)
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

    async def _connect(self, target: WebSocketTarget) -> None:
        url = target.url
        if url.startswith(("http://", "https://")):
            url = "ws" + url[4:]
        try:
            uri = parse_uri(url)
        except InvalidURI:
            raise RemoteProtocolError(f"not a WebSocket URL: {self.where}") from None
        self._ws = _Protocol(
            uri,
            subprotocols=[Subprotocol(V1_SUBPROTOCOL)],
            max_size=self.max_message_size,
            logger=_protocol_log,
        )
        context: ssl.SSLContext | None = None
        if uri.secure:
            context = ssl.create_default_context(cafile=target.ca_certs)
            if not target.validate_cert:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        connect_timeout = target.connect_timeout
        try:
            await asyncio.wait_for(
                self._loop.create_connection(
                    lambda: self,
                    uri.host,
                    uri.port,
                    ssl=context,
                    server_hostname=uri.host if context is not None else None,
                ),
                connect_timeout,
            )
        except asyncio.TimeoutError:
            raise RemoteUnreachableError(
                f"Could not reach {self.where}: no connection within {connect_timeout:g} s."
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise RemoteUnreachableError(
                f"Could not reach {self.where}: its TLS certificate is not trusted"
                f" ({exc.verify_message}). Give the server's CA with --ca-certs."
            ) from None
        except OSError as exc:
            raise RemoteUnreachableError(f"Could not reach {self.where}: {exc}.") from None
        handshake = self._ws.connect()
        for name, value in target.headers.items():
            if name.lower() not in _HANDSHAKE_HEADERS:
                handshake.headers[name] = value
        if "User-Agent" not in handshake.headers:
            handshake.headers["User-Agent"] = USER_AGENT
        self._ws.send_request(handshake)
        self._flush()
        response = await self._opened
        self._check_upgrade(response)  # the subprotocol was set as the response was parsed

    def _check_upgrade(self, response: Response) -> None:
        assert self._ws is not None
        failure = self._ws.handshake_exc
        if failure is None:
            return
        where = self.where
        if isinstance(failure, InvalidStatus):
            code = failure.response.status_code
            if code in (401, 403):
                raise RemoteAuthError(
                    f"The server refused the WebSocket to {where} (HTTP {code}): check the token."
                )
            if code == 404:
                raise RemoteKernelGoneError(f"The server no longer knows {where}.")
            raise RemoteProtocolError(
                f"The server refused the WebSocket to {where} (HTTP {code}"
                f" {response.reason_phrase})."
            )
        raise RemoteProtocolError(f"{where} answered the WebSocket upgrade wrongly ({failure}).")

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

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        if self._socket is not None and _QUICKACK is not None:
            try:
                self._socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self._socket = None
        ws = self._ws
        if ws is None:
            return
        ws.receive_data(data)
        del data
        # Each event is popped and handed over, so a large frame's payload is freed as soon as
        # its message is parsed (not held by this loop while the message is relayed).
        events = ws.events_received()
        events.reverse()
        while events:
            if isinstance(events[-1], Frame):
                self._frame(cast(Frame, events.pop()))
            else:
                response = events.pop()
                if isinstance(response, Response):
                    self._handshake_done(response)
        self._flush()  # pongs, the answer to a close, the close after a protocol error

    def _handshake_done(self, response: Response) -> None:
        """The server's answer to the upgrade arrived. The subprotocol is taken from it here,
        before the frames that came in the same read are parsed: a server that writes its
        first messages right behind the 101 (a loaded machine, a replay after a reconnect)
        would otherwise have them read as legacy frames and dropped as malformed."""
        ws = self._ws
        if ws is not None and ws.handshake_exc is None:
            self.subprotocol = ws.subprotocol
        if not self._opened.done():
            self._opened.set_result(response)

    def eof_received(self) -> bool | None:
        if self._ws is not None:
            self._ws.receive_eof()
            self._flush()
        return None  # let the transport close

    def _frame(self, frame: Frame) -> None:
        """One frame, handed over by :meth:`data_received`. Its payload is taken out of it:
        the library's parser keeps the last frame it parsed until the next one arrives, and a
        20 MB frame was held that long (issue 19)."""
        opcode = frame.opcode
        if opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            data: Buffer = frame.data
            frame.data = b""
        if opcode in (Opcode.TEXT, Opcode.BINARY):
            if frame.fin:
                payload: Buffer = data
                del frame, data
                msg = self._parse(opcode, payload)
                del payload  # the message holds its small parts, views of the large ones
                self._deliver(msg)
            else:
                self._partial, self._partial_opcode = [data], opcode
        elif opcode is Opcode.CONT:
            self._partial.append(data)
            del data
            if frame.fin:
                del frame
                parts, self._partial = self._partial, []
                payload = b"".join(parts)
                del parts
                msg = self._parse(self._partial_opcode, payload)
                del payload
                self._deliver(msg)
        elif opcode is Opcode.CLOSE and self._ws is not None and self._ws.close_expected():
            # The library answered the close; drop the socket if the server does not.
            self._close_after(CLOSE_TIMEOUT)
        # PING (answered by the library) and PONG: signs of life, already noted

    def _parse(self, opcode: Opcode, payload: Buffer) -> Message | None:
        """The message in a whole WebSocket message's payload; None (counted, logged) when it
        is malformed."""
        try:
            if self.subprotocol == V1_SUBPROTOCOL:
                if opcode is not Opcode.BINARY:
                    raise MalformedMessageError("text frame on a v1 WebSocket")
                msg = from_ws_v1(payload, self._known_parent)
            elif opcode is Opcode.TEXT:
                try:
                    text = bytes(payload).decode("utf-8")
                except UnicodeDecodeError:
                    raise MalformedMessageError("a text frame that is not UTF-8") from None
                msg = from_ws_legacy(text)
            else:
                msg = from_ws_legacy(bytes(payload) if isinstance(payload, memoryview) else payload)
        except MalformedMessageError as exc:
            self.malformed += 1
            log.warning("dropped a malformed message from %s: %s", self.where, exc)
            return None
        return msg

    def _known_parent(self, raw: Part) -> Message | None:
        """A message sent here whose header was exactly ``raw`` (a reply's large parent
        header, see ``from_ws_v1``), or None. Compared as bytes, without copying them
        (``hmac.compare_digest`` takes views; ~0.6 ms per MB here)."""
        if isinstance(raw, TextPart):
            return None
        for ref in self._large_headers:
            sent = ref()
            if sent is None:
                continue
            header = sent.parts[0]
            if (
                not isinstance(header, TextPart)
                and len(header) == len(raw)
                and compare_digest(header, raw)
            ):
                return sent
        return None

    def _deliver(self, msg: Message | None) -> None:
        if msg is None:
            return
        sink = self._sink
        if sink is None:
            self._held.append(msg)
            return
        if self.sink_error is not None:
            return  # the run is ending with that error (below); nothing more is handled
        try:
            sink(msg)
        except Exception as exc:
            # Not swallowed: a bug in the relay or its shell, and this message reached no one.
            # The connection stops and the supervisor ends the run with the error, loudly.
            self.sink_error = exc
            self.abort()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._ws is not None and self._ws.state is not State.CLOSED:
            self._ws.receive_eof()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        queue, self._queue = self._queue, deque()
        for _, future in queue:
            if not future.done():
                future.set_exception(ChannelsClosedError("the connection closed"))
        if not self._opened.done():
            self._opened.set_exception(
                RemoteUnreachableError(f"{self.where} closed the connection during the handshake.")
            )
        self.closed.set()

    # --- the public side ----------------------------------------------------------------------

    def _alive(self) -> None:
        self.last_heard = self.opened_at = time.monotonic()

    def deliver_to(self, sink: MessageSink) -> None:
        """Start handing messages to ``sink``, first those that arrived before this call."""
        held, self._held = self._held, []
        for msg in held:
            sink(msg)
        self._sink = sink

    def silent_for(self) -> float:
        """Seconds since the server last showed a sign of life; 0 while this side is not
        reading (a deliberate pause is no stall)."""
        if self.reading_paused:
            return 0.0
        return time.monotonic() - self.last_heard

    def pause_reading(self) -> None:
        """Stop reading the socket: flow control while the frontends are behind (the proxy
        kernel calls this when the iopub queue is full). TCP then pushes back on the server."""
        transport = self._transport
        if not self.reading_paused and transport is not None and not transport.is_closing():
            transport.pause_reading()
            self.reading_paused = True

    def resume_reading(self) -> None:
        """Read again; the pause counts as heard from the server (it could not be heard)."""
        if not self.reading_paused:
            return
        self.reading_paused = False
        self.last_heard = time.monotonic()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _open(self) -> ClientProtocol | None:
        ws, transport = self._ws, self._transport
        if transport is None or transport.is_closing() or ws is None or ws.state is not State.OPEN:
            return None
        return ws

    def ping(self) -> None:
        ws = self._open()
        if ws is not None and not self.closed.is_set():
            ws.send_ping(b"")
            self._flush()

    def send(self, msg: Message) -> asyncio.Future[None]:
        """Write ``msg``; the future fails if the connection drops before it is written out."""
        ws = self._open()
        if ws is None or self.closed.is_set():
            raise ChannelsClosedError(str(msg))
        future: asyncio.Future[None] = self._loop.create_future()
        if len(msg.parts[0]) >= VIEW_MIN:
            self._large_headers.append(weakref.ref(msg))
        self._queue.append((self._frames(ws, msg), future))
        if len(self._queue) == 1 and not self._paused:
            self._pump()
        return future

    def _frames(self, ws: ClientProtocol, msg: Message) -> Iterator[bytes]:
        """``msg`` on the wire, one frame at a time: up to :data:`FRAGMENT_SIZE` bytes is one
        frame; a larger message becomes fragments, each made only when it is its turn."""
        if self.subprotocol == V1_SUBPROTOCOL:
            pieces: list[Buffer | TextPart] = to_ws_v1_pieces(msg)
        else:
            data = to_ws_legacy(msg)
            if isinstance(data, str):
                ws.send_text(data.encode("utf-8"))
                yield self._outgoing(ws)
                return
            pieces = [data]
        total = sum(len(p) for p in pieces)
        if total <= FRAGMENT_SIZE:
            whole = plain(pieces)
            ws.send_binary(whole[0] if len(whole) == 1 else b"".join(whole))
            yield self._outgoing(ws)
            return
        sent = 0
        for index, chunk in enumerate(fragments(pieces)):
            sent += len(chunk)
            if index == 0:
                ws.send_binary(chunk, fin=sent == total)
            else:
                ws.send_continuation(chunk, fin=sent == total)
            yield self._outgoing(ws)

    @staticmethod
    def _outgoing(ws: ClientProtocol) -> bytes:
        data = ws.data_to_send()
        return data[0] if len(data) == 1 else b"".join(data)

    def _pump(self) -> None:
        """Write frames from the queue's head while the socket takes them whole.

        A message counts as written only if the transport is still open after its last frame:
        a transport whose socket already failed (a reset) drops what it is handed without an
        error, and is closing from then on. Such a message stays in the queue, and its future
        fails when the connection is lost, so the sender queues it again. (Written is still not
        delivered: bytes in the kernel's buffer die with a reset too; the relay keeps each
        request until the remote kernel shows it has it.)"""
        queue = self._queue
        while queue and not self._paused:
            transport = self._transport
            if transport is None or transport.is_closing():
                return
            frames, future = queue[0]
            try:
                frame = next(frames, None)
            except InvalidState:  # the connection began closing after this message was queued
                queue.popleft()
                if not future.done():
                    future.set_exception(ChannelsClosedError("the connection is closing"))
                continue
            if frame is None:
                queue.popleft()
                if not future.done():
                    future.set_result(None)
                continue
            transport.write(frame)
            if transport.is_closing():
                return  # the write may have been dropped: connection_lost fails the future

    def _flush(self) -> None:
        """Write what the protocol has to say by itself (control frames); an empty chunk is its
        signal to end the connection."""
        ws, transport = self._ws, self._transport
        if ws is None or transport is None:
            return
        for data in ws.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()
            else:
                transport.close()

    def _close_after(self, seconds: float) -> None:
        if self._close_timer is None and self._transport is not None:
            self._close_timer = self._loop.call_later(seconds, self.abort)

    @property
    def close_code(self) -> int | None:
        """The close code the *server* sent (1009: a message of ours was over its size limit),
        None when it sent no close frame (the connection was cut, reset, or closed by us)."""
        received = self._ws.close_rcvd if self._ws is not None else None
        return None if received is None else int(received.code)

    @property
    def close_reason(self) -> str:
        received = self._ws.close_rcvd if self._ws is not None else None
        if received is None:
            return "connection lost"
        return f"code {received.code}, {received.reason}"

    def close(self) -> None:
        """Start the closing handshake; the socket is dropped if it does not finish in time."""
        ws = self._open()
        if ws is not None:
            ws.send_close(1000)
            self._flush()
        self._close_after(CLOSE_TIMEOUT)

    def abort(self) -> None:
        """Drop the TCP connection now (a stalled socket that will not drain)."""
        if self._transport is not None:
            self._transport.abort()
        self.closed.set()
