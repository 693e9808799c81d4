"""Every parser of outside bytes, fed arbitrary and near-valid input: only the documented error.

Each parser the proxy runs on bytes from a frontend or a remote server (``wire``'s WebSocket and
ZMQ formats, a message's lazily parsed parts, the ZMQ shell's signature check, the journal's
answer) must either return a message or raise :class:`MalformedMessageError`, which the shells
catch, count and log. Anything else (``RecursionError``, ``struct.error``, ``IndexError``...)
would escape the shell's handler and take down a read loop.

Bounded (``max_examples`` 200 each, no deadline) so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jupyter_client.session import Session

from cgpu_kernel.core import journal
from cgpu_kernel.core.wire import (
    DELIMITER,
    V1_SUBPROTOCOL,
    Message,
    from_ws,
    from_ws_legacy,
    from_ws_v1,
    make_header,
    split_zmq_frames,
    to_ws_legacy,
    to_ws_v1,
)
from cgpu_kernel.exceptions import MalformedMessageError
from cgpu_kernel.proxy.frontend import FrontendSockets

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
HEADER = json.dumps({"msg_id": "m1", "msg_type": "execute_request"}).encode()


def only_documented_error(parse: Callable[[], object]) -> object:
    """Run ``parse``; a :class:`MalformedMessageError` is the one allowed failure."""
    try:
        return parse()
    except MalformedMessageError as exc:
        assert str(exc)  # a clear message, never an empty one
        return None


def parse_fully(msg: Message) -> None:
    """What the proxy reads of a message sooner or later: all four parts."""
    assert isinstance(msg.header, dict) and isinstance(msg.parent_header, dict)
    assert isinstance(msg.metadata, dict) and isinstance(msg.content, dict)
    assert isinstance(msg.msg_id, str) and isinstance(msg.msg_type, str)


def nested(depth: int, kind: str = "[") -> str:
    """JSON nested ``depth`` levels deep: arrays (``[[[...]]]``) or objects (``{"a":{"a":1}}``)."""
    if kind == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


# --- strategies -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
# The depths around where the C decoder gives up (about a thousand levels by default).
depths = st.sampled_from([1, 10, 500, 990, 1000, 1010, 5000, 20_000])
deep_json = st.builds(nested, depths, st.sampled_from(["[", "{"]))
# Bytes that look like JSON more often than pure noise does.
json_ish = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.builds(str.encode, deep_json),
    st.builds(lambda v, cut: json.dumps(v).encode()[:cut], json_values, st.integers(0, 50)),
)
any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=200)


def v1_frame(count: int, offsets: list[int], body: bytes) -> bytes:
    return (
        struct.pack("<Q", count)
        + b"".join(struct.pack("<Q", o % (1 << 64)) for o in offsets)
        + (body)
    )


def legacy_binary(count: int, offsets: list[int], body: bytes) -> bytes:
    return (
        struct.pack(">I", count % (1 << 32))
        + b"".join(struct.pack(">I", o % (1 << 32)) for o in offsets)
        + body
    )


def v1_from_parts(parts: list[bytes], channel: bytes = b"shell") -> bytes:
    """A v1 frame built by hand (``Message`` would reject bad parts before they are framed)."""
    pieces = [channel, *parts]
    count = len(pieces) + 1
    offsets = [8 * (1 + count)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return struct.pack(f"<{count + 1}Q", count, *offsets) + b"".join(pieces)


def valid_message(content: Any = None, buffers: list[bytes] | None = None) -> Message:
    return Message.build(
        "shell",
        make_header("execute_request", "s1"),
        {"msg_id": "p1", "msg_type": "x"},
        {},
        {"code": "1"} if content is None else content,
        buffers,
    )


# --- WebSocket v1 -----------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=400))
def test_v1_arbitrary_bytes(frame: bytes) -> None:
    for same in (frame, bytearray(frame), memoryview(frame)):
        msg = only_documented_error(lambda f=same: from_ws_v1(f))  # type: ignore[misc]
        if isinstance(msg, Message):
            only_documented_error(lambda m=msg: parse_fully(m))  # type: ignore[misc]


@FUZZ
@given(
    count=st.one_of(st.integers(0, 12), st.sampled_from([1 << 32, (1 << 63) - 1, (1 << 64) - 1])),
    offsets=st.lists(st.integers(0, (1 << 64) - 1) | st.integers(0, 300), max_size=12),
    body=json_ish,
)
def test_v1_near_valid_offsets(count: int, offsets: list[int], body: bytes) -> None:
    """Huge offset counts, offsets past the end, backwards or into the offset table."""
    msg = only_documented_error(lambda: from_ws_v1(v1_frame(count, offsets, body)))
    if isinstance(msg, Message):
        only_documented_error(lambda: parse_fully(msg))


@FUZZ
@given(
    part=st.integers(0, 3),
    value=json_ish,
    cut=st.integers(0, 2000),
    channel=st.one_of(st.sampled_from([b"shell", b"iopub", b""]), st.binary(max_size=8)),
)
def test_v1_one_part_replaced_or_truncated(
    part: int, value: bytes, cut: int, channel: bytes
) -> None:
    """A valid frame with one JSON part swapped for noise or deep nesting, any channel bytes,
    then maybe cut."""
    parts = list(valid_message().parts)
    parts[part] = value
    frame = v1_from_parts(parts, channel)
    for candidate in (bytes(frame), bytes(frame[: max(0, len(frame) - cut)])):
        msg = only_documented_error(lambda c=candidate: from_ws_v1(c))  # type: ignore[misc]
        if isinstance(msg, Message):
            only_documented_error(lambda m=msg: parse_fully(m))  # type: ignore[misc]


# --- WebSocket legacy -------------------------------------------------------------------------


@FUZZ
@given(any_text)
def test_legacy_arbitrary_text(frame: str) -> None:
    """Any ``str``, lone surrogates included (no text frame carries one, but the API takes any)."""
    msg = only_documented_error(lambda: from_ws_legacy(frame))
    if isinstance(msg, Message):
        parse_fully(msg)


@FUZZ
@given(st.binary(max_size=400))
def test_legacy_arbitrary_binary(frame: bytes) -> None:
    for same in (frame, bytearray(frame)):
        msg = only_documented_error(lambda f=same: from_ws_legacy(f))  # type: ignore[misc]
        if isinstance(msg, Message):
            parse_fully(msg)


@FUZZ
@given(
    count=st.one_of(st.integers(0, 8), st.sampled_from([1 << 31, (1 << 32) - 1])),
    offsets=st.lists(st.integers(0, (1 << 32) - 1) | st.integers(0, 300), max_size=8),
    body=json_ish,
)
def test_legacy_binary_near_valid_offsets(count: int, offsets: list[int], body: bytes) -> None:
    msg = only_documented_error(lambda: from_ws_legacy(legacy_binary(count, offsets, body)))
    if isinstance(msg, Message):
        parse_fully(msg)


@FUZZ
@given(
    key=st.sampled_from(["header", "parent_header", "metadata", "content", "channel"]),
    value=json_values | st.builds(lambda d: json.loads(nested(min(d, 900))), depths),
    raw=st.one_of(st.none(), deep_json),
)
def test_legacy_fields_of_any_shape(key: str, value: Any, raw: str | None) -> None:
    """A legacy object with one field of the wrong type, or nested as deep as it decodes."""
    obj: dict[str, Any] = {
        "channel": "shell",
        "header": {"msg_id": "m1", "msg_type": "t"},
        "parent_header": {},
        "metadata": {},
        "content": {},
    }
    obj[key] = value
    text = json.dumps(obj)
    if raw is not None:  # splice in the raw (possibly undecodable) nesting
        text = text[:-1] + f', "extra": {raw}' + "}"
    msg = only_documented_error(lambda: from_ws_legacy(text))
    if isinstance(msg, Message):
        parse_fully(msg)
    for subprotocol in (None, V1_SUBPROTOCOL):
        only_documented_error(lambda s=subprotocol: from_ws(text, s))  # type: ignore[misc]


# --- ZMQ ---------------------------------------------------------------------------------------

zmq_frame_lists = st.lists(
    st.one_of(st.binary(max_size=60), st.just(DELIMITER), json_ish, st.just(HEADER)),
    max_size=10,
)


@FUZZ
@given(zmq_frame_lists)
def test_split_zmq_frames_arbitrary(frames: list[bytes]) -> None:
    split = only_documented_error(lambda: split_zmq_frames(frames))
    if split is not None:
        identities, rest = split  # type: ignore[misc]
        assert DELIMITER not in identities and len(rest) >= 5


@pytest.fixture(scope="module")
def frontends() -> Any:
    """Two ZMQ shells, never bound: ``verify`` is pure (an unsigned and a signed session)."""
    made = [
        FrontendSockets({}, Session(key=b"", check_pid=False)),
        FrontendSockets({}, Session(key=b"secret", check_pid=False)),
    ]
    yield made
    for shell in made:
        shell.close()


@FUZZ
@given(frames=zmq_frame_lists, sign=st.booleans())
def test_zmq_verify_arbitrary_frames(frontends: Any, frames: list[bytes], sign: bool) -> None:
    """The shell's parse of frontend frames. ``sign``: put a valid signature in, so the parts
    get past the HMAC check and into the JSON parsing."""
    for shell in frontends:
        candidate = list(frames)
        if sign and DELIMITER in candidate:
            at = candidate.index(DELIMITER)
            parts = candidate[at + 2 : at + 6]
            if len(parts) == 4 and len(candidate) > at + 1:
                candidate[at + 1] = shell.session.sign(parts)
        shell.session.digest_history.clear()
        result = only_documented_error(lambda s=shell, c=candidate: s.verify("shell", c))  # type: ignore[misc]
        if result is not None:
            _, msg = result  # type: ignore[misc]
            parse_fully(msg)


# --- a message's parts -------------------------------------------------------------------------


@FUZZ
@given(parts=st.lists(json_ish, min_size=4, max_size=4), wrong=st.integers(0, 6))
def test_message_parts_arbitrary(parts: list[bytes], wrong: int) -> None:
    """``Message`` parses header and parent at once, metadata and content when asked."""
    if wrong != 4:
        parts = (parts * 2)[:wrong]  # a wrong number of parts (4 is the right one)
    msg = only_documented_error(lambda: Message("shell", parts))
    if isinstance(msg, Message):
        only_documented_error(lambda: msg.metadata)
        only_documented_error(lambda: msg.content)


@FUZZ
@given(content=json_ish)
def test_message_content_with_a_valid_header(content: bytes) -> None:
    msg = Message("iopub", [HEADER, b"{}", b"{}", content])
    got = only_documented_error(lambda: msg.content)
    if got is not None:
        assert isinstance(got, dict)


# --- the journal's answer ----------------------------------------------------------------------

entries = st.lists(
    st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "channel": st.sampled_from(["shell", "iopub", "control", "stdin", "nope"]),
                "header": st.one_of(st.just({"msg_id": "j1", "msg_type": "stream"}), json_values),
                "buffers": st.one_of(st.integers(-3, 5), json_values),
            },
            optional={"content": json_values, "parent_header": json_values},
        ),
    ),
    max_size=5,
)


@FUZZ
@given(
    status=st.sampled_from(["ok", "error", None]),
    messages=st.one_of(entries, json_values),
    complete=st.one_of(st.just({"iopub": True}), json_values),
    buffers=st.lists(st.binary(max_size=10), max_size=4),
)
def test_journal_answer_of_any_shape(
    status: Any, messages: Any, complete: Any, buffers: list[bytes]
) -> None:
    reply = valid_message({"status": status, "messages": messages, "complete": complete}, buffers)
    result = only_documented_error(lambda: journal.recovered_messages(reply))
    if result is not None:
        recovered, _ = result  # type: ignore[misc]
        # Every buffer handed out is one of the reply's, each at most once, in order.
        handed = [bytes(b) for m in recovered for b in m.buffers]
        assert handed == [bytes(b) for b in buffers[: len(handed)]]


@FUZZ
@given(content=json_ish)
def test_journal_answer_arbitrary_bytes(content: bytes) -> None:
    reply = Message("control", [HEADER, b"{}", b"{}", content])
    only_documented_error(lambda: journal.recovered_messages(reply))


# --- the bugs found, pinned as plain examples --------------------------------------------------

DEEP = 100_000


@pytest.mark.parametrize(
    "parse",
    [
        lambda: from_ws_legacy('{"channel": "shell", "header": ' + nested(DEEP) + "}"),
        lambda: from_ws_legacy(nested(DEEP, "{").encode().decode()),
        lambda: Message("shell", [nested(DEEP).encode(), b"{}", b"{}", b"{}"]),
        lambda: Message("shell", [HEADER, b"{}", b"{}", nested(DEEP, "{").encode()]).content,
        lambda: from_ws_v1(v1_from_parts([HEADER, b"{}", b"{}", nested(DEEP).encode()])).content,
    ],
    ids=["legacy-header", "legacy-object", "v1-header", "content", "v1-content"],
)
def test_deep_nesting_is_a_malformed_message(parse: Callable[[], object]) -> None:
    """Was ``RecursionError`` out of ``wire``: now the documented error, saying why."""
    with pytest.raises(MalformedMessageError):
        parse()


def test_deep_nesting_says_why() -> None:
    with pytest.raises(MalformedMessageError, match="too deeply"):
        _ = Message("shell", [HEADER, b"{}", b"{}", nested(DEEP).encode()]).content


def test_journal_answer_nested_too_deeply() -> None:
    content = b'{"status": "ok", "complete": {}, "messages": ' + nested(DEEP).encode() + b"}"
    reply = Message("control", [HEADER, b"{}", b"{}", content])
    with pytest.raises(MalformedMessageError, match="too deeply"):
        journal.recovered_messages(reply)


def test_encoding_a_value_nested_too_deeply() -> None:
    """The proxy re-encodes what it decoded (legacy frames, journal entries): a value built
    deeper than the encoder goes is the documented error too, not ``RecursionError``."""
    value: list[Any] = []
    for _ in range(DEEP):
        value = [value]
    with pytest.raises(MalformedMessageError, match="too deeply to encode"):
        valid_message({"v": value})


def test_legacy_text_with_a_lone_surrogate() -> None:
    """Was ``UnicodeEncodeError``."""
    with pytest.raises(MalformedMessageError, match="Unicode"):
        from_ws_legacy('{"channel": "shell\ud800"}')


def test_journal_entry_with_negative_buffer_count() -> None:
    """Was accepted: the count of -1 moved the buffer position back, so the next entry took a
    buffer that belonged to the one before."""
    entry = {"channel": "iopub", "header": {"msg_id": "j1", "msg_type": "display_data"}}
    reply = valid_message(
        {
            "status": "ok",
            "complete": {"iopub": True},
            "messages": [dict(entry, buffers=1), dict(entry, buffers=-1), dict(entry, buffers=1)],
        },
        [b"first"],
    )
    with pytest.raises(MalformedMessageError, match="buffers"):
        journal.recovered_messages(reply)


def test_round_trips_still_hold() -> None:
    """The fixes changed only what fails: valid frames parse as before."""
    msg = valid_message({"deep": json.loads(nested(50))}, [b"buf"])
    assert from_ws_v1(to_ws_v1(msg)).content == msg.content
    legacy = to_ws_legacy(msg)
    assert from_ws_legacy(legacy).content == msg.content
