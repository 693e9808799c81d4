"""The processes a benchmark run measures: a loopback jupyter-server (the remote), a second
jupyter-server in gateway mode in front of it, proxy kernels, and ipykernel straight.

Tokens travel in the environment (``JUPYTER_TOKEN``, ``JUPYTER_GATEWAY_AUTH_TOKEN``,
``CGPU_TOKEN``), never in argv. IOPub rate limits are off and the WebSocket message cap is raised
on every server we start, as the ``local`` backend's private server does, so the paths differ
only in what they are, not in how they were configured.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jupyter_client.connect import write_connection_file

MAX_WS_MESSAGE = 1 << 30
SERVER_ARGS = [
    "--ServerApp.ip=127.0.0.1",
    "--ServerApp.port_retries=0",
    "--ServerApp.open_browser=False",
    "--ServerApp.allow_root=True",
    "--ServerApp.log_level=WARN",
    "--ZMQChannelsWebsocketConnection.iopub_data_rate_limit=0",
    "--ZMQChannelsWebsocketConnection.iopub_msg_rate_limit=0",
    "--ServerApp.tornado_settings=" + json.dumps({"websocket_max_message_size": MAX_WS_MESSAGE}),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def api(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        request = urllib.request.Request(
            self.url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read()
        return json.loads(data) if data else None

    def wait_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                self.api("GET", "api/kernelspecs", timeout=5)
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"server did not come up: {self.log_path.read_text()[-3000:]}")

    async def start_kernel(self) -> str:
        model = await asyncio.to_thread(self.api, "POST", "api/kernels", {"name": "python3"})
        return str(model["id"])

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_server(
    workdir: Path, name: str, *extra: str, env: dict[str, str] | None = None
) -> Server:
    """A jupyter-server on 127.0.0.1; not waited for (call ``wait_up``)."""
    token = secrets.token_hex(16)
    port = free_port()
    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    log_path = folder / "server.log"
    full_env = dict(
        os.environ,
        **(env or {}),
        JUPYTER_TOKEN=token,
        JUPYTER_RUNTIME_DIR=str(folder / "runtime"),
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyter_server",
            *SERVER_ARGS,
            f"--ServerApp.port={port}",
            f"--ServerApp.root_dir={folder}",
            *extra,
        ],
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("wb"),
    )
    return Server(f"http://127.0.0.1:{port}/", token, process, log_path)


def start_gateway_mode(workdir: Path, remote: Server) -> Server:
    """jupyter_server's gateway mode: a second server proxying kernels to ``remote``."""
    return start_server(
        workdir,
        "gateway-mode",
        f"--gateway-url={remote.url.rstrip('/')}",
        env={"JUPYTER_GATEWAY_AUTH_TOKEN": remote.token},
    )


@dataclass
class ProxyProcess:
    """``python -m cgpu_kernel -f CONNECTION_FILE --backend ...`` started as a frontend would."""

    process: subprocess.Popen[bytes]
    info: dict[str, Any]
    started: float  # time.perf_counter() right before Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process, timeout=15)


def connection_info(folder: Path, name: str) -> tuple[str, dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    path = str(folder / f"{name}.json")
    ports = [free_port() for _ in range(5)]
    fname, info = write_connection_file(
        path,
        ip="127.0.0.1",
        shell_port=ports[0],
        iopub_port=ports[1],
        stdin_port=ports[2],
        hb_port=ports[3],
        control_port=ports[4],
        key=secrets.token_hex(16).encode(),
        transport="tcp",
        signature_scheme="hmac-sha256",
    )
    return fname, dict(info)


def start_proxy(
    workdir: Path,
    name: str,
    backend: str,
    remote: Server | None = None,
    source: Path | None = None,
    module: str = "cgpu_kernel",
) -> ProxyProcess:
    """Start a proxy kernel; its token (jupyter backend) goes in ``CGPU_TOKEN``.

    ``source``: a checkout to import ``cgpu_kernel`` from instead of this one. ``module``: what
    to run with the proxy's command line (``benchmarks.minimal_relay`` for the yardstick)."""
    folder = workdir / name
    fname, info = connection_info(folder, "connection")
    argv = [sys.executable, "-m", module, "-f", fname, "--backend", backend]
    env = dict(
        os.environ,
        CGPU_STATE_DIR=str(folder / "state"),
        CGPU_SPOOL_DIR=str(folder / "spool"),
        # The throughput measured is the relay's: no per-cell output budget (it would spool
        # all but the first 2 MiB of a 50 MiB cell to disk, by design).
        CGPU_MAX_OUTPUT_BYTES=str(1 << 40),
    )
    env.pop("CGPU_TOKEN", None)
    if source is not None or module != "cgpu_kernel":
        first = str(source) if source is not None else str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [first, env.get("PYTHONPATH")]))
    if remote is not None:
        argv += ["--url", remote.url]
        env["CGPU_TOKEN"] = remote.token
    log_path = folder / "proxy.log"
    started = time.perf_counter()
    process = subprocess.Popen(
        argv,
        env=env,
        cwd=folder,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("wb"),
    )
    return ProxyProcess(process, info, started, log_path)
