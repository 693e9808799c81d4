"""A fault-injection TCP relay for reconnection tests: cut, blackhole, delay and throttle.

Sits on 127.0.0.1 between the proxy kernel and the remote Jupyter server; every REST call and
WebSocket of the proxy goes through it. Faults model what networks do:

* ``cut()`` closes every open connection at once, the way a middlebox timing out a socket
  does: what the relay already read is delivered, then both sides get a FIN.
* ``reset()`` aborts every open connection with an RST: both ends discard what is in flight.
* ``blackhole()`` makes packets vanish without a close (a half-open path, a sleeping laptop):
  nothing is forwarded and new connections hang, but as with TCP's retransmissions nothing
  already sent is lost; ``restore()`` lets it all through again, in order.
* ``delay(seconds)`` and ``throttle(bytes_per_second)`` slow every chunk down.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Pair:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                sock = writer.get_extra_info("socket")
                if sock is not None:  # RST rather than FIN, like a dropped path
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultyPath:
    """The relay. ``port`` is where the proxy should connect."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.connections_seen = 0
        self._loop = asyncio.new_event_loop()
        self._pairs: set[_Pair] = set()
        self._open = asyncio.Event()
        self._delay = 0.0
        self._rate = 0.0
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FaultyPath:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    # --- faults (called from the test's thread) -------------------------------------------------

    def cut(self) -> None:
        self._call(self._cut(graceful=True))

    def reset(self) -> None:
        self._call(self._cut(graceful=False))

    def blackhole(self) -> None:
        self._call(self._set_open(False))

    def restore(self) -> None:
        self._call(self._set_open(True))

    def delay(self, seconds: float) -> None:
        self._delay = seconds

    def throttle(self, bytes_per_second: float) -> None:
        self._rate = bytes_per_second

    # --- the relay (its own thread and loop) --------------------------------------------------

    def _call(self, coroutine: object) -> None:
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)  # type: ignore[arg-type]
        future.result(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._open.set()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()

    async def _cut(self, graceful: bool = False) -> None:
        for pair in list(self._pairs):
            if graceful:
                pair.close()
            else:
                pair.abort()
        self._pairs.clear()

    async def _set_open(self, value: bool) -> None:
        if value:
            self._open.set()
        else:
            self._open.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_seen += 1
        pair = _Pair(writer)
        self._pairs.add(pair)
        try:
            await self._open.wait()  # a blackholed path: the connection hangs
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except (OSError, asyncio.CancelledError):
            pair.abort()
            self._pairs.discard(pair)
            return
        pair.upstream = up_writer
        pair.tasks = [
            asyncio.ensure_future(self._pump(reader, up_writer)),
            asyncio.ensure_future(self._pump(up_reader, writer)),
        ]
        await asyncio.gather(*pair.tasks, return_exceptions=True)
        self._pairs.discard(pair)
        pair.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._open.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self._open.wait()  # read before the blackhole: held, not dropped
                if self._delay:
                    await asyncio.sleep(self._delay)
                if self._rate:
                    await asyncio.sleep(len(data) / self._rate)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()
