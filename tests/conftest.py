"""Real processes for the tests: a jupyter-server and a Kernel Gateway on loopback, kernelspecs.

Nothing here is a double: the servers are the real ``jupyter_server`` and
``jupyter_kernel_gateway`` running real ipykernels, and the frontends in the tests are real
``jupyter_client`` clients. Every server binds 127.0.0.1 and is stopped at the end of the session.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from cgpu_kernel import kernelspec
from cgpu_kernel.backends import warm_server

TIMEOUT = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RemoteServer:
    """A real Jupyter server (or gateway) on loopback, used as the proxy's remote."""

    url: str
    token: str
    process: subprocess.Popen[bytes]
    token_file: Path
    log_path: Path
    ca_file: Path | None = None  # the CA that signed an https server's certificate

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].strip("/"))

    def api(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}"},
        )
        context = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else None
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            data = response.read()
        return json.loads(data) if data else None

    def kernel_ids(self) -> set[str]:
        return {k["id"] for k in self.api("GET", "api/kernels")}

    def wait_for_kernel_count(self, count: int, timeout: float = 15) -> set[str]:
        deadline = time.monotonic() + timeout
        while True:
            ids = self.kernel_ids()
            if len(ids) == count or time.monotonic() > deadline:
                return ids
            time.sleep(0.2)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _wait_until_up(server: RemoteServer, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited: {server.log_path.read_text()[-3000:]}")
        try:
            server.api("GET", "api/kernelspecs")
            return
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.2)
    raise RuntimeError(f"server did not come up: {server.log_path.read_text()[-3000:]}")


def serving(
    process: subprocess.Popen[bytes],
    port: int,
    token: str,
    workdir: Path,
    log_path: Path,
    *,
    ca_file: Path | None = None,
) -> RemoteServer:
    """The record of a server just started on ``port`` (https when ``ca_file`` is given), its
    token in a 0600 file in ``workdir``, once it answers; stopped if it never does."""
    token_file = workdir / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    scheme = "https" if ca_file else "http"
    server = RemoteServer(
        f"{scheme}://127.0.0.1:{port}/", token, process, token_file, log_path, ca_file=ca_file
    )
    try:
        _wait_until_up(server)
    except RuntimeError:
        server.stop()
        raise
    return server


def start_jupyter_server(
    workdir: Path,
    *extra: str,
    port: int | None = None,
    token: str | None = None,
    tls: tuple[Path, Path, Path] | None = None,
) -> RemoteServer:
    """A jupyter-server on loopback; with ``tls`` (CA, certificate, key files) on https."""
    token = token or secrets.token_hex(16)
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "server.log"
    env = dict(os.environ, JUPYTER_TOKEN=token, JUPYTER_RUNTIME_DIR=str(workdir / "runtime"))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={workdir}",
            "--ServerApp.allow_root=True",
            *([f"--ServerApp.certfile={tls[1]}", f"--ServerApp.keyfile={tls[2]}"] if tls else []),
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("wb"),
    )
    return serving(process, port, token, workdir, log_path, ca_file=tls[0] if tls else None)


def start_kernel_gateway(workdir: Path) -> RemoteServer:
    token = secrets.token_hex(16)
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "gateway.log"
    # the gateway passes its kernels only PATH and the variables listed here: IPYTHONDIR too,
    # or their history goes to the user's ~/.ipython (see jupyter_path below)
    env = dict(os.environ, KG_AUTH_TOKEN=token, KG_ENV_PROCESS_WHITELIST="IPYTHONDIR")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kernel_gateway",
            "--KernelGatewayApp.ip=127.0.0.1",
            f"--KernelGatewayApp.port={port}",
            "--KernelGatewayApp.port_retries=0",
            "--JupyterWebsocketPersonality.list_kernels=True",
        ],
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("wb"),
    )
    return serving(process, port, token, workdir, log_path)


@pytest.fixture(scope="session")
def session_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="cgpu-tests-") as folder:
        yield Path(folder)


