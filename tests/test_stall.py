"""A frozen server, a slow journal, a large message lost in a cut: nothing lost, nothing false.

A jupyter-server that stops (SIGSTOP: a paused VM, a swapping host, a debugger) reads nothing
from its kernels while it is stopped, and ipykernel's IOPub socket drops what exceeds ZMQ's
high-water mark: those lines never reach the server, so only the kernel's output journal has
them. The proxy must ask it after the socket revives, and say only what it knows.

Each test starts a server of its own (stopping the session's shared one would stall every other
test); the proxy runs with ``--ping-interval=1`` so the stall is seen within ~2 s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from .conftest import (
    RemoteServer,
    install_remote_spec,
    install_spec,
    run_cell,
    start_jupyter_server,
    start_kernel,
    stdout_of,
)
from .faults import FaultyPath

STALL_OPTIONS = ["--ping-interval=1", "--outage-notice-after=1", "--max-output-bytes=1000000000"]
PAD = 4000


def numbered_cell(lines: int, per_second: int = 500, pad: int = PAD) -> str:
    """A cell printing ``lines`` numbered lines at about ``per_second``, one message each, each
    line ``pad`` bytes long (so the socket buffers between kernel and server fill in seconds)."""
    return (
        "import time\n"
        "t0 = time.monotonic()\n"
        f"pad = ' ' + 'x' * {pad}\n"
        f"for i in range({lines}):\n"
        "    print(i, pad if pad != ' ' else '', flush=True)\n"
        f"    while time.monotonic() < t0 + (i + 1) / {per_second}:\n"
        "        time.sleep(0.001)\n"
    )


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    """This module's own server (never the session's: stopping that would stall other tests).

    Its IOPub rate limiter is off: it discards output by design (and says so itself), a loss
    of its own that would hide the one measured here."""
    server = start_jupyter_server(
        tmp_path_factory.mktemp("stall") / "server",
        "--ZMQChannelsWebsocketConnection.limit_rate=False",
    )
    try:
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


@contextlib.contextmanager
def proxy_kernel(
    kernel_dir: Path, name: str, server: RemoteServer, *extra: str
) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    names = {option.split("=", 1)[0] for option in extra}  # given here: instead of the default
    options = [o for o in STALL_OPTIONS if o.split("=", 1)[0] not in names]
    spec = install_remote_spec(kernel_dir, name, server, extra=[*options, *extra])
    km, kc = start_kernel(spec)
    try:
        yield km, kc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.process.pid, signal.SIGCONT)
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def freeze(server: RemoteServer, after: float, seconds: float) -> threading.Thread:
    """SIGSTOP the server ``after`` s from now, SIGCONT it ``seconds`` later (in a thread)."""

    def run() -> None:
        time.sleep(after)
        os.kill(server.process.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(server.process.pid, signal.SIGCONT)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def collect(kc: BlockingKernelClient, msg_id: str, deadline: float) -> dict[str, Any]:
    """Everything parented to ``msg_id`` until its idle (or the deadline): the numbered lines,
    the proxy's notices, errors, and whether the idle came."""
    lines: list[int] = []
    stdout: list[str] = []  # words that are not numbered lines
    notices: list[str] = []
    errors: list[dict[str, Any]] = []
    elsewhere = 0  # numbered lines that came parented to another request
    idle = False
    while time.monotonic() < deadline:
        try:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # queue.Empty: the deadline passed
            break
        kind, content = msg["msg_type"], msg["content"]
        if msg["parent_header"].get("msg_id") != msg_id:
            if kind == "stream":  # a line under another parent is lost to the cell: say so
                elsewhere += sum(w.split(" ", 1)[0].isdigit() for w in content["text"].split("\n"))
            continue
        if kind == "stream" and content["name"] == "stdout":
            for line in content["text"].splitlines():
                first = line.split(" ", 1)[0]
                if first.isdigit():
                    lines.append(int(first))
                else:
                    stdout.append(line)
        elif kind == "stream":
            notices.append(content["text"])
        elif kind == "error":
            errors.append(content)
        elif kind == "status" and content["execution_state"] == "idle":
            idle = True
            break
    return {
        "lines": lines,
        "stdout": stdout,
        "notices": "".join(notices),
        "errors": errors,
        "idle": idle,
        "elsewhere": elsewhere,
    }


