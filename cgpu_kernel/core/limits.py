"""Output limits that protect the frontend and lose nothing: pure decisions, no I/O.

Jupyter's own rate limit drops output; gateway mode drops any message over 10 MiB; a frontend
handed 500 MB freezes. Here, per execution (per parent ``msg_id``):

* Stream text counts against ``max_stream_bytes`` -- but only text on *finished* lines, after
  carriage returns are applied: a progress bar redrawing one line with ``\\r`` never uses the
  budget, and its updates are always shown.
* Rich output (``display_data``, ``execute_result``, ``update_display_data``) counts against
  ``max_rich_bytes``; one item bigger than ``max_rich_item_bytes`` is replaced by a placeholder.
* ``clear_output`` resets what the cell has shown (live plots redraw forever within budget).
* Past a budget the frontend keeps the head, gets one notice saying how much was held back and
  where, and at the end of the cell the last lines. Everything held back is spooled -- complete,
  in order -- by the shell that carries out :class:`Spool` decisions.

:class:`Coalescer` merges consecutive stream messages of one cell (byte-exact, in order) so a
burst reaches the frontend as few messages; the shell flushes it on a short timer.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from cgpu_kernel.core.wire import JsonDict, Message, make_header

RICH_TYPES = ("display_data", "execute_result", "update_display_data")
#: In raw JSON, an escaped backslash or carriage return: the two escapes that stop the
#: one-pass bound on a stream's text (below). A compiled search jumps from backslash to
#: backslash (~3x faster than CPython's two-byte substring search for ``b"\\r"``).
_ESCAPED_BACKSLASH_OR_CR = re.compile(rb"\\[\\r]")
_ESCAPED_CR = re.compile(rb"\\r")
#: Stream messages from this size on are counted from their raw JSON without parsing it
#: (``_text_bound``): the JSON around the text adds ~30 bytes, under 0.4% of the count.
UNPARSED_STREAM = 8 * 1024
#: Stream messages from this size on are split and spooled from their raw JSON a slice at a
#: time (``_stream_slices``): ipykernel sends 0.2 s of output as one message, which a fast
#: producer makes hundreds of MB, and its text parsed whole, cut and encoded was five copies.
SLICED_STREAM = 1024 * 1024
SPOOL_SLICE = 1024 * 1024
#: The content ipykernel's ``OutStream`` writes: ``{"name": "stdout", "text": "..."}``.
_STREAM_CONTENT = re.compile(rb'\{\s*"name"\s*:\s*"(stdout|stderr)"\s*,\s*"text"\s*:\s*"')
_BACKSLASH = 0x5C
#: ``\\r`` or ``\\u`` anywhere in the raw JSON (``_stream_text_span``).
_ESCAPED_CR_OR_U = re.compile(rb"\\[ru]")
#: A stream content's end: its text's closing quote, the object's brace.
_CONTENT_END = re.compile(rb'"\s*\}\s*\Z')
#: A large stream content is a view of the WebSocket frame it came in (``core.wire``): read in
#: place, not copied out (one copy of a 100 MB message less while it is spooled).
Raw = bytes | memoryview
BINARY_MIME_EXTENSIONS = {
    "image/png": "png",
    "image/jpeg": "jpg",
    "image/gif": "gif",
    "application/pdf": "pdf",
}
TEXT_MIME_EXTENSIONS = {
    "text/html": "html",
    "image/svg+xml": "svg",
    "text/plain": "txt",
    "application/json": "json",
    "text/latex": "tex",
    "text/markdown": "md",
}


@dataclass(frozen=True)
class Show:
    """Publish this message to the frontends."""

    msg: Message


#: What a :class:`Spool` decision appends: bytes, or pieces of bytes produced as they are
#: written (a huge stream message's text, decoded a slice at a time, never whole).
SpoolData = bytes | Iterable[bytes]


@dataclass(frozen=True)
class Spool:
    """Append ``data`` to the spool file ``name`` (relative to the spool folder). Pieces given
    as an iterable are counted against the cell as the shell writes them, so the shell writes
    each decision before it hands the limiter the next message (``proxy.kernel`` does)."""

    name: str
    data: SpoolData


Decision = Show | Spool


@dataclass(frozen=True)
class SpoolFailure:
    """A :class:`Spool` decision the shell could not carry out in full (``proxy.spool`` makes
    these; :meth:`OutputLimiter.spool_failed` turns them into what the cell is told).

    ``saved`` of the write's bytes reached the file and ``lost`` did not, because of ``reason``
    (the OS's words and the path: a full disk, no write permission, a folder that cannot be
    made). ``first`` is False for a write to a file that had already failed (not attempted).
    """

    name: str
    saved: int
    lost: int
    reason: str
    first: bool = True


class OutputOptions(Protocol):
    """The options :meth:`Budgets.from_options` reads (``proxy.options.ProxyKernel`` has them);
    a protocol, so the sans-I/O core does not import the traitlets configuration."""

    @property
    def max_output_bytes(self) -> int: ...
    @property
    def max_rich_output_bytes(self) -> int: ...
    @property
    def max_rich_item_bytes(self) -> int: ...
    @property
    def output_tail_lines(self) -> int: ...


@dataclass(frozen=True)
class Budgets:
    max_stream_bytes: int = 2 * 1024 * 1024
    max_rich_bytes: int = 20 * 1024 * 1024
    max_rich_item_bytes: int = 10 * 1024 * 1024
    tail_lines: int = 20
    tail_bytes: int = 16 * 1024

    @classmethod
    def from_options(cls, options: OutputOptions) -> Budgets:
        """The budgets the user configured (``--max-output-bytes`` and friends); called by
        ``proxy.kernel`` when it builds the run's :class:`OutputLimiter`."""
        return cls(
            max_stream_bytes=options.max_output_bytes,
            max_rich_bytes=options.max_rich_output_bytes,
            max_rich_item_bytes=options.max_rich_item_bytes,
            tail_lines=options.output_tail_lines,
        )


