"""A path shaper: a userspace TCP relay on loopback that makes a link look like a WAN.

``benchmarks/wan.py`` puts one in front of the remote jupyter-server for each path it measures
(direct WebSocket client, gateway mode, the proxy), all with the same settings, so the paths
differ only in what they are. No ``tc``/netem: the machine is shared and the benchmark must not
need root. What it models, per direction of each connection:

* **one-way delay** (``delay``): every byte is delivered ``delay`` seconds after it has left the
  sender's side of the link;
* **bandwidth** (``rate``, bytes per second): bytes leave one after the other, each segment
  taking ``len / rate`` on the link (its serialization delay), so a queue builds behind a large
  message as it would at a bottleneck; all connections through one shaper share it;
* **jitter**: each segment gets an extra delay drawn uniformly from ``[0, jitter]``, but
  never overtakes the one before it (TCP hides reordering from applications: what a receiver
  sees is the later segment waiting for the earlier one);
* **a window** (bytes in flight): a byte counts from when the shaper reads it until its
  acknowledgement would be back at the sender (delivery plus one more ``delay``); while the
  window is full the shaper stops reading, and TCP on loopback pushes back on the sender. The
  default (twice the round trip's bandwidth-delay product, 256 KiB at least) never limits
  throughput below ``rate``; it bounds the shaper's memory and gives the sender back-pressure.

Nothing is lost or reordered: it is a TCP relay, each direction a queue of
``(release time, bytes)`` drained in order. Not modelled: TCP's own dynamics across the
link (slow start, loss, ACK clocking, delayed ACKs): each side's TCP ends at the shaper on
loopback, so Nagle's algorithm and delayed ACKs never stall across the shaped link. The shaper
sets ``TCP_NODELAY`` on its sockets and ``TCP_QUICKACK`` after each read.

It also counts what crosses it, for the question "does the proxy add a round trip per cell?":
connections, bytes each way, and for WebSocket connections (recognised by their HTTP upgrade)
the data messages each way and the **turn-arounds**: how often a data message went towards the
server after data had come back from it, i.e. how often the client spoke again after waiting
for the server. Control frames (ping, pong, close) are not counted: the proxy's pings are
periodic, not per cell. On connections that are not WebSockets (REST), each burst towards the
server after data came back counts as a turn-around.

Two ways to run it: :class:`Shaper` in an event loop (the tests), or its own process,
``python -m benchmarks.shaper --target PORT ...``, driven with :class:`ShaperProcess` (the WAN
suite: the shaper's timers then do not wait on the benchmark client's GIL). The process prints
``{"port": N}`` and then answers lines on stdin: ``stats`` (one JSON line back) and
``set {"delay": ..., "rate": ..., "jitter": ...}`` (``{"ok": true}`` back); it exits when stdin
closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import socket
import subprocess
import sys
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

#: Bytes read at a time; each is one segment on the link (1.3 ms at 100 Mbit/s).
SEGMENT = 16 * 1024
QUICKACK = getattr(socket, "TCP_QUICKACK", None)


@dataclass
class Link:
    """What the shaped link is like, the same each way. ``rate`` 0 is unlimited."""

    delay: float = 0.0  # one-way, seconds
    rate: float = 0.0  # bytes per second
    jitter: float = 0.0  # extra one-way delay, uniform in [0, jitter] seconds
    window: int = 0  # bytes in flight each way; 0: from the bandwidth-delay product

    def in_flight_limit(self) -> int:
        """The window: ``window``, or twice the round trip's bandwidth-delay product."""
        if self.window:
            return self.window
        if not self.rate:
            return 4 << 20
        return max(256 * 1024, int(2 * self.rate * 2 * (self.delay + self.jitter)))

    @classmethod
    def of(cls, delay_ms: float, mbit: float, jitter_ms: float = 0.0) -> Link:
        """A link from the units people quote (ms one way, Mbit/s)."""
        return cls(delay=delay_ms / 1000, rate=mbit * 1e6 / 8, jitter=jitter_ms / 1000)


@dataclass
class Counts:
    """What crossed one shaper (summed over its connections); see the module's docstring."""

    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    ws_up: int = 0  # WebSocket data messages towards the server
    ws_down: int = 0
    turns: int = 0  # turn-arounds: the client spoke again after the server had answered


