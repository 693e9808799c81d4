"""The embedded default: a private jupyter-server per proxy, gone when the proxy is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from .conftest import run_cell, start_kernel, stdout_of


def local_servers(proxy_pid: int) -> list[psutil.Process]:
    return [
        child
        for child in psutil.Process(proxy_pid).children()
        if "cgpu_kernel.backends.local_server" in " ".join(child.cmdline())
    ]


def wait_gone(process: psutil.Process, timeout: float = 15) -> bool:
    try:
        process.wait(timeout)
    except psutil.TimeoutExpired:
        return False
    return True


def runtime_dirs(tmp: Path) -> list[Path]:
    """The private servers' runtime folders left in ``tmp`` (the proxy's TMPDIR)."""
    return list(tmp.glob("cgpu-local-server-*"))


def test_local_server_is_private_and_stopped_on_shutdown(local_spec: str, tmp_path: Path) -> None:
    km, kc = start_kernel(local_spec, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert len(runtime_dirs(tmp_path)) == 1  # the server's private runtime folder is there
    pid = km.provisioner.pid  # type: ignore[union-attr]
    (server,) = local_servers(pid)
    try:
        listening = [c for c in server.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
        assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening)
        assert "JUPYTER_TOKEN" not in " ".join(server.cmdline())
        _, outputs = run_cell(kc, "import os; print(os.getpid())")
        remote_pid = int(stdout_of(outputs))
        assert remote_pid not in (pid, server.pid)
        assert psutil.Process(remote_pid).parent() == server  # the kernel runs under the server
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert wait_gone(server)
    assert not psutil.pid_exists(remote_pid) or psutil.Process(remote_pid).status() == "zombie"
    assert runtime_dirs(tmp_path) == []  # and gone with it


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_local_server_stops_when_proxy_is_killed(local_spec: str, tmp_path: Path) -> None:
    km, kc = start_kernel(local_spec, env=dict(os.environ, TMPDIR=str(tmp_path)))
    pid = km.provisioner.pid  # type: ignore[union-attr]
    (server,) = local_servers(pid)
    _, outputs = run_cell(kc, "import os; print(os.getpid())")
    remote = psutil.Process(int(stdout_of(outputs)))
    kc.stop_channels()
    os.kill(pid, 9)
    km.provisioner.process.wait()  # type: ignore[union-attr]
    km.cleanup_resources()
    assert wait_gone(server)
    assert wait_gone(remote)
    assert runtime_dirs(tmp_path) == []


def test_demo_runs_the_quickstart() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cgpu_kernel", "demo"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Hello from the remote kernel" in done.stdout
    assert "squares still here: [49, 64, 81]" in done.stdout
    assert "proxy kernel process: pid" in done.stdout


def test_private_server_logs_stay_out_of_the_frontends_terminal(
    local_spec: str, tmp_path: Path
) -> None:
    from jupyter_client.manager import KernelManager

    from .conftest import run_cell

    stderr = tmp_path / "kernel-stderr.log"
    km = KernelManager(kernel_name=local_spec)
    with stderr.open("wb") as handle:
        km.start_kernel(stderr=handle)
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        run_cell(kc, "print('hi')")
        kc.stop_channels()
        km.shutdown_kernel()
    assert "ServerApp" not in stderr.read_text()  # e.g. "received signal 15, stopping"
