"""The ``local`` backend: the embedded default that needs no account.

Starts a private jupyter-server (``local_server``) on 127.0.0.1 with a random port and a random
token, and uses it exactly like any remote Jupyter server. The server lives as long as this
proxy: it is stopped on shutdown, and it stops itself if the proxy dies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cgpu_kernel.backends.base import BackendOptions, ContentsTarget
from cgpu_kernel.backends.jupyter import JupyterBackend
from cgpu_kernel.exceptions import ContentsUnsupportedError, RemoteUnreachableError
from cgpu_kernel.paths import registry_dir

log = logging.getLogger(__name__)

SERVER_START_TIMEOUT = 60.0


async def start_private_server(
    root_dir: str,
    token: str,
    *,
    stderr: Any,
    timeout: float,
    log_tail: Callable[[], str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``local_server`` for this process; the process and the port it listens on.

    Used by this backend and by the provisioner. A server that does not report its port in
    ``timeout`` -- or whose wait is cancelled, by a startup deadline say -- is stopped, so a
    later attempt starts afresh. ``subprocess.Popen``, not asyncio's: on Windows the proxy runs
    a selector event loop (pyzmq needs one), which cannot start subprocesses.
    """
    env = dict(os.environ, JUPYTER_TOKEN=token)
    for variable in ("CGPU_TOKEN", "CGPU_TOKEN_FILE"):
        env.pop(variable, None)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cgpu_kernel.backends.local_server",
            "--parent-pid",
            str(os.getpid()),
            "--root-dir",
            root_dir,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=env,
        start_new_session=True,  # a Ctrl-C meant for the frontend's terminal must not reach it
    )
    assert server.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(server.stdout.readline), timeout)
        port = int(json.loads(line)["port"])
    except BaseException as exc:
        await stop_private_server(server)
        if not isinstance(exc, asyncio.TimeoutError | ValueError | KeyError | TypeError):
            raise
        ending = f" Its log ends: {log_tail()}" if log_tail else ""
        raise RemoteUnreachableError(
            "The private local Jupyter server did not start. Check that jupyter-server and"
            f" ipykernel are installed in {sys.executable}'s environment.{ending}"
        ) from None
    finally:
        server.stdout.close()  # it prints nothing more there (see local_server)
    return server, port


async def stop_private_server(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server then shuts its kernels down), SIGKILL after 5 s."""
    if server.poll() is not None:
        return
    server.terminate()
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.to_thread(server.wait)), 5.0)
    except asyncio.TimeoutError:
        server.kill()
        await asyncio.to_thread(server.wait)


class LocalBackend(JupyterBackend):
    """A kernel on a private jupyter-server started by (and for) this proxy."""

    def __init__(self, kernel_name: str = "python3", root_dir: str | None = None) -> None:
        self._token = secrets.token_urlsafe(32)
        super().__init__("http://127.0.0.1:1/", self._token, kernel_name, record_for_reclaim=False)
        self.root_dir = root_dir or os.getcwd()
        self.description = f"the {kernel_name!r} kernel on a private local Jupyter server"
        self._server: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @classmethod
    def from_options(cls, options: BackendOptions) -> LocalBackend:
        """Only ``--remote-kernel``: the server, its port and its token are this backend's own."""
        return cls(options.remote_kernel)

    def contents_target(self) -> ContentsTarget:
        """None to reach: the private server's root is this proxy's own folder."""
        raise ContentsUnsupportedError(
            "The local backend's kernel runs on this machine, in this very folder: its files"
            " are already here, so there is nothing to upload or download."
        )

    def _server_running(self) -> bool:
        return self._server is not None and self._server.poll() is None

    async def start_kernel(self) -> str:
        for attempt in range(3):
            if not self._server_running():
                await self._start_server()
            try:
                return await super().start_kernel()
            except RemoteUnreachableError:
                # The port the server picked can be taken by another process before it binds
                # it again (jupyter-server probes, closes, then listens): start a new one.
                if attempt == 2 or self._server_running():
                    raise
                log.info("the private Jupyter server exited at start; starting another")
        raise AssertionError("unreachable")

    async def _start_server(self) -> None:
        await self._stop_server()
        # Its log goes to a file, not the frontend's terminal (jupyter console, nbconvert): it is
        # shown when the server fails to start, and deleted with the server otherwise.
        self._log_path = registry_dir() / f"local-server-{os.getpid()}.log"
        with self._log_path.open("wb") as log_file:
            self._server, port = await start_private_server(
                self.root_dir,
                self._token,
                stderr=log_file,
                timeout=SERVER_START_TIMEOUT,
                log_tail=self._log_tail,
            )
        self.client.base_url = f"http://127.0.0.1:{port}/"
        log.info("private Jupyter server listening on 127.0.0.1:%d", port)

    async def shutdown_kernel(self, *, restart: bool = False) -> None:
        try:
            if self._server_running():
                await super().shutdown_kernel(restart=restart)
        finally:
            await self._stop_server()
            if self._log_path is not None:
                self._log_path.unlink(missing_ok=True)

    def _log_tail(self) -> str:
        try:
            text = self._log_path.read_text(errors="replace") if self._log_path else ""
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-5:]) or "(empty)"

    async def _stop_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await stop_private_server(server)
