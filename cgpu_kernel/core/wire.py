"""Wire formats: Jupyter messages as ZMQ frames and as WebSocket frames, bytes in, bytes out.

This module is the translation layer between the two protocols the proxy speaks. It does no
I/O and imports no I/O library, so every format is tested by round trips on plain bytes.

A :class:`Message` keeps the four JSON parts (header, parent header, metadata, content) as the
exact bytes they arrived in. Forwarding a message from ZMQ to a v1 WebSocket (or back) therefore
never decodes and re-encodes the content: only the header and parent header are parsed,
because routing needs them. The content is parsed lazily, the first time something asks.

A part of :data:`VIEW_MIN` bytes or more is not copied out of what it arrived in: it is a
``memoryview`` of the ZMQ frame or of the WebSocket frame (issue 19: the proxy's memory for a
100 MB code string or a 20 MB header stays near the message's own size). A frontend's large
ASCII content is a :class:`TextPart`: the ``str`` its JSON was decoded to for parsing, which
takes the place of ZMQ's frame (freed) instead of being held beside it. Code that needs
``bytes`` methods on a part (``in``, ``count``, ``rfind``) asks :meth:`Message.raw` for it;
code that hands parts to ZMQ or HMAC asks :meth:`Message.wire_parts`.

Formats:

* ZMQ: ``[identities..., b"<IDS|MSG>", signature, header, parent, metadata, content, buffers...]``.
  Signing and verifying is left to ``jupyter_client.session.Session`` in the ZMQ shell; this
  module only cuts and joins frames.
* WebSocket v1 (``v1.kernel.websocket.jupyter.org``): a little-endian uint64 count ``n``, ``n``
  uint64 offsets, then channel, header, parent, metadata, content, buffers.
* WebSocket legacy: a text frame holding one JSON object with a ``channel`` key, or, when the
  message has buffers, a binary frame: big-endian uint32 count ``n``, ``n`` uint32 offsets, the
  JSON, the buffers.
"""

from __future__ import annotations

import json
import struct
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from typing import Any

from cgpu_kernel.exceptions import MalformedMessageError

DELIMITER = b"<IDS|MSG>"
V1_SUBPROTOCOL = "v1.kernel.websocket.jupyter.org"
PROTOCOL_VERSION = "5.4"
CHANNELS = ("shell", "control", "stdin", "iopub")

JsonDict = dict[str, Any]
Buffer = bytes | bytearray | memoryview


class TextPart:
    """A large JSON part held as the ``str`` it was decoded to, instead of as bytes.

    Parsing a JSON part needs it as a ``str``; held beside the bytes it came in, a 100 MB code
    string was in memory three times (ZMQ's frame, its text, the parsed code). The frontend
    shell (``FrontendSockets.verify``) decodes a large content and keeps this instead of ZMQ's
    frame, which it frees before parsing. Sent, it is encoded a fragment at a time
    (:func:`fragments`); where a whole ``bytes`` is needed (ZMQ, HMAC, a legacy frame),
    :meth:`tobytes` makes one. ``nbytes`` is its UTF-8 length: the bytes it was decoded from
    (strict UTF-8 decodes and encodes back to the same bytes).
    """

    __slots__ = ("nbytes", "text")

    def __init__(self, text: str, nbytes: int) -> None:
        self.text = text
        self.nbytes = nbytes

    def __len__(self) -> int:
        return self.nbytes

    def tobytes(self) -> bytes:
        return self.text.encode("utf-8")

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TextPart):
            return self.text == other.text
        if isinstance(other, bytes | bytearray | memoryview):
            return self.tobytes() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # compared by value, never a key


#: One JSON part of a message: ``bytes``, a view of the frame it came in (a large part), or a
#: frontend's large content as its text.
Part = bytes | memoryview | TextPart
#: Parts from this size on are kept as views of their frame instead of copied out of it.
VIEW_MIN = 64 * 1024


