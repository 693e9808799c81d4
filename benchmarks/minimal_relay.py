"""The least a relay of the proxy's shape can do: a yardstick for the proxy's own cost.

``python -m benchmarks.minimal_relay -f CONNECTION_FILE --url URL`` (token in ``CGPU_TOKEN``)
starts a kernel on a Jupyter server and relays between ZMQ sockets bound from the connection
file and the kernel's WebSocket, doing only what no relay of this shape can skip: check the
frontend's signature, sign for the frontend, and move the bytes, on the same WebSocket
transport as the proxy (``cgpu_kernel.proxy.connection.RemoteChannels``: TCP_NODELAY, TCP_QUICKACK,
fragments). It parses no JSON, keeps no state per request (a reply goes to the last frontend
that wrote on that channel), applies no output limits, keeps no journal, history or spool,
never reconnects and answers nothing itself. **Not a kernel anyone should use**: it exists so
that ``python -m benchmarks`` can measure, side by side, how close the proxy is to the cheapest
possible relay, and how far even that is from the goals.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import signal
import struct
import threading
import uuid
from typing import Any, cast

import zmq
from websockets.frames import Opcode

from cgpu_kernel.backends.jupyter import JupyterBackend
from cgpu_kernel.core.wire import DELIMITER, Buffer, Message
from cgpu_kernel.proxy.connection import RemoteChannels

#: Stands in for the parsed header the relay never reads (``Message`` requires one).
UNREAD_HEADER = {"msg_id": "", "msg_type": ""}
NOWAIT = zmq.NOBLOCK
NOWAIT_MORE = zmq.NOBLOCK | zmq.SNDMORE


class RawChannels(RemoteChannels):
    """The proxy's WebSocket transport, handing on each message's bytes unparsed.

    It overrides ``RemoteChannels._parse``, a private method, to hand each whole message's
    payload on and parse nothing (``_deliver`` then gets None and does nothing): fine for a
    measuring instrument that lives beside the code it measures, not a pattern for anything
    else. ``tests/test_benchmarks_smoke.py`` fails if the seam moves."""

    raw_sink: Any = None
    #: Payloads that arrive while ``open`` is still settling, before the relay sets
    #: ``raw_sink`` (jupyter-server may send a status message as soon as the socket opens).
    early: list[bytes] | None = None

    def _parse(self, opcode: Opcode, payload: Buffer) -> Message | None:
        if self.raw_sink is None:
            self.early = [*(self.early or []), bytes(payload)]
        else:
            self.raw_sink(payload)
        return None


class MinimalRelay:
    def __init__(self, info: dict[str, Any]) -> None:
        self.key = info["key"].encode()
        self.channels: RawChannels | None = None
        self.context = zmq.Context()
        self.sockets: dict[str, zmq.Socket[bytes]] = {}
        self.identities: dict[str, list[Any]] = {}
        address = f"tcp://{info['ip']}:"
        for channel in ("shell", "control", "stdin", "iopub"):
            kind = zmq.PUB if channel == "iopub" else zmq.ROUTER
            sock: zmq.Socket[bytes] = self.context.socket(kind)
            sock.linger = 0
            if channel == "iopub":
                sock.sndhwm = 0
            sock.bind(address + str(info[f"{channel}_port"]))
            self.sockets[channel] = sock
        heartbeat = self.context.socket(zmq.REP)
        heartbeat.bind(address + str(info["hb_port"]))
        threading.Thread(target=_echo, args=(heartbeat,), daemon=True).start()

    def start(self, channels: RawChannels) -> None:
        self.channels = channels
        channels.raw_sink = self.from_remote
        early, channels.early = channels.early or [], None
        for payload in early:
            self.from_remote(payload)
        loop = asyncio.get_running_loop()
        for channel in ("shell", "control", "stdin"):
            sock = self.sockets[channel]
            loop.add_reader(sock.fileno(), self.drain, channel)
            self.drain(channel)

    def drain(self, channel: str) -> None:
        sock = self.sockets[channel]
        while True:
            try:
                frames = sock.recv_multipart(NOWAIT, copy=False)
            except zmq.Again:
                return
            index = next(
                i for i, f in enumerate(frames) if len(f) == len(DELIMITER) and f.bytes == DELIMITER
            )
            signature = frames[index + 1].bytes
            parts = [f.bytes for f in frames[index + 2 : index + 6]]
            mac = hmac.new(self.key, digestmod=hashlib.sha256)
            for part in parts:
                mac.update(part)
            if not hmac.compare_digest(mac.hexdigest().encode(), signature):
                continue  # what any relay must do with a forged message: drop it
            self.identities[channel] = frames[:index]
            buffers: list[Buffer] = [f.buffer for f in frames[index + 6 :]]
            msg = Message(
                channel, parts, buffers, header=UNREAD_HEADER, parent_header=UNREAD_HEADER
            )
            assert self.channels is not None
            self.channels.send(msg)

    def from_remote(self, payload: Buffer) -> None:
        view = memoryview(payload)
        (count,) = struct.unpack_from("<Q", view, 0)
        offsets = struct.unpack_from(f"<{count}Q", view, 8)
        channel = bytes(view[offsets[0] : offsets[1]]).decode("ascii")
        pieces = [view[offsets[i] : offsets[i + 1]] for i in range(1, count - 1)]
        mac = hmac.new(self.key, digestmod=hashlib.sha256)
        for part in pieces[:4]:
            mac.update(part)
        head = [b"kernel"] if channel == "iopub" else self.identities.get(channel)
        if head is None:
            return  # no frontend wrote on this channel yet: nobody to send it to
        frames = [*head, DELIMITER, mac.hexdigest().encode(), *pieces]
        sock = self.sockets[channel]
        last = len(frames) - 1
        for index, frame in enumerate(frames):
            sock.send(frame, NOWAIT_MORE if index < last else NOWAIT, copy=False)
        if channel != "iopub" and cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            # Sending may consume the edge that announced a waiting message.
            asyncio.get_running_loop().call_soon(self.drain, channel)


def _echo(sock: zmq.Socket[bytes]) -> None:
    try:
        while True:
            sock.send(sock.recv())
    except zmq.ZMQError:
        return


async def main(connection_file: str, url: str) -> None:
    with open(connection_file) as file:
        info = json.load(file)
    # Bound before the kernel starts, as the proxy does: a frontend's iopub subscription is
    # in place by the time the first output is published (a PUB socket drops until then).
    relay = MinimalRelay(info)
    backend = JupyterBackend(url, os.environ.get("CGPU_TOKEN"), record_for_reclaim=False)
    await backend.start_kernel()
    channels = cast(
        RawChannels,
        await RawChannels.open(
            backend.websocket_request(uuid.uuid4().hex),
            backend.description,
            max_message_size=1 << 30,
        ),
    )
    relay.start(channels)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    waiting = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(channels.closed.wait())]
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    channels.close()
    try:
        await asyncio.wait_for(backend.shutdown_kernel(), 5)
    finally:
        await backend.close()
        relay.context.destroy(linger=0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-f", dest="connection_file", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--backend", help="ignored (the proxy's command line)")
    args = parser.parse_args()
    asyncio.run(main(args.connection_file, args.url))
