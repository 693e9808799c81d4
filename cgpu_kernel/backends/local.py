"""The ``local`` backend: the embedded default that needs no account.

Its kernel runs on a jupyter-server on 127.0.0.1 with a random port and a random token, used
exactly like any remote Jupyter server, in one of two lifetimes (option ``local_server``):

* ``private`` (the default, what notebooks get): a server started by and for this proxy, stopped
  on shutdown, and stopping itself if the proxy dies.
* ``warm`` (what ``cgpu-kernel run`` asks for): the warm server shared by runs
  (``warm_server``), kept between them and stopped after ``local_server_idle_timeout`` seconds
  without a kernel. Each proxy still gets a kernel of its own, which it deletes on shutdown.
"""

from __future__ import annotations

import logging
import os
import secrets
import subprocess
from pathlib import Path, PurePosixPath

from cgpu_kernel.backends import warm_server
from cgpu_kernel.backends.base import BackendOptions, ContentsTarget
from cgpu_kernel.backends.jupyter import JupyterBackend
from cgpu_kernel.backends.server_process import start_private_server, stop_private_server
from cgpu_kernel.exceptions import ContentsUnsupportedError, RemoteUnreachableError
from cgpu_kernel.paths import registry_dir

log = logging.getLogger(__name__)

SERVER_START_TIMEOUT = 60.0


class LocalBackend(JupyterBackend):
    """A kernel on a local jupyter-server: a private one, or the warm one (see the module)."""

    def __init__(
        self,
        kernel_name: str = "python3",
        root_dir: str | None = None,
        *,
        warm_idle_timeout: float | None = None,
    ) -> None:
        self._token = secrets.token_urlsafe(32)
        super().__init__(
            "http://127.0.0.1:1/", lambda: self._token, kernel_name, record_for_reclaim=False
        )
        self.root_dir = root_dir or os.getcwd()
        #: None: a private server; else the idle timeout a warm server is started with
        self.warm_idle_timeout = warm_idle_timeout
        kind = "private" if warm_idle_timeout is None else "warm"
        self.description = f"the {kernel_name!r} kernel on a {kind} local Jupyter server"
        self._server: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    @classmethod
    def from_options(cls, options: BackendOptions) -> LocalBackend:
        """``--remote-kernel``, ``--local-server`` and ``--local-server-idle-timeout``: the
        server, its port and its token are this backend's own (or the warm server's)."""
        warm = options.local_server == "warm" and options.local_server_idle_timeout > 0
        if warm and not warm_server.supported():
            log.info("no warm local server on this platform: starting a private one")
            warm = False
        return cls(
            options.remote_kernel,
            warm_idle_timeout=options.local_server_idle_timeout if warm else None,
        )

    def contents_target(self) -> ContentsTarget:
        """None to reach: the private server's root is this proxy's own folder."""
        raise ContentsUnsupportedError(
            "The local backend's kernel runs on this machine, in this very folder: its files"
            " are already here, so there is nothing to upload or download."
        )

    def _server_running(self) -> bool:
        return self._server is not None and self._server.poll() is None

    async def start_kernel(self) -> str:
        if self.warm_idle_timeout is not None:
            return await self._start_on_warm_server()
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

    async def _start_on_warm_server(self) -> str:
        if self.kernel_id is not None:  # already claimed: is it still there?
            return await super().start_kernel()
        # the server serves "/", so the kernel's folder is this proxy's, as a path below it
        relative = PurePosixPath(self.root_dir).relative_to("/").as_posix()
        self.kernel_path = "" if relative == "." else relative
        return await warm_server.claim(
            warm_server.environment_key(os.environ),
            os.environ,
            idle_timeout=float(self.warm_idle_timeout or warm_server.DEFAULT_IDLE_TIMEOUT),
            start_timeout=SERVER_START_TIMEOUT,
            use=self._claim_kernel,
        )

    async def _claim_kernel(self, server: warm_server.WarmServer) -> str:
        """Called by ``warm_server.claim`` under the server's lock: start our kernel there."""
        self.client.base_url = server.url
        self._token = server.token
        return await super().start_kernel()

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
        if self.warm_idle_timeout is not None:  # the warm server stays for the next run
            await super().shutdown_kernel(restart=restart)
            return
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
