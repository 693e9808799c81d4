"""The proxy's side of the output journal: the messages it sends, and reading the answers.

``journal_agent`` runs inside the remote ipykernel and keeps what the kernel sent; after a
reconnection the proxy asks it for everything after the last message it received on each
channel. This module builds those requests (all with ``msg_id``\\ s starting ``cgpu-internal-``,
which the agent never records and the proxy never shows a frontend), tracks the last message
seen per channel, and turns an answer back into :class:`~cgpu_kernel.core.wire.Message`\\ s.

Sans-I/O: nothing here sends or waits; ``proxy.recovery`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from cgpu_kernel.core.journal_agent import (
    CHANNELS,
    CHARS_KEY,
    INTERNAL_PREFIX,
    REQUEST_TYPE,
    SEQ_KEY,
)
from cgpu_kernel.core.wire import Buffer, JsonDict, Message, make_header, new_id
from cgpu_kernel.exceptions import MalformedMessageError


def is_internal(msg: Message) -> bool:
    """Does ``msg`` answer (or report on) one of the proxy's own requests?"""
    parent_id = msg.parent_id
    return parent_id is not None and parent_id.startswith(INTERNAL_PREFIX)


def _request(channel: str, msg_type: str, session: str, content: JsonDict) -> Message:
    header = make_header(msg_type, session)
    header["msg_id"] = INTERNAL_PREFIX + new_id()
    return Message.build(channel, header, {}, {}, content)


def kernel_info_request(session: str) -> Message:
    """Asked first, to learn whether the remote kernel is an ipykernel that can hold a journal."""
    return _request("shell", "kernel_info_request", session, {})


def can_hold_journal(kernel_info: JsonDict) -> bool:
    """Only an IPython kernel runs the agent (it is Python, and it uses ipykernel's internals)."""
    language = kernel_info.get("language_info")
    name = language.get("name") if isinstance(language, dict) else None
    return name == "python" and kernel_info.get("implementation") == "ipython"


def agent_source() -> str:
    return resources.files(__package__).joinpath("journal_agent.py").read_text("utf-8")


def install_request(session: str, max_messages: int, max_bytes: int) -> Message:
    """A silent ``execute_request`` that installs the agent in a namespace of its own.

    Silent and without history: no execution count, no ``In[]`` entry, nothing in the user's
    variables. It goes out before any queued cell, so the first cell is covered too.
    """
    source = agent_source() + f"\n_outcome = install({max_messages:d}, {max_bytes:d})\n"
    code = (
        f"exec(compile({source!r}, '<cgpu-kernel journal>', 'exec'),"
        " {'__name__': 'cgpu_kernel_journal'})"
    )
    return silent_execute_request(session, code)


def silent_execute_request(session: str, code: str) -> Message:
    """An internal ``execute_request`` for ``code``: silent, no history, no stdin, its
    ``msg_id`` marked internal so its reply never reaches a frontend (the journal's install,
    ``core.kernel_options``' settings)."""
    content = {
        "code": code,
        "silent": True,
        "store_history": False,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": False,
    }
    return _request("shell", "execute_request", session, content)


def control_probe_request(session: str) -> Message:
    """A ``kernel_info_request`` on control, sent right behind a journal request.

    A kernel answers its control messages one at a time, in order, and sends no reply to a
    type it has no handler for (ipykernel's ``dispatch_control`` logs "UNKNOWN CONTROL MESSAGE
    TYPE" and moves on), nor does a gateway that filters types it does not know pass the request
    on. So a probe's reply that comes while the journal request before it has none proves the
    journal will never answer; a kernel merely too busy answers neither."""
    return _request("control", "kernel_info_request", session, {})


def journal_request(session: str, after: dict[str, str | None]) -> Message:
    """Ask for every message sent after ``after[channel]`` (None: all it has) on each channel."""
    return _request("control", REQUEST_TYPE, session, {"after": dict(after)})


class LastSeen:
    """The last message the proxy received from the remote on each channel."""

    def __init__(self) -> None:
        self._last: dict[str, str | None] = dict.fromkeys(CHANNELS)

    def saw(self, msg: Message) -> None:
        if msg.channel in self._last:
            self._last[msg.channel] = msg.msg_id

    def snapshot(self) -> dict[str, str | None]:
        return dict(self._last)


