"""Runs inside the remote kernel: remembers what the kernel sent, so nothing a cut loses is lost.

The Jupyter WebSocket protocol has no acknowledgements. When a connection drops, a stock
jupyter-server starts buffering for the session only once it *notices* the close; whatever it
wrote into the dying socket before that is gone, and so are the bytes still in flight on the
network. Only the kernel itself knows everything it said. So the proxy installs this agent in
an ipykernel (a silent ``execute_request`` whose source is this file) and, after each
reconnection, asks it on the control channel (``cgpu_journal_request``) for every message sent
after the last one the proxy received on each channel. ipykernel answers control messages on
its own thread, so the answer comes while a long cell keeps running.

The agent wraps the kernel session's ``send``: each outgoing message (iopub output, shell and
control replies, stdin requests) is recorded with its channel in a bounded ring, by count and
by bytes. Buffers are copied (a widget may reuse its array) unless they are too large to keep;
such a message is remembered only as a gap. Messages belonging to the proxy's own requests
(``msg_id`` prefix ``cgpu-internal-``) are not recorded.

Each recorded iopub message is also numbered, in the order it leaves (``metadata["cgpu_seq"]``:
1, 2, 3, ...). IOPub is the one channel every connection sees in full, and the one a server that
falls behind drops from (at ZMQ's high-water mark) with no sign on the connection: a missing
number is the only evidence of such a drop, so the proxy checks the numbers of everything it
receives, asks for what is missing, and strips the number before a frontend sees the message.
Shell, control and stdin messages are not numbered: the server routes them to one connection
each (a reply to another client is never seen here, and is not a loss). A large stream message
also carries its text's length (``metadata["cgpu_chars"]``) when the text holds no carriage
return: the proxy's output limit counts characters, which here is ``len`` and there a pass
over every byte of the JSON; the proxy strips it with the number.

This module must stay standalone: it is sent as source to the remote kernel, which does not
have cgpu-kernel installed. Python 3.8+, standard library only.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from typing import Any

REQUEST_TYPE = "cgpu_journal_request"
REPLY_TYPE = "cgpu_journal_reply"
INTERNAL_PREFIX = "cgpu-internal-"
CHANNELS = ("iopub", "shell", "control", "stdin")
ENTRY_OVERHEAD = 300  # bytes a message costs beyond its text and buffers (headers, JSON)
SEQ_KEY = "cgpu_seq"  # the metadata key of an iopub message's number
#: The metadata key of a large stream message's character count, which the proxy's output
#: limit reads instead of counting 1 MiB of JSON escapes on the user's machine (``len`` of the
#: text here is free); absent when the text holds a carriage return (the proxy then parses it).
CHARS_KEY = "cgpu_chars"
#: Stream messages from this many characters on carry their count (the proxy counts smaller
#: ones itself at no cost worth a metadata key).
CHARS_MIN = 4096


class Entry:
    """One recorded message. ``msg`` is None for a message too large to keep (a known gap);
    ``gap`` then says what it was (type, parent, comm, size), so the proxy can tell the user."""

    __slots__ = ("buffers", "channel", "gap", "msg", "msg_id", "size")

    def __init__(
        self,
        channel: str,
        msg_id: str,
        msg: dict[str, Any] | None,
        buffers: list[bytes],
        gap: dict[str, Any] | None = None,
    ) -> None:
        self.channel = channel
        self.msg_id = msg_id
        self.msg = msg
        self.buffers = buffers
        self.gap = gap
        self.size = ENTRY_OVERHEAD + sum(len(b) for b in buffers)
        if msg is not None:
            self.size += _text_size(msg.get("content"))


def _gap_summary(channel: str, msg: dict[str, Any], size: int) -> dict[str, Any]:
    """What the proxy tells the user about a message too large to keep: a few small fields."""
    header = msg.get("header") or {}
    parent = msg.get("parent_header") or {}
    content = msg.get("content") or {}
    return {
        "channel": channel,
        "msg_id": header.get("msg_id"),
        "msg_type": header.get("msg_type"),
        "parent_header": {k: parent[k] for k in ("msg_id", "msg_type", "session") if k in parent},
        "comm_id": content.get("comm_id") if isinstance(content, dict) else None,
        "bytes": size,
        SEQ_KEY: (msg.get("metadata") or {}).get(SEQ_KEY),
    }


def _text_size(content: Any) -> int:
    """A cheap estimate of a content's size: its strings, one level into ``data``."""
    if not isinstance(content, dict):
        return 0
    size = 0
    for value in content.values():
        if isinstance(value, str):
            size += len(value)
    data = content.get("data")
    if isinstance(data, dict):
        for value in data.values():
            if isinstance(value, str):
                size += len(value)
    return size


