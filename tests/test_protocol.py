"""The full protocol through the proxy, driven by real jupyter_client frontends.

Remote: a real jupyter-server (and, where marked, Kernel Gateway) on loopback with ipykernel.
"""

from __future__ import annotations

import queue
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from jupyter_client.session import Session

from .conftest import (
    TIMEOUT,
    RemoteServer,
    assert_heartbeat_answers,
    collect_iopub,
    run_cell,
    start_kernel,
    stdout_of,
)

ECHO_TARGET = """
def _echo_target(comm, open_msg):
    @comm.on_msg
    def _echo(msg):
        received = [bytes(b) for b in msg["buffers"]]
        comm.send({"sizes": [len(b) for b in received]}, buffers=[b[::-1] for b in received])
get_ipython().kernel.comm_manager.register_target("cgpu_echo", _echo_target)
"""


def test_state_persists_between_cells(proxy: tuple[KernelManager, BlockingKernelClient]) -> None:
    _, kc = proxy
    reply, _ = run_cell(kc, "x = 6 * 7")
    assert reply["content"]["status"] == "ok"
    reply, outputs = run_cell(kc, "print(x)")
    assert stdout_of(outputs) == "42\n"
    states = [m["content"]["execution_state"] for m in outputs if m["msg_type"] == "status"]
    assert states[0] == "busy" and states[-1] == "idle"


def test_input_and_getpass(any_remote: tuple[str, RemoteServer]) -> None:
    km, kc = start_kernel(any_remote[0])
    try:
        msg_id = kc.execute("name = input('name? ')", allow_stdin=True)
        request = kc.get_stdin_msg(timeout=TIMEOUT)
        assert request["msg_type"] == "input_request"
        assert request["content"] == {"prompt": "name? ", "password": False}
        kc.input("Ada ✓")
        collect_iopub(kc, msg_id)
        assert kc.get_shell_msg(timeout=TIMEOUT)["content"]["status"] == "ok"

        msg_id = kc.execute("import getpass; secret = getpass.getpass('pw: ')", allow_stdin=True)
        request = kc.get_stdin_msg(timeout=TIMEOUT)
        assert request["content"]["password"] is True
        kc.input("hunter2")
        collect_iopub(kc, msg_id)
        kc.get_shell_msg(timeout=TIMEOUT)
        _, outputs = run_cell(kc, "print(name, secret)")
        assert stdout_of(outputs) == "Ada ✓ hunter2\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_an_input_asked_before_the_frontends_stdin_connects_reaches_it(jupyter_spec: str) -> None:
    """A frontend connects each socket on its own, retrying every 100 ms until the kernel has
    bound it, so its stdin can connect after its shell has sent the cell. A ROUTER drops a
    message for a peer it does not know, so a quick ``input()`` was lost and the cell waited
    forever (``cgpu-kernel run`` with piped input hung about one run in twenty). Here the
    frontend's stdin connects a second after the kernel asked: the prompt must still come."""
    km = KernelManager(kernel_name=jupyter_spec)
    km.start_kernel()
    kc = km.client()
    kc.start_channels(stdin=False)
    try:
        kc.wait_for_ready(timeout=60)
        msg_id = kc.execute("late = input('late? ')", allow_stdin=True)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:  # the kernel is in input(): busy, no reply
            msg = kc.get_iopub_msg(timeout=TIMEOUT)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
                break
        time.sleep(1.0)  # it asked by now, with no stdin socket connected
        kc.stdin_channel.start()
        request = kc.get_stdin_msg(timeout=TIMEOUT)
        assert request["content"] == {"prompt": "late? ", "password": False}
        kc.input("here")
        collect_iopub(kc, msg_id)
        assert kc.get_shell_msg(timeout=TIMEOUT)["content"]["status"] == "ok"
        _, outputs = run_cell(kc, "print(late)")
        assert stdout_of(outputs) == "here\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_two_frontends_share_one_kernel(
    proxy: tuple[KernelManager, BlockingKernelClient],
) -> None:
    km, notebook = proxy
    # a second frontend has its own session, hence its own ZMQ identity
    console = km.client(
        session=Session(key=km.session.key, signature_scheme=km.session.signature_scheme)
    )
    console.start_channels()
    try:
        console.wait_for_ready(timeout=TIMEOUT)
        run_cell(notebook, "shared = 'from the notebook'")
        _reply, outputs = run_cell(console, "print(shared)")
        assert stdout_of(outputs) == "from the notebook\n"
        # The console's input_request reaches the console only, never the notebook.
        msg_id = console.execute("answer = input()", allow_stdin=True)
        assert console.get_stdin_msg(timeout=TIMEOUT)["msg_type"] == "input_request"
        with pytest.raises(queue.Empty):
            notebook.get_stdin_msg(timeout=1)
        console.input("console answer")
        collect_iopub(console, msg_id)
        assert console.get_shell_msg(timeout=TIMEOUT)["parent_header"]["msg_id"] == msg_id
        # The notebook's shell socket got no reply meant for the console.
        with pytest.raises(queue.Empty):
            notebook.get_shell_msg(timeout=1)
    finally:
        console.stop_channels()