@pytest.fixture(scope="session")
def jupyter_server(session_dir: Path) -> Iterator[RemoteServer]:
    server = start_jupyter_server(session_dir / "server")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kernel_gateway(session_dir: Path) -> Iterator[RemoteServer]:
    server = start_kernel_gateway(session_dir / "gateway")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kernel_dir(session_dir: Path) -> Path:
    """A Jupyter data path on JUPYTER_PATH where tests install kernelspecs."""
    return session_dir / "jupyter"


@pytest.fixture(autouse=True, scope="session")
def jupyter_path(kernel_dir: Path, session_dir: Path) -> Iterator[None]:
    names = (
        "JUPYTER_PATH",
        "CGPU_STATE_DIR",
        "CGPU_TOKEN",
        "JUPYTER_CONFIG_DIR",
        "CGPU_SPOOL_DIR",
        "IPYTHONDIR",
    )
    saved = {k: os.environ.get(k) for k in names}
    os.environ["JUPYTER_PATH"] = str(kernel_dir)
    os.environ["CGPU_STATE_DIR"] = str(session_dir / "state")
    # a developer's ~/.jupyter/cgpu_kernel_config.py or saved outputs must not leak in
    os.environ["JUPYTER_CONFIG_DIR"] = str(session_dir / "config")
    os.environ["CGPU_SPOOL_DIR"] = str(session_dir / "spool")
    # the test kernels' IPython history (every cell, 100 MB code strings included) stays in
    # the session: in the user's ~/.ipython it grew past 1 GB over runs, and the conformance
    # suite's history search over it outlasted its 15 s timeout
    os.environ["IPYTHONDIR"] = str(session_dir / "ipython")
    os.environ.pop("CGPU_TOKEN", None)
    yield
    # `cgpu-kernel run` on a local kernelspec leaves a warm server for the next run: not past
    # the tests (they stop their own; this stops those of the session's state folder)
    warm_server.stop_all()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def install_spec(
    kernel_dir: Path,
    name: str,
    backend: str,
    *,
    url: str | None = None,
    token_file: Path | None = None,
    remote_kernel: str | None = None,
    interrupt_mode: str = "message",
    extra: list[str] | None = None,
) -> str:
    argv = kernelspec.make_argv(
        backend,
        url=url,
        token_file=str(token_file) if token_file else None,
        remote_kernel=remote_kernel,
        extra=extra,
    )
    spec = kernelspec.make_kernel_dict(
        argv, f"test {name}", backend=backend, interrupt_mode=interrupt_mode
    )
    kernelspec.write_kernel_spec(spec, kernel_dir / "kernels" / name)
    return name


def install_remote_spec(kernel_dir: Path, name: str, server: RemoteServer, **kwargs: Any) -> str:
    """A ``jupyter``-backend kernelspec whose remote is ``server`` (its token file baked in)."""
    return install_spec(
        kernel_dir, name, "jupyter", url=server.url, token_file=server.token_file, **kwargs
    )


@pytest.fixture
def silent_server() -> Iterator[str]:
    """Accepts TCP connections and never answers (a hung remote)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def install_spec_via(
    kernel_dir: Path,
    name: str,
    url: str,
    server: RemoteServer,
    *extra: str,
    outage_notice_after: float = 1,
) -> str:
    """A kernelspec whose remote is ``server`` reached through ``url`` (a fault-injecting relay
    or a front door in front of it), with liveness fast enough for fault tests."""
    return install_spec(
        kernel_dir,
        name,
        "jupyter",
        url=url,
        token_file=server.token_file,
        extra=[
            "--ping-interval=0.5",
            f"--outage-notice-after={outage_notice_after:g}",
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def jupyter_spec(kernel_dir: Path, jupyter_server: RemoteServer) -> str:
    """A kernelspec whose remote is the session's jupyter-server."""
    return install_remote_spec(kernel_dir, "cgpu-test-jupyter", jupyter_server)