def _loads_dict(raw: Buffer | TextPart, what: str) -> JsonDict:
    try:
        # Decoded here: Jupyter's JSON is UTF-8, and ``json.loads`` would first guess the
        # encoding of bytes (a few percent of the proxy's CPU per round trip).
        value = json.loads(raw.text if isinstance(raw, TextPart) else str(raw, "utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessageError(f"the {what} is not valid JSON: {exc}") from None
    except RecursionError:
        # The C decoder recurses once per array or object level: a few thousand levels (a
        # dozen kilobytes of ``[``) exhaust the stack. Such a message is malformed, not a crash.
        raise MalformedMessageError(
            f"the {what} nests JSON arrays or objects too deeply to decode"
        ) from None
    if not isinstance(value, dict):
        raise MalformedMessageError(f"the {what} is a JSON {type(value).__name__}, not an object")
    return value


def _dumps(value: Any) -> bytes:
    try:
        return json.dumps(value, default=_json_default, ensure_ascii=False).encode("utf-8")
    except RecursionError:
        # Decoding stops at the same depth, but a value decoded near the limit can fail to
        # encode when the stack is deeper here (``from_ws_legacy`` re-encodes what it decoded).
        raise MalformedMessageError("the message nests JSON too deeply to encode") from None


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | memoryview):
        raise TypeError("binary data belongs in a message's buffers, not its JSON")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def utc_now_iso() -> str:
    """The timestamp format Jupyter message headers use."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


class Message:
    """One Jupyter message on one channel, holding its JSON parts as raw bytes.

    ``header`` and ``parent_header`` are parsed on construction (routing needs them);
    ``metadata`` and ``content`` are parsed on first access. ``text_chars`` is a stream
    message's character count as the remote kernel's journal agent gave it (its metadata key is
    stripped before the relay sees the message; the output limits read it): None when unknown.
    """

    __slots__ = (
        "__weakref__",
        "_content",
        "_metadata",
        "buffers",
        "channel",
        "header",
        "parent_header",
        "parts",
        "text_chars",
    )

    def __init__(
        self,
        channel: str,
        parts: Sequence[Part],
        buffers: list[Buffer] | None = None,
        *,
        header: JsonDict | None = None,
        parent_header: JsonDict | None = None,
        content: JsonDict | None = None,
    ) -> None:
        if len(parts) != 4:
            raise MalformedMessageError(f"a message has 4 JSON parts, this one has {len(parts)}")
        self.channel = channel
        self.parts: list[Part] = list(parts)
        self.buffers: list[Buffer] = buffers or []
        self.header = header if header is not None else _loads_dict(parts[0], "header")
        self.parent_header = (
            parent_header if parent_header is not None else _loads_dict(parts[1], "parent header")
        )
        self._metadata: JsonDict | None = None
        self._content: JsonDict | None = content
        self.text_chars: int | None = None
        if not isinstance(self.header.get("msg_id"), str) or not isinstance(
            self.header.get("msg_type"), str
        ):
            raise MalformedMessageError("the header lacks a string msg_id or msg_type")

    @classmethod
    def build(
        cls,
        channel: str,
        header: JsonDict,
        parent_header: JsonDict | None = None,
        metadata: JsonDict | None = None,
        content: JsonDict | None = None,
        buffers: list[Buffer] | None = None,
    ) -> Message:
        """Make a message from dicts (the proxy's own messages, legacy WebSocket frames)."""
        parent = parent_header or {}
        body = content or {}
        parts = [_dumps(header), _dumps(parent), _dumps(metadata or {}), _dumps(body)]
        return cls(channel, parts, buffers, header=header, parent_header=parent, content=body)

    @property
    def msg_id(self) -> str:
        return str(self.header["msg_id"])

    @property
    def msg_type(self) -> str:
        return str(self.header["msg_type"])

    @property
    def parent_id(self) -> str | None:
        value = self.parent_header.get("msg_id")
        return value if isinstance(value, str) else None

    def shed(self) -> None:
        """Forget the parsed content and metadata where their part is large (they are parsed
        again if asked). Who calls: ``proxy.kernel`` once the relay has handled a frontend's
        message, which it keeps until its reply: a 100 MB code string would otherwise be held
        twice for the whole cell, as its JSON and as the parsed ``str``."""
        if len(self.parts[3]) >= VIEW_MIN:
            self._content = None
        if len(self.parts[2]) >= VIEW_MIN:
            self._metadata = None

    def raw(self, index: int) -> bytes:
        """Part ``index`` as ``bytes`` (a copy only where the part is a view of a large frame):
        for the output limits and the journal, which search the raw JSON with ``bytes``
        methods that a ``memoryview`` lacks (``b"x" in view`` is silently False)."""
        part = self.parts[index]
        return part if isinstance(part, bytes) else part.tobytes()

    @property
    def wire_parts(self) -> list[bytes | memoryview]:
        """The parts as ZMQ and HMAC take them: :attr:`parts` itself, unless one is a
        :class:`TextPart` (then encoded here, a copy)."""
        parts = self.parts
        if not any(isinstance(p, TextPart) for p in parts):
            return parts  # type: ignore[return-value]  # no TextPart in it: checked just above
        return [p.tobytes() if isinstance(p, TextPart) else p for p in parts]

    @property
    def content(self) -> JsonDict:
        if self._content is None:
            self._content = _loads_dict(self.parts[3], "content")
        return self._content

    @property
    def metadata(self) -> JsonDict:
        if self._metadata is None:
            self._metadata = _loads_dict(self.parts[2], "metadata")
        return self._metadata

    def with_metadata(self, metadata: JsonDict) -> Message:
        """This message with other metadata (the rest, buffers included, shared)."""
        msg = Message(
            self.channel,
            [self.parts[0], self.parts[1], _dumps(metadata), self.parts[3]],
            self.buffers,
            header=self.header,
            parent_header=self.parent_header,
            content=self._content,
        )
        msg._metadata = metadata
        msg.text_chars = self.text_chars  # the same content
        return msg

    @property
    def size(self) -> int:
        """Bytes on the wire, buffers included (what output limits count)."""
        return sum(len(p) for p in self.parts) + sum(len(b) for b in self.buffers)

    def with_content(self, content: JsonDict) -> Message:
        """A copy with new content and a new msg_id (used when the proxy rewrites output)."""
        header = dict(self.header, msg_id=new_id())
        return Message(
            self.channel,
            [_dumps(header), self.parts[1], self.parts[2], _dumps(content)],
            list(self.buffers),
            header=header,
            parent_header=self.parent_header,
            content=content,
        )

    def __repr__(self) -> str:
        return f"<Message {self.channel} {self.msg_type} {self.msg_id}>"


def new_id() -> str:
    return uuid.uuid4().hex


def make_header(msg_type: str, session: str, username: str = "cgpu-kernel") -> JsonDict:
    """A header for a message the proxy itself originates (status, local replies, notices)."""
    return {
        "msg_id": new_id(),
        "msg_type": msg_type,
        "session": session,
        "username": username,
        "date": utc_now_iso(),
        "version": PROTOCOL_VERSION,
    }


# --- ZMQ -------------------------------------------------------------------------------------


def split_zmq_frames(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Split ``frames`` at the delimiter: (identities, [signature, 4 parts, buffers...])."""
    try:
        index = frames.index(DELIMITER)
    except ValueError:
        raise MalformedMessageError("no <IDS|MSG> delimiter in the ZMQ frames") from None
    rest = frames[index + 1 :]
    if len(rest) < 5:
        raise MalformedMessageError(f"{len(rest)} frames after the delimiter, at least 5 needed")
    return frames[:index], rest


def zmq_frames(identities: list[bytes], signature: bytes, msg: Message) -> list[Buffer]:
    """Join a message into ZMQ frames, given the signature the shell computed over its parts."""
    return [*identities, DELIMITER, signature, *msg.wire_parts, *msg.buffers]


# --- WebSocket v1 ----------------------------------------------------------------------------


def to_ws_v1_pieces(msg: Message) -> list[Buffer | TextPart]:
    """A v1 frame as pieces to write one after the other (the buffers are not copied).

    ``b"".join(plain(to_ws_v1_pieces(msg))) == to_ws_v1(msg)``; a WebSocket client that can
    send a message in fragments (:func:`fragments`) sends a large buffer or text without ever
    copying it whole.
    """
    pieces: list[Buffer | TextPart] = [msg.channel.encode("ascii"), *msg.parts, *msg.buffers]
    count = len(pieces) + 1
    offsets = [8 * (1 + count)]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    return [struct.pack(f"<{count + 1}Q", count, *offsets), *pieces]


def plain(pieces: list[Buffer | TextPart]) -> list[Buffer]:
    """``pieces`` with each :class:`TextPart` encoded (for a join)."""
    return [p.tobytes() if isinstance(p, TextPart) else p for p in pieces]


def to_ws_v1(msg: Message) -> bytes:
    return b"".join(plain(to_ws_v1_pieces(msg)))


#: ``from_ws_v1``'s question about a large parent header: the message sent with exactly
#: those bytes as its header, or None.
KnownParent = Callable[[Part], "Message | None"]


def _cut(view: memoryview, start: int, end: int) -> Part:
    """A part of a frame: a view from :data:`VIEW_MIN` bytes on, a small copy below."""
    if end - start >= VIEW_MIN:
        return view[start:end]
    return view[start:end].tobytes()


def from_ws_v1(frame: Buffer, known_parent: KnownParent | None = None) -> Message:
    """Parse a v1 frame. Large parts and the buffers are views into ``frame`` when it is
    immutable ``bytes`` or a ``bytearray`` handed over by its owner (``proxy.connection``
    hands over each frame it reads: nothing large is copied on its way to ZMQ), copies
    otherwise. ``known_parent``: asked about a large parent header, it may answer with a
    request that was sent with exactly those bytes as its header: the reply then shares that
    request's header part and its parse, and ``frame`` is not held for it (a 20 MB header
    comes back in every reply and output of its cell)."""
    view = memoryview(frame)
    size = len(view)
    if size < 8:
        raise MalformedMessageError("v1 frame shorter than its offset count")
    (count,) = struct.unpack_from("<Q", view, 0)
    if count < 6 or size < 8 * (1 + count):
        raise MalformedMessageError(f"v1 frame with {count} offsets cannot hold a message")
    offsets = struct.unpack_from(f"<{count}Q", view, 8)
    if offsets[0] < 8 * (1 + count) or offsets[-1] > size:
        raise MalformedMessageError("v1 frame offsets are out of order or out of range")
    for i in range(count - 1):
        if offsets[i] > offsets[i + 1]:
            raise MalformedMessageError("v1 frame offsets are out of order or out of range")
    if not isinstance(frame, bytes | bytearray):
        # Anything else may change under a view (a bytearray is the caller's to hand over,
        # never changed afterwards), so it is copied.
        view = memoryview(bytes(view))
    parts = [_cut(view, offsets[i], offsets[i + 1]) for i in range(1, 5)]
    try:
        channel = bytes(view[offsets[0] : offsets[1]]).decode("ascii")
    except UnicodeDecodeError:
        raise MalformedMessageError("v1 frame channel is not ASCII") from None
    parent = None
    if known_parent is not None and len(parts[1]) >= VIEW_MIN:
        sent = known_parent(parts[1])
        if sent is not None:
            parts[1], parent = sent.parts[0], sent.header
    buffers: list[Buffer] = [view[offsets[i] : offsets[i + 1]] for i in range(5, count - 1)]
    return Message(channel, parts, buffers, parent_header=parent)


# --- WebSocket legacy ------------------------------------------------------------------------


def _legacy_json(msg: Message) -> bytes:
    # The parts are already JSON: splice them into one object instead of re-encoding them.
    channel = json.dumps(msg.channel).encode()
    header, parent, metadata, content = msg.wire_parts
    return b"".join(
        [
            b'{"channel":',
            channel,
            b',"header":',
            header,
            b',"parent_header":',
            parent,
            b',"metadata":',
            metadata,
            b',"content":',
            content,
            b"}",
        ]
    )


def to_ws_legacy(msg: Message) -> bytes | str:
    """A text frame (str) without buffers, a binary frame (bytes) with them."""
    body = _legacy_json(msg)
    if not msg.buffers:
        return body.decode("utf-8")
    pieces: list[Buffer] = [body, *msg.buffers]
    offsets = [4 * (1 + len(pieces))]
    for piece in pieces[:-1]:
        offsets.append(offsets[-1] + len(piece))
    return b"".join([struct.pack(f">{len(pieces) + 1}I", len(pieces), *offsets), *pieces])


def from_ws_legacy(frame: bytes | bytearray | str) -> Message:
    """Parse a legacy text (``str``) or binary frame; raises :class:`MalformedMessageError`."""
    buffers: list[Buffer] = []
    if isinstance(frame, str):
        try:
            body: Buffer = frame.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: no WebSocket text frame can carry it
            raise MalformedMessageError("legacy text frame is not valid Unicode") from None
    else:
        view = memoryview(frame)
        if len(view) < 8:
            raise MalformedMessageError("legacy binary frame shorter than its header")
        (count,) = struct.unpack_from(">I", view, 0)
        if count < 1 or len(view) < 4 * (1 + count):
            raise MalformedMessageError(f"legacy binary frame with {count} offsets is truncated")
        offsets = [*struct.unpack_from(f">{count}I", view, 4), len(view)]
        if offsets != sorted(offsets):
            raise MalformedMessageError("legacy binary frame offsets are out of order")
        body = view[offsets[0] : offsets[1]]
        # Views into the frame (bytes never change under them), a copy of anything mutable.
        whole = view if isinstance(frame, bytes) else memoryview(bytes(view))
        buffers = [whole[offsets[i] : offsets[i + 1]] for i in range(1, count)]
    obj = _loads_dict(body, "WebSocket message")
    channel = obj.get("channel")
    if not isinstance(channel, str):
        raise MalformedMessageError("legacy WebSocket message without a channel")
    header, parent = obj.get("header"), obj.get("parent_header") or {}
    metadata, content = obj.get("metadata") or {}, obj.get("content") or {}
    if not isinstance(header, dict) or not isinstance(parent, dict):
        raise MalformedMessageError("legacy WebSocket message without a header object")
    if not isinstance(metadata, dict) or not isinstance(content, dict):
        raise MalformedMessageError("legacy WebSocket message with non-object metadata/content")
    return Message.build(channel, header, parent, metadata, content, buffers)


def to_ws(msg: Message, subprotocol: str | None) -> bytes | str:
    return to_ws_v1(msg) if subprotocol == V1_SUBPROTOCOL else to_ws_legacy(msg)


def from_ws(frame: bytes | bytearray | str, subprotocol: str | None) -> Message:
    if subprotocol == V1_SUBPROTOCOL:
        if isinstance(frame, str):
            raise MalformedMessageError("text frame on a v1 WebSocket")
        return from_ws_v1(frame)
    return from_ws_legacy(frame)


# --- WebSocket fragments ---------------------------------------------------------------------

#: Largest WebSocket frame the proxy writes: a bigger message goes out in fragments this size,
#: each masked and written on its own, so no whole-message copy is ever made.
FRAGMENT_SIZE = 1 << 20


def fragments(pieces: list[Buffer | TextPart], size: int = FRAGMENT_SIZE) -> Iterator[bytes]:
    """``pieces`` regrouped into chunks of at most ``size`` bytes, cut from the pieces without
    joining them first (a :class:`TextPart` is encoded a chunk at a time; a chunk ends short
    where one more character of it would not fit)."""
    small: list[Buffer] = []
    filled = 0
    for piece in pieces:
        if isinstance(piece, TextPart):
            text = piece.text
            # ASCII: a character per byte; otherwise up to 4 bytes per character
            per_char = 1 if text.isascii() else 4
            start = 0
            while start < len(text):
                take = max(1, (size - filled) // per_char)
                data = text[start : start + take].encode("utf-8")
                if filled and filled + len(data) > size:
                    yield _chunk(small)
                    small, filled = [], 0
                    continue
                small.append(data)
                filled += len(data)
                start += take
                if filled >= size:
                    yield _chunk(small)
                    small, filled = [], 0
            continue
        view = memoryview(piece).cast("B")
        start = 0
        while start < len(view):
            take = min(size - filled, len(view) - start)
            small.append(view[start : start + take])
            filled += take
            start += take
            if filled == size:
                yield _chunk(small)
                small, filled = [], 0
    if small:
        yield _chunk(small)


def _chunk(small: list[Buffer]) -> bytes:
    if len(small) == 1:
        only = small[0]
        return only if isinstance(only, bytes) else bytes(only)
    return b"".join(small)
