"""Output limit decisions and coalescing, message by message, no I/O."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cgpu_kernel.core import limits
from cgpu_kernel.core.limits import (
    Budgets,
    Coalescer,
    OutputLimiter,
    Show,
    Spool,
    _text_bound,
    visible_size,
)
from cgpu_kernel.core.wire import Message, make_header

CELL = {"msg_id": "cell-1", "msg_type": "execute_request"}


def out(msg_type: str, parent: dict | None = None, **content: object) -> Message:
    return Message.build("iopub", make_header(msg_type, "k"), parent or CELL, {}, content)


def stream(text: str, name: str = "stdout", parent: dict | None = None) -> Message:
    return out("stream", parent, name=name, text=text)


def idle() -> Message:
    return out("status", execution_state="idle")


def shown_text(decisions: list) -> str:
    return "".join(
        d.msg.content["text"]
        for d in decisions
        if isinstance(d, Show) and d.msg.msg_type == "stream" and d.msg.content["name"] == "stdout"
    )


def pieces(data: bytes | Iterable[bytes]) -> bytes:
    """A Spool decision's data as the shell writes it (pieces are made as they are taken)."""
    return data if isinstance(data, bytes) else b"".join(data)


def spooled(decisions: list) -> bytes:
    return b"".join(pieces(d.data) for d in decisions if isinstance(d, Spool))


def test_visible_size_applies_carriage_returns() -> None:
    assert visible_size(0, 0, "abc\n") == (4, 0)
    assert visible_size(0, 0, "abc") == (0, 3)
    assert visible_size(0, 3, "\r 50%") == (0, 4)
    assert visible_size(0, 4, "\r100%\n") == (5, 0)
    assert visible_size(10, 2, "xy\nz") == (15, 1)


def test_under_budget_everything_is_shown_untouched() -> None:
    limiter = OutputLimiter(Budgets(max_stream_bytes=100), "proxy")
    msg = stream("hello\n")
    assert limiter.process(msg) == [Show(msg)]
    assert limiter.process(idle())[-1].msg.msg_type == "status"


def test_past_budget_head_notice_spool_and_tail() -> None:
    limiter = OutputLimiter(Budgets(max_stream_bytes=50, tail_lines=3), "proxy", "/spool")
    lines = [f"line {i}\n" for i in range(40)]
    decisions = []
    for line in lines:
        decisions += limiter.process(stream(line))
    head = shown_text(decisions)
    assert len(head) <= 50 and head == "".join(lines)[: len(head)]
    assert head + spooled(decisions).decode() == "".join(lines)  # nothing lost, in order
    notices = [
        d.msg.content["text"]
        for d in decisions
        if isinstance(d, Show) and d.msg.content.get("name") == "stderr"
    ]
    assert len(notices) == 1 and "/spool/cell-1-stdout.txt" in notices[0]
    end = limiter.process(idle())
    summary = end[0].msg.content["text"]
    assert "held back" in summary
    assert summary.endswith("line 37\nline 38\nline 39\n")
    assert end[-1].msg.msg_type == "status"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(["x", "n", "r", "\n", "\r", "\\", '"', "\t", "\x00", "é", "𝄞", "\\n"]),
        max_size=60,
    )
)
def test_the_unparsed_bound_never_undercounts_and_sees_carriage_returns(pieces: list[str]) -> None:
    text = "".join(pieces)
    raw = stream(text).parts[3]
    bound = _text_bound(raw)
    if "\r" in text:
        assert bound is None  # a carriage return rewinds the line: the text must be parsed
    else:
        if bound is None:  # allowed only where a literal backslash may look like one
            assert "\\" in text
            return
        assert bound >= len(text)
        if set(text) <= set('xnr\n\t"'):  # one byte or one two-byte escape per character
            assert bound == len(text) + len(stream("").parts[3])  # exact, with the JSON around


def test_one_huge_line_shows_its_start() -> None:
    limiter = OutputLimiter(Budgets(max_stream_bytes=1000), "proxy")
    text = "x" * 11_000_000
    decisions = limiter.process(stream(text))
    assert shown_text(decisions) == "x" * 1000
    assert len(spooled(decisions)) == 11_000_000 - 1000


