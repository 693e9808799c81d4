"""The cgpu kernel provisioner, driven by real ``KernelManager``\\ s and a real jupyter-server.

For a ``local``-backend kernelspec the provisioner owns the private Jupyter server: started in
``pre_launch``, kept across restarts (same pid, fresh kernel state), stopped by a real shutdown
or a failed launch, and adoptable by another manager through the provisioner info.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from jupyter_client.manager import KernelManager
from jupyter_client.provisioning.factory import KernelProvisionerFactory
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from cgpu_kernel import kernelspec
from cgpu_kernel.paths import registry_dir
from cgpu_kernel.provisioner import (
    PROVISIONER_NAME,
    CgpuProvisioner,
    spec_backend,
    without_backend,
)
from tests.conftest import RemoteServer, run_cell, start_kernel, stdout_of

SERVER_MODULE = "cgpu_kernel.backends.local_server"


def install_provisioned(kernel_dir: Path, name: str, argv: list[str] | None = None) -> str:
    spec = kernelspec.make_kernel_dict(
        argv or kernelspec.make_argv("local"),
        f"test {name}",
        backend="local",
        provisioner=PROVISIONER_NAME,
    )
    kernelspec.write_kernel_spec(spec, kernel_dir / "kernels" / name)
    return name


@pytest.fixture(scope="module")
def provisioned_spec(kernel_dir: Path) -> Iterator[str]:
    name = install_provisioned(kernel_dir, "cgpu-test-provisioned")
    yield name
    shutil.rmtree(kernel_dir / "kernels" / name, ignore_errors=True)


@pytest.fixture(autouse=True)
def _remove_test_kernelspecs(kernel_dir: Path) -> Iterator[None]:
    """Kernelspecs a test installs go when it ends: other tests run "the first" cgpu spec."""
    folder = kernel_dir / "kernels"
    before = set(folder.iterdir()) if folder.is_dir() else set()
    yield
    for path in (set(folder.iterdir()) if folder.is_dir() else set()) - before:
        shutil.rmtree(path, ignore_errors=True)


def private_servers(parent: int | None = None) -> list[psutil.Process]:
    """The private Jupyter servers below ``parent`` (default: this test process)."""
    found = []
    for child in psutil.Process(parent).children(recursive=True):
        try:
            if SERVER_MODULE in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


def wait_gone(process: psutil.Process, timeout: float = 20) -> bool:
    try:
        process.wait(timeout)  # reaps it when it is our child
    except psutil.TimeoutExpired:
        return False
    return True


def server_kernels(provisioner: CgpuProvisioner) -> list[str]:
    """Kernel ids on the provisioner's private server, asked over its REST API."""
    import urllib.request

    assert provisioner.token_file is not None
    token = Path(provisioner.token_file).read_text().strip()
    request = urllib.request.Request(
        provisioner.server_url + "api/kernels", headers={"Authorization": f"token {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return [k["id"] for k in json.loads(response.read())]


def children_now() -> set[int]:
    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    }


def wait_for_children(expected: set[int], timeout: float = 20) -> set[int]:
    deadline = time.monotonic() + timeout
    while (left := children_now() - expected) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_kernelspec_and_command_helpers() -> None:
    argv = kernelspec.make_argv("local", python="/py")
    spec = kernelspec.make_kernel_dict(argv, "x", backend="local", provisioner=PROVISIONER_NAME)
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "cgpu-provisioner",
        "config": {},
    }
    assert spec["argv"] == argv  # still a plain, working kernelspec for VS Code
    assert spec_backend(argv, {}) == "local"
    assert spec_backend(["x", "--backend=jupyter"], {"cgpu_kernel": {"backend": "local"}}) == (
        "jupyter"
    )
    assert spec_backend(["x"], {"cgpu_kernel": {"backend": "jupyter"}}) == "jupyter"
    assert without_backend(argv) == ["/py", "-m", "cgpu_kernel", "-f", "{connection_file}"]
    assert without_backend(["a", "--backend=local", "b"]) == ["a", "b"]
    assert "cgpu-provisioner" in KernelProvisionerFactory.instance().provisioners