_SEQ_BYTES = f'"{SEQ_KEY}"'.encode()


def sequence_number(msg: Message) -> int | None:
    """The journal agent's number on an iopub message (None: unnumbered, e.g. a kernel with no
    agent, or a message about one of the proxy's own requests). The metadata is parsed only
    when its raw bytes name the key, so unnumbered traffic costs a substring search."""
    if msg.channel != "iopub" or _SEQ_BYTES not in msg.raw(2):
        return None
    return _number(msg.metadata.get(SEQ_KEY))


def without_sequence_number(msg: Message) -> Message:
    """``msg`` as the kernel meant it, without the agent's number and character count
    (frontends never see them); the count, an int, is kept as ``text_chars`` for the output
    limits."""
    if _SEQ_BYTES not in msg.raw(2):
        return msg
    metadata = {k: v for k, v in msg.metadata.items() if k not in (SEQ_KEY, CHARS_KEY)}
    stripped = msg.with_metadata(metadata)
    chars = msg.metadata.get(CHARS_KEY)
    if type(chars) is int:  # not a bool, not a float: the agent writes len(text)
        stripped.text_chars = chars
    return stripped


class OutputSequence:
    """Which numbered iopub messages of the remote kernel the proxy has delivered, in order, and
    which went missing: the evidence behind "nothing was lost".

    The journal agent numbers every iopub message it records (1, 2, 3, ...). A server that falls
    behind drops iopub messages at ZMQ's high-water mark with no sign on the connection, at any
    moment (while stopped, while it catches up after, under a stop too short to notice); the
    next number that arrives shows the gap. The supervisor asks :meth:`gap_before` of each
    message before delivering it; a gap holds the message (and what follows) while the journal
    is asked for what is missing, delivered in order; :meth:`settle` then counts what is still
    missing before the message that showed the gap as lost, so the same gap is never asked
    about twice. Sans-I/O: it decides, ``proxy.supervisor`` asks and waits.
    """

    def __init__(self) -> None:
        #: the number expected next (None: no numbered message seen yet on this kernel)
        self.expected: int | None = None
        #: numbered messages known lost and not yet told (taken by :meth:`take_lost`)
        self.lost = 0
        # numbers of messages the journal named as too large to keep: told on their own
        # (``Relay.lost_messages``), so not counted again as gaps
        self._excused: set[int] = set()

    @property
    def numbered(self) -> bool:
        """Whether this kernel numbers its messages (then gaps are seen as they happen)."""
        return self.expected is not None

    def gap_before(self, number: int | None) -> int:
        """How many numbered messages are missing just before the one numbered ``number``
        (0: none, it is unnumbered, or it came late, after its successors)."""
        if number is None or self.expected is None:
            return 0
        return max(0, number - self.expected)

    def delivered(self, number: int | None) -> None:
        """The message numbered ``number`` reached the relay (any gap before it is lost)."""
        if number is None:
            return
        if self.expected is None:
            self.expected = number + 1  # the first one seen is where checking starts
            return
        self._advance(number)
        self.expected = max(self.expected, number + 1)

    def settle(self, number: int | None) -> None:
        """What the journal could give before ``number`` has been delivered: whatever is still
        missing before it is lost (and no longer a gap to ask about)."""
        if number is None or self.expected is None:
            return
        self._advance(number)

    def excuse(self, numbers: list[int]) -> None:
        """These numbers are accounted for otherwise (too large to keep: told by name)."""
        self._excused.update(numbers)

    def _advance(self, number: int) -> None:
        """Count the numbers from ``expected`` to before ``number`` as lost (the excused
        aside), and expect ``number`` next."""
        if self.expected is None:
            return
        missing = number - self.expected
        if missing > 0:
            excused = {n for n in self._excused if self.expected <= n < number}
            self.lost += missing - len(excused)
            self.expected = number
        self._excused = {n for n in self._excused if n >= self.expected}

    def covers(self, upto: int | None) -> bool:
        """Whether everything numbered up to ``upto`` (a journal answer's last number) has been
        delivered, or told lost: then no gap hides at the end, where nothing follows to show it.
        """
        return upto is None or self.expected is None or self.expected > upto

    def take_lost(self) -> int:
        """The count of messages lost since the last call (the user is told of each once)."""
        lost, self.lost = self.lost, 0
        return lost