def test_binary_buffers_round_trip(any_remote: tuple[str, RemoteServer]) -> None:
    km, kc = start_kernel(any_remote[0])
    try:
        run_cell(kc, ECHO_TARGET)
        comm_id = uuid.uuid4().hex
        array = np.random.default_rng(1).integers(0, 256, 3_000_000, dtype=np.uint8)
        payloads = [array.tobytes(), b"", bytes(range(256))]
        session, shell = kc.session, kc.shell_channel.socket
        session.send(
            shell, "comm_open", {"comm_id": comm_id, "target_name": "cgpu_echo", "data": {}}
        )
        session.send(shell, "comm_msg", {"comm_id": comm_id, "data": {}}, buffers=payloads)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            msg = kc.get_iopub_msg(timeout=TIMEOUT)
            if msg["msg_type"] == "comm_msg" and msg["content"]["comm_id"] == comm_id:
                break
        assert msg["content"]["data"] == {"sizes": [len(p) for p in payloads]}
        assert [bytes(b) for b in msg["buffers"]] == [p[::-1] for p in payloads]
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def interrupt_a_sleeping_cell(name: str, mode: str) -> None:
    """Interrupt a cell the way ``mode`` says (jupyter_client chooses from the kernelspec: an
    ``interrupt_request`` on control, or SIGINT to the proxy); it ends with KeyboardInterrupt
    soon, and the kernel keeps its variables and keeps working."""
    km, kc = start_kernel(name)
    try:
        assert km.kernel_spec is not None and km.kernel_spec.interrupt_mode == mode
        run_cell(kc, "kept = 'still here'")
        msg_id = kc.execute("import time; time.sleep(60)")
        wait_for_busy(kc, msg_id)
        started = time.monotonic()
        km.interrupt_kernel()
        outputs = collect_iopub(kc, msg_id)
        assert time.monotonic() - started < 15
        errors = [m for m in outputs if m["msg_type"] == "error"]
        assert errors and errors[0]["content"]["ename"] == "KeyboardInterrupt"
        _, outputs = run_cell(kc, "print(kept)")
        assert stdout_of(outputs) == "still here\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_interrupt_message_mode(any_remote: tuple[str, RemoteServer]) -> None:
    interrupt_a_sleeping_cell(any_remote[0], "message")


def test_interrupt_signal_mode(kernel_dir: Path, any_remote: tuple[str, RemoteServer]) -> None:
    from .conftest import install_remote_spec

    name, server = any_remote
    signal_spec = install_remote_spec(kernel_dir, f"{name}-signal", server, interrupt_mode="signal")
    interrupt_a_sleeping_cell(signal_spec, "signal")