def lost_and_duplicated(lines: list[int], expected: int) -> tuple[int, int]:
    return len(set(range(expected)) - set(lines)), len(lines) - len(set(lines))


def missing_ranges(lines: list[int], expected: int) -> list[tuple[int, int]]:
    """The numbered lines that never came, as (first, last) runs: for the failure message."""
    runs: list[tuple[int, int]] = []
    for n in sorted(set(range(expected)) - set(lines)):
        if runs and runs[-1][1] == n - 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs


def run_frozen(
    kc: BlockingKernelClient,
    server: RemoteServer,
    lines: int,
    *,
    after: float,
    stop: float,
    deadline: float,
) -> dict[str, Any]:
    run_cell(kc, "1")
    msg_id = kc.execute(numbered_cell(lines))
    freezer = freeze(server, after, stop)
    result = collect(kc, msg_id, time.monotonic() + deadline)
    freezer.join()
    return result


def assert_in_order_unless_told(result: dict[str, Any]) -> None:
    """In order, unless the proxy said that lines the server dropped while catching up after
    the stop came late (out of order: recovered from the journal rather than lost)."""
    if "shown late" not in result["notices"]:  # "some may be shown late, out of order"
        assert result["lines"] == sorted(result["lines"]), result["notices"]


def assert_told_the_truth(notices: str, lost: int) -> None:
    """The notice claims nothing was lost only if nothing was, and says something either way."""
    assert "lost the connection" in notices or "no sign of life" in notices, notices
    if lost:
        assert "nothing was lost" not in notices, notices


def assert_no_false_all_clear(result: dict[str, Any], lines: int) -> None:
    """Whenever the proxy said "nothing was lost" and nothing after it said output is missing,
    no line is missing: the claim the issue caught false (227 lines lost under it)."""
    notices = result["notices"]
    warned = "never arrived" in notices or "may be missing" in notices
    if "nothing was lost" in notices and not warned:
        lost, _ = lost_and_duplicated(result["lines"], lines)
        assert lost == 0, (notices, missing_ranges(result["lines"], lines))


def test_a_frozen_server_loses_no_line_and_says_so_truthfully(
    kernel_dir: Path, own_server: RemoteServer
) -> None:
    """SIGSTOP the server for 10 s while a cell prints 500 lines/s, then SIGCONT: ipykernel's
    IOPub drops thousands of lines at its high-water mark; the journal holds them all."""
    lines = 5000  # 10 s at full speed: running before, during and after the stop
    with proxy_kernel(kernel_dir, "cgpu-test-stall", own_server) as (_, kc):
        result = run_frozen(kc, own_server, lines, after=3, stop=10, deadline=90)
        lost, duplicated = lost_and_duplicated(result["lines"], lines)
        assert result["idle"], result["notices"]
        assert_no_false_all_clear(result, lines)
        assert (lost, duplicated) == (0, 0), result["notices"]
        assert_in_order_unless_told(result)
        assert_told_the_truth(result["notices"], lost)
        assert "nothing was lost" in result["notices"]  # the journal said so, and it is true
        _, outputs = run_cell(kc, "print('after')")
        assert stdout_of(outputs) == "after\n"


def test_a_cell_that_ends_while_the_server_is_frozen_completes(
    kernel_dir: Path, own_server: RemoteServer
) -> None:
    """The cell's last lines, its execute_reply and its idle are all sent while the server is
    stopped (and dropped at the high-water mark): the journal brings them back, the cell ends."""
    lines = 3000  # 6 s; the stop starts at 2 s and lasts 10
    with proxy_kernel(kernel_dir, "cgpu-test-stall-end", own_server) as (_, kc):
        started = time.monotonic()
        result = run_frozen(kc, own_server, lines, after=2, stop=10, deadline=45)
        assert result["idle"], f"busy after {time.monotonic() - started:.0f} s"
        lost, duplicated = lost_and_duplicated(result["lines"], lines)
        assert (lost, duplicated) == (0, 0), result["notices"]
        assert not result["errors"]
        assert_told_the_truth(result["notices"], lost)
        reply = kc.get_shell_msg(timeout=10)
        assert reply["content"]["status"] == "ok"