@pytest.fixture(scope="session")
def gateway_spec(kernel_dir: Path, kernel_gateway: RemoteServer) -> str:
    return install_remote_spec(kernel_dir, "cgpu-test-gateway", kernel_gateway)


@pytest.fixture(scope="session")
def local_spec(kernel_dir: Path) -> str:
    return install_spec(kernel_dir, "cgpu-test-local", "local")


@pytest.fixture(scope="session")
def legacy_server(session_dir: Path) -> Iterator[RemoteServer]:
    """A jupyter-server that only speaks the legacy JSON WebSocket protocol (no v1)."""
    server = start_jupyter_server(
        session_dir / "legacy", "--ZMQChannelsWebsocketConnection.kernel_ws_protocol="
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def legacy_spec(kernel_dir: Path, legacy_server: RemoteServer) -> str:
    return install_remote_spec(kernel_dir, "cgpu-test-legacy", legacy_server)


@pytest.fixture(params=["jupyter", "gateway", "legacy"])
def any_remote(
    request: pytest.FixtureRequest,
) -> tuple[str, RemoteServer]:
    """The same test against a jupyter-server (v1 protocol), Kernel Gateway, and a
    jupyter-server held to the legacy JSON protocol."""
    server, spec = {
        "jupyter": ("jupyter_server", "jupyter_spec"),
        "gateway": ("kernel_gateway", "gateway_spec"),
        "legacy": ("legacy_server", "legacy_spec"),
    }[request.param]
    return request.getfixturevalue(spec), request.getfixturevalue(server)


def start_kernel(name: str, **kwargs: Any) -> tuple[KernelManager, BlockingKernelClient]:
    km = KernelManager(kernel_name=name)
    km.start_kernel(**kwargs)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
    except RuntimeError:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        raise
    return km, kc


@pytest.fixture
def proxy(jupyter_spec: str) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    """A proxy kernel (jupyter backend) and a client, shut down after the test."""
    km, kc = start_kernel(jupyter_spec)
    yield km, kc
    kc.stop_channels()
    if km.is_alive():
        km.shutdown_kernel()


def run_cell(
    kc: BlockingKernelClient, code: str, timeout: float = TIMEOUT, **kwargs: Any
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Execute ``code``; the shell reply and the iopub messages parented to it, up to idle."""
    msg_id = kc.execute(code, **kwargs)
    outputs = collect_iopub(kc, msg_id, timeout)
    reply = kc.get_shell_msg(timeout=timeout)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=timeout)
    return reply, outputs


def collect_iopub(kc: BlockingKernelClient, msg_id: str, timeout: float = TIMEOUT) -> list[Any]:
    outputs = []
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        outputs.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return outputs


def nbconvert_execute(
    notebook: Path,
    *options: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``jupyter nbconvert --to notebook --execute`` on ``notebook``, as users run it; fails the
    test with the end of its stderr unless it succeeds."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jupyter",
            "nbconvert",
            "--to",
            "notebook",
            "--execute",
            *options,
            str(notebook),
        ],
        cwd=None if cwd is None else str(cwd),
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def stdout_of(outputs: list[dict[str, Any]]) -> str:
    return "".join(
        m["content"]["text"]
        for m in outputs
        if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
    )


def assert_heartbeat_answers(km: KernelManager, times: int = 3) -> None:
    """Ping the kernel's heartbeat socket as frontends do; each ping must come back."""
    info = km.get_connection_info()
    context = zmq.Context()
    hb = context.socket(zmq.REQ)
    hb.linger = 0
    hb.connect(f"tcp://{info['ip']}:{info['hb_port']}")
    try:
        for _ in range(times):
            hb.send(b"ping")
            assert hb.poll(5000), "the heartbeat did not answer"
            assert hb.recv() == b"ping"
    finally:
        context.destroy(linger=0)


def run_benchmark(*args: str, timeout: float = 110) -> str:
    """``python -m <args>`` from the repository root (a benchmark, most often ``--quick``):
    its stdout, once it exited 0; else the test fails with everything it printed. The
    benchmark smoke tests call it and then read the report the benchmark wrote."""
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
