"""A ``jupyter_client`` kernel provisioner that owns the remote runtime's lifecycle.

Selected by a kernelspec's ``metadata.kernel_provisioner.provisioner_name: cgpu-provisioner``
(entry point group ``jupyter_client.kernel_provisioners``). Frontends built on
``jupyter_client``'s ``KernelManager`` (JupyterLab, Notebook, nbclient, ``jupyter console``)
then call it around the proxy kernel's process; frontends that launch argv directly (VS Code)
ignore it and the same kernelspec works as a plain one.

For a kernelspec whose proxy uses the ``local`` backend, the provisioner starts the private
jupyter-server itself, in :meth:`pre_launch` (so the frontend shows the kernel *starting* while
the runtime comes up, not a frozen first cell), and hands it to the proxy as a ``jupyter``
backend through the kernel's environment: ``CGPU_BACKEND=jupyter``, ``CGPU_URL`` and
``CGPU_TOKEN`` (the environment, never argv; ``--backend local`` is dropped from the command,
since the command line beats ``CGPU_*`` variables). Then:

* a kernel **restart** is a new proxy process on the **same server**: fresh kernel state, no
  server start-up to wait for, and what the runtime installed (``%pip install``) is kept;
* remote kernels a dead proxy left on the server are deleted before the next proxy starts;
* a real **shutdown** (``cleanup(restart=False)``) stops the server, as does a failed launch;
* :meth:`get_provisioner_info` / :meth:`load_provisioner_info` carry the server's pid, port and
  the path of its 0600 token file, so a manager in another process can adopt or stop it.

The server also stops itself when the process hosting the provisioner dies
(``local_server --parent-pid``), so a killed Jupyter server leaves nothing behind.
Kernelspecs on the ``jupyter`` backend get :class:`LocalProvisioner`'s behaviour, plus one
thing a proxy cannot do for itself: after it died without deleting its remote kernel (SIGKILL,
``shutdown_kernel(now=True)``), :meth:`cleanup` deletes that kernel (``registry``'s records).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.local_provisioner import LocalProvisioner
from traitlets import Float

from cgpu_kernel import kernelspec
from cgpu_kernel.backends import registry
from cgpu_kernel.backends.jupyter import JupyterServerClient
from cgpu_kernel.backends.server_process import start_private_server, stop_private_server
from cgpu_kernel.exceptions import CgpuError, RemoteProtocolError, RemoteUnreachableError
from cgpu_kernel.paths import registry_dir

#: The name kernelspecs use in ``metadata.kernel_provisioner.provisioner_name``.
PROVISIONER_NAME = "cgpu-provisioner"


def spec_backend(argv: list[str], metadata: dict[str, Any]) -> str:
    """The backend a kernelspec's proxy would use: ``--backend`` in argv, else its metadata."""
    named = kernelspec.argv_option(argv, *kernelspec.BACKEND_OPTIONS)
    if named is not None:
        return named
    return str(metadata.get("cgpu_kernel", {}).get("backend", "local"))


def without_backend(cmd: list[str]) -> list[str]:
    """``cmd`` minus its ``--backend X`` option, so ``CGPU_BACKEND`` in the environment rules."""
    return kernelspec.without_option(cmd, *kernelspec.BACKEND_OPTIONS)