#: Message metadata key on every notice: ``cgpu-kernel run`` reads it to keep the proxy's own
#: lines out of the program's stdout/stderr (its value says what kind of notice it is).
NOTICE_METADATA = "cgpu_kernel_notice"
_NOTICE_KEY = NOTICE_METADATA.encode()


def stream_notice(
    session: str,
    parent_header: JsonDict,
    text: str,
    name: str = "stderr",
    newline: bool = True,
    detail: JsonDict | None = None,
) -> Message:
    """A line from the proxy itself in a cell's output: an iopub ``stream`` message whose parent
    is ``parent_header`` (the cell's request). The one builder for every notice: the relay's
    (waiting, reconnecting, lost) and the output limits' (held back, spooled, the tail).
    ``detail`` goes into the metadata under :data:`NOTICE_METADATA` (default: kind "notice")."""
    header = make_header("stream", session)
    content = {"name": name, "text": text + ("\n" if newline else "")}
    metadata = {NOTICE_METADATA: detail or {"kind": "notice"}}
    return Message.build("iopub", header, parent_header, metadata, content)


def visible_size(committed: int, line: int, text: str) -> tuple[int, int]:
    """What a terminal shows after ``text``: (characters on finished lines, on the open line).

    ``committed`` and ``line`` are the sizes before ``text``. A carriage return rewinds the open
    line, so a progress bar redrawing itself keeps the total where it is.
    """
    if "\r" not in text:  # the common case, without building a list of lines
        end = text.rfind("\n")
        if end < 0:
            return committed, line + len(text)
        return committed + line + end + 1, len(text) - end - 1
    segments = text.split("\n")
    for segment in segments[:-1]:
        committed += (
            len(segment.rsplit("\r", 1)[-1]) if "\r" in segment else line + len(segment)
        ) + 1
        line = 0
    last = segments[-1]
    line = len(last.rsplit("\r", 1)[-1]) if "\r" in last else line + len(last)
    return committed, line


def human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"


@dataclass
class _Cell:
    """What one execution has shown and held back so far."""

    key: str
    parent_header: JsonDict = field(default_factory=dict)  # the cell's request, for notices
    stream_shown: int = 0  # characters on finished lines shown
    open_line: int = 0  # characters on the line still being written
    rich_shown: int = 0
    stream_held: int = 0  # bytes of stream output held back
    holding: bool = False  # once stream output is held back, all later stream output is too
    held_bytes: int = 0
    held_items: int = 0
    told: bool = False
    tail: str = ""
    rich_count: int = 0
    files: list[str] = field(default_factory=list)
    spooled: int = 0  # bytes handed to the spool (file bytes: rich output decoded)
    lost: int = 0  # of those, bytes the spool could not write
    lost_reasons: dict[str, str] = field(default_factory=dict)  # file name -> why


