"""The warm local server that ``cgpu-kernel run`` keeps between runs (``backends.warm_server``).

Real processes throughout: ``cgpu-kernel run`` as a subprocess, the real ``local_server`` with its
spare kernels, real ipykernels. Each test has a state folder of its own (so its own warm
servers), a short idle timeout where it waits for one, and stops what it started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from jupyter_client.manager import KernelManager

from cgpu_kernel.backends import warm_server
from cgpu_kernel.exceptions import RemoteUnreachableError

pytestmark = pytest.mark.skipif(not warm_server.supported(), reason="warm servers need flock")


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A state folder of this test's own (runs find their warm server there); its warm servers
    are stopped at the end, and none of their processes may be left."""
    folder = tmp_path / "state"
    monkeypatch.setenv("CGPU_STATE_DIR", str(folder))
    monkeypatch.delenv("CGPU_LOCAL_SERVER", raising=False)
    monkeypatch.setenv("CGPU_LOCAL_SERVER_IDLE_TIMEOUT", "60")
    yield folder
    warm_server.stop_all(timeout=5)
    assert server_processes(folder) == []


def server_processes(state: Path) -> list[psutil.Process]:
    """This test's warm server processes (their command line names its state folder)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info.get("cmdline") or [])
        ours = "cgpu_kernel.backends.local_server" in cmdline and str(state) in cmdline
        if ours and not gone(process.pid):
            found.append(process)
    return found


def run(
    spec: str, code: str, *, cwd: Path | None = None, timeout: float = 60, **env: str
) -> dict[str, Any]:
    """``cgpu-kernel run --json CODE`` on ``spec``; its JSON document (asserted to be ok)."""
    done = subprocess.run(
        [sys.executable, "-m", "cgpu_kernel", "run", "--json", "--kernel", spec, code],
        capture_output=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
        env=dict(os.environ, **env),
    )
    try:
        document: dict[str, Any] = json.loads(done.stdout)
    except ValueError:
        raise AssertionError(done.stdout + done.stderr) from None
    assert document["status"] == "ok", document
    return document


def the_server() -> warm_server.WarmServer:
    (server,) = warm_server.list_servers()
    assert server.process() is not None
    return server


def wait_until(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_second_run_reuses_the_server_with_a_fresh_kernel(
    local_spec: str, state: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    first = run(
        local_spec,
        "import os; secret = 41; print(os.getpid(), os.getcwd(), os.environ.get('JUPYTER_TOKEN'))",
        cwd=work,
    )
    kernel_pid, cwd, token_seen = first["stdout"].split()
    server = the_server()
    assert cwd == str(work)  # the kernel runs in the run's folder, not the server's
    assert token_seen == "None"  # kernels do not inherit the server's token

    second = run(
        local_spec,
        "import os; print(os.getpid(), 'secret' in dir(), get_ipython().history_manager.hist_file)",
        cwd=tmp_path,
    )
    other_pid, leaked, history = second["stdout"].split()
    assert history == ":memory:"  # two kernels at once must not share history.sqlite
    assert the_server().pid == server.pid  # the same warm server...
    assert other_pid != kernel_pid and leaked == "False"  # ...and a fresh kernel, nothing leaks
    assert psutil.Process(int(other_pid)).parent().pid == server.pid
    assert not psutil.pid_exists(int(kernel_pid)) or wait_until(
        lambda: not psutil.pid_exists(int(kernel_pid)), 10
    )  # the first run's kernel was deleted

    # private: the folder 0700, the record (token, address), lock and log 0600
    folder = warm_server.warm_servers_dir()
    assert mode(folder) == 0o700
    for path in (
        warm_server.record_path(server.key),
        warm_server.lock_path(server.key),
        warm_server.log_path(server.key),
    ):
        assert mode(path) == 0o600, path
    # 127.0.0.1 only; the token in no command line, log, or anything run printed
    process = psutil.Process(server.pid)
    listening = [c for c in process.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
    assert server.token not in " ".join(process.cmdline())
    assert server.token not in warm_server.log_path(server.key).read_text()
    assert server.token not in json.dumps([first, second])
    status = subprocess.run(
        [sys.executable, "-m", "cgpu_kernel", "server", "status", "--json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert server.token not in status.stdout
    assert json.loads(status.stdout)["warm_servers"][0]["pid"] == server.pid


def test_idle_timeout_stops_the_server_and_its_kernels(local_spec: str, state: Path) -> None:
    run(local_spec, "print(1)", CGPU_LOCAL_SERVER_IDLE_TIMEOUT="2")
    server = the_server()
    process = psutil.Process(server.pid)
    kernels = process.children(recursive=True)
    assert kernels  # the spare started ahead for the next run
    process.wait(20)  # stops by itself: 2 s without a kernel
    assert wait_until(lambda: not any(k.is_running() for k in kernels), 10)
    assert warm_server.list_servers() == []  # its record went with it
    assert not warm_server.log_path(server.key).exists()


def test_server_stop_command_and_status(local_spec: str, state: Path) -> None:
    def cli(*args: str, check: bool = True) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cgpu_kernel", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert not check or done.returncode == 0, (done.returncode, done.stdout, done.stderr)
        return done.stdout

    assert "No warm local server running" in cli("server", "status")
    run(local_spec, "print(1)")
    server = the_server()
    assert f"warm local server pid {server.pid} on {server.url}" in cli("server", "status")
    # ``status`` exits 1 when any installed kernelspec's target does not answer: in the whole
    # suite, the session's kernel folder holds remote kernelspecs whose servers other tests
    # stopped, so only its listing of the warm server is asserted here.
    assert f"warm local server pid {server.pid}" in cli("status", check=False)
    kernels = psutil.Process(server.pid).children(recursive=True)
    assert f"Stopped the warm local server {server.describe()}" in cli("server", "stop")
    assert gone(server.pid)
    assert wait_until(lambda: not any(k.is_running() for k in kernels), 10)
    assert "No warm local server running" in cli("server", "status")
    assert "No warm local server was running" in cli("server", "stop")


def start_proxy(spec: str, log: Path) -> tuple[KernelManager, Any]:
    """A proxy on the warm server, launched as a frontend would, its log in ``log``."""
    km = KernelManager(kernel_name=spec)
    with log.open("wb") as handle:
        km.start_kernel(
            env=dict(os.environ, CGPU_LOCAL_SERVER="warm"),
            extra_arguments=["--log-level=INFO"],
            stdout=handle,
            stderr=handle,
        )
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def test_a_killed_server_is_replaced_with_a_log_line(
    local_spec: str, state: Path, tmp_path: Path
) -> None:
    run(local_spec, "print(1)")
    killed = the_server()
    os.kill(killed.pid, signal.SIGKILL)
    log = tmp_path / "proxy.log"
    began = time.monotonic()
    km, kc = start_proxy(local_spec, log)
    try:
        reply = kc.execute_interactive("1 + 1", timeout=30)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert time.monotonic() - began < 30
    replacement = the_server()
    assert replacement.pid != killed.pid
    text = log.read_text()
    assert f"the warm local server ({killed.describe()}) is gone" in text
    assert "starting a new one" in text
    assert killed.token not in text and replacement.token not in text
    # and the next run uses the replacement
    run(local_spec, "print(1)")
    assert the_server().pid == replacement.pid


def test_a_hung_server_or_one_refusing_its_token_is_replaced_not_waited_for(
    local_spec: str, state: Path
) -> None:
    run(local_spec, "print(1)")
    hung = the_server()
    os.kill(hung.pid, signal.SIGSTOP)  # alive, holding its port, answering nothing
    began = time.monotonic()
    run(local_spec, "print(2)")
    assert time.monotonic() - began < 30  # a probe of 3 s, a kill, a new server
    assert wait_until(lambda: gone(hung.pid), 10)
    refusing = the_server()
    assert refusing.pid != hung.pid
    record = warm_server.record_path(refusing.key)
    data = json.loads(record.read_text())
    record.write_text(json.dumps(data | {"token": "not-its-token"}))  # answers 403 now
    run(local_spec, "print(3)")
    assert the_server().pid not in (hung.pid, refusing.pid)
    assert wait_until(lambda: gone(refusing.pid), 10)  # stopped, not left running


def test_a_record_naming_another_process_is_replaced_and_that_process_left_alone(
    local_spec: str, state: Path
) -> None:
    """A stale record whose pid and port now belong to something else (pid and port reuse):
    the run must neither talk to that port's owner as if it were the server nor signal it."""
    run(local_spec, "print(1)")
    key = the_server().key
    warm_server.stop_all(timeout=5)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    try:
        warm_server.write_record(
            warm_server.WarmServer(
                key=key,
                pid=other.pid,
                create_time=psutil.Process(other.pid).create_time() - 100,
                port=listener.getsockname()[1],
                token="stale",
                idle_timeout=60,
                started="2020-01-01T00:00:00Z",
            )
        )
        run(local_spec, "print(1)")
        server = the_server()
        assert server.key == key and server.pid != other.pid
        assert other.poll() is None  # not signalled
    finally:
        other.kill()
        other.wait()
        listener.close()