class CgpuProvisioner(LocalProvisioner):
    """Starts the proxy kernel like :class:`LocalProvisioner`, and owns its runtime (above)."""

    server_start_timeout = Float(
        60.0, config=True, help="Seconds the private Jupyter server may take to start."
    )

    server: subprocess.Popen[bytes] | None = None  # the server, when this process started it
    server_pid: int | None = None
    server_create_time: float | None = None
    server_port: int | None = None
    token_file: str | None = None
    root_dir: str | None = None
    remote_url: str | None = None  # jupyter backend: the remote server, to reclaim kernels on
    _remote_token: str | None = None  # (kept in memory only)
    _remote_token_file: str | None = None

    # --- lifecycle hooks (called by KernelManager) --------------------------------------------

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        """Called by ``KernelManager.pre_start_kernel`` on every start *and* restart, before
        :meth:`launch_kernel`: writes the connection file and builds the command (super), then
        makes sure the private server runs and points the proxy at it."""
        kwargs = await super().pre_launch(**kwargs)
        if not self.manages_server:
            self._remember_remote(list(kwargs["cmd"]), kwargs["env"])
            return kwargs
        try:
            await self._ensure_server(kwargs.get("cwd"), kwargs.get("stderr"))
            env = kwargs["env"]
            env.pop("CGPU_TOKEN_FILE", None)  # a token file would beat CGPU_TOKEN
            env.update(
                CGPU_BACKEND="jupyter",
                CGPU_URL=self.server_url,
                CGPU_TOKEN=self._read_token(),
            )
            kwargs["cmd"] = without_backend(list(kwargs["cmd"]))
        except BaseException:
            await self._stop_server()
            raise
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        """Called by ``KernelManager.launch_kernel`` right after :meth:`pre_launch`: starts the
        proxy process. A launch that fails stops the server started for it."""
        try:
            info: KernelConnectionInfo = await super().launch_kernel(cmd, **kwargs)
        except BaseException:
            await self._stop_server()
            raise
        return info

    async def cleanup(self, restart: bool = False) -> None:
        """Called by ``KernelManager.cleanup_resources`` at the end of every shutdown, after the
        proxy process is gone; ``restart`` is True when a new launch follows at once.

        On a restart the server stays; kernels a killed proxy could not delete are deleted. On a
        real shutdown the server is stopped (which also stops any kernel left on it). For a
        ``jupyter``-backend kernelspec, remote kernels of dead proxies are reclaimed."""
        await super().cleanup(restart=restart)
        if not self.manages_server:
            await self._reclaim_remote()
            return
        if restart:
            await self._delete_leftover_kernels()
        else:
            await self._stop_server()

    async def get_provisioner_info(self) -> dict[str, Any]:
        """Called by applications that persist kernel managers (after a start): what another
        process needs to adopt this kernel's server. The token stays in its 0600 file."""
        info: dict[str, Any] = await super().get_provisioner_info()
        info["cgpu_server"] = {
            "pid": self.server_pid,
            "create_time": self.server_create_time,
            "port": self.server_port,
            "token_file": self.token_file,
            "root_dir": self.root_dir,
        }
        # jupyter backend: where to reclaim a dead proxy's kernels (a token is never stored)
        info["cgpu_remote"] = {"url": self.remote_url, "token_file": self._remote_token_file}
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        """Called by such applications on a fresh provisioner, in place of a start: the inverse
        of :meth:`get_provisioner_info`. A server that died meanwhile is replaced at the next
        :meth:`pre_launch`."""
        await super().load_provisioner_info(provisioner_info)
        server = provisioner_info.get("cgpu_server") or {}
        self.server = None
        self.server_pid = server.get("pid")
        self.server_create_time = server.get("create_time")
        self.server_port = server.get("port")
        self.token_file = server.get("token_file")
        self.root_dir = server.get("root_dir")
        remote = provisioner_info.get("cgpu_remote") or {}
        self.remote_url = remote.get("url")
        self._remote_token_file = remote.get("token_file")
        self._remote_token = os.environ.get("CGPU_TOKEN")

    # --- the private server -------------------------------------------------------------------

    @property
    def manages_server(self) -> bool:
        """True for kernelspecs whose proxy would start its own local server."""
        spec = self.kernel_spec
        if spec is None:
            return False
        return spec_backend(list(spec.argv), dict(spec.metadata or {})) == "local"

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/"

    def server_alive(self) -> bool:
        if self.server is not None:
            return self.server.poll() is None
        if self.server_pid is None:
            return False
        try:
            process = psutil.Process(self.server_pid)
            same = abs(process.create_time() - float(self.server_create_time or 0)) < 1.0
            return bool(same and process.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def _read_token(self) -> str:
        if not self.token_file:
            raise RemoteUnreachableError("The private Jupyter server's token file is missing.")
        return Path(self.token_file).read_text().strip()

    async def _ensure_server(self, cwd: str | None, stderr: Any = None) -> None:
        """Start the private server unless it runs; it logs where the kernel logs."""
        if self.server_alive():
            return
        await self._stop_server()  # forget a dead one (and its token file)
        token = secrets.token_urlsafe(32)
        self.token_file = str(registry_dir() / f"provisioned-server-{self.kernel_id}.token")
        descriptor = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(token)
        self.root_dir = str(cwd or os.getcwd())
        server, self.server_port = await start_private_server(
            self.root_dir, token, stderr=stderr, timeout=self.server_start_timeout
        )
        self.server, self.server_pid = server, server.pid
        self.server_create_time = psutil.Process(server.pid).create_time()
        self.log.info("cgpu: private Jupyter server pid %d, port %d", server.pid, self.server_port)

    def _remember_remote(self, cmd: list[str], env: dict[str, str]) -> None:
        """Note where a ``jupyter``-backend proxy's remote kernels live, and its credentials."""
        spec = self.kernel_spec
        if spec is None or spec_backend(cmd, dict(spec.metadata or {})) != "jupyter":
            return
        options = {"--url": env.get("CGPU_URL"), "--token-file": env.get("CGPU_TOKEN_FILE")}
        for index, arg in enumerate(cmd):
            for option in options:
                if arg == option and index + 1 < len(cmd):
                    options[option] = cmd[index + 1]
                elif arg.startswith(option + "="):
                    options[option] = arg.split("=", 1)[1]
        self.remote_url = options["--url"] or None
        self._remote_token_file = options["--token-file"] or None
        self._remote_token = env.get("CGPU_TOKEN")

    def _remote_token_now(self) -> str | None:
        if self._remote_token_file:
            try:
                return Path(self._remote_token_file).expanduser().read_text().strip() or None
            except OSError:
                return None
        return self._remote_token

    async def _reclaim_remote(self) -> None:
        """Delete the remote kernels of proxies that died without deleting them (SIGKILL)."""
        if not self.remote_url:
            return
        try:
            client = JupyterServerClient(
                self.remote_url, self._remote_token_now, request_timeout=10.0
            )
        except CgpuError:
            return  # an unusable URL: the proxy already said so
        try:
            reclaimed = await registry.reclaim_orphans(client)
            if reclaimed:
                self.log.info("cgpu: deleted remote kernels of dead proxies: %s", reclaimed)
        except CgpuError as exc:
            self.log.warning("cgpu: could not reclaim remote kernels: %s", exc)
        finally:
            client.close()

    async def _delete_leftover_kernels(self) -> None:
        """Delete every kernel on the private server: after the proxy is gone, none is used."""
        if not self.server_alive() or self.server_port is None:
            return
        client = JupyterServerClient(self.server_url, self._read_token(), request_timeout=10.0)
        try:
            models = await client.call("GET", "api/kernels") or []
            for kernel_id in [str(model["id"]) for model in models]:
                try:
                    await client.call("DELETE", f"api/kernels/{kernel_id}")
                except RemoteProtocolError:
                    continue  # already gone: its proxy deleted it a moment ago
                self.log.info("cgpu: deleted kernel %s left by the previous proxy", kernel_id)
        except (CgpuError, KeyError, TypeError) as exc:
            self.log.warning("cgpu: could not delete leftover kernels: %s", exc)
        finally:
            client.close()

    async def _stop_server(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its token file."""
        server, self.server = self.server, None
        if server is not None:
            await stop_private_server(server)
        elif self.server_alive() and self.server_pid is not None:
            process = psutil.Process(self.server_pid)
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 10)
            except psutil.TimeoutExpired:
                process.kill()
        if self.token_file:
            Path(self.token_file).unlink(missing_ok=True)
        self.server_pid = self.server_create_time = self.server_port = self.token_file = None