def test_progress_bar_never_counts() -> None:
    limiter = OutputLimiter(Budgets(max_stream_bytes=200), "proxy")
    decisions = []
    for i in range(20_000):
        decisions += limiter.process(stream(f"\r{i:>6}/100000 [{'#' * (i // 1000)}]"))
    decisions += limiter.process(stream("\n"))
    assert not any(isinstance(d, Spool) for d in decisions)  # never truncated
    assert shown_text(decisions).split("\r")[-1] == " 19999/100000 [" + "#" * 19 + "]\n"


def test_clear_output_resets_the_budget() -> None:
    limiter = OutputLimiter(Budgets(max_rich_bytes=5000, max_rich_item_bytes=5000), "proxy")
    image = base64.b64encode(b"\x89PNG" + b"\0" * 2000).decode()
    for _ in range(50):
        assert isinstance(limiter.process(out("clear_output", wait=True))[0], Show)
        decisions = limiter.process(out("display_data", data={"image/png": image}, metadata={}))
        assert decisions == [Show(decisions[0].msg)]
        assert decisions[0].msg.content["data"]["image/png"] == image


def test_oversized_rich_output_becomes_a_placeholder() -> None:
    limiter = OutputLimiter(Budgets(max_rich_item_bytes=1000), "proxy", "/spool")
    png = b"\x89PNG" + bytes(range(256)) * 40
    msg = out(
        "display_data",
        data={"image/png": base64.b64encode(png).decode(), "text/plain": "<Figure>"},
        metadata={},
    )
    decisions = limiter.process(msg)
    files = {d.name: d.data for d in decisions if isinstance(d, Spool)}
    assert files["cell-1-1.png"] == png  # decoded, byte-exact
    assert files["cell-1-1.txt"] == b"<Figure>"
    placeholder = next(d.msg for d in decisions if isinstance(d, Show))
    text = placeholder.content["data"]["text/plain"]
    assert "image/png" in text and "/spool/cell-1-1.png" in text
    assert "image/png" not in placeholder.content["data"]


def test_cells_are_counted_separately() -> None:
    limiter = OutputLimiter(Budgets(max_stream_bytes=10), "proxy")
    other = {"msg_id": "cell-2", "msg_type": "execute_request"}
    first = limiter.process(stream("123456789\n"))
    assert not any(isinstance(d, Spool) for d in first)
    decisions = limiter.process(stream("abcdefghi\n", parent=other))
    assert not any(isinstance(d, Spool) for d in decisions)  # cell-2 has its own budget
    assert any(isinstance(d, Spool) for d in limiter.process(stream("more\n")))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["stdout", "stderr"]), st.text(max_size=40)), max_size=30)
)
def test_coalescing_is_byte_exact_and_ordered(chunks: list[tuple[str, str]]) -> None:
    coalescer = Coalescer(max_bytes=64)
    published: list[Message] = []
    for name, text in chunks:
        published += coalescer.add(stream(text, name))
    published += coalescer.flush()
    assert [(m.content["name"], m.content["text"]) for m in published] == _merge(chunks)


def _merge(chunks: list[tuple[str, str]]) -> list[tuple[str, str]]:
    merged: list[tuple[str, str]] = []
    size = 0
    for name, text in chunks:
        if merged and merged[-1][0] == name and size < 64:
            merged[-1] = (name, merged[-1][1] + text)
            size += len(text)
        else:
            merged.append((name, text))
            size = len(text)
    return merged


def test_coalescer_flushes_before_other_messages() -> None:
    coalescer = Coalescer()
    assert coalescer.add(stream("a")) == []
    assert coalescer.add(stream("b")) == []
    status = idle()
    published = coalescer.add(status)
    assert [m.content.get("text") for m in published[:-1]] == ["ab"]
    assert published[-1] is status


def test_spool_files_are_private_and_cleaned_by_age_then_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import stat
    import time

    from cgpu_kernel.proxy import spool

    writer = spool.SpoolWriter(tmp_path / "run-1")
    writer.write("cell-stdout.txt", b"a" * 100)
    writer.write("cell-stdout.txt", b"b" * 100)
    writer.close()
    path = tmp_path / "run-1" / "cell-stdout.txt"
    assert path.read_bytes() == b"a" * 100 + b"b" * 100  # appended, in order
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    old = tmp_path / "run-0" / "old.txt"
    old.parent.mkdir()
    old.write_bytes(b"x" * 50)
    week_ago = time.time() - 8 * 86400
    os.utime(old, (week_ago, week_ago))
    assert spool.clean(tmp_path, max_age_days=7, max_total_bytes=10_000) == [old]
    assert not old.parent.exists()  # empty run folders go too
    assert spool.clean(tmp_path, max_age_days=7, max_total_bytes=150) == [path]  # over the cap