def test_concurrent_runs_share_one_server_each_with_its_own_kernel(
    local_spec: str, state: Path
) -> None:
    command = [
        sys.executable,
        "-m",
        "cgpu_kernel",
        "run",
        "--json",
        "--kernel",
        local_spec,
        "import os; print(os.getpid())",
    ]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE) for _ in range(3)]
    outputs = [p.communicate(timeout=90)[0] for p in runs]
    documents = [json.loads(out) for out in outputs]
    assert [d["status"] for d in documents] == ["ok"] * 3, documents
    assert len({d["stdout"] for d in documents}) == 3  # three kernels
    server = the_server()  # one record...
    assert [p.pid for p in server_processes(state)] == [server.pid]  # ...and one server
    for document in documents:
        kernel = int(document["stdout"])
        assert not psutil.pid_exists(kernel) or wait_until(
            lambda k=kernel: not psutil.pid_exists(k), 10
        )


def test_a_kernel_whose_proxy_was_killed_is_deleted_then_the_server_stops(
    local_spec: str, state: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CGPU_LOCAL_SERVER_IDLE_TIMEOUT", "2")
    km, kc = start_proxy(local_spec, tmp_path / "proxy.log")
    reply = kc.execute_interactive("import os; print(os.getpid())", timeout=30)
    assert reply["content"]["status"] == "ok"
    server = the_server()
    kc.stop_channels()
    os.kill(km.provisioner.pid, signal.SIGKILL)  # type: ignore[union-attr]
    km.provisioner.process.wait()  # type: ignore[union-attr]
    km.cleanup_resources()
    # its kernel has nothing connected: deleted after 2 s, and the server stops 2 s later
    psutil.Process(server.pid).wait(30)
    assert warm_server.list_servers() == []


@pytest.mark.parametrize(
    "setting", [("CGPU_LOCAL_SERVER", "private"), ("CGPU_LOCAL_SERVER_IDLE_TIMEOUT", "0")]
)
def test_opting_out_keeps_no_server(local_spec: str, state: Path, setting: tuple[str, str]) -> None:
    name, value = setting
    document = run(local_spec, "print(1)", **{name: value})
    assert document["stdout"] == "1\n"
    assert warm_server.list_servers() == []
    assert server_processes(state) == []


def test_the_environment_key_ignores_only_the_shells_bookkeeping() -> None:
    base = {"HOME": "/home/me", "PATH": "/usr/bin", "PWD": "/a", "SHLVL": "1"}
    key = warm_server.environment_key(base)
    same = dict(base, PWD="/b", SHLVL="3", JPY_PARENT_PID="42", CGPU_LOCAL_SERVER="warm")
    assert warm_server.environment_key(same) == key
    assert warm_server.environment_key(dict(base, CUDA_VISIBLE_DEVICES="1")) != key
    assert warm_server.environment_key(dict(base, PATH="/opt/bin")) != key


def test_a_lock_held_elsewhere_times_out_with_what_to_do(state: Path) -> None:
    """Both forms of the lock (the proxy's, without blocking its event loop, and the command
    line's) wait while another open of the lock holds it, give up after their timeout with an
    error that says what to do, and take the lock once it is free."""
    key = "lock-test"
    state.mkdir(parents=True, exist_ok=True)
    with warm_server.locked_blocking(key, 1):
        began = time.monotonic()
        with (
            pytest.raises(RemoteUnreachableError) as blocking,
            warm_server.locked_blocking(key, 0.2),
        ):
            pass
        assert time.monotonic() - began >= 0.2
        with pytest.raises(RemoteUnreachableError) as waiting:

            async def take() -> None:
                async with warm_server.locked(key, 0.2):
                    pass

            asyncio.run(take())
    for error in (blocking.value, waiting.value):
        assert "held the warm local server's lock" in str(error)
        assert "CGPU_LOCAL_SERVER=private" in str(error)
    with warm_server.locked_blocking(key, 0.2):  # free again: taken at once
        pass