class FrameCounter:
    """Counts WebSocket data messages in one direction's byte stream, after its HTTP header.

    Only frame headers are looked at (RFC 6455: 2 bytes, 2 or 8 of extended length, 4 of mask
    when masked); payloads are skipped by count, whatever their size. A message is counted at
    its first frame (text or binary opcode), so a fragmented one counts once and its
    continuations not at all; control frames are skipped. ``on_message`` is called at each.
    """

    def __init__(self, on_message: Any) -> None:
        self.on_message = on_message
        self._header = bytearray()
        self._skip = 0  # payload bytes still to skip

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            need = self._needed()
            take = min(len(view), need - len(self._header))
            self._header += view[:take]
            view = view[take:]
            if len(self._header) < self._needed():
                continue  # more of the header is to come (the next call, or this one)
            header = self._header
            opcode = header[0] & 0x0F
            length = header[1] & 0x7F
            if length == 126:
                length = int.from_bytes(header[2:4], "big")
            elif length == 127:
                length = int.from_bytes(header[2:10], "big")
            if opcode in (1, 2):
                self.on_message()
            self._skip = length
            self._header = bytearray()

    def _needed(self) -> int:
        """Bytes of the current frame's header, as far as what is buffered tells."""
        if len(self._header) < 2:
            return 2
        length = self._header[1] & 0x7F
        extra = 2 if length == 126 else 8 if length == 127 else 0
        return 2 + extra + (4 if self._header[1] & 0x80 else 0)


class _Watch:
    """One connection's bookkeeping for :class:`Counts`: HTTP headers, then frames or bursts."""

    def __init__(self, counts: Counts) -> None:
        self.counts = counts
        self.head = {True: bytearray(), False: bytearray()}  # up/down, until its blank line
        self.frames: dict[bool, FrameCounter] = {}
        self.websocket = False
        self.last_up: bool | None = None  # direction of the last data seen

    def observe(self, up: bool, data: bytes) -> None:
        if up:
            self.counts.bytes_up += len(data)
        else:
            self.counts.bytes_down += len(data)
        if up in self.frames:
            self.frames[up].feed(data)
            return
        head = self.head[up]
        head += data
        end = head.find(b"\r\n\r\n")
        if end < 0 or not self._upgrade(up, bytes(head[: end + 4])):
            if len(head) > 65536 or end >= 0:
                head.clear()  # not a WebSocket handshake: count bursts, not frames
            if not self.websocket:
                self._data(up)
            return
        rest = bytes(head[end + 4 :])
        head.clear()
        self.frames[up] = FrameCounter(lambda: self._data(up, message=True))
        if rest:
            self.frames[up].feed(rest)

    def _upgrade(self, up: bool, header: bytes) -> bool:
        lower = header.lower()
        if up:
            if lower.startswith(b"get ") and b"upgrade: websocket" in lower:
                self.websocket = True
                return True
            return False
        return self.websocket and lower.startswith(b"http/1.1 101")

    def _data(self, up: bool, message: bool = False) -> None:
        if message:
            if up:
                self.counts.ws_up += 1
            else:
                self.counts.ws_down += 1
        if up and self.last_up is not True:
            self.counts.turns += 1
        self.last_up = up