class OutputLimiter:
    """Decides, message by message, what reaches the frontend and what is spooled."""

    def __init__(self, budgets: Budgets, session: str, spool_location: str = "the spool") -> None:
        self.budgets = budgets
        self.session = session
        self.spool_location = spool_location
        self._cells: dict[str, _Cell] = {}

    def process(self, msg: Message) -> list[Decision]:
        parent = msg.parent_id
        if msg.channel != "iopub" or parent is None:
            return [Show(msg)]
        msg_type = msg.msg_type
        if msg_type == "stream":
            return self._stream(self._cell(parent, msg), msg)
        if msg_type in RICH_TYPES:
            return self._rich(self._cell(parent, msg), msg)
        if msg_type == "clear_output":
            cell = self._cells.get(parent)
            if cell is not None:
                cell.stream_shown = cell.rich_shown = cell.open_line = 0
            return [Show(msg)]
        if msg_type == "status" and msg.content.get("execution_state") == "idle":
            cell = self._cells.pop(parent, None)
            return [*self._summary(cell, msg), Show(msg)] if cell else [Show(msg)]
        return [Show(msg)]

    def _cell(self, parent: str, output: Message) -> _Cell:
        cell = self._cells.get(parent)
        if cell is None:
            cell = self._cells[parent] = _Cell(
                key=parent[:24].replace("/", "_"), parent_header=output.parent_header
            )
        return cell

    # --- streams --------------------------------------------------------------------------

    def _stream(self, cell: _Cell, msg: Message) -> list[Decision]:
        budget = self.budgets.max_stream_bytes
        part = msg.parts[3]
        raw: Raw = part if isinstance(part, bytes | memoryview) else msg.raw(3)
        chars = msg.text_chars
        if chars is not None and 0 <= chars <= len(raw):
            # the kernel's own count (its journal agent's; a character is a byte or more of
            # JSON, so a larger one is not believed): no pass over the bytes here
            bound: int | None = chars
        else:
            # A small message is parsed: the JSON around its text would count for much of it.
            bound = _text_bound(raw) if len(raw) >= UNPARSED_STREAM else None
        if (
            bound is not None
            and not cell.holding
            and cell.stream_shown + cell.open_line + bound <= budget
        ):
            cell.stream_shown += bound
            return [Show(msg)]
        if len(raw) >= SLICED_STREAM:
            span = _stream_text_span(raw)
            if span is not None:
                return self._sliced_stream(cell, msg, raw, *span)
        text = str(msg.content.get("text", ""))
        name = str(msg.content.get("name", "stdout"))
        committed, line = visible_size(cell.stream_shown, cell.open_line, text)
        if not cell.holding and committed + line <= budget:
            cell.stream_shown, cell.open_line = committed, line
            return [Show(msg)]
        decisions: list[Decision] = []
        shown, held = "", text
        if not cell.holding:
            shown, held = _split_to_fit(text, budget - cell.stream_shown - cell.open_line)
            cell.stream_shown, cell.open_line = visible_size(
                cell.stream_shown, cell.open_line, shown
            )
        elif "\n" not in text and "\r" in text:
            shown = text  # a progress bar keeps moving after the limit (and is spooled too)
        if shown:
            decisions.append(Show(msg.with_content({"name": name, "text": shown})))
        if held:
            data = held.encode("utf-8")
            spool = self._spool_name(cell, name)
            cell.holding = True
            cell.held_bytes += len(data)
            cell.stream_held += len(data)
            cell.spooled += len(data)
            self._remember_tail(cell, held)
            if not cell.told:
                cell.told = True
                decisions.append(Show(self._held_notice(msg, spool)))
            # after the notice: a write that fails is told right after it, not before
            decisions.append(Spool(spool, data))
        return decisions

    def _sliced_stream(
        self, cell: _Cell, msg: Message, raw: Raw, name: str, start: int, end: int
    ) -> list[Decision]:
        """A big stream message past the budget, from its raw JSON (no carriage return or
        ``\\u`` escape in it, see ``_stream_text_span``): the head that fits is decoded and
        shown, the rest is spooled as it is decoded, one slice at a time (``raw``: the
        content's bytes, as :meth:`_stream` got them)."""
        slices = _stream_slices(raw, start, end)
        decisions: list[Decision] = []
        first = ""
        if not cell.holding:
            room = self.budgets.max_stream_bytes - cell.stream_shown - cell.open_line
            head: list[str] = []
            size = 0
            for piece in slices:
                head.append(piece)
                size += len(piece)
                if size > room:
                    break
            text = "".join(head)
            if size <= room:  # it fits once decoded (multi-byte characters): shown whole
                cell.stream_shown, cell.open_line = visible_size(
                    cell.stream_shown, cell.open_line, text
                )
                return [Show(msg)]
            shown, first = _split_to_fit(text, room)
            cell.stream_shown, cell.open_line = visible_size(
                cell.stream_shown, cell.open_line, shown
            )
            if shown:
                decisions.append(Show(msg.with_content({"name": name, "text": shown})))
        cell.holding = True
        spool = self._spool_name(cell, name)
        if not cell.told:
            cell.told = True
            decisions.append(Show(self._held_notice(msg, spool)))
        decisions.append(Spool(spool, self._held_pieces(cell, itertools.chain((first,), slices))))
        return decisions

    def _held_pieces(self, cell: _Cell, texts: Iterator[str]) -> Iterator[bytes]:
        """The held-back text as UTF-8, counted against ``cell`` as the spool takes it."""
        for text in texts:
            if not text:
                continue
            data = text.encode("utf-8")
            cell.held_bytes += len(data)
            cell.stream_held += len(data)
            cell.spooled += len(data)
            self._remember_tail(cell, text)
            yield data

    def _held_notice(self, msg: Message, spool: str) -> Message:
        return self._notice(
            msg,
            f"[cgpu-kernel: this cell's output passed {human(self.budgets.max_stream_bytes)};"
            f" the rest is saved to {self._where(spool)} and its last lines are shown when the"
            " cell ends. `cgpu-kernel outputs` lists saved outputs.]",
        )

    def _remember_tail(self, cell: _Cell, text: str) -> None:
        """Keep the end of what was held back: at most ``tail_bytes`` characters."""
        cell.tail = (cell.tail + text[-self.budgets.tail_bytes :])[-self.budgets.tail_bytes :]

    # --- rich output ----------------------------------------------------------------------

    def _rich(self, cell: _Cell, msg: Message) -> list[Decision]:
        size = msg.size
        data = msg.content.get("data")
        too_big = size > self.budgets.max_rich_item_bytes
        over = cell.rich_shown + size > self.budgets.max_rich_bytes
        if not too_big and not over:
            cell.rich_shown += size
            return [Show(msg)]
        if not isinstance(data, dict):
            data = {}
        cell.rich_count += 1
        decisions: list[Decision] = []
        names = []
        for mime, value in sorted(data.items()):
            name, payload = self._rich_file(cell, mime, value)
            names.append(name)
            cell.files.append(name)
            cell.spooled += len(payload)
            decisions.append(Spool(name, payload))
        cell.held_bytes += size
        cell.held_items += 1
        reason = (
            f"bigger than the {human(self.budgets.max_rich_item_bytes)} limit for one output"
            if too_big
            else f"past this cell's {human(self.budgets.max_rich_bytes)} limit for rich output"
        )
        mimes = ", ".join(sorted(data)) or "output"
        placeholder = (
            f"[cgpu-kernel: {mimes} output of {human(size)} held back ({reason}); saved to"
            f" {', '.join(self._where(n) for n in names) or 'nowhere (it had no data)'}]"
        )
        content: JsonDict = {
            "data": {"text/plain": placeholder},
            "metadata": {},
            "transient": msg.content.get("transient", {}),
        }
        if msg.msg_type == "execute_result":
            content["execution_count"] = msg.content.get("execution_count")
        decisions.append(Show(msg.with_content(content)))
        return decisions

    def _rich_file(self, cell: _Cell, mime: str, value: object) -> tuple[str, bytes]:
        stem = f"{cell.key}-{cell.rich_count}"
        if mime in BINARY_MIME_EXTENSIONS and isinstance(value, str):
            try:
                return f"{stem}.{BINARY_MIME_EXTENSIONS[mime]}", base64.b64decode(value)
            except ValueError:
                pass
        extension = TEXT_MIME_EXTENSIONS.get(mime, "json")
        payload = value if isinstance(value, str) else json.dumps(value)
        return f"{stem}.{extension}", payload.encode("utf-8")

    # --- the end of a cell ------------------------------------------------------------------

    def _summary(self, cell: _Cell, idle: Message) -> list[Decision]:
        if cell.held_bytes == 0:
            return []
        parts = [f"[cgpu-kernel: {human(cell.held_bytes)} of output held back"]
        if cell.held_items:
            parts.append(f" ({cell.held_items} rich output(s))")
        if cell.lost:
            parts.append(self._losses(cell))
        else:
            files = ", ".join(self._where(name) for name in cell.files)
            parts.append(f", saved in full to {files}." if files else ".")
        lines = cell.tail.splitlines(keepends=True)
        if len(lines) > 1 and len(cell.tail) >= self.budgets.tail_bytes:
            lines = lines[1:]  # the first line was cut by the character budget
        tail = "".join(lines[-self.budgets.tail_lines :])
        if tail:
            count = len(lines[-self.budgets.tail_lines :])
            parts.append(f" The last {count} line(s):]\n")
        else:
            parts.append("]\n")
        detail = {
            "kind": "held_back",
            "held_bytes": cell.held_bytes,
            "files": [self._where(name) for name in cell.files],
        }
        notice = self._notice(idle, "".join(parts) + tail, "stdout", newline=False, detail=detail)
        return [Show(notice)]

    def _losses(self, cell: _Cell) -> str:
        """What the summary says when the spool failed: exact bytes saved and lost, each
        failed file and why, so the user never reads "saved in full" for bytes not on disk."""
        saved = cell.spooled - cell.lost
        failed = "; ".join(
            f"{self._where(name)}: {reason}" for name, reason in cell.lost_reasons.items()
        )
        kept = [self._where(name) for name in cell.files if name not in cell.lost_reasons]
        intact = f" ({', '.join(kept)} in full)" if kept else ""
        return (
            f"; {human(saved)} ({saved} bytes) of it saved{intact}, {human(cell.lost)}"
            f" ({cell.lost} bytes) LOST because the spool could not be written: {failed}."
            " A failed file keeps the output's first bytes, in order."
        )

    def spool_failed(self, failure: SpoolFailure) -> list[Decision]:
        """The shell could not write a :class:`Spool` decision in full: count what was lost
        against its cell and, the first time in that cell, tell it at once (the summary at its
        end gives the totals). Called by the relay for ``proxy.kernel``."""
        cell = next((c for c in self._cells.values() if failure.name in c.files), None)
        if cell is None:
            return []  # the cell already ended: nothing of it is spooled after its summary
        cell.lost += failure.lost
        first_in_cell = not cell.lost_reasons
        cell.lost_reasons.setdefault(failure.name, failure.reason)
        if not first_in_cell or not failure.first:
            return []
        text = (
            f"[cgpu-kernel: could not save held-back output to {self._where(failure.name)}:"
            f" {failure.reason}. Output that cannot be saved is lost; the summary at the end of"
            " the cell says how much, and its last lines are still shown.]"
        )
        return [Show(stream_notice(self.session, cell.parent_header, text))]

    def _spool_name(self, cell: _Cell, stream: str) -> str:
        name = f"{cell.key}-{stream}.txt"
        if name not in cell.files:
            cell.files.append(name)
        return name

    def _where(self, name: str) -> str:
        return f"{self.spool_location}/{name}"

    def _notice(
        self,
        output: Message,
        text: str,
        name: str = "stderr",
        newline: bool = True,
        detail: JsonDict | None = None,
    ) -> Message:
        """A notice in the cell that ``output`` belongs to (its parent is the cell's request)."""
        return stream_notice(self.session, output.parent_header, text, name, newline, detail)


