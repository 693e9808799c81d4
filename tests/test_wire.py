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

from cgpu_kernel.core.wire import (
    DELIMITER,
    FRAGMENT_SIZE,
    V1_SUBPROTOCOL,
    VIEW_MIN,
    Message,
    TextPart,
    fragments,
    from_ws,
    from_ws_legacy,
    from_ws_v1,
    make_header,
    split_zmq_frames,
    to_ws,
    to_ws_legacy,
    to_ws_v1,
    to_ws_v1_pieces,
    zmq_frames,
)
from cgpu_kernel.exceptions import MalformedMessageError

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


def test_fragments_cut_pieces_into_equal_chunks_without_losing_a_byte() -> None:
    pieces = [b"head", memoryview(bytes(range(251)) * 10), b"", bytearray(b"tail" * 100)]
    whole = b"".join(bytes(p) for p in pieces)
    chunks = list(fragments(pieces, size=1000))
    assert b"".join(chunks) == whole
    assert all(len(c) == 1000 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 1000
    assert list(fragments([], size=1000)) == []
    assert list(fragments([b"x" * 1000], size=1000)) == [b"x" * 1000]


def test_a_fragmented_v1_message_reassembles_to_the_same_message() -> None:
    big = bytes(range(251)) * (FRAGMENT_SIZE // 100)  # about 2.5 fragments
    msg = sample(bufs=[b"small", memoryview(big)])
    chunks = list(fragments(to_ws_v1_pieces(msg)))
    assert len(chunks) == 3
    same(msg, from_ws_v1(bytearray(b"".join(chunks))))


# --- large parts: views and text, not copies (issue 19) --------------------------------------


def test_large_parts_of_a_handed_over_frame_are_views_of_it_small_ones_copies() -> None:
    code = "x" * (2 * VIEW_MIN)
    frame = bytearray(to_ws_v1(sample(content={"code": code})))
    msg = from_ws_v1(frame)
    content = msg.parts[3]
    assert isinstance(content, memoryview) and content.obj is frame  # no copy of the code
    assert all(isinstance(p, bytes) for p in msg.parts[:3])  # header, parent, metadata: small
    assert msg.content["code"] == code
    assert msg.raw(3) == bytes(content) and isinstance(msg.raw(3), bytes)
    # bytes methods on the raw part (a memoryview's ``in`` is silently False)
    assert b'"code"' in msg.raw(3) and b'"code"' not in content  # type: ignore[operator]


def test_a_frame_that_may_change_is_copied_not_viewed() -> None:
    code = "y" * (2 * VIEW_MIN)
    frame = memoryview(bytearray(to_ws_v1(sample(content={"code": code}))))
    msg = from_ws_v1(frame)
    content = msg.parts[3]
    assert isinstance(content, memoryview) and content.obj is not frame.obj
    frame[-3:] = b"zzz"  # the sender reuses its buffer: the message does not change
    assert msg.content["code"] == code


@pytest.mark.parametrize("text", ["a" * 5000, "é✓ x" * 1500, "\U0001f600" * 1300])
def test_a_text_part_goes_out_in_fragments_as_the_bytes_it_was_decoded_from(text: str) -> None:
    content = json.dumps({"code": text}, ensure_ascii=False).encode()
    msg = Message.build("shell", make_header("execute_request", "s1"), {}, {}, {"code": text})
    msg.parts[3] = TextPart(content.decode(), len(content))
    assert msg.size == sum(len(p) for p in msg.parts) and len(msg.parts[3]) == len(content)
    chunks = list(fragments(to_ws_v1_pieces(msg), size=1000))
    assert all(len(c) <= 1000 for c in chunks)
    whole = b"".join(chunks)
    assert whole == to_ws_v1(msg)
    back = from_ws_v1(whole)
    assert back.parts[3] == content and back.content == {"code": text}
    assert msg.wire_parts[3] == content and isinstance(msg.wire_parts[3], bytes)
    assert json.loads(to_ws_legacy(msg))["content"] == {"code": text}


def test_a_reply_to_a_large_header_shares_the_sent_header() -> None:
    header = make_header("execute_request", "s1") | {"padding": "h" * (2 * VIEW_MIN)}
    sent = Message.build("shell", header, {}, {}, {"code": "pass"})
    reply = Message.build("shell", make_header("execute_reply", "s1"), header, {}, {"status": "ok"})
    asked: list[object] = []

    def known(raw: object) -> Message | None:
        asked.append(raw)
        return sent if raw == sent.parts[0] else None

    frame = bytearray(to_ws_v1(reply))
    got = from_ws_v1(frame, known)
    assert len(asked) == 1
    assert got.parent_header is sent.header and got.parts[1] is sent.parts[0]
    assert not any(isinstance(p, memoryview) and p.obj is frame for p in got.parts)
    # other bytes (another header, a different serialization): parsed as always
    other = Message.build("shell", make_header("execute_reply", "s1"), dict(header, x=1), {}, {})
    parsed = from_ws_v1(bytearray(to_ws_v1(other)), known)
    assert parsed.parent_header == dict(header, x=1) and parsed.parent_header is not sent.header
    small = from_ws_v1(bytearray(to_ws_v1(sample())), known)  # a small parent: not even asked
    assert len(asked) == 2 and small.parent_header == {"msg_id": "parent-1", "msg_type": "x"}


def test_shed_forgets_only_a_large_parse() -> None:
    big = Message.build(
        "shell", make_header("execute_request", "s1"), {}, {}, {"code": "c" * VIEW_MIN}
    )
    small = sample()
    first = big.content
    small_content = small.content
    big.shed()
    small.shed()
    assert big.content == first and big.content is not first  # parsed again when asked
    assert small.content is small_content