@dataclass(eq=False)
class _Direction:
    """One direction of one connection: reads into a queue of (release time, bytes)."""

    shaper: Shaper
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    up: bool
    watch: _Watch
    sock: socket.socket | None = None  # the socket read from (for TCP_QUICKACK)
    queue: deque[tuple[float, bytes]] = field(default_factory=deque)
    last_release: float = 0.0
    in_flight: int = 0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    credit: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self) -> None:
        loop = asyncio.get_running_loop()
        sock = self.sock
        try:
            while True:
                link = self.shaper.link
                while self.in_flight >= link.in_flight_limit():
                    self.credit.clear()
                    await self.credit.wait()
                data = await self.reader.read(SEGMENT)
                if sock is not None and QUICKACK is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
                now = loop.time()
                if not data:
                    self._queue(max(now + link.delay, self.last_release), b"")
                    return
                self.watch.observe(self.up, data)
                # The link's bandwidth is shared by every connection through this shaper.
                start = max(now, self.shaper.link_free[self.up])
                sent = start + (len(data) / link.rate if link.rate else 0.0)
                self.shaper.link_free[self.up] = sent
                extra = self.shaper.random.uniform(0, link.jitter) if link.jitter else 0.0
                release = max(sent + link.delay + extra, self.last_release)
                self.in_flight += len(data)
                self._queue(release, data)
        except (OSError, asyncio.IncompleteReadError):
            self._queue(0.0, b"")

    def _queue(self, release: float, data: bytes) -> None:
        self.last_release = release
        self.queue.append((release, data))
        self.wake.set()

    async def write(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                while not self.queue:
                    self.wake.clear()
                    await self.wake.wait()
                wait = self.queue[0][0] - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                now = loop.time()
                pieces: list[bytes] = []
                closing = False
                while self.queue and self.queue[0][0] <= now:
                    _, data = self.queue.popleft()
                    if not data:
                        closing = True
                        break
                    pieces.append(data)
                if pieces:
                    size = sum(len(p) for p in pieces)
                    self.writer.writelines(pieces)
                    await self.writer.drain()
                    loop.call_later(self.shaper.link.delay, self._acked, size)
                if closing:
                    if self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
        except OSError:
            return

    def _acked(self, size: int) -> None:
        self.in_flight -= size
        self.credit.set()


class Shaper:
    """The relay, in the running event loop: ``await start()``, connect to ``port``, ``close()``.

    ``link`` may be replaced between measurements (the WAN suite keeps its connections and
    kernels and changes the link under them); ``counts`` is what crossed it so far.
    """

    def __init__(
        self, target_port: int, link: Link, target_host: str = "127.0.0.1", seed: int = 0
    ) -> None:
        self.target = (target_host, target_port)
        self.link = link
        self.counts = Counts()
        #: Per direction (True: towards the server), when the link has sent all it was given.
        self.link_free = {True: 0.0, False: 0.0}
        self.random = random.Random(seed)  # jitter, reproducible run to run
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.counts.connections += 1
        self._writers.add(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self._writers.add(up_writer)
            watch = _Watch(self.counts)
            for w in (writer, up_writer):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ways = [
                _Direction(self, reader, up_writer, True, watch, writer.get_extra_info("socket")),
                _Direction(
                    self, up_reader, writer, False, watch, up_writer.get_extra_info("socket")
                ),
            ]
            await asyncio.gather(*(f() for way in ways for f in (way.read, way.write)))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for end in (writer, up_writer):
                if end is not None:
                    self._writers.discard(end)
                    end.close()
            self._tasks.discard(task)


# --- its own process -------------------------------------------------------------------------


class ShaperProcess:
    """``python -m benchmarks.shaper`` as a child process; the WAN suite starts one per path."""

    def __init__(self, target_port: int, link: Link) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.shaper", "--target", str(target_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        first = self._line()
        self.port = int(first["port"])
        self.set_link(link)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the shaper exited ({self.process.poll()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def _ask(self, command: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._line()

    def set_link(self, link: Link) -> None:
        self._ask("set " + json.dumps(asdict(link)))

    def counts(self) -> Counts:
        return Counts(**self._ask("stats"))

    def stop(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            with contextlib.suppress(OSError):
                self.process.stdin.close()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


async def _serve(target_port: int) -> None:
    """The child's main: relay, and answer the parent's lines until its stdin closes."""
    loop = asyncio.get_running_loop()
    shaper = Shaper(target_port, Link())
    await shaper.start()
    print(json.dumps({"port": shaper.port}), flush=True)
    lines: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:  # a thread: stdin is a pipe, its lines arrive rarely
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)
        loop.call_soon_threadsafe(lines.put_nowait, "")

    threading.Thread(target=read_stdin, daemon=True).start()
    while line := await lines.get():
        command, _, rest = line.strip().partition(" ")
        if command == "stats":
            print(json.dumps(asdict(shaper.counts)), flush=True)
        elif command == "set":
            shaper.link = Link(**json.loads(rest))
            print(json.dumps({"ok": True}), flush=True)
        else:
            print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
    await shaper.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.shaper",
        description="A WAN-shaped TCP relay on 127.0.0.1 (driven by benchmarks.wan on stdin).",
    )
    parser.add_argument("--target", type=int, required=True, help="port on 127.0.0.1 to relay to")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