def _count(raw: Raw, needle: bytes) -> int:
    """``raw.count(needle)`` for a view too (a slice at a time, each overlapping the next by
    what the needle needs; the needles here cannot overlap themselves)."""
    if isinstance(raw, bytes):
        return raw.count(needle)
    extra = len(needle) - 1
    return sum(
        bytes(raw[at : at + SPOOL_SLICE + extra]).count(needle)
        for at in range(0, len(raw), SPOOL_SLICE)
    )


def _text_bound(raw: Raw) -> int | None:
    """An upper bound on the characters of a stream's text, read from its raw JSON without
    parsing it (the hot path: one pass over the bytes, two when they hold any escape); None
    when a carriage return must be applied (the text must be parsed).

    Every JSON escape starts with a backslash and spells one character in two bytes or more,
    and a UTF-8 character is one byte or more: the raw length less one byte per backslash
    bounds the text from above, unless a backslash is itself escaped (two backslashes, one
    character); then one byte per escaped newline is taken off instead (~3x slower to count).
    """
    escapes = _count(raw, b"\\")
    if escapes == 0:
        return len(raw)
    special = _ESCAPED_BACKSLASH_OR_CR.search(raw)
    if special is None:
        return len(raw) - escapes
    if special.group() == b"\\r" or _ESCAPED_CR.search(raw, special.start()) is not None:
        return None
    return len(raw) - _count(raw, b"\\n")


