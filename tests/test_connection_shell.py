"""The WebSocket shell (``proxy.connection.RemoteChannels``) against an in-memory server.

No socket and no Jupyter server: the loop's ``create_connection`` is replaced by one that hands
:class:`RemoteChannels` a fake transport, and the other end of that transport is the
``websockets`` library's own sans-I/O server protocol. So the handshake, framing, fragments,
pings and the closing handshake are real WebSocket bytes, and every test runs in milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from cgpu_kernel.backends.base import WebSocketTarget
from cgpu_kernel.core.wire import (
    FRAGMENT_SIZE,
    V1_SUBPROTOCOL,
    Message,
    from_ws_legacy,
    from_ws_v1,
    make_header,
    to_ws_legacy,
    to_ws_v1,
)
from cgpu_kernel.exceptions import (
    ChannelsClosedError,
    RemoteAuthError,
    RemoteKernelGoneError,
    RemoteProtocolError,
    RemoteUnreachableError,
)
from cgpu_kernel.proxy.connection import RemoteChannels

URL = "ws://remote.example:8888/api/kernels/k1/channels?session_id=s1"


def message(text: str = "1", buffers: list[bytes] | None = None) -> Message:
    return Message.build(
        "shell", make_header("execute_request", "s1"), {}, {}, {"code": text}, buffers
    )


class MemoryServer(asyncio.Transport):
    """The client's transport, wired to a ``websockets`` server protocol in memory.

    ``refuse``: an HTTP status to answer the upgrade with instead of accepting it.
    ``subprotocols``: what the server speaks (None: legacy only, it picks none).
    """

    def __init__(self, subprotocols: list[str] | None, refuse: int | None = None) -> None:
        super().__init__()
        self.server = ServerProtocol(
            subprotocols=[Subprotocol(s) for s in subprotocols] if subprotocols else None,
            max_size=None,
        )
        self.refuse = refuse
        self.request: Request | None = None
        self.frames: list[Frame] = []
        self.client: RemoteChannels | None = None
        self.closed = False
        self.hold_handshake = False
        #: a socket an RST already killed: the next write is dropped and the transport closes,
        #: as asyncio's does when ``send`` fails (no exception reaches the writer)
        self.reset_on_write = False
        #: frames written right behind the 101, reaching the client in the same read
        self.behind_handshake: list[bytes] = []
        #: what the client is not reading yet (it paused reading, as asyncio's transports can)
        self.unread: list[bytes] | None = None

    # --- transport side (what the client calls) ---

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default  # no socket: no TCP options to set

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "written after close"
        if self.reset_on_write:
            self.close()
            return
        server = self.server
        server.receive_data(bytes(data))
        for event in server.events_received():
            if isinstance(event, Request):
                self.request = event
                if self.hold_handshake:
                    continue
                if self.refuse is None:
                    response = server.accept(event)
                else:
                    response = server.reject(self.refuse, "refused")
                server.send_response(response)
                if self.behind_handshake:
                    for frame in self.behind_handshake:
                        server.send_binary(frame)
                    self._to_client(in_one_read=True)
            else:
                self.frames.append(event)
        self._to_client()

    def pause_reading(self) -> None:
        self.unread = []

    def resume_reading(self) -> None:
        unread, self.unread = self.unread or [], None
        client = self.client
        assert client is not None
        for data in unread:
            asyncio.get_running_loop().call_soon(client.data_received, data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            client = self.client
            assert client is not None
            asyncio.get_running_loop().call_soon(client.connection_lost, None)

    def abort(self) -> None:
        self.close()

    # --- server side (what a test does) ---

    def _to_client(self, in_one_read: bool = False) -> None:
        client = self.client
        assert client is not None
        pending = self.server.data_to_send()
        if in_one_read:  # what a loaded machine's first read returns: all of it at once
            pending = [b"".join(pending)]
        for data in pending:
            if self.closed:
                return
            if data and self.unread is not None:
                self.unread.append(data)
            elif data:
                asyncio.get_running_loop().call_soon(client.data_received, data)
            else:
                self.close()  # the server protocol's signal to drop the TCP connection

    def send_binary(self, data: bytes, fin: bool = True) -> None:
        self.server.send_binary(data, fin=fin)
        self._to_client()

    def send_continuation(self, data: bytes, fin: bool) -> None:
        self.server.send_continuation(data, fin=fin)
        self._to_client()

    def send_text(self, text: str) -> None:
        self.server.send_text(text.encode("utf-8"))
        self._to_client()

    def send_close(self, code: int, reason: str) -> None:
        self.server.send_close(code, reason)
        self._to_client()

    def data_frames(self) -> list[Frame]:
        return [f for f in self.frames if f.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)]


async def opened(
    monkeypatch: pytest.MonkeyPatch, transport: MemoryServer, headers: dict[str, str] | None = None
) -> RemoteChannels:
    """``RemoteChannels.open`` through its public path, connected to ``transport``."""
    loop = asyncio.get_running_loop()
    seen: dict[str, Any] = {}

    async def create_connection(
        factory: Callable[[], RemoteChannels], host: str, port: int, **kw: Any
    ) -> Any:
        seen.update(host=host, port=port, ssl=kw.get("ssl"))
        protocol = factory()
        transport.client = protocol
        protocol.connection_made(transport)
        return transport, protocol

    monkeypatch.setattr(loop, "create_connection", create_connection)
    target = WebSocketTarget(URL, headers=headers or {}, connect_timeout=2.0, handshake_timeout=2.0)
    channels = await RemoteChannels.open(target, "remote kernel k1", max_message_size=1 << 26)
    assert seen == {"host": "remote.example", "port": 8888, "ssl": None}
    return channels


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 10))


async def settle() -> None:
    """Let the bytes queued with ``call_soon`` go both ways."""
    for _ in range(20):
        await asyncio.sleep(0)


# --- the handshake ------------------------------------------------------------------------------


def test_v1_is_picked_when_the_server_speaks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        channels = await opened(
            monkeypatch,
            server,
            {"Authorization": "token t0k", "Sec-WebSocket-Protocol": "evil", "X-Extra": "1"},
        )
        assert channels.subprotocol == V1_SUBPROTOCOL
        assert server.request is not None
        sent = server.request.headers
        assert sent["Authorization"] == "token t0k"
        assert sent["X-Extra"] == "1"
        # The handshake's own headers are not the backend's to override.
        assert sent.get_all("Sec-WebSocket-Protocol") == [V1_SUBPROTOCOL]
        assert sent["User-Agent"].startswith("cgpu-kernel/")
        assert server.request.path == "/api/kernels/k1/channels?session_id=s1"

    run(test)


def test_legacy_when_the_server_picks_no_subprotocol(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        server = MemoryServer(None)
        channels = await opened(monkeypatch, server, {"User-Agent": "mine/1"})
        assert channels.subprotocol is None
        assert server.request is not None
        assert server.request.headers["User-Agent"] == "mine/1"  # a backend's own is kept

    run(test)


def test_frames_in_the_same_read_as_the_handshake_are_parsed_as_v1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 20, item 7: the 101 response and the first v1 frames in ONE ``data_received``.
    Read as legacy, a v1 frame's offset count (6) is 100663296 offsets and the frame is
    dropped as malformed."""

    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        first, second = message("first"), message("second", [b"\x01buffer"])
        server.behind_handshake = [to_ws_v1(first), to_ws_v1(second)]
        channels = await opened(monkeypatch, server)
        got: list[Message] = []
        channels.deliver_to(got.append)
        assert channels.subprotocol == V1_SUBPROTOCOL
        assert channels.malformed == 0
        assert [m.msg_id for m in got] == [first.msg_id, second.msg_id]
        assert [bytes(b) for b in got[1].buffers] == [b"\x01buffer"]

    run(test)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, RemoteAuthError),
        (403, RemoteAuthError),
        (404, RemoteKernelGoneError),
        (500, RemoteProtocolError),
    ],
)
def test_refused_upgrade_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, status: int, error: type[Exception]
) -> None:
    async def test() -> None:
        with pytest.raises(error, match="remote kernel k1"):
            await opened(monkeypatch, MemoryServer([V1_SUBPROTOCOL], refuse=status))

    run(test)


