"""A prototype: the proxy kernel with its channels WebSocket on the ``websockets`` library.

``python -m benchmarks.proxy_websockets -f CONNECTION_FILE --backend jupyter --url ...`` runs
the real proxy (``cgpu_kernel.kernelapp``) with ``RemoteChannels`` swapped for
:class:`WebsocketsChannels`, a drop-in with the same interface. The benchmark measures it as the
``proxy_websockets`` path, next to the tornado-based proxy, to decide the client by measurement.

Differences from the tornado client besides the library:

* Messages over ``FRAGMENT`` bytes go out as WebSocket fragments built from
  :func:`cgpu_kernel.wire.to_ws_v1_pieces`: a 100 MB buffer is never joined, masked and framed
  into three more 100 MB copies (what tornado's ``write_message`` does), only masked a fragment
  at a time.
* Reading is one asyncio task per connection over ``websockets``' C-accelerated frame parser.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

from tornado.httpclient import HTTPRequest
from tornado.httputil import HTTPHeaders
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from cgpu_kernel import connection
from cgpu_kernel.exceptions import (
    RemoteAuthError,
    RemoteKernelGoneError,
    RemoteProtocolError,
    RemoteUnreachableError,
)
from cgpu_kernel.wire import V1_SUBPROTOCOL, Buffer, Message, to_ws, to_ws_v1_pieces

log = logging.getLogger("cgpu_kernel.connection")

_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
FRAGMENT = 1 << 20

MessageSink = Callable[[Message], None]


def _fragments(pieces: list[Buffer]) -> Iterator[Buffer]:
    """Pieces regrouped as fragments of about ``FRAGMENT`` bytes, slicing without copying."""
    small: list[Buffer] = []
    size = 0
    for piece in pieces:
        view = memoryview(piece).cast("B")
        if len(view) < FRAGMENT:
            small.append(view)
            size += len(view)
            if size >= FRAGMENT:
                yield b"".join(small)
                small, size = [], 0
            continue
        if small:
            yield b"".join(small)
            small, size = [], 0
        for start in range(0, len(view), FRAGMENT):
            yield view[start : start + FRAGMENT]
    if small:
        yield b"".join(small)


class WebsocketsChannels(connection.RemoteChannels):
    """:class:`cgpu_kernel.connection.RemoteChannels` on the ``websockets`` library: frames are
    parsed, held and delivered by the inherited code; connecting, reading, pinging and sending
    are the library's."""

    def __init__(self, where: str) -> None:
        super().__init__(where)
        self._ws: ClientConnection | None = None  # type: ignore[assignment]
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[Any]] = set()

    @classmethod
    async def open(
        cls, request: HTTPRequest, where: str, *, max_message_size: int
    ) -> WebsocketsChannels:
        channels = cls(where)
        raw = request.headers
        headers = list(raw.get_all() if isinstance(raw, HTTPHeaders) else dict(raw or {}).items())
        context = None
        if request.url.startswith("wss"):
            context = ssl.create_default_context(cafile=request.ca_certs)
            if request.validate_cert is False:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        try:
            ws = await connect(
                request.url,
                additional_headers=headers,
                subprotocols=[V1_SUBPROTOCOL],  # type: ignore[list-item]
                max_size=max_message_size,
                compression=None,
                ping_interval=None,
                open_timeout=request.connect_timeout or 20,
                ssl=context,
                user_agent_header=None,
            )
        except InvalidStatus as exc:
            code = exc.response.status_code
            if code in (401, 403):
                raise RemoteAuthError(
                    f"The server refused the WebSocket to {where} (HTTP {code}): check the token."
                ) from None
            if code == 404:
                raise RemoteKernelGoneError(f"The server no longer knows {where}.") from None
            raise RemoteProtocolError(
                f"The server refused the WebSocket to {where} (HTTP {code})."
            ) from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise RemoteUnreachableError(f"Could not reach {where}: {exc}.") from None
        channels._ws = ws
        channels.subprotocol = ws.subprotocol
        sock = ws.transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channels._socket = sock
        channels.last_heard = time.monotonic()
        channels._reader = asyncio.ensure_future(channels._read_loop(ws))
        log.info("connected to %s (protocol: %s, websockets)", where, channels.subprotocol)
        return channels

    async def _read_loop(self, ws: ClientConnection) -> None:
        try:
            while True:
                self._on_frame(await ws.recv())
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()

    def _keep(self, future: asyncio.Future[Any]) -> asyncio.Future[Any]:
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)
        return future

    def ping(self) -> None:
        if self._ws is None or self.closed.is_set():
            return

        async def ping(ws: ClientConnection) -> None:
            try:
                await (await ws.ping())
            except ConnectionClosed:
                return
            self.last_heard = time.monotonic()

        self._keep(asyncio.ensure_future(ping(self._ws)))

    def send(self, msg: Message) -> asyncio.Future[None]:
        if self._ws is None or self.closed.is_set():
            raise connection.ChannelsClosedError(str(msg))
        if self.subprotocol == V1_SUBPROTOCOL and msg.size > FRAGMENT:
            data: Any = _fragments(to_ws_v1_pieces(msg))
        else:
            data = to_ws(msg, self.subprotocol)
        return self._keep(asyncio.ensure_future(self._ws.send(data)))

    def close(self) -> None:
        if self._ws is not None:
            self._keep(asyncio.ensure_future(self._ws.close()))

    def abort(self) -> None:
        if self._ws is not None:
            self._ws.transport.abort()
        self.closed.set()


def main() -> None:
    from cgpu_kernel import kernelapp

    kernelapp.RemoteChannels = WebsocketsChannels  # type: ignore[misc,assignment]
    connection.RemoteChannels = WebsocketsChannels  # type: ignore[misc,assignment]
    from cgpu_kernel.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