@pytest.mark.parametrize("mode", ["message", "signal"])
def test_interrupt_both_modes_on_the_local_backend(kernel_dir: Path, mode: str) -> None:
    from .conftest import install_spec

    name = install_spec(kernel_dir, f"cgpu-test-local-{mode}", "local", interrupt_mode=mode)
    interrupt_a_sleeping_cell(name, mode)


def wait_for_busy(kc: BlockingKernelClient, msg_id: str) -> None:
    while True:
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
            time.sleep(0.3)
            return


def test_restart_and_shutdown_leave_no_remote_kernels(
    any_remote: tuple[str, RemoteServer],
) -> None:
    name, server = any_remote
    before = server.kernel_ids()
    km, kc = start_kernel(name)
    try:
        run_cell(kc, "marker = 'old state'")
        (first,) = server.kernel_ids() - before
        km.restart_kernel()
        kc.wait_for_ready(timeout=60)
        reply, _ = run_cell(kc, "marker")
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "NameError"  # fresh remote state
        now = server.kernel_ids() - before
        assert first not in now and len(now) == 1  # the old remote kernel was deleted
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert server.wait_for_kernel_count(len(before)) == before


def test_frontend_crash_deletes_remote_kernel(
    jupyter_spec: str, jupyter_server: RemoteServer, tmp_path: Path
) -> None:
    """The frontend dies without a shutdown: the proxy notices and deletes its remote kernel."""
    import subprocess
    import sys

    before = jupyter_server.kernel_ids()
    script = (
        "import sys, time\n"
        "from jupyter_client.manager import start_new_kernel\n"
        f"km, kc = start_new_kernel(kernel_name={jupyter_spec!r})\n"
        "print(km.provisioner.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    frontend = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert frontend.stdout is not None
        proxy_pid = int(frontend.stdout.readline())
        assert len(jupyter_server.wait_for_kernel_count(len(before) + 1)) == len(before) + 1
    finally:
        frontend.kill()
        frontend.wait()
    assert jupyter_server.wait_for_kernel_count(len(before)) == before
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(proxy_pid):
        time.sleep(0.2)
    assert not _alive(proxy_pid)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkilled_proxy_kernel_is_reclaimed(
    jupyter_spec: str, jupyter_server: RemoteServer
) -> None:
    import subprocess
    import sys

    before = jupyter_server.kernel_ids()
    km, kc = start_kernel(jupyter_spec)
    orphan = next(iter(jupyter_server.kernel_ids() - before))
    kc.stop_channels()
    km.provisioner.process.kill()  # type: ignore[union-attr]
    km.provisioner.process.wait()  # type: ignore[union-attr]
    assert orphan in jupyter_server.kernel_ids()  # nobody could delete it yet
    # `cgpu-kernel reclaim` deletes it (the next proxy on this server would too)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cgpu_kernel",
            "reclaim",
            "--token-file",
            str(jupyter_server.token_file),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "deleted 1 kernel(s)" in done.stdout
    assert orphan not in jupyter_server.kernel_ids()
    km.cleanup_resources()


def test_next_proxy_reclaims_orphans(jupyter_spec: str, jupyter_server: RemoteServer) -> None:
    before = jupyter_server.kernel_ids()
    km, kc = start_kernel(jupyter_spec)
    orphan = next(iter(jupyter_server.kernel_ids() - before))
    kc.stop_channels()
    km.provisioner.process.kill()  # type: ignore[union-attr]
    km.provisioner.process.wait()  # type: ignore[union-attr]
    km.cleanup_resources()
    km2, kc2 = start_kernel(jupyter_spec)
    try:
        run_cell(kc2, "1")
        assert orphan not in jupyter_server.kernel_ids()
    finally:
        kc2.stop_channels()
        km2.shutdown_kernel()


def test_vscode_style_raw_client(proxy: tuple[KernelManager, BlockingKernelClient]) -> None:
    """One routing id on shell, control and stdin; no heartbeat; interrupt_request on shell."""
    km, _ = proxy
    info = km.get_connection_info()
    session = Session(key=info["key"], signature_scheme=info["signature_scheme"])
    context = zmq.Context()
    identity = secrets.token_hex(8).encode()
    sockets = {}
    for channel in ("shell", "control", "stdin"):
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.linger = 0
        sock.connect(f"tcp://{info['ip']}:{info[f'{channel}_port']}")
        sockets[channel] = sock
    iopub = context.socket(zmq.SUB)
    iopub.setsockopt(zmq.SUBSCRIBE, b"")
    iopub.linger = 0
    iopub.connect(f"tcp://{info['ip']}:{info['iopub_port']}")
    try:
        welcome = session.recv(iopub, mode=0)[1]
        assert welcome is not None and welcome["msg_type"] == "iopub_welcome"

        def recv(channel: str) -> dict[str, Any]:
            if not sockets[channel].poll(TIMEOUT * 1000):
                raise TimeoutError(channel)
            return session.recv(sockets[channel], mode=0)[1]  # type: ignore[return-value]

        sent = session.send(
            sockets["shell"],
            "execute_request",
            {
                "code": "reply = input('? ')",
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": True,
                "stop_on_error": True,
            },
        )
        request = recv("stdin")
        assert request["msg_type"] == "input_request"
        assert request["parent_header"]["msg_id"] == sent["header"]["msg_id"]
        session.send(
            sockets["stdin"], "input_reply", {"value": "from vscode"}, parent=request["header"]
        )
        assert recv("shell")["content"]["status"] == "ok"

        sent = session.send(
            sockets["shell"],
            "execute_request",
            {
                "code": "import time; time.sleep(60)",
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": False,
            },
        )
        time.sleep(1.5)
        session.send(sockets["shell"], "interrupt_request", {})
        replies = [recv("shell"), recv("shell")]
        by_type = {r["msg_type"]: r for r in replies}
        assert by_type["interrupt_reply"]["content"]["status"] == "ok"
        assert by_type["execute_reply"]["content"]["ename"] == "KeyboardInterrupt"

        session.send(
            sockets["shell"],
            "execute_request",
            {
                "code": "reply",
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": False,
                "stop_on_error": True,
            },
        )
        assert recv("shell")["content"]["status"] == "ok"
    finally:
        context.destroy(linger=0)


def test_mis_signed_and_malformed_messages_are_rejected(
    proxy: tuple[KernelManager, BlockingKernelClient], tmp_path: Path
) -> None:
    km, kc = proxy
    info = km.get_connection_info()
    marker = tmp_path / "executed"
    code = f"open({str(marker)!r}, 'w').close()"
    context = zmq.Context()
    shell = context.socket(zmq.DEALER)
    shell.linger = 0
    shell.connect(f"tcp://{info['ip']}:{info['shell_port']}")
    try:
        wrong_key = Session(key=b"not-the-key", signature_scheme=info["signature_scheme"])
        wrong_key.send(shell, "execute_request", {"code": code, "silent": False})
        right_key = Session(key=info["key"], signature_scheme=info["signature_scheme"])
        msg = right_key.msg("execute_request", {"code": code, "silent": False})
        frames = right_key.serialize(msg)
        tampered = list(frames)
        tampered[-1] = tampered[-1].replace(b"close()", b"close();1")  # content changed, same sig
        shell.send_multipart(tampered)
        shell.send_multipart([b"garbage"])
        shell.send_multipart([b"<IDS|MSG>", b"", b"{}", b"{}"])
        # valid signature, invalid JSON content
        parts = [right_key.pack(msg["header"]), b"{}", b"{}", b"{not json"]
        shell.send_multipart([b"<IDS|MSG>", right_key.sign(parts), *parts])
        shell.send_multipart(frames)  # the genuine one: runs once
        shell.send_multipart(frames)  # a replay of it: rejected
        time.sleep(2)
        _reply, _ = run_cell(kc, f"import os; print(os.path.exists({str(marker)!r}))")
        assert marker.exists()
        marker.unlink()
        time.sleep(1)
        assert not marker.exists()  # the replay did not run it again
        assert km.is_alive()
    finally:
        context.destroy(linger=0)


def test_heartbeat_answers(proxy: tuple[KernelManager, BlockingKernelClient]) -> None:
    assert_heartbeat_answers(proxy[0])


def test_requests_before_ready_are_queued(local_spec: str) -> None:
    """The local backend needs seconds to start its server: a cell sent at once still runs."""
    km = KernelManager(kernel_name=local_spec)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        reply, outputs = run_cell(kc, "print('queued and run')", timeout=60)
        assert reply["content"]["status"] == "ok"
        text = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        assert "waiting for" in text  # the user was told
        assert stdout_of(outputs) == "queued and run\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_token_never_in_argv_or_logs(
    jupyter_spec: str, jupyter_server: RemoteServer, tmp_path: Path
) -> None:
    log_path = tmp_path / "proxy.log"
    km = KernelManager(kernel_name=jupyter_spec)
    with log_path.open("wb") as log:
        km.start_kernel(stderr=log, extra_arguments=["--log-level=DEBUG"])
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        run_cell(kc, "print('hi')")
        import psutil

        argv = " ".join(psutil.Process(km.provisioner.pid).cmdline())  # type: ignore[union-attr]
        kc.stop_channels()
        km.shutdown_kernel()
    assert jupyter_server.token not in argv
    assert jupyter_server.token not in (km.kernel_spec.to_json() if km.kernel_spec else "")
    logged = log_path.read_text()
    assert "connected to" in logged  # the log is really there
    assert jupyter_server.token not in logged