def test_start_restart_adopt_shutdown(provisioned_spec: str) -> None:
    before = children_now()
    km, kc = start_kernel(provisioned_spec)
    provisioner = km.provisioner
    assert isinstance(provisioner, CgpuProvisioner)
    (server,) = private_servers()
    assert server.pid == provisioner.server_pid
    token_file = Path(str(provisioner.token_file))
    assert token_file.parent == registry_dir()
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"
    token = token_file.read_text().strip()
    proxy = psutil.Process(provisioner.pid)
    assert token not in " ".join(proxy.cmdline())  # the environment, never argv
    assert "--backend" not in proxy.cmdline()
    environment = proxy.environ()
    assert environment["CGPU_BACKEND"] == "jupyter"
    assert environment["CGPU_URL"] == provisioner.server_url
    assert environment["CGPU_TOKEN"] == token

    reply, outputs = run_cell(kc, "x = 41\nprint(x + 1)")
    assert reply["content"]["status"] == "ok"
    assert stdout_of(outputs) == "42\n"
    first_proxy = provisioner.pid

    # A restart: a new proxy on the same server, with a fresh kernel.
    km.restart_kernel()
    kc.wait_for_ready(timeout=60)
    assert provisioner.pid != first_proxy
    assert [p.pid for p in private_servers()] == [server.pid]
    reply, _ = run_cell(kc, "x")
    assert reply["content"]["ename"] == "NameError"
    assert len(server_kernels(provisioner)) == 1

    # A forced restart kills the proxy before it can delete its remote kernel: the provisioner
    # deletes it, so exactly one kernel is on the server afterwards.
    km.restart_kernel(now=True)
    kc.wait_for_ready(timeout=60)
    assert [p.pid for p in private_servers()] == [server.pid]
    reply, outputs = run_cell(kc, "print('after kill')")
    assert stdout_of(outputs) == "after kill\n"
    assert len(server_kernels(provisioner)) == 1

    # Another manager (a restarted Jupyter server, say) adopts the runtime from the info.
    info = asyncio.run(provisioner.get_provisioner_info())
    assert info["cgpu_server"]["pid"] == server.pid
    assert token not in str(info)
    kc.stop_channels()
    km.shutdown_kernel(restart=True)  # the proxy goes, the server stays
    assert server.is_running()
    km2 = KernelManager(kernel_name=provisioned_spec)
    adopted = KernelProvisionerFactory.instance().create_provisioner_instance(
        info["kernel_id"], km2.kernel_spec, parent=km2
    )
    assert isinstance(adopted, CgpuProvisioner)
    asyncio.run(adopted.load_provisioner_info(info))
    km2.provisioner = adopted
    km2.start_kernel()
    kc2 = km2.client()
    kc2.start_channels()
    try:
        kc2.wait_for_ready(timeout=60)
        reply, outputs = run_cell(kc2, "print('adopted')")
        assert stdout_of(outputs) == "adopted\n"
        assert adopted.server_pid == server.pid
    finally:
        kc2.stop_channels()
        km2.shutdown_kernel()

    # A real shutdown releases the runtime: server stopped, token file gone, nothing left.
    assert wait_gone(server)
    assert not token_file.exists()
    assert wait_for_children(before) == set()


def test_failed_launch_leaves_nothing(kernel_dir: Path) -> None:
    name = install_provisioned(
        kernel_dir,
        "cgpu-test-provisioned-broken",
        ["/nonexistent/python", "-m", "cgpu_kernel", "-f", "{connection_file}"],
    )
    before = children_now()
    tokens = set(registry_dir().glob("provisioned-server-*.token"))
    km = KernelManager(kernel_name=name)
    with pytest.raises(OSError):
        km.start_kernel()
    assert wait_for_children(before) == set()
    assert set(registry_dir().glob("provisioned-server-*.token")) == tokens


def test_remote_kernel_of_a_killed_proxy_is_reclaimed(
    kernel_dir: Path, jupyter_server: RemoteServer
) -> None:
    """jupyter backend: a proxy killed outright cannot delete its remote kernel; cleanup does."""
    argv = kernelspec.make_argv(
        "jupyter", url=jupyter_server.url, token_file=str(jupyter_server.token_file)
    )
    spec = kernelspec.make_kernel_dict(
        argv, "test reclaim", backend="jupyter", provisioner=PROVISIONER_NAME
    )
    kernelspec.write_kernel_spec(spec, kernel_dir / "kernels" / "cgpu-test-provisioned-jupyter")
    before = jupyter_server.kernel_ids()
    km, kc = start_kernel("cgpu-test-provisioned-jupyter")
    try:
        assert isinstance(km.provisioner, CgpuProvisioner)
        assert private_servers() == []  # a remote server exists: nothing to start
        reply, _ = run_cell(kc, "z = 1")
        assert reply["content"]["status"] == "ok"
        remote = jupyter_server.kernel_ids() - before
        assert len(remote) == 1
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)  # SIGKILL: the proxy deletes nothing itself
    assert not jupyter_server.kernel_ids() & remote


