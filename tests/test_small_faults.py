"""Issue 20, item 10: the smaller faults, each against real processes where one is involved.

- a SIGKILLed proxy its frontend has not reaped (a zombie) is dead to ``reclaim``;
- ``cgpu-kernel reclaim`` trusts a private CA (``--ca-certs``, ``CGPU_CA_CERTS``);
- two frontends that reuse one ``msg_id`` both get their reply;
- an empty ``ip`` in the connection file binds loopback; bad transport fields are clear errors;
- every state folder level created is 0700, even under umask 000.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from queue import Empty
from typing import Any

import psutil
import pytest
from jupyter_client import BlockingKernelClient, KernelManager

from cgpu_kernel import kernelspec
from cgpu_kernel.backends import registry
from cgpu_kernel.backends.jupyter import normalize_base_url
from cgpu_kernel.exceptions import ConfigurationError
from cgpu_kernel.paths import private_dir, registry_dir, sessions_dir, tokens_dir
from cgpu_kernel.proxy.frontend import socket_address

from .conftest import RemoteServer, free_port, start_jupyter_server, start_kernel
from .test_tls import make_certificates


@pytest.fixture
def private_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state folder of this test's own: its records meet no other test's."""
    folder = tmp_path / "state"
    monkeypatch.setenv("CGPU_STATE_DIR", str(folder))
    return folder