def _stream_text_span(raw: Raw) -> tuple[str, int, int] | None:
    """Where a stream message's text lies in its raw JSON content: (stream name, start, end),
    when the content is ipykernel's ``{"name": ..., "text": "..."}`` and its text has no
    carriage return (which changes what counts against the budget) and no ``\\u`` escape
    (a surrogate pair could be cut in two); None otherwise (the message is parsed)."""
    if _ESCAPED_CR_OR_U.search(raw) is not None:
        return None
    match = _STREAM_CONTENT.match(raw)
    closing = _CONTENT_END.search(raw, max(0, len(raw) - 256))
    if match is None or closing is None or closing.start() < match.end():
        return None
    return match.group(1).decode("ascii"), match.end(), closing.start()


def _stream_slices(raw: Raw, start: int, end: int) -> Iterator[str]:
    """The JSON string ``raw[start:end]`` (without its quotes) decoded about
    :data:`SPOOL_SLICE` bytes at a time, each slice cut between two characters and outside an
    escape. A slice that is not valid JSON (a malformed message) is kept as its UTF-8 text,
    undecoded, so nothing is lost."""
    while start < end:
        stop = min(start + SPOOL_SLICE, end)
        if stop < end:
            cut = stop
            while cut > start and raw[cut] & 0xC0 == 0x80:
                cut -= 1  # not inside a UTF-8 character
            if cut == start:  # a slice shorter than one character: take the whole character
                cut = stop
                while cut < end and raw[cut] & 0xC0 == 0x80:
                    cut += 1
            stop = cut
            low = max(start, stop - 2)
            found = bytes(raw[low:stop]).rfind(b"\\")
            back = low + found if found >= 0 else -1
            if back >= 0:  # an escape may straddle the cut: cut before its run of backslashes
                while back > start and raw[back - 1] == _BACKSLASH:
                    back -= 1
                if back > start:
                    stop = back
                else:  # backslashes from the start: take the run (and what its last escapes)
                    stop = start
                    while stop < end and raw[stop] == _BACKSLASH:
                        stop += 1
                    stop = min(end, stop + (stop - start) % 2)
        piece = raw[start:stop]
        try:
            text = json.loads(b'"' + piece + b'"')
        except ValueError:
            text = str(piece, "utf-8", "replace")
        yield str(text)
        start = stop