class Journal:
    """The ring of recent outgoing messages, and the control handler that hands them out."""

    def __init__(self, kernel: Any, max_messages: int, max_bytes: int) -> None:
        self.kernel = kernel
        self.session = kernel.session
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.entries: deque[Entry] = deque()
        self.total = 0
        self.evicted = dict.fromkeys(CHANNELS, 0)
        self.unrecorded = 0
        self.numbered = 0  # the last number given to an iopub message
        self.lock = threading.RLock()
        self.original_send = self.session.send

    def install(self) -> None:
        # Instance attributes shadow the class's method: every sender of this session (the
        # kernel, its output streams) goes through ``send`` below.
        self.session.send = self.send
        self.session._cgpu_journal = self
        self.kernel.control_handlers[REQUEST_TYPE] = self.answer

    def resize(self, max_messages: int, max_bytes: int) -> None:
        with self.lock:
            self.max_messages = max_messages
            self.max_bytes = max_bytes
            self._evict()

    def send(self, stream: Any, msg_or_type: Any, *args: Any, **kwargs: Any) -> Any:
        # Recording under the same lock as the send keeps the ring in the order messages
        # leave, whichever thread sends them.
        with self.lock:
            numbered = self.numbered
            if stream is not None and self._channel(stream) == "iopub":
                try:
                    msg_or_type, args, kwargs = self._numbered(msg_or_type, args, kwargs)
                except Exception:
                    self.unrecorded += 1  # unnumbered: the proxy cannot check what follows
            try:
                msg = self.original_send(stream, msg_or_type, *args, **kwargs)
            except BaseException:
                # Never sent: its number goes to the next one, or the proxy would wait for a
                # message that does not exist (no other number was given: the lock is held).
                self.numbered = numbered
                raise
            if isinstance(msg, dict) and stream is not None:  # None: built, not sent
                try:
                    self._record(stream, msg, args, kwargs)
                except Exception:
                    # Never break the kernel's own sending; the journal only admits a gap.
                    self.unrecorded += 1
            return msg

    def _numbered(
        self, msg_or_type: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[Any, tuple[Any, ...], dict[str, Any]]:
        """The send's arguments with the next number in the message's metadata (unchanged for
        a message about one of the proxy's own requests, which is not recorded either)."""
        # Session.send(stream, msg_or_type, content, parent, ident, buffers, track, header,
        # metadata); msg_or_type is a msg_type, or a message already built (its own parent and
        # metadata inside).
        if isinstance(msg_or_type, dict):
            parent = msg_or_type.get("parent_header")
        else:
            parent = (
                kwargs["parent"] if "parent" in kwargs else (args[1] if len(args) > 1 else None)
            )
        if isinstance(parent, dict):
            parent_header = parent.get("header", parent)
            parent_id = parent_header.get("msg_id") if isinstance(parent_header, dict) else None
            if isinstance(parent_id, str) and parent_id.startswith(INTERNAL_PREFIX):
                return msg_or_type, args, kwargs
        self.numbered += 1
        added: dict[str, Any] = {SEQ_KEY: self.numbered}
        if isinstance(msg_or_type, dict):
            header = msg_or_type.get("header")
            msg_type = header.get("msg_type") if isinstance(header, dict) else None
            content = msg_or_type.get("content")
        else:
            msg_type = msg_or_type
            content = kwargs["content"] if "content" in kwargs else (args[0] if args else None)
        if msg_type == "stream" and isinstance(content, dict):
            text = content.get("text")
            if isinstance(text, str) and len(text) >= CHARS_MIN and "\r" not in text:
                added[CHARS_KEY] = len(text)
        if isinstance(msg_or_type, dict):
            metadata = dict(msg_or_type.get("metadata") or {}, **added)
            return dict(msg_or_type, metadata=metadata), args, kwargs
        if len(args) > 6:
            given = list(args)
            given[6] = dict(given[6] or {}, **added)
            return msg_or_type, tuple(given), kwargs
        metadata = dict(kwargs.get("metadata") or {}, **added)
        return msg_or_type, args, dict(kwargs, metadata=metadata)

    def _record(
        self, stream: Any, msg: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        parent_id = (msg.get("parent_header") or {}).get("msg_id")
        if isinstance(parent_id, str) and parent_id.startswith(INTERNAL_PREFIX):
            return
        header = msg.get("header") or {}
        msg_id = header.get("msg_id")
        if not isinstance(msg_id, str):
            return
        # Session.send(stream, msg_or_type, content, parent, ident, buffers, ...)
        buffers = kwargs["buffers"] if "buffers" in kwargs else (args[3] if len(args) > 3 else None)
        if buffers is None:
            buffers = msg.get("buffers") or []
        channel = self._channel(stream)
        size = sum(memoryview(b).nbytes for b in buffers)
        if size > self.max_bytes // 4:
            entry = Entry(channel, msg_id, None, [], _gap_summary(channel, msg, size))
        else:
            kept = {k: msg.get(k) for k in ("header", "parent_header", "metadata", "content")}
            entry = Entry(channel, msg_id, kept, [bytes(b) for b in buffers])
        self.entries.append(entry)
        self.total += entry.size
        self._evict()

    def _evict(self) -> None:
        while self.entries and (
            len(self.entries) > self.max_messages or self.total > self.max_bytes
        ):
            gone = self.entries.popleft()
            self.total -= gone.size
            self.evicted[gone.channel] = self.evicted.get(gone.channel, 0) + 1

    def _channel(self, stream: Any) -> str:
        kernel = self.kernel
        if stream is not None and stream is getattr(kernel, "control_stream", None):
            return "control"
        if stream is not None and stream is getattr(kernel, "stdin_socket", None):
            return "stdin"
        if stream is not None and (
            stream is getattr(kernel, "iopub_socket", None)
            or stream is getattr(kernel, "iopub_thread", None)
            or type(stream).__name__ in ("IOPubThread", "BackgroundSocket")
        ):
            return "iopub"
        return "shell"

    def select(self, after: dict[str, Any]) -> tuple[list[Entry], dict[str, bool], int]:
        """Entries sent after ``after[channel]`` on each channel (gaps included), whether
        that is all, and the last iopub number given when they were chosen.

        A channel whose last message is not in the ring (evicted, or never seen by the proxy)
        gets all its entries; that is complete only if nothing of it was ever evicted.
        """
        with self.lock:
            entries = list(self.entries)
            evicted = dict(self.evicted)
            numbered = self.numbered
        start: dict[str, int] = {}
        for index, entry in enumerate(entries):
            if after.get(entry.channel) == entry.msg_id:
                start[entry.channel] = index
        chosen = [e for i, e in enumerate(entries) if i > start.get(e.channel, -1)]
        complete = {
            c: not self.unrecorded and (c in start or not evicted.get(c, 0)) for c in CHANNELS
        }
        for entry in chosen:
            if entry.msg is None:
                complete[entry.channel] = False
        return chosen, complete, numbered

    def answer(self, stream: Any, ident: Any, parent: dict[str, Any]) -> None:
        """The control handler for ``cgpu_journal_request``: the messages, in order, and a
        summary of each one too large to have been kept (``gaps``)."""
        content = parent.get("content") or {}
        after = content.get("after")
        chosen, complete, numbered = self.select(after if isinstance(after, dict) else {})
        messages = []
        gaps = []
        buffers: list[bytes] = []
        for entry in chosen:
            if entry.msg is None:
                gaps.append(entry.gap or {"channel": entry.channel, "msg_id": entry.msg_id})
                continue
            messages.append(dict(entry.msg, channel=entry.channel, buffers=len(entry.buffers)))
            buffers.extend(entry.buffers)
        reply = {
            "status": "ok",
            "messages": messages,
            "complete": complete,
            "gaps": gaps,
            SEQ_KEY: numbered,  # the last iopub number when the selection was made
        }
        try:
            self.session.send(stream, REPLY_TYPE, reply, parent, ident, buffers)
        except Exception as exc:
            # Say so at once rather than leave the proxy waiting for an answer that never comes.
            failed = {"status": "error", "ename": type(exc).__name__, "evalue": str(exc)}
            self.session.send(stream, REPLY_TYPE, failed, parent, ident)


def _waiting(stream: Any) -> int:
    """Characters an ipykernel output stream holds, not yet sent: ipykernel 7 keeps one buffer
    per parent (``_buffers``), ipykernel 6 one (``_buffer``).

    Read under the stream's ``_buffer_lock``: the kernel's IOPub thread swaps the buffers out
    under it and then *closes* the old ones, so buffers read without it may be closed by the
    time they are asked (``tell`` raised "I/O operation on closed file" in the cell of a loop
    printing fast). A buffer closed all the same holds nothing any more: 0."""
    lock = getattr(stream, "_buffer_lock", None)
    with lock if lock is not None else contextlib.nullcontext():
        buffers = getattr(stream, "_buffers", None)
        if isinstance(buffers, dict):
            held = list(buffers.values())
        else:
            buffer = getattr(stream, "_buffer", None)
            held = [buffer] if buffer is not None else []
        waiting = 0
        for buffer in held:
            with contextlib.suppress(ValueError):
                waiting += buffer.tell()
        return waiting


def bound_streams(limit: int) -> int:
    """Send the kernel's stdout and stderr once ``limit`` characters wait in them, instead of
    only every ``flush_interval`` (0.2 s); returns how many streams are bounded.

    ipykernel sends what a cell printed in that time as *one* stream message: a loop printing
    fast made it hundreds of MB, and every process on its way (the server, the proxy) held it
    whole (issue 19: the proxy's memory was at least that message's size, whatever its flow
    control). Bounded, the messages stay near ``limit`` and the proxy's flow control holds
    the kernel back. The write that crosses the limit flushes, which waits for the kernel's
    IOPub thread to send: a producer faster than the link is slowed, not buffered. Called
    again, only the limit changes. A stream that is not ipykernel's (replaced by a cell's
    capture) is left alone.
    """
    import sys

    bounded = 0
    streams: list[Any] = [sys.stdout, sys.stderr]
    for stream in streams:
        box = getattr(stream, "_cgpu_bound", None)
        if isinstance(box, list):
            box[0] = limit
            bounded += 1
            continue
        schedule = getattr(stream, "_schedule_flush", None)
        if not callable(schedule) or not hasattr(stream, "flush"):
            continue
        if not hasattr(stream, "_buffers") and not hasattr(stream, "_buffer"):
            continue
        box = [limit]

        def bounded_schedule(
            _schedule: Any = schedule, _stream: Any = stream, _box: list[int] = box
        ) -> None:
            if _waiting(_stream) > _box[0]:
                _stream.flush()
            else:
                _schedule()

        # ipykernel's ``write`` asks for a flush after each write (``_schedule_flush``): the
        # hook is there, not on ``write``, which IPython replaces around each cell (its tee
        # into the history). An instance attribute shadows the class's method.
        stream._schedule_flush = bounded_schedule
        stream._cgpu_bound = box
        bounded += 1
    return bounded


#: Characters an output stream may hold before it is sent (see ``bound_streams``).
STREAM_LIMIT = 1 << 20


def install(max_messages: int, max_bytes: int, stream_limit: int = STREAM_LIMIT) -> str:
    """Install the journal in the running ipykernel (again: resize it), and bound its output
    streams (``bound_streams``; 0: not bounded); says what it did."""
    from IPython import get_ipython

    shell = get_ipython()
    kernel = getattr(shell, "kernel", None)
    if kernel is None or not hasattr(kernel, "control_handlers"):
        raise RuntimeError("not an ipykernel: no output journal")
    if stream_limit > 0:
        bound_streams(stream_limit)
    existing = getattr(kernel.session, "_cgpu_journal", None)
    if existing is not None and hasattr(existing, "resize"):
        existing.resize(max_messages, max_bytes)
        kernel.control_handlers[REQUEST_TYPE] = existing.answer
        return "resized"
    Journal(kernel, max_messages, max_bytes).install()
    return "installed"