def reclaim_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cgpu_kernel", "reclaim", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def zombie() -> subprocess.Popen[bytes]:
    """A child killed with SIGKILL and not reaped: what a frontend without a restarter holds."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    child.kill()
    deadline = time.monotonic() + 10
    while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child did not become a zombie"
        time.sleep(0.02)
    return child


# --- (a) a zombie owner is dead --------------------------------------------------------------


def test_a_zombie_owner_is_not_alive(private_state: Path) -> None:
    child = zombie()
    try:
        data = {"pid": child.pid, "create_time": psutil.Process(child.pid).create_time()}
        assert not registry.owner_alive(data)
    finally:
        child.wait()
    me = psutil.Process()
    assert registry.owner_alive({"pid": me.pid, "create_time": me.create_time()})


def test_reclaim_deletes_the_kernel_of_an_unreaped_sigkilled_proxy(
    jupyter_spec: str, jupyter_server: RemoteServer, private_state: Path
) -> None:
    before = jupyter_server.kernel_ids()
    km, kc = start_kernel(jupyter_spec)
    orphan = next(iter(jupyter_server.kernel_ids() - before))
    kc.stop_channels()
    process = km.provisioner.process  # type: ignore[union-attr]
    process.kill()  # SIGKILL, and nobody reaps it yet: a zombie, as under nbclient
    deadline = time.monotonic() + 10
    while psutil.Process(process.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        assert orphan in jupyter_server.kernel_ids()
        done = reclaim_command("--token-file", str(jupyter_server.token_file))
        assert done.returncode == 0, done.stderr
        assert "deleted 1 kernel(s), 0 left" in done.stdout
        assert orphan not in jupyter_server.kernel_ids()
    finally:
        process.wait()
        km.cleanup_resources()


# --- (b) reclaim trusts a private CA ---------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    folder = tmp_path_factory.mktemp("tls-reclaim")
    server = start_jupyter_server(folder / "server", tls=make_certificates(folder))
    yield server
    server.stop()


def orphan_on(server: RemoteServer) -> str:
    """A kernel on ``server`` recorded as started by a proxy that has died (and been reaped)."""
    kernel_id = str(server.api("POST", "api/kernels", {"name": "python3"})["id"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {
        "pid": dead.pid,
        "create_time": 0.0,
        "url": normalize_base_url(server.url),
        "kernel_id": kernel_id,
    }
    path = registry_dir() / f"remote-kernel-{kernel_id}.json"
    path.write_text(json.dumps(record))
    return kernel_id


@pytest.mark.parametrize("how", ["option", "environment"])
def test_reclaim_verifies_an_https_server_with_the_given_ca(
    tls_server: RemoteServer, private_state: Path, how: str
) -> None:
    assert tls_server.ca_file is not None
    kernel_id = orphan_on(tls_server)
    env = {k: v for k, v in os.environ.items() if k != "CGPU_CA_CERTS"}
    # without the CA the certificate cannot be verified: the record stays for next time
    refused = reclaim_command("--token-file", str(tls_server.token_file), env=env)
    assert refused.returncode == 1
    assert "0 kernel(s), 1 left" in refused.stdout
    assert "Traceback" not in refused.stderr
    assert kernel_id in tls_server.kernel_ids()
    if how == "option":
        args = ["--token-file", str(tls_server.token_file), "--ca-certs", str(tls_server.ca_file)]
    else:
        args = ["--token-file", str(tls_server.token_file)]
        env["CGPU_CA_CERTS"] = str(tls_server.ca_file)
    done = reclaim_command(*args, env=env)
    assert done.returncode == 0, done.stderr
    assert "deleted 1 kernel(s), 0 left" in done.stdout
    assert kernel_id not in tls_server.kernel_ids()


# --- (c) two frontends reusing one msg_id ----------------------------------------------------


def execute_with_id(kc: BlockingKernelClient, code: str, msg_id: str) -> None:
    msg = kc.session.msg("execute_request", {"code": code, "silent": False, "store_history": False})
    msg["header"]["msg_id"] = msg["msg_id"] = msg_id
    kc.shell_channel.send(msg)


def test_two_frontends_reusing_one_msg_id_both_get_their_reply(
    proxy: tuple[KernelManager, BlockingKernelClient],
) -> None:
    km, first = proxy
    second = BlockingKernelClient()  # its own session, so its own ZMQ identity
    second.load_connection_info(km.get_connection_info())
    second.start_channels()
    try:
        second.wait_for_ready(timeout=30)
        shared = "the-same-id-from-two-frontends"
        execute_with_id(first, "import time; time.sleep(0.5); a = 1", shared)
        execute_with_id(second, "b = 2", shared)
        for client in (first, second):
            reply = client.get_shell_msg(timeout=30)
            while reply["msg_type"] == "kernel_info_reply":  # left from wait_for_ready
                reply = client.get_shell_msg(timeout=30)
            assert reply["parent_header"]["msg_id"] == shared
            assert reply["msg_type"] == "execute_reply"
            assert reply["content"]["status"] == "ok"
        first.execute("a + b", store_history=False)
        check = first.get_shell_msg(timeout=30)
        assert check["content"]["status"] == "ok"  # both cells ran, once each
    finally:
        second.stop_channels()


# --- (d) the connection file's ip and transport ----------------------------------------------


def test_an_empty_or_missing_ip_means_loopback() -> None:
    assert socket_address({"transport": "tcp", "ip": ""}, 5555) == "tcp://127.0.0.1:5555"
    assert socket_address({}, 5555) == "tcp://127.0.0.1:5555"
    assert socket_address({"ip": "0.0.0.0"}, 5555) == "tcp://0.0.0.0:5555"
    assert socket_address({"transport": "ipc", "ip": "/tmp/k"}, 1) == "ipc:///tmp/k-1"
    for bad in ({"transport": "ipc", "ip": ""}, {"transport": "udp"}, {"ip": 7}):
        with pytest.raises(ConfigurationError):
            socket_address(bad, 5555)


def connection_file(folder: Path, **fields: Any) -> Path:
    info: dict[str, Any] = {
        "key": "a0436f6c-1916-498b-8eb9-e81ab9368e84",
        "signature_scheme": "hmac-sha256",
        "transport": "tcp",
        "ip": "",
        "kernel_name": "",
        **{f"{c}_port": free_port() for c in ("shell", "iopub", "stdin", "control", "hb")},
    }
    info.update(fields)
    path = folder / "kernel-empty-ip.json"
    path.write_text(json.dumps(info))
    return path


def test_a_kernel_with_an_empty_ip_serves_on_loopback(
    tmp_path: Path, jupyter_server: RemoteServer
) -> None:
    path = connection_file(tmp_path)
    argv = kernelspec.make_argv(
        "jupyter", url=jupyter_server.url, token_file=str(jupyter_server.token_file)
    )
    argv = [a.replace("{connection_file}", str(path)) for a in argv]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE)
    kc = BlockingKernelClient()
    kc.load_connection_info({**json.loads(path.read_text()), "ip": "127.0.0.1"})
    kc.start_channels(hb=False)  # no KernelManager here: wait_for_ready would trust the heartbeat
    try:
        deadline = time.monotonic() + 60
        kc.kernel_info()  # ZMQ keeps it until the proxy binds
        while True:
            assert process.poll() is None, "the proxy exited"
            try:
                answer = kc.get_shell_msg(timeout=1)
            except Empty:
                assert time.monotonic() < deadline, "no kernel_info_reply within 60 s"
                continue
            assert answer["msg_type"] == "kernel_info_reply"
            break
        msg_id = kc.execute("print('served')")
        reply = kc.get_shell_msg(timeout=60)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "ok"
    finally:
        kc.shutdown()
        kc.stop_channels()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert b"Traceback" not in (process.stderr.read() if process.stderr else b"")


def test_ipc_without_a_path_is_a_clear_error(tmp_path: Path) -> None:
    path = connection_file(tmp_path, transport="ipc", ip="")
    argv = kernelspec.make_argv("jupyter", url="http://127.0.0.1:1/", token_file=None)
    argv = [a.replace("{connection_file}", str(path)) for a in argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert '"transport": "ipc" but no "ip"' in done.stderr
    assert "Traceback" not in done.stderr


# --- (f) state folders are private at every level ---------------------------------------------


def test_every_state_folder_level_is_0700_under_umask_000(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "a" / "b"
    monkeypatch.setenv("CGPU_STATE_DIR", str(root))
    old = os.umask(0)
    try:
        made = [registry_dir(), sessions_dir(), tokens_dir(), private_dir(tmp_path / "x" / "y")]
    finally:
        os.umask(old)
    levels = {tmp_path / "a", root, root / "cgpu-kernel", tmp_path / "x", *made}
    for level in made:
        levels.update(p for p in level.parents if tmp_path in p.parents)
    assert len(levels) >= 7
    for level in sorted(levels):
        assert stat.S_IMODE(level.stat().st_mode) == 0o700, level