def test_a_stop_too_short_to_be_noticed_loses_no_line(
    kernel_dir: Path, own_server: RemoteServer
) -> None:
    """A 5 s stop under a 30 s ping interval: no ping goes unanswered long enough for the
    proxy to see an outage, yet ipykernel's IOPub drops lines at its high-water mark meanwhile
    (and while the server catches up). The open cell's silence (3 s) makes the proxy look at
    the journal's end, or the next line's number shows the gap; either way what is missing is
    fetched before the proxy goes on: nothing lost, in order."""
    lines = 4000  # 8 s; the stop starts at 2 s
    with proxy_kernel(kernel_dir, "cgpu-test-stall-short", own_server, "--ping-interval=30") as (
        _,
        kc,
    ):
        result = run_frozen(kc, own_server, lines, after=2, stop=5, deadline=60)
        lost, duplicated = lost_and_duplicated(result["lines"], lines)
        assert result["idle"], result["notices"]
        assert (lost, duplicated) == (0, 0), (
            result["notices"],
            missing_ranges(result["lines"], lines),
        )
        assert result["lines"] == sorted(result["lines"])  # gaps are filled before going on
        assert "nothing was lost" not in result["notices"]  # no outage was seen: none claimed
        assert not result["errors"]


def test_a_gap_is_filled_as_soon_as_the_next_line_shows_it(
    kernel_dir: Path, own_server: RemoteServer
) -> None:
    """A 1.5 s stop under 1000 lines/s of 8 kB: ipykernel's IOPub drops hundreds of lines, and
    nothing else shows it (no ping is due, the cell is never silent for 3 s). The first line
    after the gap carries a number that skips them: the proxy holds it, fetches the missing
    ones from the journal and goes on, all in order."""
    lines = 5000  # 5 s; the stop starts at 2 s
    with proxy_kernel(kernel_dir, "cgpu-test-gap", own_server, "--ping-interval=30") as (_, kc):
        run_cell(kc, "1")
        msg_id = kc.execute(numbered_cell(lines, per_second=1000, pad=8000))
        freezer = freeze(own_server, 2, 1.5)
        result = collect(kc, msg_id, time.monotonic() + 60)
        freezer.join()
        lost, duplicated = lost_and_duplicated(result["lines"], lines)
        assert result["idle"], result["notices"]
        assert (lost, duplicated) == (0, 0), (
            result["notices"],
            missing_ranges(result["lines"], lines),
        )
        assert result["lines"] == sorted(result["lines"])
        assert "nothing was lost" not in result["notices"]


def test_a_drop_after_the_all_clear_is_not_hidden_by_it(
    kernel_dir: Path, own_server: RemoteServer
) -> None:
    """The false "nothing was lost" of the issue, made to happen every time: a 6 s stop (seen:
    the cell is told, truthfully, that nothing was lost), then, once the server runs again, a
    1.5 s stop that no ping notices drops hundreds of lines behind the all-clear. The numbers
    show that gap; the journal fills it. Lines lost under a standing "nothing was lost": 0."""
    lines = 14000  # 14 s at 1000 lines/s of 8 kB; stops at 2-8 s and 11-12.5 s
    with proxy_kernel(kernel_dir, "cgpu-test-stall-twice", own_server, "--ping-interval=2") as (
        _,
        kc,
    ):
        run_cell(kc, "1")
        msg_id = kc.execute(numbered_cell(lines, per_second=1000, pad=8000))

        def stops() -> None:
            time.sleep(2)
            for pause, then in ((6.0, 3.0), (1.5, 0.0)):
                os.kill(own_server.process.pid, signal.SIGSTOP)
                time.sleep(pause)
                os.kill(own_server.process.pid, signal.SIGCONT)
                time.sleep(then)

        stopper = threading.Thread(target=stops, daemon=True)
        stopper.start()
        result = collect(kc, msg_id, time.monotonic() + 90)
        stopper.join()
        assert result["idle"], result["notices"]
        assert "nothing was lost" in result["notices"], result["notices"]  # about the 6 s stop
        assert_no_false_all_clear(result, lines)
        lost, duplicated = lost_and_duplicated(result["lines"], lines)
        assert (lost, duplicated) == (0, 0), result["notices"]
        assert_in_order_unless_told(result)