def test_outputs_command_lists_shows_and_cleans(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys

    folder = tmp_path / "spool" / "20260101-000000-abcd"
    folder.mkdir(parents=True)
    (folder / "cell-stdout.txt").write_bytes("held back ✓\n".encode())

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "cgpu_kernel", "outputs", *args]
        command += ["--spool-dir", str(tmp_path / "spool")]
        return subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)

    listed = json.loads(cli("--json").stdout)
    assert [row["path"] for row in listed] == [str(folder / "cell-stdout.txt")]
    assert cli("show").stdout == "held back ✓\n"
    assert cli("show", "cell-stdout.txt").stdout == "held back ✓\n"
    missing = cli("show", "nope.txt")
    assert missing.returncode == 1 and "cgpu-kernel outputs" in missing.stderr
    assert "Deleted 1" in cli("clean", "--older-than", "0").stdout
    assert "No saved outputs" in cli().stdout


def test_many_small_messages_get_the_whole_budget() -> None:
    # Each message's JSON is mostly the object around its text: counting that would cut the
    # cell at a fraction of its budget.
    limiter = OutputLimiter(Budgets(max_stream_bytes=10_000), "proxy")
    decisions = []
    for i in range(3000):
        decisions += limiter.process(stream(f"{i:04d}\n"))
    shown = shown_text(decisions)
    assert 9_000 < len(shown) <= 10_000
    assert shown == "".join(f"{i:04d}\n" for i in range(len(shown) // 5))


def test_large_messages_are_counted_within_their_json() -> None:
    limiter = OutputLimiter(Budgets(max_stream_bytes=1_000_000), "proxy")
    line = "y" * 99 + "\n"
    decisions = []
    for _ in range(200):
        decisions += limiter.process(stream(line * 100))  # 10 kB each, counted unparsed
    shown = shown_text(decisions)
    assert 990_000 < len(shown) <= 1_000_000
    assert spooled(decisions) == (line * 20_000)[len(shown) :].encode()


def counted(text: str, chars: int) -> Message:
    """A stream message carrying a character count, as the journal agent's arrive."""
    msg = stream(text)
    msg.text_chars = chars
    return msg


def test_the_kernels_character_count_is_used_and_a_wrong_one_is_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The journal agent's count of a large message's characters spares the pass over its
    bytes: exact where that pass over-counts (2-byte UTF-8 counts 2, and an escaped backslash
    sends it to the slower count), so the cell gets its whole budget. A count larger than the
    JSON's length cannot be true and is not believed."""
    passes = []
    real_bound = limits._text_bound

    def spy(raw: limits.Raw) -> int | None:
        passes.append(len(raw))
        return real_bound(raw)

    monkeypatch.setattr(limits, "_text_bound", spy)
    line = "é\\" * 49 + "\n"  # 99 characters, 2 + 2 bytes each in JSON, then \n
    limiter = OutputLimiter(Budgets(max_stream_bytes=1_000_000), "proxy")
    decisions = []
    for _ in range(100):
        decisions += limiter.process(counted(line * 100, len(line) * 100))  # 9,900 chars each
    shown = shown_text(decisions)
    assert len(shown) == 990_000 and not spooled(decisions)  # all of it, within the budget
    assert passes == []  # never counted here
    for _ in range(2):  # 19,800 more characters: 10,000 of them fit
        decisions += limiter.process(counted(line * 100, len(line) * 100))
    shown = shown_text(decisions)
    assert 990_000 < len(shown) <= 1_000_000  # the budget, not more
    assert spooled(decisions) == (line * 10_200)[len(shown) :].encode()

    limiter = OutputLimiter(Budgets(max_stream_bytes=1_000_000), "proxy")
    big = stream("y" * 9_999 + "\n")
    limiter.process(counted("y" * 9_999 + "\n", len(big.parts[3]) + 1))
    assert passes == [len(big.parts[3])]  # an impossible count: counted here instead


@contextmanager
def sliced(slice_size: int) -> Iterator[None]:
    """Every stream message takes the sliced path, cut every ``slice_size`` bytes."""
    saved = limits.SLICED_STREAM, limits.SPOOL_SLICE
    limits.SLICED_STREAM, limits.SPOOL_SLICE = 0, slice_size
    try:
        yield
    finally:
        limits.SLICED_STREAM, limits.SPOOL_SLICE = saved


def _limited(texts: list[str], budget: int) -> tuple[list[str], bytes]:
    """What a cell printing ``texts`` shows (its summary included) and spools."""
    limiter = OutputLimiter(Budgets(max_stream_bytes=budget), "proxy")
    shown: list[str] = []
    spool = b""
    for decision in [*(d for t in texts for d in limiter.process(stream(t))), "idle"]:
        if decision == "idle":
            decisions = limiter.process(idle())
            shown += [d.msg.content["text"] for d in decisions if d.msg.msg_type == "stream"]
        elif isinstance(decision, Show):
            shown.append(decision.msg.content["text"])
        else:
            spool += pieces(decision.data)
    return shown, spool


TRICKY = st.text(alphabet=st.sampled_from(["a", "\n", "\\", '"', "\t", "é", "€", "😀", "/"]))


@settings(max_examples=150, deadline=None)
@given(
    texts=st.lists(TRICKY, min_size=1, max_size=4),
    budget=st.integers(0, 120),
    slice_size=st.integers(1, 30),
)
def test_big_stream_messages_are_spooled_slice_by_slice_byte_exact(
    texts: list[str], budget: int, slice_size: int
) -> None:
    """ipykernel sends 0.2 s of output as one message (hundreds of MB from a fast loop): past
    the budget its text is decoded and spooled a slice at a time, never whole. Cut anywhere
    (inside an escape, a run of backslashes, a UTF-8 character), the cell shows and spools
    exactly what parsing each message whole gives, the summary's counts included."""
    whole = _limited(texts, budget)
    with sliced(slice_size):
        assert _limited(texts, budget) == whole


def test_a_huge_stream_message_is_spooled_in_pieces() -> None:
    limiter = OutputLimiter(Budgets(max_stream_bytes=1000), "proxy")
    text = ("y" * 99 + "\n") * 100_000  # 10 MB in one message
    decisions = limiter.process(stream(text))
    assert shown_text(decisions) == ("y" * 99 + "\n") * 10
    (spool,) = [d for d in decisions if isinstance(d, Spool)]
    assert not isinstance(spool.data, bytes)  # made as the shell writes it
    sizes = [len(piece) for piece in spool.data]
    assert sum(sizes) == len(text) - 1000 and max(sizes) <= limits.SPOOL_SLICE
    summary = limiter.process(idle())[0].msg.content["text"]
    assert summary.startswith("[cgpu-kernel: 9.5 MB of output held back")


def test_carriage_returns_and_unicode_escapes_keep_the_parsed_path() -> None:
    """A carriage return changes what counts, a \\u escape may be half a surrogate pair:
    such messages are parsed whole, as before."""
    for text in ("a\rb" * 10, "\x01" * 10):
        raw = json.dumps({"name": "stdout", "text": text}).encode()
        assert limits._stream_text_span(raw) is None
    raw = json.dumps({"text": "a", "name": "stdout"}).encode()
    assert limits._stream_text_span(raw) is None  # not ipykernel's order: parsed


@pytest.mark.parametrize(
    "text",
    [
        "plain " * 50_000,
        "line\n" * 70_000,  # escaped newlines across the slices' edges
        "a\\b\tc\n" * 50_000,  # escaped backslashes: the newline count
        "é✓\n" * 100_000,  # multi-byte characters cut between slices
        "progress\r" * 1000,  # a carriage return: parsed, no span
    ],
)
def test_a_large_stream_is_read_in_place_as_from_bytes(text: str) -> None:
    """A large stream content is a view of its frame (``core.wire``); the limiter's raw scans
    give on it what they give on bytes."""
    from cgpu_kernel.core.limits import _stream_slices, _stream_text_span, _text_bound

    raw = json.dumps({"name": "stdout", "text": text}, ensure_ascii=False).encode()
    view = memoryview(bytearray(raw))
    assert _text_bound(view) == _text_bound(raw)
    span = _stream_text_span(raw)
    assert _stream_text_span(view) == span
    if span is not None:
        _, start, end = span
        assert list(_stream_slices(view, start, end)) == list(_stream_slices(raw, start, end))
        assert "".join(_stream_slices(view, start, end)) == text
