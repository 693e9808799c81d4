"""Requests in flight at a reset: an ``execute_request`` and an ``input()`` answer (issue 20, 2).

A write handed to a socket that a reset then kills is gone without an error on either side.
The proxy keeps each request until the remote kernel shows it has it, and after the
reconnection either sends it again (the kernel's journal shows it never arrived, or it is an
answer to ``input()``, which ipykernel throws away if stale) or answers it with an error that
says it may or may not have run. Never a hang, never a cell run twice.

The end-to-end rounds hit "just after the proxy wrote it" deterministically: the
:class:`~tests.faults.FaultyPath` holds every chunk for a moment (``delay``), so a request the
proxy has written is still inside the path when ``reset`` aborts it. ``inflight_rounds`` is
also what ``python -m benchmarks.reconnect --inflight`` runs.

The relay's side (what counts as confirmed, what is sent again, what is answered) is unit
tested first, with no sockets.
"""

from __future__ import annotations

import asyncio
import queue
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from cgpu_kernel.core.actions import Publish, SendToFrontend, SendToRemote
from cgpu_kernel.core.relay import Relay
from cgpu_kernel.core.wire import Message, make_header
from cgpu_kernel.exceptions import ReplyLostError

from .conftest import RemoteServer, install_spec_via, run_cell, start_kernel, stdout_of
from .faults import FaultyPath

NOTEBOOK = (b"notebook",)
HOLD = 0.3  # how long the path holds each chunk while a round's request is in it
DEADLINE = 30.0  # a round's reply later than this counts as hung


# --- the relay, event by event --------------------------------------------------------------


def request(msg_type: str, channel: str = "shell", **content: Any) -> Message:
    return Message.build(channel, make_header(msg_type, "frontend"), {}, {}, content)


def from_kernel(parent: Message, msg_type: str, channel: str = "iopub", **content: Any) -> Message:
    return Message.build(channel, make_header(msg_type, "kernel"), parent.header, {}, content)


def connected() -> Relay:
    relay = Relay("proxy")
    relay.remote_connected()
    return relay


def sent(actions: list[Any]) -> list[Message]:
    return [a.msg for a in actions if isinstance(a, SendToRemote)]


def errors(actions: list[Any]) -> list[dict[str, Any]]:
    return [
        a.msg.content
        for a in actions
        if isinstance(a, SendToFrontend) and a.msg.content.get("status") == "error"
    ]


def test_a_request_is_unconfirmed_until_the_kernel_shows_it() -> None:
    relay = connected()
    cell = request("execute_request", code="1")
    relay.frontend_message("shell", NOTEBOOK, cell)
    assert relay.unconfirmed == [relay.inflight[0]]
    relay.remote_message(from_kernel(cell, "status", execution_state="busy"))
    assert relay.unconfirmed == []
    assert relay.awaiting_probe() == relay.inflight  # still unanswered: the probe waits for it


def test_confirmed_before_the_cut_is_not_sent_again() -> None:
    """The kernel had it (busy came), the reply was lost: a clear lost-reply error, no rerun."""
    relay = connected()
    cell = request("execute_request", code="x += 1")
    relay.frontend_message("shell", NOTEBOOK, cell)
    relay.remote_message(from_kernel(cell, "status", execution_state="busy"))
    relay.remote_disconnected()
    relay.remote_connected()
    relay.outage_over(1.0, complete=True)
    waiting = relay.awaiting_probe()
    out = relay.settle_after_probe(waiting, ReplyLostError("reply lost"))
    assert sent(out) == []
    assert [e["evalue"] for e in errors(out)] == ["reply lost"]