def test_a_cell_that_ends_in_a_stop_too_short_to_be_noticed_completes(
    kernel_dir: Path, own_server: RemoteServer
) -> None:
    """The cell's last lines and its idle are dropped in a 6 s stop under a 30 s ping interval,
    and nothing follows them to show the gap: the open cell's silence makes the proxy look at
    the journal's end, and the cell completes with every line."""
    lines = 3000  # 6 s; the stop starts at 1 s, the cell ends 1 s before it is over
    with proxy_kernel(
        kernel_dir,
        "cgpu-test-stall-short-end",
        own_server,
        "--ping-interval=30",
        "--log-level=INFO",  # a failure (CI saw one, once) shows what the proxy did
    ) as (_, kc):
        result = run_frozen(kc, own_server, lines, after=1, stop=6, deadline=45)
        lost, duplicated = lost_and_duplicated(result["lines"], lines)
        assert result["idle"], result["notices"]
        assert (lost, duplicated) == (0, 0), (
            result["notices"],
            missing_ranges(result["lines"], lines),
            result["errors"],
            result["stdout"][:3],
            result["elsewhere"],
        )
        assert result["lines"] == sorted(result["lines"])
        assert not result["errors"]


def test_the_kernels_numbers_never_reach_the_frontend(
    kernel_dir: Path, own_server: RemoteServer
) -> None:
    """The agent's sequence numbers are the proxy's business: stripped from every message."""
    with proxy_kernel(kernel_dir, "cgpu-test-stall-strip", own_server) as (_, kc):
        msg_id = kc.execute("print('hello', flush=True)\ndisplay({'text/plain': 'x'}, raw=True)")
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            seen.append(msg)
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
        kinds = [m["msg_type"] for m in seen]
        assert "stream" in kinds and "display_data" in kinds, kinds
        assert all("cgpu_seq" not in m["metadata"] for m in seen), [m["metadata"] for m in seen]