def recovered_messages(reply: Message) -> tuple[list[Message], bool]:
    """The messages in a journal reply, in the order the kernel sent them, and whether that is
    everything after what the proxy had (False: the ring had forgotten some, or some were too
    large to keep).

    Raises :class:`MalformedMessageError` for an answer of any other shape, and only that:
    JSON nested too deeply is caught where it is decoded (``wire``)."""
    content = reply.content
    if content.get("status") != "ok":
        raise MalformedMessageError(f"the journal answered {content.get('status')!r}")
    entries = content.get("messages")
    complete = content.get("complete")
    if not isinstance(entries, list) or not isinstance(complete, dict):
        raise MalformedMessageError("the journal's answer lacks messages or completeness")
    buffers: list[Buffer] = list(reply.buffers)
    messages: list[Message] = []
    position = 0
    for entry in entries:
        if not isinstance(entry, dict):
            raise MalformedMessageError("a journal entry is not an object")
        count = entry.get("buffers", 0)
        channel = entry.get("channel")
        header = entry.get("header")
        if (
            not isinstance(count, int)
            or isinstance(count, bool)
            or count < 0
            or channel not in CHANNELS
            or not isinstance(header, dict)
        ):
            # A negative count would hand the next entries buffers that are not theirs.
            raise MalformedMessageError("a journal entry lacks its channel, header or buffers")
        if position + count > len(buffers):
            raise MalformedMessageError("a journal entry names buffers the answer does not carry")
        messages.append(
            Message.build(
                str(channel),
                header,
                _dict(entry.get("parent_header")),
                _dict(entry.get("metadata")),
                _dict(entry.get("content")),
                buffers[position : position + count],
            )
        )
        position += count
    return messages, all(bool(v) for v in complete.values())


def _dict(value: object) -> JsonDict:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class LostMessage:
    """A message the kernel sent that the journal could not keep (too large) and a cut lost:
    what the proxy tells the user instead of it."""

    channel: str
    msg_type: str
    size: int  # bytes of its buffers
    parent_header: JsonDict  # the request that caused it (a cell, a comm message): the msg_id
    comm_id: str | None
    sequence: int | None = None  # its iopub number (the agent numbered it, then let it go)

    def describe(self) -> str:
        """``a 24.0 MB comm_msg (comm 1a2b...)``: for the user's notice."""
        what = f"a {self.size / 1e6:.1f} MB {self.msg_type}"
        if self.comm_id:
            what += f" (comm {self.comm_id})"
        return what


def answer_sequence(reply: Message) -> int | None:
    """The last iopub number the agent had given when it made this answer (None: an agent that
    does not number its messages)."""
    return _number(reply.content.get(SEQ_KEY))


def _number(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def known_gaps(reply: Message) -> list[LostMessage]:
    """The messages a journal reply names as too large to have been kept (``gaps``); an old
    agent's reply has none. Entries of another shape are skipped: a summary is only for telling
    the user, and the reply's ``complete`` already says that something is missing."""
    gaps = reply.content.get("gaps")
    found: list[LostMessage] = []
    if not isinstance(gaps, list):
        return found
    for gap in gaps:
        if not isinstance(gap, dict):
            continue
        size = gap.get("bytes")
        comm_id = gap.get("comm_id")
        number = gap.get(SEQ_KEY)
        found.append(
            LostMessage(
                channel=str(gap.get("channel") or "iopub"),
                msg_type=str(gap.get("msg_type") or "message"),
                size=size if isinstance(size, int) and not isinstance(size, bool) else 0,
                parent_header=_dict(gap.get("parent_header")),
                comm_id=comm_id if isinstance(comm_id, str) else None,
                sequence=number
                if isinstance(number, int) and not isinstance(number, bool)
                else None,
            )
        )
    return found