def test_connection_lost_during_the_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        server.hold_handshake = True
        opening = asyncio.ensure_future(opened(monkeypatch, server))
        await settle()
        assert server.request is not None  # the request went out; no answer came
        server.close()
        with pytest.raises(RemoteUnreachableError, match="during the handshake"):
            await opening

    run(test)


# --- receiving ----------------------------------------------------------------------------------


def test_messages_are_held_until_deliver_to_then_passed_on_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        channels = await opened(monkeypatch, server)
        first, second, third = message("a"), message("b", [b"\x00buf"]), message("c")
        server.send_binary(to_ws_v1(first))
        server.send_binary(to_ws_v1(second))
        await settle()
        got: list[Message] = []
        channels.deliver_to(got.append)
        assert [m.msg_id for m in got] == [first.msg_id, second.msg_id]
        server.send_binary(to_ws_v1(third))
        await settle()
        assert [m.content["code"] for m in got] == ["a", "b", "c"]
        assert [bytes(b) for b in got[1].buffers] == [b"\x00buf"]

    run(test)


def test_a_fragmented_message_arrives_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        channels = await opened(monkeypatch, server)
        got: list[Message] = []
        channels.deliver_to(got.append)
        data = to_ws_v1(message("x" * 1000, [b"b" * 5000]))
        server.send_binary(data[:100], fin=False)
        server.send_continuation(data[100:3000], fin=False)
        server.send_continuation(data[3000:], fin=True)
        await settle()
        assert len(got) == 1
        assert got[0].content["code"] == "x" * 1000
        assert bytes(got[0].buffers[0]) == b"b" * 5000

    run(test)