@pytest.mark.slow  # 50-75 s; the bounded no-journal run: test_reconnect's cuts without it
def test_without_the_journal_a_frozen_server_is_reported_honestly(
    kernel_dir: Path, own_server: RemoteServer
) -> None:
    """No journal: lines dropped during the stop cannot come back, so the proxy must not say
    "nothing was lost", and the cell still ends (with its idle, or a clear error)."""
    lines = 3000
    with proxy_kernel(
        kernel_dir, "cgpu-test-stall-nojournal", own_server, "--output-journal=False"
    ) as (_, kc):
        # the probe's own idle may be dropped too: it is waited for up to 60 s after the stop
        result = run_frozen(kc, own_server, lines, after=2, stop=10, deadline=80)
        _, duplicated = lost_and_duplicated(result["lines"], lines)
        assert duplicated == 0
        assert result["idle"] or result["errors"]
        assert "nothing was lost" not in result["notices"], result["notices"]
        assert "may be missing" in result["notices"], result["notices"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_long_freeze_loses_no_line(kernel_dir: Path, own_server: RemoteServer) -> None:
    """As the issue reported it: 40 s stopped under 500 lines/s (default ping interval 10 s is
    not used here: the stall is seen after ~2 s, the revival at once)."""
    lines = 25000  # 100 MB: the journal is raised to hold the 40 s of it
    with proxy_kernel(
        kernel_dir,
        "cgpu-test-stall-long",
        own_server,
        "--journal-max-bytes=400000000",
        "--journal-max-messages=50000",
    ) as (_, kc):
        result = run_frozen(kc, own_server, lines, after=3, stop=40, deadline=300)
        lost, duplicated = lost_and_duplicated(result["lines"], lines)
        assert result["idle"]
        assert_in_order_unless_told(result)
        assert (lost, duplicated) == (0, 0), (
            result["notices"],
            missing_ranges(result["lines"], lines),
        )
        assert_told_the_truth(result["notices"], lost)


SLOW_JOURNAL_ONCE = """
import time
kernel = get_ipython().kernel
answer = kernel.control_handlers['cgpu_journal_request']
slow = [True]
def slow_once(stream, ident, parent):
    if slow[0]:
        slow[0] = False
        time.sleep(7)  # as a kernel holding the GIL for 7 s would
    return answer(stream, ident, parent)
kernel.control_handlers['cgpu_journal_request'] = slow_once
"""


def test_one_slow_journal_answer_does_not_switch_the_journal_off(
    kernel_dir: Path, own_server: RemoteServer
) -> None:
    """The journal answers the first reconnection after 7 s (past the 5 s first wait); it is
    asked again and waited for, and every later reset is covered too: 0 lost."""
    lines = 3000
    with FaultyPath(own_server.port) as path:
        spec = install_spec(
            kernel_dir,
            "cgpu-test-slow-journal",
            "jupyter",
            url=path.url,
            token_file=own_server.token_file,
            extra=[
                "--ping-interval=0.5",
                "--outage-notice-after=1",
                "--max-output-bytes=1000000000",
            ],
        )
        km, kc = start_kernel(spec)
        try:
            reply, _ = run_cell(kc, SLOW_JOURNAL_ONCE)
            assert reply["content"]["status"] == "ok", reply["content"]
            msg_id = kc.execute(numbered_cell(lines, per_second=150))  # 20 s

            def strike() -> None:
                time.sleep(1)
                path.reset()  # the slow answer
                time.sleep(9)
                for _ in range(6):  # later resets: the journal must still be asked
                    path.reset()
                    time.sleep(1.2)

            striker = threading.Thread(target=strike, daemon=True)
            striker.start()
            result = collect(kc, msg_id, time.monotonic() + 60)
            striker.join()
            lost, duplicated = lost_and_duplicated(result["lines"], lines)
            assert result["idle"]
            assert (lost, duplicated) == (0, 0), result["notices"]
            assert_in_order_unless_told(result)
        finally:
            path.restore()
            kc.stop_channels()
            km.shutdown_kernel(now=True)


LARGE_COMM = """
import time
from comm import create_comm
comm = create_comm(target_name='cgpu-test-upload', data={})
time.sleep(1.5)
comm.send(data={'part': 1}, buffers=[b'x' * 3_000_000])
time.sleep(3)
print('done', flush=True)
"""


def test_a_large_comm_message_lost_in_a_cut_is_reported(
    kernel_dir: Path, own_server: RemoteServer
) -> None:
    """A 3 MB comm message (over a quarter of a 8 MB journal: kept only as a gap) written into
    a blackholed socket that is then reset: the cell is told what was lost and how big."""
    with FaultyPath(own_server.port) as path:
        spec = install_spec(
            kernel_dir,
            "cgpu-test-large-gap",
            "jupyter",
            url=path.url,
            token_file=own_server.token_file,
            extra=["--ping-interval=5", "--outage-notice-after=0", "--journal-max-bytes=8000000"],
        )
        km, kc = start_kernel(spec)
        try:
            run_cell(kc, "1")
            msg_id = kc.execute(LARGE_COMM)

            def strike() -> None:
                time.sleep(0.8)
                path.blackhole()
                time.sleep(2.0)  # the comm message goes into the held socket at 1.5 s
                path.reset()
                path.restore()

            striker = threading.Thread(target=strike, daemon=True)
            striker.start()
            result = collect(kc, msg_id, time.monotonic() + 40)
            striker.join()
            assert result["idle"]
            assert result["stdout"] == ["done"]
            notices = result["notices"]
            assert "comm_msg" in notices, notices
            assert "3.0 MB" in notices, notices
            assert "nothing was lost" not in notices
        finally:
            path.restore()
            kc.stop_channels()
            km.shutdown_kernel(now=True)