@pytest.mark.parametrize("complete", [True, False, None])
def test_unconfirmed_at_the_cut(complete: bool | None) -> None:
    """Written, never confirmed, connection lost. With a complete journal answer the kernel's
    record shows it never arrived: sent again (same msg_id). Otherwise nothing can tell: an
    error that says it may or may not have run, and it is not sent again."""
    relay = connected()
    cell = request("execute_request", code="x += 1")
    relay.frontend_message("shell", NOTEBOOK, cell)
    relay.remote_disconnected()
    assert relay.remote_connected() == []  # not in the queue: it was written
    relay.outage_over(1.0, complete=complete)
    waiting = relay.awaiting_probe()
    assert [r.msg for r in waiting] == [cell]
    out = relay.settle_after_probe(waiting, ReplyLostError("reply lost"))
    if complete:
        assert [m.msg_id for m in sent(out)] == [cell.msg_id]
        assert errors(out) == []
        assert relay.unconfirmed == relay.inflight  # tracked again, on the new connection
    else:
        assert sent(out) == []
        (error,) = errors(out)
        assert error["ename"] == "RemoteReplyLost"
        assert "may or may not have run" in error["evalue"]
        assert "not sent again" in error["evalue"]
        assert relay.inflight == [] and relay.unconfirmed == []


def test_an_incomplete_outage_makes_it_unknowable_for_good() -> None:
    """A later complete journal answer does not cover an earlier incomplete outage."""
    relay = connected()
    cell = request("execute_request", code="x += 1")
    relay.frontend_message("shell", NOTEBOOK, cell)
    relay.remote_disconnected()
    relay.remote_connected()
    relay.outage_over(1.0, complete=False)
    relay.remote_disconnected()
    relay.remote_connected()
    relay.outage_over(1.0, complete=True)
    out = relay.settle_after_probe(relay.awaiting_probe(), ReplyLostError("reply lost"))
    assert sent(out) == []
    assert "may or may not have run" in errors(out)[0]["evalue"]


def test_a_read_only_request_is_repeated_even_when_unknowable() -> None:
    relay = connected()
    complete = request("complete_request", code="pri", cursor_pos=3)
    relay.frontend_message("shell", NOTEBOOK, complete)
    relay.remote_disconnected()
    relay.remote_connected()
    relay.outage_over(1.0, complete=None)
    out = relay.settle_after_probe(relay.awaiting_probe(), ReplyLostError("reply lost"))
    assert [m.msg_id for m in sent(out)] == [complete.msg_id]


def test_a_request_written_on_the_new_connection_is_not_at_risk() -> None:
    relay = connected()
    relay.remote_disconnected()
    relay.remote_connected()
    cell = request("execute_request", code="1")
    relay.frontend_message("shell", NOTEBOOK, cell)
    waiting = relay.awaiting_probe()  # it is unanswered, so the probe waits for it
    # the probe's reply came and this cell's did not: its reply was lost; it is not sent again
    out = relay.settle_after_probe(waiting, ReplyLostError("reply lost"))
    assert sent(out) == []
    assert [e["evalue"] for e in errors(out)] == ["reply lost"]
    assert relay.inflight == [] and relay.unconfirmed == []


def test_an_input_answer_in_flight_is_sent_again() -> None:
    relay = connected()
    cell = request("execute_request", code="input()", allow_stdin=True)
    relay.frontend_message("shell", NOTEBOOK, cell)
    asked = from_kernel(cell, "input_request", "stdin", prompt="")
    relay.remote_message(asked)
    answer = Message.build("stdin", make_header("input_reply", "frontend"), asked.header, {}, {})
    relay.frontend_message("stdin", NOTEBOOK, answer)
    relay.remote_disconnected()
    relay.remote_connected()
    assert [m.msg_id for m in sent(relay.resend_answers())] == [answer.msg_id]
    assert relay.awaiting_probe() == relay.inflight  # the cell; not the answer
    # the cell's reply shows the answer was taken: nothing more to send
    relay.remote_disconnected()
    relay.remote_connected()
    relay.remote_message(from_kernel(cell, "execute_reply", "shell", status="ok"))
    assert relay.resend_answers() == []


def test_an_input_answer_without_a_parent_answers_the_cell_that_asked() -> None:
    """jupyter_client's ``input()`` sends its ``input_reply`` with no parent header."""
    relay = connected()
    cell = request("execute_request", code="input()", allow_stdin=True)
    relay.frontend_message("shell", NOTEBOOK, cell)
    relay.remote_message(from_kernel(cell, "input_request", "stdin", prompt=""))
    answer = request("input_reply", "stdin", value="42")
    relay.frontend_message("stdin", NOTEBOOK, answer)
    relay.remote_disconnected()
    relay.remote_connected()
    assert [m.msg_id for m in sent(relay.resend_answers())] == [answer.msg_id]