def test_malformed_frames_are_counted_not_delivered(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        channels = await opened(monkeypatch, server)
        got: list[Message] = []
        channels.deliver_to(got.append)
        server.send_binary(b"\x00" * 7)  # shorter than the offset count
        server.send_text('{"channel": "shell"}')  # text on a v1 socket
        good = message("after")
        server.send_binary(to_ws_v1(good))
        await settle()
        assert channels.malformed == 2
        assert [m.msg_id for m in got] == [good.msg_id]

    run(test)


def test_legacy_text_and_binary_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        server = MemoryServer(None)
        channels = await opened(monkeypatch, server)
        got: list[Message] = []
        channels.deliver_to(got.append)
        text, binary = to_ws_legacy(message("t")), to_ws_legacy(message("b", [b"raw"]))
        assert isinstance(text, str) and isinstance(binary, bytes)
        server.send_text(text)
        server.send_binary(binary)
        server.send_binary(b"\xff\xfe")  # not a legacy binary frame
        await settle()
        assert [m.content["code"] for m in got] == ["t", "b"]
        assert bytes(got[1].buffers[0]) == b"raw"
        assert channels.malformed == 1

    run(test)


def test_a_failing_sink_ends_the_connection_with_its_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sink that raises is a bug that lost a message: not swallowed, the connection stops and
    keeps the error for the supervisor, which ends the run with it (issue 20, item 5)."""

    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        channels = await opened(monkeypatch, server)
        got: list[str] = []

        def sink(msg: Message) -> None:
            got.append(msg.content["code"])
            if msg.content["code"] == "boom":
                raise RuntimeError("handler bug")

        channels.deliver_to(sink)
        server.send_binary(to_ws_v1(message("boom")))
        server.send_binary(to_ws_v1(message("next")))
        await settle()
        assert got == ["boom"]
        assert isinstance(channels.sink_error, RuntimeError)
        await asyncio.wait_for(channels.closed.wait(), 5)

    run(test)


# --- sending ------------------------------------------------------------------------------------


@pytest.mark.parametrize("subprotocols", [[V1_SUBPROTOCOL], None], ids=["v1", "legacy"])
def test_send_writes_one_frame_the_server_can_parse(
    monkeypatch: pytest.MonkeyPatch, subprotocols: list[str] | None
) -> None:
    async def test() -> None:
        server = MemoryServer(subprotocols)
        channels = await opened(monkeypatch, server)
        msg = message("sent", [b"payload"])
        await channels.send(msg)
        (frame,) = server.data_frames()
        back = from_ws_v1(frame.data) if subprotocols else from_ws_legacy(bytes(frame.data))
        assert back.content == {"code": "sent"}
        assert [bytes(b) for b in back.buffers] == [b"payload"]

    run(test)


def test_a_large_message_goes_out_in_fragments(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        channels = await opened(monkeypatch, server)
        big = b"\x01" * (2 * FRAGMENT_SIZE + 10)
        msg = message("big", [big])
        await channels.send(msg)
        frames = server.data_frames()
        assert len(frames) == 3
        assert [f.opcode for f in frames] == [Opcode.BINARY, Opcode.CONT, Opcode.CONT]
        assert [f.fin for f in frames] == [False, False, True]
        assert max(len(f.data) for f in frames) == FRAGMENT_SIZE
        back = from_ws_v1(b"".join(f.data for f in frames))
        assert bytes(back.buffers[0]) == big

    run(test)


# --- liveness and closing -----------------------------------------------------------------------


def test_liveness_is_every_byte_heard(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        channels = await opened(monkeypatch, server)
        await asyncio.sleep(0.05)
        assert channels.silent_for() >= 0.05
        before = channels.last_heard
        server.server.send_ping(b"hi")  # a ping is a sign of life too, and is answered
        server._to_client()
        await settle()
        assert channels.last_heard > before
        assert channels.silent_for() < 0.05
        assert [f.opcode for f in server.frames] == [Opcode.PONG]
        channels.ping()
        assert [f.opcode for f in server.frames] == [Opcode.PONG, Opcode.PING]

    run(test)


def test_server_close_is_answered_and_ends_the_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        channels = await opened(monkeypatch, server)
        server.send_close(1001, "going away")
        await asyncio.wait_for(channels.closed.wait(), 2)
        assert server.frames[-1].opcode is Opcode.CLOSE  # the client answered the close
        assert channels.close_reason == "code 1001, going away"
        with pytest.raises(ChannelsClosedError):
            channels.send(message())

    run(test)


def test_a_send_in_flight_fails_when_the_connection_drops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        channels = await opened(monkeypatch, server)
        channels.pause_writing()  # the socket's buffer is full: nothing more goes out
        pending = channels.send(message("stuck"))
        assert not pending.done()
        server.close()
        with pytest.raises(ChannelsClosedError):
            await pending
        assert channels.closed.is_set()
        assert channels.close_reason == "connection lost"

    run(test)


def test_a_write_a_dead_socket_dropped_is_not_counted_as_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 20, item 2: a transport whose socket was reset drops the bytes it is handed and
    starts closing; the message must not count as written (its sender sends it again), and
    nothing more is handed to that transport."""

    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        channels = await opened(monkeypatch, server)
        server.reset_on_write = True
        lost = channels.send(message("lost"))
        with pytest.raises(ChannelsClosedError):
            channels.send(message("after"))  # refused at once: the transport is closing
        with pytest.raises(ChannelsClosedError):
            await lost
        assert server.data_frames() == []

    run(test)


def test_close_starts_the_closing_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        channels = await opened(monkeypatch, server)
        channels.close()
        await asyncio.wait_for(channels.closed.wait(), 2)
        assert server.frames[0].opcode is Opcode.CLOSE
        assert channels.close_reason == "code 1000, "

    run(test)


def test_a_paused_reader_is_not_silent_and_reads_all_once_resumed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flow control: while the frontends are behind the proxy stops reading; that pause is no
    stall (``silent_for`` is 0, so the supervisor does not reconnect), and what the server
    wrote meanwhile is read, in order, once reading resumes."""

    async def test() -> None:
        server = MemoryServer([V1_SUBPROTOCOL])
        channels = await opened(monkeypatch, server)
        got: list[Message] = []
        channels.deliver_to(got.append)
        channels.pause_reading()
        assert channels.reading_paused
        sent = [message(str(i)) for i in range(3)]
        for msg in sent:
            server.send_binary(to_ws_v1(msg))
        await asyncio.sleep(0.05)
        await settle()
        assert got == []
        assert channels.silent_for() == 0.0
        channels.resume_reading()
        assert not channels.reading_paused and channels.silent_for() < 0.05
        await settle()
        assert [m.msg_id for m in got] == [m.msg_id for m in sent]

    run(test)
