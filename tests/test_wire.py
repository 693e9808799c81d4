"""Wire formats: round trips, and agreement with jupyter_server's own (de)serializers."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_binary_message,
    serialize_msg_to_ws_v1,
)

from cgpu_kernel.exceptions import MalformedMessageError
from cgpu_kernel.wire import (
    DELIMITER,
    FRAGMENT_SIZE,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_TEXT,
    V1_SUBPROTOCOL,
    FrameReader,
    Message,
    WebSocketProtocolError,
    client_frames,
    close_payload,
    from_ws,
    from_ws_legacy,
    from_ws_v1,
    make_header,
    mask_python,
    parse_close,
    split_zmq_frames,
    to_ws,
    to_ws_legacy,
    to_ws_v1,
    to_ws_v1_pieces,
    zmq_frames,
)

json_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=50)
contents = st.dictionaries(json_text, st.one_of(json_text, st.integers(), st.booleans()))
buffers = st.lists(st.binary(max_size=300), max_size=4)
channels = st.sampled_from(["shell", "control", "stdin", "iopub"])


def sample(
    channel: str = "shell", content: dict | None = None, bufs: list | None = None
) -> Message:
    return Message.build(
        channel,
        make_header("execute_request", "s1"),
        {"msg_id": "parent-1", "msg_type": "x"},
        {"meta": 1},
        content if content is not None else {"code": "print('héllo ✓')"},
        bufs,
    )


def same(a: Message, b: Message) -> None:
    assert a.channel == b.channel
    assert a.header == b.header
    assert a.parent_header == b.parent_header
    assert a.metadata == b.metadata
    assert a.content == b.content
    assert [bytes(x) for x in a.buffers] == [bytes(x) for x in b.buffers]


@settings(max_examples=60, deadline=None)
@given(channel=channels, content=contents, bufs=buffers)
def test_v1_round_trip(channel: str, content: dict, bufs: list[bytes]) -> None:
    msg = sample(channel, content, bufs)
    back = from_ws_v1(to_ws_v1(msg))
    same(msg, back)
    assert back.parts == msg.parts  # forwarded byte for byte, never re-encoded


@settings(max_examples=60, deadline=None)
@given(channel=channels, content=contents, bufs=buffers)
def test_legacy_round_trip(channel: str, content: dict, bufs: list[bytes]) -> None:
    msg = sample(channel, content, bufs)
    frame = to_ws_legacy(msg)
    assert isinstance(frame, bytes) == bool(bufs)
    same(msg, from_ws_legacy(frame))


def test_v1_matches_jupyter_server() -> None:
    msg = sample("iopub", bufs=[b"\x00\x01", b"buffer two"])
    channel, parts = deserialize_msg_from_ws_v1(to_ws_v1(msg))
    assert channel == "iopub"
    assert [bytes(p) for p in parts] == [*msg.parts, b"\x00\x01", b"buffer two"]
    theirs = serialize_msg_to_ws_v1([*msg.parts, b"\x00\x01", b"buffer two"], "iopub")
    same(msg, from_ws_v1(theirs))


def test_legacy_binary_matches_jupyter_server() -> None:
    msg = sample("shell", bufs=[b"\xff" * 10, b"abc"])
    theirs = deserialize_binary_message(to_ws_legacy(msg))
    assert theirs["channel"] == "shell"
    assert [bytes(b) for b in theirs["buffers"]] == [b"\xff" * 10, b"abc"]
    assert theirs["content"] == msg.content
    produced = serialize_binary_message(
        {
            "channel": "iopub",
            "header": msg.header,
            "parent_header": msg.parent_header,
            "metadata": {},
            "content": {"data": {}},
            "buffers": [b"xyz"],
        }
    )
    back = from_ws_legacy(produced)
    assert back.channel == "iopub"
    assert back.buffers == [b"xyz"]


def test_legacy_text_is_plain_json() -> None:
    frame = to_ws_legacy(sample())
    assert isinstance(frame, str)
    obj = json.loads(frame)
    assert obj["channel"] == "shell"
    assert obj["content"]["code"] == "print('héllo ✓')"


def test_dispatch_by_subprotocol() -> None:
    msg = sample(bufs=[b"1"])
    same(msg, from_ws(to_ws(msg, V1_SUBPROTOCOL), V1_SUBPROTOCOL))
    same(msg, from_ws(to_ws(msg, None), None))
    with pytest.raises(MalformedMessageError):
        from_ws("{}", V1_SUBPROTOCOL)


def test_zmq_frames_round_trip() -> None:
    msg = sample(bufs=[b"buf"])
    frames = zmq_frames([b"id1", b"id2"], b"sig", msg)
    identities, rest = split_zmq_frames([bytes(f) for f in frames])
    assert identities == [b"id1", b"id2"]
    assert rest[0] == b"sig"
    assert rest[1:5] == msg.parts
    assert rest[5:] == [b"buf"]


@pytest.mark.parametrize(
    "frames",
    [
        [b"id", b"no delimiter"],
        [b"id", DELIMITER, b"sig", b"{}"],
    ],
)
def test_zmq_malformed(frames: list[bytes]) -> None:
    with pytest.raises(MalformedMessageError):
        split_zmq_frames(frames)


@pytest.mark.parametrize(
    "frame",
    [
        b"",
        b"\x01\x00\x00\x00\x00\x00\x00\x00",
        struct.pack("<7Q", 6, 56, 60, 50, 40, 30, 20),  # offsets out of order
        struct.pack("<7Q", 6, 56, 61, 62, 63, 64, 9999),  # offsets out of range
    ],
)
def test_v1_malformed(frame: bytes) -> None:
    with pytest.raises(MalformedMessageError):
        from_ws_v1(frame)


@pytest.mark.parametrize(
    "frame",
    [
        "not json",
        "[1, 2]",
        '{"header": {"msg_id": "a", "msg_type": "b"}}',  # no channel
        '{"channel": "shell", "header": "nope"}',
        '{"channel": "shell", "header": {"msg_type": "b"}}',  # no msg_id
        b"\x00\x00\x00\x05\x00\x00",  # truncated binary
    ],
)
def test_legacy_malformed(frame: str | bytes) -> None:
    with pytest.raises(MalformedMessageError):
        from_ws_legacy(frame)


def test_content_parsed_lazily() -> None:
    msg = Message("iopub", [b'{"msg_id":"1","msg_type":"stream"}', b"{}", b"{}", b"not json"])
    assert msg.msg_type == "stream"  # routing works without touching the content
    with pytest.raises(MalformedMessageError):
        _ = msg.content


# --- WebSocket framing -----------------------------------------------------------------------


def server_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    size = len(payload)
    if size < 126:
        return struct.pack("!BB", first, size) + payload
    if size < 1 << 16:
        return struct.pack("!BBH", first, 126, size) + payload
    return struct.pack("!BBQ", first, 127, size) + payload


def read_all(reader: FrameReader, data: bytes, step: int) -> list[tuple[int, bytes]]:
    """Feed ``data`` through the buffered-protocol interface, at most ``step`` bytes a read."""
    events = []
    view = memoryview(data)
    while view:
        target = reader.get_buffer()
        count = min(len(target), len(view), step)
        target[:count] = view[:count]
        view = view[count:]
        events += [(op, bytes(p)) for op, p in reader.buffer_updated(count)]
    return events


def unmask_client(frames: list[bytes]) -> list[tuple[int, bool, bytes]]:
    """Parse masked client frames back into (opcode, fin, payload)."""
    out = []
    for frame in frames:
        first, second = frame[0], frame[1]
        assert second & 0x80, "client frames are masked"
        size, at = second & 0x7F, 2
        if size == 126:
            (size,) = struct.unpack_from("!H", frame, 2)
            at = 4
        elif size == 127:
            (size,) = struct.unpack_from("!Q", frame, 2)
            at = 10
        key, payload = frame[at : at + 4], frame[at + 4 :]
        assert len(payload) == size
        out.append((first & 0x0F, bool(first & 0x80), mask_python(key, payload)))
    return out


@pytest.mark.parametrize("step", [1, 7, 4096, 1 << 30])
def test_frame_reader_small_big_and_fragmented(step: int) -> None:
    big = bytes(range(256)) * 1200  # over the big-frame threshold: read into its own buffer
    data = (
        server_frame(OP_BINARY, b"one")
        + server_frame(OP_PING, b"p")
        + server_frame(OP_TEXT, b"x" * 300)
        + server_frame(OP_BINARY, big)
        + server_frame(OP_BINARY, b"frag-", fin=False)
        + server_frame(OP_PING, b"")
        + server_frame(OP_CONTINUATION, b"mid-", fin=False)
        + server_frame(OP_CONTINUATION, b"end")
        + server_frame(OP_CLOSE, close_payload(1001, "bye"))
    )
    events = read_all(FrameReader(1 << 30), data, step)
    assert events == [
        (OP_BINARY, b"one"),
        (OP_PING, b"p"),
        (OP_TEXT, b"x" * 300),
        (OP_BINARY, big),
        (OP_PING, b""),
        (OP_BINARY, b"frag-mid-end"),
        (OP_CLOSE, close_payload(1001, "bye")),
    ]
    assert parse_close(events[-1][1]) == (1001, "bye")


def test_frame_reader_big_frame_is_handed_over_without_a_copy() -> None:
    reader = FrameReader(1 << 30)
    payload = b"z" * (300 * 1024)
    events = reader.feed(server_frame(OP_BINARY, payload))
    assert len(events) == 1 and isinstance(events[0][1], bytearray)
    assert events[0][1] == payload


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x82 | 0x40, 0]),  # reserved bit
        bytes([0x82, 0x80 | 1, 0, 0, 0, 0, 0]),  # masked by the server
        server_frame(OP_CONTINUATION, b"x"),  # nothing to continue
        server_frame(OP_PING, b"x" * 126),  # control frame too long
        server_frame(OP_BINARY, b"a", fin=False) + server_frame(OP_BINARY, b"b"),
    ],
)
def test_frame_reader_rejects_broken_framing(data: bytes) -> None:
    with pytest.raises(WebSocketProtocolError):
        FrameReader(1 << 30).feed(data)


def test_frame_reader_enforces_the_size_limit() -> None:
    with pytest.raises(WebSocketProtocolError) as info:
        FrameReader(100).feed(server_frame(OP_BINARY, b"x" * 101))
    assert info.value.code == 1009


def test_mask_python_round_trips_and_matches_tornado() -> None:
    from tornado.util import _websocket_mask_python

    data = bytes(range(256)) * 3 + b"tail"
    key = b"\x01\x80\xfe\x7f"
    assert mask_python(key, data) == _websocket_mask_python(key, data)
    assert mask_python(key, mask_python(key, data)) == data
    assert mask_python(key, b"") == b""


def test_client_frames_small_message_is_one_masked_frame() -> None:
    msg = sample(bufs=[b"\x00\x01"])
    frames = list(client_frames(OP_BINARY, to_ws_v1_pieces(msg), mask_python, lambda: b"abcd"))
    assert unmask_client(frames) == [(OP_BINARY, True, to_ws_v1(msg))]


def test_client_frames_large_message_is_fragmented_without_joining() -> None:
    big = bytes(range(251)) * (FRAGMENT_SIZE // 100)  # about 2.5 fragments
    msg = sample(bufs=[b"small", memoryview(big)])
    frames = list(client_frames(OP_BINARY, to_ws_v1_pieces(msg), mask_python, lambda: b"k3y!"))
    parsed = unmask_client(frames)
    assert len(parsed) == 3
    assert [op for op, _, _ in parsed] == [OP_BINARY, OP_CONTINUATION, OP_CONTINUATION]
    assert [fin for _, fin, _ in parsed] == [False, False, True]
    assert all(len(p) == FRAGMENT_SIZE for _, _, p in parsed[:-1])
    assert b"".join(p for _, _, p in parsed) == to_ws_v1(msg)
    again = from_ws_v1(bytearray(b"".join(p for _, _, p in parsed)))
    same(msg, again)