def _split_to_fit(text: str, room: int) -> tuple[str, str]:
    """Cut ``text`` after the last whole line that fits in ``room`` characters.

    One enormous line is cut inside, so the frontend still sees its start.
    """
    if room <= 0:
        return "", text
    if len(text) <= room:
        return text, ""
    last = text.rfind("\n", 0, room)
    cut = last + 1 if last >= 0 else room
    return text[:cut], text[cut:]


#: Stream messages this big are already few: published as they are, never parsed to merge.
UNMERGED = 64 * 1024


class Coalescer:
    """Merges consecutive stream messages of the same cell and stream name, byte-exact."""

    def __init__(self, max_bytes: int = 256 * 1024) -> None:
        self.max_bytes = max_bytes
        self._pending: Message | None = None
        self._texts: list[str] = []
        self._size = 0
        self.merged = 0

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def add(self, msg: Message) -> list[Message]:
        """Messages to publish now (in order); a stream message may wait for its neighbours."""
        if (
            msg.channel != "iopub"
            or msg.msg_type != "stream"
            or len(msg.parts[3]) >= UNMERGED
            or _NOTICE_KEY in msg.raw(2)  # a notice is never merged into output
        ):
            return [*self.flush(), msg]  # big ones go as they are, without parsing them
        out: list[Message] = []
        first = self._pending
        if first is not None and (
            first.parent_id != msg.parent_id or first.content.get("name") != msg.content.get("name")
        ):
            out = self.flush()
        text = str(msg.content.get("text", ""))
        if self._pending is None:
            self._pending = msg
        else:
            self.merged += 1
        self._texts.append(text)
        self._size += len(text)
        if self._size >= self.max_bytes:
            out.extend(self.flush())
        return out

    def flush(self) -> list[Message]:
        first = self._pending
        if first is None:
            return []
        texts = self._texts
        self._pending, self._texts, self._size = None, [], 0
        if len(texts) == 1:
            return [first]
        return [first.with_content({"name": first.content.get("name"), "text": "".join(texts)})]