def test_kernel_info_is_the_remote_kernels(
    proxy: tuple[KernelManager, BlockingKernelClient],
) -> None:
    _, kc = proxy
    kc.kernel_info()
    reply = kc.get_shell_msg(timeout=TIMEOUT)
    assert reply["content"]["implementation"] == "ipython"
    assert reply["content"]["language_info"]["name"] == "python"


def test_env_token_works(
    kernel_dir: Path, jupyter_server: RemoteServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .conftest import install_spec

    name = install_spec(kernel_dir, "cgpu-test-envtoken", "jupyter", url=jupyter_server.url)
    monkeypatch.setenv("CGPU_TOKEN", jupyter_server.token)
    km, kc = start_kernel(name)
    try:
        _, outputs = run_cell(kc, "print(1 + 1)")
        assert stdout_of(outputs) == "2\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


@pytest.mark.parametrize(
    ("spec_fixture", "expected"),
    [("jupyter_spec", "v1.kernel.websocket.jupyter.org"), ("legacy_spec", "legacy JSON")],
)
def test_websocket_protocol_negotiated(
    spec_fixture: str, expected: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    name = request.getfixturevalue(spec_fixture)
    log_path = tmp_path / "proxy.log"
    km = KernelManager(kernel_name=name)
    with log_path.open("wb") as log:
        km.start_kernel(stderr=log, extra_arguments=["--log-level=INFO"])
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            run_cell(kc, "1")
        finally:
            kc.stop_channels()
            km.shutdown_kernel()
    assert f"(protocol: {expected})" in log_path.read_text()


def test_every_execution_lands_in_the_history(
    proxy: tuple[KernelManager, BlockingKernelClient],
) -> None:
    from cgpu_kernel.run import history

    km, kc = proxy
    pid = km.provisioner.pid  # type: ignore[union-attr]
    run_cell(kc, "print('recorded ' * 3)")
    run_cell(kc, "1 / 0")
    deadline = time.monotonic() + 10  # records are written in batches, about once a second
    while True:
        mine = [r for r in history.read_records() if r["session"] == f"pid-{pid}"]
        if len(mine) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [r["status"] for r in mine[-2:]] == ["ok", "error"]
    assert mine[-2]["output_bytes"] > 0 and mine[-2]["source"] == "kernel"
    assert mine[-1]["category"] is not None
    assert "recorded" not in history.history_path().read_text()  # metadata only, never output