async def execute_over_websocket(server: RemoteServer, kernel_id: str, code: str) -> dict[str, Any]:
    """Run ``code`` the way JupyterLab does: over the server's channels WebSocket."""
    session = uuid.uuid4().hex
    url = server.url.replace("http", "ws", 1) + f"api/kernels/{kernel_id}/channels"
    connection = await websocket_connect(
        HTTPRequest(
            f"{url}?session_id={session}", headers={"Authorization": f"token {server.token}"}
        )
    )
    msg_id = uuid.uuid4().hex
    header = {
        "msg_id": msg_id,
        "msg_type": "execute_request",
        "username": "test",
        "session": session,
        "date": "2026-01-01T00:00:00Z",
        "version": "5.3",
    }
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {}}
    connection.write_message(
        json.dumps(
            {
                "header": header,
                "parent_header": {},
                "metadata": {},
                "content": dict(content, allow_stdin=False, stop_on_error=True),
                "channel": "shell",
                "buffers": [],
            }
        )
    )
    stdout, reply, idle = "", None, False
    try:
        while reply is None or not idle:
            raw = await asyncio.wait_for(connection.read_message(), 60)
            assert isinstance(raw, str)
            msg = json.loads(raw)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                stdout += msg["content"]["text"]
            elif msg["msg_type"] == "execute_reply":
                reply = msg["content"]
            elif msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
    finally:
        connection.close()
    return dict(reply, stdout=stdout)


@pytest.mark.servers
def test_jupyter_server_hosts_a_provisioned_kernel(
    jupyter_server: RemoteServer, provisioned_spec: str
) -> None:
    host = jupyter_server.process.pid
    assert private_servers(host) == []
    kernel_id = jupyter_server.api("POST", "api/kernels", {"name": provisioned_spec})["id"]
    try:
        (server,) = private_servers(host)
        reply = asyncio.run(execute_over_websocket(jupyter_server, kernel_id, "y = 7\nprint(y)"))
        assert (reply["status"], reply["stdout"]) == ("ok", "7\n")

        jupyter_server.api("POST", f"api/kernels/{kernel_id}/restart", {})
        assert [p.pid for p in private_servers(host)] == [server.pid]
        reply = asyncio.run(execute_over_websocket(jupyter_server, kernel_id, "y"))
        assert (reply["status"], reply["ename"]) == ("error", "NameError")
    finally:
        jupyter_server.api("DELETE", f"api/kernels/{kernel_id}")
    deadline = time.monotonic() + 20
    while server.is_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not server.is_running() or server.status() == psutil.STATUS_ZOMBIE


HOST = """
import asyncio, json, sys, time
from jupyter_client.manager import KernelManager
km = KernelManager(kernel_name=sys.argv[1])
km.start_kernel()
km.client().wait_for_ready(timeout=60)  # the proxy runs and watches its parent, this host
info = asyncio.run(km.provisioner.get_provisioner_info())
info["connection_info"] = {}  # (holds bytes; not needed to adopt the server)
print(json.dumps({"info": info, "proxy": km.provisioner.pid}), flush=True)
time.sleep(600)
"""


@pytest.mark.servers
def test_host_killed_then_info_reloaded(provisioned_spec: str) -> None:
    """A Jupyter server killed outright leaves no runtime running; its successor, reloading the
    provisioner info, finds the runtime gone and starts a fresh one."""
    host = subprocess.Popen(
        [sys.executable, "-c", HOST, provisioned_spec],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert host.stdout is not None
        started = json.loads(host.stdout.readline())
        (server,) = private_servers(host.pid)
        proxy = psutil.Process(started["proxy"])
        assert started["info"]["cgpu_server"]["pid"] == server.pid
    finally:
        host.kill()
        host.wait(10)
    assert wait_gone(server)  # it watched its parent (the host)
    assert wait_gone(proxy)

    km = KernelManager(kernel_name=provisioned_spec)
    adopted = KernelProvisionerFactory.instance().create_provisioner_instance(
        started["info"]["kernel_id"], km.kernel_spec, parent=km
    )
    asyncio.run(adopted.load_provisioner_info(started["info"]))
    assert isinstance(adopted, CgpuProvisioner)
    assert not adopted.server_alive()
    km.provisioner = adopted
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        assert adopted.server_pid not in (None, server.pid)
        _, outputs = run_cell(kc, "print('fresh runtime')")
        assert stdout_of(outputs) == "fresh runtime\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert private_servers() == []
