"""WebSocket client transports side by side: ``websockets`` (the proxy's) against ``picows``.

    python -m benchmarks.transports [--mib 100] [--rounds 3] [--json PATH]

Issue 19 asks to measure ``picows`` (a Cython WebSocket client) against ``websockets`` before
deciding on the proxy's transport. This measures only what a swap would change: the client side
of one WebSocket on loopback, receiving from a tornado server in another process (jupyter-server's
own WebSocket stack), so the client's CPU is this process's CPU:

* ``websockets``: the sans-I/O ``ClientProtocol`` on a plain asyncio protocol, fed every read and
  drained of its events, as ``cgpu_kernel.proxy.connection.RemoteChannels`` does;
* ``picows``: its ``WSListener``, frames handed over as they are parsed.

Per client, in interleaved rounds (the machine is shared, so each sees the same load): a stream
of ``--mib`` MiB in 64 KiB binary messages and one of 20,000 100-byte messages (client CPU ms per
MiB and per 1,000 messages, wall MB/s), and 2,000 ping-pong round trips (median microseconds).
Printed with the ratio picows/websockets; no thresholds. ``picows`` is not a dependency: without
it, only ``websockets`` is measured and the script says how to add it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

MIB = 1 << 20
BIG = 64 << 10
SMALL = 100
SMALL_COUNT = 20_000
PINGS = 2000


# --- the server: tornado, in its own process -----------------------------------------------------


def serve(port_file: Path) -> None:
    """``--serve``: a tornado WebSocket that streams on request and answers pings."""
    from tornado import httpserver, ioloop, web, websocket

    class Stream(websocket.WebSocketHandler):
        streaming: ClassVar[set[asyncio.Future[None]]] = set()

        def on_message(self, message: str | bytes) -> None:
            text = message.decode() if isinstance(message, bytes) else message
            if text == "ping":
                self.write_message("pong")
                return
            _, count, size = text.split()
            task = asyncio.ensure_future(self.stream(int(count), int(size)))
            self.streaming.add(task)
            task.add_done_callback(self.streaming.discard)

        async def stream(self, count: int, size: int) -> None:
            payload = b"x" * size
            for index in range(count):
                self.write_message(payload, binary=True)
                if index % 64 == 63:
                    await self.stream_flush()
            self.write_message("done")

        async def stream_flush(self) -> None:
            stream = self.ws_connection.stream if self.ws_connection is not None else None
            if stream is not None:
                await stream.write(b"")

    app = web.Application([("/ws", Stream)], websocket_max_message_size=1 << 30)
    server = httpserver.HTTPServer(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    server.add_sockets([sock])
    port_file.write_text(str(sock.getsockname()[1]))
    ioloop.IOLoop.current().start()


# --- the clients ---------------------------------------------------------------------------------


class Counter:
    """What a client received: binary bytes and messages, and the text messages (done/pong)."""

    def __init__(self) -> None:
        self.binary_bytes = 0
        self.binary_count = 0
        self.text: asyncio.Queue[str] = asyncio.Queue()


class WebsocketsClient(asyncio.Protocol):
    """The proxy's way: websockets' sans-I/O protocol driven from ``data_received``."""

    name = "websockets"

    def __init__(self, url: str) -> None:
        self.ws = ClientProtocol(parse_uri(url), max_size=1 << 30)
        self.counter = Counter()
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    async def connect(self, port: int) -> None:
        await asyncio.get_running_loop().create_connection(lambda: self, "127.0.0.1", port)
        self.ws.send_request(self.ws.connect())
        self.flush()
        await self.opened

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Frame):
                if event.opcode is Opcode.BINARY:
                    self.counter.binary_bytes += len(event.data)
                    self.counter.binary_count += 1
                elif event.opcode is Opcode.TEXT:
                    self.counter.text.put_nowait(bytes(event.data).decode())
            elif isinstance(event, Response) and not self.opened.done():
                self.opened.set_result(None)
        self.flush()

    def flush(self) -> None:
        if self.transport is not None:
            for chunk in self.ws.data_to_send():
                if chunk:
                    self.transport.write(chunk)

    def send_text(self, text: str) -> None:
        self.ws.send_text(text.encode())
        self.flush()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def picows_client_class() -> type | None:
    """The picows client, or None where picows is not installed."""
    try:
        import picows
    except ImportError:
        return None

    class PicowsClient(picows.WSListener):  # type: ignore[misc]
        name = "picows"

        def __init__(self) -> None:
            super().__init__()
            self.counter = Counter()
            self.transport: Any = None

        async def connect(self, port: int) -> None:
            transport, _ = await picows.ws_connect(
                lambda: self, f"ws://127.0.0.1:{port}/ws", max_frame_size=1 << 30
            )
            self.transport = transport

        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type == picows.WSMsgType.BINARY:
                self.counter.binary_bytes += len(frame.get_payload_as_memoryview())
                self.counter.binary_count += 1
            elif frame.msg_type == picows.WSMsgType.TEXT:
                self.counter.text.put_nowait(frame.get_payload_as_ascii_text())

        def send_text(self, text: str) -> None:
            self.transport.send(picows.WSMsgType.TEXT, text.encode())

        def close(self) -> None:
            self.transport.disconnect()

    return PicowsClient


# --- measuring -----------------------------------------------------------------------------------


async def stream(client: Any, count: int, size: int) -> dict[str, float]:
    counter: Counter = client.counter
    before_bytes, before_count = counter.binary_bytes, counter.binary_count
    cpu, wall = time.process_time(), time.perf_counter()
    client.send_text(f"stream {count} {size}")
    assert await asyncio.wait_for(counter.text.get(), 600) == "done"
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert counter.binary_count - before_count == count
    assert counter.binary_bytes - before_bytes == count * size
    return {"cpu_s": cpu, "wall_s": wall}


async def pings(client: Any, rounds: int) -> float:
    """Median round trip in microseconds."""
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        client.send_text("ping")
        assert await asyncio.wait_for(client.counter.text.get(), 30) == "pong"
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e6


async def measure(port: int, mib: int, rounds: int, log: Callable[[str], None]) -> dict[str, Any]:
    picows_class = picows_client_class()
    makers: list[Callable[[], Any]] = [lambda: WebsocketsClient(f"ws://127.0.0.1:{port}/ws")]
    if picows_class is not None:
        makers.append(picows_class)
    clients = []
    for make in makers:
        client = make()
        await client.connect(port)
        clients.append(client)
    samples: dict[str, dict[str, list[float]]] = {c.name: {} for c in clients}
    count = mib * MIB // BIG
    for index in range(rounds):
        order = clients if index % 2 == 0 else clients[::-1]
        for client in order:
            big = await stream(client, count, BIG)
            small = await stream(client, SMALL_COUNT, SMALL)
            rtt = await pings(client, PINGS)
            got = samples[client.name]
            got.setdefault("big_cpu_ms_per_mib", []).append(big["cpu_s"] * 1000 / mib)
            got.setdefault("big_mbps", []).append(count * BIG / 1e6 / big["wall_s"])
            got.setdefault("small_cpu_ms_per_1000", []).append(
                small["cpu_s"] * 1000 / (SMALL_COUNT / 1000)
            )
            got.setdefault("rtt_median_us", []).append(rtt)
        log(f"round {index + 1}/{rounds} done")
    for client in clients:
        client.close()
    return {
        name: {key: round(statistics.median(values), 2) for key, values in got.items()}
        for name, got in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        port_file = Path(scratch) / "port"
        server = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.transports", "--serve", str(port_file)]
        )
        try:
            deadline = time.monotonic() + 30
            while not port_file.exists() or not port_file.read_text():
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the tornado server did not start")
                time.sleep(0.05)
            port = int(port_file.read_text())
            results = asyncio.run(
                measure(port, args.mib, args.rounds, lambda t: print(t, file=sys.stderr))
            )
        finally:
            server.terminate()
            server.wait(10)
    print(f"{'client':<12}" + "".join(f"{k:>24}" for k in next(iter(results.values()))))
    for name, values in results.items():
        print(f"{name:<12}" + "".join(f"{v:>24.2f}" for v in values.values()))
    if "picows" in results:
        base, other = results["websockets"], results["picows"]
        print(
            f"{'picows/ws':<12}" + "".join(f"{other[k] / base[k]:>24.2f}" for k in base if base[k])
        )
    else:
        print("picows is not installed (pip install picows): only websockets was measured")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