def test_an_input_answer_taken_before_the_cut_is_not_sent_again() -> None:
    relay = connected()
    cell = request("execute_request", code="input(); input()", allow_stdin=True)
    relay.frontend_message("shell", NOTEBOOK, cell)
    first = from_kernel(cell, "input_request", "stdin", prompt="")
    relay.remote_message(first)
    answer = Message.build("stdin", make_header("input_reply", "frontend"), first.header, {}, {})
    relay.frontend_message("stdin", NOTEBOOK, answer)
    relay.remote_message(from_kernel(cell, "input_request", "stdin", prompt=""))  # the second
    relay.remote_disconnected()
    relay.remote_connected()
    # a repeat now would answer the second input() with the first answer
    assert relay.resend_answers() == []


def test_an_unknowable_comm_message_is_told_to_the_running_cell() -> None:
    relay = connected()
    cell = request("execute_request", code="w")
    relay.frontend_message("shell", NOTEBOOK, cell)
    relay.remote_message(from_kernel(cell, "status", execution_state="busy"))
    relay.frontend_message("shell", NOTEBOOK, request("comm_msg", comm_id="c", data={}))
    relay.remote_disconnected()
    relay.remote_connected()
    relay.outage_over(1.0, complete=None)
    waiting = relay.awaiting_probe()
    assert len(waiting) == 2
    out = relay.settle_after_probe(waiting, ReplyLostError("reply lost"))
    texts = [a.msg.content.get("text", "") for a in out if isinstance(a, Publish)]
    assert any("comm_msg" in t and "may not have reached" in t for t in texts)


def test_a_comm_message_is_never_repeated_and_holds_no_buffers() -> None:
    """ipykernel 7 publishes no busy for a comm message that arrives while a cell runs, so a
    complete journal cannot show it did not arrive."""
    relay = connected()
    cell = request("execute_request", code="w")
    relay.frontend_message("shell", NOTEBOOK, cell)
    relay.remote_message(from_kernel(cell, "status", execution_state="busy"))
    upload = Message.build(
        "shell", make_header("comm_msg", "frontend"), {}, {}, {"comm_id": "c"}, [b"x" * 1000]
    )
    relay.frontend_message("shell", NOTEBOOK, upload)
    (kept,) = relay.unconfirmed
    assert kept.msg.msg_id == upload.msg_id and kept.msg.buffers == [] and kept.msg.content == {}
    relay.remote_disconnected()
    relay.remote_connected()
    relay.outage_over(1.0, complete=True)
    out = relay.settle_after_probe(relay.awaiting_probe(), ReplyLostError("reply lost"))
    assert sent(out) == []
    assert any("1 widget message(s) (comm_msg)" in a.msg.content.get("text", "") for a in out)


def test_a_later_confirmation_confirms_what_was_written_before_it() -> None:
    """One TCP stream, forwarded in order: if the kernel has the second, it has the first."""
    relay = connected()
    comm = request("comm_msg", comm_id="c", data={})
    cell = request("execute_request", code="1")
    relay.frontend_message("shell", NOTEBOOK, comm)
    relay.frontend_message("shell", NOTEBOOK, cell)
    assert len(relay.unconfirmed) == 2
    relay.remote_message(from_kernel(cell, "status", execution_state="busy"))
    assert relay.unconfirmed == []


# --- end to end: a real jupyter-server and ipykernel behind a FaultyPath ----------------------


def _ran(kc: BlockingKernelClient) -> int:
    reply, outputs = run_cell(kc, "print(ran)", timeout=DEADLINE)
    assert reply["content"]["status"] == "ok", reply["content"]
    return int(stdout_of(outputs).strip())


