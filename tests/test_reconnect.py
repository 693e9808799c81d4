"""Transparent reconnection: network faults between the proxy and a real jupyter-server.

The proxy talks to the server through :class:`tests.faults.FaultyPath`, which cuts, blackholes
and restores the path while a real cell runs on a real ipykernel.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from .conftest import (
    RemoteServer,
    assert_heartbeat_answers,
    collect_iopub,
    install_remote_spec,
    install_spec_via,
    run_cell,
    start_jupyter_server,
    start_kernel,
    stdout_of,
)
from .faults import FaultyPath

LINES = 300
PRINT_LINES = (
    f"import time\nfor i in range({LINES}):\n    print(i, flush=True)\n    time.sleep(0.015)\n"
)


@pytest.fixture
def path(jupyter_server: RemoteServer) -> Iterator[FaultyPath]:
    with FaultyPath(jupyter_server.port) as faulty:
        yield faulty


@contextlib.contextmanager
def kernel_through(
    spec: str, faulty: FaultyPath, stderr: IO[bytes] | None = None
) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    """A proxy kernel from ``spec`` (its log to ``stderr`` if given); at the end the path is
    healed first, so the proxy can shut its remote kernel down."""
    km, kc = start_kernel(spec) if stderr is None else start_kernel(spec, stderr=stderr)
    try:
        yield km, kc
    finally:
        faulty.restore()
        kc.stop_channels()
        km.shutdown_kernel()


@pytest.fixture
def proxy_through(
    kernel_dir: Path, path: FaultyPath, jupyter_server: RemoteServer
) -> Iterator[tuple[KernelManager, BlockingKernelClient, FaultyPath]]:
    spec = install_spec_via(kernel_dir, "cgpu-test-faulty", path.url, jupyter_server)
    with kernel_through(spec, path) as (km, kc):
        yield km, kc, path


@pytest.fixture
def proxy_carrying_on(
    kernel_dir: Path, path: FaultyPath, jupyter_server: RemoteServer
) -> Iterator[tuple[KernelManager, BlockingKernelClient, FaultyPath]]:
    """Like ``proxy_through``, with ``on_remote_death=continue``: a remote kernel that dies is
    replaced by a fresh one in the same proxy (the default, ``exit``, ends the proxy; see
    tests/test_dead_kernel.py)."""
    spec = install_spec_via(
        kernel_dir,
        "cgpu-test-faulty-continue",
        path.url,
        jupyter_server,
        "--on-remote-death=continue",
    )
    with kernel_through(spec, path) as (km, kc):
        yield km, kc, path


def numbered_lines(outputs: list[dict]) -> list[int]:
    return [int(line) for line in stdout_of(outputs).splitlines()]


def in_background(action: object) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def print_lines_under_faults(
    kc: BlockingKernelClient,
    fault: Callable[[], None],
    *,
    times: int,
    seed: int,
    spacing: tuple[float, float] = (0.3, 0.6),
) -> tuple[dict, list[dict]]:
    """Run the numbered-lines cell while ``fault`` strikes ``times`` times, at random moments
    ``spacing`` seconds apart (seeded: the same moments every run)."""
    rng = random.Random(seed)

    def strike() -> None:
        for _ in range(times):
            time.sleep(rng.uniform(*spacing))
            fault()

    striker = in_background(strike)
    reply, outputs = run_cell(kc, PRINT_LINES, timeout=90)
    striker.join()
    return reply, outputs


@pytest.mark.parametrize("fault", ["cut", "reset"])
def test_cuts_mid_cell_lose_nothing(
    proxy_through: tuple[KernelManager, BlockingKernelClient, FaultyPath], fault: str
) -> None:
    """Graceful closes and TCP resets at random points: every line once, in order.

    A stock jupyter-server loses what it wrote into the socket at the instant of a cut (no
    acknowledgements); the remote kernel's output journal brings exactly that back.
    """
    _, kc, faulty = proxy_through
    run_cell(kc, "survivor = 'still here'")
    inject = faulty.cut if fault == "cut" else faulty.reset
    reply, outputs = print_lines_under_faults(kc, inject, times=6, seed=7, spacing=(0.2, 0.6))
    assert reply["content"]["status"] == "ok", reply["content"]
    assert numbered_lines(outputs) == list(range(LINES))
    assert faulty.connections_seen > 6  # it really did reconnect
    _, outputs = run_cell(kc, "print(survivor)")
    assert stdout_of(outputs) == "still here\n"


@pytest.mark.parametrize("server_fixture", ["kernel_gateway", "legacy_server"])
def test_cuts_lose_nothing_through_other_servers(
    kernel_dir: Path, request: pytest.FixtureRequest, server_fixture: str
) -> None:
    """Kernel Gateway, and a server speaking only the legacy JSON protocol: the journal's
    control message and its buffers pass through both."""
    server: RemoteServer = request.getfixturevalue(server_fixture)
    with FaultyPath(server.port) as faulty:
        spec = install_spec_via(kernel_dir, f"cgpu-test-{server_fixture}", faulty.url, server)
        with kernel_through(spec, faulty) as (_, kc):
            reply, outputs = print_lines_under_faults(kc, faulty.reset, times=4, seed=5)
            assert reply["content"]["status"] == "ok", reply["content"]
            assert numbered_lines(outputs) == list(range(LINES))
            assert faulty.connections_seen > 4


def test_journal_comes_back_after_the_kernel_crashes_and_restarts(
    proxy_carrying_on: tuple[KernelManager, BlockingKernelClient, FaultyPath],
) -> None:
    """The server restarts a crashed kernel; the new process gets a journal of its own."""
    _, kc, faulty = proxy_carrying_on
    reply, _ = run_cell(kc, "import os; os._exit(1)", timeout=60)
    assert reply["content"]["status"] == "error"
    deadline = time.monotonic() + 30
    while run_cell(kc, "1", timeout=30)[0]["content"]["status"] != "ok":
        assert time.monotonic() < deadline, "the restarted kernel never ran a cell"
        time.sleep(0.5)
    reply, outputs = print_lines_under_faults(kc, faulty.reset, times=4, seed=3)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert numbered_lines(outputs) == list(range(LINES))


def test_a_journal_that_stops_answering_falls_back_to_the_replay(
    kernel_dir: Path, path: FaultyPath, jupyter_server: RemoteServer, tmp_path: Path
) -> None:
    """The journal's control handler is gone (as behind a gateway that filters unknown message
    types): the control probe sent behind the first request after a reconnection is answered
    and the request is not, which proves nothing will answer it. The proxy stops asking at once
    (no output held for the journal's patience at each outage) and carries on with the server's
    replay; output is never duplicated or reordered and the cell completes."""
    spec = install_spec_via(kernel_dir, "cgpu-test-journal-gone", path.url, jupyter_server)
    log_path = tmp_path / "proxy.log"
    with log_path.open("wb") as log, kernel_through(spec, path, stderr=log) as (_, kc):
        reply, _ = run_cell(
            kc, "get_ipython().kernel.control_handlers.pop('cgpu_journal_request', None)"
        )
        assert reply["content"]["status"] == "ok"

        def cut_twice() -> None:
            time.sleep(0.5)
            path.cut()
            time.sleep(3)  # a second outage, with the journal already known to be gone
            path.cut()

        cutter = in_background(cut_twice)
        code = (
            f"import time\nfor i in range({LINES}):\n    print(i, flush=True)\n"
            "    time.sleep(0.03)\n"
        )
        reply, outputs = run_cell(kc, code, timeout=90)
        cutter.join()
        lines = numbered_lines(outputs)
        assert lines == sorted(set(lines))
        if reply["content"]["status"] == "ok":
            assert lines[-1] == LINES - 1
        else:  # the reply itself was in the lost instant
            assert reply["content"]["ename"] == "RemoteReplyLost"
        _, outputs = run_cell(kc, "print('after')")
        assert stdout_of(outputs) == "after\n"
    text = log_path.read_text()
    assert text.count("answers control requests but not the output journal's") == 1, text
    assert "did not answer within" not in text and "has not answered yet" not in text, text


def test_without_the_journal_cuts_never_duplicate_or_reorder(
    kernel_dir: Path, path: FaultyPath, jupyter_server: RemoteServer
) -> None:
    """--no-output-journal (or a kernel that cannot hold one): the server's replay only. Lines
    written at the instant of a cut may be missing, but never twice, never out of order, and a
    cell whose reply was lost is answered, not left busy."""
    spec = install_spec_via(
        kernel_dir, "cgpu-test-nojournal", path.url, jupyter_server, "--output-journal=False"
    )
    with kernel_through(spec, path) as (_, kc):
        reply, outputs = print_lines_under_faults(
            kc, path.cut, times=5, seed=11, spacing=(0.3, 0.7)
        )
        lines = numbered_lines(outputs)
        assert lines == sorted(set(lines))
        if reply["content"]["status"] == "ok":
            assert lines[-1] == LINES - 1
        else:  # the reply itself was in the lost instant
            assert reply["content"]["ename"] == "RemoteReplyLost"


def test_blackhole_mid_cell_loses_nothing(
    proxy_through: tuple[KernelManager, BlockingKernelClient, FaultyPath],
) -> None:
    _, kc, faulty = proxy_through
    run_cell(kc, "survivor = 1")

    def blackholes() -> None:
        time.sleep(0.5)
        faulty.blackhole()  # long enough to be declared stalled (2 pings) and reconnect
        time.sleep(4)
        faulty.restore()
        time.sleep(0.5)
        faulty.blackhole()  # short: TCP rides it out
        time.sleep(0.4)
        faulty.restore()

    thread = in_background(blackholes)
    reply, outputs = run_cell(kc, PRINT_LINES, timeout=90)
    thread.join()
    assert reply["content"]["status"] == "ok"
    assert numbered_lines(outputs) == list(range(LINES))
    notices = "".join(
        m["content"]["text"]
        for m in outputs
        if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
    )
    assert "lost the connection" in notices
    assert "reconnected after" in notices
    _, outputs = run_cell(kc, "print(survivor + 1)")
    assert stdout_of(outputs) == "2\n"


def test_requests_sent_during_an_outage_run_once_after(
    proxy_through: tuple[KernelManager, BlockingKernelClient, FaultyPath],
) -> None:
    km, kc, faulty = proxy_through
    run_cell(kc, "counter = 0")
    faulty.blackhole()
    faulty.cut()  # down, and staying down until restored
    time.sleep(0.5)
    ids = [kc.execute("counter += 1") for _ in range(3)]
    time.sleep(1.5)
    assert_heartbeat_answers(km)  # the frontend must not think the kernel died
    faulty.restore()
    for msg_id in ids:
        collect_iopub(kc, msg_id, timeout=60)
    _, outputs = run_cell(kc, "print(counter)")
    assert stdout_of(outputs) == "3\n"


def test_reconnect_budget_runs_out_then_kernel_is_usable(
    kernel_dir: Path, path: FaultyPath, jupyter_server: RemoteServer
) -> None:
    name = install_spec_via(
        kernel_dir, "cgpu-test-budget", path.url, jupyter_server, "--reconnect-budget=2"
    )
    with kernel_through(name, path) as (_, kc):
        run_cell(kc, "kept = 'variables survive a failed reconnection'")
        msg_id = kc.execute("import time; time.sleep(8); print('finished')")
        time.sleep(0.5)
        path.blackhole()
        path.cut()
        started = time.monotonic()
        outputs = collect_iopub(kc, msg_id, timeout=60)
        waited = time.monotonic() - started
        errors = [m["content"] for m in outputs if m["msg_type"] == "error"]
        assert errors and "Gave up reconnecting" in errors[0]["evalue"]
        assert waited < 30  # an error, not a hang (the cell itself would take 8 s)
        path.restore()
        _reply, outputs = run_cell(kc, "print(kept)", timeout=60)
        assert stdout_of(outputs) == "variables survive a failed reconnection\n"


def test_remote_kernel_deleted_behind_our_back(
    proxy_carrying_on: tuple[KernelManager, BlockingKernelClient, FaultyPath],
    jupyter_server: RemoteServer,
) -> None:
    _, kc, _ = proxy_carrying_on
    run_cell(kc, "doomed = True")
    before = jupyter_server.kernel_ids()
    msg_id = kc.execute("import time; time.sleep(30)")
    time.sleep(1)
    for kernel_id in before:
        model = jupyter_server.api("GET", f"api/kernels/{kernel_id}")
        if model["connections"]:
            jupyter_server.api("DELETE", f"api/kernels/{kernel_id}")
    started = time.monotonic()
    outputs = collect_iopub(kc, msg_id, timeout=30)
    assert time.monotonic() - started < 20  # fails fast, long before the 30 s sleep
    errors = [m["content"] for m in outputs if m["msg_type"] == "error"]
    # the server interrupts a kernel before deleting it; whichever error comes first, it ends
    assert errors and errors[0]["ename"] in ("KeyboardInterrupt", "RemoteKernelLost")
    time.sleep(1)
    _reply, outputs = run_cell(kc, "print('fresh kernel')", timeout=60)
    assert stdout_of(outputs) == "fresh kernel\n"
    told = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
    assert "previous remote kernel was lost" in told
    assert "Variables from earlier cells are gone" in told
    reply, _ = run_cell(kc, "doomed")
    assert reply["content"]["ename"] == "NameError"


def test_remote_server_restarted(kernel_dir: Path, tmp_path: Path) -> None:
    server = start_jupyter_server(tmp_path / "first")
    port = server.port
    name = install_remote_spec(
        kernel_dir,
        "cgpu-test-restarted",
        server,
        extra=["--ping-interval=0.5", "--on-remote-death=continue"],
    )
    km, kc = start_kernel(name)
    second = None
    try:
        msg_id = kc.execute("import time; time.sleep(30)")
        time.sleep(1)
        server.stop()
        second = start_jupyter_server(tmp_path / "second", port=port, token=server.token)
        outputs = collect_iopub(kc, msg_id, timeout=30)
        errors = [m["content"] for m in outputs if m["msg_type"] == "error"]
        assert errors and errors[0]["ename"] == "RemoteKernelLost"
        assert "variables are lost" in errors[0]["evalue"]
        _reply, outputs = run_cell(kc, "print('on the new server')", timeout=60)
        assert stdout_of(outputs) == "on the new server\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
        if second is not None:
            second.stop()