def _reply_to(kc: BlockingKernelClient, msg_id: str, within: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            msg = kc.get_shell_msg(timeout=max(0.05, deadline - time.monotonic()))
        except queue.Empty:
            return None
        if msg["parent_header"].get("msg_id") == msg_id:
            return dict(msg["content"])
    return None


def _strike(path: FaultyPath, after: float) -> None:
    """Reset the path ``after`` s from now; then let chunks through at once again (the
    reconnection is not slowed)."""
    time.sleep(after)
    path.reset()
    path.delay(0.0)


def inflight_rounds(
    km: KernelManager,
    kc: BlockingKernelClient,
    path: FaultyPath,
    kind: str,
    rounds: int,
    mode: str = "held",
    seed: int = 0,
) -> dict[str, Any]:
    """``rounds`` times: write a request (``kind`` "execute": a cell that increments a counter
    in the kernel; "input": the answer to ``input()`` in such a cell) and reset the path.

    ``mode`` "held": the path holds the request (:data:`HOLD` s per chunk) and the reset
    comes 50 ms after it was written, so it dies inside the path every round. "raced": no
    hold, the reset 0-2 ms after the write (seeded), so sometimes it arrived and only what
    the kernel said back is cut.

    Counts per round: ran once with its reply (``ok``), answered with a clear error
    (``errors``), ``hung`` past :data:`DEADLINE`, ``lost`` (did not run, and no error said
    so), ``duplicated`` (ran twice)."""
    rng = random.Random(seed)
    hold, gap = (HOLD, 0.05) if mode == "held" else (0.0, 0.0)
    counts = {"ok": 0, "errors": 0, "hung": 0, "lost": 0, "duplicated": 0}
    seconds: list[float] = []
    messages: list[str] = []
    run_cell(kc, "ran = 0; answers = []")
    for index in range(rounds):
        before = _ran(kc)
        after = gap if mode == "held" else rng.uniform(0.0, 0.002)
        started = time.monotonic()
        if kind == "execute":
            path.delay(hold)
            msg_id = kc.execute("ran += 1")
            _strike(path, after)
        else:
            msg_id = kc.execute("ran += 1; answers.append(input('?'))", allow_stdin=True)
            asked = kc.get_stdin_msg(timeout=DEADLINE)
            assert asked["msg_type"] == "input_request"
            path.delay(hold)
            kc.input(f"answer-{index}")
            _strike(path, after)
        content = _reply_to(kc, msg_id, DEADLINE)
        if content is None:
            counts["hung"] += 1
            km.interrupt_kernel()  # an input() still waiting: let the next round run
            _reply_to(kc, msg_id, 10)
        else:
            seconds.append(time.monotonic() - started)
            if content["status"] == "error":
                counts["errors"] += 1
                messages.append(f"{content['ename']}: {content['evalue']}")
        delta = _ran(kc) - before
        if delta > 1:
            counts["duplicated"] += 1
        elif content is not None and content["status"] == "ok":
            counts["ok" if delta == 1 else "lost"] += 1
        elif content is None and delta == 0:
            counts["lost"] += 1
    if kind == "input":
        _reply, outputs = run_cell(kc, "print(len(answers), len(set(answers)))")
        counts["answers_kept"] = stdout_of(outputs).strip()
    return {
        "kind": kind,
        "mode": mode,
        "rounds": rounds,
        **counts,
        "worst_s": max(seconds) if seconds else None,
        "messages": sorted(set(messages)),
    }


@pytest.fixture
def through_path(
    kernel_dir: Path, jupyter_server: RemoteServer, request: pytest.FixtureRequest
) -> Iterator[tuple[KernelManager, BlockingKernelClient, FaultyPath, bool]]:
    journal = bool(request.param)
    with FaultyPath(jupyter_server.port) as path:
        name = install_spec_via(
            kernel_dir,
            f"cgpu-inflight-{journal}",
            path.url,
            jupyter_server,
            f"--output-journal={journal}",
            outage_notice_after=0,
        )
        km, kc = start_kernel(name)
        try:
            yield km, kc, path, journal
        finally:
            path.delay(0.0)
            path.restore()
            kc.stop_channels()
            km.shutdown_kernel()


ROUNDS = 3  # bounded for the default run; the benchmark runs more


@pytest.mark.parametrize(
    "through_path", [True, False], ids=["journal", "no-journal"], indirect=True
)
def test_an_execute_request_in_flight_at_a_reset(
    through_path: tuple[KernelManager, BlockingKernelClient, FaultyPath, bool],
) -> None:
    """With the journal the cell runs exactly once each round; without it the user is told it
    may or may not have run. Never hung, never run twice."""
    km, kc, path, journal = through_path
    result = inflight_rounds(km, kc, path, "execute", ROUNDS)
    assert result["hung"] == 0 and result["duplicated"] == 0 and result["lost"] == 0, result
    if journal:
        assert result["ok"] == ROUNDS, result
    else:
        assert result["ok"] + result["errors"] == ROUNDS, result
        assert all("may or may not have run" in m for m in result["messages"]), result
    assert result["worst_s"] is not None and result["worst_s"] < 15, result


@pytest.mark.parametrize("through_path", [True], ids=["journal"], indirect=True)
def test_an_execute_request_raced_by_a_reset(
    through_path: tuple[KernelManager, BlockingKernelClient, FaultyPath, bool],
) -> None:
    """Reset 0-2 ms after the write: whether the request, or only what the kernel said back,
    was cut, the journal settles it: the cell runs once and its reply comes."""
    km, kc, path, _journal = through_path
    result = inflight_rounds(km, kc, path, "execute", ROUNDS, mode="raced", seed=1)
    assert result["ok"] == ROUNDS, result


@pytest.mark.parametrize(
    "through_path", [True, False], ids=["journal", "no-journal"], indirect=True
)
def test_an_input_answer_in_flight_at_a_reset(
    through_path: tuple[KernelManager, BlockingKernelClient, FaultyPath, bool],
) -> None:
    """The answer is sent again after the reconnection: the cell gets it once and finishes."""
    km, kc, path, _journal = through_path
    result = inflight_rounds(km, kc, path, "input", ROUNDS)
    assert result["ok"] == ROUNDS, result
    assert result["answers_kept"] == f"{ROUNDS} {ROUNDS}", result


class LateReadingPath(FaultyPath):
    """A path that, towards the proxy, reads ``late`` s after data is there: what the server
    wrote meanwhile (its ``101`` and the replay behind it) reaches the proxy in one read, as
    on a loaded machine."""

    late = 0.05

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if any(pair.client is writer for pair in self._pairs):
            original = reader.read

            async def read_late(n: int = -1) -> bytes:
                await asyncio.sleep(self.late)
                return await original(n)

            reader.read = read_late  # type: ignore[method-assign]
        await super()._pump(reader, writer)


def test_the_replay_right_behind_the_handshake_is_not_dropped(
    kernel_dir: Path, jupyter_server: RemoteServer, tmp_path: Path
) -> None:
    """Issue 20, item 7, end to end: after a reset the server replays what it buffered right
    behind its ``101``, often in the same read. Those v1 frames used to be parsed as legacy
    and dropped ("legacy binary frame with 100663296 offsets is truncated"); the proxy's log
    (its stderr) says whether any was."""
    log_path = tmp_path / "proxy.log"
    with LateReadingPath(jupyter_server.port) as path, log_path.open("wb") as log:
        name = install_spec_via(
            kernel_dir,
            "cgpu-inflight-replay",
            path.url,
            jupyter_server,
            "--output-journal=False",
            outage_notice_after=0,
        )
        km, kc = start_kernel(name, stderr=log)
        try:
            msg_id = kc.execute(
                "import time\nfor i in range(600):\n    print(i, flush=True)\n"
                "    time.sleep(0.005)\n"
            )
            for _ in range(6):
                time.sleep(0.4)
                path.reset()
            assert _reply_to(kc, msg_id, DEADLINE) is not None
            run_cell(kc, "1")
        finally:
            kc.stop_channels()
            km.shutdown_kernel()
    logged = log_path.read_text("utf-8", "replace")
    assert logged.count("lost the connection") >= 3  # the resets did reach the proxy
    assert "dropped a malformed message" not in logged
